//! The two error types of the public boundary: [`Error`] for starting,
//! resuming and what the running image asks of the runtime, [`UpgradeError`]
//! for an upgrade attempt (and for saving a snapshot file).

use std::io;
use std::path::PathBuf;

use crate::snapshot::SnapshotError;

/// Why [`boot`](crate::boot), an adoption from
/// [`Inherited`](crate::Inherited), [`Copyover::ready`](crate::Copyover::ready),
/// [`Copyover::restore_from_file`](crate::Copyover::restore_from_file),
/// [`Region::new`](crate::Region::new) or a call of the
/// [`fdstore`](crate::fdstore) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `boot` found other threads running; it must be called first in `main`.
    #[error(
        "copyover::boot must be called before any thread starts (this process has {threads} threads); call it first in main"
    )]
    Threads {
        /// Threads found.
        threads: usize,
    },
    /// The handoff variable could not be parsed.
    #[error(
        "the {var} variable ({value:?}) is malformed: {reason}; unset it unless this process was started by a copyover upgrade"
    )]
    HandoffVar {
        /// The variable's name.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A descriptor the handoff names is not open.
    #[error("the handoff names fd {fd} ({what}) but it is not open in this process: {source}")]
    HandoffFd {
        /// The fd number.
        fd: i32,
        /// What it should have been.
        what: String,
        /// The error from the kernel.
        source: io::Error,
    },
    /// The snapshot could not be read or does not fit this binary.
    #[error("cannot restore from the snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// An inherited descriptor is not what its manifest entry promised.
    #[error("inherited fd {fd} named '{name}' cannot be adopted as {wanted}: {reason}")]
    Adopt {
        /// Its name in the manifest.
        name: String,
        /// Its number.
        fd: i32,
        /// What the application asked for.
        wanted: &'static str,
        /// What it is instead.
        reason: String,
    },
    /// A migration's new process could not take over from the old one
    /// (see [`crate::migration`]). The old process serves on with every
    /// client: end this process (return the error from `main`).
    #[error(
        "this process was started to take over from process {from} but cannot: {reason}; process {from} serves on"
    )]
    Arrival {
        /// The old process.
        from: u32,
        /// What went wrong.
        reason: String,
    },
    /// A system call needed to set up the runtime failed.
    #[error("could not {what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The system error.
        source: io::Error,
    },
}

/// Why an upgrade did not happen (in every case the old image still serves
/// and no client was lost), or why
/// [`Copyover::save_snapshot`](crate::Copyover::save_snapshot) could not
/// save a snapshot file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The binary to execute is missing or not executable.
    #[error(
        "the new binary {path:?} cannot be executed ({source}); install it there or point Config::binary at it"
    )]
    Binary {
        /// The path tried.
        path: PathBuf,
        /// The error from `access(2)`.
        source: io::Error,
    },
    /// The handoff set is inconsistent (a name or fd given twice, a closed fd).
    #[error("the handoff is inconsistent: {reason}")]
    Handoff {
        /// What is wrong.
        reason: String,
    },
    /// The snapshot could not be encoded or written.
    #[error("could not write the snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The new binary refused, or did not answer the probe.
    #[error("the new binary failed the probe: {reason}")]
    Probe {
        /// Its answer, or why there was none.
        reason: String,
    },
    /// SIGTERM or SIGINT arrived while committing; the upgrade was
    /// abandoned so that the shutdown is not lost in the exec.
    #[error("a shutdown was requested during the upgrade; the upgrade was abandoned")]
    Shutdown,
    /// `execve` returned.
    #[error("execve of {path:?} failed ({source}); the old image keeps serving")]
    Exec {
        /// The path executed.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The application abandoned the upgrade before its commit
    /// ([`Copyover::abandon`](crate::Copyover::abandon)): it could not
    /// reach a safe point, say.
    #[error("the server abandoned the upgrade: {reason}")]
    Abandoned {
        /// The application's reason.
        reason: String,
    },
    /// A migration's new process failed after the commit (it refused, died,
    /// or was not ready in time) and was killed; this process serves on
    /// with every client (see [`crate::migration`]).
    #[error("the new process {pid} did not take over: {reason}; this process serves on")]
    Migration {
        /// The new process.
        pid: u32,
        /// What it did.
        reason: String,
    },
    /// A system call around the exec failed, or the snapshot file could not
    /// be written.
    #[error("could not {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system error.
        source: io::Error,
    },
}
