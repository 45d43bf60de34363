//! What the console's integration tests share: a real `ferry-console` process with its
//! own directory and a user, a small HTTP/1.1 client (for the console's forms, and for
//! chromedriver's WebDriver protocol), a WebDriver session on Debian's headless Chromium,
//! and a real SMTP server ([`smtp`]). Everything is killed on Drop.

#![allow(dead_code)]

pub mod smtp;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::bin_dir;
use ferry_testkit::host::Host;
use serde_json::{json, Value};

/// The console user the tests log in as.
pub const USER: &str = "admin";
/// Its password.
pub const PASSWORD: &str = "correct horse battery";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    ferry_testkit::replication::free_port("127.0.0.1")
        .parse()
        .expect("a port number")
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    exchange(s, addr, method, path, headers, body)
}

/// The same from a chosen source address (e.g. `127.0.0.2`: every 127/8 address is this
/// machine's, so a test can be a peer other than 127.0.0.1).
pub fn http_from(
    source: &str,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        sock.connect(addr.parse().unwrap())
            .await
            .unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"))
            .into_std()
            .unwrap()
    });
    s.set_nonblocking(false).unwrap();
    exchange(s, addr, method, path, headers, body)
}

fn exchange(
    mut s: TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    // Read to the end of the answer, not of the connection: chromedriver keeps it open.
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"));
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if answer_complete(&raw) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn answer_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// `application/x-www-form-urlencoded` of pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                ferry_client::percent_encode(k),
                ferry_client::percent_encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A running ferry-console.
pub struct Console {
    /// Its directory (config, store, log).
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    child: Child,
}

impl Console {
    /// Writes a config polling every `poll_s` seconds, creates the test user, starts it.
    pub fn start(poll_s: u64) -> Self {
        Self::start_with(poll_s, "")
    }

    /// The same, with `extra` appended to the config (e.g. an `[auth]` table).
    pub fn start_with(poll_s: u64, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferry-console-")
            .tempdir_in("/tmp")
            .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("console.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{}\"\npoll_interval_s = {poll_s}\n{extra}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let exe = bin_dir().join("ferry-console");
        assert!(
            exe.is_file(),
            "{} missing: cargo build --workspace --bins",
            exe.display()
        );
        let mut set = Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .args(["set-password", USER])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        set.stdin
            .take()
            .unwrap()
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .unwrap();
        assert!(set.wait().unwrap().success(), "set-password failed");
        let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let child = Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .env("FERRY_LOG", "info,ferry_console=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Self { dir, addr, child };
        wait_until("the console to listen", Duration::from_secs(20), || {
            TcpStream::connect(&c.addr).is_ok()
        });
        c
    }

    /// The console's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("console.toml")
    }

    /// Logs in with the form; returns the `Cookie` header value.
    pub fn login(&self) -> String {
        let a = http(
            &self.addr,
            "POST",
            "/login",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            &form(&[("user", USER), ("password", PASSWORD)]),
        );
        assert_eq!(a.status, 303, "login: {a:?}");
        let cookie = a.header("set-cookie").expect("a session cookie");
        cookie.split(';').next().unwrap().to_owned()
    }

    /// GET a page with the session; panics unless 200.
    pub fn get(&self, cookie: &str, path: &str) -> String {
        let a = http(&self.addr, "GET", path, &[("Cookie", cookie)], "");
        assert_eq!(a.status, 200, "GET {path}: {a:?}");
        a.body
    }

    /// POST a form with the session; returns where it redirects (with its flash message).
    pub fn post(&self, cookie: &str, path: &str, pairs: &[(&str, &str)]) -> String {
        let a = http(
            &self.addr,
            "POST",
            path,
            &[
                ("Cookie", cookie),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form(pairs),
        );
        assert_eq!(a.status, 303, "POST {path}: {a:?}");
        a.header("location").unwrap_or_default().to_owned()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- ferry-console log ---\n{}", self.log());
        }
    }
}

/// Polls `pred` every 500 ms; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Adds `host` to the console by its URL, fingerprint and token.
pub fn host_form(host: &Host) -> (String, String, String) {
    let (token, fp) = host.credentials();
    (format!("https://{}", host.tls_addr), fp, token)
}

/// The test guest VM on `host`, started and writing.
pub fn start_guest(host: &Host, vm: &str, seed: u64) {
    use ferry_testkit::guest::{parse_console, GuestWorkload};
    host.create_guest_vm(
        vm,
        GuestWorkload {
            seed,
            start: 1,
            span_blocks: 2048,
        },
        0.2,
        &["--memory", "256M", "--disk", "32M"],
    );
    host.ferry_ok(&["vm", "start", vm]);
    host.wait_console(vm, Duration::from_secs(90), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 1
    });
}

/// chromedriver driving Debian's headless Chromium.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session (fails loudly if either is
    /// missing: scripts/install-deps.sh installs them).
    pub fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver, installed by scripts/install-deps.sh)");
        let addr = format!("127.0.0.1:{port}");
        wait_until("chromedriver", Duration::from_secs(20), || {
            TcpStream::connect(&addr).is_ok()
        });
        let mut b = Self {
            driver,
            addr,
            session: String::new(),
        };
        let v = b.call(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1400,1100"]
                }
            }}}),
        );
        b.session = v["sessionId"].as_str().expect("a session id").to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let a = http(
            &self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
        );
        let v: Value = serde_json::from_str(&a.body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: bad JSON ({e}): {}", a.body));
        assert!(a.status == 200, "WebDriver {method} {path}: {}", a.body);
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens a URL.
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), json!({ "url": url }));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", &self.s("/url"), json!({}))
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The element matching `css` (panics if none).
    pub fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            &self.s("/element"),
            json!({"using": "css selector", "value": css}),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_owned()
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.call(
            "POST",
            &self.s("/elements"),
            json!({"using": "css selector", "value": css}),
        )
        .as_array()
        .map_or(0, Vec::len)
    }

    /// Types into the element matching `css` (after clearing it).
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call("POST", &self.s(&format!("/element/{e}/clear")), json!({}));
        self.call(
            "POST",
            &self.s(&format!("/element/{e}/value")),
            json!({ "text": text }),
        );
    }

    /// Runs `js` (a function body) in the page; its return value.
    pub fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            json!({ "script": js, "args": [] }),
        )
    }

    /// Clicks a checkbox (or anything that does not leave the page).
    pub fn check(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &self.s(&format!("/element/{e}/click")), json!({}));
    }

    /// Clicks the element matching `css` (a link or a submit button) and waits for the
    /// page it leads to: WebDriver's click may return before a form's navigation ends.
    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.script("window.__ferryOldPage = true;");
        self.call("POST", &self.s(&format!("/element/{e}/click")), json!({}));
        wait_until(
            &format!("the page after clicking {css}"),
            Duration::from_secs(90),
            || {
                self.script(
                "return window.__ferryOldPage === undefined && document.readyState === 'complete';",
            ) == Value::Bool(true)
            },
        );
    }

    /// Selects the `<option>` with visible text `label` in the `<select>` matching `css`.
    pub fn select(&self, css: &str, label: &str) {
        let sel = self.find(css);
        let opts = self.call(
            "POST",
            &self.s(&format!("/element/{sel}/elements")),
            json!({"using": "css selector", "value": "option"}),
        );
        for o in opts.as_array().unwrap() {
            let id = o
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .as_str()
                .unwrap();
            let text = self.call("GET", &self.s(&format!("/element/{id}/text")), json!({}));
            if text.as_str() == Some(label) {
                self.call("POST", &self.s(&format!("/element/{id}/click")), json!({}));
                return;
            }
        }
        panic!("no option {label} in {css}");
    }

    /// Types `text` as real key presses into whatever has the focus (WebDriver actions:
    /// keydown/keyup events as a keyboard makes them, not a value set on an input).
    /// `\n` is the Enter key.
    pub fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            let key = if c == '\n' { '\u{E007}' } else { c }.to_string();
            actions.push(json!({"type": "keyDown", "value": key}));
            actions.push(json!({"type": "keyUp", "value": key}));
        }
        self.call(
            "POST",
            &self.s("/actions"),
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        );
    }

    /// The visible text of the element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &self.s(&format!("/element/{e}/text")), json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The action's success message, or a panic with its error.
    pub fn flash_ok(&self) -> String {
        if self.count("#flash-ok") == 0 {
            let err = if self.count("#flash-err") > 0 {
                self.text("#flash-err")
            } else {
                self.source()
            };
            panic!("the action failed on {}: {err}", self.url());
        }
        self.text("#flash-ok")
    }

    /// The page's HTML.
    pub fn source(&self) -> String {
        self.call("GET", &self.s("/source"), json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Reloads `url` until the text of `css` satisfies `pred`; returns that text.
    pub fn wait_text(
        &self,
        url: &str,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.goto(url);
            let text = if self.count(css) > 0 {
                self.text(css)
            } else {
                String::new()
            };
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out on {url}: {css} is {text:?}"
            );
            std::thread::sleep(Duration::from_millis(1000));
        }
    }

    /// Saves a PNG screenshot of the window.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &self.s("/screenshot"), json!({}));
        let png = base64_decode(b64.as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG", "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(&self.addr, "DELETE", &self.s(""), &[], "");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk.iter().fold(0u32, |acc, &c| {
            (acc << 6) | if c == b'=' { 0 } else { val(c) }
        }) << (6 * (4 - chunk.len()));
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..3 - pad]);
    }
    out
}

/// Where screenshots go: `FERRY_SCREENSHOTS` (e.g. docs/screenshots when refreshing the
/// committed ones), else the console's temp dir.
pub fn screenshot_dir(console: &Console) -> PathBuf {
    match std::env::var_os("FERRY_SCREENSHOTS") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => console.dir.path().to_path_buf(),
    }
}
