//! Property tests: replicas that make random concurrent changes and exchange batches in random
//! order, with duplicates and late redelivery, end up identical.

mod common;

use common::*;
use driftless_core::codec::{Dictionaries, EncodeOptions, Limits, decode_batch, encode_batch};
use driftless_core::{ColumnPolicy, DeletePolicy, Store, TableSpec, Value};
use proptest::prelude::*;

const KEYS: [&str; 4] =
    ["0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7", "site-7/valve", "x"];

#[derive(Debug, Clone)]
enum Action {
    Insert {
        replica: usize,
        key: usize,
        site: u8,
    },
    Update {
        replica: usize,
        key: usize,
        column: usize,
        value: i8,
    },
    Count {
        replica: usize,
        key: usize,
        delta: i16,
    },
    Delete {
        replica: usize,
        key: usize,
    },
    /// Seal and put the replica's outbox on the network.
    Send {
        replica: usize,
    },
    /// Deliver one in-flight message; `keep` leaves it in flight for a later duplicate.
    Deliver {
        replica: usize,
        pick: prop::sample::Index,
        keep: bool,
    },
    Tick {
        ms: u16,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let r = 0usize..5;
    let k = 0usize..KEYS.len();
    prop_oneof![
        2 => (r.clone(), k.clone(), any::<u8>()).prop_map(|(replica, key, site)| Action::Insert { replica, key, site }),
        4 => (r.clone(), k.clone(), 0usize..3, any::<i8>())
            .prop_map(|(replica, key, column, value)| Action::Update { replica, key, column, value }),
        2 => (r.clone(), k.clone(), -50i16..50).prop_map(|(replica, key, delta)| Action::Count { replica, key, delta }),
        1 => (r.clone(), k).prop_map(|(replica, key)| Action::Delete { replica, key }),
        3 => r.clone().prop_map(|replica| Action::Send { replica }),
        4 => (r, any::<prop::sample::Index>(), prop::bool::weighted(0.2))
            .prop_map(|(replica, pick, keep)| Action::Deliver { replica, pick, keep }),
        1 => any::<u16>().prop_map(|ms| Action::Tick { ms }),
    ]
}

const COLUMNS: [&str; 3] = ["site", "status", "notes"];

fn spec(delete_policy: DeletePolicy) -> TableSpec {
    TableSpec::new()
        .column("stock", ColumnPolicy::Counter)
        .column("notes", ColumnPolicy::Manual)
        .column("site", "authority:hq>field".parse().expect("policy"))
        .delete_policy(delete_policy)
}

struct Net {
    stores: Vec<Store>,
    /// Encoded batches in flight to each replica.
    inbox: Vec<Vec<Vec<u8>>>,
}

impl Net {
    fn send(&mut self, from: usize) {
        while let Some(out) = self.stores[from].outbox_batch(7).expect("outbox") {
            let bytes = encode_batch(&out.batch, EncodeOptions::default());
            for (to, inbox) in self.inbox.iter_mut().enumerate() {
                if to != from {
                    inbox.push(bytes.clone());
                }
            }
            self.stores[from].ack(out.first_seq, out.last_seq).expect("ack");
        }
    }

    /// Delivers everything still in flight in an order drawn from `picks`, duplicating about
    /// one message in `dup_one_in` (each duplicate arrives once more, later).
    fn quiesce(&mut self, picks: &[prop::sample::Index], dup_one_in: usize) {
        let mut picks = picks.iter().cycle();
        for to in 0..self.inbox.len() {
            let extra: Vec<Vec<u8>> = self.inbox[to]
                .iter()
                .filter(|_| picks.next().is_some_and(|p| p.index(dup_one_in) == 0))
                .cloned()
                .collect();
            self.inbox[to].extend(extra);
            while !self.inbox[to].is_empty() {
                let at = picks.next().expect("cycle").index(self.inbox[to].len());
                self.deliver(to, at, false);
            }
        }
    }

    fn deliver(&mut self, to: usize, at: usize, keep: bool) {
        let bytes = if keep { self.inbox[to][at].clone() } else { self.inbox[to].swap_remove(at) };
        let batch = decode_batch(&bytes, &Limits::default(), &Dictionaries::default()).expect("decode");
        self.stores[to].apply(&batch).expect("apply");
    }
}

fn run(n: usize, delete_policy: DeletePolicy, actions: &[Action], final_order: &[prop::sample::Index]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::at(1_000_000);
    let stores: Vec<Store> = (0..n)
        .map(|i| {
            open(
                dir.path(),
                &format!("r{i}.db"),
                clock.options(if i == 0 { "hq" } else { "field" }),
                spec(delete_policy),
            )
        })
        .collect();
    let mut net = Net { stores, inbox: vec![Vec::new(); n] };
    for a in actions {
        match *a {
            Action::Insert { replica, key, site } => exec(
                &mut net.stores[replica % n],
                &format!(
                    "INSERT OR IGNORE INTO inspections(id, site, status) VALUES ('{}', 'site {site}', 'new')",
                    KEYS[key]
                ),
            ),
            Action::Update { replica, key, column, value } => exec(
                &mut net.stores[replica % n],
                &format!("UPDATE inspections SET {} = '{value}' WHERE id = '{}'", COLUMNS[column], KEYS[key]),
            ),
            Action::Count { replica, key, delta } => exec(
                &mut net.stores[replica % n],
                &format!("UPDATE inspections SET stock = stock + {delta} WHERE id = '{}'", KEYS[key]),
            ),
            Action::Delete { replica, key } => {
                exec(&mut net.stores[replica % n], &format!("DELETE FROM inspections WHERE id = '{}'", KEYS[key]))
            }
            Action::Send { replica } => net.send(replica % n),
            Action::Deliver { replica, pick, keep } => {
                let to = replica % n;
                if !net.inbox[to].is_empty() {
                    let at = pick.index(net.inbox[to].len());
                    net.deliver(to, at, keep);
                }
            }
            Action::Tick { ms } => clock.set(clock.0.load(std::sync::atomic::Ordering::SeqCst) + u64::from(ms)),
        }
    }
    // Quiesce: everyone sends, then every message arrives in a random order, some twice.
    for i in 0..n {
        net.send(i);
    }
    net.quiesce(final_order, 4);
    let all = "SELECT id, site, status, notes, stock FROM inspections ORDER BY id";
    let expected = rows(&net.stores[0], all);
    let mut expected_conflicts = net.stores[0].conflicts().expect("conflicts");
    expected_conflicts.sort_by_key(|c| format!("{c:?}"));
    for s in &net.stores {
        assert_eq!(rows(s, all), expected, "tables differ");
        let mut conflicts = s.conflicts().expect("conflicts");
        conflicts.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(conflicts, expected_conflicts, "conflict records differ");
        assert_eq!(s.pending_changes().expect("pending"), 0, "a replica re-captured remote changes");
    }
    // A replica bootstrapped from a snapshot matches as well.
    let mut fresh = open(dir.path(), "fresh.db", clock.options("field"), spec(delete_policy));
    let (snapshot, _) = net.stores[0].snapshot(None, 1_000).expect("snapshot");
    fresh.apply(&snapshot).expect("apply snapshot");
    assert_eq!(rows(&fresh, all), expected, "snapshot differs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_under_any_delivery_order(
        n in 3usize..=5,
        delete_wins in any::<bool>(),
        actions in proptest::collection::vec(action(), 10..60),
        final_order in proptest::collection::vec(any::<prop::sample::Index>(), 1..16),
    ) {
        let policy = if delete_wins { DeletePolicy::DeleteWins } else { DeletePolicy::UpdateWins };
        run(n, policy, &actions, &final_order);
    }

    #[test]
    fn counters_sum_exactly_under_duplicates_and_reordering(
        n in 3usize..=5,
        deltas in proptest::collection::vec((0usize..5, 0usize..2, -1000i64..1000, prop::bool::weighted(0.3)), 1..40),
        final_order in proptest::collection::vec(any::<prop::sample::Index>(), 1..16),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::at(1_000_000);
        let stores: Vec<Store> =
            (0..n).map(|i| open(dir.path(), &format!("r{i}.db"), clock.options("field"), spec(DeletePolicy::DeleteWins))).collect();
        let mut net = Net { stores, inbox: vec![Vec::new(); n] };
        exec(&mut net.stores[0], &format!("INSERT INTO inspections(id, stock) VALUES ('{}', 100), ('{}', -5)", KEYS[0], KEYS[1]));
        net.send(0);
        for to in 1..n {
            net.deliver(to, 0, false);
        }
        let mut expected = [100i64, -5];
        for (replica, key, delta, send) in deltas {
            exec(&mut net.stores[replica % n], &format!("UPDATE inspections SET stock = stock + {delta} WHERE id = '{}'", KEYS[key]));
            expected[key] += delta;
            if send {
                net.send(replica % n);
            }
        }
        for i in 0..n {
            net.send(i);
        }
        net.quiesce(&final_order, 3);
        for s in &net.stores {
            let got = rows(s, "SELECT stock FROM inspections ORDER BY id");
            prop_assert_eq!(got, vec![vec![Value::Integer(expected[0])], vec![Value::Integer(expected[1])]]);
        }
    }
}
