//! The rustls server configuration a crossing session needs.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// A rustls server configuration whose sessions can cross an upgrade.
///
/// [`Config::new`] and [`Config::from_pem_files`] build one with what that
/// takes:
///
/// * **TLS 1.3 only.** A TLS 1.2 session's records are framed and numbered
///   differently; this layer carries TLS 1.3 sessions.
/// * **TLS_AES_256_GCM_SHA384 and TLS_CHACHA20_POLY1305_SHA256.** rustls
///   lets a key be rebuilt from its bytes (in the next image) only at 32
///   bytes, which leaves out TLS_AES_128_GCM_SHA256.
/// * **Secret extraction on** (`enable_secret_extraction`), which rustls's
///   `kernel` API needs to hand the session's keys over.
/// * **Record ciphers from rustls's ring provider**, the rest (key exchange
///   with post-quantum hybrids, signatures) from its default, aws-lc-rs:
///   aws-lc-rs's AES-GCM cannot resume at a sequence number other than 0.
/// * **No session tickets**: a resumption would need the ticket keys of an
///   earlier image.
#[derive(Clone, Debug)]
pub struct Config {
    server: Arc<ServerConfig>,
}

impl Config {
    /// A configuration serving `certs` (the chain, leaf first) with `key`.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if rustls refuses the certificate or the key.
    pub fn new(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Config, TlsError> {
        let provider = Arc::new(provider());
        let refused = |e: rustls::Error| TlsError::Config {
            reason: e.to_string(),
        };
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(refused)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(refused)?;
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        Ok(Config {
            server: Arc::new(server),
        })
    }

    /// A configuration from PEM files: the certificate chain (leaf first)
    /// and its private key.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] naming the file that cannot be read or holds no
    /// certificate or key.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Config, TlsError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Config {
                reason: format!("reading certificates from {}: {e}", cert.display()),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Config {
                reason: format!("{} holds no PEM certificate", cert.display()),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Config {
            reason: format!("reading a private key from {}: {e}", key.display()),
        })?;
        Config::new(certs, key)
    }

    /// A configuration the application built itself. Its sessions cross
    /// only if they are TLS 1.3 with a 32-byte key (see [`Config`]).
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if `enable_secret_extraction` is off, or if the
    /// provider has TLS 1.2 suites (a TLS 1.2 session cannot cross: better
    /// refused here than a client dropped after its handshake).
    pub fn from_rustls(server: Arc<ServerConfig>) -> Result<Config, TlsError> {
        if let Some(suite) = server
            .crypto_provider()
            .cipher_suites
            .iter()
            .find(|s| s.version().version != rustls::ProtocolVersion::TLSv1_3)
        {
            return Err(TlsError::Config {
                reason: format!(
                    "the provider offers {:?}, a TLS 1.2 suite; only TLS 1.3 sessions cross an upgrade, so offer TLS 1.3 suites only",
                    suite.suite()
                ),
            });
        }
        if !server.enable_secret_extraction {
            return Err(TlsError::Config {
                reason: "enable_secret_extraction is off; set it to true so that the session's keys can cross an upgrade".into(),
            });
        }
        Ok(Config { server })
    }

    /// The rustls configuration.
    pub fn rustls(&self) -> &Arc<ServerConfig> {
        &self.server
    }
}

/// rustls's default provider (aws-lc-rs: post-quantum hybrid key exchange,
/// signatures, randomness) with the record ciphers of its ring provider.
///
/// aws-lc-rs seals TLS 1.3 AES-GCM records with a key that takes the nonce
/// of its first record for sequence number 0 and refuses any nonce that
/// does not grow from there: a session resumed at sequence number 1,000
/// would fail on its second record. ring's AEADs take each nonce as given.
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256],
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}
