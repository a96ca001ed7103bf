use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::clock::{Dot, Hlc, VersionVector};
use crate::state::{Counter, CounterPart, Entry, Life, Register};
use crate::value::Value;

fn node(i: u8) -> NodeId {
    NodeId([i.wrapping_mul(37).wrapping_add(1); 16])
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0)].prop_map(Value::Integer),
        any::<u64>().prop_map(|b| Value::Real(f64::from_bits(b))),
        prop_oneof![Just(-0.0f64), Just(f64::NAN), Just(f64::INFINITY)].prop_map(Value::Real),
        ".{0,20}".prop_map(Value::Text),
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".prop_map(Value::Text),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Blob),
        // Not valid UTF-8 (a lone continuation byte first), as SQLite may hold in TEXT.
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(|mut b| {
            b.insert(0, 0x80);
            Value::RawText(b)
        }),
    ]
}

fn dot() -> impl Strategy<Value = (Dot, Hlc)> {
    (0u8..5, 1u64..1_000_000, any::<u64>()).prop_map(|(n, c, h)| (Dot { node: node(n), counter: c }, Hlc(h)))
}

fn register<T: std::fmt::Debug + Clone>(payload: impl Strategy<Value = T>) -> impl Strategy<Value = Register<T>> {
    (proptest::collection::vec((payload, dot()), 0..3), proptest::collection::vec((0u8..5, 1u64..1_000_000), 0..3))
        .prop_map(|(entries, extra)| {
            let mut reg = Register::default();
            for (value, (dot, hlc)) in entries {
                if reg.entries.iter().all(|e: &Entry<T>| e.dot != dot) {
                    reg.ctx.advance(dot.node, dot.counter);
                    reg.entries.push(Entry { value, dot, hlc });
                }
            }
            for (n, c) in extra {
                reg.ctx.advance(node(n), c);
            }
            reg.entries.sort_by_key(|e| e.dot);
            reg
        })
}

fn life() -> impl Strategy<Value = Life> {
    prop_oneof![
        Just(Life::Alive),
        proptest::collection::btree_map("[a-z]{1,6}", proptest::collection::vec((0u8..5, 1u64..99), 0..3), 0..3)
            .prop_map(|seen| Life::Dead {
                seen: seen.into_iter().map(|(c, v)| (c, v.into_iter().map(|(n, k)| (node(n), k)).collect())).collect()
            }),
    ]
}

fn row_state() -> impl Strategy<Value = RowState> {
    (
        register(life()),
        proptest::collection::btree_map("[a-z_]{1,8}", register(value()), 0..6),
        proptest::collection::btree_map(
            "[a-z]{1,5}",
            proptest::collection::btree_map(0u8..5, (any::<u64>(), any::<i64>()), 1..3),
            0..2,
        ),
    )
        .prop_map(|(life, fields, counters)| RowState {
            life,
            fields,
            counters: counters
                .into_iter()
                .map(|(c, parts)| {
                    (
                        c,
                        Counter(
                            parts.into_iter().map(|(n, (seq, total))| (node(n), CounterPart { seq, total })).collect(),
                        ),
                    )
                })
                .collect(),
        })
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        proptest::collection::btree_map(0u8..5, "[a-z]{0,6}", 0..3),
        proptest::collection::vec(("(items|jobs|t)", proptest::collection::vec(value(), 1..3), row_state()), 0..8),
    )
        .prop_map(|(roles, rows)| Batch {
            roles: roles.into_iter().filter(|(_, r)| !r.is_empty()).map(|(n, r)| (node(n), r)).collect(),
            rows: rows.into_iter().map(|(table, pk, state)| RowChange { table, pk, state }).collect(),
        })
}

proptest! {
    #[test]
    fn any_batch_round_trips_bit_exactly(batch in batch(), level in prop_oneof![Just(None), Just(Some(1)), Just(Some(19))]) {
        let bytes = encode_batch(&batch, EncodeOptions { level, dictionary: None });
        let back = decode_batch(&bytes, &Limits::default(), &Dictionaries::default()).expect("decodes");
        prop_assert_eq!(back, batch);
    }

    #[test]
    fn any_row_state_round_trips_through_store_metadata(state in row_state()) {
        let (mut nodes, mut columns) = (Interner::default(), Interner::default());
        let bytes = encode_row_state(&state, &mut nodes, &mut columns);
        prop_assert_eq!(decode_row_state(&bytes, &nodes, &columns, &Limits::default()).expect("decodes"), state);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes, &Limits::default(), &Dictionaries::default());
        let _ = decode_payload(&bytes, &Limits::default());
    }

    #[test]
    fn corrupted_batches_fail_cleanly(batch in batch(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = encode_batch(&batch, EncodeOptions { level: None, dictionary: None });
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b | 1;
        }
        let _ = decode_batch(&bytes, &Limits::default(), &Dictionaries::default());
    }
}

fn sample_batch() -> Batch {
    let n = node(1);
    let mut fields = BTreeMap::new();
    let mut reg = Register::default();
    reg.overwrite(Value::Text("inspected".into()), Dot { node: n, counter: 7 }, Hlc(1 << 30));
    fields.insert("status".to_owned(), reg);
    let state = RowState { fields, ..RowState::default() };
    Batch { roles: BTreeMap::new(), rows: vec![RowChange { table: "jobs".into(), pk: vec![Value::Integer(1)], state }] }
}

#[test]
fn a_payload_goes_compressed_only_where_that_makes_it_shorter() {
    let flags = |bytes: &[u8]| bytes[5];
    // One short row: zstd's frame would make it longer.
    let small = encode_batch(&sample_batch(), EncodeOptions::default());
    assert_eq!(flags(&small), 0);
    assert_eq!(small.len(), encode_batch(&sample_batch(), EncodeOptions { level: None, dictionary: None }).len());
    // Many alike rows: compressed.
    let mut many = sample_batch();
    for i in 2..200 {
        let mut row = many.rows[0].clone();
        row.pk = vec![Value::Integer(i)];
        many.rows.push(row);
    }
    let big = encode_batch(&many, EncodeOptions::default());
    assert_eq!(flags(&big), FLAG_ZSTD);
    assert!(big.len() * 4 < encode_batch(&many, EncodeOptions { level: None, dictionary: None }).len());
    for (bytes, sent) in [(small, sample_batch()), (big, many)] {
        assert_eq!(decode_batch(&bytes, &Limits::default(), &Dictionaries::default()), Ok(sent));
    }
}

#[test]
fn wrong_magic_and_unknown_versions_are_refused() {
    let mut bytes = encode_batch(&sample_batch(), EncodeOptions::default());
    let dicts = Dictionaries::default();
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(decode_batch(&bad, &Limits::default(), &dicts), Err(DecodeError::BadMagic));
    for version in [0, PROTOCOL_VERSION + 1, 255] {
        bytes[4] = version;
        assert_eq!(decode_batch(&bytes, &Limits::default(), &dicts), Err(DecodeError::UnsupportedVersion(version)));
    }
}

#[test]
fn zstd_bomb_is_refused_at_the_limit() {
    // 64 MiB of zeros compresses to a few kilobytes; the envelope declares a small size.
    let huge = vec![0u8; 64 << 20];
    let compressed = zstd::bulk::compress(&huge, 3).expect("compresses");
    assert!(compressed.len() < 64 << 10);
    let mut w = Writer::default();
    w.raw(&MAGIC);
    w.u8(PROTOCOL_VERSION);
    w.u8(FLAG_ZSTD);
    w.varint(1_000);
    w.raw(&compressed);
    let err = decode_batch(&w.buf, &Limits::default(), &Dictionaries::default()).expect_err("refused");
    assert!(matches!(err, DecodeError::Decompress(_)), "{err:?}");
    // Declaring the true size is refused before decompressing anything.
    let limits = Limits { max_decompressed: 1 << 20, ..Limits::default() };
    let mut w = Writer::default();
    w.raw(&MAGIC);
    w.u8(PROTOCOL_VERSION);
    w.u8(FLAG_ZSTD);
    w.varint(huge.len() as u64);
    w.raw(&compressed);
    assert!(matches!(
        decode_batch(&w.buf, &limits, &Dictionaries::default()),
        Err(DecodeError::LimitExceeded { what: "decompressed size", .. })
    ));
}

#[test]
fn each_count_limit_is_enforced() {
    let bytes = encode_batch(&sample_batch(), EncodeOptions { level: None, dictionary: None });
    let dicts = Dictionaries::default();
    let cases: Vec<(Limits, &str)> = vec![
        (Limits { max_rows: 0, ..Limits::default() }, "rows"),
        (Limits { max_nodes: 0, ..Limits::default() }, "nodes"),
        (Limits { max_columns: 0, ..Limits::default() }, "columns"),
        (Limits { max_tables: 0, ..Limits::default() }, "tables"),
        (Limits { max_key_values: 0, ..Limits::default() }, "primary key values"),
        (Limits { max_register_entries: 0, ..Limits::default() }, "register entries"),
        (Limits { max_name_bytes: 3, ..Limits::default() }, "name bytes"),
        (Limits { max_decompressed: 8, ..Limits::default() }, "decompressed size"),
    ];
    for (limits, expected) in cases {
        match decode_batch(&bytes, &limits, &dicts) {
            Err(DecodeError::LimitExceeded { what, .. }) => assert_eq!(what, expected),
            other => panic!("{expected}: {other:?}"),
        }
    }
    let mut long = sample_batch();
    long.rows[0].pk = vec![Value::Text("x".repeat(100))];
    let bytes = encode_batch(&long, EncodeOptions { level: None, dictionary: None });
    let limits = Limits { max_value_bytes: 50, ..Limits::default() };
    assert!(matches!(
        decode_batch(&bytes, &limits, &dicts),
        Err(DecodeError::LimitExceeded { what: "text value bytes", .. })
    ));
}

#[test]
fn trained_dictionary_round_trips_and_unknown_id_is_refused() {
    let samples: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            let mut b = sample_batch();
            b.rows[0].pk = vec![Value::Integer(i)];
            encode_payload(&b)
        })
        .collect();
    let dict = Dictionary::train(42, &samples, 4096).expect("trains");
    let bytes = encode_batch(&sample_batch(), EncodeOptions { level: Some(3), dictionary: Some(&dict) });
    let mut dicts = Dictionaries::default();
    assert_eq!(decode_batch(&bytes, &Limits::default(), &dicts), Err(DecodeError::UnknownDictionary(42)));
    dicts.insert(dict);
    assert_eq!(decode_batch(&bytes, &Limits::default(), &dicts), Ok(sample_batch()));
}

#[test]
fn entry_outside_its_context_is_refused() {
    let mut batch = sample_batch();
    let reg = batch.rows[0].state.fields.get_mut("status").expect("field");
    reg.ctx = VersionVector::new();
    let bytes = encode_batch(&batch, EncodeOptions { level: None, dictionary: None });
    assert!(matches!(decode_batch(&bytes, &Limits::default(), &Dictionaries::default()), Err(DecodeError::Invalid(_))));
}

#[test]
fn long_version_vectors_are_refused_at_the_limit() {
    let mut batch = sample_batch();
    let reg = batch.rows[0].state.fields.get_mut("status").expect("field");
    reg.ctx.advance(node(2), 3);
    reg.ctx.advance(node(3), 9);
    let bytes = encode_batch(&batch, EncodeOptions { level: None, dictionary: None });
    let limits = Limits { max_vector_len: 2, ..Limits::default() };
    assert!(matches!(
        decode_batch(&bytes, &limits, &Dictionaries::default()),
        Err(DecodeError::LimitExceeded { what: "version vector entries", .. })
    ));
    assert_eq!(decode_batch(&bytes, &Limits::default(), &Dictionaries::default()), Ok(batch));
}
