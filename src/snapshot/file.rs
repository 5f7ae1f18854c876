//! Snapshots in regular files, for staging. There is one way to write one,
//! [`Copyover::save_snapshot`](crate::Copyover::save_snapshot) (0600, under
//! a fresh name renamed into place; the telnet demo calls it on SIGUSR1),
//! and one way to read one, [`read_file`]
//! ([`Copyover::restore_from_file`](crate::Copyover::restore_from_file),
//! `copyover inspect`).

use std::path::Path;

use super::error::{SnapshotError, io_err};
use super::format::{Snapshot, decode};

/// Reads a snapshot saved to a regular file (see `copyover inspect`).
///
/// # Errors
///
/// [`SnapshotError::Io`] if the file cannot be read, then as [`decode`].
pub fn read_file(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err("read"))?;
    decode(&bytes)
}
