//! The upgrade sequence of the old image: the opened binary, probe, commit,
//! exec.
//!
//! 1. **The binary** (on the request): the path is opened once, checked to
//!    be an executable regular file, and kept open: the probe runs it and
//!    the commit executes it from that descriptor, so a deploy that lands
//!    in between changes nothing (see `probe::Executable`).
//! 2. **Probe**: the event loop encodes a first snapshot; a helper thread
//!    writes it, shows it to the new binary in probe mode, and meanwhile
//!    allocates and maps the memfd the commit will use, while the event loop
//!    keeps serving (see [`probe`]).
//! 3. **Commit** (at the next safe point after a positive probe): the state
//!    is encoded again, straight into that prepared memfd, which is then cut
//!    to size and sealed; how this image runs (argv, environment) goes into
//!    a second sealed memfd for a rollback. Meanwhile, on the runtime's
//!    helper thread, every fd becomes close-on-exec with one `close_range`,
//!    then the flag is cleared on exactly the manifest's fds (a syscall
//!    each: at 9,000 connections as long as the encoding, hence the second
//!    thread); then on the two memfds and the old binary's fd. [`HELD_SIGNALS`] are
//!    blocked; the readiness claim is made and the **holder** is cloned (see
//!    `sys::holder`, `sys::claim`): from now on it keeps the upgrade's
//!    deadline from outside the new image. Nothing is logged from here to
//!    the exec.
//! 4. **Exec** of the probed file (`execveat`) with an explicit
//!    environment. If it returns, the holder is killed and reaped, every fd
//!    from 3 up is made close-on-exec again (what an image keeps in normal
//!    running: the crate and Rust's standard library open everything
//!    close-on-exec) and the signal mask is put back as it was; the error is
//!    returned: the old image keeps serving and nothing is lost.
//!
//! [`HELD_SIGNALS`]: crate::signal::HELD_SIGNALS
//!
//! Where things are: where an upgrade stands (idle, probing, approved) in
//! `phase`, the probe and what it prepares in [`probe`], the commit in
//! `commit`, and what crosses the exec beside the snapshot: the exec
//! record (`record`) and the environment variables ([`variable`]).

mod commit;
pub(crate) mod phase;
pub mod probe;
pub(crate) mod record;
pub mod variable;

pub(crate) use commit::{Commit, commit};

/// Where an upgrade stands after [`Copyover::upgrade`] returned.
///
/// [`Copyover::upgrade`]: crate::Copyover::upgrade
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// The new binary is being probed; keep serving. The event fd wakes the
    /// loop with [`Event::UpgradeApproved`](crate::Event::UpgradeApproved)
    /// once it answered yes (then call `upgrade` again to commit), or with
    /// [`Event::UpgradeRefused`](crate::Event::UpgradeRefused).
    Probing,
    /// A gradual migration's new process serves beside this one, with the
    /// shared part: stop accepting (it accepts), and move users on
    /// [`Event::MoveUsers`](crate::Event::MoveUsers).
    Sharing {
        /// The new process.
        with: u32,
    },
}
