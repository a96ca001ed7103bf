//! Round trips and refusals of every message.

use super::*;

#[test]
fn every_message_round_trips_and_garbage_is_a_typed_error() {
    let limits = Limits::default();
    let e = Epoch([3; 16]);
    let c = LogCursor { position: 77, tag: u64::MAX - 5 };
    let ups = [
        Uplink::Hello {
            device: "tab-1".into(),
            node: NodeId([9; 16]),
            counter: 12,
            outbox_seq: 40,
            receipts: vec![LogCursor { position: 3, tag: 1 }, c],
            epoch: Some(e),
        },
        Uplink::Hello {
            device: "tab-1".into(),
            node: NodeId([9; 16]),
            counter: 0,
            outbox_seq: 0,
            receipts: vec![],
            epoch: None,
        },
        Uplink::Batch {
            device: "tab-1".into(),
            id: 1 << 40,
            first_seq: 3,
            last_seq: 9,
            epoch: Some(e),
            receipts: vec![c],
            batch: vec![1, 2, 3],
        },
        Uplink::Pull {
            device: "tab-1".into(),
            epoch: Some(e),
            cursor: Some(c),
            receipts: vec![c],
            max_rows: 500,
            max_bytes: 1 << 20,
            echo: None,
        },
        Uplink::Pull {
            device: "tab-1".into(),
            epoch: None,
            cursor: None,
            receipts: vec![],
            max_rows: 500,
            max_bytes: 1 << 20,
            echo: Some(1 << 33),
        },
        Uplink::PullSnapshot {
            device: "tab-1".into(),
            epoch: e,
            resume: vec![9, 9],
            log_cursor: c,
            max_rows: 500,
            max_bytes: 1,
            name_from: false,
            echo: None,
        },
        Uplink::PullSnapshot {
            device: "tab-1".into(),
            epoch: e,
            resume: vec![],
            log_cursor: c,
            max_rows: 500,
            max_bytes: 1,
            name_from: true,
            echo: None,
        },
        Uplink::PullSnapshot {
            device: "tab-1".into(),
            epoch: e,
            resume: vec![3],
            log_cursor: c,
            max_rows: 500,
            max_bytes: 1,
            name_from: true,
            echo: Some(0),
        },
        Uplink::LegacyBatch { device: "tab-1".into(), first_seq: 3, last_seq: 9, batch: vec![1, 2, 3] },
        Uplink::LegacyPull { device: "tab-1".into(), cursor: 77, max_rows: 500 },
        Uplink::LegacyPullSnapshot { device: "tab-1".into(), resume: vec![9, 9], log_cursor: 12, max_rows: 500 },
    ];
    for m in ups {
        assert_eq!(Uplink::decode(&m.encode(), &limits), Ok(m));
    }
    let page = |from, echo, done| Downlink::Snapshot {
        epoch: e,
        from,
        echo,
        resume: vec![2],
        log_cursor: c,
        done,
        batch: vec![7],
    };
    let downs = [
        Downlink::Welcome { epoch: e, node_counter: 5, device_seq: 9, node_elsewhere: true },
        Downlink::Schema { version: 3, text: "[[table]]\nname = \"t\"".into() },
        Downlink::SlowDown { retry_after_ms: 1_500 },
        Downlink::Ack { epoch: e, id: 4, first_seq: 1, last_seq: 2, refused: vec![], receipt: None, previous: None },
        Downlink::Ack {
            epoch: e,
            id: 4,
            first_seq: 1,
            last_seq: 9,
            refused: vec![RefusedRow { index: 3, reason: "NULL key".into() }],
            receipt: Some(c),
            previous: Some(LogCursor { position: 3, tag: 9 }),
        },
        Downlink::Nack { epoch: e, id: 4, first_seq: 1, last_seq: 2, reason: "bad".into() },
        Downlink::Changes { epoch: e, from: 70, cursor: c, more: true, echo: None, batch: vec![4] },
        Downlink::Changes { epoch: e, from: 70, cursor: c, more: false, echo: Some(3), batch: vec![4] },
        page(None, None, true),
        page(Some(vec![]), None, false),
        page(Some(vec![1]), None, true),
        page(Some(vec![]), Some(2), false),
        Downlink::ScopedChanges {
            epoch: e,
            from: 70,
            cursor: c,
            more: false,
            echo: None,
            evict: vec![7, 8],
            batch: vec![4],
        },
        Downlink::ScopedChanges {
            epoch: e,
            from: 70,
            cursor: c,
            more: true,
            echo: Some(9),
            evict: vec![],
            batch: vec![],
        },
        Downlink::Scope { epoch: e, version: 4, tables: vec!["work_orders".into(), "inspections".into()] },
        Downlink::Scope { epoch: e, version: 0, tables: vec![] },
        Downlink::Follow { epoch: e, scope: "s0123abcd".into() },
        Downlink::SnapshotSize { epoch: e, rows: 10_000, bytes: 1 << 40 },
        Downlink::Feed {
            epoch: e,
            scope: "all".into(),
            previous: LogCursor { position: 69, tag: 7 },
            cursor: c,
            origin: "tab-1".into(),
            batch: vec![4, 5],
            evict: vec![],
        },
        Downlink::Feed {
            epoch: e,
            scope: "r-north".into(),
            previous: LogCursor::default(),
            cursor: c,
            origin: String::new(),
            batch: vec![],
            evict: vec![],
        },
        Downlink::Feed {
            epoch: e,
            scope: "s0123abcd".into(),
            previous: LogCursor { position: 3, tag: 1 },
            cursor: c,
            origin: "tab-2".into(),
            batch: vec![9],
            evict: vec![1, 2, 3],
        },
        Downlink::LegacyAck { first_seq: 1, last_seq: 2 },
        Downlink::LegacyNack { first_seq: 1, last_seq: 2, reason: "bad".into() },
        Downlink::LegacyChanges { cursor: 5, more: true, batch: vec![4] },
        Downlink::LegacySnapshot { resume: vec![1], log_cursor: 8, done: false, batch: vec![] },
    ];
    for m in downs {
        assert_eq!(Downlink::decode(&m.encode(), &limits), Ok(m));
    }
    assert!(Uplink::decode(&[11, 0], &limits).is_err());
    assert!(Downlink::decode(&[], &limits).is_err());
    // A truncated cursor or epoch is an error, not a panic.
    let pull = Uplink::Pull {
        device: "d".into(),
        epoch: Some(e),
        cursor: Some(c),
        receipts: vec![c],
        max_rows: 1,
        max_bytes: 1,
        echo: Some(1),
    }
    .encode();
    for len in 0..pull.len() {
        assert!(Uplink::decode(&pull[..len], &limits).is_err());
    }
    // A device keeps a bounded number of receipts; a message claiming more is refused.
    let many = vec![c; crate::protocol::MAX_RECEIPTS + 1];
    let hello = Uplink::Hello {
        device: "d".into(),
        node: NodeId([1; 16]),
        counter: 1,
        outbox_seq: 1,
        receipts: many,
        epoch: None,
    };
    assert!(Uplink::decode(&hello.encode(), &limits).is_err());
}
