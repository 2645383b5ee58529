//! Property tests of the malloc heap on real hugepages: random sequences of
//! malloc / zmalloc / calloc / realloc / free / bounded and aligned
//! allocations against a model of the live blocks. After every step: no
//! two blocks overlap (headers included), alignment and bounds hold, every
//! block still holds its fill byte, `heap_validate` passes and the
//! counters add up. At the end of a case everything is freed, the heap is
//! back to its preallocation, and (per test) the hugepage pool is back.
//!
//! One `Memory` per case, its operations on a thread of their own. Besides
//! the heap's own counters, each step compares what the kernel holds for
//! the instance (`st_blocks` of its memfds) with the heap's total, and each
//! case ends with every hugepage unmapped and every memfd closed. Every
//! test holds the hugepage pool lock exclusively, so the tests of this
//! file run one after the other and `HugePages_Free` is compared around
//! each of them (skipped, with a note, when another process held hugepages
//! meanwhile; growth refused because another process emptied the pool is
//! counted, and the heap must be unchanged by it).
//!
//! `PROPTEST_CASES` changes the number of cases, `PROPTEST_RNG_SEED` fixes
//! the seed (the default is random).

mod common;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memplane::heap::{AllocRequest, HeapKind, HeapStats};
use memplane::{MemOptions, Memory};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use common::{need_hugepages, pool_lock, real_counter};

const KB: usize = 1 << 10;
const MB: usize = 1 << 20;
const PAGE: usize = 2 * MB;
const HDR: usize = 64;

/// Most bytes of hugepages a case may have in its heap (an operation that
/// could grow the heap past it is skipped).
const CAP: usize = 256 * MB;

// --- operations ---------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// `malloc(size, align)` (align 0 is the plain malloc).
    Malloc { size: usize, align: usize },
    /// `zmalloc(size, align)`.
    Zmalloc { size: usize, align: usize },
    /// `calloc(num, size, align)`.
    Calloc {
        num: usize,
        size: usize,
        align: usize,
    },
    /// `heap_alloc` with a boundary `size.next_power_of_two() << shift`,
    /// zeroed or not.
    Bounded {
        size: usize,
        align: usize,
        shift: u32,
        zero: bool,
    },
    /// `realloc` of a live block (of `None` when there is none).
    Realloc {
        pick: Index,
        size: usize,
        align: usize,
    },
    /// `free` of a live block.
    Free { pick: Index },
    /// `free` of a live block on another thread, which then ends (what it
    /// kept for itself is left for the heap to take back).
    FreeElsewhere { pick: Index },
}

/// Sizes log-distributed from 64 B up, weighted toward small ones: 64 B to
/// 4 KiB, 4 KiB to 1 MiB, then (with `big`) 1 to 16 MiB and 16 to 64 MiB.
fn size_strategy(big: bool) -> BoxedStrategy<usize> {
    let exp = if big {
        prop_oneof![8 => 6u32..12, 4 => 12u32..20, 2 => 20u32..24, 1 => 24u32..26].boxed()
    } else {
        prop_oneof![3 => 6u32..12, 2 => 12u32..20].boxed()
    };
    (exp, any::<u32>())
        .prop_map(|(e, r)| (1usize << e) + (r as usize & ((1usize << e) - 1)))
        .boxed()
}

/// 0 (the default) or a power of two from 64 B to 2 MiB.
fn align_strategy() -> BoxedStrategy<usize> {
    prop_oneof![4 => Just(0usize), 1 => Just(64usize), 3 => (7u32..=21).prop_map(|e| 1usize << e)]
        .boxed()
}

fn op_strategy(big: bool) -> impl Strategy<Value = Op> {
    let size = size_strategy(big);
    let align = align_strategy();
    prop_oneof![
        3 => (size.clone(), align.clone()).prop_map(|(size, align)| Op::Malloc { size, align }),
        2 => (size.clone(), align.clone()).prop_map(|(size, align)| Op::Zmalloc { size, align }),
        1 => (1usize..=16, size.clone(), align.clone()).prop_map(|(num, size, align)| Op::Calloc {
            num,
            size: (size / num).max(1),
            align,
        }),
        2 => (size.clone(), align.clone(), 0u32..3, any::<bool>())
            .prop_map(|(size, align, shift, zero)| Op::Bounded { size, align, shift, zero }),
        2 => (any::<Index>(), size, prop_oneof![3 => Just(0usize), 1 => align])
            .prop_map(|(pick, size, align)| Op::Realloc { pick, size, align }),
        4 => any::<Index>().prop_map(|pick| Op::Free { pick }),
        1 => any::<Index>().prop_map(|pick| Op::FreeElsewhere { pick }),
    ]
}

// --- the model ----------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Block {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
    bound: usize,
    fill: u8,
}

/// One variant of the test: options and what to check.
struct Variant {
    name: &'static str,
    args: &'static [&'static str],
    /// Bytes the heap holds right after init (kept until shutdown).
    prealloc: u64,
    /// Sizes up to 64 MiB (else up to 1 MiB).
    big: bool,
    /// `heap_validate_deep` after every step.
    deep: bool,
    cases: u32,
}

/// What the cases of a variant did, for the summary line.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    skipped: AtomicU64,
    peak_total: AtomicU64,
    peak_live: AtomicU64,
    shortages: AtomicU64,
}

/// A case in progress: frees whatever is still live if the case ends
/// early (a failed check or a panic), before the `Memory` goes.
struct Case<'a> {
    live: Vec<Block>,
    mem: &'a Memory,
    fills: u32,
    deep: bool,
    prealloc: u64,
    tally: &'a Tally,
    prefix: String,
}

impl Drop for Case<'_> {
    fn drop(&mut self) {
        for b in self.live.drain(..) {
            // SAFETY: a live block of this instance, not used after this.
            let _ = unsafe { self.mem.free(b.ptr) };
        }
    }
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

/// Writes `byte` over `len` bytes of a live block.
fn fill(p: NonNull<u8>, len: usize, byte: u8) {
    // SAFETY: the caller passes a live block of at least `len` bytes.
    unsafe { std::ptr::write_bytes(p.as_ptr(), byte, len) };
}

/// The first byte of `[p, p+len)` that is not `byte`. Compares a page at a
/// time without early exit inside it, so the compiler can vectorise.
fn first_not(p: NonNull<u8>, len: usize, byte: u8) -> Option<usize> {
    // SAFETY: the caller passes a live block of at least `len` bytes, and
    // nothing writes it meanwhile (one thread).
    let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
    for (i, chunk) in s.chunks(4096).enumerate() {
        let acc = chunk.iter().fold(0u8, |a, &b| a | (b ^ byte));
        if acc != 0 {
            let at = chunk.iter().position(|&b| b != byte).unwrap_or(0);
            return Some(i * 4096 + at);
        }
    }
    None
}

/// The counters of every native heap, summed (one heap on a one-node
/// machine: `heap_stats(0)`).
fn native_stats(mem: &Memory) -> HeapStats {
    let mut s = HeapStats::default();
    for h in mem.heaps() {
        if h.kind != HeapKind::Native {
            continue;
        }
        let t = h.stats;
        s.total_bytes += t.total_bytes;
        s.free_bytes += t.free_bytes;
        s.alloc_bytes += t.alloc_bytes;
        s.alloc_count += t.alloc_count;
        s.free_count += t.free_count;
    }
    s
}

/// Bytes of hugepages mapped by this process (`HugetlbPages` of
/// `/proc/self/status`).
fn hugetlb_mapped_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugetlbPages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of hugepages held by the open memfds named after `prefix` (the
/// instance's memseg lists): what the kernel has given them and not taken
/// back, seen by this process alone (`st_blocks` of each memfd), and how
/// many such memfds are open.
fn memfd_held(prefix: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut open = 0;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return (0, 0);
    };
    for ent in dir.flatten() {
        let Ok(target) = std::fs::read_link(ent.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if !t.starts_with(&format!("/memfd:{prefix}seg_")) {
            continue;
        }
        if let Ok(st) = rustix::fs::stat(ent.path()) {
            open += 1;
            bytes += st.st_blocks as u64 * 512;
        }
    }
    (bytes, open)
}

/// Other processes that have hugepages mapped now (pid, kB).
fn other_hugepage_holders() -> Vec<(u32, u64)> {
    let me = std::process::id();
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for ent in dir.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let kb = std::fs::read_to_string(ent.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugetlbPages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        if kb > 0 {
            v.push((pid, kb));
        }
    }
    v
}

/// Whether an allocation error is the kernel's pool running dry (another
/// process took the pages), not the heap's doing.
fn pool_shortage(e: &memplane::Error) -> bool {
    e.to_string().contains("the kernel would not give")
}

/// Bytes a request may make the heap grow by at worst: what `grow` maps
/// (header or alignment, size, bound), in whole 2 MiB pages, plus a page.
fn worst_growth(size: usize, align: usize, bound: usize) -> usize {
    (HDR.max(align) + size.next_multiple_of(64) + bound + HDR).next_multiple_of(PAGE) + PAGE
}

impl Case<'_> {
    fn next_fill(&mut self) -> u8 {
        self.fills += 1;
        (self.fills % 255 + 1) as u8
    }

    /// Whether the heap may grow by `need` bytes without passing [`CAP`].
    fn fits(&self, need: usize) -> bool {
        let ok = native_stats(self.mem).total_bytes as usize + need <= CAP;
        if !ok {
            self.tally.skipped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn free_2m_note() -> String {
        format!(
            "(free 2M hugepages now: {}; another process may have taken them)",
            real_counter(2048, "free_hugepages")
        )
    }

    /// The pool ran dry under a growth (another process took the pages):
    /// the failed call must have left the heap alone, which `check` sees.
    fn shortage(&self) {
        self.tally.shortages.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a fresh block: checks it (zeroed if asked), fills it.
    fn admit(
        &mut self,
        what: &str,
        r: memplane::Result<NonNull<u8>>,
        size: usize,
        align: usize,
        bound: usize,
        zero: bool,
    ) -> Result<(), TestCaseError> {
        let ptr = match r {
            Ok(p) => p,
            Err(e) if pool_shortage(&e) => {
                self.shortage();
                return Ok(());
            }
            Err(e) => {
                return Err(fail(format!(
                    "{what}({size}, align {align}, bound {bound}) failed: {e} {}",
                    Self::free_2m_note()
                )))
            }
        };
        let usable = self
            .mem
            .malloc_usable_size(ptr)
            .map_err(|e| fail(format!("usable size of a fresh block: {e}")))?;
        prop_assert!(
            usable >= size && usable % 64 == 0,
            "{what}({size}): usable size {usable}"
        );
        if zero {
            if let Some(i) = first_not(ptr, size, 0) {
                return Err(fail(format!(
                    "{what}({size}, align {align}) at {ptr:p}: byte {i} is not zero"
                )));
            }
        }
        let byte = self.next_fill();
        fill(ptr, size, byte);
        self.live.push(Block {
            ptr,
            size,
            align,
            bound,
            fill: byte,
        });
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Malloc { size, align } => {
                if self.fits(worst_growth(size, align, 0)) {
                    let r = self.mem.malloc(size, align);
                    self.admit("malloc", r, size, align, 0, false)?;
                }
            }
            Op::Zmalloc { size, align } => {
                if self.fits(worst_growth(size, align, 0)) {
                    let r = self.mem.zmalloc(size, align);
                    self.admit("zmalloc", r, size, align, 0, true)?;
                }
            }
            Op::Calloc { num, size, align } => {
                if self.fits(worst_growth(num * size, align, 0)) {
                    let r = self.mem.calloc(num, size, align);
                    self.admit("calloc", r, num * size, align, 0, true)?;
                }
            }
            Op::Bounded {
                size,
                align,
                shift,
                zero,
            } => {
                let bound = size.next_power_of_two() << shift;
                if self.fits(worst_growth(size, align, bound)) {
                    let mut req = AllocRequest::new(size).align(align).bound(bound);
                    if zero {
                        req = req.zeroed();
                    }
                    let r = self.mem.heap_alloc(&req);
                    self.admit("heap_alloc", r, size, align, bound, zero)?;
                }
            }
            Op::Realloc { pick, size, align } => {
                if !self.fits(worst_growth(size, align, 0)) {
                    return Ok(());
                }
                if self.live.is_empty() {
                    // SAFETY: no block is given.
                    let r = unsafe { self.mem.realloc(None, size, align) };
                    return self.admit("realloc(None)", r, size, align, 0, false);
                }
                let i = pick.index(self.live.len());
                let old = self.live[i];
                // SAFETY: a live block; on success the model drops the old
                // pointer, on failure the block stays as it was.
                let ptr = match unsafe { self.mem.realloc(Some(old.ptr), size, align) } {
                    Ok(p) => p,
                    Err(e) if pool_shortage(&e) => {
                        self.shortage();
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(fail(format!(
                            "realloc({:p} of {}, {size}, align {align}) failed: {e} {}",
                            old.ptr,
                            old.size,
                            Self::free_2m_note()
                        )))
                    }
                };
                let keep = old.size.min(size);
                if let Some(at) = first_not(ptr, keep, old.fill) {
                    return Err(fail(format!(
                        "realloc {:p} ({}) -> {ptr:p} ({size}): byte {at} of the kept {keep} lost its value",
                        old.ptr, old.size
                    )));
                }
                fill(ptr, size, old.fill);
                self.live[i] = Block {
                    ptr,
                    size,
                    align,
                    bound: 0,
                    fill: old.fill,
                };
            }
            Op::Free { pick } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let b = self.live.swap_remove(pick.index(self.live.len()));
                // SAFETY: a live block, dropped from the model.
                unsafe { self.mem.free(b.ptr) }
                    .map_err(|e| fail(format!("free({:p}): {e}", b.ptr)))?;
            }
            Op::FreeElsewhere { pick } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let b = self.live.swap_remove(pick.index(self.live.len()));
                let (mem, addr) = (self.mem, b.ptr.as_ptr() as usize);
                let r = std::thread::scope(|s| {
                    s.spawn(move || {
                        let p = NonNull::new(addr as *mut u8).unwrap_or(NonNull::dangling());
                        // SAFETY: a live block, dropped from the model; this
                        // thread is its only user now.
                        unsafe { mem.free(p) }.map_err(|e| e.to_string())
                    })
                    .join()
                });
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(fail(format!("free({:p}) elsewhere: {e}", b.ptr))),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
        Ok(())
    }

    /// Everything that must hold between two operations.
    fn check(&self) -> Result<(), TestCaseError> {
        let mem = self.mem;
        let mut spans = Vec::with_capacity(self.live.len());
        let mut usable_sum = 0u64;
        for b in &self.live {
            let a = b.ptr.as_ptr() as usize;
            prop_assert_eq!(a % b.align.max(64), 0, "{:?} misaligned", b);
            if b.bound != 0 {
                // The bound is a power of two: first and last byte share
                // every bit above it.
                let above = !(b.bound - 1);
                prop_assert_eq!(
                    a & above,
                    (a + b.size - 1) & above,
                    "{:?} crosses its bound",
                    b
                );
            }
            if let Some(at) = first_not(b.ptr, b.size, b.fill) {
                return Err(fail(format!(
                    "{b:?}: byte {at} is no longer the fill byte {:#x}",
                    b.fill
                )));
            }
            let usable = mem
                .malloc_usable_size(b.ptr)
                .map_err(|e| fail(format!("{b:?} is no longer a live block: {e}")))?;
            prop_assert!(usable >= b.size, "{:?}: usable size {}", b, usable);
            usable_sum += usable as u64;
            spans.push((a - HDR, a + usable));
        }
        // Element headers included, blocks do not overlap.
        spans.sort_unstable();
        for w in spans.windows(2) {
            prop_assert!(
                w[0].1 <= w[1].0,
                "blocks overlap: {:#x}..{:#x} and {:#x}..{:#x}",
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            );
        }
        let r = if self.deep {
            mem.heap_validate_deep()
        } else {
            mem.heap_validate()
        };
        r.map_err(|e| fail(format!("heap_validate: {e}")))?;
        let st = native_stats(mem);
        prop_assert_eq!(st.alloc_count, self.live.len() as u64, "{:?}", st);
        prop_assert_eq!(st.total_bytes, st.alloc_bytes + st.free_bytes, "{:?}", st);
        prop_assert!(usable_sum <= st.alloc_bytes, "{} > {:?}", usable_sum, st);
        // Busy elements are exactly the blocks with their headers.
        prop_assert_eq!(
            st.alloc_bytes,
            usable_sum + (HDR * self.live.len()) as u64,
            "{:?}",
            st
        );
        // All mapped memory is the heap's, and the kernel holds exactly
        // that much for the instance: pages the heap gave back went back.
        prop_assert_eq!(mem.total_mapped(), st.total_bytes, "{:?}", st);
        let (held, _) = memfd_held(&self.prefix);
        prop_assert_eq!(
            held,
            st.total_bytes,
            "hugepages held by the instance's memfds vs the heap: {:?}",
            st
        );
        prop_assert!(st.total_bytes >= self.prealloc, "{:?}", st);
        let live: usize = self.live.iter().map(|b| b.size).sum();
        self.tally
            .peak_total
            .fetch_max(st.total_bytes, Ordering::Relaxed);
        self.tally
            .peak_live
            .fetch_max(live as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Frees everything (in model order, which free and realloc shuffle).
    fn free_all(&mut self) -> Result<(), TestCaseError> {
        while let Some(b) = self.live.pop() {
            if let Some(at) = first_not(b.ptr, b.size, b.fill) {
                return Err(fail(format!(
                    "{b:?}: byte {at} changed before the final free"
                )));
            }
            // SAFETY: a live block, dropped from the model.
            unsafe { self.mem.free(b.ptr) }
                .map_err(|e| fail(format!("final free({:p}): {e}", b.ptr)))?;
        }
        self.mem
            .heap_validate()
            .map_err(|e| fail(format!("heap_validate after freeing everything: {e}")))?;
        let st = native_stats(self.mem);
        prop_assert_eq!(st.alloc_count, 0, "{:?}", st);
        Ok(())
    }
}

/// Once every block is free and the thread that used the heap is gone
/// (whatever it kept for itself went back with it), the heap holds
/// exactly its preallocation and nothing else is mapped.
fn check_back_to_prealloc(mem: &Memory, prealloc: u64) -> Result<(), TestCaseError> {
    // One allocation and free of a block no per-thread cache serves: the
    // heap's slow path, which also takes back what exited threads left
    // behind.
    let p = mem
        .malloc(64 * KB, 0)
        .map_err(|e| fail(format!("malloc at the end: {e}")))?;
    // SAFETY: just allocated, not used.
    unsafe { mem.free(p) }.map_err(|e| fail(format!("free at the end: {e}")))?;
    mem.heap_validate()
        .map_err(|e| fail(format!("heap_validate at the end: {e}")))?;
    let st = native_stats(mem);
    prop_assert_eq!(st.alloc_count, 0, "{:?}", st);
    prop_assert_eq!(
        st.total_bytes,
        prealloc,
        "the heap holds exactly the preallocation once all is free: {:?}",
        st
    );
    prop_assert_eq!(st.free_bytes, prealloc, "{:?}", st);
    prop_assert_eq!(
        mem.total_mapped(),
        prealloc,
        "mapped memory once all is free: {:?}",
        st
    );
    Ok(())
}

static CASE_NO: AtomicU32 = AtomicU32::new(0);

fn run_case(
    v: &Variant,
    tally: &Tally,
    rt: &std::path::Path,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let n = CASE_NO.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("hprop_{}_{}_{n}", v.name, std::process::id());
    let rt = rt.display().to_string();
    let mut args = vec![
        "--file-prefix",
        prefix.as_str(),
        "--runtime-dir",
        rt.as_str(),
    ];
    args.extend_from_slice(v.args);
    let opts = MemOptions::parse_args(&args).map_err(|e| fail(format!("options: {e}")))?;
    let mapped_before = hugetlb_mapped_kb();
    // The preallocation may meet a pool another process just emptied.
    let mut tries = 0;
    let mem = loop {
        match Memory::init(&opts) {
            Ok(m) => break m,
            Err(e) if pool_shortage(&e) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                return Err(fail(format!(
                    "Memory::init({args:?}): {e} {}",
                    Case::free_2m_note()
                )))
            }
        }
    };
    let st = native_stats(&mem);
    prop_assert_eq!(st.total_bytes, v.prealloc, "after init: {:?}", st);
    tally.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    // The operations run on a thread of their own: whatever it keeps for
    // itself (a per-thread cache) it gives back when it ends, and the
    // end state is checked after that.
    let worker = std::thread::scope(|s| {
        s.spawn(|| {
            let mut case = Case {
                live: Vec::new(),
                mem: &mem,
                fills: 0,
                deep: v.deep,
                prealloc: v.prealloc,
                tally,
                prefix: prefix.clone(),
            };
            case.check()?;
            for (i, op) in ops.iter().enumerate() {
                case.step(op)
                    .and_then(|()| case.check())
                    .map_err(|e| fail(format!("step {i} ({op:?}): {e}")))?;
            }
            case.free_all()
        })
        .join()
    });
    match worker {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    check_back_to_prealloc(&mem, v.prealloc)?;
    drop(mem);
    prop_assert_eq!(
        hugetlb_mapped_kb(),
        mapped_before,
        "every hugepage unmapped once the Memory is dropped"
    );
    prop_assert_eq!(
        memfd_held(&prefix),
        (0, 0),
        "the instance's memfds are closed once the Memory is dropped"
    );
    Ok(())
}

fn run_variant(v: &Variant) {
    // The heap holds at most CAP: ask for that and some slack, waiting a
    // little for a pool another process is using to come back.
    let pages = (CAP / PAGE) as u64 + 8;
    for _ in 0..100 {
        if real_counter(2048, "free_hugepages") >= pages {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if !need_hugepages(2048, pages) {
        return;
    }
    let _pool = pool_lock(true);
    let others_before = other_hugepage_holders();
    let free_before = (
        real_counter(2048, "free_hugepages"),
        real_counter(1_048_576, "free_hugepages"),
    );
    let rt = tempfile::tempdir().unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(v.cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    let tally = Tally::default();
    let started = std::time::Instant::now();
    let result = runner.run(
        &proptest::collection::vec(op_strategy(v.big), 1..60),
        |ops| run_case(v, &tally, rt.path(), &ops),
    );
    if let Err(e) = result {
        panic!("{}: {e}", v.name);
    }
    eprintln!(
        "{}: {cases} cases in {:.1} s: {} operations, {} skipped by the {} MiB cap, {} refused for a pool another process emptied; peak heap {} MiB, peak live {} MiB",
        v.name,
        started.elapsed().as_secs_f64(),
        tally.ops.load(Ordering::Relaxed),
        tally.skipped.load(Ordering::Relaxed),
        CAP / MB,
        tally.shortages.load(Ordering::Relaxed),
        tally.peak_total.load(Ordering::Relaxed) >> 20,
        tally.peak_live.load(Ordering::Relaxed) >> 20,
    );
    let free_after = (
        real_counter(2048, "free_hugepages"),
        real_counter(1_048_576, "free_hugepages"),
    );
    let others_after = other_hugepage_holders();
    if free_after != free_before && !(others_before.is_empty() && others_after.is_empty()) {
        // Every case checked its own memfds and mappings; the pool as a
        // whole moved with other processes' use.
        eprintln!(
            "{}: HugePages_Free (2M, 1G) {free_before:?} before, {free_after:?} after, \
             but other processes held hugepages (pid, kB) {others_before:?} before and \
             {others_after:?} after: not compared",
            v.name
        );
        return;
    }
    assert_eq!(
        free_after, free_before,
        "HugePages_Free (2M, 1G) is back after the last Memory is dropped \
         (if another process used hugepages meanwhile: re-run)"
    );
}

#[test]
fn pinned_socket_mem_random_sequences() {
    run_variant(&Variant {
        name: "pinned",
        args: &["--socket-mem", "64", "--pagesz-mem", "1G:0"],
        prealloc: 64 * MB as u64,
        big: true,
        deep: false,
        cases: 64,
    });
}

#[test]
fn dynamic_random_sequences() {
    run_variant(&Variant {
        name: "dynamic",
        args: &["--pagesz-mem", "1G:0"],
        prealloc: 0,
        big: true,
        deep: false,
        cases: 64,
    });
}

#[test]
fn match_allocations_random_sequences() {
    run_variant(&Variant {
        name: "match",
        args: &["--match-allocations", "--pagesz-mem", "1G:0"],
        prealloc: 0,
        big: true,
        deep: false,
        cases: 64,
    });
}

#[test]
fn deep_validation_random_sequences() {
    run_variant(&Variant {
        name: "deep",
        args: &["--pagesz-mem", "1G:0"],
        prealloc: 0,
        big: false,
        deep: true,
        cases: 64,
    });
}

#[test]
fn the_fill_check_finds_a_changed_byte() {
    // The checker itself: a wrong byte anywhere is found, at its offset.
    let mut v = vec![7u8; 3 * 4096 + 100];
    let p = NonNull::new(v.as_mut_ptr()).unwrap();
    assert_eq!(first_not(p, v.len(), 7), None);
    for at in [0, 63, 4095, 4096, 8191, 3 * 4096 + 99] {
        v[at] = 8;
        let p = NonNull::new(v.as_mut_ptr()).unwrap();
        assert_eq!(first_not(p, v.len(), 7), Some(at));
        v[at] = 7;
    }
    assert_eq!(worst_growth(64, 0, 0), 2 * PAGE);
    assert!(worst_growth(64 * MB, 2 * MB, 0) >= 64 * MB + 2 * MB + 2 * KB);
}
