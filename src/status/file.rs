//! A process's status and its file: the format, written and read.

use super::*;

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

pub(super) fn unix_now() -> u64 {
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

/// Whether a failed read of the previous status file is worth a second
/// try: any failure but its absence (a first outcome has no file to read).
pub(super) fn read_again(e: &io::Error) -> bool {
    e.kind() != io::ErrorKind::NotFound
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

    pub(super) fn parse(text: &str) -> io::Result<Status> {
        let mut s = Status::default();
        let mut format = None;
        let (mut word, mut from, mut reason) = (String::new(), String::new(), String::new());
        let mut blackout_ms = 0.0;
        let mut migrated_to = 0;
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
                "migrated_to" => migrated_to = num() as u32,
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
            "migrated" if migrated_to > 0 => Outcome::Migrated { to: migrated_to },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown outcome {other:?}"),
                ));
            }
        };
        Ok(s)
    }

    pub(super) fn render(&self) -> String {
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
        if let Outcome::Migrated { to } = self.outcome {
            let _ = writeln!(text, "migrated_to={to}");
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
    pub(super) fn publish(mut self) {
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

    pub(super) fn try_publish(&mut self, dir: &Path, path: &Path) -> io::Result<()> {
        // Each read is tried twice: a status file whose sequence restarted
        // would hide this outcome from `copyover upgrade`.
        let previous = crate::sys::once_more(|| Status::read(path), read_again)
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
