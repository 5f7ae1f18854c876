//! Operating copyover: systemd notifications and socket activation, the
//! `copyover` CLI, and snapshots for staging.

mod util;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Client, Lines, Server, default_build, labelled, version_line, wait_for};

const V1: &str = env!("CARGO_PKG_VERSION");

/// Receives notification datagrams until one contains `want`.
fn expect_notify(sock: &UnixDatagram, want: &str) -> String {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    wait_for(&format!("a notification with {want:?}"), || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).ok()?;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        msg.contains(want).then_some(msg)
    })
}

#[test]
fn systemd_sees_ready_reloading_ready_at_the_same_pid() {
    let dir = util::Scratch::new("ops-notify-sock");
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let server = Server::spawn("ops-notify", &default_build(), |bin| {
        let mut c = Command::new(bin);
        c.args(["--listen", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &path);
        c
    });
    let ready = expect_notify(&sock, "READY=1");
    assert!(ready.contains("STATUS=serving"), "{ready}");

    server.deploy(&labelled("v2"));
    server.signal(Signal::SIGHUP);
    let reloading = expect_notify(&sock, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect_notify(&sock, "EXTEND_TIMEOUT_USEC=");
    let done = expect_notify(&sock, "READY=1");
    assert!(done.contains("STATUS=upgrade complete"), "{done}");

    // A refusal also ends the reload with READY=1, from the old image.
    server.deploy_bytes(&std::fs::read("/bin/true").unwrap());
    server.signal(Signal::SIGHUP);
    expect_notify(&sock, "RELOADING=1");
    let refused = expect_notify(&sock, "READY=1");
    assert!(refused.contains("STATUS=upgrade refused"), "{refused}");
}

#[test]
fn a_socket_activated_listener_is_adopted_and_survives_upgrades() {
    // python3 plays systemd: a listening socket on fd 3, LISTEN_FDS=1 and
    // LISTEN_PID set to the PID that then executes the demo.
    let script = r#"
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="telnet")
os.execv(sys.argv[1], [sys.argv[1], "--listen", "127.0.0.1:1"])
"#;
    let server = Server::spawn("ops-activation", &default_build(), |bin| {
        let mut c = Command::new("python3");
        c.args(["-c", script]).arg(bin);
        c
    });
    // It listens on the passed socket, not on the --listen address.
    assert_ne!(server.addr.port(), 1);
    let mut ann = Client::login(server.addr, "ann");
    server.deploy(&labelled("v2"));
    assert!(server.upgrade().contains("upgrade complete"));
    // The stale LISTEN_PID (same PID after the exec) was not followed.
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 1));
    let _bob = Client::login(server.addr, "bob");
    assert!(server.upgrade().contains("upgrade complete"));
    assert_eq!(ann.ask("/who"), "online: ann, bob");
}

fn cli(server: &Server, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_copyover"))
        .args(args)
        .env("COPYOVER_STATUS_DIR", server.scratch.0.join("status"))
        .output()
        .expect("run copyover");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_cli_upgrades_and_reports_every_outcome() {
    let server = Server::start("ops-cli", &default_build());
    let pid = server.pid.to_string();
    let mut ann = Client::login(server.addr, "ann");

    let (code, text) = cli(&server, &["status", &pid]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("generation:   0") && text.contains(&format!("version:      {V1}")),
        "{text}"
    );

    server.deploy(&labelled("v2"));
    let (code, text) = cli(&server, &["upgrade", &pid]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "upgrade complete: {V1} to v2, generation 1, blackout"
        )),
        "{text}"
    );
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 1));

    server.deploy_bytes(&std::fs::read("/bin/true").unwrap());
    let (code, text) = cli(&server, &["upgrade", &pid]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("upgrade refused: the new binary failed the probe"),
        "{text}"
    );

    // A probe that hangs: no outcome within a short timeout.
    server.deploy_bytes(b"#!/bin/sh\nsleep 600\n");
    let (code, text) = cli(&server, &["upgrade", &pid, "--timeout", "0.5"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no outcome within"), "{text}");
    wait_for("the hanging probe to be refused", || {
        server.log_text().contains("no answer within").then_some(())
    });
    // The script's own child (`sleep 600`) was killed with the probe, its
    // process group, not left behind.
    wait_for("the probe's processes to be gone", || {
        server.strays().is_empty().then_some(())
    });

    let (code, text) = cli(&server, &["status", &pid]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("last outcome: upgrade refused"), "{text}");
    let started: Vec<&str> = text.lines().filter(|l| l.starts_with("started:")).collect();
    assert_eq!(started.len(), 1, "{text}");

    // Not a copyover process, no such process, bad usage.
    let me = std::process::id().to_string();
    let (code, text) = cli(&server, &["status", &me]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("is not a copyover process"), "{text}");
    let (code, text) = cli(&server, &["upgrade", "999999999"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("there is no process"), "{text}");
    let (code, text) = cli(&server, &["upgrade", "pid"]);
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("\"pid\" is not a PID"), "{text}");
}

#[test]
fn sigusr1_saves_a_snapshot_that_a_staging_server_restores() {
    let server = Server::start_with(
        "ops-staging",
        &default_build(),
        &["--snapshot-file", "prod.snapshot"],
    );
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set color green"), "ok");
    let mark = server.mark();
    server.signal(Signal::SIGUSR1);
    server.wait_log(mark, "snapshot saved");
    // Serving goes on.
    assert_eq!(ann.ask("/get color"), "color = green");
    let file = server.scratch.0.join("prod.snapshot");

    let (code, text) = cli(&server, &["inspect", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("app:            copyover-telnetd") && text.contains("state version:  2"),
        "{text}"
    );

    // A staging server from the snapshot: names and variables, no connections.
    let staging = Server::start_with(
        "ops-staging-2",
        &default_build(),
        &["--restore-from", file.to_str().unwrap()],
    );
    let mut ann2 = Client::login(staging.addr, "ann");
    assert_eq!(ann2.ask("/get color"), "color = green");
    assert_eq!(ann2.ask("/who"), "online: ann");

    // A build that cannot read this state version refuses it clearly.
    let old = util::build(&[
        ("COPYOVER_DEMO_LABEL", "v1-state1"),
        ("COPYOVER_DEMO_STATE", "1"),
    ]);
    let out = Command::new(old)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--restore-from",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state v2; this binary reads v1"), "{err}");
}
