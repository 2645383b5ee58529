//! The `lf_stack` handler: DPDK's lock-free stack (`rte_stack_lf`), in a
//! memzone so every process of the instance can use it.
//!
//! Zone `ML_<pool>`: an [`LfStackHeader`] (two lists, `used` and `free`,
//! each a `(top, counter)` pair plus a length), then one [`LfElem`] per
//! object of the pool. Every element is always on exactly one list. A put
//! of `n` objects pops `n` elements off `free`, writes the object
//! pointers into them and pushes the chain onto `used`; a get pops `n`
//! elements off `used` (reading their pointers) and pushes them back onto
//! `free`.
//!
//! Lists are Treiber stacks whose head is swung with a 16-byte
//! compare-and-swap (`lock cmpxchg16b`) on `(top, counter)`: the counter
//! grows with every push and pop, so a head that was popped and pushed
//! back in between (ABA) no longer compares equal. Pops first reserve
//! their elements on the length (so a traversal only needs to retry when
//! it met elements taken concurrently), exactly as DPDK 22.11 does.
//! Element addresses are absolute virtual addresses, the same in every
//! process.
//!
//! Without `cmpxchg16b` (not x86-64, or a CPU without it) the handler
//! falls back to the spinlock `stack`; every process of an instance runs
//! on the same machine, so they all make the same choice.
//!
//! Under `cfg(loom)` the 16-byte head is a loom mutex around the pair (a
//! linearizable stand-in for the hardware CAS) and the rest uses loom's
//! atomics, so the list protocol can be model-checked (`tests/loom.rs`).

// Stack memory is 64-byte aligned (zones, or the 64-aligned allocation):
// the header and element casts are aligned.
#![allow(clippy::cast_ptr_alignment)]

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// One element: an object pointer and the next element's address (0 at
/// the bottom of a list).
#[repr(C)]
pub struct LfElem {
    data: AtomicU64,
    next: AtomicU64,
}

impl LfElem {
    fn new(next: u64) -> Self {
        Self {
            data: AtomicU64::new(0),
            next: AtomicU64::new(next),
        }
    }
}

/// A `(top, counter)` pair swapped as one 16-byte unit.
#[repr(C, align(16))]
struct DwHead {
    #[cfg(not(loom))]
    top: AtomicU64,
    #[cfg(not(loom))]
    cnt: AtomicU64,
    #[cfg(loom)]
    pair: loom::sync::Mutex<(u64, u64)>,
}

impl DwHead {
    fn new(top: u64) -> Self {
        #[cfg(not(loom))]
        {
            Self {
                top: AtomicU64::new(top),
                cnt: AtomicU64::new(0),
            }
        }
        #[cfg(loom)]
        {
            Self {
                pair: loom::sync::Mutex::new((top, 0)),
            }
        }
    }

    /// The pair, possibly torn (top and counter from different moments):
    /// a torn value fails the next CAS, which returns the real one. A CAS
    /// that succeeds proves the head did not change since the counter was
    /// read (the counter never repeats), so a traversal made in between
    /// saw a stable list.
    #[cfg(not(loom))]
    fn load(&self) -> (u64, u64) {
        let top = self.top.load(Ordering::Acquire);
        let cnt = self.cnt.load(Ordering::Acquire);
        (top, cnt)
    }

    #[cfg(loom)]
    fn load(&self) -> (u64, u64) {
        *self
            .pair
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces `old` by `new` if the pair is `old`; else returns the
    /// current pair.
    #[cfg(all(not(loom), target_arch = "x86_64"))]
    fn cas(&self, old: (u64, u64), new: (u64, u64)) -> Result<(), (u64, u64)> {
        // SAFETY: `self` is 16-byte aligned (repr(align(16))) and its two
        // words are atomics, so a locked 16-byte write is allowed through
        // a shared reference; cmpxchg16b was found on this CPU before any
        // list was built (`cas128_supported`).
        unsafe { cas128(std::ptr::from_ref(self).cast_mut().cast::<u64>(), old, new) }
    }

    #[cfg(all(not(loom), not(target_arch = "x86_64")))]
    fn cas(&self, _old: (u64, u64), _new: (u64, u64)) -> Result<(), (u64, u64)> {
        unreachable!("lf_stack lists are only built where cmpxchg16b exists")
    }

    #[cfg(loom)]
    fn cas(&self, old: (u64, u64), new: (u64, u64)) -> Result<(), (u64, u64)> {
        let mut g = self
            .pair
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *g == old {
            *g = new;
            Ok(())
        } else {
            Err(*g)
        }
    }
}

/// `lock cmpxchg16b` on the 16 bytes at `dst`.
///
/// # Safety
/// `dst` is 16-byte aligned and valid for reads and writes of 16 bytes;
/// the CPU has `cmpxchg16b`.
#[cfg(all(not(loom), target_arch = "x86_64"))]
unsafe fn cas128(dst: *mut u64, old: (u64, u64), new: (u64, u64)) -> Result<(), (u64, u64)> {
    let (prev_lo, prev_hi): (u64, u64);
    let flag: u64;
    // SAFETY: the caller's contract. rbx cannot be an operand (LLVM may
    // use it), so the new low word goes through r8 and rbx is restored.
    // Every operand has a fixed register: a `reg` operand may be given
    // rbx itself, which the swap would clobber.
    unsafe {
        core::arch::asm!(
            "xchg r8, rbx",
            "lock cmpxchg16b xmmword ptr [rsi]",
            "sete cl",
            "mov rbx, r8",
            in("rsi") dst,
            inout("r8") new.0 => _,
            inout("rcx") new.1 => flag,
            inout("rax") old.0 => prev_lo,
            inout("rdx") old.1 => prev_hi,
            options(nostack),
        );
    }
    // `sete` wrote 0 or 1 into cl, the low byte of rcx.
    let ok = flag & 0xff;
    if ok != 0 {
        Ok(())
    } else {
        Err((prev_lo, prev_hi))
    }
}

/// Whether this CPU can run the lock-free lists (x86-64 with
/// `cmpxchg16b`); where not, the `lf_stack` handler is the locked stack.
pub fn cas128_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("cmpxchg16b")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One list: head pair and length, on a cache line of its own.
#[repr(C, align(64))]
struct LfList {
    head: DwHead,
    len: AtomicU64,
}

/// Element at `addr`.
///
/// # Safety
/// `addr` is the address of an element of a live stack.
unsafe fn elem<'a>(addr: u64) -> &'a LfElem {
    // SAFETY: the caller's contract.
    unsafe { &*(addr as *const LfElem) }
}

impl LfList {
    fn new(top: u64, len: u64) -> Self {
        Self {
            head: DwHead::new(top),
            len: AtomicU64::new(len),
        }
    }

    /// Pushes the chain `first ..= last` of `num` elements (DPDK's
    /// `__rte_stack_lf_push_elems`).
    ///
    /// # Safety
    /// The chain's elements belong to this stack and to the caller alone.
    unsafe fn push(&self, first: u64, last: u64, num: u64) {
        let mut old = self.head.load();
        loop {
            // SAFETY: `last` is ours (the caller's contract).
            unsafe { elem(last) }.next.store(old.0, Ordering::Relaxed);
            match self.head.cas(old, (first, old.1.wrapping_add(1))) {
                Ok(()) => break,
                Err(cur) => old = cur,
            }
        }
        self.len.fetch_add(num, Ordering::Release);
    }

    /// Pops `num` elements, copying their object pointers into `out` (top
    /// first) when given; returns the chain `(first, last)`, or `None`
    /// (nothing taken) when the list holds fewer than `num` (DPDK's
    /// `__rte_stack_lf_pop_elems`).
    ///
    /// # Safety
    /// Every element address reachable from the head belongs to this
    /// stack (true for lists only changed through `push` and `pop`).
    unsafe fn pop(&self, num: u64, mut out: Option<&mut [u64]>) -> Option<(u64, u64)> {
        // Reserve `num` elements on the length first.
        let mut len = self.len.load(Ordering::Acquire);
        loop {
            if len < num {
                return None;
            }
            match self
                .len
                .compare_exchange(len, len - num, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(l) => len = l,
            }
        }
        let mut old = self.head.load();
        loop {
            let mut tmp = old.0;
            let mut last = 0;
            let mut i = 0;
            while i < num && tmp != 0 {
                // SAFETY: reachable from the head: an element of ours. It
                // may be popped concurrently; then the CAS below fails
                // (its memory stays mapped, the reads are atomic).
                let e = unsafe { elem(tmp) };
                if let Some(o) = out.as_deref_mut() {
                    o[i as usize] = e.data.load(Ordering::Relaxed);
                }
                last = tmp;
                tmp = e.next.load(Ordering::Relaxed);
                i += 1;
            }
            if i != num {
                // Met the bottom: the list changed under the traversal
                // (our reserved elements are being pushed); look again.
                #[cfg(loom)]
                loom::thread::yield_now();
                #[cfg(not(loom))]
                std::hint::spin_loop();
                old = self.head.load();
                continue;
            }
            match self.head.cas(old, (tmp, old.1.wrapping_add(1))) {
                Ok(()) => return Some((old.0, last)),
                Err(cur) => old = cur,
            }
        }
    }
}

/// The start of an `lf_stack` zone; `cap` [`LfElem`]s follow at
/// `elems`.
#[repr(C, align(64))]
pub struct LfStackHeader {
    used: LfList,
    free: LfList,
    cap: u64,
    elems: u64,
}

/// Bytes an `lf_stack` of `cap` objects takes (header plus elements).
pub fn lf_stack_bytes(cap: u32) -> usize {
    std::mem::size_of::<LfStackHeader>() + cap as usize * std::mem::size_of::<LfElem>()
}

/// A view of a stack (header and elements at fixed addresses).
pub(crate) struct LfStackRef {
    hdr: *const LfStackHeader,
}

// SAFETY: the stack is made of atomics; the pointer stays valid as long
// as the owner (zone or heap allocation) lives, which the owner enforces.
unsafe impl Send for LfStackRef {}
// SAFETY: as above.
unsafe impl Sync for LfStackRef {}

impl LfStackRef {
    /// Writes an empty stack of `cap` objects at `mem` (all elements on
    /// the free list) and returns a view of it.
    ///
    /// # Safety
    /// `mem` is 64-byte aligned, valid for [`lf_stack_bytes`]`(cap)`
    /// bytes, and not used by anyone else until this returns.
    pub(crate) unsafe fn init(mem: *mut u8, cap: u32) -> Self {
        let hdr = mem.cast::<LfStackHeader>();
        // SAFETY: inside the `lf_stack_bytes(cap)` bytes given.
        let elems = unsafe { mem.add(std::mem::size_of::<LfStackHeader>()) }.cast::<LfElem>();
        let esz = std::mem::size_of::<LfElem>() as u64;
        for i in 0..cap as usize {
            let next = if i + 1 < cap as usize {
                elems as u64 + (i as u64 + 1) * esz
            } else {
                0
            };
            // SAFETY: element i of cap, inside the memory given.
            unsafe { elems.add(i).write(LfElem::new(next)) };
        }
        let top = if cap == 0 { 0 } else { elems as u64 };
        // SAFETY: the header's place, 64-aligned, ours alone.
        unsafe {
            hdr.write(LfStackHeader {
                used: LfList::new(0, 0),
                free: LfList::new(top, u64::from(cap)),
                cap: u64::from(cap),
                elems: elems as u64,
            });
        }
        Self { hdr }
    }

    /// A view of a stack `init` built at `mem`.
    ///
    /// # Safety
    /// `mem` holds an initialised stack that outlives the view.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) unsafe fn open(mem: *const u8) -> Self {
        Self { hdr: mem.cast() }
    }

    fn hdr(&self) -> &LfStackHeader {
        // SAFETY: valid while the owner lives (constructors' contracts).
        unsafe { &*self.hdr }
    }

    /// Capacity in objects.
    pub(crate) fn cap(&self) -> u64 {
        self.hdr().cap
    }

    /// Address of element 0.
    pub(crate) fn elems_addr(&self) -> u64 {
        self.hdr().elems
    }

    /// Pushes all of `objs`; `false` (nothing pushed) when fewer than
    /// `objs.len()` elements are free (more puts than objects).
    pub(crate) fn push(&self, objs: &[u64]) -> bool {
        let n = objs.len() as u64;
        if n == 0 {
            return true;
        }
        let h = self.hdr();
        // SAFETY: the free list holds only this stack's elements.
        let Some((first, last)) = (unsafe { h.free.pop(n, None) }) else {
            return false;
        };
        let mut tmp = first;
        for i in 0..objs.len() {
            // SAFETY: the chain of n elements just popped is ours alone.
            let e = unsafe { elem(tmp) };
            e.data.store(objs[objs.len() - 1 - i], Ordering::Relaxed);
            tmp = e.next.load(Ordering::Relaxed);
        }
        // SAFETY: the chain is ours alone and of this stack.
        unsafe { h.used.push(first, last, n) };
        true
    }

    /// Pops exactly `out.len()` objects (the last pushed first), or none
    /// (`false`).
    pub(crate) fn pop(&self, out: &mut [u64]) -> bool {
        let n = out.len() as u64;
        if n == 0 {
            return true;
        }
        let h = self.hdr();
        // SAFETY: the used list holds only this stack's elements.
        let Some((first, last)) = (unsafe { h.used.pop(n, Some(out)) }) else {
            return false;
        };
        // SAFETY: the chain just popped is ours alone and of this stack.
        unsafe { h.free.push(first, last, n) };
        true
    }

    /// Objects on the stack (may lag concurrent pushes by a moment).
    pub(crate) fn len(&self) -> u64 {
        self.hdr().used.len.load(Ordering::Relaxed)
    }
}

/// A process-local lock-free stack of `u64`s on the heap, with the same
/// lists as the `lf_stack` handler's shared one: for models (loom) and
/// tests of the list protocol without hugepages.
pub struct LfStack {
    view: LfStackRef,
    mem: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the stack is made of atomics; `mem` is owned and freed once.
unsafe impl Send for LfStack {}
// SAFETY: as above.
unsafe impl Sync for LfStack {}

impl LfStack {
    /// A stack for `cap` values; `None` where the CPU lacks a 16-byte CAS
    /// (outside loom) or the allocation fails.
    pub fn new(cap: u32) -> Option<Self> {
        if !cfg!(loom) && !cas128_supported() {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(lf_stack_bytes(cap), 64).ok()?;
        // SAFETY: the layout has a non-zero size (the header).
        let mem = unsafe { std::alloc::alloc(layout) };
        if mem.is_null() {
            return None;
        }
        // SAFETY: fresh allocation of the right size and alignment.
        let view = unsafe { LfStackRef::init(mem, cap) };
        Some(Self { view, mem, layout })
    }

    /// Pushes all of `vals` or, with fewer free places, nothing (`false`).
    pub fn push(&self, vals: &[u64]) -> bool {
        self.view.push(vals)
    }

    /// Pops exactly `out.len()` values (last pushed first) or nothing
    /// (`false`).
    pub fn pop(&self, out: &mut [u64]) -> bool {
        self.view.pop(out)
    }

    /// Values on the stack.
    pub fn len(&self) -> u64 {
        self.view.len()
    }

    /// Holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for LfStack {
    fn drop(&mut self) {
        let cap = self.view.cap() as usize;
        let elems = self.view.elems_addr() as *mut LfElem;
        // SAFETY: we own the allocation; its header and `cap` elements were
        // written by `init` and are dropped once here (loom's atomics have
        // destructors), then the memory is freed with its layout.
        unsafe {
            for i in 0..cap {
                std::ptr::drop_in_place(elems.add(i));
            }
            std::ptr::drop_in_place(self.mem.cast::<LfStackHeader>());
            std::alloc::dealloc(self.mem, self.layout);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn pushes_and_pops_are_lifo_and_all_or_nothing() {
        let Some(s) = LfStack::new(8) else {
            eprintln!("SKIPPED: no cmpxchg16b");
            return;
        };
        assert!(s.is_empty());
        assert!(s.push(&[1, 2, 3]));
        assert!(s.push(&[4, 5]));
        assert_eq!(s.len(), 5);
        let mut out = [0; 2];
        assert!(s.pop(&mut out));
        assert_eq!(out, [5, 4]);
        let mut out = [0; 4];
        assert!(!s.pop(&mut out), "only 3 left: nothing taken");
        assert_eq!(s.len(), 3);
        assert!(!s.push(&[9; 6]), "5 free places: nothing pushed");
        assert!(s.push(&[6, 7, 8, 9, 10]));
        let mut out = [0; 8];
        assert!(s.pop(&mut out));
        assert_eq!(out, [10, 9, 8, 7, 6, 3, 2, 1]);
        assert!(s.is_empty());
        assert!(s.pop(&mut []));
    }

    #[test]
    fn many_threads_keep_every_value_exactly_once() {
        let Some(s) = LfStack::new(1024) else {
            eprintln!("SKIPPED: no cmpxchg16b");
            return;
        };
        let vals: Vec<u64> = (1..=1024).collect();
        assert!(s.push(&vals));
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let s = &s;
                sc.spawn(move || {
                    let mut held = [0u64; 7];
                    for round in 0..20_000u64 {
                        let k = 1 + ((round + t) % 7) as usize;
                        if s.pop(&mut held[..k]) {
                            assert!(held[..k].iter().all(|&v| (1..=1024).contains(&v)));
                            assert!(s.push(&held[..k]));
                        }
                    }
                });
            }
        });
        let mut all = vec![0u64; 1024];
        assert!(s.pop(&mut all));
        all.sort_unstable();
        assert_eq!(all, vals, "nothing lost or duplicated");
    }
}

// --- the handler ---------------------------------------------------------

#[cfg(not(loom))]
pub(crate) use backend::LfStackHandler;

/// The handler and backend (not built under loom: they need the memzone
/// and ring code, which loom builds leave out).
#[cfg(not(loom))]
mod backend {
    use super::{cas128_supported, lf_stack_bytes, LfStackHeader, LfStackRef};

    use memplane::heap::SOCKET_ID_ANY;
    use memplane::memzone::{Memzone, MemzoneFlags};
    use memplane::Memory;

    use crate::handler::{Backend, BackendParams, Handler, StackHandler};
    use crate::MempoolError;

    /// DPDK's `lf_stack` mempool ops: registered as `lf_stack`.
    pub(crate) struct LfStackHandler;

    /// Zone of a pool's lock-free stack.
    fn lf_zone(pool: &str) -> String {
        format!("ML_{pool}")
    }

    struct LfStackBackend<'m> {
        zone: Memzone<'m>,
        stack: LfStackRef,
        name: String,
    }

    fn words(objs: &[*mut u8]) -> &[u64] {
        // SAFETY: pointers are 8-byte integers on the 64-bit targets memplane
        // supports; reading a pointer's bits as an integer is always valid.
        unsafe { std::slice::from_raw_parts(objs.as_ptr().cast::<u64>(), objs.len()) }
    }

    fn words_mut(objs: &mut [*mut u8]) -> &mut [u64] {
        // SAFETY: as `words`; any u64 written is a valid (raw) pointer value.
        unsafe { std::slice::from_raw_parts_mut(objs.as_mut_ptr().cast::<u64>(), objs.len()) }
    }

    impl Handler for LfStackHandler {
        fn create<'m>(
            &self,
            mem: &'m Memory,
            p: &BackendParams,
        ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
            if !cas128_supported() {
                tracing::warn!(
                    pool = p.name,
                    "no 16-byte CAS on this CPU: lf_stack is the locked stack"
                );
                return StackHandler.create(mem, p);
            }
            let socket = if p.socket < 0 {
                SOCKET_ID_ANY
            } else {
                p.socket
            };
            let zone = mem.memzone_reserve_aligned(
                &lf_zone(&p.name),
                lf_stack_bytes(p.n),
                socket,
                MemzoneFlags::NONE,
                64,
            )?;
            // SAFETY: a fresh zone of lf_stack_bytes(n) bytes, 64-aligned; no
            // other process opens it before the pool is published.
            let stack = unsafe { LfStackRef::init(zone.as_mut_ptr(), p.n) };
            Ok(Box::new(LfStackBackend {
                zone,
                stack,
                name: p.name.clone(),
            }))
        }

        fn attach<'m>(
            &self,
            mem: &'m Memory,
            p: &BackendParams,
        ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
            if !cas128_supported() {
                return StackHandler.attach(mem, p);
            }
            let zone =
                mem.memzone_lookup(&lf_zone(&p.name))
                    .ok_or_else(|| MempoolError::NotFound {
                        name: p.name.clone(),
                    })?;
            if zone.len() < lf_stack_bytes(p.n) {
                return Err(MempoolError::Corrupt {
                    name: p.name.clone(),
                    why: format!("lf_stack zone of {} bytes for {} objects", zone.len(), p.n),
                });
            }
            // SAFETY: the zone holds the stack the creator initialised before
            // publishing the pool (its size checked above).
            let stack = unsafe { LfStackRef::open(zone.as_ptr()) };
            let elems = zone.as_ptr() as u64 + std::mem::size_of::<LfStackHeader>() as u64;
            if stack.cap() != u64::from(p.n) || stack.elems_addr() != elems {
                return Err(MempoolError::Corrupt {
                    name: p.name.clone(),
                    why: format!(
                        "lf_stack header says {} objects with elements at {:#x}; the pool has {} and they belong at {elems:#x}",
                        stack.cap(),
                        stack.elems_addr(),
                        p.n
                    ),
                });
            }
            Ok(Box::new(LfStackBackend {
                zone,
                stack,
                name: p.name.clone(),
            }))
        }
    }

    impl Backend for LfStackBackend<'_> {
        fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
            if self.stack.push(words(objs)) {
                Ok(())
            } else {
                Err(MempoolError::Corrupt {
                    name: self.name.clone(),
                    why: format!(
                        "lf_stack of {} holds {}, cannot take {} more",
                        self.stack.cap(),
                        self.stack.len(),
                        objs.len()
                    ),
                })
            }
        }

        fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
            let n = out.len() as u32;
            if self.stack.pop(words_mut(out)) {
                Ok(())
            } else {
                Err(MempoolError::NotEnough {
                    requested: n,
                    available: self.stack.len() as u32,
                })
            }
        }

        fn count(&self) -> u32 {
            self.stack.len() as u32
        }

        fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
            let LfStackBackend { zone, .. } = *self;
            zone.free()?;
            Ok(())
        }
    }
}
