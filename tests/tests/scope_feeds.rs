//! Fan-out by scope: each change goes out once on the topic of every scope it concerns,
//! with that scope's part of it, and the devices holding the scope apply it without asking
//! for anything; a device never hears another scope's changes, and one that lost a change
//! sees the gap in its scope's chain and pulls what it missed. Run on the SQLite gateway
//! store, and on PostgreSQL too when `DRIFTLESS_TEST_PG_URL` is set.

#[path = "scopes/world.rs"]
mod world;

use driftless_core::Value;
use world::{World, both, ids};

/// Work orders by region, and parts every device holds.
const SCHEMA: &str = r#"
roles = ["field"]

[[table]]
name = "work_orders"
key = ["id"]
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"
[[table.column]]
name = "title"
type = "text"

[[table]]
name = "parts"
key = ["sku"]
[[table.column]]
name = "sku"
type = "text"
"#;

/// Two tablets of the north and one of the south, online.
fn two_north_one_south(w: &mut World) -> (usize, usize, usize) {
    let n1 = w.device("tab-n1", &[("region", "north")]);
    let n2 = w.device("tab-n2", &[("region", "north")]);
    let s1 = w.device("tab-s1", &[("region", "south")]);
    for d in [n1, n2, s1] {
        w.connect(d);
    }
    (n1, n2, s1)
}

/// Pulls and scope changes each device got so far.
fn counts(w: &World, devices: &[usize]) -> Vec<(usize, usize)> {
    devices.iter().map(|&d| (w.pulls(d), w.feeds(d))).collect()
}

#[test]
fn a_change_reaches_only_its_scopes_devices_and_they_apply_it_without_pulling() {
    both(SCHEMA, |mut w| {
        let (n1, n2, s1) = two_north_one_south(&mut w);
        let before = counts(&w, &[n2, s1]);
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        assert_eq!(w.held(n2), ids(&["wo-1"]), "applied from the scope's topic");
        assert_eq!(w.pulls(n2), before[0].0, "without a pull");
        assert_eq!(w.feeds(n2), before[0].1 + 1, "one change, once");
        assert_eq!(counts(&w, &[s1])[0], before[1], "south heard nothing and asked for nothing");
        assert!(w.held(s1).is_empty());

        // A row of a table without scope concerns every scope.
        let before = counts(&w, &[n1, n2, s1]);
        w.write_now(s1, "INSERT INTO parts VALUES ('p-1')");
        for (i, d) in [n1, n2, s1].into_iter().enumerate() {
            assert_eq!(w.rows(d, "SELECT sku FROM parts"), vec![vec![Value::Text("p-1".into())]]);
            assert_eq!(w.pulls(d), before[i].0, "no pull");
        }

        // Moved to the south: it leaves the north's tablets, the writer's too, and arrives
        // whole in the south's, each from its own scope's topic.
        let before = counts(&w, &[n1, n2, s1]);
        w.write_now(n1, "UPDATE work_orders SET region = 'south' WHERE id = 'wo-1'");
        assert!(w.held(n1).is_empty() && w.held(n2).is_empty(), "evicted");
        assert_eq!(
            w.rows(s1, "SELECT id, title FROM work_orders"),
            vec![vec![Value::Text("wo-1".into()), Value::Text("pump".into())]]
        );
        assert_eq!(
            counts(&w, &[n1, n2, s1]).iter().map(|c| c.0).collect::<Vec<_>>(),
            before.iter().map(|c| c.0).collect::<Vec<_>>(),
            "no pull"
        );
    });
}

#[test]
fn a_lost_change_shows_as_a_gap_in_the_scopes_chain_and_is_pulled() {
    both(SCHEMA, |mut w| {
        let (n1, n2, s1) = two_north_one_south(&mut w);
        // The south is busy: none of it is the north's concern, gap or not.
        for i in 0..5 {
            w.write_now(s1, &format!("INSERT INTO work_orders(id, region, title) VALUES ('s-{i}', 'south', 'x')"));
        }
        let pulls = w.pulls(n2);
        w.lose_feeds(n2, 1);
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        assert!(w.held(n2).is_empty(), "lost on the way");
        w.write_now(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-9', 'south', 'x')");
        assert_eq!(w.pulls(n2), pulls, "another scope's change shows no gap");
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'north', 'valve')");
        assert_eq!(w.held(n2), ids(&["wo-1", "wo-2"]), "the gap pulled, the change after it applied");
        assert_eq!(w.pulls(n2), pulls + 1, "one pull");
        assert_eq!(w.held(n1), ids(&["wo-1", "wo-2"]));
    });
}

#[test]
fn a_new_device_follows_its_scope_from_its_snapshot_without_pulling_again() {
    both(SCHEMA, |mut w| {
        let (n1, s1) = (w.device("tab-n1", &[("region", "north")]), w.device("tab-s1", &[("region", "south")]));
        w.connect(n1);
        w.connect(s1);
        w.write(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-1', 'south', 'x')");
        let n3 = w.device("tab-n3", &[("region", "north")]);
        w.connect(n3);
        assert_eq!(w.held(n3), ids(&["wo-1"]));
        // The log grows past the north's last change; the north's next one follows it.
        w.write_now(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-2', 'south', 'x')");
        let pulls = w.pulls(n3);
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'north', 'valve')");
        assert_eq!(w.held(n3), ids(&["wo-1", "wo-2"]));
        assert_eq!(w.pulls(n3), pulls, "its cursor was on its scope's chain");
    });
}

#[test]
fn a_device_moved_to_another_scope_follows_the_new_one_only() {
    both(SCHEMA, |mut w| {
        let (n1, s1, mover) = (
            w.device("tab-n1", &[("region", "north")]),
            w.device("tab-s1", &[("region", "south")]),
            w.device("tab-m", &[("region", "north")]),
        );
        for d in [n1, s1, mover] {
            w.connect(d);
        }
        w.write(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-1', 'south', 'x')");
        assert_eq!(w.held(mover), ids(&["wo-1"]));
        w.set_params("tab-m", &[("region", "south")]);
        // Told at its next pull; it takes the south's rows and follows the south.
        w.settle();
        assert_eq!(w.held(mover), ids(&["s-1"]));
        let feeds = w.feeds(mover);
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'north', 'valve')");
        assert_eq!(w.feeds(mover), feeds, "the north's changes no longer reach it");
        let pulls = w.pulls(mover);
        w.write_now(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-2', 'south', 'y')");
        assert_eq!(w.held(mover), ids(&["s-1", "s-2"]));
        assert_eq!(w.pulls(mover), pulls, "applied from the south's topic");
    });
}

#[test]
fn a_schema_that_scopes_another_table_moves_devices_to_their_new_scopes_topic() {
    both(SCHEMA, |mut w| {
        let (n1, n2, _) = two_north_one_south(&mut w);
        let visits = "\n[[table]]\nname = \"visits\"\nkey = [\"id\"]\nscope = \"region = :region\"\n\
                      [[table.column]]\nname = \"id\"\ntype = \"text\"\n\
                      [[table.column]]\nname = \"region\"\ntype = \"text\"\n";
        w.gateway().install_schema(&format!("{SCHEMA}{visits}")).expect("a new version");
        // Their next pull (the backstop's) tells them the scope's new name.
        w.settle();
        let pulls = w.pulls(n2);
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        assert_eq!(w.held(n2), ids(&["wo-1"]));
        assert_eq!(w.pulls(n2), pulls, "applied from the new scope's topic");
    });
}

#[test]
fn an_interrupted_snapshot_shows_how_far_it_got_and_goes_on_from_there() {
    both(SCHEMA, |mut w| {
        let (n1, _, s1) = two_north_one_south(&mut w);
        for i in 0..8 {
            w.write(n1, &format!("INSERT INTO work_orders(id, region, title) VALUES ('wo-{i}', 'north', 'job')"));
        }
        w.write(s1, "INSERT INTO work_orders(id, region, title) VALUES ('s-1', 'south', 'x')");
        // A new tablet of the north, cut off after its snapshot's first page.
        let n3 = w.device("tab-n3", &[("region", "north")]);
        w.connect_until(n3, |s| s.snapshot_position().expect("read").is_some());
        let progress = w.store(n3).snapshot_position().expect("read").expect("under way").progress;
        assert_eq!(progress.rows_total, 8, "its scope's rows, as the gateway counted them: {progress:?}");
        assert!(progress.rows_done > 0 && progress.rows_done < 8, "{progress:?}");
        assert!(progress.bytes_done > 0 && progress.bytes_done < progress.bytes_total, "{progress:?}");
        assert_eq!(w.held(n3).len() as u64, progress.rows_done, "what arrived is readable already");
        w.connect(n3);
        assert_eq!(w.held(n3).len(), 8);
        assert_eq!(w.store(n3).snapshot_position().expect("read"), None, "done");
    });
}

#[test]
fn a_scope_the_gateway_learns_of_late_costs_a_pull_and_no_change() {
    both(SCHEMA, |mut w| {
        let (n1, _, _) = two_north_one_south(&mut w);
        // The gateway works out the scopes its devices hold as it publishes (and keeps them
        // a moment): the east is none of them yet.
        w.write_now(n1, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        let (e1, e2) = (w.device("tab-e1", &[("region", "east")]), w.device("tab-e2", &[("region", "east")]));
        w.connect(e1);
        w.connect(e2);
        w.write_now(e2, "INSERT INTO work_orders(id, region, title) VALUES ('e-1', 'east', 'x')");
        // Published or not, the backstop pull brings it.
        w.settle();
        assert_eq!(w.held(e1), ids(&["e-1"]));
        // Once known, the east's changes are published to it.
        std::thread::sleep(driftless_gateway::storage::kept::Kept::SCOPES_MAX_AGE);
        let pulls = w.pulls(e1);
        w.write_now(e2, "INSERT INTO work_orders(id, region, title) VALUES ('e-2', 'east', 'y')");
        assert_eq!(w.held(e1), ids(&["e-1", "e-2"]));
        assert_eq!(w.pulls(e1), pulls);
    });
}
