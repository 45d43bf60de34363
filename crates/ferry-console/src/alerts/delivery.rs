//! Delivery of alert transitions: e-mail over SMTP (STARTTLS, implicit TLS or plain, with
//! optional AUTH) through `lettre`, and a JSON webhook (HTTP POST). Each attempt's outcome
//! is returned so the caller can record it; a failed delivery is not retried in a loop
//! (the alerts page shows it), so a dead mail server cannot cause a storm either.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use super::rules::{Transition, TransitionKind};

/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a webhook's answer is read: only its status matters, and a receiver must
/// not make the console read (or wait for) an endless body.
const WEBHOOK_BODY_LIMIT: usize = 64 * 1024;

/// Internal networks a webhook may target anyway (`webhook_allow` in the console's
/// config). Everything else that is loopback, link-local, private or reserved is
/// refused, so whoever edits the alert settings cannot make the console send requests
/// into the networks it can reach (cloud metadata at 169.254.169.254, local services).
#[derive(Debug, Clone, Default)]
pub struct WebhookAllow(pub Vec<crate::config::Net>);

/// Why `ip` is not a public address, if it is not.
pub fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            match o {
                [127, ..] => Some("a loopback"),
                [0, ..] => Some("an unspecified"),
                [169, 254, ..] => Some("a link-local"),
                [10, ..] | [192, 168, ..] => Some("a private"),
                [172, b, ..] if (16..32).contains(&b) => Some("a private"),
                [100, b, ..] if (64..128).contains(&b) => Some("a shared (carrier NAT)"),
                [192, 0, 0, _] => Some("a reserved"),
                [198, 18 | 19, ..] => Some("a reserved (benchmarking)"),
                [a, ..] if a >= 224 => Some("a multicast or reserved"),
                _ => None,
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("a loopback")
            } else if v6.is_unspecified() {
                Some("an unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("a link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("a site-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("a unique local (private)")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("a multicast")
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64: the IPv4 address inside is where the request goes.
                let v4 = std::net::Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                );
                internal_kind(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

impl WebhookAllow {
    /// `Err` (one line) if `ip` is internal and not allowed.
    fn check(&self, url: &str, ip: IpAddr) -> Result<(), String> {
        match internal_kind(ip) {
            Some(kind) if !self.0.iter().any(|n| n.contains(ip)) => Err(format!(
                "webhook URL {url:?}: {ip} is {kind} address; refused unless listed in webhook_allow in the console's config"
            )),
            _ => Ok(()),
        }
    }
}

/// Where alerts go (stored in the console's store; the SMTP password is a secret kept
/// there and never shown back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelSettings {
    /// SMTP server host name (empty: no e-mail).
    pub smtp_host: String,
    /// SMTP port (587 for STARTTLS, 465 for implicit TLS, 25 plain).
    pub smtp_port: u16,
    /// `starttls` (required), `tls` (implicit) or `none` (trusted local relay only).
    pub smtp_security: String,
    /// AUTH user (empty: no AUTH).
    pub smtp_username: String,
    /// AUTH password.
    pub smtp_password: String,
    /// PEM file of an extra CA to trust for the SMTP server (besides the system's).
    pub smtp_ca_file: String,
    /// Sender address.
    pub mail_from: String,
    /// Recipients.
    pub mail_to: Vec<String>,
    /// `http://…` URL to POST a JSON document to (empty: no webhook).
    pub webhook_url: String,
}

impl ChannelSettings {
    /// These settings with only `channel` (`email` or `webhook`) enabled, to send again to
    /// the one channel that failed.
    pub fn only(&self, channel: &str) -> ChannelSettings {
        let mut s = self.clone();
        match channel {
            "email" => s.webhook_url.clear(),
            _ => s.smtp_host.clear(),
        }
        s
    }

    /// Checks the values, including where the webhook's host name resolves now (it is
    /// checked again at each delivery); the error is one line.
    pub fn validate(&self, allow: &WebhookAllow) -> Result<(), String> {
        if !self.smtp_host.is_empty() {
            if self.smtp_port == 0 {
                return Err("SMTP port: use 1 to 65535".into());
            }
            if !["starttls", "tls", "none"].contains(&self.smtp_security.as_str()) {
                return Err(format!(
                    "SMTP security {:?}: use starttls, tls or none",
                    self.smtp_security
                ));
            }
            // A password sent without TLS is readable on the way, except to this machine.
            let loopback = self.smtp_host == "localhost"
                || self
                    .smtp_host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if self.smtp_security == "none" && !self.smtp_username.is_empty() && !loopback {
                return Err(format!(
                    "SMTP security none would send the password for {} in clear text to {}: use starttls or tls",
                    self.smtp_username, self.smtp_host
                ));
            }
            self.mail_from
                .parse::<Mailbox>()
                .map_err(|e| format!("sender {:?}: {e}", self.mail_from))?;
            if self.mail_to.is_empty() {
                return Err("e-mail alerts need at least one recipient".into());
            }
            for to in &self.mail_to {
                to.parse::<Mailbox>()
                    .map_err(|e| format!("recipient {to:?}: {e}"))?;
            }
            if !self.smtp_ca_file.is_empty() {
                let pem = std::fs::read(&self.smtp_ca_file)
                    .map_err(|e| format!("SMTP CA file {}: {e}", self.smtp_ca_file))?;
                Certificate::from_pem(&pem)
                    .map_err(|e| format!("SMTP CA file {}: {e}", self.smtp_ca_file))?;
            }
        }
        if !self.webhook_url.is_empty() {
            let (addr, _, _) = parse_http_url(&self.webhook_url)?;
            let lookup = || std::net::ToSocketAddrs::to_socket_addrs(&addr);
            // A name lookup blocks: on the server's (multi-threaded) runtime it runs with
            // this worker handed over, so other requests go on meanwhile.
            let on_workers = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let resolved: Vec<SocketAddr> = if on_workers {
                tokio::task::block_in_place(lookup)
            } else {
                lookup()
            }
            .map_err(|e| format!("webhook URL {:?}: {e}", self.webhook_url))?
            .collect();
            for a in resolved {
                allow.check(&self.webhook_url, a.ip())?;
            }
        }
        Ok(())
    }
}

/// `(host:port, host, path)` of an `http://` URL.
fn parse_http_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("webhook URL {url:?}: use http://HOST[:PORT]/PATH (https is not supported yet)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("webhook URL {url:?}: no host"));
    }
    let addr = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_owned(), path.to_owned()))
}

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `email` or `webhook`.
    pub channel: &'static str,
    /// Error, if it failed.
    pub error: Option<String>,
}

/// The mail's subject and body for a transition.
pub fn mail_text(t: &Transition, alert_id: i64, console_url: &str) -> (String, String) {
    let c = &t.condition;
    let (tag, verb) = match t.kind {
        TransitionKind::Start => ("ALERT", "started"),
        TransitionKind::Clear => ("CLEARED", "cleared"),
    };
    let subject = format!(
        "[ferry] {tag}: {}{} ({})",
        c.vm.as_deref()
            .map(|v| format!("{v}: "))
            .unwrap_or_default(),
        c.rule,
        c.host
    );
    let what = match t.kind {
        TransitionKind::Start => c.message.clone(),
        TransitionKind::Clear => format!("The condition is gone. Last seen: {}", c.message),
    };
    let body = format!(
        "Alert #{alert_id} {verb} at {} UTC.\n\nRule: {}\nHost: {}\nVM: {}\n\n{what}\n\nAlerts: {console_url}/alerts\n",
        crate::web::fmt_time(t.at),
        c.rule,
        c.host,
        c.vm.as_deref().unwrap_or("-"),
    );
    (subject, body)
}

/// The webhook's JSON document for a transition.
pub fn webhook_body(t: &Transition, alert_id: i64) -> serde_json::Value {
    let c = &t.condition;
    serde_json::json!({
        "event": match t.kind { TransitionKind::Start => "alert_started", TransitionKind::Clear => "alert_cleared" },
        "alert_id": alert_id,
        "rule": c.rule,
        "host": c.host,
        "vm": c.vm,
        "message": c.message,
        "at": t.at,
    })
}

/// Sends `t` on every configured channel.
pub async fn deliver(
    settings: &ChannelSettings,
    t: &Transition,
    alert_id: i64,
    console_url: &str,
    allow: &WebhookAllow,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    if !settings.smtp_host.is_empty() {
        let (subject, body) = mail_text(t, alert_id, console_url);
        let r = tokio::time::timeout(DELIVERY_TIMEOUT, send_mail(settings, &subject, &body)).await;
        out.push(Outcome {
            channel: "email",
            error: match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("timed out".into()),
            },
        });
    }
    if !settings.webhook_url.is_empty() {
        let body = webhook_body(t, alert_id);
        let r = post_webhook(&settings.webhook_url, &body, allow, DELIVERY_TIMEOUT).await;
        out.push(Outcome {
            channel: "webhook",
            error: r.err(),
        });
    }
    out
}

/// Sends one mail to every recipient.
pub async fn send_mail(s: &ChannelSettings, subject: &str, body: &str) -> Result<(), String> {
    let mut msg = Message::builder()
        .from(s.mail_from.parse().map_err(|e| format!("sender: {e}"))?)
        .subject(subject);
    for to in &s.mail_to {
        msg = msg.to(to.parse().map_err(|e| format!("recipient {to}: {e}"))?);
    }
    let msg = msg
        .body(body.to_owned())
        .map_err(|e| format!("cannot build the mail: {e}"))?;
    let tls_params = || -> Result<TlsParameters, String> {
        let mut b = TlsParameters::builder(s.smtp_host.clone());
        if !s.smtp_ca_file.is_empty() {
            let pem = std::fs::read(&s.smtp_ca_file)
                .map_err(|e| format!("SMTP CA file {}: {e}", s.smtp_ca_file))?;
            b = b.add_root_certificate(
                Certificate::from_pem(&pem).map_err(|e| format!("SMTP CA file: {e}"))?,
            );
        }
        b.build().map_err(|e| format!("TLS setup: {e}"))
    };
    let tls = match s.smtp_security.as_str() {
        "starttls" => Tls::Required(tls_params()?),
        "tls" => Tls::Wrapper(tls_params()?),
        _ => Tls::None,
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.smtp_host)
        .port(s.smtp_port)
        .tls(tls)
        .timeout(Some(DELIVERY_TIMEOUT));
    if !s.smtp_username.is_empty() {
        transport = transport.credentials(Credentials::new(
            s.smtp_username.clone(),
            s.smtp_password.clone(),
        ));
    }
    transport
        .build()
        .send(msg)
        .await
        .map(drop)
        .map_err(|e| format!("SMTP {}:{}: {e}", s.smtp_host, s.smtp_port))
}

/// POSTs `body` as JSON; any 2xx answer is success. The host is resolved once and
/// every address it resolves to is checked against [`WebhookAllow`] before connecting to
/// one of those same addresses (a name cannot resolve to a public address when checked
/// and to an internal one when used); at most [`WEBHOOK_BODY_LIMIT`] of the answer is
/// read, and the whole exchange ends after `timeout`.
pub async fn post_webhook(
    url: &str,
    body: &serde_json::Value,
    allow: &WebhookAllow,
    timeout: Duration,
) -> Result<(), String> {
    tokio::time::timeout(timeout, post_webhook_inner(url, body, allow))
        .await
        .unwrap_or_else(|_| Err(format!("webhook {url}: timed out after {timeout:?}")))
}

async fn post_webhook_inner(
    url: &str,
    body: &serde_json::Value,
    allow: &WebhookAllow,
) -> Result<(), String> {
    let (addr, host, path) = parse_http_url(url)?;
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(&addr)
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?
        .collect();
    for a in &resolved {
        allow.check(url, a.ip())?;
    }
    let target = resolved
        .first()
        .ok_or_else(|| format!("webhook {addr}: the name has no address"))?;
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?;
    // The connection task ends when `sender` and the body are dropped.
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "ferry-console")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("webhook request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?;
    let status = resp.status();
    let mut answer = resp.into_body();
    let mut read = 0usize;
    while read < WEBHOOK_BODY_LIMIT {
        match answer.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
            // Only the status matters: a broken body after it changes nothing.
            Some(Err(_)) | None => break,
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook {url} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_and_channel_settings_validate() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:9000/hook").unwrap(),
            (
                "127.0.0.1:9000".into(),
                "127.0.0.1:9000".into(),
                "/hook".into()
            )
        );
        assert_eq!(
            parse_http_url("http://example.org").unwrap().0,
            "example.org:80"
        );
        assert!(parse_http_url("ftp://x")
            .unwrap_err()
            .contains("use http://"));
        let none = WebhookAllow::default();
        let mut s = ChannelSettings {
            smtp_host: "localhost".into(),
            smtp_port: 587,
            smtp_security: "starttls".into(),
            mail_from: "ferry@example.org".into(),
            mail_to: vec!["ops@example.org".into()],
            ..ChannelSettings::default()
        };
        assert!(s.validate(&none).is_ok());
        s.mail_to = vec!["not an address".into()];
        assert!(s.validate(&none).unwrap_err().starts_with("recipient"));
        s.mail_to = vec![];
        assert!(s
            .validate(&none)
            .unwrap_err()
            .contains("at least one recipient"));
        // A password in clear text is refused, except to this machine.
        s.mail_to = vec!["ops@example.org".into()];
        s.smtp_security = "none".into();
        s.smtp_username = "ferry".into();
        assert!(s.validate(&none).is_ok());
        s.smtp_host = "mail.example.org".into();
        assert!(s.validate(&none).unwrap_err().contains("clear text"));
        s.smtp_username.clear();
        assert!(s.validate(&none).is_ok());
    }

    #[test]
    fn internal_addresses_are_named() {
        for (ip, kind) in [
            ("127.0.0.1", Some("a loopback")),
            ("::1", Some("a loopback")),
            ("::ffff:127.0.0.1", Some("a loopback")),
            ("169.254.169.254", Some("a link-local")),
            ("fe80::1", Some("a link-local")),
            ("10.1.2.3", Some("a private")),
            ("172.16.0.1", Some("a private")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("a private")),
            ("100.64.0.1", Some("a shared (carrier NAT)")),
            ("fd00::1", Some("a unique local (private)")),
            ("0.0.0.0", Some("an unspecified")),
            ("::", Some("an unspecified")),
            ("255.255.255.255", Some("a multicast or reserved")),
            ("64:ff9b::a9fe:a9fe", Some("a link-local")),
            ("93.184.216.34", None),
            ("2606:4700::1111", None),
        ] {
            assert_eq!(internal_kind(ip.parse().unwrap()), kind, "{ip}");
        }
    }

    #[test]
    fn internal_webhook_targets_are_refused_unless_allowed() {
        let none = WebhookAllow::default();
        let hook = |url: &str| ChannelSettings {
            webhook_url: url.into(),
            ..ChannelSettings::default()
        };
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://localhost:9000/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]:80/",
            "http://10.1.2.3/hook",
            "http://[::ffff:192.168.0.1]/",
        ] {
            let e = hook(url).validate(&none).unwrap_err();
            assert!(e.contains("webhook_allow"), "{url}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // A public address passes (a literal: no name service needed).
        assert!(hook("http://93.184.216.34/hook").validate(&none).is_ok());
        // Listed networks pass, others stay refused.
        let allow = WebhookAllow(vec![
            crate::config::Net::parse("127.0.0.1").unwrap(),
            crate::config::Net::parse("10.1.0.0/16").unwrap(),
        ]);
        assert!(hook("http://127.0.0.1:9000/hook").validate(&allow).is_ok());
        assert!(hook("http://10.1.2.3/hook").validate(&allow).is_ok());
        assert!(hook("http://10.2.0.1/hook").validate(&allow).is_err());
        assert!(hook("http://169.254.169.254/").validate(&allow).is_err());
    }

    /// A receiver on 127.0.0.1 that answers each connection with `answer` (None: says
    /// nothing); returns its address and whether a write failed (the console hung up).
    fn receiver(
        answer: Option<&'static str>,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hung_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = hung_up.clone();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            match answer {
                None => std::thread::sleep(Duration::from_secs(30)),
                Some(head) => {
                    c.write_all(head.as_bytes()).unwrap();
                    // An endless chunked body, 16 KiB a chunk.
                    let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                    while c.write_all(chunk.as_bytes()).is_ok() {}
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        (addr, hung_up)
    }

    #[tokio::test]
    async fn webhook_answers_are_read_up_to_a_limit_and_time_out() {
        let local = WebhookAllow(vec![crate::config::Net::parse("127.0.0.1").unwrap()]);
        let body = serde_json::json!({"event": "test"});
        // An endless 200 answer: success, after reading at most the limit.
        let (addr, hung_up) = receiver(Some(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ));
        let t = std::time::Instant::now();
        let url = format!("http://{addr}/hook");
        post_webhook(&url, &body, &local, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        for _ in 0..50 {
            if hung_up.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(hung_up.load(std::sync::atomic::Ordering::SeqCst));
        // An endless 500 answer is a failure, also bounded.
        let (addr, _) = receiver(Some(
            "HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n",
        ));
        let e = post_webhook(
            &format!("http://{addr}/"),
            &body,
            &local,
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(e.contains("answered 500"), "{e}");
        // A receiver that never answers is given up on.
        let (addr, _) = receiver(None);
        let e = post_webhook(
            &format!("http://{addr}/"),
            &body,
            &local,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        // Without the allow-list the same receiver is not even connected to.
        let (addr, _) = receiver(None);
        let e = post_webhook(
            &format!("http://{addr}/"),
            &body,
            &WebhookAllow::default(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.contains("a loopback address"), "{e}");
    }
}
