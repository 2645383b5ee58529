//! [`HugepageGlobalAlloc`]: the heap as the program's `#[global_allocator]`.
//!
//! The rules (why it falls back to the system allocator, and when to use
//! [`HugepageGlobalAlloc::bypass`]) are on the type.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use super::{AllocRequest, SOCKET_ID_ANY};
use crate::Memory;

thread_local! {
    /// > 0 while this thread must not enter the heap through the global
    /// allocator (inside it already, or inside [`HugepageGlobalAlloc::bypass`]).
    /// A const-initialised `Cell` without destructor: no allocation, and
    /// usable at every point of a thread's life.
    static BYPASS: Cell<u32> = const { Cell::new(0) };
}

/// Marks the thread as bypassing for its lifetime.
struct Bypass;

impl Bypass {
    /// `None` when the thread bypasses already.
    fn enter() -> Option<Bypass> {
        BYPASS
            .try_with(|b| {
                if b.get() == 0 {
                    b.set(1);
                    true
                } else {
                    false
                }
            })
            .ok()
            .filter(|&entered| entered)
            .map(|_| Bypass)
    }

    fn nest() -> Bypass {
        let _ = BYPASS.try_with(|b| b.set(b.get().saturating_add(1)));
        Bypass
    }
}

impl Drop for Bypass {
    fn drop(&mut self) {
        let _ = BYPASS.try_with(|b| b.set(b.get().saturating_sub(1)));
    }
}

/// Why [`HugepageGlobalAlloc::install`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// Another instance is installed already (an installed instance stays
    /// for the rest of the program).
    #[error("a memplane instance (reservation at {installed:#x}) is the global allocator already; it stays until the program exits")]
    AlreadyInstalled {
        /// Base of the installed instance's reservation.
        installed: usize,
    },
    /// The socket does not name a NUMA node's heap of this instance.
    #[error("socket {socket} is not a NUMA node's heap of this instance: {why}")]
    BadSocket {
        /// The socket configured.
        socket: i32,
        /// What is wrong.
        why: String,
    },
}

/// A `#[global_allocator]` that serves the program from a memplane heap
/// once installed, from the system allocator before that.
///
/// A global allocator exists before `main` and before any [`Memory`], so
/// this one starts on the system allocator and switches to a heap when
/// [`install`](Self::install) hands it a `&'static Memory`.
///
/// - Never panics and never unwinds: an error is a null pointer (when
///   [`strict`](Self::strict)) or a system allocation.
/// - Heap allocations honour the layout's alignment; `alloc_zeroed` uses
///   the heap's zeroing (fresh pages are not cleared twice).
/// - A pointer is freed by the allocator that made it, decided by its
///   address (inside the instance's reservation or not).
/// - Once installed, the instance must stay for the rest of the program
///   (`&'static`, e.g. `Box::leak`): blocks handed out live in its pages.
///   Its hugepages go back to the kernel when the process exits (memfd
///   backing; with `--huge-dir`, its files are left for the next start to
///   reclaim).
///
/// # Not waiting for its own locks
///
/// memplane itself allocates (vectors, strings, log records) while it holds
/// its locks, and it does so through this allocator too. So this allocator
/// must not wait for a memplane lock that its own thread holds:
///
/// - while a thread is inside the heap on behalf of this allocator, its
///   nested allocations go to the system allocator (a per-thread marker);
/// - when this thread holds one of memplane's locks (a heap's, the hotplug
///   lock, the callback registry: every memplane lock counts itself in a
///   per-thread counter) or runs one of the instance's memory event
///   callbacks, the allocation goes to the system allocator instead of
///   waiting for a lock it holds itself, and a heap block freed then is put
///   on a list and freed by the next call that can enter the heap
///   ([`pending_frees`](Self::pending_frees)); so calls such as
///   [`alloc_pages`](crate::Instance::alloc_pages) or `register_*` need
///   no wrapping;
/// - [`bypass`](Self::bypass) runs a closure with this thread's
///   allocations on the system allocator, for code that wants its
///   allocations out of hugepages.
///
/// So while other threads use the heap, some allocations land in system
/// memory: [`counts`](Self::counts) tells how many.
///
/// # Example
///
/// ```no_run
/// use memplane::heap::HugepageGlobalAlloc;
/// use memplane::{MemOptions, Memory};
///
/// #[global_allocator]
/// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let opts = MemOptions::parse_args(&["--file-prefix", "app"])?;
///     let mem: &'static Memory = Box::leak(Box::new(Memory::init(&opts)?));
///     HUGE.install(mem)?;
///     let v: Vec<u64> = (0..1_000_000).collect();   // in hugepages
///     assert!(HUGE.owns(v.as_ptr().cast()));
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct HugepageGlobalAlloc {
    mem: AtomicPtr<Memory>,
    socket: i32,
    strict: bool,
    /// Heap blocks whose free had to wait: an intrusive stack, the next
    /// pointer stored in each block's first 8 bytes.
    deferred: AtomicPtr<u8>,
    /// Entries on `deferred` (for reports).
    pending: AtomicU64,
    heap_allocs: AtomicU64,
    system_allocs: AtomicU64,
}

impl Default for HugepageGlobalAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl HugepageGlobalAlloc {
    /// Not installed: the system allocator serves. Once installed, the
    /// heap of the caller's node serves (then the other nodes'), and the
    /// system allocator when the heap cannot.
    ///
    /// ```
    /// use memplane::heap::HugepageGlobalAlloc;
    ///
    /// #[global_allocator]
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// # fn main() { assert!(HUGE.memory().is_none()); }
    /// ```
    pub const fn new() -> Self {
        HugepageGlobalAlloc {
            mem: AtomicPtr::new(ptr::null_mut()),
            socket: SOCKET_ID_ANY,
            strict: false,
            deferred: AtomicPtr::new(ptr::null_mut()),
            pending: AtomicU64::new(0),
            heap_allocs: AtomicU64::new(0),
            system_allocs: AtomicU64::new(0),
        }
    }

    /// Serves from the heap of NUMA node `socket` only (checked at
    /// install).
    ///
    /// ```
    /// use memplane::heap::HugepageGlobalAlloc;
    ///
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new().on_socket(0);
    /// ```
    #[must_use]
    pub const fn on_socket(mut self, socket: i32) -> Self {
        self.socket = socket;
        self
    }

    /// Once installed, an allocation the heap refuses (out of hugepages)
    /// returns null (the program then aborts in `handle_alloc_error`)
    /// instead of falling back to the system allocator. Allocations that
    /// must not wait for a memplane lock still go to the system allocator.
    ///
    /// ```
    /// use memplane::heap::HugepageGlobalAlloc;
    ///
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new().strict();
    /// ```
    #[must_use]
    pub const fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Switches to `mem`'s heap. Installing the same instance again is
    /// fine; another one is refused (blocks of the first live on).
    ///
    /// ```no_run
    /// # use memplane::{heap::HugepageGlobalAlloc, MemOptions, Memory};
    /// # static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// # let opts = MemOptions::parse_args(&["--file-prefix", "doc-inst"])?;
    /// let mem: &'static Memory = Box::leak(Box::new(Memory::init(&opts)?));
    /// HUGE.install(mem)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn install(&self, mem: &'static Memory) -> Result<(), InstallError> {
        if self.socket != SOCKET_ID_ANY {
            let why = match Bypass::scope(|| mem.heap_socket_is_external(self.socket)) {
                Ok(false) => None,
                Ok(true) => Some(
                    "it is an external heap (its memory is not in the reservation)".to_string(),
                ),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = why {
                return Err(InstallError::BadSocket {
                    socket: self.socket,
                    why,
                });
            }
        }
        let want = ptr::from_ref(mem).cast_mut();
        match self
            .mem
            .compare_exchange(ptr::null_mut(), want, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(cur) if cur == want => Ok(()),
            Err(cur) => Err(InstallError::AlreadyInstalled {
                // SAFETY: a published pointer is a `&'static Memory`.
                installed: unsafe { &*cur }.base_va(),
            }),
        }
    }

    /// The installed instance.
    ///
    /// ```
    /// # use memplane::heap::HugepageGlobalAlloc;
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// assert!(HUGE.memory().is_none());
    /// ```
    pub fn memory(&self) -> Option<&'static Memory> {
        let p = self.mem.load(Ordering::Acquire);
        // SAFETY: only `install` stores, and it stores a `&'static Memory`.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Whether `ptr` lies in the installed instance's reservation (so it
    /// is, or was, a heap block of this allocator).
    ///
    /// ```
    /// # use memplane::heap::HugepageGlobalAlloc;
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// let x = 5;
    /// assert!(!HUGE.owns(std::ptr::from_ref(&x).cast()));
    /// ```
    pub fn owns(&self, ptr: *const u8) -> bool {
        self.memory().is_some_and(|m| in_reservation(m, ptr))
    }

    /// Allocations served by the heap and by the system allocator since
    /// install (the system count includes nested allocations memplane
    /// makes while it serves the heap).
    ///
    /// ```
    /// # use memplane::heap::HugepageGlobalAlloc;
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// assert_eq!(HUGE.counts(), (0, 0));
    /// ```
    pub fn counts(&self) -> (u64, u64) {
        (
            self.heap_allocs.load(Ordering::Relaxed),
            self.system_allocs.load(Ordering::Relaxed),
        )
    }

    /// Runs `f` with this thread's allocations on the system allocator
    /// (frees still go to whichever allocator made each pointer).
    ///
    /// ```no_run
    /// # use memplane::{heap::HugepageGlobalAlloc, memseg::PageRequest, MemOptions, Memory, PageSize};
    /// # static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// # let mem: &'static Memory = Box::leak(Box::new(Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-by"])?)?));
    /// # HUGE.install(mem)?;
    /// let runs = HugepageGlobalAlloc::bypass(|| {
    ///     mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2))
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn bypass<R>(f: impl FnOnce() -> R) -> R {
        Bypass::scope(f)
    }

    /// Heap blocks whose free is still pending (freed while the heap could
    /// not be entered; the next call that can enter frees them).
    ///
    /// ```
    /// # use memplane::heap::HugepageGlobalAlloc;
    /// static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();
    /// assert_eq!(HUGE.pending_frees(), 0);
    /// ```
    pub fn pending_frees(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The instance when this thread may enter its heap now, with the
    /// thread marked as inside.
    fn enter(&self) -> Option<(&'static Memory, Bypass)> {
        let mem = self.memory()?;
        let guard = Bypass::enter()?;
        if crate::memseg::events::is_in_callback(mem.callback_id()) || heap_busy(mem) {
            return None;
        }
        self.drain(mem);
        Some((mem, guard))
    }

    /// Frees the deferred blocks (caller is inside the heap's marker).
    fn drain(&self, mem: &Memory) {
        if self.deferred.load(Ordering::Relaxed).is_null() {
            return;
        }
        let mut p = self.deferred.swap(ptr::null_mut(), Ordering::Acquire);
        while let Some(block) = NonNull::new(p) {
            #[allow(clippy::cast_ptr_alignment)] // heap blocks are 64-aligned
            // SAFETY: the block was pushed by `defer`, which wrote the next
            // entry in its first bytes; we took the whole list, so no other
            // thread reads it now.
            let next = unsafe { block.as_ptr().cast::<*mut u8>().read() };
            p = next;
            self.pending.fetch_sub(1, Ordering::Relaxed);
            // SAFETY: the block was given up by its owner in `dealloc`.
            let _ = unsafe { mem.free(block) };
        }
    }

    /// Puts a heap block on the pending list.
    ///
    /// # Safety
    /// `block` is a live heap block (64 bytes at least, 64-aligned) given
    /// up by its owner.
    unsafe fn defer(&self, block: *mut u8) {
        // Counted first, so a drain never counts it off before.
        self.pending.fetch_add(1, Ordering::Relaxed);
        let mut head = self.deferred.load(Ordering::Relaxed);
        loop {
            #[allow(clippy::cast_ptr_alignment)] // heap blocks are 64-aligned
            // SAFETY: the block is ours and holds at least 8 bytes.
            unsafe {
                block.cast::<*mut u8>().write(head);
            }
            match self.deferred.compare_exchange_weak(
                head,
                block,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    fn request(&self, layout: Layout, zero: bool) -> AllocRequest {
        let r = AllocRequest::new(layout.size())
            .align(layout.align())
            .socket(self.socket);
        if zero {
            r.zeroed()
        } else {
            r
        }
    }

    /// Allocates from the heap when possible, else from the system.
    ///
    /// # Safety
    /// As `GlobalAlloc::alloc`.
    unsafe fn alloc_impl(&self, layout: Layout, zero: bool) -> *mut u8 {
        if layout.size() != 0 {
            if let Some((mem, _inside)) = self.enter() {
                if let Ok(p) = mem.heap_alloc(&self.request(layout, zero)) {
                    self.heap_allocs.fetch_add(1, Ordering::Relaxed);
                    return p.as_ptr();
                }
                if self.strict {
                    return ptr::null_mut();
                }
            }
        }
        if self.memory().is_some() {
            self.system_allocs.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's layout, forwarded.
        unsafe {
            if zero {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        }
    }
}

impl Bypass {
    fn scope<R>(f: impl FnOnce() -> R) -> R {
        let _b = Bypass::nest();
        f()
    }
}

/// Whether `ptr` lies in `mem`'s reservation.
fn in_reservation(mem: &Memory, ptr: *const u8) -> bool {
    (ptr as usize).wrapping_sub(mem.base_va()) < mem.va_len()
}

/// Whether this thread holds a memplane lock (a heap's, the hotplug lock,
/// the callback registry): then the heap must not be entered, it could wait
/// for that lock forever; the system allocator serves instead.
fn heap_busy(mem: &Memory) -> bool {
    let _ = mem;
    crate::shm::lock::held_here() > 0
}

// SAFETY: `alloc` returns a block of at least `layout.size()` bytes aligned
// to `layout.align()` (heap or system) or null; `dealloc` and `realloc`
// send each pointer back to the allocator that made it (by address: heap
// blocks are inside the reservation, system blocks never are); nothing here
// panics or unwinds.
unsafe impl GlobalAlloc for HugepageGlobalAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_impl(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_impl(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.owns(ptr) {
            // SAFETY: not a heap block, so the system allocator made it.
            unsafe { System.dealloc(ptr, layout) };
            return;
        }
        let Some(block) = NonNull::new(ptr) else {
            return;
        };
        if let Some((mem, _inside)) = self.enter() {
            // SAFETY: the caller gives the block up. An error (a pointer
            // that is not a live block) is the caller's bug and changes
            // nothing in the heap.
            let _ = unsafe { mem.free(block) };
        } else {
            // SAFETY: a heap block of ours, given up.
            unsafe { self.defer(ptr) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.owns(ptr) {
            // SAFETY: a system block; the caller's contract forwarded. It
            // stays with the system allocator.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let (Some(block), Ok(new_layout)) = (
            NonNull::new(ptr),
            Layout::from_size_align(new_size, layout.align()),
        ) else {
            return ptr::null_mut();
        };
        let entered = self.enter();
        if let Some((mem, _)) = &entered {
            // SAFETY: the caller gives the block up on success; on error it
            // is untouched. The heap keeps min(old, new) bytes.
            let moved =
                unsafe { mem.realloc_socket(Some(block), new_size, layout.align(), self.socket) };
            if let Ok(p) = moved {
                return p.as_ptr();
            }
            if self.strict {
                return ptr::null_mut();
            }
        }
        // The heap cannot take it now: move the contents to a system block.
        // SAFETY: `new_layout` is not zero-sized (`new_size > 0` per the
        // caller's contract).
        let new = unsafe { System.alloc(new_layout) };
        if new.is_null() {
            return new;
        }
        self.system_allocs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: both blocks are live, distinct, and hold at least the
        // smaller of the two sizes.
        unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        match entered {
            Some((mem, _inside)) => {
                // SAFETY: the old block is given up (its contents were
                // copied).
                let _ = unsafe { mem.free(block) };
            }
            // SAFETY: as above.
            None => unsafe { self.defer(ptr) },
        }
        new
    }
}
