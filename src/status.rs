//! The status file: what a copyover process tells its operator, and the
//! channel the `copyover` CLI reads.
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
//! seq=7                        (increases with every outcome)
//! outcome=complete             (started | complete | refused | rolled back)
//! from_version=v1
//! blackout_ms=1.02
//! reason=                      (for refused and rolled back)
//! updated_at=1764000123
//! ```

use std::io;
use std::path::{Path, PathBuf};

/// The environment variable that overrides the status directory.
pub const STATUS_DIR_VAR: &str = "COPYOVER_STATUS_DIR";

/// The status directory for this user (see the module docs).
pub fn status_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATUS_DIR_VAR) {
        return PathBuf::from(dir);
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
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

/// A process's status, as written to its status file.
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// Increases with every outcome.
    pub seq: u64,
    /// `started`, `complete`, `refused` or `rolled back`.
    pub outcome: String,
    /// For `complete`: the version upgraded from.
    pub from_version: String,
    /// For `complete`: the blackout in milliseconds.
    pub blackout_ms: f64,
    /// For `refused` and `rolled back`: why.
    pub reason: String,
    /// Unix seconds of this outcome.
    pub updated_at: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Status {
    /// Reads a status file.
    ///
    /// # Errors
    ///
    /// The I/O error (`NotFound` for a process that is not a copyover
    /// process, or runs under another status directory), or `InvalidData`.
    pub fn read(path: &Path) -> io::Result<Status> {
        let text = std::fs::read_to_string(path)?;
        let mut s = Status::default();
        let mut format = None;
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let num = || v.parse::<u64>().unwrap_or(0);
            match k {
                "format" => format = Some(v.to_owned()),
                "pid" => s.pid = num() as u32,
                "app" => s.app = v.into(),
                "version" => s.version = v.into(),
                "generation" => s.generation = num(),
                "started_at" => s.started_at = num(),
                "seq" => s.seq = num(),
                "outcome" => s.outcome = v.into(),
                "from_version" => s.from_version = v.into(),
                "blackout_ms" => s.blackout_ms = v.parse().unwrap_or(0.0),
                "reason" => s.reason = v.into(),
                "updated_at" => s.updated_at = num(),
                _ => {}
            }
        }
        if format.as_deref() != Some("1") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a copyover status file (format 1)",
            ));
        }
        Ok(s)
    }

    fn render(&self) -> String {
        let clean = |v: &str| v.replace(['\n', '\r'], " ");
        format!(
            "format=1\npid={}\napp={}\nversion={}\ngeneration={}\nstarted_at={}\nseq={}\noutcome={}\nfrom_version={}\nblackout_ms={:.3}\nreason={}\nupdated_at={}\n",
            self.pid,
            clean(&self.app),
            clean(&self.version),
            self.generation,
            self.started_at,
            self.seq,
            clean(&self.outcome),
            clean(&self.from_version),
            self.blackout_ms,
            clean(&self.reason),
            self.updated_at
        )
    }

    /// Publishes this status for this process: continues the sequence and
    /// start time of the file the PID's previous image left, and replaces
    /// the file atomically. Failures are logged, never fatal.
    pub(crate) fn publish(mut self) {
        let dir = status_dir();
        let path = status_path(&dir, self.pid);
        let previous = Status::read(&path).ok().filter(|p| p.pid == self.pid);
        self.seq = previous.as_ref().map_or(1, |p| p.seq + 1);
        self.started_at = previous.as_ref().map_or_else(unix_now, |p| p.started_at);
        self.updated_at = unix_now();
        let tmp = dir.join(format!(".{}.status.tmp", self.pid));
        let result = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, self.render()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::debug!(path = ?path, "could not write the status file: {e}");
        }
    }

    /// Removes this process's status file (on shutdown).
    pub(crate) fn remove(pid: u32) {
        let _ = std::fs::remove_file(status_path(&status_dir(), pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_refuses_other_files() {
        let s = Status {
            pid: 7,
            app: "a".into(),
            version: "v2".into(),
            generation: 3,
            started_at: 10,
            seq: 4,
            outcome: "refused".into(),
            from_version: String::new(),
            blackout_ms: 1.5,
            reason: "two\nlines".into(),
            updated_at: 11,
        };
        let dir = std::env::temp_dir().join(format!("copyover-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("7.status");
        std::fs::write(&path, s.render()).unwrap();
        let back = Status::read(&path).unwrap();
        assert_eq!(back.reason, "two lines");
        assert_eq!(back.generation, 3);
        std::fs::write(&path, "hello=1\n").unwrap();
        assert_eq!(
            Status::read(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
