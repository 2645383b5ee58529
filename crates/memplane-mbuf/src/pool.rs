//! Mbuf pools: creation (DPDK's `rte_pktmbuf_pool_create*`), lookup, and
//! the process-local map from pool header addresses to open pools that
//! the free path uses.

// Mempool elements and private areas are 64-byte aligned: casts are aligned.
#![allow(clippy::cast_ptr_alignment)]
// The reset is a handful of stores that must inline into alloc.
#![allow(clippy::inline_always)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use memplane::memzone::Memzone;
use memplane::Memory;
use memplane_mempool::layout::ObjHeader;
use memplane_mempool::{calc_obj_size, Mempool, MempoolConfig, MempoolError, MempoolFlags};

use crate::layout::{
    ol_flags, ExtSharedInfo, MbufHeader, PktmbufPoolPrivate, DEFAULT_BUF_SIZE, HEADROOM,
    MBUF_HEADER_SIZE, POOL_F_PINNED_EXT_BUF, PORT_INVALID, PRIV_ALIGN, PRIV_MAGIC,
};
use crate::mbuf::{free_bulk_raw, Mbuf};
use crate::MbufError;

/// Parameters of [`MbufPool::create`] (DPDK's `rte_pktmbuf_pool_create_by_ops`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbufPoolConfig {
    /// Mbufs in the pool (>= 1).
    pub n: u32,
    /// Per-lcore cache size (0, or at most 512 and `n / 1.5`).
    pub cache_size: u32,
    /// Bytes of private area per mbuf (a multiple of 8, at most 65535).
    pub priv_size: u32,
    /// Bytes of buffer per mbuf, headroom included (at most 65535).
    pub data_room: u32,
    /// NUMA socket, or `SOCKET_ID_ANY`.
    pub socket: i32,
    /// Mempool handler name (`ring_mp_mc` by default).
    pub handler: Option<String>,
}

impl MbufPoolConfig {
    /// `n` mbufs with the default data room (2048 + 128), no private area,
    /// no cache, any socket, the default handler.
    pub fn new(n: u32) -> Self {
        Self {
            n,
            cache_size: 0,
            priv_size: 0,
            data_room: u32::from(DEFAULT_BUF_SIZE),
            socket: memplane::heap::SOCKET_ID_ANY,
            handler: None,
        }
    }
    /// Sets the per-lcore cache size.
    #[must_use]
    pub fn cache_size(mut self, c: u32) -> Self {
        self.cache_size = c;
        self
    }
    /// Sets the private area size.
    #[must_use]
    pub fn priv_size(mut self, p: u32) -> Self {
        self.priv_size = p;
        self
    }
    /// Sets the data room size.
    #[must_use]
    pub fn data_room(mut self, d: u32) -> Self {
        self.data_room = d;
        self
    }
    /// Sets the socket.
    #[must_use]
    pub fn socket(mut self, s: i32) -> Self {
        self.socket = s;
        self
    }
    /// Sets the mempool handler by name.
    #[must_use]
    pub fn handler(mut self, h: &str) -> Self {
        self.handler = Some(h.to_string());
        self
    }
}

/// A region of user memory holding the data rooms of an external-buffer
/// pool (DPDK's `struct rte_pktmbuf_extmem`). Each mbuf's buffer is
/// `elt_size` bytes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtMem {
    /// First byte.
    pub addr: usize,
    /// IOVA of the first byte (`memplane::iova::BAD_IOVA` if unknown).
    pub iova: u64,
    /// Bytes.
    pub len: usize,
    /// Bytes per mbuf buffer.
    pub elt_size: u16,
}

impl ExtMem {
    /// The whole of `zone`, cut into buffers of `elt_size` bytes. A zone
    /// of the instance is mapped at the same address in every process,
    /// so the pool's mbufs work in all of them.
    pub fn from_memzone(zone: &Memzone<'_>, elt_size: u16) -> Self {
        Self {
            addr: zone.as_ptr() as usize,
            iova: zone.iova(),
            len: zone.len(),
            elt_size,
        }
    }
}

/// One open pool in this process.
pub(crate) struct PoolEntry {
    /// Lifetime erased: the entry leaves the map (and is dropped) when the
    /// last [`MbufPool`] handle for it drops, and handles borrow the
    /// `Memory`.
    pub(crate) mp: Mempool<'static>,
    pub(crate) addr: usize,
    pub(crate) data_room: u16,
    pub(crate) priv_size: u16,
    pub(crate) flags: u32,
    /// Bytes from an element to its object header.
    pub(crate) obj_header_size: usize,
    /// The instance: (device, inode) of its shared config file, unique
    /// while the instance lives and not reused by a later one soon.
    instance: (u64, u64),
}

/// Identity of `mem` for the map of open pools (see `PoolEntry::instance`).
fn instance_id(mem: &Memory) -> (u64, u64) {
    rustix::fs::fstat(mem.config_fd()).map_or((0, 0), |st| (st.st_dev, st.st_ino))
}

impl PoolEntry {
    /// IOVA of the element `m` (an object of this pool).
    #[inline]
    pub(crate) fn obj_iova(&self, m: *const MbufHeader) -> u64 {
        // SAFETY: `m` is an element of this pool: its mempool object header
        // precedes it by `obj_header_size` bytes.
        unsafe { (*((m as usize - self.obj_header_size) as *const ObjHeader)).iova }
    }
}

struct Registered {
    entry: Arc<PoolEntry>,
    handles: usize,
}

/// Pools open in this process, by header address.
static OPEN: RwLock<Vec<Registered>> = RwLock::new(Vec::new());
/// Bumped whenever an entry leaves [`OPEN`]: thread-local shortcuts taken
/// before are stale.
static GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The pool this thread freed into last: (address, generation, entry).
    static LAST: Cell<(usize, u64, *const PoolEntry)> = const { Cell::new((0, 0, std::ptr::null())) };
}

/// The open pool whose header is at `addr`.
///
/// The pointer is valid while some handle of that pool lives: the caller
/// holds an [`Mbuf`] (which borrows one) of that pool.
#[inline]
pub(crate) fn find_pool(addr: usize) -> Option<*const PoolEntry> {
    let generation = GENERATION.load(Ordering::Acquire);
    let (a, g, p) = LAST.with(Cell::get);
    if a == addr && g == generation {
        return Some(p);
    }
    find_pool_slow(addr, generation)
}

#[cold]
fn find_pool_slow(addr: usize, generation: u64) -> Option<*const PoolEntry> {
    let open = OPEN
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let p = open
        .iter()
        .find(|r| r.entry.addr == addr)
        .map(|r| Arc::as_ptr(&r.entry))?;
    LAST.with(|c| c.set((addr, generation, p)));
    Some(p)
}

/// A handle on an mbuf pool: a mempool whose objects are mbufs, shared by
/// name with every process of the instance. Mbufs borrow the handle they
/// come from; the pool's entry in this process's map of open pools lives
/// as long as one handle does.
pub struct MbufPool<'m> {
    entry: Arc<PoolEntry>,
    _mem: PhantomData<&'m Memory>,
}

impl std::fmt::Debug for MbufPool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MbufPool")
            .field("name", &self.entry.mp.name())
            .field("n", &self.entry.mp.size())
            .field("data_room", &self.entry.data_room)
            .field("priv_size", &self.entry.priv_size)
            .finish_non_exhaustive()
    }
}

fn bad(what: &'static str, value: u64, why: &'static str) -> MbufError {
    MbufError::BadPoolParam { what, value, why }
}

/// DPDK's checks of `rte_pktmbuf_pool_create_by_ops`.
fn check_sizes(priv_size: u32, data_room: u32) -> Result<(u16, u16), MbufError> {
    let priv16 = u16::try_from(priv_size)
        .map_err(|_| bad("priv_size", priv_size.into(), "at most 65535"))?;
    if priv16 % PRIV_ALIGN != 0 {
        return Err(bad(
            "priv_size",
            priv_size.into(),
            "must be a multiple of 8 (RTE_MBUF_PRIV_ALIGN)",
        ));
    }
    let room16 = u16::try_from(data_room).map_err(|_| {
        bad(
            "data_room",
            data_room.into(),
            "at most 65535 (buf_len is 16 bits)",
        )
    })?;
    Ok((priv16, room16))
}

impl<'m> MbufPool<'m> {
    /// Creates an mbuf pool (DPDK's `rte_pktmbuf_pool_create_by_ops`):
    /// `cfg.n` mbufs of `128 + priv_size + data_room` bytes, every one
    /// initialised like `rte_pktmbuf_init`; the sizes are recorded in the
    /// pool's private area so [`lookup`](Self::lookup) in any process
    /// finds them.
    ///
    /// ```no_run
    /// use memplane::{MemOptions, Memory};
    /// use memplane_mbuf::{MbufPool, MbufPoolConfig};
    ///
    /// let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-mbuf"])?)?;
    /// let pool = MbufPool::create(&mem, "rx", &MbufPoolConfig::new(8191).cache_size(256))?;
    /// let mut m = pool.alloc()?;
    /// m.append(4)?.copy_from_slice(b"ping");
    /// assert_eq!(m.pkt_len(), 4);
    /// drop(m); // back to the pool
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create(mem: &'m Memory, name: &str, cfg: &MbufPoolConfig) -> Result<Self, MbufError> {
        let (priv_size, data_room) = check_sizes(cfg.priv_size, cfg.data_room)?;
        Self::create_inner(mem, name, cfg, priv_size, data_room, None)
    }

    /// DPDK's `rte_pktmbuf_pool_create(name, n, cache_size, priv_size,
    /// data_room_size, socket_id)`, with the default handler.
    pub fn pktmbuf_pool_create(
        mem: &'m Memory,
        name: &str,
        n: u32,
        cache_size: u32,
        priv_size: u32,
        data_room: u32,
        socket: i32,
    ) -> Result<Self, MbufError> {
        Self::create(
            mem,
            name,
            &MbufPoolConfig {
                n,
                cache_size,
                priv_size,
                data_room,
                socket,
                handler: None,
            },
        )
    }

    /// Creates a pool whose mbufs have pinned external buffers in `ext`
    /// (DPDK's `rte_pktmbuf_pool_create_extbuf`): mbuf `i` gets the next
    /// `elt_size` bytes of the regions, in order; the buffers stay with
    /// their mbufs for the pool's life. `data_room` is recorded in the
    /// private area (for reports); each mbuf's `buf_len` is its region's
    /// `elt_size`.
    ///
    /// # Safety
    /// Each region is writable memory of this instance, mapped at the
    /// same address in every process that uses the pool (memzones are:
    /// [`ExtMem::from_memzone`]), used by nothing else, and stays so until
    /// the pool is freed.
    pub unsafe fn create_extbuf(
        mem: &'m Memory,
        name: &str,
        cfg: &MbufPoolConfig,
        ext: &[ExtMem],
    ) -> Result<Self, MbufError> {
        let (priv_size, data_room) = check_sizes(cfg.priv_size, cfg.data_room)?;
        if ext.is_empty() {
            return Err(bad("ext_num", 0, "at least one external memory region"));
        }
        let mut bufs: u64 = 0;
        for e in ext {
            if e.elt_size == 0 {
                return Err(bad(
                    "elt_size",
                    0,
                    "external buffers need at least one byte",
                ));
            }
            if e.addr == 0 {
                return Err(bad("buf_ptr", 0, "null external memory"));
            }
            bufs += (e.len / e.elt_size as usize) as u64;
        }
        if bufs < u64::from(cfg.n) {
            return Err(bad(
                "n",
                cfg.n.into(),
                "more mbufs than the external memory has buffers",
            ));
        }
        Self::create_inner(mem, name, cfg, priv_size, data_room, Some(ext))
    }

    fn create_inner(
        mem: &'m Memory,
        name: &str,
        cfg: &MbufPoolConfig,
        priv_size: u16,
        data_room: u16,
        ext: Option<&[ExtMem]>,
    ) -> Result<Self, MbufError> {
        let shinfo_size = if ext.is_some() {
            std::mem::size_of::<ExtSharedInfo>()
        } else {
            0
        };
        let elt_size = MBUF_HEADER_SIZE
            + priv_size as usize
            + shinfo_size
            + if ext.is_some() { 0 } else { data_room as usize };
        let mut mcfg = MempoolConfig::new(cfg.n, elt_size as u32)
            .cache_size(cfg.cache_size)
            .private_size(std::mem::size_of::<PktmbufPoolPrivate>() as u32)
            .socket(cfg.socket);
        if let Some(h) = &cfg.handler {
            mcfg = mcfg.handler(h);
        }
        let obj_header_size = calc_obj_size(elt_size as u32, MempoolFlags::NONE)
            .map_err(MbufError::from)?
            .header_size as usize;
        let flags = if ext.is_some() {
            POOL_F_PINNED_EXT_BUF
        } else {
            0
        };
        // Walks the external regions (rte_pktmbuf_init_extmem's context).
        let mut ext_pos = (0usize, 0usize);
        let mp = Mempool::create_with(mem, name, &mcfg, |_, elt| {
            let m = elt.cast::<MbufHeader>();
            // SAFETY: the element is a fresh object of `elt_size` bytes,
            // 64-aligned (mempool objects are cache aligned), preceded by
            // its mempool header (written before obj_init runs).
            unsafe {
                let oh = &*elt.sub(obj_header_size).cast::<ObjHeader>();
                let mut h = init_header(oh.pool as usize, priv_size);
                let own = MBUF_HEADER_SIZE + priv_size as usize;
                if let Some(regions) = ext {
                    let (mut k, mut off) = ext_pos;
                    while off + regions[k].elt_size as usize > regions[k].len {
                        k += 1;
                        off = 0;
                    }
                    let r = regions[k];
                    ext_pos = (k, off + r.elt_size as usize);
                    let shinfo = elt.add(own).cast::<ExtSharedInfo>();
                    shinfo.write(ExtSharedInfo::pinned(m.cast()));
                    h.buf_addr = (r.addr + off) as *mut u8;
                    h.buf_iova = if r.iova == memplane::iova::BAD_IOVA {
                        r.iova
                    } else {
                        r.iova + off as u64
                    };
                    h.buf_len = r.elt_size;
                    h.ol_flags = ol_flags::EXTERNAL;
                    h.shinfo = shinfo;
                } else {
                    h.buf_addr = elt.add(own);
                    h.buf_iova = if oh.iova == memplane::iova::BAD_IOVA {
                        oh.iova
                    } else {
                        oh.iova + own as u64
                    };
                    h.buf_len = data_room;
                }
                h.data_off = HEADROOM.min(h.buf_len);
                m.write(h);
            }
        })?;
        let (p, len) = mp.private_area();
        debug_assert!(len >= std::mem::size_of::<PktmbufPoolPrivate>());
        // SAFETY: the private area is at least PktmbufPoolPrivate long and
        // 64-aligned; only the creator writes it, before anyone looks the
        // pool up as an mbuf pool (the magic goes last).
        unsafe {
            let pp = p.cast::<PktmbufPoolPrivate>();
            (*pp).mbuf_data_room_size = data_room;
            (*pp).mbuf_priv_size = priv_size;
            (*pp).flags = flags;
            std::sync::atomic::fence(Ordering::Release);
            std::ptr::write_volatile(&raw mut (*pp).magic, PRIV_MAGIC);
        }
        tracing::debug!(
            name,
            n = cfg.n,
            data_room,
            priv_size,
            pinned_ext = ext.is_some(),
            "mbuf pool created"
        );
        Ok(Self::register(
            mp,
            data_room,
            priv_size,
            flags,
            obj_header_size,
        ))
    }

    /// The mbuf pool named `name`, created by this or another process of
    /// the instance (its data room and private size come from the pool's
    /// private area).
    pub fn lookup(mem: &'m Memory, name: &str) -> Result<Self, MbufError> {
        let mp = Mempool::lookup(mem, name)?;
        let (p, len) = mp.private_area();
        if len < std::mem::size_of::<PktmbufPoolPrivate>() {
            return Err(MbufError::NotMbufPool {
                name: name.to_string(),
            });
        }
        // SAFETY: the private area is mapped, long enough and 64-aligned;
        // the magic is written last by the creator.
        let pp = unsafe {
            let pp = p.cast::<PktmbufPoolPrivate>();
            if std::ptr::read_volatile(&raw const (*pp).magic) != PRIV_MAGIC {
                return Err(MbufError::NotMbufPool {
                    name: name.to_string(),
                });
            }
            std::sync::atomic::fence(Ordering::Acquire);
            *pp
        };
        let obj_header_size = calc_obj_size(mp.elt_size(), MempoolFlags::NONE)?.header_size;
        Ok(Self::register(
            mp,
            pp.mbuf_data_room_size,
            pp.mbuf_priv_size,
            pp.flags,
            obj_header_size as usize,
        ))
    }

    fn register(
        mp: Mempool<'m>,
        data_room: u16,
        priv_size: u16,
        flags: u32,
        obj_header_size: usize,
    ) -> Self {
        let addr = mp.addr();
        let instance = instance_id(mp.memory());
        let mut open = OPEN
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = open.iter().position(|r| r.entry.addr == addr) {
            if open[i].entry.instance == instance {
                open[i].handles += 1;
                return Self {
                    entry: open[i].entry.clone(),
                    _mem: PhantomData,
                };
            }
            // A stale entry: a handle of an instance that is gone was
            // leaked (mem::forget), so its entry never left. Its Mempool
            // must not be dropped (its Memory is gone): leak it too.
            tracing::warn!(
                addr,
                "a leaked mbuf pool handle of a dropped instance is replaced"
            );
            GENERATION.fetch_add(1, Ordering::AcqRel);
            std::mem::forget(open.swap_remove(i));
        }
        // SAFETY: only the lifetime changes. The entry is dropped when the
        // last handle of this pool in this process drops (`Drop` below,
        // `free`), and every handle borrows the Memory for 'm, so the
        // Mempool never outlives its Memory.
        let mp: Mempool<'static> =
            unsafe { std::mem::transmute::<Mempool<'m>, Mempool<'static>>(mp) };
        let entry = Arc::new(PoolEntry {
            mp,
            addr,
            data_room,
            priv_size,
            flags,
            obj_header_size,
            instance,
        });
        open.push(Registered {
            entry: entry.clone(),
            handles: 1,
        });
        Self {
            entry,
            _mem: PhantomData,
        }
    }

    /// The underlying mempool.
    pub fn mempool(&self) -> &Mempool<'m> {
        &self.entry.mp
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        self.entry.mp.name()
    }

    /// Address of the pool header: what mbufs' `pool` field holds.
    pub fn addr(&self) -> usize {
        self.entry.addr
    }

    /// Bytes of each mbuf's buffer (DPDK's `rte_pktmbuf_data_room_size`).
    pub fn data_room(&self) -> u16 {
        self.entry.data_room
    }

    /// Bytes of each mbuf's private area (DPDK's `rte_pktmbuf_priv_size`).
    pub fn priv_size(&self) -> u16 {
        self.entry.priv_size
    }

    /// Whether the mbufs have pinned external buffers.
    pub fn is_pinned_extbuf(&self) -> bool {
        self.entry.flags & POOL_F_PINNED_EXT_BUF != 0
    }

    /// Mbufs in the pool.
    pub fn size(&self) -> u32 {
        self.entry.mp.size()
    }

    /// Mbufs available (in the backend and the lcore caches).
    pub fn avail_count(&self) -> u32 {
        self.entry.mp.avail_count()
    }

    /// Mbufs out (allocated, or in user-owned caches).
    pub fn in_use_count(&self) -> u32 {
        self.entry.mp.in_use_count()
    }

    /// Every mbuf available.
    pub fn is_full(&self) -> bool {
        self.entry.mp.is_full()
    }

    /// Returns the calling thread's cached mbufs to the backend.
    pub fn cache_flush(&self) -> Result<(), MbufError> {
        Ok(self.entry.mp.cache_flush()?)
    }

    /// One mbuf, reset (DPDK's `rte_pktmbuf_alloc`).
    #[inline]
    pub fn alloc(&self) -> Result<Mbuf<'_>, MbufError> {
        let m = self.entry.mp.get()?.cast::<MbufHeader>();
        // SAFETY: a free mbuf of this pool, now ours.
        unsafe {
            reset_fresh(m);
            Ok(Mbuf::from_owned(m))
        }
    }

    /// Asks for both header lines of every mbuf of a bulk from a pool
    /// without a cache before the reset touches the first. Such a pool
    /// hands its mbufs out in ring order, oldest first, so each header
    /// is cold (the pool is larger than the caches); the reset's loop
    /// then waited for one or two misses per mbuf in turn (a bulk of 32
    /// took 1.3 ns more per mbuf than from a cache, DPDK's 0.7 ns).
    /// With a cache, the mbufs are the ones just freed, already near:
    /// nothing to ask. Below [`PREFETCH_FROM`] mbufs the reset loop fits
    /// the core's reorder window, whose misses overlap by themselves.
    #[inline(always)]
    fn prefetch_cold(&self, objs: &[*mut u8]) {
        #[cfg(target_arch = "x86_64")]
        if objs.len() >= PREFETCH_FROM && self.entry.mp.cache_size() == 0 {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            for &p in objs {
                // SAFETY: a prefetch is a hint: it reads nothing and
                // cannot fault, whatever the address.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast::<i8>());
                }
            }
        }
    }

    /// Exactly `n` mbufs appended to `out`, or none (DPDK's
    /// `rte_pktmbuf_alloc_bulk`).
    #[inline]
    pub fn alloc_bulk<'a>(&'a self, out: &mut Vec<Mbuf<'a>>, n: usize) -> Result<(), MbufError> {
        out.reserve(n);
        let len = out.len();
        let spare = &mut out.spare_capacity_mut()[..n];
        for slot in spare.iter_mut() {
            // Null first: the slots become a slice of initialised pointers.
            slot.write(Mbuf::dangling());
        }
        // SAFETY: `Mbuf` is a transparent non-null pointer, so n
        // initialised slots are n initialised `*mut u8`s; objects get_bulk
        // writes are never null.
        let objs =
            unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<*mut u8>(), n) };
        self.entry.mp.get_bulk(objs)?;
        self.prefetch_cold(objs);
        for &p in objs.iter() {
            // SAFETY: free mbufs of this pool, now ours.
            unsafe { reset_fresh(p.cast()) };
        }
        // SAFETY: the n slots hold owned mbufs.
        unsafe { out.set_len(len + n) };
        Ok(())
    }

    /// `n` raw mbufs into `out[..n]` (all or none), reset, refcount 1: for
    /// code that passes them on as raw pointers (rings, C).
    ///
    /// # Safety
    /// The caller owns the mbufs: each must be freed exactly once (through
    /// [`Mbuf::from_raw`] and a drop, or [`free_bulk_raw`]).
    #[inline]
    pub unsafe fn alloc_bulk_raw(&self, out: &mut [*mut MbufHeader]) -> Result<(), MbufError> {
        // SAFETY: *mut MbufHeader and *mut u8 have the same layout.
        let objs =
            unsafe { &mut *(std::ptr::from_mut::<[*mut MbufHeader]>(out) as *mut [*mut u8]) };
        self.entry.mp.get_bulk(objs)?;
        self.prefetch_cold(objs);
        for &m in out.iter() {
            // SAFETY: free mbufs of this pool, now the caller's.
            unsafe { reset_fresh(m) };
        }
        Ok(())
    }

    /// Frees the pool (every process's handles become dangling, as with
    /// DPDK). Refused, changing nothing, while mbufs are out (the calling
    /// thread's cache is flushed first) or while other handles of the
    /// pool are open in this process.
    pub fn free(self) -> Result<(), MbufError> {
        self.entry.mp.cache_flush()?;
        let in_use = self.entry.mp.in_use_count();
        if in_use != 0 {
            return Err(MempoolError::InUse {
                name: self.name().to_string(),
                in_use,
                n: self.size(),
            }
            .into());
        }
        let entry = {
            let mut open = OPEN
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let i = open
                .iter()
                .position(|r| Arc::ptr_eq(&r.entry, &self.entry))
                .expect("an open handle is registered");
            if open[i].handles > 1 {
                return Err(MbufError::PoolBusy {
                    name: self.name().to_string(),
                    handles: open[i].handles,
                });
            }
            open.swap_remove(i);
            GENERATION.fetch_add(1, Ordering::AcqRel);
            let this = std::mem::ManuallyDrop::new(self);
            // SAFETY: `this` is never used or dropped again.
            unsafe { std::ptr::read(&raw const this.entry) }
        };
        let entry = Arc::try_unwrap(entry).map_err(|_| MbufError::PoolBusy {
            name: String::new(),
            handles: 2,
        })?;
        Ok(entry.mp.free()?)
    }

    /// Frees mbufs (chains included) of any open pools (DPDK's
    /// `rte_pktmbuf_free_bulk`): see [`Mbuf::free_bulk`].
    pub fn free_bulk<'a>(mbufs: impl IntoIterator<Item = Mbuf<'a>>) {
        Mbuf::free_bulk(mbufs);
    }

    /// Frees raw mbufs: see [`free_bulk_raw`].
    ///
    /// # Safety
    /// As [`free_bulk_raw`].
    pub unsafe fn free_bulk_raw(mbufs: &[*mut MbufHeader]) {
        // SAFETY: the caller's contract.
        unsafe { free_bulk_raw(mbufs) };
    }
}

impl Clone for MbufPool<'_> {
    fn clone(&self) -> Self {
        let mut open = OPEN
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = open.iter_mut().find(|r| Arc::ptr_eq(&r.entry, &self.entry)) {
            r.handles += 1;
        }
        Self {
            entry: self.entry.clone(),
            _mem: PhantomData,
        }
    }
}

impl Drop for MbufPool<'_> {
    fn drop(&mut self) {
        let removed = {
            let mut open = OPEN
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(i) = open.iter().position(|r| Arc::ptr_eq(&r.entry, &self.entry)) else {
                return;
            };
            open[i].handles -= 1;
            if open[i].handles == 0 {
                GENERATION.fetch_add(1, Ordering::AcqRel);
                Some(open.swap_remove(i))
            } else {
                None
            }
        };
        // The entry (and its Mempool) drops here, outside the lock, while
        // the Memory is still alive (this handle borrows it).
        drop(removed);
    }
}

/// A fresh header as `rte_pktmbuf_init` leaves it, buffer fields aside.
fn init_header(pool: usize, priv_size: u16) -> MbufHeader {
    MbufHeader {
        buf_addr: std::ptr::null_mut(),
        buf_iova: 0,
        data_off: 0,
        refcnt: std::sync::atomic::AtomicU16::new(0),
        nb_segs: 1,
        port: PORT_INVALID,
        ol_flags: 0,
        packet_type: 0,
        pkt_len: 0,
        data_len: 0,
        vlan_tci: 0,
        hash: [0; 2],
        vlan_tci_outer: 0,
        buf_len: 0,
        pool,
        next: std::ptr::null_mut(),
        tx_offload: 0,
        shinfo: std::ptr::null_mut(),
        priv_size,
        timesync: 0,
        dynfield1: [0; crate::layout::DYNFIELD_WORDS],
    }
}

/// Bulks from a pool without a cache of at least this many mbufs are
/// prefetched before their reset (`MbufPool::prefetch_cold`).
const PREFETCH_FROM: usize = 16;

/// `rte_pktmbuf_reset` of an mbuf just taken from its pool, refcount 1,
/// in four wide stores and one read-modify-write where field-by-field
/// code made ten: stores were what an alloc cost (without the reset a
/// bulk alloc + free ran 1.2-1.5x faster). The stores cover, by offset:
///
/// - `[16, 32)`: data_off (headroom, or the buffer length if shorter),
///   refcnt 1, nb_segs 1, port invalid, ol_flags (only `EXTERNAL` kept);
/// - `[32, 54)`: packet_type, pkt_len, data_len, vlan_tci, hash and
///   vlan_tci_outer, all 0 (DPDK leaves the last user's hash; a fresh
///   mbuf reads 0 here);
/// - `[64, 80)`: next null, tx_offload 0.
///
/// buf_len, pool and the rest keep their values.
///
/// # Safety
/// `m` is a free mbuf (refcount 0) the caller now owns.
#[inline(always)]
pub(crate) unsafe fn reset_fresh(m: *mut MbufHeader) {
    use std::mem::offset_of;
    const DATA_OFF: usize = offset_of!(MbufHeader, data_off);
    const { assert!(cfg!(target_endian = "little")) };
    const {
        assert!(DATA_OFF == 16);
        assert!(offset_of!(MbufHeader, refcnt) == DATA_OFF + 2);
        assert!(offset_of!(MbufHeader, nb_segs) == DATA_OFF + 4);
        assert!(offset_of!(MbufHeader, port) == DATA_OFF + 6);
        assert!(offset_of!(MbufHeader, ol_flags) == DATA_OFF + 8);
        assert!(offset_of!(MbufHeader, packet_type) == 32);
        assert!(offset_of!(MbufHeader, vlan_tci_outer) == 52);
        assert!(offset_of!(MbufHeader, buf_len) == 54);
        assert!(offset_of!(MbufHeader, next) == 64);
        assert!(offset_of!(MbufHeader, tx_offload) == 72);
    };
    // SAFETY: the caller owns the mbuf; reading two plain fields.
    let (buf_len, flags) = unsafe { ((*m).buf_len, (*m).ol_flags) };
    let head = u64::from(HEADROOM.min(buf_len)) | 1 << 16 | 1 << 32 | u64::from(PORT_INVALID) << 48;
    let base = m.cast::<u8>();
    // SAFETY: the caller owns the mbuf exclusively (nobody reads or writes
    // it concurrently, the refcount included), and the ranges lie inside
    // its 128-byte header (offsets asserted above); every field written
    // gets a valid value of its type.
    unsafe {
        base.add(DATA_OFF)
            .cast::<[u64; 2]>()
            .write_unaligned([head, flags & ol_flags::EXTERNAL]);
        base.add(32).cast::<[u64; 2]>().write_unaligned([0, 0]);
        base.add(46).cast::<u64>().write_unaligned(0);
        base.add(64).cast::<[u64; 2]>().write_unaligned([0, 0]);
    }
}
