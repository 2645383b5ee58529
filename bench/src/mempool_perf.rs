//! `mempool-perf`: memplane's mirror of DPDK 22.11 `mempool_perf_autotest`
//! (test_mempool_perf.c), one core: pools of 2048-byte objects, size
//! `2 x (512 + 512) - 1` (DPDK's formula with `-l 0-1`), without cache,
//! with a 512-object per-lcore cache, and without cache through a
//! user-owned cache of 512. For each n_keep in {32, 128} and get/put bulk
//! sizes in {1, 4, 32}: repeat until `--secs` elapsed: N/n_keep rounds of
//! [get n_keep objects in bulks of n_get_bulk, put them back in bulks of
//! n_put_bulk]; rate_persec = objects / seconds (one object = one get+put).
//! Lines are printed in DPDK's format, under DPDK's section headers.
//!
//! `compare mempool` runs DPDK's side, `bench/dpdk/mempool_perf_1core.c`
//! (the autotest's 1-core loop on its own, since `dpdk-test
//! mempool_perf_autotest` runs every row for 1, 2 and all cores at 5 s each,
//! ~45 min here), and this mirror alternately `--runs` times with `--secs`
//! per row, and prints medians side by side. `--dpdk-output FILE` adds the
//! 1-core rows of a saved `dpdk-test mempool_perf_autotest` output as a
//! third column (a check that the C program measures what the autotest
//! does).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use memplane_mempool::{register_thread, Mempool, MempoolCache, MempoolConfig};

const N: usize = 65536;
const ELT: u32 = 2048;
const MAX_KEEP: u32 = 512;
const CACHE: u32 = 512;
const LCORES: u32 = 2;

#[derive(Clone, Copy)]
enum Mode {
    NoCache,
    Cache,
    UserCache,
}

fn one(pool: &Mempool<'_>, mode: Mode, get: usize, put: usize, keep: usize, secs: f64) -> u64 {
    let mut table = vec![std::ptr::null_mut(); keep];
    let mut uc = MempoolCache::new(CACHE).expect("cache");
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut count = 0u64;
    loop {
        for _ in 0..N / keep {
            let mut idx = 0;
            while idx < keep {
                let s = &mut table[idx..idx + get];
                let r = match mode {
                    Mode::UserCache => pool.get_bulk_with(&mut uc, s),
                    _ => pool.get_bulk(s),
                };
                if let Err(e) = r {
                    eprintln!("get failed: {e}");
                    std::process::exit(1);
                }
                idx += get;
            }
            idx = 0;
            while idx < keep {
                let s = &table[idx..idx + put];
                let r = match mode {
                    Mode::UserCache => pool.put_bulk_with(&mut uc, s),
                    _ => pool.put_bulk(s),
                };
                r.expect("put");
                idx += put;
            }
        }
        count += N as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    let el = start.elapsed().as_secs_f64();
    if matches!(mode, Mode::UserCache) {
        uc.flush(pool).expect("flush");
    }
    (count as f64 / el) as u64
}

/// Runs the mirror; returns the process exit code.
pub fn run(prefix: &str, secs: f64) -> i32 {
    crate::pin(0);
    let (mem, _tmp) = match crate::malloc_perf::instance(prefix) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let size = LCORES * (MAX_KEEP + CACHE) - 1;
    let mk = |name: &str, cache| {
        Mempool::create(&mem, name, &MempoolConfig::new(size, ELT).cache_size(cache))
            .expect("create pool")
    };
    let nocache = mk("perf_test_nocache", 0);
    let cache = mk("perf_test_cache", CACHE);
    register_thread(&mem).expect("lcore id");
    for p in [&nocache, &cache] {
        eprintln!(
            "{}: {} objects of {} bytes in {} memzone(s), handler {}",
            p.name(),
            p.size(),
            p.obj_size().total_size,
            p.chunks().len(),
            p.handler()
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
        for get in [1usize, 4, 32] {
            for put in [1usize, 4, 32] {
                for keep in [32usize, 128] {
                    assert_eq!(pool.avail_count(), size, "mempool is not full");
                    let c = if matches!(mode, Mode::NoCache) {
                        0
                    } else {
                        CACHE
                    };
                    let rate = one(pool, mode, get, put, keep, secs);
                    pool.cache_flush().expect("flush");
                    println!(
                        "mempool_autotest cache={c} cores=1 n_get_bulk={get} n_put_bulk={put} n_keep={keep} constant_n=0 rate_persec={rate}"
                    );
                }
            }
        }
    }
    nocache.free().expect("free");
    cache.free().expect("free");
    0
}

/// (section, row) -> rate, 1-core rows only.
fn parse(out: &str) -> Vec<(String, f64)> {
    let mut section = String::new();
    let mut v = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if let Some(s) = l.strip_prefix("start performance test") {
            section = s.trim().to_string();
            continue;
        }
        let Some(i) = l.find("mempool_autotest cache=") else {
            continue;
        };
        let l = &l[i..];
        if !l.contains(" cores=1 ") || l.contains("constant_n=1") {
            continue;
        }
        let l = l.replace(" constant_n=0", "");
        if let Some((k, r)) = l.as_str().rsplit_once(" rate_persec=") {
            if let Ok(r) = r.trim().parse::<f64>() {
                v.push((
                    format!("{section} {}", k.trim_start_matches("mempool_autotest ")),
                    r,
                ));
            }
        }
    }
    v
}

fn run_dpdk(bin: &str, secs: f64) -> Result<String, String> {
    let prefix = format!("mpmempool{}", std::process::id());
    let out = Command::new(bin)
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "-l",
            "0",
            "--file-prefix",
            &prefix,
            "--",
        ])
        .arg(secs.to_string())
        .output()
        .map_err(|e| format!("cannot run {bin}: {e}"));
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

fn run_ours(secs: f64) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let o = Command::new(exe)
        .args(["mempool-perf", "--secs", &secs.to_string()])
        .output()
        .map_err(|e| format!("cannot run mempool-perf: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "memplane mempool-perf failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `compare mempool`; returns the process exit code.
pub fn compare(bin: &str, runs: usize, secs: f64, dpdk_output: Option<&str>) -> i32 {
    let mut dpdk: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ours: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for run in 1..=runs {
        eprintln!("run {run}/{runs}: {bin} ...");
        let d = match run_dpdk(bin, secs) {
            Ok(t) => parse(&t),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
        eprintln!("run {run}/{runs}: memplane mempool-perf ...");
        let m = match run_ours(secs) {
            Ok(t) => parse(&t),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
        for (k, v) in d {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            dpdk.entry(k).or_default().push(v);
        }
        for (k, v) in m {
            ours.entry(k).or_default().push(v);
        }
    }
    let autotest: BTreeMap<String, f64> = dpdk_output
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|t| parse(&t).into_iter().collect())
        .unwrap_or_default();
    println!(
        "\nmempool_perf_autotest 1-core rows: DPDK 22.11 (bench/dpdk/mempool_perf_1core.c) vs memplane mirror, medians of {runs} alternating runs, {secs} s per row"
    );
    println!("rate = objects got and put back per second; ratio = memplane / DPDK (> 1.00: memplane faster)");
    if !autotest.is_empty() {
        println!("autotest = the same row in the saved dpdk-test mempool_perf_autotest output (5 s per row)");
    }
    println!();
    println!(
        "{:<88} {:>11} {:>11} {:>6} {:>11}",
        "test", "DPDK", "memplane", "ratio", "autotest"
    );
    let mut worst = f64::INFINITY;
    for k in &order {
        let d = dpdk.get_mut(k).map(|v| crate::compare::median(v));
        let m = ours.get_mut(k).map(|v| crate::compare::median(v));
        let f = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
        let ratio = match (d, m) {
            (Some(d), Some(m)) if d > 0.0 => {
                worst = worst.min(m / d);
                format!("{:.2}", m / d)
            }
            _ => "-".into(),
        };
        println!(
            "{k:<88} {:>11} {:>11} {ratio:>6} {:>11}",
            f(d),
            f(m),
            f(autotest.get(k).copied())
        );
    }
    println!("\nworst ratio: {worst:.2}");
    0
}
