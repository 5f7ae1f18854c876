//! TLS sessions across the exec: saved into a sealed memfd of their own,
//! kept in the handoff beside the sockets, read back by the next image.
//!
//! The keys never enter the application's state: the snapshot file that
//! SIGUSR1 writes and `copyover inspect` cannot show them.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::record::SavedDirection;
use super::{Config, Connection, TlsError};
use crate::Inherited;
use crate::sys;

/// One connection as it crosses.
#[derive(Serialize, Deserialize)]
pub(crate) enum Saved {
    /// A hello not answered yet: the next image answers it; with what was
    /// written meanwhile (sealed once the handshake ends).
    Hello {
        received: Vec<u8>,
        queued: Vec<u8>,
        closing: bool,
    },
    /// An established session.
    Session(SavedSession),
}

/// An established session: its keys, sequence numbers and buffered bytes.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedSession {
    /// The IANA number of the cipher suite.
    pub(crate) suite: u16,
    pub(crate) tx: SavedDirection,
    pub(crate) rx: SavedDirection,
    /// Ciphertext received and not processed (a record not yet whole).
    pub(crate) received: Vec<u8>,
    /// Ciphertext sealed and not yet written.
    pub(crate) unsent: Vec<u8>,
    /// Plaintext not yet sealed.
    pub(crate) queued: Vec<u8>,
    pub(crate) peer_closed: bool,
    pub(crate) closing: bool,
    pub(crate) close_sent: bool,
}

/// Sizes only: the buffers hold the application's plaintext, the keys are
/// secret ([`SavedDirection`] shows their length).
impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Saved::Hello {
                received,
                queued,
                closing,
            } => f
                .debug_struct("Hello")
                .field("received", &received.len())
                .field("queued", &queued.len())
                .field("closing", closing)
                .finish(),
            Saved::Session(s) => f
                .debug_struct("Session")
                .field("suite", &format_args!("0x{:04x}", s.suite))
                .field("tx", &s.tx)
                .field("rx", &s.rx)
                .field("received", &s.received.len())
                .field("unsent", &s.unsent.len())
                .field("queued", &s.queued.len())
                .finish_non_exhaustive(),
        }
    }
}

impl Saved {
    /// At least the bytes it takes encoded (postcard: a varint is at most
    /// 10 bytes), so that encoding never grows its buffer (a grown buffer
    /// would leave a copy of the keys in the memory it freed).
    fn encoded_bound(&self) -> usize {
        match self {
            Saved::Hello {
                received, queued, ..
            } => 32 + received.len() + queued.len(),
            Saved::Session(s) => 256 + s.received.len() + s.unsent.len() + s.queued.len(),
        }
    }
}

/// The TLS sessions of an upgrade, collected at its commit.
///
/// ```no_run
/// # #[derive(serde::Serialize, serde::Deserialize)] struct State;
/// # impl copyover::AppState for State { const VERSION: u32 = 1; }
/// # fn f(co: &mut copyover::Copyover<State>, state: &State, conns: &[(u64, std::net::TcpStream, copyover::tls::Connection)]) -> Result<(), Box<dyn std::error::Error>> {
/// use copyover::Handoff;
/// use copyover::tls::Carry;
///
/// let mut carry = Carry::new();
/// for (id, _, tls) in conns {
///     carry.add(*id, tls)?;
/// }
/// let sessions = carry.seal()?;
/// let mut keep = Handoff::new();
/// keep.streams("tls", conns.iter().map(|(id, s, _)| (*id, s)))
///     .other("tls-sessions", &sessions);
/// co.upgrade(state, &keep)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Carry {
    sessions: Vec<(u64, Saved)>,
}

impl Carry {
    /// No session yet.
    pub fn new() -> Carry {
        Carry::default()
    }

    /// Saves connection `id`'s session.
    ///
    /// # Errors
    ///
    /// [`TlsError::InHandshake`] for a handshake that answered and has not
    /// ended (see [`Connection::can_cross`]); [`TlsError::Unsupported`]
    /// for a session the next image could not rebuild; [`TlsError::Failed`]
    /// for a failed connection (close it instead).
    pub fn add(&mut self, id: u64, conn: &Connection) -> Result<(), TlsError> {
        self.sessions.push((id, conn.save()?));
        Ok(())
    }

    /// Adds a session saved earlier (a tokio task's, at its safe point).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn push(&mut self, id: u64, saved: Saved) {
        self.sessions.push((id, saved));
    }

    /// How many sessions were added.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Writes the sessions into a sealed memfd, to keep in the
    /// [`Handoff`](crate::Handoff) with [`other`](crate::Handoff::other).
    ///
    /// # Errors
    ///
    /// [`TlsError::Carry`] if the memfd cannot be made (out of memory or of
    /// descriptors): the upgrade cannot carry these sessions.
    pub fn seal(self) -> Result<Sessions, TlsError> {
        let bound = 16
            + self
                .sessions
                .iter()
                .map(|(_, s)| 10 + s.encoded_bound())
                .sum::<usize>();
        let mut bytes =
            postcard::to_extend(&self.sessions, Vec::with_capacity(bound)).map_err(|e| {
                TlsError::Carry {
                    reason: format!("encoding the sessions: {e}"),
                }
            })?;
        debug_assert!(bytes.len() <= bound, "the bound was too low");
        let sealed = crate::snapshot::seal_bytes(c"copyover-tls", &bytes);
        bytes.fill(0);
        std::hint::black_box(&bytes);
        let fd = sealed.map_err(|e| TlsError::Carry {
            reason: e.to_string(),
        })?;
        Ok(Sessions { fd })
    }
}

/// The sealed memfd [`Carry::seal`] made: keep it in the handoff.
#[derive(Debug)]
pub struct Sessions {
    fd: OwnedFd,
}

impl AsFd for Sessions {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The TLS sessions a previous image carried, by connection id.
#[derive(Debug, Default)]
pub struct Carried {
    sessions: HashMap<u64, Saved>,
}

impl Carried {
    /// Takes the sessions kept under `name` (see [`Carry`]). None kept
    /// (a previous image without TLS) gives an empty set.
    ///
    /// # Errors
    ///
    /// [`TlsError::Carry`] if the descriptor is not a sealed memfd of
    /// sessions this version can read.
    pub fn take(fds: &mut Inherited, name: &str) -> Result<Carried, TlsError> {
        let Ok(Some(fd)) = fds.take_fd(name) else {
            return Ok(Carried::default());
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| TlsError::Carry {
            reason: format!("{what} {name:?}: {e}"),
        };
        // Mapped as the snapshot is (no copy of the keys to overwrite).
        let sealed =
            sys::check_sealed(fd.as_fd()).map_err(|e| fail("checking the seals of", &e))?;
        let size = sys::file_size(fd.as_fd()).map_err(|e| fail("measuring", &e))?;
        let size = usize::try_from(size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| fail("measuring", &"empty or too large"))?;
        let bytes = sys::map_sealed(sealed, size).map_err(|e| fail("mapping", &e))?;
        let decoded: Result<Vec<(u64, Saved)>, _> = postcard::from_bytes(bytes.as_slice());
        let sessions = decoded.map_err(|e| fail("decoding", &e))?;
        Ok(Carried {
            sessions: sessions.into_iter().collect(),
        })
    }

    /// Restores connection `id`'s session (`None` if none was carried for
    /// it). It moves nothing until this image is
    /// [`ready`](crate::Copyover::ready).
    ///
    /// # Errors
    ///
    /// [`TlsError::Unsupported`] if this image's configuration lacks the
    /// session's cipher suite.
    pub fn restore(&mut self, id: u64, config: &Config) -> Result<Option<Connection>, TlsError> {
        let Some(saved) = self.sessions.remove(&id) else {
            return Ok(None);
        };
        Connection::restore(saved, config).map(Some)
    }

    /// The ids of the sessions not restored yet.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.sessions.keys().copied()
    }

    /// How many sessions are not restored yet.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether every session was restored.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::snapshot::FdKind;
    use crate::tls::connection::tests::{client, configs};

    /// Sessions through the sealed memfd, as the exec carries them.
    #[test]
    fn sessions_cross_in_a_sealed_memfd_and_come_back_by_id() {
        let (config, cc) = configs();
        let mut c = client(&cc);
        let mut s = Connection::accept(&config).unwrap();
        // The handshake, by hand: client hello, server flight, finished.
        for _ in 0..4 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process(&mut Vec::new()).unwrap();
            let mut back = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut back).unwrap();
            }
            let mut rd = back.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        assert!(!s.is_handshaking());
        let waiting = Connection::accept(&config).unwrap();

        // Buffered bytes of every kind: the encoding's buffer is sized
        // beforehand (a debug assertion checks the bound).
        s.write(&[b'q'; 5000]).unwrap();
        let mut waiting = waiting;
        waiting.write(&[b'w'; 3000]).unwrap();
        let mut hello = Vec::new();
        client(&cc).write_tls(&mut hello).unwrap();
        waiting.hold(true);
        waiting.read_tls(&mut hello.as_slice()).unwrap();

        let mut carry = Carry::new();
        assert!(carry.is_empty());
        carry.add(7, &s).unwrap();
        carry.add(9, &waiting).unwrap();
        assert_eq!(carry.len(), 2);
        assert!(!carry.is_empty());
        let sessions = carry.seal().unwrap();
        crate::sys::check_sealed(sessions.as_fd()).expect("the memfd is sealed");
        let fd = sessions.as_fd().try_clone_to_owned().unwrap();
        let mut fds = Inherited::from_owned([("tls".to_string(), fd, FdKind::Other)]);
        let mut carried = Carried::take(&mut fds, "tls").unwrap();
        assert_eq!(carried.len(), 2);
        assert!(!carried.is_empty());
        let mut ids: Vec<u64> = carried.ids().collect();
        ids.sort();
        assert_eq!(ids, [7, 9]);
        assert!(carried.restore(8, &config).unwrap().is_none());
        let hello = carried.restore(9, &config).unwrap().unwrap();
        assert!(hello.is_handshaking() && hello.can_cross());
        let restored = carried.restore(7, &config).unwrap().unwrap();
        assert_eq!(restored.cipher_suite(), s.cipher_suite());
        assert!(carried.is_empty());

        // Nothing under the name: an empty set, not an error.
        let none = Carried::take(&mut fds, "tls").unwrap();
        assert!(none.is_empty());
        // A descriptor that is not a sealed memfd is refused.
        let mut file = tempfile_in_target();
        file.write_all(b"not sessions").unwrap();
        let mut fds = Inherited::from_owned([("tls".to_string(), file.into(), FdKind::Other)]);
        let err = Carried::take(&mut fds, "tls").unwrap_err();
        assert!(err.to_string().contains("seals"), "{err}");
    }

    fn tempfile_in_target() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("copyover-tls-test-{}", std::process::id()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
