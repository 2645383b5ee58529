//! The allocator itself, over memory shared by every process of an
//! instance: element headers inline in the heap's memory, the heap's head
//! (lock, free lists, counters) in the shared config.
//!
//! ```text
//!   heap memory (mapped pages, same VA in every process):
//!   | Elem | data ...        | Elem | data ... | Elem (free) |   ...
//!     ^ 64 bytes, cache-line aligned; data starts right after it
//! ```
//!
//! Every element is a multiple of 64 bytes and starts on a 64-byte
//! boundary. Elements of a heap form one doubly linked list in address
//! order (`prev`/`next`, across all of its memory); two neighbours are
//! *adjacent* when one ends where the other starts in the same memory
//! segment (memseg list or external chunk), and only adjacent free
//! elements merge. Free elements also sit in one of the two-level
//! size-class lists of [`super::classes`].
//!
//! Allocation carves the block from the low end of a free element: an
//! alignment gap becomes a free element of its own (it is always a whole
//! number of 64-byte units, so no "pad" headers are needed) and a tail of
//! two units or more is split off.
//!
//! The header's cookie is a hash of its address, size, state, heap and
//! segment: a header that was overwritten, or a pointer that is not the
//! start of a block, fails the check instead of being trusted.
//!
//! Everything here runs with the heap's lock held (a [`Locked`] is the
//! proof), and every element address it follows was checked to lie inside
//! the heap's mapped memory by the caller or by the links of the list.

use std::ptr::addr_of;
use std::sync::atomic::AtomicU32;

use serde::Serialize;

use super::classes::{class_at_least, class_of, FL_COUNT, SL_COUNT, UNIT};
use crate::shm::lock::{SpinGuard, SpinLock};

/// Bytes of an element header; user data starts right after it.
pub(crate) const HDR: u64 = 64;
/// Growth clears a dirty free neighbour of new (clean) pages up to this
/// many bytes, so the merged element stays clean.
const CLEAN_NEIGHBOUR_MAX: u64 = 256 << 10;
/// A tail left after carving is split off only from this size on.
const MIN_TAIL: u64 = 2 * UNIT;

pub(crate) const STATE_FREE: u8 = b'F';
pub(crate) const STATE_BUSY: u8 = b'B';
/// Element flag: the data may hold old bytes (else it is all zero).
pub(crate) const ELEM_DIRTY: u8 = 1;
/// Element flag (busy elements): the block sits in a thread cache, freed
/// by its user.
pub(crate) const ELEM_CACHED: u8 = 2;

/// Heap flag: `--match-allocations` (merge only within the same growth
/// chunk, give back only whole chunks).
pub(crate) const HEAP_MATCH_ALLOC: u32 = 1;

const COOKIE_SEED: u64 = 0x6d70_6865_6170_2131; // "mpheap!1"

/// An element header.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Elem {
    /// Hash of (address, size, state, heap, seg).
    pub cookie: u32,
    /// [`STATE_FREE`] or [`STATE_BUSY`].
    pub state: u8,
    /// `ELEM_*` flags.
    pub flags: u8,
    /// Index of the owning heap.
    pub heap: u16,
    /// Bytes of the element, header included.
    pub size: u64,
    /// Previous element in address order (0: none).
    pub prev: u64,
    /// Next element in address order (0: none).
    pub next: u64,
    /// Free: previous in its free list. Busy: the size asked for.
    pub link_a: u64,
    /// Free: next in its free list. Busy: 0.
    pub link_b: u64,
    /// Start of the growth chunk the memory came from.
    pub orig: u64,
    /// Memory segment: memseg list index, or an external chunk id.
    pub seg: u32,
    /// Pages of the growth chunk.
    pub orig_pages: u32,
}

/// The head of one heap, in the shared config.
#[repr(C)]
pub(crate) struct HeapHeader {
    /// Guards everything below and every element of the heap.
    pub lock: SpinLock,
    /// `HEAP_KIND_*`; written under the heap table lock.
    pub kind: AtomicU32,
    /// Socket id: the node for native heaps, 256 and up for external ones.
    pub socket_id: i32,
    /// `HEAP_*` flags.
    pub flags: u32,
    /// NUL-padded name (`socket_<n>` or the external heap's name).
    pub name: [u8; 32],
    /// First element in address order.
    pub first: u64,
    /// Last element in address order.
    pub last: u64,
    /// Bit `fl` set: `sl_bitmap[fl]` is not zero.
    pub fl_bitmap: u64,
    /// Bytes of memory the heap holds.
    pub total: u64,
    /// Bytes in free elements (headers included).
    pub free_bytes: u64,
    /// Busy elements.
    pub busy_count: u64,
    /// Free elements.
    pub free_count: u64,
    /// Times the heap grew / gave pages back, and the bytes.
    pub grow_count: u64,
    pub grow_bytes: u64,
    pub shrink_count: u64,
    pub shrink_bytes: u64,
    /// Thread-cache slots orphaned by exited threads, not yet flushed.
    pub orphans: std::sync::atomic::AtomicU64,
    /// Room to grow.
    pub reserved: [u64; 3],
    /// Bit `sl` set: list `(fl, sl)` is not empty.
    pub sl_bitmap: [u32; FL_COUNT],
    /// Heads of the free lists.
    pub heads: [[u64; SL_COUNT]; FL_COUNT],
}

pub(crate) const HEAP_KIND_UNUSED: u32 = 0;
pub(crate) const HEAP_KIND_NATIVE: u32 = 1;
pub(crate) const HEAP_KIND_EXTERNAL: u32 = 2;

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<Elem>() == HDR as usize);
    assert!(std::mem::offset_of!(Elem, size) == 8);
    assert!(std::mem::offset_of!(Elem, seg) == 56);
    assert!(std::mem::offset_of!(HeapHeader, name) == 16);
    assert!(std::mem::offset_of!(HeapHeader, first) == 48);
    assert!(std::mem::size_of::<HeapHeader>() % 8 == 0);
};

fn cookie_of(addr: u64, e: &Elem) -> u32 {
    let mut x = addr
        ^ e.size.rotate_left(17)
        ^ (u64::from(e.state) << 56)
        ^ (u64::from(e.heap) << 40)
        ^ u64::from(e.seg).rotate_left(29)
        ^ COOKIE_SEED;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x as u32
}

/// What a block must satisfy.
#[derive(Clone, Copy)]
pub(crate) struct Want<'a> {
    /// Bytes of user data, a multiple of [`UNIT`], at least one unit.
    pub size: u64,
    /// Power of two, at least [`UNIT`].
    pub align: u64,
    /// 0, or a power of two >= size: the block must not cross a multiple.
    pub bound: u64,
    /// Segment filter (page size), if any.
    pub seg_ok: Option<&'a dyn Fn(u32) -> bool>,
    /// IOVA contiguity check of `(data, len)`, if asked for: `Ok` when
    /// contiguous, else `Err(next)`, the lowest address at which a block
    /// could be contiguous (the page after the first break), so the
    /// search jumps there instead of stepping by the alignment.
    pub contig_ok: Option<&'a dyn Fn(u64, u64) -> Result<(), u64>>,
}

impl Want<'_> {
    /// Bytes of element that surely hold the block wherever it starts
    /// (`None` when that overflows).
    fn worst_case(&self) -> Option<u64> {
        HDR.checked_add(self.size)?
            .checked_add(self.align - UNIT)?
            .checked_add(self.bound)
    }

    fn constrained(&self) -> bool {
        self.bound != 0 || self.seg_ok.is_some() || self.contig_ok.is_some()
    }
}

/// One corruption found by a heap's internal consistency check, the one
/// behind [`heap_validate`](crate::Instance::heap_validate) (which reports
/// it as [`HeapError::Corrupt`](super::HeapError::Corrupt), naming the
/// heap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Corruption {
    /// Address of the element (or list head) at fault.
    pub addr: u64,
    /// What is wrong.
    pub what: String,
}

/// Counters of one heap at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HeapStats {
    /// Bytes of memory the heap holds (DPDK's `heap_totalsz_bytes`).
    pub total_bytes: u64,
    /// Bytes in free elements, headers included (`heap_freesz_bytes`).
    pub free_bytes: u64,
    /// `total_bytes - free_bytes` (`heap_allocsz_bytes`).
    pub alloc_bytes: u64,
    /// The largest block one allocation can get without growing the heap
    /// (64-byte aligned); DPDK's `greatest_free_size` counts the header
    /// too.
    pub greatest_free: u64,
    /// Live allocations (`alloc_count`).
    pub alloc_count: u64,
    /// Free elements (`free_count`).
    pub free_count: u64,
    /// Times the heap took pages from the memseg layer, and the bytes.
    pub grow_count: u64,
    /// Bytes taken by growth, all time.
    pub grow_bytes: u64,
    /// Times the heap gave pages back, and the bytes.
    pub shrink_count: u64,
    /// Bytes given back, all time.
    pub shrink_bytes: u64,
    /// Freed small blocks waiting in threads' caches (counted as free
    /// above, not as allocations).
    pub cached_count: u64,
}

/// One element, for walks and dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ElemInfo {
    /// Header address.
    pub addr: u64,
    /// Bytes, header included.
    pub size: u64,
    /// Free or busy.
    pub free: bool,
    /// Free and possibly not zero / busy and handed out dirty.
    pub dirty: bool,
    /// Memory segment (memseg list index or external chunk id).
    pub seg: u32,
    /// Busy: the size asked for.
    pub asked: u64,
    /// Busy, but freed by its user and waiting in a thread's cache.
    pub cached: bool,
}

/// A heap whose lock this thread holds.
pub(crate) struct Locked<'a> {
    h: *mut HeapHeader,
    idx: u16,
    _guard: SpinGuard<'a>,
    _held: crate::shm::lock::HeldMark,
}

/// Reads the element at `addr`.
///
/// # Safety
/// `addr` must be a 64-byte aligned address of mapped heap memory.
unsafe fn rd(addr: u64) -> Elem {
    // SAFETY: per the contract; the heap lock serialises writers.
    unsafe { (addr as *const Elem).read() }
}

/// Writes the element at `addr`, sealing it with its cookie.
///
/// # Safety
/// As [`rd`], and the bytes must belong to the heap (not to a user block).
unsafe fn wr(addr: u64, mut e: Elem) {
    e.cookie = cookie_of(addr, &e);
    // SAFETY: per the contract.
    unsafe { (addr as *mut Elem).write(e) };
}

/// Whether the header at `addr` carries a valid cookie.
///
/// # Safety
/// As [`rd`].
pub(crate) unsafe fn sealed(addr: u64) -> Option<Elem> {
    // SAFETY: per the contract.
    let e = unsafe { rd(addr) };
    (e.cookie == cookie_of(addr, &e) && (e.state == STATE_FREE || e.state == STATE_BUSY))
        .then_some(e)
}

macro_rules! hf {
    ($s:expr, $f:ident) => {
        // SAFETY: `h` points at the heap head in the config mapping, which
        // outlives the guard; the lock is held, so no one else writes it.
        unsafe { (*$s.h).$f }
    };
}
macro_rules! hset {
    ($s:expr, $f:ident, $v:expr) => {{
        let v = $v;
        // SAFETY: as in `hf!`.
        unsafe { (*$s.h).$f = v }
    }};
}

impl<'a> Locked<'a> {
    /// Takes the heap's lock, taking it over from a holder that died; the
    /// flag says whether that happened (the heap may then be half-updated:
    /// validate or rebuild it).
    ///
    /// # Safety
    /// `h` points at an initialised heap head that outlives `'a`, and every
    /// element reachable from it lies in memory mapped for at least as long.
    pub(crate) unsafe fn lock_robust(h: *mut HeapHeader, idx: u16) -> (Locked<'a>, bool) {
        // SAFETY: per the contract, as in `lock`.
        let lock: &'a SpinLock = unsafe { &*addr_of!((*h).lock) };
        let wrap = |guard| Locked {
            h,
            idx,
            _guard: guard,
            _held: crate::shm::lock::HeldMark::new(),
        };
        if let Some(g) = lock.try_lock() {
            return (wrap(g), false);
        }
        loop {
            match lock.lock_timeout(std::time::Duration::from_millis(100)) {
                Ok(g) => return (wrap(g), false),
                Err(crate::shm::lock::LockError::OwnerDead { pid }) => {
                    if let Some(g) = lock.take_over_dead_owner() {
                        tracing::error!(
                            heap = idx,
                            pid,
                            "took over a heap lock from a dead process"
                        );
                        return (wrap(g), true);
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Rebuilds the free lists, the last pointer, the prev links and the
    /// counters from the chain of elements in address order, after a
    /// holder died mid-update. Fails (changing nothing) if the chain itself
    /// is broken: an element outside the heap's memory or with a bad
    /// cookie.
    pub(crate) fn rebuild(
        &mut self,
        in_memory: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), Corruption> {
        let mut elems: Vec<(u64, Elem)> = Vec::new();
        let mut cur = hf!(self, first);
        let bound = (hf!(self, total) / UNIT).max(1) + 1;
        while cur != 0 {
            let bad = |what: &str| Corruption {
                addr: cur,
                what: format!("cannot rebuild the heap: {what}"),
            };
            if cur % UNIT != 0 || !in_memory(cur, HDR) {
                return Err(bad("an element link leads outside the heap's memory"));
            }
            // SAFETY: checked just above to be mapped heap memory.
            let Some(e) = (unsafe { sealed(cur) }) else {
                return Err(bad("an element header's cookie does not match"));
            };
            if e.heap != self.idx || e.size < UNIT || !in_memory(cur, e.size) {
                return Err(bad("an element's heap or size is wrong"));
            }
            elems.push((cur, e));
            if elems.len() as u64 > bound {
                return Err(bad("the element chain loops"));
            }
            cur = e.next;
        }
        hset!(self, fl_bitmap, 0);
        hset!(self, sl_bitmap, [0; FL_COUNT]);
        hset!(self, heads, [[0; SL_COUNT]; FL_COUNT]);
        hset!(self, free_count, 0);
        hset!(self, free_bytes, 0);
        let mut prev = 0;
        let mut busy = 0;
        // A free element waiting to be listed: the next one may be free
        // and adjacent (a free whose merge a dead holder cut short), and
        // is then merged into it here.
        let mut pending: Option<(u64, Elem)> = None;
        for &(addr, e) in &elems {
            if let Some((pa, mut pe)) = pending {
                if e.state == STATE_FREE && self.adjacent(pa, &pe, addr, &e) {
                    pe.size += e.size;
                    pe.next = e.next;
                    // The absorbed header stays in the data: not zero.
                    pe.flags |= ELEM_DIRTY;
                    self.put(pa, pe);
                    pending = Some((pa, pe));
                    continue;
                }
                self.free_insert(pa);
                pending = None;
            }
            self.set_link(addr, Link::Prev, prev);
            if e.state == STATE_FREE {
                pending = Some((addr, e));
            } else {
                busy += 1;
            }
            prev = addr;
        }
        if let Some((pa, _)) = pending {
            self.free_insert(pa);
        }
        hset!(self, last, prev);
        hset!(self, busy_count, busy);
        Ok(())
    }

    /// Resets the head of a fresh or destroyed heap (lock held).
    pub(crate) fn reset(&mut self, socket_id: i32, flags: u32, name: &str) {
        let mut nb = [0u8; 32];
        let n = name.len().min(31);
        nb[..n].copy_from_slice(&name.as_bytes()[..n]);
        hset!(self, socket_id, socket_id);
        hset!(self, flags, flags);
        hset!(self, name, nb);
        hset!(self, first, 0);
        hset!(self, last, 0);
        hset!(self, fl_bitmap, 0);
        hset!(self, total, 0);
        hset!(self, free_bytes, 0);
        hset!(self, busy_count, 0);
        hset!(self, free_count, 0);
        hset!(self, grow_count, 0);
        hset!(self, grow_bytes, 0);
        hset!(self, shrink_count, 0);
        hset!(self, shrink_bytes, 0);
        hset!(self, sl_bitmap, [0; FL_COUNT]);
        hset!(self, heads, [[0; SL_COUNT]; FL_COUNT]);
    }

    pub(crate) fn index(&self) -> u16 {
        self.idx
    }

    fn match_alloc(&self) -> bool {
        hf!(self, flags) & HEAP_MATCH_ALLOC != 0
    }

    fn head(&self, fl: usize, sl: usize) -> u64 {
        // SAFETY: as in `hf!`; fl < FL_COUNT, sl < SL_COUNT by construction.
        unsafe { (*self.h).heads[fl][sl] }
    }

    fn set_head(&mut self, fl: usize, sl: usize, v: u64) {
        // SAFETY: as in `head`.
        unsafe {
            (*self.h).heads[fl][sl] = v;
            if v == 0 {
                (*self.h).sl_bitmap[fl] &= !(1 << sl);
                if (*self.h).sl_bitmap[fl] == 0 {
                    (*self.h).fl_bitmap &= !(1 << fl);
                }
            } else {
                (*self.h).sl_bitmap[fl] |= 1 << sl;
                (*self.h).fl_bitmap |= 1 << fl;
            }
        }
    }

    #[allow(clippy::unused_self)] // the lock guard is the proof of access
    fn get(&self, addr: u64) -> Elem {
        // SAFETY: `addr` came from the heap's own links or was checked by
        // the caller; the lock is held (see the module doc).
        unsafe { rd(addr) }
    }

    #[allow(clippy::unused_self)] // the lock guard is the proof of access
    fn put(&mut self, addr: u64, e: Elem) {
        // SAFETY: as in `get`; headers belong to the heap.
        unsafe { wr(addr, e) }
    }

    /// Sets one link field (not covered by the cookie) of the element at
    /// `addr` in place: no read-modify-write of the whole header, no
    /// cookie to recompute.
    #[allow(clippy::unused_self)] // the lock guard is the proof of access
    fn set_link(&mut self, addr: u64, field: Link, v: u64) {
        let p = addr as *mut Elem;
        // SAFETY: as in `get`; a single aligned u64 field of the header.
        unsafe {
            match field {
                Link::Prev => std::ptr::addr_of_mut!((*p).prev).write(v),
                Link::Next => std::ptr::addr_of_mut!((*p).next).write(v),
                Link::FreePrev => std::ptr::addr_of_mut!((*p).link_a).write(v),
                Link::FreeNext => std::ptr::addr_of_mut!((*p).link_b).write(v),
            }
        }
    }

    fn adjacent(&self, a_addr: u64, a: &Elem, b_addr: u64, b: &Elem) -> bool {
        a_addr + a.size == b_addr && a.seg == b.seg && (!self.match_alloc() || a.orig == b.orig)
    }

    // --- free lists -----------------------------------------------------

    fn free_insert(&mut self, addr: u64) {
        let e = self.get(addr);
        let (fl, sl) = class_of(e.size);
        let head = self.head(fl, sl);
        self.set_link(addr, Link::FreePrev, 0);
        self.set_link(addr, Link::FreeNext, head);
        if head != 0 {
            self.set_link(head, Link::FreePrev, addr);
        }
        self.set_head(fl, sl, addr);
        hset!(self, free_count, hf!(self, free_count) + 1);
        hset!(self, free_bytes, hf!(self, free_bytes) + e.size);
    }

    fn free_remove(&mut self, addr: u64) {
        let e = self.get(addr);
        let (fl, sl) = class_of(e.size);
        if e.link_a == 0 {
            self.set_head(fl, sl, e.link_b);
        } else {
            self.set_link(e.link_a, Link::FreeNext, e.link_b);
        }
        if e.link_b != 0 {
            self.set_link(e.link_b, Link::FreePrev, e.link_a);
        }
        hset!(self, free_count, hf!(self, free_count) - 1);
        hset!(self, free_bytes, hf!(self, free_bytes) - e.size);
    }

    /// First non-empty class at or above `(fl, sl)`.
    fn first_class_from(&self, fl: usize, sl: usize) -> Option<(usize, usize)> {
        let sl_map = self.sl_bitmap(fl) & (!0u32).checked_shl(sl as u32).unwrap_or(0);
        if sl_map != 0 {
            return Some((fl, sl_map.trailing_zeros() as usize));
        }
        let fl_map = hf!(self, fl_bitmap) & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
        if fl_map == 0 {
            return None;
        }
        let fl = fl_map.trailing_zeros() as usize;
        Some((fl, self.sl_bitmap(fl).trailing_zeros() as usize))
    }

    fn sl_bitmap(&self, fl: usize) -> u32 {
        // SAFETY: as in `hf!`; fl < FL_COUNT.
        unsafe { (*self.h).sl_bitmap[fl] }
    }

    // --- allocation -----------------------------------------------------

    /// Where the block would start in the free element at `addr`, if it
    /// fits there.
    #[allow(clippy::unused_self)] // the lock guard is the proof of access
    fn place(&self, addr: u64, e: &Elem, want: &Want<'_>) -> Option<u64> {
        self.place_from(addr, e, want, addr + HDR)
    }

    /// [`place`](Self::place), with the block starting at `start` or later.
    #[allow(clippy::unused_self)] // the lock guard is the proof of access
    fn place_from(&self, addr: u64, e: &Elem, want: &Want<'_>, start: u64) -> Option<u64> {
        if let Some(ok) = want.seg_ok {
            if !ok(e.seg) {
                return None;
            }
        }
        let end = addr + e.size;
        let mut data = start.max(addr + HDR).next_multiple_of(want.align);
        loop {
            if want.bound != 0 && data / want.bound != (data + want.size - 1) / want.bound {
                data = (data / want.bound + 1) * want.bound;
                data = data.next_multiple_of(want.align);
            }
            if data.checked_add(want.size)? > end {
                return None;
            }
            match want.contig_ok.map(|ok| ok(data, want.size)) {
                Some(Err(next)) => {
                    data = next
                        .max(data.checked_add(want.align)?)
                        .checked_next_multiple_of(want.align)?;
                }
                _ => return Some(data),
            }
        }
    }

    /// Finds a free element and the block's place in it.
    fn find(&self, want: &Want<'_>) -> Option<(u64, u64)> {
        // Fast path: any element of the first class that guarantees the
        // worst case fits, whatever its alignment; one look at a list head.
        if !want.constrained() {
            if let Some((fl, sl)) = want.worst_case().and_then(class_at_least) {
                if let Some((fl, sl)) = self.first_class_from(fl, sl) {
                    let addr = self.head(fl, sl);
                    let e = self.get(addr);
                    if let Some(data) = self.place(addr, &e, want) {
                        return Some((addr, data));
                    }
                }
            }
        }
        // Slow path: every element of every class that may hold the block,
        // first fit. Reached when memory is tight or constraints apply.
        let (mut fl, mut sl) = class_of((HDR + want.size).max(UNIT));
        while let Some((f, s)) = self.first_class_from(fl, sl) {
            let mut addr = self.head(f, s);
            while addr != 0 {
                let e = self.get(addr);
                if let Some(data) = self.place(addr, &e, want) {
                    return Some((addr, data));
                }
                addr = e.link_b;
            }
            (fl, sl) = if s + 1 < SL_COUNT {
                (f, s + 1)
            } else {
                (f + 1, 0)
            };
            if fl >= FL_COUNT {
                break;
            }
        }
        None
    }

    /// Allocates a block: returns the data address and whether it may be
    /// dirty. `None`: no free element fits.
    pub(crate) fn alloc(&mut self, want: &Want<'_>, asked: u64) -> Option<(u64, bool)> {
        let (addr, data) = self.find(want)?;
        Some((data, self.carve(addr, data, want.size, asked, None)))
    }

    /// [`alloc`](Self::alloc) right after growth: `[lo, hi)` is memory
    /// just added from fresh zeroed pages (its first header-sized bytes
    /// excepted: the run's own header may have been absorbed). Pieces
    /// inside it stay marked clean; the block is placed as usual (densely)
    /// and reported dirty only if it reaches outside the clean range.
    pub(crate) fn alloc_after_growth(
        &mut self,
        want: &Want<'_>,
        asked: u64,
        lo: u64,
        hi: u64,
    ) -> Option<(u64, bool)> {
        let (addr, data) = self.find(want)?;
        Some((
            data,
            self.carve(addr, data, want.size, asked, Some((lo + HDR, hi))),
        ))
    }

    /// [`alloc`](Self::alloc) of a block whose element holds exactly
    /// `want.size` bytes of data (for the thread caches' size classes);
    /// `None` when the block found would be larger.
    pub(crate) fn alloc_exact(&mut self, want: &Want<'_>, asked: u64) -> Option<(u64, bool)> {
        let (data, dirty) = self.alloc(want, asked)?;
        let elem = data - HDR;
        if self.get(elem).size != HDR + want.size {
            self.free(elem, false);
            return None;
        }
        Some((data, dirty))
    }

    /// Turns the part of free element `addr` holding `[data, data+size)`
    /// into a busy element; gap and tail stay free.
    fn carve(
        &mut self,
        addr: u64,
        data: u64,
        size: u64,
        asked: u64,
        clean: Option<(u64, u64)>,
    ) -> bool {
        let inside = |a: u64, b: u64| clean.is_some_and(|(lo, hi)| a >= lo && b <= hi);
        self.free_remove(addr);
        let e = self.get(addr);
        let end = addr + e.size;
        let busy = data - HDR;
        let gap = busy > addr;
        let prev = if gap { addr } else { e.prev };
        let mut busy_end = data + size;
        let tail = if end - busy_end >= MIN_TAIL {
            Some(busy_end)
        } else {
            busy_end = end;
            None
        };
        let next = tail.unwrap_or(e.next);
        // New headers first, the write that links them in last: a holder
        // killed in between leaves the old element whole, the new headers
        // unreachable inside it, so the chain still walks and `rebuild`
        // repairs lists and counters. (Linking first would leave a link to
        // a header not yet written.)
        if let Some(tail) = tail {
            let flags = if inside(tail + HDR, end) {
                e.flags & !ELEM_DIRTY
            } else {
                e.flags
            };
            self.put(
                tail,
                Elem {
                    size: end - tail,
                    prev: busy,
                    flags,
                    ..e
                },
            );
        }
        let busy_elem = Elem {
            state: STATE_BUSY,
            size: busy_end - busy,
            prev,
            next,
            link_a: asked,
            link_b: 0,
            heap: self.idx,
            ..e
        };
        if gap {
            self.put(busy, busy_elem);
            // The linking write: the old element becomes the free gap.
            self.put(
                addr,
                Elem {
                    size: busy - addr,
                    next: busy,
                    ..e
                },
            );
            self.free_insert(addr);
        } else {
            // The busy header replaces the old one: one write links it.
            self.put(busy, busy_elem);
        }
        if let Some(tail) = tail {
            self.free_insert(tail);
        }
        self.relink(prev, busy, next);
        if let Some(tail) = tail {
            if e.next == 0 {
                hset!(self, last, tail);
            } else {
                self.set_link(e.next, Link::Prev, tail);
            }
        }
        hset!(self, busy_count, hf!(self, busy_count) + 1);
        e.flags & ELEM_DIRTY != 0 && !inside(data, data + size)
    }

    /// Makes `prev <-> mid <-> next` hold in the address list (`mid`'s own
    /// links are already set).
    fn relink(&mut self, prev: u64, mid: u64, next: u64) {
        if prev == 0 {
            hset!(self, first, mid);
        } else {
            self.set_link(prev, Link::Next, mid);
        }
        if next == 0 {
            hset!(self, last, mid);
        } else {
            self.set_link(next, Link::Prev, mid);
        }
    }

    /// Checks that `addr` is the header of a live block of this heap.
    pub(crate) fn check_busy(&self, addr: u64) -> Result<Elem, BlockFault> {
        // SAFETY: the caller checked `addr` lies in mapped heap memory.
        let Some(e) = (unsafe { sealed(addr) }) else {
            return Err(self.diagnose(addr));
        };
        if e.heap != self.idx {
            return Err(BlockFault::OtherHeap { heap: e.heap });
        }
        if e.state == STATE_FREE || e.flags & ELEM_CACHED != 0 {
            return Err(BlockFault::AlreadyFree);
        }
        Ok(e)
    }

    /// Why `addr` is not a valid header: a walk tells whether it is the
    /// header of an element (then it was overwritten) or inside one.
    fn diagnose(&self, addr: u64) -> BlockFault {
        let mut cur = hf!(self, first);
        let mut steps = 0u64;
        while cur != 0 && steps <= hf!(self, busy_count) + hf!(self, free_count) {
            if cur == addr {
                return BlockFault::Corrupt;
            }
            // SAFETY: links of the heap's own list (module doc).
            let Some(e) = (unsafe { sealed(cur) }) else {
                return BlockFault::Corrupt;
            };
            if addr > cur && addr < cur + e.size {
                return BlockFault::Inside { block: cur + HDR };
            }
            cur = e.next;
            steps += 1;
        }
        BlockFault::NotABlock
    }

    /// Frees the busy element at `addr` (checked by
    /// [`check_busy`](Self::check_busy)) and merges it with free
    /// neighbours; returns the resulting free element.
    pub(crate) fn free(&mut self, addr: u64, poison: bool) -> u64 {
        let e = self.get(addr);
        if poison {
            // SAFETY: the block's data belongs to the heap again.
            unsafe {
                std::ptr::write_bytes((addr + HDR) as *mut u8, 0x6b, (e.size - HDR) as usize);
            };
        }
        self.put(
            addr,
            Elem {
                state: STATE_FREE,
                flags: (e.flags & !ELEM_CACHED) | ELEM_DIRTY,
                link_a: 0,
                link_b: 0,
                ..e
            },
        );
        hset!(self, busy_count, hf!(self, busy_count) - 1);
        let merged = self.merge_neighbours(addr);
        self.free_insert(merged);
        merged
    }

    /// Whether busy element `b` directly follows busy element `a` (next in
    /// the address list and adjacent), so both can be freed as one.
    pub(crate) fn continues(&self, a: u64, b: u64) -> bool {
        let ea = self.get(a);
        ea.next == b && self.adjacent(a, &ea, b, &self.get(b))
    }

    /// Frees a run of busy elements that follow each other (checked with
    /// [`continues`](Self::continues)) as one element: one header written,
    /// one merge, one free-list insert, whatever the run's length. Returns
    /// the resulting free element.
    pub(crate) fn free_run(&mut self, run: &[u64], poison: bool) -> u64 {
        let Some((&first, &last)) = run.first().zip(run.last()) else {
            return 0;
        };
        if run.len() == 1 {
            return self.free(first, poison);
        }
        let f = self.get(first);
        let l = self.get(last);
        let size = last + l.size - first;
        if poison {
            // SAFETY: the blocks' data (and their headers) belong to the
            // heap again.
            unsafe { std::ptr::write_bytes((first + HDR) as *mut u8, 0x6b, (size - HDR) as usize) };
        }
        self.put(
            first,
            Elem {
                state: STATE_FREE,
                flags: (f.flags & !ELEM_CACHED) | ELEM_DIRTY,
                size,
                next: l.next,
                link_a: 0,
                link_b: 0,
                ..f
            },
        );
        if l.next == 0 {
            hset!(self, last, first);
        } else {
            self.set_link(l.next, Link::Prev, first);
        }
        hset!(self, busy_count, hf!(self, busy_count) - run.len() as u64);
        let merged = self.merge_neighbours(first);
        self.free_insert(merged);
        merged
    }

    /// Merges the free (not listed) element at `addr` with adjacent free
    /// neighbours, which leave their lists; returns the merged element
    /// (not listed).
    fn merge_neighbours(&mut self, mut addr: u64) -> u64 {
        let mut e = self.get(addr);
        if e.next != 0 {
            let n = self.get(e.next);
            if n.state == STATE_FREE && self.adjacent(addr, &e, e.next, &n) {
                let na = e.next;
                self.free_remove(na);
                self.absorb(addr, &mut e, na, &n);
            }
        }
        if e.prev != 0 {
            let p = self.get(e.prev);
            if p.state == STATE_FREE && self.adjacent(e.prev, &p, addr, &e) {
                let pa = e.prev;
                self.free_remove(pa);
                let mut p = self.get(pa);
                self.absorb(pa, &mut p, addr, &e);
                addr = pa;
            }
        }
        addr
    }

    /// `a` (at `a_addr`) takes over its adjacent successor `b`.
    fn absorb(&mut self, a_addr: u64, a: &mut Elem, b_addr: u64, b: &Elem) {
        let dirty = (a.flags | b.flags) & ELEM_DIRTY;
        a.size += b.size;
        a.next = b.next;
        if dirty == 0 {
            // Keep the merged data all-zero: wipe the absorbed header, but
            // only once `a` links past it (a holder killed before would
            // leave a link to a wiped header), and with `a` marked dirty
            // until it is wiped (killed in between, `a` is dirty: safe).
            a.flags |= ELEM_DIRTY;
            self.put(a_addr, *a);
            // SAFETY: the header belongs to the heap, unlinked above.
            unsafe { std::ptr::write_bytes(b_addr as *mut u8, 0, HDR as usize) };
        }
        a.flags = (a.flags & !ELEM_DIRTY) | dirty;
        self.put(a_addr, *a);
        if b.next == 0 {
            hset!(self, last, a_addr);
        } else {
            self.set_link(b.next, Link::Prev, a_addr);
        }
    }

    /// Resizes the busy element at `addr` in place to hold `size` bytes of
    /// data (a multiple of [`UNIT`]), growing into a free adjacent
    /// successor if needed. `false`: not possible, nothing changed.
    pub(crate) fn resize(&mut self, addr: u64, size: u64, asked: u64) -> bool {
        let mut e = self.get(addr);
        let need = HDR + size;
        if need > e.size {
            if e.next == 0 {
                return false;
            }
            let n = self.get(e.next);
            if n.state != STATE_FREE
                || !self.adjacent(addr, &e, e.next, &n)
                || e.size + n.size < need
            {
                return false;
            }
            self.free_remove(e.next);
            // Take it whole (not `absorb`: the busy data needs no wiping).
            e.size += n.size;
            e.next = n.next;
            e.flags |= n.flags & ELEM_DIRTY;
            if n.next == 0 {
                hset!(self, last, addr);
            } else {
                self.set_link(n.next, Link::Prev, addr);
            }
        }
        e.link_a = asked;
        if e.size - need >= MIN_TAIL {
            let tail = addr + need;
            let t = Elem {
                state: STATE_FREE,
                flags: ELEM_DIRTY,
                size: e.size - need,
                prev: addr,
                next: e.next,
                link_a: 0,
                link_b: 0,
                ..e
            };
            self.put(tail, t);
            if t.next == 0 {
                hset!(self, last, tail);
            } else {
                self.set_link(t.next, Link::Prev, tail);
            }
            e.size = need;
            e.next = tail;
            self.put(addr, e);
            let merged = self.merge_neighbours(tail);
            self.free_insert(merged);
        } else {
            self.put(addr, e);
        }
        true
    }

    // --- memory in and out ----------------------------------------------

    /// Adds `[addr, addr + len)` (64-byte aligned, mapped, unused) as free
    /// memory of segment `seg`, merging with adjacent free elements.
    /// Returns the free element that holds it.
    pub(crate) fn add_memory(
        &mut self,
        addr: u64,
        len: u64,
        seg: u32,
        dirty: bool,
        orig_pages: u32,
    ) -> u64 {
        // Position in the address list: after the last element below it.
        let mut prev = hf!(self, last);
        while prev != 0 && prev > addr {
            prev = self.get(prev).prev;
        }
        let next = if prev == 0 {
            hf!(self, first)
        } else {
            self.get(prev).next
        };
        self.put(
            addr,
            Elem {
                cookie: 0,
                state: STATE_FREE,
                flags: if dirty { ELEM_DIRTY } else { 0 },
                heap: self.idx,
                size: len,
                prev,
                next,
                link_a: 0,
                link_b: 0,
                orig: addr,
                seg,
                orig_pages,
            },
        );
        self.relink(prev, addr, next);
        hset!(self, total, hf!(self, total) + len);
        if !dirty {
            // A small dirty free neighbour would make the whole merged
            // element dirty, and every zmalloc from the fresh (zeroed)
            // pages would clear them again: clear the neighbour instead.
            for n in [prev, next] {
                self.clean_if_small_free_neighbour(n, addr);
            }
        }
        let merged = self.merge_neighbours(addr);
        self.free_insert(merged);
        merged
    }

    /// Zeroes the data of `n` if it is a dirty free element adjacent to
    /// `to` and at most [`CLEAN_NEIGHBOUR_MAX`] bytes, and marks it clean.
    fn clean_if_small_free_neighbour(&mut self, n: u64, to: u64) {
        if n == 0 {
            return;
        }
        let e = self.get(n);
        let t = self.get(to);
        let adjacent = if n < to {
            self.adjacent(n, &e, to, &t)
        } else {
            self.adjacent(to, &t, n, &e)
        };
        if !adjacent
            || e.state != STATE_FREE
            || e.flags & ELEM_DIRTY == 0
            || e.size - HDR > CLEAN_NEIGHBOUR_MAX
        {
            return;
        }
        // SAFETY: a free element's data belongs to the heap.
        unsafe { std::ptr::write_bytes((n + HDR) as *mut u8, 0, (e.size - HDR) as usize) };
        // The flag is not covered by the cookie: write it in place.
        // SAFETY: as in `set_link`; one byte of the header.
        unsafe { std::ptr::addr_of_mut!((*(n as *mut Elem)).flags).write(e.flags & !ELEM_DIRTY) };
    }

    /// Cuts `[a, b)` out of the free element at `addr` (which contains
    /// it; both ends 64-byte aligned) so the memory can be unmapped; what
    /// is left on either side stays free.
    pub(crate) fn take_range(&mut self, addr: u64, a: u64, b: u64) {
        self.free_remove(addr);
        let e = self.get(addr);
        let end = addr + e.size;
        let mut prev = e.prev;
        let mut next = e.next;
        if b < end {
            self.put(
                b,
                Elem {
                    size: end - b,
                    prev: if a > addr { addr } else { prev },
                    ..e
                },
            );
            self.free_insert(b);
            if e.next == 0 {
                hset!(self, last, b);
            } else {
                self.set_link(e.next, Link::Prev, b);
            }
            next = b;
        }
        if a > addr {
            self.put(
                addr,
                Elem {
                    size: a - addr,
                    next,
                    ..e
                },
            );
            self.free_insert(addr);
            prev = addr;
        }
        // Link prev <-> next around the hole.
        if prev == 0 {
            hset!(self, first, next);
        } else {
            self.set_link(prev, Link::Next, next);
        }
        if next == 0 {
            hset!(self, last, prev);
        } else {
            self.set_link(next, Link::Prev, prev);
        }
        hset!(self, total, hf!(self, total) - (b - a));
    }

    /// Records growth or shrink in the counters.
    pub(crate) fn count_grow(&mut self, bytes: u64) {
        hset!(self, grow_count, hf!(self, grow_count) + 1);
        hset!(self, grow_bytes, hf!(self, grow_bytes) + bytes);
    }

    pub(crate) fn count_shrink(&mut self, bytes: u64) {
        hset!(self, shrink_count, hf!(self, shrink_count) + 1);
        hset!(self, shrink_bytes, hf!(self, shrink_bytes) + bytes);
    }

    /// The free element `addr`'s header.
    pub(crate) fn elem(&self, addr: u64) -> Elem {
        self.get(addr)
    }

    // --- introspection --------------------------------------------------

    pub(crate) fn stats(&self) -> HeapStats {
        let total = hf!(self, total);
        let free = hf!(self, free_bytes);
        HeapStats {
            total_bytes: total,
            free_bytes: free,
            alloc_bytes: total - free,
            greatest_free: self.greatest_free(),
            alloc_count: hf!(self, busy_count),
            free_count: hf!(self, free_count),
            grow_count: hf!(self, grow_count),
            grow_bytes: hf!(self, grow_bytes),
            shrink_count: hf!(self, shrink_count),
            shrink_bytes: hf!(self, shrink_bytes),
            cached_count: 0,
        }
    }

    /// Data bytes of the largest free element: the largest list holds it.
    fn greatest_free(&self) -> u64 {
        let fl_map = hf!(self, fl_bitmap);
        if fl_map == 0 {
            return 0;
        }
        let fl = 63 - fl_map.leading_zeros() as usize;
        let sl = 31 - self.sl_bitmap(fl).leading_zeros() as usize;
        let mut best = 0;
        let mut addr = self.head(fl, sl);
        while addr != 0 {
            let e = self.get(addr);
            best = best.max(e.size);
            addr = e.link_b;
        }
        best.saturating_sub(HDR)
    }

    /// The largest free block, optionally on segments `seg_ok` accepts:
    /// (element, data, bytes of data) with `align`.
    pub(crate) fn biggest(
        &self,
        align: u64,
        seg_ok: Option<&dyn Fn(u32) -> bool>,
    ) -> Option<(u64, u64, u64)> {
        let mut best: Option<(u64, u64, u64)> = None;
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let mut addr = self.head(fl, sl);
                while addr != 0 {
                    let e = self.get(addr);
                    if seg_ok.is_none_or(|ok| ok(e.seg)) {
                        let data = (addr + HDR).next_multiple_of(align);
                        let end = addr + e.size;
                        if data < end {
                            let len = (end - data) / UNIT * UNIT;
                            if best.is_none_or(|b| len > b.2) {
                                best = Some((addr, data, len));
                            }
                        }
                    }
                    addr = e.link_b;
                }
            }
        }
        best
    }

    /// Calls `f` for every element in address order.
    pub(crate) fn walk(&self, mut f: impl FnMut(&ElemInfo)) {
        let mut cur = hf!(self, first);
        let limit = hf!(self, busy_count) + hf!(self, free_count);
        let mut n = 0;
        while cur != 0 && n <= limit {
            let e = self.get(cur);
            f(&ElemInfo {
                addr: cur,
                size: e.size,
                free: e.state == STATE_FREE,
                dirty: e.flags & ELEM_DIRTY != 0,
                seg: e.seg,
                asked: if e.state == STATE_BUSY { e.link_a } else { 0 },
                cached: e.flags & ELEM_CACHED != 0,
            });
            cur = e.next;
            n += 1;
        }
    }

    /// Checks every element and every free list: cookies, links in both
    /// directions, address order without overlap, no two adjacent free
    /// elements, free lists holding exactly the free elements in the
    /// right classes, bitmaps, and the counters. `in_memory(addr, len)`
    /// says whether a range lies in the heap's mapped memory. With
    /// `deep`, clean free elements are checked to be all zero.
    pub(crate) fn validate(
        &self,
        in_memory: &dyn Fn(u64, u64) -> bool,
        deep: bool,
    ) -> Result<(), Corruption> {
        let bad = |addr: u64, what: String| Err(Corruption { addr, what });
        let mut cur = hf!(self, first);
        let mut prev = 0u64;
        let mut prev_e = Elem::default();
        let (mut busy, mut free, mut free_bytes, mut total) = (0u64, 0u64, 0u64, 0u64);
        let limit = hf!(self, busy_count) + hf!(self, free_count) + 1;
        while cur != 0 {
            if cur % UNIT != 0 || !in_memory(cur, HDR) {
                return bad(
                    cur,
                    format!("element link from {prev:#x} points outside the heap's memory"),
                );
            }
            // SAFETY: checked just above to be mapped heap memory.
            let Some(e) = (unsafe { sealed(cur) }) else {
                return bad(cur, "header cookie does not match (overwritten header, e.g. by a buffer overrun of the block before)".into());
            };
            if e.heap != self.idx {
                return bad(
                    cur,
                    format!("element claims heap {} inside heap {}", e.heap, self.idx),
                );
            }
            if e.size < UNIT || e.size % UNIT != 0 || !in_memory(cur, e.size) {
                return bad(
                    cur,
                    format!(
                        "element size {} is not a whole number of units inside the heap's memory",
                        e.size
                    ),
                );
            }
            if e.prev != prev {
                return bad(cur, format!("prev link {:#x} should be {prev:#x}", e.prev));
            }
            if prev != 0 {
                if prev + prev_e.size > cur {
                    return bad(
                        cur,
                        format!("overlaps the element at {prev:#x} (size {})", prev_e.size),
                    );
                }
                if prev_e.state == STATE_FREE
                    && e.state == STATE_FREE
                    && self.adjacent(prev, &prev_e, cur, &e)
                {
                    return bad(
                        cur,
                        format!("free and adjacent to the free element at {prev:#x} (not merged)"),
                    );
                }
            }
            if e.state == STATE_FREE {
                free += 1;
                free_bytes += e.size;
                if deep && e.flags & ELEM_DIRTY == 0 {
                    // SAFETY: a free element's bytes belong to the heap.
                    let data = unsafe {
                        std::slice::from_raw_parts(
                            (cur + HDR) as *const u8,
                            (e.size - HDR) as usize,
                        )
                    };
                    if let Some(i) = data.iter().position(|&b| b != 0) {
                        return bad(
                            cur,
                            format!("marked clean but byte {i} of its data is not zero"),
                        );
                    }
                }
            } else {
                busy += 1;
                if e.link_a > e.size - HDR {
                    return bad(
                        cur,
                        format!(
                            "asked size {} exceeds its data size {}",
                            e.link_a,
                            e.size - HDR
                        ),
                    );
                }
            }
            total += e.size;
            if busy + free > limit {
                return bad(cur, "the element list loops".into());
            }
            prev = cur;
            prev_e = e;
            cur = e.next;
        }
        if hf!(self, last) != prev {
            return bad(
                hf!(self, last),
                format!("heap's last element should be {prev:#x}"),
            );
        }
        if busy != hf!(self, busy_count) {
            return bad(
                0,
                format!(
                    "{busy} busy elements, the counter says {}",
                    hf!(self, busy_count)
                ),
            );
        }
        if free != hf!(self, free_count) || free_bytes != hf!(self, free_bytes) {
            return bad(
                0,
                format!(
                    "{free} free elements of {free_bytes} bytes, the counters say {} and {}",
                    hf!(self, free_count),
                    hf!(self, free_bytes)
                ),
            );
        }
        // Elements tile the heap's memory: their sizes add up to it.
        if total != hf!(self, total) {
            return bad(
                0,
                format!(
                    "elements cover {total} bytes, the heap's total says {}",
                    hf!(self, total)
                ),
            );
        }
        let mut listed = 0u64;
        for fl in 0..FL_COUNT {
            let fl_bit = hf!(self, fl_bitmap) & (1 << fl) != 0;
            if fl_bit != (self.sl_bitmap(fl) != 0) {
                return bad(
                    0,
                    format!("first-level bitmap bit {fl} disagrees with its second level"),
                );
            }
            for sl in 0..SL_COUNT {
                let head = self.head(fl, sl);
                if (self.sl_bitmap(fl) & (1 << sl) != 0) != (head != 0) {
                    return bad(
                        head,
                        format!("bitmap bit of free list ({fl},{sl}) disagrees with its head"),
                    );
                }
                let mut addr = head;
                let mut back = 0;
                while addr != 0 {
                    if addr % UNIT != 0 || !in_memory(addr, HDR) {
                        return bad(
                            addr,
                            format!("free list ({fl},{sl}) points outside the heap's memory"),
                        );
                    }
                    // SAFETY: checked just above.
                    let Some(e) = (unsafe { sealed(addr) }) else {
                        return bad(
                            addr,
                            format!("free list ({fl},{sl}) holds an element with a bad cookie"),
                        );
                    };
                    if e.state != STATE_FREE {
                        return bad(addr, format!("busy element in free list ({fl},{sl})"));
                    }
                    if class_of(e.size) != (fl, sl) {
                        return bad(
                            addr,
                            format!("element of size {} filed in free list ({fl},{sl})", e.size),
                        );
                    }
                    if e.link_a != back {
                        return bad(
                            addr,
                            format!("free-list back link {:#x} should be {back:#x}", e.link_a),
                        );
                    }
                    listed += 1;
                    if listed > free {
                        return bad(
                            addr,
                            "free lists hold more elements than the heap has free (loop?)".into(),
                        );
                    }
                    back = addr;
                    addr = e.link_b;
                }
            }
        }
        if listed != free {
            return bad(
                0,
                format!("free lists hold {listed} elements, {free} are free"),
            );
        }
        Ok(())
    }
}

/// A link field of an element header.
#[derive(Clone, Copy)]
enum Link {
    Prev,
    Next,
    FreePrev,
    FreeNext,
}

/// Why a pointer handed to free/realloc is not a live block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFault {
    /// The header at the address was overwritten.
    Corrupt,
    /// The address is inside a block, not at its start.
    Inside { block: u64 },
    /// Not a block of this heap at all.
    NotABlock,
    /// The block is free already.
    AlreadyFree,
    /// The header names another heap.
    OtherHeap { heap: u16 },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap head and 1 MiB of memory in process-private buffers.
    struct TestHeap {
        head: Box<std::mem::MaybeUninit<HeapHeader>>,
        mem: Vec<u64>,
    }

    impl TestHeap {
        fn new() -> TestHeap {
            let mut t = TestHeap {
                head: Box::new(std::mem::MaybeUninit::zeroed()),
                mem: vec![0u64; (1 << 20) / 8 + 8],
            };
            let base = t.base();
            let mut l = t.lock();
            l.reset(0, 0, "test");
            l.add_memory(base, 1 << 20, 0, false, 0);
            drop(l);
            t
        }

        fn base(&self) -> u64 {
            (self.mem.as_ptr() as u64).next_multiple_of(UNIT)
        }

        fn lock(&mut self) -> Locked<'_> {
            // SAFETY: the head is zero-filled (a valid unlocked lock) and
            // both buffers live as long as the guard borrows `self`.
            unsafe { Locked::lock_robust(self.head.as_mut_ptr(), 0).0 }
        }
    }

    /// A contiguity check that fails names where the next candidate may
    /// start, and the search jumps there: over a 1 MiB element with a
    /// "page" break every 64 KiB, finding a 96 KiB block that must sit
    /// in... nowhere (every 64 KiB run is too short) takes one check per
    /// run, not one per aligned start (16384 of them at 64-byte steps).
    #[test]
    fn a_contiguous_search_jumps_to_the_next_break_instead_of_stepping() {
        const RUN: u64 = 64 << 10;
        let mut t = TestHeap::new();
        let base = t.base();
        let calls = std::cell::Cell::new(0u32);
        let contig = |data: u64, len: u64| {
            calls.set(calls.get() + 1);
            // "Pages" of RUN bytes, each its own contiguous run.
            let page_end = (data - base) / RUN * RUN + RUN + base;
            if data + len <= page_end {
                Ok(())
            } else {
                Err(page_end)
            }
        };
        let mut want = Want {
            size: 96 << 10,
            align: UNIT,
            bound: 0,
            seg_ok: None,
            contig_ok: Some(&contig),
        };
        let mut l = t.lock();
        assert!(l.alloc(&want, 96 << 10).is_none(), "no run holds 96 KiB");
        assert!(
            calls.get() <= 2 * (1 << 20) / RUN as u32,
            "{} checks: the search stepped instead of jumping",
            calls.get()
        );
        // A block that fits a run is found, inside one run.
        calls.set(0);
        want.size = 48 << 10;
        let (data, _) = l.alloc(&want, 48 << 10).expect("a 48 KiB block fits a run");
        assert!(contig(data, 48 << 10).is_ok());
        assert!(calls.get() <= 4, "{} checks for the first fit", calls.get());
    }

    /// A free cut short by a dead lock holder (the element marked free,
    /// not yet merged with its free neighbour nor listed): the rebuild
    /// finishes the merge, and the heap validates.
    #[test]
    fn rebuild_finishes_a_merge_a_dead_holder_cut_short() {
        let mut t = TestHeap::new();
        let (base, end) = (t.base(), t.base() + (1 << 20));
        let inside = move |a: u64, n: u64| a >= base && a + n <= end;
        let want = Want {
            size: 1024,
            align: UNIT,
            bound: 0,
            seg_ok: None,
            contig_ok: None,
        };
        let mut l = t.lock();
        let b: Vec<u64> = (0..4)
            .map(|_| l.alloc(&want, 1000).unwrap().0 - HDR)
            .collect();
        l.free(b[2], false);
        l.validate(&inside, false).unwrap();
        let before = hf!(l, free_count);
        // b[1] freed by a process killed right after its header write.
        let e = l.get(b[1]);
        l.put(
            b[1],
            Elem {
                state: STATE_FREE,
                flags: e.flags | ELEM_DIRTY,
                link_a: 0,
                link_b: 0,
                ..e
            },
        );
        assert!(
            l.validate(&inside, false).is_err(),
            "unmerged free neighbours"
        );
        l.rebuild(&inside).unwrap();
        l.validate(&inside, false).unwrap();
        assert_eq!(hf!(l, free_count), before, "b[1] and b[2] are one element");
        assert_eq!(l.get(b[1]).size, 2 * l.get(b[0]).size);
        // And the heap works on: everything frees into one element.
        l.free(b[0], false);
        l.free(b[3], false);
        l.validate(&inside, false).unwrap();
        assert_eq!(hf!(l, busy_count), 0);
    }

    #[test]
    fn rebuild_restores_free_lists_and_counters_after_a_half_update() {
        let mut t = TestHeap::new();
        let (base, end) = (t.base(), t.base() + (1 << 20));
        let inside = move |a: u64, n: u64| a >= base && a + n <= end;
        let want = Want {
            size: 1024,
            align: UNIT,
            bound: 0,
            seg_ok: None,
            contig_ok: None,
        };
        let mut l = t.lock();
        let blocks: Vec<u64> = (0..20).map(|_| l.alloc(&want, 1000).unwrap().0).collect();
        for &b in blocks.iter().step_by(3) {
            l.free(b - HDR, false);
        }
        l.validate(&inside, false).unwrap();
        // A dead holder's half-done update: free lists and counters lost.
        hset!(l, fl_bitmap, 0);
        hset!(l, sl_bitmap, [0; FL_COUNT]);
        hset!(l, heads, [[0; SL_COUNT]; FL_COUNT]);
        hset!(l, free_count, 0);
        hset!(l, busy_count, 99);
        hset!(l, last, 0);
        assert!(l.validate(&inside, false).is_err());
        l.rebuild(&inside).unwrap();
        l.validate(&inside, false).unwrap();
        // And it works again: every block frees, the heap is one element.
        for &b in blocks.iter().skip(1).step_by(3) {
            l.free(b - HDR, false);
        }
        l.validate(&inside, false).unwrap();
        // A header overwritten in the chain cannot be rebuilt around.
        // SAFETY: inside the test buffer.
        unsafe { ((blocks[5] - HDR) as *mut u32).write(0xdead_beef) };
        assert!(l.rebuild(&inside).is_err());
    }
}
