//! Delivery of alert transitions: e-mail over SMTP (STARTTLS, implicit TLS or plain, with
//! optional AUTH) through `lettre`, and a JSON webhook (HTTP POST). Each attempt's outcome
//! is returned so the caller can record it; a failed delivery is not retried in a loop
//! (the alerts page shows it), so a dead mail server cannot cause a storm either.

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

    /// Checks the values; the error is one line.
    pub fn validate(&self) -> Result<(), String> {
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
            parse_http_url(&self.webhook_url)?;
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
        let r = tokio::time::timeout(DELIVERY_TIMEOUT, post_webhook(&settings.webhook_url, &body))
            .await;
        out.push(Outcome {
            channel: "webhook",
            error: match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("timed out".into()),
            },
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

/// POSTs `body` as JSON; any 2xx answer is success.
pub async fn post_webhook(url: &str, body: &serde_json::Value) -> Result<(), String> {
    let (addr, host, path) = parse_http_url(url)?;
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("webhook {addr}: {e}"))?;
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
    let _ = resp.into_body().collect().await;
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
        let mut s = ChannelSettings {
            smtp_host: "localhost".into(),
            smtp_port: 587,
            smtp_security: "starttls".into(),
            mail_from: "ferry@example.org".into(),
            mail_to: vec!["ops@example.org".into()],
            ..ChannelSettings::default()
        };
        assert!(s.validate().is_ok());
        s.mail_to = vec!["not an address".into()];
        assert!(s.validate().unwrap_err().starts_with("recipient"));
        s.mail_to = vec![];
        assert!(s.validate().unwrap_err().contains("at least one recipient"));
        // A password in clear text is refused, except to this machine.
        s.mail_to = vec!["ops@example.org".into()];
        s.smtp_security = "none".into();
        s.smtp_username = "ferry".into();
        assert!(s.validate().is_ok());
        s.smtp_host = "mail.example.org".into();
        assert!(s.validate().unwrap_err().contains("clear text"));
        s.smtp_username.clear();
        assert!(s.validate().is_ok());
    }
}
