//! Spreading a batch over the threads of the current rayon pool so that each thread gets the
//! same share of it every time.
//!
//! The encoder's caches are per thread. With work stealing (`par_iter`) which thread encodes
//! which texts changes from call to call, so a batch encoded again (the next epoch, the next
//! pass of a benchmark, the next batch of a similar corpus) lands largely on threads whose
//! caches hold other texts' pieces: on the multilingual batch the second call ran at about
//! two thirds of the speed of later ones. Here thread `t` of `k` owns the `t`-th contiguous
//! `k`-th of the work and starts there every time; a thread that finishes its lane helps
//! with the others, so a slow thread still does not hold up the batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `f(0), f(1), …, f(n - 1)`, computed on the threads of the current rayon pool (the global
/// one outside a pool), in order. A panic in `f` propagates to the caller.
pub fn map_in_lanes<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let k = rayon::current_num_threads().max(1);
    if n == 0 {
        return Vec::new();
    }
    let bounds: Vec<usize> = (0..=k).map(|t| t * n / k).collect();
    let next: Vec<AtomicUsize> = bounds[..k].iter().map(|&b| AtomicUsize::new(b)).collect();
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    rayon::broadcast(|ctx| {
        let me = ctx.index() % k;
        for lane in (0..k).map(|d| (me + d) % k) {
            loop {
                let i = next[lane].fetch_add(1, Ordering::Relaxed);
                if i >= bounds[lane + 1] {
                    break;
                }
                let value = f(i);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
            }
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every index is taken by exactly one thread")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_once_in_order() {
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [0, 1, 2, 5, 7, 64, 1000] {
                let calls = AtomicUsize::new(0);
                let out = pool.install(|| {
                    map_in_lanes(n, |i| {
                        calls.fetch_add(1, Ordering::Relaxed);
                        i * 3
                    })
                });
                assert_eq!(out, (0..n).map(|i| i * 3).collect::<Vec<_>>());
                assert_eq!(calls.load(Ordering::Relaxed), n);
            }
        }
    }

    #[test]
    fn each_thread_starts_in_its_own_lane() {
        // Each thread waits at a barrier inside its first item, so neither can move on (and
        // take from the other's lane) before both have taken their first: thread t's first
        // item must then be the first of lane t, whatever the scheduling.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let barrier = std::sync::Barrier::new(2);
        let started = Mutex::new([false; 2]);
        let who = pool.install(|| {
            map_in_lanes(8, |_| {
                let me = rayon::current_thread_index().unwrap();
                let first = !std::mem::replace(&mut started.lock().unwrap()[me], true);
                if first {
                    barrier.wait();
                }
                me
            })
        });
        assert_eq!((who[0], who[4]), (0, 1));
    }
}
