//! The mbuf header (DPDK 22.11's `struct rte_mbuf`, field for field), the
//! external buffer's shared info, the offload flags and the constants.
//!
//! ```text
//!  cache line 0                               cache line 1
//!   0 buf_addr        8 buf_iova               64 next        72 tx_offload
//!  16 data_off  18 refcnt  20 nb_segs  22 port 80 shinfo
//!  24 ol_flags                                 88 priv_size   90 timesync
//!  32 packet_type  36 pkt_len                  92 dynfield1[9] (36 bytes)
//!  40 data_len  42 vlan_tci  44 hash (8)
//!  52 vlan_tci_outer  54 buf_len  56 pool
//! ```
//!
//! An object of an mbuf pool is `[MbufHeader][private area][data room]`;
//! the buffer of a direct mbuf starts right after its private area.

use std::sync::atomic::{AtomicU16, AtomicU32};

/// Bytes of headroom a fresh mbuf leaves before its data
/// (`RTE_PKTMBUF_HEADROOM`).
pub const HEADROOM: u16 = 128;

/// Default data room: 2048 bytes of data plus the headroom
/// (`RTE_MBUF_DEFAULT_BUF_SIZE`).
pub const DEFAULT_BUF_SIZE: u16 = 2048 + HEADROOM;

/// Default data room size, as DPDK names it (`RTE_MBUF_DEFAULT_DATAROOM`):
/// the bytes after the headroom.
pub const DEFAULT_DATAROOM: u16 = 2048;

/// Alignment of the per-mbuf private area size (`RTE_MBUF_PRIV_ALIGN`).
pub const PRIV_ALIGN: u16 = 8;

/// Most segments in a chain (`RTE_MBUF_MAX_NB_SEGS`, `u16::MAX`).
pub const MAX_NB_SEGS: u16 = u16::MAX;

/// Port of a fresh mbuf (`RTE_MBUF_PORT_INVALID`).
pub const PORT_INVALID: u16 = u16::MAX;

/// Number of 32-bit dynamic field words (`dynfield1`).
pub const DYNFIELD_WORDS: usize = 9;

/// Offload flags (`ol_flags`) this crate gives meaning to; the other bits
/// are the user's, as in DPDK (`RTE_MBUF_F_*`).
pub mod ol_flags {
    /// The mbuf is indirect: its buffer belongs to another (direct) mbuf
    /// (`RTE_MBUF_F_INDIRECT`).
    pub const INDIRECT: u64 = 1 << 62;
    /// The buffer is external, described by `shinfo`
    /// (`RTE_MBUF_F_EXTERNAL`).
    pub const EXTERNAL: u64 = 1 << 61;
    /// Receive: VLAN stripped, `vlan_tci` valid (`RTE_MBUF_F_RX_VLAN`).
    pub const RX_VLAN: u64 = 1 << 0;
    /// Receive: RSS hash valid (`RTE_MBUF_F_RX_RSS_HASH`).
    pub const RX_RSS_HASH: u64 = 1 << 1;
    /// Transmit: compute the IPv4 checksum (`RTE_MBUF_F_TX_IP_CKSUM`).
    pub const TX_IP_CKSUM: u64 = 1 << 54;
    /// Transmit: the packet is IPv4 (`RTE_MBUF_F_TX_IPV4`).
    pub const TX_IPV4: u64 = 1 << 55;
    /// Transmit: compute the UDP checksum (`RTE_MBUF_F_TX_UDP_CKSUM`).
    pub const TX_UDP_CKSUM: u64 = 3 << 52;
}

/// Free callback of an external buffer: called once, with the buffer's
/// address and `fcb_opaque`, when the last mbuf using the buffer lets go
/// (`rte_mbuf_extbuf_free_callback_t`).
pub type ExtFreeCallback = unsafe extern "C" fn(addr: *mut u8, opaque: *mut u8);

/// Shared info of an external buffer (`struct rte_mbuf_ext_shared_info`):
/// how many mbufs use the buffer and what to call when the last one is
/// freed. Lives wherever the buffer's owner puts it (often at the end of
/// the buffer, see [`ExtSharedInfo::init_at_end`]).
#[repr(C)]
#[derive(Debug)]
pub struct ExtSharedInfo {
    /// Called once when `refcnt` drops to 0; `None` means nothing to call.
    pub free_cb: Option<ExtFreeCallback>,
    /// Second argument of `free_cb`.
    pub fcb_opaque: *mut u8,
    /// Mbufs attached to the buffer.
    pub refcnt: AtomicU16,
    /// [`SHINFO_USER`] (call `free_cb`) or [`SHINFO_PINNED`] (the buffer
    /// of a pinned-external-buffer pool's mbuf `fcb_opaque`, which goes
    /// back to its pool: no function pointer, so any process can do it).
    pub kind: u16,
}

/// Shared info of a user's external buffer: `free_cb` is called.
pub const SHINFO_USER: u16 = 0;
/// Shared info of a pinned external buffer (see [`ExtSharedInfo::kind`]).
pub const SHINFO_PINNED: u16 = 1;

/// The mbuf header, two 64-byte cache lines, laid out as DPDK 22.11's
/// `struct rte_mbuf` (see the [module docs](self)).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct MbufHeader {
    /// Virtual address of the buffer (start of the headroom).
    pub buf_addr: *mut u8,
    /// IOVA of the buffer.
    pub buf_iova: u64,
    /// Offset of the data from `buf_addr`.
    pub data_off: u16,
    /// References to this mbuf (direct: also the indirect mbufs attached
    /// to it). 0 while the mbuf is in its pool (memplane: DPDK keeps 1).
    pub refcnt: AtomicU16,
    /// Segments in the chain (meaningful in the first segment).
    pub nb_segs: u16,
    /// Input port.
    pub port: u16,
    /// Offload flags ([`ol_flags`]).
    pub ol_flags: u64,
    /// Packet type (`RTE_PTYPE_*`).
    pub packet_type: u32,
    /// Bytes of the whole chain (meaningful in the first segment).
    pub pkt_len: u32,
    /// Bytes of data in this segment.
    pub data_len: u16,
    /// VLAN TCI.
    pub vlan_tci: u16,
    /// RSS hash (low word) and flow director / scheduler words.
    pub hash: [u32; 2],
    /// Outer VLAN TCI.
    pub vlan_tci_outer: u16,
    /// Bytes of the buffer.
    pub buf_len: u16,
    /// Address of the pool header this mbuf belongs to (the same in every
    /// process of the instance).
    pub pool: usize,
    /// Next segment, or null.
    pub next: *mut MbufHeader,
    /// TX offload lengths (l2, l3, l4, tso, outer l3/l2).
    pub tx_offload: u64,
    /// Shared info of an external buffer, or null.
    pub shinfo: *mut ExtSharedInfo,
    /// Bytes of the per-mbuf private area after this header.
    pub priv_size: u16,
    /// Timesync flags.
    pub timesync: u16,
    /// Dynamic fields (`dynfield1`).
    pub dynfield1: [u32; DYNFIELD_WORDS],
}

/// Size of the header: two cache lines.
pub const MBUF_HEADER_SIZE: usize = std::mem::size_of::<MbufHeader>();

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<MbufHeader>() == 128);
    assert!(align_of::<MbufHeader>() == 64);
    assert!(offset_of!(MbufHeader, buf_addr) == 0);
    assert!(offset_of!(MbufHeader, buf_iova) == 8);
    assert!(offset_of!(MbufHeader, data_off) == 16);
    assert!(offset_of!(MbufHeader, refcnt) == 18);
    assert!(offset_of!(MbufHeader, nb_segs) == 20);
    assert!(offset_of!(MbufHeader, port) == 22);
    assert!(offset_of!(MbufHeader, ol_flags) == 24);
    assert!(offset_of!(MbufHeader, packet_type) == 32);
    assert!(offset_of!(MbufHeader, pkt_len) == 36);
    assert!(offset_of!(MbufHeader, data_len) == 40);
    assert!(offset_of!(MbufHeader, vlan_tci) == 42);
    assert!(offset_of!(MbufHeader, hash) == 44);
    assert!(offset_of!(MbufHeader, vlan_tci_outer) == 52);
    assert!(offset_of!(MbufHeader, buf_len) == 54);
    assert!(offset_of!(MbufHeader, pool) == 56);
    assert!(offset_of!(MbufHeader, next) == 64);
    assert!(offset_of!(MbufHeader, tx_offload) == 72);
    assert!(offset_of!(MbufHeader, shinfo) == 80);
    assert!(offset_of!(MbufHeader, priv_size) == 88);
    assert!(offset_of!(MbufHeader, timesync) == 90);
    assert!(offset_of!(MbufHeader, dynfield1) == 92);
    assert!(size_of::<ExtSharedInfo>() == 24);
    // The pool address and the refcount are read through atomics of the
    // same size in other processes.
    assert!(size_of::<AtomicU16>() == 2 && size_of::<AtomicU32>() == 4);
};

/// The pool's private area (DPDK's `rte_pktmbuf_pool_private`), in the
/// mempool header zone: every process reads the sizes from it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PktmbufPoolPrivate {
    /// Bytes of each mbuf's buffer.
    pub mbuf_data_room_size: u16,
    /// Bytes of each mbuf's private area.
    pub mbuf_priv_size: u16,
    /// [`POOL_F_PINNED_EXT_BUF`] or 0.
    pub flags: u32,
    /// [`PRIV_MAGIC`] once initialised: tells an mbuf pool from another
    /// mempool at lookup.
    pub magic: u64,
}

/// The pool's mbufs have pinned external buffers
/// (`RTE_PKTMBUF_POOL_F_PINNED_EXT_BUF`).
pub const POOL_F_PINNED_EXT_BUF: u32 = 1;

/// Marks a mempool private area as an mbuf pool's.
pub const PRIV_MAGIC: u64 = 0x6d70_6c5f_6d62_7566; // "mpl_mbuf"

impl ExtSharedInfo {
    /// Places a shared info at the end of the buffer `[buf, buf + *len)`
    /// (8-byte aligned), with refcount 1, and shrinks `*len` to the bytes
    /// left before it (DPDK's `rte_pktmbuf_ext_shinfo_init_helper`).
    /// `None` when the buffer is too small.
    ///
    /// # Safety
    /// `buf` is valid for writes of `*len` bytes and stays valid until the
    /// free callback runs.
    pub unsafe fn init_at_end(
        buf: *mut u8,
        len: &mut u16,
        free_cb: Option<ExtFreeCallback>,
        fcb_opaque: *mut u8,
    ) -> Option<*mut ExtSharedInfo> {
        let size = std::mem::size_of::<ExtSharedInfo>();
        let end = buf as usize + *len as usize;
        let at = end.checked_sub(size)? & !7;
        if at < buf as usize {
            return None;
        }
        let p = at as *mut ExtSharedInfo;
        // SAFETY: [at, at + size) lies inside the caller's buffer, 8-aligned.
        unsafe {
            p.write(ExtSharedInfo {
                free_cb,
                fcb_opaque,
                refcnt: AtomicU16::new(1),
                kind: SHINFO_USER,
            });
        }
        *len = (at - buf as usize) as u16;
        Some(p)
    }

    /// The shared info of pinned mbuf `m`'s buffer.
    pub(crate) fn pinned(m: *mut u8) -> Self {
        Self {
            free_cb: None,
            fcb_opaque: m,
            refcnt: AtomicU16::new(1),
            kind: SHINFO_PINNED,
        }
    }
}
