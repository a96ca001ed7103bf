//! Rows held by reference: a customer goes to the devices holding a work order that names
//! it, and leaves them when none does any more, whoever changed the work orders (a device,
//! the back office) and whether the devices were online or not. Run on the SQLite gateway
//! store, and on PostgreSQL too when `DRIFTLESS_TEST_PG_URL` is set.

#[path = "scopes/world.rs"]
mod world;

use driftless_core::Value;
use world::{World, both, ids};

/// Work orders by region, each naming its customer; customers held by reference.
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
name = "customer_id"
type = "text"
[[table.column]]
name = "title"
type = "text"

[[table]]
name = "customers"
key = ["id"]
scope = "referenced by work_orders.customer_id"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "name"
type = "text"
[[table.column]]
name = "visits"
type = "integer"
policy = "counter"
"#;

/// The customers a device holds, by id and name, sorted.
fn customers(w: &World, d: usize) -> Vec<(String, String)> {
    w.rows(d, "SELECT id, name FROM customers ORDER BY id")
        .into_iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Text(id), Value::Text(name)) => (id.clone(), name.clone()),
            other => panic!("customer {other:?}"),
        })
        .collect()
}

fn held(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn a_customer_goes_with_the_work_orders_naming_it_and_leaves_with_the_last() {
    both(SCHEMA, |mut w| {
        let n1 = w.device("tab-n1", &[("region", "north")]);
        let n2 = w.device("tab-n2", &[("region", "north")]);
        let s1 = w.device("tab-s1", &[("region", "south")]);
        for d in [n1, n2, s1] {
            w.connect(d);
        }
        // A new customer and its order, made on a northern tablet.
        w.write(
            n1,
            "INSERT INTO customers(id, name) VALUES ('c1', 'Acme Pumps');
             INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 'pump')",
        );
        assert_eq!(customers(&w, n2), held(&[("c1", "Acme Pumps")]), "the north holds it");
        assert!(customers(&w, s1).is_empty(), "the south does not");

        // The south names it in an order of its own: its writer did not hold it, and now
        // does, whole.
        w.write(s1, "INSERT INTO work_orders VALUES ('wo-2', 'south', 'c1', 'valve')");
        assert_eq!(customers(&w, s1), held(&[("c1", "Acme Pumps")]), "pulled in for its writer");

        // An edit reaches every scope holding it.
        w.write(n2, "UPDATE customers SET name = 'Acme Pumps Ltd' WHERE id = 'c1'");
        for d in [n1, s1] {
            assert_eq!(customers(&w, d), held(&[("c1", "Acme Pumps Ltd")]));
        }
        // A counter alone too (a change without a field of its own).
        w.write(s1, "UPDATE customers SET visits = visits + 1 WHERE id = 'c1'");
        w.write(n1, "UPDATE customers SET visits = visits + 2 WHERE id = 'c1'");
        for d in [n1, n2, s1] {
            assert_eq!(w.rows(d, "SELECT visits FROM customers"), vec![vec![Value::Integer(3)]]);
        }

        // The back office hands the north's order to the south: the north names it no more.
        w.cloud_write("UPDATE TABLE SET region = 'south' WHERE id = 'wo-1'");
        for d in [n1, n2] {
            assert!(customers(&w, d).is_empty(), "evicted from the north, without a delete");
            assert!(w.held(d).is_empty());
        }
        assert_eq!(customers(&w, s1), held(&[("c1", "Acme Pumps Ltd")]), "the south keeps it");

        // The south's orders go to other customers, one by a device, one by the back office:
        // the last one takes it away from the south too. The row lives on in the cloud.
        w.write(s1, "INSERT INTO customers(id, name) VALUES ('c2', 'Brine Co'); UPDATE work_orders SET customer_id = 'c2' WHERE id = 'wo-2'");
        assert_eq!(customers(&w, s1), held(&[("c1", "Acme Pumps Ltd"), ("c2", "Brine Co")]));
        w.cloud_write("UPDATE TABLE SET customer_id = 'c2' WHERE id = 'wo-1'");
        assert_eq!(customers(&w, s1), held(&[("c2", "Brine Co")]));
        // Named again by a northern order: it comes back whole, with the edits made meanwhile.
        w.cloud_write("UPDATE CUSTOMERS SET name = 'Acme Holdings' WHERE id = 'c1'");
        w.write(n1, "INSERT INTO work_orders VALUES ('wo-3', 'north', 'c1', 'gauge')");
        for d in [n1, n2] {
            assert_eq!(customers(&w, d), held(&[("c1", "Acme Holdings")]));
        }
        assert!(w.gateway().dead_letters(&Default::default()).expect("letters").is_empty());
    });
}

#[test]
fn a_device_may_not_write_a_customer_its_orders_do_not_name() {
    both(SCHEMA, |mut w| {
        let north = w.device("tab-n", &[("region", "north")]);
        let south = w.device("tab-s", &[("region", "south")]);
        w.connect(north);
        w.connect(south);
        w.write(
            north,
            "INSERT INTO customers(id, name) VALUES ('c1', 'Acme'); INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 'pump')",
        );
        // The south edits a customer it does not hold (its own copy, made blind).
        w.write(south, "INSERT INTO customers(id, name) VALUES ('c1', 'Hijacked')");
        let letters = w.gateway().dead_letters(&Default::default()).expect("dead letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert!(letters[0].reason.contains("outside this device's scope"), "{}", letters[0].reason);
        assert_eq!(letters[0].device, "tab-s");
        assert_eq!(customers(&w, north), held(&[("c1", "Acme")]), "the refused edit reached no one");
        assert_eq!(w.store(south).rejected_count().expect("rejected"), 1, "kept aside on its device");
    });
}

#[test]
fn an_offline_tablet_and_a_new_one_end_up_holding_exactly_their_customers() {
    both(SCHEMA, |mut w| {
        let n1 = w.device("tab-n1", &[("region", "north")]);
        let late = w.device("tab-n2", &[("region", "north")]);
        let s1 = w.device("tab-s1", &[("region", "south")]);
        for d in [n1, late, s1] {
            w.connect(d);
        }
        w.write(
            n1,
            "INSERT INTO customers(id, name) VALUES ('c1', 'Acme'), ('c2', 'Brine');
             INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 'pump'), ('wo-2', 'north', 'c2', 'valve')",
        );
        assert_eq!(customers(&w, late), held(&[("c1", "Acme"), ("c2", "Brine")]));
        // Offline across: c1 leaves the north and comes back, c2 leaves, c3 enters, c1 is
        // edited while away.
        w.disconnect(late);
        w.cloud_write("UPDATE TABLE SET region = 'south' WHERE id = 'wo-1'");
        w.cloud_write("UPDATE CUSTOMERS SET name = 'Acme (south)' WHERE id = 'c1'");
        w.cloud_write("UPDATE TABLE SET region = 'north' WHERE id = 'wo-1'");
        w.cloud_write("DELETE FROM TABLE WHERE id = 'wo-2'");
        w.write(s1, "INSERT INTO customers(id, name) VALUES ('c3', 'Coil'); INSERT INTO work_orders VALUES ('wo-4', 'south', 'c3', 'x')");
        w.cloud_write("UPDATE TABLE SET region = 'north' WHERE id = 'wo-4'");
        let north = held(&[("c1", "Acme (south)"), ("c3", "Coil")]);
        assert_eq!(customers(&w, n1), north, "the online tablet");
        w.connect(late);
        assert_eq!(customers(&w, late), north, "the offline tablet, once back");
        assert_eq!(w.held(late), ids(&["wo-1", "wo-4"]));
        assert!(customers(&w, s1).is_empty(), "the south names none");
        // A new tablet gets the north's customers in its snapshot, and no other.
        let new = w.device("tab-n3", &[("region", "north")]);
        // Its progress counts the customers it holds by reference with its orders (and the
        // deleted wo-2, whose state the snapshot carries as it does every row's).
        w.connect_until(new, |s| s.snapshot_position().expect("read").is_some());
        let progress = w.store(new).snapshot_position().expect("read").expect("under way").progress;
        assert_eq!(progress.rows_total, 5, "wo-1, wo-2, wo-4, c1 and c3: {progress:?}");
        w.connect(new);
        assert_eq!(customers(&w, new), north);
        // And one moved south by the operator drops them, for the south's.
        w.set_params("tab-n3", &[("region", "south")]);
        w.disconnect(new);
        w.connect(new);
        assert!(customers(&w, new).is_empty());
        assert!(w.gateway().dead_letters(&Default::default()).expect("letters").is_empty());
    });
}

#[test]
fn a_new_customer_stays_its_writers_to_edit_until_an_order_names_it() {
    both(SCHEMA, |mut w| {
        let n1 = w.device("tab-n1", &[("region", "north")]);
        let n2 = w.device("tab-n2", &[("region", "north")]);
        let s1 = w.device("tab-s1", &[("region", "south")]);
        for d in [n1, n2, s1] {
            w.connect(d);
        }
        // Offline, in three saves shipped in one batch: the customer, its order, an edit.
        w.disconnect(n1);
        w.write(n1, "INSERT INTO customers(id, name) VALUES ('c9', 'Draft')");
        w.write(n1, "INSERT INTO work_orders VALUES ('wo-9', 'north', 'c9', 'survey')");
        w.write(n1, "UPDATE customers SET name = 'Delta Farms' WHERE id = 'c9'");
        w.connect(n1);
        assert_eq!(customers(&w, n2), held(&[("c9", "Delta Farms")]), "the edit stood");
        // Shipped before any order names it, then edited: still its own.
        w.write(n1, "INSERT INTO customers(id, name) VALUES ('c8', 'Echo')");
        w.write(n1, "UPDATE customers SET name = 'Echo Ltd' WHERE id = 'c8'");
        assert!(w.gateway().dead_letters(&Default::default()).expect("letters").is_empty());
        // Named by a southern order before anyone made it: not the north's to make.
        w.write(s1, "INSERT INTO work_orders VALUES ('wo-7', 'south', 'c7', 'x')");
        w.write(n2, "INSERT INTO customers(id, name) VALUES ('c7', 'Sneaked')");
        let letters = w.gateway().dead_letters(&Default::default()).expect("letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert!(letters[0].reason.contains("outside this device's scope"), "{}", letters[0].reason);
        assert!(customers(&w, s1).is_empty(), "nothing reached the south");
        // Someone else's customer that no order names is not the south's to edit either.
        w.write(s1, "INSERT INTO customers(id, name) VALUES ('c8', 'Mine now')");
        assert_eq!(w.gateway().dead_letters(&Default::default()).expect("letters").len(), 2);
    });
}

/// Work orders naming a customer and a site, both held by reference.
const TWO_REFS: &str = r#"
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
name = "customer_id"
type = "text"
[[table.column]]
name = "site_id"
type = "text"
[[table.column]]
name = "title"
type = "text"

[[table]]
name = "customers"
key = ["id"]
scope = "referenced by work_orders.customer_id"
[[table.column]]
name = "id"
type = "text"

[[table]]
name = "sites"
key = ["id"]
scope = "referenced by work_orders.site_id"
[[table.column]]
name = "id"
type = "text"
"#;

#[test]
fn an_order_naming_a_customer_and_a_site_pulls_in_each() {
    both(TWO_REFS, |mut w| {
        let n1 = w.device("tab-n1", &[("region", "north")]);
        let n2 = w.device("tab-n2", &[("region", "north")]);
        for d in [n1, n2] {
            w.connect(d);
        }
        let ids_of = |w: &World, d: usize, table: &str| -> Vec<Value> {
            w.rows(d, &format!("SELECT id FROM {table} ORDER BY id")).into_iter().map(|r| r[0].clone()).collect()
        };
        let text = |s: &str| Value::Text(s.into());
        w.write(
            n1,
            "INSERT INTO customers VALUES ('c1'); INSERT INTO sites VALUES ('s1');
             INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 's1', 'pump')",
        );
        // Edited again and again: each table's count stays one.
        for title in ["a", "b", "c"] {
            w.write(n1, &format!("UPDATE work_orders SET title = '{title}' WHERE id = 'wo-1'"));
        }
        assert_eq!(ids_of(&w, n2, "customers"), vec![text("c1")]);
        assert_eq!(ids_of(&w, n2, "sites"), vec![text("s1")]);
        w.write(n1, "INSERT INTO sites VALUES ('s2'); UPDATE work_orders SET site_id = 's2' WHERE id = 'wo-1'");
        assert_eq!(ids_of(&w, n2, "customers"), vec![text("c1")], "the customer stays");
        assert_eq!(ids_of(&w, n2, "sites"), vec![text("s2")], "the old site left");
        w.write(n1, "DELETE FROM work_orders WHERE id = 'wo-1'");
        assert!(ids_of(&w, n2, "customers").is_empty() && ids_of(&w, n2, "sites").is_empty(), "both left with it");
        // What the gateway counts agrees: a new tablet's snapshot holds none of them.
        let n3 = w.device("tab-n3", &[("region", "north")]);
        w.connect(n3);
        assert!(ids_of(&w, n3, "customers").is_empty() && ids_of(&w, n3, "sites").is_empty());
    });
}

#[test]
fn a_gateway_restored_from_a_backup_takes_back_the_customers_devices_send() {
    let mut w = World::new(SCHEMA, false).expect("sqlite world");
    let n1 = w.device("tab-n1", &[("region", "north")]);
    let n2 = w.device("tab-n2", &[("region", "north")]);
    for d in [n1, n2] {
        w.connect(d);
    }
    // A customer no order names yet, then the backup.
    w.write(n1, "INSERT INTO customers(id, name) VALUES ('c1', 'Acme')");
    for d in [n1, n2] {
        w.disconnect(d);
    }
    let backup = w.backup_gateway();
    for d in [n1, n2] {
        w.connect(d);
    }
    // After it: an order names it, and the other tablet of the north edits it.
    w.write(n1, "INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 'pump')");
    w.write(n2, "UPDATE customers SET name = 'Acme Ltd' WHERE id = 'c1'");
    for d in [n1, n2] {
        w.disconnect(d);
    }
    // The restored gateway has the customer as n1 made it, named by no order. The devices
    // send back everything, n2 first: its edit builds on n1's write, and is taken back.
    w.restore_gateway(&backup);
    for d in [n2, n1] {
        w.connect(d);
    }
    // (n1 sends back n2's edit too, which a restored store cannot tell from a forgery: set
    // aside, while n2's own copy stands.)
    let letters = w.gateway().dead_letters(&Default::default()).expect("letters");
    assert!(letters.iter().all(|l| !l.reason.contains("outside this device's scope")), "{letters:?}");
    for d in [n1, n2] {
        assert_eq!(customers(&w, d), held(&[("c1", "Acme Ltd")]));
    }
    let n3 = w.device("tab-n3", &[("region", "north")]);
    w.connect(n3);
    assert_eq!(customers(&w, n3), held(&[("c1", "Acme Ltd")]), "the gateway holds it, named again");
}

#[test]
fn customers_declared_after_the_orders_go_with_the_orders_already_held() {
    let orders_only = &SCHEMA[..SCHEMA.find("[[table]]\nname = \"customers\"").expect("present")];
    both(orders_only, |mut w| {
        let n1 = w.device("tab-n1", &[("region", "north")]);
        let n2 = w.device("tab-n2", &[("region", "north")]);
        let s1 = w.device("tab-s1", &[("region", "south")]);
        for d in [n1, n2, s1] {
            w.connect(d);
        }
        w.write(n1, "INSERT INTO work_orders VALUES ('wo-1', 'north', 'c1', 'pump')");
        // A later version declares customers: the orders held so far are counted as it loads.
        w.install_schema(SCHEMA);
        for d in [n1, n2, s1] {
            w.disconnect(d);
            w.connect(d);
        }
        w.write(n1, "INSERT INTO customers(id, name) VALUES ('c1', 'Acme')");
        assert_eq!(customers(&w, n2), held(&[("c1", "Acme")]), "named by an order of the north");
        assert!(customers(&w, s1).is_empty());
        // The south may not make a customer the north's orders name.
        w.write(s1, "INSERT INTO customers(id, name) VALUES ('c1', 'Sneaked')");
        assert_eq!(w.gateway().dead_letters(&Default::default()).expect("letters").len(), 1);
        // Moving the order moves the customer, as for orders logged after the declaration.
        w.cloud_write("UPDATE TABLE SET region = 'south' WHERE id = 'wo-1'");
        assert!(customers(&w, n2).is_empty());
        assert_eq!(customers(&w, s1).len(), 1);
    });
}
