use std::collections::BTreeMap;

use super::*;
use crate::clock::{Dot, Hlc, NodeId};
use crate::merge::{FieldWrite, LocalWrite, write_local_delete, write_local_upsert};
use crate::policy::DeletePolicy;

const SCHEMA: &str = r#"
[[table]]
name = "work_orders"
key = ["id"]
scope = "region = :region AND kind = 'repair'"
[[table.column]]
name = "id"
type = "text"
[[table.column]]
name = "region"
type = "text"
[[table.column]]
name = "kind"
type = "text"
[[table.column]]
name = "floor"
type = "integer"

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
name = "parts"
key = ["id"]
[[table.column]]
name = "id"
type = "text"
"#;

fn schema() -> SyncSchema {
    SyncSchema::parse(SCHEMA).expect("schema parses")
}

fn row(region: &str, kind: &str, counter: u64) -> RowState {
    let mut state = RowState::default();
    let fields = vec![
        FieldWrite { column: "region".into(), value: Value::Text(region.into()), hlc: Hlc(counter) },
        FieldWrite { column: "kind".into(), value: Value::Text(kind.into()), hlc: Hlc(counter) },
    ];
    write_local_upsert(
        &mut state,
        Dot { node: NodeId([1; 16]), counter },
        Hlc(counter),
        LocalWrite { fields, counter_deltas: vec![] },
    );
    state
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn a_row_is_held_by_the_devices_whose_parameters_match_its_columns() {
    let schema = schema();
    let table = schema.table("work_orders").expect("present");
    let scope = table.scope.as_ref().expect("present");
    let roles = BTreeMap::new();
    assert_eq!(scope.key_of(&row("north", "repair", 1), table, &roles), Some(vec![Value::Text("north".into())]));
    // A literal term that fails puts the row in no device's scope.
    assert_eq!(scope.key_of(&row("north", "survey", 1), table, &roles), None);
    assert_eq!(scope.key_of(&RowState::default(), table, &roles), None);

    let north = DeviceScope::of(&schema, "t-1", &params(&[("region", "north")]));
    let south = DeviceScope::of(&schema, "t-2", &params(&[("region", "south")]));
    let none = DeviceScope::of(&schema, "t-3", &params(&[]));
    let key = scope.key_of(&row("north", "repair", 1), table, &roles);
    assert!(north.holds("work_orders", key.as_ref()));
    assert!(!south.holds("work_orders", key.as_ref()));
    assert!(!none.holds("work_orders", key.as_ref()), "a device without the parameter holds no row");
    assert!(!north.holds("work_orders", None));
    assert!(north.holds("parts", None), "a table without a scope is held whole");
    assert_eq!(north.tables().collect::<Vec<_>>(), ["inspections", "work_orders"]);
}

#[test]
fn the_device_parameter_is_the_device_id() {
    let schema = schema();
    let t = schema.table("inspections").expect("present");
    let mine = DeviceScope::of(&schema, "tablet-7", &params(&[("device", "someone-else")]));
    assert_eq!(
        t.scope.as_ref().expect("present").device_key("tablet-7", &BTreeMap::new(), t),
        Some(vec![Value::Text("tablet-7".into())])
    );
    assert!(mine.holds("inspections", Some(&vec![Value::Text("tablet-7".into())])));
    assert!(!mine.holds("inspections", Some(&vec![Value::Text("someone-else".into())])));
}

#[test]
fn parameters_take_their_columns_type() {
    let schema = SyncSchema::parse(
        &SCHEMA.replace("scope = \"region = :region AND kind = 'repair'\"", "scope = \"floor = :floor\""),
    )
    .expect("present");
    let t = schema.table("work_orders").expect("present");
    let s = t.scope.as_ref().expect("present");
    assert_eq!(s.device_key("d", &params(&[("floor", "3")]), t), Some(vec![Value::Integer(3)]));
    assert_eq!(s.device_key("d", &params(&[("floor", "three")]), t), None);
}

#[test]
fn scopes_that_cannot_work_are_refused_with_the_reason() {
    for (scope, why) in [
        ("id = :x", "key"),
        ("missing = :x", "not declared"),
        ("region = north", "literal"),
        ("region = :", "plain name"),
        ("region", "column = value"),
        ("", "at least one term"),
        ("floor = 'three'", "literal"),
    ] {
        let text = SCHEMA.replace("region = :region AND kind = 'repair'", scope);
        let err = SyncSchema::parse(&text).expect_err(scope).to_string();
        assert!(err.contains(why), "{scope:?}: {err}");
    }
    let ok = SCHEMA.replace("region = :region AND kind = 'repair'", "kind = 'it''s' and region = :r");
    let schema = SyncSchema::parse(&ok).expect("quotes and lower-case and");
    let s = schema.table("work_orders").expect("present").scope.as_ref().expect("present");
    assert_eq!(s.terms[0].operand, Operand::Literal(Value::Text("it's".into())));
    assert_eq!(s.params().collect::<Vec<_>>(), ["r"]);
}

#[test]
fn a_scope_cannot_change_once_devices_hold_its_rows() {
    let old = schema();
    let new = SyncSchema::parse(&SCHEMA.replace("kind = 'repair'", "kind = 'survey'")).expect("present");
    let err = new.check_replaces(&old, 1).expect_err("a changed scope").to_string();
    assert!(err.contains("scope of \"work_orders\" changed"), "{err}");
    let unscoped = SyncSchema::parse(&SCHEMA.replace("scope = \"assignee = :device\"\n", "")).expect("present");
    assert!(schema().check_replaces(&unscoped, 1).is_err(), "a scope added to a table devices hold whole");
    assert!(schema().check_replaces(&schema(), 1).is_ok());
}

#[test]
fn a_deleted_row_stays_where_it_was_so_its_holders_see_the_delete() {
    let schema = schema();
    let table = schema.table("work_orders").expect("present");
    let scope = table.scope.as_ref().expect("present");
    let roles = BTreeMap::new();
    let before = row("north", "repair", 1);
    let moved = Move::of(scope, table, &before, &row("south", "repair", 2), &roles);
    assert_eq!(moved.before, vec![vec![Value::Text("north".into())]]);
    assert_eq!(moved.after, vec![vec![Value::Text("south".into())]]);
    let mut dead = before.clone();
    write_local_delete(&mut dead, Dot { node: NodeId([1; 16]), counter: 2 }, Hlc(2), vec![], DeletePolicy::DeleteWins);
    let gone = Move::of(scope, table, &before, &dead, &roles);
    assert_eq!(gone.after, gone.before);
    let created = Move::of(scope, table, &RowState::default(), &before, &roles);
    assert!(created.before.is_empty());

    let north = DeviceScope::of(&schema, "t-1", &params(&[("region", "north")]));
    let held = |state: &RowState| Held::of(scope, table, state, &roles);
    let (was_north, was_south, new) = (held(&before), held(&row("south", "repair", 1)), held(&RowState::default()));
    assert!(may_write(&north, "work_orders", &was_north, &moved, true), "a row it holds, handed to another region");
    let back = Move { before: moved.after.clone(), after: moved.before.clone() };
    assert!(!may_write(&north, "work_orders", &was_south, &back, true), "taking another region's row");
    assert!(may_write(&north, "work_orders", &new, &created, true));
    let elsewhere = Move { before: vec![], after: moved.after.clone() };
    assert!(!may_write(&north, "work_orders", &new, &elsewhere, true), "making a row for another region");
    // Another region's deleted row keeps its values: not this device's either.
    let mut south_dead = row("south", "repair", 1);
    write_local_delete(
        &mut south_dead,
        Dot { node: NodeId([2; 16]), counter: 2 },
        Hlc(2),
        vec![],
        DeletePolicy::UpdateWins,
    );
    assert!(!may_write(&north, "work_orders", &held(&south_dead), &back, true), "reviving another region's row");
    // A write that lost to a delete whose values are gone shows nothing to anyone.
    let erased = Held { exists: true, visible: false, key: None };
    assert!(may_write(&north, "work_orders", &erased, &Move::default(), false));
    // A row that shows but is in no device's scope (a literal term fails) is no one's to take.
    let closed = held(&row("south", "survey", 1));
    assert!(!may_write(&north, "work_orders", &closed, &Move { before: vec![], after: moved.before.clone() }, true));
    assert!(!may_write(&north, "work_orders", &closed, &Move::default(), false), "nor to delete");
    assert!(north.holds_state("work_orders", &before, &roles));
    assert!(!north.holds_state("work_orders", &row("south", "repair", 1), &roles));
    assert!(north.holds_state("parts", &RowState::default(), &roles));
}

#[test]
fn moves_round_trip_and_bad_bytes_are_errors() {
    let moves = vec![
        None,
        Some(Move::one(None, Some(vec![Value::Text("north".into()), Value::Integer(3)]))),
        Some(Move::one(Some(vec![]), None)),
        // A row held by reference, by many scopes.
        Some(Move {
            before: vec![vec![Value::Text("north".into())], vec![Value::Text("east".into())]],
            after: vec![vec![Value::Text("south".into())]],
        }),
        Some(Move { before: vec![], after: vec![] }),
    ];
    let bytes = encode_moves(&moves);
    assert_eq!(decode_moves(&bytes, &Limits::default()).expect("present"), moves);
    for cut in 0..bytes.len() {
        assert!(decode_moves(&bytes[..cut], &Limits::default()).is_err(), "cut at {cut}");
    }
    assert!(decode_moves(&[0xff, 0xff, 0xff, 0xff, 0x0f], &Limits::default()).is_err());
}

const REFERENCED: &str = r#"
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

[[table]]
name = "customers"
key = ["id"]
scope = "Referenced by work_orders.customer_id"
[[table.column]]
name = "id"
type = "text"
"#;

#[test]
fn a_table_held_by_reference_takes_the_key_of_the_table_naming_its_rows() {
    let schema = SyncSchema::parse(REFERENCED).expect("parses");
    let customers = schema.table("customers").and_then(|t| t.scope.as_ref()).expect("scoped");
    assert_eq!(customers.via, Some(Via { table: "work_orders".into(), column: "customer_id".into() }));
    let north = DeviceScope::of(&schema, "t-1", &params(&[("region", "north")]));
    assert_eq!(north.key("customers"), north.key("work_orders"));
    assert!(north.by_reference("customers") && !north.by_reference("work_orders"));
    let keys = [vec![Value::Text("south".into())], vec![Value::Text("north".into())]];
    assert!(north.holds_any("customers", &keys));
    assert!(!north.holds_any("customers", &keys[..1]));
    assert!(!scopes_of(&schema).contains_key("customers"), "its moves are the gateway's to log");

    // What a work order pulls in: its customer, with its own key, while it shows.
    let via = customers.via.as_ref().expect("via");
    let from = schema.table("work_orders").expect("present");
    let mut order = RowState::default();
    let fields = ["region", "customer_id"]
        .iter()
        .zip(["north", "c1"])
        .map(|(c, v)| FieldWrite { column: (*c).into(), value: Value::Text(v.into()), hlc: Hlc(1) })
        .collect();
    let dot = Dot { node: NodeId([1; 16]), counter: 1 };
    write_local_upsert(&mut order, dot, Hlc(1), LocalWrite { fields, counter_deltas: vec![] });
    let roles = BTreeMap::new();
    let pulled = via.target(from, &order, &roles);
    assert_eq!(pulled, Some((vec![Value::Text("c1".into())], vec![Value::Text("north".into())])));
    let dot = Dot { node: NodeId([1; 16]), counter: 2 };
    write_local_delete(&mut order, dot, Hlc(2), vec![], DeletePolicy::DeleteWins);
    assert_eq!(via.target(from, &order, &roles), None, "a deleted order pulls nothing in");

    // A device may write a customer its scope pulls in, or a new one or its own no scope
    // holds yet; not another scope's, even one only named there so far.
    assert!(may_write_held(&north, "customers", true, &keys));
    assert!(!may_write_held(&north, "customers", true, &keys[..1]));
    assert!(!may_write_held(&north, "customers", false, &keys[..1]), "named by the south, not made yet");
    assert!(may_write_held(&north, "customers", false, &[]));
    assert!(!may_write_held(&north, "customers", true, &[]), "someone else's, held by no scope");
}

#[test]
fn a_reference_that_cannot_work_is_refused_with_the_reason() {
    let cases = [
        ("referenced by orders.customer_id", "not declared"),
        ("referenced by work_orders.client", "not declared"),
        ("referenced by work_orders", "table.column"),
        ("referenced by work_orders.id", "is a key column"),
    ];
    for (scope, reason) in cases {
        let text = REFERENCED.replace("Referenced by work_orders.customer_id", scope);
        let err = SyncSchema::parse(&text).map(|_| ()).expect_err(scope).to_string();
        assert!(err.contains(reason), "{scope}: {err}");
    }
    // Not a reference, whatever its letters: a scope of terms, parsed as before.
    let text = REFERENCED.replace("region = :region", "region = '東京東京東京'");
    assert!(SyncSchema::parse(&text).is_ok());
    // A referencing table without a scope of its own terms.
    let text = REFERENCED.replace("scope = \"region = :region\"\n", "");
    let err = SyncSchema::parse(&text).map(|_| ()).expect_err("unscoped").to_string();
    assert!(err.contains("scope of its own terms"), "{err}");
    // A key type that the column naming it does not have.
    let text =
        REFERENCED.replace("name = \"customer_id\"\ntype = \"text\"", "name = \"customer_id\"\ntype = \"integer\"");
    let err = SyncSchema::parse(&text).map(|_| ()).expect_err("mistyped").to_string();
    assert!(err.contains("must be a text column"), "{err}");
    // A table of two key columns.
    let text = REFERENCED
        .replace("key = [\"id\"]\nscope = \"Referenced", "key = [\"id\", \"site\"]\nscope = \"Referenced")
        + "[[table.column]]\nname = \"site\"\ntype = \"text\"\n";
    let err = SyncSchema::parse(&text).map(|_| ()).expect_err("two keys").to_string();
    assert!(err.contains("single-column key"), "{err}");
    // Added later, after devices hold the orders: the gateway counts the orders it holds.
    let old = SyncSchema::parse(&REFERENCED[..REFERENCED.find("[[table]]\nname = \"customers\"").expect("present")])
        .expect("orders alone");
    let new = SyncSchema::parse(REFERENCED).expect("parses");
    assert!(new.check_replaces(&old, 1).is_ok());
    assert!(new.check_replaces(&new, 1).is_ok());
}
