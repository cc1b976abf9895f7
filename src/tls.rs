//! TLS as the gateway speaks it as a client, to backends, PostgreSQL and
//! Redis: whose certificates it trusts. A server's certificate is always
//! verified, and its name checked, against the system's roots or against
//! the CA bundle the operator names; no setting accepts one unverified,
//! since credentials, prompts, spend and budgets travel over these
//! connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls_platform_verifier::BuilderVerifierExt;

/// The certificates a server's chain must end in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The system's trusted roots.
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
        let certificates = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CA file {} is not PEM: {e}", self.path.display()))?;
        if certificates.is_empty() {
            return Err(format!(
                "CA file {} holds no certificate (-----BEGIN CERTIFICATE-----)",
                self.path.display()
            ));
        }
        Ok(certificates)
    }
}

impl Roots {
    /// A client config that verifies a server's certificate against these
    /// roots.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder();
        let builder = match self {
            Self::System => builder
                .with_platform_verifier()
                .map_err(|e| format!("the system's trusted roots: {e}"))?,
            Self::File(file) => {
                let mut store = rustls::RootCertStore::empty();
                for certificate in file.certificates()? {
                    store.add(certificate).map_err(|e| {
                        format!("CA file {}: a certificate: {e}", file.path.display())
                    })?;
                }
                builder.with_root_certificates(store)
            }
        };
        Ok(builder.with_no_client_auth())
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
    fn the_systems_roots_and_a_ca_files_make_a_config() {
        Roots::System.client_config().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_test_ca(&path);
        Roots::File(CaFile::read(&path).unwrap())
            .client_config()
            .unwrap();
    }
}
