//! What a pool looks like in shared memory, and the size arithmetic.
//!
//! - Header zone `MP_<name>`: [`PoolHeader`] (64-byte aligned, fixed
//!   size), then, if the cache size is not 0, [`MAX_LCORES`] per-lcore
//!   caches ([`CacheSlot`] + `3 x cache_size` object slots each), then the
//!   private area (rounded up to 64).
//! - Object zones `MP_<name>_<k>`: objects back to back, each
//!   `[ObjHeader padded to header_size][element][trailer padding]`; or,
//!   for a handler that asks for blocks ([`BlockLayout`], the `bucket`
//!   handler), blocks aligned to their size, each `[block header][objects
//!   back to back][slack]`, no object crossing a block ([`Packing`]).
//! - Side tables, created when their switch is first turned on and freed
//!   with the pool: leak tracking `MT_<name>` ([`crate::leak`]),
//!   statistics `MC_<name>` ([`crate::stats`]); their addresses are in
//!   the header.
//!
//! Everything stored is an absolute virtual address (the same in every
//! process of an instance) or a plain number; nothing process-local.

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::MempoolError;

/// "MPLPOOL1": a published (fully populated) pool header.
pub const POOL_MAGIC: u64 = u64::from_le_bytes(*b"MPLPOOL1");
/// "MPLPOOL0": a pool made by `create_empty` whose objects are not all
/// placed yet; lookups are refused until it is fully populated.
pub const POOL_MAGIC_BUILDING: u64 = u64::from_le_bytes(*b"MPLPOOL0");
/// Layout version of the header (2: chunk ownership masks; 3: leak
/// tracking fields; 4: cache slot gates; 5: the switch word holds leak
/// tracking and statistics, and the statistics table's address; 6: the
/// handler's block layout in the header, and the statistics rows count
/// contiguous-block gets).
pub const LAYOUT_VERSION: u32 = 6;
/// Longest pool name (DPDK's `RTE_MEMPOOL_NAMESIZE - 1`): `MP_<name>`
/// must leave room for a chunk suffix and the ring's `RG_` prefix.
pub const NAME_MAX: usize = 25;
/// Longest handler name (DPDK: 31 bytes).
pub const HANDLER_NAME_MAX: usize = 31;
/// Most object zones (chunks) a pool may have (zone names
/// `MP_<name>_0` .. `MP_<name>_63` fit the 31-byte memzone name limit).
pub const MAX_CHUNKS: usize = 64;
/// Lcore ids per instance (DPDK's default `RTE_MAX_LCORE`), and caches per
/// pool.
pub const MAX_LCORES: usize = 128;
/// Largest cache size (DPDK's `RTE_MEMPOOL_CACHE_MAX_SIZE`).
pub const CACHE_MAX_SIZE: u32 = 512;
/// Largest element size accepted (1 GiB).
pub const MAX_ELT_SIZE: u32 = 1 << 30;
/// Largest private area accepted (1 GiB).
pub const MAX_PRIVATE_SIZE: u32 = 1 << 30;
/// Most objects in one pool.
pub const MAX_OBJECTS: u32 = i32::MAX as u32;

/// Cookie of an object that is in the pool (backend or a cache).
pub const COOKIE_IN_POOL: u64 = 0xbadb_adba_dadd_2e55;
/// Cookie of an object handed out.
pub const COOKIE_IN_USE: u64 = 0xf2ee_f2ee_dadd_2e55;

/// Pool creation flags: DPDK's `RTE_MEMPOOL_F_*` values.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct MempoolFlags(u32);

impl MempoolFlags {
    /// No flags: multi-producer/multi-consumer ring, cache-aligned objects.
    pub const NONE: Self = Self(0);
    /// Do not pad objects to spread them over memory channels and ranks
    /// (see [`spread_object_size`]).
    pub const NO_SPREAD: Self = Self(0x1);
    /// Objects aligned to 8 bytes instead of 64, header not padded
    /// (implies `NO_SPREAD`).
    pub const NO_CACHE_ALIGN: Self = Self(0x2);
    /// Single producer: the default handler becomes `ring_sp_*`.
    pub const SP_PUT: Self = Self(0x4);
    /// Single consumer: the default handler becomes `ring_*_sc`.
    pub const SC_GET: Self = Self(0x8);
    /// Objects need not be IOVA-contiguous: object zones are reserved
    /// without `IOVA_CONTIG`, and each object's IOVA is looked up.
    pub const NO_IOVA_CONTIG: Self = Self(0x20);
    const ALL: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20;

    /// The bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from bits; unknown bits are an error.
    pub fn from_bits(bits: u32) -> Result<Self, MempoolError> {
        if bits & !Self::ALL != 0 {
            return Err(MempoolError::BadFlags {
                bits: bits & !Self::ALL,
            });
        }
        Ok(Self(bits))
    }

    /// Whether all of `other`'s bits are set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for MempoolFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::fmt::Debug for MempoolFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (Self::NO_SPREAD, "NO_SPREAD"),
            (Self::NO_CACHE_ALIGN, "NO_CACHE_ALIGN"),
            (Self::SP_PUT, "SP_PUT"),
            (Self::SC_GET, "SC_GET"),
            (Self::NO_IOVA_CONTIG, "NO_IOVA_CONTIG"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(fl, _)| self.contains(*fl))
            .map(|(_, n)| *n)
            .collect();
        if set.is_empty() {
            f.write_str("NONE")
        } else {
            f.write_str(&set.join("|"))
        }
    }
}

/// Sizes of one object (DPDK's `rte_mempool_objsz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ObjSize {
    /// Object header (pool address, IOVA, cookie), padded to 64 unless
    /// `NO_CACHE_ALIGN`.
    pub header_size: u32,
    /// Element size rounded up to 8.
    pub elt_size: u32,
    /// Padding after the element so the total is a multiple of 64 (8 with
    /// `NO_CACHE_ALIGN`).
    pub trailer_size: u32,
    /// Bytes per object.
    pub total_size: u32,
}

/// Memory channels DPDK assumes when `-n` is not given
/// (`optimize_object_size`: `nchan == 0` becomes 4).
pub const DEFAULT_MEMORY_CHANNELS: u32 = 4;
/// Memory ranks DPDK assumes when `-r` is not given.
pub const DEFAULT_MEMORY_RANKS: u32 = 1;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// DPDK 22.11's `optimize_object_size`: the object size in 64-byte lines,
/// grown until it shares no factor with `channels_x_ranks`, so that
/// consecutive objects start on different memory channels and ranks
/// (a 2-line object with 4 channels would only ever start on 2 of them).
/// `channels_x_ranks` of 0 counts as DPDK's default, 4 x 1.
pub fn spread_object_size(obj_size: u32, channels_x_ranks: u32) -> u32 {
    let ways = if channels_x_ranks == 0 {
        u64::from(DEFAULT_MEMORY_CHANNELS * DEFAULT_MEMORY_RANKS)
    } else {
        u64::from(channels_x_ranks)
    };
    let mut lines = u64::from(obj_size).div_ceil(64);
    while gcd(lines, ways) != 1 {
        lines += 1;
    }
    (lines * 64) as u32
}

/// Object sizes for `elt_size`-byte elements (DPDK 22.11's
/// `rte_mempool_calc_obj_size`) with DPDK's default 4 memory channels x 1
/// rank: [`calc_obj_size_for`] with `channels_x_ranks` 0. A pool takes
/// the instance's `-n`/`-r` ([`channels_x_ranks`]) instead.
pub fn calc_obj_size(elt_size: u32, flags: MempoolFlags) -> Result<ObjSize, MempoolError> {
    calc_obj_size_for(elt_size, flags, 0)
}

/// The memory channels x ranks an instance's pools spread objects over:
/// the primary's `-n` (4 when not given) times its `-r` (1 when not
/// given), as DPDK does with `rte_memory_get_nchannel` / `_nrank`.
pub fn channels_x_ranks(mem: &memplane::Memory) -> u32 {
    let channels = match mem.memory_channels() {
        0 => DEFAULT_MEMORY_CHANNELS,
        c => c,
    };
    let ranks = match mem.memory_ranks() {
        0 => DEFAULT_MEMORY_RANKS,
        r => r,
    };
    channels * ranks
}

/// [`channels_x_ranks`] of the instance `opts` would start, before it
/// exists: for sizing memory ahead (with [`required_memory_for`]).
///
/// ```
/// let opts = memplane::MemOptions::parse_args(&["-n", "3"]).unwrap();
/// assert_eq!(memplane_mempool::channels_x_ranks_of(&opts), 3);
/// let none = memplane::MemOptions::parse_args::<&str>(&[]).unwrap();
/// assert_eq!(memplane_mempool::channels_x_ranks_of(&none), 4);
/// ```
pub fn channels_x_ranks_of(opts: &memplane::MemOptions) -> u32 {
    opts.memory_channels.unwrap_or(DEFAULT_MEMORY_CHANNELS)
        * opts.memory_ranks.unwrap_or(DEFAULT_MEMORY_RANKS)
}

/// Object sizes for `elt_size`-byte elements (DPDK 22.11's
/// `rte_mempool_calc_obj_size`): header padded to 64, element rounded up
/// to 8, trailer up to the next 64-byte line, and, unless `NO_SPREAD` or
/// `NO_CACHE_ALIGN` (which implies it, as in `rte_mempool_create_empty`),
/// more trailer so the object's size in lines shares no factor with
/// `channels_x_ranks` ([`spread_object_size`]; 0 means DPDK's default 4 x
/// 1).
///
/// ```
/// use memplane_mempool::{calc_obj_size_for, MempoolFlags};
/// // 64-byte header + 128-byte element = 3 lines: coprime with 4, kept;
/// // with 3 channels it grows to 4 lines.
/// assert_eq!(calc_obj_size_for(128, MempoolFlags::NONE, 4)?.total_size, 192);
/// assert_eq!(calc_obj_size_for(128, MempoolFlags::NONE, 3)?.total_size, 256);
/// # Ok::<(), memplane_mempool::MempoolError>(())
/// ```
pub fn calc_obj_size_for(
    elt_size: u32,
    flags: MempoolFlags,
    channels_x_ranks: u32,
) -> Result<ObjSize, MempoolError> {
    if elt_size == 0 {
        return Err(MempoolError::BadEltSize {
            size: 0,
            why: "elements need at least one byte",
        });
    }
    if elt_size > MAX_ELT_SIZE {
        return Err(MempoolError::BadEltSize {
            size: u64::from(elt_size),
            why: "larger than 1 GiB",
        });
    }
    let align: u32 = if flags.contains(MempoolFlags::NO_CACHE_ALIGN) {
        8
    } else {
        64
    };
    let header_size = (std::mem::size_of::<ObjHeader>() as u32).next_multiple_of(align);
    let elt = elt_size.next_multiple_of(8);
    let mut total = (header_size + elt).next_multiple_of(align);
    if !flags.contains(MempoolFlags::NO_SPREAD) && !flags.contains(MempoolFlags::NO_CACHE_ALIGN) {
        total = spread_object_size(total, channels_x_ranks);
    }
    Ok(ObjSize {
        header_size,
        elt_size: elt,
        trailer_size: total - header_size - elt,
        total_size: total,
    })
}

/// Bytes of object memory (the `MP_<name>_<k>` zones, summed) a pool of
/// `n` elements of `elt_size` bytes with `flags` takes: `n x total_size`
/// rounded up to 64 (the memzone granule). Exactly what
/// [`Mempool::create`](crate::Mempool::create) reserves when the objects
/// fit one zone; when memory is fragmented and the objects are split over
/// several zones, each zone is rounded up to 64 on its own (a difference
/// only with `NO_CACHE_ALIGN`).
///
/// This assumes DPDK's default 4 memory channels x 1 rank; for an instance
/// started with `-n`/`-r`, use [`required_memory_for`] with
/// [`channels_x_ranks`]. It counts objects back to back, as every built-in
/// handler but `bucket` places them; [`required_memory_handler`] counts
/// for any handler (the `bucket` handler's buckets take more).
pub fn required_memory(n: u32, elt_size: u32, flags: MempoolFlags) -> Result<usize, MempoolError> {
    required_memory_for(n, elt_size, flags, 0)
}

/// [`required_memory`] for objects spread over `channels_x_ranks` (0:
/// DPDK's default 4 x 1). For the handlers that place objects back to
/// back (every built-in one but `bucket`); see
/// [`required_memory_handler`].
pub fn required_memory_for(
    n: u32,
    elt_size: u32,
    flags: MempoolFlags,
    channels_x_ranks: u32,
) -> Result<usize, MempoolError> {
    if n == 0 {
        return Err(MempoolError::ZeroObjects);
    }
    let sz = calc_obj_size_for(elt_size, flags, channels_x_ranks)?;
    packed_bytes(n, Packing::new(&sz, None))
}

/// [`required_memory_for`] for a pool served by `handler` (a name
/// registered in this process): handlers that lay objects out in blocks
/// ([`Handler::block_layout`](crate::Handler::block_layout), the `bucket`
/// handler) need whole blocks, each with its block header, the last one
/// cut after its last object. Exactly what
/// [`Mempool::create`](crate::Mempool::create) with that handler reserves
/// when the objects fit one zone. Errors: those of creation for the same
/// sizes (an element too big for the handler's blocks, an unknown
/// handler).
///
/// ```
/// use memplane_mempool::{required_memory_for, required_memory_handler, MempoolFlags};
/// let f = MempoolFlags::NONE;
/// // 1000 objects of 192 bytes: back to back, or in 64 KiB buckets of
/// // 337 objects (a 768-byte bucket header each): two whole buckets and
/// // 326 objects in the third.
/// assert_eq!(required_memory_for(1000, 64, f, 0)?, 192_000);
/// assert_eq!(required_memory_handler(1000, 64, f, 0, "ring_mp_mc")?, 192_000);
/// assert_eq!(required_memory_handler(1000, 64, f, 0, "bucket")?, 2 * 65536 + 768 + 326 * 192);
/// # Ok::<(), memplane_mempool::MempoolError>(())
/// ```
pub fn required_memory_handler(
    n: u32,
    elt_size: u32,
    flags: MempoolFlags,
    channels_x_ranks: u32,
    handler: &str,
) -> Result<usize, MempoolError> {
    if n == 0 {
        return Err(MempoolError::ZeroObjects);
    }
    let sz = calc_obj_size_for(elt_size, flags, channels_x_ranks)?;
    let layout = crate::handler::find_handler(handler)?.block_layout(&sz, flags)?;
    if let Some(l) = &layout {
        l.check(&sz, handler)?;
    }
    packed_bytes(n, Packing::new(&sz, layout.as_ref()))
}

/// Bytes of `n` objects laid out by `pack`, rounded up to 64 (the memzone
/// granule).
fn packed_bytes(n: u32, pack: Packing) -> Result<usize, MempoolError> {
    pack.bytes(n)
        .map(|b| b.next_multiple_of(64))
        .ok_or(MempoolError::TooManyObjects {
            n: u64::from(n),
            max: MAX_OBJECTS,
        })
}

/// How a handler wants the pool's object memory laid out: in blocks of
/// `block_size` bytes (a power of two), each aligned to its size so that
/// an object's block is found by masking its address, starting with
/// `header` bytes for the handler, then up to `objs_per_block` objects
/// back to back; no object crosses a block (DPDK's bucket driver's
/// buckets). Returned by [`Handler::block_layout`](crate::Handler::block_layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockLayout {
    /// Bytes per block: a power of two; blocks start at multiples of it.
    pub block_size: u32,
    /// Bytes at the start of each block before its first object (the
    /// handler's block header): a multiple of 64, so objects keep their
    /// alignment.
    pub header: u32,
    /// Objects in a whole block (at least 1).
    pub objs_per_block: u32,
}

impl BlockLayout {
    /// Checks the layout for objects of `sz` (a handler's answer is not
    /// trusted blindly): a power-of-two block of at least 64 bytes, a
    /// header that is a multiple of 64, at least one object, and the
    /// objects inside the block.
    pub fn check(&self, sz: &ObjSize, handler: &str) -> Result<(), MempoolError> {
        let fits = u64::from(self.header)
            + u64::from(self.objs_per_block) * u64::from(sz.total_size)
            <= u64::from(self.block_size);
        if !self.block_size.is_power_of_two()
            || self.block_size < 64
            || self.header % 64 != 0
            || self.objs_per_block == 0
            || !fits
        {
            return Err(MempoolError::Corrupt {
                name: handler.to_string(),
                why: format!(
                    "handler {handler:?} asked for blocks of {} bytes with a {}-byte header and {} objects of {} bytes: blocks must be a power of two of at least 64 bytes, the header a multiple of 64, and at least one object must fit after it",
                    self.block_size, self.header, self.objs_per_block, sz.total_size
                ),
            });
        }
        Ok(())
    }
}

/// Where objects lie in a chunk of object memory: back to back at
/// `total` bytes, or in blocks ([`BlockLayout`]). Offsets are from the
/// chunk's start (aligned to the block size when there are blocks) to an
/// object's start (its [`ObjHeader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Bytes per object.
    pub total: usize,
    /// Bytes per block; 0: no blocks (objects back to back).
    pub block: usize,
    /// Bytes before the first object of a block.
    pub block_header: usize,
    /// Objects in a whole block (0 without blocks).
    pub per_block: u32,
}

impl Packing {
    /// The packing of objects of `sz`, in `layout`'s blocks if any.
    pub fn new(sz: &ObjSize, layout: Option<&BlockLayout>) -> Self {
        match layout {
            None => Self {
                total: sz.total_size as usize,
                block: 0,
                block_header: 0,
                per_block: 0,
            },
            Some(l) => Self {
                total: sz.total_size as usize,
                block: l.block_size as usize,
                block_header: l.header as usize,
                per_block: l.objs_per_block,
            },
        }
    }

    /// The packing a pool header records.
    pub fn of(h: &PoolHeader) -> Self {
        Self {
            total: h.total_size as usize,
            block: h.block_size as usize,
            block_header: h.block_header as usize,
            per_block: h.objs_per_block,
        }
    }

    /// The block layout, if objects are in blocks.
    pub fn layout(&self) -> Option<BlockLayout> {
        (self.block != 0).then_some(BlockLayout {
            block_size: self.block as u32,
            header: self.block_header as u32,
            objs_per_block: self.per_block,
        })
    }

    /// Alignment of a chunk's start: the block size, else 64 (8 with
    /// `NO_CACHE_ALIGN`).
    pub fn align(&self, flags: MempoolFlags) -> usize {
        if self.block != 0 {
            self.block
        } else if flags.contains(MempoolFlags::NO_CACHE_ALIGN) {
            8
        } else {
            64
        }
    }

    /// Offset of object `i`'s start.
    #[inline]
    pub fn offset(&self, i: u32) -> usize {
        if self.block == 0 {
            i as usize * self.total
        } else {
            let pb = self.per_block as usize;
            let i = i as usize;
            (i / pb) * self.block + self.block_header + (i % pb) * self.total
        }
    }

    /// Bytes from a chunk's start to the end of its `count`-th object
    /// (`None` on overflow).
    pub fn bytes(&self, count: u32) -> Option<usize> {
        if count == 0 {
            return Some(0);
        }
        if self.block == 0 {
            return (count as usize).checked_mul(self.total);
        }
        let pb = self.per_block as usize;
        let full = (count as usize - 1) / pb;
        let rest = count as usize - full * pb;
        full.checked_mul(self.block)?
            .checked_add(self.block_header + rest * self.total)
    }

    /// Objects that fit in `len` bytes from a chunk's (aligned) start.
    pub fn fit(&self, len: usize) -> u32 {
        let n = if self.block == 0 {
            len / self.total
        } else {
            let tail = (len % self.block).saturating_sub(self.block_header) / self.total;
            (len / self.block) * self.per_block as usize + tail.min(self.per_block as usize)
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The index of the object starting at `off`, if one can start there
    /// (the caller checks it against the chunk's count).
    pub fn index(&self, off: usize) -> Option<u32> {
        let i = if let Some(b) = off.checked_div(self.block) {
            let r = (off % self.block).checked_sub(self.block_header)?;
            let j = r / self.total;
            if r % self.total != 0 || j >= self.per_block as usize {
                return None;
            }
            b * self.per_block as usize + j
        } else {
            (off % self.total == 0).then_some(off / self.total)?
        };
        u32::try_from(i).ok()
    }
}

/// The header in front of every object.
#[repr(C)]
pub struct ObjHeader {
    /// Address of the owning pool's header (same in every process).
    pub pool: u64,
    /// IOVA of the element (`BAD_IOVA` when unknown).
    pub iova: u64,
    /// [`COOKIE_IN_POOL`] or [`COOKIE_IN_USE`] (kept by debug builds).
    pub cookie: AtomicU64,
}

/// One object zone.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ChunkDesc {
    /// First byte.
    pub va: u64,
    /// Its IOVA (`BAD_IOVA` when not contiguous or unknown).
    pub iova: u64,
    /// Bytes used by objects.
    pub len: u64,
    /// Index of its first object.
    pub first: u32,
    /// Objects in it.
    pub count: u32,
}

/// The pool header at the start of zone `MP_<name>`.
#[repr(C, align(64))]
pub struct PoolHeader {
    /// [`POOL_MAGIC`] once published (stored last, Release).
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// [`MempoolFlags`] bits.
    pub flags: u32,
    /// Pool name, NUL-padded.
    pub name: [u8; 32],
    /// Handler name, NUL-padded (resolved by name in every process).
    pub handler: [u8; 32],
    /// Objects.
    pub n: u32,
    /// Element size (rounded to 8).
    pub elt_size: u32,
    /// Element size as asked.
    pub elt_size_req: u32,
    /// Object header size.
    pub header_size: u32,
    /// Trailer size.
    pub trailer_size: u32,
    /// Bytes per object.
    pub total_size: u32,
    /// Per-lcore cache size (0: no caches).
    pub cache_size: u32,
    /// Cache flush threshold (1.5 x cache size).
    pub flush_thresh: u32,
    /// Object slots per cache (3 x cache size).
    pub cache_cap: u32,
    /// Private area size (rounded to 64).
    pub private_size: u32,
    /// Socket asked at creation.
    pub socket: i32,
    /// Object zones.
    pub nb_chunks: u32,
    /// Objects placed.
    pub populated: u32,
    /// Pid of the creator.
    pub creator_pid: u32,
    /// This header's address.
    pub self_va: u64,
    /// Offset of the first cache from the header.
    pub cache_off: u64,
    /// Bytes per cache.
    pub cache_stride: u64,
    /// Offset of the private area from the header.
    pub priv_off: u64,
    /// Bit `k`: chunk `k` is the pool's own memzone `MP_<name>_<k>`
    /// (freed with the pool).
    pub zone_chunks: u64,
    /// Bit `k`: chunk `k` is anonymous memory the pool mapped
    /// (`populate_anon`; unmapped with the pool).
    pub anon_chunks: u64,
    /// Bit `k`: chunk `k` is memory only the creating process has
    /// (anonymous, or given to `populate_virt` from outside the instance's
    /// memseg lists): other processes refuse to open the pool.
    pub local_chunks: u64,
    /// Object chunks in population order.
    pub chunks: [ChunkDesc; MAX_CHUNKS],
    /// The run-time switches, one bit each: [`SLOW_LEAK`] (leak
    /// tracking) and [`SLOW_STATS`] (statistics). Not 0: every get and put
    /// takes the general path, which records and counts. Mirrored in every
    /// [`CacheSlot`] (so the cached general path reads it from a line it
    /// touches anyway) and folded into the slots' gates and
    /// [`user_key`](Self::user_key); the uncached fast path tests the
    /// word itself (one load, one compare for both switches).
    pub slow: AtomicU32,
    /// Address of the leak tracking table (zone `MT_<name>`), 0 until
    /// tracking is first switched on.
    pub leak_table: AtomicU64,
    /// What a user-owned cache bound to this pool must hold as its pool
    /// key for its hot path: the header's address while [`slow`](Self::slow)
    /// is 0, the address + 1 while either switch is on. One compare then
    /// checks the binding and both switches; the general path binds by
    /// the address.
    pub user_key: AtomicU64,
    /// Address of the statistics table (zone `MC_<name>`), 0 until
    /// statistics are first switched on.
    pub stats_table: AtomicU64,
    /// Block size of the handler's [`BlockLayout`]; 0: objects back to
    /// back.
    pub block_size: u32,
    /// Bytes before the first object of a block.
    pub block_header: u32,
    /// Objects in a whole block.
    pub objs_per_block: u32,
}

/// [`PoolHeader::slow`] bit: leak tracking is on.
pub const SLOW_LEAK: u32 = 1;
/// [`PoolHeader::slow`] bit: statistics are on.
pub const SLOW_STATS: u32 = 2;

/// The head of one per-lcore cache; `cache_cap` object slots follow it.
#[repr(C, align(64))]
pub struct CacheSlot {
    /// Objects in the cache. Written only by the thread owning the lcore
    /// id; read by anyone (counts).
    pub len: AtomicU32,
    /// Copy of [`PoolHeader::slow`], in the line `len` is in.
    pub slow: AtomicU32,
    /// The hot put's bound: it takes `n` objects while `len + n <=
    /// put_limit`. The flush threshold while both switches (leak tracking,
    /// statistics) are off, 0 while either is on, so the hot path needs
    /// no separate check of the switches (one compare instead of a
    /// compare, a load and a branch).
    pub put_limit: AtomicU32,
    /// The hot get's floor: it serves `n` objects while `n + get_floor <=
    /// len`. 0 while both switches are off, [`GET_FLOOR_CLOSED`] while
    /// either is on (no cache holds that many).
    pub get_floor: AtomicU32,
}

/// [`CacheSlot::get_floor`] while leak tracking or statistics are on.
pub const GET_FLOOR_CLOSED: u32 = 1 << 30;

/// Geometry of the header zone.
#[derive(Debug, Clone, Copy)]
pub struct HeaderGeometry {
    /// Offset of the first cache.
    pub cache_off: usize,
    /// Bytes per cache (0 without caches).
    pub cache_stride: usize,
    /// Slots per cache.
    pub cache_cap: u32,
    /// Offset of the private area.
    pub priv_off: usize,
    /// Private area size (rounded to 64).
    pub priv_size: usize,
    /// Zone size.
    pub total: usize,
}

/// Lays out the header zone for `cache_size` and `private_size`.
pub fn header_geometry(cache_size: u32, private_size: u32) -> HeaderGeometry {
    let cache_off = std::mem::size_of::<PoolHeader>().next_multiple_of(64);
    let cache_cap = cache_size * 3;
    let cache_stride = if cache_size == 0 {
        0
    } else {
        (std::mem::size_of::<CacheSlot>() + cache_cap as usize * 8).next_multiple_of(64)
    };
    let priv_off = cache_off + cache_stride * if cache_size == 0 { 0 } else { MAX_LCORES };
    let priv_size = (private_size as usize).next_multiple_of(64);
    HeaderGeometry {
        cache_off,
        cache_stride,
        cache_cap,
        priv_off,
        priv_size,
        total: priv_off + priv_size.max(64),
    }
}

/// A name as a NUL-padded array (the caller checked the length).
pub fn name_bytes(s: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..s.len()].copy_from_slice(s.as_bytes());
    b
}

/// A NUL-padded array as a string.
pub fn name_str(b: &[u8; 32]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

const _: () = {
    assert!(std::mem::size_of::<ObjHeader>() == 24);
    assert!(std::mem::size_of::<ChunkDesc>() == 32);
    assert!(std::mem::size_of::<CacheSlot>() == 64);
    // Chunk ownership masks, the switch word, the two table addresses
    // and the block layout: one more line than the chunk list needs.
    assert!(std::mem::size_of::<PoolHeader>() == 2304);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_sizes_follow_dpdk() {
        let s = calc_obj_size(64, MempoolFlags::NO_SPREAD).unwrap();
        assert_eq!(
            (s.header_size, s.elt_size, s.trailer_size, s.total_size),
            (64, 64, 0, 128)
        );
        let s = calc_obj_size(2048, MempoolFlags::NO_SPREAD).unwrap();
        assert_eq!(s.total_size, 2112);
        let s = calc_obj_size(1, MempoolFlags::NO_SPREAD).unwrap();
        assert_eq!((s.elt_size, s.trailer_size, s.total_size), (8, 56, 128));
        let s = calc_obj_size(13, MempoolFlags::NO_CACHE_ALIGN).unwrap();
        assert_eq!(
            (s.header_size, s.elt_size, s.trailer_size, s.total_size),
            (24, 16, 0, 40)
        );
        assert!(calc_obj_size(0, MempoolFlags::NONE).is_err());
        assert!(calc_obj_size(MAX_ELT_SIZE + 1, MempoolFlags::NONE).is_err());
        assert_eq!(
            required_memory(10, 64, MempoolFlags::NO_SPREAD).unwrap(),
            1280
        );
        assert_eq!(required_memory(10, 64, MempoolFlags::NONE).unwrap(), 1920);
        assert_eq!(
            required_memory(3, 13, MempoolFlags::NO_CACHE_ALIGN).unwrap(),
            128
        );
        assert!(required_memory(0, 64, MempoolFlags::NONE).is_err());
        assert!(MempoolFlags::from_bits(0x10).is_err());
    }

    #[test]
    fn objects_are_padded_to_an_odd_number_of_lines_for_four_channels() {
        // DPDK 22.11 with the default 4 channels x 1 rank: 64-byte elements
        // give 192-byte objects (2 lines -> 3), 2048-byte ones stay at 2112
        // (33 lines, odd already), 1984-byte ones grow from 32 to 33 lines.
        let cases = [
            (64, 128, 192),
            (2048, 2112, 2112),
            (1984, 2048, 2112),
            (8, 128, 192),
            (200, 320, 320),
            (448, 512, 576),
        ];
        for (elt, unspread, spread) in cases {
            let plain = calc_obj_size(elt, MempoolFlags::NO_SPREAD).unwrap();
            let s = calc_obj_size(elt, MempoolFlags::NONE).unwrap();
            assert_eq!(
                (plain.total_size, s.total_size),
                (unspread, spread),
                "elt {elt}"
            );
            assert_eq!(s.header_size + s.elt_size + s.trailer_size, s.total_size);
            assert_eq!(s.trailer_size - plain.trailer_size, spread - unspread);
            assert_eq!(gcd(u64::from(s.total_size / 64), 4), 1);
        }
        // Other channel counts: strides coprime to channels x ranks.
        assert_eq!(spread_object_size(128, 3), 128);
        assert_eq!(spread_object_size(192, 3), 256);
        assert_eq!(spread_object_size(128, 6), 320);
        assert_eq!(spread_object_size(128, 0), 192);
        assert_eq!(spread_object_size(100, 1), 128);
        // NO_CACHE_ALIGN implies NO_SPREAD.
        let s = calc_obj_size(64, MempoolFlags::NO_CACHE_ALIGN).unwrap();
        assert_eq!(s.total_size, 88);
    }

    #[test]
    fn header_geometry_places_caches_then_private_area() {
        let g = header_geometry(0, 0);
        assert_eq!(g.cache_stride, 0);
        assert_eq!(g.priv_off, g.cache_off);
        let g = header_geometry(512, 100);
        assert_eq!(g.cache_cap, 1536);
        assert_eq!(g.cache_stride, 64 + 1536 * 8);
        assert_eq!(g.priv_off, g.cache_off + 128 * g.cache_stride);
        assert_eq!(g.priv_size, 128);
    }
}
