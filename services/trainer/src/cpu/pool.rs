//! Activation buffers kept from one training step for the next.
//!
//! A step allocates the same multi-megabyte buffers every time (each
//! layer's q/k/v, MLP rows, the logits), and a fresh `vec![0.0; n]` is
//! zeroed on the calling thread while the pool's threads wait: about 3 % of
//! a step's samples at the ~110M shape on Zen 4. Buffers that are written
//! in full before they are read come from here instead, with whatever the
//! last step left in them.

use std::sync::Mutex;

/// Kept buffers, at most [`KEEP`] of them holding at most [`KEEP_BYTES`].
static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
const KEEP: usize = 1024;
const KEEP_BYTES: usize = 1 << 31;

/// `n` values the caller overwrites in full before reading any: a kept
/// buffer of at least `n` and at most `2n` values when there is one (its
/// values unspecified; NaN in debug builds, so that a value read before it
/// is written shows in the tests), else a new one.
pub(super) fn take(n: usize) -> Vec<f32> {
    let kept = {
        let mut spare = SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let best = spare
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() <= 2 * n.max(1))
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| spare.swap_remove(i))
    };
    let Some(mut v) = kept else { return vec![0.0; n] };
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, 0.0);
    }
    if cfg!(debug_assertions) {
        v.fill(f32::NAN);
    }
    v
}

/// Keeps `v` for a later [`take`].
pub(super) fn give(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    let mut spare = SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let bytes: usize = spare.iter().chain([&v]).map(|b| b.capacity() * 4).sum();
    if spare.len() < KEEP && bytes <= KEEP_BYTES {
        spare.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_are_reused_only_for_requests_they_fit() {
        // Sizes no other test uses, so the shared pool's other buffers
        // cannot answer these requests.
        let a = vec![1.0f32; 100_003];
        let at = a.as_ptr();
        give(a);
        let small = take(40_000);
        assert_ne!(small.as_ptr(), at, "a buffer over twice the request is not handed out");
        let b = take(100_001);
        assert_eq!(b.as_ptr(), at, "the kept buffer serves a request it fits");
        assert_eq!(b.len(), 100_001);
        let c = take(100_002);
        assert_ne!(c.as_ptr(), at);
        assert_eq!(c.len(), 100_002);
    }
}
