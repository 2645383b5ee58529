//! Loom models of the bucket core: every interleaving (up to
//! `LOOM_MAX_PREEMPTIONS` preemptions) of a few threads getting and
//! putting objects and blocks, on buckets in a heap buffer, with loom's
//! atomics and loom mutexes for the slots' and the whole stack's locks
//! (`crate::sync::Lock`; the production `SpinLock` has models of its own
//! in `memplane`). Run by
//! `scripts/extra-tests.sh`:
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test --release -p memplane-mempool --lib bucket_core::loom_tests`
//!
//! After each model the whole state is checked ([`Pool::check`]): every
//! object is in exactly one place (a bucket's index stack or a thread's
//! hands), each bucket's `home` agrees with where it is listed, the
//! lists are well linked, the slots' counts and the free count are exact.
//!
//! Plain memory (index stacks, whole stack entries) is not loom-tracked:
//! loom sees the interleavings at atomics and locks, not data races on
//! those words themselves; a put under the wrong lock shows up as a lost
//! or misplaced object or a count that is off.

use super::*;
use loom::sync::Arc;
use loom::thread;

/// Runs `f` under `loom::model`, reporting how many executions it took.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering as O};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    loom::model(move || {
        r.fetch_add(1, O::Relaxed);
        f();
    });
    eprintln!("{name}: {} executions", runs.load(O::Relaxed));
}

/// Bytes per object in the models.
const TOTAL: usize = 64;

/// A pool of `nb` buckets of `per` objects on a heap buffer, every
/// object enqueued (all buckets whole).
struct Pool {
    core: Core,
    _st: Box<State>,
    _whole: Box<[u64]>,
    mem: *mut u8,
    layout: std::alloc::Layout,
    buckets: Vec<usize>,
    per: u32,
}

// SAFETY: the raw parts are owned by the Pool and shared only through
// the Core (Send and Sync).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the bucket heads
        // hold nothing to drop (loom's atomics are handles).
        unsafe { std::alloc::dealloc(self.mem, self.layout) };
    }
}

impl Pool {
    fn new(nb: usize, per: u32) -> Self {
        let header = (std::mem::size_of::<BucketHead>() + 2 * per as usize).next_multiple_of(64);
        let bucket_size = (header + per as usize * TOTAL).next_power_of_two();
        let layout = std::alloc::Layout::from_size_align(nb * bucket_size, bucket_size).unwrap();
        // SAFETY: a non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!mem.is_null());
        let st = Box::new(State::new());
        let mut whole = vec![0u64; nb].into_boxed_slice();
        let g = Geometry {
            bucket_size,
            header,
            per_block: per,
            total: TOTAL,
            elt_off: 0,
        };
        // SAFETY: the state, the entries and the buffer live as long as
        // the Pool, which drops the Core first (field order).
        let core = unsafe {
            Core::new(
                std::ptr::from_ref::<State>(&st),
                whole.as_mut_ptr(),
                nb as u32,
                mem as u64,
                g,
                "loom".into(),
            )
        };
        let buckets: Vec<usize> = (0..nb).map(|k| mem as usize + k * bucket_size).collect();
        for &b in &buckets {
            // SAFETY: a bucket of the buffer, aligned, unused.
            unsafe { core.init_bucket(b, per) };
        }
        let p = Self {
            core,
            _st: st,
            _whole: whole,
            mem,
            layout,
            buckets,
            per,
        };
        let all = p.all();
        p.core.enqueue(&all, SHARED_SLOT).unwrap();
        p
    }

    /// Every object of the pool.
    fn all(&self) -> Vec<*mut u8> {
        self.buckets
            .iter()
            .flat_map(|&b| (0..self.per as u16).map(move |i| (b, i)))
            .map(|(b, i)| self.core.elt(b, i))
            .collect()
    }

    fn get(&self, n: usize, slot: u32) -> Vec<usize> {
        let mut out = vec![std::ptr::null_mut(); n];
        self.core.dequeue(&mut out, slot).unwrap();
        out.into_iter().map(|o| o as usize).collect()
    }

    fn put(&self, objs: &[usize], slot: u32) {
        let objs: Vec<*mut u8> = objs.iter().map(|&o| o as *mut u8).collect();
        self.core.enqueue(&objs, slot).unwrap();
    }

    /// The whole state, checked; `out` are the objects outside the pool.
    fn check(&self, out: &[usize]) {
        let c = &self.core;
        let st = c.state();
        let mut seen: Vec<usize> = out.to_vec();
        let mut fills = 0u64;
        let mut listed: Vec<usize> = Vec::new();
        for (id, s) in st.slots.iter().enumerate() {
            let mut sum = 0u32;
            let mut prev = 0usize;
            let mut b = s.first.load(Ordering::Relaxed) as usize;
            while b != 0 {
                assert!(self.buckets.contains(&b), "slot {id} lists {b:#x}");
                assert!(!listed.contains(&b), "bucket {b:#x} listed twice");
                listed.push(b);
                let h = c.head(b);
                assert_eq!(h.prev.load(Ordering::Relaxed) as usize, prev, "prev link");
                assert_eq!(
                    h.home.load(Ordering::Relaxed),
                    id as u32,
                    "bucket {b:#x} on slot {id}'s list"
                );
                let fill = h.fill.load(Ordering::Relaxed);
                assert!(
                    fill > 0 && fill < h.count,
                    "listed bucket {b:#x} with {fill} of {} free",
                    h.count
                );
                sum += fill;
                prev = b;
                b = h.next.load(Ordering::Relaxed) as usize;
            }
            assert_eq!(s.objs.load(Ordering::Relaxed), sum, "slot {id}'s count");
        }
        let len = st.whole.len.load(Ordering::Relaxed) as usize;
        let mut whole = Vec::new();
        for k in 0..len {
            // SAFETY: an entry below len; every thread joined.
            let b = unsafe { c.whole.add(k).read() } as usize;
            assert!(self.buckets.contains(&b), "whole stack holds {b:#x}");
            assert!(!listed.contains(&b), "bucket {b:#x} listed and whole");
            assert!(
                !whole.contains(&b),
                "bucket {b:#x} twice on the whole stack"
            );
            whole.push(b);
            let h = c.head(b);
            assert_eq!(h.home.load(Ordering::Relaxed), HOME_WHOLE, "whole {b:#x}");
            assert_eq!(h.fill.load(Ordering::Relaxed), h.count, "whole {b:#x}");
        }
        for &b in &self.buckets {
            let h = c.head(b);
            let fill = h.fill.load(Ordering::Relaxed);
            if !listed.contains(&b) && !whole.contains(&b) {
                assert_eq!(
                    h.home.load(Ordering::Relaxed),
                    HOME_NONE,
                    "bucket {b:#x} listed nowhere"
                );
                assert_eq!(fill, 0, "bucket {b:#x} listed nowhere has free objects");
            }
            fills += u64::from(fill);
            for k in 0..fill as usize {
                // SAFETY: [0, fill) of the index stack; every thread joined.
                let idx = unsafe { c.stack(b).add(k).read() };
                seen.push(c.elt(b, idx) as usize);
            }
        }
        assert_eq!(
            st.free.free.load(Ordering::Relaxed),
            fills,
            "free count against the buckets"
        );
        seen.sort_unstable();
        let mut all: Vec<usize> = self.all().into_iter().map(|o| o as usize).collect();
        all.sort_unstable();
        assert_eq!(seen, all, "every object exactly once");
    }
}

/// (a) Two threads on two slots get and put single objects: slot 0 gets
/// one and puts it back, slot 1 returns an object the main thread took
/// (so one bucket starts partial in slot 0, the other whole) and gets
/// one it keeps. Every object ends in exactly one place and the counts
/// are exact, then everything is back and whole. (A third thread on the
/// shared slot takes some 600 000 executions, 80 s: left out.)
#[test]
fn single_gets_and_puts_from_two_slots() {
    model("single_gets_and_puts_from_two_slots", || {
        let p = Arc::new(Pool::new(2, 2));
        let x = p.get(1, 0);
        let t0 = {
            let p = p.clone();
            thread::spawn(move || {
                let o = p.get(1, 0);
                p.put(&o, 0);
            })
        };
        let t1 = {
            let p = p.clone();
            thread::spawn(move || {
                p.put(&x, 1);
                p.get(1, 1)
            })
        };
        t0.join().unwrap();
        let kept = t1.join().unwrap();
        p.check(&kept);
        assert_eq!(p.core.count(), 3);
        p.put(&kept, SHARED_SLOT);
        p.check(&[]);
        assert_eq!(p.core.whole_count(), 2);
    });
}

/// (b) The race of a put against its bucket's home changing while the
/// putter waits for the home slot's lock: bucket B (2 objects) is in
/// slot 0 with one free object; a get on slot 0 empties it (home goes
/// to none, the bucket leaves the list) while slot 1 puts B's other
/// object, which must then list B in its own slot, not write under slot
/// 0's lock into a bucket listed nowhere. Fails without the re-check
/// of the home after the lock is taken.
#[test]
fn put_rechecks_home_after_taking_the_lock() {
    model("put_rechecks_home_after_taking_the_lock", || {
        let p = Arc::new(Pool::new(1, 2));
        let b = p.get(1, 0);
        let t0 = {
            let p = p.clone();
            thread::spawn(move || p.get(1, 0))
        };
        let t1 = {
            let p = p.clone();
            thread::spawn(move || p.put(&b, 1))
        };
        let a = t0.join().unwrap();
        t1.join().unwrap();
        p.check(&a);
        assert_eq!(p.core.count(), 1);
        // The free object is found again.
        let c = p.get(1, SHARED_SLOT);
        p.put(&a, 0);
        p.put(&c, 1);
        p.check(&[]);
        assert_eq!(p.core.whole_count(), 1);
    });
}

/// (b') The same race with a third thread: while the first putter waits
/// for slot 0's lock, the get empties bucket B and a putter on the
/// shared slot lists it there; the first putter must follow B to that
/// slot (its lock) rather than change B under slot 0's.
#[test]
fn put_follows_a_bucket_relisted_elsewhere() {
    model("put_follows_a_bucket_relisted_elsewhere", || {
        let p = Arc::new(Pool::new(1, 3));
        let bc = p.get(2, 0);
        let (b, c) = (vec![bc[0]], vec![bc[1]]);
        let t0 = {
            let p = p.clone();
            thread::spawn(move || p.get(1, 0))
        };
        let t1 = {
            let p = p.clone();
            thread::spawn(move || p.put(&b, 1))
        };
        let t2 = {
            let p = p.clone();
            thread::spawn(move || p.put(&c, SHARED_SLOT))
        };
        let a = t0.join().unwrap();
        t1.join().unwrap();
        t2.join().unwrap();
        p.check(&a);
        assert_eq!(p.core.count(), 2);
    });
}

/// (c) A block get races a put that completes a bucket (moving it from
/// slot 0's list to the whole stack) and a single get on the shared
/// slot (which may break a whole bucket): a block handed out is a whole
/// bucket (all its objects, none of them reachable from a slot or the
/// whole stack: [`Pool::check`] with the block's objects outside), a
/// refused block get changes nothing, the counts are exact, and
/// everything comes back whole.
#[test]
fn block_get_races_a_put_completing_a_bucket() {
    model("block_get_races_a_put_completing_a_bucket", || {
        let p = Arc::new(Pool::new(2, 2));
        let x = p.get(1, 0);
        let t0 = {
            let p = p.clone();
            thread::spawn(move || p.put(&x, 1))
        };
        let t1 = {
            let p = p.clone();
            thread::spawn(move || {
                let mut first = [std::ptr::null_mut(); 1];
                match p.core.dequeue_contig_blocks(&mut first) {
                    Ok(()) => {
                        let f = first[0] as usize;
                        let base = f & p.core.mask;
                        assert_eq!(f, p.core.elt(base, 0) as usize, "block starts its bucket");
                        (0..p.per as usize).map(|k| f + k * TOTAL).collect()
                    }
                    Err(available) => {
                        assert_eq!(available, 0, "refused with a whole bucket");
                        assert!(first[0].is_null());
                        Vec::new()
                    }
                }
            })
        };
        let t2 = {
            let p = p.clone();
            thread::spawn(move || p.get(1, SHARED_SLOT))
        };
        t0.join().unwrap();
        let block = t1.join().unwrap();
        let single = t2.join().unwrap();
        let out: Vec<usize> = block.iter().chain(&single).copied().collect();
        p.check(&out);
        assert_eq!(p.core.count() as usize, 4 - out.len());
        p.put(&block, 0);
        p.put(&single, 1);
        p.check(&[]);
        assert_eq!(p.core.whole_count(), 2);
    });
}
