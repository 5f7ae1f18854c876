//! Hostile and broken input at start-up: a handoff variable that is garbage,
//! names closed fds or fds of the wrong kind, or belongs to another process;
//! snapshots that are truncated, unsealed, corrupted, of another app or an
//! unknown format; a manifest fd of the wrong type. Each gets a clear error
//! and a clean exit, never a panic and never a half-restored server.
//!
//! The demo is started through `sh`, whose `exec` keeps the PID (so `$$` is
//! the demo's PID) and whose redirections place descriptors without
//! close-on-exec, as a real upgrade does.

mod util;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use copyover::snapshot::{FORMAT_VERSION, FdKind, Header, ManifestEntry, encode};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use util::{default_build, spawn_retrying, wait_for};

/// An empty chat state, as the demo's state v2 encodes it: four empty
/// varints (next_id, next_login, users, conns).
const EMPTY_CHAT: [u8; 4] = [0, 0, 0, 0];

fn header(app: &str) -> Header {
    Header {
        format_version: FORMAT_VERSION,
        app: app.into(),
        state_version: 2,
        writer_version: "test".into(),
        generation: 4,
        requested_at_ns: 0,
        committed_at_ns: 0,
        binary: default_build(),
    }
}

fn snapshot(app: &str, manifest: &[ManifestEntry]) -> Vec<u8> {
    encode(&header(app), &manifest.to_vec().into(), &EMPTY_CHAT).unwrap()
}

/// A memfd holding `bytes`, sealed or not.
fn memfd(bytes: &[u8], sealed: bool) -> OwnedFd {
    let fd = memfd_create(
        c"hostile",
        MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    let mut f = File::from(fd);
    f.write_all(bytes).unwrap();
    let fd = OwnedFd::from(f);
    if sealed {
        let all = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(all)).unwrap();
    }
    fd
}

struct Outcome {
    code: Option<i32>,
    log: String,
}

/// Starts the demo with `handoff` (where `$$` is its PID). The snapshot
/// memfd, if any, is on fd 3, the demo binary on fd 4, a regular file on
/// fd 5. Waits until it exits, or until it logs `listening` (then kills it).
fn start(handoff: &str, snapshot: Option<OwnedFd>) -> Outcome {
    let demo = default_build();
    let script = format!(
        "exec 3<&0 4<'{demo}' 5</etc/hostname; COPYOVER_HANDOFF=\"{handoff}\" exec '{demo}' --listen 127.0.0.1:0",
        demo = demo.display()
    );
    let stdin = match snapshot {
        Some(fd) => Stdio::from(fd),
        None => Stdio::null(),
    };
    let mut child = spawn_retrying(
        Command::new("sh")
            .args(["-c", &script])
            .env_remove("COPYOVER_HANDOFF")
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
        let _ = done.send(());
    });
    let code = wait_for("the demo to exit or serve", || match child.try_wait() {
        Ok(Some(status)) => Some(status.code()),
        _ if log.lock().unwrap().contains("listening addr=") => {
            let _ = child.kill();
            let _ = child.wait();
            Some(None)
        }
        _ => None,
    });
    // Every line, up to the end of the demo's stderr.
    finished
        .recv_timeout(util::WAIT)
        .expect("the demo's stderr to end");
    let log = log.lock().unwrap().clone();
    assert!(!log.contains("panicked"), "the demo panicked:\n{log}");
    Outcome { code, log }
}

/// Asserts a clean refusal: exit status 1 and `message` in the log.
fn refused(o: &Outcome, message: &str) {
    assert_eq!(
        o.code,
        Some(1),
        "expected a clean failure exit; log:\n{}",
        o.log
    );
    assert!(
        o.log.contains(message),
        "expected {message:?} in the log:\n{}",
        o.log
    );
    assert!(
        !o.log.contains("listening addr="),
        "a half-restored server served:\n{}",
        o.log
    );
}

#[test]
fn a_garbage_handoff_variable_is_refused() {
    let o = start("garbage", None);
    refused(
        &o,
        "the COPYOVER_HANDOFF variable (\"garbage\") is malformed",
    );
}

#[test]
fn a_handoff_variable_of_another_pid_is_ignored() {
    // A child of a copyover process that inherited the variable: it must
    // start fresh, touching none of the fds the variable names.
    let o = start("1:pid=1:snapshot=3:binary=4:mode=upgrade", None);
    assert_eq!(o.code, None, "it should serve; log:\n{}", o.log);
    assert!(
        o.log
            .contains("ignoring a COPYOVER_HANDOFF variable inherited from process 1"),
        "{}",
        o.log
    );
    assert!(o.log.contains("serving generation=0"), "{}", o.log);
}

#[test]
fn a_handoff_naming_closed_fds_is_refused() {
    let o = start("1:pid=$$:snapshot=3:binary=60:mode=rollback", None);
    refused(
        &o,
        "the handoff names fd 60 (the previous binary) but it is not open",
    );
    let snap = memfd(&snapshot("copyover-telnetd", &[]), true);
    let o = start("1:pid=$$:snapshot=61:binary=4:mode=rollback", Some(snap));
    refused(
        &o,
        "the handoff names fd 61 (the snapshot) but it is not open",
    );
}

#[test]
fn a_snapshot_fd_that_is_not_a_memfd_is_refused() {
    let o = start("1:pid=$$:snapshot=5:binary=4:mode=rollback", None);
    refused(
        &o,
        "not a sealed memfd (it does not support seals: not a memfd)",
    );
}

#[test]
fn an_unsealed_snapshot_is_refused() {
    let snap = memfd(&snapshot("copyover-telnetd", &[]), false);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(&o, "not a sealed memfd (seals");
}

#[test]
fn a_truncated_snapshot_is_refused() {
    let bytes = snapshot("copyover-telnetd", &[]);
    let snap = memfd(&bytes[..bytes.len() - 3], true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(&o, "the snapshot is truncated");
}

#[test]
fn a_corrupted_snapshot_is_refused() {
    let mut bytes = snapshot("copyover-telnetd", &[]);
    let at = bytes.len() - 2;
    bytes[at] ^= 0x10;
    let snap = memfd(&bytes, true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(&o, "the snapshot is corrupted: checksum");
}

#[test]
fn a_snapshot_of_another_app_is_refused() {
    let snap = memfd(&snapshot("someone-else", &[]), true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(
        &o,
        "written by app 'someone-else', but this binary is app 'copyover-telnetd'",
    );
}

#[test]
fn a_snapshot_of_an_unknown_format_is_refused() {
    let mut bytes = snapshot("copyover-telnetd", &[]);
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let snap = memfd(&bytes, true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(&o, "snapshot format version 7 is not supported");
}

#[test]
fn a_file_where_the_listener_should_be_is_refused() {
    let manifest = [ManifestEntry {
        name: "listener:telnet".into(),
        fd: 5,
        kind: FdKind::Listener,
    }];
    let snap = memfd(&snapshot("copyover-telnetd", &manifest), true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=rollback", Some(snap));
    refused(
        &o,
        "inherited fd 5 named 'listener:telnet' cannot be adopted as a listening TCP socket",
    );
}

#[test]
fn a_bad_snapshot_after_an_upgrade_rolls_back_once_then_stops() {
    // mode=upgrade: the "new" image fails and executes the previous binary
    // (fd 4) with the same snapshot, which fails too: no loop, a clear error.
    let mut bytes = snapshot("copyover-telnetd", &[]);
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    let snap = memfd(&bytes, true);
    let o = start("1:pid=$$:snapshot=3:binary=4:mode=upgrade", Some(snap));
    refused(&o, "checksum");
    assert_eq!(
        o.log.matches("checksum").count(),
        2,
        "one failure per image:\n{}",
        o.log
    );
}
