//! Small synchronization helpers shared across the crate.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, carrying on past a poisoned lock: the data guarded here (caches, bookkeeping) stays
/// usable after a panic elsewhere, and a panic must not take every later caller down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
