//! The tokio chat example (examples/tokio-chat.rs, a multi-threaded tokio
//! server with a task per client) upgraded in place: same PID, every client
//! still there with its name, a line typed across the upgrade delivered
//! once; then a refused build and a rolled-back build, with everyone kept.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::Server;

fn chat(label: &str) -> std::path::PathBuf {
    util::example("tokio-chat", &[("COPYOVER_CHAT_LABEL", label)])
}

fn start(name: &str, build: &Path) -> Server {
    Server::spawn(name, build, |binary| {
        let mut cmd = Command::new(binary);
        cmd.arg("127.0.0.1:0");
        cmd
    })
}

/// A chat client speaking plain lines.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    name: String,
}

impl Client {
    /// Connects, answers the prompt with `name`.
    fn login(addr: SocketAddr, name: &str) -> Client {
        Client::login_on(TcpStream::connect(addr).expect("connect"), name)
    }

    /// Answers the prompt on `stream` with `name`.
    fn login_on(stream: TcpStream, name: &str) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut c = Client {
            stream,
            buf: Vec::new(),
            name: name.into(),
        };
        assert_eq!(c.line(), "Please enter your username:");
        c.send(&format!("{name}\n"));
        // In the peer map from now on: it sees who joins after it.
        c.expect(&format!("Welcome, {name}!"));
        c
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).expect("send");
    }

    fn say(&mut self, text: &str) {
        self.send(&format!("{text}\n"));
    }

    fn line(&mut self) -> String {
        let raw = util::read_line(&mut self.stream, &mut self.buf, &self.name, b"\n");
        String::from_utf8_lossy(&raw).trim_end_matches('\r').into()
    }

    fn expect(&mut self, want: &str) {
        assert_eq!(self.line(), want, "{}", self.name);
    }

    /// Nothing more buffered or arriving now.
    fn assert_quiet(&mut self) {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("{}: EOF", self.name),
            Ok(n) => panic!(
                "{}: unexpected {:?}",
                self.name,
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => assert!(
                self.buf.is_empty(),
                "{}: unexpected {:?}",
                self.name,
                self.buf
            ),
        }
    }
}

/// ann, bob and cy logged in; each has seen the later ones join.
fn three(addr: SocketAddr) -> (Client, Client, Client) {
    let mut ann = Client::login(addr, "ann");
    let mut bob = Client::login(addr, "bob");
    ann.expect("bob has joined the chat");
    let cy = Client::login(addr, "cy");
    ann.expect("cy has joined the chat");
    bob.expect("cy has joined the chat");
    (ann, bob, cy)
}

/// Everyone still there, with the names they gave.
fn all_still_there(ann: &mut Client, bob: &mut Client, cy: &mut Client, round: &str) {
    ann.say(&format!("ann after {round}"));
    bob.expect(&format!("ann: ann after {round}"));
    cy.expect(&format!("ann: ann after {round}"));
    cy.say(&format!("cy after {round}"));
    ann.expect(&format!("cy: cy after {round}"));
    bob.expect(&format!("cy: cy after {round}"));
}

#[test]
fn tokio_chat_upgrades_refuses_and_rolls_back_keeping_everyone() {
    let v1 = chat("v1");
    let v2 = chat("v2");
    // Labelled `bad`: panics after adopting the sockets.
    let bad = chat("bad");
    let mut server = start("tokio-chat", &v1);
    let pid = server.pid;
    let (mut ann, mut bob, mut cy) = three(server.addr);
    ann.say("hi all");
    bob.expect("ann: hi all");
    cy.expect("ann: hi all");

    // bob is typing when the upgrade happens.
    bob.send("hello, every");
    server.deploy(&v2);
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    assert!(
        outcome.contains("from_version=v1") && outcome.contains("to_version=v2"),
        "{outcome}"
    );
    assert!(server.alive(), "same process");
    assert_eq!(server.pid, pid);
    bob.send("one\n");
    ann.expect("bob: hello, everyone");
    cy.expect("bob: hello, everyone");
    all_still_there(&mut ann, &mut bob, &mut cy, "the upgrade");
    // A newcomer reaches the inherited listener; everyone sees it join.
    let mut dee = Client::login(server.addr, "dee");
    for c in [&mut ann, &mut bob, &mut cy] {
        c.expect("dee has joined the chat");
    }

    // A binary that is not a copyover program: refused, nothing changes.
    server.deploy(Path::new("/bin/true"));
    cy.send("half ");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade refused"), "{outcome}");
    cy.send("and half\n");
    for c in [&mut ann, &mut bob, &mut dee] {
        c.expect("cy: half and half");
    }
    all_still_there(&mut ann, &mut bob, &mut cy, "the refusal");
    dee.expect("ann: ann after the refusal");
    dee.expect("cy: cy after the refusal");

    // A build that panics after adopting the sockets: rolled back to v2.
    server.deploy(&bad);
    ann.send("rolled ");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade rolled back"), "{outcome}");
    server.wait_log(0, "serving again after the rollback");
    ann.send("back\n");
    for c in [&mut bob, &mut cy, &mut dee] {
        c.expect("ann: rolled back");
    }
    all_still_there(&mut ann, &mut bob, &mut cy, "the rollback");
    dee.expect("ann: ann after the rollback");
    dee.expect("cy: cy after the rollback");
    assert!(server.alive());

    // And a good build goes through after all that.
    server.deploy(&v1);
    let outcome = server.upgrade();
    assert!(outcome.contains("to_version=v1"), "{outcome}");
    all_still_there(&mut ann, &mut bob, &mut cy, "the last upgrade");
    dee.expect("ann: ann after the last upgrade");
    dee.expect("cy: cy after the last upgrade");
    dee.say("bye");
    drop(dee);
    for c in [&mut ann, &mut bob, &mut cy] {
        c.expect("dee: bye");
        c.expect("dee has left the chat");
    }
    for c in [&mut ann, &mut bob, &mut cy] {
        c.assert_quiet();
    }
    // Four probes (the refused build's too), three commits: the tasks were
    // paused once per commit, never for a probe.
    let log = server.log_text();
    assert_eq!(log.matches("probing the new binary").count(), 4, "{log}");
    assert_eq!(log.matches("every task parked").count(), 3, "{log}");
    // The listener is kept (under a duplicate): no probe warned otherwise.
    assert!(!log.contains("will be closed by the upgrade"), "{log}");
}

#[test]
fn tokio_chat_delivers_every_message_once_across_upgrades() {
    let v1 = chat("v1");
    let v2 = chat("v2");
    let server = start("tokio-chat-burst", &v1);
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    ann.expect("bob has joined the chat");
    // bob talks without pause while the server is upgraded twice; ann
    // reads every message, in order, once.
    let total = 600;
    for i in 0..total {
        bob.say(&format!("msg {i}"));
        if i == total / 3 {
            server.deploy(&v2);
            server.signal(Signal::SIGHUP);
        }
        if i == 2 * total / 3 {
            server.wait_log(0, "to_version=v2");
            server.deploy(&v1);
            server.signal(Signal::SIGHUP);
        }
    }
    for i in 0..total {
        ann.expect(&format!("bob: msg {i}"));
    }
    server.wait_log(0, "to_version=v1");
    ann.assert_quiet();
    bob.assert_quiet();
}

#[test]
fn a_failed_commit_lets_every_task_go_on_from_where_it_held() {
    let v1 = chat("v1");
    let v2 = chat("v2");
    let server = start("tokio-chat-failed-commit", &v1);
    let (mut ann, mut bob, mut cy) = three(server.addr);
    // A "build" that answers the probe, then removes its own interpreter:
    // the commit's execve fails after every task held in place.
    let interp = std::env::temp_dir().join(format!(
        "copyover-tokio-vanishing-sh-{}",
        std::process::id()
    ));
    std::fs::copy("/bin/sh", &interp).expect("copy /bin/sh");
    let script = format!(
        "#!{}\necho \"copyover-probe 1 ok $COPYOVER_PROBE vanishing\"\nrm -f \"{}\"\n",
        interp.display(),
        interp.display()
    );
    server.deploy_bytes(script.as_bytes());
    bob.send("half ");
    let mark = server.mark();
    let outcome = server.upgrade();
    let _ = std::fs::remove_file(&interp);
    assert!(
        outcome.contains("upgrade refused") && outcome.contains("execve"),
        "{outcome}"
    );
    server.wait_log(mark, "every task parked");
    // The tasks go on from where they held, with everything they had: the
    // half line, the names, the inboxes.
    bob.send("and half\n");
    ann.expect("bob: half and half");
    cy.expect("bob: half and half");
    all_still_there(&mut ann, &mut bob, &mut cy, "the failed commit");
    // And the next upgrade goes through.
    server.deploy(&v2);
    let outcome = server.upgrade();
    assert!(outcome.contains("to_version=v2"), "{outcome}");
    all_still_there(&mut ann, &mut bob, &mut cy, "the upgrade");
    for c in [&mut ann, &mut bob, &mut cy] {
        c.assert_quiet();
    }
}

/// A connection whose receive buffer stays small (a client on a slow link,
/// or one that stopped reading, fills it quickly).
fn connect_small(addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    let SocketAddr::V4(v4) = addr else {
        panic!("a loopback IPv4 address")
    };
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).expect("connect");
    TcpStream::from(fd)
}

#[test]
fn a_client_that_stops_reading_costs_one_upgrade_not_the_others() {
    // A build that writes with `send(..).await` outside its safe point, as
    // tokio's own chat does: cy stops reading, its task waits in that
    // write, and the pause for the upgrade ends without it.
    let naive = |label| {
        util::example(
            "tokio-chat",
            &[("COPYOVER_CHAT_LABEL", label), ("COPYOVER_CHAT_NAIVE", "1")],
        )
    };
    let (v1, v2) = (naive("v1"), naive("v2"));
    let server = start("tokio-chat-slow", &v1);
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    ann.expect("bob has joined the chat");
    let mut cy = Client::login_on(connect_small(server.addr), "cy");
    ann.expect("cy has joined the chat");
    bob.expect("cy has joined the chat");
    let cy_addr = cy.stream.local_addr().expect("cy's address").to_string();

    // ann floods the chat with twice what the server's send buffer can
    // hold (tcp_wmem's maximum) and more, bob reads it all, cy reads
    // nothing: its socket (a small receive buffer) fills, and its task
    // waits in `send`.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|v| v.split_whitespace().nth(2).and_then(|n| n.parse().ok()))
        .unwrap_or(4 << 20);
    // Each line is 95 bytes on the wire.
    let total = (2 * wmem_max + (1 << 20)) / 95;
    let reader = std::thread::spawn(move || {
        for i in 0..total {
            bob.expect(&format!("ann: {i:>8} {}", "x".repeat(80)));
        }
        bob
    });
    for i in 0..total {
        ann.say(&format!("{i:>8} {}", "x".repeat(80)));
    }
    let mut bob = reader.join().expect("bob read everything");

    server.deploy(&v2);
    let outcome = server.upgrade();
    assert!(
        outcome.contains("upgrade refused")
            && outcome.contains("did not reach a safe point")
            && outcome.contains(&cy_addr),
        "{outcome}"
    );
    // Everyone else never stopped.
    ann.say("still here");
    bob.expect("ann: still here");
    bob.say("me too");
    ann.expect("bob: me too");

    // cy reads again: everything, in order, then what came since.
    for i in 0..total {
        cy.expect(&format!("ann: {i:>8} {}", "x".repeat(80)));
    }
    cy.expect("ann: still here");
    cy.expect("bob: me too");
    // And the next upgrade goes through, with everyone.
    let outcome = server.upgrade();
    assert!(outcome.contains("to_version=v2"), "{outcome}");
    all_still_there(&mut ann, &mut bob, &mut cy, "the upgrade");
    for c in [&mut ann, &mut bob, &mut cy] {
        c.assert_quiet();
    }
}

#[test]
fn tokio_chat_migrates_to_a_new_process_and_survives_a_bad_one() {
    let v1 = chat("v1");
    let mut server = start("tokio-chat-migrate", &v1);
    let old = server.pid;
    let (mut ann, mut bob, mut cy) = three(server.addr);

    // A new process that panics after adopting: killed, the old one serves.
    server.deploy(&chat("bad"));
    let mark = server.mark();
    server.signal(Signal::SIGUSR2);
    let line = server.wait_log(mark, "upgrade rolled back");
    assert!(line.contains("did not take over"), "{line}");
    assert!(server.alive());
    all_still_there(&mut ann, &mut bob, &mut cy, "a bad migration");

    // A good one: bob typing across it, the old process gone, a new PID.
    bob.send("hello, every");
    server.deploy(&chat("v2"));
    let mark = server.mark();
    server.signal(Signal::SIGUSR2);
    let new = util::migrated_to(&server.wait_log(mark, "migrated to process"));
    let _reaper = util::Reaper(new);
    server.wait_log(mark, "upgrade complete");
    assert!(server.wait_exit().success());
    assert_ne!(new, old);
    assert!(std::path::Path::new(&format!("/proc/{new}")).exists());
    bob.send("one\n");
    ann.expect("bob: hello, everyone");
    cy.expect("bob: hello, everyone");
    all_still_there(&mut ann, &mut bob, &mut cy, "a migration");
    ann.assert_quiet();
}

#[test]
fn tokio_chat_refuses_a_gradual_migration_and_keeps_everyone() {
    let v1 = chat("v1");
    let server = start("tokio-chat-gradual", &v1);
    let (mut ann, mut bob, mut cy) = three(server.addr);
    server.deploy(&chat("v2"));
    let mark = server.mark();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_copyover"))
        .args(["migrate", &server.pid.to_string(), "--batch", "1"])
        .arg("--status-dir")
        .arg(server.scratch.0.join("status"))
        .output()
        .expect("run copyover");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("does not move users a batch at a time"),
        "{text}"
    );
    server.wait_log(mark, "upgrade refused");
    util::wait_for("the new process to be gone", || {
        server.strays().is_empty().then_some(())
    });
    all_still_there(&mut ann, &mut bob, &mut cy, "a refused gradual migration");
}
