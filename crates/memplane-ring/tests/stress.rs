//! Multi-thread stress: producers push sequence-numbered elements
//! (`producer << 48 | seq`), consumers check that each producer's elements
//! arrive in order, and a shared bitmap proves nothing was lost or
//! duplicated. 10^8 elements through an MP/MC ring in release builds
//! (a few seconds on 2 cores); 10^6 in debug builds (unoptimised code is
//! ~30x slower). RTS, HTS and SP/SC runs move 10^7 (10^5 in debug).
#![cfg(not(loom))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memplane_ring::{HeapRegion, Ring, RingConfig, SyncMode};

const BURST: usize = 32;

fn scaled(release: u64) -> u64 {
    if cfg!(debug_assertions) {
        release / 100
    } else {
        release
    }
}

fn run(cfg: RingConfig, producers: u64, consumers: u64, total: u64) {
    let per = total / producers;
    let bytes = Ring::<u64, HeapRegion>::memsize(1024, false).unwrap();
    let ring = Ring::<u64, _>::init(HeapRegion::new(bytes).unwrap(), "stress", 1024, cfg).unwrap();
    let seen: Vec<Vec<AtomicU64>> = (0..producers)
        .map(|_| (0..per.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let received = AtomicU64::new(0);
    let multi_prod = cfg.producer == SyncMode::Multi;
    let multi_cons = cfg.consumer == SyncMode::Multi;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for p in 0..producers {
            let ring = &ring;
            s.spawn(move || {
                let prod = ring.producer().unwrap();
                let mut seq = 0u64;
                let mut buf = [0u64; BURST];
                while seq < per {
                    let n = (per - seq).min(BURST as u64) as usize;
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = (p << 48) | (seq + i as u64);
                    }
                    // Mix APIs: bulk, burst, single and (Multi
                    // producers) the handle-less bulk.
                    let moved = match seq % 4 {
                        1 => prod.enqueue_burst(&buf[..n]).count as usize,
                        2 => usize::from(prod.try_enqueue(buf[0]).is_ok()),
                        3 if multi_prod => usize::from(ring.enqueue_bulk_multi(&buf[..n])) * n,
                        _ => prod.enqueue_bulk(&buf[..n]).map_or(0, |_| n),
                    };
                    if moved == 0 {
                        std::thread::yield_now();
                    }
                    seq += moved as u64;
                }
            });
        }
        for _ in 0..consumers {
            let (ring, seen, received) = (&ring, &seen, &received);
            s.spawn(move || {
                let cons = ring.consumer().unwrap();
                let mut last = vec![None::<u64>; producers as usize];
                let mut buf = [0u64; BURST];
                let mut k = 0u64;
                while received.load(Ordering::Relaxed) < per * producers {
                    k += 1;
                    let n = match k % 4 {
                        0 => cons.dequeue_bulk(&mut buf[..8]).map_or(0, |_| 8),
                        1 => cons.dequeue_burst(&mut buf).count as usize,
                        2 if multi_cons => usize::from(ring.dequeue_bulk_multi(&mut buf[..4])) * 4,
                        _ => cons.dequeue().map_or(0, |v| {
                            buf[0] = v;
                            1
                        }),
                    };
                    if n == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    for &v in &buf[..n] {
                        let (p, seq) = ((v >> 48) as usize, v & ((1 << 48) - 1));
                        assert!(
                            p < producers as usize && seq < per,
                            "garbage element {v:#x}"
                        );
                        if let Some(l) = last[p] {
                            assert!(
                                seq > l,
                                "producer {p}: {seq} after {l} (reordered or duplicated)"
                            );
                        }
                        last[p] = Some(seq);
                        let bit = 1u64 << (seq % 64);
                        let old = seen[p][(seq / 64) as usize].fetch_or(bit, Ordering::Relaxed);
                        assert_eq!(old & bit, 0, "producer {p} seq {seq} delivered twice");
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    for (p, words) in seen.iter().enumerate() {
        let got: u64 = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        assert_eq!(got, per, "producer {p}: {got} of {per} elements arrived");
    }
    assert!(ring.is_empty());
    eprintln!(
        "{cfg:?} {producers}P/{consumers}C: {} elements in {:?}",
        per * producers,
        t0.elapsed()
    );
}

#[test]
fn mpmc_1e8() {
    run(RingConfig::MPMC, 2, 2, scaled(100_000_000));
}

#[test]
fn mpmc_compact_1e7() {
    run(RingConfig::MPMC.compact(true), 2, 2, scaled(10_000_000));
}

#[test]
fn rts_compact_1e7() {
    run(RingConfig::RTS.compact(true), 2, 2, scaled(10_000_000));
}

#[test]
fn rts_1e7() {
    run(RingConfig::RTS, 2, 2, scaled(10_000_000));
}

#[test]
fn hts_1e7() {
    run(RingConfig::HTS, 2, 2, scaled(10_000_000));
}

#[test]
fn spsc_1e7() {
    run(RingConfig::SPSC, 1, 1, scaled(10_000_000));
}

#[test]
fn mp_sc_1e7() {
    let cfg = RingConfig {
        consumer: SyncMode::Single,
        ..RingConfig::MPMC
    };
    run(cfg, 3, 1, scaled(10_000_000));
}
