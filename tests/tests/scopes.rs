//! Scopes as a field team lives them: each technician's tablet holds its region's work
//! orders and no others, while orders move between regions by a technician's hand-off, by
//! the back office's plain SQL, and by an operator moving a technician to another region,
//! with tablets online and offline throughout. Run on the SQLite gateway store, and on
//! PostgreSQL too when `DRIFTLESS_TEST_PG_URL` is set.

#[path = "scopes/world.rs"]
mod world;

use driftless_core::Value;
use world::{both, ids};

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
[[table.column]]
name = "note"
type = "text"
policy = "manual"
[[table.column]]
name = "hours"
type = "integer"
policy = "counter"

[[table]]
name = "inspections"
key = ["id"]
scope = "assignee = :device"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "assignee"
type = "text"

[[table]]
name = "notices"
key = ["id"]
direction = "down-only"
scope = "region = :region"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"

[[table]]
name = "parts"
key = ["sku"]
[[table.column]]
name = "sku"
type = "text"
"#;

#[test]
fn each_device_holds_the_rows_its_parameters_select_and_every_row_of_unscoped_tables() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let south = w.device("tab-s", &[("region", "south")]);
        let nobody = w.device("tab-x", &[]);
        for d in [north, south, nobody] {
            w.connect(d);
        }
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(south, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'south', 'valve')");
        w.write(south, "INSERT INTO parts VALUES ('p-1')");
        w.write(south, "INSERT INTO inspections VALUES ('in-1', 'tab-s')");
        assert_eq!(w.held(north), ids(&["wo-1"]));
        assert_eq!(w.held(south), ids(&["wo-2"]));
        assert_eq!(w.held(nobody), Vec::<String>::new(), "no region parameter: no work order");
        for d in [north, south, nobody] {
            assert_eq!(w.rows(d, "SELECT sku FROM parts"), vec![vec![Value::Text("p-1".into())]]);
        }
        // By the device parameter: the inspection assigned to tab-s.
        assert_eq!(w.rows(south, "SELECT id FROM inspections"), vec![vec![Value::Text("in-1".into())]]);
        assert!(w.rows(north, "SELECT id FROM inspections").is_empty());
        assert!(w.rows(nobody, "SELECT id FROM inspections").is_empty());
    });
}

#[test]
fn a_write_outside_the_devices_scope_is_refused_with_its_reason_and_reaches_no_one() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let south = w.device("tab-s", &[("region", "south")]);
        w.connect(north);
        w.connect(south);
        w.write(south, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'south', 'valve')");
        // A new order for another region, and an edit of an order it does not hold.
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-9', 'south', 'sneaked in')");
        let letters = w.gateway().dead_letters(&Default::default()).expect("dead letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert!(letters[0].reason.contains("outside this device's scope"), "{}", letters[0].reason);
        assert_eq!(letters[0].device, "tab-n");
        assert_eq!(w.held(south), ids(&["wo-2"]), "the refused order reached no one");
        // The device keeps its change, set aside with the reason.
        assert_eq!(w.store(north).rejected_count().expect("rejected"), 1);
    });
}

#[test]
fn a_hand_off_by_a_device_moves_the_row_with_its_whole_state() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let south = w.device("tab-s", &[("region", "south")]);
        w.connect(north);
        w.connect(south);
        w.write(north, "INSERT INTO work_orders(id, region, title, note) VALUES ('wo-1', 'north', 'pump', 'rusty')");
        w.write(north, "UPDATE work_orders SET title = 'big pump' WHERE id = 'wo-1'");
        w.write(north, "UPDATE work_orders SET region = 'south' WHERE id = 'wo-1'");
        assert_eq!(w.held(north), Vec::<String>::new(), "handed off, gone without a delete");
        let row = w.rows(south, "SELECT id, region, title, note FROM work_orders");
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(row, vec![vec![text("wo-1"), text("south"), text("big pump"), text("rusty")]]);
        // The row lives on in the cloud: no delete was synced.
        w.write(south, "UPDATE work_orders SET note = 'fixed' WHERE id = 'wo-1'");
        assert_eq!(w.rows(south, "SELECT note FROM work_orders"), vec![vec![text("fixed")]]);
    });
}

#[test]
fn the_back_office_moves_orders_between_regions_and_offline_tablets_end_up_right() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let late = w.device("tab-n2", &[("region", "north")]);
        let south = w.device("tab-s", &[("region", "south")]);
        for d in [north, late, south] {
            w.connect(d);
        }
        for (id, region) in [("wo-1", "north"), ("wo-2", "north"), ("wo-3", "north"), ("wo-4", "south")] {
            w.write(north.min(south), "SELECT 1");
            let d = if region == "north" { north } else { south };
            w.write(d, &format!("INSERT INTO work_orders(id, region, title) VALUES ('{id}', '{region}', 'job')"));
        }
        assert_eq!(w.held(late), ids(&["wo-1", "wo-2", "wo-3"]));
        w.disconnect(late);
        // While tab-n2 is offline: wo-1 goes south, wo-2 goes south and comes back edited,
        // wo-4 comes north.
        w.cloud_write("UPDATE TABLE SET region = 'south' WHERE id IN ('wo-1', 'wo-2')");
        assert_eq!(w.held(north), ids(&["wo-3"]));
        assert_eq!(w.held(south), ids(&["wo-1", "wo-2", "wo-4"]));
        w.write(south, "UPDATE work_orders SET title = 'edited in the south' WHERE id = 'wo-2'");
        w.cloud_write("UPDATE TABLE SET region = 'north' WHERE id IN ('wo-2', 'wo-4')");
        assert_eq!(w.held(north), ids(&["wo-2", "wo-3", "wo-4"]));
        assert_eq!(w.held(south), ids(&["wo-1"]));
        w.connect(late);
        assert_eq!(w.held(late), ids(&["wo-2", "wo-3", "wo-4"]), "the offline tablet holds exactly its region");
        let title = w.rows(late, "SELECT title FROM work_orders WHERE id = 'wo-2'");
        assert_eq!(title, vec![vec![Value::Text("edited in the south".into())]], "with the edits made elsewhere");
    });
}

#[test]
fn an_operator_moving_a_technician_moves_their_rows_conflicts_included() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let s1 = w.device("tab-s1", &[("region", "south")]);
        let s2 = w.device("tab-s2", &[("region", "south")]);
        for d in [north, s1, s2] {
            w.connect(d);
        }
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(s1, "INSERT INTO work_orders(id, region, title, note) VALUES ('wo-2', 'south', 'valve', 'x')");
        // Two southern tablets edit the note at once, offline: a manual conflict.
        w.disconnect(s1);
        w.disconnect(s2);
        w.write(s1, "UPDATE work_orders SET note = 'from s1' WHERE id = 'wo-2'");
        w.write(s2, "UPDATE work_orders SET note = 'from s2' WHERE id = 'wo-2'");
        w.connect(s1);
        w.connect(s2);
        assert_eq!(w.store(s1).conflicts().expect("conflicts").len(), 1);
        // tab-n is moved south while offline: at its next connection it drops the north's
        // orders and fetches the south's, with the pending conflict.
        w.disconnect(north);
        w.set_params("tab-n", &[("region", "south")]);
        w.connect(north);
        assert_eq!(w.held(north), ids(&["wo-2"]));
        assert_eq!(w.store(north).conflicts().expect("conflicts").len(), 1, "the conflict came with the row");
        // And back north while online: the next pull notices.
        w.set_params("tab-n", &[("region", "north")]);
        w.write(s1, "INSERT INTO parts VALUES ('p-1')");
        assert_eq!(w.held(north), ids(&["wo-1"]));
        assert_eq!(w.rows(north, "SELECT sku FROM parts"), vec![vec![Value::Text("p-1".into())]]);
        // Its writes follow its new scope.
        w.write(north, "UPDATE work_orders SET title = 'new pump' WHERE id = 'wo-1'");
        assert!(w.gateway().dead_letters(&Default::default()).expect("letters").is_empty());
    });
}

#[test]
fn rows_written_before_the_first_sync_or_a_scope_change_stay_and_sync() {
    both(SCHEMA, |mut w| {
        let south = w.device("tab-s", &[("region", "south")]);
        let north = w.device("tab-n", &[("region", "north")]);
        w.connect(south);
        // A new tablet used offline before it ever synced.
        w.provision(north, SCHEMA);
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'first day')");
        w.connect(north);
        assert_eq!(w.held(north), ids(&["wo-1"]), "its own rows stay");
        assert_eq!(w.held(south), Vec::<String>::new());
        // Offline again, it writes; meanwhile the operator changes its parameters (the same
        // region, another crew): it starts over in its scope, and gets its unsent row back
        // once merged.
        w.disconnect(north);
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'north', 'second day')");
        w.set_params("tab-n", &[("region", "north"), ("crew", "b")]);
        w.connect(north);
        assert_eq!(w.held(north), ids(&["wo-1", "wo-2"]));
        assert!(w.gateway().dead_letters(&Default::default()).expect("letters").is_empty());
    });
}

#[test]
fn a_scope_change_keeps_the_rows_with_unsent_changes_counters_included() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let other = w.device("tab-o", &[("region", "north")]);
        w.connect(north);
        w.connect(other);
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(north, "UPDATE work_orders SET hours = hours + 2 WHERE id = 'wo-1'");
        // Offline: more hours and a new title, unsent when its parameters change.
        w.disconnect(north);
        w.write(north, "UPDATE work_orders SET hours = hours + 3, title = 'pump, checked' WHERE id = 'wo-1'");
        w.set_params("tab-n", &[("region", "north"), ("crew", "b")]);
        w.connect(north);
        w.write(north, "UPDATE work_orders SET hours = hours + 4 WHERE id = 'wo-1'");
        let want = vec![vec![Value::Text("pump, checked".into()), Value::Integer(9)]];
        for d in [north, other] {
            assert_eq!(w.rows(d, "SELECT title, hours FROM work_orders"), want, "no change and no hour lost on {d}");
        }
    });
}

#[test]
fn a_row_the_apps_own_constraints_keep_stays_and_the_rest_syncs() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        w.connect(north);
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-1', 'north', 'pump')");
        w.write(north, "INSERT INTO work_orders(id, region, title) VALUES ('wo-2', 'north', 'valve')");
        // The app keeps its own notes on work orders, and forbids removing one that has some.
        w.write(
            north,
            "CREATE TABLE my_notes (wo TEXT REFERENCES work_orders(id) ON DELETE RESTRICT, body TEXT);
             PRAGMA foreign_keys = ON;
             INSERT INTO my_notes VALUES ('wo-1', 'bring the big wrench');",
        );
        w.cloud_write("UPDATE TABLE SET region = 'south' WHERE id IN ('wo-1', 'wo-2')");
        // wo-2 left; wo-1 stays, with the reason, and the device is not stuck on it.
        assert_eq!(w.held(north), ids(&["wo-1"]));
        let unapplied = w.store(north).unapplied().expect("unapplied");
        assert_eq!(unapplied.len(), 1, "{unapplied:?}");
        assert!(unapplied[0].2.contains("left this device's scope"), "{}", unapplied[0].2);
        w.cloud_write("INSERT INTO TABLE(id, region, title) VALUES ('wo-3', 'north', 'new')");
        assert_eq!(w.held(north), ids(&["wo-1", "wo-3"]));
    });
}

#[test]
fn rows_of_a_table_devices_only_receive_leave_with_their_scope_too() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        w.connect(north);
        w.cloud_write("INSERT INTO NOTICES VALUES ('n-1', 'north'), ('n-2', 'north')");
        assert_eq!(w.rows(north, "SELECT id FROM notices ORDER BY id").len(), 2);
        w.cloud_write("UPDATE NOTICES SET region = 'south' WHERE id = 'n-1'");
        assert_eq!(w.rows(north, "SELECT id FROM notices"), vec![vec![Value::Text("n-2".into())]]);
    });
}
