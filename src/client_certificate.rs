//! Client certificates for mutual TLS to receivers: the `kubernetes.io/tls` Secret an endpoint
//! names in `spec.clientCertificate.secretName`, judged the same way by the controller (which
//! reports it in the `ClientCertificateReady` condition) and the dispatcher (which presents it,
//! and sends nothing while it cannot). Shared, so neither imports the other.
//!
//! What is wrong is said without any of the Secret's bytes.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The only Secret type accepted.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// Data key of the certificate chain (PEM), end-entity certificate first.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Data key of the private key (PEM).
pub const TLS_KEY_KEY: &str = "tls.key";

/// Why a client certificate cannot be presented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No Secret of that name in the endpoint's namespace.
    #[error("Secret {0} does not exist in the endpoint's namespace")]
    Missing(String),
    /// The Secret is of another type.
    #[error("Secret {name} is of type {found:?}, not {TLS_SECRET_TYPE}")]
    NotTls {
        /// The Secret's name.
        name: String,
        /// Its type (empty when unset).
        found: String,
    },
    /// The certificate or key cannot be read, or they do not belong together.
    #[error("Secret {name} does not hold a usable certificate and key: {reason}")]
    Malformed {
        /// The Secret's name.
        name: String,
        /// What is wrong, never a byte of the key.
        reason: String,
    },
}

impl Problem {
    /// The condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::Missing(_) => "ClientCertificateMissing",
            Problem::NotTls { .. } => "ClientCertificateNotTLS",
            Problem::Malformed { .. } => "ClientCertificateMalformed",
        }
    }
}

/// A client certificate and its key, checked to belong together, as the PEM the HTTP client takes.
/// `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pem: Arc<Vec<u8>>,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientIdentity(sha256 {:02x?}..)", &self.fingerprint[..4])
    }
}

impl ClientIdentity {
    /// Certificate chain then key, PEM (what `reqwest::Identity::from_pem` reads).
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// SHA-256 of [`Self::pem`]: one HTTP client per distinct identity is keyed by it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Checks a certificate chain and key (PEM): at least one certificate, one private key that
    /// the crypto provider can load, and that key matching the first certificate.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("{TLS_CERT_KEY} is not PEM"))?;
        if chain.is_empty() {
            return Err(format!("{TLS_CERT_KEY} holds no certificate"));
        }
        let private =
            PrivateKeyDer::from_pem_slice(key).map_err(|_| format!("{TLS_KEY_KEY} holds no PEM private key"))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("{TLS_KEY_KEY} is not the key of the certificate in {TLS_CERT_KEY}")
            }
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                format!("{TLS_CERT_KEY} is not a valid X.509 certificate")
            }
            _ => format!("{TLS_KEY_KEY} is not a supported private key"),
        })?;
        let mut pem = Vec::with_capacity(cert.len() + key.len() + 1);
        pem.extend_from_slice(cert);
        if !cert.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend_from_slice(key);
        let fingerprint = Sha256::digest(&pem).into();
        Ok(Self {
            pem: Arc::new(pem),
            fingerprint,
        })
    }
}

/// Judges the Secret named `name` (`None`: it does not exist) as a client certificate.
pub fn identity_from_secret(name: &str, secret: Option<&Secret>) -> Result<ClientIdentity, Problem> {
    let secret = secret.ok_or_else(|| Problem::Missing(name.to_string()))?;
    let found = secret.type_.clone().unwrap_or_default();
    if found != TLS_SECRET_TYPE {
        return Err(Problem::NotTls {
            name: name.to_string(),
            found,
        });
    }
    let get = |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let malformed = |reason: String| Problem::Malformed {
        name: name.to_string(),
        reason,
    };
    let cert = get(TLS_CERT_KEY).ok_or_else(|| malformed(format!("{TLS_CERT_KEY} is missing")))?;
    let key = get(TLS_KEY_KEY).ok_or_else(|| malformed(format!("{TLS_KEY_KEY} is missing")))?;
    ClientIdentity::from_pem(cert, key).map_err(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            type_: Some(type_.to_string()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn missing_other_types_and_garbage_are_refused_with_their_reason() {
        assert_eq!(
            identity_from_secret("c", None).unwrap_err().reason(),
            "ClientCertificateMissing"
        );
        let opaque = secret("Opaque", &[(TLS_CERT_KEY, b"x"), (TLS_KEY_KEY, b"y")]);
        let err = identity_from_secret("c", Some(&opaque)).unwrap_err();
        assert_eq!(err.reason(), "ClientCertificateNotTLS");
        assert!(err.to_string().contains("\"Opaque\""), "{err}");
        let no_key = secret(TLS_SECRET_TYPE, &[(TLS_CERT_KEY, b"x")]);
        let err = identity_from_secret("c", Some(&no_key)).unwrap_err();
        assert_eq!(err.reason(), "ClientCertificateMalformed");
        assert!(err.to_string().contains("tls.key is missing"), "{err}");
        let secret_bytes = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n";
        let garbage = secret(
            TLS_SECRET_TYPE,
            &[(TLS_CERT_KEY, b"not pem"), (TLS_KEY_KEY, secret_bytes)],
        );
        let err = identity_from_secret("c", Some(&garbage)).unwrap_err();
        assert_eq!(err.reason(), "ClientCertificateMalformed");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    }

    fn issued() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_with_its_own_key_is_an_identity_and_with_another_key_is_not() {
        let (cert, key) = issued();
        let (_, other_key) = issued();
        let good = secret(
            TLS_SECRET_TYPE,
            &[(TLS_CERT_KEY, cert.as_bytes()), (TLS_KEY_KEY, key.as_bytes())],
        );
        let identity = identity_from_secret("c", Some(&good)).unwrap();
        assert!(identity.pem().starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{identity:?}").contains("PRIVATE"));
        // The same bytes are the same identity (one HTTP client), other bytes another.
        assert_eq!(
            identity.fingerprint(),
            identity_from_secret("c", Some(&good)).unwrap().fingerprint()
        );
        let mismatched = secret(
            TLS_SECRET_TYPE,
            &[(TLS_CERT_KEY, cert.as_bytes()), (TLS_KEY_KEY, other_key.as_bytes())],
        );
        let err = identity_from_secret("c", Some(&mismatched)).unwrap_err();
        assert_eq!(err.reason(), "ClientCertificateMalformed");
        assert!(err.to_string().contains("not the key of the certificate"), "{err}");
    }
}
