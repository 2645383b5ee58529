//! Leak tracking, switchable at run time per pool
//! ([`Mempool::set_leak_tracking`](crate::Mempool::set_leak_tracking)).
//!
//! While a pool's tracking is on, every object its get calls hand out
//! records its owner in a side table, and every put clears the record:
//! the table is the memzone `MT_<name>`, created when tracking is first
//! switched on (by any process) and freed with the pool, one 32-byte owner
//! record per object, indexed by the object's index. The table is
//! shared memory, so a secondary's gets are visible in the primary's
//! report and the other way round. The object headers are unchanged.
//!
//! A record: process id, thread id (gettid), lcore id (none for a thread
//! without one), the caller's tag ([`set_caller_tag`] for the thread, or
//! per call with [`Mempool::get_bulk_tagged`](crate::Mempool::get_bulk_tagged))
//! and a sequence number of the get call (a per-pool counter in the
//! table, one atomic add per tracked get call), so the oldest holders
//! show first.
//!
//! Objects are recorded at the API boundary: objects in per-lcore caches
//! are in the pool, not outstanding; objects in a user-owned
//! [`MempoolCache`](crate::MempoolCache) are neither recorded nor
//! listed (the pool counts them as in use).
//!
//! Switching: on clears the table when tracking was off, so objects taken
//! before (while tracking was off) have no record; a report counts them
//! as `untracked` (objects in use minus objects recorded) but cannot name
//! them. Switching off stops recording at once; the records stay
//! readable until tracking is switched on again. Gets and puts that run
//! while another thread switches may or may not be recorded.
//!
//! The process and thread ids are read once per thread and cached: a
//! forked child's threads report their parent's ids (as with lcore ids, a
//! child must not use its parent's pool state anyway).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64};

use serde::Serialize;

/// Prefix of a pool's leak tracking zone: `MT_<name>`.
pub const LEAK_ZONE_PREFIX: &str = "MT_";

/// "MPLLEAK1": an initialised table.
pub(crate) const LEAK_MAGIC: u64 = u64::from_le_bytes(*b"MPLLEAK1");

/// Bytes before the records: the head line and the sequence counter's
/// line (kept apart so bumping the counter does not slow readers of the
/// head).
pub(crate) const LEAK_HEAD: usize = 128;

/// Head of the table zone.
#[repr(C, align(64))]
pub(crate) struct LeakHead {
    /// [`LEAK_MAGIC`] once initialised.
    pub magic: AtomicU64,
    /// Records (objects of the pool).
    pub n: AtomicU32,
    _pad: [u8; 52],
    /// The next sequence number (starts at 1; 0 marks a free record).
    pub seq: AtomicU64,
}

/// One object's owner while it is out (all fields 0 when it is not).
#[repr(C)]
pub(crate) struct OwnerRecord {
    /// Sequence number of the get that handed it out; 0: not out (or
    /// not recorded).
    pub seq: AtomicU64,
    /// Caller tag.
    pub tag: AtomicU64,
    /// Process id.
    pub pid: AtomicU32,
    /// Thread id.
    pub tid: AtomicU32,
    /// Lcore id, `u32::MAX` for none.
    pub lcore: AtomicU32,
    _pad: u32,
}

const _: () = {
    assert!(std::mem::size_of::<OwnerRecord>() == 32);
    assert!(std::mem::size_of::<LeakHead>() == LEAK_HEAD);
};

/// Bytes of the table zone for `n` objects.
pub(crate) fn table_bytes(n: u32) -> usize {
    LEAK_HEAD + n as usize * std::mem::size_of::<OwnerRecord>()
}

thread_local! {
    static CALLER_TAG: Cell<u64> = const { Cell::new(0) };
    /// (pid, tid), 0 until first read.
    static IDS: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

/// Sets the calling thread's caller tag, recorded with every object its
/// gets hand out while a pool's leak tracking is on; returns the previous
/// tag. Threads start with tag 0.
pub fn set_caller_tag(tag: u64) -> u64 {
    CALLER_TAG.with(|t| t.replace(tag))
}

/// The calling thread's caller tag.
pub fn caller_tag() -> u64 {
    CALLER_TAG.with(Cell::get)
}

/// (pid, tid) of the calling thread, cached per thread.
pub(crate) fn ids() -> (u32, u32) {
    IDS.with(|c| {
        let v = c.get();
        if v.0 != 0 {
            return v;
        }
        let v = (
            rustix::process::getpid().as_raw_nonzero().get() as u32,
            rustix::thread::gettid().as_raw_nonzero().get() as u32,
        );
        c.set(v);
        v
    })
}

/// Who holds an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Thread id (gettid).
    pub tid: u32,
    /// Lcore id of the thread, if it had one.
    pub lcore: Option<u32>,
    /// The caller tag.
    pub tag: u64,
    /// Sequence number of the get (per pool, increasing).
    pub seq: u64,
}

/// An object out of the pool, with its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outstanding {
    /// The element's address.
    pub addr: usize,
    /// The object's index (population order).
    pub index: u32,
    /// Who took it.
    pub owner: Owner,
}

/// Objects held by one (process, lcore, tag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeakGroup {
    /// Process id.
    pub pid: u32,
    /// Lcore id, if the takers had one.
    pub lcore: Option<u32>,
    /// Caller tag.
    pub tag: u64,
    /// Objects held.
    pub count: u32,
    /// Threads that took them.
    pub tids: Vec<u32>,
    /// Oldest get (sequence number).
    pub first_seq: u64,
    /// Newest get.
    pub last_seq: u64,
    /// Addresses of up to 8 of the objects, oldest first.
    pub sample: Vec<usize>,
}

/// What a pool's leak tracking says is out, grouped by owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeakReport {
    /// Pool name.
    pub pool: String,
    /// Whether tracking is on now.
    pub tracking: bool,
    /// Objects in use (the pool's count: not in the backend or an lcore
    /// cache; objects in user-owned caches count here).
    pub in_use: u32,
    /// Objects with an owner record.
    pub tracked: u32,
    /// Objects in use without a record (taken while tracking was off, or
    /// sitting in user-owned caches); exact only when no get or put runs.
    pub untracked: u32,
    /// Owners, most objects first.
    pub groups: Vec<LeakGroup>,
}

impl LeakReport {
    /// Groups `out` by (pid, lcore, tag).
    pub(crate) fn new(pool: &str, tracking: bool, in_use: u32, out: &[Outstanding]) -> Self {
        let mut groups: BTreeMap<(u32, Option<u32>, u64), LeakGroup> = BTreeMap::new();
        let mut sorted = out.to_vec();
        sorted.sort_by_key(|o| o.owner.seq);
        for o in &sorted {
            let w = &o.owner;
            let g = groups
                .entry((w.pid, w.lcore, w.tag))
                .or_insert_with(|| LeakGroup {
                    pid: w.pid,
                    lcore: w.lcore,
                    tag: w.tag,
                    count: 0,
                    tids: Vec::new(),
                    first_seq: w.seq,
                    last_seq: w.seq,
                    sample: Vec::new(),
                });
            g.count += 1;
            if !g.tids.contains(&w.tid) {
                g.tids.push(w.tid);
            }
            g.last_seq = w.seq;
            if g.sample.len() < 8 {
                g.sample.push(o.addr);
            }
        }
        let mut groups: Vec<LeakGroup> = groups.into_values().collect();
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.first_seq.cmp(&b.first_seq)));
        let tracked = out.len() as u32;
        Self {
            pool: pool.to_string(),
            tracking,
            in_use,
            tracked,
            untracked: in_use.saturating_sub(tracked),
            groups,
        }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

impl std::fmt::Display for LeakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mempool <{}> leak report: tracking {}, {} in use, {} with an owner, {} untracked",
            self.pool,
            if self.tracking { "on" } else { "off" },
            self.in_use,
            self.tracked,
            self.untracked
        );
        for g in &self.groups {
            let lcore = g.lcore.map_or_else(|| "-".to_string(), |l| l.to_string());
            let tids: Vec<String> = g.tids.iter().map(u32::to_string).collect();
            let sample: Vec<String> = g.sample.iter().map(|a| format!("{a:#x}")).collect();
            let _ = writeln!(
                s,
                "  pid {} lcore {lcore} tag {:#x}: {} object(s), threads {}, gets #{}..#{}, e.g. {}",
                g.pid,
                g.tag,
                g.count,
                tids.join(","),
                g.first_seq,
                g.last_seq,
                sample.join(" ")
            );
        }
        f.write_str(&s)
    }
}
