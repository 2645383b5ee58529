//! `memplane info`: attach to a running instance as a secondary and show
//! where its memory went — memory types, memsegs per node and page size,
//! heaps, memzones, rings, mempools — as tables or JSON (DPDK's `dpdk-proc-info`).
//!
//! The secondary only reads: it allocates nothing and detaches on exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use memplane::hugepages::Discovery;
use memplane::units::format_size;
use memplane::{Error, MemOptions, Memory};
use serde::Serialize;

use crate::memory::{fmt_range, heaps_and_zones, Table};

/// Arguments of `memplane info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// The instance's options: at least `--file-prefix` (and
    /// `--runtime-dir` if the primary used one).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "EAL_OPTIONS"
    )]
    options: Vec<String>,
}

/// Pages of one node and page size.
#[derive(Debug, Default, Clone, Serialize)]
struct MemsegSummary {
    node: u32,
    page_size: u64,
    pages: u64,
    bytes: u64,
    pinned: u64,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    prefix: String,
    primary_pid: u32,
    reader_pid: u32,
    /// The primary's `-n` / `-r` (0: not given; pools assume 4 x 1).
    memory_channels: u32,
    memory_ranks: u32,
    layout: memplane::MemoryLayout,
    memsegs: Vec<MemsegSummary>,
    heaps: Vec<memplane::heap::HeapInfo>,
    memzones: serde_json::Value,
    rings: Vec<memplane_ring::RingInfo>,
    mempools: Vec<PoolReport>,
}

/// One mempool: its snapshot, or why this process cannot open it (a user
/// handler the CLI does not have, memory private to its creator, ...).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum PoolReport {
    Open(Box<memplane_mempool::MempoolInfo>),
    Refused { name: String, error: String },
}

fn pool_reports(mem: &Memory) -> Vec<PoolReport> {
    let mut names = memplane_mempool::mempool_names(mem);
    names.sort();
    names
        .into_iter()
        .map(|name| match memplane_mempool::Mempool::lookup(mem, &name) {
            Ok(p) => PoolReport::Open(Box::new(p.info())),
            Err(e) => PoolReport::Refused {
                name,
                error: e.to_string(),
            },
        })
        .collect()
}

/// Runs `memplane info`.
pub fn run(discovery: &Discovery, args: &Args) -> Result<ExitCode, Error> {
    let (json, eal) = split_json(args);
    let mut all: Vec<&str> = eal.iter().map(String::as_str).collect();
    if !all.iter().any(|a| a.starts_with("--proc-type")) {
        all.extend(["--proc-type", "secondary"]);
    }
    let opts = MemOptions::parse_args(&all)?;
    let mem = Memory::init_with_roots(&opts, discovery.roots())?;
    let report = gather(&mem, &opts.file_prefix);
    let mut out = std::io::stdout().lock();
    let text = if json {
        serde_json::to_string_pretty(&report).expect("report serializes") + "\n"
    } else {
        render(&mem, &report)
    };
    // A closed pipe ends the output, not the detach.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

/// `--json` may come among the EAL options too.
fn split_json(args: &Args) -> (bool, Vec<String>) {
    let mut json = args.json;
    let mut eal = Vec::with_capacity(args.options.len());
    for a in &args.options {
        if a == "--json" {
            json = true;
        } else {
            eal.push(a.clone());
        }
    }
    (json, eal)
}

fn gather(mem: &Memory, prefix: &str) -> Report {
    let layout = mem.layout();
    let mut by_type: BTreeMap<(u32, u64), MemsegSummary> = BTreeMap::new();
    mem.memseg_walk(|s| {
        let page = s.len as u64;
        let e = by_type
            .entry((s.node, page))
            .or_insert_with(|| MemsegSummary {
                node: s.node,
                page_size: page,
                ..MemsegSummary::default()
            });
        e.pages += 1;
        e.bytes += page;
        e.pinned += u64::from(s.pinned);
        std::ops::ControlFlow::<()>::Continue(())
    });
    Report {
        prefix: prefix.to_string(),
        primary_pid: mem.primary_pid(),
        reader_pid: std::process::id(),
        memory_channels: mem.memory_channels(),
        memory_ranks: mem.memory_ranks(),
        layout,
        memsegs: by_type.into_values().collect(),
        heaps: mem.heaps(),
        memzones: mem.memzone_dump_json(),
        rings: memplane_ring::rings(mem),
        mempools: pool_reports(mem),
    }
}

fn render(mem: &Memory, r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "memplane info: prefix '{}', primary pid {}, read by pid {} (a secondary)",
        r.prefix, r.primary_pid, r.reader_pid
    );
    let _ = writeln!(
        o,
        "  address space {} ({}), IOVA mode {:?}, {} mapped",
        fmt_range(r.layout.base_va, r.layout.va_len),
        format_size(r.layout.va_len as u64),
        r.layout.iova_mode,
        format_size(r.layout.total_mapped)
    );
    let given = |v: u32, default: u32| {
        if v == 0 {
            format!("{default} (not given)")
        } else {
            v.to_string()
        }
    };
    let _ = writeln!(
        o,
        "  memory channels x ranks (-n/-r, mempool object spreading): {} x {}",
        given(r.memory_channels, 4),
        given(r.memory_ranks, 1)
    );

    let _ = writeln!(o, "\nmemory types (memseg lists):");
    let mut t = Table::new(&[
        ("list", true),
        ("node", true),
        ("page", true),
        ("used", true),
        ("capacity", true),
        ("pinned", true),
        ("backing", false),
        ("VA range", false),
    ]);
    for l in &r.layout.lists {
        t.row(vec![
            l.index.to_string(),
            l.node.to_string(),
            l.page_size.to_string(),
            l.used.to_string(),
            l.capacity.to_string(),
            l.pinned.to_string(),
            l.backing.as_str().to_string(),
            fmt_range(l.base_va, l.len),
        ]);
    }
    o.push_str(&t.render("  "));

    let _ = write!(o, "\nmemsegs by node and page size:");
    if r.memsegs.is_empty() {
        o.push_str(" none mapped\n");
    } else {
        o.push('\n');
        let mut t = Table::new(&[
            ("node", true),
            ("page", true),
            ("pages", true),
            ("bytes", true),
            ("pinned", true),
        ]);
        for m in &r.memsegs {
            t.row(vec![
                m.node.to_string(),
                format_size(m.page_size),
                m.pages.to_string(),
                format_size(m.bytes),
                m.pinned.to_string(),
            ]);
        }
        o.push_str(&t.render("  "));
    }

    o.push_str(&heaps_and_zones(mem, &r.heaps));

    let _ = write!(o, "\nrings:");
    if r.rings.is_empty() {
        o.push_str(" none\n");
    } else {
        o.push('\n');
        let mut t = Table::new(&[
            ("name", false),
            ("capacity", true),
            ("elem", true),
            ("count", true),
            ("producer", false),
            ("consumer", false),
        ]);
        for ring in &r.rings {
            t.row(vec![
                ring.name.clone(),
                ring.capacity.to_string(),
                ring.element_size.to_string(),
                ring.count.to_string(),
                ring.producer.clone(),
                ring.consumer.clone(),
            ]);
        }
        o.push_str(&t.render("  "));
    }
    o.push_str(&render_mempools(&r.mempools));
    o
}

fn render_mempools(pools: &[PoolReport]) -> String {
    let mut o = String::from("\nmempools:");
    if pools.is_empty() {
        o.push_str(" none\n");
        return o;
    }
    o.push('\n');
    let mut t = Table::new(&[
        ("name", false),
        ("handler", false),
        ("size", true),
        ("elt", true),
        ("obj", true),
        ("block", true),
        ("in use", true),
        ("avail", true),
        ("cache", true),
        ("memory", true),
        ("socket", true),
        ("cached (lcore:count)", false),
    ]);
    let mut refused = Vec::new();
    for p in pools {
        match p {
            PoolReport::Open(i) => {
                let memory: usize = i.memory_bytes;
                let caches = if i.cache_counts.is_empty() {
                    "-".to_string()
                } else {
                    i.cache_counts
                        .iter()
                        .map(|(l, c)| format!("{l}:{c}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                t.row(vec![
                    i.name.clone(),
                    i.handler.clone(),
                    i.size.to_string(),
                    i.elt_size.to_string(),
                    i.obj_size.total_size.to_string(),
                    i.contig_block_size
                        .map_or_else(|| "-".to_string(), |b| b.to_string()),
                    i.in_use.to_string(),
                    i.avail.to_string(),
                    i.cache_size.to_string(),
                    format_size(memory as u64),
                    if i.socket < 0 {
                        "any".to_string()
                    } else {
                        i.socket.to_string()
                    },
                    caches,
                ]);
            }
            PoolReport::Refused { name, error } => refused.push((name, error)),
        }
    }
    o.push_str(&t.render("  "));
    for (name, error) in refused {
        let _ = writeln!(o, "  {name}: cannot open from here: {error}");
    }
    o.push_str(&render_pool_stats(pools));
    o
}

/// The statistics of the pools that have them on: one row per lcore id
/// with counts ("-": threads without one), then the pool's total.
fn render_pool_stats(pools: &[PoolReport]) -> String {
    let with: Vec<&memplane_mempool::MempoolStats> = pools
        .iter()
        .filter_map(|p| match p {
            PoolReport::Open(i) => i.stats.as_ref(),
            PoolReport::Refused { .. } => None,
        })
        .collect();
    if with.is_empty() {
        return String::new();
    }
    let mut o = String::from(
        "\nmempool statistics (pools with statistics on; cp = common pool, the backend; blks = contiguous blocks):\n",
    );
    let mut t = Table::new(&[
        ("pool", false),
        ("lcore", true),
        ("puts", true),
        ("put objs", true),
        ("cp puts", true),
        ("cp put objs", true),
        ("cp gets", true),
        ("cp get objs", true),
        ("gets", true),
        ("get objs", true),
        ("failed gets", true),
        ("failed objs", true),
        ("blks", true),
        ("failed blks", true),
    ]);
    for st in with {
        let rows = st
            .lcores
            .iter()
            .map(|l| {
                (
                    l.lcore.map_or_else(|| "-".to_string(), |id| id.to_string()),
                    l.counters,
                )
            })
            .chain(std::iter::once(("all".to_string(), st.totals)));
        for (who, c) in rows {
            let mut cells = vec![st.pool.clone(), who];
            cells.extend(c.fields().iter().map(|(_, v)| v.to_string()));
            t.row(cells);
        }
    }
    o.push_str(&t.render("  "));
    o
}

/// The memory map of an instance this process belongs to (primary or
/// secondary), as `memplane info` shows it, without the reader line.
pub(crate) fn render_instance(mem: &Memory, prefix: &str) -> String {
    let text = render(mem, &gather(mem, prefix));
    text.split_once('\n')
        .map_or(text.clone(), |(_, rest)| rest.to_string())
}
