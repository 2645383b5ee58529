//! Shared test support: fake sysfs/procfs trees and the hugepage guard.
#![allow(dead_code)]

pub mod heapkit;

use std::fs;
use std::path::{Path, PathBuf};

/// A fake `/sys` + `/proc` tree in a temp dir.
pub struct FakeSystem {
    pub dir: tempfile::TempDir,
}

impl FakeSystem {
    pub fn new() -> Self {
        let s = FakeSystem {
            dir: tempfile::tempdir().unwrap(),
        };
        s.write("proc/self/limits", LIMITS);
        s.write("proc/self/cgroup", "0::/\n");
        s.write("proc/self/mounts", "");
        s.write("proc/meminfo", "MemTotal: 1000 kB\n");
        fs::create_dir_all(s.root().join("sys/kernel/mm/hugepages")).unwrap();
        fs::create_dir_all(s.root().join("sys/devices/system/node")).unwrap();
        s
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn roots(&self) -> memplane::hugepages::SystemRoots {
        memplane::hugepages::SystemRoots::under(self.root())
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    /// A system-wide size: (kB, total, free, resv, surplus, overcommit).
    pub fn size(&self, kb: u64, total: u64, free: u64, resv: u64, surplus: u64, over: u64) {
        let d = format!("sys/kernel/mm/hugepages/hugepages-{kb}kB");
        self.write(&format!("{d}/nr_hugepages"), &format!("{total}\n"));
        self.write(&format!("{d}/free_hugepages"), &format!("{free}\n"));
        self.write(&format!("{d}/resv_hugepages"), &format!("{resv}\n"));
        self.write(&format!("{d}/surplus_hugepages"), &format!("{surplus}\n"));
        self.write(
            &format!("{d}/nr_overcommit_hugepages"),
            &format!("{over}\n"),
        );
    }

    /// A per-node size: (node, kB, total, free).
    pub fn node_size(&self, node: u32, kb: u64, total: u64, free: u64) {
        let d = format!("sys/devices/system/node/node{node}/hugepages/hugepages-{kb}kB");
        self.write(&format!("{d}/nr_hugepages"), &format!("{total}\n"));
        self.write(&format!("{d}/free_hugepages"), &format!("{free}\n"));
        self.write(&format!("{d}/surplus_hugepages"), "0\n");
    }

    pub fn default_size_kb(&self, kb: u64) {
        self.write(
            "proc/meminfo",
            &format!("MemTotal: 1000 kB\nHugePages_Total: 0\nHugepagesize:       {kb} kB\n"),
        );
    }
}

pub const LIMITS: &str =
    "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max locked memory         8388608              16777216             bytes     \n\
Max address space         unlimited            unlimited            bytes     \n";

/// Reads a hugepage counter of the real machine.
pub fn real_counter(size_kb: u64, name: &str) -> u64 {
    fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/{name}"
    ))
    .map_or(0, |t| t.trim().parse().unwrap())
}

/// Returns false (after printing why) when the real machine has fewer than
/// `pages` free 2 MiB hugepages; panics instead under CI, where the
/// hugepages must be there.
pub fn need_hugepages(size_kb: u64, pages: u64) -> bool {
    let free = real_counter(size_kb, "free_hugepages");
    if free >= pages {
        return true;
    }
    let msg = format!(
        "needs {pages} free {size_kb} kB hugepages, found {free}; reserve them with: \
         memplane hugepages reserve {}={pages} (as root)",
        if size_kb == 2048 { "2M" } else { "1G" }
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test {msg}"
    );
    eprintln!("SKIPPED: this test {msg}");
    false
}

/// Serializes tests that touch the hugepage pool, across threads and
/// processes: exclusive to change the pool or to assert that free pages did
/// not move; shared to take pages or to compare totals. Released when the
/// returned file is dropped.
pub fn pool_lock(exclusive: bool) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("memplane-test-pool.lock"))
        .unwrap();
    let mode = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    rustix::fs::flock(&f, mode).unwrap();
    f
}
