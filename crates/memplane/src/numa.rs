//! NUMA topology and memory placement.
//!
//! Two halves:
//!
//! - [`Topology`]: which nodes exist, their CPUs and memory, read from sysfs
//!   under a [`SystemRoots`] so tests can use fake trees. A kernel without
//!   NUMA sysfs is reported as a single node 0 holding every online CPU.
//! - Placement: [`PolicyGuard::bind_thread`] (the calling thread's policy,
//!   restored on drop), [`mbind_range`] (the policy of a range of mappings),
//!   [`node_of_address`] and [`current_cpu_and_node`].
//!
//! This is the crate's one audited module over raw `libc::syscall`:
//! `get_mempolicy`, `set_mempolicy`, `mbind` and `getcpu` are called here and
//! nowhere else. Each call goes through one small wrapper below whose
//! `// SAFETY:` comment names what the kernel reads and writes.
//!
//! # Node masks
//!
//! Masks are `[c_ulong; N]` holding [`MAX_NODES`] (1024) bits, the largest
//! `CONFIG_NODES_SHIFT` the kernel allows. The `maxnode` argument is passed
//! as `MAX_NODES + 1`: the kernel decrements it before use (a historic
//! off-by-one every libnuma caller reproduces), so this makes it read and
//! write exactly the 1024 bits we own.
//!
//! # Kernels without NUMA
//!
//! A kernel built without `CONFIG_NUMA` fails these calls with `ENOSYS`; a
//! container's seccomp filter (Docker's default without `CAP_SYS_NICE`)
//! fails them with `EPERM`. Both mean "one node, no policy": binding to
//! node 0 then yields a no-op [`PolicyGuard`] (see
//! [`PolicyGuard::noop_reason`]), [`mbind_range`] on node 0 does nothing, and
//! [`node_of_address`] answers `None` ("the kernel cannot tell"). `EPERM` is
//! only treated this way when sysfs shows a single online node; on a
//! multi-node machine it is an error, since silently ignoring placement there
//! would be a lie.
//!
//! # Hugetlb placement
//!
//! A hugepage's node is chosen when it is allocated: at the first fault for
//! a mapping, or at `fallocate` for a memfd / hugetlbfs file. `fallocate` has
//! no mapping, so it follows the *calling thread's* policy: wrap it in
//! [`PolicyGuard::bind_thread`]. [`mbind_range`] only steers pages faulted
//! through that mapping later (and, when strict, migrates ones already
//! mapped).

use std::fmt;
use std::fs;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use libc::{c_int, c_uint, c_ulong};
use serde::Serialize;

use crate::hugepages::SystemRoots;

/// The number of node ids a node mask can hold (the kernel's largest
/// `MAX_NUMNODES`). Node ids at or above this do not exist.
pub const MAX_NODES: u32 = 1024;

const WORD_BITS: usize = c_ulong::BITS as usize;
const MASK_WORDS: usize = MAX_NODES as usize / WORD_BITS;
/// `maxnode` for the syscalls: the kernel uses `maxnode - 1` bits.
const MAXNODE_ARG: c_ulong = MAX_NODES as c_ulong + 1;

// <linux/mempolicy.h>; libc has the modes but not these flags.
const MPOL_F_NODE: c_ulong = 1 << 0;
const MPOL_F_ADDR: c_ulong = 1 << 1;
const MPOL_F_MEMS_ALLOWED: c_ulong = 1 << 2;
const MPOL_MF_STRICT: c_uint = 1 << 0;
const MPOL_MF_MOVE: c_uint = 1 << 1;
const MPOL_PREFERRED_MANY: c_int = 5;
const MPOL_WEIGHTED_INTERLEAVE: c_int = 6;
/// Mode flags the kernel ORs into the mode `get_mempolicy` returns.
const MPOL_MODE_FLAGS: c_int =
    libc::MPOL_F_STATIC_NODES | libc::MPOL_F_RELATIVE_NODES | libc::MPOL_F_NUMA_BALANCING;

/// Node ids above which a cpulist or node list is rejected as garbage (far
/// above any kernel's `NR_CPUS`), so a corrupt file cannot make us allocate
/// gigabytes.
const MAX_LIST_ID: u32 = 1 << 20;

/// Errors from topology discovery and placement.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// The node does not exist, or has no memory this process may use.
    #[error(
        "NUMA node {node} does not exist or has no memory this process may use; \
         usable nodes: {}",
        NodeList(nodes)
    )]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes that can be used.
        nodes: Vec<u32>,
    },
    /// A NUMA system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// The call, with the flags that matter.
        call: &'static str,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// A sysfs or procfs file did not have the expected format.
    #[error("cannot parse {}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A sysfs or procfs file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Formats node ids as `0, 1, 3` (or `none`).
struct NodeList<'a>(&'a [u32]);

impl fmt::Display for NodeList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Topology

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: u32,
    /// CPUs of this node, ascending (empty for a memory-only node).
    pub cpus: Vec<u32>,
    /// Memory of this node in bytes (`MemTotal`).
    pub mem_total: u64,
}

/// The machine's NUMA nodes, with their CPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    nodes: Vec<NodeInfo>,
    numa_sysfs: bool,
}

impl Topology {
    /// Reads the topology below `roots`.
    ///
    /// Nodes are those listed in `<sys>/devices/system/node/online`, or, when
    /// that file is missing, the `node<N>` directories there. Each node's
    /// CPUs come from `node<N>/cpulist` and its memory from `node<N>/meminfo`.
    /// Without any node directory (a kernel without NUMA) the result is one
    /// node 0 with the CPUs of `<sys>/devices/system/cpu/online` and the
    /// `MemTotal` of `<proc>/meminfo`.
    pub fn discover(roots: &SystemRoots) -> Result<Topology, NumaError> {
        let node_dir = roots.sys.join("devices/system/node");
        let ids = node_ids(&node_dir)?;
        if ids.is_empty() {
            let cpu_online = roots.sys.join("devices/system/cpu/online");
            let cpus = read_list(&cpu_online)?;
            let mem_total = read_mem_total(&roots.proc.join("meminfo"))?;
            return Ok(Topology {
                nodes: vec![NodeInfo {
                    id: 0,
                    cpus,
                    mem_total,
                }],
                numa_sysfs: false,
            });
        }
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let dir = node_dir.join(format!("node{id}"));
            nodes.push(NodeInfo {
                id,
                cpus: read_list(&dir.join("cpulist"))?,
                mem_total: read_mem_total(&dir.join("meminfo"))?,
            });
        }
        Ok(Topology {
            nodes,
            numa_sysfs: true,
        })
    }

    /// The nodes, by ascending id (never empty).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The node ids, ascending.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// One node, if it exists.
    pub fn node(&self, id: u32) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node a CPU belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.binary_search(&cpu).is_ok())
            .map(|n| n.id)
    }

    /// Whether a node exists.
    pub fn contains(&self, node: u32) -> bool {
        self.node(node).is_some()
    }

    /// Whether the kernel exposed NUMA sysfs; `false` means the single node
    /// was synthesized from the online CPUs and `/proc/meminfo`.
    pub fn numa_sysfs(&self) -> bool {
        self.numa_sysfs
    }
}

/// Online node ids under `dir` (`devices/system/node`); empty when the
/// kernel has no NUMA sysfs.
fn node_ids(dir: &Path) -> Result<Vec<u32>, NumaError> {
    let online = dir.join("online");
    match fs::read_to_string(&online) {
        Ok(text) => {
            return parse_cpulist(&text).map_err(|detail| NumaError::Parse {
                path: online,
                detail,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NumaError::Io {
                path: online,
                source,
            })
        }
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NumaError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NumaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        if let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn read_text(path: &Path) -> Result<String, NumaError> {
    fs::read_to_string(path).map_err(|source| NumaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_list(path: &Path) -> Result<Vec<u32>, NumaError> {
    parse_cpulist(&read_text(path)?).map_err(|detail| NumaError::Parse {
        path: path.to_path_buf(),
        detail,
    })
}

/// `MemTotal` in bytes from `/proc/meminfo` (`MemTotal: X kB`) or a node's
/// `meminfo` (`Node N MemTotal: X kB`).
fn read_mem_total(path: &Path) -> Result<u64, NumaError> {
    let text = read_text(path)?;
    let err = |detail: &str| NumaError::Parse {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if !words.by_ref().any(|w| w == "MemTotal:") {
            continue;
        }
        let value = words
            .next()
            .ok_or_else(|| err("MemTotal without a value"))?;
        let kib: u64 = value
            .parse()
            .map_err(|_| err(&format!("MemTotal value {value:?} is not a number")))?;
        return match words.next() {
            Some("kB") => kib
                .checked_mul(1024)
                .ok_or_else(|| err("MemTotal overflows 64 bits")),
            other => Err(err(&format!("MemTotal unit is {other:?}, expected \"kB\""))),
        };
    }
    Err(err("no MemTotal line"))
}

/// Parses a kernel id list such as `0-3,8,10-11` (sysfs `cpulist`, `online`)
/// into ascending, de-duplicated ids. An empty or blank list gives no ids.
fn parse_cpulist(text: &str) -> Result<Vec<u32>, String> {
    let text = text.trim();
    let mut ids = Vec::new();
    if text.is_empty() {
        return Ok(ids);
    }
    let id = |s: &str| -> Result<u32, String> {
        let v: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an id in list {text:?}"))?;
        if v >= MAX_LIST_ID {
            return Err(format!("id {v} in list {text:?} is implausibly large"));
        }
        Ok(v)
    };
    for part in text.split(',') {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (id(lo)?, id(hi)?);
                if lo > hi {
                    return Err(format!("range {part:?} in list {text:?} is reversed"));
                }
                ids.extend(lo..=hi);
            }
            None => ids.push(id(part)?),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

// ---------------------------------------------------------------------------
// Node masks and the raw calls

#[derive(Clone, Copy, PartialEq, Eq)]
struct NodeMask([c_ulong; MASK_WORDS]);

impl NodeMask {
    const fn empty() -> Self {
        NodeMask([0; MASK_WORDS])
    }

    /// A mask with one node; `None` when the id does not fit.
    fn single(node: u32) -> Option<Self> {
        let mut m = Self::empty();
        let i = node as usize;
        *m.0.get_mut(i / WORD_BITS)? |= 1 << (i % WORD_BITS);
        Some(m)
    }

    fn contains(&self, node: u32) -> bool {
        let i = node as usize;
        self.0
            .get(i / WORD_BITS)
            .is_some_and(|w| w >> (i % WORD_BITS) & 1 == 1)
    }

    fn to_vec(self) -> Vec<u32> {
        (0..MAX_NODES).filter(|&n| self.contains(n)).collect()
    }
}

fn last_error(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `get_mempolicy(&mode, mask, maxnode, addr, flags)`; returns `mode`.
fn sys_get_mempolicy(
    mask: Option<&mut NodeMask>,
    addr: usize,
    flags: c_ulong,
) -> io::Result<c_int> {
    let mut mode: c_int = 0;
    let (mask_ptr, maxnode) = match mask {
        Some(m) => (m.0.as_mut_ptr(), MAXNODE_ARG),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: `mode` is a live, writable c_int. `mask_ptr` is null with
    // maxnode 0, or points to MASK_WORDS writable words, and with maxnode =
    // MAX_NODES + 1 the kernel writes at most MAX_NODES bits = MASK_WORDS
    // words. `addr` is only a lookup key for the kernel (with MPOL_F_ADDR),
    // never dereferenced by us; a bad address yields EFAULT, not UB.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &raw mut mode,
            mask_ptr,
            maxnode,
            addr as c_ulong,
            flags,
        )
    };
    last_error(rc).map(|_| mode)
}

/// `set_mempolicy(mode, mask, maxnode)` for the calling thread.
fn sys_set_mempolicy(mode: c_int, mask: &NodeMask) -> io::Result<()> {
    // SAFETY: the kernel reads maxnode - 1 = MAX_NODES bits = MASK_WORDS
    // words from `mask`, which we own for the whole call; it writes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, mask.0.as_ptr(), MAXNODE_ARG) };
    last_error(rc).map(|_| ())
}

/// `mbind(addr, len, mode, mask, maxnode, flags)`.
fn sys_mbind(
    addr: usize,
    len: usize,
    mode: c_int,
    mask: &NodeMask,
    flags: c_uint,
) -> io::Result<()> {
    // SAFETY: the kernel reads MASK_WORDS words from `mask`, which we own.
    // `addr`/`len` name mappings whose policy changes; the kernel validates
    // them (EINVAL/EFAULT) and never exposes or frees memory through mbind,
    // and migration (MPOL_MF_MOVE) keeps contents and virtual addresses, so
    // no Rust reference can be invalidated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as c_ulong,
            len as c_ulong,
            mode,
            mask.0.as_ptr(),
            MAXNODE_ARG,
            flags,
        )
    };
    last_error(rc).map(|_| ())
}

/// `getcpu(&cpu, &node, NULL)`.
fn sys_getcpu() -> io::Result<(u32, u32)> {
    let mut cpu: c_uint = 0;
    let mut node: c_uint = 0;
    // SAFETY: both pointers are to live, writable c_uints; the third argument
    // (the unused tcache) may be null.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &raw mut cpu,
            &raw mut node,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    last_error(rc).map(|_| (cpu, node))
}

/// Whether NUMA policy calls work, and if so which nodes may be used.
enum Support {
    /// The thread's allowed memory nodes (`MPOL_F_MEMS_ALLOWED`).
    Numa(NodeMask),
    /// No NUMA policy here; the machine has one node. The reason.
    Single(&'static str),
}

const NO_NUMA_KERNEL: &str = "the kernel has no NUMA support (ENOSYS)";
const NUMA_FILTERED: &str =
    "NUMA policy calls are not permitted (EPERM, e.g. a seccomp filter) on a single-node machine";

/// Maps an error of a policy call to "single node, no policy" when that is
/// what it means.
fn unsupported(err: &io::Error) -> Option<&'static str> {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => Some(NO_NUMA_KERNEL),
        Some(libc::EPERM) if real_online_nodes() <= 1 => Some(NUMA_FILTERED),
        _ => None,
    }
}

/// Online node count of the real machine (1 without NUMA sysfs).
fn real_online_nodes() -> usize {
    fs::read_to_string("/sys/devices/system/node/online")
        .ok()
        .and_then(|t| parse_cpulist(&t).ok())
        .map_or(1, |v| v.len().max(1))
}

fn support() -> Result<Support, NumaError> {
    let mut allowed = NodeMask::empty();
    match sys_get_mempolicy(Some(&mut allowed), 0, MPOL_F_MEMS_ALLOWED) {
        Ok(_) => Ok(Support::Numa(allowed)),
        Err(e) => match unsupported(&e) {
            Some(reason) => Ok(Support::Single(reason)),
            None => Err(NumaError::Syscall {
                call: "get_mempolicy(MPOL_F_MEMS_ALLOWED)",
                source: e,
            }),
        },
    }
}

/// Checks that `node` may be used. `Ok(Some(reason))`: node 0 on a machine
/// without NUMA policy, where placing is a no-op.
fn check_node(node: u32) -> Result<Option<&'static str>, NumaError> {
    match support()? {
        Support::Numa(allowed) if allowed.contains(node) => Ok(None),
        Support::Numa(allowed) => Err(NumaError::NoSuchNode {
            node,
            nodes: allowed.to_vec(),
        }),
        Support::Single(reason) if node == 0 => Ok(Some(reason)),
        Support::Single(_) => Err(NumaError::NoSuchNode {
            node,
            nodes: vec![0],
        }),
    }
}

// ---------------------------------------------------------------------------
// Policies

/// A memory policy mode (`MPOL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// `MPOL_DEFAULT`: allocate on the node of the CPU that faults.
    Default,
    /// `MPOL_PREFERRED`: try the node, fall back to others.
    Preferred,
    /// `MPOL_BIND`: only the given nodes.
    Bind,
    /// `MPOL_INTERLEAVE`: round-robin over the nodes.
    Interleave,
    /// `MPOL_LOCAL`: the faulting CPU's node.
    Local,
    /// `MPOL_PREFERRED_MANY`: try any of the nodes, fall back to others.
    PreferredMany,
    /// `MPOL_WEIGHTED_INTERLEAVE`: weighted round-robin.
    WeightedInterleave,
    /// A mode this library does not know.
    Other(i32),
}

impl PolicyMode {
    fn from_raw(mode: c_int) -> Self {
        match mode {
            libc::MPOL_DEFAULT => PolicyMode::Default,
            libc::MPOL_PREFERRED => PolicyMode::Preferred,
            libc::MPOL_BIND => PolicyMode::Bind,
            libc::MPOL_INTERLEAVE => PolicyMode::Interleave,
            libc::MPOL_LOCAL => PolicyMode::Local,
            MPOL_PREFERRED_MANY => PolicyMode::PreferredMany,
            MPOL_WEIGHTED_INTERLEAVE => PolicyMode::WeightedInterleave,
            other => PolicyMode::Other(other),
        }
    }
}

/// A thread's memory policy, as `get_mempolicy` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemPolicy {
    /// The mode.
    pub mode: PolicyMode,
    /// Mode flags (`MPOL_F_STATIC_NODES`, `MPOL_F_RELATIVE_NODES`,
    /// `MPOL_F_NUMA_BALANCING`), raw.
    pub flags: i32,
    /// The policy's nodes (empty for default and local).
    pub nodes: Vec<u32>,
}

/// The calling thread's memory policy; `None` when the kernel has no NUMA
/// policy (see the module docs).
pub fn current_policy() -> Result<Option<MemPolicy>, NumaError> {
    let mut mask = NodeMask::empty();
    match sys_get_mempolicy(Some(&mut mask), 0, 0) {
        Ok(raw) => Ok(Some(MemPolicy {
            mode: PolicyMode::from_raw(raw & !MPOL_MODE_FLAGS),
            flags: raw & MPOL_MODE_FLAGS,
            nodes: mask.to_vec(),
        })),
        Err(e) if unsupported(&e).is_some() => Ok(None),
        Err(source) => Err(NumaError::Syscall {
            call: "get_mempolicy",
            source,
        }),
    }
}

/// The calling thread's policy, raw, for restoring.
#[derive(Clone, Copy)]
struct SavedPolicy {
    mode: c_int,
    mask: NodeMask,
}

enum GuardState {
    Applied(SavedPolicy),
    NoOp(&'static str),
    Restored,
}

/// Binds the calling thread's memory allocations to one node until dropped,
/// then restores the policy the thread had before.
///
/// The policy is per thread, so the guard is neither `Send` nor `Sync`: it
/// must be dropped on the thread that created it. Guards nest; drop them in
/// reverse order of creation (as scopes do).
///
/// ```no_run
/// # fn main() -> Result<(), memplane::numa::NumaError> {
/// let guard = memplane::numa::PolicyGuard::bind_thread(0, true)?;
/// // fallocate / fault hugepages here: they come from node 0.
/// drop(guard);
/// # Ok(()) }
/// ```
pub struct PolicyGuard {
    node: u32,
    strict: bool,
    state: GuardState,
    _not_send: PhantomData<*const ()>,
}

impl PolicyGuard {
    /// Sets the calling thread's policy to `node` alone: `MPOL_BIND` when
    /// `strict` (allocations fail rather than use another node), else
    /// `MPOL_PREFERRED` (other nodes when `node` runs out). The previous
    /// policy (mode, mode flags and nodes) is saved first and restored on
    /// drop.
    ///
    /// `node` must be in the thread's allowed memory nodes (cpuset
    /// `mems_allowed`); otherwise [`NumaError::NoSuchNode`] lists the usable
    /// ones and the policy is left untouched. Without NUMA policy support
    /// (module docs), node 0 gives a no-op guard.
    ///
    /// Single-node machines with working policy calls do get the policy set:
    /// it changes nothing about placement there but keeps one code path.
    pub fn bind_thread(node: u32, strict: bool) -> Result<PolicyGuard, NumaError> {
        let guard = |state| PolicyGuard {
            node,
            strict,
            state,
            _not_send: PhantomData,
        };
        if let Some(reason) = check_node(node)? {
            tracing::debug!(node, reason, "NUMA thread binding is a no-op");
            return Ok(guard(GuardState::NoOp(reason)));
        }
        let mut mask = NodeMask::empty();
        let mode =
            sys_get_mempolicy(Some(&mut mask), 0, 0).map_err(|source| NumaError::Syscall {
                call: "get_mempolicy",
                source,
            })?;
        let saved = SavedPolicy { mode, mask };
        let new_mode = if strict {
            libc::MPOL_BIND
        } else {
            libc::MPOL_PREFERRED
        };
        let target = NodeMask::single(node).ok_or_else(|| NumaError::NoSuchNode {
            node,
            nodes: Vec::new(),
        })?;
        sys_set_mempolicy(new_mode, &target).map_err(|source| NumaError::Syscall {
            call: if strict {
                "set_mempolicy(MPOL_BIND)"
            } else {
                "set_mempolicy(MPOL_PREFERRED)"
            },
            source,
        })?;
        Ok(guard(GuardState::Applied(saved)))
    }

    /// The node this guard binds to.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// Whether the binding is strict (`MPOL_BIND`).
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Whether the guard changed nothing (no NUMA policy on this system).
    pub fn is_noop(&self) -> bool {
        matches!(self.state, GuardState::NoOp(_))
    }

    /// Why the guard is a no-op, if it is.
    pub fn noop_reason(&self) -> Option<&'static str> {
        match self.state {
            GuardState::NoOp(reason) => Some(reason),
            _ => None,
        }
    }

    /// Restores the previous policy now, reporting failure (dropping the
    /// guard does the same but can only log a failure).
    pub fn restore(mut self) -> Result<(), NumaError> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> Result<(), NumaError> {
        match std::mem::replace(&mut self.state, GuardState::Restored) {
            GuardState::Applied(saved) => {
                sys_set_mempolicy(saved.mode, &saved.mask).map_err(|source| NumaError::Syscall {
                    call: "set_mempolicy (restoring the previous policy)",
                    source,
                })
            }
            GuardState::NoOp(_) | GuardState::Restored => Ok(()),
        }
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            tracing::warn!(node = self.node, error = %e, "could not restore the thread's memory policy");
        }
    }
}

impl fmt::Debug for PolicyGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyGuard")
            .field("node", &self.node)
            .field("strict", &self.strict)
            .field("noop_reason", &self.noop_reason())
            .finish_non_exhaustive()
    }
}

/// Sets the memory policy of the mappings in `[addr, addr + len)` to `node`.
///
/// - `strict`: `MPOL_BIND` with `MPOL_MF_MOVE | MPOL_MF_STRICT`. Pages
///   faulted later come only from `node`; pages already mapped only by this
///   process are migrated there, and if any page in the range stays on
///   another node (shared with another process, or not movable) the call
///   fails with `EIO`. So success means every present page is on `node`.
/// - not `strict`: `MPOL_PREFERRED` with no flags: later faults prefer
///   `node`; present pages are neither checked nor moved.
///
/// `addr` must be page aligned (hugepage aligned for a hugetlb mapping, whose
/// VMA the kernel may have to split) and the range mapped, else the kernel
/// answers `EINVAL`/`EFAULT`. For memfd or hugetlbfs pages allocated by
/// `fallocate`, placement was decided by the thread's policy at that time;
/// use [`PolicyGuard::bind_thread`] around the `fallocate` instead.
///
/// Without NUMA policy support (module docs), node 0 is a no-op.
pub fn mbind_range(addr: usize, len: usize, node: u32, strict: bool) -> Result<(), NumaError> {
    if check_node(node)?.is_some() {
        return Ok(());
    }
    let mask = NodeMask::single(node).ok_or_else(|| NumaError::NoSuchNode {
        node,
        nodes: Vec::new(),
    })?;
    let (mode, flags, call) = if strict {
        (
            libc::MPOL_BIND,
            MPOL_MF_MOVE | MPOL_MF_STRICT,
            "mbind(MPOL_BIND, MPOL_MF_MOVE|MPOL_MF_STRICT)",
        )
    } else {
        (libc::MPOL_PREFERRED, 0, "mbind(MPOL_PREFERRED)")
    };
    sys_mbind(addr, len, mode, &mask, flags).map_err(|source| NumaError::Syscall { call, source })
}

/// The node of the page backing `addr`
/// (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`).
///
/// Call it on memory that has been touched. The kernel looks the page up
/// with get_user_pages, which *faults in* a missing page for reading: for
/// private anonymous memory that maps the shared zero page (whose node says
/// nothing about where a later write lands), for a hugetlb mapping it
/// allocates a hugepage under the current policy. An unmapped address is an
/// error (`EFAULT`).
///
/// `Ok(None)` means the kernel cannot tell: it has no NUMA policy support
/// (module docs). It does not mean node 0, although that is then the only
/// node.
pub fn node_of_address(addr: usize) -> Result<Option<u32>, NumaError> {
    match sys_get_mempolicy(None, addr, MPOL_F_NODE | MPOL_F_ADDR) {
        Ok(node) => Ok(Some(node as u32)),
        Err(e) if unsupported(&e).is_some() => Ok(None),
        Err(source) => Err(NumaError::Syscall {
            call: "get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR)",
            source,
        }),
    }
}

/// The CPU the calling thread runs on and that CPU's node (`getcpu`). The
/// answer may be stale as soon as it returns unless the thread is pinned.
/// Should `getcpu` fail (it cannot on Linux since 2.6.19), the CPU comes
/// from `sched_getcpu` and the node is 0.
pub fn current_cpu_and_node() -> (u32, u32) {
    sys_getcpu().unwrap_or_else(|_| (rustix::thread::sched_getcpu() as u32, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("5").unwrap(), vec![5]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist(" \n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist("3,1-2,2").unwrap(), vec![1, 2, 3]);
        for bad in [
            "x",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            "1-2-3",
            "0-4294967295",
            "99999999",
        ] {
            assert!(parse_cpulist(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn node_masks() {
        let m = NodeMask::single(65).unwrap();
        assert!(m.contains(65) && !m.contains(64) && !m.contains(5000));
        assert_eq!(m.to_vec(), vec![65]);
        assert!(NodeMask::single(MAX_NODES - 1).is_some());
        assert!(NodeMask::single(MAX_NODES).is_none());
    }

    #[test]
    fn mem_total_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meminfo");
        fs::write(&p, "Node 1 MemFree: 5 kB\nNode 1 MemTotal:   10 kB\n").unwrap();
        assert_eq!(read_mem_total(&p).unwrap(), 10 * 1024);
        fs::write(&p, "MemTotal: 7 kB\n").unwrap();
        assert_eq!(read_mem_total(&p).unwrap(), 7 * 1024);
        for bad in [
            "MemFree: 1 kB\n",
            "MemTotal: x kB\n",
            "MemTotal: 1 MB\n",
            "MemTotal:\n",
        ] {
            fs::write(&p, bad).unwrap();
            assert!(
                matches!(read_mem_total(&p), Err(NumaError::Parse { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn no_such_node_message_lists_nodes() {
        let e = NumaError::NoSuchNode {
            node: 7,
            nodes: vec![0, 1],
        };
        assert_eq!(
            e.to_string(),
            "NUMA node 7 does not exist or has no memory this process may use; usable nodes: 0, 1"
        );
    }
}
