//! memplane mbuf: packet buffers (DPDK's `rte_mbuf`) in mempools of an
//! instance's hugepage memory, usable from every process of the instance.
//!
//! # Layout
//!
//! An mbuf pool is a [`memplane_mempool::Mempool`] whose elements are
//! `[MbufHeader (128 bytes)][private area (priv_size)][data room]`; the
//! pool's private area records the data room and private size
//! ([`layout::PktmbufPoolPrivate`], DPDK's `rte_pktmbuf_pool_private`), so
//! [`MbufPool::lookup`] in another process recovers them. The header is
//! DPDK 22.11's `struct rte_mbuf` field for field (two cache lines,
//! offsets asserted at compile time, see [`layout`]): buffer address and
//! IOVA, data offset, refcount, segments, port, offload flags, packet type,
//! packet and data length, VLAN, RSS hash, buffer length, pool address,
//! next segment, TX offload, external buffer shared info, private size,
//! timesync and the dynamic fields. A fresh mbuf has [`HEADROOM`] (128)
//! bytes of headroom; the default data room is [`DEFAULT_BUF_SIZE`]
//! (2048 + 128). One difference: a free mbuf (in its pool) has refcount 0
//! (DPDK keeps 1), so a raw pointer to a freed mbuf is refused by
//! [`Mbuf::from_raw`] and a second free of it is ignored with an error
//! log.
//!
//! # Ownership and the free path
//!
//! [`Mbuf`] owns one reference to a chain and frees it on drop
//! (`rte_pktmbuf_free`: every segment loses a reference; a segment whose
//! count drops to 0 releases the buffer it is attached to and goes back to
//! its *own* pool). The pool is found from the header's `pool` field (the
//! pool header's address, the same in every process) through a
//! process-local map of open pools: a thread-local one-entry shortcut
//! (address, map generation) serves the common one-pool case without a
//! lock; other pools take a read lock once per batch. A [`MbufPool`]
//! handle keeps its pool in the map, and an `Mbuf<'p>` borrows a handle,
//! so the map entry outlives every mbuf that needs it. An mbuf received
//! from another process (a raw pointer through a ring) is adopted with
//! [`Mbuf::from_raw`] and a handle of its pool opened here with
//! [`MbufPool::lookup`]; it then frees into the same shared pool.
//!
//! Bytes are writable only in a buffer nobody else uses (a direct mbuf
//! with refcount 1, an external buffer with one user): indirect mbufs
//! ([`Mbuf::attach`], [`Mbuf::clone_in`]) read a shared buffer.
//!
//! # Limits (today)
//!
//! - External-buffer free callbacks are function pointers: valid only in
//!   the process that set them, so such an mbuf must be freed there.
//!   Pinned-buffer pools ([`MbufPool::create_extbuf`]) need no callback.
//! - A leaked handle (`mem::forget` of an [`MbufPool`]) keeps its entry in
//!   the process-local map (and its memory) for the life of the process;
//!   a later instance's pool at the same address replaces it (entries
//!   record their instance's identity: the device and inode of its
//!   config file).
//! - Not built: dynamic field/flag registration (`rte_mbuf_dyn`),
//!   `rte_mbuf_sanity_check`, `rte_pktmbuf_dump`, and
//!   the named offload flags beyond the few in [`ol_flags`].
//!
//! ```no_run
//! use memplane::{MemOptions, Memory};
//! use memplane_mbuf::{Mbuf, MbufPool};
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-mbuf"])?)?;
//! let pool = MbufPool::pktmbuf_pool_create(&mem, "pkts", 8191, 256, 0, 2176, -1)?;
//! let mut m = pool.alloc()?;
//! m.append(5)?.copy_from_slice(b"hello");
//! m.prepend(2)?.copy_from_slice(b"> ");
//! let raw = m.into_raw(); // e.g. through a ring to another process
//! // SAFETY: `raw` came from into_raw above and is adopted once.
//! let m = unsafe { Mbuf::from_raw(raw, &pool)? };
//! assert_eq!(m.data(), b"> hello");
//! drop(m);
//! assert!(pool.is_full());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod buf;
mod error;
pub mod layout;
mod mbuf;
pub mod packet;
mod pool;

pub use buf::{MbufReader, MbufWriter};
pub use error::MbufError;
pub use layout::{
    ol_flags, ExtFreeCallback, ExtSharedInfo, MbufHeader, DEFAULT_BUF_SIZE, DEFAULT_DATAROOM,
    HEADROOM, MAX_NB_SEGS, MBUF_HEADER_SIZE, PORT_INVALID, PRIV_ALIGN,
};
pub use mbuf::{free_bulk_raw, ChainError, Mbuf, Segment, Segments};
pub use pool::{ExtMem, MbufPool, MbufPoolConfig};
