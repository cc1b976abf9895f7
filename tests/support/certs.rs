//! Certificates for the TLS tests against real PostgreSQL and Redis: a CA
//! of the test's own, and a server certificate it signs for `127.0.0.1`
//! and `localhost`, as PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    dir: tempfile::TempDir,
    /// The server certificate and its key, PEM.
    pub server_cert: String,
    pub server_key: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tollgate test CA {name}"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let server_cert = server.signed_by(&key, &ca).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self {
            dir,
            server_cert,
            server_key: key.serialize_pem(),
        }
    }

    /// The CA's certificate, the file a client trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server's certificate and key written under `dir` as
    /// `server.crt` and `server.key` (readable by the owner only, as
    /// PostgreSQL wants its key); their paths.
    pub fn write_server_files(&self, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        std::fs::write(&cert, &self.server_cert).unwrap();
        std::fs::write(&key, &self.server_key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }
}
