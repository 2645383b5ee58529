//! Atomics and the spin-wait yield, swapped for loom's under `cfg(loom)`
//! (the pattern of `memplane-ring`'s `sync`), for code that the loom
//! models run: [`bucket_core`](crate::bucket_core).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Lets other threads run while waiting for them (loom's `yield_now`
/// under `cfg(loom)`, so the model schedules the thread waited for).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// The locks of the bucket state: `memplane`'s process-shared
/// [`SpinLock`](memplane::shm::lock::SpinLock) (zeroed memory is an
/// unlocked one).
#[cfg(not(loom))]
pub(crate) use memplane::shm::lock::{SpinGuard as LockGuard, SpinLock as Lock};

/// The locks of the bucket state under loom: a loom mutex, which the
/// model schedules directly (a spin lock's waiting rounds multiply the
/// interleavings of three threads beyond what a model run can cover).
/// The spin lock itself has its own models (`memplane`'s
/// `shm::lock::loom_tests`), with the same acquire / release semantics.
#[cfg(loom)]
pub(crate) struct Lock(loom::sync::Mutex<()>);

/// A held [`Lock`] under loom.
#[cfg(loom)]
pub(crate) type LockGuard<'a> = loom::sync::MutexGuard<'a, ()>;

#[cfg(loom)]
impl Lock {
    /// An unlocked lock.
    pub(crate) fn new() -> Self {
        Self(loom::sync::Mutex::new(()))
    }

    /// Takes the lock, waiting as long as it takes.
    pub(crate) fn lock(&self) -> LockGuard<'_> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
