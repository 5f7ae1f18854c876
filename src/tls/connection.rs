//! One TLS 1.3 server connection, without I/O of its own: the application
//! owns the socket and moves bytes with [`Connection::read_tls`] and
//! [`Connection::write_tls`].

use std::io::{self, Read, Write};

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ContentType, SupportedCipherSuite};

use super::carry::{Saved, SavedSession};
use super::record::{MAX_CIPHERTEXT, Records};
use super::{Config, TlsError};

/// The most a client may send before its hello is answered (a hello with
/// post-quantum key shares is under 2 KiB).
const MAX_HELLO: usize = 64 * 1024;

/// TLS alert descriptions this layer sends (RFC 8446, 6).
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const USER_CANCELED: u8 = 90;
const INTERNAL_ERROR: u8 = 80;
/// The handshake message type of a key update (RFC 8446, 4.6.3).
const KEY_UPDATE: u8 = 24;

/// A TLS 1.3 server connection whose session can cross an upgrade.
///
/// rustls does the handshake. From its end on, records are sealed and
/// opened here with the negotiated suite's cipher from rustls's crypto
/// provider, so that the keys and sequence numbers are known and can be
/// carried ([`Carry`](super::Carry)).
///
/// The socket stays the application's, non-blocking, registered with its
/// event loop as any other:
///
/// * readable: [`read_tls`](Self::read_tls), then
///   [`process`](Self::process), which appends the plaintext that arrived;
/// * to send: [`write`](Self::write) the plaintext, then
///   [`write_tls`](Self::write_tls) while [`wants_write`](Self::wants_write)
///   (wait for writability when the socket is full).
///
/// A connection restored from a previous image moves nothing (seals,
/// opens, answers no hello) until this image calls
/// [`Copyover::ready`](crate::Copyover::ready): until then a rollback must
/// find the peer exactly where the snapshot left it. Plaintext written
/// meanwhile is queued and sealed after `ready`.
pub struct Connection {
    phase: Phase,
    /// Ciphertext received and not yet processed.
    received: Vec<u8>,
    /// Ciphertext not yet written to the socket.
    unsent: Vec<u8>,
    /// How much of `unsent` the socket has taken (moved out in bulk, not
    /// at every write: a slow reader's backlog is not copied again and
    /// again).
    sent: usize,
    /// Plaintext waiting for records to be sealed (during the handshake,
    /// or before `ready` in a new image).
    queued: Vec<u8>,
    /// Restored from a previous image: dormant until `ready`.
    restored: bool,
    /// `process` ran since `ready` (see `awaits_processing`).
    processed: bool,
    peer_closed: bool,
    /// `close` was called; `close_sent` once its close_notify is sealed.
    closing: bool,
    close_sent: bool,
}

enum Phase {
    Handshaking(Box<Handshake>),
    Established(Box<Established>),
    Failed,
}

struct Handshake {
    conn: UnbufferedServerConnection,
    /// Every byte received while nothing was answered: replayed by the
    /// next image if the connection crosses an upgrade at that point.
    hello: Vec<u8>,
    /// rustls has produced its first flight: the handshake cannot cross.
    answered: bool,
    /// Answer no hello yet (see [`Connection::hold`]).
    held: bool,
}

struct Established {
    records: Records,
    /// Derives new keys at a key update; gone after an upgrade (it cannot
    /// be carried: rustls keeps the traffic secrets private).
    kernel: Option<KernelConnection<ServerConnectionData>>,
}

impl Connection {
    /// A new connection on a freshly accepted socket.
    ///
    /// # Errors
    ///
    /// [`TlsError::Config`] if rustls refuses the configuration.
    pub fn accept(config: &Config) -> Result<Connection, TlsError> {
        let conn = UnbufferedServerConnection::new(config.rustls().clone()).map_err(|e| {
            TlsError::Config {
                reason: e.to_string(),
            }
        })?;
        Ok(Connection::in_phase(Phase::Handshaking(Box::new(
            Handshake {
                conn,
                hello: Vec::new(),
                answered: false,
                held: false,
            },
        ))))
    }

    /// A connection that failed: what a transport rebuilt without its TLS
    /// session holds (its reads and writes fail, and the client goes); also
    /// the start of a restored session, before its phase is set.
    pub(crate) fn failed() -> Connection {
        Connection::in_phase(Phase::Failed)
    }

    /// A connection in `phase`, with nothing buffered.
    fn in_phase(phase: Phase) -> Connection {
        Connection {
            phase,
            received: Vec::new(),
            unsent: Vec::new(),
            sent: 0,
            queued: Vec::new(),
            restored: false,
            processed: false,
            peer_closed: false,
            closing: false,
            close_sent: false,
        }
    }

    /// Reads once from `socket` into the connection: `Ok(0)` at the end
    /// of the stream, `WouldBlock` when nothing is there. Call
    /// [`process`](Self::process) after each read.
    ///
    /// A restored connection reads nothing before `ready` (`WouldBlock`):
    /// bytes taken from the socket by an image that then fails would be
    /// lost to the old one.
    pub fn read_tls(&mut self, socket: &mut impl Read) -> io::Result<usize> {
        if self.dormant() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let start = self.received.len();
        self.received.resize(start + MAX_CIPHERTEXT + 5, 0);
        let n = match socket.read(&mut self.received[start..]) {
            Ok(n) => n,
            Err(e) => {
                self.received.truncate(start);
                return Err(e);
            }
        };
        self.received.truncate(start + n);
        if let Phase::Handshaking(hs) = &mut self.phase
            && !hs.answered
        {
            if hs.hello.len() + n > MAX_HELLO {
                self.phase = Phase::Failed;
                return Err(io::Error::other(
                    "the client sent more than 64 KiB before its hello was answered",
                ));
            }
            hs.hello.extend_from_slice(&self.received[start..]);
        }
        Ok(n)
    }

    /// Processes what was received: moves the handshake on, opens every
    /// whole record and appends its plaintext to `plain`. Bytes of a
    /// record not yet whole stay for the next call (and cross an upgrade).
    ///
    /// # Errors
    ///
    /// The connection cannot go on (the handshake failed, a record did not
    /// open, the peer sent a fatal alert, a key update after an upgrade):
    /// write what [`wants_write`](Self::wants_write) still has (an alert,
    /// at best effort), then close the socket.
    pub fn process(&mut self, plain: &mut Vec<u8>) -> Result<(), TlsError> {
        if self.dormant() {
            return Ok(());
        }
        self.processed = true;
        if let Phase::Handshaking(hs) = &mut self.phase {
            match drive(hs, &mut self.received, &mut self.unsent, plain) {
                Ok(Driven::Waiting) => return Ok(()),
                Ok(Driven::PeerClosed) => {
                    self.peer_closed = true;
                    return Ok(());
                }
                Ok(Driven::Finished) => self.establish()?,
                Err(e) => {
                    self.phase = Phase::Failed;
                    return Err(e);
                }
            }
        }
        self.settle()?;
        let Phase::Established(est) = &mut self.phase else {
            return Err(TlsError::Failed);
        };
        let result = open_all(
            est,
            &mut self.received,
            &mut self.unsent,
            plain,
            &mut self.peer_closed,
        );
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Writes `plain` to the peer: sealed into records now, or queued until
    /// the handshake ends (or, in a new image, until `ready`).
    ///
    /// # Errors
    ///
    /// [`TlsError::Failed`] after a failure or [`close`](Self::close), and
    /// [`TlsError::KeysWornOut`].
    pub fn write(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        if self.closing || matches!(self.phase, Phase::Failed) {
            return Err(TlsError::Failed);
        }
        self.queued.extend_from_slice(plain);
        self.settle()
    }

    /// Ends the session: a close_notify follows whatever was written.
    pub fn close(&mut self) {
        self.closing = true;
        let _ = self.settle();
    }

    /// Writes pending ciphertext to `socket` once; `Ok(0)` if there was
    /// none.
    ///
    /// A restored connection writes nothing before `ready`: records the
    /// previous image sealed and did not send would go out twice if this
    /// image failed and the old one sent them again.
    pub fn write_tls(&mut self, socket: &mut impl Write) -> io::Result<usize> {
        if self.dormant() {
            return Ok(0);
        }
        if self.settle().is_err() && self.pending() == 0 {
            return Err(io::Error::other("the TLS connection failed"));
        }
        if self.pending() == 0 {
            return Ok(0);
        }
        let n = socket.write(&self.unsent[self.sent..])?;
        self.sent += n;
        if self.sent == self.unsent.len() {
            self.unsent.clear();
            self.sent = 0;
        } else if self.sent >= 64 * 1024 && self.sent * 2 >= self.unsent.len() {
            self.unsent.drain(..self.sent);
            self.sent = 0;
        }
        Ok(n)
    }

    /// Whether ciphertext waits for [`write_tls`](Self::write_tls).
    /// Nothing before `ready` in a restored connection.
    pub fn wants_write(&self) -> bool {
        if self.dormant() {
            return false;
        }
        self.pending() > 0
            || (self.may_seal() && (!self.queued.is_empty() || self.closing && !self.close_sent))
    }

    /// Whether sealed records wait to be written, even in a restored
    /// connection that may not write them yet: what an event loop whose
    /// registrations crossed the exec had asked for (EPOLLOUT) at the
    /// commit.
    pub fn has_unsent(&self) -> bool {
        self.pending() > 0
    }

    /// Whether a restored connection has not been processed since this
    /// image became ready: what crossed (a hello to answer, whole records,
    /// queued plaintext) waits for one [`process`](Self::process), which no
    /// socket event will prompt. The streams do it on first use; an event
    /// loop calls `process` for every restored connection after `ready`.
    pub fn awaits_processing(&self) -> bool {
        self.restored && !self.processed && !self.dormant()
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshaking(_))
    }

    /// Whether the peer ended the session (close_notify); no more data comes.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The negotiated cipher suite, once the handshake is over.
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        match &self.phase {
            Phase::Established(est) => Some(est.records.suite().common.suite),
            _ => None,
        }
    }

    /// Holds a handshake that has not answered yet: its hello stays
    /// unanswered, so that the connection can cross an upgrade (the next
    /// image answers it). A server whose upgrade waits for handshakes to
    /// end holds the new ones meanwhile, and releases them with `false`.
    pub fn hold(&mut self, held: bool) {
        if let Phase::Handshaking(hs) = &mut self.phase {
            hs.held = held;
        }
    }

    /// Whether [`hold`](Self::hold) holds its hello.
    pub fn is_held(&self) -> bool {
        matches!(&self.phase, Phase::Handshaking(hs) if hs.held)
    }

    /// Whether the connection can cross an upgrade now: established, or a
    /// handshake that has not answered. A handshake between its answer and
    /// its end cannot (its ephemeral keys live in rustls); it ends within
    /// one round trip.
    pub fn can_cross(&self) -> bool {
        match &self.phase {
            Phase::Handshaking(hs) => !hs.answered,
            Phase::Established(_) => true,
            Phase::Failed => false,
        }
    }

    /// The session as it crosses an upgrade.
    pub(crate) fn save(&self) -> Result<Saved, TlsError> {
        match &self.phase {
            Phase::Handshaking(hs) if !hs.answered => Ok(Saved::Hello {
                received: hs.hello.clone(),
                queued: self.queued.clone(),
                closing: self.closing,
            }),
            Phase::Handshaking(_) => Err(TlsError::InHandshake),
            Phase::Failed => Err(TlsError::Failed),
            Phase::Established(est) => {
                let (tx, rx) = est.records.save()?;
                Ok(Saved::Session(SavedSession {
                    suite: u16::from(est.records.suite().common.suite),
                    tx,
                    rx,
                    received: self.received.clone(),
                    unsent: self.unsent[self.sent..].to_vec(),
                    queued: self.queued.clone(),
                    peer_closed: self.peer_closed,
                    closing: self.closing,
                    close_sent: self.close_sent,
                }))
            }
        }
    }

    /// A connection as a previous image saved it: dormant until `ready`.
    pub(crate) fn restore(saved: Saved, config: &Config) -> Result<Connection, TlsError> {
        // A session needs no rustls connection: only a hello does.
        let mut conn = match saved {
            Saved::Hello { .. } => Connection::accept(config)?,
            Saved::Session(_) => Connection::failed(),
        };
        conn.restored = true;
        match saved {
            Saved::Hello {
                received,
                queued,
                closing,
            } => {
                if let Phase::Handshaking(hs) = &mut conn.phase {
                    hs.hello = received.clone();
                }
                conn.received = received;
                conn.queued = queued;
                conn.closing = closing;
            }
            Saved::Session(s) => {
                let suite = config
                    .rustls()
                    .crypto_provider()
                    .cipher_suites
                    .iter()
                    .find_map(|suite| match suite {
                        SupportedCipherSuite::Tls13(t) if u16::from(t.common.suite) == s.suite => {
                            Some(*t)
                        }
                        _ => None,
                    })
                    .ok_or_else(|| TlsError::Unsupported {
                        reason: format!(
                            "the session's cipher suite (0x{:04x}) is not in this image's crypto provider",
                            s.suite
                        ),
                    })?;
                conn.phase = Phase::Established(Box::new(Established {
                    records: Records::restore(suite, s.tx, s.rx)?,
                    kernel: None,
                }));
                conn.received = s.received;
                conn.unsent = s.unsent;
                conn.queued = s.queued;
                conn.peer_closed = s.peer_closed;
                conn.closing = s.closing;
                conn.close_sent = s.close_sent;
            }
        }
        Ok(conn)
    }

    /// Bytes sealed and not yet written.
    fn pending(&self) -> usize {
        self.unsent.len() - self.sent
    }

    /// Restored and this image not ready yet: nothing may move.
    pub(crate) fn dormant(&self) -> bool {
        self.restored && !crate::runtime::image_is_ready()
    }

    fn may_seal(&self) -> bool {
        matches!(self.phase, Phase::Established(_)) && !self.dormant()
    }

    /// The handshake is over: the session's keys go to the record layer.
    fn establish(&mut self) -> Result<(), TlsError> {
        let Phase::Handshaking(hs) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            return Ok(());
        };
        let (secrets, kernel) = hs
            .conn
            .dangerous_into_kernel_connection()
            .map_err(TlsError::Handshake)?;
        // Refutable when some crate enables rustls's `tls12` feature.
        #[allow(irrefutable_let_patterns)]
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(TlsError::Unsupported {
                reason: "the session is not TLS 1.3 (copyover::tls::Config offers only TLS 1.3)"
                    .into(),
            });
        };
        self.phase = Phase::Established(Box::new(Established {
            records: Records::new(suite, secrets.tx, secrets.rx)?,
            kernel: Some(kernel),
        }));
        Ok(())
    }

    /// Seals what waits (queued plaintext, a close_notify) once records may
    /// be sealed.
    fn settle(&mut self) -> Result<(), TlsError> {
        if !self.may_seal() {
            return Ok(());
        }
        let Phase::Established(est) = &mut self.phase else {
            return Ok(());
        };
        let mut result = Ok(());
        if !self.queued.is_empty() {
            let queued = std::mem::take(&mut self.queued);
            result = est.seal_data(&queued, &mut self.unsent);
        }
        if result.is_ok() && self.closing && !self.close_sent {
            self.close_sent = true;
            result = est
                .records
                .seal(ContentType::Alert, &[1, CLOSE_NOTIFY], &mut self.unsent);
        }
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Sends a fatal alert for `e` where one can still be sealed, and ends
    /// the connection.
    fn fail(&mut self, e: &TlsError) {
        if let Phase::Established(est) = &mut self.phase {
            let description = match e {
                TlsError::Protocol { .. } => Some(BAD_RECORD_MAC),
                TlsError::KeyUpdateAfterUpgrade | TlsError::KeysWornOut => Some(INTERNAL_ERROR),
                TlsError::Unsupported { .. } => Some(UNEXPECTED_MESSAGE),
                _ => None,
            };
            if let Some(d) = description
                && est.records.records_left() > 0
            {
                let _ = est
                    .records
                    .seal(ContentType::Alert, &[2, d], &mut self.unsent);
            }
        }
        self.phase = Phase::Failed;
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &self.phase {
            Phase::Handshaking(_) => "handshaking",
            Phase::Established(_) => "established",
            Phase::Failed => "failed",
        };
        f.debug_struct("Connection")
            .field("phase", &phase)
            .field("suite", &self.cipher_suite())
            .field("received", &self.received.len())
            .field("unsent", &self.pending())
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

impl Established {
    /// Seals application data, with a key update first where the keys
    /// near their confidentiality limit.
    fn seal_data(&mut self, plain: &[u8], unsent: &mut Vec<u8>) -> Result<(), TlsError> {
        // One record per 16 KiB, and room left for an alert.
        let needed = plain.len().div_ceil(super::record::MAX_PLAINTEXT) as u64 + 2;
        if self.records.records_left() < needed {
            self.update_tx(unsent)?;
        }
        self.records
            .seal(ContentType::ApplicationData, plain, unsent)
    }

    /// Our own key update: announced under the old keys, then new ones.
    fn update_tx(&mut self, unsent: &mut Vec<u8>) -> Result<(), TlsError> {
        let Some(kernel) = self.kernel.as_mut() else {
            return Err(TlsError::KeysWornOut);
        };
        self.records
            .seal(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0], unsent)?;
        let secrets = kernel.update_tx_secret().map_err(TlsError::Handshake)?;
        self.records.rekey_tx(secrets)
    }

    /// Handshake messages after the handshake: a key update is the only
    /// one a client sends in TLS 1.3.
    fn post_handshake(&mut self, payload: &[u8], unsent: &mut Vec<u8>) -> Result<(), TlsError> {
        if payload.is_empty() {
            return Err(cut());
        }
        let mut rest = payload;
        while !rest.is_empty() {
            let (typ, len) = match rest {
                [typ, a, b, c, ..] => (*typ, u32::from_be_bytes([0, *a, *b, *c]) as usize),
                _ => return Err(cut()),
            };
            let body = rest.get(4..4 + len).ok_or_else(cut)?;
            rest = &rest[4 + len..];
            match (typ, body) {
                (KEY_UPDATE, [request @ (0 | 1)]) if rest.is_empty() => {
                    let Some(kernel) = self.kernel.as_mut() else {
                        return Err(TlsError::KeyUpdateAfterUpgrade);
                    };
                    let secrets = kernel.update_rx_secret().map_err(TlsError::Handshake)?;
                    self.records.rekey_rx(secrets)?;
                    if *request == 1 {
                        self.update_tx(unsent)?;
                    }
                }
                _ => {
                    return Err(TlsError::Protocol {
                        reason: format!(
                            "a handshake message of type {typ} ({len} bytes) after the handshake"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn cut() -> TlsError {
    TlsError::Protocol {
        reason: "a handshake message split across records after the handshake".into(),
    }
}

/// Opens every whole record received.
fn open_all(
    est: &mut Established,
    received: &mut Vec<u8>,
    unsent: &mut Vec<u8>,
    plain: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> Result<(), TlsError> {
    while !*peer_closed {
        let Some(opened) = est.records.open(received) else {
            return Ok(());
        };
        let opened = opened?;
        let payload = &received[opened.payload.clone()];
        match opened.typ {
            ContentType::ApplicationData => plain.extend_from_slice(payload),
            ContentType::Alert => match payload {
                [_, CLOSE_NOTIFY] => *peer_closed = true,
                // A warning the peer follows with close_notify (RFC 8446, 6.1).
                [_, USER_CANCELED] => {}
                [_, d] => {
                    return Err(TlsError::Alert {
                        description: format!("{:?}", rustls::AlertDescription::from(*d)),
                    });
                }
                _ => return Err(cut()),
            },
            ContentType::Handshake => est.post_handshake(payload, unsent)?,
            other => {
                return Err(TlsError::Protocol {
                    reason: format!("a {other:?} record after the handshake"),
                });
            }
        }
        received.drain(..opened.consumed);
    }
    Ok(())
}

/// How far one call moved the handshake.
enum Driven {
    /// More bytes from the peer are needed.
    Waiting,
    /// The handshake is over; `received` holds what follows it.
    Finished,
    PeerClosed,
}

/// Drives rustls's handshake over what was received.
fn drive(
    hs: &mut Handshake,
    received: &mut Vec<u8>,
    unsent: &mut Vec<u8>,
    plain: &mut Vec<u8>,
) -> Result<Driven, TlsError> {
    if hs.held && !hs.answered {
        return Ok(Driven::Waiting);
    }
    loop {
        let UnbufferedStatus { mut discard, state } = hs.conn.process_tls_records(received);
        let mut next = None;
        match state.map_err(TlsError::Handshake)? {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(TlsError::Handshake)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                let start = unsent.len();
                let mut room = 4096;
                loop {
                    unsent.resize(start + room, 0);
                    match encode.encode(&mut unsent[start..]) {
                        Ok(n) => {
                            unsent.truncate(start + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => room = required_size,
                        Err(e) => {
                            unsent.truncate(start);
                            return Err(TlsError::Protocol {
                                reason: format!("encoding the handshake failed: {e}"),
                            });
                        }
                    }
                }
                hs.answered = true;
                hs.hello = Vec::new();
            }
            // Our `unsent` buffer keeps it until the socket takes it.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::WriteTraffic(_) => next = Some(Driven::Finished),
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                next = Some(Driven::PeerClosed)
            }
            _ => next = Some(Driven::Waiting),
        }
        received.drain(..discard);
        match next {
            // Writable already at the server's first flight (0.5-RTT), but
            // over only once the client's Finished is in.
            Some(Driven::Finished) if hs.conn.is_handshaking() => return Ok(Driven::Waiting),
            Some(driven) => return Ok(driven),
            None => {}
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::tls::carry::Saved;

    /// A throwaway certificate for `localhost`, and its key.
    pub(crate) fn certificate() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
        (der, key)
    }

    /// A server configuration and a client one that trusts it.
    pub(crate) fn configs() -> (Config, Arc<ClientConfig>) {
        let (der, key) = certificate();
        let server = Config::new(vec![der.clone()], key).unwrap();
        (server, client_config(der))
    }

    pub(crate) fn client_config(der: CertificateDer<'static>) -> Arc<ClientConfig> {
        client_config_for(der, None)
    }

    /// A client that offers only `suite`, if given.
    fn client_config_for(
        der: CertificateDer<'static>,
        suite: Option<rustls::CipherSuite>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if let Some(suite) = suite {
            provider.cipher_suites.retain(|s| s.suite() == suite);
        }
        let provider = Arc::new(provider);
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(client)
    }

    pub(crate) fn client(config: &Arc<ClientConfig>) -> ClientConnection {
        ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap()).unwrap()
    }

    /// Moves bytes both ways until neither side has any; returns the
    /// plaintext the server received.
    fn pump(c: &mut ClientConnection, s: &mut Connection) -> Vec<u8> {
        let mut plain = Vec::new();
        for _ in 0..20 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut moved = !wire.is_empty();
            if moved {
                s.read_tls(&mut wire.as_slice()).unwrap();
            }
            s.process(&mut plain).unwrap();
            let mut back = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut back).unwrap();
            }
            if !back.is_empty() {
                moved = true;
                let mut rd = back.as_slice();
                while !rd.is_empty() {
                    c.read_tls(&mut rd).unwrap();
                    c.process_new_packets().unwrap();
                }
            }
            if !moved {
                break;
            }
        }
        plain
    }

    fn client_reads(c: &mut ClientConnection) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match c.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        out
    }

    /// Through the memfd's encoding, as the exec carries it; restored
    /// awake (this test process never calls `ready`).
    fn cross(s: &Connection, config: &Config) -> Connection {
        let bytes = postcard::to_allocvec(&s.save().unwrap()).unwrap();
        let saved: Saved = postcard::from_bytes(&bytes).unwrap();
        let mut restored = Connection::restore(saved, config).unwrap();
        assert!(restored.dormant(), "a restored session waits for ready");
        restored.restored = false;
        restored
    }

    /// As after `Copyover::ready`, on this test's thread.
    pub(crate) fn become_ready() {
        crate::runtime::READY_IN_THIS_TEST.with(|r| r.set(true));
    }

    fn established() -> (Config, ClientConnection, Connection) {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut s = Connection::accept(&config).unwrap();
        pump(&mut c, &mut s);
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (config, c, s)
    }

    #[test]
    fn a_session_carries_on_in_both_directions_after_crossing() {
        let (config, mut c, mut s) = established();
        c.writer().write_all(b"before ").unwrap();
        assert_eq!(pump(&mut c, &mut s), b"before ");
        s.write(b"hello").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"hello");

        let mut s = cross(&s, &config);
        c.writer().write_all(b"after").unwrap();
        assert_eq!(pump(&mut c, &mut s), b"after");
        s.write(b" world").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b" world");

        // And across a second upgrade.
        let mut s = cross(&s, &config);
        s.write(b"!").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"!");
        c.writer().write_all(b"twice").unwrap();
        assert_eq!(pump(&mut c, &mut s), b"twice");
    }

    #[test]
    fn each_suite_carries_on_at_any_sequence_number() {
        for suite in [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (der, key) = certificate();
            let config = Config::new(vec![der.clone()], key).unwrap();
            let mut c = client(&client_config_for(der, Some(suite)));
            let mut s = Connection::accept(&config).unwrap();
            pump(&mut c, &mut s);
            assert_eq!(s.cipher_suite(), Some(suite));
            for crossing in 0..3 {
                // Records at sequence numbers well away from 0 on both
                // sides, and several after each crossing.
                for i in 0..7 {
                    s.write(format!("{crossing}.{i} ").as_bytes()).unwrap();
                    pump(&mut c, &mut s);
                    c.writer().write_all(b"x").unwrap();
                    assert_eq!(pump(&mut c, &mut s), b"x", "{suite:?}");
                }
                s = cross(&s, &config);
            }
            let got = String::from_utf8(client_reads(&mut c)).unwrap();
            assert!(got.ends_with("2.6 "), "{suite:?}: {got}");
        }
    }

    #[test]
    fn a_restored_session_moves_nothing_before_ready() {
        let (config, mut c, s) = established();
        let saved = s.save().unwrap();
        let mut restored = Connection::restore(saved, &config).unwrap();
        c.writer().write_all(b"typed").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let read = restored.read_tls(&mut wire.as_slice()).unwrap_err();
        assert_eq!(
            read.kind(),
            io::ErrorKind::WouldBlock,
            "a dormant session reads nothing"
        );
        let mut plain = Vec::new();
        restored.process(&mut plain).unwrap();
        restored.write(b"queued").unwrap();
        assert!(!restored.wants_write(), "a dormant session seals nothing");
        // Awake (as after `ready`): the record opens, the queue is sealed.
        restored.restored = false;
        restored.read_tls(&mut wire.as_slice()).unwrap();
        assert_eq!(pump(&mut c, &mut restored), b"typed");
        assert_eq!(client_reads(&mut c), b"queued");
    }

    #[test]
    fn a_record_cut_at_the_upgrade_arrives_once() {
        let (config, mut c, mut s) = established();
        c.writer().write_all(b"half a line").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let (first, second) = wire.split_at(wire.len() / 2);
        s.read_tls(&mut &first[..]).unwrap();
        let mut plain = Vec::new();
        s.process(&mut plain).unwrap();
        assert!(plain.is_empty());
        let mut s = cross(&s, &config);
        s.read_tls(&mut &second[..]).unwrap();
        s.process(&mut plain).unwrap();
        assert_eq!(plain, b"half a line");
    }

    #[test]
    fn unsent_records_cross_and_go_out_once() {
        let (config, mut c, mut s) = established();
        s.write(b"sealed before the exec").unwrap();
        let mut s = cross(&s, &config);
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"sealed before the exec");
    }

    #[test]
    fn a_key_update_before_an_upgrade_is_followed() {
        let (_, mut c, mut s) = established();
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"new keys").unwrap();
        assert_eq!(pump(&mut c, &mut s), b"new keys");
        s.write(b"still here").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"still here");
    }

    #[test]
    fn a_key_update_after_an_upgrade_ends_with_an_alert() {
        let (config, mut c, s) = established();
        let mut s = cross(&s, &config);
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"x").unwrap();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.read_tls(&mut wire.as_slice()).unwrap();
        let err = s.process(&mut Vec::new()).unwrap_err();
        assert!(matches!(err, TlsError::KeyUpdateAfterUpgrade), "{err}");
        let mut back = Vec::new();
        s.write_tls(&mut back).unwrap();
        c.read_tls(&mut back.as_slice()).unwrap();
        let alert = c.process_new_packets().unwrap_err();
        assert!(alert.to_string().contains("InternalError"), "{alert}");
    }

    #[test]
    fn a_hello_not_answered_crosses_and_is_answered_by_the_next_image() {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut s = Connection::accept(&config).unwrap();
        s.hold(true);
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut wire.as_slice()).unwrap();
        s.process(&mut Vec::new()).unwrap();
        assert!(!s.wants_write(), "a held hello is not answered");
        assert!(s.can_cross());
        let mut s = cross(&s, &config);
        pump(&mut c, &mut s);
        assert!(!c.is_handshaking() && !s.is_handshaking());
        s.write(b"welcome").unwrap();
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"welcome");
    }

    #[test]
    fn an_answered_handshake_cannot_cross() {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut s = Connection::accept(&config).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut wire.as_slice()).unwrap();
        s.process(&mut Vec::new()).unwrap();
        assert!(s.wants_write() && !s.can_cross());
        assert!(matches!(s.save(), Err(TlsError::InHandshake)));
    }

    /// A rustls configuration of the application's own, with one suite of
    /// `provider`'s, secret extraction on.
    fn own_server(
        mut provider: rustls::crypto::CryptoProvider,
        suite: rustls::CipherSuite,
    ) -> rustls::ServerConfig {
        let (der, key) = certificate();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
            .unwrap();
        server.enable_secret_extraction = true;
        server
    }

    fn own_config(
        provider: rustls::crypto::CryptoProvider,
        suite: rustls::CipherSuite,
    ) -> Result<Config, TlsError> {
        Config::from_rustls(Arc::new(own_server(provider, suite)))
    }

    #[test]
    fn a_configuration_whose_sessions_could_not_cross_is_refused() {
        use rustls::CipherSuite::*;
        use rustls::crypto::{aws_lc_rs, ring};
        let err = own_config(aws_lc_rs::default_provider(), TLS13_AES_128_GCM_SHA256).unwrap_err();
        assert!(err.to_string().contains("32-byte"), "{err}");
        // aws-lc-rs's AES-GCM cannot seal from the middle of a sequence.
        let err = own_config(aws_lc_rs::default_provider(), TLS13_AES_256_GCM_SHA384).unwrap_err();
        assert!(err.to_string().contains("sequence number"), "{err}");
        own_config(
            aws_lc_rs::default_provider(),
            TLS13_CHACHA20_POLY1305_SHA256,
        )
        .unwrap();
        #[allow(deprecated)]
        own_config(ring::default_provider(), TLS13_AES_256_GCM_SHA384).unwrap();
    }

    #[test]
    fn a_restored_session_asks_to_be_processed_once_the_image_is_ready() {
        let (config, mut c, mut s) = established();
        s.write(b"queued before the exec").unwrap();
        let mut restored = Connection::restore(s.save().unwrap(), &config).unwrap();
        assert!(!restored.awaits_processing(), "dormant: nothing to do yet");
        become_ready();
        assert!(restored.awaits_processing());
        restored.process(&mut Vec::new()).unwrap();
        assert!(!restored.awaits_processing(), "once is enough");
        pump(&mut c, &mut restored);
        assert_eq!(client_reads(&mut c), b"queued before the exec");
        // A connection that was never restored never asks.
        assert!(!Connection::accept(&config).unwrap().awaits_processing());
    }

    #[test]
    fn close_sends_close_notify_and_refuses_further_writes() {
        let (_, mut c, mut s) = established();
        s.write(b"last words").unwrap();
        s.close();
        assert!(s.wants_write());
        assert!(matches!(s.write(b"more"), Err(TlsError::Failed)));
        pump(&mut c, &mut s);
        let mut buf = [0; 64];
        let n = c.reader().read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"last words");
        assert_eq!(
            c.reader().read(&mut buf).unwrap(),
            0,
            "close_notify: a clean end"
        );
        // And the server sees the client's close_notify.
        c.send_close_notify();
        pump(&mut c, &mut s);
        assert!(s.peer_closed());
    }

    /// A socket that takes at most 999 bytes a write.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(999);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_backlog_written_in_small_pieces_goes_out_whole_and_once() {
        let (_, mut c, mut s) = established();
        let text: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        s.write(&text).unwrap();
        let mut socket = Trickle(Vec::new());
        while s.wants_write() {
            s.write_tls(&mut socket).unwrap();
        }
        assert_eq!(s.write_tls(&mut socket).unwrap(), 0);
        let mut rd = socket.0.as_slice();
        let mut got = Vec::new();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            got.extend(client_reads(&mut c));
        }
        assert_eq!(got, text);
    }

    #[test]
    fn early_data_is_refused_and_a_hello_may_not_grow_past_64_kib() {
        let mut server = own_server(
            rustls::crypto::aws_lc_rs::default_provider(),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        );
        server.max_early_data_size = 1024;
        let err = Config::from_rustls(Arc::new(server)).unwrap_err();
        assert!(err.to_string().contains("early data"), "{err}");

        let (config, _) = configs();
        let mut s = Connection::accept(&config).unwrap();
        s.hold(true);
        let chunk = vec![0x16; 16 * 1024];
        for _ in 0..4 {
            s.read_tls(&mut chunk.as_slice()).unwrap();
        }
        let err = s.read_tls(&mut chunk.as_slice()).unwrap_err();
        assert!(err.to_string().contains("64 KiB"), "{err}");
    }

    #[test]
    fn a_restored_session_writes_nothing_before_ready_not_even_what_was_sealed() {
        let (config, mut c, mut s) = established();
        s.write(b"sealed, not sent").unwrap();
        let mut restored = Connection::restore(s.save().unwrap(), &config).unwrap();
        assert!(!restored.wants_write());
        let mut wire = Vec::new();
        assert_eq!(restored.write_tls(&mut wire).unwrap(), 0);
        assert!(
            wire.is_empty(),
            "a dormant session wrote {} bytes",
            wire.len()
        );
        let mut socket: &[u8] = b"ciphertext";
        let read = restored.read_tls(&mut socket).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::WouldBlock);
        // Awake (as after `ready`): it goes out, once.
        restored.restored = false;
        pump(&mut c, &mut restored);
        assert_eq!(client_reads(&mut c), b"sealed, not sent");
    }

    #[test]
    fn a_hello_crosses_with_what_was_written_meanwhile() {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut s = Connection::accept(&config).unwrap();
        s.hold(true);
        s.write(b"What is your name?").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut wire.as_slice()).unwrap();
        s.process(&mut Vec::new()).unwrap();
        let mut s = cross(&s, &config);
        pump(&mut c, &mut s);
        assert_eq!(client_reads(&mut c), b"What is your name?");
    }

    #[test]
    fn the_saved_form_shows_no_key_in_debug() {
        let (config, _, s) = established();
        let shown = format!("{:?}", s.save().unwrap());
        assert!(shown.contains("Secret(32 bytes)"), "{shown}");
        // Queued plaintext (a hello's greeting) shows as a length.
        let mut hello = Connection::accept(&config).unwrap();
        hello.write(b"private words").unwrap();
        let shown = format!("{:?}", hello.save().unwrap());
        assert!(shown.contains("queued: 13"), "{shown}");
        assert!(
            !shown.contains("112, 114, 105"),
            "buffered bytes shown: {shown}"
        );
    }
}
