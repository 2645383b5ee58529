//! Mirror of DPDK 22.11 `app/test/test_ring_perf.c`, loop for loop:
//! same ring size (4096), iteration counts, TSC reads, divisions and output
//! format. Differences forced by the design: sync mode is per ring in
//! memplane, so the SP/SC rows use an SP/SC ring and the MP/MC rows an
//! MP/MC ring (DPDK calls sp_/mp_ functions on one default ring); a
//! 4096-slot memplane ring holds 4096 elements (DPDK's holds 4095).

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use memplane_ring::{Element, HeapRegion, Ring, RingConfig};

use crate::{pin, rdtsc};

const RING_SIZE: usize = 4096;

type R<E> = Ring<E, HeapRegion>;

fn make<E: Element>(cfg: RingConfig) -> R<E> {
    let bytes = R::<E>::memsize(RING_SIZE, false).expect("ring size");
    // Hugepage-backed rings would need the memzone layer; DPDK here runs
    // with --no-huge too, so both sides use ordinary pages.
    Ring::init(
        HeapRegion::new(bytes).expect("alloc"),
        "RING_PERF",
        RING_SIZE,
        cfg,
    )
    .expect("init")
}

/// The object table of the burst/bulk and two-core tests. DPDK allocates
/// it with `test_ring_calloc` = `rte_zmalloc(NULL, MAX_BURST * esize,
/// RTE_CACHE_LINE_SIZE)`: cache-line aligned. A `Vec<E>` is only aligned
/// to `E` (malloc gives 16), and where the table sits relative to the ring
/// (4 KiB aliasing, 32-byte offsets within a line) moves the 16 B rows by
/// up to 2x, so the mirror uses the same alignment as DPDK. 256 entries
/// (not 32) so `--sizes` up to 256 work. On the heap, as DPDK's.
#[repr(C, align(64))]
struct Burst<E>([E; 256]);

fn label(esize: Option<usize>) -> String {
    esize.map_or_else(
        || "legacy APIs".to_string(),
        |e| format!("elem APIs: element size {e}B"),
    )
}

fn line(esize: Option<usize>, mode: &str, what: &str, v: f64) {
    println!("{}: {mode}: {what}: {v:.2}", label(esize));
}

/// Runs everything for one element type, as `test_ring_perf_esize`.
fn esize_run<E: Element + Default>(esize: Option<usize>, sizes: &[u32]) {
    let modes = [("SP/SC", RingConfig::SPSC), ("MP/MC", RingConfig::MPMC)];
    let rings: Vec<(&str, R<E>)> = modes.iter().map(|(m, c)| (*m, make::<E>(*c))).collect();

    println!("\n### Testing single element enq/deq ###");
    for (m, r) in &rings {
        let p = r.producer().unwrap();
        let c = r.consumer().unwrap();
        let iterations = 1u64 << 24;
        let mut v = E::default();
        let start = rdtsc();
        for _ in 0..iterations {
            let _ = p.try_enqueue(v);
            if let Some(x) = c.dequeue() {
                v = x;
            }
        }
        let end = rdtsc();
        black_box(v);
        line(esize, m, "single", (end - start) as f64 / iterations as f64);
    }

    for (title, bulk) in [("burst", false), ("bulk", true)] {
        println!("\n### Testing {title} enq/deq ###");
        for (m, r) in &rings {
            let p = r.producer().unwrap();
            let c = r.consumer().unwrap();
            let mut burst = Box::new(Burst([E::default(); 256]));
            let burst = &mut burst.0;
            let iterations = 1u64 << 23;
            for &sz in sizes {
                let sz = black_box(sz) as usize;
                let start = rdtsc();
                for _ in 0..iterations {
                    if bulk {
                        let _ = p.enqueue_bulk(&burst[..sz]);
                        let _ = c.dequeue_bulk(&mut burst[..sz]);
                    } else {
                        p.enqueue_burst(&burst[..sz]);
                        c.dequeue_burst(&mut burst[..sz]);
                    }
                }
                let end = rdtsc();
                line(
                    esize,
                    m,
                    &format!("{title} (size: {sz})"),
                    (end - start) as f64 / iterations as f64,
                );
            }
            black_box(&burst);
        }
    }

    println!("\n### Testing empty bulk deq ###");
    for (m, r) in &rings {
        let c = r.consumer().unwrap();
        let mut burst = [E::default(); 256];
        let iterations = 1u64 << 26;
        let n = black_box(sizes[0]) as usize;
        let start = rdtsc();
        for _ in 0..iterations {
            let _ = c.dequeue_bulk(&mut burst[..n]);
        }
        let end = rdtsc();
        line(
            esize,
            m,
            &format!("bulk (size: {})", sizes[0]),
            (end - start) as f64 / iterations as f64,
        );
    }

    println!("\n### Testing using two physical cores ###");
    for &sz in sizes {
        let mut res = Vec::new();
        // Enqueue on CPU 0 (DPDK's main lcore), dequeue on CPU 1; both
        // threads do the SP/SC pass then the MP/MC pass, as DPDK's helper.
        let count = AtomicU32::new(0);
        let (enq, deq) = std::thread::scope(|s| {
            let rings = &rings;
            let count = &count;
            let d = s.spawn(move || {
                pin(1);
                pair_side::<E>(false, rings, sz as usize, count)
            });
            pin(0);
            let e = pair_side::<E>(true, rings, sz as usize, count);
            (e, d.join().unwrap())
        });
        for i in 0..2 {
            res.push(enq[i] + deq[i]);
        }
        line(esize, "SP/SC", &format!("bulk (size: {sz})"), res[0]);
        line(esize, "MP/MC", &format!("bulk (size: {sz})"), res[1]);
    }
}

/// `enqueue_dequeue_bulk_helper`: 2^15 bulks per mode, retried with a
/// pause until they succeed; returns cycles per element for [SP/SC, MP/MC].
fn pair_side<E: Element + Default>(
    enq: bool,
    rings: &[(&str, R<E>)],
    size: usize,
    count: &AtomicU32,
) -> [f64; 2] {
    if count.fetch_add(1, Ordering::Relaxed) + 1 != 2 {
        while count.load(Ordering::Relaxed) != 2 {
            core::hint::spin_loop();
        }
    }
    let iterations = 1u64 << 15;
    let mut burst = Box::new(Burst([E::default(); 256]));
    let burst = &mut burst.0;
    let mut out = [0.0; 2];
    for (k, (_, r)) in rings.iter().enumerate() {
        let (start, end);
        if enq {
            let p = r.producer().unwrap();
            start = rdtsc();
            for _ in 0..iterations {
                while p.enqueue_bulk(&burst[..size]).is_err() {
                    core::hint::spin_loop();
                }
            }
            end = rdtsc();
        } else {
            let c = r.consumer().unwrap();
            start = rdtsc();
            for _ in 0..iterations {
                while c.dequeue_bulk(&mut burst[..size]).is_err() {
                    core::hint::spin_loop();
                }
            }
            end = rdtsc();
        }
        out[k] = (end - start) as f64 / (iterations * size as u64) as f64;
    }
    black_box(&burst);
    out
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct E16([u64; 2]);
// SAFETY: two u64s: every bit pattern is valid.
unsafe impl Element for E16 {}

/// Entry point: legacy (pointer-size) elements, then 16-byte elements.
pub fn run(sizes: &[u32]) {
    pin(0);
    esize_run::<u64>(None, sizes);
    esize_run::<E16>(Some(16), sizes);
    println!("Test OK");
}
