//! Side-by-side runners for the heap and for start-up, memplane vs DPDK 22.11:
//!
//! - `compare malloc`: DPDK's own `dpdk-test malloc_perf_autotest` (its
//!   rte_malloc, rte_zmalloc and rte_memzone_reserve tables) against
//!   memplane's loop-for-loop mirror (`malloc-perf`, [`crate::malloc_perf`],
//!   [`crate::memzone_perf`]), plus the 4 KiB blocks aligned to 4 KiB
//!   workload (`bench/dpdk/malloc_aligned.c` against `malloc-aligned`) and
//!   the memzone scaling workload (`bench/dpdk/memzone_scale.c` against
//!   `memzone-scale`);
//! - `compare init`: time from process start to a ready memory instance,
//!   `rte_eal_init` (`bench/dpdk/eal_startup.c`, spawned) against
//!   `Memory::init` (`init-once`, spawned), with nothing, 1 GiB and 4 GiB
//!   of 2 MiB pages preallocated.
//!
//! Both sides run alternately `runs` times; tables show medians and the
//! ratio memplane / DPDK. Before: enough free hugepages? After: no files of
//! ours in any hugetlbfs mount, no DPDK runtime directory of ours,
//! HugePages_Free as before.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::compare::median;
use crate::compare_mem::{
    fmt, huge_dir_2m, kv_line, num, pool, remove_dpdk_runtime_dir, run_dpdk_malloc_perf, self_exe,
    Books,
};
use crate::init_once::monotonic_ns;
use crate::malloc_perf::{ALIGNED_ALIGN, ALIGNED_BLOCKS, ALIGNED_SIZE, SIZES, TABLES};
use crate::memzone_perf::{MZ_FUNC, SCALE_SIZE, SCALE_WINDOW, SCALE_ZONES};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// --- malloc_perf_autotest output ------------------------------------------------------

/// Per-block columns of one malloc_perf_autotest row.
const BLOCKS: usize = 0;
const METRICS: [(&str, usize); 4] = [("alloc", 1), ("free", 2), ("total", 3), ("memset", 4)];

/// One parsed `malloc_perf_autotest` run (DPDK's or the mirror's, which
/// prints the same table).
#[derive(Default, Debug)]
pub struct PerfTable {
    /// (function, size) -> [blocks, alloc, free, total, memset] (us per
    /// block); an "Interrupted: out of memory." row has 0 blocks and NaNs.
    pub rows: BTreeMap<(String, u64), [f64; 5]>,
    /// The reference memset, microseconds per MiB.
    pub memset_us_per_mib: Option<f64>,
}

/// Parses the `malloc_perf_autotest` tables ([`TABLES`]): `Performance:
/// <function>` headers, then `Size (B) Runs Alloc (us) Free (us) Total (us)
/// memset (us)` rows (`est.memset (us)` in the memzone table). DPDK prefixes
/// every line with its log type (`USER1: `).
pub fn parse_malloc_perf(out: &str) -> PerfTable {
    let mut t = PerfTable::default();
    let mut section = String::new();
    for l in out.lines() {
        let body = l.strip_prefix("USER1:").map_or(l, str::trim_start).trim();
        if let Some(s) = body.strip_prefix("Performance: ") {
            section = s.split_whitespace().next().unwrap_or("").to_string();
            continue;
        }
        if body.starts_with("Result:") {
            let f: Vec<&str> = body.split_whitespace().collect();
            if let Some(i) = f.iter().position(|w| *w == "us/MiB") {
                t.memset_us_per_mib = i.checked_sub(1).and_then(|j| f[j].parse().ok());
            }
            continue;
        }
        if !TABLES.contains(&section.as_str()) {
            continue;
        }
        let f: Vec<&str> = body.split_whitespace().collect();
        let Some(Ok(size)) = f.first().map(|s| s.parse::<u64>()) else {
            continue;
        };
        if f.get(1) == Some(&"Interrupted:") {
            t.rows.insert(
                (section.clone(), size),
                [0.0, f64::NAN, f64::NAN, f64::NAN, f64::NAN],
            );
            continue;
        }
        if f.len() != 6 {
            continue;
        }
        let v: Vec<f64> = f[1..].iter().filter_map(|x| x.parse().ok()).collect();
        if let [blocks, alloc, free, total, memset] = v[..] {
            t.rows.insert(
                (section.clone(), size),
                [blocks, alloc, free, total, memset],
            );
        }
    }
    t
}

/// The rows a complete table has (an allocator stops at the first size
/// that got no block, as DPDK's test does).
fn missing_rows(t: &PerfTable) -> Vec<String> {
    let mut missing = Vec::new();
    for f in TABLES {
        for s in SIZES {
            match t.rows.get(&(f.to_string(), s)) {
                Some(r) if r[BLOCKS] == 0.0 => break,
                Some(_) => {}
                None => missing.push(format!("{f} {s}")),
            }
        }
    }
    missing
}

/// One `aligned` line: [blocks, alloc, free, total].
fn parse_aligned(out: &str) -> Option<[f64; 4]> {
    out.lines().find_map(|l| {
        let (head, kv) = kv_line(l)?;
        if head != "aligned" {
            return None;
        }
        Some([
            num(&kv, "blocks")?,
            num(&kv, "alloc_us")?,
            num(&kv, "free_us")?,
            num(&kv, "total_us")?,
        ])
    })
}

/// The `memzone-scale` line (`bench/dpdk/memzone_scale.c` and
/// `memzone-scale` print the same): [zones, first100, last100, reserve
/// (all), lookup, free, the first reserve alone], microseconds per call.
fn parse_scale(out: &str) -> Option<[f64; 7]> {
    out.lines().find_map(|l| {
        let (head, kv) = kv_line(l)?;
        if head != "memzone-scale" {
            return None;
        }
        Some([
            num(&kv, "zones")?,
            num(&kv, "first100_us")?,
            num(&kv, "last100_us")?,
            num(&kv, "reserve_us")?,
            num(&kv, "lookup_us")?,
            num(&kv, "free_us")?,
            num(&kv, "first_us")?,
        ])
    })
}

/// The `pair` lines: (size, us per malloc+free).
fn parse_pairs(out: &str) -> Vec<(u64, f64)> {
    out.lines()
        .filter_map(|l| {
            let (head, kv) = kv_line(l)?;
            if head != "pair" {
                return None;
            }
            Some((num(&kv, "size")? as u64, num(&kv, "pair_us")?))
        })
        .collect()
}

/// Median of the finite samples, None without any.
fn med(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| median(&mut v))
}

fn size_label(s: u64) -> String {
    if s >= GIB && s % GIB == 0 {
        format!("{}G", s / GIB)
    } else if s >= MIB && s % MIB == 0 {
        format!("{}M", s / MIB)
    } else if s >= KIB && s % KIB == 0 {
        format!("{}K", s / KIB)
    } else {
        s.to_string()
    }
}

/// One printed comparison row.
struct Line {
    workload: String,
    blocks: String,
    dpdk: Option<f64>,
    ours: Option<f64>,
    /// Target, if the row has one.
    target: Option<Goal>,
}

/// What a row should reach.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Goal {
    /// memplane / DPDK at most this.
    Ratio(f64),
    /// memplane at most this many microseconds.
    Us(f64),
}

/// The worst ratio and its row.
type Worst = Option<(f64, String)>;

/// What [`print_lines`] found.
#[derive(Default)]
struct Summary {
    /// The worst ratio over the rows with a ratio target, and its row.
    worst: Worst,
    /// The worst ratio over the rows without a target.
    worst_untargeted: Worst,
    /// Rows with a target: how many.
    targeted: usize,
    /// The rows that missed their target.
    missed: Vec<String>,
}

/// Prints the rows and sums them up.
fn print_lines(lines: &[Line]) -> Summary {
    println!(
        "{:<26} {:>13} {:>11} {:>11} {:>7}  {:<9} met",
        "workload", "blocks D/mp", "DPDK us", "memplane us", "ratio", "target"
    );
    let mut sum = Summary::default();
    let mut prev_group = String::new();
    for l in lines {
        let group: String = l
            .workload
            .rsplit_once(' ')
            .map_or("", |(g, _)| g)
            .to_string();
        if !prev_group.is_empty()
            && group.split_whitespace().next() != prev_group.split_whitespace().next()
        {
            println!();
        }
        prev_group = group;
        let r = match (l.dpdk, l.ours) {
            (Some(d), Some(m)) if d > 0.0 => Some(m / d),
            _ => None,
        };
        let (target, met) = match l.target {
            Some(Goal::Ratio(t)) => (format!("<= {t:.2}"), r.map(|r| r <= t)),
            Some(Goal::Us(t)) => (format!("<= {t} us"), l.ours.map(|m| m <= t)),
            None => ("-".to_string(), None),
        };
        let met = match (l.target, met) {
            (None, _) => "",
            (Some(_), None) => "-",
            (Some(_), Some(true)) => "ok",
            (Some(_), Some(false)) => "MISSED",
        };
        if l.target.is_some() {
            sum.targeted += 1;
        }
        if met == "MISSED" {
            sum.missed
                .push(l.workload.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        let slot = match l.target {
            Some(Goal::Ratio(_)) => Some(&mut sum.worst),
            None => Some(&mut sum.worst_untargeted),
            Some(Goal::Us(_)) => None,
        };
        if let (Some(r), Some(slot)) = (r, slot) {
            if slot.as_ref().is_none_or(|(w, _)| r > *w) {
                *slot = Some((r, l.workload.clone()));
            }
        }
        println!(
            "{:<26} {:>13} {:>11} {:>11} {:>7}  {:<9} {}",
            l.workload,
            l.blocks,
            fmt(l.dpdk, 3),
            fmt(l.ours, 3),
            r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
            target,
            met
        );
    }
    sum
}

/// The ratio target of a block size: <= 0.5 up to 64 KiB, <= 1.0 from 1 MiB.
fn target_for(size: u64) -> f64 {
    if size <= 64 * KIB {
        0.5
    } else {
        1.0
    }
}

/// The ratio target of a memzone table row: reserve and total <= 0.1 up to
/// 64 KiB (DPDK's reserve scans its whole table: ~17 us per 64 B zone),
/// <= 1.0 from 1 MiB (page mapping dominates); free <= 1.0 at every size.
fn mz_target_for(size: u64, metric: &str) -> f64 {
    if metric == "free" || size > 64 * KIB {
        1.0
    } else {
        0.1
    }
}

/// The memzone scaling rows: (label, index into the [`parse_scale`] array,
/// target of memplane's time: a reserve <= 1 us even with the table nearly
/// full, a lookup <= 0.5 us). The first reserve alone (which may grow the
/// heap) is shown without a target.
fn scale_rows() -> [(String, usize, Option<Goal>); 5] {
    [
        ("reserve #1 alone".into(), 6, None),
        (format!("reserve 1-{SCALE_WINDOW}"), 1, Some(Goal::Us(1.0))),
        (
            format!("reserve {}-{SCALE_ZONES}", SCALE_ZONES - SCALE_WINDOW + 1),
            2,
            Some(Goal::Us(1.0)),
        ),
        ("lookup".into(), 4, Some(Goal::Us(0.5))),
        ("free".into(), 5, None),
    ]
}

/// EAL arguments of the DPDK malloc runs: 2 MiB pages from one hugetlbfs
/// mount, main lcore on CPU 0 (the mirror pins itself there too).
fn dpdk_eal_args(prefix: &str, huge_dir: &Path) -> Vec<String> {
    [
        "--no-pci",
        "-l",
        "0",
        "--file-prefix",
        prefix,
        "--huge-dir",
        &huge_dir.to_string_lossy(),
        "--huge-unlink",
        "--no-telemetry",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// The aligned line and the pair lines of one run.
type AlignedRun = ([f64; 4], Vec<(u64, f64)>);

/// Runs `bench/dpdk/memzone_scale`; its [`parse_scale`] values.
fn run_dpdk_scale(bin: &Path, args: &[String], prefix: &str) -> Result<[f64; 7], String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()));
    remove_dpdk_runtime_dir(prefix);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), parse_scale(&text)) {
        (true, Some(r)) => Ok(r),
        _ => Err(format!(
            "{} failed:\n{text}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn run_dpdk_aligned(bin: &Path, args: &[String], prefix: &str) -> Result<AlignedRun, String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()));
    remove_dpdk_runtime_dir(prefix);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), parse_aligned(&text)) {
        (true, Some(r)) => Ok((r, parse_pairs(&text))),
        _ => Err(format!(
            "{} failed:\n{text}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Samples per (function, size): one [blocks, alloc, free, total, memset]
/// per run.
type PerfSamples = BTreeMap<(String, u64), Vec<[f64; 5]>>;

fn add_table(t: PerfTable, into: &mut PerfSamples, memset: &mut Vec<f64>) {
    for (k, v) in t.rows {
        into.entry(k).or_default().push(v);
    }
    if let Some(m) = t.memset_us_per_mib {
        memset.push(m);
    }
}

/// `compare malloc`; returns the process exit code.
pub fn malloc(runs: usize, aligned_bin: &Path, scale_bin: &Path) -> i32 {
    let pid = std::process::id();
    let dpdk_prefix = format!("mpbmd{pid}");
    let mp_prefix = format!("mpbmm{pid}");
    let huge_dir = match huge_dir_2m() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench/compare malloc: {e}");
            return 3;
        }
    };
    // The reference memset's 1 GiB block is 513 pages in DPDK's heap (its
    // element header makes it one page longer), and the heap keeps one.
    let need = 515;
    let avail = pool();
    if avail.free_2m < need {
        eprintln!(
            "bench/compare malloc: needs at least {need} free 2 MiB hugepages (malloc_perf_autotest starts \
             with a 1 GiB rte_malloc, 513 pages, and DPDK's heap keeps one more); found {} free of {} \
             reserved.\n  Stop other DPDK/memplane processes, or reserve more: \
             memplane hugepages reserve 2M=1024 (as root)",
            avail.free_2m, avail.total_2m
        );
        return 3;
    }
    if avail.free_2m < avail.total_2m {
        eprintln!(
            "note: {} of {} 2 MiB hugepages are in use by someone else: block counts from 1 MiB up will be lower",
            avail.total_2m - avail.free_2m,
            avail.total_2m
        );
    }
    let books = Books::open(&[dpdk_prefix.clone(), mp_prefix.clone()]);
    let args = dpdk_eal_args(&dpdk_prefix, &huge_dir);

    let mut dpdk = PerfSamples::new();
    let mut ours = PerfSamples::new();
    let (mut dpdk_memset, mut ours_memset) = (Vec::new(), Vec::new());
    let (mut dpdk_al, mut ours_al) = (Vec::new(), Vec::new());
    let mut dpdk_pairs: Vec<(u64, f64)> = Vec::new();
    let mut ours_pairs: Vec<(u64, f64)> = Vec::new();
    let (mut dpdk_scale, mut ours_scale) = (Vec::new(), Vec::new());
    let mut failed = None;
    for run in 1..=runs {
        eprintln!("run {run}/{runs}: dpdk-test malloc_perf_autotest ...");
        match run_dpdk_malloc_perf(&args, &dpdk_prefix) {
            Ok(text) => {
                let t = parse_malloc_perf(&text);
                let missing = missing_rows(&t);
                if !missing.is_empty() {
                    failed = Some(format!(
                        "dpdk-test output lacks rows {}:\n{text}",
                        missing.join(", ")
                    ));
                    break;
                }
                add_table(t, &mut dpdk, &mut dpdk_memset);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: memplane malloc-perf ...");
        match self_exe(&["malloc-perf", "--prefix", &mp_prefix]) {
            Ok(text) => {
                let t = parse_malloc_perf(&text);
                let missing = missing_rows(&t);
                if !missing.is_empty() {
                    failed = Some(format!(
                        "memplane malloc-perf output lacks rows {}:\n{text}",
                        missing.join(", ")
                    ));
                    break;
                }
                add_table(t, &mut ours, &mut ours_memset);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: DPDK malloc_aligned ...");
        match run_dpdk_aligned(aligned_bin, &args, &dpdk_prefix) {
            Ok((r, pairs)) => {
                dpdk_al.push(r);
                dpdk_pairs.extend(pairs);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: memplane malloc-aligned ...");
        match self_exe(&["malloc-aligned", "--prefix", &mp_prefix]).and_then(|text| {
            parse_aligned(&text)
                .map(|r| (r, parse_pairs(&text)))
                .ok_or_else(|| format!("no aligned line in:\n{text}"))
        }) {
            Ok((r, pairs)) => {
                ours_al.push(r);
                ours_pairs.extend(pairs);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: DPDK memzone_scale ...");
        match run_dpdk_scale(scale_bin, &args, &dpdk_prefix) {
            Ok(r) => dpdk_scale.push(r),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: memplane memzone-scale ...");
        match self_exe(&["memzone-scale", "--prefix", &mp_prefix]).and_then(|text| {
            parse_scale(&text).ok_or_else(|| format!("no memzone-scale line in:\n{text}"))
        }) {
            Ok(r) => ours_scale.push(r),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        eprintln!("error: {e}");
        books.close();
        return 1;
    }

    println!(
        "\nmalloc: DPDK 22.11 malloc_perf_autotest (rte_malloc, rte_zmalloc, rte_memzone_reserve) vs memplane's \
         mirror,\n4 KiB blocks aligned to 4 KiB, and memzones with a full table; medians of {runs} alternating runs\n"
    );
    println!(
        "DPDK      dpdk-test {}, stdin \"malloc_perf_autotest\"",
        args.join(" ")
    );
    println!("          2 MiB pages, hugetlbfs files");
    println!("memplane  memplane-bench malloc-perf: the same loops with Memory::malloc(size, 0) for rte_malloc,");
    println!("          Memory::zmalloc(size, 0) for rte_zmalloc, Memory::free for rte_free; 2 MiB pages (1 GiB pages");
    println!(
        "          off: pagesz_mem(1G, 0)), hugetlb memfd; pinned to CPU 0 like DPDK's main lcore"
    );
    println!(
        "memzone   up to (table size - 1) = 2559 zones per size: rte_memzone_reserve_aligned(\"test-mz-<rdtsc hex>\", size,"
    );
    println!(
        "          SOCKET_ID_ANY, RTE_MEMZONE_1GB | RTE_MEMZONE_SIZE_HINT_ONLY, 0) / rte_memzone_free vs"
    );
    println!(
        "          Memory::memzone_reserve_aligned(same arguments) / Memzone::free; no memset (no memset rows)"
    );
    println!(
        "aligned   bench/dpdk/malloc_aligned (same EAL arguments): rte_malloc(NULL, {ALIGNED_SIZE}, {ALIGNED_ALIGN}) back to back up to"
    );
    println!(
        "          {ALIGNED_BLOCKS} blocks, then rte_free of each; memplane-bench malloc-aligned: Memory::malloc({ALIGNED_SIZE}, {ALIGNED_ALIGN}) / free"
    );
    println!(
        "pairs     the same programs, after the aligned rows: one 64 B anchor block kept, then 1e6 back-to-back"
    );
    println!(
        "          malloc(size, 0) + free pairs per size (the shape of a packet path; us per pair)"
    );
    println!(
        "mz-scale  bench/dpdk/memzone_scale (same EAL arguments) vs memplane-bench memzone-scale: {SCALE_ZONES} zones of {SCALE_SIZE} B"
    );
    println!(
        "          (\"mz-scale-<i>\", SOCKET_ID_ANY, flags 0), each reserve timed alone (mean of the first and of the"
    );
    println!(
        "          last {SCALE_WINDOW}); then one lookup of every name (strided order) and one free of every zone, us per call"
    );
    println!("Each size: allocate back to back up to 10000 blocks (stop at the first failure, which stays in the alloc");
    println!("time as in DPDK), memset every block to 0, free all. us = average microseconds per block; total = alloc +");
    println!("free; blocks = blocks allocated (medians). ratio = memplane / DPDK (< 1.00: memplane faster). DPDK prints");
    println!("two decimals, so its rows under 1 us carry up to +-0.005 us of rounding.");
    println!("Targets: ratio <= 0.50 for sizes up to 64 KiB (the 4 KiB aligned rows too), <= 1.00 for 1 MiB and up;");
    println!("memzones: reserve and total <= 0.10 up to 64 KiB, <= 1.00 from 1 MiB, free <= 1.00; mz-scale: memplane");
    println!("<= 1 us per reserve (first and last {SCALE_WINDOW}), <= 0.5 us per lookup (absolute; not in the worst ratio).");
    println!("memset rows time the caller's memset of the returned memory (hardware-bound; no target, not in the worst ratio).");
    println!(
        "Reference memset of a 1 GiB block (20 x): DPDK {} us/MiB, memplane {} us/MiB",
        fmt(med(&dpdk_memset), 2),
        fmt(med(&ours_memset), 2)
    );
    let clean = books.close();
    println!();

    let mut lines = Vec::new();
    for f in TABLES {
        for s in SIZES {
            let key = (f.to_string(), s);
            let col = |m: &PerfSamples, i: usize| {
                m.get(&key)
                    .and_then(|v| med(&v.iter().map(|r| r[i]).collect::<Vec<_>>()))
            };
            let blocks = format!(
                "{}/{}",
                fmt(col(&dpdk, BLOCKS), 0),
                fmt(col(&ours, BLOCKS), 0)
            );
            let memzone = f == MZ_FUNC;
            for (metric, i) in METRICS {
                // The memzone table's last column is an estimate from the
                // reference memset, not a measurement.
                if memzone && metric == "memset" {
                    continue;
                }
                let target = if memzone {
                    Some(Goal::Ratio(mz_target_for(s, metric)))
                } else {
                    (metric != "memset").then(|| Goal::Ratio(target_for(s)))
                };
                let label = if memzone { "memzone" } else { f };
                lines.push(Line {
                    workload: format!("{label:<11} {:>4} {metric}", size_label(s)),
                    blocks: blocks.clone(),
                    dpdk: col(&dpdk, i),
                    ours: col(&ours, i),
                    target,
                });
            }
        }
    }
    let al = |v: &[[f64; 4]], i: usize| med(&v.iter().map(|r| r[i]).collect::<Vec<_>>());
    let al_blocks = format!("{}/{}", fmt(al(&dpdk_al, 0), 0), fmt(al(&ours_al, 0), 0));
    for (metric, i) in [("alloc", 1), ("free", 2), ("total", 3)] {
        lines.push(Line {
            workload: format!(
                "aligned {}/{} {metric}",
                size_label(ALIGNED_SIZE as u64),
                size_label(ALIGNED_ALIGN as u64)
            ),
            blocks: al_blocks.clone(),
            dpdk: al(&dpdk_al, i),
            ours: al(&ours_al, i),
            target: Some(Goal::Ratio(target_for(ALIGNED_SIZE as u64))),
        });
    }
    for size in crate::malloc_perf::PAIR_SIZES {
        let pick = |v: &[(u64, f64)]| {
            med(&v
                .iter()
                .filter(|(s, _)| *s == size as u64)
                .map(|(_, t)| *t)
                .collect::<Vec<_>>())
        };
        lines.push(Line {
            workload: format!("malloc+free pair {:>4}", size_label(size as u64)),
            blocks: "1e6".into(),
            dpdk: pick(&dpdk_pairs),
            ours: pick(&ours_pairs),
            target: Some(Goal::Ratio(target_for(size as u64))),
        });
    }
    let sc = |v: &[[f64; 7]], i: usize| med(&v.iter().map(|r| r[i]).collect::<Vec<_>>());
    let sc_zones = format!(
        "{}/{}",
        fmt(sc(&dpdk_scale, 0), 0),
        fmt(sc(&ours_scale, 0), 0)
    );
    for (label, i, target) in scale_rows() {
        lines.push(Line {
            workload: format!("mz-scale {label}"),
            blocks: sc_zones.clone(),
            dpdk: sc(&dpdk_scale, i),
            ours: sc(&ours_scale, i),
            target,
        });
    }
    let sum = print_lines(&lines);
    println!();
    if let Some((w, row)) = sum.worst_untargeted {
        println!("worst ratio without a target (memset, mz-scale free/#1): {w:.2} ({row})");
    }
    println!(
        "targets met: {} of {}{}",
        sum.targeted - sum.missed.len(),
        sum.targeted,
        if sum.missed.is_empty() {
            String::new()
        } else {
            format!("; missed: {}", sum.missed.join(", "))
        }
    );
    match sum.worst {
        Some((w, row)) => println!("worst ratio: {w:.2} ({row})"),
        None => println!("worst ratio: -"),
    }
    i32::from(!clean)
}

// --- init --------------------------------------------------------------------------------

/// One init measurement, all in microseconds: process start -> ready,
/// process start -> main, main -> ready, teardown.
type Init = [f64; 4];

fn run_eal_init(
    bin: &Path,
    prefix: &str,
    huge_dir: &Path,
    mem_mib: Option<u64>,
) -> Result<Init, String> {
    let mut args: Vec<String> = Vec::new();
    if let Some(m) = mem_mib {
        args.extend(["--socket-mem".to_string(), m.to_string()]);
    }
    args.extend(
        [
            "--no-pci",
            "-l",
            "0",
            "--file-prefix",
            prefix,
            "--no-telemetry",
            "--huge-dir",
            &huge_dir.to_string_lossy(),
            "--huge-unlink",
        ]
        .iter()
        .map(ToString::to_string),
    );
    let t0 = monotonic_ns();
    let out = Command::new(bin)
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()));
    remove_dpdk_runtime_dir(prefix);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("init_us="));
    let parsed = line.and_then(|l| {
        let m: BTreeMap<&str, &str> = l
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        Some((
            num(&m, "main_ns")?,
            num(&m, "ready_ns")?,
            num(&m, "cleanup_us")?,
        ))
    });
    let (true, Some((main_ns, ready_ns, cleanup))) = (out.status.success(), parsed) else {
        return Err(format!(
            "{} {} failed:\n{text}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    let t0 = t0 as f64;
    Ok([
        (ready_ns - t0) / 1e3,
        (main_ns - t0) / 1e3,
        (ready_ns - main_ns) / 1e3,
        cleanup,
    ])
}

/// memplane's measurement and, with memory preallocated, the kernel floor
/// (in-process reserve + zero of the same memory: init, teardown).
fn run_mp_init(prefix: &str, mem_mib: Option<u64>) -> Result<(Init, Option<[f64; 2]>), String> {
    let mem = mem_mib.map_or_else(|| "none".to_string(), |m| m.to_string());
    let t0 = monotonic_ns() as f64;
    let text = self_exe(&["init-once", "--prefix", prefix, "--mem", &mem])?;
    let ours = text
        .lines()
        .find_map(|l| {
            let (head, kv) = kv_line(l)?;
            if head != "memplane" {
                return None;
            }
            let (main_ns, ready_ns) = (num(&kv, "main_ns")?, num(&kv, "ready_ns")?);
            Some([
                (ready_ns - t0) / 1e3,
                (main_ns - t0) / 1e3,
                (ready_ns - main_ns) / 1e3,
                num(&kv, "teardown_us")?,
            ])
        })
        .ok_or_else(|| format!("memplane-bench init-once printed no result:\n{text}"))?;
    let floor = text.lines().find_map(|l| {
        let (head, kv) = kv_line(l)?;
        (head == "kernel").then_some([num(&kv, "init_us")?, num(&kv, "teardown_us")?])
    });
    Ok((ours, floor))
}

/// `compare init`; returns the process exit code.
pub fn init(runs: usize, eal_bin: &Path, eal_bin_static: Option<&Path>) -> i32 {
    let pid = std::process::id();
    let dpdk_prefix = format!("mpbid{pid}");
    let mp_prefix = format!("mpbim{pid}");
    let huge_dir = match huge_dir_2m() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench/compare init: {e}");
            return 3;
        }
    };
    let avail = pool();
    // (label, MiB preallocated, target: absolute ms for memplane or a ratio)
    let all: [(&str, Option<u64>, Target); 3] = [
        ("nothing preallocated", None, Target::Ms(10.0)),
        ("--socket-mem 1024", Some(1024), Target::Ms(60.0)),
        ("--socket-mem 4096", Some(4096), Target::Ratio(0.5)),
    ];
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (label, mem, target) in all {
        let pages = mem.map_or(0, |m| m * MIB / (2 * MIB));
        if avail.free_2m < pages {
            skipped.push(format!(
                "{label}: skipped: needs {pages} free 2 MiB hugepages, found {} free of {} reserved \
                 (as root: memplane hugepages reserve 2M={})",
                avail.free_2m,
                avail.total_2m,
                avail.total_2m + pages - avail.free_2m + 16
            ));
            continue;
        }
        rows.push((label, mem, target));
    }
    for s in &skipped {
        eprintln!("note: {s}");
    }
    let books = Books::open(&[dpdk_prefix.clone(), mp_prefix.clone()]);
    let mut bins: Vec<(&str, &Path)> = vec![("DPDK", eal_bin)];
    if let Some(s) = eal_bin_static {
        bins.push(("DPDK static EAL", s));
    }
    // (who, row index) -> samples
    let mut samples: BTreeMap<(String, usize), Vec<Init>> = BTreeMap::new();
    let mut failed = None;
    'runs: for run in 1..=runs {
        for (ri, &(label, mem, _)) in rows.iter().enumerate() {
            for &(name, bin) in &bins {
                eprintln!("run {run}/{runs}: {label}: {name} rte_eal_init ...");
                match run_eal_init(bin, &dpdk_prefix, &huge_dir, mem) {
                    Ok(s) => samples.entry((name.to_string(), ri)).or_default().push(s),
                    Err(e) => {
                        failed = Some(e);
                        break 'runs;
                    }
                }
            }
            eprintln!("run {run}/{runs}: {label}: memplane Memory::init ...");
            match run_mp_init(&mp_prefix, mem) {
                Ok((s, floor)) => {
                    samples
                        .entry(("memplane".to_string(), ri))
                        .or_default()
                        .push(s);
                    if let Some([init, down]) = floor {
                        samples
                            .entry(("kernel floor".to_string(), ri))
                            .or_default()
                            .push([f64::NAN, f64::NAN, init, down]);
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break 'runs;
                }
            }
        }
    }
    if let Some(e) = failed {
        eprintln!("error: {e}");
        books.close();
        return 1;
    }
    let medians = |who: &str, ri: usize| -> [Option<f64>; 4] {
        let v = samples.get(&(who.to_string(), ri));
        std::array::from_fn(|i| {
            v.and_then(|v| med(&v.iter().map(|s| s[i] / 1e3).collect::<Vec<_>>()))
        })
    };

    println!(
        "\ninit: time from process start to a ready memory instance, DPDK 22.11 rte_eal_init vs memplane Memory::init;"
    );
    println!("2 MiB pages only; medians of {runs} alternating runs, milliseconds\n");
    println!(
        "DPDK      bench/dpdk/eal_startup [--socket-mem M] --no-pci -l 0 --file-prefix {dpdk_prefix} --no-telemetry"
    );
    println!(
        "          --huge-dir {} --huge-unlink (one hugetlbfs file per page); shared libdpdk (init also dlopens every",
        huge_dir.display()
    );
    println!(
        "          PMD of DPDK's plugin directory){}",
        if bins.len() > 1 {
            "; the static build links the EAL alone"
        } else {
            ""
        }
    );
    println!("memplane  memplane-bench init-once: Memory::init(MemOptions [socket_mem([M MiB])], pagesz_mem(1G, 0)), hugetlb memfd");
    println!("Both are spawned by this runner: start = CLOCK_MONOTONIC just before spawning the process, ready = when");
    println!("rte_eal_init / Memory::init returned (read in the child); the split at main() shows exec + dynamic linking.");
    println!("kernel floor: in the memplane child after its teardown, memfd_create(HUGETLB|HUGE_2MB) + fallocate M +");
    println!("          mmap(MAP_POPULATE) (the kernel reserves and zeroes the pages); teardown munmap + close.");
    println!("Targets: memplane <= 10 ms with nothing preallocated, <= 60 ms for 1 GiB, <= 0.50 x DPDK for 4 GiB.");
    let clean = books.close();

    println!("\nwhere the time goes (ms):");
    println!(
        "{:<22} {:<16} {:>12} {:>12} {:>12} {:>10}",
        "workload", "who", "start->ready", "start->main", "main->ready", "teardown"
    );
    for (ri, &(label, _, _)) in rows.iter().enumerate() {
        for who in bins.iter().map(|b| b.0).chain(["memplane", "kernel floor"]) {
            let m = medians(who, ri);
            if m.iter().all(Option::is_none) {
                continue;
            }
            println!(
                "{:<22} {:<16} {:>12} {:>12} {:>12} {:>10}",
                label,
                who,
                fmt(m[0], 2),
                fmt(m[1], 2),
                fmt(m[2], 2),
                fmt(m[3], 2)
            );
        }
    }
    if bins.len() > 1 {
        println!("\nmemplane / DPDK static EAL, start->ready:");
        for (ri, &(label, _, _)) in rows.iter().enumerate() {
            let (d, m) = (
                medians("DPDK static EAL", ri)[0],
                medians("memplane", ri)[0],
            );
            println!(
                "  {label:<22} {}",
                match (d, m) {
                    (Some(d), Some(m)) if d > 0.0 => format!("{:.2}", m / d),
                    _ => "-".into(),
                }
            );
        }
    }

    println!(
        "\n{:<22} {:>10} {:>10} {:>7}  {:<10} met",
        "workload", "DPDK ms", "memplane", "ratio", "target"
    );
    let mut worst: Option<(f64, &str)> = None;
    for (ri, &(label, _, target)) in rows.iter().enumerate() {
        let (d, m) = (medians("DPDK", ri)[0], medians("memplane", ri)[0]);
        let r = match (d, m) {
            (Some(d), Some(m)) if d > 0.0 => Some(m / d),
            _ => None,
        };
        if let Some(r) = r {
            if worst.is_none_or(|(w, _)| r > w) {
                worst = Some((r, label));
            }
        }
        let (tgt, met) = match target {
            Target::Ms(ms) => (format!("<= {ms:.0} ms"), m.map(|m| m <= ms)),
            Target::Ratio(x) => (format!("<= {x:.2}x"), r.map(|r| r <= x)),
        };
        println!(
            "{:<22} {:>10} {:>10} {:>7}  {:<10} {}",
            label,
            fmt(d, 2),
            fmt(m, 2),
            r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
            tgt,
            match met {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "-",
            }
        );
    }
    for s in &skipped {
        println!("{s}");
    }
    match worst {
        Some((w, row)) => println!("\nworst ratio: {w:.2} ({row})"),
        None => println!("\nworst ratio: -"),
    }
    i32::from(!clean)
}

/// What an init row should reach.
#[derive(Clone, Copy)]
enum Target {
    /// memplane's time at most this many milliseconds.
    Ms(f64),
    /// memplane / DPDK at most this.
    Ratio(f64),
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // parsed values are compared with the literals printed
mod tests {
    use super::*;

    const DPDK_OUT: &str = "\
USER1: Reference: memset
USER1: Result: 10.464812.3 GiB/s <=> 93.32 us/MiB
USER1: 
USER1: Performance: rte_malloc
USER1:     Size (B)    Runs  Alloc (us)   Free (us)  Total (us)      memset (us)
USER1:           64   10000        0.10        0.04        0.14             0.01
USER1:   1073741824       1   418851.30   195139.79   613991.09         89917.37
USER1: 
USER1: Performance: rte_zmalloc
USER1:     Size (B)    Runs  Alloc (us)   Free (us)  Total (us)      memset (us)
USER1:           64   10000        0.11        0.05        0.16             0.02
USER1:   1073741824 Interrupted: out of memory.
USER1: Performance: rte_memzone_reserve
USER1:     Size (B)    Runs  Alloc (us)   Free (us)  Total (us)  est.memset (us)
USER1:           64    2559       31.13        0.25       31.38             0.01
Test OK
";

    #[test]
    fn parses_dpdk_table() {
        let t = parse_malloc_perf(DPDK_OUT);
        assert_eq!(t.memset_us_per_mib, Some(93.32));
        assert_eq!(
            t.rows[&("rte_malloc".to_string(), 64)],
            [10000.0, 0.10, 0.04, 0.14, 0.01]
        );
        assert_eq!(t.rows[&("rte_malloc".to_string(), GIB)][0], 1.0);
        assert_eq!(t.rows[&("rte_zmalloc".to_string(), 64)][2], 0.05);
        assert_eq!(t.rows[&("rte_zmalloc".to_string(), GIB)][0], 0.0);
        assert_eq!(
            t.rows[&(MZ_FUNC.to_string(), 64)],
            [2559.0, 31.13, 0.25, 31.38, 0.01]
        );
    }

    /// The memzone table as dpdk-test 22.11 printed it here (2 MiB pages,
    /// 2200 of them).
    const DPDK_MZ: &str = "\
USER1: Performance: rte_memzone_reserve
USER1:     Size (B)    Runs  Alloc (us)   Free (us)  Total (us)  est.memset (us)
USER1:           64    2559       37.03        0.23       37.26             0.01
USER1:          128    2559       33.30        0.29       33.58             0.01
USER1:         1024    2559       41.21        0.70       41.92             0.09
USER1:         4096    2559       43.33        1.25       44.58             0.37
USER1:        65536    2559       42.49        9.30       51.80             5.90
USER1:      1048576    2199      850.53      471.78     1322.31            94.32
USER1:      2097152    1091     1544.48      826.62     2371.10           188.65
USER1:      4194304     733     1309.90     1249.07     2558.97           377.30
USER1:     16777216     244     3323.70     4611.99     7935.69          1509.19
USER1:   1073741824       4   344314.10   251948.50   596262.60         96588.45
USER1: 
Test OK
";

    #[test]
    fn parses_memzone_table() {
        let t = parse_malloc_perf(DPDK_MZ);
        assert_eq!(t.rows.len(), SIZES.len());
        assert_eq!(
            t.rows[&(MZ_FUNC.to_string(), 64)],
            [2559.0, 37.03, 0.23, 37.26, 0.01]
        );
        assert_eq!(t.rows[&(MZ_FUNC.to_string(), 2 * MIB)][0], 1091.0);
        assert_eq!(t.rows[&(MZ_FUNC.to_string(), GIB)][3], 596_262.6);
        // The memzone table is complete; the malloc tables are absent.
        let missing = missing_rows(&t);
        assert!(
            missing.iter().all(|m| !m.starts_with(MZ_FUNC)),
            "{missing:?}"
        );
        assert_eq!(missing.len(), 2 * SIZES.len());
    }

    #[test]
    fn parses_mirror_memzone_table() {
        // memplane's mirror: no USER1 prefix, a note after the function
        // name, three decimals, comment lines, an interrupted size.
        let out = "\
Performance: rte_memzone_reserve (memplane Memory::memzone_reserve_aligned)
    Size (B)    Runs  Alloc (us)   Free (us)  Total (us)  est.memset (us)
          64    2559       0.312       0.101       0.413            0.000
# rte_memzone_reserve 2097152: stopped after 1097 zones: out of memory
     2097152    1097     400.000     150.000     550.000            0.190
  1073741824 Interrupted: out of memory.
";
        let t = parse_malloc_perf(out);
        assert_eq!(
            t.rows[&(MZ_FUNC.to_string(), 64)],
            [2559.0, 0.312, 0.101, 0.413, 0.0]
        );
        assert_eq!(t.rows[&(MZ_FUNC.to_string(), 2 * MIB)][1], 400.0);
        assert_eq!(t.rows[&(MZ_FUNC.to_string(), GIB)][0], 0.0);
        assert!(t.rows[&(MZ_FUNC.to_string(), GIB)][1].is_nan());
    }

    #[test]
    fn parses_scale_line() {
        let out = "EAL: Detected CPU lcores: 2\n\
                   memzone-scale zones=2500 size=64 first100_us=1.903 last100_us=82.429 \
                   reserve_us=40.350 lookup_us=39.977 free_us=0.208 first_us=150.5\n";
        assert_eq!(
            parse_scale(out),
            Some([2500.0, 1.903, 82.429, 40.350, 39.977, 0.208, 150.5])
        );
        assert_eq!(
            parse_scale("memzone-scale zones=2500 first100_us=1\n"),
            None
        );
        assert_eq!(parse_scale("aligned blocks=1\n"), None);
    }

    #[test]
    fn memzone_targets() {
        assert_eq!(mz_target_for(64, "alloc"), 0.1);
        assert_eq!(mz_target_for(64 * KIB, "total"), 0.1);
        assert_eq!(mz_target_for(64, "free"), 1.0);
        assert_eq!(mz_target_for(MIB, "alloc"), 1.0);
        let rows = scale_rows();
        assert_eq!(rows[2].0, "reserve 2401-2500");
        assert_eq!(rows[3].2, Some(Goal::Us(0.5)));
    }

    #[test]
    fn lookup_stride_visits_every_zone() {
        for n in [1, 7, 100, 2500, 7919, 15838] {
            let s = crate::memzone_perf::stride(n);
            let mut seen = vec![false; n];
            for i in 0..n {
                seen[i * s % n] = true;
            }
            assert!(seen.iter().all(|&b| b), "n={n} stride={s}");
        }
    }

    #[test]
    fn parses_aligned_line() {
        let r = parse_aligned("x\naligned size=4096 align=4096 blocks=10000 alloc_us=144.374 free_us=1.075 total_us=145.449\n");
        assert_eq!(r, Some([10000.0, 144.374, 1.075, 145.449]));
    }

    #[test]
    fn labels() {
        assert_eq!(size_label(64), "64");
        assert_eq!(size_label(4096), "4K");
        assert_eq!(size_label(1 << 20), "1M");
        assert_eq!(size_label(GIB), "1G");
    }
}
