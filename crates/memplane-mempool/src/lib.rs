//! memplane mempool: pools of fixed-size objects in an instance's hugepage
//! memory (DPDK's `rte_mempool`), shared by name with every thread and
//! process of the instance.
//!
//! - A pool lives in memzones: header `MP_<name>` (sizes, flags, the
//!   handler's NAME, chunk list, per-lcore caches, private area) and
//!   objects in `MP_<name>_<k>`; see [`layout`] and [`required_memory`].
//! - Objects: `[header: pool address, IOVA, cookie][element][padding]`,
//!   64-byte aligned unless `NO_CACHE_ALIGN`, and padded (unless
//!   `NO_SPREAD`) to an object size in lines coprime to the instance's
//!   memory channels x ranks (`-n`/`-r`; DPDK's default 4 x 1 when not
//!   given; [`layout::spread_object_size`], [`channels_x_ranks`]).
//! - Backends are chosen by name ([`handler`]): `ring_mp_mc` (default),
//!   `ring_sp_sc`, `ring_mp_sc`, `ring_sp_mc`, `ring_mt_rts`, `ring_mt_hts`
//!   (DPDK's names), `stack`, `lf_stack` (lock-free, [`lf_stack`]),
//!   `bucket` (objects in 64 KiB buckets, handed out singly or as whole
//!   contiguous blocks: [`Mempool::get_contig_blocks`], [`bucket`]), or
//!   user handlers registered with
//!   [`register_handler`].
//! - Creation in one step ([`Mempool::create`]) or two, as DPDK:
//!   [`Mempool::create_empty`], then [`Mempool::populate_default`],
//!   [`Mempool::populate_virt`] (memory you give) or
//!   [`Mempool::populate_anon`], then [`Mempool::obj_iter`]. A pool is
//!   visible to other handles once fully populated; pools with
//!   process-local memory (anonymous, or outside the instance) are refused
//!   to other processes. Out of memory, [`MempoolError::NoMemory`] says
//!   what was needed and what each NUMA node had.
//! - Get is all-or-nothing; put refuses pointers outside the pool's object
//!   zones: one subtract-and-compare per object when the objects are in
//!   one zone, one table load per object (4 KiB granules wholly inside a
//!   zone) otherwise, the exact chunk lookup only near zone edges; debug
//!   builds also check the object boundary, the header's pool address and
//!   the cookie (double put). [`Mempool::put_bulk_unchecked`] skips the
//!   check for callers that know (DPDK's put checks nothing).
//! - Hot path: a get served by the calling thread's lcore cache, or a put
//!   that fits under its flush threshold, is inlined into the caller
//!   (lcore id from one thread-local, a bounds check, a copy); everything
//!   else (refills, flushes, no cache, errors, leak tracking, debug
//!   checks) is out of line. [`LcoreCache`] (DPDK's
//!   `rte_mempool_default_cache`) skips even the lcore id lookup. Pools
//!   with a built-in ring handler call the ring directly, not through
//!   `dyn Backend`; user handlers still go through the trait.
//! - Leak tracking ([`leak`]), switchable at run time per pool and seen by
//!   every process: [`Mempool::set_leak_tracking`],
//!   [`Mempool::outstanding`], [`Mempool::leak_report`].
//! - Statistics ([`stats`]: DPDK's `RTE_LIBRTE_MEMPOOL_STATS` counters,
//!   per lcore), switchable at run time per pool and seen by every
//!   process: [`Mempool::set_stats`] (or [`MempoolConfig::stats`]),
//!   [`Mempool::stats`], [`Mempool::reset_stats`]; in
//!   [`Mempool::dump`] while on.
//! - Both switches are off by default and cost nothing then: they share
//!   one header word, and while either is on the lcore caches' gates
//!   (a put limit and a get floor next to the cache length, compared
//!   anyway) and the user-owned caches' key (the pool's address, + 1)
//!   send every call to the general path, which records and counts; the
//!   uncached fast path tests the word itself (one load and compare).
//! - Per-lcore caches follow DPDK's policy up to 26.03 (size <= 512 and
//!   <= n / 1.5, flush threshold 1.5 x size), for threads with an lcore
//!   id ([`register_thread`]); [`MempoolCache`] is a user-owned cache.
//! - Events ([`events`], DPDK's `rte_mempool_event_callback_register`):
//!   per-process callbacks told when a pool becomes ready (every object
//!   placed) and before a freed pool's memory is released, with the
//!   pool's name and memory chunks (for DMA registration);
//!   [`register_event_callback`], [`unregister_event_callback`],
//!   [`replay_ready`] for pools ready before the callback was registered.
//! - [`TypedMempool`] hands out [`PoolBox`]es that go back on drop.
//!
//! # Caches, precisely
//!
//! Per-lcore caches live in the header zone, [`MAX_LCORES`] of them, each
//! with `3 x cache_size` slots. Get of `n`: served from the cache when it
//! holds `n`; else, for `n <= 2 x cache_size`, the cache is refilled from
//! the backend with `cache_size + n - len` objects (falling back to just
//! the missing ones), leaving `cache_size` after the get; larger gets go
//! to the backend. Put of `n <= 1.5 x cache_size`: pushed; a cache above
//! the threshold is flushed down to `cache_size` (the newest objects go to
//! the backend); larger puts go to the backend. Objects in lcore caches
//! count as available; objects in user-owned caches count as in use.
//!
//! # Limits (today)
//!
//! - [`Mempool::audit`] needs a quiescent pool (it drains the backend and
//!   puts everything back).
//! - Other handles to a freed pool (other threads or processes) dangle, as
//!   with DPDK; `free` is refused while objects are out.
//! - A forked child must not use lcore ids its parent registered.
//! - Objects may straddle pages; with `NO_IOVA_CONTIG` an object's IOVA is
//!   that of its first byte.
//!
//! ```no_run
//! use memplane::{MemOptions, Memory};
//! use memplane_mempool::{register_thread, Mempool, MempoolConfig};
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-mp"])?)?;
//! let pool = Mempool::create(&mem, "pkts", &MempoolConfig::new(4095, 2048).cache_size(256))?;
//! register_thread(&mem)?; // this thread now uses a cache
//! let mut objs = [std::ptr::null_mut(); 32];
//! pool.get_bulk(&mut objs)?;
//! pool.put_bulk(&objs)?;
//! pool.cache_flush()?;
//! assert_eq!(pool.avail_count(), 4095);
//! pool.free()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

#[cfg(not(loom))]
pub mod bucket;
#[cfg_attr(loom, allow(dead_code))]
mod bucket_core;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
pub mod events;
#[cfg(not(loom))]
pub mod handler;
#[cfg(not(loom))]
pub mod layout;
#[cfg(not(loom))]
mod lcore;
#[cfg(not(loom))]
pub mod leak;
pub mod lf_stack;
#[cfg(not(loom))]
mod pool;
#[cfg(not(loom))]
pub mod stats;
#[cfg_attr(loom, allow(dead_code))]
mod sync;
#[cfg(not(loom))]
mod typed;

#[cfg(not(loom))]
pub use error::{MempoolError, NodeFree};
#[cfg(not(loom))]
pub use events::{
    event_callback_id, register_event_callback, replay_ready, unregister_event_callback,
    EventCallback, EventCallbackId, MempoolEvent, MempoolView,
};
#[cfg(not(loom))]
pub use handler::{handler_names, register_handler, Backend, BackendParams, Handler};
#[cfg(not(loom))]
pub use layout::{
    calc_obj_size, calc_obj_size_for, channels_x_ranks, channels_x_ranks_of, required_memory,
    required_memory_for, required_memory_handler, spread_object_size, BlockLayout, MempoolFlags,
    ObjSize, CACHE_MAX_SIZE, MAX_CHUNKS, MAX_LCORES, NAME_MAX,
};
#[cfg(not(loom))]
pub use lcore::{lcore_id, register_thread, registered_lcores, unregister_thread, LCORE_ZONE};
#[cfg(not(loom))]
pub use leak::{
    caller_tag, set_caller_tag, LeakGroup, LeakReport, Outstanding, Owner, LEAK_ZONE_PREFIX,
};
#[cfg(not(loom))]
pub use pool::{
    mempool_names, mempools, AuditReport, ChunkInfo, LcoreCache, Mempool, MempoolCache,
    MempoolConfig, MempoolInfo, POOL_ZONE_PREFIX,
};
#[cfg(not(loom))]
pub use stats::{LcoreStats, MempoolStats, StatsCounters, STATS_ZONE_PREFIX};
#[cfg(not(loom))]
pub use typed::{PoolBox, TypedMempool};
