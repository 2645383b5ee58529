//! The memzone table as it sits in the shared config: a header, a fixed
//! array of entries and an open-addressing name index, all addressed by
//! offsets so every process sees the same table.
//!
//! ```text
//! TableHeader (64 bytes): lock, capacity, buckets, count, free list,
//!                         change counter, ...
//! ZoneEntry x capacity (128 bytes each)
//! u32 x buckets: 0 = empty, else entry index + 1 (linear probing,
//!                backward-shift deletion: no tombstones, so a lookup
//!                stays short however many zones came and went)
//! ```
//!
//! # Writers and readers
//!
//! Writers take the table lock for writing: it names its holder, so a
//! writer that dies holding it is taken over and the table
//! [rebuilt](Writing::rebuild). Readers (lookups, walks, stats) take no
//! lock at all: they copy what they need optimistically and check the
//! header's change counter ([`SeqCount`]), which a writer makes odd before
//! its first change and even again when it releases the lock. A reader
//! killed, stopped or descheduled anywhere therefore holds nobody up
//! (before, readers held the lock for reading, counted rather than named,
//! and a reader killed inside it left every later writer waiting for
//! ever). A reader that keeps finding the counter odd or moving (a slow,
//! descheduled or dead writer) goes through the lock the writers' way
//! instead, which waits for a live writer and takes a dead one over.
//!
//! Every field that changes after init is an atomic, read and written
//! with atomic loads and stores (`Relaxed` unless said otherwise): readers
//! race with writers by design, and only atomics make that race defined.
//! The lock orders writers; the counter tells readers whether their copy
//! is whole. An entry's `state` and `generation` are also read with no
//! counter check at all, so a stale handle can be told apart cheaply.
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
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::shm::lock::RwLock;
use crate::shm::seqlock::SeqCount;

/// Bytes of a name, NUL-padded (31 usable, as DPDK).
pub(crate) const NAME_BYTES: usize = 32;

/// Words of a name as stored.
const NAME_WORDS: usize = NAME_BYTES / 8;

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
    /// Orders writers (readers do not take it).
    pub lock: RwLock,
    /// Entries (`--max-memzones`); written once, before anyone attaches.
    pub capacity: u32,
    /// Index slots (a power of two, at least twice the capacity); written
    /// once, before anyone attaches.
    pub buckets: u32,
    /// Zones that exist or are being reserved.
    pub count: AtomicU32,
    /// Entries ever handed out (the ones past it were never used).
    pub high_water: AtomicU32,
    /// Head of the free-entry stack: entry index + 1, or 0.
    pub free_head: AtomicU32,
    /// Odd while a writer changes the table (see the module docs).
    pub seq: SeqCount,
    /// Reservations that succeeded, ever.
    pub reserves: AtomicU64,
    /// Frees, ever.
    pub frees: AtomicU64,
    /// Room to grow.
    pub reserved: [u64; 2],
}

/// One zone.
#[repr(C)]
pub(crate) struct ZoneEntry {
    /// NUL-padded name, 8 bytes a word (native byte order).
    name: [AtomicU64; NAME_WORDS],
    /// First byte (an address in the instance's reservation).
    pub addr: AtomicU64,
    /// IOVA of the first byte (`u64::MAX` when unknown).
    pub iova: AtomicU64,
    /// Length in bytes.
    pub len: AtomicU64,
    /// Page size under the zone.
    pub page_size: AtomicU64,
    /// Alignment asked for (after raising to 64).
    pub align: AtomicU64,
    /// Boundary asked for (0: none).
    pub bound: AtomicU64,
    /// Socket the memory came from.
    pub socket: AtomicI32,
    /// `MemzoneFlags` bits asked for.
    pub flags: AtomicU32,
    /// `STATE_*` (Release stores, Acquire loads: read without the counter
    /// too).
    pub state: AtomicU32,
    /// Bumped when the zone is freed: handles carry it.
    pub generation: AtomicU32,
    /// Pid of the process that reserved it.
    pub owner_pid: AtomicU32,
    /// Hash of the name.
    pub hash: AtomicU32,
    /// Next entry on the free stack (index + 1, or 0).
    pub next_free: AtomicU32,
    /// FREEING: pid of the process freeing the zone (it recycles the
    /// entry once the memory is back; not always the reserver).
    pub freer_pid: AtomicU32,
    /// Room to grow.
    pub reserved: [u32; 4],
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<TableHeader>() == 64);
    assert!(std::mem::offset_of!(TableHeader, seq) == 24);
    assert!(std::mem::offset_of!(TableHeader, reserves) == 32);
    assert!(size_of::<ZoneEntry>() == 128);
    assert!(std::mem::offset_of!(ZoneEntry, addr) == 32);
    assert!(std::mem::offset_of!(ZoneEntry, state) == 88);
    assert!(std::mem::offset_of!(ZoneEntry, freer_pid) == 108);
};

/// A copy of an entry's fields, taken with atomic loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EntrySnap {
    pub name: [u8; NAME_BYTES],
    pub addr: u64,
    pub iova: u64,
    pub len: u64,
    pub page_size: u64,
    pub align: u64,
    pub bound: u64,
    pub socket: i32,
    pub flags: u32,
    pub state: u32,
    pub generation: u32,
    pub owner_pid: u32,
}

impl ZoneEntry {
    /// The name (its words loaded one by one).
    pub(crate) fn name(&self) -> [u8; NAME_BYTES] {
        let mut n = [0u8; NAME_BYTES];
        for (chunk, w) in n.chunks_exact_mut(8).zip(&self.name) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        n
    }

    /// Whether the name is `key` (stops at the first differing word).
    fn name_is(&self, key: &[u8; NAME_BYTES]) -> bool {
        key.chunks_exact(8).zip(&self.name).all(|(chunk, w)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.load(Ordering::Relaxed) == u64::from_ne_bytes(b)
        })
    }

    /// Stores a name (writers only).
    fn set_name(&self, name: &[u8; NAME_BYTES]) {
        for (chunk, w) in name.chunks_exact(8).zip(&self.name) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
    }

    /// Every field, copied.
    pub(crate) fn snapshot(&self) -> EntrySnap {
        EntrySnap {
            name: self.name(),
            addr: self.addr.load(Ordering::Relaxed),
            iova: self.iova.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
            page_size: self.page_size.load(Ordering::Relaxed),
            align: self.align.load(Ordering::Relaxed),
            bound: self.bound.load(Ordering::Relaxed),
            socket: self.socket.load(Ordering::Relaxed),
            flags: self.flags.load(Ordering::Relaxed),
            state: self.state.load(Ordering::Acquire),
            generation: self.generation.load(Ordering::Acquire),
            owner_pid: self.owner_pid.load(Ordering::Relaxed),
        }
    }
}

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
    index: *mut AtomicU32,
}

/// The table with its lock held for writing. The first change marks the
/// table as changing (odd counter); dropping the value marks it stable
/// again, then releases the lock.
pub(crate) struct Writing<'a> {
    t: &'a Table,
    /// A change was begun ([`SeqCount::write_begin`]).
    changing: bool,
    _guard: crate::shm::lock::WriteGuard<'a>,
}

/// What a reader sees of the table: atomic loads only, every one of them
/// bounds-checked, so a copy made in the middle of a change is harmless
/// (and thrown away by [`Table::read`]).
pub(crate) struct View<'a> {
    t: &'a Table,
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
                .cast::<AtomicU32>();
            (entries, index)
        };
        if fresh {
            // SAFETY: fresh, zero-filled (zero is a valid value of every
            // field, atomics included), nobody else sees it yet.
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

    fn header(&self) -> &TableHeader {
        // SAFETY: the header lies in the mapping. Its plain fields
        // (capacity, buckets) were written before any other view existed
        // and never change; the others are atomics or the lock.
        unsafe { &*self.header }
    }

    pub(crate) fn lock(&self) -> &RwLock {
        &self.header().lock
    }

    /// The change counter.
    pub(crate) fn seq(&self) -> &SeqCount {
        &self.header().seq
    }

    /// Capacity of the table.
    pub(crate) fn capacity(&self) -> u32 {
        self.header().capacity
    }

    /// The table's lock, for writing. A writer that died holding it is
    /// taken over and the table rebuilt from its entries.
    pub(crate) fn write(&self) -> Writing<'_> {
        let lock = self.lock();
        let writing = |g| Writing {
            t: self,
            changing: false,
            _guard: g,
        };
        if let Some(g) = lock.try_write() {
            return writing(g);
        }
        loop {
            match lock.write_timeout(std::time::Duration::from_millis(100)) {
                Ok(g) => return writing(g),
                Err(crate::shm::lock::LockError::OwnerDead { pid }) => {
                    if let Some(g) = lock.take_over_dead_writer() {
                        tracing::error!(pid, "took over the memzone table lock from a dead process; rebuilding the table");
                        let mut w = writing(g);
                        w.rebuild();
                        return w;
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Runs `copy` on a whole, unchanging table and returns its result.
    ///
    /// Takes no lock: `copy` runs optimistically and again if a writer
    /// changed the table meanwhile. A reader stopped or killed inside
    /// `copy` holds nobody up. If writers keep spoiling the copies, or
    /// one stays inside its change (slow, descheduled or dead), `copy`
    /// runs once more under the lock, taken the writers' way: it waits
    /// for a live writer and takes a dead one over (rebuilding the table).
    ///
    /// `copy` may run on a table in the middle of a change: it must not
    /// trust what it reads (the [`View`] methods are safe on any bytes),
    /// must not panic on it, and must leave no effect a retry would
    /// repeat (it is an `FnMut` so it can fill a buffer: clear it first).
    pub(crate) fn read<R>(&self, mut copy: impl FnMut(&View<'_>) -> R) -> R {
        let view = View { t: self };
        if let Some(r) = self.seq().read(|| copy(&view)) {
            return r;
        }
        let _w = self.write();
        copy(&view)
    }

    /// Entry `i`, if `i < capacity`.
    fn get(&self, i: u32) -> Option<&ZoneEntry> {
        // SAFETY: `i < capacity`, so the entry lies in the array in the
        // mapping; its fields are atomics (or never written).
        (i < self.capacity()).then(|| unsafe { &*self.entries.add(i as usize) })
    }

    /// Entry `i` (callers keep `i < capacity`: indexes from the free
    /// stack, the index or below `high_water`, read under the lock).
    pub(crate) fn entry(&self, i: u32) -> &ZoneEntry {
        // Only a table damaged past what the rebuild repairs gets here with
        // a bad index (never user input): refuse it rather than read
        // outside the array.
        self.get(i).unwrap_or_else(|| {
            panic!(
                "memzone entry {i} out of range (capacity {}): the table is damaged",
                self.capacity()
            )
        })
    }

    fn mask(&self) -> u32 {
        self.header().buckets - 1
    }

    fn bucket(&self, i: u32) -> u32 {
        // SAFETY: masked to `< buckets`, inside the index in the mapping.
        unsafe { &*self.index.add((i & self.mask()) as usize) }.load(Ordering::Relaxed)
    }

    /// Sets index slot `i` (inside a change only).
    fn set_bucket(&self, i: u32, v: u32) {
        debug_assert!(self.seq().is_writing(), "index changed outside a change");
        // SAFETY: as `bucket`.
        unsafe { &*self.index.add((i & self.mask()) as usize) }.store(v, Ordering::Relaxed);
    }

    /// The entry named `name` in the index, any state. Bounded and
    /// bounds-checked, so an index caught in the middle of a change can
    /// only make it return a wrong answer (that the reader throws away).
    fn find(&self, name: &[u8; NAME_BYTES], hash: u32) -> Option<u32> {
        let mask = self.mask();
        let mut i = hash & mask;
        for _ in 0..=mask {
            let v = self.bucket(i);
            if v == 0 {
                return None;
            }
            let e = self.get(v - 1)?;
            if e.hash.load(Ordering::Relaxed) == hash && e.name_is(name) {
                return Some(v - 1);
            }
            i = (i + 1) & mask;
        }
        None
    }
}

impl View<'_> {
    /// The ready entry named `name`: its index and a copy.
    pub(crate) fn lookup(&self, name: &[u8; NAME_BYTES], hash: u32) -> Option<(u32, EntrySnap)> {
        let i = self.t.find(name, hash)?;
        let e = self.t.get(i)?;
        (e.state.load(Ordering::Acquire) == STATE_READY).then(|| (i, e.snapshot()))
    }

    /// Zones that exist or are being reserved.
    pub(crate) fn count(&self) -> u32 {
        self.t.header().count.load(Ordering::Relaxed)
    }

    /// Entries ever used: every live entry has a lower index (at most the
    /// capacity).
    pub(crate) fn high_water(&self) -> u32 {
        self.t
            .header()
            .high_water
            .load(Ordering::Relaxed)
            .min(self.t.capacity())
    }

    /// (reserves, frees) ever.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let h = self.t.header();
        (
            h.reserves.load(Ordering::Relaxed),
            h.frees.load(Ordering::Relaxed),
        )
    }

    /// Entry `i`'s state (`None` past the capacity).
    pub(crate) fn state(&self, i: u32) -> Option<u32> {
        Some(self.t.get(i)?.state.load(Ordering::Acquire))
    }

    /// A copy of entry `i` (`None` past the capacity).
    pub(crate) fn entry(&self, i: u32) -> Option<EntrySnap> {
        Some(self.t.get(i)?.snapshot())
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

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        // Before the guard (a field) releases the lock: the next writer
        // finds the counter even unless a writer died inside a change.
        if self.changing {
            self.t.seq().write_end();
        }
    }
}

impl<'a> Writing<'a> {
    /// The table, for a change: the first call marks the table as
    /// changing, so readers retry until this value is dropped. Every
    /// store to the table goes through it.
    fn change(&mut self) -> &'a Table {
        if !self.changing {
            self.t.seq().write_begin();
            self.changing = true;
        }
        self.t
    }

    /// Takes a free entry for `name` and puts it in the index in state
    /// RESERVING, unless the name is in use or the table is full.
    pub(crate) fn claim(&mut self, name: &[u8; NAME_BYTES], hash: u32, pid: u32) -> Claim {
        if let Some(i) = self.t.find(name, hash) {
            let e = self.t.entry(i);
            return match e.state.load(Ordering::Acquire) {
                STATE_RESERVING => Claim::Pending(e.owner_pid.load(Ordering::Relaxed)),
                _ => Claim::Exists(i),
            };
        }
        let head = self.t.header();
        let free_head = head.free_head.load(Ordering::Relaxed);
        let high_water = head.high_water.load(Ordering::Relaxed);
        if free_head == 0 && high_water >= head.capacity {
            return Claim::Full;
        }
        let table = self.change();
        let i = if free_head != 0 {
            let i = free_head - 1;
            head.free_head.store(
                table.entry(i).next_free.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            i
        } else {
            head.high_water.store(high_water + 1, Ordering::Relaxed);
            high_water
        };
        let e = table.entry(i);
        e.set_name(name);
        e.hash.store(hash, Ordering::Relaxed);
        e.owner_pid.store(pid, Ordering::Relaxed);
        e.next_free.store(0, Ordering::Relaxed);
        e.freer_pid.store(0, Ordering::Relaxed);
        e.addr.store(0, Ordering::Relaxed);
        e.len.store(0, Ordering::Relaxed);
        e.state.store(STATE_RESERVING, Ordering::Release);
        let mut slot = hash & table.mask();
        while table.bucket(slot) != 0 {
            slot = (slot + 1) & table.mask();
        }
        table.set_bucket(slot, i + 1);
        head.count.fetch_add(1, Ordering::Relaxed);
        Claim::Claimed(i)
    }

    /// Entry `i`, for filling in (a change).
    pub(crate) fn entry_mut(&mut self, i: u32) -> &'a ZoneEntry {
        self.change().entry(i)
    }

    /// Entry `i`, for reading.
    pub(crate) fn entry(&self, i: u32) -> &'a ZoneEntry {
        self.t.entry(i)
    }

    /// Publishes a claimed entry as a zone.
    pub(crate) fn publish(&mut self, i: u32) {
        let t = self.change();
        t.header().reserves.fetch_add(1, Ordering::Relaxed);
        t.entry(i).state.store(STATE_READY, Ordering::Release);
    }

    /// Takes entry `i` out of the index (its name is free again) and
    /// marks it FREEING on behalf of process `pid`, who must recycle it
    /// with [`release`] and the returned ticket (the entry's new
    /// generation).
    ///
    /// [`release`]: Self::release
    pub(crate) fn unlink(&mut self, entry: u32, pid: u32) -> u32 {
        let table = self.change();
        let gone = table.entry(entry);
        gone.freer_pid.store(pid, Ordering::Relaxed);
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
        let head = table.header();
        head.count.fetch_sub(1, Ordering::Relaxed);
        let mask = table.mask();
        let mut hole = gone.hash.load(Ordering::Relaxed) & mask;
        for _ in 0..=mask {
            if table.bucket(hole) == entry + 1 {
                break;
            }
            hole = (hole + 1) & mask;
        }
        if table.bucket(hole) != entry + 1 {
            // Not in the index (cannot be, unless the table was damaged):
            // nothing to take out.
            tracing::error!(entry, "a memzone entry being freed was not in the index");
            return ticket;
        }
        // Backward-shift: pull later members of the cluster into the hole
        // when their home slot allows it, so no tombstone is needed.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let moved = table.bucket(j);
            if moved == 0 || j == hole {
                break;
            }
            let home = table.entry(moved - 1).hash.load(Ordering::Relaxed) & mask;
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
        let e = self.t.entry(i);
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
        let h = self.change().header();
        if freed {
            h.frees.fetch_add(1, Ordering::Relaxed);
        }
        e.state.store(STATE_FREE, Ordering::Release);
        e.set_name(&[0; NAME_BYTES]);
        e.addr.store(0, Ordering::Relaxed);
        e.len.store(0, Ordering::Relaxed);
        e.freer_pid.store(0, Ordering::Relaxed);
        e.next_free
            .store(h.free_head.load(Ordering::Relaxed), Ordering::Relaxed);
        h.free_head.store(i + 1, Ordering::Relaxed);
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
    /// releases it. The change counter, odd if the dead writer was in
    /// the middle of a change, is even again once this value is dropped.
    pub(crate) fn rebuild(&mut self) {
        let t = self.change();
        let h = t.header();
        let mask = t.mask();
        for b in 0..h.buckets {
            t.set_bucket(b, 0);
        }
        let mut free_head = 0;
        let mut count = 0;
        for i in (0..h.high_water.load(Ordering::Relaxed).min(h.capacity)).rev() {
            let e = t.entry(i);
            let state = e.state.load(Ordering::Acquire);
            let pid = if state == STATE_FREEING {
                e.freer_pid.load(Ordering::Relaxed)
            } else {
                e.owner_pid.load(Ordering::Relaxed)
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
                e.set_name(&[0; NAME_BYTES]);
                e.freer_pid.store(0, Ordering::Relaxed);
                e.next_free.store(free_head, Ordering::Relaxed);
                free_head = i + 1;
                continue;
            }
            let hash = hash_name(&e.name());
            e.hash.store(hash, Ordering::Relaxed);
            let mut slot = hash & mask;
            while t.bucket(slot) != 0 {
                slot = (slot + 1) & mask;
            }
            t.set_bucket(slot, i + 1);
            count += 1;
        }
        h.free_head.store(free_head, Ordering::Relaxed);
        h.count.store(count, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

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

    /// A table shared with threads of the test.
    struct Shared(Table);
    // SAFETY: the table's memory outlives the threads of each test (they
    // are scoped); all access is atomic or under the table lock.
    unsafe impl Sync for Shared {}

    fn claim(t: &Table, s: &str) -> Claim {
        let n = name(s);
        t.write().claim(&n, hash_name(&n), 1)
    }

    /// Claims and publishes `s` with `len` (as a reservation does: two
    /// changes).
    fn reserve(tab: &Table, s: &str, len: u64) -> u32 {
        let Claim::Claimed(i) = claim(tab, s) else {
            panic!("claiming {s}")
        };
        let mut w = tab.write();
        let entry = w.entry_mut(i);
        entry.len.store(len, Ordering::Relaxed);
        entry.addr.store(len << 12, Ordering::Relaxed);
        w.publish(i);
        i
    }

    fn free(t: &Table, i: u32) {
        let mut w = t.write();
        let ticket = w.unlink(i, 1);
        assert!(w.release(i, ticket, true));
    }

    fn find(t: &Table, s: &str) -> Option<u32> {
        let n = name(s);
        t.write().find(&n, hash_name(&n))
    }

    /// The table's count, read without the lock.
    // `View::count` does not fit `read`'s higher-ranked bound; the
    // closure does.
    #[allow(clippy::redundant_closure_for_method_calls)]
    fn count(t: &Table) -> u32 {
        t.read(|v| v.count())
    }

    /// The ready zone named `s`, read without the lock.
    fn lookup(t: &Table, s: &str) -> Option<(u32, EntrySnap)> {
        let n = name(s);
        t.read(|v| v.lookup(&n, hash_name(&n)))
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
        assert_eq!(count(&t), 4);
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
                free(&tab, i);
                assert_eq!(find(&tab, &s), None, "{s} still found");
                assert_eq!(lookup(&tab, &s), None, "{s} still looked up");
            }
            if step % 97 == 0 {
                for (s, i) in &live {
                    assert_eq!(find(&tab, s), Some(*i), "{s} lost at step {step}");
                    assert_eq!(lookup(&tab, s).map(|z| z.0), Some(*i), "{s}");
                }
            }
        }
        assert_eq!(count(&tab) as usize, live.len());
        assert!(!tab.seq().is_writing());
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
        tab.write()
            .entry_mut(ids[3])
            .owner_pid
            .store(DEAD_PID, Ordering::Relaxed);
        // A writer died mid-update: the index is wiped.
        {
            let mut w = tab.write();
            let t = w.change();
            for b in 0..bucket_count(16) {
                t.set_bucket(b, 0);
            }
        }
        assert_eq!(find(&tab, "a"), None);
        tab.write().rebuild();
        for (n, &i) in ["a", "b", "c"].iter().zip(&ids) {
            assert_eq!(find(&tab, n), Some(i), "{n}");
        }
        assert_eq!(find(&tab, "d"), None, "a dead claim is dropped");
        assert_eq!(count(&tab), 3);
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
        tab.write()
            .entry_mut(a)
            .owner_pid
            .store(DEAD_PID, Ordering::Relaxed);
        let ticket = tab.write().unlink(a, std::process::id());
        tab.write().rebuild();
        // Until its freer recycles it, the entry is nobody else's.
        let Claim::Claimed(c) = claim(&tab, "c") else {
            panic!()
        };
        assert_ne!(c, a, "an entry still being freed was handed out");
        tab.write().publish(c);
        let gen_c = tab.read(|v| v.entry(c)).unwrap().generation;
        // The freer finishes: the entry goes back once.
        assert!(tab.write().release(a, ticket, true));
        assert!(!tab.write().release(a, ticket, true), "released twice");
        let more = drain_free_stack(&tab, "x");
        assert!(!more.contains(&b) && !more.contains(&c), "{more:?}");
        assert_eq!(more.len(), 8 - 2, "every other entry is free exactly once");
        // The zones that lived through it are untouched.
        assert_eq!(find(&tab, "b"), Some(b));
        assert_eq!(find(&tab, "c"), Some(c));
        let e = tab.read(|v| v.entry(c)).unwrap();
        assert_eq!(e.generation, gen_c);
        assert_eq!(e.state, STATE_READY);
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
        assert_eq!(count(&tab), 4);
    }

    #[test]
    fn sizes_are_as_documented() {
        assert_eq!(bucket_count(2560), 8192);
        assert_eq!(table_bytes(2560), 64 + 2560 * 128 + 8192 * 4);
        assert_ne!(hash_name(&name("a")), hash_name(&name("b")));
    }

    #[test]
    fn writers_mark_changes_and_only_changes() {
        let (_buf, tab) = table(8);
        assert_eq!(tab.seq().value(), 0);
        let a = reserve(&tab, "a", 64);
        let after_reserve = tab.seq().value();
        assert_eq!(after_reserve, 4, "a claim and a publish: two changes");
        // Looking, finding an existing name, a full table, a stale
        // release: no change, readers are not disturbed.
        assert!(matches!(claim(&tab, "a"), Claim::Exists(_)));
        assert_eq!(find(&tab, "a"), Some(a));
        assert!(lookup(&tab, "a").is_some());
        assert!(!tab.write().release(a, 0, true));
        assert_eq!(tab.seq().value(), after_reserve);
        {
            let mut w = tab.write();
            let ticket = w.unlink(a, 1);
            assert!(tab.seq().is_writing(), "odd inside a change");
            assert!(w.release(a, ticket, true));
        }
        assert_eq!(tab.seq().value(), after_reserve + 2, "one change");
    }

    #[test]
    fn a_reader_stopped_mid_copy_holds_no_writer_up() {
        // The reader is stopped inside its first copy while a writer frees
        // one zone and reserves another; the writer finishes (a reader
        // holding the lock for reading would keep it waiting for ever),
        // and the reader's spoiled copy is made again.
        let (_buf, tab) = table(16);
        let a = reserve(&tab, "a", 64);
        let tab = Shared(tab);
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let tab = &tab;
            let reader = s.spawn(move || {
                let (na, nb) = (name("a"), name("b"));
                let mut copies = 0;
                let got = tab.0.read(|v| {
                    copies += 1;
                    let a = v.lookup(&na, hash_name(&na)).map(|z| z.0);
                    if copies == 1 {
                        stopped_tx.send(()).unwrap();
                        go.recv().unwrap();
                    }
                    let b = v.lookup(&nb, hash_name(&nb)).map(|z| (z.0, z.1.len));
                    (a, b)
                });
                (copies, got)
            });
            stopped.recv().unwrap();
            let t0 = Instant::now();
            free(&tab.0, a);
            let b = reserve(&tab.0, "b", 128);
            assert!(t0.elapsed() < Duration::from_secs(1));
            go_tx.send(()).unwrap();
            let (copies, got) = reader.join().unwrap();
            assert_eq!(copies, 2, "the spoiled copy was made again");
            assert_eq!(
                got,
                (None, Some((b, 128))),
                "a whole copy, after the writes"
            );
        });
    }

    #[test]
    fn a_reader_waits_on_the_lock_for_a_live_writer_inside_a_change() {
        let (_buf, tab) = table(16);
        let tab = Shared(tab);
        let (inside_tx, inside) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let tab = &tab;
            let writer = s.spawn(move || {
                let n = name("slow");
                let mut w = tab.0.write();
                let Claim::Claimed(i) = w.claim(&n, hash_name(&n), 1) else {
                    panic!()
                };
                inside_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                w.entry_mut(i).len.store(4096, Ordering::Relaxed);
                w.publish(i);
                i
            });
            inside.recv().unwrap();
            assert!(tab.0.seq().is_writing());
            // Spins a little, then waits for the writer on the lock.
            let got = lookup(&tab.0, "slow").map(|z| (z.0, z.1.len));
            let i = writer.join().unwrap();
            assert_eq!(got, Some((i, 4096)), "the reader saw the finished change");
            assert!(!tab.0.seq().is_writing());
        });
    }

    /// Shared anonymous memory, unmapped when dropped.
    struct SharedMap(*mut u8, usize);

    impl Drop for SharedMap {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer used.
            let _ = unsafe { rustix::mm::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn a_writer_killed_inside_a_change_is_taken_over_by_the_next_reader() {
        let len = table_bytes(16);
        // SAFETY: a fresh anonymous mapping (zero-filled), shared with the
        // child forked below.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }
        .unwrap()
        .cast::<u8>();
        let _map = SharedMap(p, len);
        // SAFETY: zero-filled, page-aligned, `table_bytes(16)` long, alive
        // for the whole test.
        let tab = unsafe { Table::new(p, 16, true) };
        let ids: Vec<u32> = ["a", "b", "c"]
            .iter()
            .map(|s| reserve(&tab, s, 64))
            .collect();
        // SAFETY: the child only makes atomic stores to the shared mapping
        // and `_exit`s (async-signal-safe); the parent only waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // Killed in the middle of a change: counter odd, index wiped,
            // lock held.
            let mut w = tab.write();
            let t = w.change();
            for b in 0..bucket_count(16) {
                t.set_bucket(b, 0);
            }
            std::mem::forget(w);
            // SAFETY: ends the forked child at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(tab.seq().is_writing());
        assert_eq!(tab.lock().writer_pid(), Some(pid as u32));
        // The reader gives up on the odd counter, goes to the lock, takes
        // it over from the dead writer and rebuilds the table.
        let t0 = Instant::now();
        assert_eq!(lookup(&tab, "a").map(|z| z.0), Some(ids[0]));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(!tab.seq().is_writing(), "the take-over ended the change");
        assert_eq!(tab.lock().writer_pid(), None);
        for (s, &i) in ["a", "b", "c"].iter().zip(&ids) {
            assert_eq!(lookup(&tab, s).map(|z| z.0), Some(i), "{s}");
        }
        assert_eq!(count(&tab), 3);
    }

    #[test]
    fn copies_of_a_garbage_table_end_and_do_not_panic() {
        // What a reader may see in the middle of changes, at worst: any
        // bytes at all. Its copy must stay in bounds and end (a full
        // index, cycles of indexes, names that match nothing).
        let cap = 16;
        let (mut buf, _) = table(cap);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for w in &mut buf.0 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *w = seed;
        }
        // SAFETY: the buffer has the table's size; `fresh` rewrites the
        // capacity and bucket count (everything else stays garbage).
        let tab = unsafe { Table::new(buf.0.as_mut_ptr().cast(), cap, true) };
        let v = View { t: &tab };
        for s in ["a", "b", "zz"] {
            let n = name(s);
            let _ = v.lookup(&n, hash_name(&n));
        }
        let _ = (v.count(), v.high_water(), v.totals());
        assert!(v.high_water() <= cap);
        for i in 0..cap + 8 {
            assert_eq!(v.entry(i).is_some(), i < cap);
            assert_eq!(v.state(i).is_some(), i < cap);
        }
        // Every index slot taken (no 0 to stop at): the probe still ends.
        for b in 0..bucket_count(cap) {
            let slot = b % cap + 1;
            // SAFETY: inside the index of the buffer.
            unsafe { &*tab.index.add(b as usize) }.store(slot, Ordering::Relaxed);
        }
        let n = name("nothing");
        assert_eq!(v.lookup(&n, hash_name(&n)), None);
    }

    #[test]
    fn readers_see_whole_tables_while_writers_churn() {
        // Stable zones stay, but a slow change now and then rewrites one's
        // length and address as a pair (address = length << 12); other
        // zones come and go, each with a length derived from its name. A
        // copy a reader accepts must agree with itself: pairs whole, names
        // with their own lengths, counters with the entries (ready zones =
        // reserves - frees, as long as a free unlinks and releases in one
        // change).
        const STABLE: u32 = 8;
        const CHURN: u64 = 24;
        fn len_of(n: &[u8; NAME_BYTES]) -> u64 {
            64 * u64::from(1 + hash_name(n) % 50)
        }
        let (_buf, tab) = table(64);
        let stable: Vec<u32> = (0..STABLE)
            .map(|k| {
                let s = format!("stable{k}");
                reserve(&tab, &s, len_of(&name(&s)))
            })
            .collect();
        let tab = Shared(tab);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let (tab, stop) = (&tab, &stop);
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(move || {
                        let mut ready = Vec::new();
                        let mut copies = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            for k in 0..STABLE {
                                let s = format!("stable{k}");
                                let (_, e) =
                                    lookup(&tab.0, &s).unwrap_or_else(|| panic!("{s} not found"));
                                assert_eq!(e.name, name(&s));
                                assert_eq!(e.addr, e.len << 12, "torn pair in {s}");
                            }
                            let (count, (reserves, frees)) = tab.0.read(|v| {
                                ready.clear();
                                for i in 0..v.high_water() {
                                    if v.state(i) == Some(STATE_READY) {
                                        ready.extend(v.entry(i));
                                    }
                                }
                                (v.count(), v.totals())
                            });
                            for e in &ready {
                                if e.name.starts_with(b"stable") {
                                    assert_eq!(e.addr, e.len << 12, "torn pair {e:?}");
                                } else {
                                    assert_eq!(e.len, len_of(&e.name), "{e:?}");
                                }
                                assert_eq!(e.state, STATE_READY);
                            }
                            let n = ready.len() as u64;
                            assert_eq!(n, reserves - frees, "ready zones vs counters");
                            assert!(u64::from(count) >= n && u64::from(count) <= n + 1);
                            copies += 1;
                        }
                        copies
                    })
                })
                .collect();
            let mut live = std::collections::VecDeque::new();
            for round in 0..20_000u64 {
                let s = format!("churn{}", round % CHURN);
                if live.len() as u64 == CHURN / 2 {
                    let i = live.pop_front().unwrap();
                    free(&tab.0, i);
                }
                if find(&tab.0, &s).is_none() {
                    live.push_back(reserve(&tab.0, &s, len_of(&name(&s))));
                }
                if round % 4 == 0 {
                    let mut w = tab.0.write();
                    let e = w.entry_mut(stable[(round / 4 % u64::from(STABLE)) as usize]);
                    let len = 64 * (1 + round % 1000);
                    e.len.store(len, Ordering::Relaxed);
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    e.addr.store(len << 12, Ordering::Relaxed);
                }
            }
            stop.store(true, Ordering::Relaxed);
            for r in readers {
                assert!(r.join().unwrap() > 0);
            }
        });
    }
}
