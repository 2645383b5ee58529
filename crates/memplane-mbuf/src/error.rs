//! The mbuf error type.

use memplane_mempool::MempoolError;

/// Why an mbuf operation was refused. Unless a variant says otherwise,
/// nothing changed: no byte moved, no length, refcount or pool count
/// changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MbufError {
    /// Pool creation with sizes DPDK refuses too.
    #[error("bad mbuf pool parameter {what} = {value}: {why}")]
    BadPoolParam {
        /// The parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A mempool of that name exists but is not an mbuf pool.
    #[error("mempool {name:?} is not an mbuf pool (its private area holds no pktmbuf sizes)")]
    NotMbufPool {
        /// The name.
        name: String,
    },
    /// `append` of more bytes than the last segment's tailroom.
    #[error("cannot append {len} bytes: the last segment has {tailroom} bytes of tailroom")]
    NoTailroom {
        /// Bytes asked.
        len: usize,
        /// Bytes free after the data.
        tailroom: usize,
    },
    /// `prepend` of more bytes than the first segment's headroom.
    #[error("cannot prepend {len} bytes: the first segment has {headroom} bytes of headroom")]
    NoHeadroom {
        /// Bytes asked.
        len: usize,
        /// Bytes free before the data.
        headroom: usize,
    },
    /// `adj`, `trim` or `read` past the packet's data.
    #[error("{op} of {len} bytes at offset {off} is past the packet's {pkt_len} bytes")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Offset asked.
        off: usize,
        /// Bytes asked.
        len: usize,
        /// Bytes in the packet.
        pkt_len: usize,
    },
    /// `adj`/`trim` that would cut into a segment other than the one DPDK
    /// allows (the first for `adj`, the last for `trim`).
    #[error("{op} of {len} bytes is more than the {seg_len} bytes of the {which} segment (DPDK cuts one segment only)")]
    SegmentTooShort {
        /// The operation.
        op: &'static str,
        /// Bytes asked.
        len: usize,
        /// Bytes of that segment.
        seg_len: usize,
        /// "first" or "last".
        which: &'static str,
    },
    /// A chain would have more than [`MAX_NB_SEGS`](crate::MAX_NB_SEGS)
    /// segments or more than `u32::MAX` bytes.
    #[error("chaining {head} + {tail} segments ({bytes} bytes) exceeds the limit of {max} segments / 4 GiB")]
    TooManySegments {
        /// Segments of the head.
        head: u32,
        /// Segments of the tail.
        tail: u32,
        /// Bytes of both.
        bytes: u64,
        /// The segment limit.
        max: u16,
    },
    /// Write access (append/prepend bytes, data_mut, linearize, attach
    /// onto it) to a buffer another mbuf shares: an indirect mbuf, an
    /// external buffer, or a direct mbuf with indirect mbufs attached.
    #[error("the mbuf's buffer is shared ({why}); its bytes cannot be changed")]
    NotWritable {
        /// Why it is shared.
        why: &'static str,
    },
    /// `detach` of an mbuf that is not attached to anything.
    #[error("detach of a direct mbuf (it owns its buffer)")]
    NotAttached,
    /// `attach` between mbufs whose pools are incompatible (DPDK finds the
    /// direct mbuf from the buffer address and the private size).
    #[error("cannot attach: {why}")]
    Incompatible {
        /// What differs.
        why: String,
    },
    /// An mbuf that is not allocated (refcount 0: in its pool, or freed).
    #[error("mbuf {addr:#x} has refcount 0 (it is in its pool: freed already?)")]
    NotAllocated {
        /// The mbuf.
        addr: usize,
    },
    /// The refcount would overflow or drop below 1.
    #[error("refcount update by {delta} of mbuf with refcount {refcnt} is out of range")]
    BadRefcnt {
        /// Current refcount.
        refcnt: u16,
        /// Update asked.
        delta: i32,
    },
    /// An mbuf whose pool is not open in this process (no
    /// [`MbufPool`](crate::MbufPool) handle for its pool address).
    #[error("mbuf {addr:#x} belongs to pool header {pool:#x}, which is not open in this process (look it up with MbufPool::lookup first)")]
    PoolNotOpen {
        /// The mbuf.
        addr: usize,
        /// The pool header address it names.
        pool: usize,
    },
    /// A linearize whose result does not fit the first segment.
    #[error("cannot linearize {pkt_len} bytes into the first segment's {room} bytes of room")]
    NoRoom {
        /// Bytes of the packet.
        pkt_len: usize,
        /// Bytes the first segment can hold after its headroom.
        room: usize,
    },
    /// A caller buffer shorter than the bytes asked.
    #[error("the destination holds {have} bytes, {need} asked")]
    ShortBuffer {
        /// Bytes asked.
        need: usize,
        /// Bytes of the buffer.
        have: usize,
    },
    /// `free` of a pool with other handles open in this process.
    #[error("mbuf pool {name:?} has {handles} handles open in this process; drop the others before freeing it")]
    PoolBusy {
        /// The pool.
        name: String,
        /// Handles open.
        handles: usize,
    },
    /// A packet view over bytes that do not hold a valid header.
    #[error("malformed {what} header: {why}")]
    BadPacket {
        /// The header kind.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The mempool refused (not enough objects, bad pool, memory...).
    #[error(transparent)]
    Mempool(#[from] MempoolError),
}
