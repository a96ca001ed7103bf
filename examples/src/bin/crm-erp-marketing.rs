//! Three business systems hold the same prospect and each trusts itself for different fields:
//! CRM owns job_title, marketing owns email_opt_in, ERP owns billing_address. CRM and marketing
//! are devices with their own databases; the ERP works on the cloud database with plain SQL.
//! All three edit every field at once; each field converges to its owner's value everywhere.
//!
//! Run: `cargo run -p driftless-examples --bin crm-erp-marketing`.

use driftless_examples::{Device, lines, print_conflicts, start_cloud, wait_converged};

const SCHEMA: &str = include_str!("../../schemas/crm-erp-marketing.toml");
const SHOW: &str = "SELECT id, name, job_title, email_opt_in, billing_address FROM prospects";

/// The ERP is no device: it works on the cloud database itself, with plain SQL, naming its
/// role by writing through the `@erp` view of the table.
struct Erp {
    db: std::path::PathBuf,
}

impl Erp {
    fn sql(&self, sql: &str) -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(&self.db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(conn.execute_batch(sql)?)
    }

    fn row(&self) -> anyhow::Result<String> {
        let rows = lines(&self.db, &SHOW.replace("FROM prospects", "FROM \"demo.prospects\""))?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (broker, stop_cloud) = start_cloud(dir.path(), SCHEMA).await?;
    let erp = Erp { db: dir.path().join("gateway.db") };
    let mut systems =
        vec![Device::create(dir.path(), "crm", "crm")?, Device::create(dir.path(), "marketing", "marketing")?];
    for s in &mut systems {
        s.go_online(&broker).await?;
    }
    systems[0].sql("INSERT INTO prospects VALUES ('p-1001', 'Dana Whitfield', 'Engineer', 0, '1 Old Street')")?;
    wait_converged(&systems, SHOW, |rows| rows.len() == 1).await?;
    println!("CRM and marketing sync as devices; the ERP reads and writes the cloud database with SQL.");
    println!("every system starts with: {}", systems[0].lines(SHOW)?[0]);

    // Each system edits every field at once: the devices while cut off, the ERP in the cloud.
    for s in &mut systems {
        s.go_offline().await;
    }
    systems[0].sql(
        "UPDATE prospects SET job_title = 'Head of Maintenance', email_opt_in = 0, billing_address = '9 CRM Road'",
    )?;
    systems[1]
        .sql("UPDATE prospects SET job_title = 'Decision maker', email_opt_in = 1, billing_address = 'unknown'")?;
    erp.sql(
        "UPDATE \"demo.prospects@erp\"
            SET job_title = 'Buyer', email_opt_in = 0, billing_address = '42 Invoice Lane, Leeds' WHERE id = 'p-1001'",
    )?;
    println!("\nconcurrent edits:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    println!("  {:<9} {}   (sqlite3 gateway.db 'UPDATE \"demo.prospects@erp\" SET ...')", "erp", erp.row()?);
    for s in &mut systems {
        s.go_online(&broker).await?;
    }
    let intended = "job_title=\"Head of Maintenance\"  email_opt_in=1  billing_address=\"42 Invoice Lane, Leeds\"";
    wait_converged(&systems, SHOW, |rows| rows.len() == 1 && rows[0].contains(intended)).await?;
    let start = std::time::Instant::now();
    while !erp.row()?.contains(intended) {
        anyhow::ensure!(start.elapsed() < std::time::Duration::from_secs(30), "the cloud table did not converge");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!("\nconverged, each field from the system that owns it:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    println!("  {:<9} {}", "erp", erp.row()?);
    println!("\nconflict log (resolved by the trusted-source policy):");
    print_conflicts(&systems[0].with_store(|s| s.conflicts()).await?);
    for s in &mut systems {
        s.go_offline().await;
    }
    let _ = stop_cloud.send(());
    Ok(())
}
