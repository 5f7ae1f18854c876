//! Migration to a new process: the demo hands every client and its state
//! to a new process of the deployed binary and exits; whatever the new
//! process does wrong, the old one serves on with everyone.

mod util;

use std::path::Path;
use std::process::{Command, Output};

use copyover::status::{Outcome, Status, status_path};
use nix::sys::signal::Signal;
use util::*;

/// `copyover migrate PID` against the scene's status directory.
fn migrate(server: &Server, pid: i32) -> Output {
    cli(server, "migrate", pid, &[])
}

/// `copyover COMMAND PID ARGS...` against the scene's status directory.
fn cli(server: &Server, command: &str, pid: i32, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_copyover"))
        .arg(command)
        .arg(pid.to_string())
        .args(args)
        .arg("--status-dir")
        .arg(server.scratch.0.join("status"))
        .output()
        .expect("run copyover")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The new process a successful `copyover migrate` names.
fn new_pid(out: &Output) -> i32 {
    migrated_to(&stdout(out))
}

/// Open descriptors of process `pid`.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

/// Processes started from this scene's binary besides the old server
/// (newcomers left behind, say): its status directory is in their
/// environment.
fn others(server: &Server) -> Vec<u32> {
    server.strays()
}

/// Process `pid`'s process group (`/proc/PID/stat`).
fn pgrp(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    after
        .split_whitespace()
        .nth(2)
        .and_then(|g| g.parse().ok())
        .expect("pgrp")
}

/// Process `pid`'s sockets: descriptor number to socket inode.
fn sockets(pid: i32) -> std::collections::BTreeMap<u32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let link = link.to_string_lossy().into_owned();
            link.starts_with("socket:").then_some((n, link))
        })
        .collect()
}

#[test]
fn a_migration_moves_everyone_to_a_new_process() {
    let mut scene = Scene::start("mg-whole", "5");
    let old = scene.server.pid;
    let before = sockets(old);
    let group = pgrp(old);
    scene.server.deploy(&labelled("v2"));
    let out = migrate(&scene.server, old);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains(&format!("process {old} migrated to process"))
            && text.contains("upgrade complete: v1 to v2, generation 2"),
        "{text}"
    );
    let new = new_pid(&out);
    let _reaper = Reaper(new);
    assert_ne!(new, old);
    // The old process left by itself, successfully.
    assert!(scene.server.wait_exit().success());
    assert_eq!(
        Status::read(&status_path(
            &scene.server.scratch.0.join("status"),
            old as u32
        ))
        .expect("the old process's status file")
        .outcome,
        Outcome::Migrated { to: new as u32 }
    );

    // Everyone, at the new PID: state, the half-typed line once, presence.
    let (ann, bob) = (&mut scene.ann, &mut scene.bob);
    assert_eq!(ann.ask("/version"), version_line("v2", new, 2));
    assert_eq!(ann.ask("/get color"), "color = green");
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
    // One new process, holding what the old one held (its own copies),
    // named as its binary (`ps`, `pgrep`), not after the descriptor it was
    // started from.
    assert_eq!(others(&scene.server), vec![new as u32]);
    // In the old process's process group, which a terminal or a supervisor
    // signals (the old process waited for it before it exited).
    assert_eq!(pgrp(new), group, "the new process's group");
    let comm = std::fs::read_to_string(format!("/proc/{new}/comm")).expect("comm");
    assert_eq!(comm.trim_end(), "copyover-telnet");
    // Every socket it took from the old process is at the number it had
    // there (its kept epoll instance names them so): the listener and
    // both clients at least.
    let after = sockets(new);
    let common: Vec<_> = after
        .iter()
        .filter(|(_, inode)| before.values().any(|b| b == *inode))
        .collect();
    assert!(common.len() >= 3, "{before:?} {after:?}");
    for (n, inode) in common {
        assert_eq!(before.get(n), Some(inode), "fd {n}: {before:?} {after:?}");
    }
    assert_eq!(fd_count(new), scene.fds, "the new process's fd count");

    // It upgrades in place and migrates again like any server.
    let out = cli(&scene.server, "upgrade", new, &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ann.ask("/version"), version_line("v2", new, 3));
    let out = migrate(&scene.server, new);
    assert!(out.status.success(), "{out:?}");
    let third = new_pid(&out);
    let _reaper = Reaper(third);
    assert_eq!(pgrp(third), group, "the third process's group");
    assert_eq!(bob.ask("/version"), version_line("v2", third, 4));
    ann.send("still here\r\n");
    assert_eq!(bob.line(), "ann: still here");
    assert_eq!(ann.ask("/get color"), "color = green");
    ann.assert_quiet();
    bob.assert_quiet();
}

/// Deploys `build`, asks for a migration, and checks that it failed with
/// `outcome` (and `reason` in it), and that the old process serves on with
/// everyone and nothing left behind; then a good migration goes through.
fn old_serves_on(name: &str, build: &Path, outcome: &str, reason: &str) {
    let mut scene = Scene::start(name, "2");
    let old = scene.server.pid;
    scene.server.deploy(build);
    let out = migrate(&scene.server, old);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text} {out:?}");
    assert!(
        text.contains(outcome) && text.contains(reason),
        "expected {outcome:?} with {reason:?}: {text}"
    );
    // Same PID, everyone, no child and no new process left, the same fds.
    scene.everyone_kept("v1", 1, name);
    assert!(scene.server.alive());
    assert_eq!(others(&scene.server), Vec::<u32>::new(), "{name}");

    scene.server.deploy(&labelled("v2"));
    let out = migrate(&scene.server, old);
    assert!(out.status.success(), "{name}: {out:?}");
    let new = new_pid(&out);
    let _reaper = Reaper(new);
    assert_eq!(scene.ann.ask("/version"), version_line("v2", new, 2));
    assert_eq!(scene.ann.ask("/get color"), "color = green");
}

#[test]
fn a_binary_that_cannot_read_the_state_is_refused_by_the_probe() {
    old_serves_on(
        "mg-reject",
        &faulty("reject-state"),
        "upgrade refused",
        "failed the probe",
    );
}

#[test]
fn a_new_process_that_panics_after_adopting_is_killed() {
    old_serves_on(
        "mg-panic",
        &faulty("panic-after-adopt"),
        "upgrade rolled back",
        "it ended before it was ready: it exited with status 101",
    );
}

#[test]
fn a_new_process_that_aborts_is_killed() {
    old_serves_on(
        "mg-abort",
        &faulty("abort-after-adopt"),
        "upgrade rolled back",
        "killed by signal 6",
    );
}

#[test]
fn a_new_process_that_closes_what_it_adopted_costs_nobody() {
    // Its error drops (closes) every adopted socket: the old process's
    // copies are its own, so nobody notices.
    old_serves_on(
        "mg-error",
        &faulty("error-after-adopt"),
        "upgrade rolled back",
        "it ended before it was ready: it exited with status 1",
    );
}

#[test]
fn a_new_process_that_hangs_is_killed_at_the_deadline() {
    old_serves_on(
        "mg-hang",
        &faulty("hang-after-adopt"),
        "upgrade rolled back",
        "it was not ready within 2000 ms",
    );
}

#[test]
fn a_new_process_that_never_reaches_boot_is_refused() {
    old_serves_on(
        "mg-hang-main",
        &faulty("hang-before-main"),
        "upgrade refused",
        "did not reach copyover::boot",
    );
}

/// A v1 scene migrating to the `slow-ready` build, in the window where the
/// old process has handed everything over and the new one is not ready
/// yet (it sleeps 2 s before `ready`); and the log mark from before.
fn handing_over(name: &str) -> (Scene, usize) {
    let scene = Scene::start(name, "10");
    scene.server.deploy(&faulty("slow-ready"));
    let mark = scene.server.mark();
    scene.server.signal(Signal::SIGUSR2);
    scene.server.wait_log(mark, "sleeping 2 s before ready");
    (scene, mark)
}

#[test]
fn an_old_process_killed_after_the_hand_over_leaves_the_new_one_serving() {
    let (mut scene, mark) = handing_over("mg-oldkilled");
    let old = scene.server.pid;
    scene.server.signal(Signal::SIGKILL);
    scene.server.wait_exit();
    scene
        .server
        .wait_log(mark, "ended without handing over for good");
    let version = scene.ann.ask("/version");
    let new = pid_in(&version);
    let _reaper = Reaper(new);
    assert_ne!(new, old);
    assert_eq!(version, version_line("bad-slow-ready", new, 2));
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    assert_eq!(scene.bob.ask("/who"), "online: ann, bob");
}

#[test]
fn a_request_during_a_migration_runs_after_it() {
    let (mut scene, mark) = handing_over("mg-twice");
    let old = scene.server.pid;
    // The old process is handing over: this one waits for the new process.
    scene.server.signal(Signal::SIGUSR2);
    let first = scene.server.wait_log(mark, "migrated to process");
    let second = wait_for("a second migration", || {
        scene
            .server
            .log_since(mark)
            .iter()
            .filter(|l| l.contains("migrated to process"))
            .nth(1)
            .cloned()
    });
    assert_ne!(first, second);
    let version = wait_for("the third process serving", || {
        let v = scene.ann.ask("/version");
        v.contains("generation=3").then_some(v)
    });
    let third = pid_in(&version);
    let _reaper = Reaper(third);
    assert_ne!(third, old);
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    assert_eq!(others(&scene.server), vec![third as u32]);
}

#[test]
fn hundreds_of_connections_cross_in_batches_and_a_short_fd_limit_refuses() {
    let mut scene = Scene::start("mg-many", "10");
    let old = scene.server.pid;
    let mut conns = connect_many(scene.server.addr, 600);
    wait_for("600 more descriptors in the server", || {
        (scene.server.fd_count() >= scene.fds + 600).then_some(())
    });
    // A new process limited to 200 descriptors cannot take 600: the
    // kernel drops what does not fit (MSG_CTRUNC), and the old one serves on.
    let v2 = labelled("v2");
    let limited = format!(
        "#!/bin/sh\nexec prlimit --nofile=200 {} \"$@\"\n",
        v2.display()
    );
    scene.server.deploy_bytes(limited.as_bytes());
    let out = migrate(&scene.server, old);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).contains("RLIMIT_NOFILE"), "{}", stdout(&out));
    assert!(scene.server.alive());
    assert_eq!(others(&scene.server), Vec::<u32>::new());

    // Without the limit: three batches of at most 253.
    scene.server.deploy(&v2);
    let out = migrate(&scene.server, old);
    assert!(out.status.success(), "{out:?}");
    let new = new_pid(&out);
    let _reaper = Reaper(new);
    log_in_each(&mut conns, "u");
    assert_eq!(scene.ann.ask("/version"), version_line("v2", new, 2));
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
}

#[test]
fn the_new_process_may_be_another_user_in_another_mount_namespace() {
    if !nix::unistd::geteuid().is_root() {
        // CI runs as root: there, not running is a failure.
        assert!(
            std::env::var_os("COPYOVER_CI").is_none(),
            "needs root to start the new process as another user"
        );
        eprintln!("SKIP: needs root to start the new process as another user");
        return;
    }
    let mut scene = Scene::start("mg-otheruser", "5");
    let old = scene.server.pid;
    // The build where user 65534 can run it, and a wrapper deployed over
    // the binary: a new mount namespace, then that user.
    let v2 = scene.server.scratch.0.join("v2");
    std::fs::copy(labelled("v2"), &v2).expect("copy v2");
    let mut dir = scene.server.scratch.0.clone();
    while dir.pop() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by others",
            dir.display()
        );
        if dir == Path::new("/") {
            break;
        }
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            &scene.server.scratch.0,
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod the scratch folder");
    }
    let wrapper = format!(
        "#!/bin/sh\nexec unshare --mount setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\"\n",
        v2.display()
    );
    scene.server.deploy_bytes(wrapper.as_bytes());
    let mark = scene.server.mark();
    scene.server.signal(Signal::SIGUSR2);
    let line = scene.server.wait_log(mark, "migrated to process");
    assert!(scene.server.wait_exit().success(), "{line}");
    let version = scene.ann.ask("/version");
    let new = pid_in(&version);
    let _reaper = Reaper(new);
    assert_eq!(version, version_line("v2", new, 2));
    // Another user, another mount namespace.
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("a Uid line");
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid}"
    );
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("ns");
    assert_ne!(ns(&new.to_string()), ns("self"));
    // Everyone kept.
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    assert_eq!(scene.bob.ask("/who"), "online: ann, bob");
    assert_ne!(new, old);
}

#[test]
fn a_new_process_killed_before_its_boot_is_refused_at_once() {
    let mut scene = Scene::start("mg-killed-early", "5");
    scene.server.deploy(&faulty("hang-before-main"));
    let mark = scene.server.mark();
    scene.server.signal(Signal::SIGUSR2);
    // The new process, hanging in a constructor before `main` (not the
    // probe, which may still be running: only the new process has the
    // migration variable).
    let newcomer = wait_for("the new process", || {
        others(&scene.server).into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|v| v.starts_with(b"COPYOVER_MIGRATE="))
            })
        })
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(newcomer as i32), Signal::SIGKILL)
        .expect("kill the new process");
    let line = scene.server.wait_log(mark, "upgrade refused");
    assert!(
        line.contains("it ended before it was ready: it was killed by signal 9"),
        "{line}"
    );
    scene.everyone_kept("v1", 1, "a new process killed before boot");
    assert_eq!(others(&scene.server), Vec::<u32>::new());
}

#[test]
fn a_shutdown_during_the_hand_over_stops_the_server_and_the_new_process() {
    let (mut scene, mark) = handing_over("mg-shutdown");
    let newcomer = others(&scene.server);
    assert_eq!(newcomer.len(), 1, "{newcomer:?}");
    scene.server.signal(Signal::SIGTERM);
    // The old process says goodbye to everyone and exits; the new one,
    // which never served, is killed rather than left serving.
    scene
        .ann
        .expect_line("The server is shutting down. Goodbye.");
    scene
        .bob
        .expect_line("The server is shutting down. Goodbye.");
    assert!(scene.server.wait_exit().success());
    let line = scene.server.wait_log(mark, "upgrade refused");
    assert!(line.contains("a shutdown was requested"), "{line}");
    wait_for("the new process to be gone", || {
        (!Path::new(&format!("/proc/{}", newcomer[0])).exists()).then_some(())
    });
}

#[test]
fn a_binary_whose_runtime_predates_migrations_is_refused() {
    // It answers an upgrade's probe as an older copyover runtime does (and
    // would start fresh beside the old process if it were started).
    let older = b"#!/bin/sh\n\
        [ -n \"$COPYOVER_PROBE\" ] || exit 9\n\
        cat >/dev/null\n\
        echo \"copyover-probe 1 ok $COPYOVER_PROBE v0-older\"\n";
    let mut scene = Scene::start("mg-older", "5");
    let old = scene.server.pid;
    scene.server.deploy_bytes(older);
    let out = migrate(&scene.server, old);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("predates migrations"), "{text}");
    scene.everyone_kept("v1", 1, "an older runtime");
    assert_eq!(others(&scene.server), Vec::<u32>::new());
}

#[test]
fn a_forking_wrapper_is_killed_whole_when_its_server_hangs() {
    // The wrapper does not exec: the server is its child, in the process
    // group the old process made for the new one. At the deadline the
    // whole group is killed: no server is left behind holding the clients'
    // sockets (or serving them).
    let mut scene = Scene::start("mg-forking", "2");
    let old = scene.server.pid;
    let hang = scene.server.scratch.0.join("hang");
    std::fs::copy(faulty("hang-after-adopt"), &hang).expect("copy the build");
    let wrapper = format!("#!/bin/sh\n{} \"$@\"\nexit $?\n", hang.display());
    scene.server.deploy_bytes(wrapper.as_bytes());
    let out = migrate(&scene.server, old);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout(&out).contains("it was not ready within 2000 ms"),
        "{}",
        stdout(&out)
    );
    wait_for(
        "every process of the new process's group to be gone",
        || others(&scene.server).is_empty().then_some(()),
    );
    scene.everyone_kept("v1", 1, "a forking wrapper");
}

#[test]
fn an_upgrade_asked_during_a_migration_runs_after_it() {
    let (mut scene, mark) = handing_over("mg-then-upgrade");
    let old = scene.server.pid;
    // SIGHUP to the old process while it hands over: passed on to the new
    // one, which upgrades in place once it serves.
    scene.server.signal(Signal::SIGHUP);
    let new = migrated_to(&scene.server.wait_log(mark, "migrated to process"));
    let _reaper = Reaper(new);
    let version = wait_for("the in-place upgrade of the new process", || {
        let v = scene.ann.ask("/version");
        v.contains("generation=3").then_some(v)
    });
    assert_eq!(version, version_line("bad-slow-ready", new, 3));
    assert_ne!(new, old);
    assert_eq!(scene.ann.ask("/get color"), "color = green");
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
}

#[test]
fn a_server_alone_in_its_process_group_leaves_the_group_to_the_new_process() {
    // As a shell's job or a supervisor starts it: the only member of a
    // group of its own. The group would go with the old process's exit,
    // so the old process waits for the new one to join it first: signals
    // to that group (Ctrl-C, a supervisor's kill) still reach the server.
    let server = Server::spawn("mg-group", &labelled("v1"), |bin| {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0"]);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    });
    let group = server.pid;
    assert_eq!(pgrp(server.pid), group);
    // This test process adopts the orphans (each old process once its own
    // parent is gone) and reaps each old process the moment it exits, as a
    // shell or a supervisor does: no zombie keeps the group alive for the
    // new process.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    let reap_when_it_exits = |pid: i32| {
        std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        })
    };
    let mut ann = Client::login(server.addr, "ann");
    let mut pid = server.pid;
    let mut reapers = Vec::new();
    for round in 1..=5 {
        let reaper = reap_when_it_exits(pid);
        let out = migrate(&server, pid);
        reaper.join().expect("the reaping thread");
        assert!(out.status.success(), "round {round}: {out:?}");
        pid = new_pid(&out);
        reapers.push(Reaper(pid));
        assert_eq!(pgrp(pid), group, "round {round}: the new process's group");
        assert_eq!(ann.ask("/version"), version_line("v1", pid, round));
    }
    // A slow new process (strace delays its setpgid calls by 200 ms): the
    // old one, waiting for `joined`, still holds the group when it joins.
    let out = server.scratch.0.join("strace.out");
    let Some(strace) = traced(pid, "setpgid", &["setpgid:delay_enter=200000"], &out) else {
        return;
    };
    let reaper = reap_when_it_exits(pid);
    let moved = migrate(&server, pid);
    reaper.join().expect("the reaping thread");
    let trace = detach(strace, &out);
    assert!(moved.status.success(), "{moved:?}");
    pid = new_pid(&moved);
    reapers.push(Reaper(pid));
    assert!(trace.contains("DELAYED"), "{trace}");
    assert_eq!(pgrp(pid), group, "the slow new process's group\n{trace}");
}

#[test]
fn a_migration_asked_to_stay_leaves_the_old_process_holding_nothing_until_stopped() {
    let mut scene = Scene::start("mg-stay", "5");
    let old = scene.server.pid;
    scene.server.deploy(&labelled("v2"));
    let out = cli(&scene.server, "migrate", old, &["--stay"]);
    assert!(out.status.success(), "{out:?}");
    let new = new_pid(&out);
    let _reaper = Reaper(new);
    // The old process stays, and holds none of what it handed over.
    scene
        .server
        .wait_log(0, "migrated: staying, serving nobody, until stopped");
    assert!(scene.server.alive());
    let held = sockets(old);
    let theirs = sockets(new);
    assert!(
        held.values()
            .all(|inode| !theirs.values().any(|t| t == inode)),
        "the old process still holds {held:?}; the new one {theirs:?}"
    );
    assert_eq!(scene.ann.ask("/version"), version_line("v2", new, 2));
    scene.bob.send("tial line\r\n");
    assert_eq!(scene.ann.line(), "bob: partial line");
    // Stopped, it exits 0; nobody notices.
    scene.server.signal(Signal::SIGTERM);
    assert!(scene.server.wait_exit().success());
    assert_eq!(scene.bob.ask("/who"), "online: ann, bob");
    // A connection the new process closes ends: no copy elsewhere holds it.
    scene.ann.send("/quit\r\n");
    assert_eq!(scene.ann.line(), "bye");
    wait_for("ann's end of stream", || {
        let mut chunk = [0u8; 256];
        match std::io::Read::read(&mut scene.ann.stream, &mut chunk) {
            Ok(0) => Some(()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("ann: {e}"),
        }
    });
}
