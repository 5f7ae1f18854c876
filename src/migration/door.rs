//! The old process's migration socket ([`Door`]): an external newcomer
//! (`COPYOVER_JOIN=PATH`) connects there, is checked by its credentials,
//! says `hello`, and waits for the event loop to start its migration.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{HELLO, MAX_MESSAGE};
use crate::sys;

/// A newcomer that connected, passed the credentials check and said
/// `hello`.
#[derive(Debug)]
pub(crate) struct Knock {
    pub(super) sock: OwnedFd,
    /// Its PID as this process sees it (0 in a PID namespace it cannot
    /// see), and its user.
    pub(super) pid: u32,
    pub(super) uid: u32,
}

impl Knock {
    /// Lets it go with a reason (`fail REASON`): it leaves, and this
    /// process serves on.
    pub(crate) fn refuse(self, reason: &str) {
        tracing::info!(
            pid = self.pid,
            "an external newcomer is turned away: {reason}"
        );
        let _ = sys::send_message(self.sock.as_fd(), format!("fail {reason}").as_bytes(), &[]);
    }
}

/// The listening socket and the thread that answers it.
#[derive(Debug)]
pub(crate) struct Door {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    slot: Arc<Mutex<Option<Knock>>>,
}

/// How long a connected newcomer has to say `hello`.
const HELLO_LIMIT: Duration = Duration::from_secs(5);

impl Door {
    /// Listens at `PID.migration` in the status directory. A newcomer
    /// whose user is this process's effective one or one of `peers` is
    /// kept (one at a time) and `knocked` raised, as SIGUSR2 does; any other
    /// is refused, logged, and sent nothing.
    pub(crate) fn open(
        peers: Vec<u32>,
        knocked: Arc<AtomicBool>,
        wake: Arc<OwnedFd>,
    ) -> io::Result<Door> {
        let path = crate::status::migration_socket_path()?;
        // Open to every user who reaches the directory: the credentials
        // decide.
        let listener = Arc::new(sys::seqpacket_listen(&path, 0o666)?);
        let slot = Arc::new(Mutex::new(None));
        let (l, s) = (Arc::clone(&listener), Arc::clone(&slot));
        let own = sys::effective_uid();
        std::thread::Builder::new()
            .name("copyover-door".into())
            .spawn(move || answer(&l, &s, own, &peers, &knocked, &wake))?;
        tracing::info!(path = ?path, "listening for external newcomers");
        Ok(Door {
            path,
            listener,
            slot,
        })
    }

    /// The newcomer waiting, if any.
    pub(crate) fn take(&self) -> Option<Knock> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        // The thread's accept returns an error once the socket is shut
        // down, and it ends.
        let _ = sys::shutdown(self.listener.as_fd());
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The door's thread: every connection checked, one kept at a time.
fn answer(
    listener: &OwnedFd,
    slot: &Mutex<Option<Knock>>,
    own: u32,
    peers: &[u32],
    knocked: &AtomicBool,
    wake: &OwnedFd,
) {
    loop {
        let sock = match sys::accept(listener.as_fd()) {
            Ok(s) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EBADF)) => return,
            Err(e) => {
                // Out of descriptors, say: logged once a second at most.
                tracing::warn!("the migration socket's accept failed ({e}); trying again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let (pid, uid, _) = match sys::peer_credentials(sock.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("refused a migration connection: its credentials are unknown ({e})");
                continue;
            }
        };
        if pid == 0 {
            tracing::warn!(
                uid,
                "refused a migration connection: its PID is not visible from here (a PID namespace this process cannot see); start the newcomer where this process's PIDs are visible"
            );
            continue;
        }
        if uid != own && !peers.contains(&uid) {
            tracing::warn!(
                pid,
                uid,
                "refused a migration connection from uid {uid} (pid {pid}): only uid {own} or one named by Config::migration_peer may take over"
            );
            continue;
        }
        if !says_hello(&sock) {
            tracing::warn!(
                pid,
                uid,
                "refused a migration connection: no hello within 5 s"
            );
            continue;
        }
        let mut waiting = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.is_some() {
            drop(waiting);
            let _ = sys::send_message(sock.as_fd(), b"fail another newcomer is waiting", &[]);
            continue;
        }
        tracing::info!(pid, uid, "an external newcomer knocked");
        *waiting = Some(Knock { sock, pid, uid });
        drop(waiting);
        knocked.store(true, Ordering::SeqCst);
        crate::signal::wake(wake);
    }
}

fn says_hello(sock: &OwnedFd) -> bool {
    // A signal handled on this thread ends a wait early: waited again.
    let until = std::time::Instant::now() + HELLO_LIMIT;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match sys::wait_readable(sock.as_fd(), left) {
            Ok(true) => break,
            Ok(false) if !left.is_zero() => {}
            _ => return false,
        }
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    matches!(sys::recv_message(sock.as_fd(), &mut buf, &mut fds), Ok(n) if &buf[..n] == HELLO)
        && fds.is_empty()
}
