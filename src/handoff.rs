//! What crosses the exec besides the snapshot: the descriptors, by name.
//!
//! The old image lists what it keeps in a [`Handoff`]; the runtime writes
//! that list (the manifest) into the snapshot and clears close-on-exec on
//! exactly those fds. The new image gets them back as an [`Inherited`] set
//! and claims each one by name, with a type check, like `listenfd` does for
//! systemd's sockets. That check (`SocketKind`) is also the one a listener
//! passed by socket activation gets.
//!
//! # The handoff variable, version 1
//!
//! `COPYOVER_HANDOFF=1:pid=PID:snapshot=FD:binary=FD:mode=MODE`
//!
//! * `pid`: the process that executed the new image. A process whose PID
//!   differs inherited the variable by mistake and starts fresh.
//! * `snapshot`: the sealed memfd holding the snapshot.
//! * `binary`: the previous binary, opened at its start-up, executed again
//!   if the new image fails before it is ready (rollback).
//! * `mode`: `upgrade` (a new binary starts) or `rollback` (the previous
//!   binary comes back after a failed upgrade; the reason is in
//!   `COPYOVER_ROLLBACK_REASON`).
//!
//! Optional fields, in this order when present:
//!
//! * `holder=PID`: the holder child that keeps the old image's descriptors
//!   and memory until an image is ready (see `sys::holder`); the image that
//!   becomes ready kills it.
//! * `exec=FD`: a sealed memfd holding the old image's argument vector and
//!   environment (see `rollback::ExecRecord`): a rollback starts the old
//!   binary exactly as it ran, whatever a wrapper script changed for the new
//!   one (an `LD_PRELOAD`, arguments). The image that becomes ready closes
//!   it.
//! * `nofile=N`: the old image's soft `RLIMIT_NOFILE`, put back before a
//!   rollback's exec (a new image started with a lower limit must not hand
//!   the old code a limit it cannot run under).
//! * `script=FD`: the new binary is a script, executed from this fd (its
//!   interpreter reads it as `/dev/fd/FD`); the image closes it at once.
//! * `rescued=1`: the holder started this (old) binary under its own PID
//!   after the new image died before it was ready, or missed the holder's
//!   deadline.
//!
//! # The claim variable, version 1
//!
//! `COPYOVER_CLAIM=1:claim=FD:held=NS`, beside the handoff variable after
//! a commit (and a rollback of it); a variable of its own, so that an older
//! build, whose handoff parser refuses fields it does not know, still
//! reads the handoff variable (it ignores this one, and the holder's
//! deadline still applies to it).
//!
//! * `claim`: the readiness claim, a pipe holding one byte (see
//!   `sys::claim`). The image that becomes ready reads the byte before it
//!   kills the holder; the holder reads it at its deadline before it kills
//!   the server's process. Whoever gets it ends the upgrade. A rescued
//!   image has none (there is no holder any more).
//! * `held`: when the holder started (`CLOCK_MONOTONIC`, nanoseconds), for
//!   the outcome's `unheld_ms`.
//!
//! A rollback hands the old binary the very text the old image wrote, with
//! `mode=rollback` and without `script=`: the old code reads its own format,
//! whatever fields a newer binary knows.
//!
//! The runtime removes both variables from the environment as soon as it has
//! read them, so they never reach a child process.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use crate::error::Error;
use crate::snapshot::{FdKind, GroupMember, Manifest, ManifestEntry, ManifestGroup};
use crate::sys;

pub use crate::env::{HANDOFF_VAR, ROLLBACK_REASON_VAR};

/// Why the new image was started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    #[default]
    Upgrade,
    Rollback,
}

/// The parsed handoff variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HandoffVar {
    pub pid: i32,
    pub snapshot_fd: RawFd,
    pub binary_fd: RawFd,
    pub mode: Mode,
    pub holder: Option<i32>,
    pub exec: Option<RawFd>,
    pub nofile: Option<u64>,
    pub script: Option<RawFd>,
    pub rescued: bool,
}

/// The parsed claim variable (see the [module docs](self#the-claim-variable-version-1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimVar {
    pub claim: RawFd,
    pub held_at: u64,
}

impl ClaimVar {
    /// The variable's value.
    pub(crate) fn format(&self) -> String {
        format!("1:claim={}:held={}", self.claim, self.held_at)
    }

    /// Parses the value; `None` for anything else than version 1 with both
    /// fields (an unreadable claim is no claim: see `take_claim`).
    pub(crate) fn parse(value: &str) -> Option<ClaimVar> {
        let rest = value.strip_prefix("1:")?;
        let (mut claim, mut held_at) = (None, None);
        for part in rest.split(':') {
            match part.split_once('=')? {
                ("claim", v) => claim = v.parse::<RawFd>().ok().filter(|fd| *fd >= 0),
                ("held", v) => held_at = v.parse().ok(),
                _ => return None,
            }
        }
        Some(ClaimVar {
            claim: claim?,
            held_at: held_at?,
        })
    }
}

impl HandoffVar {
    /// The variable's value.
    pub(crate) fn format(&self) -> String {
        let mut text = format!("1:pid={}", self.pid);
        text.push_str(&self.format_after_pid());
        text
    }

    /// Everything after the PID, from `:snapshot=` on (the holder writes its
    /// own PID in front of it).
    pub(crate) fn format_after_pid(&self) -> String {
        let mode = match self.mode {
            Mode::Upgrade => "upgrade",
            Mode::Rollback => "rollback",
        };
        let mut text = format!(
            ":snapshot={}:binary={}:mode={mode}",
            self.snapshot_fd, self.binary_fd
        );
        if let Some(pid) = self.holder {
            text.push_str(&format!(":holder={pid}"));
        }
        if let Some(fd) = self.exec {
            text.push_str(&format!(":exec={fd}"));
        }
        if let Some(n) = self.nofile {
            text.push_str(&format!(":nofile={n}"));
        }
        if let Some(fd) = self.script {
            text.push_str(&format!(":script={fd}"));
        }
        if self.rescued {
            text.push_str(":rescued=1");
        }
        text
    }

    /// The text of the variable a rollback hands the old binary: `value`
    /// (as the old image wrote it) with `mode=rollback` and without the
    /// `script=` field, every other field kept as written.
    pub(crate) fn rollback_text(value: &str) -> String {
        value
            .split(':')
            .filter(|f| !f.starts_with("script="))
            .map(|f| {
                if f == "mode=upgrade" {
                    "mode=rollback"
                } else {
                    f
                }
            })
            .collect::<Vec<_>>()
            .join(":")
    }

    pub(crate) fn parse(value: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::HandoffVar {
            var: HANDOFF_VAR,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = value.split(':');
        if parts.next() != Some("1") {
            return Err(bad("it does not start with format version 1"));
        }
        let (mut pid, mut snapshot, mut binary, mut mode) = (None, None, None, None);
        let mut var = HandoffVar::default();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("a field is not KEY=VALUE"))?;
            let num = || {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad(&format!("{k} is not a non-negative number")))
            };
            match k {
                "pid" => pid = Some(num()?),
                "snapshot" => snapshot = Some(num()?),
                "binary" => binary = Some(num()?),
                "holder" => var.holder = Some(num()?),
                "exec" => var.exec = Some(num()?),
                "script" => var.script = Some(num()?),
                "nofile" => {
                    var.nofile = Some(
                        v.parse::<u64>()
                            .map_err(|_| bad("nofile is not a non-negative number"))?,
                    )
                }
                "rescued" => var.rescued = v == "1",
                "mode" => {
                    mode = Some(match v {
                        "upgrade" => Mode::Upgrade,
                        "rollback" => Mode::Rollback,
                        _ => return Err(bad("mode is neither upgrade nor rollback")),
                    })
                }
                _ => return Err(bad(&format!("unknown field {k}"))),
            }
        }
        if snapshot.is_some() && snapshot == binary {
            return Err(bad("snapshot and binary name the same fd"));
        }
        if var.script.is_some() && (var.script == snapshot || var.script == binary) {
            return Err(bad("script names the fd of the snapshot or the binary"));
        }
        var.pid = pid.ok_or_else(|| bad("pid is missing"))?;
        var.snapshot_fd = snapshot.ok_or_else(|| bad("snapshot is missing"))?;
        var.binary_fd = binary.ok_or_else(|| bad("binary is missing"))?;
        var.mode = mode.ok_or_else(|| bad("mode is missing"))?;
        Ok(var)
    }
}

/// A connected stream socket type, the members of a group kept with
/// [`Handoff::streams`]: the standard library's `TcpStream` and
/// `UnixStream` (and tokio's, with the `tokio` feature). Sealed: a group is
/// one type the new image can check once, so no other (a listener, a file,
/// a raw `OwnedFd`) can be kept as a member:
///
/// ```compile_fail
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let mut keep = copyover::Handoff::new();
/// keep.streams("conn", [(1u64, &listener)]); // not a connection
/// ```
pub trait StreamSocket: AsFd + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::net::TcpStream {}
    impl Sealed for std::os::unix::net::UnixStream {}
    #[cfg(feature = "tokio")]
    impl Sealed for ::tokio::net::TcpStream {}
    #[cfg(feature = "tokio")]
    impl Sealed for ::tokio::net::UnixStream {}
}

impl StreamSocket for TcpStream {}
impl StreamSocket for UnixStream {}
#[cfg(feature = "tokio")]
impl StreamSocket for ::tokio::net::TcpStream {}
#[cfg(feature = "tokio")]
impl StreamSocket for ::tokio::net::UnixStream {}

/// The descriptors an application keeps across an upgrade, by name.
///
/// Built at the safe point just before [`Copyover::upgrade`]; it borrows the
/// descriptors, so they stay owned (and usable) by the application if the
/// upgrade does not happen.
///
/// ```
/// # use std::net::TcpListener;
/// let listener = TcpListener::bind("127.0.0.1:0").unwrap();
/// let mut keep = copyover::Handoff::new();
/// keep.listener("telnet", &listener);
/// assert_eq!(keep.len(), 1);
/// ```
///
/// [`Copyover::upgrade`]: crate::Copyover::upgrade
#[derive(Debug, Default)]
pub struct Handoff<'a> {
    manifest: Manifest,
    _borrows: std::marker::PhantomData<std::os::fd::BorrowedFd<'a>>,
}

impl<'a> Handoff<'a> {
    /// An empty handoff.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps a listening socket under `name`.
    pub fn listener(&mut self, name: impl Into<String>, fd: &'a impl AsFd) -> &mut Self {
        self.push(name.into(), fd.as_fd().as_raw_fd(), FdKind::Listener)
    }

    /// Keeps a connected stream socket under `name`.
    pub fn stream(&mut self, name: impl Into<String>, fd: &'a impl AsFd) -> &mut Self {
        self.push(name.into(), fd.as_fd().as_raw_fd(), FdKind::Stream)
    }

    /// Keeps a datagram socket (UDP or Unix datagram) under `name`; claim
    /// it with [`Inherited::take_udp_socket`] or
    /// [`Inherited::take_unix_datagram`].
    pub fn datagram(&mut self, name: impl Into<String>, fd: &'a impl AsFd) -> &mut Self {
        self.push(name.into(), fd.as_fd().as_raw_fd(), FdKind::Datagram)
    }

    /// Keeps many connected stream sockets at once, as one group named
    /// `prefix`, each with the number the application knows the connection
    /// by (its record in the state, its epoll token). The new image takes
    /// them back in one call with [`Inherited::take_tcp_streams`] or
    /// [`Inherited::take_unix_streams`].
    ///
    /// This is the way to keep connections: the manifest holds one entry
    /// for the group and an (id, fd) pair per connection, not a name each,
    /// so a server with 10,000 connections builds, writes, reads and claims
    /// no 10,000 strings while its clients wait. A group is all one type
    /// (the iterator's), all TCP or all Unix stream sockets: the new image
    /// checks the type of its first member only. Ids are the keys the new
    /// image gets them back by: the probe refuses an upgrade whose group
    /// names one id twice.
    ///
    /// ```
    /// # use std::net::{TcpListener, TcpStream};
    /// let l = TcpListener::bind("127.0.0.1:0").unwrap();
    /// let conns = vec![(7u64, TcpStream::connect(l.local_addr().unwrap()).unwrap())];
    /// let mut keep = copyover::Handoff::new();
    /// keep.streams("conn", conns.iter().map(|(id, s)| (*id, s)));
    /// assert_eq!(keep.len(), 1);
    /// ```
    pub fn streams<F: StreamSocket + 'a>(
        &mut self,
        prefix: &str,
        conns: impl IntoIterator<Item = (u64, &'a F)>,
    ) -> &mut Self {
        let members = conns
            .into_iter()
            .map(|(id, fd)| GroupMember {
                id,
                fd: fd.as_fd().as_raw_fd(),
            })
            .collect();
        self.manifest.groups.push(ManifestGroup {
            name: prefix.to_owned(),
            members,
        });
        self
    }

    /// Keeps any other descriptor (a pipe, a file, a datagram socket).
    pub fn other(&mut self, name: impl Into<String>, fd: &'a impl AsFd) -> &mut Self {
        self.push(name.into(), fd.as_fd().as_raw_fd(), FdKind::Other)
    }

    /// Keeps a [`Region`](crate::Region) under `name`: its bytes cross the
    /// exec in place, without being serialized.
    pub fn region(&mut self, name: impl Into<String>, region: &'a crate::Region) -> &mut Self {
        self.push(name.into(), region.raw_fd(), FdKind::Region)
    }

    fn push(&mut self, name: String, fd: RawFd, kind: FdKind) -> &mut Self {
        self.manifest.entries.push(ManifestEntry { name, fd, kind });
        self
    }

    /// Number of descriptors kept (a group's members each count).
    pub fn len(&self) -> usize {
        self.manifest.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.manifest.is_empty()
    }

    /// The manifest, checked: every name (of an entry or a group) and
    /// every fd appears once.
    pub(crate) fn manifest(&self) -> Result<&Manifest, String> {
        let m = &self.manifest;
        let mut names = std::collections::HashSet::with_capacity(m.entries.len() + m.groups.len());
        let names_of_groups = m.groups.iter().map(|g| g.name.as_str());
        for name in m
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .chain(names_of_groups)
        {
            if !names.insert(name) {
                return Err(format!("the name '{name}' is given twice"));
            }
        }
        // A bitmap of fd numbers: one bit each, no hashing per connection.
        let mut seen = sys::FdSet::new();
        for fd in m.fds() {
            let Ok(n) = usize::try_from(fd) else {
                return Err(format!("fd {fd} is not a descriptor number"));
            };
            if !seen.insert(n) {
                let names: Vec<String> = m.names_of(fd).map(|n| format!("'{n}'")).collect();
                return Err(format!(
                    "fd {fd} is kept twice (as {})",
                    names.join(" and ")
                ));
            }
        }
        Ok(m)
    }
}

/// The descriptors inherited from the previous image, claimed by name.
///
/// Each `take_*` method hands one descriptor over, after checking that it is
/// what the caller asks for, and returns `Ok(None)` if no descriptor of that
/// name was handed over (or it was already taken). Descriptors nobody claims
/// are closed, with a warning, when this set is dropped.
///
/// ```
/// use copyover::Inherited;
/// use std::net::{TcpListener, TcpStream};
///
/// /// What a resumed image takes back, by the names its old image kept
/// /// them under (`keep.listener("listener", ..).streams("conn", ..)`).
/// fn adopt(fds: &mut Inherited) -> Result<(Option<TcpListener>, Vec<(u64, TcpStream)>), copyover::Error> {
///     let listener = fds.take_tcp_listener("listener")?;
///     let conns = fds.take_tcp_streams("conn")?;
///     Ok((listener, conns))
/// }
///
/// // `boot` hands a resumed image its set in `Start::Resumed`; an empty
/// // one stands in for it here.
/// let (listener, conns) = adopt(&mut Inherited::default())?;
/// assert!(listener.is_none() && conns.is_empty());
/// # Ok::<(), copyover::Error>(())
/// ```
///
/// # When a check fails
///
/// While an upgraded image is not [ready](crate::Copyover::ready), a typed
/// take (`take_tcp_listener`, `take_tcp_streams`, `take_region`, ...)
/// whose descriptor fails its check **rolls back at once and does not
/// return**: the old binary runs again with every descriptor still open,
/// the wrong one included. The error is returned only where there is no
/// rollback: on a fresh or recovered start, after a rollback, after
/// `ready`, or if the rollback's exec itself failed. [`take_fd`](Self::take_fd)
/// checks nothing and never rolls back.
///
/// # Close-on-exec
///
/// The inherited descriptors arrive inheritable (that is how [`boot`](crate::boot)
/// recognises them); once it has checked them, `boot` makes every fd from
/// 3 up close-on-exec in one call, before it returns (its helper thread,
/// which may claim them, starts no process). So a child started after
/// `boot` gets none of them; only the
/// rollback makes the kept ones inheritable again, just before its exec.
/// (After a rollback, a failure of that call is logged and the fds stay
/// inheritable: the old code serves anyway.)
///
/// Its blocking mode is
/// the one the old image set: `O_NONBLOCK` lives on the open file
/// description and survives the exec. Event-loop registrations (epoll) do
/// not survive: register every adopted descriptor again.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Owned from the start (checked by `boot`); typed only when taken.
    fds: HashMap<String, (OwnedFd, FdKind)>,
    /// Groups of connections ([`Handoff::streams`]), by name.
    groups: HashMap<String, Vec<(u64, OwnedFd)>>,
}

impl Inherited {
    /// Checks every manifest entry, before this image opens any descriptor
    /// of its own. The fds the handoff itself uses (snapshot, binary, exec
    /// record) are claimed before, so no entry may name them.
    ///
    /// Each fd must be open and **not** close-on-exec: that is how the
    /// previous image left it (it cleared the flag on exactly these fds),
    /// and no descriptor this image opened can look like that (the standard
    /// library opens everything close-on-exec). A manifest naming a closed
    /// fd can therefore never hand out one of this image's own.
    ///
    /// `tolerant` (after a rollback): an entry that fails the check (the
    /// failed image closed it) is skipped with a warning, so that the other
    /// clients are kept. Otherwise it is an error.
    ///
    /// Every name and every fd must appear once: two owners of one fd
    /// would close it twice.
    pub(crate) fn check(
        manifest: Manifest,
        tolerant: bool,
        claims: &sys::Claims,
    ) -> Result<Self, Error> {
        use std::collections::hash_map::Entry;
        // Every number is claimed once per image (see `sys::Claims`): a
        // number used twice, or one the handoff itself uses (snapshot,
        // binary, exec record: claimed before), fails its claim.
        let mut claims = claims.inherit_all(manifest.fds()).into_iter();
        let mut set = Self::default();
        let Manifest { entries, groups } = manifest;
        set.fds.reserve(entries.len());
        for e in entries {
            let claim = claims
                .next()
                .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()));
            let Some(fd) = Self::claimed(claim, || e.name.clone(), e.fd, tolerant)? else {
                continue;
            };
            match set.fds.entry(e.name) {
                Entry::Vacant(v) => {
                    v.insert((fd, e.kind));
                }
                Entry::Occupied(o) => {
                    let reason = "the manifest names it twice".into();
                    return Err(refuse(o.key(), e.fd, "a unique descriptor", reason));
                }
            }
        }
        for g in groups {
            let mut members = Vec::with_capacity(g.members.len());
            for m in g.members {
                let claim = claims
                    .next()
                    .unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into()));
                // Named only if it fails.
                let name = || format!("{}:{}", g.name, m.id);
                if let Some(fd) = Self::claimed(claim, name, m.fd, tolerant)? {
                    members.push((m.id, fd));
                }
            }
            if set.fds.contains_key(&g.name) || set.groups.contains_key(&g.name) {
                let reason = "the manifest names it twice".into();
                return Err(refuse(&g.name, -1, "a unique group", reason));
            }
            set.groups.insert(g.name, members);
        }
        Ok(set)
    }

    /// A claim's result: the fd, `None` to skip it (`tolerant`), or the
    /// error that refuses the handoff.
    fn claimed(
        claim: std::io::Result<OwnedFd>,
        name: impl Fn() -> String,
        fd: RawFd,
        tolerant: bool,
    ) -> Result<Option<OwnedFd>, Error> {
        let err = match claim {
            Ok(fd) => return Ok(Some(fd)),
            Err(err) => err,
        };
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            let reason = "its fd number is used twice in the handoff".into();
            return Err(refuse(&name(), fd, "a unique descriptor", reason));
        }
        if !tolerant {
            return Err(refuse(
                &name(),
                fd,
                "an inherited descriptor",
                err.to_string(),
            ));
        }
        tracing::warn!(fd, name = %name(), "skipping an inherited descriptor: {err}");
        Ok(None)
    }

    /// A set of descriptors already owned and checked by the caller (the fd
    /// store's, after a crash: see [`crate::fdstore`]).
    pub(crate) fn from_owned(fds: impl IntoIterator<Item = (String, OwnedFd, FdKind)>) -> Self {
        Self {
            fds: fds
                .into_iter()
                .map(|(name, fd, kind)| (name, (fd, kind)))
                .collect(),
            groups: HashMap::new(),
        }
    }

    /// The fd numbers not claimed yet.
    pub(crate) fn numbers(&self) -> Vec<RawFd> {
        let members = self.groups.values().flatten().map(|(_, fd)| fd.as_raw_fd());
        self.fds
            .values()
            .map(|(fd, _)| fd.as_raw_fd())
            .chain(members)
            .collect()
    }

    /// Number of descriptors not claimed yet (a group's members each count).
    pub fn len(&self) -> usize {
        self.fds.len() + self.groups.values().map(Vec::len).sum::<usize>()
    }

    /// Whether every descriptor was claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the descriptors and groups not claimed yet, in no
    /// particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds
            .keys()
            .chain(self.groups.keys())
            .map(String::as_str)
    }

    /// Takes any descriptor, without a type check. It never rolls back.
    ///
    /// # Errors
    ///
    /// None today: every descriptor in the set was checked by
    /// [`boot`](crate::boot) to be open and left for this image. The
    /// `Result` leaves room for checks to come.
    pub fn take_fd(&mut self, name: &str) -> Result<Option<OwnedFd>, Error> {
        Ok(self.fds.remove(name).map(|(fd, _)| fd))
    }

    /// Takes a [`Region`](crate::Region) and maps it again.
    ///
    /// While an upgraded image is not ready, a descriptor that is not a
    /// region rolls back at once (the call does not return); otherwise the
    /// error is returned (see [When a check fails](Self#when-a-check-fails)).
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a region's memfd whose
    /// size is sealed, where no rollback happens.
    pub fn take_region(&mut self, name: &str) -> Result<Option<crate::Region>, Error> {
        let Some((fd, kind)) = self.fds.get(name) else {
            return Ok(None);
        };
        let (raw, kind) = (fd.as_raw_fd(), *kind);
        let fail = |reason: String| refuse(name, raw, "a region", reason);
        if kind != FdKind::Region {
            return Err(fail(format!("the manifest says it is {kind:?}")));
        }
        let Some(fd) = self.take_fd(name)? else {
            return Ok(None);
        };
        crate::Region::adopt(fd)
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }

    /// Takes a listening TCP socket.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a listening TCP socket,
    /// where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_tcp_listener(&mut self, name: &str) -> Result<Option<TcpListener>, Error> {
        self.take_socket(name, SocketKind::TcpListener)
            .map(|o| o.map(TcpListener::from))
    }

    /// Takes a connected TCP socket.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a connected TCP socket,
    /// where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_tcp_stream(&mut self, name: &str) -> Result<Option<TcpStream>, Error> {
        self.take_socket(name, SocketKind::TcpStream)
            .map(|o| o.map(TcpStream::from))
    }

    /// Takes every connected TCP socket kept with
    /// [`Handoff::streams`]`(prefix, ..)`, with its id, in the order they
    /// were kept.
    ///
    /// Each descriptor was checked by [`boot`](crate::boot) to be open and
    /// left for this image (what makes owning it sound). The group is one
    /// type (see [`Handoff::streams`]), so the type check is made once, on
    /// its first member, as [`take_tcp_stream`](Self::take_tcp_stream)
    /// makes it: a server with 10,000 connections makes no 10,000 socket
    /// syscalls here while its clients wait. Connections kept one by one as
    /// `PREFIX:ID` (by [`Handoff::stream`], or by a build from before
    /// groups) are taken too, each checked.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if a checked descriptor is not a connected TCP
    /// socket, where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_tcp_streams(&mut self, prefix: &str) -> Result<Vec<(u64, TcpStream)>, Error> {
        self.take_group(prefix, |set, name| set.take_tcp_stream(name))
    }

    /// Takes every connected Unix stream socket kept with
    /// [`Handoff::streams`]`(prefix, ..)`, with its id.
    ///
    /// # Errors
    ///
    /// As [`take_tcp_streams`](Self::take_tcp_streams), for Unix sockets.
    pub fn take_unix_streams(&mut self, prefix: &str) -> Result<Vec<(u64, UnixStream)>, Error> {
        self.take_group(prefix, |set, name| set.take_unix_stream(name))
    }

    /// A group's members, the first checked by `take`, and the members
    /// kept one by one as `PREFIX:ID`, each checked by `take`. A member
    /// that fails stays in the set (and is closed with it).
    fn take_group<T: From<OwnedFd>>(
        &mut self,
        prefix: &str,
        mut take: impl FnMut(&mut Self, &str) -> Result<Option<T>, Error>,
    ) -> Result<Vec<(u64, T)>, Error> {
        let mut out = Vec::new();
        if let Some(mut members) = self.groups.remove(prefix) {
            out.reserve(members.len());
            if !members.is_empty() {
                let (id, first) = members.remove(0);
                let name = format!("{prefix}:{id}");
                let mut one = Inherited::default();
                one.fds.insert(name.clone(), (first, FdKind::Stream));
                match take(&mut one, &name) {
                    Ok(Some(s)) => out.push((id, s)),
                    Ok(None) => {}
                    Err(e) => {
                        if let Some((fd, _)) = one.fds.remove(&name) {
                            members.insert(0, (id, fd));
                        }
                        self.groups.insert(prefix.to_owned(), members);
                        return Err(e);
                    }
                }
            }
            out.extend(members.into_iter().map(|(id, fd)| (id, T::from(fd))));
        }
        let member = |name: &str| -> Option<u64> {
            name.strip_prefix(prefix)?.strip_prefix(':')?.parse().ok()
        };
        // One pass takes the members kept by name out; each is checked,
        // and put back (to be closed with the set) if it fails its check.
        let named: Vec<(String, (OwnedFd, FdKind))> = self
            .fds
            .extract_if(|name, _| member(name).is_some())
            .collect();
        out.reserve(named.len());
        let mut named = named.into_iter();
        while let Some((name, entry)) = named.next() {
            let id = member(&name).unwrap_or_default();
            let mut one = Inherited::default();
            one.fds.insert(name.clone(), entry);
            match take(&mut one, &name) {
                Ok(Some(s)) => out.push((id, s)),
                Ok(None) => {}
                Err(e) => {
                    self.fds.extend(one.fds.drain());
                    self.fds.extend(named);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Takes a listening Unix stream socket.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a listening Unix socket,
    /// where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_unix_listener(&mut self, name: &str) -> Result<Option<UnixListener>, Error> {
        self.take_socket(name, SocketKind::UnixListener)
            .map(|o| o.map(UnixListener::from))
    }

    /// Takes a connected Unix stream socket.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a connected Unix socket,
    /// where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_unix_stream(&mut self, name: &str) -> Result<Option<UnixStream>, Error> {
        self.take_socket(name, SocketKind::UnixStream)
            .map(|o| o.map(UnixStream::from))
    }

    /// The checks of a typed take: the manifest's kind, then the socket's
    /// own options ([`SocketKind::check`]). The descriptor leaves the set
    /// only once it passed them: one of the wrong type stays in the set and
    /// is closed with it. While an upgraded image is not ready, a failed
    /// check rolls back at once, with every descriptor still open.
    fn take_socket(&mut self, name: &str, want: SocketKind) -> Result<Option<OwnedFd>, Error> {
        let Some((owned, kind)) = self.fds.get(name) else {
            return Ok(None);
        };
        let (fd, kind) = (owned.as_raw_fd(), *kind);
        let fail = |reason: String| refuse(name, fd, want.wanted(), reason);
        if !want.kept_as(kind) {
            return Err(fail(format!("the manifest says it is {kind:?}")));
        }
        want.check(fd).map_err(fail)?;
        Ok(self.fds.remove(name).map(|(fd, _)| fd))
    }

    /// Takes a UDP socket (bound, and connected if it was).
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a UDP socket (`SO_TYPE`
    /// `SOCK_DGRAM`, `SO_DOMAIN` `AF_INET` or `AF_INET6`, `SO_PROTOCOL`
    /// `IPPROTO_UDP`), where no rollback happens (see [When a check
    /// fails](Self#when-a-check-fails): before `ready` it rolls back and
    /// does not return).
    pub fn take_udp_socket(&mut self, name: &str) -> Result<Option<UdpSocket>, Error> {
        self.take_socket(name, SocketKind::Udp)
            .map(|o| o.map(UdpSocket::from))
    }

    /// Takes a Unix datagram socket.
    ///
    /// # Errors
    ///
    /// [`Error::Adopt`] if the descriptor is not a Unix datagram socket
    /// (`SO_TYPE` `SOCK_DGRAM`, `SO_DOMAIN` `AF_UNIX`), where no rollback
    /// happens (see [When a check fails](Self#when-a-check-fails): before
    /// `ready` it rolls back and does not return).
    pub fn take_unix_datagram(&mut self, name: &str) -> Result<Option<UnixDatagram>, Error> {
        self.take_socket(name, SocketKind::UnixDatagram)
            .map(|o| o.map(UnixDatagram::from))
    }
}

/// The socket a typed take asks for: the one check of a descriptor's type
/// before it becomes a typed socket, for an inherited descriptor
/// ([`Inherited`]'s `take_*`) and a socket-activated one
/// ([`Copyover::take_activated_tcp_listener`](crate::Copyover::take_activated_tcp_listener)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A listening TCP socket.
    TcpListener,
    /// A connected TCP socket.
    TcpStream,
    /// A listening Unix stream socket.
    UnixListener,
    /// A connected Unix stream socket.
    UnixStream,
    /// A UDP socket: `AF_INET` or `AF_INET6`, `IPPROTO_UDP`.
    Udp,
    /// A Unix datagram socket.
    UnixDatagram,
}

impl SocketKind {
    /// What a take of this kind wants, for its error.
    pub(crate) fn wanted(self) -> &'static str {
        match self {
            SocketKind::TcpListener => "a listening TCP socket",
            SocketKind::TcpStream => "a connected TCP socket",
            SocketKind::UnixListener => "a listening Unix socket",
            SocketKind::UnixStream => "a connected Unix socket",
            SocketKind::Udp => "a UDP socket",
            SocketKind::UnixDatagram => "a Unix datagram socket",
        }
    }

    /// Whether a manifest entry of `kind` may hold this socket. Datagram
    /// sockets kept with [`Handoff::other`] (the way to keep one before
    /// [`Handoff::datagram`]) are accepted too: the socket's own options
    /// decide.
    fn kept_as(self, kind: FdKind) -> bool {
        match self {
            SocketKind::TcpListener | SocketKind::UnixListener => kind == FdKind::Listener,
            SocketKind::TcpStream | SocketKind::UnixStream => kind == FdKind::Stream,
            SocketKind::Udp | SocketKind::UnixDatagram => {
                matches!(kind, FdKind::Datagram | FdKind::Other)
            }
        }
    }

    /// Checks fd number `fd` with the socket's own options (`SO_ACCEPTCONN`,
    /// `SO_PROTOCOL`, `SO_DOMAIN`, `SO_TYPE`), on the raw number, before
    /// anyone owns it. The error is the reason, for [`Error::Adopt`].
    pub(crate) fn check(self, fd: RawFd) -> Result<(), String> {
        match self {
            SocketKind::TcpListener => check_stream(fd, true, Some(libc::IPPROTO_TCP)),
            SocketKind::TcpStream => check_stream(fd, false, Some(libc::IPPROTO_TCP)),
            SocketKind::UnixListener => check_stream(fd, true, None),
            SocketKind::UnixStream => check_stream(fd, false, None),
            SocketKind::Udp => check_datagram(fd, true),
            SocketKind::UnixDatagram => check_datagram(fd, false),
        }
    }
}

/// A stream socket's check. `protocol`: `Some(IPPROTO_TCP)` for TCP, `None`
/// for a Unix socket.
fn check_stream(fd: RawFd, listening: bool, protocol: Option<i32>) -> Result<(), String> {
    let info = sys::socket_info(fd).map_err(|e| format!("it is not a socket ({e})"))?;
    if info.listening != listening {
        let is = if info.listening {
            "listening"
        } else {
            "not listening"
        };
        return Err(format!("the socket is {is}"));
    }
    match protocol {
        Some(p) if info.protocol != p => {
            return Err(format!("its protocol is {}", info.protocol));
        }
        None if sys::socket_domain(fd).map_err(|e| e.to_string())? != libc::AF_UNIX => {
            return Err("it is not a Unix socket".into());
        }
        None => {
            // A TCP socket is always a stream; a Unix one may be a
            // datagram or seqpacket socket.
            let ty = sys::socket_type(fd).map_err(|e| e.to_string())?;
            if ty != libc::SOCK_STREAM {
                return Err(format!(
                    "it is a Unix socket of type {ty}, not a stream (SOCK_STREAM)"
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A datagram socket's check: UDP (`udp`) or Unix.
fn check_datagram(fd: RawFd, udp: bool) -> Result<(), String> {
    let ty = sys::socket_type(fd).map_err(|e| format!("it is not a socket ({e})"))?;
    if ty != libc::SOCK_DGRAM {
        return Err(format!("its type is {ty}, not SOCK_DGRAM"));
    }
    let domain = sys::socket_domain(fd).map_err(|e| e.to_string())?;
    if udp {
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(format!("its domain is {domain}, not AF_INET(6)"));
        }
        let protocol = sys::socket_protocol(fd).map_err(|e| e.to_string())?;
        if protocol != libc::IPPROTO_UDP {
            return Err(format!("its protocol is {protocol}, not UDP"));
        }
    } else if domain != libc::AF_UNIX {
        return Err(format!("its domain is {domain}, not AF_UNIX"));
    }
    Ok(())
}

/// An adoption error. While an upgraded image is not ready, it rolls back
/// at once, where it happens, with every inherited descriptor still open;
/// otherwise it is just returned.
pub(crate) fn refuse(name: &str, fd: RawFd, wanted: &'static str, reason: String) -> Error {
    let err = Error::Adopt {
        name: name.to_owned(),
        fd,
        wanted,
        reason,
    };
    let _ = crate::rollback::trigger(&err.to_string());
    err
}

impl Drop for Inherited {
    fn drop(&mut self) {
        // Single descriptors and groups alike: an unclaimed group is every
        // one of its connections closed.
        if !self.is_empty() {
            let mut names: Vec<String> = self.fds.keys().cloned().collect();
            names.extend(
                self.groups
                    .iter()
                    .filter(|(_, members)| !members.is_empty())
                    .map(|(name, members)| format!("{name} (a group of {})", members.len())),
            );
            names.sort_unstable();
            tracing::warn!(
                count = self.len(),
                names = ?names,
                "closing inherited descriptors nobody claimed"
            );
        }
        // The descriptors close as the maps drop.
    }
}

#[cfg(test)]
mod tests {
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
    fn handoff_var_round_trips() {
        let v = HandoffVar {
            pid: 42,
            snapshot_fd: 5,
            binary_fd: 6,
            mode: Mode::Rollback,
            ..Default::default()
        };
        assert_eq!(v.format(), "1:pid=42:snapshot=5:binary=6:mode=rollback");
        assert_eq!(HandoffVar::parse(&v.format()).unwrap(), v);
        let full = HandoffVar {
            mode: Mode::Upgrade,
            holder: Some(43),
            exec: Some(8),
            nofile: Some(1024),
            script: Some(7),
            rescued: true,
            ..v
        };
        assert_eq!(HandoffVar::parse(&full.format()).unwrap(), full);
    }

    #[test]
    fn the_claim_variable_round_trips_and_refuses_garbage() {
        let v = ClaimVar {
            claim: 9,
            held_at: 123_456_789,
        };
        assert_eq!(v.format(), "1:claim=9:held=123456789");
        assert_eq!(ClaimVar::parse(&v.format()), Some(v));
        for bad in [
            "",
            "2:claim=9:held=1",
            "1:claim=9",
            "1:held=1",
            "1:claim=-1:held=1",
            "1:claim=x:held=1",
            "1:claim=9:held=1:more=2",
        ] {
            assert_eq!(ClaimVar::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_script_fd_that_names_the_snapshot_or_the_binary_is_refused() {
        let base = "1:pid=1:snapshot=3:binary=4:mode=upgrade";
        assert!(HandoffVar::parse(&format!("{base}:script=5")).is_ok());
        for fd in [3, 4] {
            let err = HandoffVar::parse(&format!("{base}:script={fd}")).unwrap_err();
            assert!(err.to_string().contains("script names"), "{err}");
        }
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
    fn a_rollback_keeps_the_old_images_text() {
        let text = "1:pid=42:snapshot=5:binary=6:mode=upgrade:holder=43:nofile=99:script=7";
        assert_eq!(
            HandoffVar::rollback_text(text),
            "1:pid=42:snapshot=5:binary=6:mode=rollback:holder=43:nofile=99"
        );
    }

    #[test]
    fn garbage_handoff_vars_are_refused_with_a_reason() {
        for (value, reason) in [
            ("", "format version 1"),
            ("garbage", "format version 1"),
            (
                "1:pid=x:snapshot=5:binary=6:mode=upgrade",
                "pid is not a non-negative number",
            ),
            (
                "1:pid=1:snapshot=-5:binary=6:mode=upgrade",
                "snapshot is not",
            ),
            ("1:pid=1:binary=6:mode=upgrade", "snapshot is missing"),
            (
                "1:pid=1:snapshot=5:binary=6:mode=sideways",
                "mode is neither",
            ),
            (
                "1:pid=1:snapshot=5:binary=6:mode=upgrade:extra=1",
                "unknown field extra",
            ),
            ("1:pid", "KEY=VALUE"),
            ("1:pid=1:snapshot=5:binary=5:mode=upgrade", "the same fd"),
        ] {
            let err = HandoffVar::parse(value).unwrap_err().to_string();
            assert!(err.contains(reason), "{value:?}: {err}");
            assert!(err.contains(HANDOFF_VAR), "{err}");
        }
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
}
