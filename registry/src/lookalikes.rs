//! Which looks the names in use have: the registry refuses a name that
//! reads like a name held by another (online or reserved), such as `a1ice`
//! while `alice` is online. Names are compared by their TR39 skeleton
//! ([`name_skeleton`]); the table keeps only a count per skeleton hash, so
//! it costs a few bytes per name held.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use peerchat_core::protocol::name_skeleton;

/// Skeleton hash → how many held (folded) names have that skeleton.
/// Hashes are keyed per process, so nobody can aim a collision at a name.
#[derive(Default)]
pub(crate) struct Lookalikes {
    hasher: RandomState,
    held: HashMap<u64, u32>,
}

/// What a name looks like, as this table counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Look(u64);

impl Lookalikes {
    pub(crate) fn look(&self, folded: &str) -> Look {
        Look(self.hasher.hash_one(name_skeleton(folded)))
    }

    /// A name with this look starts being held (it was held by nobody).
    pub(crate) fn hold(&mut self, look: Look) {
        *self.held.entry(look.0).or_default() += 1;
    }

    /// A name stops being held by anyone.
    pub(crate) fn release(&mut self, folded: &str) {
        let look = self.look(folded).0;
        if let Some(count) = self.held.get_mut(&look) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&look);
            }
        }
    }

    /// Whether another held name has this look; `held_itself` says whether
    /// the name asking is one of the held names.
    pub(crate) fn taken_by_another(&self, look: Look, held_itself: bool) -> bool {
        let count = self.held.get(&look.0).copied().unwrap_or(0);
        count > u32::from(held_itself)
    }

    /// How many names are counted: the tests check it against the names held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.held.values().map(|n| *n as usize).sum()
    }
}
