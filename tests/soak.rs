//! The short soak: 100 clients chat with sequence numbers while the demo is
//! upgraded 50 times between two builds. Nothing may be lost, duplicated or
//! reordered, nobody disconnected, and fds, RSS and children must not grow.
//! (`scripts/soak` runs the long one: 1,000 clients, 1,000 upgrades.)

mod util;

use std::process::Command;

#[test]
fn fifty_upgrades_under_chat_lose_nothing() {
    let (a, b) = (util::labelled("v1"), util::labelled("v2"));
    let out = Command::new(env!("CARGO_BIN_EXE_copyover-bench"))
        .args([
            "soak",
            "--clients",
            "100",
            "--upgrades",
            "50",
            "--rate",
            "200",
            "--max-seconds",
            "120",
        ])
        .arg(&a)
        .arg(&b)
        .output()
        .expect("run copyover-bench soak");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{text}\n{err}");
    assert!(text.contains("50 upgrades"), "{text}");
    assert!(
        text.contains("lost: 0, duplicated or reordered: 0, clients disconnected: 0"),
        "{text}"
    );
    assert!(text.contains("soak: PASS"), "{text}");
}
