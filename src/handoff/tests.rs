//! The handoff's unit tests: the variables, the builder, the claims and
//! the typed takes.

use super::*;

/// What `f` logs at WARN and above, as text.
fn warnings(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || out.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned()
}

#[test]
fn an_unclaimed_group_is_warned_about() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut set = Inherited::default();
    set.groups
        .insert("conn".into(), vec![(1, a.into()), (2, b.into())]);
    let said = warnings(|| drop(set));
    assert!(
        said.contains("nobody claimed") && said.contains("conn (a group of 2)"),
        "{said:?}"
    );
    // Nothing left: nothing said.
    assert!(warnings(|| drop(Inherited::default())).is_empty());
}

#[test]
fn a_handoff_chains_and_knows_when_it_is_empty() {
    let f = std::fs::File::open("/proc/self/stat").unwrap();
    let g = std::fs::File::open("/proc/self/stat").unwrap();
    let region = crate::Region::new(4096).unwrap();
    let mut keep = Handoff::new();
    assert!(keep.is_empty());
    keep.other("a", &f).other("b", &g).region("r", &region);
    assert!(!keep.is_empty());
    let m = keep.manifest().unwrap();
    let kinds: Vec<(&str, FdKind)> = m
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("a", FdKind::Other),
            ("b", FdKind::Other),
            ("r", FdKind::Region)
        ]
    );
}

/// A copy of `s`'s descriptor that is *not* close-on-exec, as the
/// previous image leaves a kept one, at `from` or above. (A number is
/// claimed once per process, and `cargo test` runs these tests in one:
/// each test takes numbers from a range of its own.)
fn inheritable(s: &impl AsFd, from: RawFd) -> RawFd {
    nix::fcntl::fcntl(s, nix::fcntl::FcntlArg::F_DUPFD(from)).unwrap()
}

#[test]
fn check_claims_every_inherited_number_once() {
    let claims = sys::Claims::for_tests();
    let (a, _a) = UnixStream::pair().unwrap();
    let (b, _b) = UnixStream::pair().unwrap();
    let (fa, fb) = (inheritable(&a, 300), inheritable(&b, 300));
    let manifest = || Manifest {
        entries: vec![ManifestEntry {
            name: "one".into(),
            fd: fa,
            kind: FdKind::Stream,
        }],
        groups: vec![ManifestGroup {
            name: "conn".into(),
            members: vec![GroupMember { id: 7, fd: fb }],
        }],
    };
    let mut set = Inherited::check(manifest(), false, &claims).unwrap();
    let mut numbers = set.numbers();
    numbers.sort_unstable();
    assert_eq!(numbers, [fa, fb]);
    // Claimed once: a second claim of the same numbers is refused.
    let err = Inherited::check(manifest(), false, &claims).unwrap_err();
    assert!(err.to_string().contains("used twice"), "{err}");
    assert!(set.take_fd("one").unwrap().is_some());
    let members: Vec<u64> = set
        .take_unix_streams("conn")
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(members, [7]);
    assert!(set.is_empty());
}

#[test]
fn check_refuses_what_was_not_left_for_it_unless_tolerant() {
    let claims = sys::Claims::for_tests();
    // Close-on-exec: this image's own, not inherited.
    let own = std::fs::File::open("/proc/self/stat").unwrap();
    let manifest = || Manifest {
        entries: vec![ManifestEntry {
            name: "own".into(),
            fd: own.as_raw_fd(),
            kind: FdKind::Other,
        }],
        groups: Vec::new(),
    };
    let err = Inherited::check(manifest(), false, &claims).unwrap_err();
    assert!(err.to_string().contains("'own'"), "{err}");
    let set = Inherited::check(manifest(), true, &claims).unwrap();
    assert!(set.is_empty());
}

#[test]
fn check_refuses_a_group_named_like_an_entry() {
    let claims = sys::Claims::for_tests();
    let (a, _a) = UnixStream::pair().unwrap();
    let (b, _b) = UnixStream::pair().unwrap();
    let manifest = Manifest {
        entries: vec![ManifestEntry {
            name: "conn".into(),
            fd: inheritable(&a, 400),
            kind: FdKind::Stream,
        }],
        groups: vec![ManifestGroup {
            name: "conn".into(),
            members: vec![GroupMember {
                id: 1,
                fd: inheritable(&b, 400),
            }],
        }],
    };
    let err = Inherited::check(manifest, false, &claims).unwrap_err();
    assert!(err.to_string().contains("names it twice"), "{err}");
    // No one fd is at fault: the error names none (-1).
    match err {
        Error::Adopt { fd, name, .. } => assert_eq!((fd, name.as_str()), (-1, "conn")),
        other => panic!("{other}"),
    }
}

#[test]
fn a_typed_take_says_what_it_wanted() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut set = Inherited::from_owned([(
        "l".to_string(),
        OwnedFd::from(udp.try_clone().unwrap()),
        FdKind::Datagram,
    )]);
    let err = set.take_tcp_listener("l").unwrap_err().to_string();
    assert!(err.contains(SocketKind::TcpListener.wanted()), "{err}");
    assert!(SocketKind::TcpListener.wanted().contains("TCP"));
}

#[test]
fn duplicate_names_and_fds_are_refused() {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut h = Handoff::new();
    h.listener("x", &a).listener("x", &b);
    assert!(h.manifest().unwrap_err().contains("given twice"));
    let mut h = Handoff::new();
    h.listener("x", &a).listener("y", &a);
    assert!(h.manifest().unwrap_err().contains("kept twice"));
}

#[test]
fn unix_sockets_are_told_from_tcp_ones() {
    let dir = std::env::temp_dir().join(format!("copyover-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut inh = Inherited::default();
    inh.fds.insert(
        "u".into(),
        (OwnedFd::from(l.try_clone().unwrap()), FdKind::Listener),
    );
    inh.fds.insert(
        "u2".into(),
        (OwnedFd::from(l.try_clone().unwrap()), FdKind::Listener),
    );
    inh.fds.insert(
        "t".into(),
        (OwnedFd::from(tcp.try_clone().unwrap()), FdKind::Listener),
    );
    assert!(inh.take_unix_listener("u").unwrap().is_some());
    let err = inh.take_tcp_listener("u2").unwrap_err().to_string();
    assert!(err.contains("its protocol is 0"), "{err}");
    let err = inh.take_unix_listener("t").unwrap_err().to_string();
    assert!(err.contains("not a Unix socket"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn datagram_sockets_are_checked_by_type_domain_and_protocol() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (ud, _peer) = UnixDatagram::pair().unwrap();
    let (us, _peer2) = UnixStream::pair().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut h = Handoff::new();
    h.datagram("u", &udp).datagram("d", &ud);
    assert_eq!(h.manifest().unwrap().entries[0].kind, FdKind::Datagram);
    let mut inh = Inherited::default();
    let dup = |fd: &dyn AsFd| fd.as_fd().try_clone_to_owned().unwrap();
    for (name, fd, kind) in [
        ("udp", dup(&udp), FdKind::Datagram),
        ("udp-other", dup(&udp), FdKind::Other),
        ("udp-as-unix", dup(&udp), FdKind::Datagram),
        ("unix", dup(&ud), FdKind::Datagram),
        ("unix-as-udp", dup(&ud), FdKind::Datagram),
        ("unix-stream", dup(&us), FdKind::Datagram),
        ("tcp", dup(&tcp), FdKind::Datagram),
        ("udp-as-stream", dup(&udp), FdKind::Stream),
    ] {
        inh.fds.insert(name.into(), (fd, kind));
    }
    let port = udp.local_addr().unwrap();
    let got = inh.take_udp_socket("udp").unwrap().unwrap();
    assert_eq!(got.local_addr().unwrap(), port);
    assert!(inh.take_udp_socket("udp-other").unwrap().is_some());
    assert!(inh.take_unix_datagram("unix").unwrap().is_some());
    for (name, unix, want) in [
        ("udp-as-unix", true, "not AF_UNIX"),
        ("unix-as-udp", false, "not AF_INET"),
        ("unix-stream", true, "not SOCK_DGRAM"),
        ("tcp", false, "not SOCK_DGRAM"),
        ("udp-as-stream", false, "the manifest says it is Stream"),
    ] {
        let err = if unix {
            inh.take_unix_datagram(name).map(|_| ())
        } else {
            inh.take_udp_socket(name).map(|_| ())
        };
        let err = err.unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    assert_eq!(inh.len(), 5, "refused descriptors stay in the set");
}

#[test]
fn take_checks_the_descriptor_type() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let mut inh = Inherited::default();
    // No rollback is armed in a unit test: `fail` only builds the error.
    inh.fds.insert(
        "l".into(),
        (OwnedFd::from(l.try_clone().unwrap()), FdKind::Listener),
    );
    inh.fds.insert("f".into(), (file.into(), FdKind::Listener));
    inh.fds.insert(
        "s".into(),
        (OwnedFd::from(l.try_clone().unwrap()), FdKind::Stream),
    );
    let err = inh.take_tcp_listener("f").unwrap_err().to_string();
    assert!(err.contains("'f'") && err.contains("not a socket"), "{err}");
    let err = inh.take_tcp_stream("s").unwrap_err().to_string();
    assert!(err.contains("is listening"), "{err}");
    assert!(inh.take_tcp_listener("l").unwrap().is_some());
    assert!(inh.take_tcp_listener("l").unwrap().is_none(), "taken twice");
    // The refused ones stay in the set, which closes them when dropped.
    let mut left: Vec<&str> = inh.names().collect();
    left.sort_unstable();
    assert_eq!(left, ["f", "s"]);
}

#[test]
fn a_group_is_one_manifest_entry_and_is_taken_in_one_call() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let b = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut keep = Handoff::new();
    keep.streams("conn", [(7u64, &a), (9u64, &b)]);
    keep.stream("conn:3", &udp);
    let m = keep.manifest().unwrap();
    assert_eq!(m.groups.len(), 1);
    let ids: Vec<(u64, RawFd)> = m.groups[0].members.iter().map(|x| (x.id, x.fd)).collect();
    assert_eq!(ids, [(7, a.as_raw_fd()), (9, b.as_raw_fd())]);
    assert_eq!(keep.len(), 3);
    // A group's fds count against every other fd kept.
    keep.stream("again", &b);
    let err = keep.manifest().unwrap_err();
    assert!(
        err.contains("kept twice") && err.contains("'again' and 'conn:9'"),
        "{err}"
    );

    let mut inh = Inherited::default();
    let members = [&a, &b].map(|s| OwnedFd::from(s.try_clone().unwrap()));
    inh.groups
        .insert("conn".into(), [7, 9].into_iter().zip(members).collect());
    inh.fds.insert(
        "conn:11".into(),
        (OwnedFd::from(a.try_clone().unwrap()), FdKind::Stream),
    );
    let got: Vec<u64> = inh
        .take_tcp_streams("conn")
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, [7, 9, 11]);
    assert!(inh.is_empty());

    // The first member is checked: a group of UDP sockets is refused
    // and stays in the set.
    inh.groups.insert(
        "conn".into(),
        vec![(1, OwnedFd::from(udp.try_clone().unwrap()))],
    );
    let err = inh.take_tcp_streams("conn").unwrap_err().to_string();
    assert!(
        err.contains("'conn:1'") && err.contains("protocol"),
        "{err}"
    );
    assert_eq!(inh.names().collect::<Vec<_>>(), ["conn"]);
}

#[test]
fn streams_kept_one_by_one_are_taken_as_a_group() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let b = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();

    let mut inh = Inherited::default();
    for (name, fd, kind) in [
        (
            "conn:7",
            OwnedFd::from(a.try_clone().unwrap()),
            FdKind::Stream,
        ),
        (
            "conn:9",
            OwnedFd::from(b.try_clone().unwrap()),
            FdKind::Stream,
        ),
        (
            "connx:1",
            OwnedFd::from(b.try_clone().unwrap()),
            FdKind::Stream,
        ),
        (
            "listener",
            OwnedFd::from(l.try_clone().unwrap()),
            FdKind::Listener,
        ),
    ] {
        inh.fds.insert(name.into(), (fd, kind));
    }
    let mut got: Vec<u64> = inh
        .take_tcp_streams("conn")
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    got.sort_unstable();
    assert_eq!(got, [7, 9]);
    let mut left: Vec<&str> = inh.names().collect();
    left.sort_unstable();
    assert_eq!(left, ["connx:1", "listener"]);

    // A member that is not a TCP stream fails, and stays in the set.
    inh.fds.insert(
        "conn:3".into(),
        (OwnedFd::from(udp.try_clone().unwrap()), FdKind::Stream),
    );
    let err = inh.take_tcp_streams("conn").unwrap_err().to_string();
    assert!(
        err.contains("'conn:3'") && err.contains("protocol"),
        "{err}"
    );
    assert!(inh.names().any(|n| n == "conn:3"));
}

#[test]
fn a_unix_datagram_or_seqpacket_socket_is_not_a_stream() {
    let (dgram, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let (seq, _) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let mut inh = Inherited::default();
    inh.fds
        .insert("d".into(), (OwnedFd::from(dgram), FdKind::Stream));
    inh.fds.insert("s".into(), (seq, FdKind::Stream));
    for name in ["d", "s"] {
        let err = inh.take_unix_stream(name).unwrap_err().to_string();
        assert!(err.contains("not a stream"), "{name}: {err}");
    }
}

#[test]
fn a_failed_check_is_answered_by_the_owner_before_it_returns() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static ANSWERED: AtomicUsize = AtomicUsize::new(0);
    fn count(err: &Error) {
        assert!(matches!(err, Error::Adopt { .. }), "{err}");
        ANSWERED.fetch_add(1, Ordering::SeqCst);
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dup = |s: &dyn AsFd| s.as_fd().try_clone_to_owned().unwrap();
    let mut set = Inherited::from_owned([
        ("udp".to_string(), dup(&udp), FdKind::Datagram),
        ("l".to_string(), dup(&l), FdKind::Listener),
        ("region".to_string(), dup(&l), FdKind::Listener),
    ]);
    set.groups.insert("conn".into(), vec![(1, dup(&udp))]);
    // No owner's answer: the error is only returned.
    assert!(set.take_tcp_listener("udp").is_err());
    assert_eq!(ANSWERED.load(Ordering::SeqCst), 0);
    set.on_failed_check = Some(count);
    assert!(set.take_tcp_listener("l").unwrap().is_some());
    assert_eq!(ANSWERED.load(Ordering::SeqCst), 0, "a check that passed");
    assert!(set.take_tcp_listener("udp").is_err());
    assert!(set.take_region("region").is_err());
    assert!(set.take_tcp_streams("conn").is_err());
    assert_eq!(ANSWERED.load(Ordering::SeqCst), 3);
}

#[test]
fn received_descriptors_are_the_manifests_in_its_order() {
    // A migration's newcomer gets them under numbers of its own, one for
    // each of the manifest's fds, entries first, then each group's members.
    let (l, _) = (TcpListener::bind("127.0.0.1:0").unwrap(), ());
    let (s1, _p1) = UnixStream::pair().unwrap();
    let (s2, _p2) = UnixStream::pair().unwrap();
    let manifest = Manifest {
        entries: vec![ManifestEntry {
            name: "listener".into(),
            fd: 3,
            kind: FdKind::Listener,
        }],
        groups: vec![ManifestGroup {
            name: "conn".into(),
            members: vec![GroupMember { id: 7, fd: 4 }, GroupMember { id: 9, fd: 5 }],
        }],
    };
    let ino = |fd: &dyn AsFd| nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino;
    let want = (ino(&l), ino(&s1), ino(&s2));
    let fds = vec![OwnedFd::from(l), OwnedFd::from(s1), OwnedFd::from(s2)];
    let mut set = Inherited::received(manifest, fds).unwrap();
    assert_eq!(set.len(), 3);
    let listener = set.take_tcp_listener("listener").unwrap().unwrap();
    let conns = set.take_unix_streams("conn").unwrap();
    let ids: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [7, 9]);
    assert_eq!((ino(&listener), ino(&conns[0].1), ino(&conns[1].1)), want);
    assert!(set.is_empty());
}

#[test]
fn a_region_is_taken_as_a_region() {
    let mut region = crate::Region::new(4096).unwrap();
    region.as_mut_slice()[..5].copy_from_slice(b"hello");
    // The same memfd, opened again (as a new process would receive it).
    let path = format!("/proc/self/fd/{}", region.raw_fd());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
    let fd = OwnedFd::from(file.unwrap());
    let mut set = Inherited::from_owned([("r".to_string(), fd, FdKind::Region)]);
    let taken = set.take_region("r").unwrap().expect("the region");
    assert_eq!(&taken.as_slice()[..5], b"hello");
    // Anything else under that kind is refused as a region.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut set = Inherited::from_owned([("r".to_string(), OwnedFd::from(udp), FdKind::Datagram)]);
    assert!(
        set.take_region("r")
            .unwrap_err()
            .to_string()
            .contains("region")
    );
}
