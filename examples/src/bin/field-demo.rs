//! Three field workers inspect the same site. Their tablets go offline, they edit the same
//! records in conflicting ways, and when they reconnect everything converges.
//!
//! Run: `cargo run -p driftless-examples --bin field-demo`. Nothing to install: the MQTT
//! broker and the gateway run inside this process.

use driftless_examples::{Device, lines, print_conflicts, start_cloud, wait_converged};

const SCHEMA: &str = include_str!("../../schemas/field-demo.toml");
const SHOW: &str = "SELECT id, status, inspector, notes, spare_seals FROM inspections ORDER BY id";

fn show(title: &str, devices: &[Device]) -> anyhow::Result<()> {
    println!("\n== {title}");
    for d in devices {
        for line in d.lines(SHOW)? {
            println!("  {:<6} {line}", d.name);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("driftless field demo: an embedded MQTT broker, a gateway and three field tablets");
    let (broker, stop_cloud) = start_cloud(dir.path(), SCHEMA).await?;
    let mut devices = vec![
        Device::create(dir.path(), "anna", "field")?,
        Device::create(dir.path(), "ben", "field")?,
        Device::create(dir.path(), "chen", "field")?,
    ];
    for d in &mut devices {
        d.go_online(&broker).await?;
    }
    devices[0].sql(
        "INSERT INTO inspections VALUES ('pump-7', 'north yard', 'scheduled', NULL, '', 10);
         INSERT INTO inspections VALUES ('valve-3', 'north yard', 'scheduled', NULL, '', 4);",
    )?;
    wait_converged(&devices, SHOW, |rows| rows.len() == 2).await?;
    show("online: anna schedules two inspections; every tablet has them", &devices)?;

    println!("\n== the site has no coverage: all three tablets go offline and keep working");
    for d in &mut devices {
        d.go_offline().await;
    }
    devices[0].sql("UPDATE inspections SET status = 'done', notes = 'seal worn, replaced', spare_seals = spare_seals - 1 WHERE id = 'pump-7'")?;
    println!("  anna: pump-7 status=done, notes='seal worn, replaced', used 1 spare seal");
    devices[1].sql(
        "UPDATE inspections SET inspector = 'ben', spare_seals = spare_seals - 2 WHERE id = 'pump-7';
         DELETE FROM inspections WHERE id = 'valve-3';",
    )?;
    println!("  ben:  pump-7 inspector=ben, used 2 spare seals; deletes valve-3 (decommissioned)");
    devices[2].sql(
        "UPDATE inspections SET notes = 'seal ok, no leak', spare_seals = spare_seals - 3 WHERE id = 'pump-7';
         UPDATE inspections SET status = 'needs parts' WHERE id = 'valve-3';",
    )?;
    println!("  chen: pump-7 notes='seal ok, no leak', used 3 spare seals; marks valve-3 'needs parts'");
    show("while offline each tablet sees only its own edits", &devices)?;

    println!("\n== coverage returns: the tablets reconnect");
    for d in &mut devices {
        d.go_online(&broker).await?;
    }
    wait_converged(&devices, SHOW, |rows| rows.len() == 1 && rows[0].contains("spare_seals=4")).await?;
    show("converged: identical on every tablet", &devices)?;

    println!("\n== what happened");
    println!("  status and inspector: different fields edited on different tablets, both kept (no conflict)");
    println!("  spare_seals: a counter; 10 - 1 - 2 - 3 = 4 on every tablet, whatever the order of arrival");
    println!("  valve-3: ben's delete raced chen's edit; the table's policy is delete-wins");
    println!("  notes: anna and chen wrote it concurrently; the policy is manual, so it waits for review");
    println!("\n== conflict log (identical on every tablet)");
    print_conflicts(&devices[0].with_store(|s| s.conflicts()).await?);

    println!("\n== the supervisor reviews the notes on anna's tablet and keeps both observations");
    devices[0]
        .with_store(|s| {
            s.resolve_conflict(
                "inspections",
                &["pump-7".into()],
                "notes",
                "seal worn and replaced; no leak after repair".into(),
            )
        })
        .await?;
    wait_converged(&devices, SHOW, |rows| rows.iter().any(|r| r.contains("no leak after repair"))).await?;
    show("after the review, on every tablet", &devices)?;
    let open = devices[2].with_store(|s| s.conflicts()).await?;
    println!(
        "  conflicts needing review on chen's tablet: {}",
        open.iter().filter(|c| c.record.needs_resolution()).count()
    );

    // The cloud copy is a real table in the gateway's database, for any SQL client.
    println!("\n== the cloud database (sqlite3 gateway.db 'SELECT ... FROM \"demo.inspections\"')");
    let cloud_sql = SHOW.replace("FROM inspections", "FROM \"demo.inspections\"");
    for line in lines(&dir.path().join("gateway.db"), &cloud_sql)? {
        println!("  cloud  {line}");
    }

    for d in &mut devices {
        d.go_offline().await;
    }
    let _ = stop_cloud.send(());
    Ok(())
}
