//! Atomics and spin hints, swapped for loom's under `cfg(loom)`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Spins before a waiter starts yielding its CPU. On an overcommitted
/// machine (more runnable threads than CPUs: our 2-vCPU CI VM) the thread
/// we wait for may be preempted; spinning on then burns its whole time
/// slice (DPDK's MP/MC mode has this problem; its RTS/HTS modes exist
/// because of it). Uncontended operations never get here.
#[cfg(not(loom))]
pub(crate) const SPINS_BEFORE_YIELD: u32 = 256;

/// One round of waiting for another thread: a spin hint, and after
/// [`SPINS_BEFORE_YIELD`] rounds a `yield_now` so a preempted peer can run.
#[inline]
pub(crate) fn wait_round(rounds: &mut u32) {
    #[cfg(loom)]
    {
        let _ = rounds;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if *rounds < SPINS_BEFORE_YIELD {
            *rounds += 1;
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
