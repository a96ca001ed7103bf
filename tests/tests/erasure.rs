//! What a delete erases leaves every replica's files: a row holding a recognizable value is
//! synced, deleted and synced again through the real `driftless-gateway` and
//! `driftless-agent` binaries over a real broker; once each database is checkpointed, no
//! file in the directory holds any piece of the value (the databases, their logs, the
//! processes' own logs).

use std::path::Path;
use std::time::Duration;

use driftless_tests::procs::*;
use driftless_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// Bytes no compressor shrinks, so a copy of them anywhere is a copy verbatim.
fn secret() -> Vec<u8> {
    let mut x: u64 = std::time::UNIX_EPOCH.elapsed().map_or(7, |d| d.as_nanos() as u64) | 1;
    (0..6_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The files in `dir` holding any 24-byte piece of `secret` (a piece fits in one page).
fn files_holding(dir: &Path, secret: &[u8]) -> Vec<String> {
    let pieces: Vec<&[u8]> = (0..secret.len() - 24).step_by(500).map(|i| &secret[i..i + 24]).collect();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        if pieces.iter().any(|p| bytes.windows(p.len()).any(|w| w == *p)) {
            found.push(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        }
    }
    found.sort();
    found
}

/// Copies each database's write-ahead log into it and truncates the log, with the
/// processes still running.
fn checkpoint(dbs: &[&Path]) {
    for db in dbs {
        let conn = rusqlite::Connection::open(db).expect("open");
        conn.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).expect("checkpoint");
        assert_eq!(busy, 0, "{} could not be checkpointed", db.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_leaves_no_bytes_in_any_replicas_files() {
    for broker in brokers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = tenant("erasure");
        let gw_db = dir.path().join("gw.db");
        let _gw = gateway(&broker, &tenant, &gw_db, &[]);
        let (a, b) = (cli_device(dir.path(), "a"), cli_device(dir.path(), "b"));
        let _agent_a = agent(&a, &broker, &tenant, "tab-a");
        let _agent_b = agent(&b, &broker, &tenant, "tab-b");
        let secret = secret();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        // The app's own connection sets secure_delete, as docs/SECURITY.md asks of it.
        exec(&a, &format!("PRAGMA secure_delete = ON; INSERT INTO inspections(id, notes) VALUES ('d1', X'{hex}')"));
        eventually("b has the row", WAIT, || rows(&b, "SELECT id FROM inspections").len() == 1).await;
        eventually("a's outbox is drained", WAIT, || pending(&a) == 0).await;
        checkpoint(&[&a, &b, &gw_db]);
        // The control: every replica holds the value where the scan looks.
        assert_eq!(files_holding(dir.path(), &secret), vec!["a.db", "b.db", "gw.db"]);

        exec(&a, "PRAGMA secure_delete = ON; DELETE FROM inspections WHERE id = 'd1'");
        eventually("b deleted the row", WAIT, || rows(&b, "SELECT id FROM inspections").is_empty()).await;
        eventually("a's outbox is drained", WAIT, || pending(&a) == 0).await;
        checkpoint(&[&a, &b, &gw_db]);
        assert_eq!(files_holding(dir.path(), &secret), Vec::<String>::new());
    }
}
