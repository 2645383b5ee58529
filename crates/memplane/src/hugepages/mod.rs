//! Hugepage discovery: what the machine has, what is free, where it is
//! mounted, and what limits stand in the way.
//!
//! Discovery reads `/sys` and `/proc` under a configurable root
//! ([`SystemRoots`]) so that tests can run it on fake trees as well as on the
//! real machine. It never changes anything; [`reserve`] and [`files`] do.

mod discover;
pub mod files;
pub mod reserve;
pub mod usage;

pub use discover::{cgroup_size_name, Discovery};

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::units::PageSize;

/// Where to find the kernel's pseudo file systems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemRoots {
    /// Root of sysfs (normally `/sys`).
    pub sys: PathBuf,
    /// Root of procfs (normally `/proc`).
    pub proc: PathBuf,
}

impl SystemRoots {
    /// The real `/sys` and `/proc`.
    pub fn real() -> Self {
        SystemRoots {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }

    /// Roots below a directory holding `sys/` and `proc/` (for fake trees).
    pub fn under(dir: &Path) -> Self {
        SystemRoots {
            sys: dir.join("sys"),
            proc: dir.join("proc"),
        }
    }
}

/// Counters for one page size, system-wide (from
/// `/sys/kernel/mm/hugepages/hugepages-<N>kB/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PageSizeInfo {
    /// The page size.
    pub page_size: PageSize,
    /// Whether this is the kernel's default hugepage size (`Hugepagesize` in
    /// `/proc/meminfo`).
    pub is_default: bool,
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages not faulted in by anyone.
    pub free: u64,
    /// `resv_hugepages`: free pages promised to existing mappings or
    /// reservations; not available to newcomers.
    pub reserved: u64,
    /// `surplus_hugepages`: pages above `nr_hugepages` taken from overcommit.
    pub surplus: u64,
    /// `nr_overcommit_hugepages`: how far the pool may grow on demand.
    pub overcommit: u64,
}

impl PageSizeInfo {
    /// Pages a new mapping can still get: free minus reserved, plus unused
    /// overcommit.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved) + self.overcommit.saturating_sub(self.surplus)
    }
}

/// Counters for one page size on one NUMA node (from
/// `/sys/devices/system/node/node<N>/hugepages/hugepages-<N>kB/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePageInfo {
    /// NUMA node id.
    pub node: u32,
    /// The page size.
    pub page_size: PageSize,
    /// `nr_hugepages` on this node.
    pub total: u64,
    /// `free_hugepages` on this node.
    pub free: u64,
    /// `surplus_hugepages` on this node.
    pub surplus: u64,
}

/// A mounted hugetlbfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugetlbfsMount {
    /// Mount point.
    pub path: PathBuf,
    /// Page size: the `pagesize=` option, else the default hugepage size.
    pub page_size: PageSize,
    /// The raw mount options.
    pub options: String,
    /// `size=` limit in bytes, when the mount has one.
    pub size_limit: Option<u64>,
}

/// The hugetlb cgroup limit for one page size in this process's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLimit {
    /// The page size.
    pub page_size: PageSize,
    /// Limit in bytes; `None` means unlimited (`max`).
    pub limit: Option<u64>,
    /// Current usage in bytes, when readable.
    pub usage: Option<u64>,
    /// The file the limit came from.
    pub source: PathBuf,
}

/// Whether `/proc/self/pagemap` reveals physical frame numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PagemapAccess {
    /// Frame numbers are visible (root with CAP_SYS_ADMIN): IOVA-as-PA works.
    PhysicalAddresses,
    /// The file is readable but frame numbers read as zero (unprivileged).
    ZeroedFrames,
    /// The file cannot be read at all.
    Unreadable,
}

/// `RLIMIT_MEMLOCK` of this process, in bytes (`None` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemlockLimit {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// Everything discovery found, at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugepageSnapshot {
    /// Page sizes the kernel supports, smallest first.
    pub sizes: Vec<PageSizeInfo>,
    /// NUMA nodes present (at least node 0).
    pub nodes: Vec<u32>,
    /// Per node and page size counters.
    pub per_node: Vec<NodePageInfo>,
    /// Mounted hugetlbfs file systems.
    pub mounts: Vec<HugetlbfsMount>,
    /// hugetlb cgroup limits that apply to this process.
    pub cgroup_limits: Vec<CgroupLimit>,
    /// This process's memlock limit.
    pub memlock: MemlockLimit,
    /// Whether physical addresses can be read.
    pub pagemap: PagemapAccess,
}

impl HugepageSnapshot {
    /// System-wide counters for one page size.
    pub fn size(&self, page_size: PageSize) -> Option<&PageSizeInfo> {
        self.sizes.iter().find(|s| s.page_size == page_size)
    }

    /// Counters for one page size on one node.
    pub fn node_size(&self, node: u32, page_size: PageSize) -> Option<&NodePageInfo> {
        self.per_node
            .iter()
            .find(|n| n.node == node && n.page_size == page_size)
    }

    /// The kernel's default hugepage size, if it supports any.
    pub fn default_size(&self) -> Option<PageSize> {
        self.sizes
            .iter()
            .find(|s| s.is_default)
            .map(|s| s.page_size)
    }

    /// Mounts serving one page size.
    pub fn mounts_for(&self, page_size: PageSize) -> impl Iterator<Item = &HugetlbfsMount> {
        self.mounts.iter().filter(move |m| m.page_size == page_size)
    }

    /// The cgroup limit for one page size, if any applies.
    pub fn cgroup_limit(&self, page_size: PageSize) -> Option<&CgroupLimit> {
        self.cgroup_limits
            .iter()
            .find(|c| c.page_size == page_size && c.limit.is_some())
    }

    /// The supported sizes, for messages ("2M, 1G").
    pub fn size_list(&self) -> String {
        let v: Vec<String> = self.sizes.iter().map(|s| s.page_size.to_string()).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// `memfd_create` flags for a hugetlb memfd of `page_size` pages
/// (`MFD_HUGETLB` with the size encoded as log2 in bits 26..32).
pub fn hugetlb_memfd_flags(page_size: PageSize) -> rustix::fs::MemfdFlags {
    const MFD_HUGE_SHIFT: u32 = 26;
    let log2 = page_size.bytes().trailing_zeros();
    rustix::fs::MemfdFlags::CLOEXEC
        | rustix::fs::MemfdFlags::HUGETLB
        | rustix::fs::MemfdFlags::from_bits_retain(log2 << MFD_HUGE_SHIFT)
}

/// Whether this kernel can create a hugetlb memfd of `page_size` pages.
/// Creating one reserves nothing, so this is a free probe.
pub fn memfd_supports(page_size: PageSize) -> bool {
    rustix::fs::memfd_create("memplane-probe", hugetlb_memfd_flags(page_size)).is_ok()
}
