//! memplane's side of `bench/compare init`, once per process: `Memory::init`
//! with `--socket-mem <mem>` on node 0 (none: nothing preallocated) and
//! 1 GiB pages kept out (`pagesz_mem(1G, 0)`, as DPDK's `--huge-dir` on a
//! 2 MiB hugetlbfs mount does), then the drop.
//!
//! Then, with memory preallocated, the kernel floor for the same amount
//! in the same process: a hugetlb memfd, fallocate of `<mem>` of 2 MiB
//! pages, mmap `MAP_POPULATE` (the kernel reserves and zeroes the pages),
//! then munmap + close.
//!
//! Prints (parsed by `compare init`):
//!
//! ```text
//! memplane main_ns=<t> ready_ns=<t> init_us=<t> teardown_us=<t> mapped=<bytes>
//! kernel init_us=<t> teardown_us=<t>
//! ```
//!
//! `main_ns` and `ready_ns` are CLOCK_MONOTONIC readings in nanoseconds on
//! entering [`run`] and right after `Memory::init` returned, so the parent,
//! which read the same clock before spawning this process, gets the time
//! from process start to a ready instance.

use std::time::Instant;

use memplane::{MemOptions, Memory, PageSize};

use crate::memseg_perf::{hugetlb_memfd, kernel_map, TempDir};

/// CLOCK_MONOTONIC in nanoseconds (the clock `bench/dpdk/eal_startup.c`
/// reads with `clock_gettime`).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Runs once; `mem`: bytes to preallocate on node 0 (`None`: nothing).
/// Returns the process exit code.
pub fn run(prefix: &str, mem: Option<u64>) -> i32 {
    let main_ns = monotonic_ns();
    let t = Instant::now();
    // The private runtime directory is made inside the timed window, as
    // Memory::init makes its default one.
    let tmp = match TempDir::new(&format!("init-{prefix}")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot create a runtime directory: {e}");
            return 1;
        }
    };
    let mut o = MemOptions::new()
        .file_prefix(prefix)
        .runtime_dir(&tmp.0)
        .pagesz_mem(PageSize::SIZE_1G, 0);
    if let Some(bytes) = mem {
        o = o.socket_mem([bytes]);
    }
    let m = o
        .build()
        .map_err(memplane::Error::from)
        .and_then(|o| Memory::init(&o));
    let ready_ns = monotonic_ns();
    let init = t.elapsed();
    let m = match m {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: memplane Memory::init: {e}");
            return 1;
        }
    };
    let mapped = m.total_mapped();
    if mapped != mem.unwrap_or(0) {
        eprintln!(
            "error: memplane mapped {mapped} bytes at init, expected {}",
            mem.unwrap_or(0)
        );
        return 1;
    }
    let t = Instant::now();
    drop(m);
    let teardown = t.elapsed();
    drop(tmp);
    println!(
        "memplane main_ns={main_ns} ready_ns={ready_ns} init_us={:.1} teardown_us={:.1} mapped={mapped}",
        init.as_secs_f64() * 1e6,
        teardown.as_secs_f64() * 1e6
    );
    if let Some(bytes) = mem.filter(|&b| b > 0) {
        let len = bytes as usize;
        let t = Instant::now();
        let mapped = hugetlb_memfd("mpbench-init-floor", 2 << 20)
            .and_then(|fd| kernel_map(&fd, 0, len).map(|p| (fd, p)));
        let init = t.elapsed();
        let (fd, p) = match mapped {
            Ok(x) => x,
            Err(e) => {
                eprintln!(
                    "error: kernel floor: {bytes} bytes of 2 MiB pages from a hugetlb memfd: {e}"
                );
                return 1;
            }
        };
        let t = Instant::now();
        // SAFETY: the mapping made just above, used by nobody.
        if let Err(e) = unsafe { rustix::mm::munmap(p, len) } {
            eprintln!("warning: munmap: {e}");
        }
        drop(fd);
        let teardown = t.elapsed();
        println!(
            "kernel init_us={:.1} teardown_us={:.1}",
            init.as_secs_f64() * 1e6,
            teardown.as_secs_f64() * 1e6
        );
    }
    0
}
