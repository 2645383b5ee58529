//! `memplane memory`: start a real instance with EAL-style memory options,
//! optionally map more pages, show where the memory went, tear it down and
//! check that every hugepage went back to the kernel.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use memplane::hugepages::Discovery;
use memplane::memseg::{ContigRun, ListInfo, MemsegInfo, PageRequest, PageRun};
use memplane::options::{HugeUnlink, IovaMode, OptionsError};
use memplane::units::format_size;
use memplane::{Error, MemOptions, Memory, MemoryLayout, PageSize};
use serde::Serialize;

/// Arguments of `memplane memory`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print `{"init_us": .., "layout": ..}` as JSON (with --pages, also
    /// "pages"); the teardown report goes to stderr.
    #[arg(long)]
    json: bool,
    /// Also list every mapped page (like DPDK's rte_dump_physmem_layout).
    #[arg(long)]
    pages: bool,
    /// After init, map COUNT more pages of SIZE, on NODE if given, e.g. 2M=4
    /// or 1G=1@0 (one VA-contiguous run; repeatable).
    #[arg(long = "alloc", value_name = "SIZE=COUNT[@NODE]")]
    alloc: Vec<String>,
    /// After init, reserve a memzone NAME of SIZE bytes (suffixes K, M, G),
    /// on NODE or any node, e.g. rx=64K or table=1G@0 (repeatable).
    #[arg(long = "memzone", value_name = "NAME=SIZE[@NODE]")]
    memzone: Vec<String>,
    /// After init, create an MP/MC ring NAME of COUNT 8-byte slots (a power
    /// of two) in a memzone, e.g. rx=1024 (repeatable).
    #[arg(long = "ring", value_name = "NAME=COUNT")]
    ring: Vec<String>,
    /// After init, create a mempool NAME of N objects of ELT bytes
    /// (default 2048) with per-lcore caches of CACHE objects (default 0),
    /// e.g. pkts=4095x2048/256 (repeatable); `@HANDLER` picks its handler
    /// (default ring_mp_mc), e.g. blk=4096x64@bucket; `+stats` switches its
    /// statistics on, e.g. pkts=4095/256+stats. This thread takes an lcore
    /// id and cycles objects through its cache, so `memplane info` has
    /// cache counts (and statistics) to show.
    #[arg(
        long = "mempool",
        value_name = "NAME=N[xELT][/CACHE][@HANDLER][+stats]"
    )]
    mempool: Vec<String>,
    /// Keep the instance alive SECS seconds before tearing it down, to look
    /// at it from another shell (Ctrl-C ends the wait early).
    #[arg(long, value_name = "SECS")]
    hold: Option<String>,
    /// EAL-style memory options, e.g. `--socket-mem 64 --file-prefix demo`.
    /// The flags above may also come after them.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "EAL_OPTIONS"
    )]
    options: Vec<String>,
}

/// One `--alloc SIZE=COUNT[@NODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllocSpec {
    text: String,
    size: PageSize,
    count: u32,
    node: Option<u32>,
}

/// What the arguments ask for, with memplane-memory's own flags taken out
/// of the EAL options.
#[derive(Debug)]
struct Request {
    json: bool,
    pages: bool,
    allocs: Vec<AllocSpec>,
    zones: Vec<ZoneSpec>,
    rings: Vec<(String, usize)>,
    mempools: Vec<PoolSpec>,
    hold: Option<Duration>,
    eal: Vec<String>,
}

/// One `--memzone NAME=SIZE[@NODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ZoneSpec {
    name: String,
    len: usize,
    socket: i32,
}

fn parse_ring(text: &str) -> Result<(String, usize), Error> {
    const FORM: &str = "expected NAME=COUNT, e.g. rx=1024";
    let (name, count) = text
        .split_once('=')
        .ok_or_else(|| bad("--ring", text, format!("no '='; {FORM}")))?;
    let count = count.trim().parse::<usize>().map_err(|_| {
        bad(
            "--ring",
            text,
            format!("'{count}' is not a slot count; {FORM}"),
        )
    })?;
    Ok((name.to_string(), count))
}

/// One `--mempool NAME=N[xELT][/CACHE][@HANDLER][+stats]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolSpec {
    name: String,
    n: u32,
    elt_size: u32,
    cache_size: u32,
    handler: Option<String>,
    stats: bool,
}

fn parse_mempool(text: &str) -> Result<PoolSpec, Error> {
    const FORM: &str = "expected NAME=N[xELT][/CACHE][@HANDLER][+stats], e.g. pkts=4095x2048/256, blk=4096x64@bucket or pkts=4095/256+stats";
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| bad("--mempool", text, format!("no '='; {FORM}")))?;
    let (rest, stats) = match rest.split_once('+') {
        Some((r, "stats")) => (r, true),
        Some((_, other)) => {
            return Err(bad(
                "--mempool",
                text,
                format!("'+{other}' is not a pool option (only +stats); {FORM}"),
            ))
        }
        None => (rest, false),
    };
    let (rest, handler) = match rest.split_once('@') {
        Some((_, "")) => {
            return Err(bad(
                "--mempool",
                text,
                format!("no handler name after '@'; {FORM}"),
            ))
        }
        Some((r, h)) => (r, Some(h.to_string())),
        None => (rest, None),
    };
    let (rest, cache) = match rest.split_once('/') {
        Some((r, c)) => (r, Some(c)),
        None => (rest, None),
    };
    let (n, elt) = match rest.split_once(['x', 'X']) {
        Some((n, e)) => (n, Some(e)),
        None => (rest, None),
    };
    let num = |what: &str, v: &str| {
        v.trim().parse::<u32>().map_err(|_| {
            bad(
                "--mempool",
                text,
                format!("'{v}' is not a number of {what}; {FORM}"),
            )
        })
    };
    Ok(PoolSpec {
        name: name.to_string(),
        n: num("objects", n)?,
        elt_size: elt.map_or(Ok(2048), |e| num("bytes", e))?,
        cache_size: cache.map_or(Ok(0), |c| num("cached objects", c))?,
        handler,
        stats,
    })
}

fn parse_zone(text: &str) -> Result<ZoneSpec, Error> {
    const FORM: &str = "expected NAME=SIZE[@NODE], e.g. rx=64K or table=1G@0";
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| bad("--memzone", text, format!("no '='; {FORM}")))?;
    let (size, node) = match rest.split_once('@') {
        Some((s, n)) => (s, Some(n)),
        None => (rest, None),
    };
    let len = memplane::units::parse_size(size.trim())
        .map_err(|e| bad("--memzone", text, format!("{e}; {FORM}")))?;
    let len = usize::try_from(len).map_err(|_| {
        bad(
            "--memzone",
            text,
            "the size does not fit this machine's addresses",
        )
    })?;
    let socket = match node {
        Some(n) => n
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|&n| n >= 0)
            .ok_or_else(|| {
                bad(
                    "--memzone",
                    text,
                    format!("'{n}' is not a NUMA node number; {FORM}"),
                )
            })?,
        None => memplane::heap::SOCKET_ID_ANY,
    };
    Ok(ZoneSpec {
        name: name.to_string(),
        len,
        socket,
    })
}

/// A mempool error as the CLI's error (memory errors as they are).
fn mempool_err(name: &str, e: memplane_mempool::MempoolError) -> Error {
    match e {
        memplane_mempool::MempoolError::Memory(m) => m,
        other => bad("--mempool", name, other.to_string()),
    }
}

fn bad(option: &str, value: &str, reason: impl Into<String>) -> Error {
    OptionsError::BadValue {
        option: option.into(),
        value: value.into(),
        reason: reason.into(),
    }
    .into()
}

fn parse_alloc(text: &str) -> Result<AllocSpec, Error> {
    const FORM: &str = "expected SIZE=COUNT[@NODE], e.g. 2M=4 or 1G=1@0";
    let (size, rest) = text
        .split_once('=')
        .ok_or_else(|| bad("--alloc", text, format!("no '='; {FORM}")))?;
    let size: PageSize = size
        .parse()
        .map_err(|e: String| bad("--alloc", text, format!("{e}; {FORM}")))?;
    let (count, node) = match rest.split_once('@') {
        Some((c, n)) => (c, Some(n)),
        None => (rest, None),
    };
    let count: u32 = count.trim().parse().map_err(|_| {
        bad(
            "--alloc",
            text,
            format!("'{count}' is not a page count (a whole number of at least 1); {FORM}"),
        )
    })?;
    if count == 0 {
        return Err(bad(
            "--alloc",
            text,
            "a page count of 0 maps nothing; give at least 1",
        ));
    }
    let node = node
        .map(|n| {
            n.trim().parse::<u32>().map_err(|_| {
                bad(
                    "--alloc",
                    text,
                    format!("'{n}' is not a NUMA node number; {FORM}"),
                )
            })
        })
        .transpose()?;
    Ok(AllocSpec {
        text: text.to_string(),
        size,
        count,
        node,
    })
}

fn parse_hold(text: &str) -> Result<Duration, Error> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| {
            bad(
                "--hold",
                text,
                "expected a number of seconds of at least 0, e.g. 30 or 0.5",
            )
        })
}

impl Request {
    /// Takes `--json`, `--pages`, `--alloc` and `--hold` out of the EAL
    /// options (clap hands over everything after the first EAL option), up
    /// to a `--`, which the EAL parser judges.
    fn from_args(args: Args) -> Result<Request, Error> {
        let mut json = args.json;
        let mut pages = args.pages;
        let mut alloc = args.alloc;
        let mut memzone = args.memzone;
        let mut ring = args.ring;
        let mut mempool = args.mempool;
        let mut hold = args.hold;
        let mut eal = Vec::with_capacity(args.options.len());
        let mut it = args.options.into_iter();
        while let Some(arg) = it.next() {
            if arg == "--" {
                eal.push(arg);
                eal.extend(it.by_ref());
                break;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            match name {
                "--json" | "--pages" => {
                    if let Some(value) = inline {
                        return Err(OptionsError::UnexpectedValue {
                            option: name.into(),
                            value,
                        }
                        .into());
                    }
                    if name == "--json" {
                        json = true;
                    } else {
                        pages = true;
                    }
                }
                "--alloc" | "--hold" | "--memzone" | "--ring" | "--mempool" => {
                    let value = match inline {
                        Some(v) => v,
                        None => it.next().ok_or_else(|| OptionsError::MissingValue {
                            option: name.into(),
                            expected: match name {
                                "--alloc" => "SIZE=COUNT[@NODE], e.g. --alloc 2M=4".into(),
                                "--memzone" => "NAME=SIZE[@NODE], e.g. --memzone rx=64K".into(),
                                "--ring" => "NAME=COUNT, e.g. --ring rx=1024".into(),
                                "--mempool" => {
                                    "NAME=N[xELT][/CACHE][@HANDLER][+stats], e.g. --mempool pkts=4095x2048/256".into()
                                }
                                _ => "seconds, e.g. --hold 30".into(),
                            },
                        })?,
                    };
                    match name {
                        "--alloc" => alloc.push(value),
                        "--memzone" => memzone.push(value),
                        "--ring" => ring.push(value),
                        "--mempool" => mempool.push(value),
                        _ => hold = Some(value),
                    }
                }
                _ => eal.push(arg),
            }
        }
        let allocs = alloc
            .iter()
            .map(|a| parse_alloc(a))
            .collect::<Result<_, _>>()?;
        let rings = ring
            .iter()
            .map(|r| parse_ring(r))
            .collect::<Result<_, _>>()?;
        let mempools = mempool
            .iter()
            .map(|m| parse_mempool(m))
            .collect::<Result<_, _>>()?;
        let zones = memzone
            .iter()
            .map(|z| parse_zone(z))
            .collect::<Result<_, _>>()?;
        let hold = hold.as_deref().map(parse_hold).transpose()?;
        Ok(Request {
            json,
            pages,
            allocs,
            zones,
            rings,
            mempools,
            hold,
            eal,
        })
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    init_us: u64,
    layout: &'a MemoryLayout,
    heaps: Vec<memplane::heap::HeapInfo>,
    memzones: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pages: Option<Vec<MemsegInfo>>,
}

/// Free pages per hugepage size, from `<sys>/kernel/mm/hugepages`.
fn free_hugepages(sys: &Path) -> BTreeMap<PageSize, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(sys.join("kernel/mm/hugepages")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(size) = e
            .file_name()
            .to_str()
            .and_then(PageSize::from_sysfs_dir_name)
        else {
            continue;
        };
        if let Some(n) = std::fs::read_to_string(e.path().join("free_hugepages"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            out.insert(size, n);
        }
    }
    out
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// A size for reading, not for exact values: `20.5G`, `64M`.
fn approx_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{}{name}", bytes / unit)
            } else {
                format!("{:.1}{name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes}B")
}

pub(crate) fn fmt_range(start: usize, len: usize) -> String {
    format!("{start:#x}-{:#x}", start + len)
}

fn fmt_free(map: &BTreeMap<PageSize, u64>) -> String {
    map.iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The "malloc heaps" table and the memzone dump, as `memory` and `info`
/// show them.
pub(crate) fn heaps_and_zones(mem: &Memory, heaps: &[memplane::heap::HeapInfo]) -> String {
    let mut o = String::from("\nmalloc heaps:\n");
    let mut t = Table::new(&[
        ("name", false),
        ("socket", true),
        ("total", true),
        ("free", true),
        ("allocated", true),
        ("greatest free", true),
        ("blocks", true),
        ("free elements", true),
        ("cached", true),
    ]);
    for h in heaps {
        let s = h.stats;
        t.row(vec![
            h.name.clone(),
            h.socket.to_string(),
            format_size(s.total_bytes),
            format_size(s.free_bytes),
            format_size(s.alloc_bytes),
            format_size(s.greatest_free),
            s.alloc_count.to_string(),
            s.free_count.to_string(),
            s.cached_count.to_string(),
        ]);
    }
    o.push_str(&t.render("  "));
    o.push('\n');
    let mut zones = Vec::new();
    let _ = mem.memzone_dump(&mut zones);
    o.push_str(&String::from_utf8_lossy(&zones));
    o
}

/// A left/right-aligned text table; the last column is not padded.
pub(crate) struct Table {
    head: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(cols: &[(&'static str, bool)]) -> Table {
        Table {
            head: cols.iter().map(|c| c.0).collect(),
            right: cols.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self, indent: &str) -> String {
        let mut width: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut o = String::new();
        let head: Vec<String> = self.head.iter().map(ToString::to_string).collect();
        for r in std::iter::once(&head).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, c) in r.iter().enumerate() {
                let last = i + 1 == r.len();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    let _ = write!(line, "{c:>w$}", w = width[i]);
                } else if last {
                    line.push_str(c);
                } else {
                    let _ = write!(line, "{c:<w$}", w = width[i]);
                }
            }
            o.push_str(line.trim_end());
            o.push('\n');
        }
        o
    }
}

/// Pinned pages and IOVA pieces of one run, from the page snapshot.
fn run_detail(segs: &BTreeMap<(u32, u32), MemsegInfo>, run: &ContigRun) -> (u32, usize) {
    let mut pinned = 0;
    let mut pieces = 0;
    let mut next_iova = None;
    for s in segs
        .range((run.list, run.first)..(run.list, run.first + run.count))
        .map(|(_, s)| s)
    {
        pinned += u32::from(s.pinned);
        if next_iova != Some(s.iova) {
            pieces += 1;
        }
        next_iova = Some(s.iova + s.len as u64);
    }
    (pinned, pieces)
}

fn pinned_summary(lists: &[ListInfo]) -> String {
    let parts: Vec<String> = lists
        .iter()
        .filter(|l| l.pinned > 0)
        .map(|l| format!("{} x {} on node {}", l.pinned, l.page_size, l.node))
        .collect();
    if parts.is_empty() {
        "nothing preallocated; pages are mapped on demand".into()
    } else {
        format!("preallocated {} (pinned)", parts.join(", "))
    }
}

struct Alloced<'a> {
    spec: &'a AllocSpec,
    node: u32,
    runs: Vec<PageRun>,
    took: Duration,
}

fn render_human(
    mem: &Memory,
    layout: &MemoryLayout,
    init: Duration,
    allocs: &[Alloced<'_>],
    free_before: &BTreeMap<PageSize, u64>,
    free_running: &BTreeMap<PageSize, u64>,
    label_width: usize,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "memplane memory: prefix '{}', pid {}",
        layout.prefix,
        std::process::id()
    );
    let mut facts: Vec<(String, String)> = vec![(
        "init".into(),
        format!("{}, {}", fmt_duration(init), pinned_summary(&layout.lists)),
    )];
    for a in allocs {
        let runs: Vec<String> = a
            .runs
            .iter()
            .map(|r| format!("{} x {} at {:#x}", r.count, r.page_size, r.va))
            .collect();
        facts.push((
            format!("alloc {}", a.spec.text),
            format!(
                "{}, node {}: {}",
                fmt_duration(a.took),
                a.node,
                runs.join(", ")
            ),
        ));
    }
    facts.push((
        "reservation".into(),
        format!(
            "{} ({} of address space)",
            fmt_range(layout.base_va, layout.va_len),
            approx_size(layout.va_len as u64)
        ),
    ));
    facts.push((
        "IOVA mode".into(),
        match layout.iova_mode {
            IovaMode::Pa => "pa (device addresses are physical addresses)",
            IovaMode::Va => "va (device addresses are virtual addresses)",
        }
        .into(),
    ));
    let nodes: Vec<String> = mem
        .topology()
        .nodes()
        .iter()
        .map(|n| (n.id, mem.node_total(n.id)))
        .filter(|&(_, b)| b > 0)
        .map(|(id, b)| format!("node {id}: {}", format_size(b)))
        .collect();
    facts.push((
        "mapped".into(),
        if nodes.is_empty() {
            format_size(layout.total_mapped)
        } else {
            format!(
                "{} ({})",
                format_size(layout.total_mapped),
                nodes.join(", ")
            )
        },
    ));
    if !free_before.is_empty() {
        facts.push((
            "free pages".into(),
            format!(
                "{} before start; {} now",
                fmt_free(free_before),
                fmt_free(free_running)
            ),
        ));
    }
    for (label, value) in &facts {
        let _ = writeln!(o, "  {label:<label_width$}  {value}");
    }

    let _ = writeln!(o, "\nmemseg lists:");
    let mut t = Table::new(&[
        ("#", true),
        ("name", false),
        ("node", true),
        ("page", true),
        ("used/slots", true),
        ("pinned", true),
        ("backing", false),
        ("VA range", false),
    ]);
    for l in &layout.lists {
        t.row(vec![
            l.index.to_string(),
            l.name.clone(),
            l.node.to_string(),
            l.page_size.to_string(),
            format!("{}/{}", l.used, l.capacity),
            l.pinned.to_string(),
            l.backing.as_str().into(),
            fmt_range(l.base_va, l.len),
        ]);
    }
    o.push_str(&t.render("  "));

    o.push_str(&heaps_and_zones(mem, &mem.heaps()));

    let _ = write!(o, "\nmapped runs (VA-contiguous):");
    if layout.runs.is_empty() {
        o.push_str(" none\n");
        return o;
    }
    o.push('\n');
    let mut segs = BTreeMap::new();
    mem.memseg_walk(|s| {
        segs.insert((s.list, s.slot), *s);
        std::ops::ControlFlow::<()>::Continue(())
    });
    let pa = layout.iova_mode == IovaMode::Pa;
    let mut cols = vec![
        ("list", true),
        ("node", true),
        ("pages", true),
        ("page", true),
        ("size", true),
        ("pinned", true),
        ("VA range", false),
    ];
    if pa {
        cols.push(("IOVA of first page", false));
    }
    let mut t = Table::new(&cols);
    for r in &layout.runs {
        let (pinned, pieces) = run_detail(&segs, r);
        let mut row = vec![
            r.list.to_string(),
            r.node.to_string(),
            r.count.to_string(),
            r.page_size.to_string(),
            format_size(r.len as u64),
            pinned.to_string(),
            fmt_range(r.va, r.len),
        ];
        if pa {
            let iova = mem
                .virt2iova(r.va)
                .map_or_else(|| "unknown".to_string(), |i| format!("{i:#x}"));
            let contig = match pieces {
                0 | 1 if r.count > 1 => "  (IOVA-contiguous)".to_string(),
                0 | 1 => String::new(),
                n => format!("  ({n} IOVA pieces)"),
            };
            row.push(format!("{iova}{contig}"));
        }
        t.row(row);
    }
    o.push_str(&t.render("  "));
    o
}

/// SIGINT and SIGTERM blocked for this (the only) thread, from before the
/// report is printed until the hold ends: someone who saw the report and
/// presses Ctrl-C gets a teardown, not a killed process. The old mask comes
/// back on drop.
struct HoldSignals {
    set: libc::sigset_t,
    old: libc::sigset_t,
}

impl HoldSignals {
    fn block() -> HoldSignals {
        // SAFETY: sigset_t is plain data (all-zero is a valid value, and
        // sigemptyset initialises it anyway); the libc calls get pointers to
        // these locals only. The mask changes only this thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, &raw mut old);
            HoldSignals { set, old }
        }
    }

    /// Waits `d`, or until SIGINT/SIGTERM arrives (or arrived since
    /// `block`), taken with `sigtimedwait`: no handler needed. True when
    /// interrupted.
    fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: pointers to an initialised set and timespec; no
            // siginfo wanted (null is allowed).
            let r = unsafe {
                libc::sigtimedwait(&raw const self.set, std::ptr::null_mut(), &raw const ts)
            };
            if r > 0 {
                return true;
            }
            // -1: EAGAIN (time is up, checked above) or EINTR (retry).
        }
    }
}

impl Drop for HoldSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const self.old, std::ptr::null_mut());
        }
    }
}

pub fn run(discovery: &Discovery, args: Args) -> Result<ExitCode, Error> {
    let req = Request::from_args(args)?;
    let opts = MemOptions::parse_args(&req.eal)?;
    let sys = discovery.roots().sys.clone();
    let free_before = free_hugepages(&sys);

    let started = Instant::now();
    let mem = Memory::init_with_roots(&opts, discovery.roots())?;
    let init = started.elapsed();

    let mut allocs = Vec::with_capacity(req.allocs.len());
    for spec in &req.allocs {
        // Default node: the first with a list of that size (else the first
        // node, and the library explains what exists).
        let node = spec.node.unwrap_or_else(|| {
            mem.lists()
                .iter()
                .find(|l| l.page_size == spec.size)
                .map(|l| l.node)
                .or_else(|| mem.topology().nodes().first().map(|n| n.id))
                .unwrap_or(0)
        });
        let t = Instant::now();
        let runs = mem.alloc_pages(&PageRequest::new(node, spec.size, spec.count))?;
        allocs.push(Alloced {
            spec,
            node,
            runs,
            took: t.elapsed(),
        });
    }

    let mut zones = Vec::with_capacity(req.zones.len());
    for z in &req.zones {
        zones.push(mem.memzone_reserve(
            &z.name,
            z.len,
            z.socket,
            memplane::memzone::MemzoneFlags::NONE,
        )?);
    }

    let mut rings = Vec::with_capacity(req.rings.len());
    for (name, count) in &req.rings {
        rings.push(
            memplane_ring::RawRing::create(
                &mem,
                name,
                8,
                *count,
                memplane::heap::SOCKET_ID_ANY,
                memplane_ring::RingConfig::MPMC,
            )
            .map_err(|e| match e {
                memplane_ring::ZoneRingError::Memory(m) => m,
                other => bad("--ring", name, other.to_string()),
            })?,
        );
    }

    let mut pools = Vec::with_capacity(req.mempools.len());
    if !req.mempools.is_empty() {
        memplane_mempool::register_thread(&mem).map_err(|e| mempool_err("", e))?;
    }
    for spec in &req.mempools {
        let mut cfg = memplane_mempool::MempoolConfig::new(spec.n, spec.elt_size)
            .cache_size(spec.cache_size)
            .stats(spec.stats);
        if let Some(h) = &spec.handler {
            cfg = cfg.handler(h);
        }
        let pool = memplane_mempool::Mempool::create(&mem, &spec.name, &cfg)
            .map_err(|e| mempool_err(&spec.name, e))?;
        // Cycle a cache's worth through this thread's cache: it keeps
        // `cache_size` objects, which `memplane info` then shows.
        let mut objs = vec![std::ptr::null_mut(); spec.cache_size.min(spec.n) as usize];
        pool.get_bulk(&mut objs)
            .and_then(|()| pool.put_bulk(&objs))
            .map_err(|e| mempool_err(&spec.name, e))?;
        pools.push(pool);
    }

    let layout = mem.layout();
    // Labels of the summary lines (and of the teardown lines) line up.
    let label_width = allocs
        .iter()
        .map(|a| "alloc ".len() + a.spec.text.len())
        .max()
        .unwrap_or(0)
        .max("reservation".len());
    let free_running = free_hugepages(&sys);
    let signals = req.hold.map(|_| HoldSignals::block());
    let mut stdout = std::io::stdout().lock();
    // Write errors (a closed pipe) end the output, not the teardown.
    if req.json {
        let pages = req.pages.then(|| {
            let mut v = Vec::new();
            mem.memseg_walk(|s| {
                v.push(*s);
                std::ops::ControlFlow::<()>::Continue(())
            });
            v
        });
        let report = Report {
            init_us: init.as_micros() as u64,
            layout: &layout,
            heaps: mem.heaps(),
            memzones: mem.memzone_dump_json(),
            pages,
        };
        let _ = writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        let _ = stdout.write_all(
            render_human(
                &mem,
                &layout,
                init,
                &allocs,
                &free_before,
                &free_running,
                label_width,
            )
            .as_bytes(),
        );
        if req.pages {
            let _ = writeln!(stdout, "\npages:");
            let _ = mem.dump(&mut stdout);
        }
    }
    let _ = stdout.flush();
    drop(stdout);

    // Human output on stdout; with --json, stdout holds only the JSON.
    // (A closed pipe must not stop the teardown: write errors are ignored.)
    let say = |line: &str| {
        let _ = if req.json {
            writeln!(std::io::stderr(), "{line}")
        } else {
            writeln!(std::io::stdout(), "{line}")
        };
    };
    if let (Some(d), Some(signals)) = (req.hold, signals) {
        say(&format!(
            "\nholding the instance for {} (pid {}): look at /proc/meminfo or \
             `memplane hugepages status` from another shell; Ctrl-C ends the wait",
            fmt_duration(d),
            std::process::id()
        ));
        if signals.wait(d) {
            say("interrupted: tearing down now");
        }
    }

    let started = Instant::now();
    // The zones go with the instance (no free: teardown takes everything).
    drop(pools);
    drop(rings);
    drop(zones);
    drop(mem);
    let teardown = started.elapsed();
    let free_after = free_hugepages(&sys);
    say(&format!(
        "\n  {:<label_width$}  {}",
        "teardown",
        fmt_duration(teardown)
    ));

    let missing: Vec<(PageSize, u64, u64)> = free_before
        .iter()
        .filter_map(|(&s, &b)| {
            let a = free_after.get(&s).copied().unwrap_or(0);
            (a < b).then_some((s, b, a))
        })
        .collect();
    if missing.is_empty() {
        if !free_before.is_empty() {
            say(&format!(
                "  {:<label_width$}  {} after teardown: all hugepages given back",
                "free pages",
                fmt_free(&free_after)
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    for (size, before, after) in &missing {
        eprintln!(
            "warning: HugePages_Free for {size} is {after} after teardown but was {before} before start: \
             {} page(s) not given back",
            before - after
        );
    }
    let hugetlbfs = layout.lists.iter().any(|l| {
        matches!(
            l.backing,
            memplane::memseg::store::BackingKind::HugetlbfsFilePerPage
                | memplane::memseg::store::BackingKind::HugetlbfsFilePerList
        )
    });
    if hugetlbfs && opts.effective_huge_unlink() == HugeUnlink::Never {
        eprintln!(
            "  --huge-unlink never keeps the page files (and their pages) for reuse; \
             free them with: memplane hugepages clear --prefix {}",
            opts.file_prefix
        );
    } else {
        eprintln!(
            "  another process may have taken them meanwhile; \
             `memplane hugepages status` shows who holds hugepages"
        );
    }
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_specs_parse_and_explain() {
        let a = parse_alloc("1G=1@0").unwrap();
        assert_eq!((a.size, a.count, a.node), (PageSize::SIZE_1G, 1, Some(0)));
        let a = parse_alloc("2M=4").unwrap();
        assert_eq!((a.size, a.count, a.node), (PageSize::SIZE_2M, 4, None));
        for (spec, why) in [
            ("2M=0", "a page count of 0"),
            ("3M=1", "not a page size"),
            ("2M=x", "'x' is not a page count"),
            ("2M", "no '='"),
            ("2M=1@a", "'a' is not a NUMA node"),
        ] {
            let e = parse_alloc(spec).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--alloc"), "{spec}: {e}");
        }
    }

    #[test]
    fn own_flags_come_out_of_the_eal_options() {
        let args = Args {
            json: false,
            pages: false,
            alloc: vec!["2M=1".into()],
            memzone: vec!["a=1M".into()],
            ring: vec![],
            mempool: vec!["p=100".into()],
            hold: None,
            options: [
                "--socket-mem",
                "8",
                "--memzone",
                "b=4K@0",
                "--mempool",
                "q=4095x64/256",
                "--json",
                "--alloc=1G=1@0",
                "--hold",
                "0.5",
                "--pages",
                "--file-prefix",
                "x",
            ]
            .map(String::from)
            .to_vec(),
        };
        let r = Request::from_args(args).unwrap();
        assert!(r.json && r.pages);
        assert_eq!(r.allocs.len(), 2);
        assert_eq!(
            r.zones,
            [
                ZoneSpec {
                    name: "a".into(),
                    len: 1 << 20,
                    socket: -1
                },
                ZoneSpec {
                    name: "b".into(),
                    len: 4096,
                    socket: 0
                }
            ]
        );
        assert_eq!(
            r.mempools,
            [
                PoolSpec {
                    name: "p".into(),
                    n: 100,
                    elt_size: 2048,
                    cache_size: 0,
                    handler: None,
                    stats: false
                },
                PoolSpec {
                    name: "q".into(),
                    n: 4095,
                    elt_size: 64,
                    cache_size: 256,
                    handler: None,
                    stats: false
                }
            ]
        );
        assert_eq!(r.hold, Some(Duration::from_millis(500)));
        assert_eq!(r.eal, ["--socket-mem", "8", "--file-prefix", "x"]);
        let args = Args {
            json: false,
            pages: false,
            alloc: vec![],
            memzone: vec![],
            ring: vec![],
            mempool: vec![],
            hold: None,
            options: vec!["--alloc".into()],
        };
        let e = Request::from_args(args).unwrap_err().to_string();
        assert!(e.contains("'--alloc' needs a value"), "{e}");
    }

    #[test]
    fn mempool_specs_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_mempool("rx=511X100").unwrap(),
            PoolSpec {
                name: "rx".into(),
                n: 511,
                elt_size: 100,
                cache_size: 0,
                handler: None,
                stats: false
            }
        );
        assert_eq!(
            parse_mempool("blk=4096x64/32@bucket+stats").unwrap(),
            PoolSpec {
                name: "blk".into(),
                n: 4096,
                elt_size: 64,
                cache_size: 32,
                handler: Some("bucket".into()),
                stats: true
            }
        );
        assert_eq!(
            parse_mempool("pkts=4095/256+stats").unwrap(),
            PoolSpec {
                name: "pkts".into(),
                n: 4095,
                elt_size: 2048,
                cache_size: 256,
                handler: None,
                stats: true
            }
        );
        for (spec, why) in [
            ("rx=10/8+leak", "'+leak' is not a pool option"),
            ("rx", "no '='"),
            ("rx=many", "'many' is not a number of objects"),
            ("rx=10x", "'' is not a number of bytes"),
            ("rx=10x64/-1", "'-1' is not a number of cached objects"),
            ("rx=10@", "no handler name after '@'"),
        ] {
            let e = parse_mempool(spec).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--mempool"), "{spec}: {e}");
        }
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&[("a", true), ("name", false), ("z", false)]);
        t.row(vec!["10".into(), "x".into(), "last".into()]);
        t.row(vec!["2".into(), "longer".into(), "l".into()]);
        assert_eq!(
            t.render(""),
            " a  name    z\n10  x       last\n 2  longer  l\n"
        );
    }
}
