//! The typed face: a pool of `T` handing out [`PoolBox`]es.

use std::marker::PhantomData;
use std::ptr::NonNull;

use memplane::Memory;

use crate::{Mempool, MempoolConfig, MempoolError, MempoolFlags};

/// A pool whose elements hold a `T` (DPDK's mempool with a typed
/// element). Elements are 64-byte aligned (8 with `NO_CACHE_ALIGN`), so
/// `align_of::<T>()` must not exceed that.
///
/// A `T` in a pool shared with other processes must not hold pointers to
/// process-private memory.
pub struct TypedMempool<'m, T> {
    pool: Mempool<'m>,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedMempool<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TypedMempool").field(&self.pool).finish()
    }
}

fn check_type<T>(name: &str, elt_size: u32, flags: MempoolFlags) -> Result<(), MempoolError> {
    let align_max = if flags.contains(MempoolFlags::NO_CACHE_ALIGN) {
        8
    } else {
        64
    };
    let size = std::mem::size_of::<T>().max(1);
    if size > elt_size as usize || std::mem::align_of::<T>() > align_max {
        return Err(MempoolError::TypeMismatch {
            name: name.to_string(),
            elt_size,
            size,
            align: std::mem::align_of::<T>(),
        });
    }
    Ok(())
}

impl<'m, T> TypedMempool<'m, T> {
    /// Creates pool `name` with `cfg.n` elements sized for `T`
    /// (`cfg.elt_size` is replaced by `size_of::<T>()`).
    pub fn create(mem: &'m Memory, name: &str, cfg: &MempoolConfig) -> Result<Self, MempoolError> {
        let size = std::mem::size_of::<T>().max(1);
        let elt = u32::try_from(size).map_err(|_| MempoolError::BadEltSize {
            size: size as u64,
            why: "type larger than 4 GiB",
        })?;
        check_type::<T>(name, elt, cfg.flags)?;
        let cfg = MempoolConfig {
            elt_size: elt,
            ..cfg.clone()
        };
        Ok(Self {
            pool: Mempool::create(mem, name, &cfg)?,
            _t: PhantomData,
        })
    }

    /// The pool named `name`; its elements must fit a `T`.
    pub fn lookup(mem: &'m Memory, name: &str) -> Result<Self, MempoolError> {
        let pool = Mempool::lookup(mem, name)?;
        check_type::<T>(name, pool.elt_size(), pool.flags())?;
        Ok(Self {
            pool,
            _t: PhantomData,
        })
    }

    /// The untyped pool.
    pub fn raw(&self) -> &Mempool<'m> {
        &self.pool
    }

    /// Takes an element and moves `value` into it.
    pub fn alloc(&self, value: T) -> Result<PoolBox<'_, T>, MempoolError> {
        let p = self.pool.get()?.cast::<T>();
        // SAFETY: a fresh element of at least size_of::<T>() bytes, aligned
        // for T (checked at creation/lookup), handed out to us only.
        unsafe { p.write(value) };
        Ok(PoolBox {
            pool: &self.pool,
            ptr: NonNull::new(p).ok_or_else(|| MempoolError::Corrupt {
                name: self.pool.name().to_string(),
                why: "null object".into(),
            })?,
        })
    }

    /// Frees the pool (refused while boxes are out: they borrow it, so
    /// this only happens through other handles or raw gets).
    pub fn free(self) -> Result<(), MempoolError> {
        self.pool.free()
    }
}

/// A `T` in a pool element, returned to the pool when dropped (the value
/// is dropped first).
pub struct PoolBox<'a, T> {
    pool: &'a Mempool<'a>,
    ptr: NonNull<T>,
}

// SAFETY: owns its T exclusively; the pool is Sync.
unsafe impl<T: Send> Send for PoolBox<'_, T> {}
// SAFETY: shared access only hands out &T.
unsafe impl<T: Sync> Sync for PoolBox<'_, T> {}

impl<'a, T> PoolBox<'a, T> {
    /// Gives up the box without dropping the value or returning the
    /// element; put it back with [`PoolBox::from_raw`] (or the raw pool's
    /// `put`, after dropping the value yourself).
    pub fn into_raw(b: Self) -> *mut T {
        let p = b.ptr.as_ptr();
        std::mem::forget(b);
        p
    }

    /// Re-boxes an element of `pool`'s typed pool.
    ///
    /// # Safety
    /// `ptr` must come from [`PoolBox::into_raw`] on a box of `pool`, and
    /// not be re-boxed twice.
    pub unsafe fn from_raw(pool: &'a TypedMempool<'a, T>, ptr: *mut T) -> Self {
        Self {
            pool: &pool.pool,
            // SAFETY: the caller passes a pointer from into_raw, non-null.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
        }
    }

    /// The element's address.
    pub fn as_ptr(b: &Self) -> *mut T {
        b.ptr.as_ptr()
    }
}

impl<T> std::ops::Deref for PoolBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised T.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for PoolBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the box owns an initialised T exclusively.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for PoolBox<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T> Drop for PoolBox<'_, T> {
    fn drop(&mut self) {
        struct Put<'p, 'a>(&'p Mempool<'a>, *mut u8);
        impl Drop for Put<'_, '_> {
            fn drop(&mut self) {
                if let Err(e) = self.0.put(self.1) {
                    tracing::error!(pool = self.0.name(), error = %e, "PoolBox element not returned");
                }
            }
        }
        // Returned even if T's destructor panics.
        let _put = Put(self.pool, self.ptr.as_ptr().cast());
        // SAFETY: the box owns an initialised T, dropped once.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}
