//! The outcome told once, to the log, the status file and `sd_notify`.

use super::*;

/// The log target of the outcome lines.
pub(super) const TARGET: &str = "copyover::runtime";
/// The log target of `upgrade rolled back: REASON`.
pub(super) const ROLLBACK_TARGET: &str = "copyover::resume";

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
/// Tells systemd (its status line) that this process migrated to process
/// `to`: before the migration's last word (`go`, `done`), which the other
/// process answers with its own status line, that must come after this
/// one. One datagram; the status file and the log follow with [`report`].
pub(crate) fn announce_migrated(to: u32) {
    crate::notify::notify(&format!("STATUS={}", Outcome::Migrated { to }.sentence()));
}

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
    match &outcome {
        // Told systemd before the hand-over's last word (`announce_migrated`),
        // so that the new process's status comes after it. The new process
        // says MAINPID= and READY=1 itself, once this one is gone (see
        // `Copyover::ready`).
        Outcome::Migrated { .. } => {}
        _ => crate::notify::notify(&format!("{mainpid}READY=1\nSTATUS={status_text}")),
    }
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
        Outcome::Migrated { to } => tracing::info!(
            target: TARGET,
            generation,
            version = %version,
            to_pid = to,
            "migrated to process {to}: exiting"
        ),
    }
}
