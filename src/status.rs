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
const MAX_LEN: u64 = 64 * 1024;

/// The format this runtime writes and reads (see the module docs).
const FORMAT: &str = "1";

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

/// What an upgrade came to (or `Started`, for a process that has not been
/// upgraded yet), with what an operator wants to know about it: the one
/// answer the log's outcome line, the status file, `sd_notify`'s `STATUS=`
/// and the `copyover` CLI all give (the runtime reports it to all three
/// from one place).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Serving, no upgrade yet (`started`).
    #[default]
    Started,
    /// The new image is ready (`complete`).
    Complete {
        /// The version upgraded from.
        from: String,
        /// The version now running.
        to: String,
        /// The new image's generation.
        generation: u64,
        /// From the commit to the new image's `ready`, in milliseconds:
        /// the time no client was served.
        blackout_ms: f64,
        /// Where the time went, where known.
        phases: Phases,
    },
    /// The probe or the commit refused the new binary; the old image never
    /// stopped serving (`refused`).
    Refused {
        /// Why, as the log says it.
        reason: String,
    },
    /// The new image failed; the old binary runs again (`rolled back`).
    RolledBack {
        /// Why the new image failed.
        reason: String,
    },
}

/// Where the time of a complete upgrade went, in milliseconds. `None` where
/// unknown (a status file written by a runtime that did not record it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Phases {
    /// From the request (SIGHUP) to `ready`: the probe, the commit and the
    /// three phases below.
    pub total_ms: Option<f64>,
    /// From the commit to the new image's `boot`: the snapshot, the exec.
    pub exec_ms: Option<f64>,
    /// From `boot` to the state restored.
    pub restore_ms: Option<f64>,
    /// From the state restored to `ready`: the application adopts its
    /// descriptors.
    pub adopt_ms: Option<f64>,
    /// From the commit to the holder's start (part of `exec_ms`): the
    /// moment of the upgrade when a SIGKILL of the server is a crash of a
    /// serving server, which only an fd store survives; from the holder's
    /// start on, the holder rescues.
    pub unheld_ms: Option<f64>,
}

impl Outcome {
    /// The word the status file uses: `started`, `complete`, `refused` or
    /// `rolled back`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Started => "started",
            Outcome::Complete { .. } => "complete",
            Outcome::Refused { .. } => "refused",
            Outcome::RolledBack { .. } => "rolled back",
        }
    }

    /// Whether it ends an upgrade (complete, refused or rolled back).
    pub fn ends_an_upgrade(&self) -> bool {
        !matches!(self, Outcome::Started)
    }

    /// Whether the upgrade went through.
    pub fn is_complete(&self) -> bool {
        matches!(self, Outcome::Complete { .. })
    }

    /// The outcome as one sentence, as the log line, `systemctl status`
    /// and the `copyover` CLI say it: `upgrade complete: v1 to v2,
    /// generation 3, blackout 1.02 ms`, `upgrade refused: REASON`,
    /// `upgrade rolled back: REASON`, or `started`.
    pub fn sentence(&self) -> String {
        match self {
            Outcome::Started => "started".into(),
            Outcome::Complete {
                from,
                to,
                generation,
                blackout_ms,
                ..
            } => format!(
                "upgrade complete: {from} to {to}, generation {generation}, blackout {blackout_ms:.2} ms"
            ),
            Outcome::Refused { reason } => format!("upgrade refused: {reason}"),
            Outcome::RolledBack { reason } => format!("upgrade rolled back: {reason}"),
        }
    }

    /// Why the upgrade did not go through (refused, rolled back).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Refused { reason } | Outcome::RolledBack { reason } => Some(reason),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares the outcome's word (`status.outcome == "refused"`).
impl PartialEq<&str> for Outcome {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

/// A process's status, as written to its status file.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// The process.
    pub pid: u32,
    /// The application name.
    pub app: String,
    /// The running version label.
    pub version: String,
    /// Upgrades since the first start.
    pub generation: u64,
    /// Unix seconds when the PID first started.
    pub started_at: u64,
    /// The process's start time, in clock ticks after boot (field 22 of
    /// `/proc/PID/stat`): with the PID, it names one process for good.
    pub start_ticks: u64,
    /// Increases with every outcome.
    pub seq: u64,
    /// What the last upgrade (or the start) came to.
    pub outcome: Outcome,
    /// Unix seconds of this outcome.
    pub updated_at: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the status file of process `pid` in the status directory
/// ([`status_dir`]).
///
/// # Errors
///
/// As [`Status::read`].
pub fn read(pid: u32) -> io::Result<Status> {
    Status::read(&status_path(&status_dir(), pid))
}

impl Status {
    /// Reads a status file.
    ///
    /// # Errors
    ///
    /// The I/O error (`NotFound` for a process that is not a copyover
    /// process, or runs under another status directory), or `InvalidData`.
    pub fn read(path: &Path) -> io::Result<Status> {
        Status::parse(&read_bounded(path)?)
    }

    fn parse(text: &str) -> io::Result<Status> {
        let mut s = Status::default();
        let mut format = None;
        let (mut word, mut from, mut reason) = (String::new(), String::new(), String::new());
        let mut blackout_ms = 0.0;
        let mut phases = Phases::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let num = || v.parse::<u64>().unwrap_or(0);
            let ms = || v.parse::<f64>().ok();
            match k {
                "format" => format = Some(v.to_owned()),
                "pid" => s.pid = num() as u32,
                "app" => s.app = v.into(),
                "version" => s.version = v.into(),
                "generation" => s.generation = num(),
                "started_at" => s.started_at = num(),
                "start_ticks" => s.start_ticks = num(),
                "seq" => s.seq = num(),
                "outcome" => word = v.into(),
                "from_version" => from = v.into(),
                "blackout_ms" => blackout_ms = ms().unwrap_or(0.0),
                "total_ms" => phases.total_ms = ms(),
                "exec_ms" => phases.exec_ms = ms(),
                "restore_ms" => phases.restore_ms = ms(),
                "adopt_ms" => phases.adopt_ms = ms(),
                "unheld_ms" => phases.unheld_ms = ms(),
                "reason" => reason = v.into(),
                "updated_at" => s.updated_at = num(),
                _ => {}
            }
        }
        if format.as_deref() != Some(FORMAT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a copyover status file (format {FORMAT})"),
            ));
        }
        s.outcome = match word.as_str() {
            "started" => Outcome::Started,
            "complete" => Outcome::Complete {
                from,
                to: s.version.clone(),
                generation: s.generation,
                blackout_ms,
                phases,
            },
            "refused" => Outcome::Refused { reason },
            "rolled back" => Outcome::RolledBack { reason },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown outcome {other:?}"),
                ));
            }
        };
        Ok(s)
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let clean = |v: &str| v.replace(['\n', '\r'], " ");
        let (from, blackout_ms, phases) = match &self.outcome {
            Outcome::Complete {
                from,
                blackout_ms,
                phases,
                ..
            } => (from.as_str(), *blackout_ms, *phases),
            _ => ("", 0.0, Phases::default()),
        };
        let mut text = format!(
            "format={FORMAT}\npid={}\napp={}\nversion={}\ngeneration={}\nstarted_at={}\nstart_ticks={}\nseq={}\noutcome={}\nfrom_version={}\nblackout_ms={blackout_ms:.3}\n",
            self.pid,
            clean(&self.app),
            clean(&self.version),
            self.generation,
            self.started_at,
            self.start_ticks,
            self.seq,
            self.outcome.as_str(),
            clean(from),
        );
        for (key, value) in [
            ("total_ms", phases.total_ms),
            ("exec_ms", phases.exec_ms),
            ("restore_ms", phases.restore_ms),
            ("adopt_ms", phases.adopt_ms),
            ("unheld_ms", phases.unheld_ms),
        ] {
            if let Some(v) = value {
                let _ = writeln!(text, "{key}={v:.3}");
            }
        }
        let _ = write!(
            text,
            "reason={}\nupdated_at={}\n",
            clean(self.outcome.reason().unwrap_or("")),
            self.updated_at
        );
        text
    }

    /// Publishes this status for this process: continues the sequence and
    /// start time of the file the PID's previous image left, and replaces
    /// the file atomically. Failures are logged, never fatal, and nothing
    /// here blocks (see "Safety of the channel").
    /// Writes the status file. A failure is tried once more (like each
    /// read): an outcome missing from the file leaves `copyover upgrade`
    /// and `systemctl reload` without an answer. Then it is only logged.
    fn publish(mut self) {
        let dir = status_dir();
        let path = status_path(&dir, self.pid);
        if let Err(e) = crate::sys::once_more(|| check_dir(&dir), |_| true) {
            tracing::warn!(dir = ?dir, "not writing the status file: {e}");
            return;
        }
        let written = crate::sys::once_more(|| self.try_publish(&dir, &path), |_| true);
        if let Err(e) = written {
            tracing::warn!(path = ?path, "could not write the status file: {e}");
        }
    }

    fn try_publish(&mut self, dir: &Path, path: &Path) -> io::Result<()> {
        // Each read is tried twice: a status file whose sequence restarted
        // would hide this outcome from `copyover upgrade`.
        let previous = crate::sys::once_more(
            || Status::read(path),
            |e| e.kind() != io::ErrorKind::NotFound,
        )
        .ok()
        .filter(|p| p.pid == self.pid);
        self.start_ticks = crate::sys::once_more(|| start_ticks(self.pid), |_| true).unwrap_or(0);
        let same_process = previous
            .as_ref()
            .is_some_and(|p| p.start_ticks == self.start_ticks);
        let previous = previous.filter(|_| same_process);
        self.seq = previous.as_ref().map_or(1, |p| p.seq + 1);
        self.started_at = previous.as_ref().map_or_else(unix_now, |p| p.started_at);
        self.updated_at = unix_now();
        write_replacing(dir, path, self.render().as_bytes(), false)
    }

    /// Removes this process's status file (on shutdown).
    pub(crate) fn remove(pid: u32) {
        let dir = status_dir();
        if check_dir(&dir).is_ok() {
            let _ = std::fs::remove_file(status_path(&dir, pid));
        }
    }
}

/// The log target of the outcome lines.
const TARGET: &str = "copyover::runtime";
/// The log target of `upgrade rolled back: REASON`.
const ROLLBACK_TARGET: &str = "copyover::resume";

/// The process an outcome is about, and what only the log line and
/// `sd_notify` add to it (not kept in the status file).
#[derive(Debug)]
pub(crate) struct Reporter {
    pub(crate) app: String,
    pub(crate) version: String,
    pub(crate) generation: u64,
    /// The binary the next upgrade executes (`started`'s log line).
    pub(crate) binary: std::path::PathBuf,
    /// Refused: milliseconds since the upgrade was asked for
    /// (`elapsed_ms`). Rolled back: from the commit to serving again
    /// (`blackout_ms`).
    pub(crate) elapsed_ms: f64,
    /// Rolled back by the holder under a new PID: `sd_notify` gets
    /// `MAINPID=`, the log `rescued=true`.
    pub(crate) rescued: bool,
}

/// Reports an outcome, in this order, to the status file, to `sd_notify`
/// (`READY=1` and `STATUS=`) and to the log (scripts parse these lines:
/// their words and fields are kept from version to version):
///
/// * `serving` (`generation`, `version`, `binary`);
/// * `upgrade complete` (`generation`, `from_version`, `to_version`,
///   `blackout_ms`, `total_ms`, `exec_ms`, `restore_ms`, `adopt_ms`);
/// * `upgrade refused: REASON` (`generation`, `version`, `elapsed_ms`);
/// * `upgrade rolled back: REASON` (`version`), then `serving again after
///   the rollback` (`generation`, `version`, `rescued`, `blackout_ms`).
///
/// The status file is written first: whoever sees the log line finds the
/// file up to date.
///
/// The lines keep the targets they had when the runtime wrote them itself
/// ([`TARGET`], [`ROLLBACK_TARGET`]), so that a `RUST_LOG` filter written for
/// them still matches.
pub(crate) fn report(outcome: Outcome, who: &Reporter) {
    let status_text = match &outcome {
        Outcome::Started => format!("serving {} (generation {})", who.version, who.generation),
        other => other.sentence(),
    };
    Status {
        pid: std::process::id(),
        app: who.app.clone(),
        version: who.version.clone(),
        generation: who.generation,
        outcome: outcome.clone(),
        ..Default::default()
    }
    .publish();
    let mainpid = if who.rescued {
        format!("MAINPID={}\n", std::process::id())
    } else {
        String::new()
    };
    crate::notify::notify(&format!("{mainpid}READY=1\nSTATUS={status_text}"));
    let (generation, version) = (who.generation, who.version.as_str());
    let ms = |v: Option<f64>| v.unwrap_or(0.0);
    match outcome {
        Outcome::Started => {
            tracing::info!(target: TARGET, generation, version = %version, binary = ?who.binary, "serving")
        }
        Outcome::Complete {
            from,
            to,
            generation,
            blackout_ms,
            phases,
        } => tracing::info!(
            target: TARGET,
            generation,
            from_version = %from,
            to_version = %to,
            blackout_ms,
            total_ms = ms(phases.total_ms),
            exec_ms = ms(phases.exec_ms),
            restore_ms = ms(phases.restore_ms),
            adopt_ms = ms(phases.adopt_ms),
            unheld_ms = ms(phases.unheld_ms),
            "upgrade complete"
        ),
        Outcome::Refused { reason } => tracing::warn!(
            target: TARGET,
            generation,
            version = %version,
            elapsed_ms = who.elapsed_ms,
            "upgrade refused: {reason}"
        ),
        Outcome::RolledBack { reason } => {
            tracing::warn!(target: ROLLBACK_TARGET, version = %version, "upgrade rolled back: {reason}");
            tracing::info!(
                target: TARGET,
                generation,
                version = %version,
                rescued = who.rescued,
                blackout_ms = who.elapsed_ms,
                "serving again after the rollback"
            );
        }
    }
}

/// The start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), or an error if there is no such process.
pub fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// Asks the process a status file describes for an upgrade (SIGHUP), only
/// if it is still that process: the PID is pinned with a pidfd first, then
/// its start time is compared with the file's, then the signal goes
/// through the pidfd. A server that died and whose PID was reused is never
/// signalled (SIGHUP's default action kills).
///
/// # Errors
///
/// `NotFound` if there is no such process, `InvalidData` if the process is
/// not the one that wrote the status (its PID was reused), or the error of
/// `pidfd_open` / `pidfd_send_signal` (`EPERM`: another user's process).
pub fn request_upgrade(status: &Status) -> io::Result<()> {
    let pid = i32::try_from(status.pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a PID"))?;
    let pidfd = crate::sys::pidfd_open(pid)?;
    let actual = start_ticks(status.pid)?;
    if status.start_ticks == 0 || actual != status.start_ticks {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "process {} started at tick {actual}, its status file says {}: the PID was reused",
                status.pid, status.start_ticks
            ),
        ));
    }
    use std::os::fd::AsFd;
    crate::sys::pidfd_signal(pidfd.as_fd(), libc::SIGHUP)
}

/// Creates `dir` (mode 0700) if needed, and checks that it is a directory
/// (not a symlink) owned by this user that nobody else can write to.
fn check_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = crate::sys::effective_uid();
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if !meta.file_type().is_dir() {
        return refuse(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != uid {
        return refuse(format!(
            "{} belongs to uid {}, not to this process's uid {uid}: remove it or set {STATUS_DIR_VAR}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "{} can be written by others (mode {:o}): chmod 700 it or set {STATUS_DIR_VAR}",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Writes `bytes` to a fresh file in `dir` (`O_EXCL|O_NOFOLLOW`, mode
/// 0600), optionally fsyncs it, and renames it over `path`: readers see the
/// old file or the new one, and nothing planted at either name is followed.
pub(crate) fn write_replacing(dir: &Path, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{:x}.tmp",
        std::process::id(),
        crate::sys::monotonic_ns()
    ));
    write_through(&tmp, path, bytes, sync)
}

/// [`write_replacing`] through the temporary name `tmp`: created new
/// (`O_CREAT|O_EXCL`, so nothing planted there is reused or followed, and
/// `O_NOFOLLOW` besides), written, renamed over `path` (a symlink planted at
/// `path` is replaced, never followed).
fn write_through(tmp: &Path, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
    // Closed before it appears under its name: whoever sees the new file
    // (and counts this process's descriptors) sees the final ones.
    drop(file);
    let written = written.and_then(|()| std::fs::rename(tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Reads a small regular file without following a symlink or blocking on a
/// FIFO, and at most [`MAX_LEN`] bytes.
fn read_bounded(path: &Path) -> io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    file.take(MAX_LEN).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the target dir, with a victim file in it.
    fn planted(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "copyover-status-{name}-{}-{:x}",
            std::process::id(),
            crate::sys::monotonic_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        (dir, victim)
    }

    #[test]
    fn outcomes_say_what_they_are() {
        let complete = Outcome::Complete {
            from: "v1".into(),
            to: "v2".into(),
            generation: 1,
            blackout_ms: 1.0,
            phases: Phases::default(),
        };
        let refused = Outcome::Refused {
            reason: "no".into(),
        };
        assert!(complete.ends_an_upgrade() && complete.is_complete());
        assert!(refused.ends_an_upgrade() && !refused.is_complete());
        assert!(!Outcome::Started.ends_an_upgrade() && !Outcome::Started.is_complete());
        assert_eq!(complete.to_string(), "complete");
        assert_eq!(refused.to_string(), "refused");
        assert!(complete == "complete" && complete != "refused");
        assert_eq!((complete.reason(), refused.reason()), (None, Some("no")));
        assert_eq!(
            status_path(Path::new("/run/x"), 42),
            Path::new("/run/x/42.status")
        );
    }

    #[test]
    fn a_long_status_file_is_read_up_to_its_cap() {
        let (dir, _) = planted("long");
        let path = dir.join("1.status");
        let status = Status {
            pid: 1,
            app: "a".into(),
            outcome: Outcome::Refused {
                reason: "r".repeat(4000),
            },
            ..Default::default()
        };
        std::fs::write(&path, status.render()).unwrap();
        assert_eq!(Status::read(&path).unwrap(), status);
        std::fs::write(&path, "x".repeat(MAX_LEN as usize + 1)).unwrap();
        assert!(Status::read(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn publishing_continues_the_sequence_of_the_same_process_only() {
        let (dir, _) = planted("publish");
        let pid = std::process::id();
        let path = status_path(&dir, pid);
        let fresh = || Status {
            pid,
            app: "a".into(),
            ..Default::default()
        };
        fresh().try_publish(&dir, &path).unwrap();
        let first = Status::read(&path).unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(first.start_ticks, start_ticks(pid).unwrap());
        assert!(first.started_at > 1_600_000_000 && first.updated_at >= first.started_at);
        fresh().try_publish(&dir, &path).unwrap();
        let second = Status::read(&path).unwrap();
        assert_eq!((second.seq, second.started_at), (2, first.started_at));
        // A file another process of this PID left (another start time):
        // the sequence starts again.
        let stale = Status {
            start_ticks: first.start_ticks + 1,
            seq: 9,
            started_at: 5,
            ..second.clone()
        };
        std::fs::write(&path, stale.render()).unwrap();
        fresh().try_publish(&dir, &path).unwrap();
        let third = Status::read(&path).unwrap();
        assert_eq!(third.seq, 1);
        assert_ne!(third.started_at, 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn root_writes_under_run_unless_told_otherwise() {
        // The other branches depend on the environment the tests run in.
        if std::env::var_os(STATUS_DIR_VAR).is_none() && crate::sys::real_uid() == 0 {
            assert_eq!(status_dir(), Path::new("/run/copyover"));
        }
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_not_followed() {
        let (dir, victim) = planted("tmp-link");
        let (tmp, path) = (dir.join(".s.tmp"), dir.join("s"));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(write_through(&tmp, &path, b"new", false).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_at_the_temporary_name_is_not_reused() {
        // Planted by somebody else, it would become the status file, theirs
        // to change.
        let (dir, _) = planted("tmp-file");
        let (tmp, path) = (dir.join(".s.tmp"), dir.join("s"));
        std::fs::write(&tmp, "planted").unwrap();
        let err = write_through(&tmp, &path, b"new", false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_final_name_is_replaced_not_followed() {
        let (dir, victim) = planted("final-link");
        let path = dir.join("s");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_replacing(&dir, &path, b"new", false).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o777 == 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn status(outcome: Outcome) -> Status {
        Status {
            pid: 7,
            app: "a".into(),
            version: "v2".into(),
            generation: 3,
            started_at: 10,
            start_ticks: 99,
            seq: 4,
            outcome,
            updated_at: 11,
        }
    }

    #[test]
    fn every_outcome_round_trips() {
        let complete = Outcome::Complete {
            from: "v1".into(),
            to: "v2".into(),
            generation: 3,
            blackout_ms: 1.5,
            phases: Phases {
                total_ms: Some(200.0),
                exec_ms: Some(0.5),
                restore_ms: Some(0.25),
                adopt_ms: Some(0.75),
                unheld_ms: Some(0.125),
            },
        };
        for outcome in [
            Outcome::Started,
            complete,
            Outcome::Refused {
                reason: "the probe said no".into(),
            },
            Outcome::RolledBack {
                reason: "the new image panicked".into(),
            },
        ] {
            let s = status(outcome);
            assert_eq!(Status::parse(&s.render()).unwrap(), s);
        }
    }

    #[test]
    fn a_reason_stays_on_one_line() {
        let s = status(Outcome::Refused {
            reason: "two\nlines".into(),
        });
        let back = Status::parse(&s.render()).unwrap();
        assert_eq!(back.outcome.reason(), Some("two lines"));
        assert_eq!(back.outcome, "refused");
    }

    #[test]
    fn the_first_form_of_format_1_still_reads() {
        // As the first runtimes wrote it: no phase keys.
        let old = "format=1\npid=7\napp=a\nversion=v2\ngeneration=3\nstarted_at=10\nstart_ticks=99\nseq=4\noutcome=complete\nfrom_version=v1\nblackout_ms=1.020\nreason=\nupdated_at=11\n";
        let s = Status::parse(old).unwrap();
        assert_eq!(
            s.outcome,
            Outcome::Complete {
                from: "v1".into(),
                to: "v2".into(),
                generation: 3,
                blackout_ms: 1.02,
                phases: Phases::default(),
            }
        );
        let old = old.replace("outcome=complete", "outcome=rolled back");
        let old = old.replace("reason=\n", "reason=it crashed\n");
        assert_eq!(
            Status::parse(&old).unwrap().outcome,
            Outcome::RolledBack {
                reason: "it crashed".into()
            }
        );
    }

    #[test]
    fn other_files_and_formats_are_refused() {
        for text in [
            "hello=1\n",
            "format=2\noutcome=started\n",
            "format=1\noutcome=exploded\n",
        ] {
            assert_eq!(
                Status::parse(text).unwrap_err().kind(),
                io::ErrorKind::InvalidData,
                "{text}"
            );
        }
    }

    #[test]
    fn a_status_file_is_read_from_disk() {
        let s = status(Outcome::Started);
        let dir = std::env::temp_dir().join(format!("copyover-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("7.status");
        std::fs::write(&path, s.render()).unwrap();
        assert_eq!(Status::read(&path).unwrap(), s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
