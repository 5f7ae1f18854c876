//! Where the old image's upgrade stands: idle, probing, or approved with
//! what the probe prepared for the commit.
//!
//! The handle (`runtime`) owns one `Phase` and moves it on: a request
//! starts a probe ([`Phase::Probing`]), the probe's verdict settles it
//! ([`Phase::settle`]), the commit takes what an approved phase holds, and
//! every way out (a refusal, an error, [`Phase::abandon`]) leaves it idle.

use std::sync::Arc;
use std::time::Duration;

use super::probe::{Executable, Prepared, Probe, Verdict};

#[derive(Debug)]
pub(crate) enum Phase {
    Idle,
    /// The probe runs; `exe` is the new binary, opened once, so that the
    /// commit executes exactly the file that was probed.
    Probing(Probe, Arc<Executable>),
    Approved {
        to_version: String,
        exe: Arc<Executable>,
        /// What the probe prepared, for the commit to take.
        prepared: Prepared,
    },
    /// A migration to an external newcomer (one that connected to the
    /// migration socket): its probe runs over that socket, and once it
    /// answered, the runtime holds the newcomer and the commit hands over.
    External,
}

/// How a probe ended, once [`Phase::settle`] saw it end.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The new binary can take over: the phase is approved.
    Approved { to_version: String },
    /// It cannot: the phase is idle again.
    Refused { reason: String },
}

/// A probe that has not reported after twice its time limit plus this never
/// will (its job never ran on the helper thread).
const NEVER_REPORTED: Duration = Duration::from_secs(5);

impl Phase {
    /// Takes the probe's verdict if it is in: the phase becomes approved
    /// (with what the probe prepared) or idle. `None` while the probe runs,
    /// or if no probe runs. The probe kills its child at its own time
    /// limit; one that never reports (`since_request` past twice the limit
    /// plus 5 s) is killed and refused here, so that an upgrade never stays
    /// under way for good.
    pub(crate) fn settle(
        &mut self,
        since_request: Duration,
        probe_timeout: Duration,
    ) -> Option<Settled> {
        let (probe, exe) = match std::mem::replace(self, Phase::Idle) {
            Phase::Probing(probe, exe) => (probe, exe),
            other => {
                *self = other;
                return None;
            }
        };
        let (verdict, prepared) = match probe.try_verdict() {
            Ok(outcome) => (outcome.verdict, outcome.prepared),
            Err(stuck) if since_request > 2 * probe_timeout + NEVER_REPORTED => {
                stuck.kill();
                let reason = "the probe never reported: the runtime's helper thread did not run it";
                (Verdict::Refused(reason.into()), Prepared::default())
            }
            Err(still_running) => {
                *self = Phase::Probing(still_running, exe);
                return None;
            }
        };
        Some(match verdict {
            Verdict::Accepted(to_version) => {
                *self = Phase::Approved {
                    to_version: to_version.clone(),
                    exe,
                    prepared,
                };
                Settled::Approved { to_version }
            }
            Verdict::Refused(reason) => Settled::Refused { reason },
        })
    }

    /// Ends the upgrade under way before its commit: a probe still running
    /// is killed, and the phase is idle. `false` if none was under way.
    pub(crate) fn abandon(&mut self) -> bool {
        match std::mem::replace(self, Phase::Idle) {
            Phase::Idle => false,
            Phase::Probing(probe, _) => {
                probe.kill();
                true
            }
            Phase::Approved { .. } | Phase::External => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe::Outcome;
    use super::*;

    fn exe() -> Arc<Executable> {
        Arc::new(Executable::open(std::path::Path::new("/bin/true")).unwrap())
    }

    fn probing(verdict: Option<Verdict>) -> Phase {
        let outcome = verdict.map(|verdict| Outcome {
            verdict,
            prepared: Prepared::default(),
        });
        Phase::Probing(Probe::with_verdict(outcome), exe())
    }

    const LIMIT: Duration = Duration::from_secs(1);

    #[test]
    fn a_verdict_settles_the_probe() {
        let mut phase = probing(Some(Verdict::Accepted("v2".into())));
        let settled = phase.settle(Duration::ZERO, LIMIT);
        assert_eq!(
            settled,
            Some(Settled::Approved {
                to_version: "v2".into()
            })
        );
        assert!(matches!(&phase, Phase::Approved { to_version, .. } if to_version == "v2"));
        // Approved stays approved until the commit takes it.
        assert_eq!(phase.settle(Duration::ZERO, LIMIT), None);
        assert!(matches!(phase, Phase::Approved { .. }));

        let mut phase = probing(Some(Verdict::Refused("no".into())));
        let settled = phase.settle(Duration::ZERO, LIMIT);
        assert_eq!(
            settled,
            Some(Settled::Refused {
                reason: "no".into()
            })
        );
        assert!(matches!(phase, Phase::Idle));
        assert_eq!(phase.settle(Duration::ZERO, LIMIT), None);
    }

    #[test]
    fn a_probe_that_never_reports_is_refused_after_its_grace() {
        let mut phase = probing(None);
        let grace = 2 * LIMIT + NEVER_REPORTED;
        assert_eq!(phase.settle(grace, LIMIT), None);
        assert!(matches!(phase, Phase::Probing(..)));
        let settled = phase.settle(grace + Duration::from_nanos(1), LIMIT);
        assert!(
            matches!(settled, Some(Settled::Refused { reason }) if reason.contains("never reported"))
        );
        assert!(matches!(phase, Phase::Idle));
    }

    #[test]
    fn abandon_says_whether_an_upgrade_was_under_way() {
        let mut phase = Phase::Idle;
        assert!(!phase.abandon());
        let mut phase = probing(None);
        assert!(phase.abandon());
        assert!(matches!(phase, Phase::Idle));
        let mut phase = Phase::Approved {
            to_version: "v2".into(),
            exe: exe(),
            prepared: Prepared::default(),
        };
        assert!(phase.abandon());
        assert!(matches!(phase, Phase::Idle));
    }
}
