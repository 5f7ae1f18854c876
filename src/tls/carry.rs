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
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Saved {
    /// A hello not answered yet: the next image answers it.
    Hello { received: Vec<u8> },
    /// An established session.
    Session(SavedSession),
}

/// An established session: its keys, sequence numbers and buffered bytes.
#[derive(Serialize, Deserialize, Debug)]
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
        let mut bytes = postcard::to_allocvec(&self.sessions).map_err(|e| TlsError::Carry {
            reason: format!("encoding the sessions: {e}"),
        })?;
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
        sys::check_sealed(fd.as_fd()).map_err(|e| fail("checking the seals of", &e))?;
        let size = sys::file_size(fd.as_fd()).map_err(|e| fail("measuring", &e))?;
        let size = usize::try_from(size).map_err(|e| fail("measuring", &e))?;
        let mut bytes = vec![0; size];
        let mut at = 0;
        while at < size {
            match sys::read_at(fd.as_fd(), &mut bytes[at..], at as u64) {
                Ok(0) => return Err(fail("reading", &"the memfd ended early")),
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail("reading", &e)),
            }
        }
        let decoded: Result<Vec<(u64, Saved)>, _> = postcard::from_bytes(&bytes);
        bytes.fill(0);
        std::hint::black_box(&bytes);
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
