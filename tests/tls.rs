//! TLS clients across upgrades: the demo serves the chat over TLS beside
//! plain telnet, and each TLS session crosses the exec (same session, no
//! new handshake: a TLS 1.3 client accepts none after its first).
//!
//! Clients: a rustls client in this process, and Debian's `openssl
//! s_client`. The certificate is made by the test (rcgen), thrown away
//! with its scratch folder.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use nix::sys::signal::Signal;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use util::*;

/// A certificate for `localhost` and its key, as PEM files, and a client
/// configuration that trusts it.
struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    client: Arc<ClientConfig>,
    _scratch: Scratch,
}

impl Certificate {
    fn new(name: &str) -> Certificate {
        let scratch = Scratch::new(&format!("{name}-cert"));
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = scratch.0.join("cert.pem");
        let key = scratch.0.join("key.pem");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(made.cert.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Only to look for the session's keys where they must not be.
        client.enable_secret_extraction = true;
        Certificate {
            cert,
            key,
            client: Arc::new(client),
            _scratch: scratch,
        }
    }
}

/// The demo serving TLS too; returns it with its TLS address.
fn start(name: &str, cert: &Certificate) -> (Server, SocketAddr) {
    let server = Server::start_with(
        name,
        &default_build(),
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            cert.key.to_str().unwrap(),
        ],
    );
    let line = server.wait_log(0, "tls_addr=");
    let addr = line
        .split("tls_addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("tls_addr in the log")
        .parse()
        .expect("parse tls_addr");
    (server, addr)
}

/// A chat client over TLS, with rustls.
struct TlsClient {
    stream: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
    name: String,
    /// `\r\n` for the telnet demo, `\n` for the tokio chat.
    end: &'static [u8],
}

impl TlsClient {
    fn login(addr: SocketAddr, cert: &Certificate, name: &str) -> TlsClient {
        let mut c = TlsClient::connect(addr, cert, name, b"\r\n");
        c.expect_line_containing("copyover-telnetd");
        c.send(&format!("{name}\r\n"));
        c.expect_line(&format!("welcome, {name}"));
        c
    }

    /// Connected (the handshake starts with the first read or write).
    fn connect(addr: SocketAddr, cert: &Certificate, name: &str, end: &'static [u8]) -> TlsClient {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let conn = ClientConnection::new(
            cert.client.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        TlsClient {
            stream: StreamOwned::new(conn, tcp),
            buf: Vec::new(),
            name: name.into(),
            end,
        }
    }

    /// Nothing more arrives in a short read, and the session is sound.
    fn assert_quiet(&mut self) {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("{}: EOF", self.name),
            Ok(n) => panic!(
                "{}: unexpected {:?}",
                self.name,
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    self.buf.is_empty(),
                    "{}: unexpected buffered bytes",
                    self.name
                )
            }
            Err(e) => panic!("{}: the TLS session broke: {e}", self.name),
        }
    }

    /// Reads until the session ends; returns how it ended.
    fn read_to_end(&mut self) -> String {
        how_it_ends(&mut self.stream)
    }
}

impl Lines for TlsClient {
    fn send(&mut self, text: &str) {
        self.stream
            .write_all(text.as_bytes())
            .expect("send over TLS");
        self.stream.flush().expect("send over TLS");
    }

    fn line(&mut self) -> String {
        let raw = read_line(&mut self.stream, &mut self.buf, &self.name, self.end);
        String::from_utf8_lossy(&strip_telnet(&raw)).into_owned()
    }
}

/// Reads `stream` until it ends: "EOF", or the error that ended it.
fn how_it_ends(stream: &mut impl Read) -> String {
    let mut chunk = [0u8; 4096];
    wait_for("the end of the connection", || {
        match stream.read(&mut chunk) {
            Ok(0) => Some("EOF".to_string()),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => Some(e.to_string()),
        }
    })
}

/// A chat client over TLS with Debian's `openssl s_client`.
struct OpensslClient {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    name: String,
}

impl OpensslClient {
    fn login(addr: SocketAddr, cert: &Certificate, name: &str) -> OpensslClient {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-tls1_3", "-verify_return_error"])
            .args(["-connect", &addr.to_string(), "-servername", "localhost"])
            .arg("-CAfile")
            .arg(&cert.cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client (Debian's openssl package; scripts/test installs it)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut raw = Vec::new();
            while out.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&strip_telnet(&raw)).into_owned();
                if tx
                    .send(text.trim_end_matches(['\r', '\n']).to_string())
                    .is_err()
                {
                    break;
                }
                raw.clear();
            }
        });
        let mut c = OpensslClient {
            child,
            stdin,
            lines,
            name: name.into(),
        };
        c.expect_line_containing("copyover-telnetd");
        c.send(&format!("{name}\r\n"));
        c.expect_line(&format!("welcome, {name}"));
        c
    }
}

impl Lines for OpensslClient {
    fn send(&mut self, text: &str) {
        self.stdin
            .write_all(text.as_bytes())
            .expect("write to openssl");
        self.stdin.flush().expect("write to openssl");
    }

    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{}: no line from openssl s_client", self.name))
    }
}

impl Drop for OpensslClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tls_and_plain_clients_chat_across_upgrades() {
    let cert = Certificate::new("tls-chat");
    let (server, tls_addr) = start("tls-chat", &cert);
    let mut tina = TlsClient::login(tls_addr, &cert, "tina");
    let mut olga = OpensslClient::login(tls_addr, &cert, "olga");
    let mut paul = Client::login(server.addr, "paul");

    // Half a line typed before the upgrade, the rest after it.
    tina.send("half a li");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    tina.send("ne\r\n");
    paul.expect_line("tina: half a line");
    olga.expect_line("tina: half a line");

    for generation in 1..=3 {
        if generation > 1 {
            let outcome = server.upgrade();
            assert!(outcome.contains("upgrade complete"), "{outcome}");
        }
        paul.send(&format!("plain {generation}\r\n"));
        tina.expect_line(&format!("paul: plain {generation}"));
        olga.expect_line(&format!("paul: plain {generation}"));
        olga.send(&format!("openssl {generation}\r\n"));
        paul.expect_line(&format!("olga: openssl {generation}"));
        tina.expect_line(&format!("olga: openssl {generation}"));
        let version = tina.ask("/version");
        assert_eq!(
            version,
            version_line(env!("CARGO_PKG_VERSION"), server.pid, generation),
            "the same process, one generation further"
        );
    }
    assert_eq!(
        paul.ask("/who"),
        "online: tina, olga, paul",
        "no one dropped"
    );
    // Every line arrived once: nothing more is on its way.
    paul.assert_quiet();
    tina.assert_quiet();
}

#[test]
fn a_record_cut_in_two_by_the_upgrade_arrives_once() {
    let cert = Certificate::new("tls-cut");
    let (server, tls_addr) = start("tls-cut", &cert);
    let mut tina = TlsClient::login(tls_addr, &cert, "tina");
    let mut paul = Client::login(server.addr, "paul");
    // One record, its first half on the wire before the commit, the rest
    // after it: the old image keeps the half it read with the session.
    tina.stream
        .conn
        .writer()
        .write_all(b"one record\r\n")
        .unwrap();
    let mut record = Vec::new();
    tina.stream.conn.write_tls(&mut record).unwrap();
    let (first, second) = record.split_at(record.len() / 2);
    tina.stream.sock.write_all(first).unwrap();
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    tina.stream.sock.write_all(second).unwrap();
    paul.expect_line("tina: one record");
    paul.send("got it\r\n");
    tina.expect_line("paul: got it");
    paul.assert_quiet();
}

#[test]
fn a_new_image_that_wrote_to_tls_clients_and_failed_reuses_no_nonce() {
    let cert = Certificate::new("tls-rollback");
    let (server, tls_addr) = start("tls-rollback", &cert);
    let mut tina = TlsClient::login(tls_addr, &cert, "tina");
    let mut paul = Client::login(server.addr, "paul");

    // The fault build writes to every TLS client before `ready`, then
    // panics. Had it sealed a record, the old image would seal another
    // with the same key and sequence number: tina's next record would not
    // open, and her session would end.
    server.deploy(&faulty("write-tls-then-panic"));
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade rolled back"), "{outcome}");
    paul.send("still there?\r\n");
    let skipped = tina.expect_line("paul: still there?");
    assert!(
        skipped.iter().all(|l| !l.contains("fault build")),
        "the failed image's write reached the client: {skipped:?}"
    );
    tina.send("yes\r\n");
    paul.expect_line("tina: yes");

    // A refusal, then a good upgrade: the session goes on through both.
    server.deploy_bytes(b"#!/bin/sh\nexit 0\n");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade refused"), "{outcome}");
    server.deploy(&default_build());
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    tina.send("after all that\r\n");
    paul.expect_line("tina: after all that");
    assert_eq!(
        tina.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), server.pid, 1)
    );
    tina.assert_quiet();
}

#[test]
fn a_key_update_is_followed_before_an_upgrade_and_ends_only_that_client_after_one() {
    let cert = Certificate::new("tls-key-update");
    let (server, tls_addr) = start("tls-key-update", &cert);
    let mut tina = TlsClient::login(tls_addr, &cert, "tina");
    let mut paul = Client::login(server.addr, "paul");

    // Before any upgrade, rustls derives the new keys.
    tina.stream.conn.refresh_traffic_keys().unwrap();
    tina.send("new keys\r\n");
    paul.expect_line("tina: new keys");
    paul.send("heard you\r\n");
    tina.expect_line("paul: heard you");

    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    tina.send("same keys\r\n");
    paul.expect_line("tina: same keys");

    // After it, the secret to derive them did not cross: an alert ends
    // tina's session, and only hers.
    let mark = server.mark();
    tina.stream.conn.refresh_traffic_keys().unwrap();
    tina.send("newer keys\r\n");
    let end = tina.read_to_end();
    assert!(
        end.contains("InternalError"),
        "the session ended with: {end}"
    );
    server.wait_log(mark, "key update after an upgrade");
    wait_for("tina to be gone from /who", || {
        (paul.ask("/who") == "online: paul").then_some(())
    });
}

#[test]
fn no_key_is_in_the_snapshot_file_the_environment_or_inspect() {
    let cert = Certificate::new("tls-secrets");
    let (server, tls_addr) = start("tls-secrets", &cert);
    let mut tina = TlsClient::login(tls_addr, &cert, "tina");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    assert_eq!(
        tina.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), server.pid, 1)
    );

    let snapshot = server.scratch.0.join("copyover-telnetd.snapshot");
    let mark = server.mark();
    server.signal(Signal::SIGUSR1);
    server.wait_log(mark, "snapshot saved");
    let saved = wait_for("the snapshot file", || std::fs::read(&snapshot).ok());
    let inspect = Command::new(env!("CARGO_BIN_EXE_copyover"))
        .arg("inspect")
        .arg(&snapshot)
        .output()
        .expect("copyover inspect");
    let environ = std::fs::read(format!("/proc/{}/environ", server.pid)).unwrap();

    // The session's keys, as the client has them.
    let TlsClient { stream, .. } = tina;
    let secrets = stream.conn.dangerous_extract_secrets().unwrap();
    let mut keys = Vec::new();
    for (_, s) in [secrets.tx, secrets.rx] {
        match s {
            rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                keys.push(key.as_ref().to_vec());
                keys.push(iv.as_ref().to_vec());
            }
            _ => panic!("a suite copyover::tls::Config does not offer"),
        }
    }
    for key in &keys {
        for (what, bytes) in [
            ("the snapshot file", &saved),
            ("copyover inspect's output", &inspect.stdout),
            ("the environment", &environ),
        ] {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_slice()),
                "a key of the session is in {what}"
            );
        }
    }
}

/// The tokio chat over TLS (examples/tokio-chat-tls.rs): its sessions'
/// TLS sessions cross with copyover::tokio::Server, a line typed across
/// the upgrade arrives once, and a failed build rolls back with everyone.
#[test]
fn tokio_chat_over_tls_keeps_its_clients_across_upgrades() {
    let cert = Certificate::new("tls-tokio");
    let build = |label| example("tokio-chat-tls", &[("COPYOVER_CHAT_LABEL", label)]);
    let (v1, bad) = (build("v1"), build("bad"));
    let server = Server::spawn("tls-tokio", &v1, |binary| {
        let mut cmd = Command::new(binary);
        cmd.arg("127.0.0.1:0").arg(&cert.cert).arg(&cert.key);
        cmd
    });
    let login = |name: &str| {
        let mut c = TlsClient::connect(server.addr, &cert, name, b"\n");
        assert_eq!(c.line(), "Please enter your username:");
        c.send(&format!("{name}\n"));
        c.expect_line(&format!("Welcome, {name}!"));
        c
    };
    let mut ann = login("ann");
    let mut bob = login("bob");
    ann.expect_line("bob has joined the chat");

    ann.send("half a li");
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    ann.send("ne\n");
    bob.expect_line("ann: half a line");
    bob.send("and back\n");
    ann.expect_line("bob: and back");

    server.deploy(&bad);
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade rolled back"), "{outcome}");
    ann.send("after the rollback\n");
    bob.expect_line("ann: after the rollback");

    server.deploy(&v1);
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade complete"), "{outcome}");
    let mut cy = login("cy");
    ann.expect_line("cy has joined the chat");
    bob.expect_line("cy has joined the chat");
    bob.send("three of us\n");
    ann.expect_line("bob: three of us");
    cy.expect_line("bob: three of us");
    ann.assert_quiet();
    bob.assert_quiet();
}

/// Records the old image sealed and could not send (a client that reads
/// slowly) cross with the session; a new image that fails before `ready`
/// sends none of them, so they go out once, from the old image.
#[test]
fn records_sealed_and_unsent_at_a_failed_upgrade_go_out_once() {
    let cert = Certificate::new("tls-unsent");
    let (server, tls_addr) = start("tls-unsent", &cert);
    let mut slow = TlsClient::login(tls_addr, &cert, "slow");
    // slow reads nothing for now: past what the kernel's buffers hold (a
    // few MiB), what paul says piles up in the server, sealed.
    let mut paul = Client::login(server.addr, "paul");
    let filler = "x".repeat(1000);
    let lines = 8000;
    for i in 0..lines {
        paul.send(&format!("{i} {filler}\r\n"));
    }
    // Answered once every line before it was read and broadcast.
    assert!(paul.ask("/version").starts_with("copyover-telnetd"));
    server.deploy(&faulty("write-tls-then-panic"));
    let outcome = server.upgrade();
    assert!(outcome.contains("upgrade rolled back"), "{outcome}");
    for i in 0..lines {
        let skipped = slow.expect_line(&format!("paul: {i} {filler}"));
        assert!(
            skipped.is_empty(),
            "line {i}: lost or repeated lines before it: {skipped:?}"
        );
    }
    assert_eq!(
        slow.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), server.pid, 0)
    );
}

/// An upgrade waits for a handshake under way, holds a hello that comes
/// meanwhile (the next image answers it, greeting and all), and closes a
/// handshake that never ends rather than wait for it for good.
#[test]
fn handshakes_under_way_at_an_upgrade_are_waited_for_held_or_closed() {
    let cert = Certificate::new("tls-handshakes");
    let (server, tls_addr) = start("tls-handshakes", &cert);
    let mut paul = Client::login(server.addr, "paul");
    // A client that sends its hello and never its Finished.
    let mut stuck = TcpStream::connect(tls_addr).unwrap();
    let mut hello = Vec::new();
    ClientConnection::new(
        cert.client.clone(),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap()
    .write_tls(&mut hello)
    .unwrap();
    stuck.write_all(&hello).unwrap();
    stuck
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // The server's answer: its handshake is under way.
    let mut answer = [0u8; 1];
    wait_for("the server's answer to the stuck hello", || {
        stuck.read(&mut answer).ok().filter(|&n| n > 0)
    });

    let mark = server.mark();
    server.signal(Signal::SIGHUP);
    server.wait_log(mark, "waits for TLS handshakes");
    // A client that comes during the wait: its hello is held, crosses,
    // and is answered by the new image.
    let late = {
        let cert_client = cert.client.clone();
        std::thread::spawn(move || {
            let tcp = TcpStream::connect(tls_addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let conn =
                ClientConnection::new(cert_client, ServerName::try_from("localhost").unwrap())
                    .unwrap();
            let mut c = TlsClient {
                stream: StreamOwned::new(conn, tcp),
                buf: Vec::new(),
                name: "late".into(),
                end: b"\r\n",
            };
            c.expect_line_containing("copyover-telnetd");
            c.send("late\r\n");
            c.expect_line("welcome, late");
            c
        })
    };
    let outcome = server.wait_log(mark, "upgrade complete");
    assert!(outcome.contains("generation=1"), "{outcome}");
    server.wait_log(mark, "closing TLS connections whose handshake did not end");
    let mut late = late.join().expect("the late client logged in");
    assert_eq!(late.ask("/who"), "online: paul, late");
    assert_eq!(
        paul.ask("/version"),
        version_line(env!("CARGO_PKG_VERSION"), server.pid, 1)
    );
    // The stuck one was closed.
    let end = how_it_ends(&mut stuck);
    assert!(!end.is_empty());
}
