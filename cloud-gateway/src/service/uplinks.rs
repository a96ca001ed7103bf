//! Uplinks handled in groups: each delivery's attempt bookkeeping, retries and caught
//! panics, the group's commit, and the answers sent only after it (group commit).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driftless_core::protocol::Uplink;
use rumqttc::{AsyncClient, Publish};
use sha2::{Digest, Sha256};

use super::{MAX_ATTEMPTS, Pokes, QUARANTINE, now_ms};
use crate::acks::{Acks, Ticket};
use crate::error::{Error, Result};
use crate::handler::{HandlerConfig, Outgoing, handle_uplink};
use crate::storage::GatewayStore;

/// The content a message is recognised by across deliveries and resends: a batch's identity
/// without its per-publish id (a device resends the same entries under a new id).
fn content_key(topic: &str, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    match Uplink::decode(payload, &driftless_core::codec::Limits::default()) {
        Ok(Uplink::Batch { first_seq, last_seq, batch, .. }) => {
            h.update(b"batch");
            h.update(first_seq.to_le_bytes());
            h.update(last_seq.to_le_bytes());
            h.update(&batch);
        }
        _ => h.update(payload),
    }
    h.finalize().into()
}

/// What happened to one delivery.
enum Handled {
    Done(Vec<Outgoing>),
    /// Set aside after failing too often.
    SetAside,
    /// The gateway failed; nothing is answered.
    Failed(String),
}

/// Handles one delivery on a blocking thread: attempt bookkeeping, retries of transient
/// storage errors, and panics caught.
fn handle_blocking<S: GatewayStore>(
    store: &mut S,
    cfg: &HandlerConfig,
    publish: &Publish,
    in_group: bool,
) -> Result<Handled> {
    let key = content_key(&publish.topic, &publish.payload);
    let previous = store.attempts(&key)?;
    handle_known(store, cfg, publish, (&key, previous), in_group)
}

/// [`handle_blocking`] for a delivery whose content key and attempts on record were read.
fn handle_known<S: GatewayStore>(
    store: &mut S,
    cfg: &HandlerConfig,
    publish: &Publish,
    (key, previous): (&[u8; 32], Option<(u32, i64)>),
    in_group: bool,
) -> Result<Handled> {
    let guarded = publish.dup || previous.is_some();
    if let Some((count, last_ms)) = previous
        && count >= MAX_ATTEMPTS
        && (now_ms() as i64).saturating_sub(last_ms) < QUARANTINE.as_millis() as i64
    {
        return Ok(Handled::SetAside);
    }
    let mut count = 0;
    if guarded {
        // Counted before trying, so a crash is counted too.
        count = store.note_attempt(key)?;
        if count == MAX_ATTEMPTS {
            let (tenant, device) = driftless_core::protocol::parse_uplink_topic(&publish.topic).unwrap_or(("", ""));
            let reason = format!("the gateway failed on this message {count} times; kept for replay, not refused");
            store.dead_letter(tenant, device, &reason, &publish.payload)?;
        }
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle_uplink(&mut *store, cfg, &publish.topic, &publish.payload, now_ms())
        }));
        match outcome {
            Ok(Ok(out)) => {
                if guarded {
                    store.clear_attempts(key)?;
                }
                return Ok(Handled::Done(out));
            }
            // Not inside a group: it holds the store's write lock, and the device resends.
            Ok(Err(e)) if attempt < 4 && e.is_transient() && !in_group => {
                tracing::warn!(attempt, "storage error, retrying in {delay:?}: {e}");
                std::thread::sleep(delay);
                delay *= 4;
            }
            // Storage that keeps failing (busy, full, I/O) is the gateway's fault, not the
            // message's: it is not counted towards setting the message aside, so once storage
            // is repaired it merges at the next redelivery rather than after a quarantine.
            // (Unless this attempt was the one that set it aside: its dead letter is written.)
            Ok(Err(e)) if e.is_transient() => {
                if guarded && count < MAX_ATTEMPTS {
                    store.unnote_attempt(key)?;
                }
                return Ok(Handled::Failed(e.to_string()));
            }
            Ok(Err(e)) => return failed(store, key, guarded, in_group, e.to_string()),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return failed(store, key, guarded, in_group, format!("panic: {what}"));
            }
        }
    }
    Ok(Handled::Failed("unreachable".into()))
}

/// A message that failed, not for the storage's sake: counted against it once, never
/// answered (the device sends it again). A guarded one was counted before it was tried; one
/// that spoiled its group is done again at once, alone, and counted then.
fn failed<S: GatewayStore>(
    store: &mut S,
    key: &[u8; 32],
    guarded: bool,
    in_group: bool,
    reason: String,
) -> Result<Handled> {
    let replayed = in_group && store.group_spoiled();
    if !guarded && !replayed {
        store.note_attempt(key)?;
    }
    Ok(Handled::Failed(reason))
}

/// How long one group of uplinks should take: each waits for its whole group, so this
/// bounds what grouping adds to a message's latency, while its one commit is shared by all.
const GROUP_BUDGET: Duration = Duration::from_millis(20);
/// The most uplinks in one group.
const GROUP_MAX: usize = 1_000;
/// The most uplinks of one device in one group: every message of a group waits for all of
/// it, so a device's backlog (a burst, a catch-up) must not make everyone's group long.
pub(super) const GROUP_PER_DEVICE: usize = 8;

/// How many uplinks fit the group budget, from what recent groups took.
#[derive(Debug)]
pub(super) struct Pace {
    /// Moving average of the time one uplink takes, in microseconds.
    per_message_us: f64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { per_message_us: 200.0 }
    }
}

impl Pace {
    pub(super) fn group_size(&self) -> usize {
        ((GROUP_BUDGET.as_micros() as f64 / self.per_message_us) as usize).clamp(1, GROUP_MAX)
    }

    pub(super) fn took(&mut self, n: usize, elapsed: Duration) {
        if n > 0 {
            let each = elapsed.as_micros() as f64 / n as f64;
            self.per_message_us = 0.8 * self.per_message_us + 0.2 * each.max(1.0);
        }
    }
}

/// Handles a group of deliveries on a blocking thread, and answers them only once the store
/// made the group durable (group commit: nothing acknowledged before it is durable).
pub(super) async fn handle_group<S: GatewayStore + 'static>(
    client: &AsyncClient,
    store: &Arc<Mutex<S>>,
    cfg: &Arc<HandlerConfig>,
    pokes: &mut Pokes,
    acks: &Acks,
    group: Vec<(Ticket, Publish)>,
) -> Result<()> {
    let (store2, cfg2) = (store.clone(), cfg.clone());
    let deliveries: Vec<Publish> = group.iter().map(|(_, p)| p.clone()).collect();
    let began = Instant::now();
    // SQLite work is blocking; no lock is held across an await.
    let (handled, took) = tokio::task::spawn_blocking(move || handle_group_blocking(&store2, &cfg2, &deliveries))
        .await
        .map_err(|e| Error::WorkerGone(e.to_string()))?;
    let (n, handed) = (group.len(), Instant::now());
    for ((ticket, publish), handled) in group.into_iter().zip(handled) {
        answer(client, pokes, &publish, handled).await?;
        // Acknowledged to the broker in every case: the message was merged, refused, or is
        // the device's to send again. Holding it would only stall this session.
        acks.done(client, ticket);
    }
    let answering = handed.elapsed();
    if began.elapsed() >= SLOW_GROUP {
        tracing::warn!(
            messages = n,
            store_lock_ms = took.lock.as_millis() as u64,
            merging_ms = took.merging.as_millis() as u64,
            committing_ms = took.committing.as_millis() as u64,
            answering_ms = answering.as_millis() as u64,
            "a slow group of merges"
        );
    }
    Ok(())
}

/// A group taking this long is logged with where its time went.
pub(super) const SLOW_GROUP: Duration = Duration::from_millis(200);

/// Where a group's time went on the store's thread.
#[derive(Default)]
struct GroupTimes {
    /// Waiting for the store (another task holding it).
    lock: Duration,
    merging: Duration,
    committing: Duration,
}

/// Handles a group's deliveries in the store's group transactions and commits them: what
/// could not be made durable is failed, not answered. A delivery tried before (the broker's
/// DUP flag, or an attempt on record) is handled alone, outside any group, as before groups:
/// its attempt is noted durably before it is tried, so a message that crashes the gateway is
/// counted and set aside even though a crash takes a whole group with it.
fn handle_group_blocking<S: GatewayStore>(
    store: &Mutex<S>,
    cfg: &HandlerConfig,
    deliveries: &[Publish],
) -> (Vec<Result<Handled>>, GroupTimes) {
    let waited = Instant::now();
    // A panic while the lock was held leaves a poisoned lock; the store rolled back whatever
    // was open as it unwound, so it is safe to go on using.
    let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
    let store = &mut *guard;
    let mut times = GroupTimes { lock: waited.elapsed(), ..GroupTimes::default() };
    let merging = Instant::now();
    let mut handled: Vec<Result<Handled>> = Vec::with_capacity(deliveries.len());
    // Where the open group starts in `handled` (and in `deliveries`: one result each).
    let mut open: Option<usize> = None;
    // The delivery whose failure spoiled a group: done again alone, so that a failure which
    // ends the whole transaction (SQLite's for some, such as a cloud table's `ON CONFLICT
    // ROLLBACK`) takes no other message with it. Its attempt is counted then, once.
    let mut spoiled_by: Option<usize> = None;
    while let Some(delivery) = deliveries.get(handled.len()) {
        let key = content_key(&delivery.topic, &delivery.payload);
        let previous = store.attempts(&key);
        // Not knowing counts as tried before: handled alone.
        let tried =
            delivery.dup || previous.as_ref().map_or(true, Option::is_some) || spoiled_by == Some(handled.len());
        if tried {
            close_group(store, &mut handled, open.take());
        } else if open.is_none() {
            match store.begin_group() {
                Ok(()) => open = Some(handled.len()),
                Err(e) => tracing::warn!("no group could be started; handling alone: {e}"),
            }
        }
        let outcome = match previous {
            Ok(previous) => handle_known(store, cfg, delivery, (&key, previous), open.is_some()),
            Err(_) => handle_blocking(store, cfg, delivery, open.is_some()),
        };
        if let Some(from) = open.filter(|_| store.group_spoiled()) {
            // It failed part-way in a group that keeps no savepoints: the group so far is
            // undone and done again, with one (see `storage::sqlite::group`). Nothing of it
            // was answered yet.
            tracing::debug!(from, "a message failed part-way; its group is done again");
            spoiled_by = Some(handled.len());
            if let Err(e) = store.abandon_group() {
                tracing::warn!("abandoning a group: {e}");
            }
            handled.truncate(from);
            open = None;
            continue;
        }
        handled.push(outcome);
    }
    times.merging = merging.elapsed();
    let committing = Instant::now();
    close_group(store, &mut handled, open);
    times.committing = committing.elapsed();
    (handled, times)
}

/// Commits the group that starts at `from` in `handled`; if that fails, none of it is
/// answered: the devices send it again, and what did merge is then acknowledged as a
/// duplicate.
fn close_group<S: GatewayStore>(store: &mut S, handled: &mut [Result<Handled>], from: Option<usize>) {
    let Some(from) = from else { return };
    if let Err(e) = store.commit_group() {
        tracing::error!("a group of merges could not be committed; none of it is answered: {e}");
        for h in &mut handled[from..] {
            if matches!(h, Ok(Handled::Done(_))) {
                *h = Ok(Handled::Failed(format!("the group's commit failed: {e}")));
            }
        }
    }
}

async fn answer(client: &AsyncClient, pokes: &mut Pokes, publish: &Publish, handled: Result<Handled>) -> Result<()> {
    match handled {
        Ok(Handled::Done(out)) => {
            for msg in out {
                super::send(client, pokes, msg).await?;
            }
        }
        Ok(Handled::SetAside) => {
            tracing::warn!(topic = %publish.topic, "a message that kept failing is set aside; not answered");
        }
        // Our fault (the bookkeeping failing too is ours): no answer, so the device keeps its
        // changes and sends them again.
        Ok(Handled::Failed(reason)) => {
            tracing::error!(topic = %publish.topic, %reason, "the gateway failed on a message; the device will resend it");
        }
        Err(e) => {
            tracing::error!(topic = %publish.topic, "the gateway failed on a message; the device will resend it: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use driftless_core::protocol::Uplink;
    use rumqttc::QoS;

    use super::*;
    use crate::handler::tests::{Fault, Faulty, device_batch, open};

    #[test]
    fn storage_that_keeps_failing_does_not_set_the_message_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut publish = batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)");
        let mut store = Faulty(open(&dir), Fault::Merges);
        let cfg = HandlerConfig::default();
        // Redeliveries well past the limit for a message the gateway fails on.
        for delivery in 0..MAX_ATTEMPTS + 1 {
            publish.dup = delivery > 0;
            let handled = handle_blocking(&mut store, &cfg, &publish, false).expect("handled");
            assert!(matches!(handled, Handled::Failed(_)), "delivery {delivery} was set aside");
        }
        let key = content_key(&publish.topic, &publish.payload);
        assert_eq!(store.attempts(&key).expect("attempts"), None, "the gateway's fault is not counted");
        assert!(store.0.dead_letters(&Default::default()).expect("letters").is_empty());
    }

    /// Device a's next batch (its outbox entry `seq`).
    fn batch_publish(dir: &tempfile::TempDir, seq: i64, sql: &str) -> Publish {
        publish_from("a", dir, seq, sql)
    }

    /// `device`'s next batch (its outbox entry `seq`), written in its store in `dir`.
    fn publish_from(device: &str, dir: &tempfile::TempDir, seq: i64, sql: &str) -> Publish {
        let batch = device_batch(dir, sql);
        let (name, id) = (device.to_owned(), seq as u64);
        let msg =
            Uplink::Batch { device: name, id, first_seq: seq, last_seq: seq, epoch: None, receipts: vec![], batch };
        Publish::new(format!("driftless/t/{device}/up"), QoS::AtLeastOnce, msg.encode())
    }

    #[test]
    fn a_message_failing_part_way_leaves_nothing_in_its_group_and_the_others_are_kept() {
        // The statement fails, the transaction stays open.
        fails_part_way("FAIL");
    }

    #[test]
    fn a_message_whose_failure_ends_the_groups_transaction_fails_alone_and_is_counted_once() {
        // The failure rolls the whole transaction back, the group's other messages with it
        // (as a cloud table's `ON CONFLICT ROLLBACK` does).
        fails_part_way("ROLLBACK");
    }

    /// Device b's message fails on its log entry, after b's row was written, by a trigger
    /// raising `raise`: with no savepoint in the group, that row would stay in it.
    fn fails_part_way(raise: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let devices: Vec<_> = (0..4).map(|_| tempfile::tempdir().expect("tempdir")).collect();
        let store = open(&dir);
        let conn = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
        conn.execute_batch(&format!(
            "CREATE TRIGGER fail_b BEFORE INSERT ON gw_log WHEN NEW.origin = 'b'
             BEGIN SELECT RAISE({raise}, 'the disk failed'); END"
        ))
        .expect("trigger");
        let group: Vec<Publish> = ["a", "b", "c", "d"]
            .iter()
            .zip(&devices)
            .map(|(device, d)| publish_from(device, d, 1, &format!("INSERT INTO t VALUES ('{device}', 1)")))
            .collect();
        let cfg = HandlerConfig::default();
        let store = Mutex::new(Faulty(store, Fault::Nothing));
        let key = content_key(&group[1].topic, &group[1].payload);
        for round in 0..2 {
            let (handled, _) = handle_group_blocking(&store, &cfg, &group);
            let answered: Vec<bool> = handled.iter().map(acked).collect();
            assert_eq!(answered, [true, false, true, true], "round {round}");
            assert!(matches!(handled[1], Ok(Handled::Failed(_))), "our fault, not refused");
            // b's failures are counted against it, once a round.
            let attempts = store.lock().expect("lock").attempts(&key).expect("attempts").map(|a| a.0);
            assert_eq!(attempts, Some(round + 1), "attempts after round {round}");
        }
        let keys: Vec<String> = conn
            .prepare("SELECT pk FROM gw_rows ORDER BY pk")
            .and_then(|mut s| s.query_map([], |r| r.get::<_, Vec<u8>>(0))?.collect::<rusqlite::Result<Vec<_>>>())
            .expect("rows")
            .iter()
            .map(|k| String::from_utf8_lossy(k).chars().filter(char::is_ascii_lowercase).collect())
            .collect();
        assert_eq!(keys, ["a", "c", "d"], "nothing of b");
        let logged: i64 = conn.query_row("SELECT count(*) FROM gw_log", [], |r| r.get(0)).expect("count");
        assert_eq!(logged, 3, "one entry each for a, c and d, merged once");
    }

    fn acked(handled: &Result<Handled>) -> bool {
        let Ok(Handled::Done(out)) = handled else { return false };
        out.iter().any(|o| match o {
            Outgoing::Reply { payload, .. } => matches!(
                driftless_core::protocol::Downlink::decode(payload, &Default::default()),
                Ok(driftless_core::protocol::Downlink::Ack { ref refused, .. }) if refused.is_empty()
            ),
            Outgoing::Feed { .. } | Outgoing::Poke { .. } => false,
        })
    }

    #[test]
    fn a_group_whose_commit_fails_is_not_answered_and_is_acked_when_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let group = [
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
        ];
        let cfg = HandlerConfig::default();
        let store = Mutex::new(Faulty(open(&dir), Fault::Commits));
        let (handled, _) = handle_group_blocking(&store, &cfg, &group);
        assert!(handled.iter().all(|h| matches!(h, Ok(Handled::Failed(_)))), "answered before it was durable");
        // Commits work again: the same batches, redelivered, are acknowledged.
        store.lock().expect("lock").1 = Fault::Nothing;
        let again: Vec<Publish> = group.iter().cloned().map(|p| Publish { dup: true, ..p }).collect();
        let (handled, _) = handle_group_blocking(&store, &cfg, &again);
        assert!(handled.iter().all(acked), "not acknowledged once durable");
    }

    #[test]
    fn a_delivery_tried_before_is_handled_alone_outside_any_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = vec![
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
            batch_publish(&dir, 3, "INSERT INTO t VALUES ('c', 1)"),
            batch_publish(&dir, 4, "INSERT INTO t VALUES ('d', 1)"),
        ];
        group[1].dup = true;
        let cfg = HandlerConfig::default();
        let mut store = Faulty(open(&dir), Fault::Commits);
        // The third was tried before (an attempt on record), though not redelivered.
        store.note_attempt(&content_key(&group[2].topic, &group[2].payload)).expect("attempt");
        let store = Mutex::new(store);
        // Group commits fail: what was grouped is not answered; what was handled alone, in
        // transactions of its own, is.
        let (handled, _) = handle_group_blocking(&store, &cfg, &group);
        let answered: Vec<bool> = handled.iter().map(acked).collect();
        assert_eq!(answered, [false, true, true, false]);
    }

    #[test]
    fn a_group_commits_its_merges_together_and_a_redelivery_is_handled_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = vec![
            batch_publish(&dir, 1, "INSERT INTO t VALUES ('a', 1)"),
            batch_publish(&dir, 2, "INSERT INTO t VALUES ('b', 1)"),
            batch_publish(&dir, 3, "INSERT INTO t VALUES ('c', 1)"),
        ];
        group[1].dup = true;
        let cfg = HandlerConfig::default();
        let store = Mutex::new(Faulty(open(&dir), Fault::Nothing));
        let (handled, _) = handle_group_blocking(&store, &cfg, &group);
        assert!(handled.iter().all(acked), "every one acknowledged, none refused");
        // All of it is in the database, seen from another connection.
        let seen = rusqlite::Connection::open(dir.path().join("gw.db")).expect("open");
        let n: i64 = seen.query_row("SELECT count(*) FROM gw_rows", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 3);
    }
}
