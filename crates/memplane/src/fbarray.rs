//! `fbarray`: a fixed-capacity array of fixed-size elements with a
//! used-bitmap, living entirely in one caller-provided (shareable) region.
//!
//! This is DPDK's `rte_fbarray` rebuilt for memplane: memseg lists and the
//! memzone table are fbarrays. Differences from DPDK:
//!
//! - the header, the bitmap and the elements all sit in **one region** the
//!   caller provides (inside the shared config, or a memfd of its own), and
//!   the header stores **offsets, never pointers**, so the region may be
//!   mapped at any address in each process (memplane maps it at the same one
//!   anyway);
//! - the capacity is chosen at creation (no compile-time ceiling), up to
//!   `u32::MAX` elements;
//! - every search is O(words), not O(elements): it works on whole 64-bit
//!   bitmap words with `trailing_zeros`/`leading_ones` and shift-and tricks;
//! - bad input is a typed [`FbArrayError`], and `set_used` on a used slot or
//!   `set_free` on a free one (a double free) is an error that leaves the
//!   state unchanged (DPDK silently accepts both);
//! - the lock is a process-shared [`RwLock`] that
//!   names its writer's pid, so a writer that died holding it is reported
//!   rather than hanging everyone (see [`FbArray::write_lock_timeout`]).
//!
//! # Layout (all little-endian native, `repr(C)`)
//!
//! ```text
//! offset 0    Header (128 bytes)
//!               0  magic        u64  "MPFBARR1", stored last (Release) by init
//!               8  version      u32  1
//!              12  capacity     u32  elements
//!              16  elt_size     u32  bytes per element
//!              20  used         u32  (atomic) number of used elements
//!              24  lock         RwLock (one atomic u32)
//!              28  name_len     u32
//!              32  bitmap_off   u64  = 128
//!              40  data_off     u64  bitmap end rounded up to 64
//!              48  total_size   u64  = data_off + capacity * elt_size
//!              56  reserved     u64
//!              64  name         [u8; 64], NUL-padded, at most 63 bytes
//! offset 128  bitmap: ceil(capacity / 64) x u64 (atomic), bit i%64 of word
//!             i/64 set = element i used; bits past capacity always 0
//! data_off    elements: capacity x elt_size bytes (not interpreted)
//! ```
//!
//! # Locking
//!
//! [`FbArray`]'s own methods lock per call (queries take the read lock,
//! `set_used`/`set_free` the write lock). To make a find-then-claim atomic,
//! take [`FbArray::write_lock`] and call the same methods on the guard;
//! [`FbArray::read_lock`] gives a consistent view for several queries.
//! Bitmap words and the used count are atomics accessed `Relaxed`: the
//! rwlock's Acquire/Release orders them, and the atomics make a lock-free
//! [`FbArray::count_used`] well-defined.

use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::shm::lock::{LockError, ReadGuard, RwLock, WriteGuard};

/// "MPFBARR1" read as a little-endian u64.
pub const FBARRAY_MAGIC: u64 = u64::from_le_bytes(*b"MPFBARR1");
/// Layout version stored in the header.
pub const FBARRAY_VERSION: u32 = 1;
/// Longest name, in bytes.
pub const NAME_MAX: usize = 63;
/// Alignment of the element storage (and required alignment of the region).
pub const DATA_ALIGN: usize = 64;
/// Required alignment of the region's start.
pub const REGION_ALIGN: usize = 8;

/// Why an fbarray operation was refused. The array is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FbArrayError {
    /// Capacity 0 was asked.
    #[error("fbarray capacity must be at least 1 element")]
    ZeroCapacity,
    /// Element size 0 was asked.
    #[error("fbarray element size must be at least 1 byte")]
    ZeroEltSize,
    /// capacity x elt_size (plus header) does not fit in the address space.
    #[error("fbarray of {capacity} elements of {elt_size} bytes is too large to address")]
    TooLarge {
        /// Requested capacity.
        capacity: u32,
        /// Requested element size.
        elt_size: u32,
    },
    /// The name is longer than [`NAME_MAX`] bytes.
    #[error("fbarray name {name:?} is {len} bytes; at most {NAME_MAX} are allowed")]
    NameTooLong {
        /// The name given.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a NUL byte.
    #[error("fbarray name {name:?} contains a NUL byte")]
    BadName {
        /// The name given.
        name: String,
    },
    /// The region given is smaller than the array needs.
    #[error("fbarray region is {have} bytes but {need} are needed (see FbArray::required_size)")]
    RegionTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The region (or an element pointer) is not aligned enough.
    #[error("address {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The alignment required.
        align: usize,
    },
    /// An index or start position is not below the capacity.
    #[error("fbarray index {idx} is out of range (capacity {capacity})")]
    IndexOutOfRange {
        /// The index given.
        idx: u32,
        /// The array's capacity.
        capacity: u32,
    },
    /// A run length of 0 or more than the capacity was asked.
    #[error("fbarray run length {n} is invalid: it must be 1..={capacity}")]
    BadRunLength {
        /// The length given.
        n: u32,
        /// The array's capacity.
        capacity: u32,
    },
    /// `set_used` on a slot already in use.
    #[error("fbarray element {idx} is already used")]
    AlreadyUsed {
        /// The slot.
        idx: u32,
    },
    /// `set_free` on a slot already free (a double free).
    #[error("fbarray element {idx} is already free (double free?)")]
    AlreadyFree {
        /// The slot.
        idx: u32,
    },
    /// A typed access asked for a type larger than the element size.
    #[error("type of {size} bytes does not fit in an fbarray element of {elt_size} bytes")]
    TypeTooLarge {
        /// `size_of::<T>()`.
        size: usize,
        /// The array's element size.
        elt_size: u32,
    },
    /// attach found no fbarray header (or one of another version).
    #[error(
        "no fbarray at this address: magic {found:#018x}, version {version} \
         (expected {FBARRAY_MAGIC:#018x}, version {FBARRAY_VERSION}); was it initialised?"
    )]
    BadMagic {
        /// The magic found.
        found: u64,
        /// The version found.
        version: u32,
    },
    /// attach found a header whose fields disagree with each other.
    #[error("fbarray header is corrupt: {detail}")]
    Corrupt {
        /// What is inconsistent.
        detail: String,
    },
    /// The write (or read) lock could not be taken in time, or its holder died.
    #[error("fbarray {name:?}: {source}")]
    Lock {
        /// The array's name.
        name: String,
        /// Who holds the lock.
        #[source]
        source: LockError,
    },
    /// Creating or mapping the backing memory failed.
    #[error("fbarray {name:?}: {action}: {source}")]
    Map {
        /// The array's name.
        name: String,
        /// What was being done.
        action: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = FbArrayError> = std::result::Result<T, E>;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: u32,
    capacity: u32,
    elt_size: u32,
    used: AtomicU32,
    lock: RwLock,
    name_len: u32,
    bitmap_off: u64,
    data_off: u64,
    total_size: u64,
    reserved: u64,
    name: [u8; 64],
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<Header>() == 128);
    assert!(align_of::<Header>() == REGION_ALIGN);
    assert!(std::mem::offset_of!(Header, magic) == 0);
    assert!(std::mem::offset_of!(Header, version) == 8);
    assert!(std::mem::offset_of!(Header, capacity) == 12);
    assert!(std::mem::offset_of!(Header, elt_size) == 16);
    assert!(std::mem::offset_of!(Header, used) == 20);
    assert!(std::mem::offset_of!(Header, lock) == 24);
    assert!(std::mem::offset_of!(Header, name_len) == 28);
    assert!(std::mem::offset_of!(Header, bitmap_off) == 32);
    assert!(std::mem::offset_of!(Header, data_off) == 40);
    assert!(std::mem::offset_of!(Header, total_size) == 48);
    assert!(std::mem::offset_of!(Header, name) == 64);
    assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
};

/// The derived layout of an array of a given shape.
#[derive(Clone, Copy)]
struct Layout {
    nwords: usize,
    bitmap_off: usize,
    data_off: usize,
    total: usize,
}

fn layout(capacity: u32, elt_size: u32) -> Result<Layout> {
    if capacity == 0 {
        return Err(FbArrayError::ZeroCapacity);
    }
    if elt_size == 0 {
        return Err(FbArrayError::ZeroEltSize);
    }
    let too_large = || FbArrayError::TooLarge { capacity, elt_size };
    let nwords = (capacity as usize).div_ceil(64);
    let bitmap_off = size_of::<Header>();
    let data_off = (bitmap_off + nwords * 8)
        .checked_next_multiple_of(DATA_ALIGN)
        .ok_or_else(too_large)?;
    let total = (capacity as usize)
        .checked_mul(elt_size as usize)
        .and_then(|d| d.checked_add(data_off))
        .filter(|&t| isize::try_from(t).is_ok())
        .ok_or_else(too_large)?;
    Ok(Layout {
        nwords,
        bitmap_off,
        data_off,
        total,
    })
}

fn check_name(name: &str) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FbArrayError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    if name.contains('\0') {
        return Err(FbArrayError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Bits `0..n` set (`n <= 64`).
fn low_ones(n: u32) -> u64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

/// Bits `64-n..64` set (`n <= 64`).
fn high_ones(n: u32) -> u64 {
    if n == 0 {
        0
    } else {
        !0u64 << (64 - n)
    }
}

/// Bit `p` of the result is set iff bits `p..p+n` of `w` are all set
/// (`1 <= n <= 64`). O(log n) shift-and steps.
fn runs_of(w: u64, n: u32) -> u64 {
    let mut m = w;
    let mut have = 1;
    while have < n && m != 0 {
        let s = have.min(n - have);
        m &= m >> s;
        have += s;
    }
    m
}

/// A process-local view of an fbarray in a region: the header's immutable
/// fields cached, plus the region's address.
#[derive(Clone, Copy)]
struct Raw<'a> {
    base: NonNull<u8>,
    capacity: u32,
    elt_size: u32,
    lay: Layout,
    _region: PhantomData<&'a [u8]>,
}

// SAFETY: everything another thread can reach through `Raw` is either
// immutable after init (header shape, name) or an atomic (used count, lock,
// bitmap words); element bytes are only handed out as raw pointers.
unsafe impl Send for Raw<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for Raw<'_> {}

impl<'a> Raw<'a> {
    fn header(&self) -> &'a Header {
        // SAFETY: `base` is valid for `lay.total` bytes for 'a, aligned to 8
        // (checked by init/attach) and starts with an initialised Header
        // (magic checked); Header is all atomics or init-time constants.
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    fn words(&self) -> &'a [AtomicU64] {
        // SAFETY: the bitmap lies inside the region at an 8-aligned offset
        // (128, in an 8-aligned region; checked by init/attach) and spans
        // `nwords` u64s; AtomicU64 has the layout of u64, and all bitmap
        // access is atomic.
        unsafe {
            std::slice::from_raw_parts(
                self.base
                    .add(self.lay.bitmap_off)
                    .cast::<AtomicU64>()
                    .as_ptr(),
                self.lay.nwords,
            )
        }
    }

    fn name(&self) -> &'a str {
        let h = self.header();
        let len = (h.name_len as usize).min(NAME_MAX);
        // Validated UTF-8 at init/attach.
        std::str::from_utf8(&h.name[..len]).unwrap_or("")
    }

    fn valid_mask(&self, wi: usize) -> u64 {
        if wi + 1 == self.lay.nwords {
            low_ones(self.capacity - (wi as u32) * 64)
        } else {
            !0
        }
    }

    /// Word `wi` with the bits of the wanted kind set.
    fn word(&self, wi: usize, used: bool) -> u64 {
        let w = self.words()[wi].load(Ordering::Relaxed);
        (if used { w } else { !w }) & self.valid_mask(wi)
    }

    fn check_idx(&self, idx: u32) -> Result<()> {
        if idx < self.capacity {
            Ok(())
        } else {
            Err(FbArrayError::IndexOutOfRange {
                idx,
                capacity: self.capacity,
            })
        }
    }

    fn check_n(&self, n: u32) -> Result<()> {
        if n == 0 || n > self.capacity {
            Err(FbArrayError::BadRunLength {
                n,
                capacity: self.capacity,
            })
        } else {
            Ok(())
        }
    }

    fn is_used(&self, idx: u32) -> Result<bool> {
        self.check_idx(idx)?;
        Ok(self.word(idx as usize / 64, true) & (1 << (idx % 64)) != 0)
    }

    /// Caller holds the write lock.
    fn set(&self, idx: u32, used: bool) -> Result<()> {
        self.check_idx(idx)?;
        let word = &self.words()[idx as usize / 64];
        let bit = 1u64 << (idx % 64);
        let w = word.load(Ordering::Relaxed);
        if (w & bit != 0) == used {
            return Err(if used {
                FbArrayError::AlreadyUsed { idx }
            } else {
                FbArrayError::AlreadyFree { idx }
            });
        }
        // Relaxed: the write lock orders these against other holders.
        word.store(w ^ bit, Ordering::Relaxed);
        let count = &self.header().used;
        let c = count.load(Ordering::Relaxed);
        count.store(if used { c + 1 } else { c - 1 }, Ordering::Relaxed);
        Ok(())
    }

    fn find_next(&self, start: u32, used: bool) -> Result<Option<u32>> {
        self.check_idx(start)?;
        let mut wi = start as usize / 64;
        let mut w = self.word(wi, used) & (!0u64 << (start % 64));
        loop {
            if w != 0 {
                return Ok(Some(wi as u32 * 64 + w.trailing_zeros()));
            }
            wi += 1;
            if wi == self.lay.nwords {
                return Ok(None);
            }
            w = self.word(wi, used);
        }
    }

    fn find_prev(&self, start: u32, used: bool) -> Result<Option<u32>> {
        self.check_idx(start)?;
        let mut wi = start as usize / 64;
        let mut w = self.word(wi, used) & low_ones(start % 64 + 1);
        loop {
            if w != 0 {
                return Ok(Some(wi as u32 * 64 + 63 - w.leading_zeros()));
            }
            if wi == 0 {
                return Ok(None);
            }
            wi -= 1;
            w = self.word(wi, used);
        }
    }

    fn find_next_n(&self, start: u32, n: u32, used: bool) -> Result<Option<u32>> {
        self.check_idx(start)?;
        self.check_n(n)?;
        let first = start as usize / 64;
        let (mut run_start, mut run_len) = (0u64, 0u64);
        for wi in first..self.lay.nwords {
            let base = wi as u64 * 64;
            let mut w = self.word(wi, used);
            if wi == first {
                w &= !0u64 << (start % 64);
            }
            if run_len > 0 {
                let t = w.trailing_ones();
                if run_len + u64::from(t) >= u64::from(n) {
                    return Ok(Some(run_start as u32));
                }
                if t == 64 {
                    run_len += 64;
                    continue;
                }
                run_len = 0;
            }
            if n <= 64 {
                let m = runs_of(w, n);
                if m != 0 {
                    return Ok(Some((base + u64::from(m.trailing_zeros())) as u32));
                }
            }
            let lo = w.leading_ones();
            if lo > 0 {
                run_start = base + 64 - u64::from(lo);
                run_len = u64::from(lo);
            }
        }
        Ok(None)
    }

    fn find_prev_n(&self, start: u32, n: u32, used: bool) -> Result<Option<u32>> {
        self.check_idx(start)?;
        self.check_n(n)?;
        let first = start as usize / 64;
        let (mut run_end, mut run_len) = (0u64, 0u64);
        for wi in (0..=first).rev() {
            let base = wi as u64 * 64;
            let mut w = self.word(wi, used);
            if wi == first {
                w &= low_ones(start % 64 + 1);
            }
            if run_len > 0 {
                let t = w.leading_ones();
                if run_len + u64::from(t) >= u64::from(n) {
                    return Ok(Some((run_end - u64::from(n)) as u32));
                }
                if t == 64 {
                    run_len += 64;
                    continue;
                }
                run_len = 0;
            }
            if n <= 64 {
                let m = runs_of(w, n);
                if m != 0 {
                    return Ok(Some((base + 63 - u64::from(m.leading_zeros())) as u32));
                }
            }
            let t0 = w.trailing_ones();
            if t0 > 0 {
                run_end = base + u64::from(t0);
                run_len = u64::from(t0);
            }
        }
        Ok(None)
    }

    fn find_contig(&self, start: u32, used: bool) -> Result<u32> {
        self.check_idx(start)?;
        let mut wi = start as usize / 64;
        let b = start % 64;
        let t = (self.word(wi, used) >> b).trailing_ones();
        if t < 64 - b {
            return Ok(t);
        }
        let mut len = 64 - b;
        loop {
            wi += 1;
            if wi == self.lay.nwords {
                return Ok(len);
            }
            let t = self.word(wi, used).trailing_ones();
            len += t;
            if t < 64 {
                return Ok(len);
            }
        }
    }

    fn find_rev_contig(&self, start: u32, used: bool) -> Result<u32> {
        self.check_idx(start)?;
        let mut wi = start as usize / 64;
        let b = start % 64;
        let lo = (self.word(wi, used) << (63 - b)).leading_ones();
        if lo < b + 1 {
            return Ok(lo);
        }
        let mut len = b + 1;
        while wi > 0 {
            wi -= 1;
            let lo = self.word(wi, used).leading_ones();
            len += lo;
            if lo < 64 {
                break;
            }
        }
        Ok(len)
    }

    fn find_biggest(&self, start: u32, used: bool) -> Result<Option<(u32, u32)>> {
        self.check_idx(start)?;
        let first = start as usize / 64;
        let (mut best_start, mut best_len) = (0u64, 0u64);
        let (mut run_start, mut run_len) = (0u64, 0u64);
        for wi in first..self.lay.nwords {
            let base = wi as u64 * 64;
            let mut w = self.word(wi, used);
            if wi == first {
                w &= !0u64 << (start % 64);
            }
            let t = w.trailing_ones();
            if t == 64 {
                if run_len == 0 {
                    run_start = base;
                }
                run_len += 64;
                continue;
            }
            if t > 0 && run_len == 0 {
                run_start = base;
            }
            run_len += u64::from(t);
            if run_len > best_len {
                (best_start, best_len) = (run_start, run_len);
            }
            run_len = 0;
            // Bit t is clear, so the top run (the carry) is distinct from the
            // bottom one. Runs strictly inside the word: only look for ones
            // longer than the best so far (amortised O(1) per word).
            let lo = w.leading_ones();
            let mid = w & !low_ones(t) & !high_ones(lo);
            while best_len < 64 {
                let m = runs_of(mid, best_len as u32 + 1);
                if m == 0 {
                    break;
                }
                let p = m.trailing_zeros();
                best_start = base + u64::from(p);
                best_len = u64::from((mid >> p).trailing_ones());
            }
            if lo > 0 {
                run_start = base + 64 - u64::from(lo);
                run_len = u64::from(lo);
            }
        }
        if run_len > best_len {
            (best_start, best_len) = (run_start, run_len);
        }
        Ok((best_len > 0).then_some((best_start as u32, best_len as u32)))
    }

    fn get(&self, idx: u32) -> Result<NonNull<u8>> {
        self.check_idx(idx)?;
        let off = self.lay.data_off + idx as usize * self.elt_size as usize;
        // SAFETY: off < lay.total (idx < capacity), inside the region.
        Ok(unsafe { self.base.add(off) })
    }

    fn get_ptr<T>(&self, idx: u32) -> Result<NonNull<T>> {
        if size_of::<T>() > self.elt_size as usize {
            return Err(FbArrayError::TypeTooLarge {
                size: size_of::<T>(),
                elt_size: self.elt_size,
            });
        }
        let p = self.get(idx)?;
        if p.as_ptr() as usize % align_of::<T>() != 0 {
            return Err(FbArrayError::Misaligned {
                addr: p.as_ptr() as usize,
                align: align_of::<T>(),
            });
        }
        Ok(p.cast())
    }

    fn find_idx(&self, ptr: *const u8) -> Option<u32> {
        let data = self.base.as_ptr() as usize + self.lay.data_off;
        let off = (ptr as usize).checked_sub(data)?;
        let idx = off / self.elt_size as usize;
        (idx < self.capacity as usize).then_some(idx as u32)
    }
}

/// A handle on an fbarray living in a region of (usually shared) memory.
///
/// Cheap to copy around by reference; all methods take `&self`. Obtained from
/// [`FbArray::init`], [`FbArray::attach`] or [`OwnedFbArray::array`].
#[derive(Clone, Copy)]
pub struct FbArray<'a> {
    raw: Raw<'a>,
    /// Reads skip the shared lock (a secondary process: killed while
    /// holding a read lock, it would block writers for good, as readers
    /// are counted, not named).
    lock_free_reads: bool,
}

impl std::fmt::Debug for FbArray<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbArray")
            .field("name", &self.name())
            .field("capacity", &self.capacity())
            .field("elt_size", &self.elt_size())
            .field("used", &self.count_used())
            .finish_non_exhaustive()
    }
}

/// Read-only queries, available on [`FbReadGuard`] and [`FbWriteGuard`]
/// (which hold the lock) and mirrored by [`FbArray`] (which locks per call).
macro_rules! queries {
    () => {
        /// Whether element `idx` is used.
        pub fn is_used(&self, idx: u32) -> Result<bool> {
            self.raw.is_used(idx)
        }
        /// Lowest free index `>= start`, or `None`.
        pub fn find_next_free(&self, start: u32) -> Result<Option<u32>> {
            self.raw.find_next(start, false)
        }
        /// Lowest used index `>= start`, or `None`.
        pub fn find_next_used(&self, start: u32) -> Result<Option<u32>> {
            self.raw.find_next(start, true)
        }
        /// Highest free index `<= start`, or `None`.
        pub fn find_prev_free(&self, start: u32) -> Result<Option<u32>> {
            self.raw.find_prev(start, false)
        }
        /// Highest used index `<= start`, or `None`.
        pub fn find_prev_used(&self, start: u32) -> Result<Option<u32>> {
            self.raw.find_prev(start, true)
        }
        /// Lowest index `>= start` that begins a run of `n` free elements.
        pub fn find_next_n_free(&self, start: u32, n: u32) -> Result<Option<u32>> {
            self.raw.find_next_n(start, n, false)
        }
        /// Lowest index `>= start` that begins a run of `n` used elements.
        pub fn find_next_n_used(&self, start: u32, n: u32) -> Result<Option<u32>> {
            self.raw.find_next_n(start, n, true)
        }
        /// The highest run of `n` free elements lying entirely at or below
        /// `start`; returns its lowest index.
        pub fn find_prev_n_free(&self, start: u32, n: u32) -> Result<Option<u32>> {
            self.raw.find_prev_n(start, n, false)
        }
        /// The highest run of `n` used elements lying entirely at or below
        /// `start`; returns its lowest index.
        pub fn find_prev_n_used(&self, start: u32, n: u32) -> Result<Option<u32>> {
            self.raw.find_prev_n(start, n, true)
        }
        /// Length of the run of free elements starting at `start` (0 if
        /// `start` is used).
        pub fn find_contig_free(&self, start: u32) -> Result<u32> {
            self.raw.find_contig(start, false)
        }
        /// Length of the run of used elements starting at `start`.
        pub fn find_contig_used(&self, start: u32) -> Result<u32> {
            self.raw.find_contig(start, true)
        }
        /// Length of the run of free elements ending at `start`, going down.
        pub fn find_rev_contig_free(&self, start: u32) -> Result<u32> {
            self.raw.find_rev_contig(start, false)
        }
        /// Length of the run of used elements ending at `start`, going down.
        pub fn find_rev_contig_used(&self, start: u32) -> Result<u32> {
            self.raw.find_rev_contig(start, true)
        }
        /// The longest run of free elements at or after `start` as
        /// `(first index, length)`; the lowest wins ties. `None` if all used.
        pub fn find_biggest_free(&self, start: u32) -> Result<Option<(u32, u32)>> {
            self.raw.find_biggest(start, false)
        }
        /// The longest run of used elements at or after `start` as
        /// `(first index, length)`; the lowest wins ties. `None` if all free.
        pub fn find_biggest_used(&self, start: u32) -> Result<Option<(u32, u32)>> {
            self.raw.find_biggest(start, true)
        }
    };
}

/// Accessors that need no lock.
macro_rules! unlocked {
    () => {
        /// Number of elements.
        pub fn capacity(&self) -> u32 {
            self.raw.capacity
        }
        /// Bytes per element.
        pub fn elt_size(&self) -> u32 {
            self.raw.elt_size
        }
        /// The name given at init.
        pub fn name(&self) -> &str {
            self.raw.name()
        }
        /// Number of used elements (a lock-free snapshot unless the lock is
        /// held).
        pub fn count_used(&self) -> u32 {
            self.raw.header().used.load(Ordering::Relaxed)
        }
        /// Pointer to element `idx` (used or not). Dereferencing it is up to
        /// the caller, who must synchronise element contents themselves.
        pub fn get(&self, idx: u32) -> Result<NonNull<u8>> {
            self.raw.get(idx)
        }
        /// Pointer to element `idx` as a `T`; errors if `T` is larger than
        /// an element or the element is misaligned for `T`.
        pub fn get_ptr<T>(&self, idx: u32) -> Result<NonNull<T>> {
            self.raw.get_ptr(idx)
        }
        /// Index of the element containing `ptr`, if it points into the
        /// element storage.
        pub fn find_idx(&self, ptr: *const u8) -> Option<u32> {
            self.raw.find_idx(ptr)
        }
    };
}

/// Shared access to an fbarray: a consistent view for several queries.
pub struct FbReadGuard<'a> {
    raw: Raw<'a>,
    _guard: Option<ReadGuard<'a>>,
}

/// Exclusive access to an fbarray: queries and updates without relocking, so
/// find-then-claim is atomic.
pub struct FbWriteGuard<'a> {
    raw: Raw<'a>,
    _guard: WriteGuard<'a>,
}

impl std::fmt::Debug for FbReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbReadGuard")
            .field("name", &self.name())
            .finish()
    }
}

impl std::fmt::Debug for FbWriteGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbWriteGuard")
            .field("name", &self.name())
            .finish()
    }
}

impl FbReadGuard<'_> {
    queries!();
    unlocked!();
}

impl FbWriteGuard<'_> {
    queries!();
    unlocked!();

    /// Marks element `idx` used. Errors (state unchanged) if it already is.
    pub fn set_used(&self, idx: u32) -> Result<()> {
        self.raw.set(idx, true)
    }

    /// Marks element `idx` free. Errors (state unchanged) if it already is
    /// (a double free).
    pub fn set_free(&self, idx: u32) -> Result<()> {
        self.raw.set(idx, false)
    }
}

impl<'a> FbArray<'a> {
    /// Bytes a region must have to hold an array of this shape.
    pub fn required_size(capacity: u32, elt_size: u32) -> Result<usize> {
        Ok(layout(capacity, elt_size)?.total)
    }

    /// Creates an empty array in `region` (zeroing the whole
    /// [`required_size`](Self::required_size) bytes) and returns a handle.
    ///
    /// # Safety
    ///
    /// `region` must be valid for reads and writes of `len` bytes for `'a`,
    /// and nobody may use those bytes during init except through another
    /// fbarray handle after init returns (other processes should attach only
    /// once this returned, e.g. after a handshake; attach checks the magic,
    /// which init stores last).
    pub unsafe fn init(
        region: *mut u8,
        len: usize,
        name: &str,
        capacity: u32,
        elt_size: u32,
    ) -> Result<FbArray<'a>> {
        let lay = layout(capacity, elt_size)?;
        check_name(name)?;
        let base = check_region(region)?;
        if len < lay.total {
            return Err(FbArrayError::RegionTooSmall {
                need: lay.total,
                have: len,
            });
        }
        // SAFETY: the caller gives us `len >= lay.total` writable bytes that
        // nobody else uses yet.
        unsafe { std::ptr::write_bytes(region, 0, lay.total) };
        let mut name_buf = [0u8; 64];
        name_buf[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: region is 8-aligned (checked) and large enough for the
        // Header; we own it exclusively during init.
        unsafe {
            base.cast::<Header>().write(Header {
                magic: AtomicU64::new(0),
                version: FBARRAY_VERSION,
                capacity,
                elt_size,
                used: AtomicU32::new(0),
                lock: RwLock::new(),
                name_len: name.len() as u32,
                bitmap_off: lay.bitmap_off as u64,
                data_off: lay.data_off as u64,
                total_size: lay.total as u64,
                reserved: 0,
                name: name_buf,
            });
        }
        let raw = Raw {
            base,
            capacity,
            elt_size,
            lay,
            _region: PhantomData,
        };
        // Release: attachers that see the magic (Acquire) see the header.
        raw.header().magic.store(FBARRAY_MAGIC, Ordering::Release);
        Ok(FbArray {
            raw,
            lock_free_reads: false,
        })
    }

    /// Attaches to an array another handle (maybe in another process)
    /// initialised in `region`, after checking its magic, version and layout
    /// against `len`.
    ///
    /// # Safety
    ///
    /// `region` must be valid for reads and writes of `len` bytes for `'a`,
    /// and those bytes must only be used through fbarray handles (element
    /// bytes excepted).
    pub unsafe fn attach(region: *mut u8, len: usize) -> Result<FbArray<'a>> {
        let base = check_region(region)?;
        if len < size_of::<Header>() {
            return Err(FbArrayError::RegionTooSmall {
                need: size_of::<Header>(),
                have: len,
            });
        }
        // SAFETY: region is aligned and holds at least a Header's bytes; its
        // fields are plain integers (any bit pattern is valid) or atomics.
        let h = unsafe { base.cast::<Header>().as_ref() };
        // Acquire: pairs with init's Release store of the magic.
        let magic = h.magic.load(Ordering::Acquire);
        if magic != FBARRAY_MAGIC || h.version != FBARRAY_VERSION {
            return Err(FbArrayError::BadMagic {
                found: magic,
                version: h.version,
            });
        }
        let lay = layout(h.capacity, h.elt_size).map_err(|e| FbArrayError::Corrupt {
            detail: format!("shape: {e}"),
        })?;
        if h.bitmap_off != lay.bitmap_off as u64
            || h.data_off != lay.data_off as u64
            || h.total_size != lay.total as u64
        {
            return Err(FbArrayError::Corrupt {
                detail: format!(
                    "offsets bitmap {} data {} total {} do not match capacity {} x {} bytes \
                     (expected {} {} {})",
                    h.bitmap_off,
                    h.data_off,
                    h.total_size,
                    h.capacity,
                    h.elt_size,
                    lay.bitmap_off,
                    lay.data_off,
                    lay.total
                ),
            });
        }
        if h.name_len as usize > NAME_MAX
            || std::str::from_utf8(&h.name[..h.name_len as usize]).is_err()
        {
            return Err(FbArrayError::Corrupt {
                detail: format!("name length {} or bytes invalid", h.name_len),
            });
        }
        if len < lay.total {
            return Err(FbArrayError::RegionTooSmall {
                need: lay.total,
                have: len,
            });
        }
        Ok(FbArray {
            raw: Raw {
                base,
                capacity: h.capacity,
                elt_size: h.elt_size,
                lay,
                _region: PhantomData,
            },
            lock_free_reads: false,
        })
    }

    unlocked!();

    /// Takes the read lock: a consistent view for several queries. (A
    /// view made by [`attach_lock_free`](Self::attach_lock_free) reads
    /// without it: each word is read atomically, the view across words may
    /// be mid-update.)
    pub fn read_lock(&self) -> FbReadGuard<'a> {
        FbReadGuard {
            raw: self.raw,
            _guard: (!self.lock_free_reads).then(|| self.raw.header().lock.read()),
        }
    }

    /// Like [`attach`](Self::attach), for a reader that must never hold the
    /// shared lock (a secondary process): its reads take no lock.
    ///
    /// # Safety
    /// As [`attach`](Self::attach).
    pub unsafe fn attach_lock_free(region: *mut u8, len: usize) -> Result<FbArray<'a>> {
        // SAFETY: forwarded from the caller.
        let mut a = unsafe { Self::attach(region, len) }?;
        a.lock_free_reads = true;
        Ok(a)
    }

    /// Takes the write lock: queries and updates as one atomic step.
    pub fn write_lock(&self) -> FbWriteGuard<'a> {
        FbWriteGuard {
            raw: self.raw,
            _guard: self.raw.header().lock.write(),
        }
    }

    /// Takes the read lock, or reports who holds the write lock after
    /// `timeout` (or as soon as that writer is seen dead).
    pub fn read_lock_timeout(&self, timeout: Duration) -> Result<FbReadGuard<'a>> {
        let guard = self
            .raw
            .header()
            .lock
            .read_timeout(timeout)
            .map_err(|source| self.lock_err(source))?;
        Ok(FbReadGuard {
            raw: self.raw,
            _guard: Some(guard),
        })
    }

    /// Takes the write lock, or reports who holds the lock after `timeout`
    /// (or as soon as the writer holding it is seen dead).
    pub fn write_lock_timeout(&self, timeout: Duration) -> Result<FbWriteGuard<'a>> {
        let guard = self
            .raw
            .header()
            .lock
            .write_timeout(timeout)
            .map_err(|source| self.lock_err(source))?;
        Ok(FbWriteGuard {
            raw: self.raw,
            _guard: guard,
        })
    }

    /// The array's lock, for inspection ([`RwLock::writer_pid`],
    /// [`RwLock::is_owner_dead`]) and recovery
    /// ([`RwLock::take_over_dead_writer`]; the bitmap and count may then
    /// disagree, see [`FbArray::recount`]).
    pub fn lock(&self) -> &'a RwLock {
        &self.raw.header().lock
    }

    fn lock_err(&self, source: LockError) -> FbArrayError {
        FbArrayError::Lock {
            name: self.name().to_owned(),
            source,
        }
    }

    /// Marks element `idx` used (takes the write lock). Errors, state
    /// unchanged, if it already is.
    pub fn set_used(&self, idx: u32) -> Result<()> {
        self.write_lock().set_used(idx)
    }

    /// Marks element `idx` free (takes the write lock). Errors, state
    /// unchanged, if it already is (a double free).
    pub fn set_free(&self, idx: u32) -> Result<()> {
        self.write_lock().set_free(idx)
    }

    /// Recomputes the used count from the bitmap (under the write guard
    /// given), e.g. after taking the lock over from a dead writer. Returns
    /// the count.
    pub fn recount(guard: &FbWriteGuard<'_>) -> u32 {
        let n: u32 = guard
            .raw
            .words()
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        guard.raw.header().used.store(n, Ordering::Relaxed);
        n
    }
}

/// Mirrors of the guard queries that take the read lock per call.
impl FbArray<'_> {
    /// Whether element `idx` is used.
    pub fn is_used(&self, idx: u32) -> Result<bool> {
        self.read_lock().is_used(idx)
    }
    /// See [`FbReadGuard::find_next_free`].
    pub fn find_next_free(&self, start: u32) -> Result<Option<u32>> {
        self.read_lock().find_next_free(start)
    }
    /// See [`FbReadGuard::find_next_used`].
    pub fn find_next_used(&self, start: u32) -> Result<Option<u32>> {
        self.read_lock().find_next_used(start)
    }
    /// See [`FbReadGuard::find_prev_free`].
    pub fn find_prev_free(&self, start: u32) -> Result<Option<u32>> {
        self.read_lock().find_prev_free(start)
    }
    /// See [`FbReadGuard::find_prev_used`].
    pub fn find_prev_used(&self, start: u32) -> Result<Option<u32>> {
        self.read_lock().find_prev_used(start)
    }
    /// See [`FbReadGuard::find_next_n_free`].
    pub fn find_next_n_free(&self, start: u32, n: u32) -> Result<Option<u32>> {
        self.read_lock().find_next_n_free(start, n)
    }
    /// See [`FbReadGuard::find_next_n_used`].
    pub fn find_next_n_used(&self, start: u32, n: u32) -> Result<Option<u32>> {
        self.read_lock().find_next_n_used(start, n)
    }
    /// See [`FbReadGuard::find_prev_n_free`].
    pub fn find_prev_n_free(&self, start: u32, n: u32) -> Result<Option<u32>> {
        self.read_lock().find_prev_n_free(start, n)
    }
    /// See [`FbReadGuard::find_prev_n_used`].
    pub fn find_prev_n_used(&self, start: u32, n: u32) -> Result<Option<u32>> {
        self.read_lock().find_prev_n_used(start, n)
    }
    /// See [`FbReadGuard::find_contig_free`].
    pub fn find_contig_free(&self, start: u32) -> Result<u32> {
        self.read_lock().find_contig_free(start)
    }
    /// See [`FbReadGuard::find_contig_used`].
    pub fn find_contig_used(&self, start: u32) -> Result<u32> {
        self.read_lock().find_contig_used(start)
    }
    /// See [`FbReadGuard::find_rev_contig_free`].
    pub fn find_rev_contig_free(&self, start: u32) -> Result<u32> {
        self.read_lock().find_rev_contig_free(start)
    }
    /// See [`FbReadGuard::find_rev_contig_used`].
    pub fn find_rev_contig_used(&self, start: u32) -> Result<u32> {
        self.read_lock().find_rev_contig_used(start)
    }
    /// See [`FbReadGuard::find_biggest_free`].
    pub fn find_biggest_free(&self, start: u32) -> Result<Option<(u32, u32)>> {
        self.read_lock().find_biggest_free(start)
    }
    /// See [`FbReadGuard::find_biggest_used`].
    pub fn find_biggest_used(&self, start: u32) -> Result<Option<(u32, u32)>> {
        self.read_lock().find_biggest_used(start)
    }
}

fn check_region(region: *mut u8) -> Result<NonNull<u8>> {
    let base = NonNull::new(region).ok_or(FbArrayError::Misaligned {
        addr: 0,
        align: REGION_ALIGN,
    })?;
    if region as usize % REGION_ALIGN != 0 {
        return Err(FbArrayError::Misaligned {
            addr: region as usize,
            align: REGION_ALIGN,
        });
    }
    Ok(base)
}

/// An fbarray in a memfd of its own, mapped shared: safe to create, and
/// shareable with other processes by passing [`fd`](Self::fd) (SCM_RIGHTS,
/// inheritance, or `/proc/<pid>/fd/<n>`) to [`OwnedFbArray::from_fd`].
pub struct OwnedFbArray {
    fd: rustix::fd::OwnedFd,
    base: NonNull<u8>,
    len: usize,
    raw: Raw<'static>,
}

// SAFETY: the mapping is owned by this value and only reached through `raw`
// (see Raw's Send/Sync) until Drop unmaps it.
unsafe impl Send for OwnedFbArray {}
// SAFETY: as for Send.
unsafe impl Sync for OwnedFbArray {}

impl std::fmt::Debug for OwnedFbArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedFbArray")
            .field("array", &self.array())
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl OwnedFbArray {
    /// Creates a memfd (`memplane-fbarray:<name>`) of the required size,
    /// maps it shared and initialises an empty array in it.
    pub fn new(name: &str, capacity: u32, elt_size: u32) -> Result<Self> {
        let need = FbArray::required_size(capacity, elt_size)?;
        check_name(name)?;
        let map_err = |action, e: rustix::io::Errno| FbArrayError::Map {
            name: name.to_owned(),
            action,
            source: e.into(),
        };
        let fd = rustix::fs::memfd_create(
            format!("memplane-fbarray:{name}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(|e| map_err("memfd_create", e))?;
        rustix::fs::ftruncate(&fd, need as u64).map_err(|e| map_err("ftruncate", e))?;
        let base = map_shared(&fd, need).map_err(|e| map_err("mmap", e))?;
        // SAFETY: the fresh mapping is valid for `need` bytes until Drop
        // unmaps it, and nobody else knows the memfd yet.
        let arr = unsafe { FbArray::init(base.as_ptr(), need, name, capacity, elt_size) };
        Self::finish(fd, base, need, arr)
    }

    /// Maps an fbarray memfd created by [`OwnedFbArray::new`] (maybe in
    /// another process) and attaches to it.
    pub fn from_fd(fd: rustix::fd::OwnedFd) -> Result<Self> {
        let map_err = |action, e: rustix::io::Errno| FbArrayError::Map {
            name: String::new(),
            action,
            source: e.into(),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| map_err("fstat", e))?;
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if len < size_of::<Header>() {
            return Err(FbArrayError::RegionTooSmall {
                need: size_of::<Header>(),
                have: len,
            });
        }
        let base = map_shared(&fd, len).map_err(|e| map_err("mmap", e))?;
        // SAFETY: the mapping is valid for `len` bytes until Drop unmaps it;
        // its bytes are only used through fbarray handles.
        let arr = unsafe { FbArray::attach(base.as_ptr(), len) };
        Self::finish(fd, base, len, arr)
    }

    fn finish(
        fd: rustix::fd::OwnedFd,
        base: NonNull<u8>,
        len: usize,
        arr: Result<FbArray<'static>>,
    ) -> Result<Self> {
        match arr {
            Ok(a) => Ok(Self {
                fd,
                base,
                len,
                raw: a.raw,
            }),
            Err(e) => {
                // SAFETY: we mapped [base, base+len) and nothing refers to it.
                let _ = unsafe { rustix::mm::munmap(base.as_ptr().cast(), len) };
                Err(e)
            }
        }
    }

    /// The array.
    pub fn array(&self) -> FbArray<'_> {
        FbArray {
            raw: self.raw,
            lock_free_reads: false,
        }
    }

    /// The memfd backing the array.
    pub fn fd(&self) -> rustix::fd::BorrowedFd<'_> {
        use rustix::fd::AsFd;
        self.fd.as_fd()
    }
}

impl Drop for OwnedFbArray {
    fn drop(&mut self) {
        // SAFETY: we mapped [base, base+len); every FbArray borrowed from us
        // has ended (they borrow &self).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn map_shared(fd: &rustix::fd::OwnedFd, len: usize) -> rustix::io::Result<NonNull<u8>> {
    use rustix::mm::{MapFlags, ProtFlags};
    // SAFETY: a fresh shared mapping at a kernel-chosen address: it cannot
    // overlap any Rust object.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    NonNull::new(p.cast::<u8>()).ok_or(rustix::io::Errno::NOMEM)
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::many_single_char_names)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious O(n) model.
    struct Model(Vec<bool>);

    impl Model {
        fn next(&self, start: u32, used: bool) -> Option<u32> {
            (start..self.0.len() as u32).find(|&i| self.0[i as usize] == used)
        }
        fn prev(&self, start: u32, used: bool) -> Option<u32> {
            (0..=start).rev().find(|&i| self.0[i as usize] == used)
        }
        fn run_at(&self, i: u32, n: u32, used: bool) -> bool {
            (i..i + n).all(|j| self.0.get(j as usize) == Some(&used))
        }
        fn next_n(&self, start: u32, n: u32, used: bool) -> Option<u32> {
            (start..self.0.len() as u32).find(|&i| self.run_at(i, n, used))
        }
        fn prev_n(&self, start: u32, n: u32, used: bool) -> Option<u32> {
            // Highest run lying entirely at or below start.
            (0..=start)
                .rev()
                .find(|&i| i + n - 1 <= start && self.run_at(i, n, used))
        }
        fn contig(&self, start: u32, used: bool) -> u32 {
            (start..self.0.len() as u32)
                .take_while(|&i| self.0[i as usize] == used)
                .count() as u32
        }
        fn rev_contig(&self, start: u32, used: bool) -> u32 {
            (0..=start)
                .rev()
                .take_while(|&i| self.0[i as usize] == used)
                .count() as u32
        }
        fn biggest(&self, start: u32, used: bool) -> Option<(u32, u32)> {
            let mut best: Option<(u32, u32)> = None;
            let mut i = start;
            while (i as usize) < self.0.len() {
                let l = self.contig(i, used);
                if l > 0 {
                    if best.is_none_or(|(_, bl)| l > bl) {
                        best = Some((i, l));
                    }
                    i += l;
                } else {
                    i += 1;
                }
            }
            best
        }
        fn count(&self) -> u32 {
            self.0.iter().filter(|&&b| b).count() as u32
        }
    }

    fn check_all(a: &FbArray<'_>, m: &Model, start: u32, n: u32) {
        let cap = a.capacity();
        assert_eq!(a.count_used(), m.count());
        if start >= cap {
            assert!(matches!(
                a.find_next_free(start),
                Err(FbArrayError::IndexOutOfRange { .. })
            ));
            assert!(a.find_biggest_used(start).is_err());
            assert!(a.find_rev_contig_free(start).is_err());
            return;
        }
        let g = a.read_lock();
        for used in [false, true] {
            let (next, prev, contig, rev, big) = if used {
                (
                    g.find_next_used(start),
                    g.find_prev_used(start),
                    g.find_contig_used(start),
                    g.find_rev_contig_used(start),
                    g.find_biggest_used(start),
                )
            } else {
                (
                    g.find_next_free(start),
                    g.find_prev_free(start),
                    g.find_contig_free(start),
                    g.find_rev_contig_free(start),
                    g.find_biggest_free(start),
                )
            };
            assert_eq!(next.unwrap(), m.next(start, used), "next {used} {start}");
            assert_eq!(prev.unwrap(), m.prev(start, used), "prev {used} {start}");
            assert_eq!(contig.unwrap(), m.contig(start, used), "contig {used}");
            assert_eq!(rev.unwrap(), m.rev_contig(start, used), "rev {used}");
            assert_eq!(big.unwrap(), m.biggest(start, used), "biggest {used}");
            let (nn, pn) = if used {
                (g.find_next_n_used(start, n), g.find_prev_n_used(start, n))
            } else {
                (g.find_next_n_free(start, n), g.find_prev_n_free(start, n))
            };
            if n == 0 || n > cap {
                assert!(matches!(nn, Err(FbArrayError::BadRunLength { .. })));
                assert!(matches!(pn, Err(FbArrayError::BadRunLength { .. })));
            } else {
                assert_eq!(
                    nn.unwrap(),
                    m.next_n(start, n, used),
                    "next_n {used} {start} {n}"
                );
                assert_eq!(
                    pn.unwrap(),
                    m.prev_n(start, n, used),
                    "prev_n {used} {start} {n}"
                );
            }
        }
        assert_eq!(g.is_used(start).unwrap(), m.0[start as usize]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u32),
        Free(u32),
        /// Set a run [a, a+len).
        SetRun(u32, u32),
        /// Free a run.
        FreeRun(u32, u32),
        Query(u32, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u32>().prop_map(Op::Set),
            2 => any::<u32>().prop_map(Op::Free),
            1 => (any::<u32>(), 1u32..200).prop_map(|(a, l)| Op::SetRun(a, l)),
            1 => (any::<u32>(), 1u32..200).prop_map(|(a, l)| Op::FreeRun(a, l)),
            3 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Query(a, b)),
        ]
    }

    fn capacity() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(1u32),
            Just(63),
            Just(64),
            Just(65),
            Just(128),
            Just(1000),
            1u32..300
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn model_based(cap in capacity(), ops in prop::collection::vec(op(), 1..120)) {
            let owned = OwnedFbArray::new("model", cap, 8).unwrap();
            let a = owned.array();
            let mut m = Model(vec![false; cap as usize]);
            // Indices slightly past the end exercise the range errors.
            let idx = |x: u32| x % (cap + 2);
            for op in ops {
                match op {
                    Op::Set(x) | Op::Free(x) => {
                        let i = idx(x);
                        let used = matches!(op, Op::Set(_));
                        let r = if used { a.set_used(i) } else { a.set_free(i) };
                        if i >= cap {
                            prop_assert!(matches!(r, Err(FbArrayError::IndexOutOfRange { .. })), "{r:?}");
                        } else if m.0[i as usize] == used {
                            prop_assert!(matches!(r, Err(FbArrayError::AlreadyUsed { .. } | FbArrayError::AlreadyFree { .. })), "{r:?}");
                        } else {
                            r.unwrap();
                            m.0[i as usize] = used;
                        }
                    }
                    Op::SetRun(x, l) | Op::FreeRun(x, l) => {
                        let used = matches!(op, Op::SetRun(..));
                        let g = a.write_lock();
                        for i in (x % cap)..(x % cap + l).min(cap) {
                            if m.0[i as usize] != used {
                                if used { g.set_used(i).unwrap() } else { g.set_free(i).unwrap() }
                                m.0[i as usize] = used;
                            }
                        }
                    }
                    Op::Query(s, n) => check_all(&a, &m, idx(s), n % (cap + 2)),
                }
                prop_assert_eq!(a.count_used(), m.count());
            }
            // A final sweep of every start with a few run lengths.
            let step = (cap / 40).max(1) as usize;
            for s in (0..cap).step_by(step).chain([cap - 1]) {
                for n in [1, 2, 63, 64, 65, cap] {
                    check_all(&a, &m, s, n.min(cap));
                }
            }
        }
    }

    #[test]
    fn bad_input_is_typed_and_changes_nothing() {
        assert!(matches!(
            FbArray::required_size(0, 8),
            Err(FbArrayError::ZeroCapacity)
        ));
        assert!(matches!(
            FbArray::required_size(8, 0),
            Err(FbArrayError::ZeroEltSize)
        ));
        assert!(matches!(
            OwnedFbArray::new(&"x".repeat(64), 8, 8),
            Err(FbArrayError::NameTooLong { len: 64, .. })
        ));
        assert!(OwnedFbArray::new(&"x".repeat(63), 8, 8).is_ok());
        assert!(matches!(
            OwnedFbArray::new("a\0b", 8, 8),
            Err(FbArrayError::BadName { .. })
        ));
        let need = FbArray::required_size(100, 16).unwrap();
        assert_eq!(need, 128 + 64 + 1600);
        let mut buf = vec![0u64; need / 8 + 1];
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` outlives every handle below and is only used by them.
        unsafe {
            assert!(matches!(
                FbArray::init(p, need - 1, "t", 100, 16),
                Err(FbArrayError::RegionTooSmall { .. })
            ));
            assert!(matches!(
                FbArray::init(p.add(1), need, "t", 100, 16),
                Err(FbArrayError::Misaligned { .. })
            ));
            assert!(matches!(
                FbArray::attach(p, need),
                Err(FbArrayError::BadMagic { found: 0, .. })
            ));
            let a = FbArray::init(p, need, "t", 100, 16).unwrap();
            assert_eq!(a.name(), "t");
            a.set_used(5).unwrap();
            assert!(matches!(
                a.set_used(5),
                Err(FbArrayError::AlreadyUsed { idx: 5 })
            ));
            assert!(matches!(
                a.set_free(6),
                Err(FbArrayError::AlreadyFree { idx: 6 })
            ));
            assert!(matches!(
                a.set_used(100),
                Err(FbArrayError::IndexOutOfRange {
                    idx: 100,
                    capacity: 100
                })
            ));
            assert!(matches!(
                a.find_next_n_free(0, 0),
                Err(FbArrayError::BadRunLength { n: 0, .. })
            ));
            assert!(matches!(
                a.find_next_n_free(0, 101),
                Err(FbArrayError::BadRunLength { n: 101, .. })
            ));
            assert_eq!(a.count_used(), 1);
            assert!(a.is_used(5).unwrap() && !a.is_used(6).unwrap());
            // Attach sees the same state; a short region is refused.
            let b = FbArray::attach(p, need).unwrap();
            assert_eq!((b.capacity(), b.elt_size(), b.count_used()), (100, 16, 1));
            assert!(matches!(
                FbArray::attach(p, need - 1),
                Err(FbArrayError::RegionTooSmall { .. })
            ));
            // Element pointers.
            let e = a.get_ptr::<u128>(7).unwrap();
            e.as_ptr().write(42);
            assert_eq!(b.get_ptr::<u128>(7).unwrap().as_ptr().read(), 42);
            assert_eq!(b.find_idx(e.as_ptr().cast::<u8>().add(15)), Some(7));
            assert_eq!(b.find_idx(p), None);
            assert!(matches!(
                a.get_ptr::<[u8; 17]>(0),
                Err(FbArrayError::TypeTooLarge { .. })
            ));
            // A corrupted header is refused.
            p.add(16).write(17); // elt_size 16 -> 17 (little-endian low byte)
            assert!(matches!(
                FbArray::attach(p, need),
                Err(FbArrayError::Corrupt { .. })
            ));
        }
        drop(buf);
    }

    #[test]
    fn large_capacity_is_o_words() {
        // 2^24 elements of 1 byte: searches across a 2 MiB bitmap.
        let owned = OwnedFbArray::new("big", 1 << 24, 1).unwrap();
        let a = owned.array();
        let g = a.write_lock();
        g.set_used((1 << 24) - 1).unwrap();
        assert_eq!(g.find_next_used(0).unwrap(), Some((1 << 24) - 1));
        assert_eq!(
            g.find_prev_free((1 << 24) - 1).unwrap(),
            Some((1 << 24) - 2)
        );
        assert_eq!(g.find_biggest_free(0).unwrap(), Some((0, (1 << 24) - 1)));
        assert_eq!(g.find_next_n_used(0, 2).unwrap(), None);
        assert_eq!(
            g.find_prev_n_free((1 << 24) - 1, 1 << 20).unwrap(),
            Some((1 << 24) - 1 - (1 << 20))
        );
    }
}

/// Multi-process tests: the test binary re-runs itself as the child, with
/// `MEMPLANE_FB_CHILD` selecting the role and `MEMPLANE_FB_REGION` naming
/// `/proc/<parent>/fd/<n>` of the shared memfd.
#[cfg(all(test, not(loom)))]
#[allow(clippy::many_single_char_names)]
mod mp_tests {
    use super::*;
    use crate::shm::lock::{LockError, SpinLock};
    use rustix::fd::{AsRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::sync::atomic::AtomicU32;
    use std::time::Instant;

    const CAP: u32 = 3000;
    /// Region: [0..4) SpinLock, [4..8) "child ready" flag, [64..) fbarray.
    const FB_OFF: usize = 64;

    struct Region {
        _fd: OwnedFd,
        path: String,
        base: NonNull<u8>,
        len: usize,
    }

    impl Region {
        fn create() -> Region {
            let len = FB_OFF + FbArray::required_size(CAP, 8).unwrap();
            let fd =
                rustix::fs::memfd_create("fbarray-mp", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&fd, len as u64).unwrap();
            let base = map_shared(&fd, len).unwrap();
            let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
            Region {
                _fd: fd,
                path,
                base,
                len,
            }
        }

        fn open(path: &str) -> Region {
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap()
                .into();
            let len = rustix::fs::fstat(&fd).unwrap().st_size as usize;
            let base = map_shared(&fd, len).unwrap();
            Region {
                _fd: fd,
                path: path.to_owned(),
                base,
                len,
            }
        }

        fn spin(&self) -> &SpinLock {
            // SAFETY: offset 0 is 4-aligned inside the mapping, which lives as
            // long as `self`; zeroed memory is an unlocked SpinLock.
            unsafe { self.base.cast::<SpinLock>().as_ref() }
        }

        fn ready(&self) -> &AtomicU32 {
            // SAFETY: offset 4 is 4-aligned inside the mapping.
            unsafe { self.base.add(4).cast::<AtomicU32>().as_ref() }
        }

        fn init_fb(&self) -> FbArray<'_> {
            // SAFETY: the mapping is valid for `len` bytes while `self` lives
            // and the fbarray bytes are only used through handles.
            unsafe {
                FbArray::init(
                    self.base.as_ptr().add(FB_OFF),
                    self.len - FB_OFF,
                    "mp",
                    CAP,
                    8,
                )
            }
            .unwrap()
        }

        fn attach_fb(&self) -> FbArray<'_> {
            // SAFETY: as in init_fb.
            unsafe { FbArray::attach(self.base.as_ptr().add(FB_OFF), self.len - FB_OFF) }.unwrap()
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: we mapped it; nothing borrowed from `self` outlives it.
            let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }

    fn spawn_child(role: &str, region: &Region) -> std::process::Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fbarray::mp_tests::child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MEMPLANE_FB_CHILD", role)
            .env("MEMPLANE_FB_REGION", &region.path)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Claims free slots until the array is full, tagging each element with
    /// `tag`; returns how many it claimed.
    fn claim_all(region: &Region, a: &FbArray<'_>, tag: u64) -> u32 {
        let mut mine = 0;
        loop {
            let g = a.write_lock();
            let Some(i) = g.find_next_free(0).unwrap() else {
                return mine;
            };
            g.set_used(i).unwrap();
            // SAFETY: element i was free and is claimed under the write lock;
            // nobody else writes it.
            unsafe { g.get_ptr::<u64>(i).unwrap().as_ptr().write(tag) };
            drop(g);
            mine += 1;
            // Also exercise the spinlock across processes: a plain
            // read-modify-write of a shared counter.
            let s = region.spin().lock();
            // SAFETY: offset 8 is 8-aligned in the mapping; only accessed
            // under the spinlock.
            unsafe {
                let c = region.base.add(8).cast::<u64>().as_ptr();
                c.write_volatile(c.read_volatile() + 1);
            }
            drop(s);
        }
    }

    /// Not a test of its own: the body the child process runs.
    #[test]
    fn child_entry() {
        let Ok(role) = std::env::var("MEMPLANE_FB_CHILD") else {
            return;
        };
        let region = Region::open(&std::env::var("MEMPLANE_FB_REGION").unwrap());
        let a = region.attach_fb();
        match role.as_str() {
            "claim" => {
                region.ready().store(1, Ordering::Release);
                claim_all(&region, &a, 2);
            }
            "die-holding" => {
                let _s = region.spin().lock();
                let _w = a.write_lock();
                region.ready().store(1, Ordering::Release);
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            other => panic!("unknown child role {other}"),
        }
    }

    #[test]
    fn two_processes_claim_disjoint_slots() {
        let region = Region::create();
        let a = region.init_fb();
        let mut child = spawn_child("claim", &region);
        let t0 = Instant::now();
        while region.ready().load(Ordering::Acquire) == 0 && t0.elapsed() < Duration::from_secs(30)
        {
            std::thread::yield_now();
        }
        let mine = claim_all(&region, &a, 1);
        assert!(child.wait().unwrap().success(), "child failed");
        assert_eq!(a.count_used(), CAP);
        let (mut ones, mut twos) = (0, 0);
        for i in 0..CAP {
            // SAFETY: all writers are done (child exited, we are alone).
            match unsafe { a.get_ptr::<u64>(i).unwrap().as_ptr().read() } {
                1 => ones += 1,
                2 => twos += 1,
                t => panic!("element {i} has tag {t}"),
            }
        }
        assert_eq!(ones, mine);
        assert_eq!(ones + twos, CAP);
        // SAFETY: the child exited; nobody else touches the counter.
        let spun = unsafe { region.base.add(8).cast::<u64>().as_ptr().read() };
        assert_eq!(spun, u64::from(CAP));
        eprintln!("parent claimed {ones}, child {twos}");
    }

    #[test]
    fn dead_holder_is_reported_with_its_pid() {
        let region = Region::create();
        let a = region.init_fb();
        let mut child = spawn_child("die-holding", &region);
        let pid = child.id();
        let t0 = Instant::now();
        while region.ready().load(Ordering::Acquire) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "child never locked");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Alive: a timeout names it.
        assert_eq!(region.spin().holder_pid(), Some(pid));
        assert_eq!(a.lock().writer_pid(), Some(pid));
        match a.write_lock_timeout(Duration::from_millis(100)) {
            Err(FbArrayError::Lock {
                source: LockError::Timeout { holder, .. },
                ..
            }) => assert_eq!(holder, crate::shm::lock::Holder::Process(pid)),
            other => panic!("expected a timeout, got {other:?}"),
        }
        child.kill().unwrap(); // SIGKILL
                               // Wait with a generous timeout: the error must come long before it,
                               // both for the zombie and, after reaping, for the gone process.
        let t1 = Instant::now();
        let e = region
            .spin()
            .lock_timeout(Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(e, LockError::OwnerDead { pid });
        assert!(t1.elapsed() < Duration::from_secs(5));
        child.wait().unwrap();
        match a.read_lock_timeout(Duration::from_secs(60)) {
            Err(FbArrayError::Lock {
                source: LockError::OwnerDead { pid: p },
                ..
            }) => assert_eq!(p, pid),
            other => panic!("expected OwnerDead, got {other:?}"),
        }
        assert!(a.lock().is_owner_dead() && region.spin().is_owner_dead());
        // Recovery.
        drop(region.spin().take_over_dead_owner().unwrap());
        let w = a.lock().take_over_dead_writer().unwrap();
        drop(w);
        a.set_used(1).unwrap();
        assert_eq!(a.count_used(), 1);
    }
}
