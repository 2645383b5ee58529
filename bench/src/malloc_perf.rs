//! memplane's side of `bench/compare malloc`: a loop-for-loop mirror of DPDK
//! 22.11 `malloc_perf_autotest` (`app/test/test_malloc_perf.c`) for its
//! rte_malloc, rte_zmalloc and rte_memzone_reserve tables, printing DPDK's
//! own table format, and the 4 KiB blocks aligned to 4 KiB workload of
//! `bench/dpdk/malloc_aligned.c`.
//!
//! `malloc-perf`, as the test does it:
//! 1. reference: one 1 GiB block, memset 20 times, freed; prints
//!    `Result: <GiB/s> GiB/s <=> <us/MiB> us/MiB`;
//! 2. for rte_malloc (here `Memory::malloc(size, 0)`) and then rte_zmalloc
//!    (`Memory::zmalloc(size, 0)`), for each size of [`SIZES`]: allocate
//!    blocks back to back, at most [`MAX_RUNS`], stopping at the first
//!    failure (the failing call stays inside the timed loop); if none was
//!    allocated print `<size> Interrupted: out of memory.` and stop this
//!    allocator; memset every block to 0; free every block
//!    (`Memory::free`); print one row of average microseconds per block;
//! 3. the rte_memzone_reserve table ([`crate::memzone_perf::table`]: up to
//!    `memzone_capacity() - 1` zones per size, no memset, est.memset from
//!    the reference). Each table:
//!
//! ```text
//! Performance: rte_malloc (memplane Memory::malloc)
//!     Size (B)    Runs  Alloc (us)   Free (us)  Total (us)      memset (us)
//!           64   10000       0.100       0.040       0.140            0.010
//! ```
//!
//! (three decimals where DPDK prints two). `malloc-aligned`: in a fresh
//! instance, `Memory::malloc(4096, 4096)` back to back up to 10000 blocks,
//! then `free` of each; prints
//! `aligned size=4096 align=4096 blocks=<n> alloc_us=<a> free_us=<f> total_us=<t>`.
//!
//! Both pin themselves to CPU 0 (DPDK's main lcore with `-l 0`) and use
//! 2 MiB pages only (`pagesz_mem(1G, 0)`: DPDK is given a 2 MiB hugetlbfs
//! mount). Lines starting with `#` say why a loop stopped.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use memplane::{MemOptions, Memory, PageSize};

use crate::memseg_perf::TempDir;

/// `MAX_RUNS` of `test_malloc_perf.c`.
pub const MAX_RUNS: usize = 10_000;
/// `SIZES` of `test_malloc_perf.c`.
pub const SIZES: [u64; 10] = [
    1 << 6,
    1 << 7,
    1 << 10,
    1 << 12,
    1 << 16,
    1 << 20,
    1 << 21,
    1 << 22,
    1 << 24,
    1 << 30,
];
/// The allocators compared, by DPDK's table names.
pub const FUNCS: [&str; 2] = ["rte_malloc", "rte_zmalloc"];
/// Every table of `malloc_perf_autotest`, in its order: [`FUNCS`], then
/// the memzone table.
pub const TABLES: [&str; 3] = [FUNCS[0], FUNCS[1], crate::memzone_perf::MZ_FUNC];
/// The aligned workload: blocks of this size ...
pub const ALIGNED_SIZE: usize = 4096;
/// ... aligned to this ...
pub const ALIGNED_ALIGN: usize = 4096;
/// ... at most this many.
pub const ALIGNED_BLOCKS: usize = 10_000;

const GIB: usize = 1 << 30;
const KIB: f64 = 1024.0;
/// `RUNS` of `test_memset_perf`.
const MEMSET_RUNS: u32 = 20;

/// The calls the mirror makes: rte_malloc, rte_zmalloc, rte_free.
trait Heap {
    fn alloc(&self, zero: bool, size: usize, align: usize) -> Result<NonNull<u8>, String>;
    /// # Safety
    /// `p` came from [`Heap::alloc`] of this heap and is not used again.
    unsafe fn release(&self, p: NonNull<u8>) -> Result<(), String>;
}

impl Heap for Memory {
    fn alloc(&self, zero: bool, size: usize, align: usize) -> Result<NonNull<u8>, String> {
        let r = if zero {
            self.zmalloc(size, align)
        } else {
            self.malloc(size, align)
        };
        r.map_err(|e| e.to_string())
    }

    unsafe fn release(&self, p: NonNull<u8>) -> Result<(), String> {
        // SAFETY: forwarded contract: `p` is a live block of this heap,
        // not used again.
        unsafe { self.free(p) }.map_err(|e| e.to_string())
    }
}

fn us(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

/// `test_memset_perf`: us per GiB of memset, or why not.
/// Frees every block of `ptrs` (which must come from `heap` and not be
/// used again), timed; returns the time and how many frees failed.
fn free_all(heap: &impl Heap, ptrs: &mut Vec<NonNull<u8>>) -> (std::time::Duration, usize) {
    let mut bad = 0usize;
    let t = Instant::now();
    for p in ptrs.drain(..) {
        // SAFETY: the caller's blocks, from `heap`, freed once here and
        // not used after (the vector is emptied).
        if unsafe { heap.release(p) }.is_err() {
            bad += 1;
        }
    }
    (t.elapsed(), bad)
}

fn memset_reference(heap: &impl Heap) -> Result<f64, String> {
    println!("Reference: memset");
    let p = heap
        .alloc(false, GIB, 0)
        .map_err(|e| format!("malloc(size=40000000) failed: {e}"))?;
    let t = Instant::now();
    for _ in 0..MEMSET_RUNS {
        // black_box: 20 identical memsets of one block would otherwise be
        // merged into one (dead-store elimination); DPDK's C loop keeps all.
        // SAFETY: `p` is a live 1 GiB block of ours.
        unsafe { std::ptr::write_bytes(std::hint::black_box(p.as_ptr()), 0, GIB) };
    }
    let us_per_gb = us(t.elapsed(), MEMSET_RUNS as usize);
    println!(
        "Result: {:.3} GiB/s <=> {:.2} us/MiB",
        1e6 / us_per_gb,
        us_per_gb / KIB
    );
    // SAFETY: allocated above, not used after.
    unsafe { heap.release(p) }.map_err(|e| format!("free of the reference block: {e}"))?;
    println!();
    Ok(us_per_gb)
}

/// `test_alloc_perf` for rte_malloc (`zero` false) or rte_zmalloc.
fn alloc_perf(heap: &impl Heap, name: &str, zero: bool) -> Result<(), String> {
    let call = if zero { "zmalloc" } else { "malloc" };
    println!("Performance: {name} (memplane Memory::{call})");
    println!(
        "{:>12}{:>8}{:>12}{:>12}{:>12}{:>17}",
        "Size (B)", "Runs", "Alloc (us)", "Free (us)", "Total (us)", "memset (us)"
    );
    let mut ptrs: Vec<NonNull<u8>> = Vec::with_capacity(MAX_RUNS);
    for size in SIZES {
        let size = size as usize;
        ptrs.clear();
        let mut stop = None;
        let t = Instant::now();
        for _ in 0..MAX_RUNS {
            match heap.alloc(zero, size, 0) {
                Ok(p) => ptrs.push(p),
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            }
        }
        let t_alloc = t.elapsed();
        if let Some(e) = &stop {
            println!("# {name} {size}: stopped after {} blocks: {e}", ptrs.len());
        }
        if ptrs.is_empty() {
            println!("{size:>12} Interrupted: out of memory.");
            break;
        }
        let runs = ptrs.len();
        let t = Instant::now();
        for p in &ptrs {
            // SAFETY: every pointer is a live block of at least `size` bytes.
            // (black_box: a real memset call, as DPDK's through memset_fn.)
            unsafe { std::ptr::write_bytes(std::hint::black_box(p.as_ptr()), 0, size) };
        }
        let t_memset = t.elapsed();
        let (t_free, bad) = free_all(heap, &mut ptrs);
        if bad > 0 {
            return Err(format!("{name} {size}: {bad} frees failed"));
        }
        let (a, f) = (us(t_alloc, runs), us(t_free, runs));
        println!(
            "{size:>12}{runs:>8}{a:>12.3}{f:>12.3}{:>12.3}{:>17.3}",
            a + f,
            us(t_memset, runs)
        );
    }
    println!();
    Ok(())
}

/// A memplane instance as the malloc and memzone workloads use it, with
/// its runtime dir.
pub fn instance(prefix: &str) -> Result<(Memory, TempDir), String> {
    let tmp = TempDir::new(&format!("malloc-{prefix}"))
        .map_err(|e| format!("cannot create a runtime directory: {e}"))?;
    let mem = MemOptions::new()
        .file_prefix(prefix)
        .runtime_dir(&tmp.0)
        .pagesz_mem(PageSize::SIZE_1G, 0)
        .build()
        .map_err(memplane::Error::from)
        .and_then(|o| Memory::init(&o))
        .map_err(|e| format!("memplane Memory::init: {e}"))?;
    Ok((mem, tmp))
}

/// `malloc-perf`; returns the process exit code.
pub fn run(prefix: &str) -> i32 {
    crate::pin(0);
    let (mem, _tmp) = match instance(prefix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let res = memset_reference(&mem).and_then(|us_per_gb| {
        alloc_perf(&mem, FUNCS[0], false)?;
        alloc_perf(&mem, FUNCS[1], true)?;
        crate::memzone_perf::table(&mem, us_per_gb)
    });
    match res {
        Ok(()) => {
            println!("Test OK");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            println!("Test Failed");
            1
        }
    }
}

/// `malloc-aligned`; returns the process exit code.
pub fn run_aligned(prefix: &str) -> i32 {
    crate::pin(0);
    let (mem, _tmp) = match instance(prefix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let mut ptrs: Vec<NonNull<u8>> = Vec::with_capacity(ALIGNED_BLOCKS);
    let mut stop = None;
    let t = Instant::now();
    for _ in 0..ALIGNED_BLOCKS {
        match mem.alloc(false, ALIGNED_SIZE, ALIGNED_ALIGN) {
            Ok(p) => ptrs.push(p),
            Err(e) => {
                stop = Some(e);
                break;
            }
        }
    }
    let t_alloc = t.elapsed();
    let runs = ptrs.len();
    let misaligned = ptrs
        .iter()
        .filter(|p| p.as_ptr() as usize % ALIGNED_ALIGN != 0)
        .count();
    let (t_free, bad) = free_all(&mem, &mut ptrs);
    if let Some(e) = &stop {
        println!("# aligned: stopped after {runs} blocks: {e}");
    }
    if runs == 0 || bad > 0 || misaligned > 0 {
        eprintln!(
            "error: aligned workload: {runs} blocks allocated ({}), {misaligned} misaligned, {bad} frees failed",
            stop.as_deref().unwrap_or("no failure")
        );
        return 1;
    }
    let (a, f) = (us(t_alloc, runs), us(t_free, runs));
    println!(
        "aligned size={ALIGNED_SIZE} align={ALIGNED_ALIGN} blocks={runs} alloc_us={a:.3} free_us={f:.3} total_us={:.3}",
        a + f
    );
    // Back-to-back malloc+free pairs, with an anchor block keeping the
    // heap's page (as bench/dpdk/malloc_aligned.c does).
    let anchor = match mem.alloc(false, 64, 0) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: anchor block: {e}");
            return 1;
        }
    };
    for size in PAIR_SIZES {
        let t = Instant::now();
        for _ in 0..PAIR_COUNT {
            let p = match mem.alloc(false, size, 0) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: pair malloc({size}): {e}");
                    return 1;
                }
            };
            // SAFETY: allocated just above, freed once, not used after.
            if unsafe { mem.release(std::hint::black_box(p)) }.is_err() {
                eprintln!("error: pair free({size}) failed");
                return 1;
            }
        }
        println!(
            "pair size={size} count={PAIR_COUNT} pair_us={:.4}",
            us(t.elapsed(), PAIR_COUNT)
        );
    }
    // SAFETY: the anchor, freed once.
    let _ = unsafe { mem.release(anchor) };
    0
}

/// Sizes of the malloc+free pair rows.
pub const PAIR_SIZES: [usize; 3] = [64, 256, 1024];
/// Pairs per size.
pub const PAIR_COUNT: usize = 1_000_000;
