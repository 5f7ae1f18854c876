//! What the old image keeps: the [`Handoff`] builder, and the stream
//! socket types a group of connections may hold.

use super::*;

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
