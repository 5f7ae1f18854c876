//! The in-place upgrade, as a user sees it: same PID, every client still
//! connected, every byte delivered once, state and half-typed lines kept.

mod util;

use nix::sys::signal::Signal;
use util::{Client, Lines, Server, default_build, labelled, version_line, wait_for};

const V1: &str = env!("CARGO_PKG_VERSION");

#[test]
fn upgrade_keeps_pid_clients_variables_and_half_lines() {
    let v2 = labelled("v2");
    let server = Server::start("upgrade-basic", &default_build());
    let pid = server.pid;
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    let mut cy = Client::login(server.addr, "cy");
    assert_eq!(ann.ask("/set color deep blue"), "ok");
    assert_eq!(ann.ask("/version"), version_line(V1, pid, 0));
    // bob is in the middle of typing a line when the upgrade happens.
    bob.send("hello, every");

    server.deploy(&v2);
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    assert!(
        outcome.contains(&format!("from_version={V1}")) && outcome.contains("to_version=v2"),
        "{outcome}"
    );
    assert!(outcome.contains("blackout_ms="), "{outcome}");
    // The phases, typed in the status file: the commit before the holder
    // existed is a part of the exec phase.
    let status = server.status().expect("the status file");
    let copyover::status::Outcome::Complete { phases, .. } = status.outcome else {
        panic!("expected a completed upgrade in the status file: {status:?}");
    };
    let (unheld, exec) = (
        phases.unheld_ms.expect("unheld_ms"),
        phases.exec_ms.expect("exec_ms"),
    );
    assert!(
        unheld > 0.0 && unheld <= exec,
        "unheld_ms {unheld}, exec_ms {exec}"
    );

    // Same PID, new label, generation + 1, on the same connections.
    assert_eq!(ann.ask("/version"), version_line("v2", pid, 1));
    assert_eq!(ann.ask("/get color"), "color = deep blue");
    bob.send("one\r\n");
    assert_eq!(ann.line(), "bob: hello, everyone");
    assert_eq!(cy.line(), "bob: hello, everyone");
    assert_eq!(bob.ask("/who"), "online: ann, bob, cy");
    // A newcomer can connect to the inherited listener.
    let mut dee = Client::login(server.addr, "dee");
    assert_eq!(dee.ask("/who"), "online: ann, bob, cy, dee");
    // Nothing was delivered twice.
    ann.assert_quiet();
    cy.assert_quiet();
}

#[test]
fn output_pending_at_the_upgrade_is_delivered_once() {
    let v2 = labelled("v2");
    let server = Server::start("upgrade-pending", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    // bob sends many numbered messages and does not read his replies;
    // ann reads them all, before and after the upgrade.
    let total = 400;
    let mut sent = 0;
    for i in 0..total {
        bob.send(&format!("msg {i}\r\n"));
        sent += 1;
        if i == total / 2 {
            server.deploy(&v2);
            server.signal(Signal::SIGHUP);
        }
    }
    for i in 0..sent {
        assert_eq!(ann.line(), format!("bob: msg {i}"));
    }
    let mark = 0;
    server.wait_log(mark, "upgrade complete");
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 1));
    ann.assert_quiet();
}

#[test]
fn twenty_upgrades_in_a_row_keep_the_fd_count() {
    let v1 = labelled("v1");
    let v2 = labelled("v2");
    let server = Server::start("upgrade-twenty", &v1);
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set n 0"), "ok");
    server.deploy(&v2);
    assert!(server.upgrade().contains("upgrade complete"));
    let fds = server.fd_count();
    for round in 2..=21u64 {
        let (build, label) = if round % 2 == 0 {
            (&v1, "v1")
        } else {
            (&v2, "v2")
        };
        server.deploy(build);
        let outcome = server.upgrade();
        assert!(
            outcome.contains("upgrade complete"),
            "round {round}: {outcome}"
        );
        assert_eq!(ann.ask(&format!("/set n {round}")), "ok");
        assert_eq!(bob.ask("/version"), version_line(label, server.pid, round));
        assert_eq!(
            server.fd_count(),
            fds,
            "fd count changed after upgrade {round}"
        );
        // The holder of the previous image exits on its own, after the
        // new image is ready: wait (bounded) for it to be reaped.
        wait_for(
            &format!("no probe or holder left behind after upgrade {round}"),
            || (server.children() == 0).then_some(()),
        );
    }
    assert_eq!(bob.ask("/who"), "online: ann, bob");
    assert_eq!(ann.ask("/get n"), "n = 21");
}

#[test]
fn missing_binary_leaves_the_old_image_serving() {
    let server = Server::start("upgrade-missing", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    std::fs::remove_file(&server.binary).unwrap();
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade refused"), "{outcome}");
    assert!(outcome.contains("cannot be executed"), "{outcome}");
    assert_eq!(ann.ask("/version"), version_line(V1, server.pid, 0));
    // Once the binary is there again, the upgrade goes through.
    server.deploy(&labelled("v2"));
    assert!(server.upgrade().contains("upgrade complete"));
    assert_eq!(ann.ask("/version"), version_line("v2", server.pid, 1));
}

#[test]
fn an_upgrade_can_be_triggered_while_clients_are_typing_in_telnet_mode() {
    // A client that accepted the server's ECHO offer gets its keys echoed,
    // and keeps that mode across the upgrade.
    let server = Server::start("upgrade-echo", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    ann.stream.set_nodelay(true).unwrap();
    // IAC DO ECHO: the client accepts the server's offer to echo.
    use std::io::Write;
    ann.stream.write_all(&[255, 253, 1]).unwrap();
    ann.send("/set k v\r\n");
    assert_eq!(ann.line(), "/set k v", "the echo of the typed line");
    assert_eq!(ann.line(), "ok");
    ann.send("/ge");
    assert!(server.upgrade().contains("upgrade complete"));
    ann.send("t k\r\n");
    // The echo of "/ge" came before the upgrade, "t k" after it.
    assert_eq!(ann.line(), "/get k");
    assert_eq!(ann.line(), "k = v");
}
