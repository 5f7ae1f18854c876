//! What an upgrade came to ([`Outcome`]), with its phases.

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
    /// After a failed migration: the new process was killed and this one
    /// serves on.
    RolledBack {
        /// Why the new image failed.
        reason: String,
    },
    /// This process handed everything to a new process and exited
    /// (`migrated`; see [`crate::migration`]). The new process reports its
    /// own `complete` in its own status file.
    Migrated {
        /// The new process.
        to: u32,
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
    /// The word the status file uses: `started`, `complete`, `refused`,
    /// `rolled back` or `migrated`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Started => "started",
            Outcome::Complete { .. } => "complete",
            Outcome::Refused { .. } => "refused",
            Outcome::RolledBack { .. } => "rolled back",
            Outcome::Migrated { .. } => "migrated",
        }
    }

    /// Whether it ends an upgrade (complete, refused, rolled back or
    /// migrated).
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
            Outcome::Migrated { to } => format!("migrated to process {to}"),
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
