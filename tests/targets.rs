//! The process tests are targets of bins/Cargo.toml, listed one by one (the
//! library's package does not discover them): a file added to tests/ and not
//! listed there would never run. This test says which.

use std::path::Path;

#[test]
fn every_test_file_is_a_target_of_the_bins_package() {
    let bins = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(bins.join("Cargo.toml")).expect("read bins/Cargo.toml");
    let tests = bins.join("../tests");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&tests).expect("read tests/") {
        let name = entry.expect("a tests/ entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".rs") && !manifest.contains(&format!("path = \"../tests/{name}\"")) {
            missing.push(name.into_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "add a [[test]] for each to bins/Cargo.toml: {missing:?}"
    );
}
