//! Signals during an upgrade: a storm of SIGHUPs, and SIGTERM.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Client, Lines, Server, default_build, labelled, version_line};

#[test]
fn a_sighup_storm_during_an_upgrade_neither_kills_nor_loses_anything() {
    let server = Server::start("sig-storm", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set k v"), "ok");
    bob.send("half ");
    server.deploy(&labelled("v2"));
    let mark = server.mark();
    for _ in 0..10 {
        server.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(3));
    }
    server.wait_log(mark, "upgrade complete");
    // Whatever number of upgrades the storm caused (requests during a probe
    // join it; one pending across the exec is one more upgrade), the server
    // is alive at the same PID, on v2, with everything.
    let version = ann.ask("/version");
    assert!(
        version.starts_with(&format!(
            "copyover-telnetd v2 pid={} generation=",
            server.pid
        )),
        "{version}"
    );
    assert_eq!(ann.ask("/get k"), "k = v");
    bob.send("line\r\n");
    assert_eq!(ann.line(), "bob: half line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
    let log = server.log_since(mark).join("\n");
    assert!(
        !log.contains("refused") && !log.contains("rolled back") && !log.contains("panicked"),
        "{log}"
    );
    // And it still upgrades on request.
    assert!(server.upgrade().contains("upgrade complete"));
    assert!(ann.ask("/version").starts_with("copyover-telnetd v2"));
}

#[test]
fn sigterm_during_an_upgrade_stops_the_server_cleanly() {
    let mut server = Server::start("sig-term", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(
        ann.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), server.pid, 0)
    );
    server.deploy(&labelled("v2"));
    server.signal(Signal::SIGHUP);
    server.signal(Signal::SIGTERM);
    assert_clean_shutdown(&mut server, &mut ann);
}

/// The server exits with status 0 after saying goodbye, without a panic or
/// a rollback.
fn assert_clean_shutdown(server: &mut Server, client: &mut Client) {
    let status = server.wait_exit();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        server.log_text()
    );
    client.expect_line("The server is shutting down. Goodbye.");
    let log = server.log_text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains("panicked") && !log.contains("rolled back"),
        "{log}"
    );
}

#[test]
fn sigterm_during_the_exec_waits_for_the_new_image() {
    // A SIGTERM that arrives while the signals are held across the exec is
    // delivered to the new image once it has its handlers: it shuts down
    // cleanly, it is not killed by the default action.
    let mut server = Server::start("sig-term-exec", &default_build());
    let mut ann = Client::login(server.addr, "ann");
    server.deploy(&labelled("v2"));
    let mark = server.mark();
    server.signal(Signal::SIGHUP);
    server.wait_log(mark, "committing the upgrade");
    server.signal(Signal::SIGTERM);
    assert_clean_shutdown(&mut server, &mut ann);
}
