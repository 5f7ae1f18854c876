//! Fuzz target: the snapshot decoder must never panic, and whatever it
//! accepts must encode back to the same bytes (it read what a writer wrote).
//! Each input is tried as is, and with its checksum made right, so that the
//! fuzzer gets past the checksum to the lengths, strings and manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(snap) = copyover::snapshot::decode(data) {
        let again = copyover::snapshot::encode(&snap.header, &snap.manifest, snap.payload())
            .expect("a decoded snapshot encodes");
        assert_eq!(again, data, "decode then encode changed the bytes");
        let _ = snap.check_app("fuzz");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 24 {
        let mut fixed = data.to_vec();
        let crc = crc32fast::hash(&fixed[20..]);
        fixed[16..20].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});
