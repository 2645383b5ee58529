//! The malloc API on [`Instance`] (reached through a
//! [`Memory`](crate::Memory) handle): picking the heap, growing it with
//! pages, giving pages back, and the lookups and reports.

use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use super::classes::UNIT;
use super::core::{
    self as hc, HeapHeader, Locked, Want, HDR, HEAP_KIND_EXTERNAL, HEAP_KIND_NATIVE,
    HEAP_KIND_UNUSED, HEAP_MATCH_ALLOC,
};
use super::extmem::{ExtChunk, EXT_SEG_BASE};
use super::tcache::{self, CacheSlot, CacheToken, SlotTable, CACHE_MAX, SLOTS_PER_HEAP};
use super::{ElemInfo, HeapError, HeapKind, HeapStats, SocketName, SOCKET_ID_ANY};
use crate::memseg::layout::{name_str, MEMSEG_DO_NOT_FREE, MEMSEG_HEAP};
use crate::memseg::{MemsegError, PageRequest, PageRun};
use crate::numa::Topology;
use crate::units::{format_size, PageSize};
use crate::{Error, Instance, Result};

/// A set of page sizes, as a bit per power of two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSizes(u64);

impl PageSizes {
    /// No preference.
    pub const ANY: PageSizes = PageSizes(0);

    /// Only `size`.
    pub fn only(size: PageSize) -> PageSizes {
        PageSizes(1 << size.bytes().trailing_zeros())
    }

    /// This set and `size`.
    #[must_use]
    pub fn with(self, size: PageSize) -> PageSizes {
        PageSizes(self.0 | 1 << size.bytes().trailing_zeros())
    }

    /// Whether no size is named.
    pub fn is_any(self) -> bool {
        self.0 == 0
    }

    /// Whether `size` is in the set (always, for [`ANY`](Self::ANY)).
    pub fn accepts(self, bytes: u64) -> bool {
        self.0 == 0 || self.0 & (1 << bytes.trailing_zeros()) != 0
    }
}

/// A full allocation request for [`heap_alloc`](Instance::heap_alloc):
/// [`malloc`](Instance::malloc) and friends are shorthands for the common
/// cases.
///
/// ```no_run
/// use memplane::heap::{AllocRequest, PageSizes};
/// use memplane::{MemOptions, Memory, PageSize};
///
/// let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-req"])?)?;
/// // 1 MiB, 4 KiB aligned, not crossing a 2 MiB boundary, physically
/// // contiguous, on 2 MiB pages if there are any, node 0.
/// let req = AllocRequest::new(1 << 20)
///     .align(4096)
///     .bound(2 << 20)
///     .contig()
///     .page_sizes(PageSizes::only(PageSize::SIZE_2M), true)
///     .socket(0);
/// let p = mem.heap_alloc(&req)?;
/// // SAFETY: not used after this.
/// unsafe { mem.free(p)? };
/// # Ok::<(), memplane::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct AllocRequest {
    /// Bytes wanted.
    pub size: usize,
    /// Alignment: 0 (the default, 64) or a power of two.
    pub align: usize,
    /// 0, or a power of two >= size: the block never crosses a multiple.
    pub bound: usize,
    /// Socket id ([`SOCKET_ID_ANY`], a node, or an external heap's id).
    pub socket: i32,
    /// Pages the block must lie on.
    pub page_sizes: PageSizes,
    /// `page_sizes` is a preference: fall back to any size.
    pub size_hint_only: bool,
    /// The block must be IOVA-contiguous.
    pub contig: bool,
    /// Zero the block.
    pub zero: bool,
    /// Past the thread cache: a long-lived block (a memzone) should not
    /// pull a refill of neighbours into this thread's cache.
    pub uncached: bool,
}

impl AllocRequest {
    /// `size` bytes, default alignment, any node.
    pub fn new(size: usize) -> Self {
        AllocRequest {
            size,
            align: 0,
            bound: 0,
            socket: SOCKET_ID_ANY,
            page_sizes: PageSizes::ANY,
            size_hint_only: false,
            contig: false,
            zero: false,
            uncached: false,
        }
    }

    /// Bypasses the thread cache (a long-lived block).
    #[must_use]
    pub fn uncached(mut self) -> Self {
        self.uncached = true;
        self
    }
    /// Sets the alignment.
    #[must_use]
    pub fn align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }
    /// Sets the boundary.
    #[must_use]
    pub fn bound(mut self, bound: usize) -> Self {
        self.bound = bound;
        self
    }
    /// Sets the socket.
    #[must_use]
    pub fn socket(mut self, socket: i32) -> Self {
        self.socket = socket;
        self
    }
    /// Asks for IOVA-contiguous memory.
    #[must_use]
    pub fn contig(mut self) -> Self {
        self.contig = true;
        self
    }
    /// Asks for zeroed memory.
    #[must_use]
    pub fn zeroed(mut self) -> Self {
        self.zero = true;
        self
    }
    /// Page sizes, strictly or as a hint.
    #[must_use]
    pub fn page_sizes(mut self, sizes: PageSizes, hint_only: bool) -> Self {
        self.page_sizes = sizes;
        self.size_hint_only = hint_only;
        self
    }
}

/// One heap, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct HeapInfo {
    /// Slot in the heap table.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Socket id.
    pub socket: i32,
    /// Native or external.
    pub kind: HeapKind,
    /// Counters.
    pub stats: HeapStats,
}

/// This process's view of the heap table in the shared config.
pub(crate) struct Heaps {
    heads: *mut HeapHeader,
    max: u32,
    pub(super) ext: *mut ExtChunk,
    pub(super) max_ext: u32,
    /// (node, heap slot) of every native heap, in node order.
    native: Vec<(u32, u16)>,
    /// Thread-cache slots: `SLOTS_PER_HEAP` per native heap, in slot order.
    tcache: *mut CacheSlot,
    token: std::sync::Arc<CacheToken>,
    /// The lists' pages, to check links against after a crash.
    page_map: std::sync::OnceLock<PageMap>,
}

/// Which pages belong to heaps: (base, length, page size, the list's
/// fbarray view) per memseg list.
pub(crate) struct PageMap {
    pub(crate) lists: Vec<(usize, usize, usize, crate::fbarray::FbArray<'static>)>,
}

impl PageMap {
    /// Whether every page of `[addr, addr + len)` is a used heap page.
    fn owns(&self, addr: u64, len: u64) -> bool {
        let (Ok(start), Ok(len)) = (usize::try_from(addr), usize::try_from(len)) else {
            return false;
        };
        let end = start.saturating_add(len);
        let mut p = start;
        while p < end {
            let Some((base, _, page, segs)) = self.lists.iter().find(|l| p >= l.0 && p - l.0 < l.1)
            else {
                return false;
            };
            let slot = ((p - base) / page) as u32;
            if !segs.is_used(slot).unwrap_or(false) {
                return false;
            }
            let flags = segs
                .get_ptr::<crate::memseg::layout::Memseg>(slot)
                .ok()
                .map_or(0, |m| {
                    // SAFETY: an element of the fbarray in the config mapping;
                    // an aligned u32 read cannot tear.
                    unsafe { std::ptr::addr_of!((*m.as_ptr()).flags).read_volatile() }
                });
            if flags & MEMSEG_HEAP == 0 {
                return false;
            }
            p = (p / page + 1) * page;
        }
        true
    }
}

// SAFETY: the pointers lead into the shared config mapping owned by the
// `Memory` that owns this value; all access goes through the heaps' locks
// or the hotplug lock.
unsafe impl Send for Heaps {}
// SAFETY: as above.
unsafe impl Sync for Heaps {}

impl Heaps {
    /// Creates the native heaps (one per node) in a fresh table.
    ///
    /// # Safety
    /// `heads` and `ext` point at zero-filled tables of `max` and `max_ext`
    /// entries inside the config mapping, which outlives the value.
    pub(crate) unsafe fn init(
        heads: *mut u8,
        max: u32,
        ext: *mut u8,
        max_ext: u32,
        tcache: *mut u8,
        topology: &Topology,
        match_alloc: bool,
    ) -> Result<Heaps> {
        let nodes = topology.node_ids();
        if nodes.len() > max as usize {
            return Err(HeapError::TableFull {
                what: "the heap table",
                max,
                option: "--max-heaps (one heap per NUMA node is needed)",
            }
            .into());
        }
        #[allow(clippy::cast_ptr_alignment)] // the layout aligns both to 64
        let h = Heaps {
            heads: heads.cast::<HeapHeader>(),
            max,
            ext: ext.cast::<ExtChunk>(),
            max_ext,
            native: nodes
                .iter()
                .enumerate()
                .map(|(i, &n)| (n, i as u16))
                .collect(),
            tcache: tcache.cast::<CacheSlot>(),
            token: CacheToken::new(),
            page_map: std::sync::OnceLock::new(),
        };
        for &(node, idx) in &h.native {
            let mut l = h.lock(idx);
            l.reset(
                node as i32,
                if match_alloc { HEAP_MATCH_ALLOC } else { 0 },
                &format!("socket_{node}"),
            );
            drop(l);
            h.kind_word(idx).store(HEAP_KIND_NATIVE, Ordering::Release);
        }
        Ok(h)
    }

    /// A view of the heap table another process set up: the native heaps
    /// are the entries of kind native, in table order.
    ///
    /// # Safety
    /// As [`init`](Self::init), for tables that are complete (the primary
    /// set the config's magic after creating them).
    pub(crate) unsafe fn attach(
        heads: *mut u8,
        max: u32,
        ext: *mut u8,
        max_ext: u32,
        tcache: *mut u8,
    ) -> Heaps {
        #[allow(clippy::cast_ptr_alignment)] // the layout aligns both to 64
        let mut h = Heaps {
            heads: heads.cast::<HeapHeader>(),
            max,
            ext: ext.cast::<ExtChunk>(),
            max_ext,
            native: Vec::new(),
            tcache: tcache.cast::<CacheSlot>(),
            token: CacheToken::new(),
            page_map: std::sync::OnceLock::new(),
        };
        h.native = (0..max as u16)
            .filter(|&i| h.kind(i) == HEAP_KIND_NATIVE)
            .filter_map(|i| u32::try_from(h.head_socket(i)).ok().map(|n| (n, i)))
            .collect();
        h
    }

    /// The heap's kind word (an atomic: shared by reference while other
    /// fields are written through raw pointers under the heap lock).
    pub(super) fn kind_word(&self, idx: u16) -> &AtomicU32 {
        // SAFETY: idx < max (callers index from the table or `native`);
        // the table is in the config mapping, which outlives `self`; only
        // the atomic field is borrowed.
        unsafe { &*std::ptr::addr_of!((*self.heads.add(idx as usize)).kind) }
    }

    /// The token thread-exit hooks check before touching the config.
    pub(crate) fn token(&self) -> &std::sync::Arc<CacheToken> {
        &self.token
    }

    /// The thread-cache slots of heap `idx` (native heaps only).
    pub(super) fn slot_table(&self, idx: u16) -> Option<SlotTable> {
        if (idx as usize) >= self.native.len() {
            return None;
        }
        Some(SlotTable {
            // SAFETY: idx < native heaps, so the array is inside the
            // section the layout sized for them.
            base: unsafe { self.tcache.add(idx as usize * SLOTS_PER_HEAP) },
            orphans: tcache::orphans_of(
                // SAFETY: idx < max.
                unsafe { self.heads.add(idx as usize) },
            ),
        })
    }

    /// Blocks and bytes sitting in the thread caches of heap `idx`.
    pub(super) fn cached(&self, idx: u16) -> (u64, u64) {
        let Some(t) = self.slot_table(idx) else {
            return (0, 0);
        };
        (0..SLOTS_PER_HEAP).fold((0, 0), |(c, b), i| {
            let (c2, b2) = t.slot(i).held();
            (c + c2, b + b2)
        })
    }

    pub(super) fn lock(&self, idx: u16) -> Locked<'_> {
        // SAFETY: the head is in the config mapping that outlives `self`;
        // heap memory stays mapped while it is in a heap.
        let (mut l, took_over) = unsafe { Locked::lock_robust(self.heads.add(idx as usize), idx) };
        if took_over {
            self.recover(&mut l, idx);
        }
        l
    }

    /// After taking a lock over from a dead holder: validate, and rebuild
    /// the free lists and counters if the holder left them half-updated.
    fn recover(&self, l: &mut Locked<'_>, idx: u16) {
        let owns = |a: u64, n: u64| {
            self.page_map.get().is_some_and(|m| m.owns(a, n))
                || self.ext_contains(idx, a as usize, n as usize)
        };
        match l.validate(&owns, false) {
            Ok(()) => tracing::warn!(heap = idx, "heap consistent after its lock holder died"),
            Err(c) => {
                tracing::error!(heap = idx, addr = c.addr, what = %c.what, "heap inconsistent after its lock holder died: rebuilding its free lists");
                match l.rebuild(&owns).and_then(|()| l.validate(&owns, false)) {
                    Ok(()) => tracing::warn!(heap = idx, "heap rebuilt"),
                    Err(c) => {
                        tracing::error!(heap = idx, addr = c.addr, what = %c.what, "heap cannot be fully repaired");
                    }
                }
            }
        }
    }

    /// Gives the heaps the view of the memseg lists they check links
    /// against when recovering from a dead lock holder.
    pub(crate) fn set_page_map(&self, map: PageMap) {
        let _ = self.page_map.set(map);
    }

    pub(super) fn max(&self) -> u32 {
        self.max
    }

    pub(super) fn kind(&self, idx: u16) -> u32 {
        self.kind_word(idx).load(Ordering::Acquire)
    }

    fn native_of_node(&self, node: u32) -> Option<u16> {
        self.native.iter().find(|n| n.0 == node).map(|n| n.1)
    }

    /// The heap slot of a socket id.
    pub(super) fn by_socket(&self, socket: i32) -> Option<u16> {
        if let Ok(node) = u32::try_from(socket) {
            if let Some(i) = self.native_of_node(node) {
                return Some(i);
            }
        }
        (0..self.max as u16)
            .find(|&i| self.kind(i) == HEAP_KIND_EXTERNAL && self.head_socket(i) == socket)
    }

    pub(super) fn head_socket(&self, idx: u16) -> i32 {
        // SAFETY: as in `kind_word`; the field changes only when a heap is
        // created (under the hotplug and heap locks), before `kind` is
        // published with Release, which readers load with Acquire first.
        unsafe { std::ptr::addr_of!((*self.heads.add(idx as usize)).socket_id).read() }
    }

    pub(super) fn head_name(&self, idx: u16) -> String {
        // SAFETY: as in `head_socket`.
        let name = unsafe { std::ptr::addr_of!((*self.heads.add(idx as usize)).name).read() };
        name_str(&name).to_string()
    }

    /// The heap slot of a name.
    pub(super) fn by_name(&self, name: &str) -> Option<u16> {
        (0..self.max as u16)
            .find(|&i| self.kind(i) != HEAP_KIND_UNUSED && self.head_name(i) == name)
    }

    /// "socket_0 (socket 0), ..." for messages.
    pub(super) fn known(&self) -> String {
        let v: Vec<String> = (0..self.max as u16)
            .filter(|&i| self.kind(i) != HEAP_KIND_UNUSED)
            .map(|i| format!("{} (socket {})", self.head_name(i), self.head_socket(i)))
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    /// Adds the preallocated runs to their nodes' heaps.
    pub(crate) fn add_initial(&self, mem: &Instance, runs: &[PageRun]) {
        for r in runs {
            let Some(idx) = self.native_of_node(r.node) else {
                continue;
            };
            let mut l = self.lock(idx);
            l.add_memory(r.va as u64, r.len as u64, r.list, !r.zeroed, r.count);
            drop(l);
            tracing::debug!(
                heap = idx,
                va = format_args!("{:#x}", r.va),
                len = r.len,
                "initial memory added to heap"
            );
        }
        let _ = mem;
    }
}

/// How a block's memory is found: `(heap slot, segment)`.
fn locate(mem: &Instance, addr: usize) -> Option<(u16, u32)> {
    if let Some((list, node, _)) = mem.list_at(addr) {
        return mem.heap.native_of_node(node).map(|h| (h, list));
    }
    mem.heap.ext_chunk_of(addr)
}

impl Instance {
    // --- the C-style API ---------------------------------------------------

    /// Allocates `size` bytes aligned to `align` (0: 64; else a power of
    /// two) from the caller's node's heap, then the other nodes' (DPDK's
    /// `rte_malloc`). Not zeroed.
    pub fn malloc(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.heap_alloc(&AllocRequest::new(size).align(align))
    }

    /// [`malloc`](Self::malloc) with the memory zeroed. Fresh pages are
    /// zero already and are not cleared again.
    pub fn zmalloc(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.heap_alloc(&AllocRequest::new(size).align(align).zeroed())
    }

    /// `num * size` zeroed bytes; an overflowing product is an error.
    pub fn calloc(&self, num: usize, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.calloc_socket(num, size, align, SOCKET_ID_ANY)
    }

    /// [`malloc`](Self::malloc) on `socket` only ([`SOCKET_ID_ANY`]: any).
    pub fn malloc_socket(&self, size: usize, align: usize, socket: i32) -> Result<NonNull<u8>> {
        self.heap_alloc(&AllocRequest::new(size).align(align).socket(socket))
    }

    /// [`zmalloc`](Self::zmalloc) on `socket` only.
    pub fn zmalloc_socket(&self, size: usize, align: usize, socket: i32) -> Result<NonNull<u8>> {
        self.heap_alloc(&AllocRequest::new(size).align(align).socket(socket).zeroed())
    }

    /// [`calloc`](Self::calloc) on `socket` only.
    pub fn calloc_socket(
        &self,
        num: usize,
        size: usize,
        align: usize,
        socket: i32,
    ) -> Result<NonNull<u8>> {
        let total = num.checked_mul(size).ok_or(HeapError::TooLarge {
            size: usize::MAX,
            align,
        })?;
        self.zmalloc_socket(total, align, socket)
    }

    /// Resizes a block: in place when it shrinks or the next element is
    /// free and large enough, else by moving it (the contents up to the
    /// smaller size are kept). `None` allocates. On error the old block is
    /// untouched and still valid.
    ///
    /// # Safety
    /// `ptr` must not be used after a successful call (it may have moved
    /// and been freed), and no reference into it may be alive.
    pub unsafe fn realloc(
        &self,
        ptr: Option<NonNull<u8>>,
        size: usize,
        align: usize,
    ) -> Result<NonNull<u8>> {
        // SAFETY: forwarded contract.
        unsafe { self.realloc_socket(ptr, size, align, SOCKET_ID_ANY) }
    }

    /// [`realloc`](Self::realloc) whose moved block goes to `socket`.
    ///
    /// # Safety
    /// As [`realloc`](Self::realloc).
    pub unsafe fn realloc_socket(
        &self,
        ptr: Option<NonNull<u8>>,
        size: usize,
        align: usize,
        socket: i32,
    ) -> Result<NonNull<u8>> {
        let Some(ptr) = ptr else {
            return self.malloc_socket(size, align, socket);
        };
        let (usize_, align_) = check_size(size, align, 0)?;
        let addr = ptr.as_ptr() as usize;
        let (idx, _) = self.checked_block(addr)?;
        let same_socket = socket == SOCKET_ID_ANY || self.heap.head_socket(idx) == socket;
        let old_asked;
        {
            let mut l = self.heap.lock(idx);
            let e = l
                .check_busy(addr as u64 - HDR)
                .map_err(|f| self.fault(idx, addr, f))?;
            old_asked = e.link_a as usize;
            if same_socket
                && addr as u64 % align_ == 0
                && l.resize(addr as u64 - HDR, usize_, size as u64)
            {
                return Ok(ptr);
            }
        }
        let new = self.malloc_socket(size, align, socket)?;
        // SAFETY: both blocks are live and distinct; the old one holds at
        // least `old_asked` bytes, the new one `size`.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), old_asked.min(size)) };
        // SAFETY: the caller gave the old block up.
        unsafe { self.free(ptr) }?;
        Ok(new)
    }

    /// Gives a block back to its heap, merging it with free neighbours and
    /// returning whole unused pages to the kernel at once. A pointer that
    /// is not a live block (never allocated, inside a block, freed
    /// already, overwritten header) is an error and changes nothing.
    ///
    /// # Safety
    /// The block must not be used after this (nor any reference into it
    /// be alive).
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<()> {
        self.not_in_callback("free")?;
        let addr = ptr.as_ptr() as usize;
        let (idx, _) = self.checked_block(addr)?;
        let elem = addr as u64 - HDR;
        // Fast path: a small block goes into this thread's cache.
        if let Some(data) = tcache::quick_check(elem, idx).filter(|&d| d <= CACHE_MAX) {
            if let Some(slot) = self.my_slot(idx) {
                let bin = tcache::bin_of(data);
                if slot.push(elem, bin) {
                    return Ok(());
                }
                // Full: half of the bin goes back to the heap, under one
                // lock, then this block takes its place.
                let mut l = self.heap.lock(idx);
                l.check_busy(elem).map_err(|f| self.fault(idx, addr, f))?;
                let mut out = Vec::with_capacity(tcache::BIN_CAP / 2);
                slot.drain(bin, tcache::BIN_CAP / 2, &mut out);
                self.give_back(&mut l, idx, &out);
                if slot.push(elem, bin) {
                    return Ok(());
                }
                self.give_back(&mut l, idx, &[elem]);
                return Ok(());
            }
        }
        let mut l = self.heap.lock(idx);
        l.check_busy(elem).map_err(|f| self.fault(idx, addr, f))?;
        self.give_back(&mut l, idx, &[elem]);
        Ok(())
    }

    /// Frees busy elements (checked) into the locked heap `idx`, giving
    /// back pages they leave unused.
    fn give_back(&self, l: &mut Locked<'_>, idx: u16, elems: &[u64]) {
        let native = self.heap.kind(idx) == HEAP_KIND_NATIVE;
        let mut sorted = elems.to_vec();
        sorted.sort_unstable();
        // Blocks that follow each other go back as one element (a cache
        // flush usually gives back neighbours).
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i;
            while j + 1 < sorted.len() && l.continues(sorted[j], sorted[j + 1]) {
                j += 1;
            }
            let merged = l.free_run(&sorted[i..=j], cfg!(debug_assertions));
            if native {
                self.shrink(l, merged);
            }
            i = j + 1;
        }
        // Slots of exited threads are flushed by whoever passes by.
        if let Some(t) = self.heap.slot_table(idx) {
            // SAFETY: the counter is in the heap head, in the config.
            if unsafe { (*t.orphans).load(Ordering::Acquire) } > 0 {
                self.adopt_slots(l, idx, t, false);
            }
        }
    }

    /// Flushes slots of heap `idx` that exited threads left (and with
    /// `check_dead`, slots of dead processes); returns the blocks freed.
    fn adopt_slots(&self, l: &mut Locked<'_>, idx: u16, t: SlotTable, check_dead: bool) -> usize {
        let mut freed = 0;
        for i in 0..SLOTS_PER_HEAP {
            let slot = t.slot(i);
            if !slot.adoptable(check_dead) {
                continue;
            }
            let was_orphan = slot.adoptable(false);
            let (pid, tid) = slot.owner();
            if !slot.adopt() {
                continue;
            }
            let mut out = Vec::new();
            for bin in 0..tcache::BINS {
                slot.drain(bin, tcache::BIN_CAP, &mut out);
            }
            freed += out.len();
            for e in out {
                // A dead process may have left a half-made entry: only
                // blocks that still check out go back.
                if l.check_busy(e).is_ok() {
                    let merged = l.free(e, false);
                    if self.heap.kind(idx) == HEAP_KIND_NATIVE {
                        self.shrink(l, merged);
                    }
                }
            }
            slot.release();
            if was_orphan {
                // SAFETY: as in `give_back`.
                let o = unsafe { &*t.orphans };
                let _ = o.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
            }
            tracing::debug!(
                heap = idx,
                slot = i,
                pid,
                tid,
                "thread cache of a finished thread or process flushed"
            );
        }
        freed
    }

    /// This thread's cache slot of heap `idx`, if it may have one.
    fn my_slot(&self, idx: u16) -> Option<&CacheSlot> {
        let t = self.heap.slot_table(idx)?;
        tcache::my_slot(self.callback_id(), self.heap.token(), idx, Some(t))
    }

    /// Gives every block in this thread's caches back to the heaps (and
    /// their unused pages to the kernel). Blocks sit in a thread's cache
    /// after `free` until its bin overflows, the thread exits, or this.
    pub fn heap_cache_flush(&self) {
        for &(_, idx) in &self.heap.native {
            let Some(slot) = self.my_slot(idx) else {
                continue;
            };
            let mut out = Vec::new();
            for bin in 0..tcache::BINS {
                slot.drain(bin, tcache::BIN_CAP, &mut out);
            }
            if out.is_empty() {
                continue;
            }
            let mut l = self.heap.lock(idx);
            self.give_back(&mut l, idx, &out);
        }
    }

    /// Flushes this thread's caches, the caches exited threads left, and
    /// those of dead processes; returns how many blocks went back.
    pub fn heap_trim(&self) -> usize {
        self.heap_cache_flush();
        let mut n = 0;
        for &(_, idx) in &self.heap.native {
            if let Some(t) = self.heap.slot_table(idx) {
                let mut l = self.heap.lock(idx);
                n += self.adopt_slots(&mut l, idx, t, true);
            }
        }
        n
    }

    /// A heap's counters, with blocks in thread caches counted as free.
    fn stats_of(&self, idx: u16) -> HeapStats {
        let mut st = self.heap.lock(idx).stats();
        let (count, bytes) = self.heap.cached(idx);
        st.alloc_count = st.alloc_count.saturating_sub(count);
        st.alloc_bytes = st.alloc_bytes.saturating_sub(bytes);
        st.free_bytes += bytes;
        st.cached_count = count;
        st
    }

    /// The usable size of a live block (DPDK's `rte_malloc_validate`): at
    /// least what was asked, a multiple of 64.
    pub fn malloc_usable_size(&self, ptr: NonNull<u8>) -> Result<usize> {
        let addr = ptr.as_ptr() as usize;
        let (idx, _) = self.checked_block(addr)?;
        let l = self.heap.lock(idx);
        let e = l
            .check_busy(addr as u64 - HDR)
            .map_err(|f| self.fault(idx, addr, f))?;
        Ok((e.size - HDR) as usize)
    }

    /// The IOVA of a block's first byte (`None` if it has none, e.g.
    /// external memory added without IOVAs).
    pub fn malloc_virt2iova(&self, ptr: NonNull<u8>) -> Option<u64> {
        let addr = ptr.as_ptr() as usize;
        if self.list_at(addr).is_some() {
            return self.virt2iova(addr);
        }
        self.heap.ext_virt2iova(addr)
    }

    /// The general allocation call: every constraint of [`AllocRequest`].
    pub fn heap_alloc(&self, req: &AllocRequest) -> Result<NonNull<u8>> {
        if req.size != 0
            && !req.uncached
            && req.size as u64 <= CACHE_MAX
            && req.align <= 64
            && (req.align == 0 || req.align.is_power_of_two())
            && req.bound == 0
            && !req.contig
            && req.page_sizes.is_any()
        {
            if let Some(p) = self.cached_alloc(req) {
                return p;
            }
        }
        self.not_in_callback("heap_alloc")?;
        let (size, align) = check_size(req.size, req.align, req.bound)?;
        let targets = self.targets(req.socket)?;
        let mut why = String::new();
        let strict = !req.page_sizes.is_any() && !req.size_hint_only;
        // A preference no memory type of the instance can meet (e.g. 1G
        // pages without a 1G list) is no preference: skip the doomed pass,
        // which would scan every free element and try to grow.
        let preferred = if req.size_hint_only
            && !req.page_sizes.is_any()
            && targets
                .as_slice()
                .iter()
                .all(|&idx| self.heap.kind(idx) == HEAP_KIND_NATIVE)
            && !(0..)
                .map_while(|i| self.list_meta(i))
                .any(|m| req.page_sizes.accepts(m.1.bytes()))
        {
            PageSizes::ANY
        } else {
            req.page_sizes
        };
        for pass in 0..2 {
            if pass == 1 && (preferred.is_any() || strict) {
                break;
            }
            let sizes = if pass == 0 { preferred } else { PageSizes::ANY };
            for &idx in targets.as_slice() {
                if let Some((data, dirty)) = self.alloc_from(idx, req, size, align, sizes, &mut why)
                {
                    if req.zero && dirty {
                        // SAFETY: the block is ours, `size` bytes long.
                        unsafe { std::ptr::write_bytes(data as *mut u8, 0, req.size) };
                    }
                    return Ok(data_ptr(data));
                }
            }
        }
        let mut extra = String::new();
        if req.bound != 0 {
            let _ = write!(extra, ", bound {}", req.bound);
        }
        if req.contig {
            extra.push_str(", IOVA-contiguous");
        }
        if !req.page_sizes.is_any() {
            let _ = write!(
                extra,
                ", page sizes {:#x}{}",
                req.page_sizes.0,
                if req.size_hint_only { " (hint)" } else { "" }
            );
        }
        Err(HeapError::OutOfMemory {
            size: req.size,
            align: req.align.max(UNIT as usize),
            extra,
            socket: SocketName(req.socket).to_string(),
            why,
        }
        .into())
    }

    /// Small blocks from this thread's cache; on a miss, one lock
    /// acquisition carves the block and refills the bin. `None`: take the
    /// general path (no cache here, or the heap must grow).
    fn cached_alloc(&self, req: &AllocRequest) -> Option<Result<NonNull<u8>>> {
        let idx = if req.socket == SOCKET_ID_ANY {
            match self.heap.native.as_slice() {
                [(_, i)] => *i,
                _ => return None,
            }
        } else {
            self.heap.native_of_node(u32::try_from(req.socket).ok()?)?
        };
        let slot = self.my_slot(idx)?;
        let data = (req.size as u64).next_multiple_of(UNIT);
        let bin = tcache::bin_of(data);
        let (elem, dirty) = if let Some(hit) = slot.pop(bin) {
            hit
        } else {
            if self.not_in_callback("heap_alloc").is_err() {
                return None;
            }
            let want = Want {
                size: data,
                align: UNIT,
                bound: 0,
                seg_ok: None,
                contig_ok: None,
            };
            let mut l = self.heap.lock(idx);
            let (d, dirty) = l.alloc(&want, req.size as u64)?;
            tcache::refill(&mut l, slot, data);
            (d - HDR, dirty)
        };
        // SAFETY: the block is ours; the asked size is a field only its
        // owner writes while the block is busy.
        unsafe { std::ptr::addr_of_mut!((*(elem as *mut hc::Elem)).link_a).write(req.size as u64) };
        let data_addr = elem + HDR;
        if req.zero && dirty {
            // SAFETY: the block is ours, at least `req.size` bytes.
            unsafe { std::ptr::write_bytes(data_addr as *mut u8, 0, req.size) };
        }
        Some(Ok(data_ptr(data_addr)))
    }

    /// The largest block a heap can give without growing, allocated
    /// (memzone's `len == 0`): returns it and its usable size.
    pub fn malloc_biggest(
        &self,
        socket: i32,
        align: usize,
        sizes: PageSizes,
    ) -> Result<(NonNull<u8>, usize)> {
        self.biggest_block(socket, align, sizes, false)
    }

    /// [`malloc_biggest`](Self::malloc_biggest), optionally limited to
    /// IOVA-contiguous runs (only PA mode and external heaps can break a
    /// block into several runs).
    pub(crate) fn biggest_block(
        &self,
        socket: i32,
        align: usize,
        sizes: PageSizes,
        contig: bool,
    ) -> Result<(NonNull<u8>, usize)> {
        self.not_in_callback("malloc_biggest")?;
        if contig {
            return self.biggest_contig(socket, align, sizes);
        }
        let (_, align) = check_size(1, align, 0)?;
        let mut best: Option<(u16, u64)> = None;
        for &idx in self.targets(socket)?.as_slice() {
            let l = self.heap.lock(idx);
            let seg_ok = |seg: u32| self.seg_page_size(seg).is_some_and(|p| sizes.accepts(p));
            if let Some((_, _, len)) = l.biggest(align, Some(&seg_ok)) {
                if best.is_none_or(|b| len > b.1) {
                    best = Some((idx, len));
                }
            }
        }
        let Some((idx, len)) = best else {
            return Err(HeapError::OutOfMemory {
                size: 0,
                align: align as usize,
                extra: " (the biggest free block)".into(),
                socket: SocketName(socket).to_string(),
                why: "no heap has free memory".into(),
            }
            .into());
        };
        let mut l = self.heap.lock(idx);
        let seg_ok = |seg: u32| self.seg_page_size(seg).is_some_and(|p| sizes.accepts(p));
        let want = Want {
            size: len,
            align,
            bound: 0,
            seg_ok: Some(&seg_ok),
            contig_ok: None,
        };
        let (data, _) = l.alloc(&want, len).ok_or_else(|| HeapError::OutOfMemory {
            size: len as usize,
            align: align as usize,
            extra: " (the biggest free block)".into(),
            socket: SocketName(socket).to_string(),
            why: "the block was taken meanwhile".into(),
        })?;
        Ok((data_ptr(data), len as usize))
    }

    /// The biggest IOVA-contiguous, aligned run inside a free element of
    /// the heaps of `socket`, allocated.
    fn biggest_contig(
        &self,
        socket: i32,
        align: usize,
        sizes: PageSizes,
    ) -> Result<(NonNull<u8>, usize)> {
        let (_, align) = check_size(1, align, 0)?;
        let seg_ok = |seg: u32| self.seg_page_size(seg).is_some_and(|p| sizes.accepts(p));
        let contig_ok = |data: u64, len: u64| self.block_contig_break(data as usize, len as usize);
        let iova_of = |addr: usize| {
            if self.list_at(addr).is_some() {
                self.virt2iova(addr)
            } else {
                self.heap.ext_virt2iova(addr)
            }
        };
        let mut best: Option<(u16, u64)> = None;
        for &idx in self.targets(socket)?.as_slice() {
            let needs_check = self.iova_mode() == crate::options::IovaMode::Pa
                || self.heap.kind(idx) == HEAP_KIND_EXTERNAL;
            let l = self.heap.lock(idx);
            let mut free = Vec::new();
            l.walk(|e| {
                if e.free && seg_ok(e.seg) {
                    free.push(*e);
                }
            });
            for e in free {
                let start = e.addr + HDR;
                let end = e.addr + e.size;
                let page = self.seg_page_size(e.seg).unwrap_or(4096).max(1);
                // Split the element where the IOVA jumps, then keep the
                // longest aligned piece.
                let mut run_start = start;
                let mut cur = start;
                loop {
                    let next = (cur / page + 1) * page;
                    let breaks = next >= end
                        || !needs_check
                        || match (iova_of(cur as usize), iova_of(next as usize)) {
                            (Some(a), Some(b)) => b != a + (next - cur),
                            _ => true,
                        };
                    if breaks {
                        let piece_end = next.min(end);
                        let data = run_start.next_multiple_of(align);
                        if data < piece_end {
                            let len = (piece_end - data) / UNIT * UNIT;
                            if len > 0 && best.is_none_or(|b| len > b.1) {
                                best = Some((idx, len));
                            }
                        }
                        if next >= end {
                            break;
                        }
                        run_start = next;
                    }
                    cur = next;
                }
            }
        }
        let none = |why: &str| HeapError::OutOfMemory {
            size: 0,
            align: align as usize,
            extra: " (the biggest IOVA-contiguous free block)".into(),
            socket: SocketName(socket).to_string(),
            why: why.into(),
        };
        let Some((idx, len)) = best else {
            return Err(none("no heap has free IOVA-contiguous memory").into());
        };
        let mut l = self.heap.lock(idx);
        let needs_check = self.iova_mode() == crate::options::IovaMode::Pa
            || self.heap.kind(idx) == HEAP_KIND_EXTERNAL;
        let want = Want {
            size: len,
            align,
            bound: 0,
            seg_ok: Some(&seg_ok),
            contig_ok: needs_check.then_some(&contig_ok as &dyn Fn(u64, u64) -> Result<(), u64>),
        };
        let (data, _) = l
            .alloc(&want, len)
            .ok_or_else(|| none("the block was taken meanwhile"))?;
        Ok((data_ptr(data), len as usize))
    }

    /// Socket id of the heap a live block belongs to, and the page size
    /// under it.
    pub(crate) fn block_origin(&self, ptr: NonNull<u8>) -> Option<(i32, u64)> {
        let (idx, seg) = self.checked_block(ptr.as_ptr() as usize).ok()?;
        Some((self.heap.head_socket(idx), self.seg_page_size(seg)?))
    }

    /// Frees a block straight into its heap, past this thread's cache
    /// (memzones: a block that is not coming back soon).
    ///
    /// # Safety
    /// As [`free`](Self::free).
    pub(crate) unsafe fn free_uncached(&self, ptr: NonNull<u8>) -> Result<()> {
        self.not_in_callback("free")?;
        let addr = ptr.as_ptr() as usize;
        let (idx, _) = self.checked_block(addr)?;
        let elem = addr as u64 - HDR;
        let mut l = self.heap.lock(idx);
        l.check_busy(elem).map_err(|f| self.fault(idx, addr, f))?;
        self.give_back(&mut l, idx, &[elem]);
        Ok(())
    }

    // --- introspection -----------------------------------------------------

    /// Counters of the heap of `socket` (a node, or an external heap's id).
    pub fn heap_stats(&self, socket: i32) -> Result<HeapStats> {
        let idx = self.heap_of_socket(socket)?;
        Ok(self.stats_of(idx))
    }

    /// Every heap with its counters.
    pub fn heaps(&self) -> Vec<HeapInfo> {
        (0..self.heap.max() as u16)
            .filter_map(|idx| {
                let kind = match self.heap.kind(idx) {
                    HEAP_KIND_NATIVE => HeapKind::Native,
                    HEAP_KIND_EXTERNAL => HeapKind::External,
                    _ => return None,
                };
                let stats = self.stats_of(idx);
                Some(HeapInfo {
                    index: u32::from(idx),
                    name: self.heap.head_name(idx),
                    socket: self.heap.head_socket(idx),
                    kind,
                    stats,
                })
            })
            .collect()
    }

    /// The socket id of the heap called `name` (DPDK's
    /// `rte_malloc_heap_get_socket`).
    pub fn heap_socket(&self, name: &str) -> Result<i32> {
        super::check_name(name)?;
        let idx = self.heap_of_name(name)?;
        Ok(self.heap.head_socket(idx))
    }

    /// Whether `socket` belongs to an external heap.
    pub fn heap_socket_is_external(&self, socket: i32) -> Result<bool> {
        if socket == SOCKET_ID_ANY {
            return Ok(false);
        }
        let idx = self.heap_of_socket(socket)?;
        Ok(self.heap.kind(idx) == HEAP_KIND_EXTERNAL)
    }

    /// Every element of the heap of `socket`, in address order.
    pub fn heap_elements(&self, socket: i32) -> Result<Vec<ElemInfo>> {
        let idx = self.heap_of_socket(socket)?;
        let mut v = Vec::new();
        self.heap.lock(idx).walk(|e| v.push(*e));
        Ok(v)
    }

    /// Walks every heap and checks every element and free list (cookies,
    /// links, order, merging, free-list classes, counters); the error names
    /// the heap, the address and what is wrong with it.
    pub fn heap_validate(&self) -> Result<()> {
        self.validate_heaps(false)
    }

    /// [`heap_validate`](Self::heap_validate), also checking that memory
    /// the heap believes zeroed is zero (slow: reads all free memory).
    pub fn heap_validate_deep(&self) -> Result<()> {
        self.validate_heaps(true)
    }

    fn validate_heaps(&self, deep: bool) -> Result<()> {
        for idx in 0..self.heap.max() as u16 {
            if self.heap.kind(idx) == HEAP_KIND_UNUSED {
                continue;
            }
            let l = self.heap.lock(idx);
            let in_mem = |addr: u64, len: u64| self.heap_owns(idx, addr as usize, len as usize);
            l.validate(&in_mem, deep).map_err(|c| HeapError::Corrupt {
                heap: self.heap.head_name(idx),
                addr: c.addr as usize,
                what: c.what,
            })?;
        }
        Ok(())
    }

    /// Writes every heap's counters (and with `elements`, every element),
    /// in the style of DPDK's `rte_malloc_dump_stats`/`_heaps`.
    pub fn heap_dump(&self, out: &mut dyn std::io::Write, elements: bool) -> std::io::Result<()> {
        for h in self.heaps() {
            let s = &h.stats;
            writeln!(
                out,
                "heap {} {:?} (socket {}, {:?}): total {}, free {}, allocated {}, greatest free {}, {} allocations, {} free elements, grew {}x ({}), shrank {}x ({})",
                h.index,
                h.name,
                h.socket,
                h.kind,
                format_size(s.total_bytes),
                format_size(s.free_bytes),
                format_size(s.alloc_bytes),
                format_size(s.greatest_free),
                s.alloc_count,
                s.free_count,
                s.grow_count,
                format_size(s.grow_bytes),
                s.shrink_count,
                format_size(s.shrink_bytes),
            )?;
            if elements {
                if let Ok(els) = self.heap_elements(h.socket) {
                    for e in els {
                        writeln!(
                            out,
                            "  {:#x}  {:>10}  {}{}  seg {}{}",
                            e.addr,
                            e.size,
                            if e.free {
                                "FREE"
                            } else if e.cached {
                                "CACHED"
                            } else {
                                "BUSY"
                            },
                            if e.dirty { " dirty" } else { "" },
                            e.seg,
                            if e.free {
                                String::new()
                            } else {
                                format!("  asked {}", e.asked)
                            },
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The heaps as JSON (`[{index, name, socket, kind, stats}, ...]`,
    /// each with `"elements"` when asked).
    pub fn heap_dump_json(&self, elements: bool) -> serde_json::Value {
        let v: Vec<serde_json::Value> = self
            .heaps()
            .into_iter()
            .map(|h| {
                let socket = h.socket;
                let mut j = serde_json::to_value(&h).unwrap_or_default();
                if elements {
                    if let (Some(obj), Ok(els)) = (j.as_object_mut(), self.heap_elements(socket)) {
                        obj.insert(
                            "elements".into(),
                            serde_json::to_value(els).unwrap_or_default(),
                        );
                    }
                }
                j
            })
            .collect();
        serde_json::Value::Array(v)
    }

    // --- internals -----------------------------------------------------------

    /// The heap slot of a socket id, or the error listing the heaps.
    pub(super) fn heap_of_socket(&self, socket: i32) -> Result<u16, HeapError> {
        self.heap
            .by_socket(socket)
            .ok_or_else(|| HeapError::NoSuchSocket {
                socket,
                known: self.heap.known(),
            })
    }

    /// The heap slot of a name, or the error listing the heaps.
    pub(super) fn heap_of_name(&self, name: &str) -> Result<u16, HeapError> {
        self.heap
            .by_name(name)
            .ok_or_else(|| HeapError::NoSuchHeap {
                name: name.into(),
                known: self.heap.known(),
            })
    }

    fn not_in_callback(&self, what: &'static str) -> Result<(), HeapError> {
        if crate::memseg::events::is_in_callback(self.callback_id()) {
            Err(HeapError::Reentrant { what })
        } else {
            Ok(())
        }
    }

    /// Heap slots to try for `socket`, in order.
    /// Whether `socket` names a heap (or means any).
    pub(crate) fn check_socket(&self, socket: i32) -> Result<(), HeapError> {
        self.targets(socket).map(|_| ())
    }

    fn targets(&self, socket: i32) -> Result<Targets, HeapError> {
        if socket == SOCKET_ID_ANY
            || (self.opts_no_huge() && (0..super::EXTERNAL_SOCKET_BASE).contains(&socket))
        {
            // Without hugepages any native socket means any, as in DPDK.
            let native = &self.heap.native;
            if native.len() == 1 {
                return Ok(Targets::one(native[0].1));
            }
            let here = crate::numa::current_cpu_and_node().1;
            let local = self.heap.native_of_node(here);
            let mut v: Vec<u16> = local.into_iter().collect();
            v.extend(native.iter().map(|n| n.1).filter(|&i| Some(i) != local));
            return Ok(Targets::Many(v));
        }
        self.heap
            .by_socket(socket)
            .map(Targets::one)
            .ok_or_else(|| HeapError::NoSuchSocket {
                socket,
                known: self.heap.known(),
            })
    }

    fn opts_no_huge(&self) -> bool {
        self.options().no_huge
    }

    /// Page size of a segment (memseg list or external chunk).
    pub(super) fn seg_page_size(&self, seg: u32) -> Option<u64> {
        if seg >= EXT_SEG_BASE {
            self.heap.ext_page_size(seg)
        } else {
            self.list_meta(seg).map(|m| m.1.bytes())
        }
    }

    /// Tries heap `idx`: its free memory, then (native heaps) growth.
    fn alloc_from(
        &self,
        idx: u16,
        req: &AllocRequest,
        size: u64,
        align: u64,
        sizes: PageSizes,
        why: &mut String,
    ) -> Option<(u64, bool)> {
        let seg_ok = |seg: u32| self.seg_page_size(seg).is_some_and(|p| sizes.accepts(p));
        let contig_ok = |data: u64, len: u64| self.block_contig_break(data as usize, len as usize);
        let contig_needed = req.contig
            && (self.iova_mode() == crate::options::IovaMode::Pa
                || self.heap.kind(idx) == HEAP_KIND_EXTERNAL);
        let want = Want {
            size,
            align,
            bound: req.bound as u64,
            seg_ok: (!sizes.is_any()).then_some(&seg_ok as &dyn Fn(u32) -> bool),
            contig_ok: contig_needed.then_some(&contig_ok as &dyn Fn(u64, u64) -> Result<(), u64>),
        };
        let mut l = self.heap.lock(idx);
        if let Some(r) = l.alloc(&want, req.size as u64) {
            return Some(r);
        }
        let st = l.stats();
        let _ = write!(
            why,
            "{}{}: {} free, largest free block {}",
            if why.is_empty() { "" } else { "; " },
            self.heap.head_name(idx),
            format_size(st.free_bytes),
            format_size(st.greatest_free)
        );
        if self.heap.kind(idx) != HEAP_KIND_NATIVE {
            why.push_str(" (external heaps do not grow)");
            return None;
        }
        if let Some(mode) = self.fixed_by() {
            let _ = write!(
                why,
                " (memory is fixed at init by {mode}; ask for more with -m/--socket-mem)"
            );
            return None;
        }
        if crate::shm::lock::held_here() > 1 {
            // This thread holds another memplane lock (the hotplug lock, the
            // callback registry): growing would wait for it forever.
            why.push_str(" (this thread holds a memplane lock, e.g. inside a memory walk: the heap cannot grow here)");
            return None;
        }
        let node = u32::try_from(self.heap.head_socket(idx)).ok()?;
        // An IOVA-contiguous block on pages that happen not to be
        // physically contiguous: try again a few times while holding the
        // pages we got, so the kernel hands out others.
        let attempts = if want.contig_ok.is_some() { 4 } else { 1 };
        let mut grew = false;
        for _ in 0..attempts {
            match self.grow(&mut l, node, &want, sizes) {
                Ok(fresh) => {
                    grew = true;
                    // Dense placement as always; what the block covers of
                    // the fresh (zeroed) pages needs no clearing: only the
                    // part outside them is cleared for zmalloc.
                    if let Some(f) = fresh.first() {
                        if let Some((data, dirty)) =
                            l.alloc_after_growth(&want, req.size as u64, f.lo, f.hi)
                        {
                            if dirty && req.zero {
                                zero_outside(data, req.size as u64, f.lo + HDR, f.hi);
                                return Some((data, false));
                            }
                            return Some((data, dirty));
                        }
                    }
                    if let Some(r) = l.alloc(&want, req.size as u64) {
                        return Some(r);
                    }
                }
                Err(e) => {
                    let _ = write!(why, "; growing failed: {e}");
                    break;
                }
            }
        }
        if grew {
            why.push_str("; grew, but the new pages do not fit the constraints (IOVA-contiguous memory: reserve 1G pages, whose each page is contiguous)");
            // Give back what the attempts mapped.
            let mut free_elems = Vec::new();
            l.walk(|e| {
                if e.free {
                    free_elems.push(e.addr);
                }
            });
            for a in free_elems.into_iter().rev() {
                self.shrink(&mut l, a);
            }
        }
        None
    }

    /// Maps just enough pages for `want` on `node` and adds them to the
    /// heap; page sizes smallest first, those in `sizes` only.
    fn grow(
        &self,
        l: &mut Locked<'_>,
        node: u32,
        want: &Want<'_>,
        sizes: PageSizes,
    ) -> Result<Vec<Fresh>> {
        let mut last_err: Option<Error> = None;
        let need = HDR.max(want.align) + want.size + want.bound;
        let mut order = self.node_page_sizes(node);
        if want.contig_ok.is_some() {
            // One page is always IOVA-contiguous: the smallest page that
            // holds the whole block first.
            order.sort_by_key(|p| (p.bytes() < need, p.bytes()));
        }
        for psz in order {
            if !sizes.accepts(psz.bytes()) {
                continue;
            }
            let p = psz.bytes();
            let pages = need.div_ceil(p);
            let Ok(count) = u32::try_from(pages) else {
                continue;
            };
            match self.alloc_heap_pages(&PageRequest::new(node, psz, count)) {
                Ok(runs) => {
                    let mut fresh = Vec::new();
                    for r in &runs {
                        l.add_memory(r.va as u64, r.len as u64, r.list, !r.zeroed, r.count);
                        if r.zeroed {
                            fresh.push(Fresh {
                                lo: r.va as u64,
                                hi: (r.va + r.len) as u64,
                            });
                        }
                        l.count_grow(r.len as u64);
                    }
                    tracing::debug!(heap = l.index(), node, pages = count, page_size = %psz, "heap grew");
                    return Ok(fresh);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Error::Memseg(MemsegError::NoSuchPageSize {
                node,
                page_size: PageSize::SIZE_2M,
                available: self.node_page_sizes(node),
                fix: "no memseg list of an allowed page size on this node".into(),
            })
        }))
    }

    /// Gives back the whole pages of the free element `merged`, except
    /// preallocated ones (and, with `--match-allocations`, unless it is a
    /// whole original growth chunk).
    #[allow(clippy::many_single_char_names)]
    fn shrink(&self, l: &mut Locked<'_>, merged: u64) {
        if self.fixed_by().is_some() {
            return;
        }
        let e = l.elem(merged);
        let Some((_, psize, _, _)) = self.list_meta(e.seg) else {
            return;
        };
        if self.list_all_pinned(e.seg) {
            // --socket-mem memory only: nothing to give back, and no page
            // walk on every free of a pinned heap.
            return;
        }
        let p = psize.bytes();
        if e.size < p {
            return;
        }
        let match_alloc = self.options().match_allocations;
        if match_alloc && (merged != e.orig || e.size != u64::from(e.orig_pages) * p) {
            return;
        }
        let lo = merged.next_multiple_of(p);
        let hi = (merged + e.size) / p * p;
        if hi <= lo {
            return;
        }
        // Runs of releasable pages, then cut from the top down so the
        // element at `merged` keeps holding the lower runs.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut a = lo;
        while a < hi {
            let ok = self
                .page_flags(a as usize)
                .is_some_and(|(_, f, _)| f & MEMSEG_HEAP != 0 && f & MEMSEG_DO_NOT_FREE == 0);
            if ok {
                match runs.last_mut() {
                    Some(r) if r.1 == a => r.1 = a + p,
                    _ => runs.push((a, a + p)),
                }
            }
            a += p;
        }
        for &(a, b) in runs.iter().rev() {
            l.take_range(merged, a, b);
            l.count_shrink(b - a);
            if let Err(err) = self.free_heap_pages(a as usize, (b - a) as usize) {
                tracing::error!(addr = format_args!("{a:#x}"), len = b - a, error = %err, "heap cannot give pages back");
            } else {
                tracing::debug!(
                    heap = l.index(),
                    addr = format_args!("{a:#x}"),
                    len = b - a,
                    "heap gave pages back"
                );
            }
        }
    }

    /// Checks that `addr` may be a block of a heap and that its header's
    /// page is mapped and the heap's; returns (heap, segment).
    fn checked_block(&self, addr: usize) -> Result<(u16, u32), HeapError> {
        if addr % UNIT as usize != 0 || addr < HDR as usize {
            return Err(self.not_from_heap(addr));
        }
        let elem = addr - HDR as usize;
        // One lookup for native memory: the list, and the flags of the
        // header's page (a header never crosses a page).
        if let Some((list, node, flags)) = self.page_of(elem) {
            return match self.heap.native_of_node(node) {
                Some(idx) if flags & MEMSEG_HEAP != 0 => Ok((idx, list)),
                _ => Err(self.not_from_heap(addr)),
            };
        }
        let (idx, seg) = locate(self, elem).ok_or_else(|| self.not_from_heap(addr))?;
        if !self.heap_owns(idx, elem, HDR as usize) {
            return Err(self.not_from_heap(addr));
        }
        Ok((idx, seg))
    }

    #[allow(clippy::unused_self)]
    fn not_from_heap(&self, addr: usize) -> HeapError {
        HeapError::NotFromHeap { addr }
    }

    /// Whether `[addr, addr + len)` is mapped memory of heap `idx`.
    fn heap_owns(&self, idx: u16, addr: usize, len: usize) -> bool {
        if self.heap.kind(idx) == HEAP_KIND_EXTERNAL {
            return self.heap.ext_contains(idx, addr, len);
        }
        let Some((list, node, psize)) = self.list_at(addr) else {
            return false;
        };
        if self.heap.native_of_node(node) != Some(idx) {
            return false;
        }
        let p = psize.bytes() as usize;
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut page = addr / p * p;
        while page < end {
            match self.page_flags(page) {
                Some((l, f, _)) if l == list && f & MEMSEG_HEAP != 0 => {}
                _ => return false,
            }
            page += p;
        }
        true
    }

    /// `Ok` when `[addr, addr + len)` is IOVA-contiguous, else
    /// `Err(next)`: the lowest address a contiguous block could start at
    /// (memseg memory: the page where the first break is; external
    /// memory: the next byte).
    fn block_contig_break(&self, addr: usize, len: usize) -> std::result::Result<(), u64> {
        if self.list_at(addr).is_some() {
            match self.iova_break(addr, len) {
                Ok(None) => Ok(()),
                Ok(Some(next)) => Err(next as u64),
                Err(_) => Err(addr as u64 + 1),
            }
        } else if self.heap.ext_contiguous(addr, len) {
            Ok(())
        } else {
            Err(addr as u64 + 1)
        }
    }

    fn fault(&self, idx: u16, addr: usize, f: hc::BlockFault) -> HeapError {
        match f {
            hc::BlockFault::Corrupt => HeapError::Corrupt {
                heap: self.heap.head_name(idx),
                addr: addr - HDR as usize,
                what: "the block's header was overwritten (cookie mismatch); run heap_validate"
                    .into(),
            },
            hc::BlockFault::Inside { block } => HeapError::InsideBlock {
                addr,
                block: block as usize,
            },
            hc::BlockFault::NotABlock | hc::BlockFault::OtherHeap { .. } => {
                HeapError::NotFromHeap { addr }
            }
            hc::BlockFault::AlreadyFree => HeapError::DoubleFree { addr },
        }
    }
}

/// Pages just added by growth: their range (zero-filled by the kernel).
struct Fresh {
    lo: u64,
    hi: u64,
}

/// Zeroes the bytes of `[data, data + len)` outside `[lo, hi)`.
fn zero_outside(data: u64, len: u64, lo: u64, hi: u64) {
    let end = data + len;
    // Before the clean range, and after it; each clamped to the block.
    for (from, to) in [(data, lo.clamp(data, end)), (hi.clamp(data, end), end)] {
        if to > from {
            // SAFETY: a sub-range of the caller's fresh block.
            unsafe { std::ptr::write_bytes(from as *mut u8, 0, (to - from) as usize) };
        }
    }
}

/// The heaps an allocation tries, in order (one without a Vec: the hot
/// path on a one-node machine).
enum Targets {
    One([u16; 1]),
    Many(Vec<u16>),
}

impl Targets {
    fn one(idx: u16) -> Targets {
        Targets::One([idx])
    }

    fn as_slice(&self) -> &[u16] {
        match self {
            Targets::One(a) => a,
            Targets::Many(v) => v,
        }
    }
}

/// A block's data address as a pointer: never 0, it follows a header.
fn data_ptr(data: u64) -> NonNull<u8> {
    NonNull::new(data as *mut u8).unwrap_or(NonNull::dangling())
}

/// Checks and rounds a request: (size rounded up to 64, alignment >= 64).
fn check_size(size: usize, align: usize, bound: usize) -> Result<(u64, u64), HeapError> {
    if size == 0 {
        return Err(HeapError::ZeroSize);
    }
    if align != 0 && !align.is_power_of_two() {
        return Err(HeapError::BadAlign { align });
    }
    if bound != 0 {
        if !bound.is_power_of_two() {
            return Err(HeapError::BadBound {
                bound,
                size,
                why: "not a power of two",
            });
        }
        if bound < size {
            return Err(HeapError::BadBound {
                bound,
                size,
                why: "smaller than the size, so every block would cross it",
            });
        }
    }
    let align64 = (align as u64).max(UNIT);
    let rounded = (size as u64)
        .checked_next_multiple_of(UNIT)
        .filter(|s| {
            s.checked_add(align64)
                .and_then(|x| x.checked_add(HDR))
                .is_some_and(|x| x < 1 << 56)
        })
        .ok_or(HeapError::TooLarge { size, align })?;
    Ok((rounded, align64))
}

#[cfg(test)]
mod tests {
    use super::zero_outside;

    #[test]
    fn zero_outside_clears_only_the_block_outside_the_clean_range() {
        for (lo, hi, want_zero) in [
            (0usize, 64usize, 0..64usize), // clean range covers it all
            (16, 64, 0..16),               // dirty prefix
            (0, 40, 40..64),               // dirty suffix
            (16, 40, 0..64),               // both sides (middle clean)
            (100, 200, 0..64),             // clean range after the block
        ] {
            let mut buf = [0xffu8; 128];
            let base = buf.as_mut_ptr() as u64;
            // Block = buf[32..96]; offsets below are from the block start.
            let data = base + 32;
            zero_outside(data, 64, data + lo as u64, data + hi as u64);
            for (i, &b) in buf.iter().enumerate() {
                let in_block = (32..96).contains(&i);
                let off = i.wrapping_sub(32);
                let zeroed =
                    in_block && want_zero.contains(&off) && !(lo <= off && off < hi && hi <= 64);
                assert_eq!(b == 0, zeroed, "lo {lo} hi {hi} byte {i}");
            }
        }
    }
}
