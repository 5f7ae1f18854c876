//! What the new image gets: the [`Inherited`] set, claimed and checked,
//! and its typed takes.

use super::*;

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
    pub(super) fds: HashMap<String, (OwnedFd, FdKind)>,
    /// Groups of connections ([`Handoff::streams`]), by name.
    pub(super) groups: HashMap<String, Vec<(u64, OwnedFd)>>,
    /// What a failed check does before its error is returned: the owner's
    /// answer to it. `boot` sets the rollback here after an upgrade (it
    /// does not return while the image is not ready); the set itself knows
    /// nothing of rollbacks.
    pub(crate) on_failed_check: Option<fn(&Error)>,
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
        // Every number is claimed once per image (see `sys::Claims`): a
        // number used twice, or one the handoff itself uses (snapshot,
        // binary, exec record: claimed before), fails its claim.
        let claims = claims.inherit_all(manifest.fds());
        Self::build(manifest, claims, tolerant)
    }

    /// The descriptors a migration's newcomer received (see
    /// [`crate::migration`]), one for each fd of the manifest in its order
    /// ([`Manifest::fds`]): owned from the start, under the numbers this
    /// process got, with the manifest's names and kinds.
    pub(crate) fn received(manifest: Manifest, fds: Vec<OwnedFd>) -> Result<Self, Error> {
        Self::build(manifest, fds.into_iter().map(Ok).collect(), false)
    }

    /// The set from the manifest and its fds, one for each of
    /// [`Manifest::fds`] in order (a missing one counts as not open).
    fn build(
        manifest: Manifest,
        claims: Vec<std::io::Result<OwnedFd>>,
        tolerant: bool,
    ) -> Result<Self, Error> {
        use std::collections::hash_map::Entry;
        let mut claims = claims.into_iter();
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
            on_failed_check: None,
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
        let on_failed_check = self.on_failed_check;
        let fail = |reason: String| failed(on_failed_check, refuse(name, raw, "a region", reason));
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
                one.on_failed_check = self.on_failed_check;
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
            one.on_failed_check = self.on_failed_check;
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
        let fail = |reason: String| {
            failed(
                self.on_failed_check,
                refuse(name, fd, want.wanted(), reason),
            )
        };
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

/// A failed check's error, after the owner's answer to it (see
/// `Inherited::on_failed_check`).
pub(crate) fn failed(on_failed_check: Option<fn(&Error)>, err: Error) -> Error {
    if let Some(answer) = on_failed_check {
        answer(&err);
    }
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
