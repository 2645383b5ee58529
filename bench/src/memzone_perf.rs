//! memplane's memzone workloads of `bench/compare malloc`:
//!
//! - [`table`]: the `rte_memzone_reserve` table of DPDK 22.11
//!   `malloc_perf_autotest` (`test_alloc_perf` with `memzone_alloc` /
//!   `memzone_free`), loop for loop, printed by `malloc-perf` after the
//!   rte_zmalloc table in DPDK's format. For each size of
//!   [`crate::malloc_perf::SIZES`]: up to `memzone_capacity() - 1` zones
//!   reserved back to back with
//!   `Memory::memzone_reserve_aligned("test-mz-<rdtsc hex>", size,
//!   SOCKET_ID_ANY, PAGE_1G | SIZE_HINT_ONLY, 0)` (the name is formatted
//!   inside the timed loop, as DPDK's `snprintf`; into a stack buffer), stop
//!   at the first error (which stays inside the timed loop); no memset; every
//!   zone freed (`Memzone::free`), timed; the `est.memset` column is the
//!   reference memset scaled to the size, as DPDK computes it.
//! - [`run_scale`] (`memzone-scale`): the mirror of
//!   `bench/dpdk/memzone_scale.c`: [`SCALE_ZONES`] zones of [`SCALE_SIZE`]
//!   bytes named `mz-scale-<i>` (`memzone_reserve(name, 64, SOCKET_ID_ANY,
//!   NONE)`), each reserve timed on its own (names formatted beforehand);
//!   then one lookup of every name in a strided order ([`stride`]), one timed
//!   loop, each result checked against the reserved zone; then every zone
//!   freed in reservation order, one timed loop. Prints
//!   `memzone-scale zones=.. size=.. first100_us=.. last100_us=.. reserve_us=.. lookup_us=.. free_us=.. first_us=..`
//!   (`first_us`: the first reserve alone, which may grow the heap).

use std::io::Write as _;
use std::time::{Duration, Instant};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::{Memzone, MemzoneFlags};
use memplane::Memory;

/// DPDK's name of the memzone table of `malloc_perf_autotest`.
pub const MZ_FUNC: &str = "rte_memzone_reserve";
/// Zones of the scaling workload ...
pub const SCALE_ZONES: usize = 2500;
/// ... of this many bytes ...
pub const SCALE_SIZE: usize = 64;
/// ... with the first and the last this many reserves averaged.
pub const SCALE_WINDOW: usize = 100;

/// `RTE_MEMZONE_NAMESIZE`: DPDK's name buffer (names up to 31 bytes).
const NAME_BUF: usize = 32;
const GIB: f64 = (1u64 << 30) as f64;

fn us(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

/// The lookup order's stride: the first number from 7919 up that is
/// coprime with `zones`, so `(k * stride) % zones` visits every index once
/// (`bench/dpdk/memzone_scale.c` picks it the same way).
pub fn stride(zones: usize) -> usize {
    fn gcd(mut a: usize, mut b: usize) -> usize {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    // Some prime from 7919 up does not divide `zones`, so this ends.
    (7919..usize::MAX)
        .find(|&s| gcd(s, zones) == 1)
        .unwrap_or(1)
}

/// The `rte_memzone_reserve` table; `memset_us_per_gb` is the reference
/// memset (for the `est.memset` column).
pub fn table(mem: &Memory, memset_us_per_gb: f64) -> Result<(), String> {
    let max_runs = mem.memzone_capacity().saturating_sub(1);
    let flags = MemzoneFlags::PAGE_1G | MemzoneFlags::SIZE_HINT_ONLY;
    println!("Performance: {MZ_FUNC} (memplane Memory::memzone_reserve_aligned)");
    println!(
        "{:>12}{:>8}{:>12}{:>12}{:>12}{:>17}",
        "Size (B)", "Runs", "Alloc (us)", "Free (us)", "Total (us)", "est.memset (us)"
    );
    let mut zones: Vec<Memzone<'_>> = Vec::with_capacity(max_runs);
    for size in crate::malloc_perf::SIZES {
        let size = size as usize;
        let mut stop = None;
        let t = Instant::now();
        for _ in 0..max_runs {
            // snprintf(gen_name, sizeof(gen_name), "test-mz-%" PRIx64, rte_rdtsc())
            let mut buf = [0u8; NAME_BUF];
            let room = {
                let mut w = &mut buf[..];
                let _ = write!(w, "test-mz-{:x}", crate::rdtsc());
                w.len()
            };
            let name = std::str::from_utf8(&buf[..NAME_BUF - room]).unwrap_or("");
            match mem.memzone_reserve_aligned(name, size, SOCKET_ID_ANY, flags, 0) {
                Ok(z) => zones.push(z),
                Err(e) => {
                    stop = Some(e.to_string());
                    break;
                }
            }
        }
        let t_alloc = t.elapsed();
        if let Some(e) = &stop {
            println!(
                "# {MZ_FUNC} {size}: stopped after {} zones: {e}",
                zones.len()
            );
        }
        if zones.is_empty() {
            println!("{size:>12} Interrupted: out of memory.");
            break;
        }
        let runs = zones.len();
        let mut bad = 0usize;
        let t = Instant::now();
        for z in zones.drain(..) {
            if z.free().is_err() {
                bad += 1;
            }
        }
        let t_free = t.elapsed();
        if bad > 0 {
            return Err(format!("{MZ_FUNC} {size}: {bad} memzone frees failed"));
        }
        let (a, f) = (us(t_alloc, runs), us(t_free, runs));
        println!(
            "{size:>12}{runs:>8}{a:>12.3}{f:>12.3}{:>12.3}{:>17.3}",
            a + f,
            memset_us_per_gb * size as f64 / GIB
        );
    }
    println!();
    Ok(())
}

/// `memzone-scale`; returns the process exit code.
pub fn run_scale(prefix: &str) -> i32 {
    crate::pin(0);
    let (mem, _tmp) = match crate::malloc_perf::instance(prefix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    match scale(&mem, SCALE_ZONES, SCALE_SIZE) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("error: memzone-scale: {e}");
            1
        }
    }
}

fn scale(mem: &Memory, n: usize, size: usize) -> Result<String, String> {
    let window = n.min(SCALE_WINDOW);
    let names: Vec<String> = (0..n).map(|i| format!("mz-scale-{i}")).collect();
    let mut zones: Vec<Memzone<'_>> = Vec::with_capacity(n);
    let mut each: Vec<Duration> = Vec::with_capacity(n);
    for name in &names {
        let start = Instant::now();
        let res = mem.memzone_reserve(name, size, SOCKET_ID_ANY, MemzoneFlags::NONE);
        let took = start.elapsed();
        match res {
            Ok(z) => {
                zones.push(z);
                each.push(took);
            }
            Err(e) => {
                let done = zones.len();
                for z in zones {
                    let _ = z.free();
                }
                return Err(format!(
                    "memzone_reserve({name}, {size}) failed after {done} zones: {e}"
                ));
            }
        }
    }
    let step = stride(n);
    let mut bad = 0usize;
    let t = Instant::now();
    for i in 0..n {
        let k = i * step % n;
        match mem.memzone_lookup(&names[k]) {
            Some(z) if z.as_ptr() == zones[k].as_ptr() => {}
            _ => bad += 1,
        }
    }
    let t_lookup = t.elapsed();
    if bad > 0 {
        for z in zones {
            let _ = z.free();
        }
        return Err(format!("{bad} lookups did not find their zone"));
    }
    let t = Instant::now();
    for z in zones {
        if z.free().is_err() {
            bad += 1;
        }
    }
    let t_free = t.elapsed();
    if bad > 0 {
        return Err(format!("{bad} memzone frees failed"));
    }
    let mean = |d: &[Duration]| us(d.iter().sum(), d.len());
    Ok(format!(
        "memzone-scale zones={n} size={size} first100_us={:.3} last100_us={:.3} reserve_us={:.3} lookup_us={:.3} free_us={:.3} first_us={:.3}",
        mean(&each[..window]),
        mean(&each[n - window..]),
        mean(&each),
        us(t_lookup, n),
        us(t_free, n),
        mean(&each[..1])
    ))
}
