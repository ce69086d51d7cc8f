//! Sorting in little code, for the sorts that are not on a request's hot path.
//!
//! The standard library's sorts are fast and large: each element type and comparator gets its
//! own copy of pattern-defeating quicksort or driftsort, about 6 KB of wasm each, and the edge
//! worker's bundle carried eighteen of them (113 KB before compression) for sorts that mostly
//! run when a catalog or rules document is compiled, a profile is checked or a fence trimmed.
//! Heapsort is a few hundred bytes per use, needs no allocation and stays O(n log n) whatever
//! the input (a 100k-item catalog's popularity order included). The recommender's per-request
//! sorts keep the standard ones: they are where speed matters and the copies pay for
//! themselves.

/// Sorts `v` so that no element is `less` than the one before it; not stable (equal elements
/// may change places).
pub fn sort_unstable_by<T>(v: &mut [T], mut less: impl FnMut(&T, &T) -> bool) {
    let n = v.len();
    for node in (0..n / 2).rev() {
        sift_down(v, node, n, &mut less);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift_down(v, 0, end, &mut less);
    }
}

/// [`sort_unstable_by`] in the elements' own order.
pub fn sort_unstable<T: Ord>(v: &mut [T]) {
    sort_unstable_by(v, |a, b| a < b);
}

/// Sorts `v` by `key`, stable: elements with equal keys keep their order. The keys are taken
/// once each and sorted together with each element's position, which makes every pair
/// distinct, so the unstable heapsort yields the stable order.
pub fn sort_by_key_stable<T, K: Ord>(v: &mut Vec<T>, mut key: impl FnMut(&T) -> K) {
    if v.len() < 2 {
        return;
    }
    let mut order: Vec<(K, usize)> = v.iter().enumerate().map(|(i, t)| (key(t), i)).collect();
    sort_unstable(&mut order);
    let mut slots: Vec<Option<T>> = v.drain(..).map(Some).collect();
    v.extend(order.iter().filter_map(|(_, i)| slots.get_mut(*i)?.take()));
}

/// Moves `v[node]` down its subtree of the heap `v[..end]` until neither child is greater.
fn sift_down<T>(v: &mut [T], mut node: usize, end: usize, less: &mut impl FnMut(&T, &T) -> bool) {
    loop {
        let mut child = 2 * node + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && less(&v[child], &v[child + 1]) {
            child += 1;
        }
        if !less(&v[node], &v[child]) {
            return;
        }
        v.swap(node, child);
        node = child;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the test needs no dependency.
    fn numbers(seed: u64, n: usize, range: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % range
            })
            .collect()
    }

    #[test]
    fn sorts_like_the_standard_library_at_every_size() {
        for n in [0, 1, 2, 3, 7, 8, 16, 31, 100, 1000, 10_000] {
            for range in [2, 10, 1 << 40] {
                let mut ours = numbers(n as u64 + range, n, range);
                let mut std = ours.clone();
                sort_unstable(&mut ours);
                std.sort_unstable();
                assert_eq!(ours, std, "n {n}, range {range}");
            }
        }
        let mut down: Vec<u32> = (0..500).rev().collect();
        sort_unstable(&mut down);
        assert!(down.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_comparator_orders_as_it_says() {
        let mut v = numbers(7, 300, 1000);
        sort_unstable_by(&mut v, |a, b| a > b);
        assert!(v.windows(2).all(|w| w[0] >= w[1]));
    }

    /// Equal keys keep their order, as `sort_by_key` does; a sort that lost or repeated an
    /// element would fail too.
    #[test]
    fn the_keyed_sort_is_stable() {
        for n in [0, 1, 2, 5, 64, 2000] {
            let v: Vec<(u64, usize)> = numbers(n as u64, n, 5)
                .into_iter()
                .enumerate()
                .map(|(i, k)| (k, i))
                .collect();
            let mut ours = v.clone();
            let mut std = v;
            sort_by_key_stable(&mut ours, |e| e.0);
            std.sort_by_key(|e| e.0);
            assert_eq!(ours, std, "n {n}");
        }
    }
}
