//! Writes one valid snapshot to the file named on the command line: the
//! seed of the snapshot decoder's fuzz corpus (`scripts/fuzz`).

use copyover::snapshot::{
    FORMAT_VERSION, FdKind, GroupMember, Header, Manifest, ManifestEntry, ManifestGroup, encode,
    encode_state,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: seed-snapshot FILE")?;
    let header = Header {
        format_version: FORMAT_VERSION,
        app: "fuzz".into(),
        state_version: 1,
        writer_version: "v1".into(),
        generation: 1,
        requested_at_ns: 1,
        committed_at_ns: 2,
        binary: "/usr/bin/server".into(),
    };
    let entries = vec![
        ManifestEntry {
            name: "listener".into(),
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
        entries,
        groups: vec![ManifestGroup {
            name: "conn".into(),
            members: vec![GroupMember { id: 2, fd: 5 }, GroupMember { id: 3, fd: 6 }],
        }],
    };
    let payload = encode_state(&("state", 42u64, vec![1u8, 2, 3]))?;
    std::fs::write(path, encode(&header, &manifest, &payload)?)?;
    Ok(())
}
