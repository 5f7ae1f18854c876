//! Why a snapshot could not be written or read: one error for the format,
//! the memfd and files, each variant with what an operator needs to act.

use std::io;

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
        "snapshot format version {found} is not supported; this build reads formats 1 to {supported}"
    )]
    UnknownFormat {
        /// The version found.
        found: u32,
        /// The newest version this build reads (it reads every one from 1).
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
    /// The state decoded, and then refused itself ([`AppState::check`]).
    ///
    /// [`AppState::check`]: crate::AppState::check
    #[error("the state (v{version}) decoded but is refused: {reason}")]
    Refused {
        /// The state version it was decoded as.
        version: u32,
        /// What its check said.
        reason: String,
    },
    /// The state payload does not decode as the application's type.
    #[error("the state payload (state v{version}) could not be decoded: {source}")]
    Payload {
        /// The state version it was decoded as.
        version: u32,
        /// The codec's error.
        source: CodecError,
    },
    /// The state could not be encoded.
    #[error("the state could not be encoded: {source}")]
    Encode {
        /// The codec's error.
        source: CodecError,
    },
}

/// Why the payload's codec (postcard, see the layout in [`crate::snapshot`])
/// could not encode or decode a value, as serde reported it.
///
/// Opaque on purpose: the codec is an implementation detail, and a user
/// matching on its errors would tie this crate's API to one of its
/// dependencies' versions. Its `Display` is the codec's own message
/// ("Hit the end of buffer, expected more data", ...).
#[derive(Debug)]
pub struct CodecError(postcard::Error);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CodecError {}

/// [`SnapshotError::Encode`] for the codec's error.
pub(super) fn encode_err(source: postcard::Error) -> SnapshotError {
    SnapshotError::Encode {
        source: CodecError(source),
    }
}

/// [`SnapshotError::Payload`] for the codec's error, decoding state
/// `version`.
pub(super) fn payload_err(version: u32) -> impl FnOnce(postcard::Error) -> SnapshotError {
    move |source| SnapshotError::Payload {
        version,
        source: CodecError(source),
    }
}

pub(super) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}
