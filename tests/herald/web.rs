//! The job board page in a real browser (headless Chromium), against a real
//! Herald on Postgres + Redis, sending email through a fake Resend, with a
//! lossy proxy between the browser and Herald. What the page shows is read
//! from the DOM; what happened, from the database and the fake Resend.

use crate::support;

use std::time::{Duration, Instant};

use fantoccini::Locator;
use herald::client::lossy_proxy::LossyProxy;
use support::browser::{Browser, Driver};
use support::oidc::OidcProvider;
use support::{count, eventually, Backend, Backing, Daemon, Postgres, Redis, Stack};

/// A Herald on its own Postgres and Redis (kept alive by the caller).
async fn board() -> (Postgres, Redis, Daemon) {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let herald = Daemon::start(&pg.url(), Some(&redis.url()), &[]).await;
    (pg, redis, herald)
}

const TITLES: &str =
    "return Array.from(document.querySelectorAll('#jobs .job-title')).map(e => e.textContent)";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_streams_new_jobs_and_a_lost_apply_response_still_applies_once() {
    let stack = Stack::start(&[]).await;
    let (herald, resend, db) = (&stack.herald, &stack.resend, stack.db.clone());
    herald.post_job("Rust engineer").await;
    herald.post_job("Site reliability engineer").await;
    // Loses the response of the first apply after `drop_first_apply` is set.
    let drop_first_apply = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let armed = drop_first_apply.clone();
    let proxy = LossyProxy::start(
        &herald.public,
        Box::new(move |method, path| {
            method == hyper::Method::POST
                && path == "/api/applications"
                && armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        }),
    )
    .await
    .expect("proxy");
    let browser = Browser::open_page(&proxy.url, 1280, 900).await;

    // The snapshot fills the list.
    browser
        .wait_for(
            "the snapshot's jobs on the page",
            Duration::from_secs(15),
            &format!("const t = (() => {{ {TITLES} }})(); return t.includes('Rust engineer') && t.includes('Site reliability engineer');"),
        )
        .await;
    browser
        .wait_for(
            "the stream to be live",
            Duration::from_secs(10),
            "return document.getElementById('connection').dataset.state === 'live'",
        )
        .await;

    // A job posted through the API appears without a reload, within 1 s.
    herald.post_job("Live posting").await;
    let posted = Instant::now();
    browser
        .wait_for(
            "the posted job on the page",
            Duration::from_secs(5),
            &format!("return (() => {{ {TITLES} }})().includes('Live posting')"),
        )
        .await;
    let shown_after = posted.elapsed();
    eprintln!("job visible {shown_after:?} after the POST answered");
    assert!(
        shown_after <= Duration::from_secs(1),
        "took {shown_after:?}"
    );
    let first = browser
        .js("return document.querySelector('#jobs .job-title').textContent")
        .await;
    assert_eq!(first, "Live posting", "the newest job is on top");

    // Dev sign-in by email.
    browser.type_into("email", "ada@example.com").await;
    browser.click("sign-in-button").await;
    browser
        .wait_for(
            "signed in",
            Duration::from_secs(10),
            "return !document.getElementById('signed-in').hidden && document.getElementById('who').textContent",
        )
        .await;

    // Open the job: the detail shows, and focus moves to its heading.
    browser
        .js("document.querySelector('#jobs li .job').click(); return true")
        .await;
    let focused = browser
        .wait_for(
            "the detail with focus on its heading",
            Duration::from_secs(5),
            "return !document.getElementById('detail').hidden && document.activeElement.id",
        )
        .await;
    assert_eq!(focused, "detail-title");

    // Apply, with the first response lost between Herald and the browser.
    drop_first_apply.store(true, std::sync::atomic::Ordering::SeqCst);
    browser
        .client
        .find(Locator::Id("apply"))
        .await
        .expect("apply button")
        .click()
        .await
        .expect("click apply");
    let status = browser
        .wait_for(
            "Applied",
            Duration::from_secs(30),
            "const s = document.getElementById('apply-status'); return s.dataset.state === 'applied' && [s.textContent, s.dataset.attempts]",
        )
        .await;
    eprintln!("apply status: {status}");
    let attempts: u32 = status[1]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("attempts");
    assert!(
        attempts >= 2,
        "the page retried after the lost response: {status}"
    );
    assert!(status[0]
        .as_str()
        .unwrap_or_default()
        .starts_with("Applied"));

    let applies: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST" && s.path == "/api/applications")
        .collect();
    assert!(applies.len() >= 2, "{applies:?}");
    assert!(applies[0].dropped, "the first response was the one lost");
    let key = applies[0]
        .idempotency_key
        .clone()
        .expect("a key on the first attempt");
    assert!(
        applies
            .iter()
            .all(|a| a.idempotency_key.as_deref() == Some(key.as_str())),
        "every attempt carried the same key: {applies:?}"
    );

    // One application, one email.
    assert_eq!(count(&db, "SELECT count(*) FROM applications").await, 1);
    eventually(
        "the confirmation email",
        Duration::from_secs(30),
        || async { (resend.sent_to("ada@example.com") >= 1).then_some(()) },
    )
    .await;
    stack.wait_until_settled(Duration::from_secs(30)).await;
    assert_eq!(resend.sent_to("ada@example.com"), 1, "exactly one email");

    // A reload keeps the outcome (sessionStorage) instead of offering Apply.
    browser.client.refresh().await.expect("reload");
    browser
        .wait_for(
            "the list after reload",
            Duration::from_secs(15),
            &format!("return (() => {{ {TITLES} }})().includes('Live posting')"),
        )
        .await;
    browser
        .js("Array.from(document.querySelectorAll('#jobs li')).find(li => li.textContent.includes('Live posting')).querySelector('button').click(); return true")
        .await;
    browser
        .wait_for(
            "Applied after a reload",
            Duration::from_secs(5),
            "return document.getElementById('apply-status').dataset.state === 'applied' && document.getElementById('apply').hidden",
        )
        .await;

    browser.save_screenshot("web-page.png").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_readable_on_a_phone_and_labels_its_controls() {
    let (_pg, _redis, herald) = board().await;
    herald
        .post_job("A job with a rather long title that must wrap on a small screen")
        .await;
    let browser = Browser::open_page(&herald.public, 390, 844).await;
    browser
        .wait_for(
            "the job on the page",
            Duration::from_secs(15),
            &format!("return (() => {{ {TITLES} }})().length === 1"),
        )
        .await;
    let overflow = browser
        .js("return document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "no horizontal scrolling on a phone: {overflow}"
    );
    // Every input has a label; the live regions exist.
    let unlabelled = browser
        .js("return Array.from(document.querySelectorAll('input')).filter(i => !document.querySelector(`label[for=\"${i.id}\"]`)).length")
        .await;
    assert_eq!(unlabelled, 0);
    let live = browser
        .js("return ['connection', 'apply-status'].every(id => document.getElementById(id).getAttribute('role') === 'status')")
        .await;
    assert_eq!(live, true);
    browser.save_screenshot("web-page-phone.png").await;
    browser.close().await;
}

const SHOWN: &str = "const shown = (id) => !document.getElementById(id).hidden;";
/// Whether an element takes up room on the page (what the user sees, not
/// only its `hidden` attribute).
const VISIBLE: &str =
    "const visible = (id) => document.getElementById(id).getClientRects().length > 0;";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_says_loading_then_falls_back_to_the_api_when_a_proxy_holds_the_stream() {
    let (_pg, _redis, herald) = board().await;
    herald.post_job("Fallback engineer").await;
    // A proxy that holds event streams back and forwards everything else.
    let proxy = LossyProxy::start_stalling(
        &herald.public,
        Box::new(|_, _| false),
        Box::new(|_, path| path == "/api/jobs/stream"),
    )
    .await
    .expect("proxy");
    let browser = Browser::open_page(&proxy.url, 1280, 900).await;
    // Nothing has answered yet: "Loading jobs…", never "No jobs yet".
    let loading = browser
        .js(&format!(
            "{SHOWN} return [shown('jobs-loading'), shown('jobs-empty'), shown('jobs-paused')]"
        ))
        .await;
    assert_eq!(loading, serde_json::json!([true, false, false]));
    browser.save_screenshot("web-loading.png").await;
    // The stream never delivers: the list comes from GET /api/jobs, with a
    // visible note that live updates are paused.
    browser
        .wait_for(
            "the fallback list with the paused note",
            Duration::from_secs(20),
            &format!(
                "{SHOWN} const t = (() => {{ {TITLES} }})(); \
                 return t.includes('Fallback engineer') && shown('jobs-paused') \
                 && !shown('jobs-loading') && !shown('jobs-empty') \
                 && document.getElementById('connection').dataset.state === 'paused'"
            ),
        )
        .await;
    let note = browser
        .js("return document.getElementById('jobs-paused').textContent")
        .await;
    assert!(
        note.as_str().unwrap_or("").contains("Live updates paused"),
        "{note}"
    );
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.method == "GET" && s.path.starts_with("/api/jobs?")),
        "the page read GET /api/jobs"
    );
    browser.save_screenshot("web-fallback.png").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_says_no_jobs_yet_only_when_the_snapshot_is_empty_and_is_never_framed() {
    let (_pg, _redis, herald) = board().await;
    // The page's headers: a CSP that forbids framing, and its kin.
    let page = reqwest::get(format!("{}/", herald.public))
        .await
        .expect("GET /");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");

    let browser = Browser::open_page(&herald.public, 1280, 900).await;
    browser
        .wait_for(
            "the empty state after the snapshot",
            Duration::from_secs(15),
            &format!(
                "{SHOWN} return shown('jobs-empty') && !shown('jobs-loading') && !shown('jobs-paused') \
                 && document.getElementById('connection').dataset.state === 'live'"
            ),
        )
        .await;
    browser.save_screenshot("web-empty.png").await;
    // The first job replaces the empty state, live.
    herald.post_job("First job").await;
    browser
        .wait_for(
            "the first job, live",
            Duration::from_secs(10),
            &format!(
                "{SHOWN} return (() => {{ {TITLES} }})().includes('First job') && !shown('jobs-empty')"
            ),
        )
        .await;
    // (It ran under that CSP: the list above was rendered by /app.js.)
    browser.close().await;
}

async fn the_page_updates_an_edited_job_in_place_and_a_closed_one_leaves_with_a_note(
    backend: Backend,
) {
    let b = Backing::start(backend).await;
    let herald = b.daemon(&[]).await;
    let kept = herald.post_job("Kept role").await;
    let job = herald.post_job("Edited role").await;
    let id = job["id"].as_str().unwrap().to_string();
    let browser = Browser::open_page(&herald.public, 1280, 900).await;
    browser
        .wait_for(
            "both jobs, live",
            Duration::from_secs(15),
            &format!(
                "const t = (() => {{ {TITLES} }})(); return t.includes('Edited role') \
                 && t.includes('Kept role') \
                 && document.getElementById('connection').dataset.state === 'live'"
            ),
        )
        .await;
    // The list shows each job's date.
    let dated = browser
        .js("return Array.from(document.querySelectorAll('#jobs .job-meta time')).every(t => t.dateTime && t.textContent)")
        .await;
    assert_eq!(dated, serde_json::json!(true));
    // Open the job, then edit it through the API: it changes in place (same
    // position, the detail too), briefly highlighted.
    browser
        .js(&format!(
            "document.querySelector('#jobs li[data-job-id=\"{id}\"] .job').click(); return true"
        ))
        .await;
    herald
        .edit_job(
            &id,
            &serde_json::json!({"title": "Edited role, senior", "location": "Berlin"}),
        )
        .await;
    browser
        .wait_for(
            "the edit in place, highlighted, in the open detail too",
            Duration::from_secs(10),
            &format!(
                "const t = (() => {{ {TITLES} }})(); \
                 const item = document.querySelector('#jobs li[data-job-id=\"{id}\"] .job'); \
                 return JSON.stringify(t) === JSON.stringify(['Edited role, senior', 'Kept role']) \
                 && item.classList.contains('updated') \
                 && document.getElementById('detail-title').textContent === 'Edited role, senior' \
                 && document.getElementById('detail-location').textContent === 'Berlin'"
            ),
        )
        .await;
    browser
        .save_screenshot(&format!("web-edited-{backend:?}.png"))
        .await;
    // Closed: it leaves the list; the open detail says so and offers no Apply.
    herald.close_job(&id).await;
    browser
        .wait_for(
            "the closed job gone from the list, the detail saying it is closed",
            Duration::from_secs(10),
            &format!(
                "{VISIBLE} const t = (() => {{ {TITLES} }})(); \
                 return JSON.stringify(t) === JSON.stringify(['Kept role']) \
                 && visible('detail') && visible('detail-closed') && !visible('apply') \
                 && document.getElementById('detail-closed').textContent.includes('This job is closed')"
            ),
        )
        .await;
    browser
        .save_screenshot(&format!("web-closed-{backend:?}.png"))
        .await;
    // A reload shows the same list: the snapshot has no closed job.
    browser.client.refresh().await.expect("reload");
    browser
        .wait_for(
            "after a reload, only the open job",
            Duration::from_secs(15),
            &format!(
                "const t = (() => {{ {TITLES} }})(); \
                 return JSON.stringify(t) === JSON.stringify(['Kept role']) \
                 && document.getElementById('connection').dataset.state === 'live'"
            ),
        )
        .await;
    assert_eq!(kept["status"], "open");
    browser.close().await;
}

/// Types `value` into the input `id` and submits the search form, as a user does.
/// The text of the first entry of "My applications", once its email is sent.
async fn first_application_once_its_email_is_sent(browser: &Browser) -> String {
    let sent = browser
        .wait_for(
            "my application, its email sent",
            Duration::from_secs(30),
            "const li = document.querySelector('#my-applications-list li'); \
             return li && li.querySelector('.email-status').dataset.status === 'sent' \
             && li.textContent",
        )
        .await;
    sent.as_str().unwrap_or_default().to_string()
}

async fn search(browser: &Browser, q: &str, location: &str) {
    browser
        .js(&format!(
            "document.getElementById('search-q').value = {q:?}; \
             document.getElementById('search-location').value = {location:?}; \
             document.getElementById('search').requestSubmit(); return true"
        ))
        .await;
}

async fn the_page_searches_live_and_lists_my_applications_with_their_email_status(
    backend: Backend,
) {
    let stack = Stack::start_on(backend, &[]).await;
    let (herald, db) = (&stack.herald, stack.db.clone());
    let post = |title: &'static str, location: &'static str| async move {
        let r = herald
            .post(
                "/api/jobs",
                support::ADMIN_TOKEN,
                None,
                &serde_json::json!({"title": title, "company": "Acme", "location": location,
                                    "description": "Build things."}),
            )
            .await;
        assert_eq!(r.status(), 201);
        r.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    post("Rust engineer", "Berlin").await;
    post("Go developer", "Paris").await;
    let in_paris = post("Rust in Paris", "Paris").await;
    let browser = Browser::open_page(&herald.public, 1280, 1000).await;
    browser
        .wait_for(
            "the whole list, live",
            Duration::from_secs(15),
            &format!(
                "return (() => {{ {TITLES} }})().length === 3 \
                 && document.getElementById('connection').dataset.state === 'live'"
            ),
        )
        .await;

    // A search: only what matches, and it stays live for that search.
    search(&browser, "RUST", "paris").await;
    let only = |titles: &[&str]| {
        format!(
            "return JSON.stringify((() => {{ {TITLES} }})()) === {:?} \
             && document.getElementById('connection').dataset.state === 'live'",
            serde_json::to_string(titles).unwrap()
        )
    };
    browser
        .wait_for(
            "the search's jobs",
            Duration::from_secs(15),
            &only(&["Rust in Paris"]),
        )
        .await;
    post("Rust lead", "Berlin").await;
    let lead = post("Rust lead", "Paris").await;
    browser
        .wait_for(
            "a new matching job, live; not the one elsewhere",
            Duration::from_secs(10),
            &only(&["Rust lead", "Rust in Paris"]),
        )
        .await;
    browser
        .save_screenshot(&format!("web-search-{backend:?}.png"))
        .await;
    herald
        .edit_job(&in_paris, &serde_json::json!({"location": "Berlin"}))
        .await;
    browser
        .wait_for(
            "a job edited out of the search leaves it",
            Duration::from_secs(10),
            &only(&["Rust lead"]),
        )
        .await;

    // Sign in, apply with a résumé URL and a cover letter.
    browser
        .js(
            "document.getElementById('email').value = 'ada@example.com'; \
             document.getElementById('sign-in').requestSubmit(); return true",
        )
        .await;
    browser
        .wait_for(
            "signed in, with an empty applications list",
            Duration::from_secs(10),
            "return !document.getElementById('signed-in').hidden \
             && !document.getElementById('my-applications').hidden \
             && !document.getElementById('my-applications-empty').hidden",
        )
        .await;
    browser
        .js(&format!(
            "document.querySelector('#jobs li[data-job-id=\"{lead}\"] .job').click(); \
             document.getElementById('resume-url').value = 'https://cv.example/ada'; \
             document.getElementById('cover-letter').value = 'I lead in Rust.'; \
             document.getElementById('apply').click(); return true"
        ))
        .await;
    let sent = first_application_once_its_email_is_sent(&browser).await;
    assert!(sent.contains("Rust lead"), "{sent}");
    assert!(sent.contains("Confirmation email sent"), "{sent}");
    browser
        .save_screenshot(&format!("web-my-applications-{backend:?}.png"))
        .await;
    let stored: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT resume_url, cover_letter FROM applications WHERE user_id = 'ada@example.com' \
         OR email = 'ada@example.com'",
    )
    .fetch_one(&db)
    .await
    .expect("the application");
    assert_eq!(
        stored,
        (
            Some("https://cv.example/ada".into()),
            Some("I lead in Rust.".into())
        )
    );
    assert_eq!(count(&db, "SELECT count(*) FROM applications").await, 1);
    browser.close().await;
}

/// What the provider reported of each confirmation, in words: delivered,
/// bounced ("check your address"), complained, and the next one to that
/// address suppressed, read by a user on "My applications".
async fn my_applications_say_what_became_of_each_email(backend: Backend) {
    let stack = Stack::start_on(backend, &[]).await;
    let herald = &stack.herald;
    // The token the page's dev login gives ada, so the page shows these.
    let login = herald
        .http
        .post(herald.url("/api/dev/login"))
        .json(&serde_json::json!({ "email": "ada@example.com" }))
        .send()
        .await
        .expect("dev login");
    assert_eq!(login.status(), 200);
    let token = login.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .expect("token")
        .to_string();
    let apply = |job: serde_json::Value, key: &'static str| {
        let token = token.clone();
        async move {
            let r = herald
                .apply(
                    &token,
                    Some(key),
                    &serde_json::json!({ "job_id": job["id"] }),
                )
                .await;
            assert_eq!(r.status(), 201, "{key}");
        }
    };
    let titles = ["Delivered role", "Complained role", "Bounced role"];
    for (title, key) in titles.iter().zip(["k1", "k2", "k3"]) {
        apply(herald.post_job(title).await, key).await;
    }
    eventually("three emails sent", Duration::from_secs(30), || async {
        (stack.resend.sent().len() == 3).then_some(())
    })
    .await;
    stack.wait_until_settled(Duration::from_secs(30)).await;
    // Each email's provider id, by the job its subject names.
    let id_for = |title: &str| {
        stack
            .resend
            .sent()
            .into_iter()
            .find(|s| s.subject.contains(title))
            .map(|s| s.id)
            .expect("an email per job")
    };
    let reports = [
        stack.resend.emit(
            "email.delivered",
            &id_for("Delivered role"),
            serde_json::json!({}),
        ),
        stack.resend.emit(
            "email.complained",
            &id_for("Complained role"),
            serde_json::json!({}),
        ),
        stack.resend.emit(
            "email.bounced",
            &id_for("Bounced role"),
            serde_json::json!({ "bounce": { "type": "Permanent", "message": "no such mailbox" } }),
        ),
    ];
    eventually("the reports answered", Duration::from_secs(30), || async {
        let messages = stack.resend.messages();
        reports
            .iter()
            .all(|r| messages.iter().any(|m| &m.id == r && m.delivered))
            .then_some(())
    })
    .await;
    // The next confirmation to that address is not sent.
    apply(herald.post_job("Suppressed role").await, "k4").await;
    stack.wait_until_settled(Duration::from_secs(30)).await;
    assert_eq!(
        stack.resend.sent().len(),
        3,
        "no email to a suppressed address"
    );

    let browser = Browser::open_page(&herald.public, 1280, 1000).await;
    browser
        .js(
            "document.getElementById('email').value = 'ada@example.com'; \
             document.getElementById('sign-in').requestSubmit(); return true",
        )
        .await;
    let shown = browser
        .wait_for(
            "four applications, each email's fate in words",
            Duration::from_secs(20),
            "const items = [...document.querySelectorAll('#my-applications-list li')]; \
             if (items.length !== 4) return false; \
             const statuses = items.map((li) => li.querySelector('.email-status')); \
             if (statuses.some((s) => !s.dataset.status || s.offsetParent === null)) return false; \
             return JSON.stringify(items.map((li) => [ \
               li.querySelector('.application-job').textContent, \
               li.querySelector('.email-status').dataset.status, \
               li.querySelector('.email-status').textContent]))",
        )
        .await;
    let shown: Vec<(String, String, String)> =
        serde_json::from_str(shown.as_str().unwrap_or("[]")).expect("rows");
    let by_job = |title: &str| {
        shown
            .iter()
            .find(|(job, _, _)| job == title)
            .cloned()
            .unwrap_or_else(|| panic!("{title} listed: {shown:?}"))
    };
    assert_eq!(by_job("Delivered role").1, "delivered");
    assert_eq!(by_job("Delivered role").2, "Confirmation email delivered");
    assert_eq!(by_job("Complained role").1, "complained");
    assert!(by_job("Complained role").2.contains("marked as spam"));
    assert_eq!(by_job("Bounced role").1, "bounced");
    assert_eq!(
        by_job("Bounced role").2,
        "Confirmation email bounced: check your address"
    );
    assert_eq!(by_job("Suppressed role").1, "suppressed");
    assert!(by_job("Suppressed role")
        .2
        .starts_with("No confirmation email"));
    browser
        .js("document.getElementById('my-applications').scrollIntoView(); return true")
        .await;
    browser
        .save_screenshot(&format!("web-email-statuses-{backend:?}.png"))
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_falls_back_to_the_filtered_api_when_a_proxy_holds_the_stream() {
    let (_pg, _redis, herald) = board().await;
    herald.post_job("Remote role").await; // location Remote
    let r = herald
        .post(
            "/api/jobs",
            support::ADMIN_TOKEN,
            None,
            &serde_json::json!({"title": "Berlin role", "company": "Acme",
                                "location": "Berlin", "description": "d"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let proxy = LossyProxy::start_stalling(
        &herald.public,
        Box::new(|_, _| false),
        Box::new(|_, path| path.starts_with("/api/jobs/stream")),
    )
    .await
    .expect("proxy");
    let browser = Browser::open_page(&proxy.url, 1280, 900).await;
    search(&browser, "", "berlin").await;
    browser
        .wait_for(
            "the filtered fallback list, paused",
            Duration::from_secs(20),
            &format!(
                "{SHOWN} return JSON.stringify((() => {{ {TITLES} }})()) === '[\"Berlin role\"]' \
                 && shown('jobs-paused')"
            ),
        )
        .await;
    assert!(
        proxy.seen().iter().any(|s| s.method == "GET"
            && s.path.starts_with("/api/jobs?")
            && s.path.contains("location=berlin")),
        "the fallback read GET /api/jobs with the filter"
    );
    browser.save_screenshot("web-search-fallback.png").await;
    browser.close().await;
}

/// Sign-in on the page through the board's OpenID Connect provider, dev
/// login off: a forged callback is refused without an exchange; then the
/// real round trip (authorization code with PKCE at the provider's form,
/// the code exchanged by the page, the ID token as Bearer) and an
/// application with its confirmation sent.
async fn the_page_signs_in_through_the_boards_openid_provider_and_applies(backend: Backend) {
    let provider = OidcProvider::start("herald-page").await;
    let mut extra: Vec<(&str, String)> = provider.settings();
    extra.push(("HERALD_AUTH__DEV_LOGIN", "false".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stack = Stack::start_on(backend, &extra).await;
    let (herald, db) = (&stack.herald, stack.db.clone());
    provider.register_redirect(&format!("{}/", herald.public));
    let job = herald.post_job("Rust engineer").await;
    let job = job["id"].as_str().unwrap().to_string();
    let browser = Browser::open_page(&herald.public, 1280, 900).await;

    // Only the provider's sign-in is offered.
    let named = browser
        .wait_for(
            "the provider's sign-in, and no dev sign-in",
            Duration::from_secs(15),
            "return !document.getElementById('sign-in-provider').hidden \
             && document.getElementById('sign-in').hidden \
             && document.getElementById('provider-name').textContent",
        )
        .await;
    assert_eq!(named, provider.issuer.trim_start_matches("http://"));

    // A callback this tab did not start (a forged or replayed link): refused,
    // the code never exchanged, and gone from the address bar.
    browser
        .client
        .goto(&format!("{}/?code=stolen-code&state=forged", herald.public))
        .await
        .expect("open the forged callback");
    let said = browser
        .wait_for(
            "the forged answer refused",
            Duration::from_secs(15),
            "const e = document.getElementById('provider-error'); return !e.hidden && e.textContent",
        )
        .await;
    assert!(
        said.as_str()
            .unwrap()
            .contains("does not belong to a sign-in started on this page"),
        "{said}"
    );
    assert_eq!(browser.js("return location.search").await, "");
    assert!(
        browser
            .js("return document.getElementById('signed-in').hidden")
            .await
            == true
    );
    assert!(
        provider.exchanges().is_empty(),
        "{:?}",
        provider.exchanges()
    );
    browser
        .save_screenshot(&format!("web-oidc-forged-callback-{backend:?}.png"))
        .await;

    // The real round trip, through the provider's own form.
    browser.click("provider-sign-in").await;
    browser
        .wait_for(
            "the provider's sign-in form",
            Duration::from_secs(15),
            &format!(
                "return location.origin === {:?} && document.getElementById('login-email') !== null",
                provider.issuer
            ),
        )
        .await;
    browser.type_into("login-email", "ada@example.com").await;
    browser.click("login-submit").await;
    let who = browser
        .wait_for(
            "back on the board, signed in",
            Duration::from_secs(15),
            &format!(
                "return location.origin === {:?} && !document.getElementById('signed-in').hidden \
                 && document.getElementById('who').textContent",
                herald.public
            ),
        )
        .await;
    assert_eq!(who, "ada@example.com");
    assert_eq!(
        browser.js("return location.search").await,
        "",
        "the code left the address bar"
    );
    let exchanges = provider.exchanges();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    assert_eq!(
        (exchanges[0].status, exchanges[0].error.as_deref()),
        (200, None),
        "{exchanges:?}"
    );
    // The Bearer is the provider's ID token for this client.
    let aud = browser
        .js(
            "return JSON.parse(atob(sessionStorage.getItem('herald:token').split('.')[1] \
             .replace(/-/g, '+').replace(/_/g, '/'))).aud",
        )
        .await;
    assert_eq!(aud, "herald-page");

    // Apply with it.
    browser
        .js(&format!(
            "document.querySelector('#jobs li[data-job-id=\"{job}\"] .job').click(); \
             document.getElementById('apply').click(); return true"
        ))
        .await;
    let sent = first_application_once_its_email_is_sent(&browser).await;
    assert!(sent.contains("Rust engineer"), "{sent}");
    browser
        .save_screenshot(&format!("web-oidc-sign-in-{backend:?}.png"))
        .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM applications WHERE user_id = 'board|ada@example.com' \
             AND email = 'ada@example.com'"
        )
        .await,
        1
    );
    assert_eq!(stack.resend.sent_to("ada@example.com"), 1);
    browser.close().await;
}

on_both_backends!(
    the_page_signs_in_through_the_boards_openid_provider_and_applies,
    the_page_updates_an_edited_job_in_place_and_a_closed_one_leaves_with_a_note,
    the_page_searches_live_and_lists_my_applications_with_their_email_status,
    my_applications_say_what_became_of_each_email
);

/// The browser harness says why a driver did not start. chromedriver picks
/// its own port and says it (nothing to race); a driver told to use a port
/// that is taken exits, and the error names the exit and what it printed.
#[tokio::test]
async fn a_chromedriver_that_cannot_listen_says_why_and_one_that_picks_its_port_answers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let driver = match Driver::start(0, dir.path()).await {
        Ok(driver) => driver,
        Err(why) => panic!("{why}"),
    };
    assert_ne!(driver.port, 0, "chromedriver says the port it chose");
    let status = reqwest::get(format!("http://127.0.0.1:{}/status", driver.port))
        .await
        .expect("chromedriver answers on the port it said");
    assert!(status.status().is_success(), "{}", status.status());

    // A port in use on 127.0.0.1, as another test's connection would hold it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let failed = tempfile::tempdir().expect("temp dir");
    let why = match Driver::start(port, failed.path()).await {
        Ok(driver) => panic!("chromedriver listened on a taken port {}", driver.port),
        Err(why) => why,
    };
    assert!(
        why.contains("chromedriver exited (exit status: 1) before it listened"),
        "{why}"
    );
    assert!(
        why.contains("Address already in use"),
        "the driver's own words: {why}"
    );
}

/// The operator page (`/admin/` on the admin listener) in the browser,
/// signed in with a named operator's token: a dead letter replayed (the
/// email then reaches the provider once) and a job closed, with
/// screenshots; the audit trail names the operator, not what a header says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_page_replays_a_dead_letter_and_closes_a_job() {
    use sha2::Digest;
    let ada = "ada-operator-token-0123456789";
    let hash = format!("sha256:{}", hex::encode(sha2::Sha256::digest(ada)));
    let stack = Stack::start_on(
        Backend::Sqlite,
        // A permanent refusal (422) is a dead letter at once.
        &[("HERALD_ADMIN__TOKENS__ADA", &hash)],
    )
    .await;
    let (herald, resend) = (&stack.herald, &stack.resend);
    // The page's headers: a strict CSP, never framed.
    let page = reqwest::get(herald.admin_url("/admin/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(page.headers()["x-frame-options"], "DENY");

    // A dead letter: the provider refuses the address for good.
    let job = herald.post_job("Lighthouse keeper").await;
    let job_id = job["id"].as_str().unwrap().to_string();
    resend.poison("doomed@example.com", true);
    support::apply_as(herald, "doomed", &job).await;
    herald.wait_for_metric("herald_dlq_depth", 1.0).await;
    resend.poison("doomed@example.com", false);
    assert_eq!(resend.sent_to("doomed@example.com"), 0);

    let browser = Browser::start(1280, 1000).await;
    browser
        .client
        .goto(&herald.admin_url("/admin/"))
        .await
        .unwrap();
    let token = browser.client.find(Locator::Id("token")).await.unwrap();
    token.send_keys(ada).await.unwrap();
    browser
        .client
        .find(Locator::Css("#sign-in button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_for(
            "the console with one dead letter and the job",
            Duration::from_secs(15),
            "return !document.getElementById('console').hidden \
               && document.querySelectorAll('#dlq tbody tr').length === 1 \
               && Array.from(document.querySelectorAll('#jobs tbody td')).some(td => td.textContent === 'Lighthouse keeper') \
               && document.getElementById('status').textContent.includes('Ready') \
               && document.getElementById('who').textContent.includes('Signed in as ada')",
        )
        .await;
    browser.save_screenshot("admin-page.png").await;

    // Replay it from the page.
    browser
        .client
        .find(Locator::XPath(
            "//table[@id='dlq']//button[text()='Replay']",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(
        "the replayed email at the provider",
        Duration::from_secs(30),
        || async { (resend.sent_to("doomed@example.com") == 1).then_some(()) },
    )
    .await;
    browser
        .wait_for(
            "the page to show no dead letter",
            Duration::from_secs(15),
            "return !document.getElementById('dlq-empty').hidden \
               && document.getElementById('notice').textContent === 'Dead letter replayed.'",
        )
        .await;
    browser.save_screenshot("admin-replayed.png").await;

    // Close the job: the button asks once more.
    let close = "//table[@id='jobs']//tr[td[text()='Lighthouse keeper']]//button[starts-with(text(), 'Close')]";
    for _ in 0..2 {
        browser
            .client
            .find(Locator::XPath(close))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
    eventually("the job closed", Duration::from_secs(15), || async {
        let job: serde_json::Value = herald
            .get(&format!("/api/jobs/{job_id}"))
            .await
            .json()
            .await
            .ok()?;
        (job["status"] == "closed").then_some(())
    })
    .await;
    browser
        .wait_for(
            "the audit trail on the page",
            Duration::from_secs(15),
            "const rows = Array.from(document.querySelectorAll('#audit tbody tr')).map(r => r.textContent); \
             return rows.some(r => r.includes('job.close') && r.includes('ada')) \
               && rows.some(r => r.includes('dlq.replay') && r.includes('ada'))",
        )
        .await;
    browser.save_screenshot("admin-closed.png").await;
    browser.close().await;
    // One email for the replayed application, however the page was used.
    assert_eq!(resend.sent_to("doomed@example.com"), 1);

    let trail: serde_json::Value = herald
        .http
        .get(herald.admin_url("/admin/audit"))
        .bearer_auth(ada)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<(String, String)> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["action"].as_str().unwrap().into(),
                i["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("job.close".into(), "ada".into())),
        "{trail}"
    );
    assert!(
        actions.contains(&("dlq.replay".into(), "ada".into())),
        "{trail}"
    );
    // The job was posted by the test's admin token.
    assert!(
        actions.contains(&("job.post".into(), "admin".into())),
        "{trail}"
    );
}
