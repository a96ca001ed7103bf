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

    /// A group of up to `max` messages, in turn, with at most `per_sender` of any sender:
    /// everyone in a group waits for all of it, so one sender's backlog must not make the
    /// group long. Senders left at their cap keep their place at the head of the turn.
    pub(crate) fn take_group(&mut self, max: usize, per_sender: usize) -> Vec<T> {
        let mut group = Vec::new();
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut capped = Vec::new();
        while group.len() < max {
            let Some(sender) = self.turn.pop_front() else { break };
            let n = taken.entry(sender.clone()).or_default();
            if *n >= per_sender {
                capped.push(sender);
                continue;
            }
            *n += 1;
            let Some(queue) = self.queues.get_mut(&sender) else { continue };
            if let Some(item) = queue.pop_front() {
                group.push(item);
                self.len -= 1;
            }
            if queue.is_empty() {
                self.queues.remove(&sender);
            } else {
                self.turn.push_back(sender);
            }
        }
        for sender in capped.into_iter().rev() {
            self.turn.push_front(sender);
        }
        group
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
        let order: Vec<String> = std::iter::from_fn(|| q.take_group(1, 1).pop()).collect();
        assert_eq!(order, ["f0", "h0", "o0", "f1", "h1", "f2", "f3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_group_takes_a_few_of_each_sender_and_the_rest_waits_its_turn() {
        let mut q = FairQueue::default();
        for i in 0..6 {
            q.push("flood", format!("f{i}"));
        }
        q.push("honest", "h0".to_owned());
        q.push("honest", "h1".to_owned());
        q.push("honest", "h2".to_owned());
        assert_eq!(q.take_group(100, 2), ["f0", "h0", "f1", "h1"]);
        assert_eq!(q.take_group(3, 2), ["f2", "h2", "f3"]);
        assert_eq!(q.take_group(100, 2), ["f4", "f5"]);
        assert!(q.is_empty());
        assert!(q.take_group(100, 2).is_empty());
    }
}
