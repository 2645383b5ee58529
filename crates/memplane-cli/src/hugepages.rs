//! `memplane hugepages`: status, reserve, mount, clear.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use memplane::hugepages::files::{self, HugeFile};
use memplane::hugepages::reserve::{self, ReserveOutcome};
use memplane::hugepages::usage::{self, ProcessUsage};
use memplane::hugepages::{Discovery, HugepageSnapshot, PagemapAccess};
use memplane::units::{format_size, PageSize};
use memplane::Error;
use serde::Serialize;

/// Arguments of `memplane hugepages`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// With no action (status): print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Per size and node: total/free/reserved, mounts, cgroup limits, files
    /// left in mounts grouped by prefix, processes holding pages (default).
    Status {
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
    /// Set the pool of each page size: `reserve 2M=1024 1G=2 [--node N]`.
    Reserve {
        /// SIZE=COUNT pairs, e.g. 2M=1024 1G=2. COUNT is the pool size after
        /// the call (0 releases the pool).
        #[arg(required = true, value_name = "SIZE=COUNT")]
        pools: Vec<String>,
        /// Reserve on this NUMA node only (default: system-wide, the kernel
        /// spreads pages over nodes).
        #[arg(long)]
        node: Option<u32>,
    },
    /// Mount hugetlbfs (not needed for memplane's default memfd backing;
    /// needed for --huge-dir and for DPDK).
    Mount {
        /// Mount point (default /dev/hugepages for the default size,
        /// /dev/hugepages-SIZE, e.g. /dev/hugepages-1G, for others).
        dir: Option<PathBuf>,
        /// Page size of the mount (default: the kernel's default size).
        #[arg(long)]
        size: Option<String>,
    },
    /// Remove stale files (`*map_*`, no live holder) from hugetlbfs mounts;
    /// files a live process holds are never touched.
    Clear {
        /// Only files of this prefix (e.g. `rte`, `mp`).
        #[arg(long)]
        prefix: Option<String>,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(discovery: &Discovery, args: Args) -> Result<ExitCode, Error> {
    match args.action {
        None => status(discovery, args.json),
        Some(Action::Status { json }) => status(discovery, json || args.json),
        Some(Action::Reserve { pools, node }) => reserve(discovery, &pools, node),
        Some(Action::Mount { dir, size }) => mount(discovery, dir, size.as_deref()),
        Some(Action::Clear { prefix, dry_run }) => clear(discovery, prefix.as_deref(), dry_run),
    }
}

/// Everything `status --json` prints.
#[derive(Debug, Serialize)]
struct Status {
    #[serde(flatten)]
    snapshot: HugepageSnapshot,
    files: Vec<HugeFile>,
    processes: Vec<ProcessUsage>,
}

fn status(discovery: &Discovery, json: bool) -> Result<ExitCode, Error> {
    let snapshot = discovery.discover()?;
    let files = files::scan_all(&snapshot.mounts, &discovery.roots().proc)?;
    let processes = usage::scan_processes(&discovery.roots().proc);
    let st = Status {
        snapshot,
        files,
        processes,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&st).expect("status serializes")
        );
    } else {
        print!("{}", render_status(&st));
    }
    Ok(ExitCode::SUCCESS)
}

fn render_status(st: &Status) -> String {
    let s = &st.snapshot;
    let mut o = String::new();
    if s.sizes.is_empty() {
        o.push_str(
            "This kernel has no hugepage support (no /sys/kernel/mm/hugepages); use --no-huge.\n",
        );
        return o;
    }
    let _ = writeln!(
        o,
        "{:<6} {:<6} {:>8} {:>8} {:>9} {:>8} {:>10} {:>8}",
        "size", "node", "total", "free", "reserved", "surplus", "overcommit", "usable"
    );
    for size in &s.sizes {
        let _ = writeln!(
            o,
            "{:<6} {:<6} {:>8} {:>8} {:>9} {:>8} {:>10} {:>8}{}",
            size.page_size.to_string(),
            "all",
            size.total,
            size.free,
            size.reserved,
            size.surplus,
            size.overcommit,
            size.available(),
            if size.is_default {
                "   (default size)"
            } else {
                ""
            }
        );
        if s.nodes.len() > 1 {
            for n in s.per_node.iter().filter(|n| n.page_size == size.page_size) {
                let _ = writeln!(o, "{:<6} {:<6} {:>8} {:>8}", "", n.node, n.total, n.free);
            }
        }
    }
    o.push_str("\nhugetlbfs mounts:");
    if s.mounts.is_empty() {
        o.push_str(" none (memplane's default memfd backing needs none; DPDK and --huge-dir do: memplane hugepages mount)\n");
    } else {
        o.push('\n');
        for m in &s.mounts {
            let _ = writeln!(
                o,
                "  {}  {} pages  ({})",
                m.path.display(),
                m.page_size,
                m.options
            );
        }
    }
    o.push_str("cgroup hugetlb limits:");
    let limited: Vec<_> = s
        .cgroup_limits
        .iter()
        .filter(|c| c.limit.is_some())
        .collect();
    if limited.is_empty() {
        o.push_str(" none\n");
    } else {
        o.push('\n');
        for c in limited {
            let _ = writeln!(
                o,
                "  {}: {}{} ({})",
                c.page_size,
                format_size(c.limit.unwrap_or(0)),
                c.usage
                    .map(|u| format!(", {} used", format_size(u)))
                    .unwrap_or_default(),
                c.source.display()
            );
        }
    }
    let lim = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), format_size);
    let _ = writeln!(
        o,
        "memlock limit: {} soft, {} hard",
        lim(s.memlock.soft),
        lim(s.memlock.hard)
    );
    let _ = writeln!(
        o,
        "physical addresses: {}",
        match s.pagemap {
            PagemapAccess::PhysicalAddresses => "visible (IOVA as PA possible)",
            PagemapAccess::ZeroedFrames => "hidden (not root: IOVA as VA only)",
            PagemapAccess::Unreadable => "unreadable (IOVA as VA only)",
        }
    );
    o.push_str("\nfiles in hugetlbfs mounts:");
    let groups = files::group_by_prefix(&st.files);
    if groups.is_empty() {
        o.push_str(" none\n");
    } else {
        o.push('\n');
        for g in &groups {
            let holders: Vec<String> = g
                .holders
                .iter()
                .map(|h| format!("pid {} ({})", h.pid, h.comm))
                .collect();
            let prefix = g.prefix.as_deref().unwrap_or("(other)");
            let pages: Vec<String> = g
                .pages
                .iter()
                .map(|p| format!("{} x {}", p.pages, p.page_size))
                .collect();
            let state = if g.live {
                format!(
                    "in use by {}",
                    if holders.is_empty() {
                        "a live process".into()
                    } else {
                        holders.join(", ")
                    }
                )
            } else {
                format!("stale, no live holder: memplane hugepages clear --prefix {prefix}")
            };
            let _ = writeln!(
                o,
                "  prefix {:<14} {:>4} file(s) {:>12} {:>8}  {}",
                prefix,
                g.files.len(),
                pages.join(", "),
                format_size(g.bytes),
                state
            );
        }
    }
    o.push_str("processes holding hugepages:");
    if st.processes.is_empty() {
        o.push_str(" none\n");
    } else {
        o.push('\n');
        for p in &st.processes {
            let _ = writeln!(
                o,
                "  pid {:<8} {:<16} {} x {} ({})",
                p.pid,
                p.comm,
                p.bytes / p.page_size.bytes(),
                p.page_size,
                format_size(p.bytes)
            );
        }
    }
    o
}

/// Parses `2M=1024` pairs; every pair is checked before anything is written.
fn parse_pools(pools: &[String]) -> Result<Vec<(PageSize, u64)>, Error> {
    let mut out: Vec<(PageSize, u64)> = Vec::new();
    for p in pools {
        let bad = |why: String| Error::NotFound {
            what: format!("'{p}': {why}; expected SIZE=COUNT such as 2M=1024 or 1G=2"),
        };
        let (size, count) = p.split_once('=').ok_or_else(|| bad("no '='".into()))?;
        let size: PageSize = size.parse().map_err(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| {
            bad(format!(
                "'{count}' is not a page count (a whole number ≥ 0)"
            ))
        })?;
        if out.iter().any(|(s, _)| *s == size) {
            return Err(bad(format!("{size} is given twice")));
        }
        out.push((size, count));
    }
    Ok(out)
}

fn reserve(discovery: &Discovery, pools: &[String], node: Option<u32>) -> Result<ExitCode, Error> {
    let pools = parse_pools(pools)?;
    let snap = discovery.discover()?;
    for &(size, _) in &pools {
        reserve::check_target(&snap, size, node)?;
    }
    let mut complete = true;
    for (size, count) in pools {
        let out: ReserveOutcome = reserve::set_pool_size(discovery, size, node, count)?;
        let place = node.map_or_else(|| "system-wide".to_string(), |n| format!("on node {n}"));
        println!(
            "{size}: {} -> {} pages {place} (asked {})",
            out.before, out.granted, out.requested
        );
        if !out.is_complete() {
            complete = false;
            eprintln!(
                "warning: the kernel granted {} of {} {size} pages: memory is too fragmented or short. \
                 Free memory (echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory) and retry, \
                 or reserve at boot: hugepagesz={size} hugepages={}",
                out.granted, out.requested, out.requested
            );
        }
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn mount(
    discovery: &Discovery,
    dir: Option<PathBuf>,
    size: Option<&str>,
) -> Result<ExitCode, Error> {
    let snap = discovery.discover()?;
    let default = snap.default_size().ok_or_else(|| Error::NotFound {
        what: "this kernel has no hugepage support, so there is nothing to mount".into(),
    })?;
    let size = match size {
        Some(s) => s
            .parse::<PageSize>()
            .map_err(|what| Error::NotFound { what })?,
        None => default,
    };
    let dir = dir.unwrap_or_else(|| {
        if size == default {
            PathBuf::from("/dev/hugepages")
        } else {
            PathBuf::from(format!("/dev/hugepages-{size}"))
        }
    });
    if reserve::mount_hugetlbfs(discovery, &dir, size)? {
        println!("mounted hugetlbfs for {size} pages at {}", dir.display());
    } else {
        println!(
            "{} is already a hugetlbfs mount for {size} pages",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn clear(discovery: &Discovery, prefix: Option<&str>, dry_run: bool) -> Result<ExitCode, Error> {
    let snap = discovery.discover()?;
    let report = files::clear_stale(&snap.mounts, &discovery.roots().proc, prefix, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for p in &report.removed {
        println!("{verb} {}", p.path.display());
    }
    for f in &report.kept_in_use {
        let holders: Vec<String> = f
            .holders
            .iter()
            .map(|h| format!("pid {} ({})", h.pid, h.comm))
            .collect();
        println!(
            "kept {} (in use{})",
            f.path.display(),
            if holders.is_empty() {
                String::new()
            } else {
                format!(" by {}", holders.join(", "))
            }
        );
    }
    for p in &report.skipped_unknown {
        println!(
            "skipped {} (not a *map_* page file; remove it by hand if it is yours)",
            p.display()
        );
    }
    for f in &report.failed {
        println!("failed {}: {}", f.path.display(), f.error);
    }
    let freed: Vec<String> = report
        .pages_freed
        .iter()
        .map(|p| format!("{} x {}", p.pages, p.page_size))
        .collect();
    println!(
        "{verb} {} file(s) ({}); kept {} in use",
        report.removed.len(),
        if freed.is_empty() {
            "no pages".to_string()
        } else {
            freed.join(", ")
        },
        report.kept_in_use.len()
    );
    if !report.failed.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
