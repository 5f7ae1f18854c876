//! The outcome of an upgrade ([`Outcome`]) and where it is told: this
//! module owns the status file (what a copyover process tells its operator,
//! the channel the `copyover` CLI reads) and the one function that reports
//! an outcome to the log, the status file and `sd_notify` alike.
//!
//! # Format, version 1
//!
//! One file per process, `DIR/PID.status`, replaced atomically (written
//! aside, then renamed) at every outcome. `DIR` is `COPYOVER_STATUS_DIR` if
//! set, else `/run/copyover` for root, else `$XDG_RUNTIME_DIR/copyover`, else
//! `/tmp/copyover-UID`. Lines of `key=value` (values never contain a
//! newline):
//!
//! ```text
//! format=1
//! pid=4242
//! app=copyover-telnetd
//! version=v2
//! generation=3
//! started_at=1764000000        (Unix seconds, when the PID started)
//! start_ticks=123456           (the process's start time in /proc/PID/stat)
//! seq=7                        (increases with every outcome)
//! outcome=complete             (started | complete | refused | rolled back)
//! from_version=v1
//! blackout_ms=1.020
//! total_ms=212.400             (complete only, optional: the phases)
//! exec_ms=0.610
//! restore_ms=0.200
//! adopt_ms=0.210
//! unheld_ms=0.150              (the commit before the holder existed)
//! reason=                      (for refused and rolled back)
//! updated_at=1764000123
//! ```
//!
//! Within format 1, keys are only ever added, never renamed or given a new
//! meaning: a reader ignores keys it does not know, and takes a missing
//! optional key as unknown (the four phase keys came later; a file without
//! them reads as [`Outcome::Complete`] with [`Phases`] of `None`). A change
//! that an older reader would misread gets `format=2`, which that reader
//! refuses rather than misreads.
//!
//! Read it from Rust with [`read`] (or [`Status::read`] for a path); the
//! outcome comes back typed, as an [`Outcome`].
//!
//! # Safety of the channel
//!
//! The directory is created `0700`; one that is not owned by this user,
//! or that others can write to, is refused (logged; serving goes on). The
//! file is written to a fresh temporary name (`O_CREAT|O_EXCL|O_NOFOLLOW`,
//! mode 0600) and renamed over the status file, so a symlink or a FIFO
//! planted at either name is never followed, opened or blocked on. Reads
//! open with `O_NOFOLLOW|O_NONBLOCK`, accept only a regular file, and read
//! at most 64 KiB. `start_ticks` ties a file to one process: `copyover
//! upgrade` refuses a PID whose start time differs (the server was killed
//! and the number reused), rather than signalling a stranger.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The most a status file may hold; anything longer is not ours.
pub(super) const MAX_LEN: u64 = 64 * 1024;

/// The format this runtime writes and reads (see the module docs).
pub(super) const FORMAT: &str = "1";

pub use crate::env::STATUS_DIR_VAR;

/// The status directory for this user (see the module docs).
pub fn status_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATUS_DIR_VAR) {
        return PathBuf::from(dir);
    }
    let uid = crate::sys::real_uid();
    if uid == 0 {
        return PathBuf::from("/run/copyover");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("copyover"),
        None => PathBuf::from(format!("/tmp/copyover-{uid}")),
    }
}

/// The status file of process `pid` in `dir`.
pub fn status_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.status"))
}

mod client;
mod file;
mod outcome;
mod report;
mod safe_io;
#[cfg(test)]
mod tests;

pub(crate) use client::{migration_socket_path, take_migration_request};
pub use client::{
    prepare_migration, request_gradual_migration, request_migration, request_move_back,
    request_staying_migration, request_upgrade, start_ticks,
};
pub use file::{Status, read};
pub use outcome::{Outcome, Phases};
pub(crate) use report::{Reporter, announce_migrated, report};
pub(crate) use safe_io::write_replacing;
use safe_io::{check_dir, read_bounded};
