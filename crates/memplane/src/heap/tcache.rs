//! Per-thread caches of small blocks: the fast path of malloc and free.
//!
//! A thread keeps up to [`BIN_CAP`] freed blocks of each small size class
//! (64 to 1024 bytes of data, by 64) and hands them out again without taking
//! the heap lock; a miss refills a bin with a batch carved under one lock
//! acquisition, a full bin gives half of it back under one.
//!
//! The caches live in **shared memory** (a section of the config, one
//! array of [`CacheSlot`]s per native heap), not in process-local memory:
//!
//! - cached blocks stay busy elements of the heap, flagged `ELEM_CACHED`
//!   (so a second free of a cached block is a `DoubleFree`, and
//!   `heap_validate` sees them as what they are);
//! - heap stats subtract every slot's cached blocks, so `alloc_count`,
//!   `alloc_bytes` and `free_bytes` stay exact whatever sits in caches;
//! - a block freed by another process simply goes into that process's
//!   thread's slot;
//! - a thread that exits leaves its slot *orphaned*, and a process that dies
//!   leaves it owned by a dead pid: the next slow-path call (or
//!   [`Instance::heap_trim`](crate::Instance::heap_trim)) gives their
//!   blocks back to the heap, so nothing is lost.
//!
//! Pages held only by cached blocks are given back when the cache is
//! flushed: [`Instance::heap_cache_flush`](crate::Instance::heap_cache_flush)
//! (this thread), [`Instance::heap_trim`](crate::Instance::heap_trim)
//! (orphaned and dead slots), a full bin, or thread exit.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use super::core::{Elem, HeapHeader, ELEM_CACHED, ELEM_DIRTY, HDR, STATE_BUSY};

/// Size classes cached: data of 64, 128, ..., 1024 bytes.
pub(crate) const BINS: usize = 16;
/// Blocks per bin.
pub(crate) const BIN_CAP: usize = 32;
/// Blocks carved per refill.
const REFILL: usize = 16;
/// Cache slots per native heap: threads beyond this use the locked path.
pub(crate) const SLOTS_PER_HEAP: usize = 64;

/// Largest data size served from the caches.
pub(crate) const CACHE_MAX: u64 = (BINS as u64) * 64;

const SLOT_FREE: u32 = 0;
const SLOT_ACTIVE: u32 = 1;
const SLOT_ORPHAN: u32 = 2;

/// One thread's cache, in shared memory.
#[repr(C)]
pub(crate) struct CacheSlot {
    /// `SLOT_*`.
    state: AtomicU32,
    /// Owning process.
    pid: AtomicU32,
    /// Owning thread (kernel tid), for reports.
    tid: AtomicU32,
    _pad: u32,
    /// Blocks held (written by the owner only, read by anyone).
    count: AtomicU64,
    /// Bytes of those blocks' elements, headers included.
    bytes: AtomicU64,
    /// Blocks per bin (owner only, or whoever adopted the slot).
    lens: [AtomicU32; BINS],
    /// Element addresses.
    entries: [[AtomicU64; BIN_CAP]; BINS],
}

/// Bytes of one slot.
pub(crate) const SLOT_SIZE: usize = std::mem::size_of::<CacheSlot>();

/// Tells thread-exit hooks whether the instance's memory is still mapped.
#[derive(Debug, Default)]
pub(crate) struct CacheToken {
    alive: RwLock<bool>,
}

impl CacheToken {
    pub(crate) fn new() -> Arc<CacheToken> {
        Arc::new(CacheToken {
            alive: RwLock::new(true),
        })
    }

    /// Called by `Memory::drop` before anything is unmapped: waits for
    /// running thread-exit hooks, stops later ones.
    pub(crate) fn kill(&self) {
        if let Ok(mut g) = self.alive.write() {
            *g = false;
        }
    }
}

/// This thread's slot of one heap of one instance.
struct Entry {
    instance: usize,
    token: Arc<CacheToken>,
    heap: u16,
    pid: u32,
    slot: *const CacheSlot,
    orphans: *const AtomicU64,
}

/// The thread's entries; on thread exit each live slot is orphaned.
#[derive(Default)]
struct Entries(Vec<Entry>);

impl Drop for Entries {
    fn drop(&mut self) {
        let me = crate::shm::lock::cached_pid();
        for e in self.0.drain(..) {
            if e.slot.is_null() || e.pid != me {
                continue;
            }
            let Ok(alive) = e.token.alive.read() else {
                continue;
            };
            if *alive {
                // SAFETY: the instance is alive (checked under the token's
                // read lock, which its drop waits for), so the slot and the
                // heap head are mapped.
                unsafe {
                    (*e.slot).state.store(SLOT_ORPHAN, Ordering::Release);
                    (*e.orphans).fetch_add(1, Ordering::Release);
                }
            }
        }
    }
}

thread_local! {
    static ENTRIES: RefCell<Entries> = RefCell::new(Entries::default());
}

/// The slot table of one heap, for claiming and scanning.
#[derive(Clone, Copy)]
pub(crate) struct SlotTable {
    pub(crate) base: *mut CacheSlot,
    pub(crate) orphans: *const AtomicU64,
}

impl SlotTable {
    pub(crate) fn slot(&self, i: usize) -> &CacheSlot {
        // SAFETY: i < SLOTS_PER_HEAP and the table lies in the config
        // mapping, alive while the caller holds `&Memory`.
        unsafe { &*self.base.add(i) }
    }
}

/// The calling thread's slot of `heap`, claiming one on first use; `None`
/// when all slots are taken (the thread then uses the locked path).
pub(crate) fn my_slot(
    instance: usize,
    token: &Arc<CacheToken>,
    heap: u16,
    table: Option<SlotTable>,
) -> Option<&'static CacheSlot> {
    let table = table?;
    let me = crate::shm::lock::cached_pid();
    // `try_with`: during thread exit (or from a global allocator called
    // while the entries are borrowed) the cache is simply not used.
    ENTRIES
        .try_with(|cell| {
            let mut entries = cell.try_borrow_mut().ok()?;
            // After fork the entries are the parent's slots: forget them.
            if entries.0.first().is_some_and(|e| e.pid != me) {
                entries.0.clear();
            }
            if let Some(e) = entries
                .0
                .iter()
                .find(|e| e.instance == instance && e.heap == heap && Arc::ptr_eq(&e.token, token))
            {
                // SAFETY: the entry's instance is the caller's live `Memory`
                // (same id and token), whose mapping outlives this borrow.
                return unsafe { e.slot.as_ref() };
            }
            // Entries of dropped instances are dead weight.
            entries.0.retain(|e| e.token.alive.read().is_ok_and(|a| *a));
            let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
            let mut claimed: *const CacheSlot = std::ptr::null();
            for i in 0..SLOTS_PER_HEAP {
                let s = table.slot(i);
                if s.state.load(Ordering::Relaxed) == SLOT_FREE
                    && s.state
                        .compare_exchange(
                            SLOT_FREE,
                            SLOT_ACTIVE,
                            Ordering::Acquire,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    s.pid.store(me, Ordering::Relaxed);
                    s.tid.store(tid, Ordering::Relaxed);
                    claimed = s;
                    break;
                }
            }
            entries.0.push(Entry {
                instance,
                token: Arc::clone(token),
                heap,
                pid: me,
                slot: claimed,
                orphans: table.orphans,
            });
            // SAFETY: as above.
            unsafe { claimed.as_ref() }
        })
        .ok()
        .flatten()
}

/// The bin of a data size (a multiple of 64, at most [`CACHE_MAX`]).
pub(crate) fn bin_of(data: u64) -> usize {
    (data / 64 - 1) as usize
}

fn flags_of(elem: u64) -> &'static AtomicU8 {
    // SAFETY: `elem` is a busy element header in mapped heap memory; the
    // flags byte is only written through atomics while the block is busy
    // (the heap rewrites whole headers only of free elements).
    unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*(elem as *mut Elem)).flags)) }
}

impl CacheSlot {
    /// Takes a block of `bin` out of the cache: its element address and
    /// whether its data may be dirty.
    pub(crate) fn pop(&self, bin: usize) -> Option<(u64, bool)> {
        let n = self.lens[bin].load(Ordering::Relaxed) as usize;
        if n == 0 {
            return None;
        }
        let elem = self.entries[bin][n - 1].load(Ordering::Relaxed);
        self.lens[bin].store(n as u32 - 1, Ordering::Relaxed);
        let f = flags_of(elem);
        let flags = f.load(Ordering::Relaxed);
        f.store(flags & !ELEM_CACHED, Ordering::Relaxed);
        self.account(-(1i64), -((HDR + (bin as u64 + 1) * 64) as i64));
        Some((elem, flags & ELEM_DIRTY != 0))
    }

    /// Puts a busy element (checked by the caller) into its bin; `false`
    /// when the bin is full.
    pub(crate) fn push(&self, elem: u64, bin: usize) -> bool {
        let n = self.lens[bin].load(Ordering::Relaxed) as usize;
        if n >= BIN_CAP {
            return false;
        }
        let f = flags_of(elem);
        f.store(
            f.load(Ordering::Relaxed) | ELEM_CACHED | ELEM_DIRTY,
            Ordering::Relaxed,
        );
        self.entries[bin][n].store(elem, Ordering::Relaxed);
        self.lens[bin].store(n as u32 + 1, Ordering::Release);
        self.account(1, (HDR + (bin as u64 + 1) * 64) as i64);
        true
    }

    /// Stores a fresh block (not dirty unless `dirty`) from a refill.
    fn stash(&self, elem: u64, bin: usize, dirty: bool) -> bool {
        let n = self.lens[bin].load(Ordering::Relaxed) as usize;
        if n >= BIN_CAP {
            return false;
        }
        let f = flags_of(elem);
        let mut flags = (f.load(Ordering::Relaxed) | ELEM_CACHED) & !ELEM_DIRTY;
        if dirty {
            flags |= ELEM_DIRTY;
        }
        f.store(flags, Ordering::Relaxed);
        self.entries[bin][n].store(elem, Ordering::Relaxed);
        self.lens[bin].store(n as u32 + 1, Ordering::Release);
        self.account(1, (HDR + (bin as u64 + 1) * 64) as i64);
        true
    }

    /// Takes out up to `max` blocks of `bin` (oldest first) to give back
    /// to the heap; their cached flag is cleared.
    pub(crate) fn drain(&self, bin: usize, max: usize, out: &mut Vec<u64>) {
        let n = self.lens[bin].load(Ordering::Acquire) as usize;
        let k = n.min(max);
        for i in 0..k {
            let elem = self.entries[bin][i].load(Ordering::Relaxed);
            let f = flags_of(elem);
            f.store(f.load(Ordering::Relaxed) & !ELEM_CACHED, Ordering::Relaxed);
            out.push(elem);
        }
        for i in k..n {
            let v = self.entries[bin][i].load(Ordering::Relaxed);
            self.entries[bin][i - k].store(v, Ordering::Relaxed);
        }
        self.lens[bin].store((n - k) as u32, Ordering::Release);
        self.account(
            -(k as i64),
            -((k as u64 * (HDR + (bin as u64 + 1) * 64)) as i64),
        );
    }

    fn account(&self, blocks: i64, bytes: i64) {
        // Single writer (the owner, or an adopter that made the slot its
        // own): plain load + store, no read-modify-write.
        let c = self.count.load(Ordering::Relaxed);
        self.count
            .store(c.wrapping_add_signed(blocks), Ordering::Relaxed);
        let b = self.bytes.load(Ordering::Relaxed);
        self.bytes
            .store(b.wrapping_add_signed(bytes), Ordering::Relaxed);
    }

    /// Blocks and bytes held.
    pub(crate) fn held(&self) -> (u64, u64) {
        if self.state.load(Ordering::Acquire) == SLOT_FREE {
            return (0, 0);
        }
        (
            self.count.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Whether the slot may be taken over and flushed by someone else:
    /// orphaned by an exited thread, or owned by a dead process.
    pub(crate) fn adoptable(&self, check_dead: bool) -> bool {
        match self.state.load(Ordering::Acquire) {
            SLOT_ORPHAN => true,
            SLOT_ACTIVE if check_dead => {
                let pid = self.pid.load(Ordering::Relaxed);
                pid != crate::shm::lock::cached_pid() && crate::shm::lock::pid_is_dead(pid)
            }
            _ => false,
        }
    }

    /// Claims an adoptable slot for flushing (one adopter wins).
    pub(crate) fn adopt(&self) -> bool {
        let s = self.state.load(Ordering::Acquire);
        s != SLOT_FREE
            && s != u32::MAX
            && self
                .state
                .compare_exchange(s, u32::MAX, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// Releases an adopted (and emptied) slot for reuse.
    pub(crate) fn release(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.state.store(SLOT_FREE, Ordering::Release);
    }

    /// Owner, for reports: (pid, tid).
    pub(crate) fn owner(&self) -> (u32, u32) {
        (
            self.pid.load(Ordering::Relaxed),
            self.tid.load(Ordering::Relaxed),
        )
    }
}

/// Whether the header at `elem` looks like a busy, uncached block of heap
/// `heap` with `data` bytes, read without the lock (the caller owns the
/// block, so nobody rewrites the fields read here). Anything else goes to
/// the locked path, which says precisely what is wrong.
pub(crate) fn quick_check(elem: u64, heap: u16) -> Option<u64> {
    // SAFETY: the caller checked `elem` lies in mapped memory of the heap.
    let e = unsafe { super::core::sealed(elem) }?;
    if e.state != STATE_BUSY || e.heap != heap || e.flags & ELEM_CACHED != 0 {
        return None;
    }
    Some(e.size - HDR)
}

/// Carves up to `REFILL - 1` more blocks of `data` bytes under one lock
/// into the slot (after the caller got the first one).
pub(crate) fn refill(l: &mut super::core::Locked<'_>, slot: &CacheSlot, data: u64) {
    let bin = bin_of(data);
    let want = super::core::Want {
        size: data,
        align: 64,
        bound: 0,
        seg_ok: None,
        contig_ok: None,
    };
    for _ in 1..REFILL {
        if slot.lens[bin].load(Ordering::Relaxed) as usize >= BIN_CAP / 2 {
            break;
        }
        // Only exact-size elements go into a bin.
        let Some((data_addr, dirty)) = l.alloc_exact(&want, data) else {
            break;
        };
        let elem = data_addr - HDR;
        if !slot.stash(elem, bin, dirty) {
            break;
        }
    }
}

/// The heap head's orphan counter.
pub(crate) fn orphans_of(h: *mut HeapHeader) -> *const AtomicU64 {
    // SAFETY: computes a field address inside the head.
    unsafe { std::ptr::addr_of!((*h).orphans) }
}
