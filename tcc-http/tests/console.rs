//! The operator's console in a real browser: headless Chromium driven by chromedriver over the
//! WebDriver protocol (a small client over reqwest below), against a coordinator holding a flagged
//! transaction. The operator sees it listed with its error, enters the token, retries it once the
//! participant is back and sees it confirmed; forces another, cancels a trying one; a `<script>`
//! payload shows as text and never runs; the page fits a phone's width; the console works mounted
//! under a prefix of another axum app.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`TCC_CHROMIUM` and `TCC_CHROMEDRIVER` name other
//! binaries). Without them the browser test is skipped with a loud message, unless
//! `TCC_REQUIRE_CHROMIUM=1` (CI sets it), which makes it fail. `TCC_CONSOLE_SCREENSHOT=FILE` saves
//! a PNG of the console at 1280 px (how `docs/console.png` is made).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Mode, Participant, fast_core};
use tcc_core::{Config, RetryPolicy};
use tcc_http::server::{Launch, ServerConfig, Token};

const TOKEN: &str = "console-token-0123456789";

/// Longest any one wait for the page may take.
const WAIT: Duration = Duration::from_secs(20);

/// The script of a branch's payload: it must show as text and never run.
const HOSTILE: &str = r#"<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">"#;

/// `name` on the PATH (or the path the variable `var` gives), if it exists.
fn binary(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| std::env::split_paths(&path).map(|d| d.join(n)).find(|p| p.exists()))
}

/// Chromium and chromedriver, or `None` after saying loudly why the test is skipped; with
/// `TCC_REQUIRE_CHROMIUM=1` a missing one fails the test instead.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = binary("TCC_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
    let driver = binary("TCC_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = format!("chromium found: {c:?}, chromedriver found: {d:?}");
            assert!(
                std::env::var("TCC_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
                "TCC_REQUIRE_CHROMIUM=1 but the browser is missing ({missing}); \
                 apt-get install chromium chromium-driver"
            );
            eprintln!(
                "\n*** SKIPPING the console's browser test: {missing}.\n*** Install Debian's `chromium` \
                 and `chromium-driver` (CI does, and sets TCC_REQUIRE_CHROMIUM=1).\n"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// chromedriver and one browser session, ended (and the processes killed) on drop.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start(chromium: &std::path::Path, driver: &std::path::Path) -> Browser {
        let port = free_port();
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        support::eventually("chromedriver answers", WAIT, async || {
            let res = http.get(format!("{base}/status")).send().await;
            match res {
                Ok(r) => r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-extensions", "--disable-default-apps", "--no-first-run",
                    "--no-default-browser-check", "--mute-audio", "--window-size=1280,1000",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let res: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session =
            res["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {res}")).to_owned();
        Browser { http, base, session, _driver: child, _profile: profile }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body) in the page with `args`.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args })))
            .await
    }

    /// Waits until `script` returns true or a non-empty value (not null, false or ""), returning
    /// that value.
    async fn until(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.js(script, args.clone()).await;
            let empty = v.is_null() || v.as_bool() == Some(false) || v.as_str() == Some("");
            if !empty {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what} (last: {v})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css})))
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Clicks the element `css` selects, the way a user would (WebDriver moves the pointer to it).
    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    /// Types `text` into the element `css` selects (a key at a time, as a keyboard would).
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text })))
            .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().unwrap())
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(reqwest::Method::POST, "/window/rect", Some(json!({"width": width, "height": height})))
            .await;
    }

    async fn end(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The text of the first element `css` selects in the page, or null.
const TEXT_OF: &str = "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";

/// A coordinator with the token, flagging after two failed rounds.
async fn coordinator(dir: &std::path::Path) -> tcc_http::server::Running {
    let core = Config { retry: RetryPolicy { max_attempts: 2, ..fast_core().retry }, ..fast_core() };
    tcc_http::server::start(Launch {
        listen: "127.0.0.1:0".into(),
        store: support::test_store(dir).await,
        core,
        server: ServerConfig { token: Some(Token::new(TOKEN).unwrap()), ..ServerConfig::default() },
        client: Default::default(),
    })
    .await
    .unwrap()
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> Value {
        let res = req.bearer_auth(TOKEN).send().await.unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        res.json().await.unwrap()
    }

    /// Begins a transaction with one branch on `p` carrying `payload`.
    async fn begin(&self, p: &Participant, gid: &str, payload: &str) {
        let body = json!({"gid": gid, "timeout_ms": 600_000,
            "branches": [{"branch": "seat", "target": p.target("seat"), "payload": payload}]});
        self.send(self.http.post(format!("{}/v1/transactions", self.base)).json(&body)).await;
    }

    async fn get(&self, gid: &str) -> Value {
        self.send(self.http.get(format!("{}/v1/transactions/{gid}", self.base))).await
    }

    /// Confirms `gid`, whose participant fails phase two, and waits until it is flagged.
    async fn flag(&self, gid: &str) {
        self.send(self.http.post(format!("{}/v1/transactions/{gid}/confirm", self.base))).await;
        support::eventually("flagged", WAIT, async || self.get(gid).await["state"] == "flagged").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_forces_and_cancels_from_the_console_and_payloads_stay_text() {
    let Some((chromium, driver)) = browser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(dir.path()).await;
    let api = Api { http: reqwest::Client::builder().no_proxy().build().unwrap(), base: running.url() };
    let p = Participant::start(Mode::FailPhaseTwo).await;
    api.begin(&p, "flagged-retry", HOSTILE).await;
    api.flag("flagged-retry").await;
    api.begin(&p, "flagged-force", "{\"seat\": \"12A\"}").await;
    api.flag("flagged-force").await;
    api.begin(&p, "still-trying", "{}").await;

    let b = Browser::start(&chromium, &driver).await;
    b.goto(&format!("{}/console", running.url())).await;

    // The overview shows the flagged ones, loud; the list shows them with their error.
    let flagged = b.until("the flagged count", TEXT_OF, json!(["li.count.s-flagged.loud .n"])).await;
    assert_eq!(flagged, "2");
    let error = b.until("the row's error", TEXT_OF, json!(["tr[data-gid='flagged-retry'] td.error"])).await;
    assert!(error.as_str().unwrap().contains("503"), "the last error is listed: {error}");
    // Newest first: descending ids.
    let order =
        "return Array.from(document.querySelectorAll('#tx-rows tr')).map(r => r.getAttribute('data-gid'))";
    assert_eq!(b.js(order, json!([])).await, json!(["still-trying", "flagged-retry", "flagged-force"]));

    // Opening it with the keyboard: the id is a button; Enter opens the detail.
    let row = b.find("tr[data-gid='flagged-retry'] button.link").await;
    b.call(reqwest::Method::POST, &format!("/element/{row}/value"), Some(json!({"text": "\u{E007}"}))).await;
    b.until(
        "the detail",
        "return document.getElementById('d-gid').textContent === 'flagged-retry'",
        json!([]),
    )
    .await;
    // The hostile payload is text: shown as written, no element made of it, nothing run.
    assert_eq!(b.js(TEXT_OF, json!(["#d-branches pre.payload"])).await, HOSTILE);
    let made = "return document.querySelectorAll('#detail script, #detail img, main script').length";
    assert_eq!(b.js(made, json!([])).await, 0);
    // The history shows the decision and the failed rounds.
    let history = b.js(TEXT_OF, json!(["#d-history"])).await;
    assert!(history.as_str().unwrap().contains("decided to confirm"), "{history}");
    assert!(history.as_str().unwrap().contains("1 failed"), "{history}");

    // An action without the token asks for it, and does nothing.
    b.click("#act-retry").await;
    let asks = "return document.getElementById('status').textContent.includes('need the operator token')";
    b.until("the token request", asks, json!([])).await;
    assert_eq!(api.get("flagged-retry").await["state"], "flagged");

    // The token: typed once, kept in sessionStorage, never in the URL or a cookie.
    b.type_into("#token-input", TOKEN).await;
    b.click("#token-set").await;
    let kept = "return [sessionStorage.getItem('tcc-console-token'), document.cookie, location.href, \
                document.getElementById('token-input').value]";
    let kept = b.js(kept, json!([])).await;
    assert_eq!(kept[0], TOKEN);
    assert_eq!(kept[1], "", "no cookie");
    assert!(!kept[2].as_str().unwrap().contains(TOKEN), "not in the URL: {}", kept[2]);
    assert_eq!(kept[3], "", "the field is cleared");

    // Retry, then back out at the confirmation: nothing happens.
    b.click("#act-retry").await;
    b.until("the confirmation", "return document.getElementById('confirm').open", json!([])).await;
    b.click("#confirm-no").await;
    assert_eq!(api.get("flagged-retry").await["state"], "flagged");

    // The participant is back: retry, confirm, and the page shows it confirmed.
    p.set_mode(Mode::Healthy);
    b.click("#act-retry").await;
    b.until("the confirmation", "return document.getElementById('confirm').open", json!([])).await;
    b.click("#confirm-yes").await;
    b.until(
        "the detail shows confirmed",
        "return document.querySelector('#d-fields .badge')?.textContent === 'confirmed'",
        json!([]),
    )
    .await;
    assert_eq!(api.get("flagged-retry").await["state"], "confirmed");

    // Force the other flagged one (its decision: confirm).
    b.click("tr[data-gid='flagged-force'] button.link").await;
    b.until(
        "its detail",
        "return document.getElementById('d-gid').textContent === 'flagged-force'",
        json!([]),
    )
    .await;
    b.click("#act-force").await;
    b.until("the confirmation", "return document.getElementById('confirm').open", json!([])).await;
    b.click("#confirm-yes").await;
    b.until(
        "the detail shows the forced outcome",
        "return document.querySelector('#d-fields .badge')?.textContent === 'confirmed'",
        json!([]),
    )
    .await;
    let forced = api.get("flagged-force").await;
    assert_eq!(forced["state"], "confirmed");
    assert_eq!(forced["history"].as_array().unwrap().last().unwrap()["what"], "operator_force");

    // Cancel the trying one.
    b.click("tr[data-gid='still-trying'] button.link").await;
    b.until(
        "its detail",
        "return document.getElementById('d-gid').textContent === 'still-trying'",
        json!([]),
    )
    .await;
    b.click("#act-cancel").await;
    b.until("the confirmation", "return document.getElementById('confirm').open", json!([])).await;
    b.click("#confirm-yes").await;
    b.until(
        "the detail shows cancelled",
        "return document.querySelector('#d-fields .badge')?.textContent === 'cancelled'",
        json!([]),
    )
    .await;
    assert_eq!(api.get("still-trying").await["state"], "cancelled");

    // Nothing the page showed ran the payload's script.
    assert_eq!(b.js("return window.__pwned === undefined", json!([])).await, true);

    // A new flagged one for the picture, and the overview's charts with a few samples.
    p.set_mode(Mode::FailPhaseTwo);
    api.begin(&p, "trip-2026-12-07-0042", "{\"seat\": \"14C\"}").await;
    api.flag("trip-2026-12-07-0042").await;
    b.click("#page-first").await;
    b.until(
        "the new flagged row",
        "return !!document.querySelector(\"tr[data-gid='trip-2026-12-07-0042'] td.error\")",
        json!([]),
    )
    .await;
    b.click("tr[data-gid='trip-2026-12-07-0042'] button.link").await;
    b.until(
        "its detail",
        "return document.getElementById('d-gid').textContent.startsWith('trip-')",
        json!([]),
    )
    .await;
    b.resize(1280, 1640).await;
    b.js("window.scrollTo(0, 0)", json!([])).await;
    if let Ok(file) = std::env::var("TCC_CONSOLE_SCREENSHOT") {
        std::fs::write(&file, b.screenshot().await).unwrap();
        eprintln!("console screenshot written to {file}");
    } else {
        assert!(b.screenshot().await.starts_with(b"\x89PNG"));
    }

    // A phone's width: nothing wider than the screen (tables scroll inside their box).
    b.resize(390, 844).await;
    let fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1";
    b.until("the page fits a phone's width", fits, json!([])).await;

    b.end().await;
    running.stop().await.unwrap();
}

/// Mounted under a prefix of another axum app (as an embedded coordinator's service would), the
/// console loads its assets and reaches the API relative to where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_mounted_under_a_prefix_of_another_app() {
    let Some((chromium, driver)) = browser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(dir.path()).await;
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "the service's own page" }))
        .nest("/ops/tcc", tcc_http::server::router(Arc::clone(&running.state)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(tcc_http::server::serve(listener, app, std::future::pending()));
    let api = Api { http: reqwest::Client::builder().no_proxy().build().unwrap(), base: running.url() };
    let p = Participant::start(Mode::FailPhaseTwo).await;
    api.begin(&p, "nested-one", "{}").await;
    api.flag("nested-one").await;

    let b = Browser::start(&chromium, &driver).await;
    b.goto(&format!("http://{addr}/ops/tcc/console")).await;
    let error = b.until("the row's error", TEXT_OF, json!(["tr[data-gid='nested-one'] td.error"])).await;
    assert!(error.as_str().unwrap().contains("503"), "{error}");
    b.end().await;
    served.abort();
    running.stop().await.unwrap();
}

/// Every console answer carries the policy that forbids inline script and foreign sources.
#[tokio::test]
async fn console_answers_carry_a_strict_content_security_policy() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(dir.path()).await;
    let http =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let res = http.get(format!("{}{path}", running.url())).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
    }
    // `/console/` sends the browser to `/console`, where the page's relative links resolve.
    let res = http.get(format!("{}/console/", running.url())).send().await.unwrap();
    assert_eq!(res.status(), 308);
    assert_eq!(res.headers()["location"], "../console");
    // The page's reads need no token; its actions do, as any API call.
    let res = http.get(format!("{}/v1/overview", running.url())).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = http.post(format!("{}/v1/transactions/x/retry", running.url())).send().await.unwrap();
    assert_eq!(res.status(), 401);
    running.stop().await.unwrap();
}
