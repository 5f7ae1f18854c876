//! A real telnet client (Debian's `telnet`, under a pty) across an upgrade:
//! option negotiation never shows up as text, character mode with the
//! server's echo works, and the half-typed line survives.

mod util;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use util::{Server, default_build, labelled, spawn_retrying, wait_for};

struct Terminal {
    child: std::process::Child,
    input: File,
    screen: Arc<Mutex<String>>,
}

impl Terminal {
    fn telnet(addr: std::net::SocketAddr) -> Terminal {
        let telnet = ["/usr/bin/telnet", "/bin/telnet"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let telnet =
            telnet.expect("Debian's telnet client is needed: run scripts/test, which installs it");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let child = spawn_retrying(
            Command::new(telnet)
                .args([addr.ip().to_string(), addr.port().to_string()])
                .env("TERM", "dumb")
                .stdin(Stdio::from(slave.try_clone().unwrap()))
                .stdout(Stdio::from(slave.try_clone().unwrap()))
                .stderr(Stdio::from(slave)),
        );
        let master = File::from(pty.master);
        let mut reader = master.try_clone().unwrap();
        let screen = Arc::new(Mutex::new(String::new()));
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal {
            child,
            input: master,
            screen,
        }
    }

    /// Types keys, one write per key, as a person does.
    fn type_keys(&mut self, keys: &str) {
        for b in keys.bytes() {
            self.input.write_all(&[b]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Waits until the screen shows `text` after byte offset `from`;
    /// returns the offset just past it.
    fn wait_for(&self, from: usize, text: &str) -> usize {
        wait_for(&format!("{text:?} on the telnet screen"), || {
            let s = self.screen.lock().unwrap();
            s.get(from..)
                .and_then(|tail| tail.find(text))
                .map(|i| from + i + text.len())
        })
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debian_telnet_keeps_its_session_across_an_upgrade() {
    let server = Server::start("telnet-client", &default_build());
    let mut term = Terminal::telnet(server.addr);
    let at = term.wait_for(0, "What is your name?");
    term.type_keys("zed\r");
    let at = term.wait_for(at, "welcome, zed\r\n");
    term.type_keys("/set color red\r");
    let at = term.wait_for(at, "ok\r\n");
    // Half a command typed, then the upgrade.
    term.type_keys("/ge");
    let at = term.wait_for(at, "/ge");
    server.deploy(&labelled("v2"));
    assert!(server.upgrade().contains("upgrade complete"));
    term.type_keys("t color\r");
    let at = term.wait_for(at, "color = red\r\n");
    term.type_keys("/version\r");
    term.wait_for(
        at,
        &format!("copyover-telnetd v2 pid={} generation=1\r\n", server.pid),
    );
    let screen = term.screen.lock().unwrap().clone();
    // Negotiation bytes are consumed by the client and never echoed back as text.
    assert!(
        !screen.contains('\u{fffd}'),
        "telnet commands leaked into the text: {screen:?}"
    );
    // The typed keys were echoed by the server exactly once each.
    assert_eq!(screen.matches("/get color").count(), 1, "{screen:?}");
}
