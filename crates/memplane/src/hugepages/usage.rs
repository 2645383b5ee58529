//! Which live processes hold hugepages, from `/proc/<pid>/smaps`.
//!
//! Files in hugetlbfs mounts show only part of the picture: memfd-backed
//! memory (memplane's default, and DPDK's `--in-memory`) and SysV shm have no
//! visible file. The kernel's per-mapping `Shared_Hugetlb`/`Private_Hugetlb`
//! counters do show them, per page size (`KernelPageSize`).

use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::units::{PageSize, KIB};

/// Hugepage memory one process has mapped, for one page size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessUsage {
    /// Process id.
    pub pid: u32,
    /// Command name (`/proc/<pid>/comm`).
    pub comm: String,
    /// The page size.
    pub page_size: PageSize,
    /// Bytes of that size mapped and faulted in (shared mappings count in
    /// every process that maps them).
    pub bytes: u64,
}

/// Scans every process under `proc_root` for mapped hugepages. Processes
/// that vanish or cannot be read (permissions) are skipped.
pub fn scan_processes(proc_root: &Path) -> Vec<ProcessUsage> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(smaps) = fs::read_to_string(entry.path().join("smaps")) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        for (page_size, bytes) in hugetlb_from_smaps(&smaps) {
            out.push(ProcessUsage {
                pid,
                comm: comm.clone(),
                page_size,
                bytes,
            });
        }
    }
    out.sort_by_key(|u| (u.page_size, std::cmp::Reverse(u.bytes), u.pid));
    out
}

/// Sums hugetlb bytes per kernel page size over the mappings of one smaps
/// file.
fn hugetlb_from_smaps(smaps: &str) -> Vec<(PageSize, u64)> {
    let mut totals: Vec<(PageSize, u64)> = Vec::new();
    let mut page_size = None;
    let mut add = |size: Option<PageSize>, kb: u64| {
        let Some(size) = size else { return };
        if kb == 0 {
            return;
        }
        match totals.iter_mut().find(|(s, _)| *s == size) {
            Some((_, b)) => *b += kb * KIB,
            None => totals.push((size, kb * KIB)),
        }
    };
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("KernelPageSize:") => {
                page_size = f
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .and_then(|kb| PageSize::new(kb * KIB));
            }
            Some("Shared_Hugetlb:" | "Private_Hugetlb:") => {
                let kb = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                add(page_size, kb);
            }
            _ => {}
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_page_size() {
        let smaps = "7f00-7f20 rw-s 00000000 00:0f 1 /memfd:seg (deleted)\n\
KernelPageSize:     2048 kB\nShared_Hugetlb:     4096 kB\nPrivate_Hugetlb:       0 kB\n\
7f40-7f80 rw-p 00000000 00:00 0\nKernelPageSize:        4 kB\nShared_Hugetlb:        0 kB\n\
8000-c000 rw-s 0 00:10 2 /dev/hugepages/rtemap_0\nKernelPageSize:  1048576 kB\nShared_Hugetlb:  1048576 kB\n\
9000-9200 rw-p 0 00:0f 3 /memfd:x\nKernelPageSize:     2048 kB\nPrivate_Hugetlb:     2048 kB\n";
        let t = hugetlb_from_smaps(smaps);
        assert_eq!(
            t,
            vec![(PageSize::SIZE_2M, 6 << 20), (PageSize::SIZE_1G, 1 << 30)]
        );
    }
}
