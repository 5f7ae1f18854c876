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

    /// A configuration the application built itself, checked for what a
    /// crossing session needs (see [`Config`]): better refused here than a
    /// client dropped after its handshake or at an upgrade.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if `enable_secret_extraction` is off, if the
    /// provider has a TLS 1.2 suite, a suite whose key is not 32 bytes, or
    /// a cipher that cannot seal a record at any sequence number (each is
    /// tried from 1,000 on: aws-lc-rs's AES-GCM fails this), or if early
    /// data is on.
    pub fn from_rustls(server: Arc<ServerConfig>) -> Result<Config, TlsError> {
        for suite in &server.crypto_provider().cipher_suites {
            // Refutable when some crate enables rustls's `tls12` feature.
            #[allow(irrefutable_let_patterns)]
            if let rustls::SupportedCipherSuite::Tls13(suite) = suite {
                crosses(suite).map_err(|reason| TlsError::Config { reason })?;
            }
        }
        if server.max_early_data_size > 0 {
            return Err(TlsError::Config {
                reason: "early data (max_early_data_size) is on; a session's early data cannot cross an upgrade, so set it to 0".into(),
            });
        }
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

/// Whether records of `suite` can be sealed at any sequence number, as a
/// session carried on after an upgrade needs: a 32-byte key (the only
/// length rustls rebuilds a key at from outside), and a cipher that seals
/// from sequence number 1,000 on as well as from 0.
fn crosses(suite: &rustls::Tls13CipherSuite) -> Result<(), String> {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    let name = suite.common.suite;
    let len = suite.aead_alg.key_len();
    if len != 32 {
        return Err(format!(
            "{name:?} has a {len}-byte key, and rustls rebuilds only 32-byte keys from outside: offer TLS13_AES_256_GCM_SHA384 or TLS13_CHACHA20_POLY1305_SHA256"
        ));
    }
    let mut sealer = suite
        .aead_alg
        .encrypter(AeadKey::from([0x5a; 32]), Iv::from([0xa5; 12]));
    for seq in 1000..1064 {
        let msg = OutboundPlainMessage {
            typ: rustls::ContentType::ApplicationData,
            version: rustls::ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(b"copyover"),
        };
        sealer.encrypt(msg, seq).map_err(|e| {
            format!(
                "{name:?}'s cipher in this provider cannot seal at sequence number {seq} after starting at 1000 ({e}), so a session cannot carry on after an upgrade; use rustls's ring provider's cipher suites (copyover::tls::Config::new does)"
            )
        })?;
    }
    Ok(())
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
