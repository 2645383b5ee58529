//! The ring: header/slot geometry, the four sync protocols, typed and raw
//! handles.

// The hot path is a handful of small helpers that must collapse into one
// loop body per call site (the benchmark compares cycles per element with
// DPDK's always-inline C), so `inline(always)` is deliberate here.
#![allow(clippy::inline_always)]

use core::cell::Cell;
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;

use crate::error::{BulkError, RingError};
use crate::layout::{
    pack, slots_offset, HeadTail, Header, FLAG_COMPACT, FLAG_EXACT, LAYOUT_VERSION, MAGIC,
    MAX_CAPACITY, NAME_MAX, REGION_ALIGN,
};
use crate::memory::RingMemory;
use crate::sync::{wait_round, AtomicU32, AtomicU64, Ordering};

use Ordering::{AcqRel, Acquire, Relaxed, Release};

/// How producers (or consumers) of one ring synchronise with each other.
/// Chosen per side when the ring is created and recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum SyncMode {
    /// Any number of concurrent producers (consumers): CAS on the head, then
    /// each op waits for its predecessors before moving the tail (DPDK "MT").
    #[default]
    Multi = 0,
    /// Exactly one producer (consumer) at a time, enforced by a claim word in
    /// the shared header: plain loads and stores, no CAS.
    Single = 1,
    /// Relaxed tail sync (DPDK "MT_RTS"): the tail is moved by the last
    /// finisher, so a preempted producer does not stall the ones behind it;
    /// head-tail distance bounded by `htd_max`.
    MultiRts = 2,
    /// Head-tail sync (DPDK "MT_HTS"): fully serialised; an op starts only
    /// when the previous one finished. Best when threads outnumber CPUs.
    MultiHts = 3,
}

impl SyncMode {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Multi,
            1 => Self::Single,
            2 => Self::MultiRts,
            3 => Self::MultiHts,
            _ => return None,
        })
    }
}

/// Creation parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingConfig {
    /// Producer sync mode.
    pub producer: SyncMode,
    /// Consumer sync mode.
    pub consumer: SyncMode,
    /// Capacity is exactly the requested count (any value); slots are the
    /// next power of two. Without it the count must be a power of two and
    /// the ring holds exactly that many elements (DPDK holds count - 1).
    pub exact: bool,
    /// Each side's head and published tail share a cache line, as in
    /// DPDK's layout: fewer lines move between cores when every thread
    /// both enqueues and dequeues (a mempool's free list), more when one
    /// side polls the other (a pipeline: leave it off there). See
    /// [`compact`](Self::compact).
    pub compact: bool,
}

impl RingConfig {
    /// This configuration with [`compact`](Self::compact) set to `on`.
    ///
    /// ```
    /// use memplane_ring::RingConfig;
    /// let cfg = RingConfig::MPMC.compact(true);
    /// assert!(cfg.compact && !RingConfig::MPMC.compact);
    /// ```
    #[must_use]
    pub const fn compact(mut self, on: bool) -> Self {
        self.compact = on;
        self
    }

    /// Single producer, single consumer.
    pub const SPSC: Self = Self {
        producer: SyncMode::Single,
        consumer: SyncMode::Single,
        exact: false,
        compact: false,
    };
    /// Multi producer, multi consumer (the default).
    pub const MPMC: Self = Self {
        producer: SyncMode::Multi,
        consumer: SyncMode::Multi,
        exact: false,
        compact: false,
    };
    /// Both sides in relaxed-tail-sync mode.
    pub const RTS: Self = Self {
        producer: SyncMode::MultiRts,
        consumer: SyncMode::MultiRts,
        exact: false,
        compact: false,
    };
    /// Both sides in head-tail-sync mode.
    pub const HTS: Self = Self {
        producer: SyncMode::MultiHts,
        consumer: SyncMode::MultiHts,
        exact: false,
        compact: false,
    };
}

/// Result of a burst: how many elements moved and how many free slots
/// (enqueue) or entries (dequeue) remained after the move, as seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Elements moved.
    pub count: u32,
    /// Free slots (enqueue) or available entries (dequeue) left.
    pub remaining: u32,
}

/// Types that can be stored in a ring.
///
/// # Safety
///
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value
/// (elements may come from another process), the type must have no
/// padding-sensitive invariants and no meaning tied to this process's
/// address space that would make reading it elsewhere unsound. Its size must
/// be a non-zero multiple of 4 and its alignment at most 64 (checked at
/// ring creation).
pub unsafe trait Element: Copy + Send + Sync + 'static {}

macro_rules! element {
    ($($t:ty),*) => { $(
        // SAFETY: plain integer/float: every bit pattern is valid.
        unsafe impl Element for $t {}
    )* };
}
element!(u32, i32, u64, i64, u128, i128, usize, isize, f32, f64);
// SAFETY: arrays of valid-for-any-bits elements are valid for any bits.
unsafe impl<E: Element, const N: usize> Element for [E; N] {}

/// Bytes a ring of `capacity` elements of `esize` bytes needs: header plus
/// slots rounded up to 64 bytes (compare `rte_ring_get_memsize_elem`).
pub fn memsize(esize: usize, capacity: usize, exact: bool) -> Result<usize, RingError> {
    check_esize(esize, 4)?;
    let (size, _) = geometry(capacity, exact)?;
    Ok(bytes_for(size, esize as u32))
}

fn bytes_for(size: u32, esize: u32) -> usize {
    let slots = (size as usize) * (esize as usize);
    slots_offset() + ((slots + 63) & !63)
}

fn check_esize(esize: usize, align: usize) -> Result<(), RingError> {
    if esize == 0 || esize % 4 != 0 || esize > u32::MAX as usize {
        return Err(RingError::ElementSize(esize));
    }
    if align > REGION_ALIGN {
        return Err(RingError::ElementAlign(align));
    }
    Ok(())
}

/// (slots, capacity) for a requested capacity.
fn geometry(capacity: usize, exact: bool) -> Result<(u32, u32), RingError> {
    if capacity == 0 {
        return Err(RingError::ZeroCapacity);
    }
    if capacity > MAX_CAPACITY as usize {
        return Err(RingError::CapacityTooLarge {
            requested: capacity as u64,
            max: MAX_CAPACITY,
        });
    }
    let cap = capacity as u32;
    if exact {
        Ok((cap.next_power_of_two(), cap))
    } else if cap.is_power_of_two() {
        Ok((cap, cap))
    } else {
        Err(RingError::NotPowerOfTwo(cap))
    }
}

/// Process-local view of a ring: pointers into the region plus copies of the
/// header's immutable fields (read once, kept in registers on hot paths).
pub(crate) struct Core {
    hdr: NonNull<Header>,
    slots: NonNull<u8>,
    size: u32,
    mask: u32,
    capacity: u32,
    esize: u32,
    prod_mode: SyncMode,
    cons_mode: SyncMode,
    /// Each side's published position: `tail`, or `near_tail` in a
    /// compact ring. Resolved once here, so no operation tests the flag.
    prod_tail: NonNull<AtomicU64>,
    cons_tail: NonNull<AtomicU64>,
    /// loom: one tracked cell per slot, so the model checker sees slot
    /// accesses and reports any that are not ordered by the protocol.
    #[cfg(loom)]
    cells: Vec<loom::cell::UnsafeCell<()>>,
}

// SAFETY: Core points into shared memory that is only accessed through
// atomics and the ring protocol; it owns nothing thread-bound.
unsafe impl Send for Core {}
// SAFETY: as above; all shared mutation is via atomics, slot accesses are
// ordered by the head/tail protocol.
unsafe impl Sync for Core {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Enq,
    Deq,
}

impl Core {
    #[inline(always)]
    fn hdr(&self) -> &Header {
        // SAFETY: `hdr` points at an initialised header inside the region
        // the owning ring keeps alive for `self`'s lifetime.
        unsafe { self.hdr.as_ref() }
    }

    #[inline(always)]
    fn sides(&self, dir: Dir) -> (&HeadTail, &HeadTail) {
        let h = self.hdr();
        match dir {
            Dir::Enq => (&h.prod, &h.cons),
            Dir::Deq => (&h.cons, &h.prod),
        }
    }

    /// The published positions of (our side, the other side) for `dir`.
    #[inline(always)]
    fn tails(&self, dir: Dir) -> (&AtomicU64, &AtomicU64) {
        let (p, c) = (self.prod_tail(), self.cons_tail());
        match dir {
            Dir::Enq => (p, c),
            Dir::Deq => (c, p),
        }
    }

    #[inline(always)]
    fn prod_tail(&self) -> &AtomicU64 {
        // SAFETY: points at a tail word of the header (from_parts), alive
        // as long as the header.
        unsafe { self.prod_tail.as_ref() }
    }

    #[inline(always)]
    fn cons_tail(&self) -> &AtomicU64 {
        // SAFETY: as prod_tail.
        unsafe { self.cons_tail.as_ref() }
    }

    /// loom: records accesses to the slots of `[head, head + n)`.
    #[cfg(loom)]
    fn track(&self, head: u32, n: u32, write: bool) {
        for i in 0..n {
            let cell = &self.cells[(head.wrapping_add(i) & self.mask) as usize];
            if write {
                cell.with_mut(|_| ());
            } else {
                cell.with(|_| ());
            }
        }
    }

    /// The whole `Multi`-protocol bulk operation on one side, without a
    /// handle: move our head by `want` with a CAS (if that many fit), copy,
    /// wait for the ops reserved before ours, publish our tail. Pools call
    /// one operation per handle, and a handle built per call was spilled
    /// to the stack and reloaded across the CAS loop. `false`: nothing
    /// moved.
    ///
    /// # Safety
    ///
    /// The side `dir` is in [`SyncMode::Multi`]; `size_of::<T>() ==
    /// esize`; `want <= capacity`; `buf` is valid for `want` reads
    /// (enqueue) or writes (dequeue) of `T`.
    #[inline(always)]
    unsafe fn bulk_multi<T: Copy>(&self, dir: Dir, buf: *mut T, want: u32) -> bool {
        let (own, _) = self.sides(dir);
        let (own_tail, opp_tail) = self.tails(dir);
        let mut head = own.head.load(Acquire) as u32;
        loop {
            let opp_tail = opp_tail.load(Acquire) as u32;
            if avail(dir, self.capacity, head, opp_tail) < want {
                // A stale head (others moved on while we were descheduled)
                // can read as "no room": fail only on a current one.
                let now = own.head.load(Acquire) as u32;
                if now == head {
                    return false;
                }
                head = now;
                continue;
            }
            // AcqRel: as in `Handle::reserve_multi`.
            match own.head.compare_exchange(
                u64::from(head),
                u64::from(head.wrapping_add(want)),
                AcqRel,
                Acquire,
            ) {
                Ok(_) => break,
                Err(cur) => {
                    // Another thread moved the head: back off for a few
                    // pauses before the retry, or the threads keep taking
                    // the line from each other and every operation pays a
                    // transfer; backing off lets the winner run a few
                    // operations with the line at home. 2-core pool rows
                    // without a cache about 3x (bulk 32: 1.0-1.2 G obj/s
                    // instead of 0.35-0.4 G) when cache-line transfers
                    // are fast. A fixed count, unrolled: a doubling one
                    // (1..16) was up to 15% better there but its counter
                    // cost two saved registers and 2-10% on 1-core rows.
                    // A lost CAS only happens under contention.
                    head = cur as u32;
                    for _ in 0..LOST_CAS_PAUSES {
                        core::hint::spin_loop();
                    }
                }
            }
        }
        #[cfg(loom)]
        self.track(head, want, dir == Dir::Enq);
        // The common case, a few elements that do not wrap and no earlier
        // op still copying, has no call in it, so the function that
        // inlines this needs no saved registers (DPDK's ring functions
        // push two; with the `memcpy` fallback and the wait's yield
        // inline, ours pushed six, 4-5% of an uncached pool get). The
        // rest finishes out of line, in tail position.
        let idx = (head & self.mask) as usize;
        if want <= SMALL_BULK && idx + want as usize <= self.mask as usize + 1 {
            // SAFETY: [idx, idx + want) lies inside the slot array
            // (checked) and is ours (reserved above; for a dequeue,
            // published by producers); buf per our caller.
            unsafe {
                let slot = self.slots.as_ptr().cast::<T>().add(idx);
                if dir == Dir::Enq {
                    copy_units(slot, buf, want as usize, 1);
                } else {
                    copy_units(buf, slot, want as usize, 1);
                }
            }
            // Acquire: the slot accesses of the ops reserved before ours
            // happen-before our Release.
            if own_tail.load(Acquire) as u32 == head {
                own_tail.store(u64::from(head.wrapping_add(want)), Release);
                return true;
            }
            return publish_after_wait(own_tail, head, want);
        }
        // SAFETY: as above, for the two pieces.
        unsafe { self.bulk_multi_finish(dir, buf, head, want) }
    }

    /// The rest of [`bulk_multi`](Self::bulk_multi) for bulks that are
    /// large or wrap: the copy, then the wait and the publish.
    ///
    /// # Safety
    ///
    /// `[head, head + want)` reserved by the caller in `dir`; `buf` as
    /// in `bulk_multi`.
    #[inline(never)]
    unsafe fn bulk_multi_finish<T: Copy>(
        &self,
        dir: Dir,
        buf: *mut T,
        head: u32,
        want: u32,
    ) -> bool {
        // SAFETY: [head, head + want) is ours (reserved by our caller; for
        // a dequeue, published by producers); want <= capacity <= size;
        // buf per our caller.
        unsafe { slots_copy(self.slots, self.mask, head, buf, want, 1, dir == Dir::Enq) };
        publish_after_wait(self.tails(dir).0, head, want)
    }

    fn count(&self) -> u32 {
        let p = self.prod_tail().load(Acquire) as u32;
        let c = self.cons_tail().load(Acquire) as u32;
        p.wrapping_sub(c).min(self.capacity)
    }

    fn name(&self) -> String {
        let n = &self.hdr().name;
        let len = n.iter().position(|&b| b == 0).unwrap_or(n.len());
        String::from_utf8_lossy(&n[..len]).into_owned()
    }
}

/// Moves one `T` from `src` to `dst`. Element types of 4, 8 and 16 bytes
/// move as one integer of that size: arrays and structs of that size would
/// otherwise be moved with a byte copy that keeps the value (and the
/// caller's variables holding it) in memory instead of registers.
///
/// # Safety
///
/// `src` valid for reading and `dst` for writing one `T`, both aligned for
/// `T`, not overlapping.
#[inline(always)]
unsafe fn move_one<T: Copy>(src: *const T, dst: *mut T) {
    // SAFETY: per the caller; the integer has exactly T's size, and every
    // bit pattern of T's bytes is a valid integer and (Element contract)
    // a valid T.
    unsafe {
        match size_of::<T>() {
            4 => dst
                .cast::<u32>()
                .write_unaligned(src.cast::<u32>().read_unaligned()),
            8 => dst
                .cast::<u64>()
                .write_unaligned(src.cast::<u64>().read_unaligned()),
            16 => dst
                .cast::<u128>()
                .write_unaligned(src.cast::<u128>().read_unaligned()),
            _ => dst.write(src.read()),
        }
    }
}

/// Free slots (Enq) or entries (Deq) of a ring of `cap` given our head
/// and the other side's tail. A value that does not fit the ring (a stale
/// tail that other consumers/producers have overtaken, a corrupt header)
/// counts as 0, which makes the caller reload, then give up safely.
#[inline(always)]
fn avail(dir: Dir, cap: u32, head: u32, opp: u32) -> u32 {
    match dir {
        Dir::Enq => cap.saturating_sub(head.wrapping_sub(opp)),
        Dir::Deq => {
            let ent = opp.wrapping_sub(head);
            if ent > cap {
                0
            } else {
                ent
            }
        }
    }
}

/// Pauses after each lost head CAS of a handle-less multi bulk
/// operation (`Core::bulk_multi`).
const LOST_CAS_PAUSES: u32 = 8;

/// Bulks up to this many elements take the call-free path of a
/// handle-less multi-thread operation (`Core::bulk_multi`).
const SMALL_BULK: u32 = 32;

/// Waits until `tail` reaches `head` (the ops reserved before ours have
/// published; Acquire: their slot accesses happen-before our Release),
/// then publishes `head + n`. Out of line: the wait loop's yield is a
/// call, and a call in the inlined path costs every caller saved
/// registers.
#[inline(never)]
fn publish_after_wait(tail: &AtomicU64, head: u32, n: u32) -> bool {
    let mut rounds = 0;
    while tail.load(Acquire) as u32 != head {
        wait_round(&mut rounds);
    }
    tail.store(u64::from(head.wrapping_add(n)), Release);
    true
}

/// Copies `n` elements of `unit` `U`s each between `buf` and the slots
/// from position `head` on (`into_ring`: from `buf` into the slots), in
/// one piece or, where the positions wrap, two.
///
/// # Safety
///
/// `slots` is the slot array of a ring with `mask + 1` slots of
/// `size_of::<U>() * unit` bytes; `[head, head + n)` is reserved by the
/// caller (into the ring) or published and reserved (out of it), `n <=
/// mask + 1`; `buf` is valid for `n * unit` reads (into the ring) or
/// writes (out of it).
#[inline(always)]
unsafe fn slots_copy<U: Copy>(
    slots: NonNull<u8>,
    mask: u32,
    head: u32,
    buf: *mut U,
    n: u32,
    unit: usize,
    into_ring: bool,
) {
    let base = slots.as_ptr().cast::<U>();
    let idx = (head & mask) as usize;
    let size = mask as usize + 1;
    let n = n as usize;
    // SAFETY: [idx, idx + n), or its two wrapped pieces, lie inside the
    // slot array (n <= size); the reservation gives us exclusive access to
    // them; buf per the caller. The unwrapped case copies `n` (constant at
    // constant-size call sites) in one piece.
    unsafe {
        let (ring_part, buf_part) = (base.add(idx * unit), buf);
        if idx + n <= size {
            if into_ring {
                copy_units(ring_part, buf_part, n * unit, unit);
            } else {
                copy_units(buf_part, ring_part, n * unit, unit);
            }
        } else {
            let first = size - idx;
            let rest = buf.add(first * unit);
            if into_ring {
                copy_units(ring_part, buf_part, first * unit, unit);
                copy_units(base, rest, (n - first) * unit, unit);
            } else {
                copy_units(buf_part, ring_part, first * unit, unit);
                copy_units(rest, base, (n - first) * unit, unit);
            }
        }
    }
}

/// Copies `count` units of `U` from `src` to `dst`. Up to 64 units of at
/// most 16 bytes take a ladder of at most two overlapping fixed-size
/// copies (as `rte_memcpy` does for small sizes): a `memcpy` call, or a
/// vectorised loop with its size checks, costs more than the copy itself
/// for the bulk sizes rings see (1 to 32). Constant counts fold to one
/// branch.
///
/// # Safety
///
/// `src` valid for `count` reads and `dst` for `count` writes of `U`, both
/// aligned for `U`, not overlapping.
#[inline(always)]
unsafe fn copy_units<U: Copy>(dst: *mut U, src: *const U, count: usize, unit: usize) {
    /// Copies `K` units at `off`.
    ///
    /// # Safety
    /// `[off, off + K)` valid in both.
    #[inline(always)]
    unsafe fn block<U: Copy, const K: usize>(dst: *mut U, src: *const U, off: usize) {
        // SAFETY: per the caller; unaligned access of a [U; K].
        unsafe {
            let v = src.add(off).cast::<[U; K]>().read_unaligned();
            dst.add(off).cast::<[U; K]>().write_unaligned(v);
        }
    }
    let _ = unit;
    if size_of::<U>() > 16 || count > 64 {
        // SAFETY: per the caller.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, count) };
        return;
    }
    // SAFETY: in every arm, the blocks are [0, K) and [count - K, count)
    // with K <= count, inside the caller's ranges; they may overlap each
    // other (the same values written twice), never src with dst.
    unsafe {
        if count <= 1 {
            if count == 1 {
                move_one(src, dst);
            }
        } else if count <= 4 {
            block::<U, 2>(dst, src, 0);
            block::<U, 2>(dst, src, count - 2);
        } else if count <= 8 {
            block::<U, 4>(dst, src, 0);
            block::<U, 4>(dst, src, count - 4);
        } else if count <= 16 {
            block::<U, 8>(dst, src, 0);
            block::<U, 8>(dst, src, count - 8);
        } else if count <= 32 {
            block::<U, 16>(dst, src, 0);
            block::<U, 16>(dst, src, count - 16);
        } else {
            block::<U, 32>(dst, src, 0);
            block::<U, 32>(dst, src, count - 32);
        }
    }
}

/// A ring with runtime element size, moving elements as raw bytes.
///
/// Same protocol and layout as [`Ring`]; use it when the element type is
/// only known at run time (e.g. a mempool with a configured object size).
pub struct RawRing<M: RingMemory> {
    core: Core,
    mem: M,
}

impl<M: RingMemory> RawRing<M> {
    /// Initialises a ring of `capacity` elements of `esize` bytes at the
    /// start of `mem`. Validates everything before writing: on error the
    /// region is untouched.
    pub fn init(
        mem: M,
        name: &str,
        esize: usize,
        capacity: usize,
        cfg: RingConfig,
    ) -> Result<Self, RingError> {
        Self::init_aligned(mem, name, esize, 4, capacity, cfg)
    }

    fn init_aligned(
        mem: M,
        name: &str,
        esize: usize,
        align: usize,
        capacity: usize,
        cfg: RingConfig,
    ) -> Result<Self, RingError> {
        check_esize(esize, align)?;
        let (size, cap) = geometry(capacity, cfg.exact)?;
        if name.len() > NAME_MAX || name.as_bytes().contains(&0) {
            return Err(RingError::BadName {
                name: name.to_owned(),
                max: NAME_MAX,
            });
        }
        let base = mem.as_ptr();
        if (base as usize) % REGION_ALIGN != 0 {
            return Err(RingError::Misaligned {
                addr: base as usize,
            });
        }
        let needed = bytes_for(size, esize as u32);
        if mem.len() < needed {
            return Err(RingError::RegionTooSmall {
                needed,
                got: mem.len(),
            });
        }
        let mut name_buf = [0u8; 32];
        name_buf[..name.len()].copy_from_slice(name.as_bytes());
        let side = |mode: SyncMode| HeadTail {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            htd_max: AtomicU32::new(cap / 8),
            sync: mode as u32,
            owner: AtomicU32::new(0),
            _pad0: 0,
            near_tail: AtomicU64::new(0),
            #[cfg(not(loom))]
            _pad1: [0; 32],
            #[cfg(not(loom))]
            _pad: [0; 56],
        };
        let hdr = Header {
            magic: AtomicU64::new(0),
            version: LAYOUT_VERSION,
            flags: if cfg.exact { FLAG_EXACT } else { 0 }
                | if cfg.compact { FLAG_COMPACT } else { 0 },
            size,
            mask: size - 1,
            capacity: cap,
            esize: esize as u32,
            name: name_buf,
            _reserved: [0; 64],
            prod: side(cfg.producer),
            cons: side(cfg.consumer),
        };
        // Alignment checked above (64 >= align_of::<Header>()).
        #[allow(clippy::cast_ptr_alignment)]
        let hp = base.cast::<Header>();
        // SAFETY: the region is at least `needed` bytes, 64-byte aligned
        // (Header needs 8), and by the RingMemory contract nobody else uses
        // it while we initialise.
        unsafe { hp.write(hdr) };
        // SAFETY: just written.
        let h = unsafe { &*hp };
        // Publish last: an attacher that sees MAGIC sees a complete header.
        h.magic.store(MAGIC, Release);
        Ok(Self::from_parts(
            mem,
            size,
            cap,
            esize as u32,
            cfg.producer,
            cfg.consumer,
            cfg.compact,
        ))
    }

    fn from_parts(
        mem: M,
        size: u32,
        capacity: u32,
        esize: u32,
        prod_mode: SyncMode,
        cons_mode: SyncMode,
        compact: bool,
    ) -> Self {
        let base = mem.as_ptr();
        let hdr: NonNull<Header> = NonNull::new(base.cast()).expect("region pointer is non-null");
        // SAFETY: the region holds an initialised header (init wrote it,
        // attach validated it) for as long as `mem` lives.
        let h = unsafe { hdr.as_ref() };
        let tail =
            |side: &HeadTail| NonNull::from(if compact { &side.near_tail } else { &side.tail });
        let (prod_tail, cons_tail) = (tail(&h.prod), tail(&h.cons));
        let core = Core {
            hdr,
            // SAFETY: slots_offset() < needed <= len, so in bounds.
            slots: NonNull::new(unsafe { base.add(slots_offset()) }).expect("non-null"),
            size,
            mask: size - 1,
            capacity,
            esize,
            prod_mode,
            cons_mode,
            prod_tail,
            cons_tail,
            #[cfg(loom)]
            cells: (0..size).map(|_| loom::cell::UnsafeCell::new(())).collect(),
        };
        Self { core, mem }
    }

    /// Attaches to a ring that was initialised in `mem` (by this or another
    /// process, at any address). Validates the header.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let base = mem.as_ptr();
        if (base as usize) % REGION_ALIGN != 0 {
            return Err(RingError::Misaligned {
                addr: base as usize,
            });
        }
        if mem.len() < slots_offset() {
            return Err(RingError::RegionTooSmall {
                needed: slots_offset(),
                got: mem.len(),
            });
        }
        // SAFETY: in bounds and aligned (checked above); the header holds
        // only integers and atomics, so any bytes are a valid value.
        #[allow(clippy::cast_ptr_alignment)]
        let h = unsafe { &*base.cast::<Header>() };
        let magic = h.magic.load(Acquire);
        if magic != MAGIC {
            return Err(RingError::BadMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        if h.version != LAYOUT_VERSION {
            return Err(RingError::BadVersion {
                found: h.version,
                expected: LAYOUT_VERSION,
            });
        }
        let (size, cap, esize) = (h.size, h.capacity, h.esize);
        if !size.is_power_of_two() || size > 1 << 31 || h.mask != size - 1 {
            return Err(RingError::CorruptHeader(
                "size is not a power of two or mask != size - 1",
            ));
        }
        if cap == 0 || cap > size {
            return Err(RingError::CorruptHeader(
                "capacity is 0 or larger than size",
            ));
        }
        if esize == 0 || esize % 4 != 0 {
            return Err(RingError::CorruptHeader(
                "element size is not a multiple of 4",
            ));
        }
        let (Some(pm), Some(cm)) = (
            SyncMode::from_u32(h.prod.sync),
            SyncMode::from_u32(h.cons.sync),
        ) else {
            return Err(RingError::CorruptHeader("unknown sync mode"));
        };
        let needed = bytes_for(size, esize);
        if mem.len() < needed {
            return Err(RingError::RegionTooSmall {
                needed,
                got: mem.len(),
            });
        }
        if h.flags & !(FLAG_EXACT | FLAG_COMPACT) != 0 {
            return Err(RingError::CorruptHeader("unknown flag bits"));
        }
        let compact = h.flags & FLAG_COMPACT != 0;
        Ok(Self::from_parts(mem, size, cap, esize, pm, cm, compact))
    }

    /// Whether each side's head and published tail share a cache line
    /// ([`RingConfig::compact`]).
    pub fn is_compact(&self) -> bool {
        self.core.hdr().flags & FLAG_COMPACT != 0
    }

    /// The ring's name.
    pub fn name(&self) -> String {
        self.core.name()
    }
    /// Maximum number of elements the ring holds.
    pub fn capacity(&self) -> u32 {
        self.core.capacity
    }
    /// Number of slots (a power of two, >= capacity).
    pub fn size(&self) -> u32 {
        self.core.size
    }
    /// Element size in bytes.
    pub fn element_size(&self) -> u32 {
        self.core.esize
    }
    /// Elements in the ring (a snapshot).
    pub fn count(&self) -> u32 {
        self.core.count()
    }
    /// Free slots (a snapshot).
    pub fn free_count(&self) -> u32 {
        self.core.capacity - self.core.count()
    }
    /// True if the ring holds no elements (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.core.count() == 0
    }
    /// True if the ring has no free slot (a snapshot).
    pub fn is_full(&self) -> bool {
        self.core.count() == self.core.capacity
    }
    /// Producer sync mode.
    pub fn producer_mode(&self) -> SyncMode {
        self.core.prod_mode
    }
    /// Consumer sync mode.
    pub fn consumer_mode(&self) -> SyncMode {
        self.core.cons_mode
    }
    /// The memory the ring lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }
    /// Gives the memory back (the ring stays initialised in it).
    pub fn into_memory(self) -> M {
        self.mem
    }

    /// Sets the maximum head-tail distance of an RTS side (`producer` true
    /// for the producer side). DPDK's default, used here too, is capacity/8.
    pub fn set_htd_max(&self, producer: bool, max: u32) -> Result<(), RingError> {
        let (side, mode, role) = if producer {
            (&self.core.hdr().prod, self.core.prod_mode, "producer")
        } else {
            (&self.core.hdr().cons, self.core.cons_mode, "consumer")
        };
        if mode != SyncMode::MultiRts {
            return Err(RingError::WrongMode {
                op: "set_htd_max",
                needed: "MultiRts",
                role,
                actual: mode,
            });
        }
        side.htd_max.store(max, Relaxed);
        Ok(())
    }

    /// Empties the ring and releases single-role claims.
    ///
    /// # Safety
    ///
    /// No producer or consumer (in any process) may be using the ring.
    pub unsafe fn reset(&self) {
        let h = self.core.hdr();
        for s in [&h.prod, &h.cons] {
            s.head.store(0, Release);
            s.tail.store(0, Release);
            s.near_tail.store(0, Release);
            s.owner.store(0, Release);
        }
    }

    /// A producer handle. For a [`SyncMode::Single`] producer side this
    /// claims the single-producer role (across processes) until the handle
    /// is dropped; otherwise any number may exist.
    #[inline(always)]
    pub fn producer(&self) -> Result<RawProducer<'_>, RingError> {
        Ok(RawProducer {
            h: Handle::new(&self.core, Dir::Enq)?,
        })
    }

    /// A consumer handle; see [`producer`](Self::producer).
    #[inline(always)]
    pub fn consumer(&self) -> Result<RawConsumer<'_>, RingError> {
        Ok(RawConsumer {
            h: Handle::new(&self.core, Dir::Deq)?,
        })
    }
}

impl<M: RingMemory> core::fmt::Debug for RawRing<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RawRing")
            .field("name", &self.name())
            .field("esize", &self.core.esize)
            .field("capacity", &self.core.capacity)
            .field("count", &self.count())
            .field("producer", &self.core.prod_mode)
            .field("consumer", &self.core.cons_mode)
            .finish_non_exhaustive()
    }
}

/// Common state of a producer or consumer handle: everything an operation
/// needs (both sides of the header, the slots, the geometry and the sync
/// mode) one load away from the handle, so a call is a few loads and no
/// chasing through the ring.
struct Handle<'r> {
    /// Our side of the header (the producer side for a producer).
    own: &'r HeadTail,
    /// Our published position (our side's tail word).
    own_tail: &'r AtomicU64,
    /// The other side's published position, which bounds us.
    opp_tail: &'r AtomicU64,
    /// First slot.
    slots: NonNull<u8>,
    mask: u32,
    capacity: u32,
    mode: SyncMode,
    /// Last opposite tail seen (Acquire-loaded); refreshed only when it
    /// says there is not enough room/data.
    cache: Cell<u32>,
    core: &'r Core,
    claimed: bool,
}

// SAFETY: `slots` points into the ring's region, which `core` (borrowed for
// 'r) keeps alive; slot accesses are ordered by the head/tail protocol as for
// `Core`, which is Send + Sync. `cache` is a Cell, so Handle stays !Sync.
unsafe impl Send for Handle<'_> {}

impl<'r> Handle<'r> {
    // Inlined: pools and pipelines open a handle per call, and an
    // out-of-line constructor returned the whole handle through memory.
    #[inline(always)]
    fn new(core: &'r Core, dir: Dir) -> Result<Self, RingError> {
        let (own, _) = core.sides(dir);
        let (own_tail, opp_tail) = core.tails(dir);
        let (mode, role) = match dir {
            Dir::Enq => (core.prod_mode, "producer"),
            Dir::Deq => (core.cons_mode, "consumer"),
        };
        let claimed = mode == SyncMode::Single;
        if claimed && own.owner.compare_exchange(0, 1, Acquire, Relaxed).is_err() {
            return Err(RingError::RoleTaken {
                role,
                name: core.name(),
            });
        }
        Ok(Self {
            own,
            own_tail,
            opp_tail,
            slots: core.slots,
            mask: core.mask,
            capacity: core.capacity,
            mode,
            cache: Cell::new(opp_tail.load(Acquire) as u32),
            core,
            claimed,
        })
    }

    /// See the free function [`avail`].
    #[inline(always)]
    fn avail(&self, dir: Dir, head: u32, opp: u32) -> u32 {
        avail(dir, self.capacity, head, opp)
    }

    /// How many of `want` fit, using the cached opposite tail first and
    /// reloading it only when the cache says "not enough". Returns
    /// (n, available).
    #[inline(always)]
    fn fit(&self, dir: Dir, head: u32, want: u32, bulk: bool) -> (u32, u32) {
        let mut av = self.avail(dir, head, self.cache.get());
        if av < want {
            let o = self.opp_tail.load(Acquire) as u32;
            self.cache.set(o);
            av = self.avail(dir, head, o);
        }
        let n = if av >= want {
            want
        } else if bulk {
            0
        } else {
            av
        };
        (n, av)
    }

    /// Moves our head by up to `want` in the CAS-based modes (`Multi`, RTS,
    /// HTS; `Single` goes through [`reserve_fast`](Self::reserve_fast) and
    /// shares the `Multi` arm only to keep the match exhaustive); returns
    /// (old head, n, remaining).
    #[inline(always)]
    fn reserve_multi(&self, dir: Dir, mode: SyncMode, want: u32, bulk: bool) -> (u32, u32, u32) {
        let (own, own_tail) = (self.own, self.own_tail);
        match mode {
            SyncMode::Single | SyncMode::Multi => {
                let mut head = own.head.load(Acquire) as u32;
                loop {
                    let (n, av) = self.fit(dir, head, want, bulk);
                    if n == 0 {
                        // Our head may be stale: if others moved it on
                        // while we were descheduled, (tail - head) left
                        // the ring's range and read as 0. Fail only on a
                        // head that is still current.
                        let now = own.head.load(Acquire) as u32;
                        if now != head {
                            head = now;
                            continue;
                        }
                        return (head, 0, av);
                    }
                    // AcqRel: a later op that reads our new head also sees the
                    // opposite tail we based it on (no over-commit on weak
                    // memory models).
                    match own.head.compare_exchange(
                        u64::from(head),
                        u64::from(head.wrapping_add(n)),
                        AcqRel,
                        Acquire,
                    ) {
                        Ok(_) => return (head, n, av - n),
                        Err(cur) => head = cur as u32,
                    }
                }
            }
            SyncMode::MultiHts => {
                let mut cur = own.head.load(Acquire);
                let mut rounds = 0;
                loop {
                    let (h, t) = (cur as u32, (cur >> 32) as u32);
                    if h != t {
                        wait_round(&mut rounds);
                        cur = own.head.load(Acquire);
                        continue;
                    }
                    let (n, av) = self.fit(dir, h, want, bulk);
                    if n == 0 {
                        return (h, 0, av);
                    }
                    match own.head.compare_exchange(
                        cur,
                        pack(h.wrapping_add(n), t),
                        AcqRel,
                        Acquire,
                    ) {
                        Ok(_) => return (h, n, av - n),
                        Err(c) => cur = c,
                    }
                }
            }
            SyncMode::MultiRts => {
                let max = own.htd_max.load(Relaxed);
                let mut cur = own.head.load(Acquire);
                let mut rounds = 0;
                loop {
                    let h = cur as u32;
                    let t = own_tail.load(Acquire) as u32;
                    if h.wrapping_sub(t) > max {
                        wait_round(&mut rounds);
                        cur = own.head.load(Acquire);
                        continue;
                    }
                    let (n, av) = self.fit(dir, h, want, bulk);
                    if n == 0 {
                        return (h, 0, av);
                    }
                    let cnt = ((cur >> 32) as u32).wrapping_add(1);
                    match own.head.compare_exchange(
                        cur,
                        pack(h.wrapping_add(n), cnt),
                        AcqRel,
                        Acquire,
                    ) {
                        Ok(_) => return (h, n, av - n),
                        Err(c) => cur = c,
                    }
                }
            }
        }
    }

    /// Makes `n` elements from `head` visible to the other side, in the
    /// CAS-based modes (see [`reserve_multi`](Self::reserve_multi)).
    #[inline(always)]
    fn publish_multi(&self, mode: SyncMode, head: u32, n: u32) {
        let (own, own_tail) = (self.own, self.own_tail);
        let new = head.wrapping_add(n);
        match mode {
            SyncMode::Single | SyncMode::Multi => {
                // Wait for the ops reserved before ours. Acquire, so their
                // slot accesses happen-before our Release below and reach
                // whoever acquires our tail.
                let mut rounds = 0;
                while own_tail.load(Acquire) as u32 != head {
                    wait_round(&mut rounds);
                }
                own_tail.store(u64::from(new), Release);
            }
            SyncMode::MultiHts => {
                own_tail.store(u64::from(new), Release);
                own.head.store(pack(new, new), Release);
            }
            SyncMode::MultiRts => {
                let mut t = own_tail.load(Acquire);
                loop {
                    let h = own.head.load(Acquire);
                    let cnt = ((t >> 32) as u32).wrapping_add(1);
                    // Last one out (every started op has finished) moves the
                    // tail to the head; others only count themselves done.
                    let pos = if cnt == (h >> 32) as u32 {
                        h as u32
                    } else {
                        t as u32
                    };
                    match own_tail.compare_exchange(t, pack(pos, cnt), AcqRel, Acquire) {
                        Ok(_) => break,
                        Err(c) => t = c,
                    }
                }
            }
        }
    }

    /// Copies `n` elements of `unit` `U`s each from `src` into the slots
    /// starting at position `head`.
    ///
    /// # Safety
    ///
    /// `[head, head + n)` must be reserved by the caller, `n <= size`, `src`
    /// valid for `n * unit` reads, and `size_of::<U>() * unit == esize`.
    #[inline(always)]
    unsafe fn copy_in<U: Copy>(&self, head: u32, src: *const U, n: u32, unit: usize) {
        #[cfg(loom)]
        self.core.track(head, n, true);
        // SAFETY: per our caller.
        unsafe { slots_copy(self.slots, self.mask, head, src.cast_mut(), n, unit, true) }
    }

    /// Copies `n` elements out of the slots starting at `head` into `dst`.
    ///
    /// # Safety
    ///
    /// As [`copy_in`](Self::copy_in), with `dst` valid for `n * unit` writes.
    #[inline(always)]
    unsafe fn copy_out<U: Copy>(&self, head: u32, dst: *mut U, n: u32, unit: usize) {
        #[cfg(loom)]
        self.core.track(head, n, false);
        // SAFETY: per our caller.
        unsafe { slots_copy(self.slots, self.mask, head, dst, n, unit, false) }
    }

    /// True for the modes whose whole operation is inlined at the call
    /// site (`Single`, `Multi`); RTS and HTS go through an out-of-line call.
    #[inline(always)]
    fn inline_mode(&self) -> bool {
        matches!(self.mode, SyncMode::Single | SyncMode::Multi)
    }

    /// Reserves up to `want` positions in the `Single` or `Multi` protocol
    /// (inlined into the caller); returns (old head, n, remaining). The
    /// range `[head, head + n)` is ours until [`publish_fast`].
    ///
    /// [`publish_fast`]: Self::publish_fast
    #[inline(always)]
    fn reserve_fast(&self, dir: Dir, want: u32, bulk: bool) -> (u32, u32, u32) {
        if self.mode == SyncMode::Single {
            // We are the only writer of our tail (role claimed with
            // Acquire), so a relaxed read of our own position is exact.
            let head = self.own_tail.load(Relaxed) as u32;
            let (n, av) = self.fit(dir, head, want, bulk);
            (head, n, av - n)
        } else {
            self.reserve_multi(dir, SyncMode::Multi, want, bulk)
        }
    }

    /// Publishes what [`reserve_fast`](Self::reserve_fast) reserved.
    #[inline(always)]
    fn publish_fast(&self, head: u32, n: u32) {
        if self.mode == SyncMode::Single {
            self.own_tail
                .store(u64::from(head.wrapping_add(n)), Release);
        } else {
            self.publish_multi(SyncMode::Multi, head, n);
        }
    }

    /// Pointer to the slot of position `pos` for a typed ring (`T` is the
    /// element type), with the loom access check.
    #[inline(always)]
    fn slot<T>(&self, pos: u32, write: bool) -> *mut T {
        let idx = pos & self.mask;
        #[cfg(loom)]
        if write {
            self.core.cells[idx as usize].with_mut(|_| ());
        } else {
            self.core.cells[idx as usize].with(|_| ());
        }
        #[cfg(not(loom))]
        let _ = write;
        // SAFETY: idx <= mask < size: inside the slot array.
        unsafe { self.slots.as_ptr().cast::<T>().add(idx as usize) }
    }

    /// # Safety
    /// `src` valid for `n * unit` reads of `U`, `size_of::<U>() * unit == esize`.
    #[inline(always)]
    unsafe fn enqueue<U: Copy>(
        &self,
        src: *const U,
        want: u32,
        unit: usize,
        bulk: bool,
    ) -> (u32, u32) {
        if self.inline_mode() {
            let (head, n, rem) = self.reserve_fast(Dir::Enq, want, bulk);
            if n != 0 {
                // SAFETY: [head, head+n) reserved above, n <= capacity <=
                // size; src per our caller.
                unsafe { self.copy_in(head, src, n, unit) };
                self.publish_fast(head, n);
            }
            (n, rem)
        } else {
            // SAFETY: per our caller.
            unsafe { self.enqueue_slow(src, want, unit, bulk) }
        }
    }

    /// Enqueues one element of a typed ring (`T` is the element type),
    /// passed by value: it goes from registers straight into its slot (no
    /// general copy loop; the out-of-line modes get their own copy, so
    /// `item` need not live in memory).
    #[inline(always)]
    fn enqueue_one<T: Copy>(&self, item: T) -> bool {
        if self.inline_mode() {
            let (head, n, _) = self.reserve_fast(Dir::Enq, 1, true);
            if n != 0 {
                // SAFETY: the slot of `head` is reserved for us (n == 1).
                unsafe { move_one(&raw const item, self.slot::<T>(head, true)) };
                self.publish_fast(head, n);
            }
            n != 0
        } else {
            let tmp = item;
            // SAFETY: one T readable at &tmp; unit 1 and U = T.
            unsafe { self.enqueue_slow(&raw const tmp, 1, 1, true).0 == 1 }
        }
    }

    /// RTS and HTS enqueue, kept out of line so the common modes inline
    /// into small call sites.
    ///
    /// # Safety
    /// As [`enqueue`](Self::enqueue).
    #[inline(never)]
    unsafe fn enqueue_slow<U: Copy>(
        &self,
        src: *const U,
        want: u32,
        unit: usize,
        bulk: bool,
    ) -> (u32, u32) {
        let mode = self.mode;
        let (head, n, rem) = self.reserve_multi(Dir::Enq, mode, want, bulk);
        if n != 0 {
            // SAFETY: [head, head+n) reserved above, n <= capacity <= size;
            // src per our caller.
            unsafe { self.copy_in(head, src, n, unit) };
            self.publish_multi(mode, head, n);
        }
        (n, rem)
    }

    /// # Safety
    /// `dst` valid for `n * unit` writes of `U`, `size_of::<U>() * unit == esize`.
    #[inline(always)]
    unsafe fn dequeue<U: Copy>(
        &self,
        dst: *mut U,
        want: u32,
        unit: usize,
        bulk: bool,
    ) -> (u32, u32) {
        if self.inline_mode() {
            let (head, n, rem) = self.reserve_fast(Dir::Deq, want, bulk);
            if n != 0 {
                // SAFETY: [head, head+n) reserved above (published entries,
                // ours until we publish), n <= capacity <= size; dst per our
                // caller.
                unsafe { self.copy_out(head, dst, n, unit) };
                self.publish_fast(head, n);
            }
            (n, rem)
        } else {
            // SAFETY: per our caller.
            unsafe { self.dequeue_slow(dst, want, unit, bulk) }
        }
    }

    /// Dequeues one element of a typed ring by value (see
    /// [`enqueue_one`](Self::enqueue_one)).
    #[inline(always)]
    fn dequeue_one<T: Copy>(&self) -> Option<T> {
        if self.inline_mode() {
            let (head, n, _) = self.reserve_fast(Dir::Deq, 1, true);
            if n == 0 {
                return None;
            }
            let mut out = core::mem::MaybeUninit::<T>::uninit();
            // SAFETY: the entry at `head` is reserved for us (n == 1).
            unsafe { move_one(self.slot::<T>(head, false), out.as_mut_ptr()) };
            self.publish_fast(head, n);
            // SAFETY: written above; any bits are a valid T (Element
            // contract).
            Some(unsafe { out.assume_init() })
        } else {
            self.dequeue_one_slow()
        }
    }

    #[inline(never)]
    fn dequeue_one_slow<T: Copy>(&self) -> Option<T> {
        let mut tmp = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: room for one T at tmp; unit 1 and U = T.
        let (n, _) = unsafe { self.dequeue_slow(tmp.as_mut_ptr(), 1, 1, true) };
        // SAFETY: n == 1 means one T was copied in; any bits are a valid T
        // (Element contract).
        (n == 1).then(|| unsafe { tmp.assume_init() })
    }

    /// RTS and HTS dequeue, out of line.
    ///
    /// # Safety
    /// As [`dequeue`](Self::dequeue).
    #[inline(never)]
    unsafe fn dequeue_slow<U: Copy>(
        &self,
        dst: *mut U,
        want: u32,
        unit: usize,
        bulk: bool,
    ) -> (u32, u32) {
        let mode = self.mode;
        let (head, n, rem) = self.reserve_multi(Dir::Deq, mode, want, bulk);
        if n != 0 {
            // SAFETY: [head, head+n) reserved above, n <= capacity <= size;
            // dst per our caller.
            unsafe { self.copy_out(head, dst, n, unit) };
            self.publish_multi(mode, head, n);
        }
        (n, rem)
    }

    /// # Safety
    /// As `dequeue`; only for a single consumer.
    #[inline(always)]
    unsafe fn peek<U: Copy>(&self, dst: *mut U, n: u32, unit: usize) -> u32 {
        let head = self.own_tail.load(Relaxed) as u32;
        let (n, _) = self.fit(Dir::Deq, head, n, false);
        // SAFETY: entries [head, head+n) are published and, with a single
        // consumer, cannot be released to producers while we read them.
        unsafe { self.copy_out(head, dst, n, unit) };
        n
    }

    #[inline(always)]
    fn bulk_len(&self, len: usize) -> Result<u32, BulkError> {
        if len > self.capacity as usize {
            return Err(BulkError::TooLarge {
                requested: len,
                capacity: self.capacity,
            });
        }
        Ok(len as u32)
    }

    fn check_peek(&self) -> Result<(), RingError> {
        if self.mode == SyncMode::Single {
            Ok(())
        } else {
            Err(RingError::WrongMode {
                op: "peek",
                needed: "Single",
                role: "consumer",
                actual: self.mode,
            })
        }
    }
}

impl Drop for Handle<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.claimed {
            self.own.owner.store(0, Release);
        }
    }
}

/// Producer handle of a [`RawRing`]: moves elements as byte slices whose
/// length is a multiple of the element size. `Send`, not `Sync`.
pub struct RawProducer<'r> {
    h: Handle<'r>,
}

/// Consumer handle of a [`RawRing`]. `Send`, not `Sync`.
pub struct RawConsumer<'r> {
    h: Handle<'r>,
}

fn elems(len: usize, esize: u32) -> Result<usize, BulkError> {
    if len % esize as usize != 0 {
        return Err(BulkError::BadLength { len, esize });
    }
    Ok(len / esize as usize)
}

impl RawProducer<'_> {
    /// Enqueues all elements of `bytes` or none; returns the free slots left.
    pub fn enqueue_bulk(&self, bytes: &[u8]) -> Result<u32, BulkError> {
        let es = self.h.core.esize;
        let n = self.h.bulk_len(elems(bytes.len(), es)?)?;
        // SAFETY: bytes holds n elements of esize bytes, copied as u8 units.
        let (done, rem) = unsafe { self.h.enqueue(bytes.as_ptr(), n, es as usize, true) };
        if done == n {
            Ok(rem)
        } else {
            Err(BulkError::Insufficient {
                requested: n,
                available: rem,
            })
        }
    }

    /// Enqueues as many elements of `bytes` as fit.
    pub fn enqueue_burst(&self, bytes: &[u8]) -> Result<Transfer, BulkError> {
        let es = self.h.core.esize;
        let n = elems(bytes.len(), es)?.min(self.h.capacity as usize) as u32;
        // SAFETY: as above.
        let (count, remaining) = unsafe { self.h.enqueue(bytes.as_ptr(), n, es as usize, false) };
        Ok(Transfer { count, remaining })
    }
}

impl RawConsumer<'_> {
    /// Dequeues exactly `out.len() / esize` elements or none; returns the
    /// entries left.
    pub fn dequeue_bulk(&self, out: &mut [u8]) -> Result<u32, BulkError> {
        let es = self.h.core.esize;
        let n = self.h.bulk_len(elems(out.len(), es)?)?;
        // SAFETY: out has room for n elements of esize bytes.
        let (done, rem) = unsafe { self.h.dequeue(out.as_mut_ptr(), n, es as usize, true) };
        if done == n {
            Ok(rem)
        } else {
            Err(BulkError::Insufficient {
                requested: n,
                available: rem,
            })
        }
    }

    /// Dequeues up to `out.len() / esize` elements.
    pub fn dequeue_burst(&self, out: &mut [u8]) -> Result<Transfer, BulkError> {
        let es = self.h.core.esize;
        let n = elems(out.len(), es)?.min(self.h.capacity as usize) as u32;
        // SAFETY: as above.
        let (count, remaining) = unsafe { self.h.dequeue(out.as_mut_ptr(), n, es as usize, false) };
        Ok(Transfer { count, remaining })
    }
}

/// A ring of `T` living in memory `M`.
///
/// ```
/// use memplane_ring::{HeapRegion, Ring, RingConfig};
///
/// let bytes = Ring::<u64, HeapRegion>::memsize(1024, false).unwrap();
/// let ring = Ring::<u64, _>::init(HeapRegion::new(bytes).unwrap(), "rx0", 1024, RingConfig::MPMC).unwrap();
/// let p = ring.producer().unwrap();
/// let c = ring.consumer().unwrap();
/// assert_eq!(p.enqueue_bulk(&[1, 2, 3]).unwrap(), 1021);
/// let mut out = [0u64; 8];
/// let t = c.dequeue_burst(&mut out);
/// assert_eq!((t.count, &out[..3]), (3, &[1, 2, 3][..]));
/// assert!(ring.is_empty());
/// ```
pub struct Ring<T: Element, M: RingMemory> {
    raw: RawRing<M>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element, M: RingMemory> Ring<T, M> {
    /// Bytes needed for a ring of `capacity` `T`s.
    pub fn memsize(capacity: usize, exact: bool) -> Result<usize, RingError> {
        check_esize(size_of::<T>(), align_of::<T>())?;
        memsize(size_of::<T>(), capacity, exact)
    }

    /// Initialises a ring of `capacity` `T`s named `name` at the start of
    /// `mem`. Validates everything first: on error the region is untouched.
    pub fn init(mem: M, name: &str, capacity: usize, cfg: RingConfig) -> Result<Self, RingError> {
        Ok(Self {
            raw: RawRing::init_aligned(mem, name, size_of::<T>(), align_of::<T>(), capacity, cfg)?,
            _t: PhantomData,
        })
    }

    /// Attaches to a ring initialised in `mem` (possibly by another process
    /// at another address); checks the header and that it holds `T`-sized
    /// elements.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        check_esize(size_of::<T>(), align_of::<T>())?;
        let raw = RawRing::attach(mem)?;
        if raw.core.esize as usize != size_of::<T>() {
            return Err(RingError::ElementSizeMismatch {
                ring: raw.core.esize,
                expected: size_of::<T>(),
            });
        }
        Ok(Self {
            raw,
            _t: PhantomData,
        })
    }

    /// The untyped view of this ring.
    pub fn raw(&self) -> &RawRing<M> {
        &self.raw
    }
    /// The ring's name.
    pub fn name(&self) -> String {
        self.raw.name()
    }
    /// Maximum number of elements.
    pub fn capacity(&self) -> u32 {
        self.raw.capacity()
    }
    /// Elements in the ring (a snapshot).
    pub fn count(&self) -> u32 {
        self.raw.count()
    }
    /// Free slots (a snapshot).
    pub fn free_count(&self) -> u32 {
        self.raw.free_count()
    }
    /// True if empty (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// True if full (a snapshot).
    pub fn is_full(&self) -> bool {
        self.raw.is_full()
    }
    /// Gives the memory back.
    pub fn into_memory(self) -> M {
        self.raw.into_memory()
    }

    /// Enqueues all of `items` or none, without a handle, on a ring whose
    /// producer side is [`SyncMode::Multi`]: the shortest path (one CAS, the
    /// copy, the tail), for callers that make one call per operation (a
    /// pool's backend). `false`: nothing enqueued, because there was not
    /// room for all, `items` is longer than the capacity, or the producer
    /// side is not `Multi` (use [`producer`](Self::producer) then, which
    /// also says why).
    ///
    /// ```
    /// # use memplane_ring::{HeapRegion, Ring, RingConfig};
    /// let bytes = Ring::<u64, HeapRegion>::memsize(4, false)?;
    /// let ring = Ring::<u64, _>::init(HeapRegion::new(bytes)?, "r", 4, RingConfig::MPMC)?;
    /// assert!(ring.enqueue_bulk_multi(&[1, 2, 3]));
    /// assert!(!ring.enqueue_bulk_multi(&[4, 5])); // one free slot
    /// let mut out = [0; 3];
    /// assert!(ring.dequeue_bulk_multi(&mut out));
    /// assert_eq!(out, [1, 2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline(always)]
    pub fn enqueue_bulk_multi(&self, items: &[T]) -> bool {
        let core = &self.raw.core;
        if core.prod_mode != SyncMode::Multi || items.len() > core.capacity as usize {
            return false;
        }
        // SAFETY: Multi producer side (checked); T is the element type
        // (size checked at open); len <= capacity; items holds len Ts,
        // only read (enqueue).
        unsafe { core.bulk_multi(Dir::Enq, items.as_ptr().cast_mut(), items.len() as u32) }
    }

    /// Fills all of `out` or takes nothing, without a handle, on a ring
    /// whose consumer side is [`SyncMode::Multi`]; see
    /// [`enqueue_bulk_multi`](Self::enqueue_bulk_multi). `false`: nothing
    /// taken (not enough entries, `out` longer than the capacity, or the
    /// consumer side is not `Multi`).
    #[inline(always)]
    pub fn dequeue_bulk_multi(&self, out: &mut [T]) -> bool {
        let core = &self.raw.core;
        if core.cons_mode != SyncMode::Multi || out.len() > core.capacity as usize {
            return false;
        }
        // SAFETY: Multi consumer side (checked); T is the element type;
        // len <= capacity; out has room for len Ts.
        unsafe { core.bulk_multi(Dir::Deq, out.as_mut_ptr(), out.len() as u32) }
    }

    /// A producer handle; claims the role if the producer side is
    /// [`SyncMode::Single`].
    #[inline(always)]
    pub fn producer(&self) -> Result<Producer<'_, T>, RingError> {
        Ok(Producer {
            h: Handle::new(&self.raw.core, Dir::Enq)?,
            _t: PhantomData,
        })
    }

    /// A consumer handle; claims the role if the consumer side is
    /// [`SyncMode::Single`].
    #[inline(always)]
    pub fn consumer(&self) -> Result<Consumer<'_, T>, RingError> {
        Ok(Consumer {
            h: Handle::new(&self.raw.core, Dir::Deq)?,
            _t: PhantomData,
        })
    }
}

impl<T: Element, M: RingMemory> core::ops::Deref for Ring<T, M> {
    type Target = RawRing<M>;
    fn deref(&self) -> &RawRing<M> {
        &self.raw
    }
}

impl<T: Element, M: RingMemory> core::fmt::Debug for Ring<T, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.raw.fmt(f)
    }
}

/// Producer handle of a [`Ring`]. `Send`, not `Sync`: one thread uses it at
/// a time; make one per producing thread.
pub struct Producer<'r, T> {
    h: Handle<'r>,
    _t: PhantomData<fn(T)>,
}

/// Consumer handle of a [`Ring`]. `Send`, not `Sync`.
pub struct Consumer<'r, T> {
    h: Handle<'r>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> Producer<'_, T> {
    /// Enqueues one element; gives it back if the ring is full.
    #[inline(always)]
    pub fn try_enqueue(&self, item: T) -> Result<(), T> {
        if self.h.enqueue_one(item) {
            Ok(())
        } else {
            Err(item)
        }
    }

    /// Enqueues all of `items` or none; returns the free slots left.
    #[inline(always)]
    pub fn enqueue_bulk(&self, items: &[T]) -> Result<u32, BulkError> {
        let n = self.h.bulk_len(items.len())?;
        // SAFETY: items holds n Ts.
        let (done, rem) = unsafe { self.h.enqueue(items.as_ptr(), n, 1, true) };
        if done == n {
            Ok(rem)
        } else {
            Err(BulkError::Insufficient {
                requested: n,
                available: rem,
            })
        }
    }

    /// Enqueues as many of `items` as fit (possibly none).
    #[inline(always)]
    pub fn enqueue_burst(&self, items: &[T]) -> Transfer {
        let n = items.len().min(self.h.capacity as usize) as u32;
        // SAFETY: items holds at least n Ts.
        let (count, remaining) = unsafe { self.h.enqueue(items.as_ptr(), n, 1, false) };
        Transfer { count, remaining }
    }

    /// This handle's sync mode.
    pub fn mode(&self) -> SyncMode {
        self.h.mode
    }
}

impl<T: Element> Consumer<'_, T> {
    /// Dequeues one element, if any.
    #[inline(always)]
    pub fn dequeue(&self) -> Option<T> {
        self.h.dequeue_one()
    }

    /// Fills all of `out` or takes nothing; returns the entries left.
    #[inline(always)]
    pub fn dequeue_bulk(&self, out: &mut [T]) -> Result<u32, BulkError> {
        let n = self.h.bulk_len(out.len())?;
        // SAFETY: out has room for n Ts.
        let (done, rem) = unsafe { self.h.dequeue(out.as_mut_ptr(), n, 1, true) };
        if done == n {
            Ok(rem)
        } else {
            Err(BulkError::Insufficient {
                requested: n,
                available: rem,
            })
        }
    }

    /// Dequeues up to `out.len()` elements into the front of `out`.
    #[inline(always)]
    pub fn dequeue_burst(&self, out: &mut [T]) -> Transfer {
        let n = out.len().min(self.h.capacity as usize) as u32;
        // SAFETY: out has room for n Ts.
        let (count, remaining) = unsafe { self.h.dequeue(out.as_mut_ptr(), n, 1, false) };
        Transfer { count, remaining }
    }

    /// Copies up to `out.len()` of the oldest elements without removing
    /// them. Only for a [`SyncMode::Single`] consumer.
    pub fn peek(&self, out: &mut [T]) -> Result<u32, RingError> {
        self.h.check_peek()?;
        let n = out.len().min(self.h.capacity as usize) as u32;
        // SAFETY: out has room for n Ts; single consumer checked.
        Ok(unsafe { self.h.peek(out.as_mut_ptr(), n, 1) })
    }

    /// This handle's sync mode.
    pub fn mode(&self) -> SyncMode {
        self.h.mode
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::copy_units;

    /// Copies exactly `count` units in order and writes nothing around
    /// them, for every count up to 200 and every unit size class.
    fn check<U: Copy + PartialEq + std::fmt::Debug>(make: impl Fn(usize) -> U, guard: U) {
        for count in 0..=200usize {
            let src: Vec<U> = (0..count).map(&make).collect();
            let mut dst = vec![guard; count + 8];
            // SAFETY: src holds count units, dst count from 4.
            unsafe { copy_units(dst.as_mut_ptr().add(4), src.as_ptr(), count, 1) };
            assert!(
                dst[..4].iter().all(|&u| u == guard),
                "count {count}: before"
            );
            assert_eq!(&dst[4..4 + count], &src[..], "count {count}");
            assert!(
                dst[4 + count..].iter().all(|&u| u == guard),
                "count {count}: after"
            );
        }
    }

    #[test]
    fn copy_units_copies_exactly_count_units() {
        check(|i| i as u32 + 1, 0);
        check(|i| i as u64 + 1, 0);
        check(|i| i as u128 + 1, 0);
        check(|i| [i as u8 + 1; 3], [0; 3]);
        check(|i| [i as u64 + 1; 4], [0; 4]);
    }
}
