//! The snapshot's bytes: the layout written down in the [module
//! docs](super), encoded and decoded in memory. Pure: no descriptor, no
//! system call, any input (this is what the fuzz target and the property
//! test cover).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{SnapshotError, encode_err, payload_err};
use super::manifest::Manifest;
use super::manifest::{decode_manifest, encode_manifest};

/// The eight bytes every snapshot starts with.
pub const MAGIC: [u8; 8] = *b"COPYOVER";
/// The newest snapshot format this build writes and reads: 2, whose
/// manifest may hold groups of connections. A snapshot without a group is
/// written as format 1, which builds from before groups read too; one with
/// a group is format 2, which they refuse by its number (in their probe, so
/// a downgrade is refused and says why).
pub const FORMAT_VERSION: u32 = 2;
/// The format of a snapshot whose manifest holds no group.
const FORMAT_NO_GROUPS: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 96;

/// The fixed header of a snapshot, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Snapshot format version (as written by this build: 2 with a group in
    /// the manifest, else 1; see [`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The application that wrote it.
    pub app: String,
    /// The application's state version.
    pub state_version: u32,
    /// The writer's version label (for logs: "from v1 to v2").
    pub writer_version: String,
    /// Upgrades since the first start, as seen by the writer.
    pub generation: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the upgrade was requested.
    pub requested_at_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the writer committed to the exec.
    pub committed_at_ns: u64,
    /// The binary path the next image is executed from.
    pub binary: PathBuf,
}

/// A decoded snapshot: header, manifest and the still-encoded state.
///
/// A snapshot read from a sealed memfd ([`read_sealed`]) is mapped, not
/// copied: its payload is read in place.
///
/// [`read_sealed`]: crate::snapshot::read_sealed
#[derive(Debug)]
pub struct Snapshot {
    /// The fixed header.
    pub header: Header,
    /// The descriptors that crossed the exec.
    pub manifest: Manifest,
    pub(super) payload: Payload,
}

/// The payload's bytes: a copy, or in place in a sealed memfd's read-only
/// mapping (the one thing this module knows of the memfd).
#[derive(Debug)]
pub(super) enum Payload {
    Owned(Vec<u8>),
    Mapped(crate::sys::Mapping, std::ops::Range<usize>),
}

impl Snapshot {
    /// The application's state, postcard-encoded; see [`decode_state`].
    pub fn payload(&self) -> &[u8] {
        match &self.payload {
            Payload::Owned(v) => v,
            Payload::Mapped(map, range) => &map[range.clone()],
        }
    }

    /// Checks that the snapshot belongs to `app`.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::WrongApp`] naming both applications.
    pub fn check_app(&self, app: &str) -> Result<(), SnapshotError> {
        if self.header.app == app {
            Ok(())
        } else {
            Err(SnapshotError::WrongApp {
                found: self.header.app.clone(),
                expected: app.to_owned(),
            })
        }
    }

    /// Total encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self.header.app.len()
            + self.header.writer_version.len()
            + self.header.binary.as_os_str().len()
            + encode_manifest(&self.manifest)
                .map(|v| v.len())
                .unwrap_or(0)
            + self.payload().len()
    }
}

/// Encodes a state value with postcard, the payload encoding.
///
/// # Errors
///
/// [`SnapshotError::Encode`] if serde refuses the value.
pub fn encode_state<T: Serialize + ?Sized>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_allocvec(state).map_err(encode_err)
}

/// Decodes a payload as `T`. Migrations use it to read an older state type.
///
/// # Errors
///
/// [`SnapshotError::Payload`] if the bytes are not a valid `T`.
pub fn decode_state<T: DeserializeOwned>(payload: &[u8], version: u32) -> Result<T, SnapshotError> {
    postcard::from_bytes(payload).map_err(payload_err(version))
}

/// Encodes a state value with postcard into a buffer of `capacity` bytes to
/// start with (the previous snapshot's size is a good guess): no regrowth
/// and re-copying of a large state.
///
/// # Errors
///
/// [`SnapshotError::Encode`] if serde refuses the value.
pub fn encode_state_with_capacity<T: Serialize + ?Sized>(
    state: &T,
    capacity: usize,
) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_extend(state, Vec::with_capacity(capacity)).map_err(encode_err)
}

/// Encodes a whole snapshot into one buffer (for files and tests).
///
/// # Errors
///
/// [`SnapshotError::Encode`] if the manifest cannot be encoded.
pub fn encode(
    header: &Header,
    manifest: &Manifest,
    payload: &[u8],
) -> Result<Vec<u8>, SnapshotError> {
    let prefix = encode_prefix(header, manifest)?;
    let mut bytes = finish_head(header, &prefix, payload)?;
    bytes.extend_from_slice(&prefix.bytes);
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// The bytes between the header and the payload (names, path, manifest),
/// and their lengths.
pub(super) struct Prefix {
    pub(super) bytes: Vec<u8>,
    lens: [usize; 4],
    /// The format these bytes need.
    format: u32,
}

pub(super) fn encode_prefix(header: &Header, manifest: &Manifest) -> Result<Prefix, SnapshotError> {
    let manifest_bytes = encode_manifest(manifest)?;
    let binary = header.binary.as_os_str().as_bytes();
    let lens = [
        header.app.len(),
        header.writer_version.len(),
        binary.len(),
        manifest_bytes.len(),
    ];
    let mut bytes = Vec::with_capacity(lens.iter().sum());
    bytes.extend_from_slice(header.app.as_bytes());
    bytes.extend_from_slice(header.writer_version.as_bytes());
    bytes.extend_from_slice(binary);
    bytes.extend_from_slice(&manifest_bytes);
    let format = if manifest.groups.is_empty() {
        FORMAT_NO_GROUPS
    } else {
        FORMAT_VERSION
    };
    Ok(Prefix {
        bytes,
        lens,
        format,
    })
}

/// The 96-byte header, with the checksum over it, the prefix and `payload`.
pub(super) fn finish_head(
    header: &Header,
    prefix: &Prefix,
    payload: &[u8],
) -> Result<Vec<u8>, SnapshotError> {
    let total = (HEADER_LEN + prefix.bytes.len() + payload.len()) as u64;
    let mut head = vec![0u8; HEADER_LEN];
    head[0..8].copy_from_slice(&MAGIC);
    head[8..12].copy_from_slice(&prefix.format.to_le_bytes());
    head[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    head[20..24].copy_from_slice(&header.state_version.to_le_bytes());
    head[24..32].copy_from_slice(&total.to_le_bytes());
    head[32..40].copy_from_slice(&header.generation.to_le_bytes());
    head[40..48].copy_from_slice(&header.requested_at_ns.to_le_bytes());
    head[48..56].copy_from_slice(&header.committed_at_ns.to_le_bytes());
    for (i, len) in prefix.lens.iter().enumerate() {
        head[56 + 4 * i..60 + 4 * i].copy_from_slice(&len32(*len)?.to_le_bytes());
    }
    head[72..80].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[20..]);
    crc.update(&prefix.bytes);
    crc.update(payload);
    head[16..20].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(head)
}

fn len32(n: usize) -> Result<u32, SnapshotError> {
    u32::try_from(n).map_err(|_| SnapshotError::Corrupt {
        what: format!("a field of {n} bytes is too long"),
    })
}

/// Decodes and checks a snapshot held in memory: magic, format version,
/// lengths, checksum, then the strings and the manifest.
///
/// # Errors
///
/// [`SnapshotError::Truncated`], [`SnapshotError::BadMagic`],
/// [`SnapshotError::UnknownFormat`], [`SnapshotError::Checksum`] or
/// [`SnapshotError::Corrupt`], saying which check failed. Never panics, on
/// any input.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let (header, manifest, payload) = parse(bytes)?;
    Ok(Snapshot {
        header,
        manifest,
        payload: Payload::Owned(bytes[payload].to_vec()),
    })
}

/// Checks a snapshot and decodes its header and manifest; returns where its
/// payload is.
pub(super) fn parse(
    bytes: &[u8],
) -> Result<(Header, Manifest, std::ops::Range<usize>), SnapshotError> {
    let found = bytes.len() as u64;
    if bytes.len() < 16 {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found,
        });
    }
    let magic: [u8; 8] = bytes[0..8].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let format_version = u32_at(bytes, 8);
    if !(FORMAT_NO_GROUPS..=FORMAT_VERSION).contains(&format_version) {
        return Err(SnapshotError::UnknownFormat {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found,
        });
    }
    let header_len = u32_at(bytes, 12) as usize;
    if header_len != HEADER_LEN {
        return Err(SnapshotError::Corrupt {
            what: format!("header length {header_len}, expected {HEADER_LEN}"),
        });
    }
    let total = u64_at(bytes, 24);
    if total > found {
        return Err(SnapshotError::Truncated {
            expected: total,
            found,
        });
    }
    if total < found {
        return Err(SnapshotError::Corrupt {
            what: format!(
                "{} trailing bytes after the announced length {total}",
                found - total
            ),
        });
    }
    let stored = u32_at(bytes, 16);
    let computed = crc32fast::hash(&bytes[20..]);
    if stored != computed {
        return Err(SnapshotError::Checksum {
            stored,
            found: computed,
        });
    }
    if bytes[80..HEADER_LEN].iter().any(|b| *b != 0) {
        return Err(SnapshotError::Corrupt {
            what: "the reserved header bytes are not zero".into(),
        });
    }
    let lens = [
        u32_at(bytes, 56) as u64,
        u32_at(bytes, 60) as u64,
        u32_at(bytes, 64) as u64,
        u32_at(bytes, 68) as u64,
        u64_at(bytes, 72),
    ];
    let sum = lens
        .iter()
        .try_fold(HEADER_LEN as u64, |acc, &l| acc.checked_add(l));
    if sum != Some(total) {
        return Err(SnapshotError::Corrupt {
            what: format!("field lengths {lens:?} do not add up to the total {total}"),
        });
    }
    let mut at = HEADER_LEN;
    let mut take = |n: u64| {
        let s = &bytes[at..at + n as usize];
        at += n as usize;
        s
    };
    let app = utf8(take(lens[0]), "application name")?;
    let writer_version = utf8(take(lens[1]), "writer version")?;
    let binary = PathBuf::from(OsString::from_vec(take(lens[2]).to_vec()));
    let manifest = decode_manifest(take(lens[3]), format_version >= FORMAT_VERSION)?;
    let payload = bytes.len() - lens[4] as usize..bytes.len();
    let header = Header {
        format_version,
        app,
        state_version: u32_at(bytes, 20),
        writer_version,
        generation: u64_at(bytes, 32),
        requested_at_ns: u64_at(bytes, 40),
        committed_at_ns: u64_at(bytes, 48),
        binary,
    };
    Ok((header, manifest, payload))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn utf8(b: &[u8], what: &str) -> Result<String, SnapshotError> {
    String::from_utf8(b.to_vec()).map_err(|_| SnapshotError::Corrupt {
        what: format!("the {what} is not UTF-8"),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::snapshot::manifest::{FdKind, GroupMember, ManifestEntry, ManifestGroup};

    /// A header, a manifest and a payload, for the tests of every part.
    pub(in crate::snapshot) fn sample() -> (Header, Manifest, Vec<u8>) {
        let header = Header {
            format_version: FORMAT_VERSION,
            app: "chat".into(),
            state_version: 3,
            writer_version: "v1".into(),
            generation: 7,
            requested_at_ns: 11,
            committed_at_ns: 22,
            binary: "/usr/bin/chat".into(),
        };
        let manifest = vec![
            ManifestEntry {
                name: "listener:telnet".into(),
                fd: 3,
                kind: FdKind::Listener,
            },
            ManifestEntry {
                name: "conn:1".into(),
                fd: 4,
                kind: FdKind::Stream,
            },
        ];
        let manifest = Manifest {
            entries: manifest,
            groups: vec![ManifestGroup {
                name: "conn".into(),
                members: vec![GroupMember { id: 7, fd: 5 }, GroupMember { id: 9, fd: 6 }],
            }],
        };
        let payload = encode_state(&("hello", 42u32)).unwrap();
        (header, manifest, payload)
    }

    #[test]
    fn a_snapshot_with_groups_is_format_2_and_one_without_is_format_1() {
        let (h, m, p) = sample();
        let with = encode(&h, &m, &p).unwrap();
        assert_eq!(u32_at(&with, 8), 2);
        assert_eq!(decode(&with).unwrap().manifest, m);
        let plain = Manifest::from(m.entries.clone());
        let without = encode(&h, &plain, &p).unwrap();
        assert_eq!(u32_at(&without, 8), 1);
        assert_eq!(decode(&without).unwrap().manifest, plain);
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let (h, m, p) = sample();
        let bytes = encode(&h, &m, &p).unwrap();
        for cut in [0, 10, 50, HEADER_LEN, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::BadMagic { .. }
                ),
                "cut {cut}: {err}"
            );
        }
        assert!(
            decode(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }

    #[test]
    fn corrupted_byte_fails_the_checksum() {
        let (h, m, p) = sample();
        let mut bytes = encode(&h, &m, &p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("corrupted"));
    }

    #[test]
    fn wrong_magic_and_unknown_format_are_refused() {
        let (h, m, p) = sample();
        let mut bytes = encode(&h, &m, &p).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode(&bytes).unwrap_err(),
            SnapshotError::BadMagic { .. }
        ));
        let mut bytes = encode(&h, &m, &p).unwrap();
        bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot format version 9 is not supported; this build reads formats 1 to 2"
        );
    }

    #[test]
    fn wrong_app_is_refused_with_both_names() {
        let (h, m, p) = sample();
        let snap = decode(&encode(&h, &m, &p).unwrap()).unwrap();
        assert!(snap.check_app("chat").is_ok());
        let err = snap.check_app("proxy").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the snapshot was written by app 'chat', but this binary is app 'proxy'"
        );
    }

    #[test]
    fn decoder_refuses_every_single_byte_change_and_never_panics() {
        let (h, m, p) = sample();
        let bytes = encode(&h, &m, &p).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                assert!(
                    decode(&b).is_err(),
                    "changing byte {i} by {flip:#x} was accepted"
                );
            }
        }
        // Random inputs, seeded so a failure is repeatable.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let mut b: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 % 64) >> 3) as u8)
                .collect();
            if round % 2 == 0 && b.len() >= 12 {
                b[..8].copy_from_slice(&MAGIC);
                b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            }
            let _ = decode(&b);
        }
    }
}
