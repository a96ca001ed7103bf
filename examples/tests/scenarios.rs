//! The scenarios run to their end, as a reader would run them.

use std::process::Command;

use driftless_gateway::storage::testing::TestDb;

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("run the scenario");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{bin} {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn crm_erp_marketing_converges_on_the_embedded_store_and_on_postgresql() {
    let bin = env!("CARGO_BIN_EXE_crm-erp-marketing");
    let owners = "job_title=\"Head of Maintenance\"  email_opt_in=1  billing_address=\"42 Invoice Lane, Leeds\"";
    let embedded = run(bin, &[]);
    assert!(embedded.contains("converged") && embedded.matches(owners).count() == 3, "{embedded}");
    let Some(db) = TestDb::new() else { return };
    let on_pg = run(bin, &["--store", &db.url()]);
    assert!(on_pg.contains("psql: BEGIN; SET LOCAL driftless.role = 'erp'"), "{on_pg}");
    assert!(on_pg.contains("converged") && on_pg.matches(owners).count() == 3, "{on_pg}");
}
