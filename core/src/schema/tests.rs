use super::*;
use crate::clock::{Dot, Hlc, NodeId};
use crate::state::{Counter, CounterPart, Entry, Register, RowState};

const ORDERS: &str = r#"
roles = ["hq", "field"]

[[table]]
name = "work_orders"
key = ["id"]
delete_policy = "update-wins"
writers = ["hq", "field"]

[[table.column]]
name = "id"
type = "text"

[[table.column]]
name = "title"
type = "text"
nullable = false
default = ""
policy = "authority:hq>field"

[[table.column]]
name = "parts"
type = "integer"
policy = "counter"

[[table.column]]
name = "weight"
type = "real"

[[table]]
name = "price_list"
key = ["sku"]
direction = "down-only"

[[table.column]]
name = "sku"
type = "text"

[[table.column]]
name = "price"
type = "real"
"#;

fn schema(text: &str) -> SyncSchema {
    SyncSchema::parse(text).expect("schema")
}

fn write(table: &str, pk: Value, fields: &[(&str, Value)]) -> RowChange {
    let mut state = RowState::default();
    let dot = Dot { node: NodeId([1; 16]), counter: 1 };
    for (name, value) in fields {
        let mut r = Register::default();
        r.entries.push(Entry { value: value.clone(), dot, hlc: Hlc::new(1, 0) });
        state.fields.insert((*name).to_owned(), r);
    }
    RowChange { table: table.into(), pk: vec![pk], state }
}

#[test]
fn a_schema_file_declares_tables_columns_keys_policies_and_directions() {
    let s = schema(ORDERS);
    let orders = s.table("work_orders").expect("declared");
    assert_eq!(orders.key, vec!["id".to_owned()]);
    let spec = orders.spec();
    assert_eq!(spec.policy("parts"), &ColumnPolicy::Counter);
    assert_eq!(spec.policy("title"), &ColumnPolicy::Authority(vec!["hq".into(), "field".into()]));
    assert_eq!(spec.delete_policy, DeletePolicy::UpdateWins);
    let parts = orders.column("parts").expect("parts");
    assert_eq!((parts.nullable, parts.default.clone()), (false, Some(Value::Integer(0))));
    assert!(orders.column("weight").expect("weight").nullable);
    assert_eq!(s.table("price_list").expect("declared").direction, Direction::DownOnly);
    assert_eq!(orders.writers, vec!["hq".to_owned(), "field".to_owned()]);
    assert!(s.table("price_list").expect("declared").writers.is_empty(), "every role, when not said");
    assert_eq!(s.writers().keys().collect::<Vec<_>>(), vec!["work_orders"]);
}

#[test]
fn mistakes_in_a_schema_file_are_named() {
    let cases = [
        ("[[table]]\nname = \"t\"\nkey = []", "a key is required"),
        ("[[table]]\nname = \"t\"\nkey = [\"id\"]", "key column \"id\" is not declared"),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"integer\"",
            "lone integer",
        ),
        ("[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"uuid\"", "uuid"),
        ("[[table]]\nname = \"t\"\nkey = [\"id\"]\nkye = 1", "kye"),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
             [[table.column]]\nname = \"n\"\ntype = \"text\"\npolicy = \"counter\"",
            "must be an integer",
        ),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
             [[table.column]]\nname = \"n\"\ntype = \"text\"\npolicy = \"authority:crm\"",
            "role \"crm\"",
        ),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
             [[table.column]]\nname = \"n\"\ntype = \"integer\"\ndefault = \"x\"",
            "default is a text value",
        ),
        ("[[table]]\nname = \"_driftless_x\"\nkey = [\"id\"]", "reserved"),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\", \"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"integer\"",
            "listed twice",
        ),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
             [[table.column]]\nname = \"n\"\ntype = \"integer\"\npolicy = \"counter\"\ndefault = 5",
            "starts at 0",
        ),
        ("[[table]]\nname = \"a.b\"\nkey = [\"id\"]", "a table name is"),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\", \"at\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n\
             [[table.column]]\nname = \"at\"\ntype = \"real\"",
            "cannot be real",
        ),
        (
            "[[table]]\nname = \"t\"\nkey = [\"id\"]\nwriters = [\"crm\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"",
            "writers name role \"crm\"",
        ),
        (
            "roles = [\"hq\"]\n[[table]]\nname = \"t\"\nkey = [\"id\"]\nwriters = []\n\
             [[table.column]]\nname = \"id\"\ntype = \"text\"",
            "lets no device write it",
        ),
        (
            "roles = [\"hq\"]\n[[table]]\nname = \"t\"\nkey = [\"id\"]\nwriters = [\"hq\"]\n\
             direction = \"down-only\"\n[[table.column]]\nname = \"id\"\ntype = \"text\"",
            "no device writers",
        ),
    ];
    for (text, want) in cases {
        let err = SyncSchema::parse(text).expect_err(text).to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn rows_that_do_not_fit_the_schema_are_refused_with_the_reason() {
    let s = schema(ORDERS);
    let ok = write("work_orders", Value::Text("w1".into()), &[("title", Value::Text("pump".into()))]);
    assert_eq!(s.check_device_row(&ok), Ok(()));
    let refused = [
        (write("nope", Value::Text("x".into()), &[]), "not in the sync schema"),
        (write("price_list", Value::Text("x".into()), &[]), "written only by the cloud"),
        (write("work_orders", Value::Null, &[]), "is NULL"),
        (write("work_orders", Value::Integer(4), &[]), "is text, not an integer value"),
        (write("work_orders", Value::Text("w".into()), &[("colour", Value::Null)]), "no column \"colour\""),
        (write("work_orders", Value::Text("w".into()), &[("id", Value::Text("v".into()))]), "no column \"id\""),
        (write("work_orders", Value::Text("w".into()), &[("title", Value::Null)]), "NOT NULL"),
        (write("work_orders", Value::Text("w".into()), &[("weight", Value::Text("9".into()))]), "not a text value"),
        (write("work_orders", Value::Text("w".into()), &[("title", Value::RawText(vec![0xff]))]), "not valid UTF-8"),
        (write("work_orders", Value::Text("w".into()), &[("title", Value::Text("a\0b".into()))]), "NUL"),
        (write("work_orders", Value::Text("w".into()), &[("parts", Value::Integer(1))]), "is a counter"),
        (write("work_orders", Value::Text("w".into()), &[("weight", Value::Integer(3))]), "not an integer value"),
        (write("work_orders", Value::Text("w".into()), &[("weight", Value::Real(f64::NAN))]), "not NaN"),
    ];
    for (row, want) in refused {
        let err = s.check_device_row(&row).expect_err(want);
        assert!(err.contains(want), "{want}: {err}");
    }
    let mut counted = write("work_orders", Value::Text("w".into()), &[]);
    counted
        .state
        .counters
        .insert("weight".into(), Counter([(NodeId([1; 16]), CounterPart { seq: 1, total: 1 })].into()));
    assert!(s.check_device_row(&counted).expect_err("counts a non-counter").contains("not a counter"));
    let mut two_keys = write("work_orders", Value::Text("w".into()), &[]);
    two_keys.pk.push(Value::Text("extra".into()));
    assert!(s.check_device_row(&two_keys).expect_err("arity").contains("1 key columns"));
}

#[test]
fn a_schema_may_grow_but_not_drop_retype_or_rekey() {
    let old = schema(ORDERS);
    let grown = format!(
        "{ORDERS}\n[[table.column]]\nname = \"currency\"\ntype = \"text\"\ndefault = \"EUR\"\n\
         [[table]]\nname = \"notes\"\nkey = [\"id\"]\n[[table.column]]\nname = \"id\"\ntype = \"text\"\n"
    );
    schema(&grown).check_replaces(&old, 1).expect("adding a table and a column with a default");
    let repoliced = ORDERS.replace("policy = \"authority:hq>field\"", "policy = \"manual\"");
    schema(&repoliced).check_replaces(&old, 1).expect("changing a policy");
    let cases = [
        (ORDERS.replace("name = \"weight\"\ntype = \"real\"", "name = \"weight\"\ntype = \"text\""), "changed type"),
        (ORDERS.replace("[[table.column]]\nname = \"weight\"\ntype = \"real\"\n", ""), "dropped"),
        (ORDERS.replace("policy = \"counter\"", ""), "to or from a counter"),
        (ORDERS.replace("default = \"\"", "default = \"untitled\""), "changed its default"),
        (
            format!("{ORDERS}\n[[table.column]]\nname = \"must\"\ntype = \"text\"\nnullable = false\n"),
            "without a default",
        ),
        (
            ORDERS
                .replace("key = [\"sku\"]", "key = [\"sku\", \"price\"]")
                .replace("name = \"price\"\ntype = \"real\"", "name = \"price\"\ntype = \"text\""),
            "key of",
        ),
    ];
    for (text, want) in cases {
        let Ok(new) = SyncSchema::parse(&text) else { panic!("{want}: the new schema parses") };
        let err = new.check_replaces(&old, 7).expect_err(want).to_string();
        assert!(err.contains(want) && err.contains("version 7"), "{want}: {err}");
    }
}

#[test]
fn devices_create_strict_tables_from_it() {
    let s = schema(ORDERS);
    let conn = rusqlite::Connection::open_in_memory().expect("open");
    for t in &s.tables {
        conn.execute_batch(&t.sqlite_create()).expect("create");
    }
    conn.execute("INSERT INTO work_orders(id) VALUES ('w1')", []).expect("defaults fill the rest");
    let (title, parts): (String, i64) =
        conn.query_row("SELECT title, parts FROM work_orders", [], |r| Ok((r.get(0)?, r.get(1)?))).expect("row");
    assert_eq!((title.as_str(), parts), ("", 0));
    assert!(conn.execute("INSERT INTO work_orders(id, parts) VALUES ('w2', 'many')", []).is_err(), "STRICT");
    let t = s.table("work_orders").expect("declared");
    let added = SchemaColumn {
        name: "note_s".into(),
        ty: ColumnType::Blob,
        nullable: true,
        default: Some(Value::Blob(vec![0xde, 0xad])),
        policy: ColumnPolicy::Lww,
    };
    conn.execute_batch(&t.sqlite_add_column(&added)).expect("add column");
    let blob: Vec<u8> = conn.query_row("SELECT note_s FROM work_orders", [], |r| r.get(0)).expect("default");
    assert_eq!(blob, vec![0xde, 0xad]);
}
