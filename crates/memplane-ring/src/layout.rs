//! The in-memory layout of a ring. Everything here is `repr(C)`, holds only
//! integers (indices, never pointers) and is position independent, so one
//! region mapped at different addresses in different processes is one ring.
//!
//! ```text
//! offset  size  field
//!      0     8  magic            (written last, Release, by init)
//!      8     4  layout version
//!     12     4  flags            (bit 0: exact capacity)
//!     16     4  size             (slots, power of two)
//!     20     4  mask             (size - 1)
//!     24     4  capacity         (<= size)
//!     28     4  esize            (element size, multiple of 4)
//!     32    32  name             (UTF-8, NUL padded, <= 31 bytes)
//!     64    64  reserved
//!    128   128  producer HeadTail (own 128-byte block: two cache lines,
//!    256   128  consumer HeadTail  so the adjacent-line prefetcher cannot
//!                                  make the two sides share)
//!    384  size*esize  slots, rounded up to 64 bytes
//! HeadTail: line 0: head u64 @0, htd_max u32 @8, sync u32 @12,
//!                   owner u32 @16 (touched by this side only);
//!           line 1: tail u64 @64 (written by this side, polled by the
//!                   other), padding to 128.
//! ```
//! head and tail sit on different cache lines: in the CAS modes the other
//! side's polling of our tail would otherwise pull the line our CAS on the
//! head needs (2-core MP/MC bulk of 8 in `ring_perf`: ~75 -> ~60 cycles
//! per element, 32: ~21 -> ~17). A compact ring (flag bit 1,
//! [`RingConfig::compact`](crate::RingConfig::compact)) publishes in
//! `near_tail` @24 instead, in the head's line, as DPDK does: when every
//! thread both enqueues and dequeues (a pool's free list) an operation
//! then pulls two lines instead of four (mempool, 2 cores, no cache:
//! +13-28%). Layout version 3 (near_tail and the flag); version 2 had no
//! compact rings, version 1 had tail @8.
//! head/tail words: low 32 bits = free-running position; high 32 bits = the
//! RTS op counter (0 in other modes). In HTS mode the head word packs
//! head (low) and tail (high) so both move in one CAS; the tail word still
//! carries the position the other side reads.

use crate::sync::{AtomicU32, AtomicU64};

/// Header magic: ASCII "MPRING" plus a format byte.
pub const MAGIC: u64 = 0x4d50_5249_4e47_0001;
/// Layout version written into the header.
pub const LAYOUT_VERSION: u32 = 3;
/// Longest ring name in bytes.
pub const NAME_MAX: usize = 31;
/// Largest capacity (as DPDK's `RTE_RING_SZ_MASK`).
pub const MAX_CAPACITY: u32 = 0x7fff_ffff;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 384;
/// Required alignment of the region start.
pub const REGION_ALIGN: usize = 64;

pub(crate) const FLAG_EXACT: u32 = 1;
/// Each side's published position is `near_tail` (in the head's line),
/// not `tail`.
pub(crate) const FLAG_COMPACT: u32 = 2;

/// One side (producer or consumer) of the ring.
#[repr(C)]
pub(crate) struct HeadTail {
    pub head: AtomicU64,
    /// RTS: maximum head-tail distance before new ops wait.
    pub htd_max: AtomicU32,
    /// `SyncMode` as u32; immutable after init.
    pub sync: u32,
    /// Single-role claim (0 free, 1 held).
    pub owner: AtomicU32,
    pub _pad0: u32,
    /// Published position of a compact ring (`FLAG_COMPACT`): in the
    /// head's line (see the module docs).
    pub near_tail: AtomicU64,
    #[cfg(not(loom))]
    pub _pad1: [u8; 32],
    /// Published position: on its own cache line (see the module docs).
    pub tail: AtomicU64,
    #[cfg(not(loom))]
    pub _pad: [u8; 56],
}

/// The ring header, at offset 0 of the region.
#[repr(C)]
pub(crate) struct Header {
    pub magic: AtomicU64,
    pub version: u32,
    pub flags: u32,
    pub size: u32,
    pub mask: u32,
    pub capacity: u32,
    pub esize: u32,
    pub name: [u8; 32],
    pub _reserved: [u8; 64],
    pub prod: HeadTail,
    pub cons: HeadTail,
}

#[cfg(not(loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<HeadTail>() == 128);
    assert!(offset_of!(HeadTail, head) == 0);
    assert!(offset_of!(HeadTail, tail) == 64);
    assert!(offset_of!(HeadTail, htd_max) == 8);
    assert!(offset_of!(HeadTail, sync) == 12);
    assert!(offset_of!(HeadTail, owner) == 16);
    assert!(offset_of!(HeadTail, near_tail) == 24);
    assert!(size_of::<Header>() == HEADER_SIZE);
    assert!(align_of::<Header>() <= REGION_ALIGN);
    assert!(offset_of!(Header, magic) == 0);
    assert!(offset_of!(Header, version) == 8);
    assert!(offset_of!(Header, flags) == 12);
    assert!(offset_of!(Header, size) == 16);
    assert!(offset_of!(Header, mask) == 20);
    assert!(offset_of!(Header, capacity) == 24);
    assert!(offset_of!(Header, esize) == 28);
    assert!(offset_of!(Header, name) == 32);
    assert!(offset_of!(Header, prod) == 128);
    assert!(offset_of!(Header, cons) == 256);
    assert!(HEADER_SIZE % 128 == 0);
};

/// Offset of the first slot from the region start. Under loom the header
/// holds loom's (larger) atomics, so this follows the real type size.
pub(crate) const fn slots_offset() -> usize {
    let s = core::mem::size_of::<Header>();
    (s + 127) & !127
}

pub(crate) fn pack(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}
