// Herald's job board page: a live job list over Server-Sent Events, job
// details, sign-in and an apply button that can be clicked, retried and
// reloaded without ever applying twice.
//
// - Sign-in: GET /api/sign-in says how. With the board's OpenID Connect
//   provider, "Sign in" sends the browser there (authorization code with
//   PKCE S256, a fresh state and nonce kept in sessionStorage); back on this
//   page with ?code&state, the code is exchanged at the provider's token
//   endpoint with the verifier (no client secret: the page is a public
//   client), and the ID token, its nonce checked, is the Bearer of every
//   call. An answer whose state is not the one this tab started is refused
//   (a forged or replayed callback), and the code leaves the address bar at
//   once. Dev sign-in (an email alone) shows only where the server has it.
// - The list comes from GET /api/jobs/stream: an `event: snapshot` replaces
//   it; `job.posted` and `job.updated` insert or replace a job by id (an edit
//   is highlighted briefly); `job.closed` removes it (an open detail then
//   says "This job is closed"). An event older (by `version`) than the job
//   shown is ignored. The browser's EventSource reconnects on its own,
//   honouring the server's jittered `retry:` and resuming with Last-Event-ID.
// - Until a snapshot (or the fallback below) answers, the list says
//   "Loading jobs…", never "No jobs yet". When the stream delivers no
//   snapshot within FALLBACK_MS (a proxy that blocks event streams, a server
//   turning streams away), the page reads GET /api/jobs instead, shows it with
//   a "Live updates paused" note, and reads it again every POLL_MS until a
//   snapshot arrives and the page is live again.
// - Apply: one Idempotency-Key per (job, apply intent), made before the first
//   attempt and kept in sessionStorage until the server gives a definitive
//   answer, so a retry, a double click or a reload reuses it and the server
//   replays instead of applying again. Network errors, 409, 429 and 5xx are
//   retried with full jitter, never sooner than a Retry-After.
"use strict";

(() => {
  const RETRY = { baseMs: 500, capMs: 8000, attempts: 6 };
  const FALLBACK_MS = 5000;
  const POLL_MS = 30000;
  const store = window.sessionStorage;
  const $ = (id) => document.getElementById(id);

  const state = {
    jobs: new Map(), // id -> job, the open jobs listed
    order: [], // ids, newest first
    closed: new Map(), // id -> version, jobs this page saw closed
    selected: null,
    token: store.getItem("herald:token"),
    email: store.getItem("herald:email"),
    signIn: null, // GET /api/sign-in: { dev_login, provider }
    applying: false,
    loaded: false, // a snapshot or GET /api/jobs has answered
    live: false, // the stream's snapshot arrived and the stream is open
    filter: { q: "", location: "" }, // the search box and location filter
    source: null, // the open EventSource
  };

  // The filter as a query string (empty parts left out), the same for the
  // stream and the fallback list.
  function filterQuery() {
    const params = new URLSearchParams();
    if (state.filter.q) params.set("q", state.filter.q);
    if (state.filter.location) params.set("location", state.filter.location);
    return params.toString();
  }

  // ---- account -----------------------------------------------------------

  function renderAccount() {
    const signedIn = Boolean(state.token);
    const how = state.signIn; // null until GET /api/sign-in answers
    $("sign-in").hidden = signedIn || !how || !how.dev_login;
    $("sign-in-provider").hidden = signedIn || !how || !how.provider;
    $("sign-in-unavailable").hidden = signedIn || !how || how.dev_login || Boolean(how.provider);
    if (how && how.provider) $("provider-name").textContent = new URL(how.provider.issuer).host;
    $("signed-in").hidden = !signedIn;
    $("who").textContent = state.email || "";
  }

  // Moves focus to the way to sign in that this page offers.
  function focusSignIn() {
    const how = state.signIn;
    if (how && how.provider) $("provider-sign-in").focus();
    else $("email").focus();
  }

  function signedInAs(token, email) {
    state.token = token;
    state.email = email;
    store.setItem("herald:token", token);
    store.setItem("herald:email", email);
    renderAccount();
    renderDetail();
    refreshApplications();
    $("sign-out").focus();
  }

  // The claims of a JWT, unverified (the server verifies; the page reads
  // the nonce, the email and the expiry); null if it is not one.
  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part + "=".repeat((4 - (part.length % 4)) % 4)), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      return null;
    }
  }

  function base64url(bytes) {
    let text = "";
    for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function randomToken() {
    return base64url(crypto.getRandomValues(new Uint8Array(32)));
  }

  const SIGN_IN = "herald:oidc"; // the sign-in under way in this tab
  const redirectUri = () => `${location.origin}/`;

  $("provider-sign-in").addEventListener("click", async () => {
    const provider = state.signIn && state.signIn.provider;
    if (!provider) return;
    $("provider-error").hidden = true;
    if (!window.crypto || !crypto.subtle) {
      showError($("provider-error"), "Sign-in needs this page over https.");
      return;
    }
    const started = { state: randomToken(), nonce: randomToken(), verifier: randomToken(), issuer: provider.issuer };
    const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(started.verifier)));
    store.setItem(SIGN_IN, JSON.stringify(started));
    const url = new URL(provider.authorization_endpoint);
    const query = {
      response_type: "code",
      client_id: provider.client_id,
      redirect_uri: redirectUri(),
      scope: provider.scope,
      state: started.state,
      nonce: started.nonce,
      code_challenge: challenge,
      code_challenge_method: "S256",
    };
    for (const [name, value] of Object.entries(query)) url.searchParams.set(name, value);
    location.assign(url.toString());
  });

  // Back from the provider with ?code&state (or ?error): finish the sign-in.
  async function finishProviderSignIn() {
    const params = new URLSearchParams(location.search);
    if (!params.has("code") && !params.has("error")) return;
    // The code leaves the address bar and the history at once.
    history.replaceState(null, "", redirectUri());
    const started = JSON.parse(store.getItem(SIGN_IN) || "null");
    store.removeItem(SIGN_IN);
    const error = $("provider-error");
    const provider = state.signIn && state.signIn.provider;
    if (params.has("error")) {
      showError(error, `Sign-in was not completed: ${params.get("error_description") || params.get("error")}.`);
      return;
    }
    if (!provider || !started || params.get("state") !== started.state || started.issuer !== provider.issuer
        || (params.has("iss") && params.get("iss") !== provider.issuer)) {
      showError(error, "Sign-in refused: this answer does not belong to a sign-in started on this page. Sign in again.");
      return;
    }
    try {
      const response = await fetch(provider.token_endpoint, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({
          grant_type: "authorization_code",
          code: params.get("code"),
          redirect_uri: redirectUri(),
          client_id: provider.client_id,
          code_verifier: started.verifier,
        }),
      });
      const body = await response.json().catch(() => ({}));
      const claims = body.id_token ? claimsOf(body.id_token) : null;
      if (!response.ok || !claims) {
        showError(error, `Sign-in failed at the provider: ${body.error_description || body.error || `error ${response.status}`}.`);
        return;
      }
      if (claims.nonce !== started.nonce) {
        showError(error, "Sign-in refused: the provider's token was not issued for this sign-in. Sign in again.");
        return;
      }
      signedInAs(body.id_token, claims.email || claims.sub);
    } catch (_) {
      showError(error, "Cannot reach the sign-in provider. Check your connection and try again.");
    }
  }

  // How this server signs users in; asked again while it does not answer.
  async function loadSignIn() {
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await fetch("/api/sign-in");
        if (response.ok) {
          state.signIn = await response.json();
          break;
        }
      } catch (_) {
        // Not reachable yet: asked again below.
      }
      await sleep(retryDelay(Math.min(attempt, 4), 0));
    }
    renderAccount();
    await finishProviderSignIn();
  }

  $("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    const email = $("email").value.trim();
    const error = $("sign-in-error");
    error.hidden = true;
    if (!$("email").checkValidity() || !email) {
      showError(error, "Enter an email address.");
      $("email").focus();
      return;
    }
    try {
      const response = await fetch("/api/dev/login", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ email }),
      });
      const body = await response.json();
      if (!response.ok) {
        showError(error, body.detail || body.title || "Sign-in failed.");
        return;
      }
      signedInAs(body.token, email);
    } catch (_) {
      showError(error, "Cannot reach the server. Check your connection and try again.");
    }
  });

  // Signed out: by the user, by an expired token, or by a 401.
  function forgetSignIn() {
    state.token = null;
    state.email = null;
    store.removeItem("herald:token");
    store.removeItem("herald:email");
  }

  $("sign-out").addEventListener("click", () => {
    forgetSignIn();
    renderAccount();
    renderDetail();
    refreshApplications();
    focusSignIn();
  });

  function showError(element, message) {
    element.textContent = message;
    element.hidden = false;
  }

  // ---- live job list -----------------------------------------------------

  function addJob(job, atTop) {
    if (!job || !job.id || state.jobs.has(job.id)) return false;
    state.jobs.set(job.id, job);
    if (atTop) state.order.unshift(job.id);
    else state.order.push(job.id);
    return true;
  }

  const versionOf = (job) => job.version || 1;

  // Whether an event about `id` at `version` is older than what the page holds.
  function stale(id, version) {
    const held = state.jobs.get(id);
    if (held && versionOf(held) > version) return true;
    return (state.closed.get(id) || 0) >= version;
  }

  // job.posted / job.updated: insert (in id order: UUIDv7 ids sort by time,
  // newest first) or replace in place.
  function upsertJob(job, highlight) {
    if (!job || !job.id || stale(job.id, versionOf(job))) return;
    const known = state.jobs.has(job.id);
    state.jobs.set(job.id, job);
    if (!known) {
      const at = state.order.findIndex((id) => id < job.id);
      state.order.splice(at === -1 ? state.order.length : at, 0, job.id);
    }
    renderJobs();
    if (highlight && known) {
      const item = document.querySelector(`#jobs li[data-job-id="${job.id}"] .job`);
      if (item) item.classList.add("updated");
    }
    if (state.selected === job.id) renderDetail();
  }

  // job.closed / job.removed: off the list; an open detail says so.
  function removeJob(id, version, closed) {
    if (!id || stale(id, version)) return;
    if (closed) state.closed.set(id, version);
    if (state.jobs.delete(id)) {
      state.order = state.order.filter((held) => held !== id);
      renderJobs();
    }
    if (state.selected === id) renderDetail();
  }

  function jobItem(job) {
    const li = document.createElement("li");
    li.dataset.jobId = job.id;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "job";
    const title = document.createElement("span");
    title.className = "job-title";
    title.textContent = job.title;
    const meta = document.createElement("span");
    meta.className = "job-meta";
    meta.textContent = `${job.company} · ${job.location} · `;
    const posted = document.createElement("time");
    posted.dateTime = job.posted_at;
    posted.textContent = new Date(job.posted_at).toLocaleDateString();
    meta.append(posted);
    button.append(title, meta);
    button.addEventListener("click", () => select(job.id));
    li.append(button);
    return li;
  }

  function renderJobs() {
    const list = $("jobs");
    list.replaceChildren(...state.order.map((id) => jobItem(state.jobs.get(id))));
    $("jobs-loading").hidden = state.loaded;
    $("jobs-empty").hidden = !state.loaded || state.order.length > 0;
    markSelected();
  }

  // ---- fallback when the stream does not deliver ---------------------------

  let fallbackTimer = null;
  let pollTimer = null;

  // Arms the fallback: unless a snapshot arrives within FALLBACK_MS, the
  // list is read from GET /api/jobs.
  function armFallback() {
    if (fallbackTimer) return;
    fallbackTimer = setTimeout(() => {
      fallbackTimer = null;
      if (!state.live) pollJobs();
    }, FALLBACK_MS);
  }

  async function pollJobs() {
    clearTimeout(pollTimer);
    pollTimer = null;
    if (state.live) return;
    try {
      const query = filterQuery();
      const response = await fetch(`/api/jobs?limit=100${query ? `&${query}` : ""}`, {
        headers: { accept: "application/json" },
      });
      if (response.ok) {
        const page = await response.json();
        if (!state.live) {
          // The page is the list (open jobs, newest first): it replaces it.
          state.jobs = new Map();
          state.order = [];
          for (const job of page.items || []) addJob(job, false);
          state.loaded = true;
          renderJobs();
          showPaused(true);
        }
      }
    } catch (_) {
      // Nothing reachable: keep what is shown; the next poll tries again.
    }
    if (!state.live) pollTimer = setTimeout(pollJobs, POLL_MS);
  }

  function showPaused(paused) {
    $("jobs-paused").hidden = !paused;
    if (paused) {
      const at = new Date();
      $("jobs-paused-at").dateTime = at.toISOString();
      $("jobs-paused-at").textContent = at.toLocaleTimeString();
      setConnection("Live updates paused", "paused");
    }
  }

  function markSelected() {
    for (const li of $("jobs").children) {
      const current = li.dataset.jobId === state.selected;
      li.firstChild.setAttribute("aria-current", current ? "true" : "false");
    }
  }

  function setConnection(label, status) {
    const element = $("connection");
    element.textContent = label;
    element.dataset.state = status;
  }

  function connect() {
    const query = filterQuery();
    const source = new EventSource(`/api/jobs/stream${query ? `?${query}` : ""}`);
    state.source = source;
    armFallback();
    source.addEventListener("error", () => {
      state.live = false;
      if ($("jobs-paused").hidden) setConnection("Reconnecting…", "reconnecting");
      // A stream that does not come back soon: the list from the API.
      armFallback();
    });
    source.addEventListener("snapshot", (event) => {
      const { jobs } = JSON.parse(event.data);
      // The snapshot is the list (open jobs, newest first): it replaces it.
      state.jobs = new Map();
      state.order = [];
      for (const job of jobs) addJob(job, false);
      state.loaded = true;
      state.live = true;
      clearTimeout(fallbackTimer);
      fallbackTimer = null;
      clearTimeout(pollTimer);
      pollTimer = null;
      showPaused(false);
      setConnection("Live", "live");
      renderJobs();
      if (state.selected) renderDetail();
    });
    source.addEventListener("job.posted", (event) => upsertJob(JSON.parse(event.data), false));
    source.addEventListener("job.updated", (event) => upsertJob(JSON.parse(event.data), true));
    for (const name of ["job.closed", "job.removed"]) {
      source.addEventListener(name, (event) => {
        const { id, version } = JSON.parse(event.data);
        removeJob(id, version, name === "job.closed");
      });
    }
  }

  // A new search: the list is the filter's, from a new stream (its own
  // snapshot), or from GET /api/jobs with the same filter if it stalls.
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filter = { q: $("search-q").value.trim(), location: $("search-location").value.trim() };
    if (state.source) state.source.close();
    clearTimeout(fallbackTimer);
    fallbackTimer = null;
    clearTimeout(pollTimer);
    pollTimer = null;
    state.live = false;
    state.loaded = false;
    state.jobs = new Map();
    state.order = [];
    renderJobs();
    setConnection("Connecting…", "connecting");
    connect();
  });

  // ---- my applications ---------------------------------------------------

  const titles = new Map(); // job id -> title, for the applications list
  let applicationsTimer = null;

  async function jobTitle(id) {
    const listed = state.jobs.get(id) || shown.get(id);
    if (listed) return listed.title;
    if (!titles.has(id)) {
      try {
        const response = await fetch(`/api/jobs/${encodeURIComponent(id)}`);
        titles.set(id, response.ok ? (await response.json()).title : "A job no longer listed");
      } catch (_) {
        return "…";
      }
    }
    return titles.get(id);
  }

  // What became of each confirmation email, in words (the API's
  // email_status: Herald's side, then what the provider reported).
  const STATUS_TEXT = {
    pending: "Confirmation email on its way",
    sent: "Confirmation email sent",
    delivered: "Confirmation email delivered",
    bounced: "Confirmation email bounced: check your address",
    complained: "Confirmation email marked as spam: no more emails to this address",
    failed: "Confirmation email could not be sent",
    suppressed: "No confirmation email: this address bounced or reported spam before",
    dead: "Confirmation email could not be delivered",
  };

  // The signed-in user's applications with their email status; read again
  // every few seconds while an email is still pending, and now and then
  // while one is sent and its fate (delivered, bounced) not yet reported.
  async function refreshApplications() {
    clearTimeout(applicationsTimer);
    applicationsTimer = null;
    const section = $("my-applications");
    section.hidden = !state.token;
    if (!state.token) return;
    let page;
    try {
      const response = await fetch("/api/applications?limit=100", {
        headers: { authorization: `Bearer ${state.token}` },
      });
      if (!response.ok) return;
      page = await response.json();
    } catch (_) {
      applicationsTimer = setTimeout(refreshApplications, 5000);
      return;
    }
    const items = await Promise.all(
      (page.items || []).map(async (application) => {
        const li = document.createElement("li");
        li.dataset.applicationId = application.id;
        const what = document.createElement("span");
        what.className = "application-job";
        what.textContent = await jobTitle(application.job_id);
        const status = document.createElement("span");
        status.className = "email-status";
        status.dataset.status = application.email_status;
        status.textContent = STATUS_TEXT[application.email_status] || application.email_status;
        const when = document.createElement("time");
        when.dateTime = application.created_at;
        when.textContent = new Date(application.created_at).toLocaleDateString();
        li.append(what, when, status);
        return li;
      }),
    );
    $("my-applications-list").replaceChildren(...items);
    $("my-applications-empty").hidden = items.length > 0;
    const statuses = (page.items || []).map((a) => a.email_status);
    if (statuses.includes("pending")) {
      applicationsTimer = setTimeout(refreshApplications, 3000);
    } else if (statuses.includes("sent")) {
      applicationsTimer = setTimeout(refreshApplications, 15000);
    }
  }

  // ---- detail and apply --------------------------------------------------

  function select(id) {
    state.selected = id;
    markSelected();
    renderDetail();
    $("detail-title").focus();
  }

  // The job the detail shows: listed, or the last seen of one closed since.
  const shown = new Map();

  function renderDetail() {
    const listed = state.jobs.get(state.selected);
    if (listed) shown.set(listed.id, listed);
    const job = listed || shown.get(state.selected);
    $("detail").hidden = !job;
    if (!job) return;
    const closed = !listed && state.closed.has(job.id);
    $("detail-closed").hidden = !closed;
    $("detail-apply").hidden = closed;
    $("detail-title").textContent = job.title;
    $("detail-company").textContent = job.company;
    $("detail-location").textContent = job.location;
    const posted = $("detail-posted");
    posted.dateTime = job.posted_at;
    posted.textContent = new Date(job.posted_at).toLocaleString();
    $("detail-description").textContent = job.description;
    const intent = loadIntent(job.id);
    $("apply-retry").hidden = true;
    $("apply").hidden = false;
    $("apply").disabled = state.applying;
    if (!intent) {
      setStatus("idle", state.token ? "" : "Sign in to apply.");
    } else if (intent.outcome === "applied") {
      setStatus("applied", "Applied — a confirmation email is on its way.");
      $("apply").hidden = true;
    } else if (intent.outcome === "already") {
      setStatus("already", "Already applied — you applied to this job before.");
      $("apply").hidden = true;
    } else {
      // Sent before, answer never seen (a reload mid-way): the same key
      // finishes it without applying twice.
      setStatus("error", "Your last application was not confirmed.");
      $("apply").hidden = true;
      $("apply-retry").hidden = false;
    }
  }

  function setStatus(status, message, attempts) {
    const element = $("apply-status");
    element.dataset.state = status;
    if (attempts !== undefined) element.dataset.attempts = String(attempts);
    element.textContent = message;
  }

  const intentName = (jobId) => `herald:apply:${jobId}`;

  function loadIntent(jobId) {
    try {
      return JSON.parse(store.getItem(intentName(jobId)));
    } catch (_) {
      return null;
    }
  }

  function saveIntent(jobId, intent) {
    store.setItem(intentName(jobId), JSON.stringify(intent));
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Full jitter: anywhere in [0, min(cap, base·2^n)], never below Retry-After.
  function retryDelay(attempt, retryAfterSeconds) {
    const span = Math.min(RETRY.capMs, RETRY.baseMs * 2 ** attempt);
    const jittered = Math.random() * span;
    const floor = Number.isFinite(retryAfterSeconds) ? retryAfterSeconds * 1000 : 0;
    return Math.max(jittered, floor);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // One attempt: the parsed answer, or {retry: true} for anything that says
  // "try again later" (the network, 409, 429, 5xx).
  async function attemptApply(body, key) {
    let response;
    let answer;
    try {
      response = await fetch("/api/applications", {
        method: "POST",
        headers: {
          "content-type": "application/json",
          authorization: `Bearer ${state.token}`,
          "idempotency-key": key,
        },
        body: JSON.stringify(body),
      });
      answer = await response.json();
    } catch (_) {
      // No answer, or an answer cut off: the outcome is unknown.
      return { retry: true, reason: "network" };
    }
    const status = response.status;
    // A closed job is a definitive answer, not "try again later".
    if (status === 409 && answer && answer.code === "job_closed") return { status, body: answer };
    if (status === 409 || status === 429 || status >= 500) {
      return {
        retry: true,
        reason: String(status),
        retryAfter: Number(response.headers.get("retry-after")),
      };
    }
    return { status, body: answer };
  }

  // The application as the form says it: the job, and the optional résumé
  // URL and cover letter.
  function applicationBody(jobId) {
    const body = { job_id: jobId };
    const resume = $("resume-url").value.trim();
    const letter = $("cover-letter").value.trim();
    if (resume) body.resume_url = resume;
    if (letter) body.cover_letter = letter;
    return body;
  }

  async function apply(fresh) {
    const jobId = state.selected;
    if (!jobId || state.applying) return;
    if (!state.token) {
      setStatus("error", "Sign in to apply.");
      focusSignIn();
      return;
    }
    let intent = loadIntent(jobId);
    if (!intent || fresh) {
      // The key and the body go together: a retry sends the very request
      // the key was made for, whatever the form says by then.
      intent = { key: newKey(), outcome: "pending", body: applicationBody(jobId) };
      saveIntent(jobId, intent);
    } else if (!intent.body) {
      // Kept by an earlier version of this page, which sent the job alone.
      intent = { ...intent, body: { job_id: jobId } };
      saveIntent(jobId, intent);
    }
    state.applying = true;
    $("apply").disabled = true;
    $("apply-retry").hidden = true;
    let answer;
    for (let attempt = 0; attempt < RETRY.attempts; attempt++) {
      setStatus("applying", attempt === 0 ? "Applying…" : "Applying… (retrying)", attempt + 1);
      answer = await attemptApply(intent.body, intent.key);
      if (!answer.retry) break;
      if (attempt + 1 < RETRY.attempts) await sleep(retryDelay(attempt, answer.retryAfter));
    }
    state.applying = false;
    $("apply").disabled = false;
    if (answer.retry) {
      setStatus("error", "We could not confirm your application. Your place is kept: try again.");
      $("apply-retry").hidden = false;
      $("apply-retry").focus();
      return;
    }
    const { status, body } = answer;
    if (status === 201 || (status === 200 && body && body.already_applied === false)) {
      saveIntent(jobId, { ...intent, outcome: "applied", application: body.id });
      refreshApplications();
    } else if (status === 200) {
      saveIntent(jobId, { ...intent, outcome: "already", application: body.id });
      refreshApplications();
    } else if (status === 401) {
      forgetSignIn();
      renderAccount();
      store.removeItem(intentName(jobId));
      setStatus("error", "Your session expired. Sign in again, then apply.");
      focusSignIn();
      return;
    } else {
      // A definitive refusal (job gone, invalid request): this intent is over.
      store.removeItem(intentName(jobId));
      const detail = (body && (body.detail || body.title)) || `Error ${status}`;
      setStatus("error", `Could not apply: ${detail}`);
      $("apply-retry").hidden = false;
      return;
    }
    renderDetail();
  }

  $("apply").addEventListener("click", () => apply(false));
  $("apply-retry").addEventListener("click", () => {
    const intent = loadIntent(state.selected);
    // Same key while the outcome is unknown; a new intent after a refusal.
    apply(!intent);
  });

  // A token past its expiry is no sign-in (a provider's ID token lives
  // hours at most).
  const held = state.token && claimsOf(state.token);
  if (state.token && (!held || (held.exp && held.exp * 1000 <= Date.now()))) forgetSignIn();
  renderAccount();
  loadSignIn();
  refreshApplications();
  // After the load event, so the open stream never keeps the page "loading".
  if (document.readyState === "complete") connect();
  else window.addEventListener("load", connect, { once: true });
})();
