//! Backends ("handlers", DPDK's mempool ops), resolved by NAME in every
//! process: the pool header stores the handler's name, and each process
//! maps it to code through its own registry. Built in: `ring_mp_mc`
//! (default), `ring_sp_sc`, `ring_mp_sc`, `ring_sp_mc`, `ring_mt_rts`,
//! `ring_mt_hts` (a memplane ring
//! named `MP_<name>`, in zone `RG_MP_<name>`) and `stack` (a spinlock-guarded
//! LIFO in zone `MS_<name>`) and `lf_stack` (DPDK's lock-free stack in
//! zone `ML_<name>`, see [`crate::lf_stack`]) and `bucket` (objects in
//! 64 KiB buckets that are handed out whole as contiguous blocks, state in
//! zone `MB_<name>`, see [`crate::bucket`]). Users add handlers with
//! [`register_handler`]; a process that opens a pool must have registered
//! the same handler name.
//!
//! Beyond storing objects, a handler may (optional trait methods with
//! defaults, so handlers written without them keep working) lay the
//! pool's memory out in blocks ([`Handler::block_layout`]), be told about
//! each chunk of object memory before its objects arrive
//! ([`Backend::populate_chunk`]), and hand out whole blocks of contiguous
//! objects ([`Backend::contig_block_size`],
//! [`Backend::dequeue_contig_blocks`]; DPDK's `get_info` and
//! `dequeue_contig_blocks` ops).

// Zones are 64-byte aligned (memzone minimum): header casts are aligned.
#![allow(clippy::cast_ptr_alignment)]
// The ring calls of the pool's fast path must inline into it.
#![allow(clippy::inline_always)]

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::{Memzone, MemzoneFlags};
use memplane::shm::lock::SpinLock;
use memplane::Memory;
use memplane_ring::{BulkError, Ring, RingConfig, RingError, SyncMode, ZoneRegion, ZoneRingError};

use crate::layout::{BlockLayout, ObjSize, HANDLER_NAME_MAX};
use crate::{ChunkInfo, MempoolError, MempoolFlags};

/// What a handler is told about the pool it serves.
#[derive(Debug, Clone)]
pub struct BackendParams {
    /// Pool name (at most 25 bytes).
    pub name: String,
    /// Objects the backend must be able to hold.
    pub n: u32,
    /// Socket asked for the pool.
    pub socket: i32,
    /// The pool's flag bits.
    pub flags: u32,
    /// The pool's object sizes (an element starts `header_size` bytes
    /// into its object).
    pub obj_size: ObjSize,
    /// The block layout the handler asked for
    /// ([`Handler::block_layout`]), as the pool recorded it.
    pub layout: Option<BlockLayout>,
}

/// A pool's object store: holds pointers to free objects. Lives in shared
/// memory (every process opens its own `Backend` value on it).
pub trait Backend: Send + Sync {
    /// Stores all of `objs` (the backend was sized for every object of the
    /// pool, so this only fails on misuse).
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError>;
    /// Takes exactly `out.len()` objects, or none
    /// ([`MempoolError::NotEnough`]).
    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError>;
    /// Objects stored now.
    fn count(&self) -> u32;
    /// Frees the backend's shared memory.
    fn destroy(self: Box<Self>) -> Result<(), MempoolError>;

    /// Optional: a chunk of object memory was added to the pool (laid out
    /// as [`Handler::block_layout`] asked, its start aligned to the block
    /// size); called once per chunk by the populating process, before
    /// its objects are enqueued. A handler that keeps state in the memory
    /// itself (block headers) writes it here. An error fails the
    /// populate call. Default: nothing to do.
    fn populate_chunk(&self, chunk: &ChunkInfo) -> Result<(), MempoolError> {
        let _ = chunk;
        Ok(())
    }

    /// Optional: checks the backend's own structures (called first by
    /// [`Mempool::audit`](crate::Mempool::audit), on a quiescent pool);
    /// an inconsistency is [`MempoolError::Corrupt`]. Default: nothing
    /// to check.
    fn check(&self) -> Result<(), MempoolError> {
        Ok(())
    }

    /// Optional: objects per contiguous block when the backend hands out
    /// whole blocks ([`dequeue_contig_blocks`](Self::dequeue_contig_blocks);
    /// DPDK's `rte_mempool_ops_get_info` `contig_block_size`). Default:
    /// `None`, no blocks.
    fn contig_block_size(&self) -> Option<u32> {
        None
    }

    /// Optional: takes `first.len()` whole blocks, or none, writing the
    /// first object (element address) of each; a block's objects follow
    /// its first at the pool's `total_size` stride (DPDK's
    /// `dequeue_contig_blocks`). Not enough whole blocks:
    /// [`MempoolError::NotEnoughBlocks`]. Only called when
    /// [`contig_block_size`](Self::contig_block_size) is `Some`; the
    /// default refuses with [`MempoolError::ContigBlocksUnsupported`].
    fn dequeue_contig_blocks(&self, first: &mut [*mut u8]) -> Result<(), MempoolError> {
        let _ = first;
        Err(MempoolError::ContigBlocksUnsupported {
            name: String::new(),
            handler: String::new(),
        })
    }
}

/// A backend kind, registered by name.
pub trait Handler: Send + Sync {
    /// Creates the backend's shared state for a new pool.
    fn create<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError>;
    /// Opens the backend of an existing pool (possibly created by another
    /// process).
    fn attach<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError>;

    /// Optional: how the pool's object memory is laid out, asked at pool
    /// creation (before [`create`](Self::create)) and by
    /// [`required_memory_handler`](crate::required_memory_handler):
    /// `Some` places objects in blocks aligned to their size, none
    /// crossing a block ([`BlockLayout`]); `None` (the default) back to
    /// back. An error (objects too big for the handler's blocks) fails
    /// the creation before anything is reserved. The layout is recorded
    /// in the pool header, so every process places and finds objects the
    /// same way.
    fn block_layout(
        &self,
        obj: &ObjSize,
        flags: MempoolFlags,
    ) -> Result<Option<BlockLayout>, MempoolError> {
        let _ = (obj, flags);
        Ok(None)
    }
}

type Registry = HashMap<String, Arc<dyn Handler>>;

static HANDLERS: RwLock<Option<Registry>> = RwLock::new(None);

fn builtins() -> Registry {
    let mut m: Registry = HashMap::new();
    for (name, p, c) in [
        ("ring_mp_mc", SyncMode::Multi, SyncMode::Multi),
        ("ring_sp_sc", SyncMode::Single, SyncMode::Single),
        ("ring_mp_sc", SyncMode::Multi, SyncMode::Single),
        ("ring_sp_mc", SyncMode::Single, SyncMode::Multi),
        // DPDK's names for the relaxed-tail-sync and head-tail-sync
        // rings (for more threads than CPUs: a preempted producer or
        // consumer does not stall the others behind it).
        ("ring_mt_rts", SyncMode::MultiRts, SyncMode::MultiRts),
        ("ring_mt_hts", SyncMode::MultiHts, SyncMode::MultiHts),
    ] {
        m.insert(
            name.to_string(),
            Arc::new(RingHandler {
                // Compact: every thread both puts and gets, so an
                // operation pulls two cache lines instead of four
                // (2 cores without caches: +13-28%).
                cfg: RingConfig {
                    producer: p,
                    consumer: c,
                    exact: true,
                    compact: true,
                },
            }),
        );
    }
    m.insert("stack".to_string(), Arc::new(StackHandler));
    m.insert(
        "lf_stack".to_string(),
        Arc::new(crate::lf_stack::LfStackHandler),
    );
    m.insert(
        "bucket".to_string(),
        Arc::new(crate::bucket::BucketHandler::default()),
    );
    m
}

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = HANDLERS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(g.get_or_insert_with(builtins))
}

/// Registers a handler under `name` in this process (DPDK's
/// `rte_mempool_register_ops`). Names are 1 to 31 bytes; a name in use is
/// refused.
pub fn register_handler(name: &str, h: Arc<dyn Handler>) -> Result<(), MempoolError> {
    let bad = |why| MempoolError::BadHandler {
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > HANDLER_NAME_MAX || name.contains('\0') {
        return Err(bad("names are 1 to 31 bytes without NUL"));
    }
    with_registry(|r| {
        if r.contains_key(name) {
            return Err(bad("a handler of that name is registered already"));
        }
        r.insert(name.to_string(), h);
        Ok(())
    })
}

/// Names of the handlers registered in this process, sorted.
pub fn handler_names() -> Vec<String> {
    let mut v: Vec<String> = with_registry(|r| r.keys().cloned().collect());
    v.sort();
    v
}

/// The handler registered as `name` in this process.
pub fn find_handler(name: &str) -> Result<Arc<dyn Handler>, MempoolError> {
    with_registry(|r| r.get(name).cloned()).ok_or_else(|| MempoolError::UnknownHandler {
        name: name.to_string(),
        known: handler_names().join(", "),
    })
}

/// The default handler for pool flags (DPDK's choice in
/// `rte_mempool_create_empty`).
pub(crate) fn default_handler(flags: crate::MempoolFlags) -> &'static str {
    use crate::MempoolFlags as F;
    match (flags.contains(F::SP_PUT), flags.contains(F::SC_GET)) {
        (true, true) => "ring_sp_sc",
        (true, false) => "ring_sp_mc",
        (false, true) => "ring_mp_sc",
        (false, false) => "ring_mp_mc",
    }
}

// --- ring handlers -------------------------------------------------------

struct RingHandler {
    cfg: RingConfig,
}

fn ring_name(pool: &str) -> String {
    format!("MP_{pool}")
}

struct RingBackend<'m> {
    ring: Ring<u64, ZoneRegion<'m>>,
    name: String,
}

impl Handler for RingHandler {
    fn create<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        // An RTS consumer side moves its tail only when the last consumer
        // in flight finishes, so a consumer that got its objects can put
        // them back while their old slots still count as taken: the ring
        // must hold up to twice the pool (each object at most once in a
        // released slot and once in an unreleased one). The other modes
        // release in order before returning: the pool's size is enough.
        let cap = if self.cfg.consumer == SyncMode::MultiRts {
            2 * p.n as usize
        } else {
            p.n as usize
        };
        let ring = Ring::create(mem, &ring_name(&p.name), cap, p.socket, self.cfg)?;
        Ok(Box::new(RingBackend {
            ring,
            name: p.name.clone(),
        }))
    }

    fn attach<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let ring = Ring::lookup(mem, &ring_name(&p.name))?;
        Ok(Box::new(RingBackend {
            ring,
            name: p.name.clone(),
        }))
    }
}

pub(crate) fn as_words(objs: &[*mut u8]) -> &[u64] {
    // SAFETY: pointers and u64 have the same size and alignment on the
    // 64-bit targets memplane supports; reading a pointer's bits as an
    // integer is always valid.
    unsafe { std::slice::from_raw_parts(objs.as_ptr().cast::<u64>(), objs.len()) }
}

pub(crate) fn as_words_mut(objs: &mut [*mut u8]) -> &mut [u64] {
    // SAFETY: as `as_words`; any u64 written is a valid (raw) pointer.
    unsafe { std::slice::from_raw_parts_mut(objs.as_mut_ptr().cast::<u64>(), objs.len()) }
}

const _: () = assert!(std::mem::size_of::<*mut u8>() == 8);

/// Whether `name` is one of the built-in ring handlers (names that cannot
/// be registered again, so they always mean the built-in code): pools
/// using them call the ring directly instead of through `dyn Backend`.
pub(crate) fn is_builtin_ring(name: &str) -> bool {
    matches!(
        name,
        "ring_mp_mc" | "ring_sp_sc" | "ring_mp_sc" | "ring_sp_mc" | "ring_mt_rts" | "ring_mt_hts"
    )
}

/// The ring of a pool using a built-in ring handler.
pub(crate) fn pool_ring<'m>(
    mem: &'m Memory,
    pool: &str,
) -> Result<Ring<u64, ZoneRegion<'m>>, MempoolError> {
    Ok(Ring::lookup(mem, &ring_name(pool))?)
}

#[cold]
fn role_err(name: &str, e: RingError, role: &'static str) -> MempoolError {
    match e {
        RingError::RoleTaken { .. } => MempoolError::SingleRoleBusy {
            name: name.to_string(),
            role,
        },
        e => MempoolError::Ring(ZoneRingError::Ring(e)),
    }
}

#[cold]
fn refused(name: &str, e: &BulkError) -> MempoolError {
    MempoolError::Corrupt {
        name: name.to_string(),
        why: format!("backend ring refused objects being returned: {e}"),
    }
}

/// A built-in ring handler's enqueue (pool `name`): the handle-less
/// `Multi` path first (the default handler's), the producer handle for the
/// other modes and to name what went wrong.
#[inline(always)]
pub(crate) fn ring_enqueue(
    ring: &Ring<u64, ZoneRegion<'_>>,
    name: &str,
    objs: &[*mut u8],
) -> Result<(), MempoolError> {
    if ring.enqueue_bulk_multi(as_words(objs)) {
        return Ok(());
    }
    ring_enqueue_handle(ring, name, objs)
}

#[inline(never)]
fn ring_enqueue_handle(
    ring: &Ring<u64, ZoneRegion<'_>>,
    name: &str,
    objs: &[*mut u8],
) -> Result<(), MempoolError> {
    let p = ring.producer().map_err(|e| role_err(name, e, "producer"))?;
    match p.enqueue_bulk(as_words(objs)) {
        Ok(_) => Ok(()),
        Err(e) => Err(refused(name, &e)),
    }
}

/// A built-in ring handler's dequeue (pool `name`); see [`ring_enqueue`].
#[inline(always)]
pub(crate) fn ring_dequeue(
    ring: &Ring<u64, ZoneRegion<'_>>,
    name: &str,
    out: &mut [*mut u8],
) -> Result<(), MempoolError> {
    if ring.dequeue_bulk_multi(as_words_mut(out)) {
        return Ok(());
    }
    ring_dequeue_handle(ring, name, out)
}

#[inline(never)]
fn ring_dequeue_handle(
    ring: &Ring<u64, ZoneRegion<'_>>,
    name: &str,
    out: &mut [*mut u8],
) -> Result<(), MempoolError> {
    let c = ring.consumer().map_err(|e| role_err(name, e, "consumer"))?;
    match c.dequeue_bulk(as_words_mut(out)) {
        Ok(_) => Ok(()),
        Err(BulkError::Insufficient {
            requested,
            available,
        }) => Err(MempoolError::NotEnough {
            requested,
            available,
        }),
        Err(_) => Err(MempoolError::NotEnough {
            requested: out.len() as u32,
            available: ring.count(),
        }),
    }
}

impl Backend for RingBackend<'_> {
    #[inline]
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        ring_enqueue(&self.ring, &self.name, objs)
    }

    #[inline]
    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        ring_dequeue(&self.ring, &self.name, out)
    }

    fn count(&self) -> u32 {
        self.ring.count()
    }

    fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
        self.ring.free()?;
        Ok(())
    }
}

// --- stack handler -------------------------------------------------------

pub(crate) struct StackHandler;

#[repr(C, align(64))]
struct StackHead {
    lock: SpinLock,
    len: std::sync::atomic::AtomicU32,
    cap: u32,
}

struct StackBackend<'m> {
    zone: Memzone<'m>,
    head: *const StackHead,
    slots: *mut u64,
    cap: u32,
}

// SAFETY: the pointers are into the zone (mapped as long as the Memory
// the zone borrows); the slots are only touched under the shared lock.
unsafe impl Send for StackBackend<'_> {}
// SAFETY: as above.
unsafe impl Sync for StackBackend<'_> {}

fn stack_zone(pool: &str) -> String {
    format!("MS_{pool}")
}

impl StackBackend<'_> {
    fn head(&self) -> &StackHead {
        // SAFETY: the zone starts with an initialised StackHead.
        unsafe { &*self.head }
    }
}

fn open_stack(zone: Memzone<'_>) -> Result<StackBackend<'_>, MempoolError> {
    let head = zone.as_ptr().cast::<StackHead>();
    // SAFETY: the zone holds a StackHead at its (64-aligned) start.
    let cap = unsafe { (*head).cap };
    if (cap as usize) * 8 + 64 > zone.len() {
        return Err(MempoolError::Corrupt {
            name: zone.name().to_string(),
            why: format!("stack of {cap} slots in a zone of {} bytes", zone.len()),
        });
    }
    Ok(StackBackend {
        head,
        // SAFETY: inside the zone (checked above).
        slots: unsafe { zone.as_mut_ptr().add(64) }.cast::<u64>(),
        cap,
        zone,
    })
}

impl Handler for StackHandler {
    fn create<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let bytes = 64 + p.n as usize * 8;
        let socket = if p.socket < 0 {
            SOCKET_ID_ANY
        } else {
            p.socket
        };
        let zone = mem.memzone_reserve_aligned(
            &stack_zone(&p.name),
            bytes,
            socket,
            MemzoneFlags::ZERO,
            64,
        )?;
        // SAFETY: fresh zeroed zone of at least 64 bytes; nobody else
        // opens it before the pool is published.
        unsafe { (*zone.as_mut_ptr().cast::<StackHead>()).cap = p.n };
        Ok(Box::new(open_stack(zone)?))
    }

    fn attach<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let zone =
            mem.memzone_lookup(&stack_zone(&p.name))
                .ok_or_else(|| MempoolError::NotFound {
                    name: p.name.clone(),
                })?;
        Ok(Box::new(open_stack(zone)?))
    }
}

impl Backend for StackBackend<'_> {
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        let h = self.head();
        let _g = h.lock.lock();
        let len = h.len.load(std::sync::atomic::Ordering::Relaxed);
        if len as usize + objs.len() > self.cap as usize {
            return Err(MempoolError::Corrupt {
                name: self.zone.name().to_string(),
                why: format!(
                    "stack of {} holds {len}, cannot take {} more",
                    self.cap,
                    objs.len()
                ),
            });
        }
        // SAFETY: len + objs.len() <= cap slots, under the lock.
        unsafe {
            std::ptr::copy_nonoverlapping(
                as_words(objs).as_ptr(),
                self.slots.add(len as usize),
                objs.len(),
            );
        }
        h.len.store(
            len + objs.len() as u32,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        let h = self.head();
        let _g = h.lock.lock();
        let len = h.len.load(std::sync::atomic::Ordering::Relaxed);
        let n = out.len() as u32;
        if n > len {
            return Err(MempoolError::NotEnough {
                requested: n,
                available: len,
            });
        }
        let base = len - n;
        // SAFETY: slots [base, len) are filled, under the lock.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.slots.add(base as usize),
                as_words_mut(out).as_mut_ptr(),
                n as usize,
            );
        }
        h.len.store(base, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn count(&self) -> u32 {
        self.head().len.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
        let StackBackend { zone, .. } = *self;
        zone.free()?;
        Ok(())
    }
}
