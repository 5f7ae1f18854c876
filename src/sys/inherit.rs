//! Owning descriptor numbers inherited across `execve`: the claims.

use super::*;

/// The right to take ownership of fd numbers inherited across `execve`:
/// the one way the crate turns a number it was told about (by the handoff variable, the
/// manifest or `LISTEN_FDS`) into an `OwnedFd`.
///
/// The number must be open and **not** close-on-exec: that is how the
/// previous image (or systemd) left it for us, and how no descriptor opened
/// by this image looks (Rust's standard library, and this crate, open
/// everything close-on-exec). `boot` calls this before the image opens any
/// descriptor of its own, then makes every fd close-on-exec, after which no
/// number passes the check. Each number is handed out at most once per
/// process image (a second claim is `EEXIST`), so no two owners can close it.
///
/// What this cannot see: a descriptor opened without close-on-exec by
/// foreign code (a C library) before `boot`. `boot` must come first in
/// `main`.
///
/// The check is sound only while this image has opened nothing of its own
/// that it then made inheritable (the commit does that, for the next
/// image). So claiming takes a [`Claims`] token, of which a process image
/// has one, taken by `boot` first thing and gone when `boot` returns:
/// nothing after `boot` can claim a number.
#[derive(Debug)]
pub(crate) struct Claims(());

/// Whether this image's [`Claims`] token was taken.
static CLAIMS_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Claims {
    /// This image's one token; `None` once it was taken (a second `boot`).
    pub(crate) fn take() -> Option<Claims> {
        (!CLAIMS_TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(Claims(()))
    }

    /// A token for a unit test, which claims numbers it made inheritable
    /// itself (tests share one process under `cargo test`).
    #[cfg(test)]
    pub(crate) fn for_tests() -> Claims {
        Claims(())
    }

    /// Takes ownership of inherited number `fd` (see [`Claims`]).
    pub(crate) fn inherit(&self, fd: RawFd) -> io::Result<OwnedFd> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        claim(&mut claimed, fd)
    }

    /// [`inherit`](Self::inherit) for many numbers at once (one lock for
    /// all): the result for each, in order.
    pub(crate) fn inherit_all(
        &self,
        fds: impl IntoIterator<Item = RawFd>,
    ) -> Vec<io::Result<OwnedFd>> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        fds.into_iter().map(|fd| claim(&mut claimed, fd)).collect()
    }
}

/// A set of fd numbers, one bit each: thousands of numbers checked for
/// repeats without hashing (the claims here, the handoff's manifest).
#[derive(Debug, Default)]
pub(crate) struct FdSet(Vec<u64>);

impl FdSet {
    pub(crate) const fn new() -> FdSet {
        FdSet(Vec::new())
    }

    /// Adds `fd`; `false` if it was in the set already.
    pub(crate) fn insert(&mut self, fd: usize) -> bool {
        let (word, bit) = (fd / 64, 1u64 << (fd % 64));
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }
}

/// The numbers claimed in this process image.
static CLAIMED: std::sync::Mutex<FdSet> = std::sync::Mutex::new(FdSet::new());

fn claim(claimed: &mut FdSet, fd: RawFd) -> io::Result<OwnedFd> {
    // `F_GETFD` fails only with EBADF on Linux; anything else (a fault
    // injected for a test, say) is asked once more rather than taken as
    // "not ours", which would leave an open client unowned.
    let cloexec = once_more(|| is_cloexec(fd), |e| e.raw_os_error() != Some(libc::EBADF))?;
    if cloexec {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is close-on-exec, so the previous image did not leave it for us",
        ));
    }
    // `is_cloexec` refused negative numbers (EBADF).
    if !claimed.insert(fd as usize) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it was already claimed",
        ));
    }
    // SAFETY: the number is open and inheritable, so (see `inherit`)
    // nothing in this image opened it, and the set makes this its only
    // claim: this `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
