//! The pool: creation, lookup, get/put with per-lcore and user-owned
//! caches, counts, iteration, audit, dump, free.

// Hot-path helpers are tiny and must inline into get/put.
#![allow(clippy::inline_always)]
// Zones are 64-byte aligned (memzone minimum): header casts are aligned.
#![allow(clippy::cast_ptr_alignment)]

use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use memplane::iova::BAD_IOVA;
use memplane::memzone::{Memzone, MemzoneError, MemzoneFlags};
use memplane::{Error, Memory};
use serde::Serialize;

use crate::events::MempoolEvent;
use crate::handler::{
    as_words, as_words_mut, default_handler, find_handler, is_builtin_ring, pool_ring,
    ring_dequeue, ring_enqueue, Backend, BackendParams, Handler,
};
use crate::layout::{
    calc_obj_size_for, channels_x_ranks, header_geometry, name_bytes, name_str, BlockLayout,
    CacheSlot, ChunkDesc, MempoolFlags, ObjHeader, ObjSize, Packing, PoolHeader, CACHE_MAX_SIZE,
    COOKIE_IN_POOL, COOKIE_IN_USE, GET_FLOOR_CLOSED, HANDLER_NAME_MAX, LAYOUT_VERSION, MAX_CHUNKS,
    MAX_LCORES, MAX_OBJECTS, MAX_PRIVATE_SIZE, NAME_MAX, POOL_MAGIC, POOL_MAGIC_BUILDING,
    SLOW_LEAK, SLOW_STATS,
};
use crate::lcore::RegistryRef;
use crate::leak::{
    caller_tag, ids, table_bytes, LeakHead, LeakReport, Outstanding, Owner, OwnerRecord, LEAK_HEAD,
    LEAK_MAGIC, LEAK_ZONE_PREFIX,
};
use crate::stats::{
    Delta, MempoolStats, StatsHead, StatsRow, ROWS, ROWS_OFF, SHARED_ROW, STATS_MAGIC,
    STATS_ZONE_PREFIX, TABLE_BYTES,
};
use crate::{MempoolError, NodeFree};
use memplane_ring::{Ring, ZoneRegion};

/// The span of the pool's objects when they are all in one chunk, or all
/// in the chunks of its one zone (first element address, bytes up to the
/// last chunk's end), else (0, 0): the one-compare membership check. A
/// pointer between two chunks of that zone passes it; it is still the
/// pool's own memory (release builds check membership, not boundaries).
fn object_span(
    mem: &Memory,
    name: &str,
    h: &PoolHeader,
    ranges: &[(usize, usize, u32)],
) -> (usize, usize) {
    let hs = h.header_size as usize;
    match ranges {
        [] => (0, 0),
        [(start, end, _)] => (start + hs, end.saturating_sub(start + hs)),
        _ => {
            if h.zone_chunks.count_ones() != 1 || h.local_chunks != 0 || h.anon_chunks != 0 {
                return (0, 0);
            }
            let k = h.zone_chunks.trailing_zeros() as usize;
            let Some(z) = mem.memzone_lookup(&chunk_zone_name(name, k)) else {
                return (0, 0);
            };
            let (zs, ze) = (z.as_ptr() as usize, z.as_ptr() as usize + z.len());
            if !ranges.iter().all(|&(s, e, _)| s >= zs && e <= ze) {
                return (0, 0);
            }
            let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0) + hs;
            let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
            (lo, hi.saturating_sub(lo))
        }
    }
}

/// Prefix of a pool's memzones (DPDK's `RTE_MEMPOOL_MZ_PREFIX`).
pub const POOL_ZONE_PREFIX: &str = "MP_";

/// Parameters of [`Mempool::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MempoolConfig {
    /// Objects in the pool (>= 1).
    pub n: u32,
    /// Bytes per element (1 ..= 1 GiB).
    pub elt_size: u32,
    /// Per-lcore cache size: 0 (no caches) or at most 512 and at most
    /// `n / 1.5`.
    pub cache_size: u32,
    /// Bytes of private area after the header (rounded up to 64).
    pub private_size: u32,
    /// NUMA socket for all of the pool's memory, or `SOCKET_ID_ANY`.
    pub socket: i32,
    /// Flags.
    pub flags: MempoolFlags,
    /// Handler name; `None` picks from the flags (`ring_mp_mc` by default).
    /// `bucket` lays objects out in buckets and hands out contiguous
    /// blocks ([`Mempool::get_contig_blocks`]).
    pub handler: Option<String>,
    /// Start with leak tracking on ([`Mempool::set_leak_tracking`]).
    pub leak_tracking: bool,
    /// Start with statistics on ([`Mempool::set_stats`]).
    pub stats: bool,
}

impl MempoolConfig {
    /// `n` elements of `elt_size` bytes, no cache, any socket, default
    /// handler.
    pub fn new(n: u32, elt_size: u32) -> Self {
        Self {
            n,
            elt_size,
            cache_size: 0,
            private_size: 0,
            socket: memplane::heap::SOCKET_ID_ANY,
            flags: MempoolFlags::NONE,
            handler: None,
            leak_tracking: false,
            stats: false,
        }
    }
    /// Starts the pool with statistics on (or off): counted from the
    /// first get or put (population is not counted).
    #[must_use]
    pub fn stats(mut self, on: bool) -> Self {
        self.stats = on;
        self
    }
    /// Starts the pool with leak tracking on (or off).
    #[must_use]
    pub fn leak_tracking(mut self, on: bool) -> Self {
        self.leak_tracking = on;
        self
    }
    /// Sets the per-lcore cache size.
    #[must_use]
    pub fn cache_size(mut self, c: u32) -> Self {
        self.cache_size = c;
        self
    }
    /// Sets the private area size.
    #[must_use]
    pub fn private_size(mut self, p: u32) -> Self {
        self.private_size = p;
        self
    }
    /// Sets the socket.
    #[must_use]
    pub fn socket(mut self, s: i32) -> Self {
        self.socket = s;
        self
    }
    /// Sets the flags.
    #[must_use]
    pub fn flags(mut self, f: MempoolFlags) -> Self {
        self.flags = f;
        self
    }
    /// Sets the handler by name.
    #[must_use]
    pub fn handler(mut self, h: &str) -> Self {
        self.handler = Some(h.to_string());
        self
    }
}

/// One object zone, for reports and [`Mempool::chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkInfo {
    /// First byte.
    pub va: usize,
    /// IOVA of the first byte (`BAD_IOVA` if not contiguous / unknown).
    pub iova: u64,
    /// Bytes of objects.
    pub len: usize,
    /// Index of the first object.
    pub first: u32,
    /// Objects.
    pub count: u32,
}

/// A snapshot of a pool, for dumps and lists.
#[derive(Debug, Clone, Serialize)]
pub struct MempoolInfo {
    /// Name.
    pub name: String,
    /// Header address.
    pub addr: usize,
    /// Flags.
    pub flags: String,
    /// Socket asked.
    pub socket: i32,
    /// Handler name.
    pub handler: String,
    /// Objects.
    pub size: u32,
    /// Objects placed.
    pub populated: u32,
    /// Element size as asked at creation.
    pub elt_size: u32,
    /// Object sizes.
    pub obj_size: ObjSize,
    /// The handler's block layout ([`Handler::block_layout`]; the
    /// `bucket` handler's buckets), `None` when objects are back to back.
    pub block_layout: Option<BlockLayout>,
    /// Objects per contiguous block when the handler hands out blocks
    /// ([`Mempool::contig_block_size`]), else `None`.
    pub contig_block_size: Option<u32>,
    /// Bytes of shared memory the pool takes: header zone (caches and
    /// private area included) plus object chunks (the backend's zone not
    /// counted).
    pub memory_bytes: usize,
    /// Private area.
    pub private_size: u32,
    /// Cache size (0: none).
    pub cache_size: u32,
    /// Objects in each non-empty lcore cache: (lcore, count).
    pub cache_counts: Vec<(u32, u32)>,
    /// Objects in the backend.
    pub common_pool_count: u32,
    /// Available objects (backend + caches).
    pub avail: u32,
    /// Objects out.
    pub in_use: u32,
    /// Object zones.
    pub chunks: Vec<ChunkInfo>,
    /// Whether leak tracking is on.
    pub leak_tracking: bool,
    /// The statistics, while they are on ([`Mempool::set_stats`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<MempoolStats>,
}

/// What [`Mempool::audit`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Objects in the backend.
    pub in_backend: u32,
    /// Objects in per-lcore caches.
    pub in_caches: u32,
    /// Objects out (not in the pool).
    pub out: u32,
}

/// A pool of fixed-size objects in an instance's hugepage memory, shared
/// by name with every thread and process of the instance.
pub struct Mempool<'m> {
    mem: &'m Memory,
    zone: Memzone<'m>,
    hdr: NonNull<PoolHeader>,
    backend: Box<dyn Backend + 'm>,
    /// The ring itself when the handler is a built-in ring one: the fast
    /// path calls it directly (no virtual call).
    ring: Option<Ring<u64, ZoneRegion<'m>>>,
    reg: RegistryRef,
    name: String,
    handler: String,
    n: u32,
    header_size: usize,
    total_size: usize,
    cache_size: u32,
    cache_cap: u32,
    /// 1.5 x cache size: a cache above it is flushed.
    flush_thresh: u32,
    /// `floor((2^64 - 1) / total_size) + 1`: object index by multiply
    /// ([`div_by_recip`]).
    total_recip: u64,
    cache_base: usize,
    cache_stride: usize,
    /// (start, end) of each chunk's objects: membership checks.
    ranges: Vec<(usize, usize, u32)>,
    /// Address of granule 0 of `gran`.
    gran_base: usize,
    /// Per 64 KiB granule from `gran_base`: 0 = no chunk, `k` = only
    /// chunk `ranges[k - 1]`, [`GRAN_MANY`] = several (binary search).
    /// Empty when the chunks span too much address space.
    gran: Box<[u8]>,
    /// The objects' span when they are in one zone (the common case): a
    /// put's membership check is then one compare per object, `addr - lo
    /// < span` (`span` 0 with several zones: the granule table is used
    /// then).
    span_check: SpanCheck,
    /// Several zones: address of granule 0 of `full`.
    full_base: usize,
    /// Several zones: per granule from `full_base`, 1 when the whole
    /// granule lies inside one zone's objects, else 0; one more 0 at the
    /// end, where every address past the table lands. A put whose objects
    /// all hit 1s is done with one table load per object; any other goes
    /// through the exact check.
    full: Box<[u8]>,
}

// SAFETY: the header pointer is into a memzone mapped as long as the
// borrowed Memory; shared fields are atomics or immutable after
// publication; per-lcore caches are only written by the thread owning the
// lcore id (enforced by the registry).
unsafe impl Send for Mempool<'_> {}
// SAFETY: as above.
unsafe impl Sync for Mempool<'_> {}

impl std::fmt::Debug for Mempool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mempool")
            .field("name", &self.name)
            .field("n", &self.n)
            .field("handler", &self.handler)
            .field("cache_size", &self.cache_size)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), MempoolError> {
    let bad = |why| {
        Err(MempoolError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_MAX {
        return bad("too long");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    Ok(())
}

fn zone_name(name: &str) -> String {
    format!("{POOL_ZONE_PREFIX}{name}")
}

fn chunk_zone_name(name: &str, k: usize) -> String {
    format!("{POOL_ZONE_PREFIX}{name}_{k}")
}

/// Checks the cache size against DPDK's rule.
fn check_cache(cache_size: u32, n: u32) -> Result<(), MempoolError> {
    let bad = |why| Err(MempoolError::BadCacheSize { cache_size, n, why });
    if cache_size > CACHE_MAX_SIZE {
        return bad("at most 512");
    }
    if u64::from(cache_size) * 3 / 2 > u64::from(n) {
        return bad("1.5 x cache size must not exceed n");
    }
    Ok(())
}

impl<'m> Mempool<'m> {
    /// Creates pool `name` with `cfg.n` objects (DPDK's
    /// `rte_mempool_create` without callbacks).
    pub fn create(mem: &'m Memory, name: &str, cfg: &MempoolConfig) -> Result<Self, MempoolError> {
        Self::create_with(mem, name, cfg, |_, _| {})
    }

    /// Creates a pool and calls `obj_init(index, element)` on every object
    /// before publishing it (DPDK's `obj_init`).
    ///
    /// Memory: the header zone `MP_<name>` (see
    /// [`layout`](crate::layout)), the object zones `MP_<name>_<k>`
    /// ([`required_memory_for`](crate::required_memory_for) bytes with the
    /// instance's [`channels_x_ranks`](crate::channels_x_ranks)), and the
    /// backend's (a ring `MP_<name>`, a stack `MS_<name>` or a lock-free
    /// stack `ML_<name>`). Object zones are IOVA-contiguous unless
    /// `NO_IOVA_CONTIG`; when memory is short or fragmented the objects are
    /// split over up to 64 zones (the zone size is halved until it fits).
    /// On error nothing is left behind. Same as
    /// [`create_empty`](Self::create_empty) then
    /// [`populate_default`](Self::populate_default) with the initialiser.
    pub fn create_with(
        mem: &'m Memory,
        name: &str,
        cfg: &MempoolConfig,
        mut obj_init: impl FnMut(u32, *mut u8),
    ) -> Result<Self, MempoolError> {
        let mut pool = Self::create_empty(mem, name, cfg)?;
        match pool.populate_zones(&mut obj_init) {
            Ok(_) => {
                tracing::debug!(
                    name,
                    n = cfg.n,
                    elt_size = cfg.elt_size,
                    cache_size = cfg.cache_size,
                    handler = pool.handler,
                    chunks = pool.header().nb_chunks,
                    "mempool created"
                );
                crate::events::fire(MempoolEvent::Ready, &pool);
                Ok(pool)
            }
            Err(e) => {
                // The caller never had the pool: no Destroy event.
                let _ = pool.teardown(false);
                Err(e)
            }
        }
    }

    /// Creates pool `name` without objects (DPDK's
    /// `rte_mempool_create_empty`): the header zone and the backend, sized
    /// for `cfg.n` objects. Place the objects with
    /// [`populate_default`](Self::populate_default),
    /// [`populate_virt`](Self::populate_virt) (memory you provide) or
    /// [`populate_anon`](Self::populate_anon), then initialise them with
    /// [`obj_iter`](Self::obj_iter) if needed. Gets see the objects placed
    /// so far; other handles ([`lookup`](Self::lookup), in this or another
    /// process) are refused with [`MempoolError::NotPopulated`] until all
    /// `cfg.n` are placed. Free an unfinished pool with
    /// [`free`](Self::free) as usual.
    pub fn create_empty(
        mem: &'m Memory,
        name: &str,
        cfg: &MempoolConfig,
    ) -> Result<Self, MempoolError> {
        check_name(name)?;
        if cfg.n == 0 {
            return Err(MempoolError::ZeroObjects);
        }
        if cfg.n > MAX_OBJECTS {
            return Err(MempoolError::TooManyObjects {
                n: u64::from(cfg.n),
                max: MAX_OBJECTS,
            });
        }
        let flags = MempoolFlags::from_bits(cfg.flags.bits())?;
        // Objects spread over the instance's memory channels x ranks.
        let cxr = channels_x_ranks(mem);
        let sz = calc_obj_size_for(cfg.elt_size, flags, cxr)?;
        crate::required_memory_for(cfg.n, cfg.elt_size, flags, cxr)?;
        check_cache(cfg.cache_size, cfg.n)?;
        if cfg.private_size > MAX_PRIVATE_SIZE {
            return Err(MempoolError::PrivateTooLarge {
                size: u64::from(cfg.private_size),
                max: MAX_PRIVATE_SIZE,
            });
        }
        let hname = cfg
            .handler
            .clone()
            .unwrap_or_else(|| default_handler(flags).to_string());
        if hname.len() > HANDLER_NAME_MAX {
            return Err(MempoolError::BadHandler {
                name: hname,
                why: "names are 1 to 31 bytes",
            });
        }
        let handler = find_handler(&hname)?;
        // The handler's block layout, checked before anything is reserved
        // (an element too big for its blocks is refused here).
        let layout = handler.block_layout(&sz, flags)?;
        if let Some(l) = &layout {
            l.check(&sz, &hname)?;
            Packing::new(&sz, Some(l))
                .bytes(cfg.n)
                .ok_or(MempoolError::TooManyObjects {
                    n: u64::from(cfg.n),
                    max: MAX_OBJECTS,
                })?;
        }
        let reg = RegistryRef::open(mem)?;
        let geo = header_geometry(cfg.cache_size, cfg.private_size);
        let zone = match mem.memzone_reserve_aligned(
            &zone_name(name),
            geo.total,
            cfg.socket,
            MemzoneFlags::ZERO,
            64,
        ) {
            Ok(z) => z,
            Err(Error::Memzone(MemzoneError::Exists { .. })) => {
                return Err(MempoolError::Exists {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let hdr = NonNull::new(zone.as_mut_ptr().cast::<PoolHeader>()).ok_or_else(|| {
            MempoolError::Corrupt {
                name: name.to_string(),
                why: "null zone".into(),
            }
        })?;
        // SAFETY: a fresh zeroed zone of at least size_of::<PoolHeader>()
        // bytes, 64-aligned; unpublished (no magic), so nobody else reads it.
        let h = unsafe { &mut *hdr.as_ptr() };
        h.version = LAYOUT_VERSION;
        h.flags = flags.bits();
        h.name = name_bytes(name);
        h.handler = name_bytes(&hname);
        h.n = cfg.n;
        h.elt_size = sz.elt_size;
        h.elt_size_req = cfg.elt_size;
        h.header_size = sz.header_size;
        h.trailer_size = sz.trailer_size;
        h.total_size = sz.total_size;
        h.cache_size = cfg.cache_size;
        h.flush_thresh = cfg.cache_size * 3 / 2;
        h.cache_cap = geo.cache_cap;
        h.private_size = geo.priv_size as u32;
        h.socket = cfg.socket;
        h.creator_pid = std::process::id();
        h.self_va = hdr.as_ptr() as u64;
        h.cache_off = geo.cache_off as u64;
        h.cache_stride = geo.cache_stride as u64;
        h.priv_off = geo.priv_off as u64;
        if let Some(l) = &layout {
            h.block_size = l.block_size;
            h.block_header = l.header;
            h.objs_per_block = l.objs_per_block;
        }
        let params = BackendParams {
            name: name.to_string(),
            n: cfg.n,
            socket: cfg.socket,
            flags: flags.bits(),
            obj_size: sz,
            layout,
        };
        let backend = match handler.create(mem, &params) {
            Ok(b) => b,
            Err(e) => {
                let _ = zone.free();
                return Err(e);
            }
        };
        h.magic.store(POOL_MAGIC_BUILDING, Ordering::Release);
        let pool = Self::from_parts(mem, zone, hdr, backend, reg, hname);
        // Both switches start off: open every cache's hot paths and the
        // user-owned caches' key.
        pool.sync_switches();
        // The switches asked for hold from the first object placed: a
        // two-step creation tracks and counts like a one-step one.
        let switched = (|| {
            if cfg.stats {
                pool.set_stats(true)?;
            }
            if cfg.leak_tracking {
                pool.set_leak_tracking(true)?;
            }
            Ok(())
        })();
        if let Err(e) = switched {
            // The caller never had the pool: no Destroy event.
            let _ = pool.teardown(false);
            return Err(e);
        }
        Ok(pool)
    }

    /// Objects placed so far (DPDK's `populated_size`).
    pub fn populated(&self) -> u32 {
        self.header().populated
    }

    /// Objects per contiguous block when the pool's handler hands out
    /// whole blocks ([`get_contig_blocks`](Self::get_contig_blocks); the
    /// `bucket` handler: the objects of one bucket), else `None` (DPDK's
    /// `rte_mempool_ops_get_info` `contig_block_size`, 0 there).
    pub fn contig_block_size(&self) -> Option<u32> {
        self.backend.contig_block_size()
    }

    /// Takes `first.len()` whole blocks of contiguous objects, or none
    /// (DPDK's `rte_mempool_get_contig_blocks`), writing the first object
    /// of each: a block's [`contig_block_size`](Self::contig_block_size)
    /// objects are `first[i]`, `first[i] + total_size`, ... (the
    /// `bucket` handler's buckets). Not enough whole blocks now:
    /// [`MempoolError::NotEnoughBlocks`]; a handler without blocks:
    /// [`MempoolError::ContigBlocksUnsupported`]. Nothing is taken then.
    ///
    /// Blocks come straight from the backend, past the lcore caches (as
    /// in DPDK). Their objects go back one by one with
    /// [`put`](Self::put) / [`put_bulk`](Self::put_bulk), through the
    /// caller's cache like any other put; a block is whole again, and can
    /// be handed out as a block again, only once every one of its objects
    /// is back in the backend, so flush caches
    /// ([`cache_flush`](Self::cache_flush)) that hold some before asking
    /// for blocks. Single gets break whole blocks only when no partly
    /// used one is at hand.
    ///
    /// Statistics count a call as one get (`get_success_bulk` or
    /// `get_fail_bulk`) and its blocks (`get_success_blks` /
    /// `get_fail_blks`), not their objects, as DPDK does; an unsupported
    /// call is not counted. Leak tracking records every object of the
    /// blocks.
    pub fn get_contig_blocks(&self, first: &mut [*mut u8]) -> Result<(), MempoolError> {
        let Some(per_block) = self.backend.contig_block_size() else {
            return Err(MempoolError::ContigBlocksUnsupported {
                name: self.name.clone(),
                handler: self.handler.clone(),
            });
        };
        if first.is_empty() {
            return Ok(());
        }
        let r = self.backend.dequeue_contig_blocks(first);
        let slow = self.header().slow.load(Ordering::Relaxed);
        if r.is_ok() && (cfg!(debug_assertions) || slow & SLOW_LEAK != 0) {
            let objs: Vec<*mut u8> = first
                .iter()
                .flat_map(|&f| {
                    (0..per_block as usize).map(move |j| f.wrapping_add(j * self.total_size))
                })
                .collect();
            self.mark_out(&objs);
            if slow & SLOW_LEAK != 0 {
                self.record_get(&objs, None, None);
            }
        }
        if slow & SLOW_STATS != 0 {
            self.count(None, &Delta::blocks(first.len(), r.is_ok()));
        }
        r
    }

    fn refuse_populate(&self, why: &'static str) -> MempoolError {
        MempoolError::PopulateRefused {
            name: self.name.clone(),
            populated: self.populated(),
            n: self.n,
            why,
        }
    }

    /// Places the objects still missing in new memzones `MP_<name>_<k>`
    /// (DPDK's `rte_mempool_populate_default`); returns how many were
    /// added. A full pool is refused ([`MempoolError::PopulateRefused`]);
    /// when memory is short, [`MempoolError::NoMemory`] says what was
    /// needed and what each node had, and nothing is added. Unlike DPDK
    /// (which refuses a pool with any chunk, `-EEXIST`), a pool partly
    /// filled by [`populate_virt`](Self::populate_virt) gets the rest.
    pub fn populate_default(&mut self) -> Result<u32, MempoolError> {
        let added = self.populate_zones(&mut |_, _| {})?;
        self.fire_ready_if_full();
        Ok(added)
    }

    /// Fires [`MempoolEvent::Ready`] when the `populate_*` call that just
    /// succeeded placed the last object (a full pool refuses further
    /// calls, so this fires once).
    fn fire_ready_if_full(&self) {
        if self.populated() == self.n {
            crate::events::fire(MempoolEvent::Ready, self);
        }
    }

    fn populate_zones(
        &mut self,
        obj_init: &mut dyn FnMut(u32, *mut u8),
    ) -> Result<u32, MempoolError> {
        let remaining = self.n - self.populated();
        if remaining == 0 {
            return Err(self.refuse_populate("every object is placed already"));
        }
        let first_chunk = self.header().nb_chunks as usize;
        // SAFETY: only the creator's handle populates (`&mut self`), and
        // other handles are refused until the pool is published.
        let h = unsafe { &mut *self.hdr.as_ptr() };
        let flags = MempoolFlags::from_bits(h.flags).unwrap_or_default();
        if let Err(e) = reserve_zones(self.mem, &self.name, h, remaining, flags, Packing::of(h)) {
            // Give back this call's zones: nothing changed.
            for k in first_chunk..h.nb_chunks as usize {
                if let Some(z) = self.mem.memzone_lookup(&chunk_zone_name(&self.name, k)) {
                    let _ = z.free();
                }
                h.zone_chunks &= !(1 << k);
                h.chunks[k] = ChunkDesc::default();
            }
            h.nb_chunks = first_chunk as u32;
            return Err(e);
        }
        for k in first_chunk..h.nb_chunks as usize {
            self.place_chunk(k, obj_init)?;
        }
        self.chunks_changed();
        Ok(remaining)
    }

    /// Places objects in `len` bytes at `addr` that you provide (DPDK's
    /// `rte_mempool_populate_virt`): as many of the missing objects as fit
    /// after aligning the start (64 bytes, 8 with `NO_CACHE_ALIGN`; the
    /// block size when the handler lays objects out in blocks, e.g. 64 KiB
    /// for `bucket`); returns how many were added. Each object's IOVA comes from the
    /// instance's memsegs (a memzone, or external memory registered with
    /// the heap) when the address is in them, else `BAD_IOVA`.
    ///
    /// Memory outside the instance's memseg lists is private to this
    /// process: the pool is then refused to other processes
    /// ([`MempoolError::ProcessLocal`]). The pool never frees the region.
    ///
    /// # Safety
    /// The region is readable and writable, used by nothing else, and
    /// outlives the pool (until [`free`](Self::free) in every process).
    pub unsafe fn populate_virt(&mut self, addr: *mut u8, len: usize) -> Result<u32, MempoolError> {
        let remaining = self.n - self.populated();
        if remaining == 0 {
            return Err(self.refuse_populate("every object is placed already"));
        }
        if self.header().nb_chunks as usize == MAX_CHUNKS {
            return Err(self.refuse_populate("the pool has 64 chunks already"));
        }
        let pack = self.packing();
        let start = (addr as usize).next_multiple_of(pack.align(self.flags()));
        let usable = (addr as usize + len).saturating_sub(start);
        let count = pack.fit(usable).min(remaining);
        if addr.is_null() || count == 0 {
            return Err(MempoolError::RegionTooSmall {
                name: self.name.clone(),
                addr: addr as usize,
                len,
                total_size: self.total_size as u32,
            });
        }
        let bytes = pack.bytes(count).unwrap_or(usable);
        let shared = self.mem.virt2memseg_list(start).is_some()
            && self.mem.virt2memseg_list(start + bytes - 1).is_some();
        let iova = if shared && matches!(self.mem.is_iova_contiguous(start, bytes), Ok(true)) {
            self.mem.virt2iova(start).unwrap_or(BAD_IOVA)
        } else {
            BAD_IOVA
        };
        let k = self.add_chunk(start, iova, count);
        if !shared {
            // SAFETY: the creator's handle, before or while populating.
            unsafe { (*self.hdr.as_ptr()).local_chunks |= 1 << k };
            tracing::warn!(pool = self.name, addr = start, "populate_virt with memory outside the instance: the pool is private to this process");
        }
        self.place_chunk(k, &mut |_, _| {})?;
        self.chunks_changed();
        self.fire_ready_if_full();
        Ok(count)
    }

    /// Places every object in anonymous memory this call maps (DPDK's
    /// `rte_mempool_populate_anon`): ordinary pages, no IOVA (`BAD_IOVA`),
    /// unmapped when the pool is freed. Only for a pool with no object
    /// placed yet; returns `n`. Anonymous memory is private to this
    /// process: other processes are refused the pool
    /// ([`MempoolError::ProcessLocal`]).
    pub fn populate_anon(&mut self) -> Result<u32, MempoolError> {
        if self.header().nb_chunks != 0 {
            return Err(self.refuse_populate(
                "populate_anon only fills an empty pool (as DPDK's rte_mempool_populate_anon)",
            ));
        }
        let pack = self.packing();
        let bytes = pack.bytes(self.n).unwrap_or(usize::MAX);
        // Blocks must start at a multiple of their size: map one block
        // more and trim the ends below.
        let page = rustix::param::page_size();
        let slack = pack.block.saturating_sub(page);
        let mapped = bytes.saturating_add(slack);
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let map = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }
        .map_err(|e| MempoolError::NoMemory {
            name: self.name.clone(),
            need: bytes,
            objects: self.n,
            total_size: self.total_size as u32,
            socket: memplane::heap::SOCKET_ID_ANY,
            nodes: {
                tracing::warn!(pool = self.name, error = %e, "anonymous mmap failed");
                Vec::new()
            },
        })?;
        let map = trim_mapping(map as usize, mapped, pack.align(self.flags()), bytes);
        let k = self.add_chunk(map, BAD_IOVA, self.n);
        // SAFETY: the creator's handle, before publication.
        unsafe {
            (*self.hdr.as_ptr()).anon_chunks |= 1 << k;
            (*self.hdr.as_ptr()).local_chunks |= 1 << k;
        }
        self.place_chunk(k, &mut |_, _| {})?;
        self.chunks_changed();
        self.fire_ready_if_full();
        Ok(self.n)
    }

    /// Calls `f(index, element)` on every object placed, in population
    /// order (DPDK's `rte_mempool_obj_iter`); returns how many. Used after
    /// `populate_*` to initialise objects of a two-step pool; the objects
    /// are in the pool already, so only do this before handing the pool
    /// to other threads.
    pub fn obj_iter(&self, mut f: impl FnMut(u32, *mut u8)) -> u32 {
        let mut i = 0;
        for o in self.objects() {
            f(i, o);
            i += 1;
        }
        i
    }

    /// Records chunk `nb_chunks` (`count` objects at `va`); the caller
    /// checked the chunk budget.
    fn add_chunk(&mut self, va: usize, iova: u64, count: u32) -> usize {
        let len = self.packing().bytes(count).unwrap_or(0);
        // SAFETY: the creator's handle (`&mut self`) before publication.
        let h = unsafe { &mut *self.hdr.as_ptr() };
        let k = h.nb_chunks as usize;
        let first = h.chunks[..k].iter().map(|c| c.count).sum();
        h.chunks[k] = ChunkDesc {
            va: va as u64,
            iova,
            len: len as u64,
            first,
            count,
        };
        h.nb_chunks += 1;
        k
    }

    /// Rebuilds this handle's membership tables after chunks were added
    /// and publishes the pool once every object is placed.
    fn chunks_changed(&mut self) {
        let h = self.header();
        let mut ranges: Vec<(usize, usize, u32)> = h.chunks[..h.nb_chunks as usize]
            .iter()
            .map(|c| (c.va as usize, (c.va + c.len) as usize, c.first))
            .collect();
        ranges.sort_unstable_by_key(|r| r.0);
        let (gran_base, gran) = granules(&ranges);
        let (obj_lo, obj_span) = object_span(self.mem, &self.name, h, &ranges);
        let (full_base, full_table) = full_granules(&ranges, h.header_size as usize);
        let full = h.populated == self.n;
        self.ranges = ranges;
        self.gran_base = gran_base;
        self.gran = gran;
        self.span_check = SpanCheck::new(obj_lo, obj_span);
        self.full_base = full_base;
        self.full = full_table;
        if full {
            self.header().magic.store(POOL_MAGIC, Ordering::Release);
        }
    }

    /// Writes chunk `k`'s object headers, runs `obj_init` on each and puts
    /// them into the backend.
    fn place_chunk(
        &self,
        k: usize,
        obj_init: &mut dyn FnMut(u32, *mut u8),
    ) -> Result<(), MempoolError> {
        let h = self.header();
        let c = h.chunks[k];
        let anon = h.anon_chunks & (1 << k) != 0;
        let pack = Packing::of(h);
        // The handler sees the chunk before its objects (block headers).
        self.backend.populate_chunk(&ChunkInfo {
            va: c.va as usize,
            iova: c.iova,
            len: c.len as usize,
            first: c.first,
            count: c.count,
        })?;
        let mut batch: Vec<*mut u8> = Vec::with_capacity(512);
        for i in 0..c.count as usize {
            let obj = c.va as usize + pack.offset(i as u32);
            let elt = obj + self.header_size;
            let iova = if c.iova != BAD_IOVA {
                c.iova + (elt - c.va as usize) as u64
            } else if anon {
                BAD_IOVA
            } else {
                self.mem.virt2iova(elt).unwrap_or(BAD_IOVA)
            };
            // SAFETY: the object lies inside chunk k, memory the pool owns
            // or was given; nobody else sees it before it is enqueued.
            unsafe {
                (obj as *mut ObjHeader).write(ObjHeader {
                    pool: self.hdr.as_ptr() as u64,
                    iova,
                    cookie: std::sync::atomic::AtomicU64::new(COOKIE_IN_POOL),
                });
            }
            obj_init(c.first + i as u32, elt as *mut u8);
            batch.push(elt as *mut u8);
            if batch.len() == 512 {
                self.backend.enqueue(&batch)?;
                batch.clear();
            }
        }
        self.backend.enqueue(&batch)?;
        // SAFETY: the creator's handle; the header is unpublished.
        unsafe { (*self.hdr.as_ptr()).populated += c.count };
        Ok(())
    }

    /// The pool named `name`, created by this or another process of the
    /// instance. Its handler must be registered in this process.
    pub fn lookup(mem: &'m Memory, name: &str) -> Result<Self, MempoolError> {
        check_name(name)?;
        let not_found = || MempoolError::NotFound {
            name: name.to_string(),
        };
        let zone = mem.memzone_lookup(&zone_name(name)).ok_or_else(not_found)?;
        if zone.len() < std::mem::size_of::<PoolHeader>() {
            return Err(not_found());
        }
        let hdr = NonNull::new(zone.as_mut_ptr().cast::<PoolHeader>()).ok_or_else(not_found)?;
        // SAFETY: the zone is at least a header long, 64-aligned; magic is
        // atomic, and everything else was written before it (Release).
        let h = unsafe { hdr.as_ref() };
        match h.magic.load(Ordering::Acquire) {
            POOL_MAGIC => {}
            POOL_MAGIC_BUILDING => {
                return Err(MempoolError::NotPopulated {
                    name: name.to_string(),
                    populated: h.populated,
                    n: h.n,
                })
            }
            _ => return Err(not_found()),
        }
        if h.version != LAYOUT_VERSION || h.self_va != hdr.as_ptr() as u64 {
            return Err(MempoolError::Corrupt {
                name: name.to_string(),
                why: format!(
                    "layout version {} at {:#x} (this build reads {LAYOUT_VERSION}; header says it lives at {:#x})",
                    h.version,
                    hdr.as_ptr() as usize,
                    h.self_va
                ),
            });
        }
        if h.local_chunks != 0 && h.creator_pid != std::process::id() {
            return Err(MempoolError::ProcessLocal {
                name: name.to_string(),
                chunks: h.local_chunks.count_ones(),
                creator: h.creator_pid,
            });
        }
        let hname = name_str(&h.handler);
        let handler: Arc<dyn Handler> = find_handler(&hname)?;
        let backend = handler.attach(
            mem,
            &BackendParams {
                name: name.to_string(),
                n: h.n,
                socket: h.socket,
                flags: h.flags,
                obj_size: ObjSize {
                    header_size: h.header_size,
                    elt_size: h.elt_size,
                    trailer_size: h.trailer_size,
                    total_size: h.total_size,
                },
                layout: Packing::of(h).layout(),
            },
        )?;
        let reg = RegistryRef::open(mem)?;
        Ok(Self::from_parts(mem, zone, hdr, backend, reg, hname))
    }

    fn from_parts(
        mem: &'m Memory,
        zone: Memzone<'m>,
        hdr: NonNull<PoolHeader>,
        backend: Box<dyn Backend + 'm>,
        reg: RegistryRef,
        handler: String,
    ) -> Self {
        // SAFETY: initialised header (creator, or published).
        let h = unsafe { hdr.as_ref() };
        reg.hold();
        let mut ranges: Vec<(usize, usize, u32)> = h.chunks[..h.nb_chunks as usize]
            .iter()
            .map(|c| (c.va as usize, (c.va + c.len) as usize, c.first))
            .collect();
        ranges.sort_unstable_by_key(|r| r.0);
        let (gran_base, gran) = granules(&ranges);
        let name = name_str(&h.name);
        let (obj_lo, obj_span) = object_span(mem, &name, h, &ranges);
        // Built-in ring handlers: a second handle on the same shared ring
        // for direct calls; without it (cannot happen unless the ring zone
        // is gone) the backend is used through the trait.
        let (full_base, full) = full_granules(&ranges, h.header_size as usize);
        let ring = if is_builtin_ring(&handler) {
            pool_ring(mem, &name).ok()
        } else {
            None
        };
        Self {
            ring,
            span_check: SpanCheck::new(obj_lo, obj_span),
            full_base,
            full,
            mem,
            name,
            handler,
            n: h.n,
            header_size: h.header_size as usize,
            total_size: h.total_size as usize,
            cache_size: h.cache_size,
            cache_cap: h.cache_cap,
            flush_thresh: h.cache_size * 3 / 2,
            total_recip: u64::MAX / u64::from(h.total_size.max(2)) + 1,
            cache_base: hdr.as_ptr() as usize + h.cache_off as usize,
            cache_stride: h.cache_stride as usize,
            ranges,
            gran_base,
            gran,
            zone,
            hdr,
            backend,
            reg,
        }
    }

    fn header(&self) -> &PoolHeader {
        // SAFETY: the header zone is mapped while `self.mem` lives.
        unsafe { self.hdr.as_ref() }
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handler name.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// Objects in the pool.
    pub fn size(&self) -> u32 {
        self.n
    }

    /// Per-lcore cache size.
    pub fn cache_size(&self) -> u32 {
        self.cache_size
    }

    /// Flags.
    pub fn flags(&self) -> MempoolFlags {
        MempoolFlags::from_bits(self.header().flags).unwrap_or_default()
    }

    /// Object sizes.
    pub fn obj_size(&self) -> ObjSize {
        let h = self.header();
        ObjSize {
            header_size: h.header_size,
            elt_size: h.elt_size,
            trailer_size: h.trailer_size,
            total_size: h.total_size,
        }
    }

    /// Element size as asked at creation.
    #[allow(clippy::misnamed_getters)]
    pub fn elt_size(&self) -> u32 {
        self.header().elt_size_req
    }

    /// Address of the pool header (same in every process): what object
    /// headers point at.
    pub fn addr(&self) -> usize {
        self.hdr.as_ptr() as usize
    }

    /// The instance.
    pub fn memory(&self) -> &'m Memory {
        self.mem
    }

    /// The private area (`private_size` bytes rounded up to 64), shared by
    /// every process (DPDK's `rte_mempool_get_priv`).
    pub fn private_area(&self) -> (*mut u8, usize) {
        let h = self.header();
        (
            (self.addr() + h.priv_off as usize) as *mut u8,
            h.private_size as usize,
        )
    }

    /// The object zones, in population order.
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        let h = self.header();
        h.chunks[..h.nb_chunks as usize]
            .iter()
            .map(|c| ChunkInfo {
                va: c.va as usize,
                iova: c.iova,
                len: c.len as usize,
                first: c.first,
                count: c.count,
            })
            .collect()
    }

    /// Every object's element, in population order (DPDK's
    /// `rte_mempool_obj_iter`).
    pub fn objects(&self) -> impl Iterator<Item = *mut u8> + '_ {
        let (hs, pack) = (self.header_size, self.packing());
        self.chunks()
            .into_iter()
            .flat_map(move |c| (0..c.count).map(move |i| (c.va + pack.offset(i) + hs) as *mut u8))
    }

    /// Where objects lie in a chunk (back to back, or in the handler's
    /// blocks).
    fn packing(&self) -> Packing {
        Packing::of(self.header())
    }

    /// IOVA of an object's element (`BAD_IOVA` when unknown); `None` for a
    /// pointer that is not an object of this pool.
    pub fn virt2iova(&self, obj: *const u8) -> Option<u64> {
        self.index_of(obj as usize)?;
        // SAFETY: an object of this pool: its header precedes it.
        Some(unsafe { (*self.obj_header(obj as usize)).iova })
    }

    /// Index of an object in population order, `None` if `obj` is not an
    /// object of this pool.
    pub fn index_of(&self, addr: usize) -> Option<u32> {
        let pack = self.packing();
        self.ranges.iter().find_map(|&(s, e, first)| {
            if addr < s + self.header_size || addr >= e {
                return None;
            }
            pack.index(addr - s - self.header_size).map(|i| first + i)
        })
    }

    /// Binary search: `ranges` is sorted by start, so the last chunk
    /// starting at or below `a` is the only candidate.
    fn in_ranges(&self, a: usize) -> bool {
        let i = self.ranges.partition_point(|r| r.0 <= a);
        i > 0 && {
            let (start, end, _) = self.ranges[i - 1];
            a >= start + self.header_size && a < end
        }
    }

    #[inline(always)]
    fn obj_header(&self, addr: usize) -> *const ObjHeader {
        (addr - self.header_size) as *const ObjHeader
    }

    /// Checks that `p` is an object of this pool: inside one of its chunks
    /// (debug builds: also on an object boundary, with a header naming this
    /// pool).
    #[inline(always)]
    fn check_obj(&self, p: *mut u8) -> Result<(), MempoolError> {
        let a = p as usize;
        let g = a.wrapping_sub(self.gran_base) >> GRAN_SHIFT;
        let inside = match self.gran.get(g) {
            Some(0) => false,
            Some(&k) if k != GRAN_MANY => {
                let (start, end, _) = self.ranges[k as usize - 1];
                a >= start + self.header_size && a < end
            }
            None if !self.gran.is_empty() => false,
            _ => self.in_ranges(a),
        };
        if !inside {
            return Err(self.foreign(a));
        }
        // Debug builds also read the object's header (its pool address)
        // and check the object boundary. Release builds stop at the chunk
        // check, which already refuses every pointer that is not in this
        // pool's memory: reading one header line per object halved the
        // rate of 32-object puts through a cache.
        if cfg!(debug_assertions)
            // SAFETY: inside a chunk of ours, past a header's length: readable.
            && (unsafe { (*self.obj_header(a)).pool } != self.addr() as u64
                || self.index_of(a).is_none())
        {
            return Err(self.foreign(a));
        }
        Ok(())
    }

    /// The error for the first pointer of `objs` outside the pool.
    #[cold]
    #[inline(never)]
    fn first_foreign(&self, objs: &[*mut u8]) -> MempoolError {
        let a = objs
            .iter()
            .map(|&p| p as usize)
            .find(|a| a.wrapping_sub(self.span_check.lo) >= self.span_check.span)
            .unwrap_or(0);
        self.foreign(a)
    }

    /// Backend enqueue: the ring directly for built-in ring handlers.
    #[inline(always)]
    fn b_enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        match &self.ring {
            Some(r) => ring_enqueue(r, &self.name, objs),
            None => self.backend.enqueue(objs),
        }
    }

    /// Backend dequeue: the ring directly for built-in ring handlers.
    #[inline(always)]
    fn b_dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        match &self.ring {
            Some(r) => ring_dequeue(r, &self.name, out),
            None => self.backend.dequeue(out),
        }
    }

    #[cold]
    fn foreign(&self, a: usize) -> MempoolError {
        // Name the owner when `a` is an object of another pool of the
        // instance.
        let owner = mempool_names(self.mem).into_iter().find_map(|n| {
            let p = Mempool::lookup(self.mem, &n).ok()?;
            p.index_of(a).map(|_| n)
        });
        MempoolError::ForeignObject {
            addr: a,
            pool: self.name.clone(),
            owner,
        }
    }

    #[inline(always)]
    fn check_put(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        if self.span_check.span != 0 {
            // One zone: branch-free, no early exit (the rare failure is
            // sorted out below).
            if !self.span_check.all_in(objs) {
                return Err(self.first_foreign(objs));
            }
            if cfg!(debug_assertions) {
                for &p in objs {
                    self.check_obj(p)?;
                }
            }
        } else {
            let (base, table) = (self.full_base, &*self.full);
            let last = table.len() - 1;
            // Whole granule inside a zone's objects: 1; else 0.
            let whole = |p: *mut u8| {
                let g = (p as usize).wrapping_sub(base) >> FULL_SHIFT;
                // SAFETY: g.min(last) < table.len().
                unsafe { *table.get_unchecked(g.min(last)) }
            };
            let mut quads = objs.chunks_exact(4);
            for q in &mut quads {
                if whole(q[0]) & whole(q[1]) & whole(q[2]) & whole(q[3]) == 0
                    || cfg!(debug_assertions)
                {
                    // Near a zone's edge, or not ours: the exact check
                    // (a few objects per zone only).
                    for &p in q {
                        self.check_obj(p)?;
                    }
                }
            }
            for &p in quads.remainder() {
                if whole(p) == 0 || cfg!(debug_assertions) {
                    self.check_obj(p)?;
                }
            }
        }
        if cfg!(debug_assertions) {
            for (i, &p) in objs.iter().enumerate() {
                // SAFETY: checked above to be our object.
                let c = unsafe { &(*self.obj_header(p as usize)).cookie };
                let dup = objs[..i].contains(&p);
                if dup
                    || c.compare_exchange(
                        COOKIE_IN_USE,
                        COOKIE_IN_POOL,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    // Undo the ones marked so far: nothing is returned.
                    for &q in &objs[..i] {
                        // SAFETY: as above.
                        unsafe { &(*self.obj_header(q as usize)).cookie }
                            .store(COOKIE_IN_USE, Ordering::Relaxed);
                    }
                    return Err(MempoolError::DoublePut {
                        addr: p as usize,
                        pool: self.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn mark_out(&self, objs: &[*mut u8]) {
        if cfg!(debug_assertions) {
            for &p in objs {
                // SAFETY: objects come from our backend or caches.
                let c = unsafe { &(*self.obj_header(p as usize)).cookie };
                if c.swap(COOKIE_IN_USE, Ordering::AcqRel) != COOKIE_IN_POOL {
                    tracing::error!(pool = self.name, obj = ?p, "object handed out had a bad cookie (double put or overwritten header)");
                }
            }
        }
    }

    #[inline(always)]
    fn slot(&self, id: u32) -> (&CacheSlot, *mut *mut u8) {
        let base = self.cache_base + id as usize * self.cache_stride;
        // SAFETY: id < MAX_LCORES and caches exist (cache_size > 0), so the
        // slot lies in the header zone.
        (
            unsafe { &*(base as *const CacheSlot) },
            (base + 64) as *mut *mut u8,
        )
    }

    /// Takes exactly `out.len()` objects, or none (DPDK's
    /// `rte_mempool_get_bulk`): through the calling thread's cache when it
    /// has an lcore id ([`register_thread`](crate::register_thread)) and
    /// the pool has caches. Fails with [`MempoolError::NotEnough`] even if
    /// other lcores' caches hold objects.
    #[inline(always)]
    pub fn get_bulk(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        if self.get_cached_fast(out) {
            return Ok(());
        }
        if self.cache_size == 0 && !cfg!(debug_assertions) {
            let done = match <&mut [*mut u8; 1]>::try_from(&mut *out) {
                Ok(one) => self.try_get_uncached_one(one),
                Err(_) => self.try_get_uncached(out),
            };
            if done {
                return Ok(());
            }
            return self.get_uncached_general(out);
        }
        self.get_impl(out, None)
    }

    /// Get from a pool without caches, fast case only: the handle-less
    /// ring call when the handler is a built-in `Multi` ring and both
    /// run-time switches (leak tracking, statistics) are off: one load and
    /// compare of the header's switch word (all DPDK's
    /// `rte_mempool_get_bulk` does here). `false`: nothing taken, take
    /// the general path. Small and out of line, returning a `bool` with
    /// its ring call's slow parts in tail position: nothing is live after
    /// a call, so it saves no registers (a `Result` return kept the
    /// caller's result pointer and arguments live, and five pushes).
    #[inline(never)]
    fn try_get_uncached(&self, out: &mut [*mut u8]) -> bool {
        self.uncached_get_body(out)
    }

    /// [`try_get_uncached`](Self::try_get_uncached) for one object: the
    /// count is a constant in here, so the ring call has no size dispatch
    /// and needs fewer registers.
    #[inline(never)]
    fn try_get_uncached_one(&self, out: &mut [*mut u8; 1]) -> bool {
        self.uncached_get_body(out)
    }

    /// The body of both `try_get_uncached*` copies.
    #[inline(always)]
    fn uncached_get_body(&self, out: &mut [*mut u8]) -> bool {
        match &self.ring {
            Some(r) => {
                self.header().slow.load(Ordering::Relaxed) == 0
                    && r.dequeue_bulk_multi(as_words_mut(out))
            }
            None => false,
        }
    }

    #[inline(never)]
    fn get_uncached_general(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        let r = self.b_dequeue(out);
        if self.header().slow.load(Ordering::Relaxed) != 0 {
            let taken = r.is_ok().then_some(out.len() as u32);
            self.note_get(out, taken, None, None);
        }
        r
    }

    /// Put into a pool without caches, fast case only: the handle-less
    /// ring call when the objects are surely ours, the handler is a
    /// built-in `Multi` ring and both switches are off. `false`: nothing
    /// put, take the general path (the exact checks and their errors).
    /// Out of line and returning a `bool`, as
    /// [`try_get_uncached`](Self::try_get_uncached).
    #[inline(never)]
    fn try_put_uncached(&self, objs: &[*mut u8]) -> bool {
        self.uncached_put_body(objs)
    }

    /// [`try_put_uncached`](Self::try_put_uncached) for one object, as
    /// [`try_get_uncached_one`](Self::try_get_uncached_one).
    #[inline(never)]
    fn try_put_uncached_one(&self, obj: *mut u8) -> bool {
        self.uncached_put_body(&[obj])
    }

    /// The body of both `try_put_uncached*` copies.
    #[inline(always)]
    fn uncached_put_body(&self, objs: &[*mut u8]) -> bool {
        match &self.ring {
            Some(r) => {
                self.surely_ours(objs)
                    && self.header().slow.load(Ordering::Relaxed) == 0
                    && r.enqueue_bulk_multi(as_words(objs))
            }
            None => false,
        }
    }

    #[inline(never)]
    fn put_uncached_general(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.check_put(objs)?;
        if self.header().slow.load(Ordering::Relaxed) != 0 {
            return self.put_noted(None, objs);
        }
        self.b_enqueue(objs)
    }

    /// The hot get: `out.len()` objects straight from the calling
    /// thread's lcore cache when it holds them and leak tracking is off.
    /// `false`: nothing done, take the general path. Kept tiny so it
    /// inlines into the caller with no error plumbing.
    #[inline(always)]
    fn get_cached_fast(&self, out: &mut [*mut u8]) -> bool {
        // Debug builds mark cookies: always the general path.
        if self.cache_size == 0 || cfg!(debug_assertions) {
            return false;
        }
        let Some(id) = self.reg.current() else {
            return false;
        };
        let (slot, objs) = self.slot(id);
        let len = slot.len.load(Ordering::Relaxed);
        // The floor is 0 unless leak tracking closed the hot path.
        if out.len() + slot.get_floor.load(Ordering::Relaxed) as usize > len as usize {
            return false;
        }
        let len = len - out.len() as u32;
        // SAFETY: [len, len + out.len()) are cached objects of our lcore.
        unsafe { copy_ptrs(objs.add(len as usize), out.as_mut_ptr(), out.len()) };
        slot.len.store(len, Ordering::Relaxed);
        true
    }

    /// Whether every pointer of `objs` is surely an object of this pool
    /// (one zone: inside it; several: in a table granule wholly inside a
    /// zone's objects). `false` may still be all ours: the exact check
    /// decides then.
    #[inline(always)]
    fn surely_ours(&self, objs: &[*mut u8]) -> bool {
        if self.span_check.span != 0 {
            self.span_check.all_in(objs)
        } else {
            let (base, table) = (self.full_base, &*self.full);
            let last = table.len() - 1;
            let mut all = 1u8;
            for &p in objs {
                let g = (p as usize).wrapping_sub(base) >> FULL_SHIFT;
                // SAFETY: g.min(last) < table.len().
                all &= unsafe { *table.get_unchecked(g.min(last)) };
            }
            all != 0
        }
    }

    /// The hot put: into the calling thread's lcore cache when the
    /// objects are surely ours, they fit under the flush threshold and
    /// leak tracking is off. `false`: nothing done, take the general path.
    #[inline(always)]
    fn put_cached_fast(&self, objs: &[*mut u8]) -> bool {
        if self.cache_size == 0 || cfg!(debug_assertions) || !self.surely_ours(objs) {
            return false;
        }
        let Some(id) = self.reg.current() else {
            return false;
        };
        let (slot, cobjs) = self.slot(id);
        let len = slot.len.load(Ordering::Relaxed);
        // The limit is the flush threshold, 0 while leak tracking is on.
        if len as usize + objs.len() > slot.put_limit.load(Ordering::Relaxed) as usize {
            return false;
        }
        // SAFETY: len + objs.len() <= flush threshold < capacity.
        unsafe { copy_ptrs(objs.as_ptr(), cobjs.add(len as usize), objs.len()) };
        slot.len.store(len + objs.len() as u32, Ordering::Relaxed);
        true
    }

    /// [`get_bulk`](Self::get_bulk), recording `tag` instead of the
    /// thread's caller tag ([`set_caller_tag`](crate::set_caller_tag))
    /// as the objects' owner tag while leak tracking is on.
    #[inline]
    pub fn get_bulk_tagged(&self, out: &mut [*mut u8], tag: u64) -> Result<(), MempoolError> {
        self.get_impl(out, Some(tag))
    }

    /// The general get (refills, no cache, no lcore id, leak tracking,
    /// debug checks): out of line, so the hot path stays small.
    #[inline(never)]
    fn get_impl(&self, out: &mut [*mut u8], tag: Option<u64>) -> Result<(), MempoolError> {
        if out.is_empty() {
            return Ok(());
        }
        if self.cache_size != 0 {
            if let Some(id) = self.reg.current() {
                let (slot, objs) = self.slot(id);
                let mut len = slot.len.load(Ordering::Relaxed);
                let r = self.cache_get(objs, &mut len, self.cache_size, out);
                slot.len.store(len, Ordering::Relaxed);
                // The switches sit in the line `len` is in.
                if slot.slow.load(Ordering::Relaxed) != 0 {
                    self.note_get(out, r.as_ref().ok().copied(), tag, Some(id));
                }
                return r.map(drop);
            }
        }
        let r = self.b_dequeue(out);
        if r.is_ok() {
            self.mark_out(out);
        }
        if self.header().slow.load(Ordering::Relaxed) != 0 {
            let taken = r.is_ok().then_some(out.len() as u32);
            self.note_get(out, taken, tag, None);
        }
        r
    }

    /// A get's bookkeeping while a switch is on: records the owners
    /// (leak tracking; after a successful get) and counts (statistics).
    /// `taken`: `None` when the get failed, else the objects it took from
    /// the backend (0: none); `lcore` is the calling thread's lcore id
    /// when known (else looked up).
    #[cold]
    #[inline(never)]
    fn note_get(&self, out: &[*mut u8], taken: Option<u32>, tag: Option<u64>, lcore: Option<u32>) {
        let slow = self.header().slow.load(Ordering::Relaxed);
        if slow & SLOW_LEAK != 0 && taken.is_some() {
            self.record_get(out, tag, lcore);
        }
        if slow & SLOW_STATS != 0 && !out.is_empty() {
            let d = Delta::get(out.len(), taken.is_some(), taken.unwrap_or(0));
            self.count(lcore, &d);
        }
    }

    /// A put of checked objects while a switch is on: clears the owner
    /// records (leak tracking) before the objects go back, counts
    /// (statistics) after. `cached`: the calling thread's lcore id when
    /// the objects go through its cache; else to the backend.
    #[cold]
    #[inline(never)]
    fn put_noted(&self, cached: Option<u32>, objs: &[*mut u8]) -> Result<(), MempoolError> {
        let slow = self.header().slow.load(Ordering::Relaxed);
        if slow & SLOW_LEAK != 0 {
            self.record_put(objs);
        }
        let r = match cached {
            Some(id) => {
                let (slot, cobjs) = self.slot(id);
                let mut len = slot.len.load(Ordering::Relaxed);
                let r = self.cache_put(cobjs, &mut len, self.cache_size, objs);
                slot.len.store(len, Ordering::Relaxed);
                r
            }
            None => self.b_enqueue(objs).map(|()| objs.len() as u32),
        };
        if slow & SLOW_STATS != 0 && !objs.is_empty() {
            if let Ok(backend) = r {
                self.count(cached, &Delta::put(objs.len(), backend));
            }
        }
        r.map(drop)
    }

    /// One object.
    #[inline]
    pub fn get(&self) -> Result<*mut u8, MempoolError> {
        let mut o = [std::ptr::null_mut(); 1];
        self.get_bulk(&mut o)?;
        Ok(o[0])
    }

    /// Returns objects (DPDK's `rte_mempool_put_bulk`); through the
    /// calling thread's cache when it has one. A pointer outside this
    /// pool's object zones fails the whole call with
    /// [`MempoolError::ForeignObject`] (naming the pool it belongs to, from
    /// its header, when it is another pool's object). Debug builds also
    /// check the object boundary and the header's pool address, and refuse
    /// an object already in the pool ([`MempoolError::DoublePut`]).
    #[inline(always)]
    pub fn put_bulk(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        if self.put_cached_fast(objs) {
            return Ok(());
        }
        if self.cache_size == 0 && !cfg!(debug_assertions) {
            let done = match <&[*mut u8; 1]>::try_from(objs) {
                Ok(&[one]) => self.try_put_uncached_one(one),
                Err(_) => self.try_put_uncached(objs),
            };
            if done {
                return Ok(());
            }
            return self.put_uncached_general(objs);
        }
        self.put_slow(objs)
    }

    /// The general put (flushes, no cache, no lcore id, leak tracking,
    /// the exact membership check and its errors): out of line.
    #[inline(never)]
    fn put_slow(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        self.check_put(objs)?;
        // SAFETY: checked to be objects of this pool.
        unsafe { self.put_checked(objs) }
    }

    /// [`put_bulk`](Self::put_bulk) without the membership check (DPDK's
    /// put, which checks nothing): for callers that know their pointers
    /// came from this pool. Debug builds still check (and refuse double
    /// puts).
    ///
    /// # Safety
    /// Every pointer in `objs` is an object of this pool, handed out by a
    /// get and not put back since. A foreign pointer would later be handed
    /// out by a get as if it were an object of this pool.
    #[inline(always)]
    pub unsafe fn put_bulk_unchecked(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        if cfg!(debug_assertions) {
            return self.put_slow(objs);
        }
        // SAFETY: the caller's contract.
        unsafe { self.put_checked(objs) }
    }

    /// The put after the checks.
    ///
    /// # Safety
    /// `objs` are objects of this pool that are out.
    #[inline(always)]
    unsafe fn put_checked(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        if self.cache_size != 0 {
            if let Some(id) = self.reg.current() {
                let (slot, cobjs) = self.slot(id);
                // The switches sit in the line `len` is in.
                if slot.slow.load(Ordering::Relaxed) != 0 {
                    return self.put_noted(Some(id), objs);
                }
                let mut len = slot.len.load(Ordering::Relaxed);
                let r = self.cache_put(cobjs, &mut len, self.cache_size, objs);
                slot.len.store(len, Ordering::Relaxed);
                return r.map(drop);
            }
        }
        if self.header().slow.load(Ordering::Relaxed) != 0 {
            return self.put_noted(None, objs);
        }
        self.b_enqueue(objs)
    }

    /// One object.
    #[inline]
    pub fn put(&self, obj: *mut u8) -> Result<(), MempoolError> {
        self.put_bulk(&[obj])
    }

    /// Cache get: pop from the cache; when short, refill to `size + n -
    /// len` from the backend first; requests above `2 x size` go to the
    /// backend directly. Returns the objects taken from the backend (0:
    /// none), for statistics.
    #[inline(always)]
    fn cache_get(
        &self,
        objs: *mut *mut u8,
        len: &mut u32,
        size: u32,
        out: &mut [*mut u8],
    ) -> Result<u32, MempoolError> {
        let n = out.len() as u32;
        let mut backend = 0;
        if n > *len {
            if n > 2 * size {
                self.b_dequeue(out)?;
                self.mark_out(out);
                return Ok(n);
            }
            let need = n - *len;
            // SAFETY: len + size + need = size + n <= 3 x size = capacity.
            let fill = unsafe {
                std::slice::from_raw_parts_mut(objs.add(*len as usize), (size + need) as usize)
            };
            if self.b_dequeue(fill).is_ok() {
                *len += size + need;
                backend = size + need;
            } else {
                self.backend
                    .dequeue(&mut fill[..need as usize])
                    .map_err(|_| MempoolError::NotEnough {
                        requested: n,
                        available: *len + self.backend.count(),
                    })?;
                *len += need;
                backend = need;
            }
        }
        *len -= n;
        // SAFETY: [len, len + n) are cached objects.
        unsafe { copy_ptrs(objs.add(*len as usize), out.as_mut_ptr(), n as usize) };
        self.mark_out(out);
        Ok(backend)
    }

    /// Cache put: push; a cache over the flush threshold (1.5 x size) is
    /// flushed down to `size`; bulks above the threshold go to the backend
    /// directly. Returns the objects put into the backend (0: none), for
    /// statistics.
    #[inline(always)]
    fn cache_put(
        &self,
        objs: *mut *mut u8,
        len: &mut u32,
        size: u32,
        items: &[*mut u8],
    ) -> Result<u32, MempoolError> {
        let n = items.len() as u32;
        let thresh = size * 3 / 2;
        if n > thresh {
            return self.b_enqueue(items).map(|()| n);
        }
        // SAFETY: len <= thresh and n <= thresh, so len + n <= 3 x size.
        unsafe { copy_ptrs(items.as_ptr(), objs.add(*len as usize), n as usize) };
        *len += n;
        if *len > thresh {
            // SAFETY: [size, len) are cached objects.
            let extra = unsafe {
                std::slice::from_raw_parts(objs.add(size as usize), (*len - size) as usize)
            };
            self.b_enqueue(extra)?;
            *len = size;
            return Ok(extra.len() as u32);
        }
        Ok(0)
    }

    /// Puts the calling thread's cached objects back into the backend
    /// (DPDK's `rte_mempool_cache_flush(NULL, mp)`); a no-op without an
    /// lcore id or caches.
    pub fn cache_flush(&self) -> Result<(), MempoolError> {
        if self.cache_size == 0 {
            return Ok(());
        }
        let Some(id) = self.reg.current() else {
            return Ok(());
        };
        let (slot, objs) = self.slot(id);
        let len = slot.len.load(Ordering::Relaxed);
        self
            // SAFETY: [0, len) are cached objects, ours (our lcore id).
            .b_enqueue(unsafe { std::slice::from_raw_parts(objs, len as usize) })?;
        slot.len.store(0, Ordering::Relaxed);
        self.count_flush(Some(id), len);
        Ok(())
    }

    /// Counts a flush of `len` objects into the backend (statistics on,
    /// `len` not 0).
    #[inline]
    fn count_flush(&self, lcore: Option<u32>, len: u32) {
        if len != 0 && self.header().slow.load(Ordering::Relaxed) & SLOW_STATS != 0 {
            self.count(lcore, &Delta::default().backend_put(len));
        }
    }

    /// Objects in the calling thread's cache.
    pub fn cache_count(&self) -> u32 {
        if self.cache_size == 0 {
            return 0;
        }
        self.reg
            .current()
            .map_or(0, |id| self.slot(id).0.len.load(Ordering::Relaxed))
    }

    fn cache_counts(&self) -> Vec<(u32, u32)> {
        if self.cache_size == 0 {
            return Vec::new();
        }
        (0..MAX_LCORES as u32)
            .filter_map(|id| {
                let l = self.slot(id).0.len.load(Ordering::Relaxed);
                (l != 0).then_some((id, l))
            })
            .collect()
    }

    /// Objects available: backend plus every lcore cache, at most the pool
    /// size (DPDK's `rte_mempool_avail_count`). Exact when no get or put
    /// runs concurrently. Objects in user-owned caches count as in use.
    pub fn avail_count(&self) -> u32 {
        let cached: u32 = self.cache_counts().iter().map(|&(_, l)| l).sum();
        (self.backend.count() + cached).min(self.n)
    }

    /// Objects out: placed minus available.
    pub fn in_use_count(&self) -> u32 {
        self.populated().saturating_sub(self.avail_count())
    }

    /// Every object available.
    pub fn is_full(&self) -> bool {
        self.avail_count() == self.n
    }

    /// No object available.
    pub fn is_empty(&self) -> bool {
        self.avail_count() == 0
    }

    /// Takes objects through a user-owned cache (DPDK's
    /// `rte_mempool_generic_get` with a cache from
    /// `rte_mempool_cache_create`).
    #[inline(always)]
    pub fn get_bulk_with(
        &self,
        cache: &mut MempoolCache,
        out: &mut [*mut u8],
    ) -> Result<(), MempoolError> {
        // Hot: bound to this pool with tracking off (one compare: the key
        // is the pool's address + 1 while tracking is on), holds enough.
        if !cfg!(debug_assertions)
            && cache.pool as u64 == self.header().user_key.load(Ordering::Relaxed)
            && out.len() <= cache.len as usize
        {
            let len = cache.len - out.len() as u32;
            // SAFETY: [len, len + out.len()) are cached objects.
            unsafe {
                copy_ptrs(
                    cache.objs.as_ptr().add(len as usize),
                    out.as_mut_ptr(),
                    out.len(),
                );
            }
            cache.len = len;
            return Ok(());
        }
        let (r, bound, len) = self.get_with_slow(
            cache.pool,
            cache.len,
            cache.objs.as_mut_ptr(),
            cache.size,
            out,
        );
        cache.pool = bound;
        cache.len = len;
        r
    }

    #[inline(never)]
    fn get_with_slow(
        &self,
        bound: usize,
        len: u32,
        cobjs: *mut *mut u8,
        size: u32,
        out: &mut [*mut u8],
    ) -> (Result<(), MempoolError>, usize, u32) {
        // The cache's state comes by value and goes back by value: the
        // cache itself never reaches this out-of-line call, so the
        // compiler keeps its length in a register across a loop of hot
        // calls (as C does with type-based alias analysis).
        if let Err(e) = self.bind_check(bound, len, cobjs) {
            return (Err(e), bound, len);
        }
        if out.is_empty() {
            return (Ok(()), self.addr(), len);
        }
        let mut len = len;
        let r = self.cache_get(cobjs, &mut len, size, out);
        if self.header().slow.load(Ordering::Relaxed) != 0 {
            self.note_get(out, r.as_ref().ok().copied(), None, self.reg.current());
        }
        (r.map(drop), self.addr(), len)
    }

    /// Returns objects through a user-owned cache.
    #[inline(always)]
    pub fn put_bulk_with(
        &self,
        cache: &mut MempoolCache,
        objs: &[*mut u8],
    ) -> Result<(), MempoolError> {
        // Hot: bound to this pool with tracking off (see get_bulk_with),
        // fits under the flush threshold, surely ours.
        if !cfg!(debug_assertions)
            && cache.pool as u64 == self.header().user_key.load(Ordering::Relaxed)
            && cache.len as usize + objs.len() <= cache.thresh as usize
            && self.surely_ours(objs)
        {
            // SAFETY: len + objs.len() <= 1.5 x size < capacity (3 x size).
            unsafe {
                copy_ptrs(
                    objs.as_ptr(),
                    cache.objs.as_mut_ptr().add(cache.len as usize),
                    objs.len(),
                );
            }
            cache.len += objs.len() as u32;
            return Ok(());
        }
        let (r, bound, len) = self.put_with_slow(
            cache.pool,
            cache.len,
            cache.objs.as_mut_ptr(),
            cache.size,
            objs,
        );
        cache.pool = bound;
        cache.len = len;
        r
    }

    #[inline(never)]
    fn put_with_slow(
        &self,
        bound: usize,
        len: u32,
        cobjs: *mut *mut u8,
        size: u32,
        objs: &[*mut u8],
    ) -> (Result<(), MempoolError>, usize, u32) {
        // State by value, as in get_with_slow.
        if let Err(e) = self.bind_check(bound, len, cobjs) {
            return (Err(e), bound, len);
        }
        if let Err(e) = self.check_put(objs) {
            return (Err(e), self.addr(), len);
        }
        let slow = self.header().slow.load(Ordering::Relaxed);
        if slow & SLOW_LEAK != 0 {
            self.record_put(objs);
        }
        let mut len = len;
        let r = self.cache_put(cobjs, &mut len, size, objs);
        if slow & SLOW_STATS != 0 && !objs.is_empty() {
            if let Ok(backend) = r {
                self.count(None, &Delta::put(objs.len(), backend));
            }
        }
        (r.map(drop), self.addr(), len)
    }

    /// A user cache bound to pool `bound` (0: none yet) may be used with
    /// this pool: it is this pool's, or it holds nothing.
    fn bind_check(&self, bound: usize, len: u32, cobjs: *mut *mut u8) -> Result<(), MempoolError> {
        if bound == self.addr() || len == 0 {
            return Ok(());
        }
        Err(MempoolError::ForeignObject {
            // SAFETY: len > 0: the first slot holds an object.
            addr: unsafe { cobjs.read() } as usize,
            pool: self.name.clone(),
            owner: None,
        })
    }

    /// A snapshot for reports.
    pub fn info(&self) -> MempoolInfo {
        let h = self.header();
        let counts = self.cache_counts();
        let avail = self.avail_count();
        MempoolInfo {
            name: self.name.clone(),
            addr: self.addr(),
            flags: format!("{:?}", self.flags()),
            socket: h.socket,
            handler: self.handler.clone(),
            size: self.n,
            populated: h.populated,
            elt_size: h.elt_size_req,
            obj_size: self.obj_size(),
            block_layout: self.packing().layout(),
            contig_block_size: self.contig_block_size(),
            memory_bytes: self.zone.len() + self.chunks().iter().map(|c| c.len).sum::<usize>(),
            private_size: h.private_size,
            cache_size: self.cache_size,
            cache_counts: counts,
            common_pool_count: self.backend.count(),
            avail,
            in_use: h.populated.saturating_sub(avail),
            chunks: self.chunks(),
            leak_tracking: self.leak_tracking(),
            stats: self.stats_enabled().then(|| self.stats()),
        }
    }

    /// Writes a human-readable dump (DPDK's `rte_mempool_dump`): with the
    /// statistics (totals as DPDK prints them, then one line per lcore)
    /// while they are on.
    pub fn dump(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let i = self.info();
        let mut s = String::new();
        let _ = writeln!(s, "mempool <{}>@{:#x}", i.name, i.addr);
        let _ = writeln!(s, "  flags={}", i.flags);
        let _ = writeln!(s, "  socket_id={}", i.socket);
        let _ = writeln!(s, "  handler={}", i.handler);
        let _ = writeln!(s, "  nb_mem_chunks={}", i.chunks.len());
        let _ = writeln!(s, "  size={}", i.size);
        let _ = writeln!(s, "  populated_size={}", i.populated);
        let _ = writeln!(s, "  header_size={}", i.obj_size.header_size);
        let _ = writeln!(s, "  elt_size={}", i.obj_size.elt_size);
        let _ = writeln!(s, "  trailer_size={}", i.obj_size.trailer_size);
        let _ = writeln!(s, "  total_obj_size={}", i.obj_size.total_size);
        if let Some(l) = &i.block_layout {
            let _ = writeln!(
                s,
                "  block_size={} block_header={} objs_per_block={}",
                l.block_size, l.header, l.objs_per_block
            );
        }
        if let Some(c) = i.contig_block_size {
            let _ = writeln!(s, "  contig_block_size={c}");
        }
        let _ = writeln!(s, "  private_data_size={}", i.private_size);
        for c in &i.chunks {
            let _ = writeln!(
                s,
                "  chunk va={:#x} iova={:#x} len={} objs={}",
                c.va, c.iova, c.len, c.count
            );
        }
        let bytes: usize = i.chunks.iter().map(|c| c.len).sum();
        let _ = writeln!(
            s,
            "  avg bytes/object={:.3}",
            bytes as f64 / f64::from(i.populated.max(1))
        );
        let _ = writeln!(s, "  cache_size={}", i.cache_size);
        for (id, l) in &i.cache_counts {
            let _ = writeln!(s, "    cache_count[{id}]={l}");
        }
        let _ = writeln!(s, "  common_pool_count={}", i.common_pool_count);
        let _ = writeln!(s, "  avail={} in_use={}", i.avail, i.in_use);
        match &i.stats {
            Some(st) => {
                let _ = write!(s, "{st}");
            }
            None => s.push_str("  stats: off\n"),
        }
        out.write_all(s.as_bytes())
    }

    /// The dump as JSON ([`MempoolInfo`]; `stats` while they are on).
    pub fn dump_json(&self) -> serde_json::Value {
        serde_json::to_value(self.info()).unwrap_or(serde_json::Value::Null)
    }

    /// Checks the pool (DPDK's `rte_mempool_audit`, stricter): every
    /// object in the backend and the lcore caches is an object of this
    /// pool, seen once (a double put shows as a duplicate), with an intact
    /// header and cookie; debug builds also check that objects out are
    /// marked out; the backend checks its own structures first (the
    /// `bucket` handler: its lists, counts and index stacks). Takes the
    /// backend's objects out and puts them back, so
    /// the pool must be quiescent (no get or put anywhere).
    pub fn audit(&self) -> Result<AuditReport, MempoolError> {
        self.backend.check()?;
        let count = self.backend.count();
        let mut held: Vec<*mut u8> = vec![std::ptr::null_mut(); count as usize];
        for part in held.chunks_mut(4096) {
            self.b_dequeue(part)?;
        }
        let r = self.audit_with(&held);
        for part in held.chunks(4096) {
            self.b_enqueue(part)?;
        }
        r
    }

    fn audit_with(&self, backend: &[*mut u8]) -> Result<AuditReport, MempoolError> {
        let corrupt = |why: String| MempoolError::Corrupt {
            name: self.name.clone(),
            why,
        };
        let mut seen = vec![false; self.n as usize];
        let mut cached = Vec::new();
        if self.cache_size != 0 {
            for id in 0..MAX_LCORES as u32 {
                let (slot, objs) = self.slot(id);
                let l = slot.len.load(Ordering::Relaxed);
                if l > self.cache_cap {
                    return Err(corrupt(format!(
                        "lcore {id}'s cache holds {l} > {}",
                        self.cache_cap
                    )));
                }
                // SAFETY: [0, l) are slots of the cache.
                cached.extend_from_slice(unsafe { std::slice::from_raw_parts(objs, l as usize) });
            }
        }
        for (&p, where_) in backend
            .iter()
            .map(|p| (p, "backend"))
            .chain(cached.iter().map(|p| (p, "cache")))
        {
            let a = p as usize;
            let idx = self
                .index_of(a)
                .ok_or_else(|| corrupt(format!("{a:#x} in the {where_} is not an object")))?;
            if std::mem::replace(&mut seen[idx as usize], true) {
                return Err(corrupt(format!(
                    "object {idx} ({a:#x}) is in the pool twice (put back twice?)"
                )));
            }
            // SAFETY: an object of ours.
            let h = unsafe { &*self.obj_header(a) };
            if h.pool != self.addr() as u64 {
                return Err(corrupt(format!(
                    "object {idx}'s header names pool {:#x}",
                    h.pool
                )));
            }
            let c = h.cookie.load(Ordering::Relaxed);
            if c != COOKIE_IN_POOL && !(cfg!(not(debug_assertions)) && c == COOKIE_IN_USE) {
                return Err(corrupt(format!(
                    "object {idx} in the {where_} has cookie {c:#x}"
                )));
            }
        }
        let in_pool = backend.len() + cached.len();
        if cfg!(debug_assertions) {
            for (idx, p) in self.objects().enumerate() {
                if !seen[idx] {
                    // SAFETY: an object of ours.
                    let c =
                        unsafe { &(*self.obj_header(p as usize)).cookie }.load(Ordering::Relaxed);
                    if c != COOKIE_IN_USE {
                        return Err(corrupt(format!(
                            "object {idx} is out but has cookie {c:#x}"
                        )));
                    }
                }
            }
        }
        Ok(AuditReport {
            in_backend: backend.len() as u32,
            in_caches: cached.len() as u32,
            out: self.n - in_pool as u32,
        })
    }

    /// Frees the pool: backend, object zones, header zone. Refused with
    /// [`MempoolError::InUse`] while objects are out (the calling thread's
    /// cache is flushed first); the pool is then left as it was (look it
    /// up again to keep using it) and no event fires. Other handles to the
    /// pool, in any thread or process, must not be used afterwards. Fires
    /// [`MempoolEvent::Destroy`] in this process once the free goes ahead,
    /// before any memory is released (see [`crate::events`]).
    pub fn free(self) -> Result<(), MempoolError> {
        self.cache_flush()?;
        let in_use = self.in_use_count();
        if in_use != 0 {
            return Err(MempoolError::InUse {
                name: self.name.clone(),
                in_use,
                n: self.n,
            });
        }
        self.teardown(true)
    }

    /// Frees the pool even with objects out (they become dangling). Fires
    /// [`MempoolEvent::Destroy`] first, as [`free`](Self::free).
    pub fn free_forced(self) -> Result<(), MempoolError> {
        self.teardown(true)
    }

    /// Unpublishes the pool, fires `Destroy` if `event` (the pool's memory
    /// still mapped), then releases everything.
    fn teardown(self, event: bool) -> Result<(), MempoolError> {
        self.header().magic.store(0, Ordering::Release);
        if event {
            crate::events::fire(MempoolEvent::Destroy, &self);
        }
        let h = self.header();
        let nb = h.nb_chunks as usize;
        let (zones, anon) = (h.zone_chunks, h.anon_chunks);
        let anon_maps: Vec<(usize, usize)> = (0..nb)
            .filter(|k| anon & (1 << k) != 0)
            .map(|k| (h.chunks[k].va as usize, h.chunks[k].len as usize))
            .collect();
        // The leak table, only if this pool published it (a zone of that
        // name that is not ours stays).
        let leak_table = h.leak_table.load(Ordering::Acquire) as usize;
        let stats_table = h.stats_table.load(Ordering::Acquire) as usize;
        let mut this = std::mem::ManuallyDrop::new(self);
        this.reg.release();
        // SAFETY: each field is moved out exactly once and `this` is never
        // used or dropped afterwards.
        let (backend, zone, name, mem) = unsafe {
            (
                std::ptr::read(&raw const this.backend),
                std::ptr::read(&raw const this.zone),
                std::ptr::read(&raw const this.name),
                this.mem,
            )
        };
        // SAFETY: as above: the remaining owned fields are dropped here.
        unsafe {
            std::ptr::drop_in_place(&raw mut this.handler);
            std::ptr::drop_in_place(&raw mut this.ranges);
            std::ptr::drop_in_place(&raw mut this.gran);
            std::ptr::drop_in_place(&raw mut this.full);
            std::ptr::drop_in_place(&raw mut this.ring);
        }
        let mut first_err = backend.destroy().err();
        // The side tables, only those this pool published (a zone of that
        // name that is not ours stays).
        for (prefix, table) in [
            (LEAK_ZONE_PREFIX, leak_table),
            (STATS_ZONE_PREFIX, stats_table),
        ] {
            if let Some(z) = mem
                .memzone_lookup(&format!("{prefix}{name}"))
                .filter(|z| table != 0 && z.as_ptr() as usize == table)
            {
                if let Err(e) = z.free() {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        for k in (0..nb).filter(|k| zones & (1 << k) != 0) {
            if let Some(z) = mem.memzone_lookup(&chunk_zone_name(&name, k)) {
                if let Err(e) = z.free() {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        for (va, len) in anon_maps {
            // SAFETY: the pool's own anonymous mapping (populate_anon);
            // its objects dangle from here on, as documented.
            if let Err(e) = unsafe { rustix::mm::munmap(va as *mut std::ffi::c_void, len) } {
                tracing::warn!(name, va, len, error = %e, "munmap of a populate_anon chunk failed");
            }
        }
        if let Err(e) = zone.free() {
            first_err.get_or_insert(e.into());
        }
        tracing::debug!(name, "mempool freed");
        first_err.map_or(Ok(()), Err)
    }
}

/// Leak tracking (see [`crate::leak`]).
impl Mempool<'_> {
    /// Switches leak tracking on or off for every handle of the pool, in
    /// every process. On: creates the owner table (zone `MT_<name>`) the
    /// first time, and clears it when tracking was off (objects already
    /// out stay unrecorded; reports count them as untracked). Off: gets
    /// and puts stop recording; the records stay readable.
    pub fn set_leak_tracking(&self, on: bool) -> Result<(), MempoolError> {
        let h = self.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != POOL_MAGIC && magic != POOL_MAGIC_BUILDING {
            return Err(MempoolError::Gone {
                name: self.name.clone(),
            });
        }
        if on && h.slow.load(Ordering::Acquire) & SLOW_LEAK == 0 {
            let head = self.leak_table_create()?;
            // SAFETY: the table holds `n` records after its head.
            let recs = unsafe { self.leak_records(head) };
            for r in recs {
                r.seq.store(0, Ordering::Relaxed);
            }
        }
        self.set_switch(SLOW_LEAK, on);
        tracing::debug!(pool = self.name, on, "leak tracking switched");
        Ok(())
    }

    /// Whether leak tracking is on.
    pub fn leak_tracking(&self) -> bool {
        self.header().slow.load(Ordering::Acquire) & SLOW_LEAK != 0
    }

    /// Sets (`on`) or clears switch `bit` of the header's switch word and
    /// brings its copies in line ([`sync_switches`](Self::sync_switches)).
    fn set_switch(&self, bit: u32, on: bool) {
        let h = self.header();
        if on {
            h.slow.fetch_or(bit, Ordering::SeqCst);
        } else {
            h.slow.fetch_and(!bit, Ordering::SeqCst);
        }
        self.sync_switches();
    }

    /// Brings the copies of the header's switch word in line with it:
    /// each lcore cache's mirror and gates (closed while either switch is
    /// on, so every get and put takes the general path, which records and
    /// counts; open while both are off) and the user-owned caches' key
    /// (the pool's address, + 1 while either switch is on). Switching one
    /// switch off thus leaves the hot paths closed while the other is on.
    ///
    /// Repeats until the word did not change meanwhile: when two threads
    /// or processes switch at once, the copies written last match the
    /// final word (every access here is `SeqCst`, so a switcher that read
    /// the word unchanged after writing wrote its copies before any later
    /// switcher wrote its own).
    fn sync_switches(&self) {
        let h = self.header();
        loop {
            let word = h.slow.load(Ordering::SeqCst);
            let closed = word != 0;
            h.user_key
                .store(self.addr() as u64 + u64::from(closed), Ordering::SeqCst);
            if self.cache_size != 0 {
                let (limit, floor) = if closed {
                    (0, GET_FLOOR_CLOSED)
                } else {
                    (self.flush_thresh, 0)
                };
                for id in 0..MAX_LCORES as u32 {
                    let slot = self.slot(id).0;
                    slot.slow.store(word, Ordering::SeqCst);
                    slot.put_limit.store(limit, Ordering::SeqCst);
                    slot.get_floor.store(floor, Ordering::SeqCst);
                }
            }
            if h.slow.load(Ordering::SeqCst) == word {
                break;
            }
        }
    }

    /// The owner table, created (or found, when another process created
    /// it) and published in the header.
    fn leak_table_create(&self) -> Result<&LeakHead, MempoolError> {
        let h = self.header();
        let zname = format!("{LEAK_ZONE_PREFIX}{}", self.name);
        let bytes = table_bytes(self.n);
        let zone = match self.mem.memzone_lookup(&zname) {
            Some(z) => z,
            None => match self.mem.memzone_reserve_aligned(
                &zname,
                bytes,
                h.socket,
                MemzoneFlags::ZERO,
                64,
            ) {
                Ok(z) => z,
                Err(Error::Memzone(MemzoneError::Exists { .. })) => self
                    .mem
                    .memzone_lookup(&zname)
                    .ok_or_else(|| MempoolError::Corrupt {
                        name: self.name.clone(),
                        why: format!("leak tracking zone {zname} vanished while being created"),
                    })?,
                Err(e) => return Err(e.into()),
            },
        };
        if zone.len() < bytes {
            return Err(MempoolError::Corrupt {
                name: self.name.clone(),
                why: format!(
                    "zone {zname} ({} bytes) is not this pool's leak table ({bytes} bytes needed); free it or rename the pool",
                    zone.len()
                ),
            });
        }
        // SAFETY: a zone of at least `bytes` bytes, 64-aligned, zeroed when
        // created; the head's fields are atomics.
        let head = unsafe { &*zone.as_ptr().cast::<LeakHead>() };
        if head.magic.load(Ordering::Acquire) != LEAK_MAGIC {
            let n = head.n.load(Ordering::Relaxed);
            if n != 0 && n != self.n {
                return Err(MempoolError::Corrupt {
                    name: self.name.clone(),
                    why: format!(
                        "zone {zname} holds a leak table for {n} objects, the pool has {}",
                        self.n
                    ),
                });
            }
            head.n.store(self.n, Ordering::Relaxed);
            let _ = head
                .seq
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
            head.magic.store(LEAK_MAGIC, Ordering::Release);
        } else if head.n.load(Ordering::Relaxed) != self.n {
            return Err(MempoolError::Corrupt {
                name: self.name.clone(),
                why: format!(
                    "zone {zname} holds a leak table for {} objects, the pool has {}",
                    head.n.load(Ordering::Relaxed),
                    self.n
                ),
            });
        }
        h.leak_table.store(zone.as_ptr() as u64, Ordering::Release);
        Ok(head)
    }

    /// The published owner table, if tracking was ever switched on.
    fn leak_table(&self) -> Option<&LeakHead> {
        let a = self.header().leak_table.load(Ordering::Acquire) as usize;
        // SAFETY: published only after the table zone was checked and
        // initialised; freed only with the pool.
        (a != 0).then(|| unsafe { &*(a as *const LeakHead) })
    }

    /// The records of `head`.
    ///
    /// # Safety
    /// `head` is this pool's table (`n` records follow it).
    unsafe fn leak_records<'a>(&self, head: &'a LeakHead) -> &'a [OwnerRecord] {
        let first = (std::ptr::from_ref(head) as usize + LEAK_HEAD) as *const OwnerRecord;
        // SAFETY: the caller's contract; records are atomics.
        unsafe { std::slice::from_raw_parts(first, self.n as usize) }
    }

    /// Index of an object this pool handed out or is taking back (checked
    /// already): a multiply by the object size's reciprocal after finding
    /// its zone (directly with one zone, through the granule table with
    /// several).
    #[inline]
    fn index_in_pool(&self, a: usize) -> Option<u32> {
        if self.header().block_size != 0 {
            // Objects in blocks: not at one stride from the chunk's start.
            return self.index_of(a);
        }
        if self.span_check.span != 0 {
            let off = a.wrapping_sub(self.span_check.lo);
            return (off < self.span_check.span)
                .then(|| div_by_recip(off, self.total_size, self.total_recip) as u32);
        }
        let g = a.wrapping_sub(self.gran_base) >> GRAN_SHIFT;
        match self.gran.get(g) {
            Some(&k) if k != 0 && k != GRAN_MANY => {
                let (start, end, first) = self.ranges[k as usize - 1];
                let lo = start + self.header_size;
                (a >= lo && a < end)
                    .then(|| first + div_by_recip(a - lo, self.total_size, self.total_recip) as u32)
            }
            _ => self.index_of(a),
        }
    }

    /// Records the caller as the owner of `objs` (tracking is on).
    #[cold]
    #[inline(never)]
    fn record_get(&self, objs: &[*mut u8], tag: Option<u64>, lcore: Option<u32>) {
        let Some(head) = self.leak_table() else {
            return;
        };
        // SAFETY: our table.
        let recs = unsafe { self.leak_records(head) };
        let seq = get_stamp(head);
        let tag = tag.unwrap_or_else(caller_tag);
        let (pid, tid) = ids();
        let lcore = lcore.or_else(|| self.reg.current()).unwrap_or(u32::MAX);
        for &p in objs {
            if let Some(r) = self
                .index_in_pool(p as usize)
                .and_then(|i| recs.get(i as usize))
            {
                r.tag.store(tag, Ordering::Relaxed);
                r.pid.store(pid, Ordering::Relaxed);
                r.tid.store(tid, Ordering::Relaxed);
                r.lcore.store(lcore, Ordering::Relaxed);
                r.seq.store(seq, Ordering::Release);
            }
        }
    }

    /// Clears the owner of `objs` (tracking is on; they are ours).
    #[cold]
    #[inline(never)]
    fn record_put(&self, objs: &[*mut u8]) {
        let Some(head) = self.leak_table() else {
            return;
        };
        // SAFETY: our table.
        let recs = unsafe { self.leak_records(head) };
        for &p in objs {
            if let Some(r) = self
                .index_in_pool(p as usize)
                .and_then(|i| recs.get(i as usize))
            {
                r.seq.store(0, Ordering::Release);
            }
        }
    }

    /// Objects out with an owner record, oldest get first. Objects in
    /// lcore caches are in the pool, not listed; objects taken while
    /// tracking was off are not listed (see [`leak_report`](Self::leak_report)'s
    /// `untracked`). Exact when no get or put runs meanwhile.
    pub fn outstanding(&self) -> Result<Vec<Outstanding>, MempoolError> {
        let head = self
            .leak_table()
            .ok_or_else(|| MempoolError::LeakTrackingOff {
                name: self.name.clone(),
            })?;
        // SAFETY: our table.
        let recs = unsafe { self.leak_records(head) };
        let mut out: Vec<Outstanding> = self
            .objects()
            .zip(recs)
            .enumerate()
            .filter_map(|(i, (p, r))| {
                let seq = r.seq.load(Ordering::Acquire);
                (seq != 0).then(|| {
                    let lcore = r.lcore.load(Ordering::Relaxed);
                    Outstanding {
                        addr: p as usize,
                        index: i as u32,
                        owner: Owner {
                            pid: r.pid.load(Ordering::Relaxed),
                            tid: r.tid.load(Ordering::Relaxed),
                            lcore: (lcore != u32::MAX).then_some(lcore),
                            tag: r.tag.load(Ordering::Relaxed),
                            seq,
                        },
                    }
                })
            })
            .collect();
        out.sort_by_key(|o| o.owner.seq);
        Ok(out)
    }

    /// What is out and who holds it, grouped by (process, lcore, tag);
    /// print it (`Display`) or take [`LeakReport::to_json`].
    pub fn leak_report(&self) -> Result<LeakReport, MempoolError> {
        let out = self.outstanding()?;
        Ok(LeakReport::new(
            &self.name,
            self.leak_tracking(),
            self.in_use_count(),
            &out,
        ))
    }
}

/// Statistics (see [`crate::stats`]).
impl Mempool<'_> {
    /// Switches statistics on or off for every handle of the pool, in
    /// every process (DPDK's `RTE_LIBRTE_MEMPOOL_STATS`, at run time). On:
    /// creates the counter table (zone `MC_<name>`) the first time; while
    /// on, every get and put takes the general path and counts there
    /// (the cost leak tracking has). Off: counting stops; the counters
    /// stay readable and go on from there when switched on again
    /// ([`reset_stats`](Self::reset_stats) zeroes them). Off costs nothing
    /// on the hot paths.
    pub fn set_stats(&self, on: bool) -> Result<(), MempoolError> {
        let h = self.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != POOL_MAGIC && magic != POOL_MAGIC_BUILDING {
            return Err(MempoolError::Gone {
                name: self.name.clone(),
            });
        }
        if on && h.stats_table.load(Ordering::Acquire) == 0 {
            self.stats_table_create()?;
        }
        self.set_switch(SLOW_STATS, on);
        tracing::debug!(pool = self.name, on, "statistics switched");
        Ok(())
    }

    /// Whether statistics are on.
    pub fn stats_enabled(&self) -> bool {
        self.header().slow.load(Ordering::Acquire) & SLOW_STATS != 0
    }

    /// The counters: totals and one row per lcore id that has counts (and
    /// one for threads without an lcore id). All zeros when statistics
    /// were never switched on. Each counter is read once, without
    /// stopping gets and puts: exact when none runs meanwhile.
    pub fn stats(&self) -> MempoolStats {
        MempoolStats::new(&self.name, self.stats_enabled(), self.stats_rows())
    }

    /// Zeroes every counter (DPDK 26.07's `rte_mempool_stats_reset`).
    /// Exact when no get or put runs meanwhile: a thread counting into
    /// its lcore's row at that moment may write back a count it read
    /// before the reset.
    pub fn reset_stats(&self) {
        for r in self.stats_rows().unwrap_or(&[]) {
            r.reset();
        }
    }

    /// The counter table, created (or found, when another process created
    /// it) and published in the header.
    fn stats_table_create(&self) -> Result<(), MempoolError> {
        let h = self.header();
        let zname = format!("{STATS_ZONE_PREFIX}{}", self.name);
        let corrupt = |why: String| MempoolError::Corrupt {
            name: self.name.clone(),
            why,
        };
        let (zone, fresh) = match self.mem.memzone_lookup(&zname) {
            Some(z) => (z, false),
            None => match self.mem.memzone_reserve_aligned(
                &zname,
                TABLE_BYTES,
                h.socket,
                MemzoneFlags::ZERO,
                128,
            ) {
                Ok(z) => (z, true),
                Err(Error::Memzone(MemzoneError::Exists { .. })) => (
                    self.mem.memzone_lookup(&zname).ok_or_else(|| {
                        corrupt(format!(
                            "statistics zone {zname} vanished while being created"
                        ))
                    })?,
                    false,
                ),
                Err(e) => return Err(e.into()),
            },
        };
        if zone.len() < TABLE_BYTES || zone.as_ptr() as usize % 128 != 0 {
            return Err(corrupt(format!(
                "zone {zname} ({} bytes at {:#x}) is not this pool's statistics table ({TABLE_BYTES} bytes, 128-byte aligned); free it or rename the pool",
                zone.len(),
                zone.as_ptr() as usize
            )));
        }
        // SAFETY: a zone of at least TABLE_BYTES bytes, 128-aligned
        // (checked), zeroed when created; head and rows are atomics.
        let head = unsafe { &*zone.as_ptr().cast::<StatsHead>() };
        let rows = head.rows.load(Ordering::Relaxed);
        if head.magic.load(Ordering::Acquire) != STATS_MAGIC {
            if rows != 0 && rows as usize != ROWS {
                return Err(corrupt(format!(
                    "zone {zname} holds a statistics table of {rows} rows, this build uses {ROWS}"
                )));
            }
            head.rows.store(ROWS as u32, Ordering::Relaxed);
            if !fresh {
                // SAFETY: as above; the rows follow the head.
                for r in unsafe { rows_at(zone.as_ptr() as usize) } {
                    r.reset();
                }
            }
            head.magic.store(STATS_MAGIC, Ordering::Release);
        } else if rows as usize != ROWS {
            return Err(corrupt(format!(
                "zone {zname} holds a statistics table of {rows} rows, this build uses {ROWS}"
            )));
        }
        h.stats_table.store(zone.as_ptr() as u64, Ordering::Release);
        Ok(())
    }

    /// The published counter rows, if statistics were ever switched on.
    fn stats_rows(&self) -> Option<&[StatsRow]> {
        let a = self.header().stats_table.load(Ordering::Acquire) as usize;
        // SAFETY: published only after the table zone was checked and
        // initialised; freed only with the pool.
        (a != 0).then(|| unsafe { rows_at(a) })
    }

    /// Adds `d` to the calling thread's row: its lcore id's (`lcore`, or
    /// looked up), a plain load and store since the thread owning the id
    /// is the row's only writer; the shared row with atomic adds for a
    /// thread without one. Inlined into the (out-of-line) bookkeeping
    /// functions, where most of `d` is known at compile time.
    #[inline(always)]
    fn count(&self, lcore: Option<u32>, d: &Delta) {
        let Some(rows) = self.stats_rows() else {
            return;
        };
        match lcore.or_else(|| self.reg.current()) {
            Some(id) => {
                if let Some(r) = rows.get(id as usize) {
                    r.add_owned(d);
                }
            }
            None => rows[SHARED_ROW].add_shared(d),
        }
    }
}

/// The rows of the statistics table whose head is at `head`.
///
/// # Safety
/// `head` is an initialised (or being initialised) table of
/// [`TABLE_BYTES`] bytes, 128-aligned, mapped while the pool is.
unsafe fn rows_at<'a>(head: usize) -> &'a [StatsRow] {
    // SAFETY: the caller's contract; rows are atomics.
    unsafe { std::slice::from_raw_parts((head + ROWS_OFF) as *const StatsRow, ROWS) }
}

impl Drop for Mempool<'_> {
    fn drop(&mut self) {
        self.reg.release();
    }
}

/// Granule size (log2) of the chunk lookup table.
const GRAN_SHIFT: u32 = 16;
/// Largest lookup table (granules): 4 GiB of address space.
const GRAN_MAX: usize = 1 << 16;
/// Table entry: several chunks share the granule.
const GRAN_MANY: u8 = u8::MAX;

/// The chunk lookup table for `ranges` (sorted by start).
fn granules(ranges: &[(usize, usize, u32)]) -> (usize, Box<[u8]>) {
    let (Some(first), Some(last)) = (ranges.first(), ranges.iter().map(|r| r.1).max()) else {
        return (0, Box::new([]));
    };
    let base = first.0 >> GRAN_SHIFT << GRAN_SHIFT;
    let n = ((last - 1 - base) >> GRAN_SHIFT) + 1;
    if n > GRAN_MAX {
        return (0, Box::new([]));
    }
    let mut t = vec![0u8; n];
    for (k, &(s, e, _)) in ranges.iter().enumerate() {
        for slot in &mut t[(s - base) >> GRAN_SHIFT..=((e - 1 - base) >> GRAN_SHIFT)] {
            *slot = if *slot == 0 { k as u8 + 1 } else { GRAN_MANY };
        }
    }
    (base, t.into_boxed_slice())
}

/// The sequence stamp of a get: the table's counter (one atomic add per
/// tracked get call; the TSC was tried and costs more here: rdtsc takes
/// ~38 ns in this VM). Never 0 (the counter starts at 1; 0 marks a free
/// record).
#[inline]
fn get_stamp(head: &LeakHead) -> u64 {
    head.seq.fetch_add(1, Ordering::Relaxed)
}

/// `off / d` with `recip = floor((2^64 - 1) / d) + 1`: exact for `off <
/// 2^32` and `2 <= d <= 2^32` (the error of the multiply stays below `1 / d`),
/// a plain division otherwise.
#[inline]
fn div_by_recip(off: usize, d: usize, recip: u64) -> usize {
    if off >> 32 == 0 {
        ((off as u128 * u128::from(recip)) >> 64) as usize
    } else {
        off / d
    }
}

/// Granule (log2) of the "whole granule inside a zone's objects" table.
const FULL_SHIFT: u32 = 12;
/// Largest such table: zones spread over at most 1 GiB of address space
/// (a 256 KiB table); pools spread wider use the exact check.
const FULL_MAX: usize = 1 << 18;

/// The "whole granule inside a zone's objects" table for `ranges` (zone
/// start, end) whose objects start `header` bytes in: (base, table with a
/// final 0); only the final 0 when the zones span too much address space.
fn full_granules(ranges: &[(usize, usize, u32)], header: usize) -> (usize, Box<[u8]>) {
    let (Some(lo), Some(hi)) = (
        ranges.iter().map(|r| r.0).min(),
        ranges.iter().map(|r| r.1).max(),
    ) else {
        return (0, Box::new([0]));
    };
    let base = lo >> FULL_SHIFT << FULL_SHIFT;
    let n = ((hi - base) >> FULL_SHIFT) + 1;
    if n > FULL_MAX {
        return (0, Box::new([0]));
    }
    let mut t = vec![0u8; n + 1];
    for &(s, e, _) in ranges {
        let first = (s + header - base).div_ceil(1 << FULL_SHIFT);
        let end = (e - base) >> FULL_SHIFT;
        for slot in t.iter_mut().take(end).skip(first) {
            *slot = 1;
        }
    }
    (base, t.into_boxed_slice())
}

/// Whether every pointer of `objs` lies in `[lo, lo + span)` (`span` in
/// `1..2^63`): the check of every put. With SSE4.2 (the x86-64-v2
/// baseline this workspace builds for, as DPDK builds for corei7) it is
/// [`all_in_span_sse42`], else [`all_in_span_portable`].
#[inline(always)]
fn all_in_span(objs: &[*mut u8], lo: usize, span: usize) -> bool {
    SpanCheck::new(lo, span).all_in(objs)
}

/// A one-zone pool's put check, `[lo, lo + span)`, with the biased
/// constants of [`all_in_span_sse42`] computed once: held by the pool,
/// each is then one broadcast load per put instead of a load, an
/// arithmetic operation and a shuffle (user-owned cache, runtime bulk 4
/// and 8: +3-12%).
/// `span` 0: several zones, no span check.
#[derive(Clone, Copy, Debug, Default)]
struct SpanCheck {
    lo: usize,
    span: usize,
    /// `lo - 2^63`, wrapping.
    base: u64,
    /// `(span - 1) ^ 2^63`.
    limit: u64,
}

impl SpanCheck {
    const BIAS: usize = 1 << 63;

    #[inline(always)]
    fn new(lo: usize, span: usize) -> Self {
        Self {
            lo,
            span,
            base: lo.wrapping_sub(Self::BIAS) as u64,
            limit: (span.wrapping_sub(1) ^ Self::BIAS) as u64,
        }
    }

    /// Whether every pointer of `objs` is in the span (`span != 0`).
    #[inline(always)]
    fn all_in(&self, objs: &[*mut u8]) -> bool {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
        {
            all_in_span_sse42(objs, self)
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "sse4.2")))]
        {
            all_in_span_portable(objs, self.lo, self.span)
        }
    }
}

/// [`all_in_span`] with SSE4.2's signed 64-bit compare, two pointers per
/// operation. `p - lo < span` unsigned is `(p - lo) ^ 2^63 <= (span - 1)
/// ^ 2^63` signed, and `(p - lo) ^ 2^63` is `p - (lo - 2^63)` in wrapping
/// arithmetic: one subtraction, one compare and one OR per pair of
/// pointers, with no register copies (the portable form's two
/// subtractions from two broadcasts need one). Every size from 2 loads
/// whole pairs, the last one overlapping when the count is odd: no
/// scalar tail. Sizes up to 8 take fixed overlapping pairs, no loop.
/// A bulk-32 put through a cache spent half its time in the portable
/// form's loop.
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[inline(always)]
fn all_in_span_sse42(objs: &[*mut u8], c: &SpanCheck) -> bool {
    use core::arch::x86_64::{
        __m128i, _mm_cmpgt_epi64, _mm_loadu_si128, _mm_or_si128, _mm_set1_epi64x, _mm_sub_epi64,
        _mm_testz_si128,
    };
    debug_assert!(c.span != 0 && c.span < 1 << 63);
    let n = objs.len();
    if n == 1 {
        return (objs[0] as usize).wrapping_sub(c.lo) < c.span;
    }
    if n == 0 {
        return true;
    }
    // SAFETY: SSE2 broadcasts (x86_64 baseline).
    let (base, limit) = unsafe {
        (
            _mm_set1_epi64x(c.base as i64),
            _mm_set1_epi64x(c.limit as i64),
        )
    };
    let ptr = objs.as_ptr();
    // All ones in a lane whose pointer is outside. Every call below has
    // `i + 2 <= n`.
    let outside = |i: usize| -> __m128i {
        // SAFETY: `i + 2 <= n`, so the 16-byte unaligned load reads two
        // pointers of `objs`; SSE4.2 is enabled at compile time (the cfg
        // above).
        unsafe {
            let p = _mm_loadu_si128(ptr.add(i).cast());
            _mm_cmpgt_epi64(_mm_sub_epi64(p, base), limit)
        }
    };
    // SAFETY: as above; plain SSE2 ORs.
    let or = |a: __m128i, b: __m128i| unsafe { _mm_or_si128(a, b) };
    let bad = if n <= 4 {
        or(outside(0), outside(n - 2))
    } else if n <= 8 {
        or(
            or(outside(0), outside(2)),
            or(outside(n - 4), outside(n - 2)),
        )
    } else {
        let mut acc = outside(n - 2);
        let mut i = 0;
        while i + 2 <= n {
            acc = or(acc, outside(i));
            i += 2;
        }
        acc
    };
    // SAFETY: SSE4.1's PTEST, enabled with SSE4.2.
    unsafe { _mm_testz_si128(bad, bad) == 1 }
}

/// [`all_in_span`] in plain x86-64 (or any architecture).
#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "sse4.2"),
    allow(dead_code)
)]
/// Each pointer gives `(p - lo) | (hi - p)`, with
/// `hi = lo + span - 1`, in wrapping arithmetic: both terms are below 2^63 exactly when
/// `lo <= p <= hi` (they add up to `span - 1 < 2^63`, so neither can
/// wrap into range), so the OR over all pointers has its top bit clear
/// exactly when every one is inside. Two subtractions and two ORs per
/// pointer and one sign test at the end: no compare per pointer, which
/// SSE4.2 only has signed (an unsigned one took 6-7 vector operations
/// per two pointers, these take 4-5). No early exit.
#[inline(always)]
fn all_in_span_portable(objs: &[*mut u8], lo: usize, span: usize) -> bool {
    debug_assert!(span != 0 && span < 1 << 63);
    let hi = lo.wrapping_add(span - 1);
    let inside = |acc: usize| (acc as isize) >= 0;
    let n = objs.len();
    // Scalar, one subtract and unsigned compare each is shorter.
    let outside = |p: *mut u8| (p as usize).wrapping_sub(lo) >= span;
    if n == 1 {
        return !outside(objs[0]);
    }
    if n != 0 && n <= 8 {
        // Small bulks: four (or eight) clamped indices cover every object,
        // with no loop and no branch per object.
        let last = n - 1;
        // SAFETY: every index is at most n - 1.
        let at = |i: usize| unsafe { *objs.get_unchecked(i.min(last)) };
        let low = outside(at(0)) | outside(at(1)) | outside(at(2)) | outside(at(3));
        if n <= 4 {
            return !low;
        }
        return !(low | outside(at(4)) | outside(at(5)) | outside(at(6)) | outside(at(7)));
    }
    inside(probe_all(objs, lo, hi))
}

/// The OR of `(p - lo) | (hi - p)` over `objs` (see [`all_in_span`]),
/// two pointers per SSE2 operation. Written out: for a constant count
/// (the benchmark's bulk of 32) LLVM unrolls a plain loop completely and
/// then leaves it scalar, five instructions per pointer.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn probe_all(objs: &[*mut u8], lo: usize, hi: usize) -> usize {
    use core::arch::x86_64::{
        _mm_cvtsi128_si64, _mm_loadu_si128, _mm_or_si128, _mm_set1_epi64x, _mm_setzero_si128,
        _mm_sub_epi64, _mm_unpackhi_epi64,
    };
    let mut pairs = objs.chunks_exact(2);
    // SAFETY: SSE2 is part of the x86_64 baseline; each unaligned load
    // reads one pair of `objs`'s pointers (16 bytes inside the slice).
    let acc = unsafe {
        let (vlo, vhi) = (_mm_set1_epi64x(lo as i64), _mm_set1_epi64x(hi as i64));
        let mut acc = _mm_setzero_si128();
        for pair in &mut pairs {
            let p = _mm_loadu_si128(pair.as_ptr().cast());
            let probe = _mm_or_si128(_mm_sub_epi64(p, vlo), _mm_sub_epi64(vhi, p));
            acc = _mm_or_si128(acc, probe);
        }
        let both = _mm_or_si128(acc, _mm_unpackhi_epi64(acc, acc));
        _mm_cvtsi128_si64(both) as usize
    };
    pairs.remainder().iter().fold(acc, |a, &p| {
        a | (p as usize).wrapping_sub(lo) | hi.wrapping_sub(p as usize)
    })
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn probe_all(objs: &[*mut u8], lo: usize, hi: usize) -> usize {
    objs.iter().fold(0, |a, &p| {
        a | (p as usize).wrapping_sub(lo) | hi.wrapping_sub(p as usize)
    })
}

/// Copies `n` pointers. Small runtime sizes take a ladder of at most
/// two overlapping fixed-size copies (as `rte_memcpy` does): a loop, or a
/// vectorised loop with its size checks, costs more than the copy itself
/// for 1 to 32 pointers (a bulk-1 get + put through a cache went from 80M
/// to 280M per second in the benchmark harness). Constant sizes fold to
/// one branch. Above 64: `memcpy`.
///
/// # Safety
/// `src` and `dst` valid for `n` pointers, not overlapping.
#[inline(always)]
unsafe fn copy_ptrs(src: *const *mut u8, dst: *mut *mut u8, n: usize) {
    /// Copies `K` pointers at `off` (unaligned).
    ///
    /// # Safety
    /// `[off, off + K)` valid in both.
    #[inline(always)]
    unsafe fn block<const K: usize>(src: *const *mut u8, dst: *mut *mut u8, off: usize) {
        // SAFETY: the caller's range is valid in both; unaligned access.
        unsafe {
            let v = src.add(off).cast::<[*mut u8; K]>().read_unaligned();
            dst.add(off).cast::<[*mut u8; K]>().write_unaligned(v);
        }
    }
    // SAFETY: in every arm, the two blocks are [0, K) and [n - K, n) with
    // K <= n, inside the caller's valid ranges; they may overlap each
    // other (same values written twice), never src with dst.
    unsafe {
        if n <= 1 {
            if n == 1 {
                dst.write(src.read());
            }
        } else if n <= 4 {
            block::<2>(src, dst, 0);
            block::<2>(src, dst, n - 2);
        } else if n <= 8 {
            block::<4>(src, dst, 0);
            block::<4>(src, dst, n - 4);
        } else if n <= 16 {
            block::<8>(src, dst, 0);
            block::<8>(src, dst, n - 8);
        } else if n <= 32 {
            block::<16>(src, dst, 0);
            block::<16>(src, dst, n - 16);
        } else if n <= 64 {
            block::<32>(src, dst, 0);
            block::<32>(src, dst, n - 32);
        } else {
            std::ptr::copy_nonoverlapping(src, dst, n);
        }
    }
}

/// What each NUMA node has free: heap space and free hugepages.
fn nodes_free(mem: &Memory) -> Vec<NodeFree> {
    let pages = memplane::hugepages::Discovery::new(memplane::hugepages::SystemRoots::real())
        .discover()
        .ok();
    mem.topology()
        .node_ids()
        .into_iter()
        .map(|node| {
            let heap = mem.heap_stats(node as i32).ok();
            let hugepages_free = pages.as_ref().map_or(0, |p| {
                p.per_node
                    .iter()
                    .filter(|i| i.node == node)
                    .map(|i| i.free * i.page_size.bytes())
                    .sum()
            });
            NodeFree {
                node,
                heap_free: heap.as_ref().map_or(0, |h| h.free_bytes),
                heap_largest: heap.as_ref().map_or(0, |h| h.greatest_free),
                hugepages_free,
            }
        })
        .collect()
}

/// The first `align`-aligned address of the fresh anonymous mapping of
/// `mapped` bytes at `map`, with the pages before it and those after its
/// first `bytes` bytes unmapped (`mapped` leaves room to align).
fn trim_mapping(map: usize, mapped: usize, align: usize, bytes: usize) -> usize {
    let page = rustix::param::page_size();
    let start = map.next_multiple_of(align.max(page));
    let end = (start + bytes).next_multiple_of(page);
    let map_end = map + mapped.next_multiple_of(page);
    for (at, len) in [(map, start - map), (end, map_end.saturating_sub(end))] {
        if len != 0 {
            // SAFETY: whole pages of the fresh mapping outside the part
            // kept; nothing refers to them.
            if let Err(e) = unsafe { rustix::mm::munmap(at as *mut std::ffi::c_void, len) } {
                tracing::warn!(at, len, error = %e, "munmap of alignment slack failed");
            }
        }
    }
    start
}

/// Reserves object zones `MP_<name>_<k>` for `objects` more objects and
/// records them as chunks (and in `zone_chunks`). On error the zones this
/// call reserved stay recorded; the caller frees them.
fn reserve_zones(
    mem: &Memory,
    name: &str,
    h: &mut PoolHeader,
    objects: u32,
    flags: MempoolFlags,
    pack: Packing,
) -> Result<(), MempoolError> {
    let (total_size, socket) = (h.total_size, h.socket);
    let bytes = |count: u32| pack.bytes(count).unwrap_or(usize::MAX);
    let no_memory = || MempoolError::NoMemory {
        name: name.to_string(),
        need: bytes(objects).next_multiple_of(64),
        objects,
        total_size,
        socket,
        nodes: nodes_free(mem),
    };
    // More than every memseg list of the instance could ever map (external
    // heaps aside): refuse at once instead of trying ever smaller zones.
    let need = bytes(objects);
    let max: usize = mem.lists().iter().map(|l| l.len).sum();
    if need > max && h.socket < 256 {
        return Err(MempoolError::TooLarge { need, max });
    }
    let mut contig = !flags.contains(MempoolFlags::NO_IOVA_CONTIG);
    let mut remaining = objects;
    let mut want = objects;
    let mut first: u32 = h.chunks[..h.nb_chunks as usize]
        .iter()
        .map(|c| c.count)
        .sum();
    while remaining > 0 {
        let k = h.nb_chunks as usize;
        if k == MAX_CHUNKS {
            return Err(MempoolError::TooManyChunks {
                n: h.n,
                total_size: h.total_size,
                max: MAX_CHUNKS,
            });
        }
        let cnt = want.min(remaining);
        let zflags = if contig {
            MemzoneFlags::IOVA_CONTIG
        } else {
            MemzoneFlags::NONE
        };
        match mem.memzone_reserve_aligned(
            &chunk_zone_name(name, k),
            bytes(cnt),
            h.socket,
            zflags,
            pack.align(flags).max(64),
        ) {
            Ok(z) => {
                h.chunks[k] = ChunkDesc {
                    va: z.as_ptr() as u64,
                    iova: if contig { z.iova() } else { BAD_IOVA },
                    len: bytes(cnt) as u64,
                    first,
                    count: cnt,
                };
                h.zone_chunks |= 1 << k;
                h.nb_chunks += 1;
                first += cnt;
                remaining -= cnt;
            }
            // The whole rest is not IOVA-contiguous anywhere: as DPDK, take
            // one VA-contiguous zone and cut it into chunks where the IOVA
            // jumps (no object straddles a jump). One zone keeps the put
            // membership check at one compare per object.
            // (Not for blocks: a block must not straddle a jump; the
            // halving below keeps whole blocks together.)
            Err(Error::Memzone(MemzoneError::Alloc { .. }))
                if contig
                    && cnt == remaining
                    && cnt > 1
                    && pack.block == 0
                    && reserve_split_zone(mem, name, h, remaining, first) =>
            {
                return Ok(());
            }
            // Halve, as long as the remaining chunks can still hold the
            // remaining objects (whole blocks where there are blocks).
            Err(Error::Memzone(MemzoneError::Alloc { .. }))
                if cnt > 1 && cnt.div_ceil(2) as usize * (MAX_CHUNKS - k) >= remaining as usize =>
            {
                let half = cnt.div_ceil(2);
                want = if pack.per_block != 0 && half > pack.per_block {
                    half.next_multiple_of(pack.per_block)
                } else {
                    half
                };
            }
            // No IOVA-contiguous zone small enough fits the chunk budget:
            // go on without contiguity (each object's IOVA looked up).
            Err(Error::Memzone(MemzoneError::Alloc { .. })) if contig => {
                tracing::warn!(name, remaining, "not enough IOVA-contiguous memory; the remaining objects' IOVAs are looked up one by one");
                contig = false;
                want = remaining;
            }
            Err(Error::Memzone(MemzoneError::Alloc { .. })) => return Err(no_memory()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Places `objects` objects (numbered from `first`) in ONE new zone
/// without IOVA contiguity, cut into chunks at the IOVA jumps between its
/// pages so that no object straddles a jump (DPDK's
/// `rte_mempool_populate_default` fallback). The zone is reserved with
/// room for the objects lost at each jump. `false`: it did not work
/// out (no such zone, or more pieces than the chunk list holds); nothing
/// is left behind and the caller goes on with smaller contiguous zones.
fn reserve_split_zone(
    mem: &Memory,
    name: &str,
    h: &mut PoolHeader,
    objects: u32,
    first: u32,
) -> bool {
    let k0 = h.nb_chunks as usize;
    let total = h.total_size as usize;
    let need = objects as usize * total;
    // Smallest page this instance maps: the most jumps the zone can have.
    let Some(page) = mem
        .lists()
        .iter()
        .map(|l| l.page_size.bytes() as usize)
        .min()
    else {
        return false;
    };
    let slack = (need / page + 2) * total;
    let Ok(z) = mem.memzone_reserve_aligned(
        &chunk_zone_name(name, k0),
        need + slack,
        h.socket,
        MemzoneFlags::NONE,
        64,
    ) else {
        return false;
    };
    let (start, end) = (z.as_ptr() as usize, z.as_ptr() as usize + z.len());
    let zpage = (z.page_size() as usize).max(4096);
    // IOVA-contiguous runs of the zone, in VA order.
    let mut runs: Vec<(usize, usize, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        let next = ((at / zpage) + 1) * zpage;
        let piece_end = next.min(end);
        let iova = mem.virt2iova(at).unwrap_or(BAD_IOVA);
        match runs.last_mut() {
            Some((s0, e0, i0))
                if *i0 != BAD_IOVA && iova != BAD_IOVA && *i0 + (at - *s0) as u64 == iova =>
            {
                *e0 = piece_end;
            }
            _ => runs.push((at, piece_end, iova)),
        }
        at = piece_end;
    }
    let mut chunks = Vec::new();
    let mut placed = 0u32;
    for &(s0, e0, iova) in &runs {
        if placed == objects {
            break;
        }
        let fit = ((e0 - s0) / total) as u32;
        let cnt = fit.min(objects - placed);
        if cnt == 0 {
            continue;
        }
        chunks.push(ChunkDesc {
            va: s0 as u64,
            iova,
            len: (cnt as usize * total) as u64,
            first: first + placed,
            count: cnt,
        });
        placed += cnt;
    }
    if placed < objects || k0 + chunks.len() > MAX_CHUNKS {
        let _ = z.free();
        return false;
    }
    let pieces = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        h.chunks[k0 + i] = c;
    }
    // Only the first chunk owns (and frees) the zone.
    h.zone_chunks |= 1 << k0;
    h.nb_chunks += pieces as u32;
    tracing::debug!(
        name,
        objects,
        pieces,
        "pool objects in one zone, cut at IOVA jumps"
    );
    true
}

/// Names of the pools in `mem` (zones `MP_<name>` holding a published pool
/// header).
pub fn mempool_names(mem: &Memory) -> Vec<String> {
    mem.memzones()
        .into_iter()
        .filter_map(|z| {
            let n = z.name.strip_prefix(POOL_ZONE_PREFIX)?;
            if z.len < std::mem::size_of::<PoolHeader>() {
                return None;
            }
            // SAFETY: a live zone of the instance at least a header long;
            // only the atomic magic is read.
            let magic = unsafe { &*(z.addr as *const PoolHeader) }
                .magic
                .load(Ordering::Acquire);
            (magic == POOL_MAGIC).then(|| n.to_string())
        })
        .collect()
}

/// Snapshots of every pool in `mem` (DPDK's `rte_mempool_list_dump`).
pub fn mempools(mem: &Memory) -> Vec<MempoolInfo> {
    mempool_names(mem)
        .into_iter()
        .filter_map(|n| Mempool::lookup(mem, &n).ok().map(|p| p.info()))
        .collect()
}

/// The calling thread's per-lcore cache of a pool, looked up once (DPDK's
/// `rte_mempool_default_cache(mp, rte_lcore_id())`): gets and puts through
/// it skip the per-call lcore id lookup. Same objects, same policy and
/// same checks as [`Mempool::get_bulk`] / [`Mempool::put_bulk`] on this
/// thread. Not `Send`: it names this thread's lcore id, which cannot be
/// unregistered while a handle lives ([`MempoolError::LcoreCacheHeld`]).
pub struct LcoreCache<'p, 'm> {
    pool: &'p Mempool<'m>,
    slot: &'p CacheSlot,
    objs: *mut *mut u8,
    id: u32,
    /// Copies of the pool's object span (fixed while the pool is
    /// borrowed): held in the handle, the hot path reads them from
    /// registers rather than through the pool.
    obj_lo: usize,
    obj_span: usize,
}

impl std::fmt::Debug for LcoreCache<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LcoreCache")
            .field("pool", &self.pool.name)
            .field("lcore", &self.id)
            .finish_non_exhaustive()
    }
}

impl<'m> Mempool<'m> {
    /// The calling thread's lcore cache of this pool; `None` when the
    /// pool has no caches or the thread no lcore id
    /// ([`register_thread`](crate::register_thread)).
    pub fn lcore_cache(&self) -> Option<LcoreCache<'_, 'm>> {
        if self.cache_size == 0 {
            return None;
        }
        let id = self.reg.current()?;
        let (slot, objs) = self.slot(id);
        crate::lcore::cache_handle_made();
        Some(LcoreCache {
            pool: self,
            slot,
            objs,
            id,
            obj_lo: self.span_check.lo,
            obj_span: self.span_check.span,
        })
    }
}

impl LcoreCache<'_, '_> {
    /// The lcore id.
    pub fn lcore_id(&self) -> u32 {
        self.id
    }

    /// Objects in the cache.
    pub fn len(&self) -> u32 {
        self.slot.len.load(Ordering::Relaxed)
    }

    /// Holds no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`Mempool::get_bulk`] through this cache.
    #[inline(always)]
    pub fn get_bulk(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        let len = self.slot.len.load(Ordering::Relaxed);
        // The floor is 0 unless leak tracking closed the hot path.
        if !cfg!(debug_assertions)
            && out.len() + self.slot.get_floor.load(Ordering::Relaxed) as usize <= len as usize
        {
            let len = len - out.len() as u32;
            // SAFETY: [len, len + out.len()) are cached objects of our
            // lcore (this thread's id, held while the handle lives).
            unsafe { copy_ptrs(self.objs.add(len as usize), out.as_mut_ptr(), out.len()) };
            self.slot.len.store(len, Ordering::Relaxed);
            return Ok(());
        }
        self.pool.get_impl(out, None)
    }

    /// [`Mempool::put_bulk`] through this cache.
    #[inline(always)]
    pub fn put_bulk(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        let len = self.slot.len.load(Ordering::Relaxed);
        // The limit is the flush threshold, 0 while leak tracking is on.
        if !cfg!(debug_assertions)
            && len as usize + objs.len() <= self.slot.put_limit.load(Ordering::Relaxed) as usize
            && if self.obj_span != 0 {
                all_in_span(objs, self.obj_lo, self.obj_span)
            } else {
                self.pool.surely_ours(objs)
            }
        {
            // SAFETY: len + objs.len() <= flush threshold < capacity.
            unsafe { copy_ptrs(objs.as_ptr(), self.objs.add(len as usize), objs.len()) };
            self.slot
                .len
                .store(len + objs.len() as u32, Ordering::Relaxed);
            return Ok(());
        }
        self.pool.put_slow(objs)
    }

    /// Returns the cached objects to the backend
    /// ([`Mempool::cache_flush`]).
    pub fn flush(&self) -> Result<(), MempoolError> {
        self.pool.cache_flush()
    }
}

impl Drop for LcoreCache<'_, '_> {
    fn drop(&mut self) {
        crate::lcore::cache_handle_dropped();
    }
}

/// A user-owned cache (DPDK's `rte_mempool_cache_create`): process-local,
/// used by one thread at a time (`&mut`), with the same policy as the
/// per-lcore caches. Bound to the first pool it is used with; flush it
/// ([`flush`](Self::flush)) before dropping it, or its objects stay out.
/// Objects in it count as in use.
pub struct MempoolCache {
    size: u32,
    len: u32,
    /// Flush threshold: 1.5 x size.
    thresh: u32,
    pool: usize,
    objs: Box<[*mut u8]>,
}

// SAFETY: holds pointers to shared-memory objects; moving the cache to
// another thread moves them with it.
unsafe impl Send for MempoolCache {}

impl std::fmt::Debug for MempoolCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MempoolCache")
            .field("size", &self.size)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl MempoolCache {
    /// A cache of `size` objects (1 ..= 512).
    pub fn new(size: u32) -> Result<Self, MempoolError> {
        if size == 0 || size > CACHE_MAX_SIZE {
            return Err(MempoolError::BadCacheSize {
                cache_size: size,
                n: 0,
                why: "a user cache holds 1 to 512 objects",
            });
        }
        Ok(Self {
            size,
            len: 0,
            thresh: size * 3 / 2,
            pool: 0,
            objs: vec![std::ptr::null_mut(); size as usize * 3].into_boxed_slice(),
        })
    }

    /// Objects held.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Holds no object.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn bind(&mut self, pool: &Mempool<'_>) -> Result<(), MempoolError> {
        if self.pool != pool.addr() {
            return self.rebind(pool);
        }
        Ok(())
    }

    #[cold]
    fn rebind(&mut self, pool: &Mempool<'_>) -> Result<(), MempoolError> {
        if self.len != 0 {
            return Err(MempoolError::ForeignObject {
                addr: self.objs[0] as usize,
                pool: pool.name.clone(),
                owner: None,
            });
        }
        self.pool = pool.addr();
        Ok(())
    }

    /// Returns every object to `pool`'s backend.
    pub fn flush(&mut self, pool: &Mempool<'_>) -> Result<(), MempoolError> {
        self.bind(pool)?;
        pool.b_enqueue(&self.objs[..self.len as usize])?;
        pool.count_flush(None, self.len);
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size copies exactly `n` pointers in order, and writes
    /// nothing before or after them.
    #[test]
    fn copy_ptrs_copies_exactly_n_for_every_size() {
        for n in 0..=200usize {
            for off in [0usize, 1, 3] {
                let src: Vec<*mut u8> = (0..n + off).map(|i| (0x1000 + i) as *mut u8).collect();
                let guard = 0xdead as *mut u8;
                let mut dst = vec![guard; n + off + 8];
                // SAFETY: both hold n pointers from off (src) and 4 (dst).
                unsafe { copy_ptrs(src.as_ptr().add(off), dst.as_mut_ptr().add(4), n) };
                assert!(dst[..4].iter().all(|&p| p == guard), "n={n}: wrote before");
                assert_eq!(&dst[4..4 + n], &src[off..off + n], "n={n} off={off}");
                assert!(
                    dst[4 + n..].iter().all(|&p| p == guard),
                    "n={n}: wrote after"
                );
            }
        }
    }

    /// A private `--no-huge` instance of 64 MB (prefix `tag` + pid) and
    /// its runtime directory: bind as `(_dir, mem)` so the instance drops
    /// first.
    fn no_huge_instance(tag: &str) -> (tempfile::TempDir, Memory) {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("{tag}{}", std::process::id());
        let opts = memplane::MemOptions::parse_args(&[
            "--no-huge",
            "-m",
            "64",
            "--file-prefix",
            &prefix,
            "--runtime-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let mem = Memory::init(&opts).unwrap();
        (dir, mem)
    }

    /// The branch-free span check agrees with the plain definition for
    /// pointers at and around both edges, at the ends of the address
    /// space and around 2^63 (where a signed view wraps), for spans up
    /// to 2^63 - 1 and every bulk size 0-40 (each path: one, clamped
    /// small, loop), with one bad pointer at each position; the portable
    /// form and, where built, the SSE4.2 one.
    #[test]
    fn all_in_span_matches_the_definition() {
        type Check = fn(&[*mut u8], usize, usize) -> bool;
        let checks: &[(&str, Check)] = &[
            ("all_in_span", all_in_span),
            ("portable", all_in_span_portable),
            #[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
            ("sse4.2", |o, lo, span| {
                all_in_span_sse42(o, &SpanCheck::new(lo, span))
            }),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        let spans = [
            1usize,
            2,
            64,
            4096,
            0x40_0000,
            (1 << 47) - 1,
            (1 << 62) + 3,
            (1 << 63) - 1,
        ];
        let los = [
            0usize,
            1,
            0x7f00_0000_0000,
            (1 << 63) - 5,
            1 << 63,
            usize::MAX / 2 + 7,
        ];
        for &span in &spans {
            for &lo in &los {
                if lo.checked_add(span - 1).is_none() {
                    continue;
                }
                let hi = lo + (span - 1);
                let naive =
                    |ps: &[*mut u8]| ps.iter().all(|&p| (p as usize) >= lo && (p as usize) <= hi);
                let mut probes = vec![
                    lo,
                    hi,
                    lo.wrapping_sub(1),
                    hi.wrapping_add(1),
                    0,
                    usize::MAX,
                    1 << 63,
                    (1 << 63) - 1,
                    lo.wrapping_add(1 << 63),
                    hi.wrapping_sub(1 << 63),
                ];
                for _ in 0..8 {
                    probes.push(lo.wrapping_add(rnd() % span));
                    probes.push(rnd());
                }
                let good: Vec<usize> = (0..40).map(|_| lo + rnd() % span).collect();
                for n in 0..=40usize {
                    let mut v: Vec<*mut u8> = good[..n].iter().map(|&a| a as *mut u8).collect();
                    for (name, check) in checks {
                        assert!(
                            check(&v, lo, span),
                            "{name}: n {n} lo {lo:#x} span {span:#x}"
                        );
                    }
                    for at in 0..n {
                        for &b in &probes {
                            let keep = v[at];
                            v[at] = b as *mut u8;
                            for (name, check) in checks {
                                assert_eq!(
                                    check(&v, lo, span),
                                    naive(&v),
                                    "{name}: n {n} at {at} probe {b:#x} lo {lo:#x} span {span:#x}"
                                );
                            }
                            v[at] = keep;
                        }
                    }
                }
            }
        }
    }

    /// Every built-in ring handler's backend ring is compact (heads and
    /// tails share lines: every thread both puts and gets), in the
    /// creator's handle and in one opened by lookup.
    #[test]
    fn pool_rings_are_compact() {
        let (_dir, mem) = no_huge_instance("mpcompact");
        for h in [
            "ring_mp_mc",
            "ring_sp_sc",
            "ring_mp_sc",
            "ring_sp_mc",
            "ring_mt_rts",
            "ring_mt_hts",
        ] {
            let pool = Mempool::create(&mem, "c", &MempoolConfig::new(64, 64).handler(h)).unwrap();
            let looked = Mempool::lookup(&mem, "c").unwrap();
            for p in [&pool, &looked] {
                assert!(p.ring.as_ref().unwrap().raw().is_compact(), "{h}");
            }
            drop(looked);
            pool.free().unwrap();
        }
    }

    /// A pool made by `create` (create_empty + populate) must take the
    /// cheap membership check on put, not the exact out-of-line one: the
    /// handle's tables are rebuilt when chunks are added.
    #[test]
    fn a_populated_pool_takes_the_fast_membership_check() {
        let (_dir, mem) = no_huge_instance("mpfast");
        let pool =
            Mempool::create(&mem, "fast", &MempoolConfig::new(100, 64).cache_size(8)).unwrap();
        let mut objs = [std::ptr::null_mut(); 8];
        pool.get_bulk(&mut objs).unwrap();
        assert_eq!(pool.chunks().len(), 1);
        assert_ne!(pool.span_check.span, 0, "one chunk: the one-compare check");
        assert!(pool.surely_ours(&objs));
        let mut outside = objs;
        outside[3] = (pool.span_check.lo + pool.span_check.span) as *mut u8;
        assert!(!pool.surely_ours(&outside));
        pool.put_bulk(&objs).unwrap();
        pool.cache_flush().unwrap();
        assert!(pool.is_full());
        pool.free().unwrap();
    }

    /// The hot paths (an lcore cache's gates, the user-owned caches' key)
    /// are closed while either switch is on and open only when both are
    /// off, whatever order they are switched in; each switch reads back
    /// as set, and the header's word is what the uncached path tests.
    #[test]
    fn the_hot_paths_are_closed_while_either_switch_is_on() {
        let (_dir, mem) = no_huge_instance("mpgates");
        let id = crate::register_thread(&mem).unwrap();
        let pool =
            Mempool::create(&mem, "gates", &MempoolConfig::new(300, 64).cache_size(32)).unwrap();
        // Warm: the cache holds objects, so an open hot get would serve.
        let mut warm = [std::ptr::null_mut(); 8];
        pool.get_bulk(&mut warm).unwrap();
        pool.put_bulk(&warm).unwrap();
        let open = |pool: &Mempool<'_>| {
            let (slot, _) = pool.slot(id);
            let h = pool.header();
            let lanes = [
                slot.put_limit.load(Ordering::Relaxed) == pool.flush_thresh,
                slot.get_floor.load(Ordering::Relaxed) == 0,
                slot.slow.load(Ordering::Relaxed) == 0,
                h.slow.load(Ordering::Relaxed) == 0,
                h.user_key.load(Ordering::Relaxed) == pool.addr() as u64,
            ];
            // Every lane agrees, in every slot.
            assert!(lanes.iter().all(|&l| l == lanes[0]), "{lanes:?}");
            for other in 0..MAX_LCORES as u32 {
                let s = pool.slot(other).0;
                assert_eq!(
                    s.put_limit.load(Ordering::Relaxed),
                    slot.put_limit.load(Ordering::Relaxed)
                );
                assert_eq!(
                    s.get_floor.load(Ordering::Relaxed),
                    slot.get_floor.load(Ordering::Relaxed)
                );
            }
            // And the hot get itself serves (or not) accordingly (debug
            // builds never take it; the gates move all the same).
            let mut one = [std::ptr::null_mut(); 1];
            let served = pool.get_cached_fast(&mut one);
            if served {
                pool.put_bulk(&one).unwrap();
            }
            assert_eq!(served, lanes[0] && !cfg!(debug_assertions));
            lanes[0]
        };
        assert!(open(&pool), "both off: open");
        let sequences: [&[(&str, bool)]; 4] = [
            &[("stats", true), ("stats", false)],
            &[
                ("leak", true),
                ("stats", true),
                ("stats", false),
                ("leak", false),
            ],
            &[
                ("stats", true),
                ("leak", true),
                ("leak", false),
                ("stats", false),
            ],
            &[
                ("leak", true),
                ("stats", true),
                ("leak", false),
                ("stats", false),
            ],
        ];
        for seq in sequences {
            let (mut leak, mut stats) = (false, false);
            for &(which, on) in seq {
                if which == "leak" {
                    pool.set_leak_tracking(on).unwrap();
                    leak = on;
                } else {
                    pool.set_stats(on).unwrap();
                    stats = on;
                }
                assert_eq!((pool.leak_tracking(), pool.stats_enabled()), (leak, stats));
                assert_eq!(
                    open(&pool),
                    !leak && !stats,
                    "after {which} {on} in {seq:?}"
                );
            }
        }
        pool.cache_flush().unwrap();
        pool.free().unwrap();
    }

    #[test]
    fn division_by_reciprocal_is_exact() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for d in [
            2usize,
            8,
            40,
            64,
            128,
            2112,
            4160,
            65_535,
            1 << 20,
            (1 << 31) - 8,
        ] {
            let recip = u64::MAX / d as u64 + 1;
            for off in [0usize, 1, d - 1, d, d + 1, (1 << 32) - 1, 1 << 32, 1 << 40] {
                assert_eq!(div_by_recip(off, d, recip), off / d, "{off} / {d}");
            }
            for _ in 0..20_000 {
                let off = (next() >> 32) as usize;
                assert_eq!(div_by_recip(off, d, recip), off / d, "{off} / {d}");
            }
        }
    }

    #[test]
    fn full_granule_table_marks_only_granules_wholly_inside_objects() {
        let g = 1usize << 12;
        // Zone A: objects from 10g + 64 to 13g; zone B: 20g .. 21g + 8.
        let (base, t) = full_granules(&[(10 * g, 13 * g, 0), (20 * g - 64, 21 * g + 8, 9)], 64);
        assert_eq!(base, 10 * g);
        // 10g is partial (its first 64 bytes are a header), 11g and 12g
        // are whole; 13g..19g outside; 20g whole; 21g partial; final 0.
        assert_eq!(&t[..], &[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        let (_, t) = full_granules(&[(0, 4096, 0), (1 << 31, (1 << 31) + 4096, 1)], 0);
        assert_eq!(&t[..], &[0], "zones spread too wide: exact check only");
    }

    #[test]
    fn granule_table_names_the_only_chunk_or_says_several() {
        let g = 1usize << GRAN_SHIFT;
        let ranges = vec![
            (10 * g + 64, 12 * g, 0),
            (12 * g, 12 * g + 100, 5),
            (20 * g, 21 * g, 7),
        ];
        let (base, t) = granules(&ranges);
        assert_eq!(base, 10 * g);
        assert_eq!(t.len(), 11);
        assert_eq!(&t[..3], &[1, 1, 2]);
        assert_eq!(&t[3..10], &[0; 7]);
        assert_eq!(t[10], 3);
        let (_, t) = granules(&[(g, g + 64, 0), (g + 64, g + 128, 1)]);
        assert_eq!(&t[..], &[GRAN_MANY]);
        let (_, t) = granules(&[
            (0, 64, 0),
            (
                GRAN_MAX << GRAN_SHIFT << 1,
                (GRAN_MAX << GRAN_SHIFT << 1) + 64,
                1,
            ),
        ]);
        assert!(t.is_empty(), "too much address space: binary search");
        assert!(granules(&[]).1.is_empty());
    }
}
