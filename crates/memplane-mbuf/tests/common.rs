//! Test support: hugepage check, per-test instances, the pool lock.
#![allow(dead_code)]

use memplane::{MemOptions, Memory};

/// Free 2 MiB pages; under CI=true a shortage fails the test.
pub fn have_hugepages(n: u64) -> bool {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map_or(0, |t| t.trim().parse().unwrap_or(0));
    if free >= n {
        return true;
    }
    let msg = format!(
        "needs {n} free 2 MiB hugepages, found {free}; reserve them with: memplane hugepages reserve 2M={n} (as root)"
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test {msg}"
    );
    eprintln!("SKIPPED: this test {msg}");
    false
}

/// Shared hold on the machine-wide test pool lock (tests that take pages).
pub fn pool_lock() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("memplane-test-pool.lock"))
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockShared).unwrap();
    f
}

pub struct Inst {
    pub mem: Memory,
    pub prefix: String,
    pub rundir: tempfile::TempDir,
    _lock: std::fs::File,
}

pub fn opts(prefix: &str, rundir: &str, extra: &[&str]) -> MemOptions {
    let mut args = vec!["--file-prefix", prefix, "--runtime-dir", rundir];
    args.extend_from_slice(extra);
    MemOptions::parse_args(&args).unwrap()
}

/// An instance of its own (file prefix + runtime dir), primary.
pub fn instance(tag: &str) -> Inst {
    let lock = pool_lock();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("mpl_{tag}_{}", std::process::id());
    let mem = Memory::init(&opts(&prefix, dir.path().to_str().unwrap(), &[])).unwrap();
    Inst {
        mem,
        prefix,
        rundir: dir,
        _lock: lock,
    }
}
