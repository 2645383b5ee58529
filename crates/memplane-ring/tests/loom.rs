//! loom models of the ring protocols on heap memory. Every slot access goes
//! through a loom-tracked cell, so a missing happens-before edge between a
//! producer's slot write and a consumer's read (or a consumer's read and the
//! next lap's write) fails the model, as does a lost, duplicated or
//! reordered element.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p memplane-ring --release --test loom`
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use memplane_ring::{HeapRegion, Ring, RingConfig, SyncMode};

/// Bounded preemptions keep the models CI-sized (seconds, not hours) while
/// still covering every interleaving with up to 3 forced context switches.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.max_branches = 100_000;
    b.check(f);
}

fn ring(cap: usize, cfg: RingConfig) -> Arc<Ring<u64, HeapRegion>> {
    let bytes = Ring::<u64, HeapRegion>::memsize(cap, cfg.exact).unwrap();
    Arc::new(Ring::init(HeapRegion::new(bytes).unwrap(), "loom", cap, cfg).unwrap())
}

/// SP/SC, capacity 2, three elements: wraps and fills; FIFO order holds.
#[test]
fn spsc_fifo_with_wrap() {
    model(|| {
        let r = ring(2, RingConfig::SPSC);
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let p = r2.producer().unwrap();
            for v in 1..=3 {
                while p.try_enqueue(v).is_err() {
                    thread::yield_now();
                }
            }
        });
        let c = r.consumer().unwrap();
        for want in 1..=3 {
            loop {
                if let Some(v) = c.dequeue() {
                    assert_eq!(v, want);
                    break;
                }
                thread::yield_now();
            }
        }
        t.join().unwrap();
        assert!(r.is_empty());
    });
}

/// Drains whatever is left after all threads joined.
fn drain(r: &Ring<u64, HeapRegion>) -> Vec<u64> {
    let c = r.consumer().unwrap();
    std::iter::from_fn(|| c.dequeue()).collect()
}

/// Two producers race one enqueue each while a consumer tries one dequeue.
/// With capacity 2 both reserve concurrently, so the second must wait for
/// the first to publish (the MP tail hand-off); with capacity 1 one producer
/// may find the ring full. Every accepted element arrives exactly once.
fn two_producers(cfg: RingConfig, cap: usize) {
    model(move || {
        let r = ring(cap, cfg);
        let ts: Vec<_> = [11u64, 21]
            .into_iter()
            .map(|v| {
                let r = r.clone();
                thread::spawn(move || r.producer().unwrap().try_enqueue(v).is_ok().then_some(v))
            })
            .collect();
        let early = r.consumer().unwrap().dequeue();
        let mut sent: Vec<u64> = ts.into_iter().filter_map(|t| t.join().unwrap()).collect();
        let mut got: Vec<u64> = early.into_iter().chain(drain(&r)).collect();
        sent.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, sent);
        assert!(!sent.is_empty());
        assert!(r.is_empty());
    });
}

/// A producer bulk-enqueues [1, 2] while two consumers try one dequeue
/// each; nothing is lost or duplicated and each consumer sees FIFO order.
fn two_consumers(cfg: RingConfig) {
    model(move || {
        let r = ring(2, cfg);
        let cs: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                thread::spawn(move || r.consumer().unwrap().dequeue())
            })
            .collect();
        r.producer().unwrap().enqueue_bulk(&[1, 2]).unwrap();
        let mut got: Vec<u64> = cs.into_iter().filter_map(|t| t.join().unwrap()).collect();
        got.extend(drain(&r));
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        assert!(r.is_empty());
    });
}

/// The handle-less `Multi` bulk calls: two producers race a two-element
/// bulk each into a ring of 4, so both reserve concurrently and the second
/// must wait for the first to publish, while a consumer tries a
/// two-element bulk dequeue. Everything comes out once, each bulk whole
/// and in order (and loom sees every slot access ordered).
#[test]
fn handleless_multi_bulk() {
    handleless_multi_bulk_in(RingConfig::MPMC);
}

/// The same in a compact ring (tails next to the heads).
#[test]
fn handleless_multi_bulk_compact() {
    handleless_multi_bulk_in(RingConfig::MPMC.compact(true));
}

fn handleless_multi_bulk_in(cfg: RingConfig) {
    model(move || {
        let r = ring(4, cfg);
        let ts: Vec<_> = [[11u64, 12], [21, 22]]
            .into_iter()
            .map(|v| {
                let r = r.clone();
                thread::spawn(move || r.enqueue_bulk_multi(&v).then_some(v))
            })
            .collect();
        let mut early = [0u64; 2];
        let took = r.dequeue_bulk_multi(&mut early);
        let sent: Vec<[u64; 2]> = ts.into_iter().filter_map(|t| t.join().unwrap()).collect();
        assert_eq!(sent.len(), 2, "a ring of 4 takes both bulks");
        let mut got: Vec<u64> = if took { early.to_vec() } else { Vec::new() };
        got.extend(drain(&r));
        let flat: Vec<u64> = sent.concat();
        let swapped: Vec<u64> = sent.iter().rev().flatten().copied().collect();
        assert!(got == flat || got == swapped, "got {got:?} from {sent:?}");
        assert!(r.is_empty());
    });
}

#[test]
fn mp_two_producers() {
    two_producers(
        RingConfig {
            consumer: SyncMode::Single,
            ..RingConfig::MPMC
        },
        2,
    );
}

#[test]
fn mp_two_producers_full_ring() {
    two_producers(
        RingConfig {
            consumer: SyncMode::Single,
            ..RingConfig::MPMC
        },
        1,
    );
}

#[test]
fn mp_two_producers_compact() {
    two_producers(
        RingConfig {
            consumer: SyncMode::Single,
            ..RingConfig::MPMC.compact(true)
        },
        2,
    );
}

#[test]
fn mc_two_consumers() {
    two_consumers(RingConfig {
        producer: SyncMode::Single,
        ..RingConfig::MPMC
    });
}

#[test]
fn rts_two_producers() {
    two_producers(
        RingConfig {
            consumer: SyncMode::Single,
            ..RingConfig::RTS
        },
        2,
    );
}

#[test]
fn rts_two_consumers() {
    two_consumers(RingConfig {
        producer: SyncMode::Single,
        ..RingConfig::RTS
    });
}

#[test]
fn hts_two_producers() {
    two_producers(
        RingConfig {
            consumer: SyncMode::Single,
            ..RingConfig::HTS
        },
        2,
    );
}

#[test]
fn hts_two_consumers() {
    two_consumers(RingConfig {
        producer: SyncMode::Single,
        ..RingConfig::HTS
    });
}
