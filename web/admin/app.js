// Herald's operator page: status, dead letters, jobs, suppressions and the
// audit trail, through the admin API with the operator's own token (kept in
// this tab's sessionStorage only). No inline script, no other origin: the
// page runs under a strict Content-Security-Policy.
'use strict';

const TOKEN_KEY = 'herald-operator-token';
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function key() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (method !== 'GET') headers['Idempotency-Key'] = key();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401) { signOut('That token is not an operator\'s.'); }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function notice(text) {
  const n = $('notice');
  n.textContent = text;
  n.hidden = !text;
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text == null ? '' : String(text);
  if (cls) td.className = cls;
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener('click', onClick);
  return b;
}

// A destructive action asks once more on the same button.
function confirming(label, confirmLabel, action) {
  const b = button(label, 'danger', async () => {
    if (b.dataset.armed !== 'yes') {
      b.dataset.armed = 'yes';
      b.textContent = confirmLabel;
      return;
    }
    b.disabled = true;
    await action();
  });
  return b;
}

function fill(tableId, rows) {
  const table = $(tableId);
  const body = table.querySelector('tbody');
  body.replaceChildren(...rows);
  table.hidden = rows.length === 0;
  $(`${tableId}-empty`).hidden = rows.length !== 0;
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : ''; }

async function act(what, call) {
  try {
    await call();
    notice(what);
  } catch (e) {
    notice(`${what} failed: ${e.message}`);
  }
  await refresh();
}

function statusRow(list, term, value, cls) {
  const dt = document.createElement('dt');
  dt.textContent = term;
  const dd = document.createElement('dd');
  dd.textContent = value;
  if (cls) dd.className = cls;
  list.append(dt, dd);
}

async function loadStatus() {
  const s = await api('GET', '/admin/status');
  $('operator').textContent = s.operator || '';
  const list = $('status');
  list.replaceChildren();
  statusRow(list, 'Ready', s.outbox ? 'yes: the database answers' : 'no: the database does not answer', s.outbox ? 'good' : 'bad');
  statusRow(list, 'Version', s.version);
  statusRow(list, 'Store / broker', `${s.backend} / ${s.broker}`);
  statusRow(list, 'Redis', s.redis, s.redis === 'fallback' ? 'bad' : '');
  const actors = s.actors || [];
  const down = actors.filter((a) => !a.running).map((a) => a.name);
  statusRow(list, 'Actors', down.length ? `not running: ${down.join(', ')}` : `${actors.length} running`, down.length ? 'bad' : 'good');
  if (s.outbox) {
    statusRow(list, 'Outbox', `${s.outbox.pending} pending, oldest ${Number(s.outbox.lag_seconds).toFixed(1)} s`);
  }
  const letters = (s.dlq || []).reduce((n, t) => n + t.depth, 0);
  statusRow(list, 'Dead letters', String(letters), letters ? 'bad' : 'good');
  if (s.audit) {
    const broken = Object.entries(s.audit.violations).filter(([, n]) => n > 0);
    statusRow(list, 'Audit', broken.length
      ? `broken at ${when(s.audit.at)}: ${broken.map(([i, n]) => `${i} (${n})`).join(', ')}`
      : `every invariant holds (${when(s.audit.at)})`, broken.length ? 'bad' : 'good');
  } else {
    statusRow(list, 'Audit', 'not run yet');
  }
}

async function loadDeadLetters() {
  const page = await api('GET', '/admin/dlq?limit=100');
  fill('dlq', page.items.map((d) => {
    const tr = document.createElement('tr');
    tr.dataset.id = d.id;
    const actions = cell('', 'actions');
    actions.append(
      button('Replay', '', () => act('Dead letter replayed.', () => api('POST', `/admin/dlq/${d.id}/replay`))),
      confirming('Discard', 'Discard for good?', () => act('Dead letter discarded.', () => api('DELETE', `/admin/dlq/${d.id}`))),
    );
    tr.append(cell(d.topic), cell(d.attempts), cell(d.last_error), cell(when(d.dead_at)), actions);
    return tr;
  }));
}

function editRow(tr, job) {
  const input = document.createElement('input');
  input.value = job.title;
  input.setAttribute('aria-label', `New title of ${job.title}`);
  const title = tr.querySelector('td');
  title.replaceChildren(input);
  const actions = tr.querySelector('td.actions');
  actions.replaceChildren(
    button('Save', '', () => act('Job updated.', () => api('PATCH', `/admin/jobs/${job.id}`, { title: input.value }))),
    button('Cancel', 'secondary', () => refresh()),
  );
  input.focus();
}

async function loadJobs() {
  const page = await api('GET', '/admin/jobs?limit=100');
  fill('jobs', page.items.map((job) => {
    const tr = document.createElement('tr');
    tr.dataset.id = job.id;
    const actions = cell('', 'actions');
    actions.append(
      button('Edit', 'secondary', () => editRow(tr, job)),
      confirming('Close', 'Close for good?', () => act('Job closed.', () => api('POST', `/admin/jobs/${job.id}/close`))),
    );
    tr.append(cell(job.title), cell(job.company), cell(job.location), actions);
    return tr;
  }));
}

async function loadSuppressions() {
  const page = await api('GET', '/admin/suppressions?limit=100');
  fill('suppressions', page.items.map((s) => {
    const tr = document.createElement('tr');
    const actions = cell('', 'actions');
    actions.append(confirming('Lift', 'Mail it again?', () => act('Suppression lifted.',
      () => api('DELETE', `/admin/suppressions/${encodeURIComponent(s.address)}`))));
    tr.append(cell(s.address), cell(s.reason), cell(when(s.suppressed_at)), actions);
    return tr;
  }));
}

async function loadAudit() {
  const page = await api('GET', '/admin/audit?limit=20');
  fill('audit', page.items.map((a) => {
    const tr = document.createElement('tr');
    tr.append(cell(when(a.at)), cell(a.actor), cell(a.action), cell(a.subject));
    return tr;
  }));
}

async function refresh() {
  if (!token()) return;
  try {
    await Promise.all([loadStatus(), loadDeadLetters(), loadJobs(), loadSuppressions(), loadAudit()]);
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    if (e.status === 429) notice('Too many wrong tokens from this address: wait a minute.');
    else if (e.status !== 401) notice(`Loading failed: ${e.message}`);
  }
}

function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  $('console').hidden = true;
  $('sign-in').hidden = false;
  $('who').textContent = '';
  const error = $('sign-in-error');
  error.textContent = reason || '';
  error.hidden = !reason;
}

async function signedIn() {
  $('sign-in').hidden = true;
  $('console').hidden = false;
  const name = document.createElement('strong');
  name.id = 'operator';
  $('who').replaceChildren('Signed in as ', name, ' ', button('Sign out', 'link', () => signOut()));
  await refresh();
}

$('sign-in').addEventListener('submit', async (event) => {
  event.preventDefault();
  const value = $('token').value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $('token').value = '';
  try {
    await api('GET', '/admin/status');
    await signedIn();
  } catch (e) {
    if (e.status === 429) signOut('Too many wrong tokens from this address: wait a minute.');
    else if (e.status !== 401) signOut(`Herald did not answer: ${e.message}`);
  }
});
$('refresh').addEventListener('click', () => refresh());

if (token()) signedIn();
setInterval(() => { if (token() && !document.hidden) loadStatus().catch(() => {}); }, 10000);
