//! Preflight: can this machine serve a memory request, and if not, why not
//! and what fixes it — decided before anything is mapped.
//!
//! DPDK finds out page by page while mapping, leaves the pages it got behind
//! and says "Not enough memory available on socket 0". Preflight instead
//! computes the whole footprint per (NUMA node, page size), compares it with
//! what is really usable — free pages, minus pages promised to others, within
//! cgroup and mount limits, for sizes that have a backing — and, when it falls
//! short, returns one [`PreflightError`] that says for each node what was
//! asked, what is free, where the rest went (not reserved, held by stale files
//! of another prefix, mapped by live processes, cut by a cgroup limit) and the
//! exact command that fixes it. Only page sizes relevant to the request are
//! mentioned.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use tracing::debug;

use crate::error::{Error, Result};
use crate::hugepages::files::{self, HugeFile};
use crate::hugepages::usage::{self};
use crate::hugepages::{memfd_supports, Discovery, HugepageSnapshot};
use crate::options::MemOptions;
use crate::units::{format_size, PageSize};

/// How memory will be backed; decides which page sizes are usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// hugetlb memfds (the default): any page size the kernel supports, no
    /// mount needed.
    Memfd,
    /// Files in this hugetlbfs directory (`--huge-dir`): only that mount's
    /// page size, within its `size=` limit.
    Hugetlbfs(PathBuf),
    /// Ordinary 4 KiB pages (`--no-huge`): no hugepage check at all.
    Anonymous,
}

/// Memory wanted on one node (or on any node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Demand {
    /// The node, or `None` for "any node, in order".
    pub node: Option<u32>,
    /// Bytes wanted.
    pub bytes: u64,
    /// Where the demand came from, for messages (`--socket-mem`, `-m`).
    pub origin: String,
}

/// A complete preflight request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    /// What must be preallocated.
    pub demands: Vec<Demand>,
    /// How memory will be backed.
    pub backing: Backing,
    /// Per page size caps in bytes (`--pagesz-mem`); 0 disables the size.
    pub size_caps: Vec<(PageSize, u64)>,
    /// Our own file prefix: its stale files are not "another prefix".
    pub own_prefix: String,
}

impl Request {
    /// The request implied by a set of options: `--socket-mem` per node,
    /// else `-m` on any node, else nothing preallocated (dynamic memory),
    /// which still needs at least one usable page size.
    pub fn from_options(opts: &MemOptions) -> Request {
        let mut demands = Vec::new();
        if let Some(per_node) = &opts.socket_mem {
            for (node, &bytes) in per_node.iter().enumerate() {
                if bytes > 0 {
                    demands.push(Demand {
                        node: Some(node as u32),
                        bytes,
                        origin: "--socket-mem".into(),
                    });
                }
            }
        } else if let Some(bytes) = opts.memory_size {
            if bytes > 0 {
                demands.push(Demand {
                    node: None,
                    bytes,
                    origin: "-m".into(),
                });
            }
        }
        let backing = if opts.no_huge {
            Backing::Anonymous
        } else if let Some(dir) = &opts.huge_dir {
            Backing::Hugetlbfs(dir.clone())
        } else {
            Backing::Memfd
        };
        Request {
            demands,
            backing,
            size_caps: opts.pagesz_mem.clone(),
            own_prefix: opts.file_prefix.clone(),
        }
    }
}

/// Pages to take of one size on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanEntry {
    /// NUMA node.
    pub node: u32,
    /// Page size.
    pub page_size: PageSize,
    /// Number of pages.
    pub pages: u64,
}

/// A request that can be served: which pages to take, and notes that do not
/// stop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Plan {
    /// Pages per node and size, largest sizes first.
    pub entries: Vec<PlanEntry>,
    /// Page sizes usable for later (dynamic) growth, largest first.
    pub usable_sizes: Vec<PageSize>,
    /// Things worth knowing that do not stop the request.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Total bytes the plan preallocates.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.pages * e.page_size.bytes())
            .sum()
    }
}

/// Why some pages of a size cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The pool of this size on this node is empty or too small.
    NotReserved {
        /// Pages in the pool on the node.
        total: u64,
    },
    /// Free pages already promised to other mappings (`resv_hugepages`).
    PromisedToOthers {
        /// Pages.
        pages: u64,
    },
    /// Pages held by files in a hugetlbfs mount.
    HeldByFiles {
        /// The file name prefix (`rte`, `spdk_pid42`), or `(other)`.
        prefix: String,
        /// The mount.
        mount: PathBuf,
        /// Pages held.
        pages: u64,
        /// Live processes holding them (empty: stale, safe to clear).
        holders: Vec<(u32, String)>,
    },
    /// Pages mapped by live processes (memfd, shm or files).
    MappedByProcess {
        /// Process id.
        pid: u32,
        /// Command name.
        comm: String,
        /// Pages.
        pages: u64,
    },
    /// The hugetlb cgroup limit caps this size.
    CgroupLimit {
        /// Limit in bytes.
        limit: u64,
        /// Usage in bytes, when known.
        usage: Option<u64>,
        /// The cgroup file.
        source: PathBuf,
    },
    /// The hugetlbfs mount is full (its `size=` limit).
    MountFull {
        /// The mount.
        mount: PathBuf,
        /// Bytes still free in it.
        free_bytes: u64,
    },
    /// `--pagesz-mem` caps or disables the size.
    CappedByOption {
        /// The cap in bytes.
        cap: u64,
    },
    /// No way to back pages of this size: no hugetlb memfd support and no
    /// mount.
    NoBacking,
}

/// What one page size on one node could give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SizeDiagnosis {
    /// The page size.
    pub page_size: PageSize,
    /// Pages in the pool on the node.
    pub total: u64,
    /// Free pages on the node.
    pub free: u64,
    /// Pages this request could take.
    pub usable: u64,
    /// Where the others went.
    pub reasons: Vec<Reason>,
}

/// One demand that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    /// The node (`None`: any node).
    pub node: Option<u32>,
    /// Bytes asked.
    pub asked: u64,
    /// Bytes that could be served.
    pub servable: u64,
    /// The option the demand came from.
    pub origin: String,
    /// Per relevant page size, what it could give and why not more.
    pub sizes: Vec<SizeDiagnosis>,
    /// Commands that fix it, in order.
    pub fixes: Vec<String>,
}

/// The request cannot be served; nothing was mapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct PreflightError {
    /// Every demand that falls short.
    pub shortfalls: Vec<Shortfall>,
}

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "not enough hugepage memory for this request (checked before mapping anything; nothing was changed)"
        )?;
        for s in &self.shortfalls {
            let place = s
                .node
                .map_or_else(|| "any node".to_string(), |n| format!("NUMA node {n}"));
            writeln!(
                f,
                "{place}: asked {} ({}), can serve {}, short {}",
                format_size(s.asked),
                s.origin,
                format_size(s.servable),
                format_size(s.asked - s.servable)
            )?;
            for d in &s.sizes {
                writeln!(
                    f,
                    "  {} pages: {} reserved, {} free, {} usable",
                    d.page_size, d.total, d.free, d.usable
                )?;
                for r in &d.reasons {
                    writeln!(f, "    - {}", describe(r, d.page_size))?;
                }
            }
            for fix in &s.fixes {
                writeln!(f, "  fix: {fix}")?;
            }
        }
        Ok(())
    }
}

fn describe(r: &Reason, size: PageSize) -> String {
    let b = |pages: u64| format_size(pages * size.bytes());
    match r {
        Reason::NotReserved { total } if *total == 0 => {
            format!("no {size} pages are reserved on this node")
        }
        Reason::NotReserved { total } => {
            format!("only {total} pages ({}) are reserved on this node", b(*total))
        }
        Reason::PromisedToOthers { pages } => format!(
            "{pages} free pages ({}) are promised to existing mappings (resv_hugepages)",
            b(*pages)
        ),
        Reason::HeldByFiles {
            prefix,
            mount,
            pages,
            holders,
        } => {
            let who = if holders.is_empty() {
                "stale: no live process holds them".to_string()
            } else {
                let v: Vec<String> = holders.iter().map(|(p, c)| format!("pid {p} ({c})")).collect();
                format!("in use by {}", v.join(", "))
            };
            format!(
                "{pages} pages ({}) are held by files of prefix '{prefix}' in {}: {who}",
                b(*pages),
                mount.display()
            )
        }
        Reason::MappedByProcess { pid, comm, pages } => {
            format!("{pages} pages ({}) are mapped by pid {pid} ({comm})", b(*pages))
        }
        Reason::CgroupLimit {
            limit,
            usage,
            source,
        } => format!(
            "the hugetlb cgroup limit {} allows {}{}",
            source.display(),
            format_size(*limit),
            usage.map(|u| format!(", {} already used", format_size(u))).unwrap_or_default()
        ),
        Reason::MountFull { mount, free_bytes } => format!(
            "the hugetlbfs mount {} has only {} left under its size= limit",
            mount.display(),
            format_size(*free_bytes)
        ),
        Reason::CappedByOption { cap } if *cap == 0 => {
            format!("--pagesz-mem {size}:0 disables this size")
        }
        Reason::CappedByOption { cap } => {
            format!("--pagesz-mem caps this size at {}", format_size(*cap))
        }
        Reason::NoBacking => format!(
            "this kernel cannot create {size} hugetlb memfds and no hugetlbfs of that size is mounted"
        ),
    }
}

/// Checks the request implied by `opts` against the machine.
pub fn check_options(opts: &MemOptions, discovery: &Discovery) -> Result<Plan> {
    check(&Request::from_options(opts), discovery)
}

/// Per-size pages still to be handed out during planning.
#[derive(Debug, Clone)]
struct SizeBudget {
    page_size: PageSize,
    /// Pages usable system-wide (free minus promised, plus unused
    /// overcommit), after cgroup, mount and option caps.
    global: u64,
    /// Pages usable per node (index = position in `snap.nodes`).
    per_node: Vec<u64>,
    /// Caps that cut this size below what the pool has, for diagnosis.
    caps: Vec<Reason>,
}

/// Checks a request against the machine. Reads only; maps nothing.
pub fn check(req: &Request, discovery: &Discovery) -> Result<Plan> {
    if req.backing == Backing::Anonymous {
        return Ok(Plan::default());
    }
    let snap = discovery.discover()?;
    for d in &req.demands {
        if let Some(n) = d.node {
            if !snap.nodes.contains(&n) {
                let nodes: Vec<String> = snap.nodes.iter().map(u32::to_string).collect();
                return Err(Error::NotFound {
                    what: format!(
                        "{} asks for {} on NUMA node {n}, but this machine has node(s) {} only; drop the entry for node {n} or set it to 0",
                        d.origin,
                        format_size(d.bytes),
                        nodes.join(", ")
                    ),
                });
            }
        }
    }
    let mut budgets = budgets(req, &snap)?;
    let mut plan = Plan {
        usable_sizes: budgets
            .iter()
            .filter(|b| b.global > 0)
            .map(|b| b.page_size)
            .collect(),
        ..Plan::default()
    };
    let mut short = Vec::new();
    // Node-bound demands first, so "any node" ones cannot starve them.
    let mut order: Vec<&Demand> = req.demands.iter().collect();
    order.sort_by_key(|d| d.node.is_none());
    for d in order {
        let served = serve(d, &snap, &mut budgets, &mut plan.entries);
        if served < d.bytes {
            short.push((d, served));
        }
    }
    if req.demands.is_empty() && plan.usable_sizes.is_empty() {
        short.push((&NO_DEMAND, 0));
    }
    if !short.is_empty() {
        let shortfalls = short
            .into_iter()
            .map(|(d, served)| diagnose(d, served, req, &snap, discovery))
            .collect();
        return Err(PreflightError { shortfalls }.into());
    }
    // root has CAP_IPC_LOCK, so memlock does not bind it.
    let memlock_binds = !rustix::process::geteuid().is_root();
    if let (true, Some(soft)) = (memlock_binds, snap.memlock.soft) {
        if plan.bytes() > soft {
            plan.warnings.push(format!(
                "RLIMIT_MEMLOCK is {} but {} will be preallocated: DMA mapping (VFIO) of all of it needs 'ulimit -l unlimited' or CAP_IPC_LOCK",
                format_size(soft),
                format_size(plan.bytes())
            ));
        }
    }
    debug!(?plan, "preflight passed");
    Ok(plan)
}

/// The implicit demand of a dynamic-memory start: one page of something.
static NO_DEMAND: Demand = Demand {
    node: None,
    bytes: 0,
    origin: String::new(),
};

fn budgets(req: &Request, snap: &HugepageSnapshot) -> Result<Vec<SizeBudget>> {
    let mount_size = match &req.backing {
        Backing::Hugetlbfs(dir) => {
            let mount = snap
                .mounts
                .iter()
                .filter(|m| dir.starts_with(&m.path))
                .max_by_key(|m| m.path.as_os_str().len())
                .ok_or_else(|| Error::NotFound {
                    what: format!(
                        "--huge-dir {} is not inside a hugetlbfs mount; mount one there (memplane hugepages mount {}) or drop --huge-dir to use memfd backing, which needs no mount",
                        dir.display(),
                        dir.display()
                    ),
                })?;
            Some((mount.page_size, mount.path.clone()))
        }
        _ => None,
    };
    let mut out = Vec::new();
    for s in &snap.sizes {
        let mut caps = Vec::new();
        let mut global = s.available();
        if let Some((size, _)) = &mount_size {
            if *size != s.page_size {
                continue;
            }
        } else if !memfd_supports(s.page_size) {
            caps.push(Reason::NoBacking);
            global = 0;
        }
        if let Some((_, path)) = &mount_size {
            if let Ok(st) = rustix::fs::statvfs(path) {
                // hugetlbfs reports f_blocks == 0 when it has no size= limit.
                if st.f_blocks > 0 {
                    let free_bytes = st.f_bavail * st.f_bsize;
                    let pages = free_bytes / s.page_size.bytes();
                    if pages < global {
                        caps.push(Reason::MountFull {
                            mount: path.clone(),
                            free_bytes,
                        });
                        global = pages;
                    }
                }
            }
        }
        if let Some(cg) = snap.cgroup_limit(s.page_size) {
            let limit = cg.limit.unwrap_or(u64::MAX);
            let left = limit.saturating_sub(cg.usage.unwrap_or(0)) / s.page_size.bytes();
            if left < global {
                caps.push(Reason::CgroupLimit {
                    limit,
                    usage: cg.usage,
                    source: cg.source.clone(),
                });
                global = left;
            }
        }
        if let Some(&(_, cap)) = req.size_caps.iter().rev().find(|(p, _)| *p == s.page_size) {
            let pages = cap / s.page_size.bytes();
            if pages < global || cap == 0 {
                caps.push(Reason::CappedByOption { cap });
                global = pages;
            }
        }
        let overcommit_left = s.overcommit.saturating_sub(s.surplus);
        let per_node = snap
            .nodes
            .iter()
            .map(|&n| {
                let node_free = snap.node_size(n, s.page_size).map_or(0, |i| i.free);
                (node_free.min(s.free.saturating_sub(s.reserved)) + overcommit_left).min(global)
            })
            .collect();
        out.push(SizeBudget {
            page_size: s.page_size,
            global,
            per_node,
            caps,
        });
    }
    // Largest first: fewer pages, fewer TLB misses (DPDK does the same).
    out.sort_by_key(|b| std::cmp::Reverse(b.page_size));
    Ok(out)
}

/// Serves one demand from the budgets, largest pages first, covering the
/// remainder with the smallest size that can. Returns the bytes served.
fn serve(
    d: &Demand,
    snap: &HugepageSnapshot,
    budgets: &mut [SizeBudget],
    plan: &mut Vec<PlanEntry>,
) -> u64 {
    let nodes: Vec<usize> = match d.node {
        Some(n) => snap
            .nodes
            .iter()
            .position(|&x| x == n)
            .into_iter()
            .collect(),
        None => (0..snap.nodes.len()).collect(),
    };
    let mut left = d.bytes;
    let mut take = |bi: usize, ni: usize, pages: u64, budgets: &mut [SizeBudget]| {
        let b = &mut budgets[bi];
        b.global -= pages;
        for (i, p) in b.per_node.iter_mut().enumerate() {
            // Global consumption lowers every node's ceiling.
            *p = if i == ni {
                *p - pages
            } else {
                (*p).min(b.global)
            };
        }
        let entry = PlanEntry {
            node: snap.nodes[ni],
            page_size: b.page_size,
            pages,
        };
        match plan
            .iter_mut()
            .find(|e| e.node == entry.node && e.page_size == entry.page_size)
        {
            Some(e) => e.pages += pages,
            None => plan.push(entry),
        }
    };
    for &ni in &nodes {
        for bi in 0..budgets.len() {
            let size = budgets[bi].page_size.bytes();
            let pages = (left / size).min(budgets[bi].per_node[ni]);
            if pages > 0 {
                take(bi, ni, pages, budgets);
                left -= pages * size;
            }
        }
    }
    if left > 0 {
        // The remainder is smaller than the smallest usable page taken so
        // far: round up with the smallest size that has room.
        'outer: for bi in (0..budgets.len()).rev() {
            let size = budgets[bi].page_size.bytes();
            let pages = left.div_ceil(size);
            for &ni in &nodes {
                if budgets[bi].per_node[ni] >= pages {
                    take(bi, ni, pages, budgets);
                    left = 0;
                    break 'outer;
                }
            }
        }
    }
    d.bytes - left
}

fn diagnose(
    d: &Demand,
    served: u64,
    req: &Request,
    snap: &HugepageSnapshot,
    discovery: &Discovery,
) -> Shortfall {
    let budgets = budgets(req, snap).unwrap_or_default();
    let files = files::scan_all(&snap.mounts, &discovery.roots().proc).unwrap_or_default();
    let users = usage::scan_processes(&discovery.roots().proc);
    let nodes: Vec<u32> = match d.node {
        Some(n) => vec![n],
        None => snap.nodes.clone(),
    };
    // The size a fix should reserve: the one the backing is bound to, else
    // the kernel's default.
    let fix_size = match &req.backing {
        Backing::Hugetlbfs(_) => budgets.first().map(|b| b.page_size),
        _ => snap.default_size(),
    }
    .or_else(|| snap.sizes.first().map(|s| s.page_size));
    let mut sizes = Vec::new();
    let mut stale_bytes = 0u64;
    let mut stale_prefixes: Vec<String> = Vec::new();
    for b in &budgets {
        let relevant = Some(b.page_size) == fix_size
            || snap
                .size(b.page_size)
                .is_some_and(|s| s.total > 0 || s.overcommit > 0);
        if !relevant {
            continue;
        }
        let info = snap.size(b.page_size);
        let (mut total, mut free) = (0, 0);
        for &n in &nodes {
            if let Some(i) = snap.node_size(n, b.page_size) {
                total += i.total;
                free += i.free;
            }
        }
        let mut reasons = Vec::new();
        if total == 0 || free == 0 || Some(b.page_size) == fix_size {
            reasons.push(Reason::NotReserved { total });
        }
        if let Some(i) = info {
            if i.reserved > 0 {
                reasons.push(Reason::PromisedToOthers { pages: i.reserved });
            }
        }
        for group in group_files(&files, b.page_size) {
            if let Reason::HeldByFiles {
                prefix,
                pages,
                holders,
                ..
            } = &group
            {
                if holders.is_empty() && *prefix != req.own_prefix {
                    stale_bytes += pages * b.page_size.bytes();
                    if !stale_prefixes.contains(prefix) {
                        stale_prefixes.push(prefix.clone());
                    }
                }
            }
            reasons.push(group);
        }
        for u in users.iter().filter(|u| u.page_size == b.page_size) {
            reasons.push(Reason::MappedByProcess {
                pid: u.pid,
                comm: u.comm.clone(),
                pages: u.bytes / b.page_size.bytes(),
            });
        }
        reasons.extend(b.caps.iter().cloned());
        let usable = nodes
            .iter()
            .filter_map(|n| snap.nodes.iter().position(|x| x == n))
            .map(|i| b.per_node[i])
            .sum::<u64>()
            .min(b.global);
        sizes.push(SizeDiagnosis {
            page_size: b.page_size,
            total,
            free,
            usable,
            reasons,
        });
    }
    let fixes = fixes(
        d,
        served,
        stale_bytes,
        &stale_prefixes,
        fix_size,
        &sizes,
        snap,
    );
    Shortfall {
        node: d.node,
        asked: d.bytes,
        servable: served,
        origin: if d.origin.is_empty() {
            "dynamic memory needs at least one usable hugepage".into()
        } else {
            d.origin.clone()
        },
        sizes,
        fixes,
    }
}

fn group_files(files: &[HugeFile], size: PageSize) -> Vec<Reason> {
    let mut out: Vec<Reason> = Vec::new();
    for f in files.iter().filter(|f| f.page_size == size && f.pages > 0) {
        let prefix = f.prefix.clone().unwrap_or_else(|| "(other)".into());
        let holders: Vec<(u32, String)> =
            f.holders.iter().map(|h| (h.pid, h.comm.clone())).collect();
        let existing = out.iter_mut().find(|r| {
            matches!(r, Reason::HeldByFiles { prefix: p, mount, .. } if *p == prefix && *mount == f.mount)
        });
        match existing {
            Some(Reason::HeldByFiles {
                pages, holders: h, ..
            }) => {
                *pages += f.pages;
                for x in holders {
                    if !h.contains(&x) {
                        h.push(x);
                    }
                }
            }
            _ => out.push(Reason::HeldByFiles {
                prefix,
                mount: f.mount.clone(),
                pages: f.pages,
                holders,
            }),
        }
    }
    out
}

fn fixes(
    d: &Demand,
    served: u64,
    stale_bytes: u64,
    stale_prefixes: &[String],
    fix_size: Option<PageSize>,
    sizes: &[SizeDiagnosis],
    snap: &HugepageSnapshot,
) -> Vec<String> {
    let mut out = Vec::new();
    let missing = d.bytes.saturating_sub(served).max(1);
    if stale_bytes > 0 {
        let cmd = match stale_prefixes {
            [p] => format!("memplane hugepages clear --prefix {p}"),
            _ => "memplane hugepages clear".to_string(),
        };
        out.push(format!(
            "{cmd}   (frees {} held by stale files)",
            format_size(stale_bytes)
        ));
    }
    for s in sizes {
        for r in &s.reasons {
            if let Reason::CgroupLimit { source, usage, .. } = r {
                let need = usage.unwrap_or(0) + d.bytes;
                out.push(format!(
                    "raise the cgroup limit: echo {need} > {}   (in Kubernetes: raise the pod's hugepages-{} limit)",
                    source.display(),
                    k8s_size(s.page_size)
                ));
            }
        }
    }
    let still_missing = missing.saturating_sub(stale_bytes);
    if still_missing > 0 {
        if let Some(size) = fix_size {
            let add = still_missing.div_ceil(size.bytes());
            let node_arg = match d.node {
                Some(n) if snap.nodes.len() > 1 => format!(" --node {n}"),
                _ => String::new(),
            };
            let current: u64 = match d.node {
                Some(n) if snap.nodes.len() > 1 => snap.node_size(n, size).map_or(0, |i| i.total),
                _ => snap.size(size).map_or(0, |i| i.total),
            };
            out.push(format!(
                "memplane hugepages reserve {size}={}{node_arg}   (as root; adds {add} pages of {size})",
                current + add
            ));
        } else {
            out.push(
                "this kernel has no hugepage support: rebuild it with CONFIG_HUGETLBFS, or run with --no-huge".into(),
            );
        }
    }
    out.push("or run without hugepages for tests: --no-huge".into());
    out
}

fn k8s_size(size: PageSize) -> String {
    let s = size.to_string();
    format!("{s}i")
}
