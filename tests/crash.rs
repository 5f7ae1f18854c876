//! Crash survival: the demo (`--fdstore`) keeps its listener, connections
//! and a state checkpoint in the service manager's fd store; after a
//! `kill -9` the restarted demo serves every client again, as of the last
//! checkpoint. python3 plays the part of systemd here (notify socket,
//! `FDSTORE=1`, `FDSTOREREMOVE=1`, restart with `LISTEN_FDS`);
//! `scripts/systemd-test` checks the same against the real one.

mod util;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use util::{Client, Lines, Server, default_build, version_line, wait_for};

/// A minimal service manager: one service, an fd store, restart on a crash.
/// Its own lines go to stderr (the test's log) as `fake-systemd: ...`.
/// Like systemd, it reads every queued notification before it looks at a
/// dead child. A `FREEZE=1` notification (from the test) freezes the
/// checkpoint: stores and removals of checkpoints are ignored from then on,
/// to make connections newer than it.
const FAKE_SYSTEMD: &str = r#"
import array, ctypes, fcntl, os, select, signal, socket, sys
path, argv = sys.argv[1], sys.argv[2:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
store = []      # (name, fd), in the order stored
frozen = False
def log(msg):  # one write, so that lines of the demo's never cut into it
    os.write(2, f"fake-systemd: {msg}\n".encode())
def start():
    manager = os.getpid()
    pid = os.fork()
    if pid:
        log(f"started pid={pid} with {len(store)} stored fds")
        return pid
    # Out of the way of 3.. first, then into place (inheritable).
    # The service dies with its manager (the test kills the manager).
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != manager:  # it died before that
        os._exit(1)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for _, fd in store]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
    os.environ.update(NOTIFY_SOCKET=path, LISTEN_FDS=str(len(store)),
                      LISTEN_PID=str(os.getpid()),
                      LISTEN_FDNAMES=":".join(n for n, _ in store))
    os.execv(argv[0], argv)
child = start()
while True:
    select.select([sock], [], [], 0.05)
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4),
                                          socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            break
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        fields = dict(l.split("=", 1) for l in msg.decode().splitlines() if "=" in l)
        name = fields.get("FDNAME", "stored")
        checkpoint = name.startswith("%checkpoint")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if frozen and checkpoint:
                    os.close(fd)
                else:
                    store.append((name, fd))
                    log(f"stored {name}")
        elif fields.get("FDSTOREREMOVE") == "1" and not (frozen and checkpoint):
            for n, fd in [e for e in store if e[0] == name]:
                os.close(fd)
                store.remove((n, fd))
                log(f"removed {name}")
        if fields.get("READY") == "1":
            log(f"READY pid={child}")
        if fields.get("FREEZE") == "1":
            frozen = True
            log("checkpoint frozen")
    pid, status = os.waitpid(child, os.WNOHANG)
    if pid:
        if os.WIFSIGNALED(status):
            log(f"pid={pid} killed by signal {os.WTERMSIG(status)}: restarting")
            child = start()
        else:
            log(f"pid={pid} exited")
            sys.exit(0)
"#;

fn under_fake_systemd(name: &str) -> Server {
    program_under_fake_systemd(
        name,
        &default_build(),
        &["--listen", "127.0.0.1:0", "--fdstore"],
    )
}

/// `build`, with `args`, as the fake systemd's service.
fn program_under_fake_systemd(name: &str, build: &std::path::Path, args: &[&str]) -> Server {
    Server::spawn(name, build, |bin| {
        let notify = bin.with_file_name("notify.sock");
        let mut c = Command::new("python3");
        c.args(["-c", FAKE_SYSTEMD]).arg(notify).arg(bin).args(args);
        c
    })
}

/// The demo's PID as the fake systemd last started it, once it is ready.
fn ready_pid(server: &Server, mark: usize) -> i32 {
    let line = server.wait_log(mark, "fake-systemd: READY pid=");
    let digits: String = line
        .split("READY pid=")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a PID in the READY line")
}

#[test]
fn kill_9_keeps_every_client_and_the_state_of_the_last_checkpoint() {
    let server = under_fake_systemd("crash-kill9");
    let pid = ready_pid(&server, 0);
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set color green"), "ok");
    let mut bob = Client::login(server.addr, "bob");
    // A client that leaves is taken out of the store, and sees the close
    // although the store held a copy of its socket.
    let mut carl = Client::login(server.addr, "carl");
    let mark = server.mark();
    assert_eq!(carl.ask("/quit"), "bye");
    let mut rest = Vec::new();
    wait_for("carl's EOF", || match carl.stream.read_to_end(&mut rest) {
        Ok(_) => Some(()),
        Err(_) => None,
    });
    server.wait_log(mark, "fake-systemd: removed %=conn%3A");
    // Half a line, typed before the crash. The demo checkpoints after each
    // batch of events, once its output is written: the second answer to bob
    // comes from a batch after the one that read ann's bytes, the third
    // from one after that batch's checkpoint was sent.
    ann.send("/set mood hap");
    for _ in 0..3 {
        assert_eq!(bob.ask("/who"), "online: ann, bob");
    }

    let mark = server.mark();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    let new_pid = ready_pid(&server, mark);
    assert_ne!(new_pid, pid);
    server.wait_log(mark, "recovered after a crash");

    ann.send("py\r\n");
    assert_eq!(ann.line(), "ok");
    assert_eq!(ann.ask("/get mood"), "mood = happy");
    assert_eq!(ann.ask("/get color"), "color = green");
    assert_eq!(ann.ask("/who"), "online: ann, bob");
    assert_eq!(
        bob.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), new_pid, 0)
    );
    // New clients are accepted on the kept listener.
    let mut dave = Client::login(server.addr, "dave");
    assert_eq!(dave.ask("/who"), "online: ann, bob, dave");
}

#[test]
fn a_connection_newer_than_the_checkpoint_is_kept_and_greeted_again() {
    let server = under_fake_systemd("crash-newer");
    let pid = ready_pid(&server, 0);
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set color green"), "ok");
    // Once this answer is in, the checkpoint after the /set was sent; the
    // freeze, sent after it, comes after it in the socket's queue.
    assert_eq!(ann.ask("/get color"), "color = green");
    let mark = server.mark();
    UnixDatagram::unbound()
        .and_then(|s| s.send_to(b"FREEZE=1", server.scratch.0.join("notify.sock")))
        .expect("send FREEZE=1");
    server.wait_log(mark, "checkpoint frozen");
    // After the last checkpoint: a new client, and a change of ann's.
    let mut eve = Client::login(server.addr, "eve");
    assert_eq!(ann.ask("/set color blue"), "ok");

    let mark = server.mark();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    ready_pid(&server, mark);
    // eve's connection survived, but the checkpoint never knew her name.
    eve.expect_line("The server restarted.");
    eve.expect_line("What is your name?");
    eve.send("eve\r\n");
    eve.expect_line("welcome, eve");
    // ann's state is the checkpoint's: the change after it is lost.
    assert_eq!(ann.ask("/get color"), "color = green");
    assert_eq!(ann.ask("/who"), "online: ann, eve");
}

#[test]
fn a_checkpoint_the_new_binary_cannot_read_means_a_fresh_start_on_the_same_listener() {
    let server = under_fake_systemd("crash-unreadable");
    let pid = ready_pid(&server, 0);
    let mut ann = Client::login(server.addr, "ann");
    assert_eq!(ann.ask("/set color green"), "ok");
    // The restart runs a build of another application: the checkpoint is
    // not its to read.
    server.deploy(&util::faulty("wrong-app"));
    let mark = server.mark();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    ready_pid(&server, mark);
    server.wait_log(mark, "cannot recover after the crash, starting fresh");
    // ann's connection was shut down rather than left hanging...
    let mut rest = Vec::new();
    wait_for("ann's EOF", || match ann.stream.read_to_end(&mut rest) {
        Ok(_) => Some(()),
        Err(_) => None,
    });
    // ...and the stored listener serves the fresh start.
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(bob.ask("/who"), "online: bob");
    assert_eq!(bob.ask("/get color"), "color is not set");
}

#[test]
fn a_stored_udp_socket_answers_again_after_kill_9() {
    // A datagram socket comes back from the fd store as a datagram socket:
    // `take_udp_socket` accepts it, and it answers on the same port.
    let build = util::example("udp-echo", &[]);
    let server = program_under_fake_systemd("crash-udp", &build, &[]);
    let pid = ready_pid(&server, 0);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the client");
    client
        .set_read_timeout(Some(util::WAIT))
        .expect("a read timeout");
    let ask = |text: &str| {
        client.send_to(text.as_bytes(), server.addr).expect("send");
        let mut buf = [0u8; 1500];
        let (n, _) = client.recv_from(&mut buf).expect("an echo");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(ask("one"), "echo 1: one");

    let mark = server.mark();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    let new_pid = ready_pid(&server, mark);
    assert_ne!(new_pid, pid);
    server.wait_log(mark, "recovered after a crash");
    // The same socket (the same port), and the state of the checkpoint.
    assert_eq!(ask("two"), "echo 2: two");
}
