//! The manifest: which descriptors cross the exec, under which names and
//! of which kind, and its bytes in a snapshot. Pure, like the rest of the
//! format.

use serde::{Deserialize, Serialize};

use super::error::{SnapshotError, encode_err};

/// What kind of descriptor a manifest entry names; checked on adoption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FdKind {
    /// A listening stream socket (`SO_ACCEPTCONN` set).
    Listener,
    /// A connected stream socket.
    Stream,
    /// Any other descriptor (a file, a pipe, a datagram socket, ...).
    Other,
    /// The memfd of a [`Region`](crate::Region).
    Region,
    /// A datagram socket (UDP, Unix datagram). Added after `Region`, so the
    /// encoding of the other kinds is unchanged; an older binary refuses a
    /// manifest that holds one (in its probe).
    Datagram,
}

/// One descriptor kept across the exec: its name, number and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// The application's name for it, such as `listener:telnet` or `conn:17`.
    pub name: String,
    /// The fd number, the same in the old and the new image.
    pub fd: i32,
    /// What it must be when adopted.
    pub kind: FdKind,
}

/// Connected stream sockets kept as one group ([`Handoff::streams`]): one
/// name for all, and each member's id (the application's number for the
/// connection) and fd.
///
/// [`Handoff::streams`]: crate::Handoff::streams
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestGroup {
    /// The group's name, such as `conn`.
    pub name: String,
    /// Each member's id and fd number, in the order they were kept.
    pub members: Vec<GroupMember>,
}

/// One connection of a [`ManifestGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The application's id for it.
    pub id: u64,
    /// The fd number, the same in the old and the new image.
    pub fd: i32,
}

/// Every descriptor a snapshot hands over: single entries, and groups of
/// connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Descriptors kept one by one, each under its own name.
    pub entries: Vec<ManifestEntry>,
    /// Groups of connections, each under one name.
    pub groups: Vec<ManifestGroup>,
}

impl Manifest {
    /// Every fd number the manifest names, entries first.
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        let members = self.groups.iter().flat_map(|g| g.members.iter());
        self.entries
            .iter()
            .map(|e| e.fd)
            .chain(members.map(|m| m.fd))
    }

    /// The names `fd` is kept under (`GROUP:ID` for a group's member):
    /// one, unless the manifest is inconsistent.
    pub fn names_of(&self, fd: i32) -> impl Iterator<Item = String> + '_ {
        let entries = self.entries.iter().filter(move |e| e.fd == fd);
        let members = self.groups.iter().flat_map(move |g| {
            let of = g.members.iter().filter(move |m| m.fd == fd);
            of.map(move |m| format!("{}:{}", g.name, m.id))
        });
        entries.map(|e| e.name.clone()).chain(members)
    }

    /// How many descriptors it names.
    pub fn len(&self) -> usize {
        self.entries.len() + self.groups.iter().map(|g| g.members.len()).sum::<usize>()
    }

    /// Whether it names none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<ManifestEntry>> for Manifest {
    fn from(entries: Vec<ManifestEntry>) -> Self {
        Manifest {
            entries,
            groups: Vec::new(),
        }
    }
}

/// An entry as the manifest's bytes hold it. A group is an entry of kind
/// `StreamGroup` and fd -1, its members follow the entry list: a kind a
/// reader from before groups does not know, so that such a reader refuses
/// the manifest (in its probe) instead of losing the members.
#[derive(Serialize, Deserialize)]
struct WireEntry<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    fd: i32,
    kind: WireKind,
}

/// [`FdKind`] on the wire, in the same order, and the group marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum WireKind {
    Listener,
    Stream,
    Other,
    Region,
    Datagram,
    StreamGroup,
}

impl From<FdKind> for WireKind {
    fn from(k: FdKind) -> Self {
        match k {
            FdKind::Listener => WireKind::Listener,
            FdKind::Stream => WireKind::Stream,
            FdKind::Other => WireKind::Other,
            FdKind::Region => WireKind::Region,
            FdKind::Datagram => WireKind::Datagram,
        }
    }
}

/// The manifest's bytes: the entries and a marker per group (one postcard
/// sequence), then each group's members (a postcard sequence each).
pub(super) fn encode_manifest(m: &Manifest) -> Result<Vec<u8>, SnapshotError> {
    struct Entries<'a>(&'a Manifest);
    impl Serialize for Entries<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let entries = self.0.entries.iter().map(|e| WireEntry {
                name: e.name.as_str().into(),
                fd: e.fd,
                kind: e.kind.into(),
            });
            let markers = self.0.groups.iter().map(|g| WireEntry {
                name: g.name.as_str().into(),
                fd: -1,
                kind: WireKind::StreamGroup,
            });
            s.collect_seq(entries.chain(markers))
        }
    }
    let members: usize = m.groups.iter().map(|g| g.members.len()).sum();
    let guess = 16 * m.entries.len() + 8 * members + 16;
    let mut bytes = extend(Vec::with_capacity(guess), &Entries(m))?;
    for g in &m.groups {
        bytes = extend(bytes, &g.members)?;
    }
    Ok(bytes)
}

fn extend<T: Serialize + ?Sized>(into: Vec<u8>, value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_extend(value, into).map_err(encode_err)
}

/// Reads what [`encode_manifest`] wrote, strictly, so that what decodes
/// encodes back to the same bytes: every byte used, the entries before the
/// group markers, no negative fd but the markers' -1, and no group unless
/// `groups` (a snapshot of the format that has them).
pub(super) fn decode_manifest(bytes: &[u8], groups: bool) -> Result<Manifest, SnapshotError> {
    let corrupt = |what: String| SnapshotError::Corrupt { what };
    let (wire, mut rest): (Vec<WireEntry<'_>>, _) = postcard::take_from_bytes(bytes)
        .map_err(|e| corrupt(format!("the fd manifest does not decode: {e}")))?;
    let mut m = Manifest::default();
    for w in wire {
        let kind = match w.kind {
            WireKind::Listener => FdKind::Listener,
            WireKind::Stream => FdKind::Stream,
            WireKind::Other => FdKind::Other,
            WireKind::Region => FdKind::Region,
            WireKind::Datagram => FdKind::Datagram,
            WireKind::StreamGroup => {
                if !groups {
                    return Err(corrupt(format!(
                        "group '{}' in a snapshot of the format without groups",
                        w.name
                    )));
                }
                if w.fd != -1 {
                    return Err(corrupt(format!(
                        "group '{}' has fd {}, not -1",
                        w.name, w.fd
                    )));
                }
                let (members, after): (Vec<GroupMember>, _) = postcard::take_from_bytes(rest)
                    .map_err(|e| {
                        corrupt(format!(
                            "the members of group '{}' do not decode: {e}",
                            w.name
                        ))
                    })?;
                if let Some(bad) = members.iter().find(|x| x.fd < 0) {
                    return Err(corrupt(format!(
                        "member {} of group '{}' has fd {}",
                        bad.id, w.name, bad.fd
                    )));
                }
                rest = after;
                m.groups.push(ManifestGroup {
                    name: w.name.into_owned(),
                    members,
                });
                continue;
            }
        };
        if !m.groups.is_empty() {
            return Err(corrupt(format!("entry '{}' after a group", w.name)));
        }
        if w.fd < 0 {
            return Err(corrupt(format!("entry '{}' has fd {}", w.name, w.fd)));
        }
        m.entries.push(ManifestEntry {
            name: w.name.into_owned(),
            fd: w.fd,
            kind,
        });
    }
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} stray bytes after the fd manifest",
            rest.len()
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_decodes_only_as_it_is_encoded() {
        let wire = |entries: &[(&str, i32, WireKind)]| {
            let entries: Vec<WireEntry<'_>> = entries
                .iter()
                .map(|(name, fd, kind)| WireEntry {
                    name: (*name).into(),
                    fd: *fd,
                    kind: *kind,
                })
                .collect();
            postcard::to_allocvec(&entries).unwrap()
        };
        let members = |m: &[(u64, i32)]| {
            let m: Vec<GroupMember> = m.iter().map(|&(id, fd)| GroupMember { id, fd }).collect();
            postcard::to_allocvec(&m).unwrap()
        };
        let refused = |bytes: Vec<u8>, groups: bool, why: &str| {
            let err = decode_manifest(&bytes, groups).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        // What encode_manifest writes decodes.
        let mut ok = wire(&[
            ("l", 3, WireKind::Listener),
            ("conn", -1, WireKind::StreamGroup),
        ]);
        ok.extend(members(&[(7, 4)]));
        assert_eq!(
            decode_manifest(&ok, true).unwrap().groups[0].members[0].fd,
            4
        );
        refused(ok.clone(), false, "format without groups");
        // An entry after a group marker would not encode back the same.
        let mut bytes = wire(&[
            ("conn", -1, WireKind::StreamGroup),
            ("l", 3, WireKind::Listener),
        ]);
        bytes.extend(members(&[(7, 4)]));
        refused(bytes, true, "after a group");
        // Negative descriptors, but the markers' -1.
        refused(wire(&[("l", -1, WireKind::Listener)]), true, "has fd -1");
        let mut bytes = wire(&[("conn", -1, WireKind::StreamGroup)]);
        bytes.extend(members(&[(7, -3)]));
        refused(bytes, true, "has fd -3");
        let mut bytes = wire(&[("conn", 5, WireKind::StreamGroup)]);
        bytes.extend(members(&[(7, 4)]));
        refused(bytes, true, "not -1");
        // Members missing, or bytes left over.
        refused(
            wire(&[("conn", -1, WireKind::StreamGroup)]),
            true,
            "do not decode",
        );
        let mut bytes = ok;
        bytes.push(0);
        refused(bytes, true, "stray bytes");
    }
}
