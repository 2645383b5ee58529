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

fn push(r: &Ring<u64, HeapRegion>, v: u64) {
    let p = r.producer().unwrap();
    while p.try_enqueue(v).is_err() {
        thread::yield_now();
    }
}

fn pop(r: &Ring<u64, HeapRegion>) -> u64 {
    let c = r.consumer().unwrap();
    loop {
        if let Some(v) = c.dequeue() {
            return v;
        }
        thread::yield_now();
    }
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

/// Two producers, one consumer, capacity 1 (forces full-ring waits).
fn two_producers(cfg: RingConfig) {
    model(move || {
        let r = ring(1, cfg);
        let ts: Vec<_> = [10u64, 20]
            .into_iter()
            .map(|base| {
                let r = r.clone();
                thread::spawn(move || push(&r, base + 1))
            })
            .collect();
        // Capacity 1: the second producer must wait for the consumer.
        let mut got: Vec<u64> = (0..2).map(|_| pop(&r)).collect();
        for t in ts {
            t.join().unwrap();
        }
        got.sort_unstable();
        assert_eq!(got, [11, 21]);
        assert!(r.is_empty());
    });
}

/// One producer (bulk of 2), two consumers racing for the elements.
fn two_consumers(cfg: RingConfig) {
    model(move || {
        let r = ring(2, cfg);
        let cs: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                thread::spawn(move || pop(&r))
            })
            .collect();
        {
            let p = r.producer().unwrap();
            while p.enqueue_bulk(&[1, 2]).is_err() {
                thread::yield_now();
            }
        }
        let mut got: Vec<u64> = cs.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        assert!(r.is_empty());
    });
}

#[test]
fn mp_two_producers() {
    two_producers(RingConfig {
        consumer: SyncMode::Single,
        ..RingConfig::MPMC
    });
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
    two_producers(RingConfig {
        consumer: SyncMode::Single,
        ..RingConfig::RTS
    });
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
    two_producers(RingConfig {
        consumer: SyncMode::Single,
        ..RingConfig::HTS
    });
}

#[test]
fn hts_two_consumers() {
    two_consumers(RingConfig {
        producer: SyncMode::Single,
        ..RingConfig::HTS
    });
}
