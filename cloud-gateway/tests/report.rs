//! `driftless-gateway --report` prints the device registry and dead letters.

use driftless_gateway::{GatewayStore, SqliteStore};

#[test]
fn report_lists_devices_and_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("gw.db");
    let mut store = SqliteStore::open(&db).expect("open");
    store.touch_device("acme", "rig-7", Some(0)).expect("touch");
    store.dead_letter("acme", "rig-9", "batch refused: input ends early", b"x").expect("dead letter");
    drop(store);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driftless-gateway"))
        .arg("--db")
        .arg(&db)
        .arg("--report")
        .output()
        .expect("run driftless-gateway");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tenant acme"), "{text}");
    assert!(text.contains("rig-7"), "{text}");
    assert!(text.contains("dead letter 1 from rig-9") && text.contains("input ends early"), "{text}");
}
