//! Statistics, switchable at run time per pool
//! ([`Mempool::set_stats`](crate::Mempool::set_stats)): DPDK's
//! `RTE_LIBRTE_MEMPOOL_STATS` counters, without rebuilding.
//!
//! The counters are DPDK's twelve ([`StatsCounters`]): put calls and
//! objects, successful and failed get calls and their objects, successful
//! and failed contiguous blocks
//! ([`Mempool::get_contig_blocks`](crate::Mempool::get_contig_blocks): a
//! call counts one get call, successful or failed, and its blocks, not
//! their objects, as DPDK counts them), and the backend
//! ("common pool") traffic: every enqueue into and every successful
//! dequeue from the backend by a put, a get, a cache refill or flush, or
//! [`Mempool::cache_flush`](crate::Mempool::cache_flush) /
//! [`MempoolCache::flush`](crate::MempoolCache::flush). Objects served by
//! a cache are the difference (`get_success_objs - get_common_pool_objs`
//! over a run that starts and ends with empty caches).
//!
//! Where they live: the memzone `MC_<name>`, created when statistics are
//! first switched on (by any process) and freed with the pool: one
//! 128-byte row per lcore id (written only by the thread that owns the id:
//! a plain load and store, no atomic read-modify-write) and one row shared
//! by every thread without an lcore id (atomic adds). The table is shared
//! memory, and the switch is in the pool header, so a secondary's gets and
//! puts are counted while any process has switched statistics on, and
//! every process reads the same counters.
//!
//! Cost: off, nothing. The switch shares the header word that leak
//! tracking uses; while either is on, every get and put takes the
//! general (out-of-line) path, as leak tracking does, and counts there;
//! while both are off, the hot paths never look at it (the cache gates
//! and the user-cache key are closed only while a switch is on).
//!
//! Switching off stops counting at once and keeps the counters (readable,
//! and added to when switched on again); [`Mempool::reset_stats`]
//! zeroes them (exact only when no get or put runs meanwhile: an lcore's
//! owner may write back a count it read before the reset). Gets and puts
//! that run while another thread switches may or may not be counted.
//!
//! [`Mempool::set_stats`]: crate::Mempool::set_stats
//! [`Mempool::reset_stats`]: crate::Mempool::reset_stats

// The counting helpers are tiny and inline into the (out-of-line)
// bookkeeping functions, where most of a delta is a constant.
#![allow(clippy::inline_always)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::Serialize;

use crate::layout::MAX_LCORES;

/// Prefix of a pool's statistics zone: `MC_<name>`.
pub const STATS_ZONE_PREFIX: &str = "MC_";

/// "MPLSTAT1": an initialised table.
pub(crate) const STATS_MAGIC: u64 = u64::from_le_bytes(*b"MPLSTAT1");

/// Counters per row (a row has room for 16).
pub(crate) const NSTATS: usize = 12;

/// Rows: one per lcore id, then the shared one.
pub(crate) const ROWS: usize = MAX_LCORES + 1;

/// The row of threads without an lcore id.
pub(crate) const SHARED_ROW: usize = MAX_LCORES;

/// Indexes of the counters in a row (DPDK's field order).
pub(crate) mod idx {
    pub const PUT_BULK: usize = 0;
    pub const PUT_OBJS: usize = 1;
    pub const PUT_COMMON_POOL_BULK: usize = 2;
    pub const PUT_COMMON_POOL_OBJS: usize = 3;
    pub const GET_COMMON_POOL_BULK: usize = 4;
    pub const GET_COMMON_POOL_OBJS: usize = 5;
    pub const GET_SUCCESS_BULK: usize = 6;
    pub const GET_SUCCESS_OBJS: usize = 7;
    pub const GET_FAIL_BULK: usize = 8;
    pub const GET_FAIL_OBJS: usize = 9;
    pub const GET_SUCCESS_BLKS: usize = 10;
    pub const GET_FAIL_BLKS: usize = 11;
}

/// Head of the table zone.
#[repr(C, align(64))]
pub(crate) struct StatsHead {
    /// [`STATS_MAGIC`] once initialised.
    pub magic: AtomicU64,
    /// Rows ([`ROWS`]).
    pub rows: AtomicU32,
}

/// One lcore's counters: two cache lines, so that neighbouring lcores'
/// rows do not share a line (nor an adjacent-line prefetch pair); the
/// last four words are unused.
#[repr(C, align(128))]
pub(crate) struct StatsRow {
    pub c: [AtomicU64; NSTATS],
    _spare: [AtomicU64; 16 - NSTATS],
}

const _: () = {
    assert!(std::mem::size_of::<StatsHead>() == 64);
    assert!(std::mem::size_of::<StatsRow>() == 128);
};

/// Bytes of the table zone: the head, padded to a row, then the rows.
pub(crate) const TABLE_BYTES: usize = std::mem::size_of::<StatsRow>() * (ROWS + 1);

/// Offset of row 0 from the head.
pub(crate) const ROWS_OFF: usize = std::mem::size_of::<StatsRow>();

/// What one call adds to a row.
#[derive(Clone, Copy, Default)]
pub(crate) struct Delta(pub [u64; NSTATS]);

impl Delta {
    /// A get of `n` objects that succeeded (or not), `backend` of which
    /// (0: none) came from one backend dequeue.
    #[inline(always)]
    pub fn get(n: usize, ok: bool, backend: u32) -> Self {
        let mut d = Self::default();
        if ok {
            d.0[idx::GET_SUCCESS_BULK] = 1;
            d.0[idx::GET_SUCCESS_OBJS] = n as u64;
        } else {
            d.0[idx::GET_FAIL_BULK] = 1;
            d.0[idx::GET_FAIL_OBJS] = n as u64;
        }
        d.backend_get(backend)
    }

    /// A put of `n` objects, `backend` of which (0: none) went into the
    /// backend in one enqueue (directly or by a flush).
    #[inline(always)]
    pub fn put(n: usize, backend: u32) -> Self {
        let mut d = Self::default();
        d.0[idx::PUT_BULK] = 1;
        d.0[idx::PUT_OBJS] = n as u64;
        d.backend_put(backend)
    }

    /// A contiguous-block get of `n` blocks that succeeded (or not): one
    /// get call and its blocks, as DPDK counts them.
    pub fn blocks(n: usize, ok: bool) -> Self {
        let mut d = Self::default();
        if ok {
            d.0[idx::GET_SUCCESS_BULK] = 1;
            d.0[idx::GET_SUCCESS_BLKS] = n as u64;
        } else {
            d.0[idx::GET_FAIL_BULK] = 1;
            d.0[idx::GET_FAIL_BLKS] = n as u64;
        }
        d
    }

    /// One backend enqueue of `n` objects (0: none).
    #[inline(always)]
    pub fn backend_put(mut self, n: u32) -> Self {
        if n != 0 {
            self.0[idx::PUT_COMMON_POOL_BULK] += 1;
            self.0[idx::PUT_COMMON_POOL_OBJS] += u64::from(n);
        }
        self
    }

    /// One backend dequeue of `n` objects (0: none).
    #[inline(always)]
    fn backend_get(mut self, n: u32) -> Self {
        if n != 0 {
            self.0[idx::GET_COMMON_POOL_BULK] += 1;
            self.0[idx::GET_COMMON_POOL_OBJS] += u64::from(n);
        }
        self
    }
}

impl StatsRow {
    /// Adds `d`; the caller is the only writer of this row (the thread
    /// owning its lcore id): plain loads and stores.
    #[inline(always)]
    pub fn add_owned(&self, d: &Delta) {
        for (c, &v) in self.c.iter().zip(&d.0) {
            if v != 0 {
                c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
            }
        }
    }

    /// Adds `d` to a row other threads write too.
    #[inline(always)]
    pub fn add_shared(&self, d: &Delta) {
        for (c, &v) in self.c.iter().zip(&d.0) {
            if v != 0 {
                c.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// The counters.
    pub fn read(&self) -> StatsCounters {
        let v = |i: usize| self.c[i].load(Ordering::Relaxed);
        StatsCounters {
            put_bulk: v(idx::PUT_BULK),
            put_objs: v(idx::PUT_OBJS),
            put_common_pool_bulk: v(idx::PUT_COMMON_POOL_BULK),
            put_common_pool_objs: v(idx::PUT_COMMON_POOL_OBJS),
            get_common_pool_bulk: v(idx::GET_COMMON_POOL_BULK),
            get_common_pool_objs: v(idx::GET_COMMON_POOL_OBJS),
            get_success_bulk: v(idx::GET_SUCCESS_BULK),
            get_success_objs: v(idx::GET_SUCCESS_OBJS),
            get_fail_bulk: v(idx::GET_FAIL_BULK),
            get_fail_objs: v(idx::GET_FAIL_OBJS),
            get_success_blks: v(idx::GET_SUCCESS_BLKS),
            get_fail_blks: v(idx::GET_FAIL_BLKS),
        }
    }

    /// Zeroes the counters.
    pub fn reset(&self) {
        for c in &self.c {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// DPDK's per-lcore mempool statistics (`struct rte_mempool_debug_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsCounters {
    /// Put calls that returned their objects.
    pub put_bulk: u64,
    /// Objects they returned.
    pub put_objs: u64,
    /// Enqueues into the backend ("common pool"): puts that bypass or
    /// have no cache, cache flushes.
    pub put_common_pool_bulk: u64,
    /// Objects enqueued into the backend.
    pub put_common_pool_objs: u64,
    /// Successful dequeues from the backend: gets that bypass or have no
    /// cache, cache refills.
    pub get_common_pool_bulk: u64,
    /// Objects dequeued from the backend.
    pub get_common_pool_objs: u64,
    /// Get calls that succeeded.
    pub get_success_bulk: u64,
    /// Objects they handed out.
    pub get_success_objs: u64,
    /// Get calls that failed (not enough objects, or not enough whole
    /// blocks).
    pub get_fail_bulk: u64,
    /// Objects they asked for.
    pub get_fail_objs: u64,
    /// Contiguous blocks handed out by successful
    /// [`get_contig_blocks`](crate::Mempool::get_contig_blocks) calls
    /// (each call also counts in `get_success_bulk`).
    pub get_success_blks: u64,
    /// Blocks asked for by failed ones (each also in `get_fail_bulk`).
    pub get_fail_blks: u64,
}

impl StatsCounters {
    /// Every counter is 0.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// (name, value) pairs in DPDK's order and with DPDK's names.
    pub fn fields(&self) -> [(&'static str, u64); NSTATS] {
        [
            ("put_bulk", self.put_bulk),
            ("put_objs", self.put_objs),
            ("put_common_pool_bulk", self.put_common_pool_bulk),
            ("put_common_pool_objs", self.put_common_pool_objs),
            ("get_common_pool_bulk", self.get_common_pool_bulk),
            ("get_common_pool_objs", self.get_common_pool_objs),
            ("get_success_bulk", self.get_success_bulk),
            ("get_success_objs", self.get_success_objs),
            ("get_fail_bulk", self.get_fail_bulk),
            ("get_fail_objs", self.get_fail_objs),
            ("get_success_blks", self.get_success_blks),
            ("get_fail_blks", self.get_fail_blks),
        ]
    }
}

impl std::ops::AddAssign for StatsCounters {
    fn add_assign(&mut self, o: Self) {
        self.put_bulk += o.put_bulk;
        self.put_objs += o.put_objs;
        self.put_common_pool_bulk += o.put_common_pool_bulk;
        self.put_common_pool_objs += o.put_common_pool_objs;
        self.get_common_pool_bulk += o.get_common_pool_bulk;
        self.get_common_pool_objs += o.get_common_pool_objs;
        self.get_success_bulk += o.get_success_bulk;
        self.get_success_objs += o.get_success_objs;
        self.get_fail_bulk += o.get_fail_bulk;
        self.get_fail_objs += o.get_fail_objs;
        self.get_success_blks += o.get_success_blks;
        self.get_fail_blks += o.get_fail_blks;
    }
}

/// The counters of one lcore id, or of the threads without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LcoreStats {
    /// The lcore id; `None`: threads without an lcore id (one shared row).
    pub lcore: Option<u32>,
    /// Its counters.
    #[serde(flatten)]
    pub counters: StatsCounters,
}

/// A pool's statistics ([`Mempool::stats`](crate::Mempool::stats)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MempoolStats {
    /// Pool name.
    pub pool: String,
    /// Whether statistics are on now.
    pub enabled: bool,
    /// Sum over every row (DPDK's `rte_mempool_dump` sum).
    pub totals: StatsCounters,
    /// Rows with a count, by lcore id; the row of threads without an
    /// lcore id last.
    pub lcores: Vec<LcoreStats>,
}

impl MempoolStats {
    /// Totals and rows from the table's rows (none: never switched on).
    pub(crate) fn new(pool: &str, enabled: bool, rows: Option<&[StatsRow]>) -> Self {
        let mut totals = StatsCounters::default();
        let mut lcores = Vec::new();
        for (i, r) in rows.unwrap_or(&[]).iter().enumerate() {
            let c = r.read();
            if c.is_zero() {
                continue;
            }
            totals += c;
            lcores.push(LcoreStats {
                lcore: (i != SHARED_ROW).then_some(i as u32),
                counters: c,
            });
        }
        Self {
            pool: pool.to_string(),
            enabled,
            totals,
            lcores,
        }
    }

    /// The counters of lcore `id` (`None`: threads without one); zeros
    /// when it has none.
    pub fn lcore(&self, id: Option<u32>) -> StatsCounters {
        self.lcores
            .iter()
            .find(|l| l.lcore == id)
            .map(|l| l.counters)
            .unwrap_or_default()
    }

    /// The statistics as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// As `rte_mempool_dump` prints them (`  stats:` then one
/// `    name=value` line per counter), then one line per row.
impl std::fmt::Display for MempoolStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "  stats: {}", if self.enabled { "on" } else { "off" });
        for (name, v) in self.totals.fields() {
            let _ = writeln!(s, "    {name}={v}");
        }
        for l in &self.lcores {
            let who = l
                .lcore
                .map_or_else(|| "no lcore".to_string(), |id| format!("lcore {id}"));
            let vals: Vec<String> = l
                .counters
                .fields()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            let _ = writeln!(s, "    {who}: {}", vals.join(" "));
        }
        f.write_str(&s)
    }
}
