//! Do RTS/HTS help on an overcommitted machine? N producer and N consumer
//! threads (N*2 > CPUs) move elements through one ring in bursts; we report
//! wall-clock ns per element for MP/MC, RTS and HTS. memplane only: DPDK's
//! ring_perf_autotest has no such row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memplane_ring::{HeapRegion, Ring, RingConfig};

fn one(cfg: RingConfig, threads: u64, total: u64, burst: usize) -> f64 {
    let bytes = Ring::<u64, HeapRegion>::memsize(4096, false).unwrap();
    let ring = Ring::<u64, _>::init(HeapRegion::new(bytes).unwrap(), "oc", 4096, cfg).unwrap();
    let per = total / threads;
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    let (ring, done) = (&ring, &done);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || {
                let p = ring.producer().unwrap();
                let buf = vec![1u64; burst];
                let mut sent = 0;
                while sent < per {
                    let n = (per - sent).min(burst as u64) as usize;
                    let c = p.enqueue_burst(&buf[..n]).count;
                    if c == 0 {
                        std::thread::yield_now();
                    }
                    sent += u64::from(c);
                }
            });
            s.spawn(move || {
                let c = ring.consumer().unwrap();
                let mut buf = vec![0u64; burst];
                while done.load(Ordering::Relaxed) < per * threads {
                    let n = c.dequeue_burst(&mut buf).count;
                    if n == 0 {
                        std::thread::yield_now();
                    }
                    done.fetch_add(u64::from(n), Ordering::Relaxed);
                }
            });
        }
    });
    t0.elapsed().as_nanos() as f64 / (per * threads) as f64
}

/// Prints a small table; medians of 5 runs per cell.
pub fn run() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!("overcommit: ns per element (median of 5), {cpus} CPUs, burst 32, 2*10^7 elements");
    println!(
        "{:>18} {:>10} {:>10} {:>10}",
        "threads (P+C)", "MP/MC", "RTS", "HTS"
    );
    for threads in [1u64, 2, 4] {
        let mut row = Vec::new();
        for cfg in [RingConfig::MPMC, RingConfig::RTS, RingConfig::HTS] {
            let mut v: Vec<f64> = (0..5).map(|_| one(cfg, threads, 20_000_000, 32)).collect();
            v.sort_by(f64::total_cmp);
            row.push(v[2]);
        }
        println!(
            "{:>18} {:>10.2} {:>10.2} {:>10.2}",
            format!("{threads}+{threads}"),
            row[0],
            row[1],
            row[2]
        );
    }
}
