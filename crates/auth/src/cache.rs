//! A bounded map whose entries expire at a given Unix time.
//!
//! Used twice: as the `jti` replay cache (RFC 7523 §3 item 7), where an entry must outlive the
//! assertion it remembers and a full cache refuses new entries, and as the verified-bearer cache,
//! where a full cache simply stops caching. Expired entries are purged when the map reaches its
//! bound, at most once a second so that a cache full of live entries is not rescanned on every
//! request. The bound is soft by at most the number of concurrent inserters.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// The cache has reached its bound and holds no expired entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// What [`ExpiringCache::insert_new`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertNew {
    /// The key was absent (or only expired) and is now recorded.
    Inserted,
    /// A live entry already exists.
    Present,
}

#[derive(Debug)]
pub(crate) struct ExpiringCache<K: Eq + Hash, V> {
    entries: DashMap<K, (u64, V)>,
    capacity: usize,
    last_purge: AtomicU64,
}

impl<K: Eq + Hash, V: Clone> ExpiringCache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            capacity,
            last_purge: AtomicU64::new(0),
        }
    }

    /// The live value for `key`; an expired entry is removed.
    pub(crate) fn get(&self, key: &K, now: u64) -> Option<V> {
        let live = {
            let entry = self.entries.get(key)?;
            (entry.0 >= now).then(|| entry.1.clone())
        };
        if live.is_none() {
            self.entries
                .remove_if(key, |_, (expires_at, _)| *expires_at < now);
        }
        live
    }

    /// Records `key` unless a live entry exists: the replay check and the record are one step.
    pub(crate) fn insert_new(
        &self,
        key: K,
        value: V,
        expires_at: u64,
        now: u64,
    ) -> Result<InsertNew, Full> {
        self.make_room(now)?;
        // No other map operation runs while the entry (a shard lock) is held.
        match self.entries.entry(key) {
            Entry::Occupied(mut occupied) => {
                if occupied.get().0 >= now {
                    Ok(InsertNew::Present)
                } else {
                    occupied.insert((expires_at, value));
                    Ok(InsertNew::Inserted)
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert((expires_at, value));
                Ok(InsertNew::Inserted)
            }
        }
    }

    /// Records `key`, replacing any entry; gives up when the cache is full.
    pub(crate) fn insert(&self, key: K, value: V, expires_at: u64, now: u64) -> Result<(), Full> {
        self.make_room(now)?;
        self.entries.insert(key, (expires_at, value));
        Ok(())
    }

    fn make_room(&self, now: u64) -> Result<(), Full> {
        if self.entries.len() < self.capacity {
            return Ok(());
        }
        let last = self.last_purge.load(Ordering::Relaxed);
        if last < now
            && self
                .last_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.entries.retain(|_, (expires_at, _)| *expires_at >= now);
        }
        if self.entries.len() < self.capacity {
            Ok(())
        } else {
            Err(Full)
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7523_replay_entry_lives_until_its_expiry() {
        let cache = ExpiringCache::new(10);
        assert_eq!(cache.insert_new("a", (), 100, 50), Ok(InsertNew::Inserted));
        assert_eq!(cache.insert_new("a", (), 100, 100), Ok(InsertNew::Present));
        assert_eq!(cache.insert_new("a", (), 200, 101), Ok(InsertNew::Inserted));
    }

    #[test]
    fn full_cache_purges_expired_entries_then_refuses() {
        let cache = ExpiringCache::new(2);
        assert_eq!(cache.insert_new(1, (), 10, 0), Ok(InsertNew::Inserted));
        assert_eq!(cache.insert_new(2, (), 20, 0), Ok(InsertNew::Inserted));
        assert_eq!(cache.insert_new(3, (), 30, 5), Err(Full));
        // At t=11 entry 1 has expired and is purged to make room.
        assert_eq!(cache.insert_new(3, (), 30, 11), Ok(InsertNew::Inserted));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.insert(4, (), 40, 12), Err(Full));
    }

    #[test]
    fn get_evicts_expired_entries() {
        let cache = ExpiringCache::new(4);
        assert_eq!(cache.insert("t", 7, 10, 0), Ok(()));
        assert_eq!(cache.get(&"t", 10), Some(7));
        assert_eq!(cache.get(&"t", 11), None);
        assert_eq!(cache.len(), 0);
    }
}
