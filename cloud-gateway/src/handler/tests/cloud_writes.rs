//! Writes made with plain SQL on the gateway's cloud tables: captured, merged by policy with
//! device writes, and sent to devices.

use super::cloud::*;
use super::*;

fn cloud_sql(store: &SqliteStore, sql: &str) {
    let conn = rusqlite::Connection::open(store.path()).expect("open");
    conn.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
    conn.execute_batch(sql).expect(sql);
}

/// Brings `device` up to date with everything logged for it.
fn catch_up(store: &mut SqliteStore, device: &mut Store, id: &str) {
    let page = store.changes_after("acme", id, 0, 1_000).expect("changes");
    device.apply(&page.batch).expect("apply");
}

fn device_rows(device: &Store, sql: &str) -> Vec<Vec<driftless_core::Value>> {
    device
        .read(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let n = stmt.column_count();
            Ok(stmt
                .query_map([], |r| (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<Vec<_>>>())?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .expect(sql)
}

#[test]
fn writes_made_with_plain_sql_on_the_cloud_tables_reach_devices_merged_by_policy() {
    use driftless_core::Value::{Integer, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(ORDERS).expect("install");
    let cfg = HandlerConfig::default();
    let (mut a, mut b) = (orders_device(&dir, "a.db"), orders_device(&dir, "b.db"));
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders VALUES ('o1', 'first', 10, 1.5)")?)).expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    assert_eq!(
        tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")),
        Vec::<String>::new(),
        "the gateway's writes are its own"
    );

    // The back office inserts a row and takes 2 from the counter; a device adds 3 meanwhile.
    cloud_sql(
        &store,
        "INSERT INTO \"acme.orders\"(id, note, qty) VALUES ('o2', 'from the office', 7);
         UPDATE \"acme.orders\" SET qty = qty - 2, note = 'office note' WHERE id = 'o1';",
    );
    a.write(|tx| Ok(tx.execute_batch("UPDATE orders SET qty = qty + 3, note = 'field note' WHERE id = 'o1'")?))
        .expect("write");
    // The device's batch arrives before the gateway noticed the cloud write: taken in first.
    ship(&mut store, &cfg, &mut a, "a");
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), Vec::<String>::new(), "already taken in");
    for (device, id) in [(&mut a, "a"), (&mut b, "b")] {
        catch_up(&mut store, device, id);
    }
    let q = "SELECT id, qty FROM orders ORDER BY id";
    let want = vec![vec![Text("o1".into()), Integer(11)], vec![Text("o2".into()), Integer(7)]];
    assert_eq!(device_rows(&a, q), want, "10 - 2 + 3, and the office's row");
    assert_eq!(device_rows(&b, q), want);
    assert_eq!(cloud_rows(&store, "SELECT id, qty FROM \"acme.orders\" ORDER BY id"), want);
    // The two notes were concurrent: a manual conflict, on devices and in the cloud alike.
    assert_eq!(a.conflicts().expect("conflicts").len(), 1);
    let review = cloud_rows(&store, "SELECT col, needs_review FROM \"acme._driftless_conflicts\"");
    assert_eq!(review, vec![vec![Text("note".into()), Integer(1)]]);

    // A delete with plain SQL, noticed without any device writing.
    cloud_sql(&store, "DELETE FROM \"acme.orders\" WHERE id = 'o2'");
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    catch_up(&mut store, &mut b, "b");
    assert_eq!(device_rows(&b, "SELECT id FROM orders"), vec![vec![Text("o1".into())]]);
    // Nothing is taken in twice.
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), Vec::<String>::new());
}

const PROSPECTS: &str = include_str!("../../../../examples/schemas/crm-erp-marketing.toml");

/// The CRM, a device of role `crm` following the prospects schema.
fn crm_device(dir: &tempfile::TempDir) -> Store {
    let opts = StoreOptions { role: "crm".into(), ..StoreOptions::default() };
    let mut crm = Store::open(dir.path().join("crm.db"), opts).expect("open");
    crm.follow_schema(1, PROSPECTS).expect("follow");
    crm
}

#[test]
fn a_plain_sql_writer_names_its_role_through_the_role_view_and_authority_decides() {
    use driftless_core::Value::Text;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(PROSPECTS).expect("install");
    let cfg = HandlerConfig::default();
    let mut crm = crm_device(&dir);
    crm.write(|tx| Ok(tx.execute_batch("INSERT INTO prospects VALUES ('p1', 'Dana', 'Engineer', 0, '1 Old St')")?))
        .expect("write");
    ship(&mut store, &cfg, &mut crm, "crm");
    // At once: the CRM edits both fields on its device, the ERP both with plain SQL as "erp",
    // and someone else the name with plain SQL under no role.
    crm.write(|tx| {
        Ok(tx.execute_batch("UPDATE prospects SET job_title = 'CTO', billing_address = 'crm says' WHERE id = 'p1'")?)
    })
    .expect("write");
    cloud_sql(
        &store,
        "UPDATE \"acme.prospects@erp\" SET job_title = 'erp says', billing_address = '42 Invoice Lane' WHERE id = 'p1';
         UPDATE \"acme.prospects\" SET name = 'Dana W.' WHERE id = 'p1';",
    );
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    ship(&mut store, &cfg, &mut crm, "crm");
    catch_up(&mut store, &mut crm, "crm");
    let q = "SELECT name, job_title, billing_address FROM prospects";
    let want = vec![vec![Text("Dana W.".into()), Text("CTO".into()), Text("42 Invoice Lane".into())]];
    assert_eq!(device_rows(&crm, q), want, "each field from its owner; the name had no rival");
    assert_eq!(cloud_rows(&store, "SELECT name, job_title, billing_address FROM \"acme.prospects\""), want);
    // An insert through the view fills the columns it leaves out from their defaults, and
    // deletes work too.
    cloud_sql(
        &store,
        "INSERT INTO \"acme.prospects@erp\"(id, name) VALUES ('p2', 'Lee'); DELETE FROM \"acme.prospects@erp\" WHERE id = 'p1';",
    );
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    catch_up(&mut store, &mut crm, "crm");
    assert_eq!(device_rows(&crm, "SELECT id, name FROM prospects"), vec![vec![Text("p2".into()), Text("Lee".into())]]);
}

#[test]
fn plain_sql_writes_count_like_a_device_and_write_only_what_they_changed() {
    use driftless_core::Value::{Integer, Null, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(ORDERS).expect("install");
    let cfg = HandlerConfig::default();
    let mut a = orders_device(&dir, "a.db");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id, qty) VALUES ('o1', 10)")?)).expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    // Version 2 adds a column no stored row has a value for.
    let v2 = format!("{ORDERS}[[table.column]]\nname = \"site\"\ntype = \"text\"\n");
    store.install_schema(&v2).expect("v2");
    a.follow_schema(2, &v2).expect("follow");
    // Made while the gateway was not looking, before the tables follow version 2: adding
    // the column must not undo it.
    cloud_sql(&store, "UPDATE \"acme.orders\" SET qty = 7 WHERE id = 'o1'");
    // The device sets the new column, offline; the office then touches only the counter.
    a.write(|tx| Ok(tx.execute_batch("UPDATE orders SET site = 'north' WHERE id = 'o1'")?)).expect("write");
    let mut b = orders_device(&dir, "b.db");
    b.follow_schema(2, &v2).expect("follow");
    b.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id) VALUES ('other')")?)).expect("write");
    ship(&mut store, &cfg, &mut b, "b");
    cloud_sql(&store, "UPDATE \"acme.orders\" SET qty = qty + 1 WHERE id = 'o1'");
    store.ingest_cloud_writes(NOW + 1).expect("ingest");
    ship(&mut store, &cfg, &mut a, "a");
    let q = "SELECT id, site, qty FROM \"acme.orders\" WHERE id = 'o1'";
    assert_eq!(cloud_rows(&store, q), vec![vec![Text("o1".into()), Text("north".into()), Integer(8)]]);
    // A delete takes the counter back to 0, so a new row counts from there.
    cloud_sql(&store, "DELETE FROM \"acme.orders\" WHERE id = 'o1'");
    store.ingest_cloud_writes(NOW + 2).expect("ingest");
    cloud_sql(&store, "INSERT INTO \"acme.orders\"(id, qty) VALUES ('o1', 1)");
    store.ingest_cloud_writes(NOW + 3).expect("ingest");
    catch_up(&mut store, &mut b, "b");
    let q = "SELECT id, site, qty FROM orders WHERE id = 'o1'";
    assert_eq!(device_rows(&b, q), vec![vec![Text("o1".into()), Null, Integer(1)]]);
    assert_eq!(cloud_rows(&store, &q.replace("FROM orders", "FROM \"acme.orders\"")), device_rows(&b, q));
}

#[test]
fn a_plain_sql_value_no_replica_could_take_is_refused_and_the_row_put_back() {
    use driftless_core::Value::{Integer, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(ORDERS).expect("install");
    let cfg = HandlerConfig::default();
    let mut a = orders_device(&dir, "a.db");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id, note, qty) VALUES ('o1', 'fine', 1)")?)).expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    // Text with a NUL: SQLite holds it, PostgreSQL and the schema do not. Another row's
    // write in the same intake goes through.
    cloud_sql(
        &store,
        "UPDATE \"acme.orders\" SET note = CAST(X'610062' AS TEXT) WHERE id = 'o1';
         INSERT INTO \"acme.orders\"(id, qty) VALUES ('o2', 5);",
    );
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    let q = "SELECT id, note, qty FROM \"acme.orders\" ORDER BY id";
    assert_eq!(
        cloud_rows(&store, q),
        vec![
            vec![Text("o1".into()), Text("fine".into()), Integer(1)],
            vec![Text("o2".into()), driftless_core::Value::Null, Integer(5)]
        ]
    );
    let refused = letters(&mut store);
    assert_eq!(refused.len(), 1);
    assert!(refused[0].reason.contains("NUL") && refused[0].device == "sql as cloud", "{:?}", refused[0]);
}

#[test]
fn any_sql_statement_form_is_captured_and_a_failed_one_hides_nothing() {
    use driftless_core::Value::{Integer, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(PROSPECTS).expect("install");
    let cfg = HandlerConfig::default();
    let mut crm = crm_device(&dir);
    crm.write(|tx| Ok(tx.execute_batch("INSERT INTO prospects(id, name) VALUES ('p1', 'Dana')")?)).expect("write");
    ship(&mut store, &cfg, &mut crm, "crm");
    // Upserts and explicit conflict clauses, twice before any intake.
    cloud_sql(
        &store,
        "INSERT INTO \"acme.prospects\"(id, name) VALUES ('p2', 'Lee') ON CONFLICT(id) DO UPDATE SET name = excluded.name;
         INSERT INTO \"acme.prospects\"(id, name) VALUES ('p2', 'Lee B.') ON CONFLICT(id) DO UPDATE SET name = excluded.name;
         UPDATE OR ABORT \"acme.prospects\" SET email_opt_in = 1 WHERE id = 'p1';",
    );
    // A statement through a view that fails half way (OR FAIL keeps its first row): the
    // writes after it are still captured.
    let conn = rusqlite::Connection::open(store.path()).expect("open");
    let failed = conn
        .execute_batch("INSERT OR FAIL INTO \"acme.prospects@erp\"(id, name) VALUES ('p3', 'Kim'), ('p1', 'clash')");
    assert!(failed.is_err());
    conn.execute_batch("UPDATE \"acme.prospects\" SET name = 'Dana W.' WHERE id = 'p1'").expect("update");
    drop(conn);
    store.ingest_cloud_writes(NOW).expect("ingest");
    catch_up(&mut store, &mut crm, "crm");
    let q = "SELECT id, name, email_opt_in FROM prospects ORDER BY id";
    let want = vec![
        vec![Text("p1".into()), Text("Dana W.".into()), Integer(1)],
        vec![Text("p2".into()), Text("Lee B.".into()), driftless_core::Value::Null],
        vec![Text("p3".into()), Text("Kim".into()), driftless_core::Value::Null],
    ];
    assert_eq!(device_rows(&crm, q), want);
    assert_eq!(cloud_rows(&store, &q.replace("FROM prospects", "FROM \"acme.prospects\"")), want);
}

#[test]
fn a_schema_version_that_declares_columns_in_another_order_keeps_pending_writes_right() {
    use driftless_core::Value::{Integer, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(ORDERS).expect("install");
    let cfg = HandlerConfig::default();
    let mut a = orders_device(&dir, "a.db");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id, note, qty) VALUES ('o1', 'n', 1)")?)).expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    // Written under version 1's column order, taken in under version 2's.
    cloud_sql(&store, "UPDATE \"acme.orders\" SET qty = 5 WHERE id = 'o1'");
    let v2 = ORDERS.replace(
        "[[table.column]]\nname = \"note\"\ntype = \"text\"\npolicy = \"manual\"\n",
        "[[table.column]]\nname = \"site\"\ntype = \"text\"\n[[table.column]]\nname = \"note\"\ntype = \"text\"\npolicy = \"manual\"\n",
    );
    assert_ne!(v2, ORDERS);
    store.install_schema(&v2).expect("v2");
    a.follow_schema(2, &v2).expect("follow");
    a.write(|tx| Ok(tx.execute_batch("INSERT INTO orders(id) VALUES ('o2')")?)).expect("write");
    ship(&mut store, &cfg, &mut a, "a");
    catch_up(&mut store, &mut a, "a");
    let q = "SELECT id, note, qty, site FROM orders ORDER BY id";
    let rows = device_rows(&a, q);
    assert_eq!(rows[0], vec![Text("o1".into()), Text("n".into()), Integer(5), driftless_core::Value::Null]);
    assert_eq!(cloud_rows(&store, &q.replace("FROM orders", "FROM \"acme.orders\"")), rows);
}

const MIXED: &str = r#"
roles = ["erp", "field"]

[[table]]
name = "jobs"
key = ["id"]
delete_policy = "update-wins"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "note"
type = "text"
[[table.column]]
name = "qty"
type = "integer"
policy = "counter"
[[table.column]]
name = "owner"
type = "text"
policy = "authority:erp>field"
"#;

/// Random writes from two devices and from plain SQL (plain and through the role view), in a
/// random order of shipping, intake and catching up: in the end every replica and the cloud
/// table show the same rows. Seeded, so a failure repeats.
#[test]
fn devices_and_plain_sql_writers_in_any_interleaving_converge() {
    // More with DRIFTLESS_MIXED_SEEDS=N (a long hunt); 12 on every run.
    let seeds: u64 = std::env::var("DRIFTLESS_MIXED_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(12);
    for seed in 1..=seeds {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store.install_schema(MIXED).expect("install");
        let cfg = HandlerConfig::default();
        let mut devices: Vec<(Store, &str)> = ["a", "b"]
            .into_iter()
            .map(|id| {
                let opts = StoreOptions { role: "field".into(), ..StoreOptions::default() };
                let mut s = Store::open(dir.path().join(format!("{id}.db")), opts).expect("open");
                s.follow_schema(1, MIXED).expect("follow");
                (s, id)
            })
            .collect();
        // The tenant's cloud tables are made with its first merge.
        let (first, id) = &mut devices[0];
        first.write(|tx| Ok(tx.execute_batch("INSERT INTO jobs(id) VALUES ('j0')")?)).expect("write");
        ship(&mut store, &cfg, first, id);
        let keys = ["j1", "j2", "j3"];
        for _ in 0..60 {
            let k = keys[next(3) as usize];
            let v = next(1000);
            match next(9) {
                0..=2 => {
                    let (d, _) = &mut devices[next(2) as usize];
                    let sql = match next(4) {
                        0 => format!(
                            "INSERT INTO jobs(id, note, qty, owner) VALUES ('{k}', 'd{v}', {v}, 'f{v}') ON CONFLICT(id) DO UPDATE SET note = excluded.note"
                        ),
                        1 => format!("UPDATE jobs SET qty = qty + {} WHERE id = '{k}'", v % 7),
                        2 => format!("UPDATE jobs SET owner = 'f{v}' WHERE id = '{k}'"),
                        _ => format!("DELETE FROM jobs WHERE id = '{k}'"),
                    };
                    d.write(|tx| Ok(tx.execute_batch(&sql)?)).expect("device write");
                }
                3..=5 => {
                    let table = if next(2) == 0 { "\"acme.jobs\"" } else { "\"acme.jobs@erp\"" };
                    let sql = match next(4) {
                        0 => format!(
                            "INSERT OR IGNORE INTO {table}(id, note, qty, owner) VALUES ('{k}', 's{v}', {v}, 'e{v}')"
                        ),
                        1 => format!("UPDATE {table} SET qty = qty - {} WHERE id = '{k}'", v % 5),
                        2 => format!("UPDATE {table} SET owner = 'e{v}', note = 's{v}' WHERE id = '{k}'"),
                        _ => format!("DELETE FROM {table} WHERE id = '{k}'"),
                    };
                    cloud_sql(&store, &sql);
                }
                6 => {
                    let (d, id) = &mut devices[next(2) as usize];
                    ship(&mut store, &cfg, d, id);
                }
                7 => {
                    store.ingest_cloud_writes(NOW).expect("ingest");
                }
                _ => {
                    let (d, id) = &mut devices[next(2) as usize];
                    catch_up(&mut store, d, id);
                }
            }
        }
        // Everything shipped, taken in and caught up.
        for _ in 0..2 {
            for (d, id) in devices.iter_mut() {
                ship(&mut store, &cfg, d, id);
            }
            store.ingest_cloud_writes(NOW).expect("ingest");
            for (d, id) in devices.iter_mut() {
                catch_up(&mut store, d, id);
            }
        }
        let q = "SELECT id, note, qty, owner FROM jobs ORDER BY id";
        let cloud = cloud_rows(&store, &q.replace("FROM jobs", "FROM \"acme.jobs\""));
        for (d, id) in &devices {
            assert_eq!(device_rows(d, q), cloud, "seed {seed}: device {id} and the cloud table differ");
        }
    }
}

#[test]
fn a_served_tenant_has_its_cloud_tables_before_any_device_syncs() {
    use driftless_core::Value::{Integer, Text};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(&dir);
    store.install_schema(ORDERS).expect("install");
    store.prepare_tenant("acme").expect("prepare");
    cloud_sql(&store, "INSERT INTO \"acme.orders\"(id, qty) VALUES ('o1', 3)");
    assert_eq!(tenants_of(&store.ingest_cloud_writes(NOW).expect("ingest")), vec!["acme".to_owned()]);
    let mut a = orders_device(&dir, "a.db");
    catch_up(&mut store, &mut a, "a");
    assert_eq!(device_rows(&a, "SELECT id, qty FROM orders"), vec![vec![Text("o1".into()), Integer(3)]]);
}
