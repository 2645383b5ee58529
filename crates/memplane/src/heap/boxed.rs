//! [`HeapBox`]: an owned value (or slice) in the hugepage heap, freed on
//! drop, borrowing the [`Memory`] it came from so it cannot outlive it.
//!
//! The heap refuses 0-byte blocks, so zero-sized values and empty slices
//! never touch it: they use a dangling, well-aligned pointer, as
//! `Box` does, and have no IOVA.

use std::borrow::{Borrow, BorrowMut};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::mem::{self, ManuallyDrop, MaybeUninit};
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};

pub use bytemuck::Zeroable;

use super::{AllocRequest, HeapError, SOCKET_ID_ANY};
use crate::{Memory, Result};

/// An owned value in hugepage memory: the heap's `Box`.
///
/// The block comes from the instance's malloc heap (on a NUMA node you may
/// choose), aligned to `align_of::<T>()` (64 bytes at least). Dropping the
/// box drops the value and frees the block; the borrow of `&'m Memory`
/// keeps the box from outliving the instance whose pages hold it.
///
/// Every constructor is fallible: running out of hugepages is an error
/// ([`crate::Error::Heap`]), never a panic or an abort.
///
/// Methods that are not about the value are associated functions
/// (`HeapBox::iova(&b)`, `HeapBox::into_raw(b)`), as for `Box`, so they do
/// not shadow methods of `T` reached through `Deref`.
///
/// `HeapBox<'m, [T]>` (also named [`HeapSlice`]) holds a slice; see
/// [`new_slice_copied`](HeapBox::new_slice_copied),
/// [`from_fn`](HeapBox::from_fn) and
/// [`new_zeroed_bytes`](HeapBox::new_zeroed_bytes).
///
/// # Example
///
/// ```no_run
/// use memplane::heap::HeapBox;
/// use memplane::{MemOptions, Memory};
///
/// let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-box"])?)?;
/// let mut b = HeapBox::new_in(&mem, [0u64; 512])?;   // 4 KiB in a hugepage
/// b[7] = 42;
/// println!("at {:p}, IOVA {:?}", HeapBox::as_ptr(&b), HeapBox::iova(&b));
/// drop(b);                                            // freed here
/// assert_eq!(mem.heap_stats(0)?.alloc_count, 0);
/// # Ok::<(), memplane::Error>(())
/// ```
pub struct HeapBox<'m, T: ?Sized> {
    ptr: NonNull<T>,
    mem: &'m Memory,
    /// Owns a `T` (for drop check and auto traits).
    _owns: PhantomData<T>,
}

/// An owned slice in hugepage memory: `HeapBox<'m, [T]>`.
///
/// ```no_run
/// use memplane::heap::HeapSlice;
/// use memplane::{MemOptions, Memory};
///
/// let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-slice"])?)?;
/// let s = HeapSlice::new_slice_copied(&mem, &[1u32, 2, 3])?;
/// assert_eq!(&*s, &[1, 2, 3]);
/// # Ok::<(), memplane::Error>(())
/// ```
pub type HeapSlice<'m, T> = HeapBox<'m, [T]>;

// SAFETY: a `HeapBox<T>` owns its `T` like `Box<T>`; the block is reached
// only through the box, and `&Memory` is `Send` (`Memory` is `Sync`).
unsafe impl<T: ?Sized + Send> Send for HeapBox<'_, T> {}
// SAFETY: `&HeapBox<T>` only hands out `&T`; `&Memory` is `Sync`.
unsafe impl<T: ?Sized + Sync> Sync for HeapBox<'_, T> {}

// The box is a pointer: moving it never moves the value (as `Box`).
impl<T: ?Sized> Unpin for HeapBox<'_, T> {}

/// Bytes of `len` values of `T`, or the error the heap would give.
fn slice_bytes<T>(len: usize) -> Result<usize> {
    mem::size_of::<T>()
        .checked_mul(len)
        .filter(|&b| isize::try_from(b).is_ok())
        .ok_or_else(|| {
            HeapError::TooLarge {
                size: usize::MAX,
                align: mem::align_of::<T>(),
            }
            .into()
        })
}

/// A block for `bytes` bytes aligned for `T` (a dangling pointer when
/// `bytes` is 0: the heap is not asked).
fn alloc_for<T>(mem: &Memory, bytes: usize, socket: i32, zero: bool) -> Result<NonNull<T>> {
    if bytes == 0 {
        return Ok(NonNull::dangling());
    }
    let mut req = AllocRequest::new(bytes)
        .align(mem::align_of::<T>())
        .socket(socket);
    if zero {
        req = req.zeroed();
    }
    Ok(mem.heap_alloc(&req)?.cast::<T>())
}

impl<'m, T> HeapBox<'m, T> {
    /// Moves `value` into a new block of the heap of the caller's node (or
    /// any other node when that one is full). On error `value` is dropped.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bn"])?)?;
    /// let b = HeapBox::new_in(&mem, String::from("in a hugepage"))?;
    /// assert_eq!(b.len(), 13);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_in(mem: &'m Memory, value: T) -> Result<Self> {
        Self::new_on(mem, value, SOCKET_ID_ANY)
    }

    /// [`new_in`](Self::new_in) on the heap of `socket` only (a NUMA node,
    /// an external heap's socket id, or [`SOCKET_ID_ANY`]).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bo"])?)?;
    /// let b = HeapBox::new_on(&mem, 7u64, 0)?; // NUMA node 0
    /// assert_eq!(*b, 7);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_on(mem: &'m Memory, value: T, socket: i32) -> Result<Self> {
        Ok(HeapBox::write(Self::new_uninit_on(mem, socket)?, value))
    }

    /// A box of zero bytes, for types for which all-zero is a valid value
    /// ([`Zeroable`], from `bytemuck`). Memory that is fresh from the
    /// kernel is not cleared a second time.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bz"])?)?;
    /// let table = HeapBox::<[u64; 4096]>::try_new_zeroed(&mem)?;
    /// assert!(table.iter().all(|&x| x == 0));
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn try_new_zeroed(mem: &'m Memory) -> Result<Self>
    where
        T: Zeroable,
    {
        let b = Self::new_zeroed_in(mem)?;
        // SAFETY: the block is zeroed and `T: Zeroable` promises that
        // all-zero bytes are a valid `T`.
        Ok(unsafe { b.assume_init() })
    }

    /// An uninitialised block for a `T` (write it with
    /// [`HeapBox::write`]).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bu"])?)?;
    /// let b = HeapBox::<u32>::new_uninit_in(&mem)?;
    /// let b = HeapBox::write(b, 5);
    /// assert_eq!(*b, 5);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_uninit_in(mem: &'m Memory) -> Result<HeapBox<'m, MaybeUninit<T>>> {
        Self::new_uninit_on(mem, SOCKET_ID_ANY)
    }

    /// [`new_uninit_in`](Self::new_uninit_in) on the heap of `socket`.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-buo"])?)?;
    /// let b = HeapBox::write(HeapBox::<u32>::new_uninit_on(&mem, 0)?, 1);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_uninit_on(mem: &'m Memory, socket: i32) -> Result<HeapBox<'m, MaybeUninit<T>>> {
        let ptr = alloc_for::<MaybeUninit<T>>(mem, mem::size_of::<T>(), socket, false)?;
        Ok(HeapBox {
            ptr,
            mem,
            _owns: PhantomData,
        })
    }

    /// A zeroed block for a `T`, as `MaybeUninit` (whether zero is a valid
    /// `T` is for the caller to decide; see
    /// [`try_new_zeroed`](Self::try_new_zeroed) for the safe form).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bzu"])?)?;
    /// let b = HeapBox::<u64>::new_zeroed_in(&mem)?;
    /// // SAFETY: zero is a valid u64.
    /// let b = unsafe { b.assume_init() };
    /// assert_eq!(*b, 0);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_zeroed_in(mem: &'m Memory) -> Result<HeapBox<'m, MaybeUninit<T>>> {
        let ptr = alloc_for::<MaybeUninit<T>>(mem, mem::size_of::<T>(), SOCKET_ID_ANY, true)?;
        Ok(HeapBox {
            ptr,
            mem,
            _owns: PhantomData,
        })
    }

    /// Moves the value out and frees the block.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bi"])?)?;
    /// let b = HeapBox::new_in(&mem, vec![1, 2])?;
    /// let v: Vec<i32> = HeapBox::into_inner(b);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn into_inner(this: Self) -> T {
        let this = ManuallyDrop::new(this);
        // SAFETY: the box holds an initialised `T`, read once; the box is
        // not dropped, so the value is not dropped twice.
        let value = unsafe { this.ptr.as_ptr().read() };
        // SAFETY: the block came from this instance and the value was moved
        // out of it.
        unsafe { free_block(this.mem, this.ptr.cast::<u8>(), mem::size_of::<T>()) };
        value
    }
}

impl<'m, T> HeapBox<'m, MaybeUninit<T>> {
    /// Writes `value` into the block and returns the initialised box.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-bw"])?)?;
    /// let b = HeapBox::write(HeapBox::<[u8; 100]>::new_uninit_in(&mem)?, [1; 100]);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn write(this: Self, value: T) -> HeapBox<'m, T> {
        let this = ManuallyDrop::new(this);
        // SAFETY: the block is valid for a `T` and ours; writing does not
        // drop the old (uninitialised) contents.
        unsafe { this.ptr.as_ptr().cast::<T>().write(value) };
        HeapBox {
            ptr: this.ptr.cast::<T>(),
            mem: this.mem,
            _owns: PhantomData,
        }
    }

    /// The box as initialised.
    ///
    /// # Safety
    /// The block must hold a valid `T`.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ba"])?)?;
    /// let mut b = HeapBox::<u16>::new_uninit_in(&mem)?;
    /// b.write(9);
    /// // SAFETY: written just above.
    /// let b = unsafe { b.assume_init() };
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub unsafe fn assume_init(self) -> HeapBox<'m, T> {
        let this = ManuallyDrop::new(self);
        HeapBox {
            ptr: this.ptr.cast::<T>(),
            mem: this.mem,
            _owns: PhantomData,
        }
    }
}

impl<'m, T> HeapBox<'m, [T]> {
    /// A slice of `len` uninitialised values, on the heap of `socket`
    /// ([`SOCKET_ID_ANY`]: the caller's node first).
    ///
    /// ```no_run
    /// # use memplane::{heap::{HeapSlice, SOCKET_ID_ANY}, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-su"])?)?;
    /// let mut s = HeapSlice::<u32>::new_uninit_slice(&mem, 3, SOCKET_ID_ANY)?;
    /// for (i, x) in s.iter_mut().enumerate() {
    ///     x.write(i as u32);
    /// }
    /// // SAFETY: every element was written.
    /// let s = unsafe { s.assume_init() };
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_uninit_slice(
        mem: &'m Memory,
        len: usize,
        socket: i32,
    ) -> Result<HeapBox<'m, [MaybeUninit<T>]>> {
        let data = alloc_for::<MaybeUninit<T>>(mem, slice_bytes::<T>(len)?, socket, false)?;
        Ok(HeapBox {
            ptr: NonNull::slice_from_raw_parts(data, len),
            mem,
            _owns: PhantomData,
        })
    }

    /// A copy of `src` in the heap.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-sc"])?)?;
    /// let s = HeapSlice::new_slice_copied(&mem, b"packet header")?;
    /// assert_eq!(&s[..6], b"packet");
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_slice_copied(mem: &'m Memory, src: &[T]) -> Result<Self>
    where
        T: Copy,
    {
        let b = Self::new_uninit_slice(mem, src.len(), SOCKET_ID_ANY)?;
        // SAFETY: the new block holds `src.len()` elements and cannot
        // overlap `src`, which is borrowed memory that is not in it.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), b.ptr.cast::<T>().as_ptr(), src.len());
        }
        // SAFETY: every element was just written.
        Ok(unsafe { b.assume_init() })
    }

    /// A slice of `len` values where element `i` is `f(i)`. If `f` panics,
    /// the elements made so far are dropped and the block is freed.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-sf"])?)?;
    /// let squares = HeapSlice::from_fn(&mem, 1000, |i| (i * i) as u64)?;
    /// assert_eq!(squares[30], 900);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn from_fn(mem: &'m Memory, len: usize, mut f: impl FnMut(usize) -> T) -> Result<Self> {
        /// Drops the first `done` elements and frees the block on unwind.
        struct Partial<'a, T> {
            data: NonNull<T>,
            done: usize,
            bytes: usize,
            mem: &'a Memory,
        }
        impl<T> Drop for Partial<'_, T> {
            fn drop(&mut self) {
                // SAFETY: the first `done` elements were written and are
                // dropped once; the block came from `mem` and is freed once.
                unsafe {
                    ptr::drop_in_place(ptr::slice_from_raw_parts_mut(
                        self.data.as_ptr(),
                        self.done,
                    ));
                    free_block(self.mem, self.data.cast::<u8>(), self.bytes);
                }
            }
        }
        let bytes = slice_bytes::<T>(len)?;
        let data = alloc_for::<T>(mem, bytes, SOCKET_ID_ANY, false)?;
        let mut partial = Partial {
            data,
            done: 0,
            bytes,
            mem,
        };
        for i in 0..len {
            let v = f(i);
            // SAFETY: `i < len`: inside the block; the slot is not yet
            // initialised.
            unsafe { data.as_ptr().add(i).write(v) };
            partial.done = i + 1;
        }
        mem::forget(partial);
        Ok(HeapBox {
            ptr: NonNull::slice_from_raw_parts(data, len),
            mem,
            _owns: PhantomData,
        })
    }

    /// A clone of every element of `src`, in the heap.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-scl"])?)?;
    /// let names = HeapSlice::new_slice_cloned(&mem, &["a".to_string(), "b".to_string()])?;
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_slice_cloned(mem: &'m Memory, src: &[T]) -> Result<Self>
    where
        T: Clone,
    {
        Self::from_fn(mem, src.len(), |i| src[i].clone())
    }

    /// A slice of `len` zero values ([`Zeroable`] types only).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-sz"])?)?;
    /// let counters = HeapSlice::<u64>::new_zeroed_slice(&mem, 1 << 16)?;
    /// assert_eq!(counters.iter().sum::<u64>(), 0);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_zeroed_slice(mem: &'m Memory, len: usize) -> Result<Self>
    where
        T: Zeroable,
    {
        let data = alloc_for::<T>(mem, slice_bytes::<T>(len)?, SOCKET_ID_ANY, true)?;
        Ok(HeapBox {
            ptr: NonNull::slice_from_raw_parts(data, len),
            mem,
            _owns: PhantomData,
        })
    }
}

impl<'m> HeapBox<'m, [u8]> {
    /// `len` zero bytes (the heap's `zmalloc`): a buffer to fill.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-zb"])?)?;
    /// let mut buf = HeapSlice::new_zeroed_bytes(&mem, 9000)?;
    /// buf[..4].copy_from_slice(b"ping");
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn new_zeroed_bytes(mem: &'m Memory, len: usize) -> Result<Self> {
        Self::new_zeroed_slice(mem, len)
    }
}

impl<'m, T> HeapBox<'m, [MaybeUninit<T>]> {
    /// The slice as initialised.
    ///
    /// # Safety
    /// Every element must hold a valid `T`.
    ///
    /// ```no_run
    /// # use memplane::{heap::{HeapSlice, SOCKET_ID_ANY}, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-sai"])?)?;
    /// let mut s = HeapSlice::<u8>::new_uninit_slice(&mem, 2, SOCKET_ID_ANY)?;
    /// s[0].write(1);
    /// s[1].write(2);
    /// // SAFETY: both elements were written.
    /// let s = unsafe { s.assume_init() };
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub unsafe fn assume_init(self) -> HeapBox<'m, [T]> {
        let this = ManuallyDrop::new(self);
        let len = this.ptr.len();
        HeapBox {
            ptr: NonNull::slice_from_raw_parts(this.ptr.cast::<T>(), len),
            mem: this.mem,
            _owns: PhantomData,
        }
    }
}

impl<'m, T: ?Sized> HeapBox<'m, T> {
    /// Gives up ownership: the caller frees the block later with
    /// [`from_raw`](Self::from_raw) (or drops the value and calls
    /// [`free`](crate::Instance::free) itself, unless the value is
    /// zero-sized).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ir"])?)?;
    /// let p = HeapBox::into_raw(HeapBox::new_in(&mem, 5u32)?);
    /// // ... hand `p` to C, to another process, ...
    /// // SAFETY: `p` came from `into_raw` on this instance, once.
    /// let b = unsafe { HeapBox::from_raw(&mem, p) };
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn into_raw(this: Self) -> NonNull<T> {
        ManuallyDrop::new(this).ptr
    }

    /// Takes ownership of a value at `ptr` again.
    ///
    /// # Safety
    /// `ptr` must come from [`into_raw`](Self::into_raw) of a box of this
    /// same instance `mem` (or, for a value that is not zero-sized, be a
    /// live block of `mem`'s heap, aligned for `T`, holding a valid `T`),
    /// and be owned by nobody else.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-fr"])?)?;
    /// let p = mem.malloc(8, 8)?.cast::<u64>();
    /// // SAFETY: a fresh block of 8 bytes, 8-aligned; written before use.
    /// let b = unsafe {
    ///     p.as_ptr().write(11);
    ///     HeapBox::from_raw(&mem, p)
    /// };
    /// assert_eq!(*b, 11); // freed when `b` drops
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub unsafe fn from_raw(mem: &'m Memory, ptr: NonNull<T>) -> Self {
        HeapBox {
            ptr,
            mem,
            _owns: PhantomData,
        }
    }

    /// Leaks the box: the value lives until the instance is dropped (its
    /// memory goes back to the kernel then; the value's destructor never
    /// runs).
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-lk"])?)?;
    /// let counter: &mut u64 = HeapBox::leak(HeapBox::new_in(&mem, 0u64)?);
    /// *counter += 1;
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn leak(this: Self) -> &'m mut T {
        let ptr = Self::into_raw(this);
        // SAFETY: the block stays allocated (and mapped) until the instance,
        // borrowed for 'm, is dropped; nobody else owns it.
        unsafe { &mut *ptr.as_ptr() }
    }

    /// The address of the value.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ap"])?)?;
    /// let b = HeapBox::new_in(&mem, 1u8)?;
    /// assert_eq!(HeapBox::as_ptr(&b) as usize % 64, 0);
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn as_ptr(this: &Self) -> *const T {
        this.ptr.as_ptr()
    }

    /// The mutable address of the value.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-amp"])?)?;
    /// let mut b = HeapBox::new_in(&mem, 1u8)?;
    /// // SAFETY: the box is borrowed mutably while the pointer is used.
    /// unsafe { *HeapBox::as_mut_ptr(&mut b) = 2 };
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn as_mut_ptr(this: &mut Self) -> *mut T {
        this.ptr.as_ptr()
    }

    /// The instance whose heap holds the value.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapBox, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-mm"])?)?;
    /// let b = HeapBox::new_in(&mem, 1u8)?;
    /// assert!(std::ptr::eq(HeapBox::memory(&b), &mem));
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn memory(this: &Self) -> &'m Memory {
        this.mem
    }

    /// The IOVA (device address) of the value's first byte, for DMA;
    /// `None` for a zero-sized value or empty slice (it has no block), or
    /// for memory without IOVAs.
    ///
    /// ```no_run
    /// # use memplane::{heap::HeapSlice, MemOptions, Memory};
    /// # let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-io"])?)?;
    /// let ring = HeapSlice::new_zeroed_bytes(&mem, 4096)?;
    /// let iova = HeapSlice::iova(&ring).expect("hugepage memory has an IOVA");
    /// # Ok::<(), memplane::Error>(())
    /// ```
    pub fn iova(this: &Self) -> Option<u64> {
        if Self::block_size(this) == 0 {
            return None;
        }
        this.mem.malloc_virt2iova(this.ptr.cast::<u8>())
    }

    /// Bytes of the value, 0 when no block backs it.
    fn block_size(this: &Self) -> usize {
        // SAFETY: the pointer is valid (a live block or a dangling pointer
        // for a zero-sized value) and the value is initialised.
        mem::size_of_val(unsafe { this.ptr.as_ref() })
    }
}

/// Frees a block of `bytes` bytes (nothing when 0: no block). Errors
/// cannot happen for blocks the boxes own; one is logged, never panicked
/// on.
///
/// # Safety
/// `ptr` is a live block of `mem` (when `bytes > 0`), not used afterwards.
unsafe fn free_block(mem: &Memory, ptr: NonNull<u8>, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // SAFETY: per the contract.
    if let Err(e) = unsafe { mem.free(ptr) } {
        tracing::error!(addr = format_args!("{:p}", ptr), error = %e, "HeapBox cannot free its block");
    }
}

impl<T: ?Sized> Drop for HeapBox<'_, T> {
    fn drop(&mut self) {
        /// Frees the block even when the value's destructor panics.
        struct Free<'a>(&'a Memory, NonNull<u8>, usize);
        impl Drop for Free<'_> {
            fn drop(&mut self) {
                // SAFETY: the box owned the block; its value is dropped.
                unsafe { free_block(self.0, self.1, self.2) };
            }
        }
        let _free = Free(self.mem, self.ptr.cast::<u8>(), Self::block_size(self));
        // SAFETY: the box owns an initialised value, dropped once here.
        unsafe { ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}

impl<T: ?Sized> Deref for HeapBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised value, shared as `&self` is.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ?Sized> DerefMut for HeapBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the box owns the value; `&mut self` is exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: ?Sized> AsRef<T> for HeapBox<'_, T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T: ?Sized> AsMut<T> for HeapBox<'_, T> {
    fn as_mut(&mut self) -> &mut T {
        self
    }
}

impl<T: ?Sized> Borrow<T> for HeapBox<'_, T> {
    fn borrow(&self) -> &T {
        self
    }
}

impl<T: ?Sized> BorrowMut<T> for HeapBox<'_, T> {
    fn borrow_mut(&mut self) -> &mut T {
        self
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for HeapBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for HeapBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T: ?Sized> fmt::Pointer for HeapBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Pointer::fmt(&self.ptr, f)
    }
}

impl<T: ?Sized + PartialEq> PartialEq for HeapBox<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: ?Sized + Eq> Eq for HeapBox<'_, T> {}

impl<T: ?Sized + PartialOrd> PartialOrd for HeapBox<'_, T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (**self).partial_cmp(&**other)
    }
}

impl<T: ?Sized + Ord> Ord for HeapBox<'_, T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (**self).cmp(&**other)
    }
}

impl<T: ?Sized + Hash> Hash for HeapBox<'_, T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}
