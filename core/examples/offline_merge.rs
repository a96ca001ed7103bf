//! Two field devices edit the same inspection while offline, then exchange their changes
//! through the binary wire format and converge. Run with
//! `cargo run -p driftless-core --example offline_merge`.

use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::{ColumnPolicy, Store, StoreOptions, TableSpec};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS inspections (
    id TEXT PRIMARY KEY, site TEXT, status TEXT, notes TEXT, stock INTEGER NOT NULL DEFAULT 0)";

fn device(dir: &std::path::Path, name: &str) -> anyhow::Result<Store> {
    let mut store = Store::open(dir.join(format!("{name}.db")), StoreOptions::default())?;
    store.write(|tx| Ok(tx.execute_batch(SCHEMA)?))?;
    let spec = TableSpec::new().column("stock", ColumnPolicy::Counter).column("notes", ColumnPolicy::Manual);
    store.track("inspections", spec)?;
    Ok(store)
}

/// Sends everything `from` has not yet shipped to `to`; returns the bytes on the wire.
fn ship(from: &mut Store, to: &mut Store) -> anyhow::Result<usize> {
    let mut bytes_total = 0;
    while let Some(out) = from.outbox_batch(500)? {
        let bytes = encode_batch(&out.batch, EncodeOptions::default());
        bytes_total += bytes.len();
        to.apply(&decode_batch(&bytes, &Limits::default(), &Dictionaries::default())?)?;
        from.ack(out.first_seq, out.last_seq)?;
    }
    Ok(bytes_total)
}

fn show(name: &str, store: &Store) -> anyhow::Result<()> {
    let rows = store.read(|c| {
        let mut stmt = c.prepare("SELECT id, site, status, notes, stock FROM inspections ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(format!(
                "{} site={} status={} notes={:?} stock={}",
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                r.get::<_, i64>(4)?
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })?;
    for row in rows {
        println!("  {name}: {row}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut a, mut b) = (device(dir.path(), "tablet-a")?, device(dir.path(), "tablet-b")?);
    a.write(|tx| Ok(tx.execute("INSERT INTO inspections VALUES ('pump-7', 'north', 'open', '', 10)", [])?))?;
    ship(&mut a, &mut b)?;
    println!("both devices start with:");
    show("a", &a)?;

    println!("\noffline: a marks it done and uses 3 parts; b edits the notes and uses 2 parts");
    a.write(|tx| {
        Ok(tx.execute_batch("UPDATE inspections SET status = 'done', notes = 'valve replaced', stock = stock - 3")?)
    })?;
    b.write(|tx| Ok(tx.execute_batch("UPDATE inspections SET notes = 'leak at flange', stock = stock - 2")?))?;

    let wire = ship(&mut a, &mut b)? + ship(&mut b, &mut a)?;
    println!("\nback online ({wire} bytes on the wire), both converge:");
    show("a", &a)?;
    show("b", &b)?;
    for c in a.conflicts()? {
        let shown = c.record.winner.value.as_ref();
        let others: Vec<_> = c.record.losers.iter().filter_map(|l| l.value.as_ref()).collect();
        println!("\nconflict on {:?}: showing {shown:?}, also written concurrently: {others:?}", c.record.column());
    }
    a.resolve_conflict("inspections", &["pump-7".into()], "notes", "valve replaced; flange leak fixed".into())?;
    ship(&mut a, &mut b)?;
    println!("\nafter a resolves the notes conflict:");
    show("b", &b)?;
    Ok(())
}
