//! The getting-started guide (docs/getting-started.md) shows this crate as it is, and the crate does
//! what the guide says.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_guide_shows_these_sources_verbatim() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = read(&root.join("../../docs/getting-started.md"));
    let manifest = read(&root.join("Cargo.toml"));
    let deps = manifest.split("\n[dev-dependencies]").next().unwrap_or_default();
    for (name, text) in [
        ("Cargo.toml", deps.trim_end().to_owned()),
        ("src/lib.rs", read(&root.join("src/lib.rs"))),
        ("src/main.rs", read(&root.join("src/main.rs"))),
    ] {
        assert!(guide.contains(text.trim_end()), "docs/getting-started.md does not show {name} as it is");
    }
}

#[test]
fn the_transfer_confirms_and_the_refused_one_moves_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_getting-started"))
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the example");
    // Bounded: the example takes well under a second; a hang fails the test instead of blocking CI.
    let mut status = None;
    for _ in 0..600 {
        status = child.try_wait().expect("wait for the example");
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if status.is_none() {
        let _ = child.kill();
        panic!("the example did not finish within a minute");
    }
    let out = child.wait_with_output().expect("the example's output");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("transfer of 30: Confirmed"), "{out}");
    assert!(out.contains("bank A refused: "), "{out}");
    assert!(out.contains("transfer of 1000: Cancelled"), "{out}");
    assert!(out.contains("alice: Some(Account { balance: 70, outgoing: 0, incoming: 0 })"), "{out}");
    assert!(out.contains("bob:   Some(Account { balance: 30, outgoing: 0, incoming: 0 })"), "{out}");
}
