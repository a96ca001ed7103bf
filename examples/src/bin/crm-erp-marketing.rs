//! Three business systems hold the same prospect and each trusts itself for different fields:
//! CRM owns job_title, marketing owns email_opt_in, ERP owns billing_address. CRM and marketing
//! are devices with their own databases; the ERP works on the cloud database with plain SQL.
//! All three edit every field at once; each field converges to its owner's value everywhere.
//!
//! Run: `cargo run -p driftless-examples --bin crm-erp-marketing` (the cloud database is the
//! gateway's SQLite file), or with `-- --store postgres://USER@HOST/DB` (the cloud database is
//! PostgreSQL: the tenant's tables are in schema `demo`; the database should be empty).

use driftless_examples::{Device, lines, print_conflicts, start_cloud, start_cloud_on_postgres, wait_converged};

const SCHEMA: &str = include_str!("../../schemas/crm-erp-marketing.toml");
const SHOW: &str = "SELECT id, name, job_title, email_opt_in, billing_address FROM prospects";

/// The ERP is no device: it works on the cloud database itself, with plain SQL, naming its
/// role as the database lets it (SQLite: writing through the `@erp` view of the table;
/// PostgreSQL: `SET LOCAL driftless.role = 'erp'`).
enum Erp {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Erp {
    /// Moves every prospect's fields as the ERP sees them.
    async fn update(&self, set: &str) -> anyhow::Result<()> {
        match self {
            Erp::Sqlite(db) => {
                let conn = rusqlite::Connection::open(db)?;
                conn.busy_timeout(std::time::Duration::from_secs(10))?;
                Ok(conn.execute_batch(&format!("UPDATE \"demo.prospects@erp\" SET {set}"))?)
            }
            Erp::Postgres(url) => {
                let sql = format!("BEGIN; SET LOCAL driftless.role = 'erp'; UPDATE demo.prospects SET {set}; COMMIT;");
                let url = url.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    Ok(postgres::Client::connect(&url, postgres::NoTls)?.batch_execute(&sql)?)
                })
                .await?
            }
        }
    }

    async fn row(&self) -> anyhow::Result<String> {
        match self {
            Erp::Sqlite(db) => {
                let rows = lines(db, &SHOW.replace("FROM prospects", "FROM \"demo.prospects\""))?;
                Ok(rows.into_iter().next().unwrap_or_default())
            }
            Erp::Postgres(url) => {
                let url = url.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
                    let row = c.query_opt(&SHOW.replace("FROM prospects", "FROM demo.prospects"), &[])?;
                    Ok(row.map_or(String::new(), |r| {
                        let text = |i: usize| r.get::<_, Option<String>>(i).map_or("NULL".into(), |t| format!("{t:?}"));
                        let int = |i: usize| r.get::<_, Option<i64>>(i).map_or("NULL".into(), |v| v.to_string());
                        format!(
                            "id={}  name={}  job_title={}  email_opt_in={}  billing_address={}",
                            text(0),
                            text(1),
                            text(2),
                            int(3),
                            text(4)
                        )
                    }))
                })
                .await?
            }
        }
    }
}

/// `--store URL` from the command line, if given.
fn store_flag() -> anyhow::Result<Option<String>> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(None),
        (Some("--store"), Some(url)) => Ok(Some(url)),
        _ => anyhow::bail!("usage: crm-erp-marketing [--store postgres://USER@HOST/DB]"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (broker, stop_cloud, erp) = match store_flag()? {
        Some(url) => {
            // The story starts from nothing: in a database that holds an earlier run, the
            // edits below would no longer be concurrent with what they meet.
            let probe = url.clone();
            let used = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
                let mut c = postgres::Client::connect(&probe, postgres::NoTls)?;
                Ok(c.query_one("SELECT to_regnamespace('demo') IS NOT NULL", &[])?.get(0))
            })
            .await??;
            anyhow::ensure!(!used, "{url} holds an earlier run (schema demo): give an empty database");
            let (broker, stop) = start_cloud_on_postgres(&url, SCHEMA).await?;
            (broker, stop, Erp::Postgres(url))
        }
        None => {
            let (broker, stop) = start_cloud(dir.path(), SCHEMA).await?;
            (broker, stop, Erp::Sqlite(dir.path().join("gateway.db")))
        }
    };
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
    erp.update("job_title = 'Buyer', email_opt_in = 0, billing_address = '42 Invoice Lane, Leeds' WHERE id = 'p-1001'")
        .await?;
    println!("\nconcurrent edits:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    let how = match &erp {
        Erp::Sqlite(_) => "sqlite3 gateway.db 'UPDATE \"demo.prospects@erp\" SET ...'",
        Erp::Postgres(_) => "psql: BEGIN; SET LOCAL driftless.role = 'erp'; UPDATE demo.prospects SET ...",
    };
    println!("  {:<9} {}   ({how})", "erp", erp.row().await?);
    for s in &mut systems {
        s.go_online(&broker).await?;
    }
    let intended = "job_title=\"Head of Maintenance\"  email_opt_in=1  billing_address=\"42 Invoice Lane, Leeds\"";
    wait_converged(&systems, SHOW, |rows| rows.len() == 1 && rows[0].contains(intended)).await?;
    let start = std::time::Instant::now();
    while !erp.row().await?.contains(intended) {
        anyhow::ensure!(start.elapsed() < std::time::Duration::from_secs(30), "the cloud table did not converge");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!("\nconverged, each field from the system that owns it:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    println!("  {:<9} {}", "erp", erp.row().await?);
    println!("\nconflict log (resolved by the trusted-source policy):");
    print_conflicts(&systems[0].with_store(|s| s.conflicts()).await?);
    for s in &mut systems {
        s.go_offline().await;
    }
    let _ = stop_cloud.send(());
    Ok(())
}
