//! The web console: its assets over HTTP, and a real browser (headless Chromium driven through
//! chromedriver with the W3C WebDriver protocol) taking a run through its three gates.

use crate::helpers::{Backend, TestApp};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::{sleep, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C web element identifier key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a condition on the page may take to hold (generous: this is no timing assertion).
const DEADLINE: Duration = Duration::from_secs(60);
const GATES: [&str; 3] = ["brand-voice", "positioning", "keywords"];
const REQUEST: &str = "CRM for clinics";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_assets_are_served() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let cases = [
        ("/", "text/html", "<script src=\"/console/app.js\""),
        ("/console/app.js", "text/javascript", "graphql-transport-ws"),
        (
            "/console/style.css",
            "text/css",
            ".conn[data-state=\"connected\"]",
        ),
    ];
    for (path, content_type, needle) in cases {
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "GET {path}");
        let got = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            got.starts_with(content_type),
            "GET {path}: content-type {got}"
        );
        if path == "/" {
            let csp = r
                .headers()
                .get("content-security-policy")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert!(csp.contains("default-src 'self'"), "CSP: {csp}");
        }
        let body = r.text().await.expect("body");
        assert!(body.contains(needle), "GET {path} lacks {needle}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "GET {path} refers to another origin"
        );
    }
    // The stylesheet styles the page's hooks, the page links both assets.
    let html = app
        .client
        .get(format!("{}/", app.url))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("html");
    assert!(html.contains("/console/style.css"));
    assert!(html.contains("id=\"conn-status\""));
    let missing = app
        .client
        .get(format!("{}/console/nope.js", app.url))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_runs_a_workflow_through_its_gates_in_a_browser() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let browser = match Browser::start().await {
        Ok(b) => b,
        Err(e) => panic!("the console browser test cannot run: {e:#}"),
    };
    if let Err(err) = drive(&app, &browser).await {
        let shot = match browser.failure_screenshot("gates").await {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("(no screenshot: {e:#})"),
        };
        let shown = browser.shown_errors().await;
        eprintln!("console test failed; screenshot saved to {shot}");
        panic!(
            "console browser test failed: {err:#}\nerrors shown on the page: {shown}\nscreenshot: {shot}\nchromedriver log: {}",
            browser.log_path().display()
        );
    }
}

/// The user's path: workspace, a `content_calendar` run that falls back, three gates approved by
/// clicking, the completed run and its final brief, all without reloading the page.
async fn drive(app: &TestApp, b: &Browser) -> Result<()> {
    b.goto(&format!("{}/", app.url)).await?;
    b.wait_js(
        "the subscription connection to be up",
        "return document.querySelector('#conn-status').dataset.state === 'connected'",
    )
    .await?;
    b.exec("window.__sameDocument = true; return true", json!([]))
        .await?;

    // A server error shows next to the control that caused it.
    b.click("#brand-create").await?;
    b.wait_visible_text("#brand-error", "[VALIDATION]").await?;

    // Workspace.
    b.type_into("#brand-name", "Acme Clinics").await?;
    b.click("#brand-create").await?;
    b.wait_selected("#brand-select", "Acme Clinics").await?;
    b.wait_js(
        "the brand error to clear",
        "return document.querySelector('#brand-error').hidden",
    )
    .await?;
    b.type_into("#project-name", "Launch").await?;
    b.click("#project-create").await?;
    b.wait_selected("#project-select", "Launch").await?;
    b.type_into("#thread-title", "Q1 plan").await?;
    b.click("#thread-create").await?;
    b.wait_selected("#thread-select", "Q1 plan").await?;

    // Thread modes: add two, remove one.
    for mode in ["content_calendar", "plan_90d"] {
        b.click(&format!("#mode-add-select option[value='{mode}']"))
            .await?;
        b.click("#mode-add").await?;
        b.wait_visible(&format!("[data-testid='mode-{mode}']"))
            .await?;
    }
    b.click("[data-testid='mode-remove-plan_90d']").await?;
    b.wait_js(
        "plan_90d to be removed from the thread",
        "return !document.querySelector(\"[data-testid='mode-plan_90d']\") \
         && !!document.querySelector(\"[data-testid='mode-content_calendar']\")",
    )
    .await?;

    // Start a content_calendar run: the preview says it falls back.
    b.click("#run-mode option[value='content_calendar']")
        .await?;
    b.wait_visible_text(
        "[data-testid='preview-modes']",
        "content_calendar → foundation_stack",
    )
    .await?;
    b.wait_visible_text("#fallback-notice", "foundation_stack")
        .await?;
    b.type_into("#run-request", REQUEST).await?;
    b.click("#run-start").await?;
    let run_id = b
        .wait_js(
            "the new run in the thread's runs",
            "const li = document.querySelector(\"[data-testid='run-item']\"); \
             return li && li.textContent.includes('content_calendar → foundation_stack') \
                 ? li.dataset.runId : null",
        )
        .await?
        .as_str()
        .ok_or_else(|| anyhow!("run id is not a string"))?
        .to_string();
    let item = format!("[data-testid='run-item'][data-run-id='{run_id}']");
    let line = b.text(&item).await?;
    ensure!(
        line.starts_with(&format!("{run_id} ("))
            && line.ends_with(") content_calendar → foundation_stack"),
        "run line: {line}"
    );
    b.wait_visible_text("#run-modes", "content_calendar → foundation_stack")
        .await?;
    b.wait_visible_text("#run-fallback", "content_calendar was requested")
        .await?;
    b.wait_visible_text("#run-profile", "v1").await?;

    // The three gates, approved by clicking.
    for (i, gate) in GATES.iter().enumerate() {
        let approve = format!("[data-testid='approve-{gate}']");
        b.wait_visible(&approve).await?;
        b.wait_visible_text(&item, "(WAITING_APPROVAL)").await?;
        if i == 0 {
            // A finished stage's artifact in the viewer while the run waits.
            b.click("[data-testid='artifact-research/research-report.md']")
                .await?;
            b.wait_visible_text("#artifact-content", "# Research Report")
                .await?;
            b.wait_visible_text(
                "[data-testid='event'][data-type='ApprovalRequested']",
                "brand-voice",
            )
            .await?;
            if std::env::var("VM_CONSOLE_SCREENSHOT").as_deref() == Ok("1") {
                let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console-gate.png");
                b.save_screenshot(&path).await?;
                eprintln!("saved {}", path.display());
            }
        }
        b.type_into(
            &format!("[data-testid='approval-comment-{gate}']"),
            "approved in the browser",
        )
        .await?;
        b.click(&approve).await?;
        b.wait_visible_text(
            &format!("[data-testid='stage-{gate}'] [data-field='approval']"),
            "GRANTED",
        )
        .await?;
        if i == 0 {
            // Drop the subscription socket: the console reconnects and catches up with
            // `afterSequence`, so nothing the run does meanwhile is lost.
            b.exec("window.vmConsole.dropConnection(); return true", json!([]))
                .await?;
        }
    }

    // Completed, seen without reloading.
    b.wait_js(
        "the run to show COMPLETED in the list",
        &format!(
            "const li = document.querySelector(\"{item}\"); \
             return li && li.textContent === '{run_id} (COMPLETED) content_calendar → foundation_stack'"
        ),
    )
    .await?;
    b.wait_visible_text("#run-status", "COMPLETED").await?;
    let same = b
        .exec("return window.__sameDocument === true", json!([]))
        .await?;
    ensure!(same == json!(true), "the page was reloaded");
    // The console refreshes the run after each approval, so the run can complete before the
    // reconnect's backoff (400–600 ms) has passed: wait for the connection, then read its log.
    b.wait_js(
        "the subscription connection to be up again",
        "return document.querySelector('#conn-status').dataset.state === 'connected'",
    )
    .await?;
    let log = b
        .exec("return window.vmConsole.connectionLog", json!([]))
        .await?;
    let log: Vec<String> = serde_json::from_value(log)?;
    ensure!(
        log.iter().any(|s| s == "reconnecting")
            && log.last().map(String::as_str) == Some("connected"),
        "connection states: {log:?}"
    );

    // Every stage completed once, every gate granted by the console.
    for key in ["research", "brand-voice", "positioning", "keywords"] {
        let card = format!("[data-testid='stage-{key}']");
        b.wait_js(
            &format!("stage {key} to be completed"),
            &format!(
                "const c = document.querySelector(\"{card}\"); \
                 return c && c.dataset.status === 'COMPLETED' && c.dataset.attempts === '1'"
            ),
        )
        .await?;
    }
    for gate in GATES {
        let text = b
            .text(&format!(
                "[data-testid='stage-{gate}'] [data-field='approval']"
            ))
            .await?;
        ensure!(
            text.contains("GRANTED")
                && text.contains("by console")
                && text.contains("approved in the browser"),
            "approval of {gate}: {text}"
        );
    }

    // The final brief in the artifact viewer.
    b.click("[data-testid='artifact-final/foundation-brief.md']")
        .await?;
    b.wait_visible_text("#artifact-path", "final/foundation-brief.md")
        .await?;
    let brief = b
        .wait_visible_text("#artifact-content", "# Foundation Brief")
        .await?;
    for needle in [
        REQUEST,
        "Requested mode: content_calendar",
        "Effective mode: foundation_stack",
    ] {
        ensure!(
            brief.contains(needle),
            "the brief lacks {needle:?}: {brief}"
        );
    }

    // The timeline: every event of the run, once each, in order, though the socket dropped.
    b.wait_js(
        "the timeline to end with WorkflowRunCompleted",
        "const li = document.querySelector('#run-events li:last-child'); \
         return li && li.dataset.type === 'WorkflowRunCompleted'",
    )
    .await?;
    let page = b
        .exec(
            "return [...document.querySelectorAll('#run-events li')] \
               .map(li => [Number(li.dataset.seq), li.dataset.type])",
            json!([]),
        )
        .await?;
    let page: Vec<(i64, String)> = serde_json::from_value(page)?;
    ensure!(
        page.windows(2).all(|w| w[0].0 < w[1].0),
        "timeline out of order or duplicated: {page:?}"
    );
    let shown: Vec<String> = page.into_iter().map(|(_, t)| t).collect();
    let stored = app.event_types(&run_id).await;
    ensure!(
        shown == stored,
        "timeline differs from the stored events:\n page: {shown:?}\n store: {stored:?}"
    );
    let errors = b.shown_errors().await;
    ensure!(errors.is_empty(), "errors shown on the page: {errors}");

    reject_resume_and_cancel(b, &run_id).await
}

/// Start a run and wait until the console shows it waiting at its first gate.
async fn start_and_wait_at_gate(b: &Browser, previous: &str, request: &str) -> Result<String> {
    b.click("#run-mode option[value='foundation_stack']")
        .await?;
    b.wait_js(
        "the preview of foundation_stack, without fallback",
        "return document.querySelector(\"[data-testid='preview-modes']\").textContent \
             === 'foundation_stack → foundation_stack' \
         && document.querySelector('#fallback-notice').hidden",
    )
    .await?;
    b.type_into("#run-request", request).await?;
    b.click("#run-start").await?;
    let id = b
        .wait_js_args(
            "the new run to open",
            "const id = document.querySelector('#run-id').textContent; \
             return id && id !== arguments[0] ? id : null",
            json!([previous]),
        )
        .await?
        .as_str()
        .unwrap_or_default()
        .to_string();
    b.wait_visible("[data-testid='approve-brand-voice']")
        .await?;
    b.wait_visible_text(
        &format!("[data-testid='run-item'][data-run-id='{id}']"),
        "(WAITING_APPROVAL) foundation_stack → foundation_stack",
    )
    .await?;
    Ok(id)
}

/// Reject a gate with a comment; resume a run at an ungranted gate (nothing happens); cancel it.
async fn reject_resume_and_cancel(b: &Browser, first: &str) -> Result<()> {
    let rejected = start_and_wait_at_gate(b, first, "Rejected request").await?;
    b.type_into(
        "[data-testid='approval-comment-brand-voice']",
        "not our voice",
    )
    .await?;
    b.click("[data-testid='reject-brand-voice']").await?;
    b.wait_visible_text(
        "[data-testid='stage-error-code-brand-voice']",
        "APPROVAL_REJECTED",
    )
    .await?;
    let error = b
        .wait_visible_text("[data-testid='stage-error-brand-voice']", "retryable: no")
        .await?;
    ensure!(!error.trim().is_empty(), "stage error: {error}");
    b.wait_visible_text("#run-status", "FAILED").await?;
    b.wait_visible_text(
        "[data-testid='stage-brand-voice'] [data-field='approval']",
        "not our voice",
    )
    .await?;
    b.wait_visible_text(
        &format!("[data-testid='run-item'][data-run-id='{rejected}']"),
        "(FAILED)",
    )
    .await?;

    let canceled = start_and_wait_at_gate(b, &rejected, "Canceled request").await?;
    b.click("#run-resume").await?;
    b.wait_visible_text("#run-action-note", "nothing to resume")
        .await?;
    b.wait_visible_text("#run-status", "WAITING_APPROVAL")
        .await?;
    b.click("#run-cancel").await?;
    b.wait_visible_text("#run-status", "CANCELED").await?;
    b.wait_visible_text(
        &format!("[data-testid='run-item'][data-run-id='{canceled}']"),
        "(CANCELED)",
    )
    .await?;
    b.wait_js(
        "cancel to be disabled on a canceled run",
        "return document.querySelector('#run-cancel').disabled",
    )
    .await?;
    // The three runs are listed, the completed one unchanged.
    let count = b
        .exec(
            "return document.querySelectorAll(\"[data-testid='run-item']\").length",
            json!([]),
        )
        .await?;
    ensure!(count == json!(3), "runs listed: {count}");
    b.wait_visible_text(
        &format!("[data-testid='run-item'][data-run-id='{first}']"),
        "(COMPLETED)",
    )
    .await?;
    let errors = b.shown_errors().await;
    ensure!(errors.is_empty(), "errors shown on the page: {errors}");
    Ok(())
}

/// A chromedriver process with one headless Chromium session.
struct Browser {
    http: reqwest::Client,
    driver: String,
    session: String,
    child: Child,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

impl Browser {
    async fn start() -> Result<Browser> {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            ensure!(
                Path::new(bin).exists(),
                "{bin} is missing: the console test needs Debian's `chromium` and `chromium-driver` \
                 packages (`apt-get install -y chromium chromium-driver`; .ci/run installs them)"
            );
        }
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("chromedriver.log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {CHROMEDRIVER}"))?;
        let mut browser = Browser {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            driver: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            child,
            dir,
        };
        let ready_by = Instant::now() + Duration::from_secs(30);
        loop {
            let status = browser
                .http
                .get(format!("{}/status", browser.driver))
                .send()
                .await;
            if let Ok(r) = status {
                let body: Value = r.json().await.unwrap_or_default();
                if body["value"]["ready"] == json!(true) {
                    break;
                }
            }
            if let Some(exit) = browser.child.try_wait()? {
                bail!(
                    "chromedriver exited at start ({exit}); log: {}",
                    log.display()
                );
            }
            ensure!(
                Instant::now() < ready_by,
                "chromedriver not ready on port {port} after 30 s; log: {}",
                log.display()
            );
            sleep(Duration::from_millis(100)).await;
        }
        let profile = browser.dir.path().join("profile");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1440,1600",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        } } });
        let url = format!("{}/session", browser.driver);
        let session = browser.request(Method::POST, &url, Some(caps)).await?;
        browser.session = session["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {session}"))?
            .to_string();
        Ok(browser)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chromedriver.log")
    }

    async fn request(&self, method: Method, url: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.http.request(method.clone(), url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("WebDriver {method} {url}"))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("WebDriver {method} {url}: body is not JSON"))?;
        if !status.is_success() {
            bail!(
                "WebDriver {method} {url}: {status}: {} {}",
                body["value"]["error"],
                body["value"]["message"]
            );
        }
        Ok(body["value"].clone())
    }

    async fn session(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}/session/{}{path}", self.driver, self.session);
        self.request(method, &url, body).await
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.session(Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    async fn exec(&self, script: &str, args: Value) -> Result<Value> {
        self.session(
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    async fn find(&self, css: &str) -> Result<String> {
        let v = self
            .session(
                Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no element reference for {css}: {v}"))
    }

    /// Retry an element action a little: the page re-renders as events arrive.
    async fn on_element(&self, css: &str, action: &str, body: Value) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = async {
                let id = self.find(css).await?;
                self.session(
                    Method::POST,
                    &format!("/element/{id}/{action}"),
                    Some(body.clone()),
                )
                .await
            }
            .await;
            match attempt {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= until => {
                    return Err(e.context(format!("{action} on {css}")))
                }
                Err(_) => sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn click(&self, css: &str) -> Result<()> {
        self.on_element(css, "click", json!({})).await
    }

    async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        self.on_element(css, "clear", json!({})).await?;
        self.on_element(css, "value", json!({ "text": text })).await
    }

    async fn text(&self, css: &str) -> Result<String> {
        let v = self
            .exec(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
                json!([css]),
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no element {css}"))
    }

    /// Poll a script until it returns a truthy value, which is returned.
    async fn wait_js(&self, what: &str, script: &str) -> Result<Value> {
        self.wait_js_args(what, script, json!([])).await
    }

    async fn wait_js_args(&self, what: &str, script: &str, args: Value) -> Result<Value> {
        let until = Instant::now() + DEADLINE;
        loop {
            let last = match self.exec(script, args.clone()).await {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => v.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= until {
                bail!(
                    "waited {} s for {what}; last result: {last}",
                    DEADLINE.as_secs()
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_visible(&self, css: &str) -> Result<Value> {
        self.wait_js_args(
            &format!("{css} to be visible"),
            "const e = document.querySelector(arguments[0]); return !!e && e.checkVisibility()",
            json!([css]),
        )
        .await
    }

    /// Wait until the element is visible and its text contains `needle`; returns the text.
    async fn wait_visible_text(&self, css: &str, needle: &str) -> Result<String> {
        let v = self
            .wait_js_args(
                &format!("{css} to show {needle:?}"),
                "const e = document.querySelector(arguments[0]); \
                 return e && e.checkVisibility() && e.textContent.includes(arguments[1]) \
                     ? e.textContent : null",
                json!([css, needle]),
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    async fn wait_selected(&self, css: &str, label: &str) -> Result<Value> {
        self.wait_js_args(
            &format!("{css} to select {label:?}"),
            "const s = document.querySelector(arguments[0]); \
             return !!s && s.value !== '' && s.selectedOptions[0].textContent === arguments[1]",
            json!([css, label]),
        )
        .await
    }

    async fn save_screenshot(&self, path: &Path) -> Result<()> {
        let v = self.session(Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(
            v.as_str()
                .ok_or_else(|| anyhow!("screenshot is not a string"))?,
        )?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    async fn failure_screenshot(&self, name: &str) -> Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/console-screenshots")
            .join(format!("{name}-{stamp}.png"));
        self.save_screenshot(&path).await?;
        Ok(path)
    }

    /// The error boxes the page shows, one per line ("" when none).
    async fn shown_errors(&self) -> String {
        self.exec(
            "return [...document.querySelectorAll('.error')] \
               .filter(e => !e.hidden && e.textContent) \
               .map(e => (e.id || e.dataset.testid) + ': ' + e.textContent).join('\\n')",
            json!([]),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "(page not readable)".to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // End the session so chromedriver closes Chromium; blocking is fine in a test.
            let addr = self.driver.trim_start_matches("http://").to_string();
            let _ = delete_session(&addr, &self.session);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn delete_session(addr: &str, session: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        stream,
        "DELETE /session/{session} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    Ok(())
}
