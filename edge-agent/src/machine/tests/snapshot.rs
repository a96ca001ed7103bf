//! A snapshot's progress: what the gateway counted, and what each page adds, noted with the
//! page and shown in the live status until the last page.

use driftless_core::SnapshotProgress;

use super::*;

#[test]
fn a_snapshots_progress_counts_the_pages_against_what_the_gateway_counted() {
    let mut m = snapshotting_machine();
    let out = m.handle_all(
        [
            Input::Downlink(Downlink::SnapshotSize { epoch: E1, rows: 2, bytes: 500 }),
            snapshot_page(None, &[1], false, &one_row()),
        ],
        1,
    );
    assert!(out.iter().any(|a| matches!(a, Action::Progress(Progress::Start { label: "snapshot", total: 2 }))));
    let Some(StoreOp::ApplyPage { at, .. }) = store_op(&out) else { panic!("{out:?}") };
    let noted = at.progress;
    assert_eq!((noted.rows_done, noted.rows_total, noted.bytes_total), (1, 2, 500), "noted with the page");
    assert!(noted.bytes_done > 0);
    m.handle(Input::Store(taken()), 1);
    assert_eq!(m.live().snapshot, Some(noted));
    m.handle(Input::Store(StoreResult::Done), 1);
    m.handle(snapshot_page(Some(&[1]), &[], true, &one_row()), 2);
    m.handle(Input::Store(taken()), 2);
    assert_eq!(m.live().snapshot, None::<SnapshotProgress>, "done");
}
