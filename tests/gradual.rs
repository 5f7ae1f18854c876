//! A gradual migration: both processes serve, users move a batch at a
//! time, chat and `/who` reach across; the operator can move everyone
//! back; a process that dies midway costs only the users it held.

mod util;

use std::process::{Child, Command, Output, Stdio};

use copyover::status::{Outcome, Status, status_path};
use nix::sys::signal::Signal;
use util::*;

/// `copyover migrate PID ARGS...` against the scene's status directory,
/// started and not waited for.
fn migrate_in_background(server: &Server, pid: i32, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_copyover"))
        .arg("migrate")
        .arg(pid.to_string())
        .args(args)
        .arg("--status-dir")
        .arg(server.scratch.0.join("status"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run copyover")
}

fn finished(child: Child) -> (Output, String) {
    let out = child.wait_with_output().expect("copyover's outcome");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

/// Four more users, `c0`..`c3`, logged in after ann and bob.
fn four_more(server: &Server) -> Vec<Client> {
    (0..4)
        .map(|i| Client::login(server.addr, &format!("c{i}")))
        .collect()
}

/// The process that serves `client` now.
fn serving(client: &mut Client) -> i32 {
    pid_in(&client.ask("/version"))
}

/// Waits until `client` is served by a process other than `old`; returns it.
fn moved(client: &mut Client, old: i32) -> i32 {
    wait_for(&format!("{} to move", client.name), || {
        let pid = serving(client);
        (pid != old).then_some(pid)
    })
}

fn old_outcome(server: &Server) -> Outcome {
    Status::read(&status_path(
        &server.scratch.0.join("status"),
        server.pid as u32,
    ))
    .expect("the old process's status file")
    .outcome
}

/// A scene with c0..c3 besides ann and bob, migrating gradually to v2 two
/// users a minute: after the first batch, ann and bob (the oldest
/// connections) are in the new process, c0..c3 in the old one. The scene,
/// c0..c3, the `copyover migrate` under way, and the new process.
fn first_batch_moved(name: &str) -> (Scene, Vec<Client>, Child, i32) {
    let mut scene = Scene::start(name, "5");
    let old = scene.server.pid;
    let others = four_more(&scene.server);
    scene.server.deploy(&labelled("v2"));
    let mark = scene.server.mark();
    let cli = migrate_in_background(&scene.server, old, &["--batch", "2", "--every", "60"]);
    scene.server.wait_log(mark, "users arrived users=2");
    let new = moved(&mut scene.ann, old);
    (scene, others, cli, new)
}

#[test]
fn users_move_in_batches_chat_across_and_can_be_moved_back() {
    let (mut scene, mut others, cli, new) = first_batch_moved("gr-batches");
    let old = scene.server.pid;
    let _reaper = Reaper(new);
    assert_eq!(scene.ann.ask("/version"), version_line("v2", new, 2));
    assert_eq!(serving(&mut others[0]), old, "c0 stays until its batch");
    // The moved users' state came with them: a variable, a half-typed line.
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    assert_eq!(
        others[0].line(),
        "bob: partial line",
        "across to the old process"
    );
    for c in &mut others[1..] {
        assert_eq!(c.line(), "bob: partial line");
    }
    others[0].send("hello from the old side\r\n");
    assert_eq!(scene.ann.line(), "c0: hello from the old side");
    assert_eq!(scene.bob.line(), "c0: hello from the old side");
    for c in &mut others[1..] {
        assert_eq!(c.line(), "c0: hello from the old side");
    }
    // Everyone is online on both sides.
    let everyone = "online: ann, bob, c0, c1, c2, c3";
    assert_eq!(
        wait_for("both sides in ann's /who", || {
            let who = scene.ann.ask("/who");
            (who == everyone).then_some(who)
        }),
        everyone
    );
    assert_eq!(others[3].ask("/who"), everyone);

    // The operator stops it: everyone back in the old process, the new one
    // gone.
    let (back, _) = finished(migrate_in_background(&scene.server, old, &["--back"]));
    assert!(back.status.success(), "{back:?}");
    let (out, text) = finished(cli);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the migration's own outcome: {text}"
    );
    assert!(text.contains("moved back"), "{text}");
    assert!(
        matches!(old_outcome(&scene.server), Outcome::RolledBack { reason } if reason.contains("every user moved back")),
    );
    wait_for("the new process to exit", || {
        (!std::path::Path::new(&format!("/proc/{new}")).exists()
            || std::fs::read_to_string(format!("/proc/{new}/stat"))
                .is_ok_and(|s| s.contains(") Z ")))
        .then_some(())
    });
    assert_eq!(scene.ann.ask("/version"), version_line("v1", old, 1));
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.ann.send("back home\r\n");
    assert_eq!(scene.bob.line(), "ann: back home");
    for c in &mut others {
        assert_eq!(c.line(), "ann: back home");
    }
    assert_eq!(scene.bob.ask("/who"), "online: ann, bob, c0, c1, c2, c3");
    // The old process accepts again.
    let mut late = Client::login(scene.server.addr, "late");
    assert_eq!(late.ask("/version"), version_line("v1", old, 1));

    // Then to the end, a batch every 100 ms: the old process exits.
    let cli = migrate_in_background(&scene.server, old, &["--batch", "3", "--every", "0.1"]);
    let (out, text) = finished(cli);
    assert!(out.status.success(), "{text} {out:?}");
    let new = migrated_to(&text);
    let _reaper = Reaper(new);
    assert!(scene.server.wait_exit().success());
    for c in std::iter::once(&mut scene.ann)
        .chain(std::iter::once(&mut scene.bob))
        .chain(others.iter_mut())
        .chain(std::iter::once(&mut late))
    {
        assert_eq!(c.ask("/version"), version_line("v2", new, 2), "{}", c.name);
    }
    assert_eq!(
        scene.ann.ask("/who"),
        "online: ann, bob, c0, c1, c2, c3, late"
    );
    scene.ann.send("all here\r\n");
    assert_eq!(late.line(), "ann: all here");
}

#[test]
fn a_new_process_killed_midway_costs_only_the_users_it_took() {
    let (mut scene, mut others, cli, new) = first_batch_moved("gr-newdies");
    let old = scene.server.pid;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGKILL).expect("kill");
    let (out, text) = finished(cli);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("lost with it"), "{text}");
    // Everyone it had not taken is served by the old process, state and
    // all; it accepts again.
    for c in &mut others {
        assert_eq!(c.ask("/version"), version_line("v1", old, 1), "{}", c.name);
    }
    others[0].send("still here\r\n");
    for c in &mut others[1..] {
        assert_eq!(c.line(), "c0: still here");
    }
    assert_eq!(others[1].ask("/who"), "online: c0, c1, c2, c3");
    let mut late = Client::login(scene.server.addr, "late");
    assert_eq!(late.ask("/version"), version_line("v1", old, 1));
    assert!(scene.server.alive());
}

#[test]
fn an_old_process_killed_midway_leaves_the_moved_users_served() {
    let (mut scene, _others, cli, new) = first_batch_moved("gr-olddies");
    let _reaper = Reaper(new);
    let mark = scene.server.mark();
    scene.server.signal(Signal::SIGKILL);
    scene.server.wait_exit();
    let _ = finished(cli);
    scene.server.wait_log(mark, "upgrade complete");
    // The users it had taken are its own: they chat, the others are gone
    // from /who, and it accepts.
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    assert_eq!(scene.ann.ask("/who"), "online: ann, bob");
    let mut late = Client::login(scene.server.addr, "late");
    assert_eq!(late.ask("/version"), version_line("v2", new, 2));
}

#[test]
fn an_upgrade_asked_during_a_gradual_migration_waits_for_its_end() {
    let mut scene = Scene::start("gr-waits", "5");
    let old = scene.server.pid;
    scene.server.deploy(&labelled("v2"));
    let mark = scene.server.mark();
    let cli = migrate_in_background(&scene.server, old, &["--batch", "1", "--every", "2"]);
    scene.server.wait_log(mark, "users arrived users=1");
    // SIGHUP to the old process now: nothing upgrades in place while both
    // serve; the new process runs it once it serves alone.
    scene.server.signal(Signal::SIGHUP);
    scene
        .server
        .wait_log(mark, "a gradual migration is under way: the request waits");
    let (out, text) = finished(cli);
    assert!(out.status.success(), "{text}");
    let new = migrated_to(&text);
    let _reaper = Reaper(new);
    wait_for("the passed-on upgrade", || {
        (pid_in(&scene.ann.ask("/version")) == new
            && scene.ann.ask("/version") == version_line("v2", new, 3))
        .then_some(())
    });
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
}

#[test]
fn a_batch_larger_than_the_new_process_may_hold_stays_with_the_old_one() {
    let mut scene = Scene::start("gr-fdlimit", "5");
    let old = scene.server.pid;
    let mut conns = connect_many(scene.server.addr, 300);
    wait_for("300 more descriptors in the server", || {
        (scene.server.fd_count() >= scene.fds + 300).then_some(())
    });
    // The new process may hold 100 descriptors: a batch of 302 does not
    // fit (the kernel drops what does not, MSG_CTRUNC); it refuses the
    // batch, and the old process keeps every user.
    let limited = format!(
        "#!/bin/sh\nexec prlimit --nofile=100 {} \"$@\"\n",
        labelled("v2").display()
    );
    scene.server.deploy_bytes(limited.as_bytes());
    let mark = scene.server.mark();
    let cli = migrate_in_background(&scene.server, old, &["--batch", "400", "--every", "60"]);
    let line = scene.server.wait_log(mark, "the batch stays here");
    assert!(line.contains("RLIMIT_NOFILE"), "{line}");
    assert_eq!(serving(&mut scene.ann), old);
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    // The operator stops it: the new process, with nobody, leaves.
    let (back, _) = finished(migrate_in_background(&scene.server, old, &["--back"]));
    assert!(back.status.success(), "{back:?}");
    let (out, text) = finished(cli);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // Every connection still reaches the old process.
    log_in_each(&mut conns, "u");
    assert_eq!(scene.ann.ask("/version"), version_line("v1", old, 1));
    assert_eq!(scene.ann.ask("/get color"), "color = green");
}

#[test]
fn a_line_said_while_a_batch_is_made_reaches_the_moving_user_once() {
    // The old process (a build that pauses 300 ms between making a batch
    // and sending it) moves one user at a time.
    let server = Server::start("gr-missed", &faulty("slow-batch"));
    let old = server.pid;
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    server.deploy(&labelled("v2"));
    let mark = server.mark();
    let cli = migrate_in_background(&server, old, &["--batch", "1", "--every", "2"]);
    server.wait_log(mark, "users arrived users=1");
    let new = moved(&mut ann, old);
    let _reaper = Reaper(new);
    assert_eq!(serving(&mut bob), old);
    // While the old process makes bob's batch, ann (in the new process)
    // speaks: the new process forwards her line to the old one, which
    // reads it only after bob left; bob arrives after the new process
    // delivered it to its users. He gets it from the batch's `missed`.
    let mark = server.mark();
    server.wait_log(mark, "sleeping 300 ms before moving the batch");
    ann.send("said as bob moves\r\n");
    assert_eq!(bob.line(), "ann: said as bob moves");
    ann.send("and after\r\n");
    assert_eq!(bob.line(), "ann: and after", "once, not twice");
    let (out, text) = finished(cli);
    assert!(out.status.success(), "{text}");
    assert_eq!(bob.ask("/version"), version_line("v2", new, 1));
}

/// A scene migrating one user at a time to a build that sleeps 3 s before
/// it takes a batch, caught in that sleep with ann's batch: the scene, the
/// `copyover migrate` under way, and the new process.
fn in_a_batch(name: &str) -> (Scene, Child, i32) {
    let scene = Scene::start(name, "10");
    let old = scene.server.pid;
    scene.server.deploy(&faulty("slow-take"));
    let mark = scene.server.mark();
    let cli = migrate_in_background(&scene.server, old, &["--batch", "1", "--every", "60"]);
    scene
        .server
        .wait_log(mark, "sleeping 3 s before taking the users");
    let new = wait_for("the new process", || {
        scene.server.strays().first().map(|p| *p as i32)
    });
    (scene, cli, new)
}

#[test]
fn a_new_process_killed_before_it_took_a_batch_costs_no_one() {
    // The new process sleeps before it takes a batch; it is killed then,
    // while the old process waits for its `took`.
    let (scene, cli, new) = in_a_batch("gr-killed-in-batch");
    let mut scene = scene;
    let old = scene.server.pid;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGKILL).expect("kill");
    let (out, text) = finished(cli);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the 0 user(s) it had taken are lost"),
        "{text}"
    );
    // ann, whose batch it was, and bob are still with the old process,
    // which accepts again.
    scene.everyone_kept("v1", 1, "a new process killed in a batch");
    let mut late = Client::login(scene.server.addr, "late");
    assert_eq!(late.ask("/version"), version_line("v1", old, 1));
}

#[test]
fn an_old_process_killed_in_a_batch_leaves_that_batch_with_the_new_one() {
    // The new process sleeps before it takes ann's batch; the old process
    // is killed then. The batch had not been confirmed: the new process
    // finds the old one gone and serves ann.
    let (mut scene, cli, new) = in_a_batch("gr-old-killed-in-batch");
    let mark = scene.server.mark();
    let _reaper = Reaper(new);
    scene.server.signal(Signal::SIGKILL);
    scene.server.wait_exit();
    let _ = finished(cli);
    scene
        .server
        .wait_log(mark, "ended as it handed a batch over");
    assert_eq!(
        scene.ann.ask("/version"),
        version_line("bad-slow-take", new, 2)
    );
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    assert_eq!(scene.ann.ask("/who"), "online: ann");
}

#[test]
fn a_new_process_that_panics_after_adopting_the_shared_part_costs_no_one() {
    let mut scene = Scene::start("gr-panics", "5");
    let old = scene.server.pid;
    scene.server.deploy(&faulty("panic-after-adopt"));
    let cli = migrate_in_background(&scene.server, old, &["--batch", "1", "--every", "0.1"]);
    let (out, text) = finished(cli);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("rolled back"), "{text}");
    scene.everyone_kept("v1", 1, "a new process that panics in a gradual migration");
}
