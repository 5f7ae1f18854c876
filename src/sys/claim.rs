//! The readiness claim: one byte in a pipe that decides, once, who ends an
//! upgrade.
//!
//! From the commit's exec until an image is ready, two parties may end the
//! upgrade: the image that becomes ready (it kills the holder), and the
//! holder at its deadline (it kills the server's process and rescues). Both
//! at once would kill both, and every client with them. So each first
//! *takes the claim*: a non-blocking read of the one byte the commit put in
//! the pipe (whose write end it closed at once). A one-byte read is atomic:
//! exactly one reader gets the byte, every later one gets end-of-file.
//!
//! * The image that gets it is ready; the holder, which will find the pipe
//!   empty, waits to be killed.
//! * The holder that gets it kills the server's process; the image, which
//!   will find the pipe empty, waits to be killed (or for the holder's end,
//!   if the holder died in between: then it serves, as nobody else will).
//!
//! The read end crosses the exec like the snapshot (`claim=FD` in the
//! handoff variable); the holder keeps its own copy in the old descriptor
//! table.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::syscall;

/// Makes a claim: a pipe holding one byte, of which only the read end
/// (close-on-exec, non-blocking) is returned.
pub(crate) fn make() -> io::Result<OwnedFd> {
    let mut ends = [-1 as RawFd; 2];
    // SAFETY: pipe2 writes two new fds into `ends`.
    unsafe { syscall!(pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK)) }?;
    // SAFETY: the kernel just returned these two fds; nobody else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // SAFETY: one byte from a local into a pipe we own.
    let n = unsafe { syscall!(write(write.as_raw_fd(), b"c".as_ptr().cast(), 1)) }?;
    if n != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the claim's byte was not written",
        ));
    }
    // The write end closes here: once the byte is taken, every read ends
    // at once with end-of-file, never blocks.
    drop(write);
    Ok(read)
}

/// Takes the claim: `Ok(true)` if this call got the byte, `Ok(false)` if
/// somebody else had already taken it. An error says nothing about who has
/// it: the caller must not act as its owner.
pub(crate) fn take(claim: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        match take_raw(claim.as_raw_fd()) {
            Taken::Ours => return Ok(true),
            Taken::Gone => return Ok(false),
            Taken::Failed(libc::EINTR) => {}
            Taken::Failed(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// What one read of the claim found.
pub(super) enum Taken {
    /// This read got the byte.
    Ours,
    /// Somebody took it before.
    Gone,
    /// The read failed with this errno: nobody knows.
    Failed(i32),
}

/// One raw read of the claim: a single `syscall(2)` on a stack byte, so
/// async-signal-safe and fit for the holder (which shares the old image's
/// memory and thread state until the exec; see `sys::holder`).
pub(super) fn take_raw(claim: RawFd) -> Taken {
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a local; `syscall` touches
    // nothing but errno, and only on failure.
    let n = unsafe { libc::syscall(libc::SYS_read, claim, &mut byte as *mut u8, 1usize) };
    match n {
        1 => Taken::Ours,
        0 => Taken::Gone,
        _ => match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Taken::Gone,
            Some(errno) => Taken::Failed(errno),
            None => Taken::Failed(libc::EIO),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn exactly_one_taker_gets_the_claim() {
        let claim = make().unwrap();
        let copy = claim.try_clone().unwrap();
        assert!(take(claim.as_fd()).unwrap());
        assert!(!take(copy.as_fd()).unwrap());
        assert!(!take(claim.as_fd()).unwrap());
    }

    #[test]
    fn racing_takers_get_it_once() {
        for _ in 0..50 {
            let claim = make().unwrap();
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let fd = claim.try_clone().unwrap();
                    std::thread::spawn(move || take(fd.as_fd()).unwrap())
                })
                .collect();
            let won = threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|w| *w)
                .count();
            assert_eq!(won, 1);
        }
    }
}
