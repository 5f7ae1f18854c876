//! Hardening: the bad deploys and the local mischief that used to cost
//! every client, tried the way an operator or a local user would (wrapper
//! scripts, `ulimit`, `LD_PRELOAD`, a second deploy during the probe, files
//! planted in the status directory, a reused PID). Each ends in a refusal,
//! a rollback or a completed upgrade with every client kept, or a clear
//! error with service going on.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use util::{
    Client, Deploy, Lines, Reaper, Scene, Scratch, Server, connect_many, faulty, labelled,
    log_in_each, pid_in, survive, version_line, wait_for,
};

const THREADS: &str = "before any thread starts";

#[test]
fn a_thread_started_before_boot_is_refused_by_the_probe() {
    survive(
        "hd-thread",
        Deploy::Build(&faulty("thread-before-boot")),
        "upgrade refused",
        THREADS,
    );
}

/// A shared library whose constructor starts a thread, built with gcc.
fn thread_library() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-lib");
    std::fs::create_dir_all(&dir).expect("create target/test-lib");
    let src = dir.join("thread.c");
    let lib = dir.join(format!("thread-{}.so", std::process::id()));
    std::fs::write(
        &src,
        "#include <pthread.h>\n#include <unistd.h>\n\
         static void *idle(void *a) { for (;;) pause(); return a; }\n\
         __attribute__((constructor)) static void start(void) \
         { pthread_t t; pthread_create(&t, 0, idle, 0); }\n",
    )
    .expect("write thread.c");
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .status()
        .expect("run gcc (the tests need a C compiler for LD_PRELOAD)");
    assert!(status.success(), "gcc failed");
    lib
}

#[test]
fn a_thread_from_ld_preload_outside_the_probe_rolls_back() {
    // The wrapper adds the library only outside probe mode: the probe
    // passes, the new image has a thread before `boot`.
    let lib = thread_library();
    let v2 = labelled("v2");
    let script = format!(
        "#!/bin/sh\n[ -n \"$COPYOVER_PROBE\" ] || export LD_PRELOAD='{}'\nexec '{}' \"$@\"\n",
        lib.display(),
        v2.display()
    );
    // `survive` then checks that a good upgrade still goes through: the
    // old image came back without the wrapper's LD_PRELOAD.
    survive(
        "hd-preload",
        Deploy::Bytes(script.as_bytes()),
        "upgrade rolled back",
        THREADS,
    );
    let _ = std::fs::remove_file(lib);
}

#[test]
fn an_error_returned_from_main_after_adopting_rolls_back_with_everyone() {
    // The destructors close every adopted socket before the exit hook runs;
    // the rollback takes them back from the holder.
    survive(
        "hd-error",
        Deploy::Build(&faulty("error-after-adopt")),
        "upgrade rolled back",
        "exited before it was ready",
    );
}

/// The soft `RLIMIT_NOFILE` of `pid`, from `/proc/PID/limits`.
fn soft_nofile(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("a soft limit of open files")
}

/// The fd numbers `pid` has open, from `/proc/PID/fd`.
fn fd_numbers(pid: i32) -> Vec<u64> {
    let mut numbers: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    numbers
}

#[test]
fn a_new_image_with_fewer_descriptors_allowed_is_rescued_or_rolled_back_with_the_old_limit() {
    // A wrapper lowers the soft limit for the new image only, from 3 (no
    // descriptor beyond standard I/O) up to room above every inherited one.
    // * At 3 the new image cannot even load its libraries and dies before
    //   `main`: the holder rescues the old binary, under the old limit (the
    //   holder's).
    // * Above the highest number the old image uses, with room to spare,
    //   it completes under the wrapper's limit.
    // * In between, which of the three it is depends on which numbers are
    //   free at the exec (the old image's close-on-exec descriptors and the
    //   commit's own memfds move them), so each limit is only held to the
    //   invariants: everyone kept, and the old limit back unless complete.
    let v2 = labelled("v2");
    let highest = fd_numbers(Scene::start("hd-nofile-probe", "5").server.pid)
        .last()
        .copied()
        .unwrap_or(0);
    let top = highest + 10;
    let mut seen = Vec::new();
    for limit in 3..=top {
        let mut scene = Scene::start(&format!("hd-nofile{limit}"), "5");
        let context = format!("soft limit {limit} (highest fd {highest})");
        let before = soft_nofile(scene.server.pid);
        let script = format!(
            "#!/bin/sh\n[ -n \"$COPYOVER_PROBE\" ] || ulimit -Sn {limit}\nexec '{}' \"$@\"\n",
            v2.display()
        );
        scene.server.deploy_bytes(script.as_bytes());
        // The log's line: a rescue is not in the old PID's status file.
        let mark = scene.server.mark();
        scene.server.signal(Signal::SIGHUP);
        let line = scene.server.wait_log(mark, ": upgrade ");
        let outcome = if line.contains("the holder started the old binary") {
            "rescued"
        } else if line.contains("upgrade rolled back") {
            "rolled back"
        } else {
            assert!(line.contains("upgrade complete"), "{context}: {line}");
            "complete"
        };
        seen.push((limit, outcome));
        match outcome {
            "complete" => {
                assert_eq!(soft_nofile(scene.server.pid), limit, "{context}");
                scene.everyone_kept("v2", 2, &context);
            }
            "rolled back" => {
                assert!(line.contains("Too many open files"), "{context}: {line}");
                assert_eq!(
                    soft_nofile(scene.server.pid),
                    before,
                    "{context}: the old limit"
                );
                scene.everyone_kept("v1", 1, &context);
            }
            _ => {
                let version = scene.ann.ask("/version");
                let rescued = pid_in(&version);
                let _reaper = Reaper(rescued);
                assert_ne!(rescued, scene.server.pid, "{context}: a new PID");
                assert!(
                    version.starts_with("copyover-telnetd v1 "),
                    "{context}: {version}"
                );
                assert_eq!(soft_nofile(rescued), before, "{context}: the old limit");
                assert_eq!(scene.ann.ask("/get color"), "color = green");
                scene.bob.send("tial line\r\n");
                assert_eq!(scene.ann.line(), "bob: partial line", "{context}");
            }
        }
    }
    assert_eq!(seen.first(), Some(&(3, "rescued")), "{seen:?}");
    assert_eq!(seen.last(), Some(&(top, "complete")), "{seen:?}");
    // Between them, some limit lets the new image start but not serve:
    // the rollback's branch above ran (the old limit back, same PID).
    assert!(seen.iter().any(|(_, o)| *o == "rolled back"), "{seen:?}");
    eprintln!("outcomes by soft limit: {seen:?}");
}

#[test]
fn the_file_that_runs_is_the_file_that_was_probed() {
    // A second deploy lands while the first is being probed: the file
    // that answered the probe is the one executed, not its replacement.
    let v1 = labelled("v1");
    let v2 = labelled("v2");
    let server = Server::start("hd-swap", &v1);
    let mut ann = Client::login(server.addr, "ann");
    server.deploy(&v1);
    assert!(server.upgrade().contains("upgrade complete"));
    let fds = server.fd_count();
    let bin = server.binary.display();
    let script = format!(
        "#!/bin/sh\nif [ -n \"$COPYOVER_PROBE\" ]; then cp /usr/bin/sleep '{bin}.swap' && mv '{bin}.swap' '{bin}'; fi\nexec '{}' \"$@\"\n",
        v2.display()
    );
    server.deploy_bytes(script.as_bytes());
    let line = server.upgrade();
    assert!(line.contains("upgrade complete"), "{line}");
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 2));
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid)).expect("read /proc/PID/exe");
    assert_eq!(exe, v2, "the server runs {exe:?}");
    // The path now holds `sleep`, which nobody executed.
    let on_disk = std::fs::read(&server.binary).expect("read the binary");
    assert_eq!(
        on_disk,
        std::fs::read("/usr/bin/sleep").expect("read sleep")
    );
    // The script's descriptor did not leak into the new image.
    assert_eq!(server.fd_count(), fds);
}

/// `/proc/PID/fdinfo` flags of every fd from 3 up: (fd, close-on-exec).
fn cloexec_flags(pid: i32) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let entry = entry.expect("fdinfo entry");
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fd < 3 {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .expect("flags in fdinfo");
        out.push((fd, flags & libc::O_CLOEXEC as u32 != 0));
    }
    out
}

#[test]
fn nothing_is_inheritable_before_ready_and_a_rollback_keeps_everyone() {
    // A new image that hangs before `ready`: while it hangs, no descriptor
    // would reach a child it starts; at the deadline it rolls back with
    // every client.
    let v1 = labelled("v1");
    let server = Server::start_with("hd-cloexec", &v1, &["--ready-timeout", "3"]);
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    server.deploy(&v1);
    assert!(server.upgrade().contains("upgrade complete"));
    let fds = server.fd_count();
    let mark = server.mark();
    server.deploy(&faulty("hang-after-adopt"));
    server.signal(Signal::SIGHUP);
    server.wait_log(mark, "this is a fault build");
    let leaks: Vec<u32> = cloexec_flags(server.pid)
        .into_iter()
        .filter(|(_, cloexec)| !cloexec)
        .map(|(fd, _)| fd)
        .collect();
    assert!(leaks.is_empty(), "inheritable before ready: fds {leaks:?}");
    server.wait_log(mark, "upgrade rolled back");
    assert_eq!(ann.ask("/version"), version_line("v1", server.pid, 1));
    bob.send("still here\r\n");
    assert_eq!(ann.line(), "bob: still here");
    assert_eq!(server.fd_count(), fds);
}

fn status_dir(server: &Server) -> PathBuf {
    server.scratch.0.join("status")
}

/// Waits until the server has written its status file, and returns its path.
fn status_file(server: &Server) -> PathBuf {
    let path = status_dir(server).join(format!("{}.status", server.pid));
    wait_for("the status file", || path.exists().then_some(()));
    path
}

#[test]
fn a_fifo_or_a_symlink_in_the_status_directory_changes_nothing() {
    let server = Server::start("hd-fifo", &labelled("v1"));
    let path = status_file(&server);
    // A FIFO at the status file's path: neither a reader nor the writer
    // may block on it.
    std::fs::remove_file(&path).expect("remove the status file");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // An outcome is published: a refused upgrade (a non-copyover binary).
    server.deploy_bytes(b"#!/bin/sh\nexit 0\n");
    assert!(server.upgrade().contains("upgrade refused"));
    // Serving went on: a new client gets its greeting.
    let mut carl = Client::login(server.addr, "carl");
    assert_eq!(carl.ask("/who"), "online: carl");
    assert!(std::fs::metadata(&path).expect("status").is_file());
    let status = copyover::status::Status::read(&path).expect("a status file again");
    assert_eq!(status.outcome, "refused");
    // A symlink at the status file's own path, to a file to overwrite: the
    // next outcome replaces the link, and the file is untouched. (The
    // temporary name the writer uses is fresh and created with
    // O_CREAT|O_EXCL|O_NOFOLLOW: the unit tests of `status` plant there.)
    let victim = server.scratch.0.join("victim");
    std::fs::write(&victim, "precious").expect("write the victim");
    std::fs::remove_file(&path).expect("remove the status file");
    std::os::unix::fs::symlink(&victim, &path).expect("symlink");
    assert!(server.upgrade().contains("upgrade refused"));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&path).expect("status").is_file());
    let status = copyover::status::Status::read(&path).expect("a status file again");
    assert_eq!(status.outcome, "refused");
}

#[test]
fn a_status_directory_others_can_write_is_refused_and_serving_goes_on() {
    let server = Server::start("hd-statusdir", &labelled("v1"));
    let path = status_file(&server);
    let dir = status_dir(&server);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let before = std::fs::read_to_string(&path).expect("status");
    let mark = server.mark();
    server.deploy_bytes(b"#!/bin/sh\nexit 0\n");
    assert!(server.upgrade().contains("upgrade refused"));
    server.wait_log(mark, "not writing the status file");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        before,
        "written anyway"
    );
    let mut carl = Client::login(server.addr, "carl");
    assert_eq!(carl.ask("/who"), "online: carl");
}

#[test]
fn a_status_directory_of_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        // CI runs as root: there, not running is a failure.
        assert!(
            std::env::var_os("COPYOVER_CI").is_none(),
            "needs root to make a directory owned by another user"
        );
        eprintln!("SKIP: needs root to make a directory owned by another user");
        return;
    }
    let server = Server::spawn("hd-otheruser", &labelled("v1"), |bin| {
        let dir = bin.parent().expect("scratch").join("status");
        std::fs::create_dir(&dir).expect("mkdir");
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0"]);
        cmd
    });
    server.wait_log(0, "not writing the status file");
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/who"), "online: ann");
    let written = std::fs::read_dir(status_dir(&server)).expect("ls").count();
    assert_eq!(
        written, 0,
        "a file was written into another user's directory"
    );
}

#[test]
fn upgrade_refuses_a_pid_that_was_reused() {
    // A status file outlives a SIGKILLed server; the PID now belongs to an
    // unrelated process, which SIGHUP would kill.
    let scratch = Scratch::new("hd-pidreuse");
    let mut stranger = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start sleep");
    let pid = stranger.id();
    let dir = scratch.0.join("status");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(
        dir.join(format!("{pid}.status")),
        format!("format=1\npid={pid}\napp=copyover-telnetd\nversion=v1\ngeneration=0\nstarted_at=1\nstart_ticks=1\nseq=1\noutcome=started\n"),
    )
    .expect("plant a stale status file");
    let out = Command::new(env!("CARGO_BIN_EXE_copyover"))
        .args([
            "upgrade",
            &pid.to_string(),
            "--timeout",
            "5",
            "--status-dir",
        ])
        .arg(&dir)
        .output()
        .expect("run copyover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("reused"), "{stderr}");
    assert!(
        stranger.try_wait().expect("wait").is_none(),
        "the stranger was signalled"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[test]
fn the_sigusr1_snapshot_is_private_and_follows_no_symlink() {
    let server = Server::start_with("hd-snapfile", &labelled("v1"), &["--snapshot-file", "snap"]);
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set secret 42"), "ok");
    let snap = server.scratch.0.join("snap");
    let victim = server.scratch.0.join("victim");
    std::fs::write(&victim, "precious").expect("write the victim");
    // A symlink at the snapshot's own path: replaced, never followed.
    std::os::unix::fs::symlink(&victim, &snap).expect("symlink");
    let mark = server.mark();
    server.signal(Signal::SIGUSR1);
    server.wait_log(mark, "snapshot saved");
    let meta = std::fs::symlink_metadata(&snap).expect("the snapshot file");
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode() & 0o777);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let out = Command::new(env!("CARGO_BIN_EXE_copyover"))
        .arg("inspect")
        .arg(&snap)
        .output()
        .expect("run copyover inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_new_image_killed_before_ready_is_rescued_by_the_holder() {
    // SIGKILL leaves no way for the new image to roll back by itself: the
    // holder, which kept the old descriptors and memory, starts the old
    // binary again under its own PID, with every client.
    let v1 = labelled("v1");
    let server = Server::start_with("hd-kill9", &v1, &["--ready-timeout", "60"]);
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set color green"), "ok");
    bob.send("par");
    let mark = server.mark();
    server.deploy(&faulty("hang-after-adopt"));
    server.signal(Signal::SIGHUP);
    server.wait_log(mark, "this is a fault build");
    server.signal(Signal::SIGKILL);
    let line = server.wait_log(mark, "upgrade rolled back");
    assert!(line.contains("holder"), "{line}");
    let version = ann.ask("/version");
    let rescued = pid_in(&version);
    let _reaper = Reaper(rescued);
    assert_ne!(rescued, server.pid, "a new PID: the old one was killed");
    assert_eq!(version, version_line("v1", rescued, 0));
    assert_eq!(ann.ask("/get color"), "color = green");
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
    // The rescued server upgrades like any other.
    server.deploy(&labelled("v2"));
    let mark = server.mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rescued), Signal::SIGHUP).expect("SIGHUP");
    server.wait_log(mark, "upgrade complete");
    assert_eq!(ann.ask("/version"), version_line("v2", rescued, 1));
}

/// The signals `pid` catches (`SigCgt` in `/proc/PID/status`), as a mask.
fn caught_signals(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("a SigCgt line")
}

/// Once ready, the runtime gives SIGALRM back as the application had it
/// (here: not caught): the readiness deadline's handler is gone, so an
/// application's own `alarm` is its own again.
#[test]
fn after_ready_sigalrm_is_the_applications_again() {
    let scene = Scene::start("hd-sigalrm", "5");
    let alarm = 1u64 << (Signal::SIGALRM as i32 - 1);
    assert_eq!(
        caught_signals(scene.server.pid) & alarm,
        0,
        "SIGALRM still caught after ready"
    );
}

#[test]
fn a_server_that_shuts_down_removes_its_status_file() {
    let mut server = Server::start("hd-status-gone", &labelled("v1"));
    let path = status_file(&server);
    let status = copyover::status::Status::read(&path).expect("a status file");
    assert_eq!(
        (status.pid, status.app.as_str(), status.version.as_str()),
        (server.pid as u32, "copyover-telnetd", "v1")
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit().success());
    assert!(
        !path.exists(),
        "the status file of a stopped server is left"
    );
}

#[test]
fn a_new_image_under_a_lower_hard_limit_rolls_back_with_every_client() {
    // A wrapper lowers the *hard* limit below some of the numbers the old
    // image hands over, and the new image panics after adopting. The old
    // limit cannot come back (a hard limit only goes down), so a kept
    // descriptor above it cannot be given its copy from the holder (dup3
    // fails): it stays what it is, made inheritable again, and its client
    // is kept. The numbers: 30 more connections, the first 25 of which
    // leave again, so that low numbers are free for the new image to start
    // and the last 5 sit above the limit.
    let bad = faulty("panic-after-adopt");
    let mut scene = Scene::start("hd-hard", "5");
    let mut extra = connect_many(scene.server.addr, 30);
    wait_for("30 more descriptors", || {
        (scene.server.fd_count() >= scene.fds + 30).then_some(())
    });
    let high = extra.split_off(25);
    drop(extra);
    wait_for("the 25 to be closed", || {
        (scene.server.fd_count() <= scene.fds + 5).then_some(())
    });
    let numbers = fd_numbers(scene.server.pid);
    let limit = numbers[numbers.len() - 5];
    let script = format!(
        "#!/bin/sh\n[ -n \"$COPYOVER_PROBE\" ] || ulimit -n {limit}\nexec '{}' \"$@\"\n",
        bad.display()
    );
    scene.server.deploy_bytes(script.as_bytes());
    let line = scene.server.upgrade();
    assert!(
        line.contains("upgrade rolled back") && line.contains("panicked"),
        "hard limit {limit} ({numbers:?}): {line}"
    );
    // The baseline, with the five that stay.
    scene.fds += 5;
    scene.everyone_kept("v1", 1, &format!("hard limit {limit}"));
    // The five above the limit too: each logs in now.
    let mut high = high;
    log_in_each(&mut high, "high");
}
