//! The shared-state core of the `bucket` handler ([`crate::bucket`]): the
//! free count, the whole stack, the slots' lists of partial buckets and
//! the bucket heads, and get / put / block operations over them. It works
//! on memory the caller provides (the `MB_<pool>` zone and the pool's
//! buckets in production) and knows nothing of memzones, lcore ids or
//! `MempoolError`, so the loom models (`loom_tests`, run with
//! `RUSTFLAGS="--cfg loom"`) run this very code on a heap buffer, with
//! loom's atomics and a loom mutex for the locks ([`crate::sync`]; in
//! production the locks are `memplane`'s process-shared `SpinLock`).
//!
//! Under `cfg(loom)` there are [`SLOTS`] = 3 slots (two lcores and the
//! shared one) instead of 129, so that a get's sweep over the slots stays
//! within what a model can enumerate.

// Buckets and the state are at least 64-byte aligned: the casts are
// aligned.
#![allow(clippy::cast_ptr_alignment)]

use crate::sync::{yield_now, AtomicU32, AtomicU64, Lock, LockGuard, Ordering};

/// Slots: one per lcore id, then the one shared by threads without one.
#[cfg(not(loom))]
pub(crate) const SLOTS: usize = crate::layout::MAX_LCORES + 1;
/// Slots of the loom models: two lcores and the shared one.
#[cfg(loom)]
pub(crate) const SLOTS: usize = 3;
/// The slot of threads without an lcore id.
pub(crate) const SHARED_SLOT: u32 = SLOTS as u32 - 1;
/// [`BucketHead::home`]: no free object, listed nowhere.
pub(crate) const HOME_NONE: u32 = u32::MAX;
/// [`BucketHead::home`]: whole, on the whole stack.
pub(crate) const HOME_WHOLE: u32 = u32::MAX - 1;
/// Sweeps over every slot that find nothing before a get gives up on a
/// free count that the lists do not back (corruption; never reached
/// otherwise: claimed objects are always on some list).
#[cfg(not(loom))]
const MAX_FRUITLESS_SWEEPS: u32 = 1 << 20;
/// Fruitless sweeps before a get gives up, in the loom models (each
/// sweep yields, so the thread it waits for runs; a correct execution
/// needs at most a couple).
#[cfg(loom)]
const MAX_FRUITLESS_SWEEPS: u32 = 8;

/// The first line of a bucket (its block header); the stack of free
/// object indexes (`u16` each, `count` of them at most) follows it.
#[repr(C, align(64))]
pub(crate) struct BucketHead {
    /// Address of the state zone of the pool this bucket belongs to.
    owner: AtomicU64,
    /// The slot whose list holds this bucket, [`HOME_NONE`] or
    /// [`HOME_WHOLE`]. Changed only under the home slot's lock (from a
    /// slot), by a compare-and-swap under the new slot's lock (from
    /// `HOME_NONE`), or under the whole stack's lock (from `HOME_WHOLE`).
    home: AtomicU32,
    /// Free objects: the depth of the index stack.
    fill: AtomicU32,
    /// Objects in this bucket (the layout's per-bucket count; fewer in a
    /// chunk's last bucket). Written before the objects are enqueued.
    count: u32,
    _pad: u32,
    /// Previous bucket (head address) on the home slot's list, 0: none.
    prev: AtomicU64,
    /// Next bucket on the home slot's list, 0: none.
    next: AtomicU64,
}

/// Free objects nobody has claimed (a line of its own).
#[repr(C, align(64))]
pub(crate) struct FreeCount {
    free: AtomicU64,
}

/// The whole stack's head; its entries (bucket head addresses) are
/// elsewhere ([`Core::whole`]).
#[repr(C, align(64))]
pub(crate) struct WholeHead {
    lock: Lock,
    len: AtomicU32,
}

/// One slot: a list of partial buckets.
#[repr(C, align(64))]
pub(crate) struct Slot {
    lock: Lock,
    /// Free objects in the listed buckets (read without the lock as a
    /// hint).
    objs: AtomicU32,
    /// First bucket (head address), 0: none.
    first: AtomicU64,
}

/// The shared state but the whole stack's entries. All zeroes is an
/// empty state (zeroed locks are unlocked).
#[repr(C)]
pub(crate) struct State {
    free: FreeCount,
    whole: WholeHead,
    slots: [Slot; SLOTS],
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<BucketHead>() == 64);
    assert!(std::mem::size_of::<Slot>() == 64);
    assert!(std::mem::size_of::<State>() == 64 * (2 + SLOTS));
};

#[cfg(loom)]
impl State {
    /// An empty state (loom's atomics cannot be zeroed memory).
    pub(crate) fn new() -> Self {
        Self {
            free: FreeCount {
                free: AtomicU64::new(0),
            },
            whole: WholeHead {
                lock: Lock::new(),
                len: AtomicU32::new(0),
            },
            slots: std::array::from_fn(|_| Slot {
                lock: Lock::new(),
                objs: AtomicU32::new(0),
                first: AtomicU64::new(0),
            }),
        }
    }
}

/// Where a pool's buckets put their objects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Bytes per bucket (a power of two; buckets are aligned to it).
    pub bucket_size: usize,
    /// Bucket header bytes (objects start there).
    pub header: usize,
    /// Objects of a full-size bucket.
    pub per_block: u32,
    /// Bytes per object.
    pub total: usize,
    /// Element offset in an object.
    pub elt_off: usize,
}

/// Why a put was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutError {
    /// Not on an object boundary of one of the pool's buckets; nothing
    /// changed.
    Foreign(usize),
    /// Into a bucket that has all its objects; the other objects went
    /// back.
    Dup(usize),
}

/// Why a get failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetError {
    /// Fewer free objects than asked; nothing changed.
    NotEnough {
        /// The free count.
        available: u32,
    },
    /// The free count is not backed by the lists (corruption); what was
    /// found went back (the error of that put, if any, is `put`).
    Lost {
        /// Objects found.
        got: usize,
        /// The put of the objects found.
        put: Result<(), PutError>,
    },
}

/// One process's view of a pool's bucket state: the state, the whole
/// stack's entries and the geometry.
pub(crate) struct Core {
    st: *const State,
    /// The whole stack's entries.
    whole: *mut u64,
    whole_cap: u32,
    /// What the pool's bucket heads hold in `owner`.
    owner: u64,
    /// Address mask of a bucket's start.
    mask: usize,
    header: usize,
    per_block: u32,
    total: usize,
    elt_off: usize,
    /// The pool's name, for logs.
    pub name: String,
}

// SAFETY: the pointers are into the state (which the owner of the Core
// keeps mapped) and into the pool's buckets; shared fields are atomics,
// and index stacks and whole stack entries are only touched under locks.
unsafe impl Send for Core {}
// SAFETY: as above.
unsafe impl Sync for Core {}

impl Core {
    /// A view of `st` with `whole_cap` whole stack entries at `whole`.
    ///
    /// # Safety
    ///
    /// `st` and `whole[..whole_cap]` stay valid (and the buckets that
    /// [`init_bucket`](Self::init_bucket) writes) as long as the Core;
    /// the state was zeroed or made by `State::new`, and every view of
    /// it uses the same `whole`, `owner` and geometry.
    pub(crate) unsafe fn new(
        st: *const State,
        whole: *mut u64,
        whole_cap: u32,
        owner: u64,
        g: Geometry,
        name: String,
    ) -> Self {
        Self {
            st,
            whole,
            whole_cap,
            owner,
            mask: !(g.bucket_size - 1),
            header: g.header,
            per_block: g.per_block,
            total: g.total,
            elt_off: g.elt_off,
            name,
        }
    }

    fn state(&self) -> &State {
        // SAFETY: valid as long as `self` (`new`'s contract).
        unsafe { &*self.st }
    }

    fn slot(&self, id: u32) -> &Slot {
        &self.state().slots[id as usize]
    }

    /// Objects of a full-size bucket.
    pub(crate) fn per_block(&self) -> u32 {
        self.per_block
    }

    /// Writes the head of the bucket at `base` (`count` objects, none
    /// free yet).
    ///
    /// # Safety
    ///
    /// `base` is aligned to the bucket size, and the bucket is writable,
    /// unused and stays valid as long as `self`.
    pub(crate) unsafe fn init_bucket(&self, base: usize, count: u32) {
        // SAFETY: the caller's contract.
        unsafe {
            (base as *mut BucketHead).write(BucketHead {
                owner: AtomicU64::new(self.owner),
                home: AtomicU32::new(HOME_NONE),
                fill: AtomicU32::new(0),
                count,
                _pad: 0,
                prev: AtomicU64::new(0),
                next: AtomicU64::new(0),
            });
        }
    }

    /// The head of the bucket at `base` (borrowed as long as the
    /// backend, which keeps the pool's memory mapped).
    #[allow(clippy::unused_self)]
    fn head(&self, base: usize) -> &BucketHead {
        // SAFETY: `base` is a bucket of this pool (from `locate`, a list
        // or the whole stack): its head was written by `init_bucket`
        // and stays mapped while the pool's chunks are.
        unsafe { &*(base as *const BucketHead) }
    }

    /// The index stack of the bucket at `base`.
    #[allow(clippy::unused_self)]
    fn stack(&self, base: usize) -> *mut u16 {
        (base + std::mem::size_of::<BucketHead>()) as *mut u16
    }

    /// Element address of object `idx` of the bucket at `base`.
    pub(crate) fn elt(&self, base: usize, idx: u16) -> *mut u8 {
        (base + self.header + idx as usize * self.total + self.elt_off) as *mut u8
    }

    /// The bucket and index of element `o`, which must be on an object
    /// boundary of one of this pool's buckets (the caller checked that
    /// `o` is inside the pool's object memory, whose chunks start at
    /// bucket boundaries).
    fn locate(&self, o: *mut u8) -> Result<(usize, u16), PutError> {
        let a = o as usize;
        let base = a & self.mask;
        let first = self.header + self.elt_off;
        let r = (a - base).checked_sub(first).ok_or(PutError::Foreign(a))?;
        let idx = r / self.total;
        if r % self.total != 0 || idx >= self.per_block as usize {
            return Err(PutError::Foreign(a));
        }
        let h = self.head(base);
        if h.owner.load(Ordering::Relaxed) != self.owner || idx >= h.count as usize {
            return Err(PutError::Foreign(a));
        }
        Ok((base, idx as u16))
    }

    /// Claims `k` free objects; the free count when fewer are free.
    fn claim(&self, k: u32) -> Result<(), u32> {
        let f = &self.state().free.free;
        let mut cur = f.load(Ordering::Acquire);
        loop {
            if cur < u64::from(k) {
                return Err(cur as u32);
            }
            match f.compare_exchange_weak(
                cur,
                cur - u64::from(k),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(c) => cur = c,
            }
        }
    }

    /// Lists the bucket at `base` first on slot `s` (its lock held).
    fn link(&self, s: &Slot, base: usize) {
        let h = self.head(base);
        let first = s.first.load(Ordering::Relaxed) as usize;
        h.prev.store(0, Ordering::Relaxed);
        h.next.store(first as u64, Ordering::Relaxed);
        if first != 0 {
            self.head(first).prev.store(base as u64, Ordering::Relaxed);
        }
        s.first.store(base as u64, Ordering::Relaxed);
    }

    /// Takes the bucket at `base` off slot `s`'s list (its lock held).
    fn unlink(&self, s: &Slot, base: usize) {
        let h = self.head(base);
        let (prev, next) = (
            h.prev.load(Ordering::Relaxed) as usize,
            h.next.load(Ordering::Relaxed) as usize,
        );
        if prev == 0 {
            s.first.store(next as u64, Ordering::Relaxed);
        } else {
            self.head(prev).next.store(next as u64, Ordering::Relaxed);
        }
        if next != 0 {
            self.head(next).prev.store(prev as u64, Ordering::Relaxed);
        }
    }

    /// Takes up to `out.len()` objects from slot `s`'s buckets (its lock
    /// held); returns how many. Buckets left without a free object leave
    /// the list.
    fn take(&self, s: &Slot, out: &mut [*mut u8]) -> usize {
        let mut got = 0;
        let mut b = s.first.load(Ordering::Relaxed) as usize;
        while got < out.len() && b != 0 {
            let h = self.head(b);
            let next = h.next.load(Ordering::Relaxed) as usize;
            let fill = h.fill.load(Ordering::Relaxed) as usize;
            let k = fill.min(out.len() - got);
            let stack = self.stack(b);
            for (j, slot) in out[got..got + k].iter_mut().enumerate() {
                // SAFETY: [0, fill) of the index stack are filled, and the
                // home slot's lock (held) guards them.
                let idx = unsafe { stack.add(fill - 1 - j).read() };
                *slot = self.elt(b, idx);
            }
            h.fill.store((fill - k) as u32, Ordering::Relaxed);
            s.objs.fetch_sub(k as u32, Ordering::Relaxed);
            if fill == k {
                self.unlink(s, b);
                h.home.store(HOME_NONE, Ordering::Release);
            }
            got += k;
            b = next;
        }
        got
    }

    /// Moves whole buckets holding at least `need` objects (or all there
    /// are) onto slot `me`'s list (its lock held); returns whether it
    /// moved any.
    fn break_whole(&self, s: &Slot, me: u32, need: usize) -> bool {
        let w = &self.state().whole;
        let _g = w.lock.lock();
        let mut len = w.len.load(Ordering::Relaxed);
        let mut moved = 0usize;
        while moved < need && len > 0 {
            len -= 1;
            // SAFETY: entries [0, len) of the whole stack are filled,
            // guarded by its lock (held).
            let b = unsafe { self.whole.add(len as usize).read() } as usize;
            let h = self.head(b);
            h.home.store(me, Ordering::Release);
            self.link(s, b);
            let fill = h.fill.load(Ordering::Relaxed);
            s.objs.fetch_add(fill, Ordering::Relaxed);
            moved += fill as usize;
        }
        w.len.store(len, Ordering::Relaxed);
        moved > 0
    }

    /// Puts the bucket at `base` (full, taken off its list) on the whole
    /// stack; `false` (left listed) when the stack is full, which only a
    /// corrupted pool can reach.
    fn push_whole(&self, base: usize) -> bool {
        let w = &self.state().whole;
        let _g = w.lock.lock();
        let len = w.len.load(Ordering::Relaxed);
        if len >= self.whole_cap {
            return false;
        }
        self.head(base).home.store(HOME_WHOLE, Ordering::Release);
        // SAFETY: len < cap: an entry of the whole stack, under its lock.
        unsafe { self.whole.add(len as usize).write(base as u64) };
        w.len.store(len + 1, Ordering::Relaxed);
        true
    }

    /// Whole buckets now.
    pub(crate) fn whole_count(&self) -> u32 {
        self.state().whole.len.load(Ordering::Relaxed)
    }

    /// Free objects nobody has claimed.
    pub(crate) fn count(&self) -> u32 {
        self.state().free.free.load(Ordering::Relaxed) as u32
    }

    /// Puts `objs` back into their buckets, from slot `me` (`< SLOTS`).
    /// A pointer that is not an object of the pool is refused before
    /// anything changes; an object whose bucket has all its objects
    /// already is refused (the last such is named) and the others go
    /// back.
    pub(crate) fn enqueue(&self, objs: &[*mut u8], me: u32) -> Result<(), PutError> {
        // Refuse a pointer that is not an object before changing anything.
        for &o in objs {
            self.locate(o)?;
        }
        let mut held: Option<(u32, LockGuard<'_>)> = None;
        let mut placed = 0u64;
        let mut dup = None;
        for &o in objs {
            let (b, idx) = self.locate(o)?;
            let h = self.head(b);
            loop {
                let home = h.home.load(Ordering::Acquire);
                if home == HOME_WHOLE {
                    // Every object of the bucket is in already.
                    dup = Some(o);
                    break;
                }
                let want = if home == HOME_NONE { me } else { home };
                if held.as_ref().map(|(id, _)| *id) != Some(want) {
                    // Never two slots' locks at once: let go first.
                    drop(held.take());
                    held = Some((want, self.slot(want).lock.lock()));
                }
                let s = self.slot(want);
                if home == HOME_NONE {
                    // First object back: list the bucket in our slot,
                    // unless another putter listed it in theirs meanwhile.
                    if h.home
                        .compare_exchange(HOME_NONE, me, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    self.link(s, b);
                } else if h.home.load(Ordering::Acquire) != home {
                    // Moved before we had its slot's lock.
                    continue;
                }
                let fill = h.fill.load(Ordering::Relaxed);
                if fill >= h.count {
                    dup = Some(o);
                    break;
                }
                // SAFETY: fill < count: a slot of the index stack, guarded
                // by the home slot's lock (held).
                unsafe { self.stack(b).add(fill as usize).write(idx) };
                h.fill.store(fill + 1, Ordering::Relaxed);
                s.objs.fetch_add(1, Ordering::Relaxed);
                placed += 1;
                if fill + 1 == self.per_block {
                    // Whole again: off the list, onto the whole stack.
                    self.unlink(s, b);
                    s.objs.fetch_sub(self.per_block, Ordering::Relaxed);
                    if !self.push_whole(b) {
                        self.link(s, b);
                        s.objs.fetch_add(self.per_block, Ordering::Relaxed);
                        tracing::error!(
                            pool = self.name,
                            bucket = b,
                            "bucket whole stack full; bucket left listed"
                        );
                    }
                }
                break;
            }
        }
        drop(held);
        self.state().free.free.fetch_add(placed, Ordering::AcqRel);
        match dup {
            None => Ok(()),
            Some(o) => Err(PutError::Dup(o as usize)),
        }
    }

    /// Takes `out.len()` objects, all or nothing, from slot `me` (`<
    /// SLOTS`) first.
    pub(crate) fn dequeue(&self, out: &mut [*mut u8], me: u32) -> Result<(), GetError> {
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        self.claim(n as u32)
            .map_err(|available| GetError::NotEnough { available })?;
        // `n` free objects are ours now: they are on the lists or the
        // whole stack (claims and lists change only under locks, so a
        // sweep that misses some met them moving and the next finds them).
        let mut got = 0;
        let mut fruitless = 0u32;
        loop {
            let before = got;
            {
                let s = self.slot(me);
                let _g = s.lock.lock();
                got += self.take(s, &mut out[got..]);
                if got < n && self.break_whole(s, me, n - got) {
                    got += self.take(s, &mut out[got..]);
                }
            }
            if got == n {
                return Ok(());
            }
            for k in 1..SLOTS as u32 {
                let t = (me + k) % SLOTS as u32;
                let s = self.slot(t);
                if s.objs.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let _g = s.lock.lock();
                got += self.take(s, &mut out[got..]);
                if got == n {
                    return Ok(());
                }
            }
            if got == before {
                fruitless += 1;
                if fruitless == MAX_FRUITLESS_SWEEPS {
                    tracing::error!(
                        pool = self.name,
                        n,
                        got,
                        "bucket free count not backed by the lists"
                    );
                    // Give back what was found, and the rest of the claim.
                    let put = self.enqueue(&out[..got], me);
                    self.state()
                        .free
                        .free
                        .fetch_add((n - got) as u64, Ordering::AcqRel);
                    return Err(GetError::Lost { got, put });
                }
            }
            yield_now();
        }
    }

    /// Takes `first.len()` whole buckets off the whole stack, all or
    /// nothing, and claims their objects; `first` gets each one's first
    /// object. Fewer whole buckets (or free objects) than asked: how
    /// many blocks could have been handed out, and nothing changed.
    pub(crate) fn dequeue_contig_blocks(&self, first: &mut [*mut u8]) -> Result<(), u32> {
        let n = first.len() as u32;
        if n == 0 {
            return Ok(());
        }
        let w = &self.state().whole;
        let _g = w.lock.lock();
        let mut len = w.len.load(Ordering::Relaxed);
        if len < n {
            return Err(len);
        }
        // Claim the objects too: single gets that claimed objects of
        // these buckets must still find theirs.
        let objs = u64::from(n) * u64::from(self.per_block);
        self.claim(objs as u32)
            .map_err(|free| len.min(free / self.per_block))?;
        for f in first.iter_mut() {
            len -= 1;
            // SAFETY: entries [0, len) are filled, under the lock (held).
            let b = unsafe { self.whole.add(len as usize).read() } as usize;
            let h = self.head(b);
            // Handed out whole: no free object, listed nowhere.
            h.fill.store(0, Ordering::Relaxed);
            h.home.store(HOME_NONE, Ordering::Release);
            *f = self.elt(b, 0);
        }
        w.len.store(len, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(all(test, loom))]
mod loom_tests;
