//! Three business systems hold the same prospect and each trusts itself for different fields:
//! CRM owns job_title, marketing owns email_opt_in, ERP owns billing_address. All three edit
//! every field at once; each field converges to its owner's value everywhere.
//!
//! Run: `cargo run -p driftless-examples --bin crm-erp-marketing`.

use driftless_examples::{Device, print_conflicts, start_cloud, wait_converged};

const SCHEMA: &str = include_str!("../../schemas/crm-erp-marketing.toml");
const SHOW: &str = "SELECT id, name, job_title, email_opt_in, billing_address FROM prospects";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (broker, stop_cloud) = start_cloud(dir.path(), SCHEMA).await?;
    let mut systems = vec![
        Device::create(dir.path(), "crm", "crm")?,
        Device::create(dir.path(), "erp", "erp")?,
        Device::create(dir.path(), "marketing", "marketing")?,
    ];
    for s in &mut systems {
        s.go_online(&broker).await?;
    }
    systems[0].sql("INSERT INTO prospects VALUES ('p-1001', 'Dana Whitfield', 'Engineer', 0, '1 Old Street')")?;
    wait_converged(&systems, SHOW, |rows| rows.len() == 1).await?;
    println!("every system starts with: {}", systems[0].lines(SHOW)?[0]);

    // Each system edits every field while cut off from the others.
    for s in &mut systems {
        s.go_offline().await;
    }
    systems[0].sql(
        "UPDATE prospects SET job_title = 'Head of Maintenance', email_opt_in = 0, billing_address = '9 CRM Road'",
    )?;
    systems[1].sql(
        "UPDATE prospects SET job_title = 'Buyer', email_opt_in = 0, billing_address = '42 Invoice Lane, Leeds'",
    )?;
    systems[2]
        .sql("UPDATE prospects SET job_title = 'Decision maker', email_opt_in = 1, billing_address = 'unknown'")?;
    println!("\nconcurrent edits:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    for s in &mut systems {
        s.go_online(&broker).await?;
    }
    let intended = "job_title=\"Head of Maintenance\"  email_opt_in=1  billing_address=\"42 Invoice Lane, Leeds\"";
    wait_converged(&systems, SHOW, |rows| rows.len() == 1 && rows[0].contains(intended)).await?;
    println!("\nconverged, each field from the system that owns it:");
    for s in &systems {
        println!("  {:<9} {}", s.name, s.lines(SHOW)?[0]);
    }
    println!("\nconflict log (resolved by the trusted-source policy):");
    print_conflicts(&systems[0].with_store(|s| s.conflicts()).await?);
    for s in &mut systems {
        s.go_offline().await;
    }
    let _ = stop_cloud.send(());
    Ok(())
}
