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
//! # Where things are
//!
//! - `format`: the layout below, in memory: [`encode`], [`decode`],
//!   [`encode_state`], [`decode_state`]. Pure (no descriptor, no system
//!   call); the property test and the fuzz target cover it.
//! - `memfd`: the sealed memfd that crosses the exec: [`write_sealed`],
//!   [`Draft`], [`read_sealed`], [`check_sealed`].
//! - `file`: snapshot files, for staging: [`read_file`].
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

use std::io;

mod file;
mod format;
mod memfd;

pub use file::read_file;
pub use format::{
    FORMAT_VERSION, FdKind, HEADER_LEN, Header, MAGIC, ManifestEntry, decode, decode_state, encode,
    encode_state, encode_state_with_capacity,
};
pub use memfd::{Draft, check_sealed, read_sealed, write_sealed};
pub(crate) use memfd::{add_seals, memfd_io, seal_bytes};

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
