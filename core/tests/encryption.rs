//! Encryption at rest (the `sqlcipher` feature): a store opened with a key is unreadable
//! without it, and a wrong key is a clear error. A build without the feature refuses a key
//! rather than writing in the clear.

use driftless_core::{Error, Store, StoreOptions};

fn keyed(key: Option<&str>) -> StoreOptions {
    StoreOptions { key: key.map(str::to_owned), ..StoreOptions::default() }
}

#[cfg(not(feature = "sqlcipher"))]
#[test]
fn a_key_given_to_a_build_without_encryption_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Store::open(dir.path().join("d.db"), keyed(Some("secret"))).expect_err("no encryption here");
    assert!(matches!(err, Error::EncryptionUnavailable), "{err}");
}

#[cfg(feature = "sqlcipher")]
#[test]
fn an_encrypted_store_is_unreadable_without_its_key_and_a_wrong_key_is_a_clear_error() {
    use driftless_core::TableSpec;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.db");
    let marker = "recognisable-plaintext-7f3a9c";
    {
        let mut store = Store::open(&path, keyed(Some("right key"))).expect("open");
        store.write(|tx| Ok(tx.execute_batch("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)")?)).expect("table");
        store.track("notes", TableSpec::new()).expect("track");
        store.write(|tx| Ok(tx.execute("INSERT INTO notes VALUES ('n1', ?1)", [marker])?)).expect("write");
        let pending = store.outbox_batch(10).expect("outbox").expect("batch");
        assert_eq!(pending.batch.rows.len(), 1);
        store.read(|c| Ok(c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?)).ok();
    }
    // Neither the database nor its WAL holds the text.
    for file in std::fs::read_dir(dir.path()).expect("dir") {
        let bytes = std::fs::read(file.expect("entry").path()).expect("read");
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "plaintext on disk");
    }
    let wrong = Store::open(&path, keyed(Some("wrong key"))).expect_err("a wrong key");
    assert!(matches!(wrong, Error::WrongKey(_)), "{wrong}");
    let missing = Store::open(&path, keyed(None)).expect_err("no key");
    assert!(matches!(missing, Error::WrongKey(_)), "{missing}");
    let store = Store::open(&path, keyed(Some("right key"))).expect("reopen");
    let body: String =
        store.read(|c| Ok(c.query_row("SELECT body FROM notes WHERE id = 'n1'", [], |r| r.get(0))?)).expect("read");
    assert_eq!(body, marker);
}
