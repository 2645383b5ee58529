//! A sequence counter for optimistic readers of shared data (a seqlock
//! without its lock: writers bring their own mutual exclusion).
//!
//! Readers take nothing, so a reader that is killed, stopped or
//! descheduled anywhere holds nobody up. That is the point: a lock whose
//! readers are counted rather than named cannot survive a reader dying
//! inside it (nobody can tell whether the count is a live reader's), and a
//! process may be SIGKILLed at any instruction.
//!
//! # Protocol
//!
//! The counter is even while the data is stable and odd while a writer
//! changes it.
//!
//! - A writer, already exclusive (it holds the writers' lock), calls
//!   [`write_begin`](SeqCount::write_begin) before its first store to the
//!   data and [`write_end`](SeqCount::write_end) after its last one.
//! - A reader calls [`read_begin`](SeqCount::read_begin) (odd: retry
//!   later), copies what it needs, then asks
//!   [`read_changed`](SeqCount::read_changed): if the counter moved, the
//!   copy may mix states of several writes and must be thrown away.
//!
//! Every access to the data, by writers and readers, must be an atomic
//! load or store (`Relaxed` suffices): readers race with writers by
//! design, and only atomics make that race defined behaviour. The copy a
//! reader makes must not be trusted (no indexing without bounds checks, no
//! unbounded loops following it) until [`read_changed`] says it is whole.
//!
//! # Memory ordering
//!
//! This is the fence-based formulation of Boehm ("Can seqlocks get along
//! with programming language memory models?", MSPC 2012):
//!
//! - writer: `seq = odd` (Relaxed), `fence(Release)`, data stores
//!   (Relaxed), `seq = even` (Release);
//! - reader: `s = seq` (Acquire), data loads (Relaxed), `fence(Acquire)`,
//!   `seq == s` (Relaxed).
//!
//! If a reader's data load sees a store of a write section, the writer's
//! release fence synchronises with the reader's acquire fence, so the
//! odd store happens-before the second counter load, which then cannot
//! return `s` (the counter only grows). If `s` was the even value a write
//! section published (Release/Acquire), every store of that section is
//! visible to the loads that follow.
//!
//! # A writer that dies
//!
//! A writer killed inside its section leaves the counter odd for ever:
//! readers that only retried would spin for ever. [`read`](SeqCount::read)
//! therefore gives up after a bounded number of attempts and returns
//! `None`; the caller then goes to the writers' lock, which names its
//! holder, so a dead one is detected and taken over. The writer that takes
//! over repairs the data and calls [`write_begin`] (the counter stays odd)
//! and [`write_end`] (even again).
//!
//! The counter is 64 bits wide: a reader would have to sleep through 2^63
//! write sections to mistake a changed counter for an unchanged one.
//!
//! Under `cfg(loom)` the counter and the fences are loom's, so the protocol
//! can be model-checked (`loom_tests` below).
//!
//! [`read_changed`]: SeqCount::read_changed
//! [`write_begin`]: SeqCount::write_begin
//! [`write_end`]: SeqCount::write_end

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Attempts [`SeqCount::read`] makes while the counter is odd (a writer is
/// inside its section) before it gives up.
#[cfg(not(loom))]
pub const READ_SPINS: u32 = 256;
/// Attempts while the counter is odd (tiny under loom to bound the state
/// space).
#[cfg(loom)]
pub const READ_SPINS: u32 = 2;

/// Copies [`SeqCount::read`] makes and throws away (a writer changed the
/// data meanwhile) before it gives up.
#[cfg(not(loom))]
pub const READ_COPIES: u32 = 16;
/// Copies thrown away before giving up (tiny under loom).
#[cfg(loom)]
pub const READ_COPIES: u32 = 2;

/// A sequence counter in shared memory: one `u64`, zero (even, stable)
/// when zero-filled.
#[repr(C)]
pub struct SeqCount {
    seq: AtomicU64,
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<SeqCount>() == 8);
    assert!(std::mem::align_of::<SeqCount>() == 8);
};

impl Default for SeqCount {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SeqCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqCount")
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl SeqCount {
    /// A counter at zero (stable).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
        }
    }

    /// A counter at zero (stable).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
        }
    }

    /// The counter's value (a snapshot, for tests and reports).
    pub fn value(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Whether a writer is inside its section (or died there).
    pub fn is_writing(&self) -> bool {
        self.value() & 1 != 0
    }

    /// Starts a write section. The caller excludes every other writer.
    /// If the counter is odd already (the section of a writer that died,
    /// taken over by the caller), it stays odd.
    pub fn write_begin(&self) {
        // Relaxed: only writers store the counter, and they are exclusive
        // (their lock orders them).
        let s = self.seq.load(Ordering::Relaxed);
        if s & 1 == 0 {
            self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        }
        // Orders the odd value before every data store of the section:
        // a reader that sees one of those stores sees the odd value (or a
        // later one) when it checks again.
        fence(Ordering::Release);
    }

    /// Ends a write section: the counter is even again, and larger than
    /// any value it had.
    pub fn write_end(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        // Release: the section's stores are visible to a reader whose
        // `read_begin` sees this value.
        self.seq.store((s | 1).wrapping_add(1), Ordering::Release);
    }

    /// Starts an optimistic read: the counter's value if it is even (no
    /// writer inside), to hand to [`read_changed`](Self::read_changed).
    pub fn read_begin(&self) -> Option<u64> {
        // Acquire: pairs with the Release in `write_end`.
        let s = self.seq.load(Ordering::Acquire);
        (s & 1 == 0).then_some(s)
    }

    /// Whether a writer changed the data since `read_begin` returned
    /// `start` (the copy made meanwhile is then not to be used).
    pub fn read_changed(&self, start: u64) -> bool {
        // Orders the data loads before the check; pairs with the fence in
        // `write_begin` (see the module docs).
        fence(Ordering::Acquire);
        self.seq.load(Ordering::Relaxed) != start
    }

    /// Runs `copy` until it ran with no writer around, and returns what
    /// it returned. `None` after [`READ_SPINS`] looks at an odd counter or
    /// [`READ_COPIES`] copies a writer spoiled: the writer is slow,
    /// descheduled or dead, and the caller should go through the writers'
    /// lock instead.
    ///
    /// `copy` may run on data in the middle of a change: it must only make
    /// atomic loads, never panic on what it reads, and stay bounded.
    pub fn read<R>(&self, mut copy: impl FnMut() -> R) -> Option<R> {
        let mut spins = 0;
        let mut copies = 0;
        loop {
            if let Some(start) = self.read_begin() {
                let r = copy();
                if !self.read_changed(start) {
                    return Some(r);
                }
                copies += 1;
                if copies >= READ_COPIES {
                    return None;
                }
            } else {
                spins += 1;
                if spins >= READ_SPINS {
                    return None;
                }
            }
            spin_hint();
        }
    }
}

#[cfg(not(loom))]
fn spin_hint() {
    std::hint::spin_loop();
}

#[cfg(loom)]
fn spin_hint() {
    loom::thread::yield_now();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn counter_is_even_when_stable_and_odd_inside_a_write() {
        let s = SeqCount::new();
        assert_eq!(s.read_begin(), Some(0));
        s.write_begin();
        assert!(s.is_writing());
        assert_eq!(s.read_begin(), None);
        assert_eq!(s.read(|| 1), None, "gives up on an odd counter");
        s.write_end();
        assert_eq!(s.value(), 2);
        assert!(s.read_changed(0));
        assert!(!s.read_changed(2));
        assert_eq!(s.read(|| 7), Some(7));
    }

    #[test]
    fn a_writer_taking_over_a_dead_writers_section_ends_it() {
        let s = SeqCount::new();
        s.write_begin();
        // The writer dies here. The next one begins (still odd), repairs,
        // ends: even, past every value seen.
        s.write_begin();
        assert_eq!(s.value(), 1);
        s.write_end();
        assert_eq!(s.value(), 2);
        assert_eq!(s.read(|| ()), Some(()));
    }

    #[test]
    fn a_copy_spoiled_by_a_writer_is_retried_then_given_up() {
        let s = SeqCount::new();
        let mut runs = 0;
        // A writer completes a section during every copy.
        let r = s.read(|| {
            runs += 1;
            s.write_begin();
            s.write_end();
        });
        assert_eq!(r, None);
        assert_eq!(runs, READ_COPIES);
        // Only the first copy is spoiled.
        let mut runs = 0;
        let r = s.read(|| {
            runs += 1;
            if runs == 1 {
                s.write_begin();
                s.write_end();
            }
            runs
        });
        assert_eq!(r, Some(2));
    }

    #[test]
    fn readers_never_see_half_of_a_write() {
        // A writer keeps four words equal; readers that accept a copy
        // must find them equal.
        struct Data {
            seq: SeqCount,
            words: [AtomicU64; 4],
            accepted: AtomicU64,
        }
        let d = Arc::new(Data {
            seq: SeqCount::new(),
            words: Default::default(),
            accepted: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let (mut ok, mut gave_up) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let copy = d
                            .seq
                            .read(|| d.words.each_ref().map(|w| w.load(Ordering::Relaxed)));
                        match copy {
                            Some(w) => {
                                assert!(w.iter().all(|&x| x == w[0]), "torn copy {w:?}");
                                ok += 1;
                                d.accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            None => gave_up += 1,
                        }
                    }
                    (ok, gave_up)
                })
            })
            .collect();
        // Write until the readers accepted plenty of copies (a few
        // seconds at most).
        let t0 = std::time::Instant::now();
        let mut v = 0u64;
        while (v < 100_000 || d.accepted.load(Ordering::Relaxed) < 20_000)
            && t0.elapsed() < std::time::Duration::from_secs(5)
        {
            v += 1;
            d.seq.write_begin();
            for w in &d.words {
                w.store(v, Ordering::Relaxed);
            }
            d.seq.write_end();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let (ok, gave_up) = r.join().unwrap();
            assert!(ok > 0, "a reader never got a copy ({gave_up} give-ups)");
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! `RUSTFLAGS="--cfg loom" cargo test -p memplane --release --lib shm::seqlock::loom_tests`
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    struct Data {
        seq: SeqCount,
        a: AtomicU64,
        b: AtomicU64,
    }

    fn data() -> Arc<Data> {
        Arc::new(Data {
            seq: SeqCount::new(),
            a: AtomicU64::new(0),
            b: AtomicU64::new(0),
        })
    }

    fn write(d: &Data, v: u64) {
        d.seq.write_begin();
        d.a.store(v, Ordering::Relaxed);
        d.b.store(v, Ordering::Relaxed);
        d.seq.write_end();
    }

    fn copy(d: &Data) -> (u64, u64) {
        (d.a.load(Ordering::Relaxed), d.b.load(Ordering::Relaxed))
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    /// A copy the reader accepts is whole: both words of one write.
    #[test]
    fn accepted_copies_are_whole() {
        model(|| {
            let d = data();
            let w = {
                let d = d.clone();
                thread::spawn(move || {
                    write(&d, 1);
                    write(&d, 2);
                })
            };
            if let Some((a, b)) = d.seq.read(|| copy(&d)) {
                assert_eq!(a, b, "torn copy accepted");
            }
            w.join().unwrap();
            assert_eq!(d.seq.read(|| copy(&d)), Some((2, 2)));
        });
    }

    /// A copy made after a write section ended sees all of it (the
    /// Release/Acquire pair on the counter).
    #[test]
    fn a_copy_after_a_write_sees_it() {
        model(|| {
            let d = data();
            let w = {
                let d = d.clone();
                thread::spawn(move || write(&d, 1))
            };
            if let Some(start) = d.seq.read_begin() {
                let c = copy(&d);
                if start == 2 {
                    assert_eq!(c, (1, 1), "a finished write not seen");
                }
                if !d.seq.read_changed(start) {
                    assert_eq!(c.0, c.1);
                }
            }
            w.join().unwrap();
        });
    }

    /// A writer that dies inside its section: readers give up (they do
    /// not spin for ever) or get a whole copy from before; the writer that
    /// takes over ends the section and readers get whole copies again.
    #[test]
    fn a_dead_writer_does_not_trap_readers() {
        model(|| {
            let d = data();
            let dead = {
                let d = d.clone();
                thread::spawn(move || {
                    d.seq.write_begin();
                    d.a.store(1, Ordering::Relaxed);
                    // Killed here: no second store, no write_end.
                })
            };
            match d.seq.read(|| copy(&d)) {
                Some((a, b)) => assert_eq!((a, b), (0, 0), "torn copy accepted"),
                None => {}
            }
            dead.join().unwrap();
            assert_eq!(d.seq.read(|| copy(&d)), None, "odd counter: gives up");
            // Take-over: the new writer repairs and ends the section.
            d.seq.write_begin();
            d.b.store(1, Ordering::Relaxed);
            d.seq.write_end();
            assert_eq!(d.seq.read(|| copy(&d)), Some((1, 1)));
        });
    }
}
