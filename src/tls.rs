//! TLS as the gateway speaks it as a client, to backends, PostgreSQL and
//! Redis: whose certificates it trusts. A server's certificate is always
//! verified, and its name checked, against the system's roots or against
//! the CA bundle the operator names; no setting accepts one unverified,
//! since credentials, prompts, spend and budgets travel over these
//! connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConfigBuilder};
use rustls_platform_verifier::BuilderVerifierExt;

/// TLS as one client speaks it: whose certificates it trusts, and the
/// certificate it shows a server that asks for one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub roots: Roots,
    /// Boxed: rare, and a config's tables hold a client's TLS each.
    pub identity: Option<Box<Identity>>,
}

/// The certificates a server's chain must end in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Roots {
    /// The system's trusted roots.
    #[default]
    System,
    /// Only the CA certificates in this PEM file (a private CA, or a
    /// cloud's database CA bundle).
    File(CaFile),
}

/// A PEM file of CA certificates, read and checked to hold at least one.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaFile").field(&self.path).finish()
    }
}

impl CaFile {
    /// Reads `path`; the error says what is wrong with the file, for the
    /// field that names it.
    pub fn read(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        let file = Self {
            path: path.to_owned(),
            pem: pem.into(),
        };
        file.certificates()?;
        Ok(file)
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        certificates("CA file", &self.path, &self.pem)
    }
}

/// The certificates a PEM file holds: at least one.
fn certificates(
    what: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{what} {} holds no certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// A client certificate (its chain) and its private key, for a server
/// that asks for one: mutual TLS. The key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: Arc<[u8]>,
    pub key_pem: Arc<[u8]>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Identity")
            .field(&self.cert_path)
            .field(&self.key_path)
            .finish()
    }
}

impl Identity {
    /// Reads a certificate file and its key file, checked to hold a
    /// certificate and the private key that goes with it.
    pub fn read(cert: &Path, key: &Path) -> Result<Self, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
        };
        let identity = Self {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            cert_pem: read("certificate file", cert)?.into(),
            key_pem: read("key file", key)?.into(),
        };
        let trial = ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty());
        identity.shown_by(trial)?;
        Ok(identity)
    }

    /// The config `builder` makes, showing this certificate to a server
    /// that asks.
    fn shown_by(
        &self,
        builder: ConfigBuilder<ClientConfig, WantsClientCert>,
    ) -> Result<ClientConfig, String> {
        let chain = certificates("certificate file", &self.cert_path, &self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| {
            format!(
                "key file {} holds no private key in PEM: {e}",
                self.key_path.display()
            )
        })?;
        builder.with_client_auth_cert(chain, key).map_err(|e| {
            format!(
                "key file {} does not go with certificate file {}: {e}",
                self.key_path.display(),
                self.cert_path.display()
            )
        })
    }
}

impl ClientTls {
    /// A client config that verifies a server's certificate against its
    /// roots, and shows its identity to a server that asks.
    pub fn config(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder();
        let builder = match &self.roots {
            Roots::System => builder
                .with_platform_verifier()
                .map_err(|e| format!("the system's trusted roots: {e}"))?,
            Roots::File(file) => {
                let mut store = rustls::RootCertStore::empty();
                for certificate in file.certificates()? {
                    store.add(certificate).map_err(|e| {
                        format!("CA file {}: a certificate: {e}", file.path.display())
                    })?;
                }
                builder.with_root_certificates(store)
            }
        };
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some(identity) => identity.shown_by(builder),
        }
    }
}

/// A CA file holding one certificate, written at `path`, for tests.
#[cfg(test)]
pub(crate) fn write_test_ca(path: &Path) {
    let pem = rcgen::generate_simple_self_signed(["db.internal".to_owned()])
        .unwrap()
        .cert
        .pem();
    std::fs::write(path, pem).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = CaFile::read(&missing).unwrap_err();
        assert!(error.starts_with("cannot read CA file"), "{error}");
        assert!(error.contains("missing.pem"), "{error}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = CaFile::read(&empty).unwrap_err();
        assert!(error.contains("holds no certificate"), "{error}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = CaFile::read(&broken).unwrap_err();
        assert!(error.contains("is not PEM"), "{error}");
    }

    #[test]
    fn the_systems_roots_and_a_ca_files_make_a_config_with_an_identity_or_none() {
        ClientTls::default().config().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_test_ca(&path);
        let roots = Roots::File(CaFile::read(&path).unwrap());
        let tls = ClientTls {
            roots,
            identity: None,
        };
        tls.config().unwrap();

        let made = rcgen::generate_simple_self_signed(["client".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let identity = Identity::read(&cert, &key).unwrap();
        assert!(!format!("{identity:?}").contains("PRIVATE"), "{identity:?}");
        ClientTls {
            identity: Some(Box::new(identity)),
            ..tls
        }
        .config()
        .unwrap();
        let error = Identity::read(&cert, &cert).unwrap_err();
        assert!(error.contains("holds no private key"), "{error}");
        let error = Identity::read(&key, &key).unwrap_err();
        assert!(error.contains("holds no certificate"), "{error}");
        let other = rcgen::generate_simple_self_signed(["other".to_owned()]).unwrap();
        let other_key = dir.path().join("other.pem");
        std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
        let error = Identity::read(&cert, &other_key).unwrap_err();
        assert!(
            error.contains("does not go with certificate file"),
            "{error}"
        );
    }
}
