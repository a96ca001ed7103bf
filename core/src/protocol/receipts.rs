//! The receipts a device holds for its acknowledged merges, and shows the gateway so that a
//! gateway store restored from an older backup learns it lost them.
//!
//! The gateway's log is a single line: a backup holds a prefix of it. So one receipt (the
//! position and tag of a merge's log entry) vouches for every earlier entry of the same
//! log, and a device normally needs to keep only its latest. Two things break that:
//!
//! - Acks arrive out of order, and an ack written by a store that was since replaced can
//!   arrive after one from its replacement. A late receipt from the lost store may be at a
//!   lower position than (or the same position as) a receipt from the current one, so
//!   "keep the highest" would throw away the only evidence of the loss.
//! - The device cannot tell which store wrote a receipt.
//!
//! So a receipt is dropped only when it is known to be vouched for by one that is kept:
//! when an ack names it as the previous merge of this device in the same store (`previous`),
//! or when the gateway checked it together with a later one and found both. Everything else
//! is shown until then. In the steady state that is one receipt.

use super::LogCursor;

/// At most this many receipts are kept; past it the lowest positions are dropped (each
/// answered message reduces the set, so it is reached only if nothing is answered for a
/// long time while acks keep coming out of order).
pub const MAX_RECEIPTS: usize = 32;

/// A receipt and the device's merge before it in the store that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub at: LogCursor,
    pub previous: Option<LogCursor>,
}

/// The receipts a device must still show (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipts(Vec<Receipt>);

impl Receipts {
    pub fn new(list: Vec<Receipt>) -> Receipts {
        let mut r = Receipts(list);
        r.normalize();
        r
    }

    /// What to show the gateway, lowest position first.
    pub fn shown(&self) -> Vec<LogCursor> {
        self.0.iter().map(|r| r.at).collect()
    }

    /// Takes in the receipt of an ack; whether the set changed.
    pub fn admit(&mut self, new: Receipt) -> bool {
        if self.0.iter().any(|r| r.at == new.at) {
            return false;
        }
        let before = self.0.clone();
        // A receipt this one names as its predecessor lives as long as this one does.
        if let Some(p) = new.previous {
            self.0.retain(|r| r.at != p);
        }
        // A kept receipt that names this one as its predecessor vouches for it already.
        if !self.0.iter().any(|r| r.previous == Some(new.at)) {
            self.0.push(new);
        }
        self.normalize();
        self.0 != before
    }

    /// The gateway found every receipt in `shown` in its store (it answered a message that
    /// showed them in the epoch they belong to): the highest of them vouches for the others.
    /// Whether the set changed.
    pub fn checked(&mut self, shown: &[LogCursor]) -> bool {
        let Some(top) = shown.iter().max_by_key(|c| c.position) else { return false };
        let before = self.0.len();
        self.0.retain(|r| r.at == *top || !shown.contains(&r.at) || r.at.position > top.position);
        self.0.len() != before
    }

    fn normalize(&mut self) {
        self.0.sort_by_key(|r| (r.at.position, r.at.tag));
        self.0.dedup_by_key(|r| r.at);
        if self.0.len() > MAX_RECEIPTS {
            let excess = self.0.len() - MAX_RECEIPTS;
            self.0.drain(..excess);
        }
    }

    /// The text a store keeps: `position:tag:previous_position:previous_tag` per receipt
    /// (`-` for no previous), joined by `;`.
    pub fn to_text(&self) -> String {
        let one = |r: &Receipt| match r.previous {
            Some(p) => format!("{}:{}:{}:{}", r.at.position, r.at.tag, p.position, p.tag),
            None => format!("{}:{}:-", r.at.position, r.at.tag),
        };
        self.0.iter().map(one).collect::<Vec<_>>().join(";")
    }

    /// Parses [`Receipts::to_text`]; `None` if it is not that.
    pub fn from_text(text: &str) -> Option<Receipts> {
        let cursor = |p: &str, t: &str| Some(LogCursor { position: p.parse().ok()?, tag: t.parse().ok()? });
        let mut list = Vec::new();
        for item in text.split(';').filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let receipt = match parts[..] {
                [p, t, "-"] => Receipt { at: cursor(p, t)?, previous: None },
                [p, t, pp, pt] => Receipt { at: cursor(p, t)?, previous: Some(cursor(pp, pt)?) },
                _ => return None,
            };
            list.push(receipt);
        }
        Some(Receipts::new(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(position: u64, tag: u64) -> LogCursor {
        LogCursor { position, tag }
    }

    fn r(at: LogCursor, previous: Option<LogCursor>) -> Receipt {
        Receipt { at, previous }
    }

    #[test]
    fn acks_in_order_keep_one_receipt() {
        let mut set = Receipts::default();
        assert!(set.admit(r(c(3, 30), None)));
        assert!(set.admit(r(c(7, 70), Some(c(3, 30)))));
        assert!(set.admit(r(c(9, 90), Some(c(7, 70)))));
        assert_eq!(set.shown(), vec![c(9, 90)]);
        assert!(!set.admit(r(c(9, 90), Some(c(7, 70)))), "a repeated ack changes nothing");
    }

    #[test]
    fn acks_out_of_order_collapse_once_the_chain_is_whole() {
        let mut set = Receipts::default();
        set.admit(r(c(3, 30), None));
        set.admit(r(c(9, 90), Some(c(7, 70))));
        assert_eq!(set.shown(), vec![c(3, 30), c(9, 90)]);
        // The late one is vouched for by the later one, and vouches for the earlier.
        set.admit(r(c(7, 70), Some(c(3, 30))));
        assert_eq!(set.shown(), vec![c(9, 90)]);
    }

    #[test]
    fn a_late_receipt_of_a_replaced_store_is_kept_beside_the_current_one() {
        // The restored store wrote this device's merge at 3 with another tag; the lost
        // store's ack for its own entry 3 arrives after it. Neither vouches for the other.
        let mut set = Receipts::default();
        set.admit(r(c(3, 31), Some(c(1, 10))));
        assert!(set.admit(r(c(3, 30), Some(c(1, 10)))));
        assert_eq!(set.shown(), vec![c(3, 30), c(3, 31)]);
        // A lower one arriving late is kept as well.
        assert!(set.admit(r(c(2, 20), Some(c(1, 10)))));
        assert_eq!(set.shown().len(), 3);
    }

    #[test]
    fn a_check_keeps_the_highest_of_what_was_shown() {
        let mut set = Receipts::new(vec![r(c(2, 20), None), r(c(5, 50), None)]);
        let shown = set.shown();
        // Meanwhile another ack came in.
        set.admit(r(c(8, 80), None));
        assert!(set.checked(&shown));
        assert_eq!(set.shown(), vec![c(5, 50), c(8, 80)]);
    }

    #[test]
    fn the_set_is_bounded_and_survives_its_text() {
        let mut set = Receipts::default();
        for i in 0..(MAX_RECEIPTS as u64 + 5) {
            set.admit(r(c(i * 2 + 1, i), if i % 3 == 0 { None } else { Some(c(i * 2, 0)) }));
        }
        assert_eq!(set.shown().len(), MAX_RECEIPTS);
        assert_eq!(set.shown()[0].position, 11);
        assert_eq!(Receipts::from_text(&set.to_text()), Some(set.clone()));
        assert_eq!(Receipts::from_text(""), Some(Receipts::default()));
        for bad in ["1:2", "x:1:-", "1:2:3", "1:2:3:y", "1:2:-:4"] {
            assert_eq!(Receipts::from_text(bad), None, "{bad}");
        }
    }
}
