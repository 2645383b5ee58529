//! [`HeapAllocator`]: the heap as an `allocator_api2` [`Allocator`], so
//! collections (`allocator_api2::vec::Vec`, `hashbrown::HashMap`, ...) can
//! keep their memory in hugepages.

use std::alloc::Layout;
use std::fmt;
use std::ptr::{self, NonNull};

use allocator_api2::alloc::{AllocError, Allocator};

use super::{AllocRequest, SOCKET_ID_ANY};
use crate::Memory;

/// An [`Allocator`] over the malloc heap of one instance: a `&Memory` and a
/// socket id, `Copy`, and tied to the instance by its lifetime (a
/// collection using it cannot outlive the [`Memory`]).
///
/// - `allocate` is [`heap_alloc`](crate::Instance::heap_alloc) with the
///   layout's alignment;
///   `allocate_zeroed` asks for zeroed memory (the heap's `zmalloc`: fresh
///   pages are not cleared twice).
/// - `grow`/`shrink` are [`realloc_socket`](crate::Instance::realloc_socket):
///   in place when the block
///   is suitably aligned and the next element is free, else moved (any
///   alignment is honoured). The heap grows by mapping pages as needed and
///   gives whole pages back as soon as they are unused.
/// - Zero-sized layouts never touch the heap (a dangling, aligned pointer).
/// - Failure is [`AllocError`]; the collection decides (the `try_*`
///   methods return it, the others call `handle_alloc_error`).
///
/// The returned blocks are exactly the layout's size (the heap rounds up
/// to 64 bytes internally, but does not advertise it).
///
/// # Example
///
/// ```no_run
/// use allocator_api2::vec::Vec;
/// use memplane::heap::HeapAllocator;
/// use memplane::{MemOptions, Memory};
///
/// let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-alloc"])?)?;
/// let mut v: Vec<u64, _> = Vec::new_in(HeapAllocator::new(&mem));
/// v.extend(0..1_000_000u64);                  // 8 MB on 2 MiB pages
/// assert!(mem.heap_stats(0)?.alloc_count >= 1);
/// drop(v);
/// assert_eq!(mem.heap_stats(0)?.alloc_count, 0);
/// # Ok::<(), memplane::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct HeapAllocator<'m> {
    mem: &'m Memory,
    socket: i32,
}

impl<'m> HeapAllocator<'m> {
    /// Allocates from the caller's node's heap first, then the others
    /// ([`SOCKET_ID_ANY`]).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapAllocator, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-an"])?)?;
    /// let alloc = HeapAllocator::new(&mem);
    /// let b = allocator_api2::boxed::Box::new_in([0u8; 64], alloc);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new(mem: &'m Memory) -> Self {
        Self::on_socket(mem, SOCKET_ID_ANY)
    }

    /// Allocates from the heap of `socket` only (a NUMA node or an external
    /// heap's socket id); blocks moved by `grow`/`shrink` stay there.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapAllocator, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-as"])?)?;
    /// let node0 = HeapAllocator::on_socket(&mem, 0);
    /// let mut v = allocator_api2::vec::Vec::<u32, _>::new_in(node0);
    /// v.push(1);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn on_socket(mem: &'m Memory, socket: i32) -> Self {
        HeapAllocator { mem, socket }
    }

    /// The instance.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapAllocator, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-am"])?)?;
    /// let a = HeapAllocator::new(&mem);
    /// a.memory().heap_validate()?;
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn memory(self) -> &'m Memory {
        self.mem
    }

    /// The socket id allocations go to.
    ///
    /// ```no_run
    /// # use memplane::{heap::{HeapAllocator, SOCKET_ID_ANY}, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ask"])?)?;
    /// assert_eq!(HeapAllocator::new(&mem).socket(), SOCKET_ID_ANY);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn socket(self) -> i32 {
        self.socket
    }

    fn alloc(self, layout: Layout, zero: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let mut req = AllocRequest::new(layout.size())
            .align(layout.align())
            .socket(self.socket);
        if zero {
            req = req.zeroed();
        }
        let p = self.mem.heap_alloc(&req).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    /// `realloc` to `new`, keeping `old.size().min(new.size())` bytes.
    ///
    /// # Safety
    /// `ptr` is a live block of this heap that `old` fits, and `new` is
    /// not zero-sized.
    unsafe fn resize(
        self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 {
            return self.alloc(new, false);
        }
        // SAFETY: `ptr` is live and owned by the caller, who gives it up on
        // success (the trait's contract); on error it is untouched. The
        // heap copies min(asked, new size) bytes, and what it recorded as
        // asked is `old.size()` (blocks are handed out at exactly their
        // layout's size).
        let p = unsafe {
            self.mem
                .realloc_socket(Some(ptr), new.size(), new.align(), self.socket)
        }
        .map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}

/// A non-null, aligned, empty block for a zero-sized layout.
fn dangling(layout: Layout) -> NonNull<[u8]> {
    let p = ptr::without_provenance_mut::<u8>(layout.align());
    // An alignment is never 0.
    let p = NonNull::new(p).unwrap_or(NonNull::dangling());
    NonNull::slice_from_raw_parts(p, 0)
}

impl fmt::Debug for HeapAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapAllocator")
            .field("memory", &format_args!("{:#x}", self.mem.base_va()))
            .field("socket", &self.socket)
            .finish()
    }
}

// SAFETY: blocks stay valid until deallocated or the `Memory` is dropped,
// which the borrow `'m` forbids while any copy of the allocator lives;
// copies share the same `&Memory` and socket, so any copy can free, grow or
// shrink any block (the heap finds a block's heap from its address).
unsafe impl Allocator for HeapAllocator<'_> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.alloc(layout, false)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.alloc(layout, true)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: the caller gives up a live block of this allocator.
        if let Err(e) = unsafe { self.mem.free(ptr) } {
            tracing::error!(addr = format_args!("{ptr:p}"), error = %e, "HeapAllocator cannot free a block");
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: the trait's contract; `new_layout.size() >= old > 0` or
        // the block is a dangling zero-sized one (handled in `resize`).
        unsafe { self.resize(ptr, old_layout, new_layout) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old_layout.size() == 0 {
            return self.alloc(new_layout, true);
        }
        // SAFETY: as in `grow`.
        let p = unsafe { self.resize(ptr, old_layout, new_layout) }?;
        // SAFETY: the new block holds `new_layout.size()` bytes; the bytes
        // after the old size are ours to clear.
        unsafe {
            ptr::write_bytes(
                p.cast::<u8>().as_ptr().add(old_layout.size()),
                0,
                new_layout.size() - old_layout.size(),
            );
        }
        Ok(p)
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new_layout.size() == 0 {
            // SAFETY: the caller gives the block up.
            unsafe { self.deallocate(ptr, old_layout) };
            return Ok(dangling(new_layout));
        }
        // SAFETY: the trait's contract; `old >= new > 0`.
        unsafe { self.resize(ptr, old_layout, new_layout) }
    }
}
