//! The upgrade's deadline, kept from outside the new image: a new image
//! that never reaches `boot` (so it never arms a deadline of its own) is
//! ended by the holder, which kills the server's process at its deadline
//! and starts the old binary again under its own PID, with every client,
//! name, variable and half-typed line.

mod util;

use copyover::status::{Outcome, Status, status_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use util::{Deploy, Lines, Reaper, Scene, Server, labelled, pid_in, version_line, wait_for};

/// Deploys `bad` (approved by the probe, hung in the real run) under a v1
/// demo with `--ready-timeout SECS`, sends SIGHUP, and checks what a user
/// checks after the holder's deadline: the old server's process is gone,
/// the old binary serves every client under the holder's PID, the status
/// file of that PID says why, and a good upgrade still goes through.
/// `meanwhile` runs after the SIGHUP (with the log mark before it).
fn rescued_at_the_deadline(
    name: &str,
    secs: u64,
    bad: Deploy<'_>,
    meanwhile: impl FnOnce(&Server, usize),
) {
    let mut scene = Scene::start(name, &secs.to_string());
    // The holder's deadline: the readiness deadline and half of it again
    // (at least a second more), from the exec.
    let deadline_ms = secs * 1000 + (secs * 500).max(1000);
    let late = format!("did not become ready within {deadline_ms} ms");
    match bad {
        Deploy::Build(p) => scene.server.deploy(p),
        Deploy::Bytes(b) => scene.server.deploy_bytes(b),
    }
    let old_pid = scene.server.pid;
    let mark = scene.server.mark();
    scene.server.signal(Signal::SIGHUP);
    meanwhile(&scene.server, mark);
    let line = scene.server.wait_log(mark, "upgrade rolled back");
    assert!(line.contains(&late), "{line}");
    let serving = scene
        .server
        .wait_log(mark, "serving again after the rollback");
    assert!(serving.contains("rescued=true"), "{serving}");
    let version = scene.ann.ask("/version");
    let pid = pid_in(&version);
    let _reaper = Reaper(pid);
    assert_ne!(pid, old_pid, "the hung process was killed: a new PID");
    wait_for("the hung process to end", || {
        (!scene.server.alive()).then_some(())
    });
    assert_eq!(version, version_line("v1", pid, 1));

    // The typed outcome, in the rescued PID's status file.
    let status = Status::read(&status_path(
        &scene.server.scratch.0.join("status"),
        pid as u32,
    ))
    .expect("the rescued server's status file");
    match &status.outcome {
        Outcome::RolledBack { reason } => assert!(
            reason.contains(&late) && reason.contains("holder"),
            "{reason}"
        ),
        other => panic!("expected a rollback in the status file, got {other:?}"),
    }

    // Every client, variable and half-typed line.
    let (ann, bob) = (&mut scene.ann, &mut scene.bob);
    assert_eq!(ann.ask("/get color"), "color = green");
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .map(|e| format!("{:?} {:?}", e.file_name(), std::fs::read_link(e.path())))
        .collect();
    assert_eq!(fds.len(), scene.fds, "the rescued server's fds: {fds:?}");

    // A good upgrade of the rescued server still goes through.
    scene.server.deploy(&labelled("v2"));
    let mark = scene.server.mark();
    kill(Pid::from_raw(pid), Signal::SIGHUP).expect("SIGHUP to the rescued server");
    scene.server.wait_log(mark, "upgrade complete");
    assert_eq!(bob.ask("/version"), version_line("v2", pid, 2));
    assert_eq!(ann.ask("/get color"), "color = green");
    ann.assert_quiet();
}

#[test]
fn a_constructor_that_never_returns_is_ended_by_the_holder() {
    rescued_at_the_deadline(
        "dl-constructor",
        2,
        Deploy::Build(&util::faulty("hang-before-main")),
        |_, _| {},
    );
}

#[test]
fn a_wrapper_that_hangs_outside_the_probe_is_ended_by_the_holder() {
    // Answers the probe with a good build, and does something else in the
    // real run: the new image is `sleep`, which never reaches `boot`.
    let v2 = labelled("v2");
    let script = format!(
        "#!/bin/sh\n[ -n \"$COPYOVER_PROBE\" ] || exec sleep 1000\nexec {} \"$@\"\n",
        v2.display()
    );
    rescued_at_the_deadline("dl-wrapper", 2, Deploy::Bytes(script.as_bytes()), |_, _| {});
}

#[test]
fn a_stopped_new_image_is_ended_by_the_holder() {
    // A stopped image is a hung one, and its own deadline (SIGALRM) cannot
    // end it: a build that hangs after claiming every socket, stopped.
    rescued_at_the_deadline(
        "dl-stopped",
        // Stopped well before its own deadline could roll it back.
        5,
        Deploy::Build(&util::faulty("hang-after-adopt")),
        |server, mark| {
            server.wait_log(mark, "this is a fault build");
            server.signal(Signal::SIGSTOP);
        },
    );
}

/// The holder cannot kill a new image that hangs before `main` (its
/// signal is refused: a new image that took other credentials): it tries
/// 100 times more, 10 ms apart, then says so and ends, leaving it.
#[test]
fn a_holder_that_cannot_kill_gives_up_after_a_hundred_tries() {
    let server = Server::start_with("dl-cannot-kill", &labelled("v1"), &["--ready-timeout", "1"]);
    server.deploy(&util::faulty("hang-before-main"));
    let out = server.scratch.0.join("strace.out");
    let Some(strace) = util::traced(
        server.pid,
        "pidfd_send_signal",
        &["pidfd_send_signal:error=EPERM"],
        &out,
    ) else {
        return;
    };
    let mark = server.mark();
    server.signal(Signal::SIGHUP);
    server.wait_log(mark, "the holder could not kill the unready new image");
    let trace = util::detach(strace, &out);
    let refused = trace.lines().filter(|l| l.contains("(INJECTED)")).count();
    assert_eq!(refused, 101, "the holder's kills:\n{trace}");
}

/// The commit's exec fails after the holder's deadline took the readiness
/// claim, while the holder cannot kill this process: the old image waits
/// for the holder to end (it gives up after its tries) before it serves
/// on, rather than killing it halfway (`Holder::outlive`).
#[test]
fn an_exec_that_fails_after_the_holders_deadline_waits_for_the_holder() {
    let mut scene = Scene::start("dl-outlive", "1");
    scene.server.deploy(&labelled("v2"));
    let out = scene.server.scratch.0.join("strace.out");
    // The holder's deadline is 2 s from the commit: the exec returns EIO
    // at 2.5 s, while the holder still tries its kills (until 3 s). The
    // wait for the holder is interrupted once (EINTR): it waits again.
    let Some(strace) = util::traced(
        scene.server.pid,
        "pidfd_send_signal,execveat,waitid",
        &[
            "pidfd_send_signal:error=EPERM",
            "execveat:error=EIO:delay_enter=2500000:when=1",
            "waitid:error=EINTR:when=1",
        ],
        &out,
    ) else {
        return;
    };
    let line = scene.server.upgrade();
    let trace = util::detach(strace, &out);
    assert!(
        line.contains("upgrade refused") && line.contains("execve"),
        "{line}\n{trace}"
    );
    let log = scene.server.log_text();
    let gave_up = log
        .find("the holder could not kill the unready new image")
        .unwrap_or_else(|| panic!("the holder never gave up: it was killed first\n{log}"));
    let refused = log.find("upgrade refused").expect("the refusal");
    assert!(gave_up < refused, "{log}");
    scene.everyone_kept("v1", 1, "after the exec failed");
}
