//! The environment variables that cross the commit's exec beside the
//! snapshot, written by the old image and read by `boot`: a spec, since two
//! builds must agree on them.
//!
//! # The handoff variable, version 1
//!
//! `COPYOVER_HANDOFF=1:pid=PID:snapshot=FD:binary=FD:mode=MODE`
//!
//! * `pid`: the process that executed the new image. A process whose PID
//!   differs inherited the variable by mistake and starts fresh.
//! * `snapshot`: the sealed memfd holding the snapshot.
//! * `binary`: the previous binary, opened at its start-up, executed again
//!   if the new image fails before it is ready (rollback).
//! * `mode`: `upgrade` (a new binary starts) or `rollback` (the previous
//!   binary comes back after a failed upgrade; the reason is in
//!   `COPYOVER_ROLLBACK_REASON`).
//!
//! Optional fields, in this order when present:
//!
//! * `holder=PID`: the holder child that keeps the old image's descriptors
//!   and memory until an image is ready (see `sys::holder`); the image that
//!   becomes ready kills it.
//! * `exec=FD`: a sealed memfd holding the old image's argument vector and
//!   environment (see `upgrade::record`): a rollback starts the old
//!   binary exactly as it ran, whatever a wrapper script changed for the new
//!   one (an `LD_PRELOAD`, arguments). The image that becomes ready closes
//!   it.
//! * `nofile=N`: the old image's soft `RLIMIT_NOFILE`, put back before a
//!   rollback's exec (a new image started with a lower limit must not hand
//!   the old code a limit it cannot run under).
//! * `script=FD`: the new binary is a script, executed from this fd (its
//!   interpreter reads it as `/dev/fd/FD`); the image closes it at once.
//! * `rescued=1`: the holder started this (old) binary under its own PID
//!   after the new image died before it was ready, or missed the holder's
//!   deadline.
//!
//! # The claim variable, version 1
//!
//! `COPYOVER_CLAIM=1:claim=FD:held=NS`, beside the handoff variable after
//! a commit (and a rollback of it); a variable of its own, so that an older
//! build, whose handoff parser refuses fields it does not know, still
//! reads the handoff variable (it ignores this one, and the holder's
//! deadline still applies to it).
//!
//! * `claim`: the readiness claim, a pipe holding one byte (see
//!   `sys::claim`). The image that becomes ready reads the byte before it
//!   kills the holder; the holder reads it at its deadline before it kills
//!   the server's process. Whoever gets it ends the upgrade. A rescued
//!   image has none (there is no holder any more).
//! * `held`: when the holder started (`CLOCK_MONOTONIC`, nanoseconds), for
//!   the outcome's `unheld_ms`.
//!
//! A rollback hands the old binary the variable the old image wrote, with
//! `mode=rollback` and without `script=`. A build refuses a field it does
//! not know, so whatever an image could read it can write back whole: the
//! old code gets every field it wrote.
//!
//! The runtime removes both variables from the environment as soon as it has
//! read them, so they never reach a child process.

use std::os::fd::RawFd;

use crate::env::HANDOFF_VAR;
use crate::error::Error;

/// Why the new image was started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    #[default]
    Upgrade,
    Rollback,
}

/// The parsed handoff variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HandoffVar {
    pub pid: i32,
    pub snapshot_fd: RawFd,
    pub binary_fd: RawFd,
    pub mode: Mode,
    pub holder: Option<i32>,
    pub exec: Option<RawFd>,
    pub nofile: Option<u64>,
    pub script: Option<RawFd>,
    pub rescued: bool,
}

/// The parsed claim variable (see the [module docs](self#the-claim-variable-version-1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimVar {
    pub claim: RawFd,
    pub held_at: u64,
}

impl ClaimVar {
    /// The variable's value.
    pub(crate) fn format(&self) -> String {
        format!("1:claim={}:held={}", self.claim, self.held_at)
    }

    /// Parses the value; `None` for anything else than version 1 with both
    /// fields (an unreadable claim is no claim: see `take_claim`).
    pub(crate) fn parse(value: &str) -> Option<ClaimVar> {
        let rest = value.strip_prefix("1:")?;
        let (mut claim, mut held_at) = (None, None);
        for part in rest.split(':') {
            match part.split_once('=')? {
                ("claim", v) => claim = v.parse::<RawFd>().ok().filter(|fd| *fd >= 0),
                ("held", v) => held_at = v.parse().ok(),
                _ => return None,
            }
        }
        Some(ClaimVar {
            claim: claim?,
            held_at: held_at?,
        })
    }
}

impl HandoffVar {
    /// The variable's value.
    pub(crate) fn format(&self) -> String {
        let mut text = format!("1:pid={}", self.pid);
        text.push_str(&self.format_after_pid());
        text
    }

    /// Everything after the PID, from `:snapshot=` on (the holder writes its
    /// own PID in front of it).
    pub(crate) fn format_after_pid(&self) -> String {
        let mode = match self.mode {
            Mode::Upgrade => "upgrade",
            Mode::Rollback => "rollback",
        };
        let mut text = format!(
            ":snapshot={}:binary={}:mode={mode}",
            self.snapshot_fd, self.binary_fd
        );
        if let Some(pid) = self.holder {
            text.push_str(&format!(":holder={pid}"));
        }
        if let Some(fd) = self.exec {
            text.push_str(&format!(":exec={fd}"));
        }
        if let Some(n) = self.nofile {
            text.push_str(&format!(":nofile={n}"));
        }
        if let Some(fd) = self.script {
            text.push_str(&format!(":script={fd}"));
        }
        if self.rescued {
            text.push_str(":rescued=1");
        }
        text
    }

    /// The variable a rollback hands the old binary: this one with
    /// `mode=rollback` and without `script=` (the new binary's, closed by
    /// now). The parser refuses fields it does not know, so a variable this
    /// image could read is rendered back whole.
    pub(crate) fn for_rollback(&self) -> HandoffVar {
        HandoffVar {
            mode: Mode::Rollback,
            script: None,
            ..self.clone()
        }
    }

    pub(crate) fn parse(value: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::HandoffVar {
            var: HANDOFF_VAR,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = value.split(':');
        if parts.next() != Some("1") {
            return Err(bad("it does not start with format version 1"));
        }
        let (mut pid, mut snapshot, mut binary, mut mode) = (None, None, None, None);
        let mut var = HandoffVar::default();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("a field is not KEY=VALUE"))?;
            let num = || {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad(&format!("{k} is not a non-negative number")))
            };
            match k {
                "pid" => pid = Some(num()?),
                "snapshot" => snapshot = Some(num()?),
                "binary" => binary = Some(num()?),
                "holder" => var.holder = Some(num()?),
                "exec" => var.exec = Some(num()?),
                "script" => var.script = Some(num()?),
                "nofile" => {
                    var.nofile = Some(
                        v.parse::<u64>()
                            .map_err(|_| bad("nofile is not a non-negative number"))?,
                    )
                }
                "rescued" => var.rescued = v == "1",
                "mode" => {
                    mode = Some(match v {
                        "upgrade" => Mode::Upgrade,
                        "rollback" => Mode::Rollback,
                        _ => return Err(bad("mode is neither upgrade nor rollback")),
                    })
                }
                _ => return Err(bad(&format!("unknown field {k}"))),
            }
        }
        if snapshot.is_some() && snapshot == binary {
            return Err(bad("snapshot and binary name the same fd"));
        }
        if var.script.is_some() && (var.script == snapshot || var.script == binary) {
            return Err(bad("script names the fd of the snapshot or the binary"));
        }
        var.pid = pid.ok_or_else(|| bad("pid is missing"))?;
        var.snapshot_fd = snapshot.ok_or_else(|| bad("snapshot is missing"))?;
        var.binary_fd = binary.ok_or_else(|| bad("binary is missing"))?;
        var.mode = mode.ok_or_else(|| bad("mode is missing"))?;
        Ok(var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_var_round_trips() {
        let v = HandoffVar {
            pid: 42,
            snapshot_fd: 5,
            binary_fd: 6,
            mode: Mode::Rollback,
            ..Default::default()
        };
        assert_eq!(v.format(), "1:pid=42:snapshot=5:binary=6:mode=rollback");
        assert_eq!(HandoffVar::parse(&v.format()).unwrap(), v);
        let full = HandoffVar {
            mode: Mode::Upgrade,
            holder: Some(43),
            exec: Some(8),
            nofile: Some(1024),
            script: Some(7),
            rescued: true,
            ..v
        };
        assert_eq!(HandoffVar::parse(&full.format()).unwrap(), full);
    }

    #[test]
    fn the_claim_variable_round_trips_and_refuses_garbage() {
        let v = ClaimVar {
            claim: 9,
            held_at: 123_456_789,
        };
        assert_eq!(v.format(), "1:claim=9:held=123456789");
        assert_eq!(ClaimVar::parse(&v.format()), Some(v));
        for bad in [
            "",
            "2:claim=9:held=1",
            "1:claim=9",
            "1:held=1",
            "1:claim=-1:held=1",
            "1:claim=x:held=1",
            "1:claim=9:held=1:more=2",
        ] {
            assert_eq!(ClaimVar::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_script_fd_that_names_the_snapshot_or_the_binary_is_refused() {
        let base = "1:pid=1:snapshot=3:binary=4:mode=upgrade";
        assert!(HandoffVar::parse(&format!("{base}:script=5")).is_ok());
        for fd in [3, 4] {
            let err = HandoffVar::parse(&format!("{base}:script={fd}")).unwrap_err();
            assert!(err.to_string().contains("script names"), "{err}");
        }
    }

    #[test]
    fn a_rollback_keeps_the_old_images_text() {
        let text = "1:pid=42:snapshot=5:binary=6:mode=upgrade:holder=43:exec=8:nofile=99:script=7";
        let back = HandoffVar::parse(text).unwrap().for_rollback();
        assert_eq!(
            back.format(),
            "1:pid=42:snapshot=5:binary=6:mode=rollback:holder=43:exec=8:nofile=99"
        );
        // Every field the old image can write comes back as it wrote it
        // (but the new binary's script fd and the mode).
        let rescued =
            "1:pid=42:snapshot=5:binary=6:mode=rollback:holder=43:exec=8:nofile=99:rescued=1";
        assert_eq!(
            HandoffVar::parse(rescued).unwrap().for_rollback().format(),
            rescued
        );
    }

    #[test]
    fn garbage_handoff_vars_are_refused_with_a_reason() {
        for (value, reason) in [
            ("", "format version 1"),
            ("garbage", "format version 1"),
            (
                "1:pid=x:snapshot=5:binary=6:mode=upgrade",
                "pid is not a non-negative number",
            ),
            (
                "1:pid=1:snapshot=-5:binary=6:mode=upgrade",
                "snapshot is not",
            ),
            ("1:pid=1:binary=6:mode=upgrade", "snapshot is missing"),
            (
                "1:pid=1:snapshot=5:binary=6:mode=sideways",
                "mode is neither",
            ),
            (
                "1:pid=1:snapshot=5:binary=6:mode=upgrade:extra=1",
                "unknown field extra",
            ),
            ("1:pid", "KEY=VALUE"),
            ("1:pid=1:snapshot=5:binary=5:mode=upgrade", "the same fd"),
        ] {
            let err = HandoffVar::parse(value).unwrap_err().to_string();
            assert!(err.contains(reason), "{value:?}: {err}");
            assert!(err.contains(HANDOFF_VAR), "{err}");
        }
    }
}
