//! The memzone table as it sits in the shared config: a header, a fixed
//! array of entries and an open-addressing name index, all addressed by
//! offsets so every process sees the same table.
//!
//! ```text
//! TableHeader (64 bytes): lock, capacity, buckets, count, free list, ...
//! ZoneEntry x capacity (128 bytes each)
//! u32 x buckets: 0 = empty, else entry index + 1 (linear probing,
//!                backward-shift deletion: no tombstones, so a lookup
//!                stays short however many zones came and went)
//! ```
//!
//! Every field except an entry's `state` and `generation` is read and
//! written under the table lock; those two are atomics so a stale handle
//! can be told apart cheaply.
//!
//! An entry moves FREE -> RESERVING -> READY -> FREEING -> FREE. The two
//! transitional states belong to a process that finishes them outside the
//! lock (the reserver allocates, the freer gives the memory back) and
//! names itself in the entry (`owner_pid`, `freer_pid`). A writer that dies
//! holding the lock makes the next one [`rebuild`](Writing::rebuild) the
//! index and free stack from the entries: it drops the transitional entries
//! of dead processes and leaves those of live ones to them, so a live
//! process never finds its entry recycled (or handed out twice) under it.

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::shm::lock::RwLock;

/// Bytes of a name, NUL-padded (31 usable, as DPDK).
pub(crate) const NAME_BYTES: usize = 32;

/// Entry is unused (on the free list or never touched).
pub(crate) const STATE_FREE: u32 = 0;
/// A reserver claimed the name and is getting memory.
pub(crate) const STATE_RESERVING: u32 = 1;
/// The zone exists.
pub(crate) const STATE_READY: u32 = 2;
/// Being freed: out of the index, memory on its way back.
pub(crate) const STATE_FREEING: u32 = 3;

/// The start of the table.
#[repr(C)]
pub(crate) struct TableHeader {
    /// Guards everything below and every entry's plain fields.
    pub lock: RwLock,
    /// Entries (`--max-memzones`).
    pub capacity: u32,
    /// Index slots (a power of two, at least twice the capacity).
    pub buckets: u32,
    /// Zones that exist or are being reserved.
    pub count: u32,
    /// Entries ever handed out (the ones past it were never used).
    pub high_water: u32,
    /// Head of the free-entry stack: entry index + 1, or 0.
    pub free_head: u32,
    /// Padding.
    pub pad: [u32; 2],
    /// Reservations that succeeded, ever.
    pub reserves: u64,
    /// Frees, ever.
    pub frees: u64,
    /// Room to grow.
    pub reserved: [u64; 2],
}

/// One zone.
#[repr(C)]
pub(crate) struct ZoneEntry {
    /// NUL-padded name.
    pub name: [u8; NAME_BYTES],
    /// First byte (an address in the instance's reservation).
    pub addr: u64,
    /// IOVA of the first byte (`u64::MAX` when unknown).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page size under the zone.
    pub page_size: u64,
    /// Alignment asked for (after raising to 64).
    pub align: u64,
    /// Boundary asked for (0: none).
    pub bound: u64,
    /// Socket the memory came from.
    pub socket: i32,
    /// `MemzoneFlags` bits asked for.
    pub flags: u32,
    /// `STATE_*`.
    pub state: AtomicU32,
    /// Bumped when the zone is freed: handles carry it.
    pub generation: AtomicU32,
    /// Pid of the process that reserved it.
    pub owner_pid: u32,
    /// Hash of the name.
    pub hash: u32,
    /// Next entry on the free stack (index + 1, or 0).
    pub next_free: u32,
    /// FREEING: pid of the process freeing the zone (it recycles the
    /// entry once the memory is back; not always the reserver).
    pub freer_pid: u32,
    /// Room to grow.
    pub reserved: [u32; 4],
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<TableHeader>() == 64);
    assert!(size_of::<ZoneEntry>() == 128);
    assert!(std::mem::offset_of!(ZoneEntry, state) == 88);
    assert!(std::mem::offset_of!(ZoneEntry, freer_pid) == 108);
};

/// Index slots for `capacity` entries: a load factor of at most 1/2.
pub(crate) fn bucket_count(capacity: u32) -> u32 {
    (capacity.max(8) * 2).next_power_of_two()
}

/// Bytes of a table of `capacity` entries.
pub fn table_bytes(capacity: u32) -> usize {
    size_of::<TableHeader>()
        + capacity as usize * size_of::<ZoneEntry>()
        + bucket_count(capacity) as usize * size_of::<u32>()
}

/// FNV-1a over the padded name: short names, a good spread, no setup.
pub(crate) fn hash_name(name: &[u8; NAME_BYTES]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in name {
        if b == 0 {
            break;
        }
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A process-local view of the table: raw pointers into the config.
pub(crate) struct Table {
    header: *mut TableHeader,
    entries: *mut ZoneEntry,
    index: *mut u32,
}

/// The table with its lock held for writing.
pub(crate) struct Writing<'a> {
    t: &'a Table,
    _guard: crate::shm::lock::WriteGuard<'a>,
}

/// The table with its lock held for reading.
pub(crate) struct Reading<'a> {
    t: &'a Table,
    _guard: crate::shm::lock::ReadGuard<'a>,
}

impl Table {
    /// A view of the table at `base`; with `fresh`, initialises the
    /// header for `capacity` entries.
    ///
    /// # Safety
    /// `base` points at `table_bytes(capacity)` bytes of the config
    /// mapping, 64-byte aligned, zero-filled if `fresh`, that outlive the
    /// value.
    pub(crate) unsafe fn new(base: *mut u8, capacity: u32, fresh: bool) -> Table {
        #[allow(clippy::cast_ptr_alignment)]
        let header = base.cast::<TableHeader>();
        // SAFETY: the caller guarantees the region; the offsets stay inside
        // it (table_bytes adds exactly these parts), and both are multiples
        // of 64 from a 64-byte aligned base.
        #[allow(clippy::cast_ptr_alignment)]
        let (entries, index) = unsafe {
            let entries = base.add(size_of::<TableHeader>()).cast::<ZoneEntry>();
            let index = base
                .add(size_of::<TableHeader>() + capacity as usize * size_of::<ZoneEntry>())
                .cast::<u32>();
            (entries, index)
        };
        if fresh {
            // SAFETY: fresh, zero-filled, nobody else sees it yet.
            unsafe {
                (*header).capacity = capacity;
                (*header).buckets = bucket_count(capacity);
            }
        }
        Table {
            header,
            entries,
            index,
        }
    }

    pub(crate) fn lock(&self) -> &RwLock {
        // SAFETY: the header lives in the config mapping; the lock is its
        // own synchronisation.
        unsafe { &(*self.header).lock }
    }

    /// Capacity of the table.
    pub(crate) fn capacity(&self) -> u32 {
        // SAFETY: written once at init, before any other process attaches.
        unsafe { (*self.header).capacity }
    }

    /// The table's lock, for writing. A writer that died holding it is
    /// taken over and the table rebuilt from its entries.
    pub(crate) fn write(&self) -> Writing<'_> {
        let lock = self.lock();
        if let Some(g) = lock.try_write() {
            return Writing { t: self, _guard: g };
        }
        loop {
            match lock.write_timeout(std::time::Duration::from_millis(100)) {
                Ok(g) => return Writing { t: self, _guard: g },
                Err(crate::shm::lock::LockError::OwnerDead { pid }) => {
                    if let Some(g) = lock.take_over_dead_writer() {
                        tracing::error!(pid, "took over the memzone table lock from a dead process; rebuilding the table");
                        let mut w = Writing { t: self, _guard: g };
                        w.rebuild();
                        return w;
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// The table's lock, for reading (a dead writer is handled as in
    /// [`write`](Self::write)).
    pub(crate) fn read(&self) -> Reading<'_> {
        let lock = self.lock();
        if let Some(g) = lock.try_read() {
            return Reading { t: self, _guard: g };
        }
        loop {
            match lock.read_timeout(std::time::Duration::from_millis(100)) {
                Ok(g) => return Reading { t: self, _guard: g },
                Err(crate::shm::lock::LockError::OwnerDead { .. }) => drop(self.write()),
                Err(_) => {}
            }
        }
    }

    /// Entry `i` (callers keep `i < capacity`).
    pub(crate) fn entry(&self, i: u32) -> &ZoneEntry {
        debug_assert!(i < self.capacity());
        // SAFETY: `i < capacity`, the entry array lies in the mapping.
        // Readers of its plain fields hold the table lock; `state` and
        // `generation` are atomics.
        unsafe { &*self.entries.add(i as usize) }
    }

    /// Entry `i`, for writing under the lock.
    #[allow(clippy::mut_from_ref)]
    fn entry_mut(&self, i: u32) -> &mut ZoneEntry {
        debug_assert!(i < self.capacity());
        // SAFETY: as `entry`; only called through `Writing`, whose lock
        // excludes every other reader and writer of the plain fields.
        unsafe { &mut *self.entries.add(i as usize) }
    }

    fn header(&self) -> &TableHeader {
        // SAFETY: the header lies in the mapping; plain fields are read
        // under the lock by the callers.
        unsafe { &*self.header }
    }

    #[allow(clippy::mut_from_ref)]
    fn header_mut(&self) -> &mut TableHeader {
        // SAFETY: only through `Writing`, under the write lock.
        unsafe { &mut *self.header }
    }

    fn bucket(&self, i: u32) -> u32 {
        // SAFETY: `i < buckets` (masked by the callers), inside the mapping.
        unsafe { self.index.add(i as usize).read() }
    }

    fn set_bucket(&self, i: u32, v: u32) {
        // SAFETY: as `bucket`, under the write lock.
        unsafe { self.index.add(i as usize).write(v) }
    }

    /// The entry named `name` in the index, any state.
    fn find(&self, name: &[u8; NAME_BYTES], hash: u32) -> Option<u32> {
        let mask = self.header().buckets - 1;
        let mut i = hash & mask;
        loop {
            let v = self.bucket(i);
            if v == 0 {
                return None;
            }
            let e = self.entry(v - 1);
            if e.hash == hash && e.name == *name {
                return Some(v - 1);
            }
            i = (i + 1) & mask;
        }
    }
}

impl Reading<'_> {
    /// Index of the ready entry named `name`.
    pub(crate) fn lookup_index(&self, name: &[u8; NAME_BYTES], hash: u32) -> Option<u32> {
        let i = self.t.find(name, hash)?;
        (self.t.entry(i).state.load(Ordering::Acquire) == STATE_READY).then_some(i)
    }

    /// Zones that exist or are being reserved.
    pub(crate) fn count(&self) -> u32 {
        self.t.header().count
    }

    /// Entries ever used: every live entry has a lower index.
    pub(crate) fn high_water(&self) -> u32 {
        self.t.header().high_water
    }

    /// (reserves, frees) ever.
    pub(crate) fn totals(&self) -> (u64, u64) {
        (self.t.header().reserves, self.t.header().frees)
    }

    /// Entry `i`.
    pub(crate) fn entry(&self, i: u32) -> &ZoneEntry {
        self.t.entry(i)
    }
}

/// What [`Writing::claim`] found.
pub(crate) enum Claim {
    /// The name is ours: entry index.
    Claimed(u32),
    /// A zone of that name exists (entry index).
    Exists(u32),
    /// Another reserver is getting memory for that name: its pid.
    Pending(u32),
    /// No free entry.
    Full,
}

impl Writing<'_> {
    /// Takes a free entry for `name` and puts it in the index in state
    /// RESERVING, unless the name is in use or the table is full.
    pub(crate) fn claim(&mut self, name: &[u8; NAME_BYTES], hash: u32, pid: u32) -> Claim {
        let table = self.t;
        if let Some(i) = table.find(name, hash) {
            let e = table.entry(i);
            return match e.state.load(Ordering::Acquire) {
                STATE_RESERVING => Claim::Pending(e.owner_pid),
                _ => Claim::Exists(i),
            };
        }
        let head = table.header_mut();
        let i = if head.free_head != 0 {
            let i = head.free_head - 1;
            head.free_head = table.entry(i).next_free;
            i
        } else if head.high_water < head.capacity {
            head.high_water += 1;
            head.high_water - 1
        } else {
            return Claim::Full;
        };
        let e = table.entry_mut(i);
        e.name = *name;
        e.hash = hash;
        e.owner_pid = pid;
        e.next_free = 0;
        e.freer_pid = 0;
        e.addr = 0;
        e.len = 0;
        e.state.store(STATE_RESERVING, Ordering::Release);
        let mask = head.buckets - 1;
        let mut slot = hash & mask;
        while table.bucket(slot) != 0 {
            slot = (slot + 1) & mask;
        }
        table.set_bucket(slot, i + 1);
        head.count += 1;
        Claim::Claimed(i)
    }

    /// Entry `i`, for filling in.
    pub(crate) fn entry_mut(&mut self, i: u32) -> &mut ZoneEntry {
        self.t.entry_mut(i)
    }

    /// Entry `i`.
    pub(crate) fn entry(&self, i: u32) -> &ZoneEntry {
        self.t.entry(i)
    }

    /// Publishes a claimed entry as a zone.
    pub(crate) fn publish(&mut self, i: u32) {
        self.t.header_mut().reserves += 1;
        self.t.entry(i).state.store(STATE_READY, Ordering::Release);
    }

    /// Takes entry `i` out of the index (its name is free again) and
    /// marks it FREEING on behalf of process `pid`, who must recycle it
    /// with [`release`] and the returned ticket (the entry's new
    /// generation).
    ///
    /// [`release`]: Self::release
    pub(crate) fn unlink(&mut self, entry: u32, pid: u32) -> u32 {
        let table = self.t;
        table.entry_mut(entry).freer_pid = pid;
        let gone = table.entry(entry);
        // State first: a writer that dies between the two stores leaves a
        // FREEING entry (its free is dropped by the rebuild, which bumps
        // the generation) or a READY one with its old generation (the zone
        // stays, and so do its handles); never a READY zone whose handles
        // are all stale.
        gone.state.store(STATE_FREEING, Ordering::Release);
        let ticket = gone
            .generation
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        let head = table.header_mut();
        head.count -= 1;
        let mask = head.buckets - 1;
        let mut hole = gone.hash & mask;
        while table.bucket(hole) != entry + 1 {
            hole = (hole + 1) & mask;
        }
        // Backward-shift: pull later members of the cluster into the hole
        // when their home slot allows it, so no tombstone is needed.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let moved = table.bucket(j);
            if moved == 0 {
                break;
            }
            let home = table.entry(moved - 1).hash & mask;
            // Can `moved` move to `hole`? Only if its home is not in (hole, j].
            let home_in_between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !home_in_between {
                table.set_bucket(hole, moved);
                hole = j;
            }
        }
        table.set_bucket(hole, 0);
        ticket
    }

    /// Puts an entry that [`unlink`](Self::unlink) gave `ticket` for back
    /// on the free stack. Returns false, changing nothing, if the entry is
    /// no longer that FREEING entry (it cannot be, unless the table was
    /// recovered wrongly: pushing it again would hand it out twice).
    pub(crate) fn release(&mut self, i: u32, ticket: u32, freed: bool) -> bool {
        let t = self.t;
        let e = t.entry_mut(i);
        if e.state.load(Ordering::Acquire) != STATE_FREEING
            || e.generation.load(Ordering::Acquire) != ticket
        {
            tracing::error!(
                entry = i,
                state = e.state.load(Ordering::Acquire),
                "a memzone entry being freed was recycled by someone else; leaving it alone"
            );
            return false;
        }
        let h = t.header_mut();
        if freed {
            h.frees += 1;
        }
        e.state.store(STATE_FREE, Ordering::Release);
        e.name = [0; NAME_BYTES];
        e.addr = 0;
        e.len = 0;
        e.freer_pid = 0;
        e.next_free = h.free_head;
        h.free_head = i + 1;
        true
    }

    /// Index of the entry named `name`, any state.
    pub(crate) fn find(&self, name: &[u8; NAME_BYTES], hash: u32) -> Option<u32> {
        self.t.find(name, hash)
    }

    /// Rebuilds the index, the free stack and the count from the entries,
    /// after a writer died mid-update. Claims and frees of dead processes
    /// are dropped (a zone whose free was cut short is gone; its memory
    /// may stay allocated in the heap). Claims and frees of live
    /// processes are kept: a claim stays in the index, an entry being
    /// freed stays out of the index and off the free stack until its freer
    /// releases it.
    pub(crate) fn rebuild(&mut self) {
        let t = self.t;
        let h = t.header_mut();
        let mask = h.buckets - 1;
        for b in 0..h.buckets {
            t.set_bucket(b, 0);
        }
        h.free_head = 0;
        h.count = 0;
        for i in (0..h.high_water.min(h.capacity)).rev() {
            let e = t.entry_mut(i);
            let state = e.state.load(Ordering::Acquire);
            let pid = if state == STATE_FREEING {
                e.freer_pid
            } else {
                e.owner_pid
            };
            let alive = || !crate::shm::lock::pid_is_dead(pid);
            let keep = match state {
                STATE_READY => true,
                STATE_RESERVING => alive(),
                STATE_FREEING if alive() => {
                    // Its freer is giving the memory back and will
                    // release the entry: not free yet, not in the index.
                    continue;
                }
                _ => false,
            };
            if !keep {
                if state != STATE_FREE {
                    tracing::warn!(
                        entry = i,
                        state,
                        pid,
                        "dropping a memzone entry a dead process left half done"
                    );
                    e.generation.fetch_add(1, Ordering::AcqRel);
                }
                e.state.store(STATE_FREE, Ordering::Release);
                e.name = [0; NAME_BYTES];
                e.freer_pid = 0;
                e.next_free = h.free_head;
                h.free_head = i + 1;
                continue;
            }
            e.hash = hash_name(&e.name);
            let mut slot = e.hash & mask;
            while t.bucket(slot) != 0 {
                slot = (slot + 1) & mask;
            }
            t.set_bucket(slot, i + 1);
            h.count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> [u8; NAME_BYTES] {
        let mut n = [0; NAME_BYTES];
        n[..s.len()].copy_from_slice(s.as_bytes());
        n
    }

    /// A pid no process has (above any `pid_max`).
    const DEAD_PID: u32 = 0x3fff_fff0;

    struct Buf(Vec<u64>);

    fn table(cap: u32) -> (Buf, Table) {
        let mut buf = Buf(vec![0u64; table_bytes(cap).div_ceil(8)]);
        // SAFETY: a zeroed, 8-byte aligned buffer of the right size that
        // outlives the table within each test (moved together).
        let t = unsafe { Table::new(buf.0.as_mut_ptr().cast(), cap, true) };
        (buf, t)
    }

    fn claim(t: &Table, s: &str) -> Claim {
        let n = name(s);
        t.write().claim(&n, hash_name(&n), 1)
    }

    fn find(t: &Table, s: &str) -> Option<u32> {
        let n = name(s);
        t.write().find(&n, hash_name(&n))
    }

    #[test]
    fn claim_find_unlink_release_reuses_entries() {
        let (_b, t) = table(4);
        let Claim::Claimed(a) = claim(&t, "a") else {
            panic!()
        };
        assert!(matches!(claim(&t, "a"), Claim::Pending(1)));
        t.write().publish(a);
        assert!(matches!(claim(&t, "a"), Claim::Exists(i) if i == a));
        for s in ["b", "c", "d"] {
            assert!(matches!(claim(&t, s), Claim::Claimed(_)));
        }
        assert!(matches!(claim(&t, "e"), Claim::Full));
        {
            let mut w = t.write();
            let ticket = w.unlink(a, 1);
            assert!(w.release(a, ticket, true));
        }
        assert_eq!(find(&t, "a"), None);
        assert!(matches!(claim(&t, "e"), Claim::Claimed(i) if i == a));
        assert_eq!(t.read().count(), 4);
    }

    #[test]
    fn index_survives_heavy_churn_with_colliding_clusters() {
        // Many inserts and deletes in a small table: every live name stays
        // findable and every removed one is gone (checks backward shift).
        let cap = 64;
        let (_buf, tab) = table(cap);
        let mut live: Vec<(String, u32)> = Vec::new();
        let mut seed = 12345u64;
        for step in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let insert = live.is_empty() || (live.len() < cap as usize && seed % 3 != 0);
            if insert {
                let s = format!("z{step}");
                match claim(&tab, &s) {
                    Claim::Claimed(i) => {
                        tab.write().publish(i);
                        live.push((s, i));
                    }
                    _ => panic!("claim failed with {} live", live.len()),
                }
            } else {
                let pick = (seed >> 8) as usize % live.len();
                let (s, i) = live.swap_remove(pick);
                let mut w = tab.write();
                let ticket = w.unlink(i, 1);
                assert!(w.release(i, ticket, true));
                drop(w);
                assert_eq!(find(&tab, &s), None, "{s} still found");
            }
            if step % 97 == 0 {
                for (s, i) in &live {
                    assert_eq!(find(&tab, s), Some(*i), "{s} lost at step {step}");
                }
            }
        }
        assert_eq!(tab.read().count() as usize, live.len());
    }

    #[test]
    fn rebuild_recovers_the_index_and_drops_dead_claims() {
        let (_buf, tab) = table(16);
        let mut ids = Vec::new();
        for n in ["a", "b", "c", "d"] {
            let Claim::Claimed(i) = claim(&tab, n) else {
                panic!()
            };
            ids.push(i);
        }
        for &i in &ids[..3] {
            tab.write().publish(i);
        }
        // "d" stays RESERVING by a pid that does not exist.
        tab.write().entry_mut(ids[3]).owner_pid = DEAD_PID;
        // A writer died mid-update: the index is wiped.
        {
            let w = tab.write();
            for b in 0..bucket_count(16) {
                w.t.set_bucket(b, 0);
            }
        }
        assert_eq!(find(&tab, "a"), None);
        tab.write().rebuild();
        for (n, &i) in ["a", "b", "c"].iter().zip(&ids) {
            assert_eq!(find(&tab, n), Some(i), "{n}");
        }
        assert_eq!(find(&tab, "d"), None, "a dead claim is dropped");
        assert_eq!(tab.read().count(), 3);
        assert!(matches!(claim(&tab, "d"), Claim::Claimed(_)));
    }

    /// Every entry the free stack hands out, until the table is full:
    /// none twice.
    fn drain_free_stack(t: &Table, tag: &str) -> Vec<u32> {
        let mut got = Vec::new();
        for k in 0.. {
            match claim(t, &format!("{tag}{k}")) {
                Claim::Claimed(i) => {
                    assert!(!got.contains(&i), "entry {i} handed out twice: {got:?}");
                    got.push(i);
                }
                Claim::Full => break,
                _ => panic!("unexpected claim result"),
            }
        }
        got
    }

    #[test]
    fn rebuild_leaves_an_entry_being_freed_by_a_live_process_to_it() {
        // A zone reserved by a process that died since; a live process
        // (us) frees it and is between the two halves of the free (entry
        // unlinked, memory going back to the heap) when another writer
        // dies holding the lock and the table is rebuilt.
        let (_buf, tab) = table(8);
        let Claim::Claimed(a) = claim(&tab, "a") else {
            panic!()
        };
        let Claim::Claimed(b) = claim(&tab, "b") else {
            panic!()
        };
        tab.write().publish(a);
        tab.write().publish(b);
        tab.write().entry_mut(a).owner_pid = DEAD_PID;
        let ticket = tab.write().unlink(a, std::process::id());
        tab.write().rebuild();
        // Until its freer recycles it, the entry is nobody else's.
        let Claim::Claimed(c) = claim(&tab, "c") else {
            panic!()
        };
        assert_ne!(c, a, "an entry still being freed was handed out");
        tab.write().publish(c);
        let gen_c = tab.read().entry(c).generation.load(Ordering::Acquire);
        // The freer finishes: the entry goes back once.
        assert!(tab.write().release(a, ticket, true));
        assert!(!tab.write().release(a, ticket, true), "released twice");
        let more = drain_free_stack(&tab, "x");
        assert!(!more.contains(&b) && !more.contains(&c), "{more:?}");
        assert_eq!(more.len(), 8 - 2, "every other entry is free exactly once");
        // The zones that lived through it are untouched.
        assert_eq!(find(&tab, "b"), Some(b));
        assert_eq!(find(&tab, "c"), Some(c));
        let e = tab.read().entry(c).generation.load(Ordering::Acquire);
        assert_eq!(e, gen_c);
        assert_eq!(
            tab.read().entry(c).state.load(Ordering::Acquire),
            STATE_READY
        );
    }

    #[test]
    fn rebuild_drops_a_free_its_dead_freer_left_half_done() {
        // Reserved by a live process, freed by one that died before
        // recycling the entry: the rebuild recycles it.
        let (_buf, tab) = table(4);
        let Claim::Claimed(a) = claim(&tab, "a") else {
            panic!()
        };
        tab.write().publish(a);
        let ticket = tab.write().unlink(a, DEAD_PID);
        tab.write().rebuild();
        let got = drain_free_stack(&tab, "x");
        assert!(got.contains(&a), "{got:?}");
        assert_eq!(got.len(), 4);
        // Had the freer not died after all, its release changes nothing.
        assert!(!tab.write().release(a, ticket, true));
        assert_eq!(tab.read().count(), 4);
    }

    #[test]
    fn sizes_are_as_documented() {
        assert_eq!(bucket_count(2560), 8192);
        assert_eq!(table_bytes(2560), 64 + 2560 * 128 + 8192 * 4);
        assert_ne!(hash_name(&name("a")), hash_name(&name("b")));
    }
}
