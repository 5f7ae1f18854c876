//! The handoff and claim variables: their values, written and parsed (the
//! format is in the [parent module](super)'s docs).

use super::*;

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

    /// The text of the variable a rollback hands the old binary: `value`
    /// (as the old image wrote it) with `mode=rollback` and without the
    /// `script=` field, every other field kept as written.
    pub(crate) fn rollback_text(value: &str) -> String {
        value
            .split(':')
            .filter(|f| !f.starts_with("script="))
            .map(|f| {
                if f == "mode=upgrade" {
                    "mode=rollback"
                } else {
                    f
                }
            })
            .collect::<Vec<_>>()
            .join(":")
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
