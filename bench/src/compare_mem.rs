//! Side-by-side runners for the memory layer, memplane vs DPDK 22.11:
//!
//! - `compare memseg`: DPDK's `malloc_perf_autotest` rte_malloc rows for the
//!   sizes dominated by page mapping (2M, 4M, 16M, 1G) against memplane's
//!   page allocator doing the same workload (`memseg-perf`), plus per-page
//!   latency and the kernel floor;
//! - `compare startup`: `rte_eal_init`/`rte_eal_cleanup` with `-m 1024`
//!   (`bench/dpdk/eal_startup.c`) against `Memory::init`/drop with 1 GiB
//!   preallocated (`startup-once`), plus the kernel floor.
//!
//! Both sides run alternately `runs` times; tables show medians and ratios.
//! Before: enough free hugepages? After: no files of ours in any hugetlbfs
//! mount, no DPDK runtime directory of ours, HugePages_Free as before.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::compare::median;
use crate::memseg_perf::SIZES;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// --- hugepage books ------------------------------------------------------------

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Free and total hugepages of both sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub free_2m: u64,
    pub total_2m: u64,
    pub free_1g: u64,
    pub total_1g: u64,
}

pub fn pool() -> Pool {
    let get = |size: &str, what: &str| {
        read_u64(&Path::new("/sys/kernel/mm/hugepages").join(format!("hugepages-{size}/{what}")))
            .unwrap_or(0)
    };
    Pool {
        free_2m: get("2048kB", "free_hugepages"),
        total_2m: get("2048kB", "nr_hugepages"),
        free_1g: get("1048576kB", "free_hugepages"),
        total_1g: get("1048576kB", "nr_hugepages"),
    }
}

/// hugetlbfs mount points with their page size in bytes.
fn hugetlbfs_mounts() -> Vec<(PathBuf, u64)> {
    let default = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(2 * MIB, |kb| kb * 1024);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[2] != "hugetlbfs" {
                return None;
            }
            let size = f[3]
                .split(',')
                .find_map(|o| o.strip_prefix("pagesize="))
                .map_or(default, |s| match s {
                    "1G" | "1024M" => GIB,
                    "2M" | "2048K" => 2 * MIB,
                    _ => 0,
                });
            Some((PathBuf::from(f[1].replace("\\040", " ")), size))
        })
        .collect()
}

/// DPDK's runtime directory for a file prefix (as `eal_get_runtime_dir`).
fn dpdk_runtime_dir(prefix: &str) -> PathBuf {
    let base = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/run")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
    };
    base.join("dpdk").join(prefix)
}

/// Removes DPDK's runtime directory of our prefix (DPDK 22.11 leaves it).
pub fn remove_dpdk_runtime_dir(prefix: &str) {
    let dir = dpdk_runtime_dir(prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Files in any hugetlbfs mount named `<prefix>...` for one of our prefixes
/// (the character after the prefix is not a digit, so `mpbd12` does not
/// match another run's `mpbd123map_0`).
fn hugepage_files_of(prefixes: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for (dir, _) in hugetlbfs_mounts() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = prefixes.iter().any(|p| {
                name.strip_prefix(p.as_str())
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
            });
            if ours {
                found.push(e.path());
            }
        }
    }
    found
}

/// What was there before, to check after.
pub struct Books {
    before: Pool,
    prefixes: Vec<String>,
}

impl Books {
    pub fn open(prefixes: &[String]) -> Books {
        Books {
            before: pool(),
            prefixes: prefixes.to_vec(),
        }
    }

    /// Removes anything of ours left behind and says so; warns when the
    /// free hugepage counts differ from the start. Returns true when clean.
    pub fn close(&self) -> bool {
        let mut clean = true;
        for p in &self.prefixes {
            remove_dpdk_runtime_dir(p);
        }
        // Runtime directories of memplane children that died before their
        // TempDir was dropped (named memplane-bench-<tag>-<prefix>-<pid>).
        if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with("memplane-bench-")
                    && self
                        .prefixes
                        .iter()
                        .any(|p| name.contains(&format!("-{p}-")));
                if ours {
                    clean = false;
                    eprintln!(
                        "warning: a runtime directory of ours was left behind; removing {}",
                        e.path().display()
                    );
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let left = hugepage_files_of(&self.prefixes);
        if !left.is_empty() {
            clean = false;
            eprintln!(
                "warning: {} hugepage file(s) of ours were left behind; removing them:",
                left.len()
            );
            for f in &left {
                eprintln!("  {}", f.display());
                if let Err(e) = std::fs::remove_file(f) {
                    eprintln!("  cannot remove {}: {e}", f.display());
                }
            }
        }
        let after = pool();
        let b = self.before;
        println!(
            "\nHugePages_Free before/after: 2M {}/{}, 1G {}/{} (reserved 2M {}/{}, 1G {}/{}); \
             files of ours left in hugetlbfs: {}",
            b.free_2m,
            after.free_2m,
            b.free_1g,
            after.free_1g,
            b.total_2m,
            after.total_2m,
            b.total_1g,
            after.total_1g,
            left.len()
        );
        if after.free_2m != b.free_2m || after.free_1g != b.free_1g {
            clean = false;
            let used = |p: Pool| {
                (
                    p.total_2m - p.free_2m.min(p.total_2m),
                    p.total_1g - p.free_1g.min(p.total_1g),
                )
            };
            let why = if (after.total_2m, after.total_1g) != (b.total_2m, b.total_1g)
                && used(after) == used(b)
            {
                "the pool was resized meanwhile (nr_hugepages changed) and the pages in use are as before, \
                 so nothing of ours leaked"
            } else {
                "another process may be using hugepages, or pages leaked"
            };
            println!(
                "WARNING: HugePages_Free differs from the start (2M {} -> {}, 1G {} -> {}): {why}",
                b.free_2m, after.free_2m, b.free_1g, after.free_1g
            );
        }
        clean
    }
}

// --- parsing ---------------------------------------------------------------------

/// `word k=v k=v ...` -> (word, map). None for comments and other lines.
pub fn kv_line(line: &str) -> Option<(&str, BTreeMap<&str, &str>)> {
    let mut it = line.split_whitespace();
    let head = it.next()?;
    if head.starts_with('#') {
        return None;
    }
    let map: BTreeMap<&str, &str> = it.filter_map(|w| w.split_once('=')).collect();
    if map.is_empty() {
        None
    } else {
        Some((head, map))
    }
}

pub fn num(m: &BTreeMap<&str, &str>, k: &str) -> Option<f64> {
    m.get(k).and_then(|v| v.parse().ok())
}

/// One row: blocks (or iterations), alloc us, free us.
type Row = (f64, f64, f64);

/// The rte_malloc rows of DPDK 22.11 `malloc_perf_autotest` output, by size:
/// `Size (B) Runs Alloc (us) Free (us) Total (us) memset (us)`.
fn parse_malloc_perf(out: &str) -> BTreeMap<u64, Row> {
    let mut section = String::new();
    let mut rows = BTreeMap::new();
    for l in out.lines() {
        // "USER1: ..." (the log type prefix) or bare.
        let body = l.split_once(": ").map_or(l, |(_, b)| b);
        if let Some(s) = l.split_once("Performance: ") {
            section = s.1.trim().to_string();
            continue;
        }
        if section != "rte_malloc" {
            continue;
        }
        let f: Vec<&str> = body.split_whitespace().collect();
        if f.len() != 6 {
            continue;
        }
        let (Ok(size), Ok(runs), Ok(alloc), Ok(free)) = (
            f[0].parse::<u64>(),
            f[1].parse::<f64>(),
            f[2].parse::<f64>(),
            f[3].parse::<f64>(),
        ) else {
            continue;
        };
        rows.insert(size, (runs, alloc, free));
    }
    rows
}

/// Medians of rows collected over the runs.
#[derive(Default)]
struct Samples {
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

impl Samples {
    fn push(&mut self, r: Row) {
        self.a.push(r.0);
        self.b.push(r.1);
        self.c.push(r.2);
    }

    fn medians(&mut self) -> Row {
        (
            median(&mut self.a),
            median(&mut self.b),
            median(&mut self.c),
        )
    }
}

pub fn fmt(x: Option<f64>, prec: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn size_label(s: u64) -> String {
    if s >= GIB {
        format!("{}G", s / GIB)
    } else {
        format!("{}M", s / MIB)
    }
}

// --- running the sides ---------------------------------------------------------------

pub fn self_exe(args: &[&str]) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "memplane-bench {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpdk_malloc_args(prefix: &str, huge_dir: &Path) -> Vec<String> {
    [
        "--no-pci",
        "-l",
        "0-1",
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

pub fn run_dpdk_malloc_perf(args: &[String], prefix: &str) -> Result<String, String> {
    let mut child = Command::new("dpdk-test")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run dpdk-test: {e}"))?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(b"malloc_perf_autotest\nquit\n")
            .map_err(|e| format!("writing to dpdk-test: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string());
    remove_dpdk_runtime_dir(prefix);
    let out = out?;
    // The table is DPDK log output (USER1:), which goes to stderr.
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.contains("Test OK") {
        return Err(format!(
            "dpdk-test malloc_perf_autotest did not report Test OK:\n{text}"
        ));
    }
    Ok(text)
}

pub fn huge_dir_2m() -> Result<PathBuf, String> {
    hugetlbfs_mounts()
        .into_iter()
        .find(|(_, s)| *s == 2 * MIB)
        .map(|(d, _)| d)
        .ok_or_else(|| {
            "no hugetlbfs mount with 2 MiB pages: DPDK needs one here \
             (mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages)"
                .to_string()
        })
}

/// Blocks by (who, size, pages per block), per-page rows by (who, page size).
type BlockRows = BTreeMap<(String, u64, u32), Samples>;
type PageRows = BTreeMap<(String, u64), Samples>;

/// Collects the `block` and `page` lines of one `memseg-perf` run.
fn parse_memseg_perf(text: &str, blocks: &mut BlockRows, pages: &mut PageRows) {
    for line in text.lines() {
        let Some((head, kv)) = kv_line(line) else {
            continue;
        };
        let who = kv.get("who").copied().unwrap_or("?").to_string();
        let times = (num(&kv, "alloc_us"), num(&kv, "free_us"));
        match (head, times) {
            ("block", (Some(alloc), Some(free))) => {
                if let (Some(size), Some(per_block), Some(count)) =
                    (num(&kv, "size"), num(&kv, "pages"), num(&kv, "runs"))
                {
                    blocks
                        .entry((who, size as u64, per_block as u32))
                        .or_default()
                        .push((count, alloc, free));
                }
            }
            ("page", (Some(alloc), Some(free))) => {
                if let (Some(psz), Some(iters)) = (num(&kv, "psz"), num(&kv, "iters")) {
                    pages
                        .entry((who, psz as u64))
                        .or_default()
                        .push((iters, alloc, free));
                }
            }
            _ => {}
        }
    }
}

// --- memseg ----------------------------------------------------------------------------

/// `compare memseg`; returns the process exit code. `mp_hugetlbfs`: back
/// memplane's pages with hugetlbfs files (as DPDK's) instead of a memfd.
pub fn memseg(runs: usize, mp_hugetlbfs: bool) -> i32 {
    let pid = std::process::id();
    let dpdk_prefix = format!("mpbd{pid}");
    let mp_prefix = format!("mpbm{pid}");
    let huge_dir = match huge_dir_2m() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench/compare memseg: {e}");
            return 3;
        }
    };
    // One 1 GiB block mapped as rte_malloc maps it is 513 pages; DPDK's
    // heap holds one more page of its own.
    let need = 515;
    let avail = pool();
    if avail.free_2m < need {
        eprintln!(
            "bench/compare memseg: needs at least {need} free 2 MiB hugepages (a 1 GiB block is 513 \
             of them, DPDK's heap keeps one more); found {} free of {} reserved.\n  \
             Stop other DPDK/memplane processes, or reserve more: \
             echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            avail.free_2m, avail.total_2m
        );
        return 3;
    }
    if avail.free_2m < avail.total_2m {
        eprintln!(
            "note: {} of {} 2 MiB hugepages are in use by someone else: block counts will be lower",
            avail.total_2m - avail.free_2m,
            avail.total_2m
        );
    }
    if avail.free_1g == 0 {
        eprintln!("note: no free 1 GiB hugepage: the 1 GiB per-page rows are left out");
    }
    let books = Books::open(&[dpdk_prefix.clone(), mp_prefix.clone()]);
    let args = dpdk_malloc_args(&dpdk_prefix, &huge_dir);

    let mut dpdk: BTreeMap<u64, Samples> = BTreeMap::new();
    let mut blocks = BlockRows::new();
    let mut pages = PageRows::new();
    let mut failed = None;
    for run in 1..=runs {
        eprintln!("run {run}/{runs}: dpdk-test malloc_perf_autotest ...");
        match run_dpdk_malloc_perf(&args, &dpdk_prefix) {
            Ok(t) => {
                let rows = parse_malloc_perf(&t);
                if SIZES.iter().any(|s| !rows.contains_key(s)) {
                    failed = Some(format!("dpdk-test output lacks some rte_malloc rows:\n{t}"));
                    break;
                }
                for (s, r) in rows {
                    dpdk.entry(s).or_default().push(r);
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        eprintln!("run {run}/{runs}: memplane memseg-perf ...");
        let dir = huge_dir.to_string_lossy();
        let mut mp_args = vec!["memseg-perf", "--prefix", &mp_prefix];
        if mp_hugetlbfs {
            mp_args.extend(["--huge-dir", &dir]);
        }
        match self_exe(&mp_args) {
            Ok(text) => parse_memseg_perf(&text, &mut blocks, &mut pages),
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
        "\nmemseg: page allocation per block, DPDK 22.11 malloc_perf_autotest (rte_malloc rows) vs memplane; medians of {runs} alternating runs\n"
    );
    println!(
        "DPDK      dpdk-test {}, stdin \"malloc_perf_autotest\"",
        args.join(" ")
    );
    println!("          rte_malloc blocks from 2 MiB pages, one hugetlbfs file per page (with --in-memory DPDK would carve");
    println!("          blocks out of the two 1 GiB pages as well, which is not page mapping)");
    let backing = if mp_hugetlbfs {
        format!(
            "hugetlbfs files in {} with huge_unlink(Always), like DPDK",
            huge_dir.display()
        )
    } else {
        "hugetlb memfd; --memplane-hugetlbfs: files like DPDK".to_string()
    };
    println!("memplane  Memory::alloc_pages(PageRequest::new(0, 2M, n)) per block (contiguous), free_run per block;");
    println!("          backing: {backing}");
    println!("          DPDK's Free also zeroes the freed heap element (22.11 keeps free heap memory clean for rte_zmalloc)");
    println!("kernel    per block fallocate + mmap(MAP_POPULATE) on one hugetlb memfd; free: munmap + fallocate(PUNCH_HOLE)");
    println!("All: blocks back to back up to 10000, stop at the first failure (the failed attempt is in the alloc time, as in");
    println!("DPDK), memset, free all. us = average microseconds per block; ratio = memplane / DPDK (< 1.00: memplane faster).");
    println!("Rows: pages/blk = ceil(S/2M) is the size itself; ceil(S/2M)+1 (marked *) is what rte_malloc really maps per block");
    println!("(its heap element header makes a page-multiple size one page longer) -- compare the * rows.\n");
    println!(
        "{:<5} {:<10}| {:>6} {:>6} {:>6} | {:>10} {:>10} {:>6} {:>10} | {:>10} {:>10} {:>6} {:>10}",
        "", "", "blocks", "", "", "alloc", "us/block", "", "", "free", "us/block", "", ""
    );
    println!(
        "{:<5} {:<10}| {:>6} {:>6} {:>6} | {:>10} {:>10} {:>6} {:>10} | {:>10} {:>10} {:>6} {:>10}",
        "size",
        "pages/blk",
        "DPDK",
        "mplane",
        "kernel",
        "DPDK",
        "memplane",
        "ratio",
        "kernel",
        "DPDK",
        "memplane",
        "ratio",
        "kernel"
    );
    let mut worst: f64 = 0.0;
    for size in SIZES {
        let d = dpdk.get_mut(&size).map(Samples::medians);
        let base = size.div_ceil(2 * MIB) as u32;
        for n in [base, base + 1] {
            let m = blocks
                .get_mut(&("memplane".to_string(), size, n))
                .map(Samples::medians);
            let k = blocks
                .get_mut(&("kernel".to_string(), size, n))
                .map(Samples::medians);
            let mark = if n == base { "" } else { " *" };
            if n == base + 1 {
                if let (Some(d), Some(m)) = (d, m) {
                    if d.1 > 0.0 && d.2 > 0.0 {
                        worst = worst.max(m.1 / d.1).max(m.2 / d.2);
                    }
                }
            }
            println!(
                "{:<5} {:<10}| {:>6} {:>6} {:>6} | {:>10} {:>10} {:>6} {:>10} | {:>10} {:>10} {:>6} {:>10}",
                size_label(size),
                format!("{n}{mark}"),
                fmt(d.map(|r| r.0), 0),
                fmt(m.map(|r| r.0), 0),
                fmt(k.map(|r| r.0), 0),
                fmt(d.map(|r| r.1), 2),
                fmt(m.map(|r| r.1), 2),
                ratio(m.map(|r| r.1), d.map(|r| r.1)),
                fmt(k.map(|r| r.1), 2),
                fmt(d.map(|r| r.2), 2),
                fmt(m.map(|r| r.2), 2),
                ratio(m.map(|r| r.2), d.map(|r| r.2)),
                fmt(k.map(|r| r.2), 2),
            );
        }
    }
    println!("\nworst memplane/DPDK ratio over the * rows (alloc and free): {worst:.2}");

    println!("\nper-page latency, memplane vs the kernel floor: one page allocated then freed, repeated; us per page");
    println!("memplane: alloc_pages(1 page) / free_run; kernel: fallocate + mmap(MAP_POPULATE) / munmap + fallocate(PUNCH_HOLE)");
    println!("on a hugetlb memfd; ratio = memplane / kernel. DPDK has no per-page row.");
    if mp_hugetlbfs {
        println!("(--memplane-hugetlbfs: memplane has 1 GiB pages only if a pagesize=1G hugetlbfs is mounted)");
    }
    println!();
    println!(
        "{:<5} {:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6}",
        "page", "iters", "alloc mp", "kernel", "ratio", "free mp", "kernel", "ratio"
    );
    for psz in [2 * MIB, GIB] {
        let m = pages
            .get_mut(&("memplane".to_string(), psz))
            .map(Samples::medians);
        let k = pages
            .get_mut(&("kernel".to_string(), psz))
            .map(Samples::medians);
        if m.is_none() && k.is_none() {
            println!(
                "{:<5} (not measured: no free {} hugepage)",
                size_label(psz),
                size_label(psz)
            );
            continue;
        }
        println!(
            "{:<5} {:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6}",
            size_label(psz),
            fmt(m.or(k).map(|r| r.0), 0),
            fmt(m.map(|r| r.1), 2),
            fmt(k.map(|r| r.1), 2),
            ratio(m.map(|r| r.1), k.map(|r| r.1)),
            fmt(m.map(|r| r.2), 2),
            fmt(k.map(|r| r.2), 2),
            ratio(m.map(|r| r.2), k.map(|r| r.2)),
        );
    }
    books.close();
    0
}

// --- startup --------------------------------------------------------------------------

/// init, teardown, memory phase, TSC phase (us; NaN when unknown).
type Startup = (f64, f64, f64, f64);

fn run_eal_startup(bin: &Path, prefix: &str, huge_dir: &Path) -> Result<Startup, String> {
    let out = Command::new(bin)
        .args([
            "-m",
            "1024",
            "--no-pci",
            "-l",
            "0",
            "--file-prefix",
            prefix,
            "--no-telemetry",
            "--huge-dir",
            &huge_dir.to_string_lossy(),
            "--huge-unlink",
            "--log-level=lib.eal:debug",
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()));
    remove_dpdk_runtime_dir(prefix);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("init_us="));
    let (true, Some(line)) = (out.status.success(), line) else {
        return Err(format!(
            "{} failed:\n{text}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    let m: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    let get = |k: &str| num(&m, k).filter(|v| *v >= 0.0).unwrap_or(f64::NAN);
    Ok((
        get("init_us"),
        get("cleanup_us"),
        get("mem_us"),
        get("tsc_us"),
    ))
}

#[derive(Default)]
struct StartupSamples {
    init: Vec<f64>,
    down: Vec<f64>,
    mem: Vec<f64>,
    tsc: Vec<f64>,
}

impl StartupSamples {
    fn push(&mut self, s: Startup) {
        self.init.push(s.0);
        self.down.push(s.1);
        if s.2.is_finite() {
            self.mem.push(s.2);
        }
        if s.3.is_finite() {
            self.tsc.push(s.3);
        }
    }

    /// Medians in ms: init, teardown, memory phase, TSC phase.
    fn medians_ms(&mut self) -> [Option<f64>; 4] {
        let m = |v: &mut Vec<f64>| (!v.is_empty()).then(|| median(v) / 1000.0);
        [
            m(&mut self.init),
            m(&mut self.down),
            m(&mut self.mem),
            m(&mut self.tsc),
        ]
    }
}

/// Collects the `memplane` and `kernel` lines of one `startup-once` run.
fn parse_startup_once(text: &str, ours: &mut StartupSamples, floor: &mut StartupSamples) {
    for line in text.lines() {
        let Some((head, kv)) = kv_line(line) else {
            continue;
        };
        let (Some(init), Some(down)) = (num(&kv, "init_us"), num(&kv, "teardown_us")) else {
            continue;
        };
        match head {
            "memplane" => ours.push((init, down, f64::NAN, f64::NAN)),
            "kernel" => floor.push((init, down, f64::NAN, f64::NAN)),
            _ => {}
        }
    }
}

/// `compare startup`; returns the process exit code.
pub fn startup(runs: usize, eal_bin: &Path, eal_bin_static: Option<&Path>) -> i32 {
    let pid = std::process::id();
    let dpdk_prefix = format!("mpbsd{pid}");
    let mp_prefix = format!("mpbsm{pid}");
    let huge_dir = match huge_dir_2m() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench/compare startup: {e}");
            return 3;
        }
    };
    let need = 512;
    let avail = pool();
    if avail.free_2m < need {
        eprintln!(
            "bench/compare startup: needs {need} free 2 MiB hugepages (1 GiB preallocated by each side); \
             found {} free of {} reserved.\n  Stop other DPDK/memplane processes, or reserve more: \
             echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            avail.free_2m, avail.total_2m
        );
        return 3;
    }
    let books = Books::open(&[dpdk_prefix.clone(), mp_prefix.clone()]);
    let mut bins: Vec<(&str, &Path)> = vec![("DPDK, shared libdpdk", eal_bin)];
    if let Some(s) = eal_bin_static {
        bins.push(("DPDK, static EAL only", s));
    }
    let mut dpdk: Vec<StartupSamples> = bins.iter().map(|_| StartupSamples::default()).collect();
    let mut ours = StartupSamples::default();
    let mut floor = StartupSamples::default();
    let mut failed = None;
    'runs: for run in 1..=runs {
        for ((name, bin), samples) in bins.iter().zip(dpdk.iter_mut()) {
            eprintln!("run {run}/{runs}: {name}: rte_eal_init -m 1024 ...");
            match run_eal_startup(bin, &dpdk_prefix, &huge_dir) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    failed = Some(e);
                    break 'runs;
                }
            }
        }
        eprintln!("run {run}/{runs}: memplane Memory::init 1 GiB ...");
        match self_exe(&["startup-once", "--prefix", &mp_prefix]) {
            Ok(text) => parse_startup_once(&text, &mut ours, &mut floor),
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

    println!("\nstartup: DPDK 22.11 rte_eal_init / rte_eal_cleanup vs memplane Memory::init / drop, 1 GiB of 2 MiB pages");
    println!("preallocated; medians of {runs} alternating runs, milliseconds\n");
    println!(
        "DPDK      bench/dpdk/eal_startup -m 1024 --no-pci -l 0 --file-prefix {dpdk_prefix} --no-telemetry"
    );
    println!(
        "          --huge-dir {} --huge-unlink --log-level=lib.eal:debug (512 pages, one hugetlbfs file per page;",
        huge_dir.display()
    );
    println!("          the debug log goes to memory and time-stamps the phases). The shared build also dlopens every PMD");
    println!(
        "          in DPDK's plugin directory during init; the static build links the EAL alone."
    );
    println!("memplane  Memory::init(MemOptions socket_mem([1 GiB]), pagesz_mem(1G, 0)) (512 pages, hugetlb memfd), drop");
    println!("kernel    memfd_create(HUGETLB|HUGE_2MB) + fallocate 1 GiB + mmap(MAP_POPULATE); teardown munmap + close\n");
    println!("{:<48} {:>10} {:>12}", "", "init", "teardown");
    let mut med: Vec<[Option<f64>; 4]> = dpdk.iter_mut().map(StartupSamples::medians_ms).collect();
    for ((name, _), m) in bins.iter().zip(&med) {
        println!("{:<48} {:>10} {:>12}", name, fmt(m[0], 1), fmt(m[1], 1));
        println!(
            "{:<48} {:>10}",
            "  of it: memory (EAL log, memseg lists .. heap)",
            fmt(m[2], 1)
        );
        println!(
            "{:<48} {:>10}",
            "  of it: TSC calibration (EAL log, timer init)",
            fmt(m[3], 1)
        );
    }
    let mp = ours.medians_ms();
    let k = floor.medians_ms();
    println!(
        "{:<48} {:>10} {:>12}",
        "memplane",
        fmt(mp[0], 1),
        fmt(mp[1], 1)
    );
    println!(
        "{:<48} {:>10} {:>12}",
        "kernel floor (reserve + zero 1 GiB)",
        fmt(k[0], 1),
        fmt(k[1], 1)
    );
    println!("\n{:<48} {:>10} {:>12}", "ratios", "init", "teardown");
    for ((name, _), m) in bins.iter().zip(&med) {
        println!(
            "{:<48} {:>10} {:>12}",
            format!("memplane / {name}"),
            ratio(mp[0], m[0]),
            ratio(mp[1], m[1])
        );
    }
    if let Some(m) = med.first() {
        println!(
            "{:<48} {:>10}",
            "memplane / DPDK shared memory phase",
            ratio(mp[0], m[2])
        );
    }
    println!(
        "{:<48} {:>10} {:>12}",
        "memplane / kernel floor",
        ratio(mp[0], k[0]),
        ratio(mp[1], k[1])
    );
    if let Some(m) = med.first_mut() {
        println!(
            "{:<48} {:>10} {:>12}",
            "DPDK shared / kernel floor",
            ratio(m[0], k[0]),
            ratio(m[1], k[1])
        );
    }
    books.close();
    0
}
