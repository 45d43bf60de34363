//! A real SMTP server for the alert tests: Debian's aiosmtpd (`tests/support/smtp_server.py`),
//! requiring STARTTLS and AUTH, with a certificate from a CA the test makes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::wait_until;

/// Writes `ca.pem` (a CA the console is told to trust), and `cert.pem` and `key.pem` (the
/// SMTP server's, for 127.0.0.1, signed by it) into `dir`.
pub fn smtp_certificates(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

/// The SMTP server process; killed on Drop.
pub struct SmtpServer {
    child: Child,
    /// Every mail accepted, as the script printed it.
    pub mails: Arc<Mutex<Vec<Value>>>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SmtpServer {
    /// Starts the script on 127.0.0.1:`port` with this certificate, user `ferry` and
    /// password `mail-secret`.
    pub fn start(port: u16, cert: &str, key: &str) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_server.py");
        // Debian's python3: aiosmtpd comes from its package (scripts/install-deps.sh).
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .args([&port.to_string(), cert, key, "ferry", "mail-secret"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3");
        let stdout = child.stdout.take().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let m = mails.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = ready_tx.send(());
                } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    m.lock().unwrap().push(v);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("aiosmtpd did not start (python3-aiosmtpd from scripts/install-deps.sh)");
        Self { child, mails }
    }

    /// The subjects of the mails so far.
    pub fn subjects(&self) -> Vec<String> {
        self.mails
            .lock()
            .unwrap()
            .iter()
            .map(|m| m["subject"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits for a mail whose subject contains `what`; returns it.
    pub fn wait_subject(&self, what: &str, timeout: Duration) -> Value {
        wait_until(&format!("a mail {what:?}"), timeout, || {
            self.subjects().iter().any(|s| s.contains(what))
        });
        self.mails
            .lock()
            .unwrap()
            .iter()
            .find(|m| m["subject"].as_str().unwrap_or_default().contains(what))
            .cloned()
            .unwrap()
    }
}
