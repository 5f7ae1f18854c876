//! The record layer of an established TLS 1.3 session: framing, and the
//! sequence numbers. Sealing and opening are rustls's: the negotiated
//! suite's `Tls13AeadAlgorithm`, from the crypto provider.

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, Tls13CipherSuite};
use serde::{Deserialize, Serialize};

use super::TlsError;

/// The largest plaintext of one record (RFC 8446, 5.1).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest ciphertext of one record: the plaintext, its content type
/// and padding, and the AEAD's tag (RFC 8446, 5.2).
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A record's header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;

/// A key, overwritten with zeros when dropped.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the zeroing from being optimised away as a dead store.
        std::hint::black_box(&self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// One direction's keys and next sequence number, as they cross an upgrade.
#[derive(Serialize, Deserialize, Debug, Default)]
pub(crate) struct SavedDirection {
    key: Secret,
    iv: Secret,
    seq: u64,
}

/// The traffic keys of a session, by its cipher suite.
pub(crate) struct Keys {
    key: Secret,
    iv: Secret,
}

impl Keys {
    /// The key and IV of a secret rustls gave (at the handshake's end, or
    /// at a key update).
    /// Also gives the key and IV back to build the cipher with.
    fn from_rustls(secrets: ConnectionTrafficSecrets) -> Result<(Keys, AeadKey, Iv), TlsError> {
        let (key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            // Non-exhaustive: a suite a later rustls adds.
            _ => {
                return Err(TlsError::Unsupported {
                    reason: "rustls gave keys of a kind this version does not know".into(),
                });
            }
        };
        let keys = Keys {
            key: Secret(key.as_ref().to_vec()),
            iv: Secret(iv.as_ref().to_vec()),
        };
        Ok((keys, key, iv))
    }

    /// The key and IV as rustls's ciphers take them. rustls builds an
    /// [`AeadKey`] from outside the crate only at its full 32 bytes, so a
    /// suite with a shorter key (AES-128-GCM) cannot be rebuilt here.
    fn to_rustls(&self, suite: &Tls13CipherSuite) -> Result<(AeadKey, Iv), TlsError> {
        let name = suite.common.suite;
        let key: [u8; 32] = self.key.0.as_slice().try_into().map_err(|_| {
            TlsError::Unsupported {
                reason: format!(
                    "{name:?} has a {}-byte key, and rustls rebuilds only 32-byte keys from outside; \
                     offer TLS13_AES_256_GCM_SHA384 or TLS13_CHACHA20_POLY1305_SHA256 (copyover::tls::Config does)",
                    self.key.0.len()
                ),
            }
        })?;
        if suite.aead_alg.key_len() != key.len() {
            return Err(TlsError::Unsupported {
                reason: format!("{name:?} does not take a 32-byte key"),
            });
        }
        let mut key = key;
        let aead = AeadKey::from(key);
        key.fill(0);
        std::hint::black_box(&key);
        let iv: [u8; 12] = self
            .iv
            .0
            .as_slice()
            .try_into()
            .map_err(|_| TlsError::Unsupported {
                reason: format!("{name:?} does not take a 12-byte IV"),
            })?;
        Ok((aead, Iv::from(iv)))
    }
}

/// One direction of a session: its cipher, its keys (kept to cross an
/// upgrade) and the sequence number of its next record.
struct Direction<C: ?Sized> {
    cipher: Box<C>,
    keys: Keys,
    seq: u64,
}

impl<C: ?Sized> Direction<C> {
    fn save(&self) -> SavedDirection {
        SavedDirection {
            key: Secret(self.keys.key.0.clone()),
            iv: Secret(self.keys.iv.0.clone()),
            seq: self.seq,
        }
    }
}

/// What one opened record holds.
///
/// It is opened in place: its plaintext is `received[payload]`, and the
/// record is the first `consumed` bytes of `received`, to drain once the
/// plaintext is used.
pub(crate) struct Opened {
    pub(crate) typ: ContentType,
    pub(crate) payload: std::ops::Range<usize>,
    pub(crate) consumed: usize,
}

/// The record layer of one established session.
pub(crate) struct Records {
    suite: &'static Tls13CipherSuite,
    tx: Direction<dyn MessageEncrypter>,
    rx: Direction<dyn MessageDecrypter>,
}

impl Records {
    /// The record layer after the handshake, from the secrets rustls gave.
    pub(crate) fn new(
        suite: &'static Tls13CipherSuite,
        tx: (u64, ConnectionTrafficSecrets),
        rx: (u64, ConnectionTrafficSecrets),
    ) -> Result<Records, TlsError> {
        let (keys_tx, tx_key, tx_iv) = Keys::from_rustls(tx.1)?;
        let (keys_rx, rx_key, rx_iv) = Keys::from_rustls(rx.1)?;
        Ok(Records {
            suite,
            tx: Direction {
                cipher: suite.aead_alg.encrypter(tx_key, tx_iv),
                keys: keys_tx,
                seq: tx.0,
            },
            rx: Direction {
                cipher: suite.aead_alg.decrypter(rx_key, rx_iv),
                keys: keys_rx,
                seq: rx.0,
            },
        })
    }

    /// The record layer a previous image saved.
    pub(crate) fn restore(
        suite: &'static Tls13CipherSuite,
        tx: SavedDirection,
        rx: SavedDirection,
    ) -> Result<Records, TlsError> {
        let keys_tx = Keys {
            key: tx.key,
            iv: tx.iv,
        };
        let keys_rx = Keys {
            key: rx.key,
            iv: rx.iv,
        };
        let (tx_key, tx_iv) = keys_tx.to_rustls(suite)?;
        let (rx_key, rx_iv) = keys_rx.to_rustls(suite)?;
        Ok(Records {
            suite,
            tx: Direction {
                cipher: suite.aead_alg.encrypter(tx_key, tx_iv),
                keys: keys_tx,
                seq: tx.seq,
            },
            rx: Direction {
                cipher: suite.aead_alg.decrypter(rx_key, rx_iv),
                keys: keys_rx,
                seq: rx.seq,
            },
        })
    }

    pub(crate) fn suite(&self) -> &'static Tls13CipherSuite {
        self.suite
    }

    /// Both directions' keys and sequence numbers, to cross an upgrade.
    /// Refused for a suite the next image could not rebuild.
    pub(crate) fn save(&self) -> Result<(SavedDirection, SavedDirection), TlsError> {
        self.tx.keys.to_rustls(self.suite)?;
        Ok((self.tx.save(), self.rx.save()))
    }

    /// The next records to send may number `n` more before the suite's
    /// confidentiality limit.
    pub(crate) fn records_left(&self) -> u64 {
        self.suite
            .common
            .confidentiality_limit
            .saturating_sub(self.tx.seq)
    }

    /// New keys for sending (after our key update), numbered from 0.
    pub(crate) fn rekey_tx(
        &mut self,
        secrets: (u64, ConnectionTrafficSecrets),
    ) -> Result<(), TlsError> {
        let (keys, key, iv) = Keys::from_rustls(secrets.1)?;
        self.tx.keys = keys;
        self.tx.cipher = self.suite.aead_alg.encrypter(key, iv);
        self.tx.seq = secrets.0;
        Ok(())
    }

    /// New keys for receiving (after the peer's key update), numbered from 0.
    pub(crate) fn rekey_rx(
        &mut self,
        secrets: (u64, ConnectionTrafficSecrets),
    ) -> Result<(), TlsError> {
        let (keys, key, iv) = Keys::from_rustls(secrets.1)?;
        self.rx.keys = keys;
        self.rx.cipher = self.suite.aead_alg.decrypter(key, iv);
        self.rx.seq = secrets.0;
        Ok(())
    }

    /// Seals `plain` as records of type `typ` onto `out`, at most
    /// [`MAX_PLAINTEXT`] bytes each.
    pub(crate) fn seal(
        &mut self,
        typ: ContentType,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            let msg = OutboundPlainMessage {
                typ,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(chunk),
            };
            let sealed =
                self.tx
                    .cipher
                    .encrypt(msg, self.tx.seq)
                    .map_err(|e| TlsError::Protocol {
                        reason: format!("sealing a record failed: {e}"),
                    })?;
            self.tx.seq += 1;
            let record = sealed.encode();
            if out.is_empty() {
                // Nothing pending: the record's own buffer, not a copy.
                *out = record;
            } else {
                out.extend_from_slice(&record);
            }
        }
        Ok(())
    }

    /// Opens the first whole record at the front of `received`, in place;
    /// `None` while only part of one has arrived.
    pub(crate) fn open(&mut self, received: &mut [u8]) -> Option<Result<Opened, TlsError>> {
        let len = whole_record(received)?;
        Some(self.open_record(received, len))
    }

    fn open_record(&mut self, received: &mut [u8], len: usize) -> Result<Opened, TlsError> {
        if len > MAX_CIPHERTEXT {
            return Err(protocol(format!(
                "a record of {len} bytes, over the limit of {MAX_CIPHERTEXT}"
            )));
        }
        if received.len() < HEADER + len {
            return Err(protocol("a record cut short".into()));
        }
        let typ = ContentType::from(received[0]);
        if typ != ContentType::ApplicationData {
            return Err(protocol(format!(
                "an unprotected {typ:?} record after the handshake"
            )));
        }
        let version = ProtocolVersion::from(u16::from_be_bytes([received[1], received[2]]));
        let base = received.as_ptr() as usize;
        let msg = InboundOpaqueMessage::new(typ, version, &mut received[HEADER..HEADER + len]);
        let plain = self
            .rx
            .cipher
            .decrypt(msg, self.rx.seq)
            .map_err(|e| protocol(format!("a record did not open ({e})")))?;
        self.rx.seq += 1;
        // Decrypted in place: the plaintext is a part of the record.
        let start = (plain.payload.as_ptr() as usize).wrapping_sub(base);
        let end = start.wrapping_add(plain.payload.len());
        if start < HEADER || end > HEADER + len || start > end {
            return Err(protocol(
                "the provider's decrypter did not open the record in place".into(),
            ));
        }
        Ok(Opened {
            typ: plain.typ,
            payload: start..end,
            consumed: HEADER + len,
        })
    }
}

/// The length of the first record in `received` once it is whole (or its
/// header says it is too long), else `None`.
pub(crate) fn whole_record(received: &[u8]) -> Option<usize> {
    if received.len() < HEADER {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([received[3], received[4]]));
    (len > MAX_CIPHERTEXT || received.len() >= HEADER + len).then_some(len)
}

fn protocol(reason: String) -> TlsError {
    TlsError::Protocol { reason }
}
