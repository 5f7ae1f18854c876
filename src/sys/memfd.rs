//! Memory files (memfds): creating them, sealing them, checking their
//! seals, and mapping them. A snapshot and the exec record cross the exec
//! as sealed memfds; a [`crate::Region`] is a memfd whose size is sealed.
//!
//! The `memfd` crate adds seals (on a descriptor this process owns);
//! creating stays here because the crate cannot ask for `MFD_NOEXEC_SEAL`,
//! and checking the seals of a *borrowed* descriptor stays here because
//! the crate must own the descriptor it looks at (checking a borrowed one
//! would take a duplicate, and at the `RLIMIT_NOFILE` ceiling, in a new
//! image with a lower limit, the duplicate fails where the check, in the
//! restore and the rollback, must not).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use memfd::{FileSeal, Memfd};

/// `MFD_NOEXEC_SEAL` (Linux 6.3): the memfd can never be made executable.
/// Not yet exported by every `libc` release, so it is spelled out here.
const MFD_NOEXEC_SEAL: libc::c_uint = 0x0008;

/// Creates an anonymous memory file for a snapshot: close-on-exec, sealable,
/// and never executable where the kernel knows `MFD_NOEXEC_SEAL`.
///
/// Not `memfd::MemfdOptions`: it cannot ask for `MFD_NOEXEC_SEAL`.
///
/// Falls back to creating it without `MFD_NOEXEC_SEAL` on kernels older than
/// 6.3, which reject the flag with `EINVAL`. `MFD_EXEC` is never asked for.
pub(crate) fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    for flags in [base | MFD_NOEXEC_SEAL, base] {
        // SAFETY: `name` is a valid NUL-terminated string that outlives the
        // call; the flags are plain integers. The kernel returns a fresh fd
        // that nothing else owns, or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by memfd_create and is owned by
            // nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Err(io::Error::last_os_error())
}

/// The seals of everything sealed that crosses the exec (a snapshot, the
/// exec record): nobody, not even the process that wrote it, can shrink,
/// grow or write it, or change its seals. [`seal`] adds them, [`check_sealed`]
/// checks them, and a read-only [`Mapping`] relies on them.
pub(crate) const SEALS: [FileSeal; 4] = [
    FileSeal::SealShrink,
    FileSeal::SealGrow,
    FileSeal::SealWrite,
    FileSeal::SealSeal,
];

/// The `fcntl` flag of one seal (the `memfd` crate keeps its own mapping
/// private).
fn seal_flag(seal: FileSeal) -> libc::c_int {
    match seal {
        FileSeal::SealShrink => libc::F_SEAL_SHRINK,
        FileSeal::SealGrow => libc::F_SEAL_GROW,
        FileSeal::SealWrite => libc::F_SEAL_WRITE,
        FileSeal::SealSeal => libc::F_SEAL_SEAL,
        FileSeal::SealFutureWrite => libc::F_SEAL_FUTURE_WRITE,
    }
}

/// Adds `seals` to a memfd this process created with sealing allowed
/// (through the `memfd` crate), and hands the descriptor back.
pub(crate) fn seal(file: File, seals: &[FileSeal]) -> io::Result<OwnedFd> {
    let memfd = Memfd::try_from_file(file).map_err(|_| io::Error::other("not a memfd"))?;
    memfd.add_seals(seals).map_err(memfd_io)?;
    Ok(OwnedFd::from(memfd.into_file()))
}

/// The system error inside a `memfd` crate error.
pub(crate) fn memfd_io(e: memfd::Error) -> io::Error {
    match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

/// A memfd checked to carry every one of [`SEALS`]: what [`map_sealed`]
/// requires.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sealed<'fd>(BorrowedFd<'fd>);

impl<'fd> Sealed<'fd> {
    /// The descriptor.
    pub(crate) fn fd(self) -> BorrowedFd<'fd> {
        self.0
    }
}

/// Checks that `fd` is a memfd carrying every one of [`SEALS`]
/// (`F_GET_SEALS` on the borrowed descriptor: see the module docs for why
/// not the `memfd` crate).
///
/// # Errors
///
/// `InvalidInput`, saying what is missing: "not a memfd" for a descriptor
/// that does not support seals, the seals it has and lacks otherwise.
pub(crate) fn check_sealed(fd: BorrowedFd<'_>) -> io::Result<Sealed<'_>> {
    let refuse = |detail: String| io::Error::new(io::ErrorKind::InvalidInput, detail);
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let bits = match unsafe { super::syscall!(fcntl(fd.as_raw_fd(), libc::F_GET_SEALS)) } {
        Ok(bits) => bits,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(refuse("it does not support seals: not a memfd".into()));
        }
        Err(e) => return Err(refuse(format!("F_GET_SEALS failed: {e}"))),
    };
    let (has, missing): (Vec<FileSeal>, Vec<FileSeal>) =
        SEALS.iter().partition(|s| bits & seal_flag(**s) != 0);
    if !missing.is_empty() {
        return Err(refuse(format!("seals {has:?}, missing {missing:?}")));
    }
    Ok(Sealed(fd))
}

/// The size of an open file (`fstat` on a borrowed descriptor, which the
/// standard library cannot do without taking a duplicate).
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd)?;
    u64::try_from(st.st_size).map_err(|_| io::Error::other("a negative size"))
}

/// Reads up to `buf.len()` bytes at `offset` (`pread`, retried on `EINTR`)
/// without moving the file offset, which is shared with every other holder
/// of the descriptor. Returns how many bytes were read (0 at the end).
pub(crate) fn read_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match nix::sys::uio::pread(fd, buf, offset) {
            Err(nix::errno::Errno::EINTR) => {}
            other => return Ok(other?),
        }
    }
}

/// Allocates `len` bytes of `fd` now (`fallocate`), so that writing them
/// later cannot fail for want of memory, nor take page faults to get it.
pub(crate) fn allocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::fcntl::fallocate(fd, nix::fcntl::FallocateFlags::empty(), 0, len)?;
    Ok(())
}

/// A shared mapping of all of a memfd, read-only ([`map_sealed`], a
/// snapshot) or read-write ([`map_region`], a [`crate::Region`]).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: a read-only mapping's contents cannot change (the memfd is sealed
// against writes and shrinking), so sharing it is like sharing a `&[u8]`; a
// writable one is owned by one `Region`, which hands out `&[u8]` and
// `&mut [u8]` under Rust's borrow rules.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd`, shared. `len == 0` maps nothing.
    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool, populate: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
                writable,
            });
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let flags = if populate {
            libc::MAP_SHARED | libc::MAP_POPULATE
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: a fresh mapping chosen by the kernel; it aliases no Rust
        // object. The result is checked for MAP_FAILED.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len, writable })
    }

    /// The mapped bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`
        // (unmapped only in Drop). Nobody else writes them: a read-only
        // mapping is of a sealed memfd; a region's memfd is private to this
        // process: close-on-exec from `boot` on (no child the application
        // starts gets it), inheritable only from our own exec (which ends
        // this mapping) to the next image's `boot` (before that image maps
        // it), and shared with one child only, the holder, which shares our
        // old memory and descriptor table (`CLONE_VM | CLONE_FILES`) but
        // never reads or writes the region; its size is sealed, so no page
        // can vanish under it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, to write (a region).
    ///
    /// # Panics
    ///
    /// If the mapping is read-only: a programmer error inside the crate.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping");
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`, the mapping is writable, and `&mut self`
        // makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are exactly what mmap returned; no borrow
            // of the mapping outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Maps `len` bytes of a sealed memfd read-only (the seals, checked by
/// [`check_sealed`], are what make the `&[u8]` view sound). Pages are
/// populated in bulk (`MAP_POPULATE`).
pub(crate) fn map_sealed(sealed: Sealed<'_>, len: usize) -> io::Result<Mapping> {
    Mapping::new(sealed.fd(), len, false, true)
}

/// Maps all `len` bytes of a memfd read-write, shared, lazily: a region (a
/// new image touches only what it uses) or a snapshot being written before
/// it is sealed. The memfd is private to this process; the caller has
/// checked or just set the file's size.
///
/// `populate`: fault every page in now, in bulk (`MAP_POPULATE`), so that
/// later writes through the mapping take no page faults.
pub(crate) fn map_region(fd: BorrowedFd<'_>, len: usize, populate: bool) -> io::Result<Mapping> {
    Mapping::new(fd, len, true, populate)
}
