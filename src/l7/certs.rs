//! Route certificates: a PEM chain and its key, read and checked.
//!
//! Owns the rules a route certificate must pass (SPEC §6.2): the files are
//! readable PEM, every certificate of the chain parses as X.509, the key is
//! one the ring provider can sign with and it matches the leaf. A chain that
//! is only a leaf not signed by itself passes with a warning flag: some
//! clients will fail without the intermediate, and that must be said, not
//! found out by users. Never keeps anything on failure: a file that fails
//! here replaces nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A route certificate that passed every check.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// The chain is one certificate, not self-signed: clients that don't
    /// already hold its intermediate will fail (log a warning).
    pub leaf_only: bool,
}

/// Which file a [`CertError`] is about: the config key / API field it names
/// is `tls_cert` or `tls_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    Cert,
    Key,
}

impl CertFile {
    pub fn field(self) -> &'static str {
        match self {
            CertFile::Cert => "tls_cert",
            CertFile::Key => "tls_key",
        }
    }
}

/// Why a certificate or key was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        file: CertFile,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate {index} of the chain does not parse: {reason}", path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{} holds no PEM private key: {reason}", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("{}: unsupported private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

impl CertError {
    /// The file at fault (`tls_cert` or `tls_key`).
    pub fn file(&self) -> CertFile {
        match self {
            CertError::Read { file, .. } => *file,
            CertError::NoCertificate { .. } | CertError::BadCertificate { .. } => CertFile::Cert,
            CertError::NoKey { .. } | CertError::BadKey { .. } | CertError::KeyMismatch { .. } => {
                CertFile::Key
            }
        }
    }
}

/// Files larger than this are not certificates (refused unread).
const MAX_PEM_FILE: u64 = 1 << 20;

fn read_limited(path: &Path, file: CertFile) -> Result<Vec<u8>, CertError> {
    let fail = |source| CertError::Read {
        path: path.to_path_buf(),
        file,
        source,
    };
    let meta = std::fs::metadata(path).map_err(fail)?;
    if !meta.is_file() {
        return Err(fail(io::Error::other("not a regular file")));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(fail(io::Error::other(format!(
            "larger than {MAX_PEM_FILE} bytes"
        ))));
    }
    std::fs::read(path).map_err(fail)
}

/// Reads and checks a route's certificate chain and key.
pub fn load(cert: &Path, key: &Path) -> Result<LoadedCert, CertError> {
    let cert_pem = read_limited(cert, CertFile::Cert)?;
    let key_pem = read_limited(key, CertFile::Key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: cert.to_path_buf(),
            index: 0,
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let mut leaf_self_signed = false;
    for (index, der) in chain.iter().enumerate() {
        let (_, parsed) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::BadCertificate {
                path: cert.to_path_buf(),
                index,
                reason: e.to_string(),
            })?;
        if index == 0 {
            leaf_self_signed = parsed.issuer().as_raw() == parsed.subject().as_raw();
        }
    }
    let leaf_only = chain.len() == 1 && !leaf_self_signed;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::NoKey {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| CertError::BadKey {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(CertError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        leaf_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    fn ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert, rcgen::Issuer::new(params, key))
    }

    fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a.test");
        (params.signed_by(&key, issuer).unwrap(), key)
    }

    #[test]
    fn a_chain_with_its_key_loads_and_a_leaf_alone_is_flagged() {
        let files = Files::new();
        let (ca_cert, issuer) = ca();
        let (leaf_cert, leaf_key) = leaf(&issuer);
        let chain = files.write("chain.pem", &(leaf_cert.pem() + &ca_cert.pem()));
        let alone = files.write("leaf.pem", &leaf_cert.pem());
        let key = files.write("key.pem", &leaf_key.serialize_pem());
        let loaded = load(&chain, &key).unwrap();
        assert_eq!(loaded.certified.cert.len(), 2);
        assert!(!loaded.leaf_only);
        assert!(load(&alone, &key).unwrap().leaf_only);

        // A self-signed certificate alone is not "leaf only".
        let own_key = rcgen::KeyPair::generate().unwrap();
        let own = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&own_key)
            .unwrap();
        let own_cert = files.write("own.pem", &own.pem());
        let own_key = files.write("own.key", &own_key.serialize_pem());
        assert!(!load(&own_cert, &own_key).unwrap().leaf_only);
    }

    #[test]
    fn broken_files_are_refused_naming_the_file() {
        let files = Files::new();
        let (ca_cert, issuer) = ca();
        let (leaf_cert, leaf_key) = leaf(&issuer);
        let (_, other_key) = leaf(&issuer);
        let chain = files.write("chain.pem", &(leaf_cert.pem() + &ca_cert.pem()));
        let key = files.write("key.pem", &leaf_key.serialize_pem());
        let wrong_key = files.write("wrong.pem", &other_key.serialize_pem());
        let empty = files.write("empty.pem", "");
        let garbage = files.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let missing = files.dir.path().join("missing.pem");

        let cases: [(&Path, &Path, CertFile, &str); 7] = [
            (&missing, &key, CertFile::Cert, "reading"),
            (&chain, &missing, CertFile::Key, "reading"),
            (&empty, &key, CertFile::Cert, "no PEM certificate"),
            (&garbage, &key, CertFile::Cert, "does not parse"),
            (&chain, &empty, CertFile::Key, "no PEM private key"),
            (&chain, &wrong_key, CertFile::Key, "does not match"),
            (files.dir.path(), &key, CertFile::Cert, "not a regular file"),
        ];
        for (cert, key, file, text) in cases {
            let err = load(cert, key).unwrap_err();
            assert_eq!(err.file(), file, "{err}");
            assert!(err.to_string().contains(text), "{err}");
        }
    }
}
