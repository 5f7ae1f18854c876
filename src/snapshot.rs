//! The snapshot: the application's state and the fd manifest, written into a
//! sealed memfd that crosses the `execve`.
//!
//! # Why a sealed memfd
//!
//! A pipe between the old and the new image deadlocks as soon as the state is
//! larger than the pipe buffer and the writer is the reader's parent; a file
//! on disk can be changed by anyone. A memfd is memory, has no size limit but
//! RAM, and once sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
//! F_SEAL_SEAL`) nobody, not even the process that wrote it, can change it.
//! The new image checks the seals before it trusts a byte, and if it fails,
//! the old binary reads the very same, untouched snapshot during rollback.
//!
//! # Layout, format version 1
//!
//! All integers are little-endian. Two builds of an application agree on this
//! layout, not on each other's Rust types.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `COPYOVER` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | header length (96) |
//! | 16 | 4 | CRC-32 (IEEE) of every byte from offset 20 to the end |
//! | 20 | 4 | application state version |
//! | 24 | 8 | total length of the snapshot in bytes |
//! | 32 | 8 | generation of the writer (0 for the first start) |
//! | 40 | 8 | `CLOCK_MONOTONIC` ns when the upgrade was requested |
//! | 48 | 8 | `CLOCK_MONOTONIC` ns when the writer committed to the exec |
//! | 56 | 4 | length A of the application name |
//! | 60 | 4 | length W of the writer's version label |
//! | 64 | 4 | length B of the binary path to execute next |
//! | 68 | 4 | length M of the manifest |
//! | 72 | 8 | length P of the payload |
//! | 80 | 16 | reserved, zero |
//! | 96 | A, W, B | application name, writer version, binary path (UTF-8, path: bytes) |
//! | ... | M | manifest: postcard `Vec<ManifestEntry>` |
//! | ... | P | payload: the application's state, postcard |
//!
//! A reader refuses a snapshot whose magic, format version, lengths, checksum
//! or application name do not match, with an error that says which.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memfd::{FileSeal, Memfd};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The eight bytes every snapshot starts with.
pub const MAGIC: [u8; 8] = *b"COPYOVER";
/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 96;

/// The seals a snapshot memfd carries, added by [`cut_and_seal`].
const SEALS: [FileSeal; 4] = [
    FileSeal::SealShrink,
    FileSeal::SealGrow,
    FileSeal::SealWrite,
    FileSeal::SealSeal,
];

/// [`SEALS`] as `fcntl` flags, for [`check_sealed`].
fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL
}

/// What kind of descriptor a manifest entry names; checked on adoption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FdKind {
    /// A listening stream socket (`SO_ACCEPTCONN` set).
    Listener,
    /// A connected stream socket.
    Stream,
    /// Any other descriptor (a file, a pipe, a datagram socket, ...).
    Other,
    /// The memfd of a [`Region`](crate::Region).
    Region,
    /// A datagram socket (UDP, Unix datagram). Added after `Region`, so the
    /// encoding of the other kinds is unchanged; an older binary refuses a
    /// manifest that holds one (in its probe).
    Datagram,
}

/// One descriptor kept across the exec: its name, number and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// The application's name for it, such as `listener:telnet` or `conn:17`.
    pub name: String,
    /// The fd number, the same in the old and the new image.
    pub fd: i32,
    /// What it must be when adopted.
    pub kind: FdKind,
}

/// The fixed header of a snapshot, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Snapshot format version ([`FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// The application that wrote it.
    pub app: String,
    /// The application's state version.
    pub state_version: u32,
    /// The writer's version label (for logs: "from v1 to v2").
    pub writer_version: String,
    /// Upgrades since the first start, as seen by the writer.
    pub generation: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the upgrade was requested.
    pub requested_at_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the writer committed to the exec.
    pub committed_at_ns: u64,
    /// The binary path the next image is executed from.
    pub binary: PathBuf,
}

/// A decoded snapshot: header, manifest and the still-encoded state.
///
/// A snapshot read from a sealed memfd ([`read_sealed`]) is mapped, not
/// copied: its payload is read in place.
#[derive(Debug)]
pub struct Snapshot {
    /// The fixed header.
    pub header: Header,
    /// The descriptors that crossed the exec.
    pub manifest: Vec<ManifestEntry>,
    payload: Payload,
}

#[derive(Debug)]
enum Payload {
    Owned(Vec<u8>),
    Mapped(crate::sys::Mapping, std::ops::Range<usize>),
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A system call on the snapshot's memfd failed.
    #[error("could not {what} the snapshot memfd: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// The descriptor is not a memfd with all four seals.
    #[error(
        "the snapshot descriptor is not a sealed memfd ({detail}); it was not written by copyover, or was tampered with"
    )]
    NotSealed {
        /// What was found instead.
        detail: String,
    },
    /// Fewer bytes than the header says (or than a header needs).
    #[error("the snapshot is truncated: {expected} bytes expected, {found} present")]
    Truncated {
        /// Bytes the header announces (or the header's own length).
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// The first eight bytes are not `COPYOVER`.
    #[error("this is not a copyover snapshot (bad magic bytes {found:02x?})")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A snapshot format this build does not know.
    #[error(
        "snapshot format version {found} is not supported; this build reads format {supported}"
    )]
    UnknownFormat {
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The checksum does not match the contents.
    #[error(
        "the snapshot is corrupted: checksum {found:#010x} does not match the stored {stored:#010x}"
    )]
    Checksum {
        /// The checksum stored in the header.
        stored: u32,
        /// The checksum of the bytes present.
        found: u32,
    },
    /// A length or string in the header or manifest makes no sense.
    #[error("the snapshot is corrupted: {what}")]
    Corrupt {
        /// What is wrong.
        what: String,
    },
    /// The snapshot belongs to another application.
    #[error("the snapshot was written by app '{found}', but this binary is app '{expected}'")]
    WrongApp {
        /// The app in the snapshot.
        found: String,
        /// This binary's app.
        expected: String,
    },
    /// The state version cannot be read by this binary.
    #[error(
        "snapshot was written by app '{app}' state v{found}; this binary reads v{supported} and has no migration from v{found}"
    )]
    StateVersion {
        /// The app.
        app: String,
        /// The state version in the snapshot.
        found: u32,
        /// The state version this binary writes.
        supported: u32,
    },
    /// The state payload does not decode as the application's type.
    #[error("the state payload (state v{version}) could not be decoded: {source}")]
    Payload {
        /// The state version it was decoded as.
        version: u32,
        /// postcard's error.
        source: postcard::Error,
    },
    /// The state could not be encoded.
    #[error("the state could not be encoded: {source}")]
    Encode {
        /// postcard's error.
        source: postcard::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// Encodes a state value with postcard, the payload encoding.
///
/// # Errors
///
/// [`SnapshotError::Encode`] if serde refuses the value.
pub fn encode_state<T: Serialize + ?Sized>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_allocvec(state).map_err(|source| SnapshotError::Encode { source })
}

/// Decodes a payload as `T`. Migrations use it to read an older state type.
///
/// # Errors
///
/// [`SnapshotError::Payload`] if the bytes are not a valid `T`.
pub fn decode_state<T: DeserializeOwned>(payload: &[u8], version: u32) -> Result<T, SnapshotError> {
    postcard::from_bytes(payload).map_err(|source| SnapshotError::Payload { version, source })
}

/// Writes a snapshot into a new memfd and seals it.
///
/// The memfd is close-on-exec; the upgrade clears that flag just before the
/// exec. `payload` is the already-encoded state.
///
/// # Errors
///
/// [`SnapshotError::Io`] if the memfd cannot be created, written or sealed
/// (for example `ENOMEM`), [`SnapshotError::Encode`] if the manifest cannot
/// be encoded.
pub fn write_sealed(
    header: &Header,
    manifest: &[ManifestEntry],
    payload: &[u8],
) -> Result<OwnedFd, SnapshotError> {
    Draft::new(0)?.seal(header, manifest, payload)
}

/// A memfd made ready for a snapshot ahead of time: the upgrade creates one
/// while the probe runs, with its pages allocated and mapped, so that at the
/// commit the state is encoded straight into memory that is already there.
#[derive(Debug)]
pub struct Draft {
    file: File,
    /// The reserve, mapped writable and populated.
    map: Option<crate::sys::Mapping>,
}

impl Draft {
    /// Creates the memfd and allocates and maps `reserve` bytes of it.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Io`] if the memfd cannot be created. A failed
    /// allocation or mapping only leaves the memfd empty (it then grows as
    /// written).
    pub fn new(reserve: u64) -> Result<Draft, SnapshotError> {
        // Created by `sys`, not `memfd::MemfdOptions`: the crate cannot ask
        // for MFD_NOEXEC_SEAL.
        let fd = crate::sys::memfd_create(c"copyover-snapshot").map_err(io_err("create"))?;
        let mut map = None;
        if let (Ok(len), Ok(size)) = (libc::off_t::try_from(reserve), usize::try_from(reserve)) {
            if len > 0
                && nix::fcntl::fallocate(&fd, nix::fcntl::FallocateFlags::empty(), 0, len).is_ok()
            {
                map = crate::sys::map_region(fd.as_fd(), size, true).ok();
            }
        }
        Ok(Draft {
            file: File::from(fd),
            map,
        })
    }

    /// Writes the snapshot, cuts the memfd to its exact length and seals it.
    ///
    /// # Errors
    ///
    /// As [`write_sealed`].
    pub fn seal(
        self,
        header: &Header,
        manifest: &[ManifestEntry],
        payload: &[u8],
    ) -> Result<OwnedFd, SnapshotError> {
        let prefix = encode_prefix(header, manifest)?;
        drop(self.map);
        write_and_seal(self.file, header, &prefix, payload)
    }

    /// Encodes `state` straight into the memfd, through a writable mapping
    /// of it: no intermediate buffer, no second copy. `hint` is the expected
    /// payload size (the last snapshot's); if the state turns out larger,
    /// it is encoded into a buffer and written instead. Then cuts the memfd
    /// to size and seals it. Returns the memfd and the payload's size.
    ///
    /// # Errors
    ///
    /// As [`write_sealed`].
    pub fn seal_state<T: Serialize + ?Sized>(
        mut self,
        header: &Header,
        manifest: &[ManifestEntry],
        state: &T,
        hint: usize,
    ) -> Result<(OwnedFd, usize), SnapshotError> {
        let prefix = encode_prefix(header, manifest)?;
        let at = HEADER_LEN + prefix.bytes.len();
        let mapped = self.map.take().filter(|m| m.as_slice().len() > at);
        let encoded = match mapped {
            Some(mut map) => {
                let used =
                    postcard::to_slice(state, &mut map.as_mut_slice()[at..]).map(|u| u.len());
                match used {
                    Ok(len) => Some((map, len)),
                    Err(postcard::Error::SerializeBufferFull) => None,
                    Err(source) => return Err(SnapshotError::Encode { source }),
                }
            }
            None => None,
        };
        let Some((mut map, len)) = encoded else {
            // No room prepared (or the state outgrew it): a buffer, then write.
            let payload = encode_state_with_capacity(state, hint.saturating_mul(2))?;
            let fd = write_and_seal(self.file, header, &prefix, &payload)?;
            return Ok((fd, payload.len()));
        };
        let head = finish_head(header, &prefix, &map.as_slice()[at..at + len])?;
        let bytes = map.as_mut_slice();
        bytes[..HEADER_LEN].copy_from_slice(&head);
        bytes[HEADER_LEN..at].copy_from_slice(&prefix.bytes);
        // Unmapped before sealing: F_SEAL_WRITE is refused while a writable
        // shared mapping exists.
        drop(map);
        Ok((cut_and_seal(self.file, (at + len) as u64)?, len))
    }
}

/// Writes header, prefix and payload into `file`, then cuts and seals it.
fn write_and_seal(
    file: File,
    header: &Header,
    prefix: &Prefix,
    payload: &[u8],
) -> Result<OwnedFd, SnapshotError> {
    let head = finish_head(header, prefix, payload)?;
    let at = (head.len() + prefix.bytes.len()) as u64;
    file.write_all_at(&head, 0).map_err(io_err("write"))?;
    file.write_all_at(&prefix.bytes, head.len() as u64)
        .map_err(io_err("write"))?;
    file.write_all_at(payload, at).map_err(io_err("write"))?;
    cut_and_seal(file, at + payload.len() as u64)
}

/// Writes `bytes` into a new memfd named `name` and seals it, like a
/// snapshot (for the other sealed records that cross the exec).
pub(crate) fn seal_bytes(name: &std::ffi::CStr, bytes: &[u8]) -> Result<OwnedFd, SnapshotError> {
    let file = File::from(crate::sys::memfd_create(name).map_err(io_err("create a memfd"))?);
    file.write_all_at(bytes, 0).map_err(io_err("write"))?;
    cut_and_seal(file, bytes.len() as u64)
}

/// Cuts the memfd to `total` bytes (dropping any unused reserve) and adds
/// the four seals.
fn cut_and_seal(file: File, total: u64) -> Result<OwnedFd, SnapshotError> {
    file.set_len(total).map_err(io_err("size"))?;
    add_seals(file, &SEALS).map_err(io_err("seal"))
}

/// Adds `seals` to a memfd this process created with sealing allowed.
pub(crate) fn add_seals(file: File, seals: &[FileSeal]) -> io::Result<OwnedFd> {
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

/// Encodes a state value with postcard into a buffer of `capacity` bytes to
/// start with (the previous snapshot's size is a good guess): no regrowth
/// and re-copying of a large state.
///
/// # Errors
///
/// [`SnapshotError::Encode`] if serde refuses the value.
pub fn encode_state_with_capacity<T: Serialize + ?Sized>(
    state: &T,
    capacity: usize,
) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_extend(state, Vec::with_capacity(capacity))
        .map_err(|source| SnapshotError::Encode { source })
}

/// Encodes a whole snapshot into one buffer (for files and tests).
///
/// # Errors
///
/// [`SnapshotError::Encode`] if the manifest cannot be encoded.
pub fn encode(
    header: &Header,
    manifest: &[ManifestEntry],
    payload: &[u8],
) -> Result<Vec<u8>, SnapshotError> {
    let prefix = encode_prefix(header, manifest)?;
    let mut bytes = finish_head(header, &prefix, payload)?;
    bytes.extend_from_slice(&prefix.bytes);
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// The bytes between the header and the payload (names, path, manifest),
/// and their lengths.
struct Prefix {
    bytes: Vec<u8>,
    lens: [usize; 4],
}

fn encode_prefix(header: &Header, manifest: &[ManifestEntry]) -> Result<Prefix, SnapshotError> {
    let manifest_bytes =
        postcard::to_allocvec(manifest).map_err(|source| SnapshotError::Encode { source })?;
    let binary = header.binary.as_os_str().as_bytes();
    let lens = [
        header.app.len(),
        header.writer_version.len(),
        binary.len(),
        manifest_bytes.len(),
    ];
    let mut bytes = Vec::with_capacity(lens.iter().sum());
    bytes.extend_from_slice(header.app.as_bytes());
    bytes.extend_from_slice(header.writer_version.as_bytes());
    bytes.extend_from_slice(binary);
    bytes.extend_from_slice(&manifest_bytes);
    Ok(Prefix { bytes, lens })
}

/// The 96-byte header, with the checksum over it, the prefix and `payload`.
fn finish_head(header: &Header, prefix: &Prefix, payload: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let total = (HEADER_LEN + prefix.bytes.len() + payload.len()) as u64;
    let mut head = vec![0u8; HEADER_LEN];
    head[0..8].copy_from_slice(&MAGIC);
    head[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    head[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    head[20..24].copy_from_slice(&header.state_version.to_le_bytes());
    head[24..32].copy_from_slice(&total.to_le_bytes());
    head[32..40].copy_from_slice(&header.generation.to_le_bytes());
    head[40..48].copy_from_slice(&header.requested_at_ns.to_le_bytes());
    head[48..56].copy_from_slice(&header.committed_at_ns.to_le_bytes());
    for (i, len) in prefix.lens.iter().enumerate() {
        head[56 + 4 * i..60 + 4 * i].copy_from_slice(&len32(*len)?.to_le_bytes());
    }
    head[72..80].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[20..]);
    crc.update(&prefix.bytes);
    crc.update(payload);
    head[16..20].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(head)
}

fn len32(n: usize) -> Result<u32, SnapshotError> {
    u32::try_from(n).map_err(|_| SnapshotError::Corrupt {
        what: format!("a field of {n} bytes is too long"),
    })
}

/// Reads and checks a snapshot from a memfd: seals first, then
/// [`decode`]'s checks, on a read-only mapping of the memfd (no copy; the
/// file offset, shared with whoever else holds the descriptor, is neither
/// used nor moved).
///
/// # Errors
///
/// [`SnapshotError::NotSealed`] for a descriptor that is not a sealed memfd,
/// and every error [`decode`] returns.
pub fn read_sealed(fd: BorrowedFd<'_>) -> Result<Snapshot, SnapshotError> {
    check_sealed(fd)?;
    let size = nix::sys::stat::fstat(fd)
        .map_err(|e| SnapshotError::Io {
            what: "stat",
            source: e.into(),
        })?
        .st_size;
    let size = usize::try_from(size).map_err(|_| SnapshotError::Corrupt {
        what: "a negative size".into(),
    })?;
    if size < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found: size as u64,
        });
    }
    let map = crate::sys::map_sealed(fd, size).map_err(io_err("map"))?;
    let (header, manifest, payload) = parse(&map)?;
    Ok(Snapshot {
        header,
        manifest,
        payload: Payload::Mapped(map, payload),
    })
}

/// Checks that `fd` is a memfd carrying all four seals.
///
/// # Errors
///
/// [`SnapshotError::NotSealed`] saying what is missing.
pub fn check_sealed(fd: BorrowedFd<'_>) -> Result<(), SnapshotError> {
    // Not with `memfd::Memfd`, which must own the descriptor: checking a
    // borrowed one would take a duplicate, and at the RLIMIT_NOFILE ceiling
    // (a new image with a lower limit) the dup fails where this check, in
    // the restore and the rollback, must not.
    let seals = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(s) => SealFlag::from_bits_truncate(s),
        Err(nix::errno::Errno::EINVAL) => {
            return Err(SnapshotError::NotSealed {
                detail: "it does not support seals: not a memfd".into(),
            });
        }
        Err(e) => {
            return Err(SnapshotError::NotSealed {
                detail: format!("F_GET_SEALS failed: {e}"),
            });
        }
    };
    if !seals.contains(required_seals()) {
        return Err(SnapshotError::NotSealed {
            detail: format!("seals {:?}, missing {:?}", seals, required_seals() - seals),
        });
    }
    Ok(())
}

/// Reads a snapshot saved to a regular file (see `copyover inspect`).
///
/// # Errors
///
/// [`SnapshotError::Io`] if the file cannot be read, then as [`decode`].
pub fn read_file(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err("read"))?;
    decode(&bytes)
}

/// Decodes and checks a snapshot held in memory: magic, format version,
/// lengths, checksum, then the strings and the manifest.
///
/// # Errors
///
/// [`SnapshotError::Truncated`], [`SnapshotError::BadMagic`],
/// [`SnapshotError::UnknownFormat`], [`SnapshotError::Checksum`] or
/// [`SnapshotError::Corrupt`], saying which check failed. Never panics, on
/// any input.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let (header, manifest, payload) = parse(bytes)?;
    Ok(Snapshot {
        header,
        manifest,
        payload: Payload::Owned(bytes[payload].to_vec()),
    })
}

/// Checks a snapshot and decodes its header and manifest; returns where its
/// payload is.
fn parse(
    bytes: &[u8],
) -> Result<(Header, Vec<ManifestEntry>, std::ops::Range<usize>), SnapshotError> {
    let found = bytes.len() as u64;
    if bytes.len() < 16 {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found,
        });
    }
    let magic: [u8; 8] = bytes[0..8].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let format_version = u32_at(bytes, 8);
    if format_version != FORMAT_VERSION {
        return Err(SnapshotError::UnknownFormat {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found,
        });
    }
    let header_len = u32_at(bytes, 12) as usize;
    if header_len != HEADER_LEN {
        return Err(SnapshotError::Corrupt {
            what: format!("header length {header_len}, expected {HEADER_LEN}"),
        });
    }
    let total = u64_at(bytes, 24);
    if total > found {
        return Err(SnapshotError::Truncated {
            expected: total,
            found,
        });
    }
    if total < found {
        return Err(SnapshotError::Corrupt {
            what: format!(
                "{} trailing bytes after the announced length {total}",
                found - total
            ),
        });
    }
    let stored = u32_at(bytes, 16);
    let computed = crc32fast::hash(&bytes[20..]);
    if stored != computed {
        return Err(SnapshotError::Checksum {
            stored,
            found: computed,
        });
    }
    if bytes[80..HEADER_LEN].iter().any(|b| *b != 0) {
        return Err(SnapshotError::Corrupt {
            what: "the reserved header bytes are not zero".into(),
        });
    }
    let lens = [
        u32_at(bytes, 56) as u64,
        u32_at(bytes, 60) as u64,
        u32_at(bytes, 64) as u64,
        u32_at(bytes, 68) as u64,
        u64_at(bytes, 72),
    ];
    let sum = lens
        .iter()
        .try_fold(HEADER_LEN as u64, |acc, &l| acc.checked_add(l));
    if sum != Some(total) {
        return Err(SnapshotError::Corrupt {
            what: format!("field lengths {lens:?} do not add up to the total {total}"),
        });
    }
    let mut at = HEADER_LEN;
    let mut take = |n: u64| {
        let s = &bytes[at..at + n as usize];
        at += n as usize;
        s
    };
    let app = utf8(take(lens[0]), "application name")?;
    let writer_version = utf8(take(lens[1]), "writer version")?;
    let binary = PathBuf::from(OsString::from_vec(take(lens[2]).to_vec()));
    let (manifest, rest): (Vec<ManifestEntry>, _) = postcard::take_from_bytes(take(lens[3]))
        .map_err(|e| SnapshotError::Corrupt {
            what: format!("the fd manifest does not decode: {e}"),
        })?;
    if !rest.is_empty() {
        return Err(SnapshotError::Corrupt {
            what: format!("{} stray bytes after the fd manifest", rest.len()),
        });
    }
    let payload = bytes.len() - lens[4] as usize..bytes.len();
    let header = Header {
        format_version,
        app,
        state_version: u32_at(bytes, 20),
        writer_version,
        generation: u64_at(bytes, 32),
        requested_at_ns: u64_at(bytes, 40),
        committed_at_ns: u64_at(bytes, 48),
        binary,
    };
    Ok((header, manifest, payload))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn utf8(b: &[u8], what: &str) -> Result<String, SnapshotError> {
    String::from_utf8(b.to_vec()).map_err(|_| SnapshotError::Corrupt {
        what: format!("the {what} is not UTF-8"),
    })
}

impl Snapshot {
    /// The application's state, postcard-encoded; see [`decode_state`].
    pub fn payload(&self) -> &[u8] {
        match &self.payload {
            Payload::Owned(v) => v,
            Payload::Mapped(map, range) => &map[range.clone()],
        }
    }

    /// Checks that the snapshot belongs to `app`.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::WrongApp`] naming both applications.
    pub fn check_app(&self, app: &str) -> Result<(), SnapshotError> {
        if self.header.app == app {
            Ok(())
        } else {
            Err(SnapshotError::WrongApp {
                found: self.header.app.clone(),
                expected: app.to_owned(),
            })
        }
    }

    /// Total encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self.header.app.len()
            + self.header.writer_version.len()
            + self.header.binary.as_os_str().len()
            + postcard::to_allocvec(&self.manifest)
                .map(|v| v.len())
                .unwrap_or(0)
            + self.payload().len()
    }
}

/// Writes a snapshot held in a memfd to a regular file, for staging.
///
/// # Errors
///
/// [`SnapshotError::Io`] if the file cannot be written.
pub fn save_to_file(snapshot: &Snapshot, path: &Path) -> Result<(), SnapshotError> {
    let bytes = encode(&snapshot.header, &snapshot.manifest, snapshot.payload())?;
    std::fs::write(path, bytes).map_err(io_err("save"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Header, Vec<ManifestEntry>, Vec<u8>) {
        let header = Header {
            format_version: FORMAT_VERSION,
            app: "chat".into(),
            state_version: 3,
            writer_version: "v1".into(),
            generation: 7,
            requested_at_ns: 11,
            committed_at_ns: 22,
            binary: "/usr/bin/chat".into(),
        };
        let manifest = vec![
            ManifestEntry {
                name: "listener:telnet".into(),
                fd: 3,
                kind: FdKind::Listener,
            },
            ManifestEntry {
                name: "conn:1".into(),
                fd: 4,
                kind: FdKind::Stream,
            },
        ];
        let payload = encode_state(&("hello", 42u32)).unwrap();
        (header, manifest, payload)
    }

    #[test]
    fn round_trip_through_a_sealed_memfd() {
        let (h, m, p) = sample();
        let fd = write_sealed(&h, &m, &p).unwrap();
        let snap = read_sealed(fd.as_fd()).unwrap();
        assert_eq!(snap.header, h);
        assert_eq!(snap.manifest, m);
        let state: (String, u32) = decode_state(snap.payload(), 3).unwrap();
        assert_eq!(state, ("hello".to_string(), 42));
        assert_eq!(snap.encoded_len(), encode(&h, &m, &p).unwrap().len());
    }

    #[test]
    fn a_draft_with_a_larger_reserve_is_cut_to_size() {
        let (h, m, p) = sample();
        let fd = Draft::new(1 << 20).unwrap().seal(&h, &m, &p).unwrap();
        let snap = read_sealed(fd.as_fd()).unwrap();
        assert_eq!(snap.payload(), &p[..]);
        let again = encode_state_with_capacity(&("hello", 42u32), 1).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn a_state_encoded_straight_into_the_memfd_reads_back() {
        let (h, m, _) = sample();
        let state = ("hello", 42u32, vec![7u8; 100_000]);
        for reserve in [0, 1000, 1 << 20] {
            let (fd, len) = Draft::new(reserve)
                .unwrap()
                .seal_state(&h, &m, &state, 10)
                .unwrap();
            let snap = read_sealed(fd.as_fd()).unwrap();
            assert_eq!(snap.payload().len(), len, "reserve {reserve}");
            let back: (String, u32, Vec<u8>) = decode_state(snap.payload(), 3).unwrap();
            assert_eq!(back.2.len(), 100_000);
            assert_eq!(snap.manifest, m);
        }
    }

    #[test]
    fn a_sealed_memfd_cannot_be_written() {
        let (h, m, p) = sample();
        let file = File::from(write_sealed(&h, &m, &p).unwrap());
        assert!(file.write_all_at(b"X", 0).is_err());
        assert!(file.set_len(1).is_err());
    }

    #[test]
    fn unsealed_memfd_and_plain_file_are_refused() {
        let fd = crate::sys::memfd_create(c"t").unwrap();
        let err = read_sealed(fd.as_fd()).unwrap_err();
        assert!(matches!(err, SnapshotError::NotSealed { .. }), "{err}");
        let f = File::open("/proc/self/stat").unwrap();
        let err = read_sealed(f.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not a memfd"), "{err}");
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let (h, m, p) = sample();
        let bytes = encode(&h, &m, &p).unwrap();
        for cut in [0, 10, 50, HEADER_LEN, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::BadMagic { .. }
                ),
                "cut {cut}: {err}"
            );
        }
        assert!(
            decode(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }

    #[test]
    fn corrupted_byte_fails_the_checksum() {
        let (h, m, p) = sample();
        let mut bytes = encode(&h, &m, &p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("corrupted"));
    }

    #[test]
    fn wrong_magic_and_unknown_format_are_refused() {
        let (h, m, p) = sample();
        let mut bytes = encode(&h, &m, &p).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode(&bytes).unwrap_err(),
            SnapshotError::BadMagic { .. }
        ));
        let mut bytes = encode(&h, &m, &p).unwrap();
        bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot format version 9 is not supported; this build reads format 1"
        );
    }

    #[test]
    fn wrong_app_is_refused_with_both_names() {
        let (h, m, p) = sample();
        let snap = decode(&encode(&h, &m, &p).unwrap()).unwrap();
        assert!(snap.check_app("chat").is_ok());
        let err = snap.check_app("proxy").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the snapshot was written by app 'chat', but this binary is app 'proxy'"
        );
    }

    /// Property: no input makes the decoder panic, and every single-byte
    /// change to a valid snapshot is refused (the checksum covers all
    /// bytes after offset 20; the first 20 are magic, version, length, crc).
    #[test]
    fn decoder_refuses_every_single_byte_change_and_never_panics() {
        let (h, m, p) = sample();
        let bytes = encode(&h, &m, &p).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                assert!(
                    decode(&b).is_err(),
                    "changing byte {i} by {flip:#x} was accepted"
                );
            }
        }
        // Random inputs, seeded so a failure is repeatable.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let mut b: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 % 64) >> 3) as u8)
                .collect();
            if round % 2 == 0 && b.len() >= 12 {
                b[..8].copy_from_slice(&MAGIC);
                b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            }
            let _ = decode(&b);
        }
    }
}
