//! The safety net: bad releases and non-copyover binaries deployed under a
//! running demo with clients connected. Each is refused by the probe or
//! rolled back after the exec; every client, variable and half-typed line is
//! kept, the fd count does not change, no probe is left behind, and a good
//! upgrade still works afterwards.

mod util;

use util::{Client, Deploy, Lines, Server, faulty, labelled, survive, version_line};

#[test]
fn a_build_that_cannot_read_the_state_is_refused() {
    survive(
        "rb-reject",
        Deploy::Build(&faulty("reject-state")),
        "upgrade refused",
        "has no migration from v2",
    );
}

#[test]
fn a_build_of_another_app_is_refused() {
    survive(
        "rb-wrong-app",
        Deploy::Build(&faulty("wrong-app")),
        "upgrade refused",
        "but this binary is app 'not-telnetd'",
    );
}

#[test]
fn bin_true_is_refused() {
    let bytes = std::fs::read("/bin/true").unwrap();
    survive(
        "rb-true",
        Deploy::Bytes(&bytes),
        "upgrade refused",
        "gave no probe answer",
    );
}

#[test]
fn a_shell_script_is_refused() {
    survive(
        "rb-script",
        Deploy::Bytes(b"#!/bin/sh\necho hello from a script\n"),
        "upgrade refused",
        "not a probe answer",
    );
}

#[test]
fn a_script_that_echoes_its_input_is_refused() {
    survive(
        "rb-cat",
        Deploy::Bytes(b"#!/bin/sh\nexec cat\n"),
        "upgrade refused",
        "not a copyover program",
    );
}

/// A program whose argument parser rejects the server's arguments (here the
/// operator CLI, built with clap, which exits with EX_USAGE): the refusal
/// says how it ended and quotes its standard error, instead of only "not a
/// copyover program".
#[test]
fn a_program_that_rejects_the_arguments_is_refused_with_its_own_words() {
    let cli = std::fs::read(env!("CARGO_BIN_EXE_copyover")).unwrap();
    let line = survive(
        "rb-args",
        Deploy::Bytes(&cli),
        "upgrade refused",
        "gave no probe answer",
    );
    assert!(line.contains("it exited with status 64"), "{line}");
    assert!(
        line.contains("its last words on standard error: \"error: unexpected argument"),
        "{line}"
    );
}

#[test]
fn a_crashing_program_is_refused_with_its_signal() {
    let line = survive(
        "rb-segv",
        Deploy::Bytes(b"#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n"),
        "upgrade refused",
        "gave no probe answer",
    );
    assert!(
        line.contains("it was killed by signal 11 (SIGSEGV); its last words on standard error: \"about to crash\""),
        "{line}"
    );
}

#[test]
fn a_garbage_file_is_refused() {
    survive(
        "rb-garbage",
        Deploy::Bytes(b"\x7fELF garbage that is no executable"),
        "upgrade refused",
        "could not start",
    );
}

/// A take that fails its type check rolls back where it happens, before
/// `ready`, even in a build that ignores the error (and would otherwise
/// serve on with the listener taken again as the right type).
#[test]
fn a_failed_take_rolls_back_even_if_the_build_ignores_it() {
    survive(
        "rb-take",
        Deploy::Build(&faulty("ignore-a-failed-take")),
        "upgrade rolled back",
        "inherited fd",
    );
}

/// The rollback's reason crosses the exec in a fixed slot: a long one is
/// cut at 159 bytes, never written past it.
#[test]
fn a_long_panic_message_is_cut_to_the_reason_slot() {
    let line = survive(
        "rb-long",
        Deploy::Build(&faulty("panic-with-a-long-message")),
        "upgrade rolled back",
        "panicked",
    );
    let reason = line
        .split("upgrade rolled back: ")
        .nth(1)
        .and_then(|r| r.split(" version=").next())
        .expect("a reason in the outcome line");
    assert!(
        reason.starts_with("the new image panicked: fault build: xxx"),
        "{reason}"
    );
    assert_eq!(reason.len(), 159, "{reason}");
}

/// A SIGALRM pending (and blocked) when the failed image rolls back must
/// not reach the old image's next upgrade: its deadline handler would
/// roll a good build back at once. `survive` upgrades to v2 afterwards.
#[test]
fn a_pending_alarm_does_not_follow_the_rollback() {
    survive(
        "rb-alarm",
        Deploy::Build(&faulty("pending-alarm-then-panic")),
        "upgrade rolled back",
        "panicked: fault build: panic with SIGALRM pending",
    );
}

/// A child of the failed image that exited is the old image's after the
/// rollback: reaped at once, no zombie left.
#[test]
fn the_old_image_reaps_the_failed_images_dead_child() {
    let mut scene = util::Scene::start("rb-zombie", "2");
    scene.server.deploy(&faulty("zombie-then-panic"));
    let line = scene.server.upgrade();
    assert!(
        line.contains("upgrade rolled back") && line.contains("zombie"),
        "{line}"
    );
    scene.everyone_kept("v1", 1, "after the rollback");
    assert_eq!(scene.server.children(), 0, "a zombie left");
}

#[test]
fn a_panic_after_adopting_rolls_back() {
    survive(
        "rb-panic",
        Deploy::Build(&faulty("panic-after-adopt")),
        "upgrade rolled back",
        "panicked",
    );
}

#[test]
fn an_abort_after_adopting_rolls_back() {
    survive(
        "rb-abort",
        Deploy::Build(&faulty("abort-after-adopt")),
        "upgrade rolled back",
        "killed by signal 6",
    );
}

#[test]
fn a_hang_after_adopting_rolls_back_at_the_deadline() {
    survive(
        "rb-hang",
        Deploy::Build(&faulty("hang-after-adopt")),
        "upgrade rolled back",
        "readiness deadline",
    );
}

#[test]
fn an_exit_before_ready_rolls_back() {
    survive(
        "rb-exit",
        Deploy::Build(&faulty("exit-before-ready")),
        "upgrade rolled back",
        "exited before it was ready",
    );
}

#[test]
fn a_newer_state_is_refused_by_an_older_build() {
    // A build that writes state v1 cannot read the v2 snapshot.
    let old = util::build(&[
        ("COPYOVER_DEMO_LABEL", "v1-state1"),
        ("COPYOVER_DEMO_STATE", "1"),
    ]);
    survive(
        "rb-downgrade",
        Deploy::Build(&old),
        "upgrade refused",
        "state v2; this binary reads v1",
    );
}

#[test]
fn state_v1_is_migrated_to_v2_by_a_real_upgrade() {
    let old = util::build(&[
        ("COPYOVER_DEMO_LABEL", "v1-state1"),
        ("COPYOVER_DEMO_STATE", "1"),
    ]);
    let server = Server::start("rb-migrate", &old);
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set color green"), "ok");
    assert_eq!(ann.ask("/set size 42"), "ok");
    ann.send("/va");
    server.deploy(&labelled("v2"));
    let mark = server.mark();
    assert!(server.upgrade().contains("upgrade complete"));
    let migrated = server
        .log_since(mark)
        .into_iter()
        .find(|l| l.contains("migrated the state"));
    let migrated = migrated.expect("a 'migrated the state' log line");
    assert!(
        migrated.contains("from=1") && migrated.contains("to=2"),
        "{migrated}"
    );
    ann.send("rs\r\n");
    assert_eq!(ann.line(), "color = green");
    assert_eq!(ann.line(), "size = 42");
    assert_eq!(ann.line(), "end");
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 1));
}

#[test]
fn an_exec_that_fails_after_the_probe_leaves_the_old_image_serving() {
    // It answers the probe, then removes its own interpreter: the execve at
    // the commit fails (ENOENT), after the fds, the signal mask and the
    // holder were prepared for it. (Removing the script itself no longer
    // makes the exec fail: the commit executes the very file it probed.)
    let interp = std::env::temp_dir().join(format!("copyover-vanishing-sh-{}", std::process::id()));
    std::fs::copy("/bin/sh", &interp).expect("copy /bin/sh");
    let script = format!(
        "#!{}\necho \"copyover-probe 1 ok $COPYOVER_PROBE vanishing\"\nrm -f \"{}\"\n",
        interp.display(),
        interp.display()
    );
    survive(
        "rb-vanish",
        Deploy::Bytes(script.as_bytes()),
        "upgrade refused",
        "execve of",
    );
    let _ = std::fs::remove_file(&interp);
}

/// The old binary that comes back after a failed upgrade starts a thread
/// before `boot` this time (its environment changed: an `LD_PRELOAD`
/// library): there is no way further back, so it serves anyway, with a
/// warning, every client kept.
#[test]
fn a_rolled_back_image_with_a_thread_serves_anyway() {
    let old = faulty("thread-on-rollback");
    let server = util::Server::start_with("rb-thread", &old, &["--ready-timeout", "2"]);
    let mut ann = util::Client::login(server.addr, "ann");
    let mut bob = util::Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set color green"), "ok");
    bob.send("par");
    let mark = server.mark();
    server.deploy(&faulty("panic-after-adopt"));
    let line = server.upgrade();
    assert!(line.contains("upgrade rolled back"), "{line}");
    server.wait_log(
        mark,
        "copyover::boot must be called before any thread starts",
    );
    assert_eq!(
        ann.ask("/version"),
        util::version_line("bad-thread-on-rollback", server.pid, 0)
    );
    assert_eq!(ann.ask("/get color"), "color = green");
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
}

/// Two threads of the new image crash at the same moment: one rolls back,
/// the other waits for that exec (it must not end the process, which would
/// leave the rescue to the holder under another PID).
#[test]
fn two_threads_crashing_at_once_roll_back_once() {
    survive(
        "rb-two-aborts",
        Deploy::Build(&faulty("abort-on-two-threads")),
        "upgrade rolled back",
        "killed by signal 6",
    );
}
