//! Certificates for the TLS tests against real PostgreSQL and Redis and
//! the mock upstreams: a CA of the test's own, a server certificate it
//! signs for `127.0.0.1` and `localhost`, and a client certificate for the
//! user `tollgate`, as PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    dir: tempfile::TempDir,
    /// The server certificate and its key, PEM.
    pub server_cert: String,
    pub server_key: String,
}

/// How a test's server speaks TLS, with the server certificate a
/// `TestCa` signed.
#[derive(Clone, Copy)]
pub enum ServerTls<'a> {
    /// Beside plaintext; a client shows no certificate.
    Server(&'a TestCa),
    /// Beside plaintext; a TLS client must show a certificate the CA
    /// signed (mutual TLS).
    ClientsCertified(&'a TestCa),
}

impl<'a> ServerTls<'a> {
    pub fn ca(self) -> &'a TestCa {
        match self {
            Self::Server(ca) | Self::ClientsCertified(ca) => ca,
        }
    }

    pub fn clients_certified(self) -> bool {
        matches!(self, Self::ClientsCertified(_))
    }
}

/// What a client signed by a `TestCa` shows: its certificate and key files.
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
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
        // The client: PostgreSQL's `cert` authentication takes its user
        // from the common name.
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "tollgate");
        let client_cert = client.signed_by(&client_key, &ca).unwrap().pem();
        std::fs::write(dir.path().join("client.pem"), client_cert).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
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

    /// The client certificate (common name `tollgate`) and its key.
    pub fn client(&self) -> ClientFiles {
        ClientFiles {
            cert: self.dir.path().join("client.pem"),
            key: self.dir.path().join("client.key"),
        }
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
