//! The test organization's certificate authority. Every test host's certificate is issued
//! by it, as an administrator would issue them from the organization's CA, so a replica
//! server can accept "any primary of ours" (`--allow-any --trust-ca`) the way a real site
//! does. Ferryd's own default, a self-signed certificate, is what `Host::configure_self_signed`
//! keeps: such a host is never "any authenticated primary".

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA: its certificate (PEM) and what signs with it.
pub struct TestCa {
    /// The CA certificate, PEM (what `--trust-ca` is given).
    pub pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_owned());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// Issues a host certificate for `host_name` and writes `host.crt` and `host.key` into
    /// `data_dir` (ferryd's identity files; it uses them instead of making its own).
    pub fn issue_host(&self, host_name: &str, data_dir: &Path) {
        let mut params = CertificateParams::new(vec!["ferryd".to_owned(), host_name.to_owned()])
            .expect("host params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ferryd {host_name}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("host key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("issue host certificate");
        std::fs::create_dir_all(data_dir).expect("data dir");
        for (file, pem) in [("host.key", key.serialize_pem()), ("host.crt", cert.pem())] {
            let path = data_dir.join(file);
            std::fs::write(&path, pem).expect("write identity");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod identity");
        }
    }
}

/// The CA of this test process (each test runs in its own process under nextest).
pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new("Ferry test organization CA"))
}
