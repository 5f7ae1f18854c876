//! The environment contract: every environment variable copyover reads,
//! writes or strips, and what each program it executes gets. This module
//! owns the names and the builders of the exec's environment; what a
//! variable's value means belongs to the module that reads it (linked
//! below).
//!
//! Two builds of a server, old and new, must agree on these names, so they
//! are a spec: a name is never reused with another meaning.
//!
//! # The runtime's own variables
//!
//! | Variable | Set by | Read by | Value |
//! |---|---|---|---|
//! | [`HANDOFF_VAR`] `COPYOVER_HANDOFF` | the commit, a rollback, the holder | [`boot`](crate::boot) | the handoff, [version 1](crate::upgrade::variable#the-handoff-variable-version-1) |
//! | [`CLAIM_VAR`] `COPYOVER_CLAIM` | the commit, a rollback | `boot` | the readiness claim and when the holder started, [version 1](crate::upgrade::variable#the-claim-variable-version-1) |
//! | [`ROLLBACK_REASON_VAR`] `COPYOVER_ROLLBACK_REASON` | a rollback, the holder | `boot` in rollback mode | why the new image failed (the outcome's reason) |
//! | [`MIGRATE_VAR`] `COPYOVER_MIGRATE` | a migration (the old process, starting the new one) | `boot` | the migration socket, [version 1](crate::migration#the-migration-variable-version-1) |
//! | [`JOIN_VAR`] `COPYOVER_JOIN` | the operator, starting an external newcomer | `boot` | the path of the old process's migration socket ([`Config::migration_socket`](crate::Config::migration_socket)) |
//! | [`PROBE_MIGRATE_VAR`] `COPYOVER_PROBE_MIGRATE` | a migration's probe | `boot` in probe mode, which answers `ok-migrate` | `1` |
//! | [`PROBE_VAR`] `COPYOVER_PROBE` | the probe | `boot`, which answers and exits | a nonce the answer repeats |
//! | [`STATUS_DIR_VAR`] `COPYOVER_STATUS_DIR` | the operator | the runtime, the `copyover` CLI | the [status](crate::status) directory |
//!
//! `boot` removes the handoff and rollback variables from its environment
//! as soon as it has read them (with a single thread, so safely), so that
//! no child process inherits them; one inherited anyway names another PID
//! and is ignored.
//!
//! # systemd's variables
//!
//! * [`NOTIFY_SOCKET`]: where readiness and reloads are told (`sd_notify`);
//!   kept across every exec, since the PID does not change.
//! * [`LISTEN_VARS`] (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`): socket
//!   activation, read on a first start only and removed at once: after a
//!   same-PID exec a stale `LISTEN_PID` would match again.
//! * [`FDSTORE`]: the size of systemd's fd store (systemd 254+).
//!
//! # What each program gets
//!
//! The **clean environment** is this process's, without the runtime's
//! variables and `LISTEN_*` (`NOTIFY_SOCKET` and everything else kept).
//!
//! * **The probe** (the new binary, asking whether it can take over): the
//!   clean environment plus `COPYOVER_PROBE`.
//! * **The new image** (the commit's exec): the clean environment plus
//!   `COPYOVER_HANDOFF`.
//! * **A migration's new process** (a child of the old one): the clean
//!   environment plus `COPYOVER_MIGRATE`.
//! * **The old binary again** (a rollback): the environment the old image
//!   ran with (its exec record), or the clean environment without one,
//!   plus `COPYOVER_HANDOFF` in rollback mode and
//!   `COPYOVER_ROLLBACK_REASON`.
//! * **The holder's rescue** (the new image died before `boot`): as a
//!   rollback, under the holder's PID.
//!
//! Every one of them gets this image's argument vector, read once by `boot`
//! in the one form the runtime keeps it (C strings, as `execve` takes
//! them); a rollback and the rescue get the old image's, from its exec
//! record.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// The environment variable that carries the handoff into the new image.
pub const HANDOFF_VAR: &str = "COPYOVER_HANDOFF";
/// The environment variable that carries the readiness claim (see
/// [`crate::upgrade::variable`]).
pub const CLAIM_VAR: &str = "COPYOVER_CLAIM";
/// The environment variable that carries a rollback's reason.
pub const ROLLBACK_REASON_VAR: &str = "COPYOVER_ROLLBACK_REASON";
/// The environment variable that puts a copyover program into probe mode.
pub const PROBE_VAR: &str = "COPYOVER_PROBE";
/// The environment variable that makes a new process a migration's
/// newcomer (see [`crate::migration`]).
pub const MIGRATE_VAR: &str = "COPYOVER_MIGRATE";
/// The environment variable that makes a process started by the operator
/// an external newcomer: it connects to the old process's migration socket
/// at this path and takes over (see [`crate::migration`]).
pub const JOIN_VAR: &str = "COPYOVER_JOIN";
/// Set beside [`PROBE_VAR`] when the probe is a migration's: the binary
/// must answer that it can take part in one.
pub const PROBE_MIGRATE_VAR: &str = "COPYOVER_PROBE_MIGRATE";
/// The environment variable that overrides the status directory.
pub const STATUS_DIR_VAR: &str = "COPYOVER_STATUS_DIR";

/// systemd's notification socket (`sd_notify`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// systemd's socket-activation variables: the PID they are meant for, the
/// number of fds from 3, and their names.
pub const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
/// The size of systemd's fd store, if the unit has one (systemd 254+).
pub const FDSTORE: &str = "FDSTORE";

/// Variables the runtime owns: never passed on as they were.
const STRIPPED_VARS: [&str; 10] = [
    HANDOFF_VAR,
    MIGRATE_VAR,
    JOIN_VAR,
    PROBE_MIGRATE_VAR,
    CLAIM_VAR,
    ROLLBACK_REASON_VAR,
    PROBE_VAR,
    LISTEN_VARS[0],
    LISTEN_VARS[1],
    LISTEN_VARS[2],
];

/// This process's environment without the runtime's own variables and the
/// stale systemd socket-activation ones (a same-PID exec would match
/// `LISTEN_PID` again), as (name, value) pairs. `NOTIFY_SOCKET` is kept.
pub(crate) fn clean_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !STRIPPED_VARS.iter().any(|s| k.as_bytes() == s.as_bytes()))
        .collect()
}

/// `NAME=value` C strings of (name, value) pairs.
pub(crate) fn env_entries(vars: &[(OsString, OsString)]) -> io::Result<Vec<CString>> {
    vars.iter()
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            cstring(&e)
        })
        .collect()
}

/// The new image's environment: [`clean_env`] plus
/// `COPYOVER_HANDOFF=handoff`.
pub(crate) fn exec_env(handoff: &str) -> io::Result<Vec<CString>> {
    with_handoff(env_entries(&clean_env())?, handoff)
}

/// `env` plus `COPYOVER_HANDOFF=handoff`.
pub(crate) fn with_handoff(mut env: Vec<CString>, handoff: &str) -> io::Result<Vec<CString>> {
    env.push(cstring(format!("{HANDOFF_VAR}={handoff}").as_bytes())?);
    Ok(env)
}

/// Removes the handoff and rollback variables from this process's
/// environment, so that no child inherits them. Only with a single thread
/// (the caller checked).
pub(crate) fn forget_handoff_vars() {
    for var in [
        HANDOFF_VAR,
        CLAIM_VAR,
        ROLLBACK_REASON_VAR,
        MIGRATE_VAR,
        JOIN_VAR,
    ] {
        crate::sys::remove_env_var(var.as_ref());
    }
}

/// Removes the `LISTEN_*` variables from this process's environment. Only
/// with a single thread (the caller checked).
pub(crate) fn forget_listen_vars() {
    for var in LISTEN_VARS {
        crate::sys::remove_env_var(var.as_ref());
    }
}

/// An argument or a `NAME=value` entry as a C string, for an exec.
///
/// # Errors
///
/// `InvalidInput` if it holds a NUL byte.
pub(crate) fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in an argument or variable",
        )
    })
}

/// This process's argument vector (`argv[0]` included) in the one form
/// the runtime keeps it: C strings, as the commit's and a rollback's exec
/// take them, written as they are into the exec record, and shown to the
/// probe as `OsStr`s (no conversion).
///
/// # Errors
///
/// `InvalidInput` for an argument with a NUL byte, which Linux cannot
/// pass (an argument *is* a NUL-terminated string), so never in practice.
pub(crate) fn args() -> io::Result<Vec<CString>> {
    std::env::args_os().map(|a| cstring(a.as_bytes())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_env_carries_exactly_one_handoff() {
        let env = exec_env("1:pid=1:snapshot=3:binary=4:mode=upgrade").unwrap();
        let ours: Vec<_> = env
            .iter()
            .filter(|e| e.as_bytes().starts_with(b"COPYOVER_HANDOFF="))
            .collect();
        assert_eq!(ours.len(), 1);
        assert!(!env.iter().any(|e| e.as_bytes().starts_with(b"LISTEN_PID=")));
    }

    #[test]
    fn a_nul_byte_is_refused() {
        assert_eq!(
            cstring(b"A=b\0c").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
