//! Dictionaries that turn node ids and column names into small integers.

use std::collections::HashMap;
use std::hash::Hash;

use super::DecodeError;

/// An append-only dictionary: each distinct key gets the next index.
#[derive(Debug, Clone)]
pub struct Interner<K> {
    keys: Vec<K>,
    index: HashMap<K, u64>,
}

impl<K> Default for Interner<K> {
    fn default() -> Self {
        Interner { keys: Vec::new(), index: HashMap::new() }
    }
}

impl<K: Clone + Eq + Hash> Interner<K> {
    /// The index of `key`, adding it if new.
    pub fn intern(&mut self, key: &K) -> u64 {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        let i = self.keys.len() as u64;
        self.keys.push(key.clone());
        self.index.insert(key.clone(), i);
        i
    }

    /// The key at `index`, as a typed error if there is none.
    pub fn get(&self, index: u64, what: &'static str) -> Result<&K, DecodeError> {
        usize::try_from(index).ok().and_then(|i| self.keys.get(i)).ok_or(DecodeError::BadReference { what, index })
    }

    /// Every key, in index order.
    pub fn keys(&self) -> &[K] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<K: Clone + Eq + Hash> FromIterator<K> for Interner<K> {
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> Self {
        let mut out = Interner::default();
        for k in iter {
            out.intern(&k);
        }
        out
    }
}
