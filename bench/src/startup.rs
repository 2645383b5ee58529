//! memplane's side of `bench/compare startup`, once per process (as DPDK's
//! `rte_eal_init` can only run once per process):
//!
//! - memplane: `Memory::init` with 1 GiB preallocated on node 0 from 2 MiB
//!   pages (`socket_mem([1 GiB])`, `pagesz_mem(1G, 0)`), like DPDK's
//!   `-m 1024` here, then the drop;
//! - the kernel floor: a hugetlb memfd, fallocate of 1 GiB of 2 MiB pages,
//!   mmap `MAP_POPULATE`, then munmap + close.
//!
//! Output lines (parsed by `compare startup`), times in microseconds:
//!
//! ```text
//! memplane init_us=<t> teardown_us=<t>
//! kernel init_us=<t> teardown_us=<t>
//! ```

use std::time::Instant;

use memplane::{MemOptions, Memory, PageSize};

use crate::memseg_perf::{hugetlb_memfd, kernel_map, TempDir};

const GIB: u64 = 1 << 30;

/// Runs both once; returns the process exit code.
pub fn run(prefix: &str) -> i32 {
    let tmp = match TempDir::new("startup") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot create a runtime directory: {e}");
            return 1;
        }
    };
    let t = Instant::now();
    let mem = MemOptions::new()
        .file_prefix(prefix)
        .runtime_dir(&tmp.0)
        .socket_mem([GIB])
        .pagesz_mem(PageSize::SIZE_1G, 0)
        .build()
        .map_err(memplane::Error::from)
        .and_then(|o| Memory::init(&o));
    let init = t.elapsed();
    let mem = match mem {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: memplane Memory::init: {e}");
            return 1;
        }
    };
    if mem.total_mapped() != GIB {
        eprintln!(
            "error: memplane mapped {} bytes at init, expected 1 GiB",
            mem.total_mapped()
        );
        return 1;
    }
    let t = Instant::now();
    drop(mem);
    let teardown = t.elapsed();
    println!(
        "memplane init_us={:.1} teardown_us={:.1}",
        init.as_secs_f64() * 1e6,
        teardown.as_secs_f64() * 1e6
    );

    let t = Instant::now();
    let mapped = hugetlb_memfd("mpbench-startup-floor", 2 << 20)
        .and_then(|fd| kernel_map(&fd, 0, GIB as usize).map(|p| (fd, p)));
    let init = t.elapsed();
    let (fd, p) = match mapped {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: kernel floor: 1 GiB of 2 MiB pages from a hugetlb memfd: {e}");
            return 1;
        }
    };
    let t = Instant::now();
    // SAFETY: the 1 GiB mapping made just above, used by nobody.
    if let Err(e) = unsafe { rustix::mm::munmap(p, GIB as usize) } {
        eprintln!("warning: munmap: {e}");
    }
    drop(fd);
    let teardown = t.elapsed();
    println!(
        "kernel init_us={:.1} teardown_us={:.1}",
        init.as_secs_f64() * 1e6,
        teardown.as_secs_f64() * 1e6
    );
    0
}
