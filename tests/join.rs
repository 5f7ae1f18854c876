//! External newcomers: a process of the chat started by the operator
//! (`COPYOVER_JOIN=PATH`), in another mount namespace and as another user,
//! connects to the old process's migration socket and takes over; a user
//! the old process does not name, a stranger, or another application is
//! refused with everyone kept.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

/// Root, or a SKIP line (a failure under CI, which runs as root).
fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("COPYOVER_CI").is_none(),
        "needs root to start processes as other users"
    );
    eprintln!("SKIP: needs root to start processes as other users");
    false
}

/// The demo with a migration socket that user 65534 may use; the status
/// directory opened to traversal (0711), ann (`color = green`) and bob
/// (half-way through "partial line") logged in.
fn scene(name: &str) -> (Server, Client, Client, PathBuf) {
    let server = Server::start_with(
        name,
        &labelled("v1"),
        &["--migration-socket", "--migration-uid", "65534"],
    );
    let status = server.scratch.0.join("status");
    let socket = status.join(format!("{}.migration", server.pid));
    wait_for("the migration socket", || socket.exists().then_some(()));
    std::fs::set_permissions(&status, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(&server.scratch.0, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set color green"), "ok");
    bob.send("par");
    (server, ann, bob, socket)
}

/// The scene's users, served by v2 in process `new`: ann's setting kept,
/// bob's half-typed line finished and delivered once, both online.
fn scene_served_by(new: i32, ann: &mut Client, bob: &mut Client) {
    assert_eq!(ann.ask("/version"), version_line("v2", new, 1));
    assert_eq!(ann.ask("/get color"), "color = green");
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(bob.ask("/who"), "online: ann, bob");
}

/// A copy of `build` in the scene's folder, which every user can run.
fn runnable(server: &Server, build: &Path, name: &str) -> PathBuf {
    let copy = server.scratch.0.join(name);
    std::fs::copy(build, &copy).expect("copy the build");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

/// `binary` started as user `uid` (in a mount namespace of its own with
/// `unshare`), joining through `socket`.
fn joiner(binary: &Path, socket: &Path, uid: u32, unshare: bool) -> Command {
    let mut cmd = Command::new(if unshare { "unshare" } else { "setpriv" });
    if unshare {
        cmd.args(["--mount", "setpriv"]);
    }
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ])
    .arg(binary)
    .args(["--listen", "127.0.0.1:0"])
    .env("COPYOVER_JOIN", socket)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

#[test]
fn an_external_newcomer_as_a_named_user_in_another_mount_namespace_takes_over() {
    if !root() {
        return;
    }
    let (mut server, mut ann, mut bob, socket) = scene("jn-takes-over");
    let v2 = runnable(&server, &labelled("v2"), "v2");
    let mark = server.mark();
    let mut child = joiner(&v2, &socket, 65534, true)
        .spawn()
        .expect("start the newcomer");
    let new = child.id() as i32;
    let _reaper = Reaper(new);
    let line = server.wait_log(mark, "migrated to process");
    assert!(
        line.contains(&format!("migrated to process {new}")),
        "{line}"
    );
    assert!(server.wait_exit().success());
    // Everyone, in the new process: another user, another mount namespace.
    scene_served_by(new, &mut ann, &mut bob);
    let status = std::fs::read_to_string(format!("/proc/{new}/status")).expect("status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid}"
    );
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("ns");
    assert_ne!(ns(&new.to_string()), ns("self"));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the new process serves"
    );
}

#[test]
fn strangers_other_users_and_other_applications_are_refused() {
    if !root() {
        return;
    }
    let (server, mut ann, mut bob, socket) = scene("jn-refused");
    // A user the old process does not name: refused at the door, logged,
    // sent nothing.
    let v2 = runnable(&server, &labelled("v2"), "v2");
    let mark = server.mark();
    let out = joiner(&v2, &socket, 65533, false)
        .output()
        .expect("run the newcomer");
    assert!(!out.status.success());
    let line = server.wait_log(mark, "refused a migration connection from uid 65533");
    assert!(line.contains("Config::migration_peer"), "{line}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("process {} serves on", server.pid))
            && said.contains("it refused this process"),
        "{said}"
    );

    // A connection that never says hello.
    let mark = server.mark();
    let raw = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .expect("socket");
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&raw),
        &nix::sys::socket::UnixAddr::new(&socket).expect("addr"),
    )
    .expect("connect");
    nix::unistd::write(&raw, b"knock knock").expect("write");
    server.wait_log(mark, "refused a migration connection: no hello");
    drop(raw);

    // Another application: its own probe of the snapshot refuses.
    let wrong = runnable(&server, &faulty("wrong-app"), "wrong");
    let mark = server.mark();
    let out = joiner(&wrong, &socket, 65534, false)
        .output()
        .expect("run the newcomer");
    assert!(!out.status.success());
    let line = server.wait_log(mark, "upgrade refused");
    assert!(line.contains("it refused"), "{line}");
    assert_eq!(ann.ask("/version"), version_line("v1", server.pid, 0));
    bob.send("tial line\r\n");
    assert_eq!(ann.line(), "bob: partial line");
    assert_eq!(ann.ask("/get color"), "color = green");
}

#[test]
fn an_external_newcomer_takes_users_a_batch_at_a_time() {
    let server = Server::start_with("jn-gradual", &labelled("v1"), &["--migration-socket"]);
    let status = server.scratch.0.join("status");
    let socket = status.join(format!("{}.migration", server.pid));
    wait_for("the migration socket", || socket.exists().then_some(()));
    let mut ann = Client::login(server.addr, "ann");
    let mut bob = Client::login(server.addr, "bob");
    assert_eq!(ann.ask("/set color green"), "ok");
    bob.send("par");
    // The operator prepares it (no signal), then starts the newcomer.
    let cli = Command::new(env!("CARGO_BIN_EXE_copyover"))
        .args([
            "migrate",
            &server.pid.to_string(),
            "--external",
            "--batch",
            "1",
        ])
        .args(["--every", "0.2", "--status-dir"])
        .arg(&status)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run copyover");
    let request = status.join(format!("{}.migrate", server.pid));
    wait_for("the request", || request.exists().then_some(()));
    let mark = server.mark();
    let v2 = runnable(&server, &labelled("v2"), "v2");
    let mut newcomer = Command::new(&v2)
        .args(["--listen", "127.0.0.1:0"])
        .env("COPYOVER_JOIN", &socket)
        .env("COPYOVER_STATUS_DIR", &status)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the newcomer");
    let new = newcomer.id() as i32;
    let _reaper = Reaper(new);
    let out = cli.wait_with_output().expect("copyover's outcome");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("migrated to process {new}")),
        "{text}"
    );
    // One user at a time, then the old process left.
    server.wait_log(mark, "moved a batch of users moved=1 left=1");
    server.wait_log(mark, "moved a batch of users moved=1 left=0");
    let mut server = server;
    assert!(server.wait_exit().success());
    scene_served_by(new, &mut ann, &mut bob);
    assert!(newcomer.try_wait().expect("wait").is_none());
}
