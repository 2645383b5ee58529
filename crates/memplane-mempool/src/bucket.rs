//! The `bucket` handler (DPDK's bucket mempool driver,
//! `drivers/mempool/bucket`, in a design of our own): the pool's object
//! memory is cut into buckets of a fixed size (64 KiB by default, DPDK's
//! `RTE_DRIVER_MEMPOOL_BUCKET_SIZE_KB`), each aligned to its size, so an
//! object's bucket is its address with the low bits masked off. A bucket
//! whose objects are all in the backend is *whole* and can be handed out
//! in one piece: [`Mempool::get_contig_blocks`](crate::Mempool::get_contig_blocks)
//! returns the first object of each of `n` whole buckets, whose
//! `contig_block_size` objects follow it at the pool's `total_size`
//! stride (DPDK's `rte_mempool_get_contig_blocks`).
//!
//! # Layout
//!
//! A bucket is `[bucket header][objects back to back][slack]`. The header
//! is one line (`BucketHead`: the zone it belongs to, where it is
//! listed, how many of its objects are free, links) and then a stack of
//! the free objects' indexes (2 bytes per object), rounded up to 64
//! bytes: with 192-byte objects a 64 KiB bucket holds 337 of them after
//! a 768-byte header. The pool records this as its
//! [`BlockLayout`]; every process places and
//! finds objects from it, and
//! [`required_memory_handler`](crate::required_memory_handler) counts
//! the same bytes. A chunk's last bucket may hold fewer objects; such a
//! short bucket is never handed out as a block.
//!
//! # Where free objects are
//!
//! The rest of the state is the memzone `MB_<pool>`: a count of the free
//! objects nobody has claimed, the stack of whole buckets (one lock), and
//! 129 slots, one per lcore id ([`register_thread`](crate::register_thread),
//! the instance's shared registry) and one shared by threads without an
//! id, each with a lock and a list of *partial* buckets (some objects
//! free, not whole). Every bucket with a free object is on exactly one
//! list, or on the whole stack; a bucket's index stack and counts are
//! changed only under the lock of the slot it is listed in (its *home*).
//! Everything is absolute addresses and numbers in shared memory, so a
//! secondary process uses the same buckets.
//!
//! - Get of `n` objects: claims `n` on the free count first (all or
//!   nothing: [`MempoolError::NotEnough`] when fewer are free), then takes
//!   them from the caller's slot's partial buckets, then breaks whole
//!   buckets into that slot (the rest of a broken bucket stays listed
//!   there), then, if objects are still missing, from the other slots'
//!   partial buckets. Whole buckets are broken only when the caller's
//!   own partial buckets are empty, so blocks survive single gets as long
//!   as possible.
//! - Put: each object goes back to its bucket (found by masking its
//!   address; a pointer that is not on an object boundary of a bucket is
//!   refused before anything changes). A bucket with no free object is
//!   listed nowhere; the first object back lists it in the putter's slot.
//!   When the last object of a full-size bucket comes back, the bucket
//!   leaves its list for the whole stack. A put into a bucket that has
//!   all its objects already (some double puts) is refused for that
//!   object ([`MempoolError::DoublePut`]); the others go back.
//! - Blocks: `n` buckets off the whole stack, all or nothing
//!   ([`MempoolError::NotEnoughBlocks`]), their objects claimed on the
//!   free count. Their objects come back one by one with ordinary puts;
//!   a block is whole again (and can be handed out as a block again) only
//!   once every one of its objects is back in the backend, so objects
//!   that sit in an lcore cache or a user-owned cache keep their bucket
//!   partial until the cache is flushed.
//!
//! Locks are taken in one order (a slot's, then the whole stack's) and
//! never two slots' at once. They are process-shared spinlocks that
//! sleep after a short spin; a process killed while holding one leaves
//! that slot (or the whole stack) wedged, as with the `stack` handler.

// Buckets and the zone are at least 64-byte aligned: the casts are
// aligned.
#![allow(clippy::cast_ptr_alignment)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::{Memzone, MemzoneFlags};
use memplane::shm::lock::{SpinGuard, SpinLock};
use memplane::Memory;

use crate::handler::{Backend, BackendParams, Handler};
use crate::layout::{BlockLayout, ObjSize, Packing, MAX_LCORES};
use crate::lcore::RegistryRef;
use crate::{ChunkInfo, MempoolError, MempoolFlags};

/// Prefix of a `bucket` pool's state zone: `MB_<name>`.
pub const BUCKET_ZONE_PREFIX: &str = "MB_";
/// Bucket size of the built-in `bucket` handler (DPDK's
/// `RTE_DRIVER_MEMPOOL_BUCKET_SIZE_KB` of 64).
pub const DEFAULT_BUCKET_SIZE: u32 = 64 << 10;
/// Smallest bucket [`BucketHandler::new`] accepts.
pub const BUCKET_SIZE_MIN: u32 = 1 << 10;
/// Largest bucket [`BucketHandler::new`] accepts (object indexes in a
/// bucket are 16-bit).
pub const BUCKET_SIZE_MAX: u32 = 1 << 20;

/// Slots: one per lcore id, then the one shared by threads without one.
const SLOTS: usize = MAX_LCORES + 1;
/// The slot of threads without an lcore id.
const SHARED_SLOT: u32 = MAX_LCORES as u32;
/// [`BucketHead::home`]: no free object, listed nowhere.
const HOME_NONE: u32 = u32::MAX;
/// [`BucketHead::home`]: whole, on the whole stack.
const HOME_WHOLE: u32 = u32::MAX - 1;
/// "MPLBUCK1": an initialised state zone.
const ZONE_MAGIC: u64 = u64::from_le_bytes(*b"MPLBUCK1");
/// Sweeps over every slot that find nothing before a get gives up on a
/// free count that the lists do not back (corruption; never reached
/// otherwise: claimed objects are always on some list).
const MAX_FRUITLESS_SWEEPS: u32 = 1 << 20;

/// The first line of a bucket (its block header); the stack of free
/// object indexes (`u16` each, `count` of them at most) follows it.
#[repr(C, align(64))]
struct BucketHead {
    /// Address of the state zone of the pool this bucket belongs to.
    owner: AtomicU64,
    /// The slot whose list holds this bucket, [`HOME_NONE`] or
    /// [`HOME_WHOLE`]. Changed only under the home slot's lock (from a
    /// slot), by a compare-and-swap under the new slot's lock (from
    /// `HOME_NONE`), or under the whole stack's lock (from `HOME_WHOLE`).
    home: AtomicU32,
    /// Free objects: the depth of the index stack.
    fill: AtomicU32,
    /// Objects in this bucket (the layout's per-bucket count; fewer in a
    /// chunk's last bucket). Written before the objects are enqueued.
    count: u32,
    _pad: u32,
    /// Previous bucket (head address) on the home slot's list, 0: none.
    prev: AtomicU64,
    /// Next bucket on the home slot's list, 0: none.
    next: AtomicU64,
}

/// Start of the state zone.
#[repr(C, align(64))]
struct ZoneHead {
    /// [`ZONE_MAGIC`] once initialised (stored last).
    magic: AtomicU64,
    bucket_size: u32,
    header: u32,
    per_block: u32,
    total_size: u32,
    elt_off: u32,
    n: u32,
    /// Entries of the whole stack.
    whole_cap: u32,
}

/// Free objects nobody has claimed (a line of its own).
#[repr(C, align(64))]
struct FreeCount {
    free: AtomicU64,
}

/// The whole stack's head; its `whole_cap` entries (bucket head
/// addresses) are at the end of the zone.
#[repr(C, align(64))]
struct WholeHead {
    lock: SpinLock,
    len: AtomicU32,
}

/// One slot: a list of partial buckets.
#[repr(C, align(64))]
struct Slot {
    lock: SpinLock,
    /// Free objects in the listed buckets (read without the lock as a
    /// hint).
    objs: AtomicU32,
    /// First bucket (head address), 0: none.
    first: AtomicU64,
}

#[repr(C)]
struct Zone {
    head: ZoneHead,
    free: FreeCount,
    whole: WholeHead,
    slots: [Slot; SLOTS],
}

const _: () = {
    assert!(std::mem::size_of::<BucketHead>() == 64);
    assert!(std::mem::size_of::<Slot>() == 64);
    assert!(std::mem::size_of::<Zone>() == 64 * (3 + SLOTS));
};

/// Bytes of the state zone for a whole stack of `cap` entries.
fn zone_bytes(cap: u32) -> usize {
    std::mem::size_of::<Zone>() + 8 * cap as usize
}

fn zone_name(pool: &str) -> String {
    format!("{BUCKET_ZONE_PREFIX}{pool}")
}

/// The `bucket` handler, with its bucket size. Built in as `bucket` with
/// [`DEFAULT_BUCKET_SIZE`]; register another size under a name of its
/// own with [`register_handler`](crate::register_handler) (every process
/// that opens the pool registers the same size under that name).
///
/// ```no_run
/// use std::sync::Arc;
/// use memplane_mempool::bucket::BucketHandler;
/// memplane_mempool::register_handler("bucket_256k", Arc::new(BucketHandler::new(256 << 10)?))?;
/// # Ok::<(), memplane_mempool::MempoolError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketHandler {
    bucket_size: u32,
}

impl Default for BucketHandler {
    fn default() -> Self {
        Self {
            bucket_size: DEFAULT_BUCKET_SIZE,
        }
    }
}

impl BucketHandler {
    /// A handler with buckets of `bucket_size` bytes: a power of two from
    /// [`BUCKET_SIZE_MIN`] to [`BUCKET_SIZE_MAX`].
    pub fn new(bucket_size: u32) -> Result<Self, MempoolError> {
        if !bucket_size.is_power_of_two()
            || !(BUCKET_SIZE_MIN..=BUCKET_SIZE_MAX).contains(&bucket_size)
        {
            return Err(MempoolError::BadHandler {
                name: format!("bucket ({bucket_size}-byte buckets)"),
                why: "the bucket size must be a power of two from 1 KiB to 1 MiB",
            });
        }
        Ok(Self { bucket_size })
    }

    /// Bytes per bucket.
    pub fn bucket_size(&self) -> u32 {
        self.bucket_size
    }

    /// The layout of objects of `total` bytes: as many as fit after the
    /// bucket header (one line and 2 bytes per object, rounded up to 64).
    fn layout_for(self, sz: &ObjSize) -> Result<BlockLayout, MempoolError> {
        let b = u64::from(self.bucket_size);
        let total = u64::from(sz.total_size);
        let header = |k: u64| (64 + 2 * k).next_multiple_of(64);
        let fits = |k: u64| header(k) + k * total <= b;
        // A lower bound that fits (the header is at most 64 + 2k + 63),
        // then up while one more fits.
        let mut k = b.saturating_sub(127) / (total + 2);
        while fits(k + 1) {
            k += 1;
        }
        let k = k.min(u64::from(u16::MAX));
        if k == 0 {
            return Err(MempoolError::BucketTooSmall {
                bucket_size: self.bucket_size,
                header: header(1) as u32,
                total_size: sz.total_size,
                elt_size: sz.elt_size,
                max_total: (b - header(1)) as u32,
            });
        }
        Ok(BlockLayout {
            block_size: self.bucket_size,
            header: header(k) as u32,
            objs_per_block: k as u32,
        })
    }
}

impl Handler for BucketHandler {
    fn create<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let layout = self.check_params(p)?;
        let reg = RegistryRef::open(mem)?;
        let cap = p.n / layout.objs_per_block;
        let socket = if p.socket < 0 {
            SOCKET_ID_ANY
        } else {
            p.socket
        };
        let zone = mem.memzone_reserve_aligned(
            &zone_name(&p.name),
            zone_bytes(cap),
            socket,
            MemzoneFlags::ZERO,
            64,
        )?;
        let z = zone.as_mut_ptr().cast::<Zone>();
        // SAFETY: a fresh zeroed zone of zone_bytes(cap) bytes, 64-aligned;
        // nobody else opens it before the pool is published. Zeroed locks
        // are unlocked, zeroed counts and lists are empty.
        unsafe {
            let h = &mut (*z).head;
            h.bucket_size = layout.block_size;
            h.header = layout.header;
            h.per_block = layout.objs_per_block;
            h.total_size = p.obj_size.total_size;
            h.elt_off = p.obj_size.header_size;
            h.n = p.n;
            h.whole_cap = cap;
            h.magic.store(ZONE_MAGIC, Ordering::Release);
        }
        Ok(Box::new(BucketBackend::open(reg, zone, p)?))
    }

    fn attach<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        self.check_params(p)?;
        let reg = RegistryRef::open(mem)?;
        let zone =
            mem.memzone_lookup(&zone_name(&p.name))
                .ok_or_else(|| MempoolError::NotFound {
                    name: p.name.clone(),
                })?;
        Ok(Box::new(BucketBackend::open(reg, zone, p)?))
    }

    fn block_layout(
        &self,
        obj: &ObjSize,
        _flags: MempoolFlags,
    ) -> Result<Option<BlockLayout>, MempoolError> {
        self.layout_for(obj).map(Some)
    }
}

impl BucketHandler {
    /// The pool's recorded layout, which must be this handler's for the
    /// pool's objects (a process that registered another bucket size
    /// under the pool's handler name is refused).
    fn check_params(self, p: &BackendParams) -> Result<BlockLayout, MempoolError> {
        let mine = self.layout_for(&p.obj_size)?;
        match p.layout {
            Some(l) if l == mine => Ok(l),
            other => Err(MempoolError::Corrupt {
                name: p.name.clone(),
                why: format!(
                    "the pool's block layout is {other:?}; this process's bucket handler ({}-byte buckets) lays {}-byte objects out as {mine:?} (register the same bucket size under the pool's handler name in every process)",
                    self.bucket_size, p.obj_size.total_size
                ),
            }),
        }
    }
}

/// One process's view of a `bucket` pool's state.
struct BucketBackend<'m> {
    zone: Memzone<'m>,
    z: *const Zone,
    /// The whole stack's entries.
    whole: *mut u64,
    reg: RegistryRef,
    name: String,
    /// Address mask of a bucket's start.
    mask: usize,
    /// Bucket header bytes (objects start there).
    header: usize,
    per_block: u32,
    total: usize,
    /// Element offset in an object.
    elt_off: usize,
    whole_cap: u32,
}

// SAFETY: the pointers are into the state zone (mapped as long as the
// Memory the zone borrows) and into the pool's buckets; shared fields are
// atomics, and index stacks are only touched under the home slot's lock.
unsafe impl Send for BucketBackend<'_> {}
// SAFETY: as above.
unsafe impl Sync for BucketBackend<'_> {}

impl<'m> BucketBackend<'m> {
    /// The backend on a state zone, checked against the pool's layout.
    /// An error leaves the zone as it is (a fresh one is all zeroes but
    /// its head: [`Pool`](crate::Mempool) creation frees nothing it did
    /// not make, so `create` checks before reserving).
    fn open(reg: RegistryRef, zone: Memzone<'m>, p: &BackendParams) -> Result<Self, MempoolError> {
        let corrupt = |why: String| MempoolError::Corrupt {
            name: p.name.clone(),
            why,
        };
        if zone.len() < zone_bytes(0) {
            return Err(corrupt(format!(
                "bucket state zone of {} bytes",
                zone.len()
            )));
        }
        let z = zone.as_ptr().cast::<Zone>();
        // SAFETY: the zone is at least a Zone long (checked), 64-aligned;
        // the creator wrote the head before the magic (Release).
        let h = unsafe { &(*z).head };
        let layout = p.layout.unwrap_or(BlockLayout {
            block_size: 0,
            header: 0,
            objs_per_block: 0,
        });
        if h.magic.load(Ordering::Acquire) != ZONE_MAGIC
            || h.bucket_size != layout.block_size
            || h.header != layout.header
            || h.per_block != layout.objs_per_block
            || h.total_size != p.obj_size.total_size
            || h.elt_off != p.obj_size.header_size
            || h.n != p.n
            || h.whole_cap != p.n / layout.objs_per_block.max(1)
            || zone.len() < zone_bytes(h.whole_cap)
        {
            return Err(corrupt(format!(
                "zone {} ({} bytes) does not hold the state of this pool's buckets ({layout:?}, {} objects of {} bytes)",
                zone.name(),
                zone.len(),
                p.n,
                p.obj_size.total_size
            )));
        }
        let whole_cap = h.whole_cap;
        Ok(Self {
            // SAFETY: the entries follow the Zone, inside the zone (its
            // length checked above).
            whole: unsafe { zone.as_mut_ptr().add(std::mem::size_of::<Zone>()) }.cast::<u64>(),
            z,
            reg,
            name: p.name.clone(),
            mask: !(layout.block_size as usize - 1),
            header: layout.header as usize,
            per_block: layout.objs_per_block,
            total: p.obj_size.total_size as usize,
            elt_off: p.obj_size.header_size as usize,
            whole_cap,
            zone,
        })
    }

    fn zone(&self) -> &Zone {
        // SAFETY: checked and initialised in `open`; mapped while `self`.
        unsafe { &*self.z }
    }

    fn slot(&self, id: u32) -> &Slot {
        &self.zone().slots[id as usize]
    }

    /// The calling thread's slot: its lcore id's, else the shared one.
    fn my_slot(&self) -> u32 {
        self.reg.current().unwrap_or(SHARED_SLOT)
    }

    /// The head of the bucket at `base` (borrowed as long as the
    /// backend, which keeps the pool's memory mapped).
    #[allow(clippy::unused_self)]
    fn head(&self, base: usize) -> &BucketHead {
        // SAFETY: `base` is a bucket of this pool (from `locate`, a list
        // or the whole stack): its head was written by `populate_chunk`
        // and stays mapped while the pool's chunks are.
        unsafe { &*(base as *const BucketHead) }
    }

    /// The index stack of the bucket at `base`.
    #[allow(clippy::unused_self)]
    fn stack(&self, base: usize) -> *mut u16 {
        (base + std::mem::size_of::<BucketHead>()) as *mut u16
    }

    /// Element address of object `idx` of the bucket at `base`.
    fn elt(&self, base: usize, idx: u16) -> *mut u8 {
        (base + self.header + idx as usize * self.total + self.elt_off) as *mut u8
    }

    /// The bucket and index of element `o`, which must be on an object
    /// boundary of one of this pool's buckets.
    fn locate(&self, o: *mut u8) -> Result<(usize, u16), MempoolError> {
        let a = o as usize;
        let base = a & self.mask;
        let first = self.header + self.elt_off;
        let foreign = || MempoolError::ForeignObject {
            addr: a,
            pool: self.name.clone(),
            owner: None,
        };
        let r = (a - base).checked_sub(first).ok_or_else(foreign)?;
        let idx = r / self.total;
        if r % self.total != 0 || idx >= self.per_block as usize {
            return Err(foreign());
        }
        // The pool checked that `o` is inside its object memory, whose
        // chunks start at bucket boundaries: `base` is one of its buckets.
        let h = self.head(base);
        if h.owner.load(Ordering::Relaxed) != self.z as u64 || idx >= h.count as usize {
            return Err(foreign());
        }
        Ok((base, idx as u16))
    }

    /// Claims `k` free objects; the free count when fewer are free.
    fn claim(&self, k: u32) -> Result<(), u32> {
        let f = &self.zone().free.free;
        let mut cur = f.load(Ordering::Acquire);
        loop {
            if cur < u64::from(k) {
                return Err(cur as u32);
            }
            match f.compare_exchange_weak(
                cur,
                cur - u64::from(k),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(c) => cur = c,
            }
        }
    }

    /// Lists the bucket at `base` first on slot `s` (its lock held).
    fn link(&self, s: &Slot, base: usize) {
        let h = self.head(base);
        let first = s.first.load(Ordering::Relaxed) as usize;
        h.prev.store(0, Ordering::Relaxed);
        h.next.store(first as u64, Ordering::Relaxed);
        if first != 0 {
            self.head(first).prev.store(base as u64, Ordering::Relaxed);
        }
        s.first.store(base as u64, Ordering::Relaxed);
    }

    /// Takes the bucket at `base` off slot `s`'s list (its lock held).
    fn unlink(&self, s: &Slot, base: usize) {
        let h = self.head(base);
        let (prev, next) = (
            h.prev.load(Ordering::Relaxed) as usize,
            h.next.load(Ordering::Relaxed) as usize,
        );
        if prev == 0 {
            s.first.store(next as u64, Ordering::Relaxed);
        } else {
            self.head(prev).next.store(next as u64, Ordering::Relaxed);
        }
        if next != 0 {
            self.head(next).prev.store(prev as u64, Ordering::Relaxed);
        }
    }

    /// Takes up to `out.len()` objects from slot `s`'s buckets (its lock
    /// held); returns how many. Buckets left without a free object leave
    /// the list.
    fn take(&self, s: &Slot, out: &mut [*mut u8]) -> usize {
        let mut got = 0;
        let mut b = s.first.load(Ordering::Relaxed) as usize;
        while got < out.len() && b != 0 {
            let h = self.head(b);
            let next = h.next.load(Ordering::Relaxed) as usize;
            let fill = h.fill.load(Ordering::Relaxed) as usize;
            let k = fill.min(out.len() - got);
            let stack = self.stack(b);
            for (j, slot) in out[got..got + k].iter_mut().enumerate() {
                // SAFETY: [0, fill) of the index stack are filled, and the
                // home slot's lock (held) guards them.
                let idx = unsafe { stack.add(fill - 1 - j).read() };
                *slot = self.elt(b, idx);
            }
            h.fill.store((fill - k) as u32, Ordering::Relaxed);
            s.objs.fetch_sub(k as u32, Ordering::Relaxed);
            if fill == k {
                self.unlink(s, b);
                h.home.store(HOME_NONE, Ordering::Release);
            }
            got += k;
            b = next;
        }
        got
    }

    /// Moves whole buckets holding at least `need` objects (or all there
    /// are) onto slot `me`'s list (its lock held); returns whether it
    /// moved any.
    fn break_whole(&self, s: &Slot, me: u32, need: usize) -> bool {
        let w = &self.zone().whole;
        let _g = w.lock.lock();
        let mut len = w.len.load(Ordering::Relaxed);
        let mut moved = 0usize;
        while moved < need && len > 0 {
            len -= 1;
            // SAFETY: entries [0, len) of the whole stack are filled,
            // guarded by its lock (held).
            let b = unsafe { self.whole.add(len as usize).read() } as usize;
            let h = self.head(b);
            h.home.store(me, Ordering::Release);
            self.link(s, b);
            let fill = h.fill.load(Ordering::Relaxed);
            s.objs.fetch_add(fill, Ordering::Relaxed);
            moved += fill as usize;
        }
        w.len.store(len, Ordering::Relaxed);
        moved > 0
    }

    /// Puts the bucket at `base` (full, taken off its list) on the whole
    /// stack; `false` (left listed) when the stack is full, which only a
    /// corrupted pool can reach.
    fn push_whole(&self, base: usize) -> bool {
        let w = &self.zone().whole;
        let _g = w.lock.lock();
        let len = w.len.load(Ordering::Relaxed);
        if len >= self.whole_cap {
            return false;
        }
        self.head(base).home.store(HOME_WHOLE, Ordering::Release);
        // SAFETY: len < cap: an entry of the whole stack, under its lock.
        unsafe { self.whole.add(len as usize).write(base as u64) };
        w.len.store(len + 1, Ordering::Relaxed);
        true
    }

    /// Whole buckets now.
    fn whole_count(&self) -> u32 {
        self.zone().whole.len.load(Ordering::Relaxed)
    }
}

impl Backend for BucketBackend<'_> {
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        // Refuse a pointer that is not an object before changing anything.
        for &o in objs {
            self.locate(o)?;
        }
        let me = self.my_slot();
        let mut held: Option<(u32, SpinGuard<'_>)> = None;
        let mut placed = 0u64;
        let mut dup = None;
        for &o in objs {
            let (b, idx) = self.locate(o)?;
            let h = self.head(b);
            loop {
                let home = h.home.load(Ordering::Acquire);
                if home == HOME_WHOLE {
                    // Every object of the bucket is in already.
                    dup = Some(o);
                    break;
                }
                let want = if home == HOME_NONE { me } else { home };
                if held.as_ref().map(|(id, _)| *id) != Some(want) {
                    // Never two slots' locks at once: let go first.
                    drop(held.take());
                    held = Some((want, self.slot(want).lock.lock()));
                }
                let s = self.slot(want);
                if home == HOME_NONE {
                    // First object back: list the bucket in our slot,
                    // unless another putter listed it in theirs meanwhile.
                    if h.home
                        .compare_exchange(HOME_NONE, me, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    self.link(s, b);
                } else if h.home.load(Ordering::Acquire) != home {
                    // Moved before we had its slot's lock.
                    continue;
                }
                let fill = h.fill.load(Ordering::Relaxed);
                if fill >= h.count {
                    dup = Some(o);
                    break;
                }
                // SAFETY: fill < count: a slot of the index stack, guarded
                // by the home slot's lock (held).
                unsafe { self.stack(b).add(fill as usize).write(idx) };
                h.fill.store(fill + 1, Ordering::Relaxed);
                s.objs.fetch_add(1, Ordering::Relaxed);
                placed += 1;
                if fill + 1 == self.per_block {
                    // Whole again: off the list, onto the whole stack.
                    self.unlink(s, b);
                    s.objs.fetch_sub(self.per_block, Ordering::Relaxed);
                    if !self.push_whole(b) {
                        self.link(s, b);
                        s.objs.fetch_add(self.per_block, Ordering::Relaxed);
                        tracing::error!(
                            pool = self.name,
                            bucket = b,
                            "bucket whole stack full; bucket left listed"
                        );
                    }
                }
                break;
            }
        }
        drop(held);
        self.zone().free.free.fetch_add(placed, Ordering::AcqRel);
        match dup {
            None => Ok(()),
            Some(o) => Err(MempoolError::DoublePut {
                addr: o as usize,
                pool: self.name.clone(),
            }),
        }
    }

    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        self.claim(n as u32)
            .map_err(|available| MempoolError::NotEnough {
                requested: n as u32,
                available,
            })?;
        // `n` free objects are ours now: they are on the lists or the
        // whole stack (claims and lists change only under locks, so a
        // sweep that misses some met them moving and the next finds them).
        let me = self.my_slot();
        let mut got = 0;
        let mut fruitless = 0u32;
        loop {
            let before = got;
            {
                let s = self.slot(me);
                let _g = s.lock.lock();
                got += self.take(s, &mut out[got..]);
                if got < n && self.break_whole(s, me, n - got) {
                    got += self.take(s, &mut out[got..]);
                }
            }
            if got == n {
                return Ok(());
            }
            for k in 1..SLOTS as u32 {
                let t = (me + k) % SLOTS as u32;
                let s = self.slot(t);
                if s.objs.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let _g = s.lock.lock();
                got += self.take(s, &mut out[got..]);
                if got == n {
                    return Ok(());
                }
            }
            if got == before {
                fruitless += 1;
                if fruitless == MAX_FRUITLESS_SWEEPS {
                    tracing::error!(
                        pool = self.name,
                        n,
                        got,
                        "bucket free count not backed by the lists"
                    );
                    // Give back what was found, and the rest of the claim.
                    let e = self.enqueue(&out[..got]);
                    self.zone()
                        .free
                        .free
                        .fetch_add((n - got) as u64, Ordering::AcqRel);
                    e?;
                    return Err(MempoolError::Corrupt {
                        name: self.name.clone(),
                        why: format!("{n} free objects claimed, only {got} found in the buckets"),
                    });
                }
            }
            std::thread::yield_now();
        }
    }

    fn count(&self) -> u32 {
        self.zone().free.free.load(Ordering::Relaxed) as u32
    }

    fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
        let BucketBackend { zone, .. } = *self;
        zone.free()?;
        Ok(())
    }

    fn populate_chunk(&self, c: &ChunkInfo) -> Result<(), MempoolError> {
        let bucket = !self.mask + 1;
        let pb = self.per_block as usize;
        let need = Packing {
            total: self.total,
            block: bucket,
            block_header: self.header,
            per_block: self.per_block,
        }
        .bytes(c.count);
        if c.va % bucket != 0 || need.is_none_or(|need| c.len < need) {
            return Err(MempoolError::Corrupt {
                name: self.name.clone(),
                why: format!(
                    "chunk at {:#x} of {} bytes for {} objects is not laid out in {bucket}-byte buckets",
                    c.va, c.len, c.count
                ),
            });
        }
        for k in 0..(c.count as usize).div_ceil(pb) {
            let base = c.va + k * bucket;
            let count = (c.count as usize - k * pb).min(pb) as u32;
            // SAFETY: a bucket of the chunk (inside it: length checked),
            // aligned to the bucket size; nobody uses it before its
            // objects are enqueued.
            unsafe {
                (base as *mut BucketHead).write(BucketHead {
                    owner: AtomicU64::new(self.z as u64),
                    home: AtomicU32::new(HOME_NONE),
                    fill: AtomicU32::new(0),
                    count,
                    _pad: 0,
                    prev: AtomicU64::new(0),
                    next: AtomicU64::new(0),
                });
            }
        }
        Ok(())
    }

    fn contig_block_size(&self) -> Option<u32> {
        Some(self.per_block)
    }

    fn dequeue_contig_blocks(&self, first: &mut [*mut u8]) -> Result<(), MempoolError> {
        let n = first.len() as u32;
        if n == 0 {
            return Ok(());
        }
        let w = &self.zone().whole;
        let _g = w.lock.lock();
        let mut len = w.len.load(Ordering::Relaxed);
        let short = |available: u32| MempoolError::NotEnoughBlocks {
            requested: n,
            available,
            block_size: self.per_block,
        };
        if len < n {
            return Err(short(len));
        }
        // Claim the objects too: single gets that claimed objects of
        // these buckets must still find theirs.
        let objs = u64::from(n) * u64::from(self.per_block);
        self.claim(objs as u32)
            .map_err(|free| short(len.min(free / self.per_block)))?;
        for f in first.iter_mut() {
            len -= 1;
            // SAFETY: entries [0, len) are filled, under the lock (held).
            let b = unsafe { self.whole.add(len as usize).read() } as usize;
            let h = self.head(b);
            // Handed out whole: no free object, listed nowhere.
            h.fill.store(0, Ordering::Relaxed);
            h.home.store(HOME_NONE, Ordering::Release);
            *f = self.elt(b, 0);
        }
        w.len.store(len, Ordering::Relaxed);
        Ok(())
    }
}

impl std::fmt::Debug for BucketBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketBackend")
            .field("pool", &self.name)
            .field("per_block", &self.per_block)
            .field("whole", &self.whole_count())
            .finish_non_exhaustive()
    }
}
