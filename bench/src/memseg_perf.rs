//! memplane's side of `bench/compare memseg`: DPDK 22.11
//! `malloc_perf_autotest`'s rte_malloc workload at the page layer, and the
//! kernel's own cost for the same thing (the floor).
//!
//! For each block size S (2M, 4M, 16M, 1G) and each page count per block
//! (`ceil(S / 2M)`, and `ceil(S / 2M) + 1`, which is what rte_malloc maps
//! because its heap element header makes a page-multiple block one page
//! longer), exactly as `test_malloc_perf.c` does it:
//! 1. allocate blocks back to back, at most 10000, stopping at the first
//!    failure; the failing attempt is inside the timed loop, as in DPDK;
//! 2. memset every block to 0 (not timed, as DPDK prints it apart);
//! 3. free every block.
//!
//! and report the average microseconds per block for 1 and 3. Then per-page
//! latency: one 2 MiB (1 GiB) page allocated and freed, repeated.
//!
//! Output lines (parsed by `compare memseg`):
//!
//! ```text
//! block who=<memplane|kernel> size=<S> pages=<n> runs=<r> alloc_us=<a> free_us=<f>
//! page who=<memplane|kernel> psz=<P> iters=<i> alloc_us=<a> free_us=<f>
//! ```
//!
//! Lines starting with `#` are comments (why a loop stopped).

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use memplane::memseg::{PageRequest, PageRun};
use memplane::options::HugeUnlink;
use memplane::{MemOptions, Memory, PageSize};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// `MAX_RUNS` of `test_malloc_perf.c`.
pub const MAX_RUNS: usize = 10_000;
/// The rte_malloc sizes dominated by page mapping.
pub const SIZES: [u64; 4] = [2 << 20, 4 << 20, 16 << 20, 1 << 30];
const P2M: u64 = 2 << 20;
const P1G: u64 = 1 << 30;
/// Per-page latency repetitions.
const ITERS_2M: u32 = 200;
const ITERS_1G: u32 = 4;

/// A private runtime directory under the temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("memplane-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// --- the kernel floor ---------------------------------------------------------

/// A hugetlb memfd of `psz` pages (2 MiB or 1 GiB).
pub fn hugetlb_memfd(name: &str, psz: u64) -> rustix::io::Result<OwnedFd> {
    let size = if psz == P1G {
        MemfdFlags::HUGE_1GB
    } else {
        MemfdFlags::HUGE_2MB
    };
    rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | size)
}

/// Reserves `[off, off + len)` of a hugetlb memfd (fallocate: the kernel
/// takes and zeroes the pages) and maps it with `MAP_POPULATE`. On failure
/// nothing stays reserved.
pub fn kernel_map(fd: &OwnedFd, off: u64, len: usize) -> rustix::io::Result<*mut c_void> {
    if let Err(e) = rustix::fs::fallocate(fd, FallocateFlags::empty(), off, len as u64) {
        // A failed fallocate keeps the pages it got before failing.
        let _ = rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            off,
            len as u64,
        );
        return Err(e);
    }
    // SAFETY: a fresh shared mapping chosen by the kernel; it aliases no
    // Rust object, and the file range is backed (reserved just above).
    let mapped = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED | MapFlags::POPULATE,
            fd.as_fd(),
            off,
        )
    };
    mapped.inspect_err(|_| {
        let _ = rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            off,
            len as u64,
        );
    })
}

/// Undoes [`kernel_map`]: unmaps and gives the pages back (punch hole).
pub fn kernel_unmap(fd: &OwnedFd, ptr: *mut c_void, off: u64, len: usize) {
    // SAFETY: `ptr..ptr+len` is a mapping made by `kernel_map` that nobody
    // uses any more.
    if let Err(e) = unsafe { rustix::mm::munmap(ptr, len) } {
        eprintln!("warning: munmap: {e}");
    }
    if let Err(e) = rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        off,
        len as u64,
    ) {
        eprintln!("warning: fallocate(PUNCH_HOLE): {e}");
    }
}

// --- the workloads ------------------------------------------------------------

/// One size's result, averages per block.
struct Block {
    runs: usize,
    alloc: Duration,
    free: Duration,
    stop: Option<String>,
}

fn per(d: Duration, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        d.as_secs_f64() * 1e6 / n as f64
    }
}

fn print_block(who: &str, size: u64, pages: u32, b: &Block) {
    if let Some(s) = &b.stop {
        println!(
            "# {who} size={size} pages={pages}: stopped after {} blocks: {s}",
            b.runs
        );
    }
    println!(
        "block who={who} size={size} pages={pages} runs={} alloc_us={:.2} free_us={:.2}",
        b.runs,
        per(b.alloc, b.runs),
        per(b.free, b.runs)
    );
}

fn zero(va: usize, len: usize) {
    // SAFETY: the caller passes a block it mapped read-write and owns.
    unsafe { std::ptr::write_bytes(va as *mut u8, 0, len) };
}

fn memplane_blocks(mem: &Memory, pages: u32) -> Block {
    let req = PageRequest::new(0, PageSize::SIZE_2M, pages);
    let mut blocks: Vec<PageRun> = Vec::with_capacity(MAX_RUNS);
    let mut stop = None;
    let t = Instant::now();
    for _ in 0..MAX_RUNS {
        match mem.alloc_pages(&req) {
            Ok(runs) => blocks.push(runs[0]),
            Err(e) => {
                stop = Some(e.to_string());
                break;
            }
        }
    }
    let alloc = t.elapsed();
    for b in &blocks {
        zero(b.va, b.len);
    }
    let t = Instant::now();
    for b in &blocks {
        if let Err(e) = mem.free_run(b) {
            eprintln!("error: memplane free_run: {e}");
        }
    }
    let free = t.elapsed();
    Block {
        runs: blocks.len(),
        alloc,
        free,
        stop,
    }
}

fn kernel_blocks(pages: u32) -> rustix::io::Result<Block> {
    let fd = hugetlb_memfd("mpbench-floor", P2M)?;
    let len = pages as usize * P2M as usize;
    let mut blocks: Vec<(*mut c_void, u64)> = Vec::with_capacity(MAX_RUNS);
    let mut stop = None;
    let t = Instant::now();
    for i in 0..MAX_RUNS {
        let off = (i * len) as u64;
        match kernel_map(&fd, off, len) {
            Ok(p) => blocks.push((p, off)),
            Err(e) => {
                stop = Some(e.to_string());
                break;
            }
        }
    }
    let alloc = t.elapsed();
    for &(p, _) in &blocks {
        zero(p as usize, len);
    }
    let t = Instant::now();
    for &(p, off) in &blocks {
        kernel_unmap(&fd, p, off, len);
    }
    let free = t.elapsed();
    Ok(Block {
        runs: blocks.len(),
        alloc,
        free,
        stop,
    })
}

/// Per-page latency: `iters` x (alloc one page, free it).
struct PageLat {
    iters: u32,
    alloc: Duration,
    free: Duration,
}

fn print_page(who: &str, psz: u64, r: &Result<PageLat, String>) {
    match r {
        Ok(p) => println!(
            "page who={who} psz={psz} iters={} alloc_us={:.2} free_us={:.2}",
            p.iters,
            per(p.alloc, p.iters as usize),
            per(p.free, p.iters as usize)
        ),
        Err(e) => println!("# page who={who} psz={psz}: not measured: {e}"),
    }
}

fn memplane_pages(mem: &Memory, psz: PageSize, iters: u32) -> Result<PageLat, String> {
    let req = PageRequest::new(0, psz, 1);
    let (mut alloc, mut free) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let t = Instant::now();
        let runs = mem.alloc_pages(&req).map_err(|e| e.to_string())?;
        alloc += t.elapsed();
        let t = Instant::now();
        mem.free_run(&runs[0]).map_err(|e| e.to_string())?;
        free += t.elapsed();
    }
    Ok(PageLat { iters, alloc, free })
}

fn kernel_pages(psz: u64, iters: u32) -> Result<PageLat, String> {
    let fd = hugetlb_memfd("mpbench-floor", psz).map_err(|e| e.to_string())?;
    let (mut alloc, mut free) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let t = Instant::now();
        let p = kernel_map(&fd, 0, psz as usize).map_err(|e| e.to_string())?;
        alloc += t.elapsed();
        let t = Instant::now();
        kernel_unmap(&fd, p, 0, psz as usize);
        free += t.elapsed();
    }
    Ok(PageLat { iters, alloc, free })
}

fn pages_for(size: u64) -> u32 {
    size.div_ceil(P2M) as u32
}

/// Runs everything once and prints the lines described in the module doc.
/// `huge_dir`: back memplane's pages with files in that hugetlbfs mount
/// (with `--huge-unlink`, as the DPDK run) instead of a hugetlb memfd.
/// Returns the process exit code.
pub fn run(prefix: &str, huge_dir: Option<&str>) -> i32 {
    let tmp = match TempDir::new("memseg") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot create a runtime directory: {e}");
            return 1;
        }
    };
    let mut opts = MemOptions::new().file_prefix(prefix).runtime_dir(&tmp.0);
    if let Some(dir) = huge_dir {
        opts = opts.huge_dir(dir).huge_unlink(HugeUnlink::Always);
    }
    let opts = match opts.build() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: memplane options: {e}");
            return 1;
        }
    };
    let mem = match Memory::init(&opts) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: memplane Memory::init: {e}");
            return 1;
        }
    };
    for size in SIZES {
        for pages in [pages_for(size), pages_for(size) + 1] {
            print_block("memplane", size, pages, &memplane_blocks(&mem, pages));
        }
    }
    print_page(
        "memplane",
        P2M,
        &memplane_pages(&mem, PageSize::SIZE_2M, ITERS_2M),
    );
    print_page(
        "memplane",
        P1G,
        &memplane_pages(&mem, PageSize::SIZE_1G, ITERS_1G),
    );
    drop(mem);

    for size in SIZES {
        for pages in [pages_for(size), pages_for(size) + 1] {
            match kernel_blocks(pages) {
                Ok(b) => print_block("kernel", size, pages, &b),
                Err(e) => {
                    eprintln!("error: hugetlb memfd: {e}");
                    return 1;
                }
            }
        }
    }
    print_page("kernel", P2M, &kernel_pages(P2M, ITERS_2M));
    print_page("kernel", P1G, &kernel_pages(P1G, ITERS_1G));
    0
}
