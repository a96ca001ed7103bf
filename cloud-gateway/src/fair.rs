//! Messages waiting to be handled, taken one device at a time in turn: a device that sent
//! many at once (its burst) waits behind itself, not the others behind it. Each device's
//! messages keep their order.

use std::collections::{HashMap, VecDeque};

/// A queue per sender, served round-robin.
#[derive(Debug)]
pub(crate) struct FairQueue<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Senders with something waiting, in the order they are served.
    turn: VecDeque<String>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue { queues: HashMap::new(), turn: VecDeque::new(), len: 0 }
    }
}

impl<T> FairQueue<T> {
    pub(crate) fn push(&mut self, sender: &str, item: T) {
        let queue = self.queues.entry(sender.to_owned()).or_default();
        if queue.is_empty() {
            self.turn.push_back(sender.to_owned());
        }
        queue.push_back(item);
        self.len += 1;
    }

    /// The next sender's oldest message.
    pub(crate) fn pop(&mut self) -> Option<T> {
        let sender = self.turn.pop_front()?;
        let queue = self.queues.get_mut(&sender)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&sender);
        } else {
            self.turn.push_back(sender);
        }
        self.len -= usize::from(item.is_some());
        item
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::default();
        for i in 0..4 {
            q.push("flood", format!("f{i}"));
        }
        q.push("honest", "h0".to_owned());
        q.push("other", "o0".to_owned());
        q.push("honest", "h1".to_owned());
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["f0", "h0", "o0", "f1", "h1", "f2", "f3"]);
        assert!(q.is_empty());
    }
}
