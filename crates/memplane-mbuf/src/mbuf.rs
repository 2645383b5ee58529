//! The owned mbuf and its operations (DPDK's `rte_pktmbuf_*`).

// Hot-path helpers are tiny and must inline into alloc/free.
#![allow(clippy::inline_always)]
// Mbuf headers are mempool elements, 64-byte aligned: casts are aligned.
#![allow(clippy::cast_ptr_alignment)]

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use crate::layout::{
    ol_flags, ExtSharedInfo, MbufHeader, DYNFIELD_WORDS, HEADROOM, MAX_NB_SEGS, MBUF_HEADER_SIZE,
    SHINFO_PINNED,
};
use crate::pool::{find_pool, MbufPool, PoolEntry};
use crate::MbufError;

/// An owned packet buffer (one reference to an mbuf chain), returned to
/// its pool(s) on drop.
///
/// The lifetime is that of the [`MbufPool`] handle it came from (or was
/// adopted with, [`Mbuf::from_raw`]): the free path finds each segment's
/// pool by the header's pool address in this process's map of open pools,
/// and a handle keeps its pool in that map.
#[repr(transparent)]
pub struct Mbuf<'p> {
    ptr: NonNull<MbufHeader>,
    _pool: PhantomData<&'p ()>,
}

// SAFETY: an Mbuf is the unique owner of its header (shared buffers are
// read-only, refcounts are atomic); the pools it frees into are Sync.
unsafe impl Send for Mbuf<'_> {}
// SAFETY: `&Mbuf` only reads the header and the data; the refcount
// updates it allows (clone, attach) are atomic.
unsafe impl Sync for Mbuf<'_> {}

impl std::fmt::Debug for Mbuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mbuf")
            .field("addr", &self.ptr)
            .field("pkt_len", &self.pkt_len())
            .field("nb_segs", &self.nb_segs())
            .field("refcnt", &self.refcnt())
            .finish_non_exhaustive()
    }
}

/// A [`Mbuf::chain`] that was refused: the error and both mbufs, unchanged.
#[derive(Debug)]
pub struct ChainError<'p> {
    /// Why.
    pub error: MbufError,
    /// The head, as it was.
    pub head: Mbuf<'p>,
    /// The tail, as it was.
    pub tail: Mbuf<'p>,
}

impl std::fmt::Display for ChainError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ChainError<'_> {}

// ---------------------------------------------------------------------
// Raw helpers. Every one takes live mbuf headers of open pools.
// ---------------------------------------------------------------------

#[inline(always)]
unsafe fn hdr<'a>(m: *mut MbufHeader) -> &'a mut MbufHeader {
    // SAFETY: the caller passes a live header it may write.
    unsafe { &mut *m }
}

#[inline(always)]
fn is_direct(h: &MbufHeader) -> bool {
    h.ol_flags & (ol_flags::INDIRECT | ol_flags::EXTERNAL) == 0
}

/// `m` is a pinned-external-buffer pool's mbuf and owns its buffer.
#[inline(always)]
unsafe fn is_pinned(m: *mut MbufHeader) -> bool {
    // SAFETY: live header; shinfo is valid when EXTERNAL is set.
    unsafe {
        let h = &*m;
        h.ol_flags & ol_flags::EXTERNAL != 0
            && !h.shinfo.is_null()
            && (*h.shinfo).kind == SHINFO_PINNED
            && (*h.shinfo).fcb_opaque == m.cast()
    }
}

/// The direct mbuf whose buffer indirect `m` uses (`rte_mbuf_from_indirect`;
/// attach makes the private sizes equal).
#[inline(always)]
fn direct_of(h: &MbufHeader) -> *mut MbufHeader {
    (h.buf_addr as usize - h.priv_size as usize - MBUF_HEADER_SIZE) as *mut MbufHeader
}

/// Why segment `m`'s bytes may not be written, if so.
fn not_writable(h: &MbufHeader) -> Option<&'static str> {
    if h.ol_flags & ol_flags::INDIRECT != 0 {
        return Some("an indirect mbuf uses another mbuf's buffer");
    }
    if h.refcnt.load(Ordering::Acquire) != 1 {
        return Some("indirect mbufs are attached to it (refcount > 1)");
    }
    if h.ol_flags & ol_flags::EXTERNAL != 0
        // SAFETY: shinfo is valid when EXTERNAL is set.
        && unsafe { (*h.shinfo).refcnt.load(Ordering::Acquire) } != 1
    {
        return Some("its external buffer is attached to other mbufs");
    }
    None
}

/// Puts `m` (refcount 0, single segment) into its pool.
#[inline(always)]
unsafe fn put_one(m: *mut MbufHeader) {
    // SAFETY: live header.
    let pool = unsafe { (*m).pool };
    if let Some(e) = find_pool(pool) {
        // SAFETY: the pool is open while the mbuf's handle lives (the
        // caller holds it).
        let e = unsafe { &*e };
        if let Err(err) = e.mp.put(m.cast()) {
            put_failed(&err, 1);
        }
    } else {
        pool_not_open(pool, 1);
    }
}

/// Restores `m`'s own buffer (after its attached one was released).
unsafe fn restore_own_buffer(m: *mut MbufHeader) {
    // SAFETY: live header we may write.
    let h = unsafe { hdr(m) };
    let Some(e) = find_pool(h.pool) else {
        tracing::error!(mbuf = ?m, "mbuf's pool is not open: its buffer cannot be restored");
        return;
    };
    // SAFETY: the pool is open (the caller holds a handle).
    let e: &PoolEntry = unsafe { &*e };
    let own = MBUF_HEADER_SIZE + e.priv_size as usize;
    h.priv_size = e.priv_size;
    h.buf_addr = (m as usize + own) as *mut u8;
    let iova = e.obj_iova(m);
    h.buf_iova = if iova == memplane::iova::BAD_IOVA {
        iova
    } else {
        iova + own as u64
    };
    h.buf_len = e.data_room;
    h.data_off = HEADROOM.min(h.buf_len);
    h.data_len = 0;
    h.ol_flags = 0;
    h.shinfo = std::ptr::null_mut();
}

/// Drops one user of an external buffer; the last one calls the free
/// callback or, for a pinned buffer, returns its mbuf to its pool.
unsafe fn ext_release(shinfo: *mut ExtSharedInfo, buf_addr: *mut u8) {
    // SAFETY: a live shared info with at least one user (us).
    let s = unsafe { &*shinfo };
    if s.refcnt.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    if s.kind == SHINFO_PINNED {
        let p = s.fcb_opaque.cast::<MbufHeader>();
        s.refcnt.store(1, Ordering::Relaxed);
        // SAFETY: the pinned mbuf was freed by its owner (refcount 0) and
        // waited for its buffer's last user: us.
        unsafe {
            let ph = hdr(p);
            ph.next = std::ptr::null_mut();
            ph.nb_segs = 1;
            put_one(p);
        }
    } else if let Some(cb) = s.free_cb {
        // SAFETY: the buffer's owner gave this callback for exactly this
        // moment: the last user let go.
        unsafe { cb(buf_addr, s.fcb_opaque) };
    }
}

/// Releases the buffer `m` is attached to and gives `m` back its own
/// (`rte_pktmbuf_detach`); nothing for a direct or pinned mbuf.
unsafe fn detach_raw(m: *mut MbufHeader) {
    // SAFETY: live header we may write.
    let h = unsafe { hdr(m) };
    // SAFETY: live header.
    if is_direct(h) || unsafe { is_pinned(m) } {
        return;
    }
    if h.ol_flags & ol_flags::EXTERNAL != 0 {
        // SAFETY: EXTERNAL: shinfo is live and counts us.
        unsafe { ext_release(h.shinfo, h.buf_addr) };
    } else {
        let md = direct_of(h);
        // SAFETY: the direct mbuf is alive while we hold a reference.
        let d = unsafe { hdr(md) };
        if d.refcnt.fetch_sub(1, Ordering::AcqRel) == 1 {
            d.next = std::ptr::null_mut();
            d.nb_segs = 1;
            // SAFETY: refcount 0: nobody else holds it.
            unsafe { put_one(md) };
        }
    }
    // SAFETY: as above.
    unsafe { restore_own_buffer(m) };
}

/// Out of line: the log macro's code stays out of the free loops.
#[cold]
#[inline(never)]
fn freed_twice(m: *mut MbufHeader) {
    tracing::error!(mbuf = ?m, "free of an mbuf with refcount 0 (freed twice?): ignored");
}

/// `rte_pktmbuf_prefree_seg`: drops one reference to segment `m`; true
/// when `m` is now free and must go back to its pool (refcount 0, single
/// segment, own buffer). `lone`: `m` is known to have no next segment (a
/// chain head with `nb_segs` 1), so its second cache line is not read.
#[inline(always)]
unsafe fn prefree_seg(m: *mut MbufHeader, lone: bool) -> bool {
    // SAFETY: live header.
    let h = unsafe { hdr(m) };
    let r = h.refcnt.load(Ordering::Acquire);
    let last = match r {
        1 => true,
        0 => {
            freed_twice(m);
            return false;
        }
        _ => h.refcnt.fetch_sub(1, Ordering::AcqRel) == 1,
    };
    if !last {
        return false;
    }
    if !is_direct(h) {
        // SAFETY: as above.
        if unsafe { is_pinned(m) } {
            // SAFETY: pinned: shinfo is ours and live.
            let s = unsafe { &*h.shinfo };
            if s.refcnt.load(Ordering::Acquire) != 1 && s.refcnt.fetch_sub(1, Ordering::AcqRel) != 1
            {
                // Attached mbufs still use the buffer: the last of them
                // returns this mbuf to the pool.
                h.next = std::ptr::null_mut();
                h.nb_segs = 1;
                h.refcnt.store(0, Ordering::Release);
                return false;
            }
            s.refcnt.store(1, Ordering::Relaxed);
        } else {
            // SAFETY: as above.
            unsafe { detach_raw(m) };
        }
    }
    // As DPDK: write only what differs (the common single-segment mbuf
    // keeps its second cache line clean here); a lone head has nothing
    // to reset and its second line is not even read.
    if !lone {
        if !h.next.is_null() {
            h.next = std::ptr::null_mut();
        }
        if h.nb_segs != 1 {
            h.nb_segs = 1;
        }
    }
    h.refcnt.store(0, Ordering::Relaxed);
    true
}

/// The next segment of `s` and whether `s` is a lone segment: a chain
/// head whose `nb_segs` is 1 has no next segment (the chain invariant
/// every operation keeps), so the common single-segment free reads only
/// the mbuf's first cache line, where DPDK also reads `next` in the
/// second.
///
/// # Safety
/// `s` is a live segment; `head`: it is the head of its chain.
#[inline(always)]
unsafe fn next_of(s: *mut MbufHeader, head: bool) -> (*mut MbufHeader, bool) {
    // SAFETY: live header.
    let h = unsafe { &*s };
    if head && h.nb_segs == 1 {
        debug_assert!(h.next.is_null(), "a head with nb_segs 1 has a next segment");
        (std::ptr::null_mut(), true)
    } else {
        (h.next, false)
    }
}

/// Frees every segment of the chain at `m` (`rte_pktmbuf_free`).
/// `head`: `m` heads its chain (its `nb_segs` counts the chain); false
/// for the rest of a chain cut after its first segment.
unsafe fn free_chain(m: *mut MbufHeader, head: bool) {
    let mut s = m;
    let mut head = head;
    while !s.is_null() {
        // SAFETY: segments of a live chain; `m` is its head.
        let (next, lone) = unsafe { next_of(s, head) };
        head = false;
        // SAFETY: as above.
        if unsafe { prefree_seg(s, lone) } {
            // SAFETY: free now.
            unsafe { put_one(s) };
        }
        s = next;
    }
}

/// Segments gathered per pool before one bulk put.
const PENDING: usize = 64;

/// [`free_chains`] over a slice. Bursts of [`FREE_OUT_OF_LINE`] or more
/// go out of line, where the loop gets its registers to itself whatever
/// the caller keeps live (inlined into a burst loop it spilled the
/// current pool and the batch length: owned `Vec` bursts of 32 trailed
/// raw-pointer ones by 5-15% for that alone); smaller ones stay inline,
/// where the call would cost more than the spills (bulk 1: -15%).
///
/// # Safety
/// As [`free_chains`].
#[inline(always)]
unsafe fn free_heads(heads: &[*mut MbufHeader]) {
    #[inline(never)]
    unsafe fn out_of_line(heads: &[*mut MbufHeader]) {
        // SAFETY: the caller's contract.
        unsafe { free_chains(heads.iter().copied(), first_pool(heads)) };
    }
    // SAFETY: the caller's contract.
    unsafe {
        if heads.len() >= FREE_OUT_OF_LINE {
            out_of_line(heads);
        } else {
            free_chains(heads.iter().copied(), first_pool(heads));
        }
    }
}

/// See [`free_heads`].
const FREE_OUT_OF_LINE: usize = 8;

/// The pool of the first head (0 for none), so that `free_chains`
/// gathers even the first mbuf on its fast path: choosing the pool there
/// instead, per mbuf, cost 10% at bulk 32.
///
/// # Safety
/// Each non-null head is a live mbuf.
#[inline(always)]
unsafe fn first_pool(heads: &[*mut MbufHeader]) -> usize {
    match heads.first() {
        // SAFETY: a live head (the caller).
        Some(&m) if !m.is_null() => unsafe { (*m).pool },
        _ => 0,
    }
}

/// Frees the chains at `heads`, returning segments to their pools in
/// batches, one pool at a time (`rte_pktmbuf_free_bulk`). `first_pool`:
/// the pool the batch starts with (any value is correct; the first
/// head's saves it a trip through the general loop). The batch's
/// length and pool are plain locals, apart from the array the put
/// reads: kept in one struct with it, they lived in memory and every
/// segment paid a store-to-load round trip on the length.
///
/// # Safety
/// Each head is an allocated mbuf chain the caller owns (one reference)
/// or null, freed exactly once, and the pool of every segment is open
/// in this process.
#[inline(always)]
unsafe fn free_chains(heads: impl Iterator<Item = *mut MbufHeader>, first_pool: usize) {
    let mut objs = [const { MaybeUninit::<*mut u8>::uninit() }; PENDING];
    let mut len = 0usize;
    let mut pool = first_pool;
    for m in heads {
        // The common case in a few not-taken branches and no taken one
        // but the loop's: a lone, direct mbuf we hold the only reference
        // to, of the pool being gathered, with room left. The general
        // loop below handles it too, but with six taken branches per
        // mbuf its speed hung on where the linker put it (the same code
        // at another address: 15% slower, on Zen 5); this path is 40-85%
        // faster than its best placement at bulk 32.
        if !m.is_null() {
            // SAFETY: a live head the caller owns (one reference).
            let h = unsafe { hdr(m) };
            if h.nb_segs == 1
                && h.refcnt.load(Ordering::Acquire) == 1
                && is_direct(h)
                && h.pool == pool
                && len < PENDING
            {
                // As `prefree_seg` for a lone direct segment: the
                // chain invariant makes `next` null, nothing to reset.
                debug_assert!(h.next.is_null(), "a head with nb_segs 1 has a next segment");
                h.refcnt.store(0, Ordering::Relaxed);
                objs[len].write(m.cast());
                len += 1;
                continue;
            }
        }
        let mut s = m;
        let mut head = true;
        while !s.is_null() {
            // SAFETY: segments of a live chain the caller owns; `m` is
            // its head.
            let ((next, lone), seg_pool) = unsafe { (next_of(s, head), (*s).pool) };
            head = false;
            // SAFETY: as above.
            if unsafe { prefree_seg(s, lone) } {
                if len == PENDING || (len != 0 && seg_pool != pool) {
                    // SAFETY: the first `len` slots were written below.
                    unsafe { put_pending(&objs, len, pool) };
                    len = 0;
                }
                pool = seg_pool;
                objs[len].write(s.cast());
                len += 1;
            }
            s = next;
        }
    }
    if len != 0 {
        // SAFETY: as above.
        unsafe { put_pending(&objs, len, pool) };
    }
}

/// Puts the first `len` gathered segments into their pool (header at
/// `pool`).
///
/// # Safety
/// `objs[..len]` are written: free mbufs (refcount 0) of that pool.
#[inline(always)]
unsafe fn put_pending(objs: &[MaybeUninit<*mut u8>; PENDING], len: usize, pool: usize) {
    // SAFETY: the first `len` slots are written (the caller).
    let objs = unsafe { std::slice::from_raw_parts(objs.as_ptr().cast::<*mut u8>(), len) };
    if let Some(e) = find_pool(pool) {
        // SAFETY: the pool is open while its mbufs' handle lives.
        let e = unsafe { &*e };
        if let Err(err) = e.mp.put_bulk(objs) {
            put_failed(&err, objs.len());
        }
    } else {
        pool_not_open(pool, objs.len());
    }
}

#[cold]
#[inline(never)]
fn put_failed(err: &memplane_mempool::MempoolError, n: usize) {
    tracing::error!(error = %err, n, "mbufs not returned to their pool");
}

#[cold]
#[inline(never)]
fn pool_not_open(pool: usize, n: usize) {
    tracing::error!(
        pool,
        n,
        "mbufs' pool is not open in this process: mbufs leaked"
    );
}

/// Frees raw mbufs (chains included), segments returned to their own pools
/// in batches, refcounts respected (`rte_pktmbuf_free_bulk`). Null
/// pointers are skipped.
///
/// # Safety
/// Each pointer is an allocated mbuf (the head of its chain, whose
/// `nb_segs` counts the chain) the caller owns (one reference),
/// freed exactly once, and the pool of every segment is open in this
/// process.
#[inline]
pub unsafe fn free_bulk_raw(mbufs: &[*mut MbufHeader]) {
    // SAFETY: the caller's contract.
    unsafe { free_heads(mbufs) };
}

/// Adds `delta` to a refcount, refusing a result outside 1..=u16::MAX.
fn refcnt_add(h: &MbufHeader, delta: i32) -> Result<u16, MbufError> {
    h.refcnt
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            let v = i32::from(r) + delta;
            (r != 0 && (1..=i32::from(u16::MAX)).contains(&v)).then_some(v as u16)
        })
        .map(|old| (i32::from(old) + delta) as u16)
        .map_err(|refcnt| MbufError::BadRefcnt { refcnt, delta })
}

/// Attaches fresh direct `mi` (refcount 1, one segment, own buffer) to
/// `m`'s buffer (`rte_pktmbuf_attach`), after the compatibility checks.
unsafe fn attach_raw(mi: *mut MbufHeader, m: *mut MbufHeader) -> Result<(), MbufError> {
    // SAFETY: live headers; `mi` is ours to write.
    let (hi, hm) = unsafe { (&*mi, &*m) };
    if !is_direct(hi) {
        return Err(MbufError::Incompatible {
            why: "the mbuf to attach has a buffer of its own to keep (indirect, external or pinned: a pinned-external-buffer pool cannot hold clones)".into(),
        });
    }
    if hm.refcnt.load(Ordering::Acquire) == 0 {
        return Err(MbufError::NotAllocated { addr: m as usize });
    }
    let (Some(ei), Some(em)) = (find_pool(hi.pool), find_pool(hm.pool)) else {
        return Err(MbufError::Incompatible {
            why: "a pool of the two mbufs is not open in this process".into(),
        });
    };
    // SAFETY: both pools are open (the callers' handles).
    let (ei, em) = unsafe { (&*ei, &*em) };
    if !std::ptr::eq(ei.mp.memory(), em.mp.memory()) {
        return Err(MbufError::Incompatible {
            why: "the mbufs belong to different memplane instances".into(),
        });
    }
    if hm.ol_flags & ol_flags::EXTERNAL != 0 {
        // SAFETY: EXTERNAL: shinfo is live.
        let s = unsafe { &*hm.shinfo };
        s.refcnt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r != 0 && r < u16::MAX).then_some(r + 1)
            })
            .map_err(|refcnt| MbufError::BadRefcnt { refcnt, delta: 1 })?;
    } else {
        let md = if hm.ol_flags & ol_flags::INDIRECT != 0 {
            direct_of(hm)
        } else {
            m
        };
        if hi.priv_size != hm.priv_size {
            return Err(MbufError::Incompatible {
                why: format!(
                    "private sizes differ ({} vs {}): an indirect mbuf finds its direct mbuf by its own private size",
                    hi.priv_size, hm.priv_size
                ),
            });
        }
        // SAFETY: the direct mbuf is alive (m holds a reference to it).
        refcnt_add(unsafe { &*md }, 1)?;
    }
    // SAFETY: as above; nothing can fail from here.
    let (hi, hm) = unsafe { (hdr(mi), &*m) };
    if hm.ol_flags & ol_flags::EXTERNAL != 0 {
        hi.ol_flags = hm.ol_flags;
        hi.shinfo = hm.shinfo;
    } else {
        hi.ol_flags = hm.ol_flags | ol_flags::INDIRECT;
        hi.priv_size = hm.priv_size;
    }
    hi.buf_iova = hm.buf_iova;
    hi.buf_addr = hm.buf_addr;
    hi.buf_len = hm.buf_len;
    hi.next = std::ptr::null_mut();
    hi.data_off = hm.data_off;
    hi.data_len = hm.data_len;
    hi.port = hm.port;
    hi.vlan_tci = hm.vlan_tci;
    hi.vlan_tci_outer = hm.vlan_tci_outer;
    hi.tx_offload = hm.tx_offload;
    hi.hash = hm.hash;
    hi.packet_type = hm.packet_type;
    hi.timesync = hm.timesync;
    hi.dynfield1 = hm.dynfield1;
    hi.pkt_len = u32::from(hi.data_len);
    hi.nb_segs = 1;
    Ok(())
}

/// A segment of a chain, read-only.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    h: &'a MbufHeader,
}

impl<'a> Segment<'a> {
    /// The segment's data bytes.
    pub fn data(&self) -> &'a [u8] {
        // SAFETY: [buf_addr + data_off, + data_len) lies in the buffer.
        unsafe {
            std::slice::from_raw_parts(
                self.h.buf_addr.add(self.h.data_off as usize),
                self.h.data_len as usize,
            )
        }
    }
    /// The segment's header.
    pub fn header(&self) -> &'a MbufHeader {
        self.h
    }
    /// Bytes free before the data.
    pub fn headroom(&self) -> u16 {
        self.h.data_off
    }
    /// Bytes free after the data.
    pub fn tailroom(&self) -> u16 {
        self.h.buf_len - self.h.data_off - self.h.data_len
    }
    /// Whether the segment's buffer is another mbuf's (indirect).
    pub fn is_indirect(&self) -> bool {
        self.h.ol_flags & ol_flags::INDIRECT != 0
    }
    /// IOVA of the data (`rte_mbuf_data_iova`).
    pub fn data_iova(&self) -> u64 {
        self.h.buf_iova + u64::from(self.h.data_off)
    }
}

/// Iterator over a chain's segments.
pub struct Segments<'a> {
    next: *const MbufHeader,
    _m: PhantomData<&'a MbufHeader>,
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;
    fn next(&mut self) -> Option<Segment<'a>> {
        // SAFETY: segments of a chain borrowed for 'a.
        let h = unsafe { self.next.as_ref()? };
        self.next = h.next;
        Some(Segment { h })
    }
}

impl<'p> Mbuf<'p> {
    /// A placeholder that is never dropped (alloc_bulk overwrites it).
    #[inline(always)]
    pub(crate) fn dangling() -> Self {
        Self {
            ptr: NonNull::dangling(),
            _pool: PhantomData,
        }
    }

    /// Wraps an allocated mbuf the caller owns.
    ///
    /// # Safety
    /// `m` is an allocated mbuf (one reference the caller gives up) of a
    /// pool open for `'p`.
    #[inline(always)]
    pub(crate) unsafe fn from_owned(m: *mut MbufHeader) -> Self {
        Self {
            // SAFETY: objects are never null.
            ptr: unsafe { NonNull::new_unchecked(m) },
            _pool: PhantomData,
        }
    }

    /// Adopts a raw mbuf, e.g. one received through a ring from another
    /// process. Refused when it is not allocated (refcount 0) or its pool
    /// is not open in this process.
    ///
    /// # Safety
    /// `m` points to an mbuf header of this instance that the caller owns
    /// (one reference, given by [`into_raw`](Self::into_raw) or
    /// [`MbufPool::alloc_bulk_raw`], here or in another process), nobody
    /// else uses it, and the pool of every segment (and of every mbuf
    /// they are attached to) stays open in this process for `'p` (`pool`
    /// is one such handle).
    pub unsafe fn from_raw(m: *mut MbufHeader, pool: &'p MbufPool<'_>) -> Result<Self, MbufError> {
        let _ = pool;
        let ptr = NonNull::new(m).ok_or(MbufError::NotAllocated { addr: 0 })?;
        // SAFETY: the caller's contract: a live header.
        let h = unsafe { ptr.as_ref() };
        if h.refcnt.load(Ordering::Acquire) == 0 {
            return Err(MbufError::NotAllocated { addr: m as usize });
        }
        if find_pool(h.pool).is_none() {
            return Err(MbufError::PoolNotOpen {
                addr: m as usize,
                pool: h.pool,
            });
        }
        Ok(Self {
            ptr,
            _pool: PhantomData,
        })
    }

    /// Gives up ownership: the raw header, to pass on (a ring, another
    /// process) and adopt again with [`from_raw`](Self::from_raw).
    pub fn into_raw(self) -> *mut MbufHeader {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    /// The first segment's header.
    pub fn as_ptr(&self) -> *mut MbufHeader {
        self.ptr.as_ptr()
    }

    #[inline(always)]
    fn h(&self) -> &MbufHeader {
        // SAFETY: we own a reference to a live header.
        unsafe { self.ptr.as_ref() }
    }

    #[inline(always)]
    fn hm(&mut self) -> &mut MbufHeader {
        // SAFETY: we own the header (indirect mbufs never write it).
        unsafe { self.ptr.as_mut() }
    }

    /// The header, read-only.
    pub fn header(&self) -> &MbufHeader {
        self.h()
    }

    /// The header, writable.
    ///
    /// # Safety
    /// The buffer, length, chain, refcount, pool and flag fields must stay
    /// consistent (what the safe methods keep).
    pub unsafe fn header_mut(&mut self) -> &mut MbufHeader {
        self.hm()
    }

    /// Frees the chain now (what drop does), segments returned to their
    /// own pools, refcounts respected (`rte_pktmbuf_free`).
    pub fn free(self) {
        drop(self);
    }

    /// Frees mbufs (chains included) in batches per pool
    /// (`rte_pktmbuf_free_bulk`).
    #[inline]
    pub fn free_bulk<'a>(mbufs: impl IntoIterator<Item = Mbuf<'a>>) {
        // SAFETY: each chain was owned by its `Mbuf`, given up here once;
        // the pools are open (the mbufs borrow their handles).
        unsafe { free_chains(mbufs.into_iter().map(Mbuf::into_raw), 0) };
    }

    /// Frees every mbuf of `mbufs` (chains included, in batches per pool,
    /// as [`free_bulk`](Self::free_bulk)) and leaves the vector empty with
    /// its capacity: the companion of
    /// [`MbufPool::alloc_bulk`](crate::MbufPool::alloc_bulk) for a burst
    /// loop, without an iterator adapter between the vector and the free.
    ///
    /// ```no_run
    /// # fn burst(pool: &memplane_mbuf::MbufPool<'_>) -> Result<(), memplane_mbuf::MbufError> {
    /// use memplane_mbuf::Mbuf;
    /// let mut burst = Vec::with_capacity(32);
    /// pool.alloc_bulk(&mut burst, 32)?;
    /// // ... fill and send, or drop ...
    /// Mbuf::free_vec(&mut burst);
    /// assert!(burst.is_empty());
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn free_vec(mbufs: &mut Vec<Mbuf<'_>>) {
        let n = mbufs.len();
        // SAFETY: the vector forgets its n mbufs before they are freed
        // (set_len(0) first, so a panic cannot free them twice); `Mbuf`
        // is a transparent non-null `*mut MbufHeader`, so the n slots read
        // as n raw heads, each owned (one reference) and freed once here;
        // their pools are open (the mbufs borrow their handles).
        unsafe {
            mbufs.set_len(0);
            let heads = std::slice::from_raw_parts(mbufs.as_ptr().cast::<*mut MbufHeader>(), n);
            free_heads(heads);
        }
    }

    /// Bytes of the whole chain.
    pub fn pkt_len(&self) -> u32 {
        self.h().pkt_len
    }

    /// Bytes of the first segment.
    pub fn data_len(&self) -> u16 {
        self.h().data_len
    }

    /// Segments in the chain.
    pub fn nb_segs(&self) -> u16 {
        self.h().nb_segs
    }

    /// Refcount of the first segment.
    pub fn refcnt(&self) -> u16 {
        self.h().refcnt.load(Ordering::Acquire)
    }

    /// Adds `delta` to the first segment's refcount
    /// (`rte_mbuf_refcnt_update`); the result must stay in 1..=65535.
    ///
    /// # Safety
    /// Each extra reference must be given up exactly once (a raw pointer
    /// adopted with [`from_raw`](Self::from_raw) elsewhere, or a negative
    /// update); two `Mbuf`s over one header must not both be used mutably.
    pub unsafe fn refcnt_update(&self, delta: i32) -> Result<u16, MbufError> {
        refcnt_add(self.h(), delta)
    }

    /// Bytes free before the data (`rte_pktmbuf_headroom`).
    pub fn headroom(&self) -> u16 {
        self.h().data_off
    }

    /// Bytes free after the last segment's data (`rte_pktmbuf_tailroom`).
    pub fn tailroom(&self) -> u16 {
        self.segments().last().map_or(0, |s| s.tailroom())
    }

    /// Whether the first segment is a direct mbuf with its own buffer.
    pub fn is_direct(&self) -> bool {
        is_direct(self.h())
    }

    /// Whether the first segment uses another mbuf's buffer.
    pub fn is_indirect(&self) -> bool {
        self.h().ol_flags & ol_flags::INDIRECT != 0
    }

    /// Whether the first segment has an external buffer (attached, or
    /// pinned by its pool).
    pub fn has_extbuf(&self) -> bool {
        self.h().ol_flags & ol_flags::EXTERNAL != 0
    }

    /// Whether the whole packet is in one segment
    /// (`rte_pktmbuf_is_contiguous`).
    pub fn is_contiguous(&self) -> bool {
        self.h().nb_segs == 1
    }

    /// Pool header address of the first segment.
    pub fn pool_addr(&self) -> usize {
        self.h().pool
    }

    /// Input port.
    pub fn port(&self) -> u16 {
        self.h().port
    }
    /// Sets the input port.
    pub fn set_port(&mut self, port: u16) {
        self.hm().port = port;
    }
    /// Offload flags.
    pub fn ol_flags(&self) -> u64 {
        self.h().ol_flags
    }
    /// Sets the offload flags, keeping the INDIRECT and EXTERNAL bits (the
    /// buffer's ownership) as they are.
    pub fn set_ol_flags(&mut self, flags: u64) {
        let keep = ol_flags::INDIRECT | ol_flags::EXTERNAL;
        let h = self.hm();
        h.ol_flags = (h.ol_flags & keep) | (flags & !keep);
    }
    /// Packet type.
    pub fn packet_type(&self) -> u32 {
        self.h().packet_type
    }
    /// Sets the packet type.
    pub fn set_packet_type(&mut self, t: u32) {
        self.hm().packet_type = t;
    }
    /// VLAN TCI.
    pub fn vlan_tci(&self) -> u16 {
        self.h().vlan_tci
    }
    /// Sets the VLAN TCI.
    pub fn set_vlan_tci(&mut self, v: u16) {
        self.hm().vlan_tci = v;
    }
    /// RSS hash.
    pub fn rss_hash(&self) -> u32 {
        self.h().hash[0]
    }
    /// Sets the RSS hash.
    pub fn set_rss_hash(&mut self, v: u32) {
        self.hm().hash[0] = v;
    }
    /// TX offload lengths.
    pub fn tx_offload(&self) -> u64 {
        self.h().tx_offload
    }
    /// Sets the TX offload lengths.
    pub fn set_tx_offload(&mut self, v: u64) {
        self.hm().tx_offload = v;
    }
    /// Timesync flags.
    pub fn timesync(&self) -> u16 {
        self.h().timesync
    }
    /// Sets the timesync flags.
    pub fn set_timesync(&mut self, v: u16) {
        self.hm().timesync = v;
    }
    /// Dynamic fields.
    pub fn dynfields(&self) -> &[u32; DYNFIELD_WORDS] {
        &self.h().dynfield1
    }
    /// Dynamic fields, writable.
    pub fn dynfields_mut(&mut self) -> &mut [u32; DYNFIELD_WORDS] {
        &mut self.hm().dynfield1
    }

    /// The per-mbuf private area (`rte_mbuf_to_priv`).
    pub fn priv_data(&self) -> &[u8] {
        let h = self.h();
        // SAFETY: priv_size bytes follow the header in the object (attach
        // keeps priv_size equal to the pool's).
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().cast::<u8>().add(MBUF_HEADER_SIZE),
                h.priv_size as usize,
            )
        }
    }

    /// The per-mbuf private area, writable.
    pub fn priv_data_mut(&mut self) -> &mut [u8] {
        let n = self.h().priv_size as usize;
        // SAFETY: as above; we own the header and its private area.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>().add(MBUF_HEADER_SIZE), n)
        }
    }

    /// IOVA of the first segment's data (`rte_mbuf_data_iova`).
    pub fn data_iova(&self) -> u64 {
        self.h().buf_iova + u64::from(self.h().data_off)
    }

    /// The first segment's data (`rte_pktmbuf_mtod`).
    pub fn data(&self) -> &[u8] {
        Segment { h: self.h() }.data()
    }

    /// The first segment's data, writable; refused when the buffer is
    /// shared ([`MbufError::NotWritable`]).
    pub fn data_mut(&mut self) -> Result<&mut [u8], MbufError> {
        let h = self.h();
        if let Some(why) = not_writable(h) {
            return Err(MbufError::NotWritable { why });
        }
        // SAFETY: our own, unshared buffer range.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(h.buf_addr.add(h.data_off as usize), h.data_len as usize)
        })
    }

    /// The chain's segments.
    pub fn segments(&self) -> Segments<'_> {
        Segments {
            next: self.ptr.as_ptr(),
            _m: PhantomData,
        }
    }

    fn last_seg(&self) -> *mut MbufHeader {
        let mut s = self.ptr.as_ptr();
        // SAFETY: segments of our chain.
        while let Some(n) = NonNull::new(unsafe { (*s).next }) {
            s = n.as_ptr();
        }
        s
    }

    /// Whether `append(len)` would succeed.
    pub(crate) fn append_check(&self, len: usize) -> Result<(), MbufError> {
        // SAFETY: a segment of our chain.
        let lh = unsafe { &*self.last_seg() };
        let tailroom = (lh.buf_len - lh.data_off - lh.data_len) as usize;
        if len > tailroom {
            return Err(MbufError::NoTailroom { len, tailroom });
        }
        match not_writable(lh) {
            Some(why) => Err(MbufError::NotWritable { why }),
            None => Ok(()),
        }
    }

    /// The last segment's tailroom (empty when it is shared).
    pub(crate) fn tail_ptr(&mut self) -> (*mut u8, usize) {
        if self.append_check(0).is_err() {
            return (NonNull::dangling().as_ptr(), 0);
        }
        // SAFETY: a segment of our chain, unshared.
        let lh = unsafe { &*self.last_seg() };
        let at = lh.data_off as usize + lh.data_len as usize;
        // SAFETY: `at` <= buf_len: inside the buffer.
        (unsafe { lh.buf_addr.add(at) }, lh.buf_len as usize - at)
    }

    /// Appends `len` bytes to the last segment and returns them to be
    /// filled (`rte_pktmbuf_append`). Refused beyond the tailroom or on a
    /// shared buffer.
    pub fn append(&mut self, len: usize) -> Result<&mut [u8], MbufError> {
        let last = self.last_seg();
        // SAFETY: a segment of our chain.
        let lh = unsafe { &*last };
        let tailroom = (lh.buf_len - lh.data_off - lh.data_len) as usize;
        if len > tailroom {
            return Err(MbufError::NoTailroom { len, tailroom });
        }
        if self.h().pkt_len as usize + len > u32::MAX as usize {
            return Err(MbufError::OutOfRange {
                op: "append",
                off: self.h().pkt_len as usize,
                len,
                pkt_len: self.h().pkt_len as usize,
            });
        }
        if let Some(why) = not_writable(lh) {
            return Err(MbufError::NotWritable { why });
        }
        // SAFETY: our chain; the last segment may be the head (same
        // header, written through one pointer at a time).
        unsafe {
            let at = (*last).data_off as usize + (*last).data_len as usize;
            (*last).data_len += len as u16;
            (*self.ptr.as_ptr()).pkt_len += len as u32;
            Ok(std::slice::from_raw_parts_mut(
                (*last).buf_addr.add(at),
                len,
            ))
        }
    }

    /// Prepends `len` bytes to the first segment and returns them to be
    /// filled (`rte_pktmbuf_prepend`). Refused beyond the headroom or on
    /// a shared buffer.
    pub fn prepend(&mut self, len: usize) -> Result<&mut [u8], MbufError> {
        let h = self.h();
        let headroom = h.data_off as usize;
        if len > headroom {
            return Err(MbufError::NoHeadroom { len, headroom });
        }
        if h.pkt_len as usize + len > u32::MAX as usize {
            return Err(MbufError::OutOfRange {
                op: "prepend",
                off: 0,
                len,
                pkt_len: h.pkt_len as usize,
            });
        }
        if let Some(why) = not_writable(h) {
            return Err(MbufError::NotWritable { why });
        }
        let h = self.hm();
        h.data_off -= len as u16;
        h.data_len += len as u16;
        h.pkt_len += len as u32;
        // SAFETY: our own, unshared buffer range.
        Ok(unsafe { std::slice::from_raw_parts_mut(h.buf_addr.add(h.data_off as usize), len) })
    }

    /// Removes `len` bytes from the start of the first segment
    /// (`rte_pktmbuf_adj`); refused beyond that segment's data.
    pub fn adj(&mut self, len: usize) -> Result<(), MbufError> {
        let h = self.hm();
        if len > h.pkt_len as usize {
            return Err(MbufError::OutOfRange {
                op: "adj",
                off: 0,
                len,
                pkt_len: h.pkt_len as usize,
            });
        }
        if len > h.data_len as usize {
            return Err(MbufError::SegmentTooShort {
                op: "adj",
                len,
                seg_len: h.data_len as usize,
                which: "first",
            });
        }
        h.data_len -= len as u16;
        h.data_off += len as u16;
        h.pkt_len -= len as u32;
        Ok(())
    }

    /// Removes `len` bytes from the end of the last segment
    /// (`rte_pktmbuf_trim`); refused beyond that segment's data.
    pub fn trim(&mut self, len: usize) -> Result<(), MbufError> {
        let pkt_len = self.h().pkt_len as usize;
        if len > pkt_len {
            return Err(MbufError::OutOfRange {
                op: "trim",
                off: pkt_len.saturating_sub(len),
                len,
                pkt_len,
            });
        }
        let last = self.last_seg();
        // SAFETY: a segment of our chain; lengths only.
        unsafe {
            let seg_len = (*last).data_len as usize;
            if len > seg_len {
                return Err(MbufError::SegmentTooShort {
                    op: "trim",
                    len,
                    seg_len,
                    which: "last",
                });
            }
            (*last).data_len -= len as u16;
            (*self.ptr.as_ptr()).pkt_len -= len as u32;
        }
        Ok(())
    }

    /// Chains `tail` after the last segment (`rte_pktmbuf_chain`). Refused
    /// past [`MAX_NB_SEGS`] segments or 4 GiB, handing both back.
    pub fn chain(self, tail: Mbuf<'p>) -> Result<Mbuf<'p>, ChainError<'p>> {
        let (hs, ts) = (u32::from(self.nb_segs()), u32::from(tail.nb_segs()));
        let bytes = u64::from(self.pkt_len()) + u64::from(tail.pkt_len());
        if hs + ts > u32::from(MAX_NB_SEGS) || bytes > u64::from(u32::MAX) {
            return Err(ChainError {
                error: MbufError::TooManySegments {
                    head: hs,
                    tail: ts,
                    bytes,
                    max: MAX_NB_SEGS,
                },
                head: self,
                tail,
            });
        }
        let last = self.last_seg();
        let t = tail.into_raw();
        let mut head = self;
        // SAFETY: our chain's last segment; `t` is now part of the chain.
        unsafe { (*last).next = t };
        let h = head.hm();
        h.nb_segs = (hs + ts) as u16;
        h.pkt_len = bytes as u32;
        Ok(head)
    }

    /// Copies the chain's data into the first segment and frees the other
    /// segments (`rte_pktmbuf_linearize`). Refused when the first segment
    /// is shared or lacks the tailroom.
    pub fn linearize(&mut self) -> Result<(), MbufError> {
        if self.is_contiguous() {
            return Ok(());
        }
        let h = self.h();
        if let Some(why) = not_writable(h) {
            return Err(MbufError::NotWritable { why });
        }
        let room = (h.buf_len - h.data_off) as usize;
        if h.pkt_len as usize > room {
            return Err(MbufError::NoRoom {
                pkt_len: h.pkt_len as usize,
                room,
            });
        }
        let first = self.ptr.as_ptr();
        // SAFETY: our chain; the first segment's buffer is ours alone and
        // holds pkt_len bytes from data_off; the copies come from other
        // buffers (no overlap: a segment never shares the first's buffer,
        // which has refcount 1).
        unsafe {
            let mut dst = (*first)
                .buf_addr
                .add((*first).data_off as usize + (*first).data_len as usize);
            let rest = (*first).next;
            let mut s = rest;
            while !s.is_null() {
                let n = (*s).data_len as usize;
                std::ptr::copy_nonoverlapping((*s).buf_addr.add((*s).data_off as usize), dst, n);
                dst = dst.add(n);
                s = (*s).next;
            }
            (*first).next = std::ptr::null_mut();
            (*first).data_len = (*first).pkt_len as u16;
            (*first).nb_segs = 1;
            free_chain(rest, false);
        }
        Ok(())
    }

    /// `len` bytes from offset `off` (`rte_pktmbuf_read`): a view into the
    /// mbuf when they lie in one segment, else copied into `buf` (which
    /// must hold `len` bytes) and returned from there.
    pub fn read<'a>(
        &'a self,
        off: usize,
        len: usize,
        buf: &'a mut [u8],
    ) -> Result<&'a [u8], MbufError> {
        let pkt_len = self.pkt_len() as usize;
        if off.checked_add(len).is_none_or(|e| e > pkt_len) {
            return Err(MbufError::OutOfRange {
                op: "read",
                off,
                len,
                pkt_len,
            });
        }
        if len == 0 {
            return Ok(&[]);
        }
        let mut segs = self.segments();
        let mut off = off;
        let mut seg = segs.next().map(|s| s.data()).unwrap_or_default();
        while off >= seg.len() {
            off -= seg.len();
            seg = segs.next().map(|s| s.data()).unwrap_or_default();
        }
        if off + len <= seg.len() {
            return Ok(&seg[off..off + len]);
        }
        if buf.len() < len {
            return Err(MbufError::ShortBuffer {
                need: len,
                have: buf.len(),
            });
        }
        let mut done = 0;
        let mut src = &seg[off..];
        loop {
            let n = src.len().min(len - done);
            buf[done..done + n].copy_from_slice(&src[..n]);
            done += n;
            if done == len {
                break;
            }
            src = segs.next().map(|s| s.data()).unwrap_or_default();
        }
        Ok(&buf[..len])
    }

    /// Copies the whole packet out (every segment, in order).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.pkt_len() as usize);
        for s in self.segments() {
            v.extend_from_slice(s.data());
        }
        v
    }

    /// Frees every segment but the first and resets it like a fresh mbuf
    /// (`rte_pktmbuf_reset`); an attached first segment is detached first.
    pub fn reset(&mut self) {
        let m = self.ptr.as_ptr();
        // SAFETY: our chain: the rest is freed, the head detached (it keeps
        // our reference) and reset.
        unsafe {
            let rest = (*m).next;
            (*m).next = std::ptr::null_mut();
            free_chain(rest, false);
            detach_raw(m);
            let r = (*m).refcnt.load(Ordering::Relaxed);
            crate::pool::reset_fresh(m);
            (*m).refcnt.store(r, Ordering::Relaxed);
        }
    }

    /// Attaches this fresh mbuf (direct, one segment, not shared) to
    /// `direct`'s first segment's buffer (`rte_pktmbuf_attach`): it
    /// becomes indirect and the owner of that buffer gets one more
    /// reference. Refused across instances or when the private sizes
    /// differ ([`MbufError::Incompatible`]).
    pub fn attach(&mut self, direct: &Mbuf<'p>) -> Result<(), MbufError> {
        let h = self.h();
        if !is_direct(h) || h.nb_segs != 1 || h.refcnt.load(Ordering::Acquire) != 1 {
            return Err(MbufError::Incompatible {
                why: "only a direct, single-segment, unshared mbuf can be attached".into(),
            });
        }
        // SAFETY: self is ours (checked fresh); `direct` is alive.
        unsafe { attach_raw(self.ptr.as_ptr(), direct.ptr.as_ptr()) }?;
        Ok(())
    }

    /// Detaches the first segment from the buffer it is attached to and
    /// gives it back its own, empty (`rte_pktmbuf_detach`); the buffer's
    /// owner loses a reference (and is freed, or its callback called, if
    /// that was the last). Refused on a direct or pinned mbuf.
    pub fn detach(&mut self) -> Result<(), MbufError> {
        let m = self.ptr.as_ptr();
        // SAFETY: our header.
        if is_direct(self.h()) || unsafe { is_pinned(m) } {
            return Err(MbufError::NotAttached);
        }
        let old = u32::from(self.h().data_len);
        // SAFETY: an attached segment we own.
        unsafe { detach_raw(m) };
        self.hm().pkt_len -= old;
        Ok(())
    }

    /// An indirect copy of the chain from `pool` (`rte_pktmbuf_clone`):
    /// one indirect mbuf per segment, sharing the data. Nothing is left
    /// allocated on error.
    pub fn clone_in<'a>(&self, pool: &'a MbufPool<'_>) -> Result<Mbuf<'a>, MbufError>
    where
        'p: 'a,
    {
        let mut head: Option<Mbuf<'a>> = None;
        let mut last: *mut MbufHeader = std::ptr::null_mut();
        for s in self.segments() {
            let mi = pool.alloc()?;
            // SAFETY: `mi` is fresh; the segment is alive (we borrow it).
            unsafe { attach_raw(mi.as_ptr(), std::ptr::from_ref(s.h).cast_mut()) }?;
            let raw = mi.into_raw();
            match &mut head {
                None => {
                    // SAFETY: allocated from `pool`, which outlives 'a.
                    head = Some(unsafe { Mbuf::from_owned(raw) });
                }
                // SAFETY: `last` is the last segment of our new chain.
                Some(_) => unsafe { (*last).next = raw },
            }
            last = raw;
        }
        let mut head = head.ok_or(MbufError::NotAllocated { addr: 0 })?;
        let (n, l) = (self.nb_segs(), self.pkt_len());
        let h = head.hm();
        h.nb_segs = n;
        h.pkt_len = l;
        Ok(head)
    }

    /// A deep copy of `len` bytes from offset `off` (`usize::MAX`: to the
    /// end) into new mbufs from `pool` (`rte_pktmbuf_copy`): the packet
    /// metadata (port, VLAN, hash, packet type, offload flags and lengths,
    /// timesync, dynamic fields) and the bytes, filling each new segment's
    /// tailroom before taking the next. Nothing is left allocated on error.
    pub fn copy_in<'a>(
        &self,
        pool: &'a MbufPool<'_>,
        off: usize,
        len: usize,
    ) -> Result<Mbuf<'a>, MbufError> {
        let pkt_len = self.pkt_len() as usize;
        if off > pkt_len {
            return Err(MbufError::OutOfRange {
                op: "copy",
                off,
                len,
                pkt_len,
            });
        }
        let len = len.min(pkt_len - off);
        let mut head = pool.alloc()?;
        if len > 0 && head.tailroom() == 0 {
            return Err(MbufError::NoTailroom { len, tailroom: 0 });
        }
        let src = self.h();
        {
            let d = head.hm();
            d.port = src.port;
            d.vlan_tci = src.vlan_tci;
            d.vlan_tci_outer = src.vlan_tci_outer;
            d.tx_offload = src.tx_offload;
            d.hash = src.hash;
            d.packet_type = src.packet_type;
            d.timesync = src.timesync;
            d.dynfield1 = src.dynfield1;
        }
        head.set_ol_flags(src.ol_flags);
        // Segments after the head, filled in order, chained at the end
        // (back to front: each chain step then sees a one-segment head).
        let mut rest: Vec<Mbuf<'a>> = Vec::new();
        let mut left = len;
        let mut skip = off;
        for seg in self.segments() {
            let mut data = seg.data();
            if skip >= data.len() {
                skip -= data.len();
                continue;
            }
            data = &data[skip..];
            skip = 0;
            while !data.is_empty() && left > 0 {
                let cur = rest.last_mut().unwrap_or(&mut head);
                let room = (cur.tailroom() as usize).min(data.len()).min(left);
                if room == 0 {
                    if u32::from(head.nb_segs()) + rest.len() as u32 >= u32::from(MAX_NB_SEGS) {
                        return Err(MbufError::TooManySegments {
                            head: u32::from(head.nb_segs()),
                            tail: rest.len() as u32,
                            bytes: len as u64,
                            max: MAX_NB_SEGS,
                        });
                    }
                    rest.push(pool.alloc()?);
                    continue;
                }
                cur.append(room)?.copy_from_slice(&data[..room]);
                data = &data[room..];
                left -= room;
            }
            if left == 0 {
                break;
            }
        }
        let mut tail: Option<Mbuf<'a>> = None;
        while let Some(s) = rest.pop() {
            tail = Some(match tail {
                None => s,
                Some(t) => s.chain(t).map_err(|e| e.error)?,
            });
        }
        match tail {
            None => Ok(head),
            Some(t) => head.chain(t).map_err(|e| e.error),
        }
    }

    /// Attaches an external buffer to this fresh mbuf
    /// (`rte_pktmbuf_attach_extbuf`): data offset 0, no data.
    ///
    /// # Safety
    /// `buf` is valid for `len` bytes at IOVA `iova` (mapped at the same
    /// address in every process the mbuf goes to); `shinfo` is live and its
    /// refcount already counts this mbuf; the buffer and `shinfo` stay
    /// valid until the last user lets go (then the callback runs, once, in
    /// the process that lets go last: a function pointer is only valid in
    /// the process that set it, so an mbuf with a callback must be freed
    /// there; pinned-buffer pools need no callback).
    pub unsafe fn attach_extbuf(
        &mut self,
        buf: *mut u8,
        iova: u64,
        len: u16,
        shinfo: NonNull<ExtSharedInfo>,
    ) -> Result<(), MbufError> {
        let h = self.h();
        if !is_direct(h) || h.nb_segs != 1 || h.refcnt.load(Ordering::Acquire) != 1 {
            return Err(MbufError::Incompatible {
                why: "only a direct, single-segment, unshared mbuf can take an external buffer"
                    .into(),
            });
        }
        let h = self.hm();
        h.buf_addr = buf;
        h.buf_iova = iova;
        h.buf_len = len;
        h.data_len = 0;
        h.data_off = 0;
        h.pkt_len = 0;
        h.ol_flags |= ol_flags::EXTERNAL;
        h.shinfo = shinfo.as_ptr();
        Ok(())
    }
}

impl Drop for Mbuf<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we own one reference to the chain; the pools are open
        // (the handle we borrow).
        unsafe { free_chain(self.ptr.as_ptr(), true) };
    }
}
