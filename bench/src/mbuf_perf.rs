//! `mbuf-perf`: mbuf alloc/free in bulk on one core, memplane's side of
//! `compare mbuf`. Pools of 8191 mbufs with the default data room
//! (`MbufPool::pktmbuf_pool_create(name, 8191, cache, 0, 2176, ANY)`),
//! cache 256 and 0; for bulk in {1, 8, 32, 64}: repeat until `--secs`
//! elapsed: N/bulk rounds of [`MbufPool::alloc_bulk` (owned `Mbuf`s into a
//! reused `Vec`); `Mbuf::free_vec` of them], N = 65536; rate_persec =
//! mbufs allocated and freed per second. The `raw` rows do the same with
//! `alloc_bulk_raw` / `free_bulk_raw` (raw pointers, DPDK's calling
//! convention; memplane only); the `mempool_only` rows get and put the
//! pool's objects with the mempool alone (no mbuf work), for scale.
//! `MBUF_PERF_ROWS=mbuf_perf_raw,...` runs only the named kinds and
//! `MBUF_PERF_BULKS=1,32` only those bulk sizes, `MBUF_PERF_CACHES=0` only
//! those cache sizes (for profiling, and `compare mbuf`'s rows).
//!
//! `compare mbuf` runs DPDK's side, `bench/dpdk/mbuf_perf.c`
//! (`rte_pktmbuf_alloc_bulk` + `rte_pktmbuf_free_bulk`, same pools and
//! loop, hugepages, `--in-memory`), and this alternately, row by row (one
//! cache size and bulk: DPDK's row, then ours, the order swapped every
//! other row), `--runs` times, and prints medians side by side with the
//! ratio: the two sides of a row are measured seconds apart, not a whole
//! run apart (this VM's speed drifts by up to 1.5x over minutes).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use memplane_mbuf::{Mbuf, MbufHeader, MbufPool};
use memplane_mempool::register_thread;

const N: usize = 65536;
const NB_MBUF: u32 = 8191;
const BULKS: [usize; 4] = [1, 8, 32, 64];
const CACHES: [u32; 2] = [256, 0];
fn bulks() -> Vec<usize> {
    std::env::var("MBUF_PERF_BULKS").map_or_else(
        |_| BULKS.to_vec(),
        |v| v.split(',').filter_map(|x| x.parse().ok()).collect(),
    )
}
fn caches() -> Vec<u32> {
    std::env::var("MBUF_PERF_CACHES").map_or_else(
        |_| CACHES.to_vec(),
        |v| v.split(',').filter_map(|x| x.parse().ok()).collect(),
    )
}

fn one(pool: &MbufPool<'_>, bulk: usize, secs: f64) -> u64 {
    let mut v: Vec<Mbuf<'_>> = Vec::with_capacity(64);
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut count = 0u64;
    loop {
        for _ in 0..N / bulk {
            if let Err(e) = pool.alloc_bulk(&mut v, bulk) {
                eprintln!("alloc failed: {e}");
                std::process::exit(1);
            }
            Mbuf::free_vec(&mut v);
        }
        count += N as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    (count as f64 / start.elapsed().as_secs_f64()) as u64
}

fn one_raw(pool: &MbufPool<'_>, bulk: usize, secs: f64) -> u64 {
    let mut table = [std::ptr::null_mut::<MbufHeader>(); 64];
    let t = &mut table[..bulk];
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut count = 0u64;
    loop {
        for _ in 0..N / bulk {
            // SAFETY: every mbuf taken is freed right below, once.
            if let Err(e) = unsafe { pool.alloc_bulk_raw(t) } {
                eprintln!("alloc failed: {e}");
                std::process::exit(1);
            }
            // SAFETY: ours, from the line above; the pool is open.
            unsafe { memplane_mbuf::free_bulk_raw(t) };
        }
        count += N as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    (count as f64 / start.elapsed().as_secs_f64()) as u64
}

/// The mempool alone (get_bulk + put_bulk of the mbuf pool's objects, no
/// mbuf work): how much of a row is the mempool's.
fn one_mempool(pool: &MbufPool<'_>, bulk: usize, secs: f64) -> u64 {
    let mp = pool.mempool();
    let mut table = [std::ptr::null_mut::<u8>(); 64];
    let t = &mut table[..bulk];
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut count = 0u64;
    loop {
        for _ in 0..N / bulk {
            mp.get_bulk(t).expect("get");
            mp.put_bulk(t).expect("put");
        }
        count += N as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    (count as f64 / start.elapsed().as_secs_f64()) as u64
}

/// Runs memplane's side; returns the process exit code.
pub fn run(prefix: &str, secs: f64) -> i32 {
    crate::pin(0);
    let (mem, _tmp) = match crate::malloc_perf::instance(prefix) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    register_thread(&mem).expect("lcore id");
    for cache in caches() {
        let pool = MbufPool::pktmbuf_pool_create(
            &mem,
            &format!("mbuf_perf_c{cache}"),
            NB_MBUF,
            cache,
            0,
            u32::from(memplane_mbuf::DEFAULT_BUF_SIZE),
            -1,
        )
        .expect("create pool");
        for (kind, f) in [
            ("mbuf_perf", one as fn(&MbufPool<'_>, usize, f64) -> u64),
            ("mbuf_perf_raw", one_raw),
            ("mempool_only", one_mempool),
        ] {
            if std::env::var("MBUF_PERF_ROWS").is_ok_and(|r| !r.split(',').any(|x| x == kind)) {
                continue;
            }
            for bulk in bulks() {
                let rate = f(&pool, bulk, secs);
                pool.cache_flush().expect("flush");
                assert!(pool.is_full(), "mbuf pool is not full");
                println!("{kind} cache={cache} bulk={bulk} rate_persec={rate}");
            }
        }
        pool.free().expect("free");
    }
    0
}

fn parse(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter(|l| l.starts_with("mbuf_perf") || l.starts_with("mempool_only"))
        .filter_map(|l| {
            let (k, r) = l.rsplit_once(" rate_persec=")?;
            Some((k.to_string(), r.trim().parse().ok()?))
        })
        .collect()
}

fn run_dpdk(bin: &str, secs: f64, (cache, bulk): (u32, usize)) -> Result<String, String> {
    let prefix = format!("mpmbuf{}", std::process::id());
    let out = Command::new(bin)
        .args([
            "--in-memory",
            "-m",
            "256",
            "--no-pci",
            "-l",
            "0",
            "--log-level",
            "3",
            "--file-prefix",
            &prefix,
            "--",
        ])
        .arg(secs.to_string())
        .arg(format!("{cache},{bulk}"))
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

fn run_ours(secs: f64, (cache, bulk): (u32, usize)) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let o = Command::new(exe)
        .args(["mbuf-perf", "--secs", &secs.to_string()])
        .env("MBUF_PERF_CACHES", cache.to_string())
        .env("MBUF_PERF_BULKS", bulk.to_string())
        .output()
        .map_err(|e| format!("cannot run mbuf-perf: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "memplane mbuf-perf failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `compare mbuf`; returns the process exit code.
pub fn compare(bin: &str, runs: usize, secs: f64) -> i32 {
    let mut dpdk: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ours: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let rows: Vec<(u32, usize)> = CACHES
        .iter()
        .flat_map(|&c| BULKS.iter().map(move |&b| (c, b)))
        .collect();
    for run in 1..=runs {
        for (i, &row) in rows.iter().enumerate() {
            eprintln!("run {run}/{runs}, row cache={} bulk={} ...", row.0, row.1);
            // Swap the order every other row: neither side always runs
            // right after the other's process start.
            let dpdk_first = (run + i) % 2 == 0;
            let mut d = None;
            let mut m = None;
            for side in [dpdk_first, !dpdk_first] {
                let r = if side {
                    run_dpdk(bin, secs, row).map(|t| d = Some(parse(&t)))
                } else {
                    run_ours(secs, row).map(|t| m = Some(parse(&t)))
                };
                if let Err(e) = r {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
            for (k, v) in d.unwrap_or_default() {
                dpdk.entry(k).or_default().push(v);
            }
            for (k, v) in m.unwrap_or_default() {
                if !order.contains(&k) {
                    order.push(k.clone());
                }
                ours.entry(k).or_default().push(v);
            }
        }
    }
    // Rows in the usual order: kind, then cache, then bulk.
    let kind_rank = |k: &str| {
        ["mbuf_perf ", "mbuf_perf_raw ", "mempool_only "]
            .iter()
            .position(|p| k.starts_with(p))
            .unwrap_or(3)
    };
    order.sort_by_key(|k| {
        let row = rows
            .iter()
            .position(|&(c, b)| k.ends_with(&format!("cache={c} bulk={b}")));
        (kind_rank(k), row)
    });
    println!(
        "\nmbuf alloc_bulk + free_bulk, one core, 8191 mbufs of 2176 bytes: DPDK 22.11 (bench/dpdk/mbuf_perf.c) vs memplane, medians of {runs} runs alternating row by row, {secs} s per row"
    );
    println!("rate = mbufs allocated and freed per second; ratio = memplane / DPDK (> 1.00: memplane faster); target >= 1.00");
    println!("mbuf_perf rows: owned Mbufs (Vec + Mbuf::free_vec); mbuf_perf_raw rows: raw pointers; mempool_only rows: the mbuf pool's Mempool::get_bulk + put_bulk alone (no mbuf work); all compared with DPDK's mbuf row");
    println!();
    println!(
        "{:<36} {:>11} {:>11} {:>9} {:>9} {:>6}",
        "test", "DPDK", "memplane", "DPDK ns", "ours ns", "ratio"
    );
    let mut worst = f64::INFINITY;
    for k in &order {
        let dk = k
            .replace("mbuf_perf_raw ", "mbuf_perf ")
            .replace("mempool_only ", "mbuf_perf ");
        let d = dpdk.get_mut(&dk).map(|v| crate::compare::median(v));
        let m = ours.get_mut(k).map(|v| crate::compare::median(v));
        let f = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
        let ns = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{:.2}", 1e9 / x));
        let ratio = match (d, m) {
            (Some(d), Some(m)) if d > 0.0 => {
                if k.starts_with("mbuf_perf ") {
                    worst = worst.min(m / d);
                }
                format!("{:.2}", m / d)
            }
            _ => "-".into(),
        };
        println!(
            "{k:<36} {:>11} {:>11} {:>9} {:>9} {ratio:>6}",
            f(d),
            f(m),
            ns(d),
            ns(m)
        );
    }
    println!("\nworst ratio (owned Mbuf rows): {worst:.2}");
    0
}
