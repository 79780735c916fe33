//! The customer portal: portal sessions over REST, and the page itself driven in a real headless
//! Chromium through WebDriver (chromedriver) against a real operator on the local control plane,
//! delivering to a real receiver on loopback.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium` and
//! `chromium-driver`); `make test` installs them when missing (`hack/browser-tools.sh`).
//! Screenshots of the main views are written to `target/portal-screenshots/`.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use capy_webhooks::resources::{WebhookEndpoint, WebhookEventType, WebhookEventTypeSpec};
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use kube::Api;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::assert_conforms;
use support::operator::{Operator, Options};
use support::receiver::{Answer, Receiver};

const ORG: &str = "org_portal";
const WAIT: Duration = Duration::from_secs(30);

async fn setup(prefix: &str, opts: Options) -> (kube::Client, String, Operator, String) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    let op = Operator::start(&client, &ns, opts).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    (client, ns, op, key)
}

/// [`setup`] with a dispatcher that makes one attempt per delivery (schedule `0s`): a failure is
/// final at once.
async fn setup_sending(prefix: &str) -> (kube::Client, String, Operator, String) {
    let opts = Options {
        dispatcher: true,
        schedule: "0s",
        ..Options::default()
    };
    setup(prefix, opts).await
}

fn sessions_url(op: &Operator, org: &str) -> String {
    format!("{}/{org}/portal-sessions", op.base)
}

async fn open_session(op: &Operator, credential: &str, body: Option<Value>) -> Value {
    let (status, session, _) = op.call("POST", &sessions_url(op, ORG), Some(credential), body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    assert_conforms("PortalSession", &session);
    session
}

#[tokio::test]
async fn portal_sessions_are_bound_to_one_organization_and_expire() {
    let (client, ns, op, key) = setup(
        "portal-sessions",
        Options {
            portal_session_ttl: jiff::SignedDuration::from_secs(3),
            ..Options::default()
        },
    )
    .await;
    let list = op.url(ORG, "");
    // Sessions last 3 s here, so each check opens its own just before it.
    let fresh = |read_only: bool| {
        let (op, key) = (&op, &key);
        async move {
            let session = open_session(op, key, Some(json!({"read_only": read_only}))).await;
            session["token"].as_str().unwrap().to_string()
        }
    };
    let session = open_session(&op, &key, None).await;
    let token = session["token"].as_str().unwrap();
    assert!(
        session["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/portal/#token={token}"))
    );

    // A writable session manages endpoints like a key.
    let body = json!({"url": "https://example.com/hook"});
    let (status, created, _) = op.call("POST", &list, Some(&fresh(false).await), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    let settings = op.url(ORG, &format!("/{id}/settings"));
    let body = json!({"headers": {"Authorization": "Bearer receiver-credential"}});
    let (status, _, _) = op.call("PATCH", &settings, Some(&fresh(false).await), Some(body)).await;
    assert_eq!(status, StatusCode::OK);

    // A read-only session reads (header values redacted), and every write is 403.
    let ro = fresh(true).await;
    let (status, body, _) = op.call("GET", &list, Some(&ro), None).await;
    assert_eq!(
        (status, body["webhook_endpoints"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );
    let (status, body, _) = op.call("GET", &settings, Some(&ro), None).await;
    assert_eq!(
        (status, &body["headers"]),
        (StatusCode::OK, &json!({"Authorization": "<redacted>"}))
    );
    let (_, body, _) = op.call("GET", &settings, Some(&fresh(false).await), None).await;
    assert_eq!(body["headers"]["Authorization"], "Bearer receiver-credential");
    for (method, path, body) in [
        ("POST", String::new(), Some(json!({"url": "https://example.com/x"}))),
        ("PATCH", format!("/{id}"), Some(json!({"is_active": false}))),
        ("DELETE", format!("/{id}"), None),
        ("POST", format!("/{id}/rotate-secret"), None),
        ("POST", format!("/{id}/test"), None),
        (
            "POST",
            format!("/{id}/recover"),
            Some(json!({"since": "2026-01-01T00:00:00Z"})),
        ),
        ("PATCH", format!("/{id}/settings"), Some(json!({"rate_limit": 1}))),
        ("POST", format!("/{id}/deliveries/msg_any/retry"), None),
    ] {
        let ro = fresh(true).await;
        let (status, body, _) = op.call(method, &op.url(ORG, &path), Some(&ro), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("read-only"), "{body}");
    }
    // A session cannot open another, nor act for another organization.
    let (status, _, _) = op
        .call("POST", &sessions_url(&op, ORG), Some(&fresh(false).await), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = op
        .call("GET", &op.url("org_other", ""), Some(&fresh(false).await), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Forged: the claims changed under the signature; garbage.
    let current = fresh(false).await;
    let (signed, signature) = current.rsplit_once('.').unwrap();
    let forged = format!("{signed}x.{signature}");
    for bad in [forged.as_str(), "capy_portal_e30.AAAA", "capy_portal_"] {
        let (status, body, _) = op.call("GET", &list, Some(bad), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(!body.to_string().contains(bad), "{body}");
    }
    // Without a credential, or with a bad body, nothing is issued.
    let (status, _, _) = op.call("POST", &sessions_url(&op, ORG), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body, _) = op
        .call(
            "POST",
            &sessions_url(&op, ORG),
            Some(&key),
            Some(json!({"read_only": "yes"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The page itself: strict policy, nothing cached stale, the bare path redirected.
    let page = op.http.get(format!("{}/portal/", origin(&op))).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.starts_with("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(page.text().await.unwrap().contains("app.js"));
    let bare = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/portal", origin(&op)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (bare.status().as_u16(), bare.headers()["location"].to_str().unwrap()),
        (308, "/portal/")
    );

    // Expiry: a 3 s session (whole seconds: it ends at most 3 s after issue) stops working.
    let expiring = fresh(false).await;
    let (status, _, _) = op.call("GET", &list, Some(&expiring), None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, body, _) = op.call("GET", &list, Some(&expiring), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("expired"), "{body}");
    let _ = (client, ns);
}

/// `http://127.0.0.1:port` of the operator's REST port.
fn origin(op: &Operator) -> String {
    op.base.trim_end_matches("/v1/organizations").to_string()
}

/// A chromedriver on a free loopback port, killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

async fn start_browser() -> (Chromedriver, Browser) {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: run `make browser-tools` (Debian packages chromium and chromium-driver)"
        );
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Chromedriver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--no-first-run", "--disable-extensions"],
        },
    });
    let capabilities = capabilities.as_object().unwrap().clone();
    let browser = support::wait_for("chromedriver accepts a session", WAIT, || async {
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
            .ok()
    })
    .await;
    (driver, browser)
}

fn screenshots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/portal-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Browser, name: &str) {
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(screenshots_dir().join(format!("{name}.png")), png).unwrap();
}

async fn text(browser: &Browser, css: &str) -> String {
    browser.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

async fn click(browser: &Browser, css: &str) {
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn present(browser: &Browser, css: &str) -> bool {
    !browser.find_all(Locator::Css(css)).await.unwrap().is_empty()
}

async fn visible(browser: &Browser, css: &str) -> bool {
    match browser.find(Locator::Css(css)).await {
        Ok(e) => e.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

/// The states shown in the deliveries table, top (newest) first.
async fn shown_states(browser: &Browser) -> Vec<String> {
    let mut states = Vec::new();
    for cell in browser
        .find_all(Locator::Css("#deliveries tr[data-delivery-id] .state"))
        .await
        .unwrap()
    {
        states.push(cell.text().await.unwrap_or_default());
    }
    states
}

async fn wait_states(browser: &Browser, what: &str, want: &[&str]) {
    support::wait_for(what, WAIT, || async {
        let states = shown_states(browser).await;
        (states == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_portal_in_a_real_browser() {
    let (client, ns, op, key) = setup_sending("portal-browser").await;
    let receiver = Receiver::start(vec![]).await;
    let (_driver, browser) = start_browser().await;
    let session = open_session(&op, &key, None).await;
    let url = session["url"].as_str().unwrap();

    // Signed in from the link; the token leaves the address bar and is stored nowhere.
    browser.goto(url).await.unwrap();
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#create-url"))
        .await
        .unwrap();
    let href = browser.current_url().await.unwrap();
    assert!(href.fragment().is_none() && !href.as_str().contains("token"), "{href}");
    let stored = browser
        .execute(
            "return [localStorage.length, sessionStorage.length, document.cookie]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([0, 0, ""]));
    assert_eq!(text(&browser, "#org").await, ORG);
    assert!(!visible(&browser, "#read-only-badge").await);
    // Every control is labelled: inputs by a <label>, buttons by their text or aria-label.
    let unlabelled = browser
        .execute(
            "return [...document.querySelectorAll('input, select, textarea')].filter(e => e.labels.length === 0).map(e => e.id)
               .concat([...document.querySelectorAll('button')]
                 .filter(b => !(b.textContent.trim() || b.getAttribute('aria-label'))).map(b => b.id || b.className))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled, json!([]), "controls without a name");

    // Create: the secret is shown once, then gone from the page.
    let url_input = browser.find(Locator::Css("#create-url")).await.unwrap();
    url_input.send_keys(&receiver.url("/portal-hook")).await.unwrap();
    let description = browser.find(Locator::Css("#create-description")).await.unwrap();
    // Submitted from the keyboard: Enter in a field.
    description.send_keys("made in the browser test\u{E007}").await.unwrap();
    support::wait_for("the secret panel", WAIT, || async {
        visible(&browser, "#secret-panel").await.then_some(())
    })
    .await;
    let secret = text(&browser, "#secret-value").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    screenshot(&browser, "portal-secret").await;
    click(&browser, "#secret-dismiss").await;
    assert!(!visible(&browser, "#secret-panel").await);
    assert_eq!(text(&browser, "#secret-value").await, "");
    let page_source = browser.source().await.unwrap();
    assert!(!page_source.contains(&secret), "the secret stays in the page");

    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let endpoints = api.list(&Default::default()).await.unwrap().items;
    assert_eq!(endpoints.len(), 1);
    let id = kube::ResourceExt::name_any(&endpoints[0]);
    assert_eq!(endpoints[0].spec.description, "made in the browser test");
    let row = format!("#endpoints tr[data-endpoint-id=\"{id}\"]");
    support::wait_for("the new endpoint listed", WAIT, || async {
        present(&browser, &row).await.then_some(())
    })
    .await;
    screenshot(&browser, "portal-endpoints").await;
    click(&browser, &format!("{row} .open")).await;
    support::wait_for("the detail view", WAIT, || async {
        visible(&browser, "#endpoint-detail").await.then_some(())
    })
    .await;

    // A test event turns succeeded.
    click(&browser, "#detail-test").await;
    wait_states(&browser, "the test delivery succeeds", &["succeeded"]).await;
    // One that fails, retried from the page.
    receiver.script(vec![Answer::Status(500)]);
    click(&browser, "#detail-test").await;
    wait_states(&browser, "the second test delivery fails", &["failed", "succeeded"]).await;
    screenshot(&browser, "portal-deliveries-failed").await;
    click(&browser, "#deliveries tr[data-delivery-id] .retry").await;
    wait_states(&browser, "the retried delivery succeeds", &["succeeded", "succeeded"]).await;
    // One that fails, recovered since an hour ago (the prefilled time).
    receiver.script(vec![Answer::Status(500)]);
    click(&browser, "#detail-test").await;
    wait_states(
        &browser,
        "the third test delivery fails",
        &["failed", "succeeded", "succeeded"],
    )
    .await;
    let since = browser.find(Locator::Css("#recover-since")).await.unwrap();
    let prefilled = since.prop("value").await.unwrap().unwrap_or_default();
    assert!(prefilled.parse::<jiff::Timestamp>().is_ok(), "{prefilled:?}");
    click(&browser, "#recover-submit").await;
    support::wait_for("the recovery result", WAIT, || async {
        (text(&browser, "#recover-result").await == "Recovered 1 deliveries").then_some(())
    })
    .await;
    wait_states(
        &browser,
        "the recovered delivery succeeds",
        &["succeeded", "succeeded", "succeeded"],
    )
    .await;
    // The filter shows only what is asked for.
    let filter = browser.find(Locator::Css("#delivery-filter")).await.unwrap();
    filter.select_by_value("failed").await.unwrap();
    wait_states(&browser, "nothing failed is shown", &[]).await;
    filter.select_by_value("").await.unwrap();
    wait_states(&browser, "all shown again", &["succeeded", "succeeded", "succeeded"]).await;
    browser
        .execute(
            "document.getElementById('deliveries').scrollIntoView({block: 'center'})",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&browser, "portal-deliveries").await;

    // Every request the receiver got verifies with the secret the page showed once.
    let got = receiver.received();
    assert_eq!(got.len(), 5, "test, failed test + retry, failed test + recovery");
    let wh = standardwebhooks::Webhook::new(&secret).unwrap();
    for request in &got {
        wh.verify(&request.body, &request.headers).expect("signature verifies");
    }

    // Edit: deactivate, save; the CR follows.
    click(&browser, "#detail-active").await;
    click(&browser, "#detail-save").await;
    support::wait_for("the endpoint deactivated", WAIT, || async {
        let ep = api.get(&id).await.ok()?;
        (!ep.spec.active).then_some(())
    })
    .await;

    // Rotate: a new secret, shown once.
    click(&browser, "#detail-rotate").await;
    support::wait_for("the rotated secret", WAIT, || async {
        let shown = text(&browser, "#secret-value").await;
        (visible(&browser, "#secret-panel").await && shown.starts_with("whsec_") && shown != secret).then_some(())
    })
    .await;
    click(&browser, "#secret-dismiss").await;

    // Phone width: nothing wider than the screen.
    browser.set_window_size(375, 812).await.unwrap();
    let overflow = browser
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is wider than a phone: {overflow}"
    );
    screenshot(&browser, "portal-phone").await;
    browser.set_window_size(1280, 1000).await.unwrap();

    // Delete, confirmed in the page.
    click(&browser, "#detail-delete").await;
    click(&browser, "#detail-delete-confirm").await;
    support::wait_for("the endpoint deleted", WAIT, || async {
        api.get_opt(&id).await.ok()?.is_none().then_some(())
    })
    .await;
    support::wait_for("the row gone", WAIT, || async {
        (!present(&browser, &row).await).then_some(())
    })
    .await;

    // A read-only session: no write control at all, and the API refuses writes with its token.
    let (_, kept, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": receiver.url("/kept")})),
        )
        .await;
    let kept_id = kept["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    op.call("POST", &op.url(ORG, &format!("/{kept_id}/test")), Some(&key), None)
        .await;
    let read_only = open_session(&op, &key, Some(json!({"read_only": true}))).await;
    browser.goto(read_only["url"].as_str().unwrap()).await.unwrap();
    let kept_row = format!("#endpoints tr[data-endpoint-id=\"{kept_id}\"]");
    support::wait_for("the endpoint listed read-only", WAIT, || async {
        present(&browser, &kept_row).await.then_some(())
    })
    .await;
    assert!(visible(&browser, "#read-only-badge").await);
    click(&browser, &format!("{kept_row} .open")).await;
    wait_states(&browser, "the delivery shown read-only", &["succeeded"]).await;
    for control in [
        "#create-form",
        "#detail-save",
        "#detail-test",
        "#detail-rotate",
        "#detail-delete",
        "#recover-form",
        ".retry",
    ] {
        assert!(
            !present(&browser, control).await,
            "{control} is shown to a read-only session"
        );
    }
    screenshot(&browser, "portal-read-only").await;
    let ro = read_only["token"].as_str().unwrap();
    let (status, _, _) = op
        .call("POST", &op.url(ORG, &format!("/{kept_id}/test")), Some(ro), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    browser.close().await.unwrap();
}

/// Where a screenshot the README shows is written: with the others under `target/`, or over the
/// README's committed picture (`docs/images/<name>.png`) when `CAPY_UPDATE_README_IMAGES=1` (a
/// test run must not leave the checkout changed: the pictures show the time they were taken).
fn readme_screenshot_path(name: &str) -> PathBuf {
    if std::env::var("CAPY_UPDATE_README_IMAGES").as_deref() == Ok("1") {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/images");
        std::fs::create_dir_all(&dir).unwrap();
        return dir.join(format!("{name}.png"));
    }
    screenshots_dir().join(format!("{name}.png"))
}

/// Starts recording the page's Content-Security-Policy violations (see [`assert_within_csp`]).
async fn watch_csp(browser: &Browser) {
    browser
        .execute(
            "window.cspViolations = [];
             document.addEventListener('securitypolicyviolation', e => window.cspViolations.push(e.violatedDirective));",
            vec![],
        )
        .await
        .unwrap();
}

/// The browser reported no violation of the page's policy since [`watch_csp`], and the page
/// loaded nothing from another origin.
async fn assert_within_csp(browser: &Browser) {
    let checked = browser
        .execute(
            "return [window.cspViolations,
                     performance.getEntriesByType('resource').filter(e => !e.name.startsWith(location.origin)).length]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(checked, json!([[], 0]), "CSP violations, requests elsewhere");
}

/// An attribute of the first element `css` matches.
async fn attr(browser: &Browser, css: &str, name: &str) -> Option<String> {
    browser.find(Locator::Css(css)).await.ok()?.attr(name).await.ok()?
}

/// Issue 24, item 5: an endpoint's attempts of the last 24 hours, by outcome and with the latency
/// of the successful ones, over REST (`GET .../stats`, one organization only) and drawn in the
/// portal as inline SVG under the page's CSP; the drawing is read back from the DOM and
/// photographed for the README.
#[tokio::test]
async fn the_portal_charts_the_last_day_of_attempts() {
    let (client, ns, op, key) = setup_sending("portal-chart").await;
    let receiver = Receiver::start(vec![]).await;
    let create = |path: &str| {
        let body = json!({"url": receiver.url(path), "description": path.trim_start_matches('/')});
        let (op, key, list) = (&op, &key, op.url(ORG, ""));
        async move {
            let (status, created, _) = op.call("POST", &list, Some(key), Some(body)).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            created["webhook_endpoint"]["id"].as_str().unwrap().to_string()
        }
    };
    let busy = create("/busy").await;
    let quiet = create("/quiet").await;

    // Four successes that take a while to answer, two failures: one attempt each (schedule "0s").
    receiver.script(vec![
        Answer::Slow(Duration::from_millis(40)),
        Answer::Status(500),
        Answer::Slow(Duration::from_millis(80)),
        Answer::Slow(Duration::from_millis(120)),
        Answer::Status(500),
        Answer::Slow(Duration::from_millis(160)),
    ]);
    let test = op.url(ORG, &format!("/{busy}/test"));
    for _ in 0..6 {
        let (status, body, _) = op.call("POST", &test, Some(&key), None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let deliveries = op.url(ORG, &format!("/{busy}/deliveries"));
    support::wait_for("six finished deliveries", WAIT, || async {
        let (_, body, _) = op.call("GET", &deliveries, Some(&key), None).await;
        let list = body["deliveries"].as_array()?.clone();
        (list.len() == 6 && list.iter().all(|d| d["state"] != "pending")).then_some(())
    })
    .await;

    // Over REST: 24 hours, the attempts counted by outcome, latency only of the successes.
    let stats_url = op.url(ORG, &format!("/{busy}/stats"));
    let (status, stats, _) = op.call("GET", &stats_url, Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_conforms("EndpointStats", &stats);
    let hours = stats["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 24);
    assert_eq!(
        (stats["succeeded"].as_u64(), stats["failed"].as_u64()),
        (Some(4), Some(2))
    );
    let sum = |field: &str| hours.iter().map(|h| h[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("succeeded"), sum("failed")), (4, 2));
    let since: jiff::Timestamp = stats["since"].as_str().unwrap().parse().unwrap();
    let last: jiff::Timestamp = hours[23]["start"].as_str().unwrap().parse().unwrap();
    assert!(
        since <= jiff::Timestamp::now() && last <= jiff::Timestamp::now(),
        "{stats}"
    );
    for hour in hours.iter().filter(|h| h["succeeded"].as_u64() > Some(0)) {
        let (p50, p95) = (
            hour["latency_p50_ms"].as_f64().unwrap(),
            hour["latency_p95_ms"].as_f64().unwrap(),
        );
        // The receiver took 40 to 160 ms to answer each success.
        assert!((30.0..=1000.0).contains(&p50) && p50 <= p95, "{hour}");
    }
    // The quiet endpoint: a day of zeros. Another organization sees neither.
    let (_, quiet_stats, _) = op
        .call("GET", &op.url(ORG, &format!("/{quiet}/stats")), Some(&key), None)
        .await;
    assert_eq!(
        (quiet_stats["succeeded"].as_u64(), quiet_stats["failed"].as_u64()),
        (Some(0), Some(0))
    );
    let (_, other_key) = op.mint_key(&client, &ns, "org_other", None).await;
    let (status, body, _) = op.call("GET", &stats_url, Some(&other_key), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body, _) = op
        .call(
            "GET",
            &op.url("org_other", &format!("/{busy}/stats")),
            Some(&other_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(!body.to_string().contains("succeeded"), "{body}");

    // In the page, from a read-only session (the chart only reads).
    let (_driver, browser) = start_browser().await;
    let session = open_session(&op, &key, Some(json!({"read_only": true}))).await;
    browser.goto(session["url"].as_str().unwrap()).await.unwrap();
    let row = |id: &str| format!("#endpoints tr[data-endpoint-id=\"{id}\"]");
    support::wait_for("both endpoints listed", WAIT, || async {
        (present(&browser, &row(&busy)).await && present(&browser, &row(&quiet)).await).then_some(())
    })
    .await;
    watch_csp(&browser).await;
    // Nothing attempted: said so, and no empty drawing.
    click(&browser, &format!("{} .open", row(&quiet))).await;
    support::wait_for("the empty state", WAIT, || async {
        (text(&browser, "#chart-summary").await == "No attempts in the last 24 hours.").then_some(())
    })
    .await;
    assert!(!present(&browser, "#chart svg").await);
    click(&browser, "#detail-close").await;

    click(&browser, &format!("{} .open", row(&busy))).await;
    support::wait_for("the chart", WAIT, || async {
        present(&browser, "#chart svg").await.then_some(())
    })
    .await;
    let summary = text(&browser, "#chart-summary").await;
    assert!(
        summary.starts_with("6 attempts in the last 24 hours: 4 succeeded, 2 failed."),
        "{summary}"
    );
    let label = attr(&browser, "#chart svg", "aria-label").await.unwrap_or_default();
    assert_eq!(label, summary, "the drawing is named by its totals");
    assert_eq!(attr(&browser, "#chart svg", "role").await.as_deref(), Some("img"));
    // Read back from the drawing itself: 24 hours, whose bars add up to the totals.
    let drawn = browser
        .execute(
            "const hours = [...document.querySelectorAll('#chart svg g.chart-hour')];
             const n = (g, a) => Number(g.getAttribute(a));
             const height = (sel) => [...document.querySelectorAll(sel)]
               .reduce((sum, r) => sum + r.getBBox().height, 0);
             return {
               hours: hours.length,
               succeeded: hours.reduce((s, g) => s + n(g, 'data-succeeded'), 0),
               failed: hours.reduce((s, g) => s + n(g, 'data-failed'), 0),
               succeededBars: height('#chart .bar-succeeded'),
               failedBars: height('#chart .bar-failed'),
               medians: document.querySelectorAll('#chart .chart-dot-p50').length,
               titled: hours.every(g => g.querySelector('title').textContent.includes('succeeded')),
               width: document.querySelector('#chart svg').getBoundingClientRect().width,
             };",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        (&drawn["hours"], &drawn["succeeded"], &drawn["failed"], &drawn["titled"]),
        (&json!(24), &json!(4), &json!(2), &json!(true)),
        "{drawn}"
    );
    // Stacked to scale: the successes' bars twice as tall as the failures'.
    let (ok, bad) = (
        drawn["succeededBars"].as_f64().unwrap(),
        drawn["failedBars"].as_f64().unwrap(),
    );
    assert!(bad > 0.0 && (ok / bad - 2.0).abs() < 0.05, "{drawn}");
    assert!(drawn["medians"].as_u64().unwrap() >= 1, "a latency point: {drawn}");
    assert!(drawn["width"].as_f64().unwrap() > 300.0, "{drawn}");
    // Drawn under the page's policy: the browser reported no violation of it, and nothing was
    // loaded from elsewhere.
    assert_within_csp(&browser).await;

    let section = browser.find(Locator::Css("#chart-section")).await.unwrap();
    browser
        .execute(
            "document.getElementById('chart-section').scrollIntoView({block: 'center'})",
            vec![],
        )
        .await
        .unwrap();
    let png = section.screenshot().await.expect("screenshot of the chart");
    std::fs::write(readme_screenshot_path("portal-chart"), &png).unwrap();
    screenshot(&browser, "portal-chart-page").await;
    browser.close().await.unwrap();
}

/// Creates a WebhookEventType for the catalog of the operator's namespace.
async fn create_event_type(
    client: &kube::Client,
    ns: &str,
    name: &str,
    group: Option<&str>,
    example: Option<Value>,
    deprecated: bool,
) {
    let spec = WebhookEventTypeSpec {
        name: name.into(),
        description: format!("Sent when {}", name.replace('.', " ")),
        group: group.map(str::to_string),
        schema: None,
        example,
        deprecated,
    };
    let api: Api<WebhookEventType> = Api::namespaced(client.clone(), ns);
    let object = WebhookEventType::new(&name.replace('.', "-"), spec);
    api.create(&kube::api::PostParams::default(), &object).await.unwrap();
}

/// The outcomes shown under a filter field after "Try on the examples": type → sent or not, and
/// why not when the evaluation failed.
async fn tried(browser: &Browser, prefix: &str) -> Value {
    browser
        .execute(
            &format!(
                "return [...document.querySelectorAll('#{prefix}-filter-results li')].map(li => [
                   li.getAttribute('data-event-type'), li.getAttribute('data-matches') === 'true',
                   (li.querySelector('.filter-why') || {{}}).textContent || null])"
            ),
            vec![],
        )
        .await
        .unwrap()
}

/// Sets a form field's value as typing would.
async fn type_into(browser: &Browser, css: &str, text: &str) {
    let field = browser.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

/// Issue 25, item 4: the portal's endpoint forms pick event types from the catalog (grouped, with
/// descriptions, deprecation and examples), and a filter is tried on the chosen types' examples
/// before saving, by the server (`POST .../filters/test`) as ingest would evaluate it; what is
/// saved is what was picked and tried.
#[tokio::test]
async fn the_portal_picks_event_types_from_the_catalog_and_tries_a_filter() {
    let (client, ns, op, key) = setup("portal-catalog", Options::default()).await;
    let eu = json!({"database_id": "db_1", "region": "eu-west-1", "size_gb": 10});
    let us = json!({"database_id": "db_2", "region": "us-east-1"});
    let catalog_types = [
        ("database.created", Some("Databases"), Some(eu.clone()), false),
        ("database.deleted", Some("Databases"), Some(us), false),
        ("backup.completed", None, Some(json!({"size_bytes": 5})), false),
        ("legacy.ping", None, None, true),
    ];
    for (name, group, example, deprecated) in catalog_types {
        create_event_type(&client, &ns, name, group, example, deprecated).await;
    }
    let catalog = format!("{}/{ORG}/event-types", op.base);
    support::wait_for("the catalog read", WAIT, || async {
        let (_, body, _) = op.call("GET", &catalog, Some(&key), None).await;
        (body["event_types"].as_array()?.len() == 4).then_some(())
    })
    .await;

    // Over REST: on the catalog's example unless data is given, from any credential of the
    // organization (a read-only portal session too), refused as an endpoint's filter would be.
    let try_url = format!("{}/{ORG}/filters/test", op.base);
    let eu_only = r#"event.data.region.startsWith("eu-")"#;
    let attempt = |credential: String, body: Value| {
        let (op, try_url) = (&op, &try_url);
        async move { op.call("POST", try_url, Some(&credential), Some(body)).await }
    };
    let (status, result, _) = attempt(
        key.clone(),
        json!({"filter": eu_only, "event_type": "database.created"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_conforms("FilterTestResult", &result);
    assert_eq!(
        result,
        json!({"matches": true, "evaluation_error": null, "used_example": true})
    );
    let ro = open_session(&op, &key, Some(json!({"read_only": true}))).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, result, _) = attempt(
        ro,
        json!({"filter": eu_only, "event_type": "database.created", "data": {"region": "us-west-2"}}),
    )
    .await;
    assert_eq!(
        (status, &result["matches"], &result["used_example"]),
        (StatusCode::OK, &json!(false), &json!(false))
    );
    let (status, result, _) = attempt(
        key.clone(),
        json!({"filter": "event.data.region ==", "event_type": "database.created"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{result}");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .starts_with("filter has a syntax error at line 1, column"),
        "{result}"
    );
    let (status, result, _) = attempt(key.clone(), json!({"filter": "true", "event_type": "legacy.ping"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{result}");
    assert!(
        result["error"].as_str().unwrap().contains("no example of legacy.ping"),
        "{result}"
    );
    let (_, other_key) = op.mint_key(&client, &ns, "org_other", None).await;
    let (status, result, _) = attempt(other_key, json!({"filter": "true", "event_type": "database.created"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{result}");

    // In the page: the create form lists the catalog, grouped, described, with examples.
    let (_driver, browser) = start_browser().await;
    let session = open_session(&op, &key, None).await;
    browser.goto(session["url"].as_str().unwrap()).await.unwrap();
    watch_csp(&browser).await;
    support::wait_for("the catalog in the create form", WAIT, || async {
        visible(&browser, "#create-catalog .catalog-type").await.then_some(())
    })
    .await;
    let listed = browser
        .execute(
            "return [...document.querySelectorAll('#create-catalog .catalog-group')].map(g => ({
               group: (g.querySelector('.catalog-group-name') || {}).textContent || null,
               types: [...g.querySelectorAll('.catalog-type')].map(t => [
                 t.getAttribute('data-event-type'),
                 t.querySelector('.catalog-description').textContent,
                 !!t.querySelector('.badge-deprecated'),
                 !!t.querySelector('details.catalog-example')]),
             }))",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        listed,
        json!([
            {"group": "Databases", "types": [
                ["database.created", "Sent when database created", false, true],
                ["database.deleted", "Sent when database deleted", false, true]]},
            {"group": null, "types": [
                ["backup.completed", "Sent when backup completed", false, true],
                ["legacy.ping", "Sent when legacy ping", true, false]]},
        ]),
        "grouped (ungrouped last), described, deprecation and examples shown"
    );
    assert_eq!(text(&browser, "#create-event-types-label").await, "Other patterns");
    // An example opens to the JSON the catalog holds.
    click(&browser, "#create-catalog [data-event-type='database.created'] summary").await;
    let example = text(&browser, "#create-catalog [data-event-type='database.created'] pre").await;
    assert_eq!(serde_json::from_str::<Value>(&example).unwrap(), eu);
    click(&browser, "#create-catalog [data-event-type='database.created'] summary").await;

    // Two database types picked and a filter tried on their examples: the server's verdicts.
    click(&browser, "#create-catalog [data-event-type='database.created'] input").await;
    click(&browser, "#create-catalog [data-event-type='database.deleted'] input").await;
    type_into(&browser, "#create-url", "https://hooks.example.com/eu").await;
    type_into(&browser, "#create-filter", "event.data.region ==").await;
    click(&browser, "#create-filter-try").await;
    support::wait_for("the syntax error shown", WAIT, || async {
        let shown = text(&browser, "#create-filter-results").await;
        shown
            .starts_with("filter has a syntax error at line 1, column")
            .then_some(())
    })
    .await;
    type_into(&browser, "#create-filter", "event.data.size_gb > 5").await;
    assert_eq!(
        text(&browser, "#create-filter-results").await,
        "",
        "an edit clears the old result"
    );
    click(&browser, "#create-filter-try").await;
    let verdicts = support::wait_for("verdicts on both examples", WAIT, || async {
        let shown = tried(&browser, "create").await;
        (shown.as_array()?.len() == 2).then_some(shown)
    })
    .await;
    // The deleted example has no size_gb: no match, and the page says why.
    assert_eq!(verdicts[0], json!(["database.created", true, null]), "{verdicts}");
    assert_eq!(
        (&verdicts[1][0], &verdicts[1][1]),
        (&json!("database.deleted"), &json!(false)),
        "{verdicts}"
    );
    assert!(verdicts[1][2].as_str().unwrap_or("").contains("size_gb"), "{verdicts}");
    screenshot(&browser, "portal-catalog-page").await;
    browser
        .execute(
            "document.querySelector('#create-slot section').scrollIntoView({block: 'start'})",
            vec![],
        )
        .await
        .unwrap();
    // Tall enough for the whole card: an element's screenshot stops at the viewport's edge.
    browser.set_window_size(1280, 1700).await.unwrap();
    let card = browser.find(Locator::Css("#create-slot section")).await.unwrap();
    std::fs::write(
        readme_screenshot_path("portal-catalog"),
        card.screenshot().await.expect("screenshot of the create form"),
    )
    .unwrap();

    // The filter everyone wants, plus a pattern the list does not name, saved as tried.
    type_into(&browser, "#create-filter", eu_only).await;
    type_into(&browser, "#create-event-types", "backup.*").await;
    click(&browser, "#create-filter-try").await;
    // backup.* brings backup.completed's example in: it has no region, so no match, and why.
    let verdicts = support::wait_for("the eu filter tried on three examples", WAIT, || async {
        let shown = tried(&browser, "create").await;
        (shown.as_array()?.len() == 3 && shown[0][0] == "backup.completed").then_some(shown)
    })
    .await;
    // In the catalog's order, by name.
    assert_eq!(
        (&verdicts[0][0], &verdicts[0][1], &verdicts[1], &verdicts[2]),
        (
            &json!("backup.completed"),
            &json!(false),
            &json!(["database.created", true, null]),
            &json!(["database.deleted", false, null]),
        ),
        "{verdicts}"
    );
    assert!(verdicts[0][2].as_str().unwrap_or("").contains("region"), "{verdicts}");
    click(&browser, "#create-submit").await;
    let list = op.url(ORG, "");
    let created = support::wait_for("the endpoint created", WAIT, || async {
        let (_, body, _) = op.call("GET", &list, Some(&key), None).await;
        body["webhook_endpoints"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(
        (&created["event_types"], &created["filter"]),
        (
            &json!(["database.created", "database.deleted", "backup.*"]),
            &json!(eu_only)
        ),
        "{created}"
    );

    // Opened again, the endpoint shows its picks as ticks and its filter; read-only sessions see
    // them disabled and may still try the filter.
    let ro = open_session(&op, &key, Some(json!({"read_only": true}))).await;
    browser.goto("about:blank").await.unwrap();
    browser.goto(ro["url"].as_str().unwrap()).await.unwrap();
    watch_csp(&browser).await;
    let id = created["id"].as_str().unwrap();
    click(&browser, &format!("#endpoints tr[data-endpoint-id=\"{id}\"] .open")).await;
    support::wait_for("the detail's catalog", WAIT, || async {
        visible(&browser, "#detail-catalog .catalog-type").await.then_some(())
    })
    .await;
    let ticks = browser
        .execute(
            "return [...document.querySelectorAll('#detail-catalog input.catalog-check')]
               .map(c => [c.value, c.checked, c.disabled])",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        ticks,
        json!([
            ["database.created", true, true],
            ["database.deleted", true, true],
            ["backup.completed", false, true],
            ["legacy.ping", false, true],
        ])
    );
    let patterns = browser.find(Locator::Css("#detail-event-types")).await.unwrap();
    assert_eq!(patterns.prop("value").await.unwrap().as_deref(), Some("backup.*"));
    let filter = browser.find(Locator::Css("#detail-filter")).await.unwrap();
    assert_eq!(filter.prop("value").await.unwrap().as_deref(), Some(eu_only));
    click(&browser, "#detail-filter-try").await;
    support::wait_for("a read-only session tries the filter", WAIT, || async {
        (tried(&browser, "detail").await.as_array()?.len() == 3).then_some(())
    })
    .await;
    assert_within_csp(&browser).await;
    browser.close().await.unwrap();
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
