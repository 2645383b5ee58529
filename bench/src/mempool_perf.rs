//! `mempool-perf`: memplane's mirror of DPDK 22.11 `mempool_perf_autotest`
//! (app/test/test_mempool_perf.c) for 1 and 2 cores: pools of 2048-byte
//! objects, size `2 x (512 + 512) - 1` (the autotest's formula with 2
//! lcores), without cache, with a 512-object per-lcore cache (looked up
//! once per thread, `Mempool::lcore_cache`, as the autotest passes
//! `rte_mempool_default_cache()` to every call), and without
//! cache through one user-owned cache of 512 per thread. For each core
//! count, get/put bulk sizes in {1, 4, 8, 32} (get == put unless
//! `--all-bulks`, which gives the autotest's cross product) and n_keep in
//! {32, 128, 512}: every thread repeats `test_loop` (N/n_keep rounds of
//! [get n_keep objects in bulks of n_get_bulk, put them back in bulks of
//! n_put_bulk], N = 65536) until `--secs` elapsed; rows with get == put
//! are replayed with compile-time constant sizes (`constant_n=1`), as the
//! autotest does. 2-core rows: two threads pinned to CPUs 0 and 1, each
//! with its own lcore id (`register_thread`), released together on the
//! same pool; the rate is the sum of both threads' objects / seconds (one
//! object = one get + put). Lines are printed in DPDK's format, under
//! DPDK's section headers. `--leak-tracking` switches the pools' leak
//! tracking on first, `--stats` their statistics (to measure what each
//! costs).
//!
//! `compare mempool` runs DPDK's side, `bench/dpdk/mempool_perf.c` (the
//! autotest's loops for 1 and 2 cores on their own, since `dpdk-test
//! mempool_perf_autotest` runs every row for 1, 2 and all cores at 5 s
//! each), and this mirror alternately `--runs` times with `--secs` per
//! row, and prints medians side by side with the ratio and the target
//! (memplane >= 1.00 x DPDK). `--tracking` adds a column: memplane with
//! leak tracking on. `--dpdk-output FILE` adds the rows of a saved
//! `dpdk-test mempool_perf_autotest` output as a column (a check that the C
//! program measures what the autotest does).

// The get/put wrappers and the loop must inline into each call site, so
// constant bulk sizes stay constant (the autotest's constant_n rows).
#![allow(clippy::inline_always)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use memplane::Memory;
use memplane_mempool::{
    register_thread, LcoreCache, Mempool, MempoolCache, MempoolConfig, MempoolError,
};

const N: usize = 65536;
const ELT: u32 = 2048;
const MAX_KEEP: usize = 512;
const CACHE: u32 = 512;
/// The autotest runs here with 2 lcores (`-l 0-1`): its pool size is
/// `rte_lcore_count() x (MAX_KEEP + cache) - 1`.
const LCORES: u32 = 2;
const BULKS: [usize; 4] = [1, 4, 8, 32];
const KEEPS: [usize; 3] = [32, 128, 512];
/// The target: memplane at least as fast as DPDK on every row.
const TARGET: f64 = 1.0;

/// The get/put pair one thread uses: the pool's own (per-lcore cache or
/// none) or through a user-owned cache.
trait Ops {
    fn get(&mut self, out: &mut [*mut u8]) -> Result<(), MempoolError>;
    fn put(&mut self, objs: &[*mut u8]) -> Result<(), MempoolError>;
}

struct PoolOps<'a, 'm>(&'a Mempool<'m>);

impl Ops for PoolOps<'_, '_> {
    #[inline(always)]
    fn get(&mut self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        self.0.get_bulk(out)
    }
    #[inline(always)]
    fn put(&mut self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.0.put_bulk(objs)
    }
}

/// The thread's lcore cache, looked up once per thread, as the autotest
/// does (`rte_mempool_default_cache(mp, lcore_id)` passed to every
/// `rte_mempool_generic_get/put`).
struct LcoreOps<'p, 'm>(LcoreCache<'p, 'm>);

impl Ops for LcoreOps<'_, '_> {
    #[inline(always)]
    fn get(&mut self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        self.0.get_bulk(out)
    }
    #[inline(always)]
    fn put(&mut self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.0.put_bulk(objs)
    }
}

struct UserCacheOps<'a, 'm>(&'a Mempool<'m>, MempoolCache);

impl Ops for UserCacheOps<'_, '_> {
    #[inline(always)]
    fn get(&mut self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        self.0.get_bulk_with(&mut self.1, out)
    }
    #[inline(always)]
    fn put(&mut self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.0.put_bulk_with(&mut self.1, objs)
    }
}

/// The autotest's `test_loop`; inlined into each call site so that
/// constant sizes stay constant (its `constant_n=1` rows).
#[inline(always)]
fn test_loop(
    o: &mut impl Ops,
    table: &mut [*mut u8; MAX_KEEP],
    keep: usize,
    get: usize,
    put: usize,
) -> Result<(), MempoolError> {
    // keep <= MAX_KEEP and keep is a multiple of both bulk sizes (the
    // callers' rows), so every slice is inside the table: unchecked, as
    // the autotest's C indexes its table.
    debug_assert!(keep <= MAX_KEEP && keep % get == 0 && keep % put == 0);
    for _ in 0..N / keep {
        let mut idx = 0;
        while idx < keep {
            // SAFETY: idx + get <= keep <= MAX_KEEP (above).
            o.get(unsafe { table.get_unchecked_mut(idx..idx + get) })?;
            idx += get;
        }
        idx = 0;
        while idx < keep {
            // SAFETY: idx + put <= keep <= MAX_KEEP (above).
            o.put(unsafe { table.get_unchecked(idx..idx + put) })?;
            idx += put;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Row {
    get: usize,
    put: usize,
    keep: usize,
    constant: bool,
}

/// One thread's part of a row: objects and seconds.
fn per_thread(o: &mut impl Ops, r: Row, secs: f64, start: &Barrier) -> Result<(u64, f64), String> {
    #[repr(align(64))]
    struct Table([*mut u8; MAX_KEEP]);
    let mut t = Table([std::ptr::null_mut(); MAX_KEEP]);
    let table = &mut t.0;
    let limit = Duration::from_secs_f64(secs);
    start.wait();
    let t0 = Instant::now();
    let res = match (r.constant, r.get) {
        (false, _) => timed_variable(o, table, r, t0, limit),
        (true, 1) => timed_constant::<1>(o, table, r.keep, t0, limit),
        (true, 4) => timed_constant::<4>(o, table, r.keep, t0, limit),
        (true, 8) => timed_constant::<8>(o, table, r.keep, t0, limit),
        (true, 32) => timed_constant::<32>(o, table, r.keep, t0, limit),
        (true, g) => return Err(format!("no constant variant for bulk {g}")),
    };
    let count = res.map_err(|e| format!("get/put failed: {e}"))?;
    Ok((count, t0.elapsed().as_secs_f64()))
}

// Each row's timed loop is a function of its own (never inlined into
// per_thread): with all five loops in one function, the register
// allocation and code placement of one row's loop changed with any change
// to another's path (a bulk-32 check made the constant bulk-1 loop 14%
// slower, with the loop itself unchanged but for one operand spilled).
// The two loops below are written out on purpose: one helper taking the
// pass as a closure changed the variable bulk-1 loop's code (-15%).

/// Repeats `test_loop` with runtime bulk sizes until `limit`; objects.
#[inline(never)]
fn timed_variable(
    o: &mut impl Ops,
    table: &mut [*mut u8; MAX_KEEP],
    r: Row,
    t0: Instant,
    limit: Duration,
) -> Result<u64, MempoolError> {
    let mut count = 0u64;
    loop {
        test_loop(o, table, r.keep, r.get, r.put)?;
        count += N as u64;
        if t0.elapsed() >= limit {
            return Ok(count);
        }
    }
}

/// Repeats `test_loop` with the compile-time bulk size `B` for gets and
/// puts (the autotest's `constant_n=1`) until `limit`; objects.
#[inline(never)]
fn timed_constant<const B: usize>(
    o: &mut impl Ops,
    table: &mut [*mut u8; MAX_KEEP],
    keep: usize,
    t0: Instant,
    limit: Duration,
) -> Result<u64, MempoolError> {
    let mut count = 0u64;
    loop {
        test_loop(o, table, keep, B, B)?;
        count += N as u64;
        if t0.elapsed() >= limit {
            return Ok(count);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    NoCache,
    Cache,
    UserCache,
}

/// One row on `cores` threads; objects per second, summed.
fn launch(
    mem: &Memory,
    pool: &Mempool<'_>,
    mode: Mode,
    cores: usize,
    r: Row,
    secs: f64,
) -> Result<f64, String> {
    let start = Barrier::new(cores);
    let results: Vec<Result<(u64, f64), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cores)
            .map(|cpu| {
                let start = &start;
                s.spawn(move || {
                    crate::pin(cpu);
                    register_thread(mem).map_err(|e| format!("lcore id: {e}"))?;
                    if mode == Mode::UserCache {
                        let uc = MempoolCache::new(CACHE).map_err(|e| e.to_string())?;
                        let mut o = UserCacheOps(pool, uc);
                        let r = per_thread(&mut o, r, secs, start);
                        o.1.flush(pool).map_err(|e| format!("flush: {e}"))?;
                        r
                    } else if mode == Mode::Cache {
                        let lc = pool.lcore_cache().ok_or("no lcore cache")?;
                        per_thread(&mut LcoreOps(lc), r, secs, start)
                    } else {
                        per_thread(&mut PoolOps(pool), r, secs, start)
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut rate = 0.0;
    for res in results {
        let (count, el) = res?;
        rate += count as f64 / el;
    }
    Ok(rate)
}

/// Runs the mirror; returns the process exit code.
pub fn run(
    prefix: &str,
    secs: f64,
    all_bulks: bool,
    tracking: bool,
    stats: bool,
    only: Option<&str>,
) -> i32 {
    let (mem, _tmp) = match crate::malloc_perf::instance(prefix) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let size = LCORES * (MAX_KEEP as u32 + CACHE) - 1;
    let mk = |name: &str, cache| {
        let p = Mempool::create_with(
            &mem,
            name,
            &MempoolConfig::new(size, ELT).cache_size(cache),
            // The autotest's my_obj_init: zero the element, object
            // number in its first 4 bytes.
            |i, e| {
                // SAFETY: `e` is an element of ELT bytes, not yet published.
                unsafe {
                    std::ptr::write_bytes(e, 0, ELT as usize);
                    e.cast::<u32>().write_unaligned(i);
                }
            },
        )
        .expect("create pool");
        if tracking {
            p.set_leak_tracking(true).expect("leak tracking");
        }
        if stats {
            p.set_stats(true).expect("statistics");
        }
        p
    };
    let nocache = mk("perf_test_nocache", 0);
    let cache = mk("perf_test_cache", CACHE);
    for p in [&nocache, &cache] {
        eprintln!(
            "{}: {} objects of {} bytes in {} memzone(s), handler {}, leak tracking {}, statistics {}",
            p.name(),
            p.size(),
            p.obj_size().total_size,
            p.chunks().len(),
            p.handler(),
            if p.leak_tracking() { "on" } else { "off" },
            if p.stats_enabled() { "on" } else { "off" }
        );
    }
    for (title, pool, mode) in [
        (
            "start performance test (without cache)",
            &nocache,
            Mode::NoCache,
        ),
        ("start performance test (with cache)", &cache, Mode::Cache),
        (
            "start performance test (with user-owned cache)",
            &nocache,
            Mode::UserCache,
        ),
    ] {
        println!("{title}");
        for cores in 1..=2 {
            for get in BULKS {
                for put in BULKS {
                    if !all_bulks && get != put {
                        continue;
                    }
                    for keep in KEEPS {
                        for constant in [false, true] {
                            if constant && get != put {
                                continue;
                            }
                            if pool.avail_count() != size {
                                println!("mempool is not full");
                                return 1;
                            }
                            let c = if mode == Mode::NoCache { 0 } else { CACHE };
                            let line = format!(
                                "mempool_autotest cache={c} cores={cores} n_get_bulk={get} n_put_bulk={put} n_keep={keep} constant_n={}",
                                u8::from(constant)
                            );
                            if only.is_some_and(|o| !format!("{title} {line}").contains(o)) {
                                continue;
                            }
                            let r = Row {
                                get,
                                put,
                                keep,
                                constant,
                            };
                            match launch(&mem, pool, mode, cores, r, secs) {
                                Ok(rate) => println!("{line} rate_persec={}", rate as u64),
                                Err(e) => {
                                    println!("per-lcore test failed: {e}");
                                    return 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = nocache.free().and_then(|()| cache.free()) {
        eprintln!("free: {e}");
        return 1;
    }
    0
}

/// (section + row) -> rate, 1- and 2-core rows.
fn parse(out: &str) -> Vec<(String, f64)> {
    let mut section = String::new();
    let mut v = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if let Some(s) = l.strip_prefix("start performance test") {
            section = s.trim().trim_matches(|c| c == '(' || c == ')').to_string();
            continue;
        }
        let Some(i) = l.find("mempool_autotest cache=") else {
            continue;
        };
        let l = &l[i..];
        if !(l.contains(" cores=1 ") || l.contains(" cores=2 ")) {
            continue;
        }
        if let Some((k, r)) = l.rsplit_once(" rate_persec=") {
            if let Ok(r) = r.trim().parse::<f64>() {
                let k = k
                    .trim_start_matches("mempool_autotest ")
                    .replace("n_get_bulk", "get")
                    .replace("n_put_bulk", "put")
                    .replace("n_keep", "keep")
                    .replace("constant_n", "const");
                v.push((format!("{section}: {k}"), r));
            }
        }
    }
    v
}

/// The `--only` filter of our side for block (section, cores), as the C
/// program's `S,C` argument selects it.
fn block_filter((section, cores): (u32, u32)) -> String {
    let (title, cache) = match section {
        0 => ("without cache", 0),
        1 => ("with cache", CACHE),
        _ => ("with user-owned cache", CACHE),
    };
    format!("({title}) mempool_autotest cache={cache} cores={cores} ")
}

fn run_dpdk(bin: &str, secs: f64, all_bulks: bool, block: (u32, u32)) -> Result<String, String> {
    let prefix = format!("mpmempool{}", std::process::id());
    let mut cmd = Command::new(bin);
    // Hugepages, as memplane's side has and as users run it (`--in-memory`:
    // no hugepage files left behind). A check with --no-huge against
    // this (2026-12-02) moved no row beyond noise: the loops touch only
    // the ring and the caches, not the objects.
    cmd.args([
        "--in-memory",
        "-m",
        "512",
        "--no-pci",
        "-l",
        "0-1",
        "--file-prefix",
        &prefix,
        "--",
    ])
    .arg(secs.to_string())
    .arg(if all_bulks { "all" } else { "-" })
    .arg(format!("{},{}", block.0, block.1));
    let out = cmd.output().map_err(|e| format!("cannot run {bin}: {e}"));
    crate::compare_mem::remove_dpdk_runtime_dir(&prefix);
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "{bin} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ours(
    secs: f64,
    all_bulks: bool,
    tracking: bool,
    block: (u32, u32),
) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["mempool-perf", "--secs", &secs.to_string()]);
    cmd.args(["--only", &block_filter(block)]);
    if all_bulks {
        cmd.arg("--all-bulks");
    }
    if tracking {
        cmd.arg("--leak-tracking");
    }
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run mempool-perf: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "memplane mempool-perf failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Options of `compare mempool`.
pub struct CompareOpts<'a> {
    /// The DPDK program (`bench/dpdk/mempool_perf.c`).
    pub bin: &'a str,
    /// Alternating runs.
    pub runs: usize,
    /// Seconds per row.
    pub secs: f64,
    /// A saved `dpdk-test mempool_perf_autotest` output.
    pub dpdk_output: Option<&'a str>,
    /// Every get/put bulk pair, not only get == put.
    pub all_bulks: bool,
    /// Also run memplane with leak tracking on (an extra column).
    pub tracking: bool,
}

/// `compare mempool`; returns the process exit code.
/// Runs DPDK's side of one block and files its rows.
fn run_dpdk_into(
    opts: &CompareOpts<'_>,
    run: usize,
    block: (u32, u32),
    dpdk: &mut BTreeMap<String, Vec<f64>>,
    order: &mut Vec<String>,
) -> Result<Vec<String>, String> {
    eprintln!("run {run}/{}, block {block:?}: {} ...", opts.runs, opts.bin);
    let t = run_dpdk(opts.bin, opts.secs, opts.all_bulks, block)?;
    let mut keys = Vec::new();
    for (k, v) in parse(&t) {
        if !order.contains(&k) {
            order.push(k.clone());
        }
        keys.push(k.clone());
        dpdk.entry(k).or_default().push(v);
    }
    Ok(keys)
}

/// The median over runs of `ours[i] / dpdk[i]`: the two sides of run `i`
/// were measured back to back (seconds apart), so a change of the
/// machine's speed between runs cancels out. Only runs with `use_run[i]`
/// count when there are any (see [`regime_probe`]); the second value is
/// the number of runs that counted. `None` when a side has no rate for
/// the row or the runs do not pair up.
fn paired_ratio(
    dpdk: Option<&Vec<f64>>,
    ours: Option<&Vec<f64>>,
    use_run: Option<&Vec<bool>>,
) -> Option<(f64, usize)> {
    let (d, o) = (dpdk?, ours?);
    if d.len() != o.len() || d.is_empty() || d.iter().any(|&x| x <= 0.0) {
        return None;
    }
    let all: Vec<f64> = d.iter().zip(o).map(|(d, o)| o / d).collect();
    let mut kept: Vec<f64> = match use_run {
        Some(u) if u.len() == all.len() => all
            .iter()
            .zip(u)
            .filter(|(_, &keep)| keep)
            .map(|(r, _)| *r)
            .collect(),
        _ => all.clone(),
    };
    if kept.is_empty() {
        kept = all;
    }
    let n = kept.len();
    Some((crate::compare::median(&mut kept), n))
}

/// Cache-line round trips per second between two threads on CPUs 0 and
/// 1, for 50 ms: which of this machine's 2-CPU regimes is on (about 2.4
/// M/s in the slow one, 10-19 M/s in the fast ones, switching within
/// seconds to minutes, for any program). Measured before and after each side of a 2-core
/// block, so that pairs measured across a switch can be left out.
pub fn regime_probe() -> f64 {
    use std::sync::atomic::{
        AtomicBool, AtomicU64,
        Ordering::{Acquire, Relaxed, Release},
    };
    #[repr(align(128))]
    struct Line(AtomicU64);
    let ball = Line(AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    let secs = 0.05;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            crate::pin(1);
            // Returns the ball (odd -> even) until told to stop.
            while !stop.load(Relaxed) {
                let v = ball.0.load(Acquire);
                if v % 2 == 1 {
                    ball.0.store(v + 1, Release);
                }
            }
        });
        // The timing side on its own thread too: the caller's affinity
        // (inherited by the programs it starts next) stays as it was.
        let rate = sc
            .spawn(|| {
                crate::pin(0);
                let t0 = std::time::Instant::now();
                let mut trips = 0u64;
                while t0.elapsed().as_secs_f64() < secs {
                    for _ in 0..64 {
                        let v = ball.0.load(Acquire);
                        ball.0.store(v + 1, Release);
                        while ball.0.load(Acquire) == v + 1 {
                            std::hint::spin_loop();
                        }
                        trips += 1;
                    }
                }
                trips as f64 / t0.elapsed().as_secs_f64()
            })
            .join()
            .unwrap_or(0.0);
        stop.store(true, Relaxed);
        rate
    })
}

/// Whether the probes around one block's two sides agree (within 1.5x,
/// where the regimes differ by 3-4x).
fn same_regime(probes: &[f64]) -> bool {
    let lo = probes.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = probes.iter().copied().fold(0.0, f64::max);
    lo > 0.0 && hi / lo <= 1.5
}

pub fn compare(opts: &CompareOpts<'_>) -> i32 {
    let (runs, secs) = (opts.runs, opts.secs);
    let mut dpdk: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ours: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut tracked: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    // The machine's speed drifts over minutes (a shared VM): each run
    // alternates the two sides block by block (one section on one core
    // count, 24 rows, a few seconds), so the rows compared are measured
    // seconds apart, not minutes.
    let blocks: Vec<(u32, u32)> = (0..3).flat_map(|s| [(s, 1), (s, 2)]).collect();
    //
    // On two cores the machine also switches between a fast regime and
    // one 3-4x slower, for minutes at a time, for both sides alike. A
    // ratio of medians compares DPDK's fast runs with our slow ones when
    // a switch falls between them; so each row's ratio is the median of
    // the per-run ratios of the two sides measured back to back, and the
    // side that goes first alternates from run to run.
    //
    // Within a run the regime can still switch between the two sides: on
    // 2-core blocks a ping-pong probe before, between and after the two
    // sides tells, and a row's ratio counts only the runs whose three
    // probes agree (all runs when none do).
    let mut use_run: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    let (mut two_core_pairs, mut two_core_kept) = (0, 0);
    for (run, &block) in (1..=runs).flat_map(|r| blocks.iter().map(move |b| (r, b))) {
        let dpdk_first = run % 2 == 1;
        let two_cores = block.1 == 2;
        let mut probes = Vec::new();
        if two_cores {
            probes.push(regime_probe());
        }
        let mut keys = Vec::new();
        if dpdk_first {
            match run_dpdk_into(opts, run, block, &mut dpdk, &mut order) {
                Ok(k) => keys = k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
            if two_cores {
                probes.push(regime_probe());
            }
        }
        let mut sides = vec![(false, &mut ours)];
        if opts.tracking {
            sides.push((true, &mut tracked));
        }
        for (tracking, into) in sides {
            eprintln!(
                "run {run}/{runs}: memplane mempool-perf{} ...",
                if tracking { " --leak-tracking" } else { "" }
            );
            match run_ours(secs, opts.all_bulks, tracking, block) {
                Ok(t) => {
                    for (k, v) in parse(&t) {
                        into.entry(k).or_default().push(v);
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
        }
        if !dpdk_first {
            if two_cores {
                probes.push(regime_probe());
            }
            match run_dpdk_into(opts, run, block, &mut dpdk, &mut order) {
                Ok(k) => keys = k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
        }
        let keep = if two_cores {
            probes.push(regime_probe());
            let same = same_regime(&probes);
            two_core_pairs += 1;
            two_core_kept += usize::from(same);
            eprintln!(
                "  regime probe (round trips/s): {:?}{}",
                probes
                    .iter()
                    .map(|p| format!("{:.1}M", p / 1e6))
                    .collect::<Vec<_>>(),
                if same {
                    ""
                } else {
                    ": switched, this pair left out"
                }
            );
            same
        } else {
            true
        };
        for k in keys {
            use_run.entry(k).or_default().push(keep);
        }
    }
    let autotest: BTreeMap<String, f64> = opts
        .dpdk_output
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|t| parse(&t).into_iter().collect())
        .unwrap_or_default();
    println!(
        "\nmempool_perf_autotest rows (1 and 2 cores): DPDK 22.11 (bench/dpdk/mempool_perf.c) vs memplane mirror, {runs} runs alternating the two sides block by block (section x cores), {secs} s per row; rates are medians"
    );
    println!("rate = objects got and put back per second (2 cores: sum of both); ratio = median over runs of memplane / DPDK measured back to back (> 1.00: memplane faster); target: ratio >= {TARGET:.2}");
    println!("pairs = runs the ratio is the median of; 2-core rows count only the runs measured in one regime (ping-pong probes before, between and after the two sides agree within 1.5x): {two_core_kept} of {two_core_pairs} block runs");
    if opts.tracking {
        println!("track = memplane with leak tracking on; t/off = track / memplane (its cost)");
    }
    if !autotest.is_empty() {
        println!("autotest = the same row in the saved dpdk-test mempool_perf_autotest output (5 s per row)");
    }
    println!();
    let mut head = format!(
        "{:<78} {:>11} {:>11} {:>6} {:>6} {:>5}",
        "test", "DPDK", "memplane", "ratio", "target", "pairs"
    );
    if opts.tracking {
        let _ =
            std::fmt::Write::write_fmt(&mut head, format_args!(" {:>11} {:>6}", "track", "t/off"));
    }
    if !autotest.is_empty() {
        let _ = std::fmt::Write::write_fmt(&mut head, format_args!(" {:>11}", "autotest"));
    }
    println!("{head}");
    let mut worst = f64::INFINITY;
    let mut below = 0;
    let mut track_ratios = Vec::new();
    for k in &order {
        let paired = paired_ratio(dpdk.get(k), ours.get(k), use_run.get(k));
        let dp = dpdk.get_mut(k).map(|v| crate::compare::median(v));
        let mp = ours.get_mut(k).map(|v| crate::compare::median(v));
        let f = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
        let (ratio, mark) = match paired {
            Some((r, _)) => {
                worst = worst.min(r);
                if r < TARGET {
                    below += 1;
                }
                (format!("{r:.2}"), if r >= TARGET { "ok" } else { "BELOW" })
            }
            None => ("-".into(), "-"),
        };
        let pairs = paired.map_or_else(|| "-".to_string(), |(_, n)| n.to_string());
        let mut line = format!(
            "{k:<78} {:>11} {:>11} {ratio:>6} {mark:>6} {pairs:>5}",
            f(dp),
            f(mp)
        );
        if opts.tracking {
            let t = tracked.get_mut(k).map(|v| crate::compare::median(v));
            let tr = match (t, mp) {
                (Some(t), Some(m)) if m > 0.0 => {
                    track_ratios.push(t / m);
                    format!("{:.2}", t / m)
                }
                _ => "-".into(),
            };
            let _ = std::fmt::Write::write_fmt(&mut line, format_args!(" {:>11} {tr:>6}", f(t)));
        }
        if !autotest.is_empty() {
            let _ = std::fmt::Write::write_fmt(
                &mut line,
                format_args!(" {:>11}", f(autotest.get(k).copied())),
            );
        }
        println!("{line}");
    }
    println!(
        "\nworst ratio: {worst:.2}; rows below the target ({TARGET:.2}): {below} of {}",
        order.len()
    );
    if !track_ratios.is_empty() {
        let med = crate::compare::median(&mut track_ratios);
        println!(
            "leak tracking on / off: median {med:.2} over {} rows",
            track_ratios.len()
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::paired_ratio;

    #[test]
    fn paired_ratio_compares_each_run_with_its_neighbour() {
        // Run 1 fast for both sides, runs 2-3 slow for both: the ratio of
        // medians (100 vs 30) would say 0.3; each run says 1.1-1.2.
        let dpdk = vec![100.0, 25.0, 25.0];
        let ours = vec![110.0, 30.0, 30.0];
        let (r, n) = paired_ratio(Some(&dpdk), Some(&ours), None).unwrap();
        assert_eq!(n, 3);
        assert!((r - 1.2).abs() < 1e-9, "{r}");
        // Unpaired or missing runs give no ratio rather than a wrong one.
        assert_eq!(paired_ratio(Some(&dpdk), Some(&vec![1.0]), None), None);
        assert_eq!(paired_ratio(None, Some(&ours), None), None);
        assert_eq!(paired_ratio(Some(&vec![0.0]), Some(&vec![1.0]), None), None);
        // Runs measured across a regime switch are left out; when every
        // run is, all count.
        let dpdk = vec![100.0, 100.0, 25.0];
        let ours = vec![110.0, 30.0, 30.0];
        let keep = vec![true, false, true];
        let (r, n) = paired_ratio(Some(&dpdk), Some(&ours), Some(&keep)).unwrap();
        assert_eq!(n, 2);
        assert!((r - 1.15).abs() < 1e-9, "{r}");
        let (_, n) = paired_ratio(Some(&dpdk), Some(&ours), Some(&vec![false; 3])).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn same_regime_needs_probes_within_one_and_a_half() {
        use super::same_regime;
        assert!(same_regime(&[20e6, 25e6, 29e6]));
        assert!(!same_regime(&[20e6, 6e6, 21e6]));
        assert!(!same_regime(&[0.0, 1.0]));
    }
}
