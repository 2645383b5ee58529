//! "Memory a ring lives in": the [`RingMemory`] trait and a few providers.
//!
//! A memzone will implement [`RingMemory`] later; until then rings live in
//! [`HeapRegion`] (process-private, for tests and models), [`MmapRegion`]
//! (anonymous shared memory or any mappable fd, e.g. a hugetlb memfd from
//! [`memfd_hugetlb`]) or a caller-vouched [`RawRegion`].

use core::ptr::NonNull;
use std::os::fd::{AsFd, OwnedFd};

use crate::RingError;

/// A contiguous memory region a ring can live in.
///
/// # Safety
///
/// Implementors guarantee that:
/// - [`as_ptr`](Self::as_ptr) returns the same pointer for the value's whole
///   life, valid for reads and writes of [`len`](Self::len) bytes, and stays
///   valid when the value is moved;
/// - while a ring handle owns the value, the bytes are accessed only through
///   ring handles (in this or other processes that map the same memory);
/// - nobody initialises a ring in memory that ring handles elsewhere still use.
pub unsafe trait RingMemory {
    /// Start of the region in this process.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// True if the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Zeroed, 128-byte aligned heap memory. Process-private: for tests, loom
/// models and single-process rings.
pub struct HeapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl HeapRegion {
    const ALIGN: usize = 128;

    /// Allocates `len` zeroed bytes.
    pub fn new(len: usize) -> Result<Self, RingError> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .map_err(|_| RingError::Invalid("heap region length overflows"))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(RingError::Os {
            op: "heap allocation",
            errno: rustix::io::Errno::NOMEM,
        })?;
        Ok(Self { ptr, len })
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), Self::ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: HeapRegion owns its allocation exclusively; the pointer is stable
// across moves and valid for `len` bytes until drop.
unsafe impl RingMemory for HeapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: the region is plain memory; concurrent access goes through the
// ring's atomics.
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

/// A `MAP_SHARED` mapping, unmapped on drop.
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl MmapRegion {
    /// Anonymous shared memory (shared with children forked after this call).
    pub fn anonymous(len: usize) -> Result<Self, RingError> {
        if len == 0 {
            return Err(RingError::Invalid("zero-length mapping"));
        }
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address
        // aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }
        .map_err(|errno| RingError::Os {
            op: "mmap(MAP_ANONYMOUS|MAP_SHARED)",
            errno,
        })?;
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or(RingError::Invalid("mmap returned NULL"))?,
            len,
        })
    }

    /// Maps `len` bytes of `fd` from offset 0, shared.
    ///
    /// # Safety
    ///
    /// Every other mapping of the same file (in this or another process) must
    /// only be used through ring handles, and a ring must not be initialised
    /// in this mapping while handles on another mapping of it are in use.
    pub unsafe fn map_fd(fd: impl AsFd, len: usize) -> Result<Self, RingError> {
        if len == 0 {
            return Err(RingError::Invalid("zero-length mapping"));
        }
        // SAFETY: kernel-chosen address, so no existing mapping is replaced;
        // aliasing with other mappings of the file is the caller's contract.
        let p = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(|errno| RingError::Os {
            op: "mmap(MAP_SHARED) of fd",
            errno,
        })?;
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or(RingError::Invalid("mmap returned NULL"))?,
            len,
        })
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: this mapping was created by us with this length and is
        // unmapped exactly once; no ring handle outlives the region it owns.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is owned by this value, stable across moves, valid for
// `len` bytes until drop.
unsafe impl RingMemory for MmapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: shared memory accessed through atomics.
unsafe impl Send for MmapRegion {}
// SAFETY: as above.
unsafe impl Sync for MmapRegion {}

/// Memory described by a pointer and a length, owned by someone else
/// (a memzone, a static buffer). Nothing is freed on drop.
pub struct RawRegion {
    ptr: NonNull<u8>,
    len: usize,
}

impl RawRegion {
    /// Wraps `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as
    /// the returned value (and any ring built on it) lives, and the
    /// [`RingMemory`] contract must hold for it.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len }
    }
}

// SAFETY: the constructor's contract is the trait's contract.
unsafe impl RingMemory for RawRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}
// SAFETY: shared memory accessed through atomics.
unsafe impl Send for RawRegion {}
// SAFETY: as above.
unsafe impl Sync for RawRegion {}

/// Size of a 2 MiB hugepage.
pub const HUGE_2M: usize = 2 << 20;

/// Creates a hugetlb (2 MiB pages) memfd of at least `len` bytes (rounded up
/// to whole pages) and reserves its pages up front, so a shortage is an error
/// here rather than SIGBUS later. With `inheritable`, the fd survives `exec`
/// (no `FD_CLOEXEC`), so a child process can map it.
pub fn memfd_hugetlb(
    name: &str,
    len: usize,
    inheritable: bool,
) -> Result<(OwnedFd, usize), RingError> {
    use rustix::fs::MemfdFlags;
    let len = len
        .checked_add(HUGE_2M - 1)
        .ok_or(RingError::Invalid("length overflows"))?
        & !(HUGE_2M - 1);
    let mut flags = MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    if !inheritable {
        flags |= MemfdFlags::CLOEXEC;
    }
    let fd = rustix::fs::memfd_create(name, flags).map_err(|errno| RingError::Os {
        op: "memfd_create(MFD_HUGETLB|MFD_HUGE_2MB)",
        errno,
    })?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(|errno| RingError::Os {
        op: "ftruncate(hugetlb memfd)",
        errno,
    })?;
    rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, len as u64).map_err(
        |errno| RingError::Os {
            op: "fallocate(hugetlb memfd): not enough free 2 MiB hugepages?",
            errno,
        },
    )?;
    Ok((fd, len))
}
