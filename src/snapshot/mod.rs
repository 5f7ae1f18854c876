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
//! - `format`: the layout below, in memory: [`encode`], [`decode`] (to a
//!   [`Snapshot`]), [`encode_state`], [`decode_state`]. Pure (no
//!   descriptor, no system call); the property test and the fuzz target
//!   cover it.
//! - `memfd`: the sealed memfd that crosses the exec: written by the
//!   runtime (`write_sealed`, or a `Draft` prepared during the probe), read
//!   with [`read_sealed`], checked with [`check_sealed`].
//! - `file`: snapshot files, for staging: [`read_file`].
//! - `error`: [`SnapshotError`], for all three, and [`CodecError`], the
//!   payload codec's error kept opaque.
//!
//! # Layout, format versions 1 and 2
//!
//! All integers are little-endian. Two builds of an application agree on this
//! layout, not on each other's Rust types.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `COPYOVER` |
//! | 8 | 4 | format version: 2 if the manifest holds a group, else 1 |
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
//! | ... | M | manifest: postcard `Vec<ManifestEntry>`, then the members of each group |
//! | ... | P | payload: the application's state, postcard |
//!
//! A group of connections ([`ManifestGroup`], format 2 only) is an entry
//! of its own kind (`StreamGroup`, after `Datagram`) with fd -1, after
//! every plain entry, and its members, postcard `Vec<GroupMember>` (id,
//! fd), follow the entry list, one sequence per group in the order of their
//! entries. A reader from before groups reads format 1 only: it refuses a
//! snapshot with groups by its format number, in its probe, rather than
//! lose the connections, and reads one without groups as before.
//!
//! A reader refuses a snapshot whose magic, format version, lengths, checksum
//! or application name do not match, with an error that says which.

mod error;
mod file;
mod format;
mod manifest;
mod memfd;

pub use error::{CodecError, SnapshotError};
pub use file::read_file;
pub use format::{
    FORMAT_VERSION, HEADER_LEN, Header, MAGIC, Snapshot, decode, decode_state, encode,
    encode_state, encode_state_with_capacity,
};
pub use manifest::{FdKind, GroupMember, Manifest, ManifestEntry, ManifestGroup};
pub(crate) use memfd::seal_bytes;
pub(crate) use memfd::{Draft, write_sealed};
pub use memfd::{check_sealed, read_sealed};
