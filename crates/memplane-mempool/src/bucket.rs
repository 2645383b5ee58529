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
//!
//! The lists, counts, locks and the get / put / block operations are in
//! `crate::bucket_core`, which works on memory it is given; this module
//! places that state in the `MB_<pool>` zone and the pool's chunks, and
//! maps its errors. The core is model-checked with loom
//! (`bucket_core::loom_tests`, run by `scripts/extra-tests.sh`).

// The zone is at least 64-byte aligned: the casts are aligned.
#![allow(clippy::cast_ptr_alignment)]

use std::sync::atomic::{AtomicU64, Ordering};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::{Memzone, MemzoneFlags};
use memplane::Memory;

use crate::bucket_core::{Core, Geometry, GetError, PutError, State, SHARED_SLOT, SLOTS};
use crate::handler::{Backend, BackendParams, Handler};
use crate::layout::{BlockLayout, ObjSize, Packing};
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

/// "MPLBUCK1": an initialised state zone.
const ZONE_MAGIC: u64 = u64::from_le_bytes(*b"MPLBUCK1");

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

/// The state zone: its head, then the state the core works on (at line
/// 1), then the whole stack's `whole_cap` entries.
#[repr(C)]
struct Zone {
    head: ZoneHead,
    state: State,
}

const _: () = assert!(std::mem::size_of::<Zone>() == 64 * (3 + SLOTS));

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
    /// The lists, counts and locks in the zone.
    core: Core,
    reg: RegistryRef,
    /// Bytes per bucket.
    bucket: usize,
    /// Bucket header bytes (objects start there).
    header: usize,
    total: usize,
}

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
        let geometry = Geometry {
            bucket_size: layout.block_size as usize,
            header: layout.header as usize,
            per_block: layout.objs_per_block,
            total: p.obj_size.total_size as usize,
            elt_off: p.obj_size.header_size as usize,
        };
        // SAFETY: the state and the whole stack's entries (after the
        // Zone) are inside the zone (its length checked above), which
        // stays mapped as long as `self`; the zone was zeroed at
        // creation; every process derives the same geometry from the
        // zone's checked head, and the owner is the zone's address.
        let core = unsafe {
            Core::new(
                std::ptr::addr_of!((*z).state),
                zone.as_mut_ptr()
                    .add(std::mem::size_of::<Zone>())
                    .cast::<u64>(),
                h.whole_cap,
                z as u64,
                geometry,
                p.name.clone(),
            )
        };
        Ok(Self {
            core,
            reg,
            bucket: layout.block_size as usize,
            header: layout.header as usize,
            total: p.obj_size.total_size as usize,
            zone,
        })
    }

    /// The calling thread's slot: its lcore id's, else the shared one.
    fn my_slot(&self) -> u32 {
        self.reg.current().unwrap_or(SHARED_SLOT)
    }

    fn put_error(&self, e: PutError) -> MempoolError {
        match e {
            PutError::Foreign(addr) => MempoolError::ForeignObject {
                addr,
                pool: self.core.name.clone(),
                owner: None,
            },
            PutError::Dup(addr) => MempoolError::DoublePut {
                addr,
                pool: self.core.name.clone(),
            },
        }
    }
}

impl Backend for BucketBackend<'_> {
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.core
            .enqueue(objs, self.my_slot())
            .map_err(|e| self.put_error(e))
    }

    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        let n = out.len();
        self.core.dequeue(out, self.my_slot()).map_err(|e| match e {
            GetError::NotEnough { available } => MempoolError::NotEnough {
                requested: n as u32,
                available,
            },
            GetError::Lost { put: Err(e), .. } => self.put_error(e),
            GetError::Lost { got, put: Ok(()) } => MempoolError::Corrupt {
                name: self.core.name.clone(),
                why: format!("{n} free objects claimed, only {got} found in the buckets"),
            },
        })
    }

    fn count(&self) -> u32 {
        self.core.count()
    }

    fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
        let BucketBackend { zone, .. } = *self;
        zone.free()?;
        Ok(())
    }

    fn populate_chunk(&self, c: &ChunkInfo) -> Result<(), MempoolError> {
        let bucket = self.bucket;
        let pb = self.core.per_block() as usize;
        let need = Packing {
            total: self.total,
            block: bucket,
            block_header: self.header,
            per_block: self.core.per_block(),
        }
        .bytes(c.count);
        if c.va % bucket != 0 || need.is_none_or(|need| c.len < need) {
            return Err(MempoolError::Corrupt {
                name: self.core.name.clone(),
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
            // objects are enqueued, and the pool's chunks stay mapped as
            // long as the backend.
            unsafe { self.core.init_bucket(base, count) };
        }
        Ok(())
    }

    fn contig_block_size(&self) -> Option<u32> {
        Some(self.core.per_block())
    }

    fn dequeue_contig_blocks(&self, first: &mut [*mut u8]) -> Result<(), MempoolError> {
        self.core
            .dequeue_contig_blocks(first)
            .map_err(|available| MempoolError::NotEnoughBlocks {
                requested: first.len() as u32,
                available,
                block_size: self.core.per_block(),
            })
    }
}

impl std::fmt::Debug for BucketBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketBackend")
            .field("pool", &self.core.name)
            .field("per_block", &self.core.per_block())
            .field("whole", &self.core.whole_count())
            .finish_non_exhaustive()
    }
}
