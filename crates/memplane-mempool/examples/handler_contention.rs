//! Backend throughput under contention: threads get and put bulks of
//! objects with no cache, so every operation goes to the handler
//! (`ring_mp_mc`, the spinlock `stack`, the lock-free `lf_stack`, the
//! `bucket` handler).
//! Indicative only (shared machines are noisy); the real benchmark lives
//! in `bench/`.
//!
//! `cargo run --release -p memplane-mempool --example handler_contention
//! [THREADS [SECS [BULK]]]` (defaults 2, 1, 8). Needs a few hugepages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memplane::{MemOptions, Memory};
use memplane_mempool::{Mempool, MempoolConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let secs: f64 = args.get(1).map_or(Ok(1.0), |a| a.parse())?;
    let bulk: usize = args.get(2).map_or(Ok(8), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let prefix = format!("mpl_contention_{}", std::process::id());
    let mem = Memory::init(&MemOptions::parse_args(&[
        "--file-prefix",
        &prefix,
        "--runtime-dir",
        dir.path().to_str().unwrap_or("/tmp"),
    ])?)?;
    println!("{threads} threads, bulk {bulk}, {secs} s each, no cache");
    println!("{:<12} {:>14}", "handler", "objects/s");
    for h in ["ring_mp_mc", "stack", "lf_stack", "bucket"] {
        let pool = Mempool::create(&mem, h, &MempoolConfig::new(8192, 64).handler(h))?;
        let stop = AtomicBool::new(false);
        let moved = AtomicU64::new(0);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                let (pool, stop, moved) = (&pool, &stop, &moved);
                s.spawn(move || {
                    let mut objs = vec![std::ptr::null_mut(); bulk];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..256 {
                            if pool.get_bulk(&mut objs).is_ok() {
                                pool.put_bulk(&objs).expect("our objects");
                                n += bulk as u64;
                            }
                        }
                    }
                    moved.fetch_add(n, Ordering::Relaxed);
                });
            }
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
        });
        let rate = moved.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
        println!("{h:<12} {rate:>14.0}");
        pool.free()?;
    }
    Ok(())
}
