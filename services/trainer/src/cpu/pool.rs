//! Activation buffers kept from one training step for the next.
//!
//! A step allocates the same multi-megabyte buffers every time (each
//! layer's q/k/v, MLP rows, the logits), and a fresh `vec![0.0; n]` is
//! zeroed on the calling thread while the pool's threads wait: about 3 % of
//! a step's samples at the ~110M shape on Zen 4. Buffers that are written
//! in full before they are read come from here instead, with whatever the
//! last step left in them.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Kept buffers by capacity, holding at most [`KEEP_BYTES`] in all (a step
/// of SmolLM2-135M at 4 × 128 tokens gives back about 450 MiB in some 1,500
/// buffers).
struct Spare {
    by_capacity: BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static SPARE: Mutex<Spare> = Mutex::new(Spare { by_capacity: BTreeMap::new(), bytes: 0 });
const KEEP_BYTES: usize = 1 << 30;

fn spare() -> MutexGuard<'static, Spare> {
    SPARE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `n` values the caller overwrites in full before reading any: a kept
/// buffer of at least `n` and at most `n + n/8` values when there is one
/// (close fits only, so a buffer of one shape does not serve a smaller one
/// and leave its own next request to allocate; its values unspecified, NaN
/// in debug builds, so that a value read before it is written shows in the
/// tests), else a new one.
pub(super) fn take(n: usize) -> Vec<f32> {
    let kept = {
        let mut spare = spare();
        let fit = spare.by_capacity.range_mut(n..=n + n / 8).find(|(_, list)| !list.is_empty());
        let found = fit.map(|(capacity, list)| (*capacity, list.pop()));
        match found {
            Some((capacity, Some(v))) => {
                spare.bytes -= capacity * 4;
                if spare.by_capacity.get(&capacity).is_some_and(Vec::is_empty) {
                    spare.by_capacity.remove(&capacity);
                }
                Some(v)
            }
            _ => None,
        }
    };
    let Some(mut v) = kept else { return vec![0.0; n] };
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, 0.0);
    }
    // Poisoned in tests, so a read before the write shows up as NaN (the
    // dev profile builds this crate without debug assertions, for speed).
    if cfg!(any(test, debug_assertions)) {
        v.fill(f32::NAN);
    }
    v
}

/// Keeps `v` for a later [`take`] (drops it when the pool is full).
pub(super) fn give(v: Vec<f32>) {
    let capacity = v.capacity();
    if capacity == 0 {
        return;
    }
    let mut spare = spare();
    if spare.bytes + capacity * 4 <= KEEP_BYTES {
        spare.bytes += capacity * 4;
        spare.by_capacity.entry(capacity).or_default().push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_are_reused_only_for_requests_they_fit_closely() {
        // Sizes no other test uses, so the shared pool's other buffers
        // cannot answer these requests.
        let a = vec![1.0f32; 100_003];
        let at = a.as_ptr();
        give(a);
        let small = take(80_000);
        assert_ne!(small.as_ptr(), at, "a buffer an eighth over the request is not handed out");
        let b = take(100_001);
        assert_eq!(b.as_ptr(), at, "the kept buffer serves a request it fits");
        assert_eq!(b.len(), 100_001);
        let c = take(100_002);
        assert_ne!(c.as_ptr(), at);
        assert_eq!(c.len(), 100_002);
    }
}
