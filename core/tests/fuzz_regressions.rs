//! Inputs the `merge_apply` fuzz target (core/fuzz) once failed on, checked on every test run:
//! the two batches cut from each must join the same way in either order.

use driftless_core::codec::{Dictionaries, Limits, decode_batch};
use driftless_core::join_row;

#[test]
fn recorded_fuzz_inputs_join_the_same_way_in_either_order() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions directory") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read input");
        // The fuzz target's input format: one byte for where the first batch ends.
        let cut = data.first().map_or(0, |c| *c as usize).min(data.len().saturating_sub(1));
        let rest = data.get(1..).unwrap_or_default();
        let (left, right) = rest.split_at(cut.min(rest.len()));
        let limits = Limits { max_decompressed: 1 << 18, ..Limits::default() };
        let (Ok(x), Ok(y)) = (
            decode_batch(left, &limits, &Dictionaries::default()),
            decode_batch(right, &limits, &Dictionaries::default()),
        ) else {
            // A dot of counter 0 is not a dot: such a batch is refused at the door.
            assert!(path.ends_with("merge_apply-zero-counter-dot"), "{} no longer decodes", path.display());
            continue;
        };
        for a in &x.rows {
            for b in y.rows.iter().filter(|b| b.table == a.table && b.pk == a.pk) {
                let (mut ab, mut ba) = (a.state.clone(), b.state.clone());
                join_row(&mut ab, &b.state);
                join_row(&mut ba, &a.state);
                assert_eq!(ab, ba, "join is not commutative");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the recorded inputs hold rows to join");
}
