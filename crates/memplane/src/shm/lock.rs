//! Process-shared locks that live inside shared memory.
//!
//! [`SpinLock`] and [`RwLock`] are `repr(C)` structs holding a single
//! [`AtomicU32`] and nothing else: no pointers, no process-local state. Any
//! 4-byte-aligned, zero-filled memory is an unlocked lock, so they can sit in
//! a memfd or in the shared config and be used by threads of every process
//! that maps that memory, at any virtual address.
//!
//! # How they work
//!
//! Both locks are futex words. A contended acquirer spins a little
//! ([`SPIN_LIMIT`] rounds), then sleeps in `futex(FUTEX_WAIT)` **without**
//! `FUTEX_PRIVATE_FLAG`, because the waker may be another process; the
//! kernel keys shared futexes on the backing page, not on the address.
//!
//! The owner's pid is part of the lock word (`pid < 2^29`; Linux's `pid_max`
//! is at most 2^22). This goes a step beyond DPDK's `rte_spinlock`/
//! `rte_rwlock`, which hang forever when a process dies holding them:
//!
//! - [`SpinLock::holder_pid`] / [`RwLock::writer_pid`] name the holder;
//! - [`SpinLock::is_owner_dead`] / [`RwLock::is_owner_dead`] check it with
//!   `kill(pid, 0)` and `/proc/<pid>/stat` (a zombie counts as dead);
//! - the `*_timeout` variants return a [`LockError`] that names the holder,
//!   and return [`LockError::OwnerDead`] as soon as they notice the holder is
//!   gone instead of waiting out the full timeout;
//! - the untimed `lock()` paths wake every [`DEAD_CHECK_INTERVAL`] while
//!   asleep, and log one `tracing` error naming the dead holder;
//! - [`SpinLock::take_over_dead_owner`] / [`RwLock::take_over_dead_writer`]
//!   let a survivor take the lock over (like a robust pthread mutex's
//!   `EOWNERDEAD`: the data it guards may be half-updated).
//!
//! Limits: readers of an [`RwLock`] are counted, not named, so a reader that
//! died holding the lock is reported as "n readers" without a pid (and
//! writers then wait for ever: data that processes which may be killed
//! read, like the memzone table, is read without the lock instead, see
//! `shm::seqlock`); a pid can
//! be reused by a new process after the holder died (the check then says
//! "alive"); pids are those of the holder's pid namespace, so all processes
//! must share one.
//!
//! # Memory ordering
//!
//! Acquisition is a successful compare-exchange with `Acquire` ordering,
//! release is a `swap`/`fetch_sub` with `Release` ordering, so everything
//! written under the lock happens-before everything read by the next holder.
//! Setting the waiter bits carries no data and uses `Relaxed`; the futex
//! syscall itself re-reads the word under the kernel's hash-bucket lock, so a
//! wake-up that happens between our load and the sleep makes `FUTEX_WAIT`
//! return at once (no lost wake-ups).
//!
//! Under `cfg(loom)` the atomics are loom's and the futex sleep becomes a
//! `loom::thread::yield_now()`, so the protocol can be model-checked.

use std::fmt;
use std::time::{Duration, Instant};

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, Ordering};

/// Rounds of busy-waiting before a contended acquirer goes to sleep.
#[cfg(not(loom))]
pub const SPIN_LIMIT: u32 = 128;
/// Rounds of busy-waiting before a contended acquirer goes to sleep (kept
/// tiny under loom to bound the state space).
#[cfg(loom)]
pub const SPIN_LIMIT: u32 = 1;

/// While asleep on a lock, a waiter wakes this often to check whether the
/// holder died.
pub const DEAD_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Someone sleeps (or is about to sleep) on the futex word: the releaser
/// must wake.
const WAITERS: u32 = 1 << 31;
/// [`RwLock`] only: the lock is write-held; the low bits are the writer's pid.
const WRITER: u32 = 1 << 30;
/// [`RwLock`] only: a writer waits for readers to drain; new readers hold off.
const WRITER_WAIT: u32 = 1 << 29;
/// The low bits: the holder's pid ([`SpinLock`], write-held [`RwLock`]) or
/// the reader count (read-held [`RwLock`]).
const LOW: u32 = WRITER_WAIT - 1;

/// Why a timed lock attempt gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock stayed held for the whole timeout by a live holder.
    #[error(
        "lock not acquired within {waited:?}: held by {holder}; if that process is stuck, \
         inspect it (e.g. `cat /proc/<pid>/stack`) or stop it"
    )]
    Timeout {
        /// How long the caller waited.
        waited: Duration,
        /// Who held the lock when the caller gave up.
        holder: Holder,
    },
    /// The process holding the lock has died; the lock will never be
    /// released by it.
    #[error(
        "lock held by pid {pid}, which has exited without releasing it; the data it guards \
         may be inconsistent (take the lock over with take_over_dead_owner after repairing, \
         or restart all processes sharing this memory)"
    )]
    OwnerDead {
        /// The dead holder's pid.
        pid: u32,
    },
}

/// Who held a lock, as seen by a caller that gave up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Holder {
    /// Held exclusively by the process with this pid.
    Process(u32),
    /// Read-held by this many readers (readers are not named).
    Readers(u32),
    /// Released just as the caller gave up.
    Nobody,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Process(pid) => write!(f, "pid {pid}"),
            Holder::Readers(n) => write!(f, "{n} reader(s)"),
            Holder::Nobody => f.write_str("nobody (released just now)"),
        }
    }
}

/// A process-shared spinlock (with a futex sleep after a short spin) whose
/// word records the holder's pid.
///
/// Lock word: `0` = free; otherwise `pid | WAITERS?`.
///
/// Zero-filled memory is a valid unlocked `SpinLock`.
#[repr(C)]
pub struct SpinLock {
    word: AtomicU32,
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<SpinLock>() == 4);
    assert!(std::mem::align_of::<SpinLock>() == 4);
    assert!(std::mem::size_of::<RwLock>() == 4);
    assert!(std::mem::align_of::<RwLock>() == 4);
};

impl Default for SpinLock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SpinLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock")
            .field("holder_pid", &self.holder_pid())
            .finish()
    }
}

/// Proof that the holder owns a [`SpinLock`]; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct SpinGuard<'a> {
    lock: &'a SpinLock,
}

impl fmt::Debug for SpinGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpinGuard")
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

impl SpinLock {
    /// An unlocked lock (all bits zero).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
        }
    }

    /// An unlocked lock (all bits zero).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
        }
    }

    /// Takes the lock if it is free, without waiting.
    pub fn try_lock(&self) -> Option<SpinGuard<'_>> {
        let me = current_pid();
        let v = self.word.load(Ordering::Relaxed);
        if v & LOW != 0 {
            return None;
        }
        // Acquire: pairs with the Release in `unlock`. Keep WAITERS: sleepers
        // still need a wake when we release.
        self.word
            .compare_exchange(v, me | (v & WAITERS), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinGuard { lock: self })
    }

    /// Takes the lock, waiting as long as it takes.
    ///
    /// If the holder dies, this logs one error naming it and keeps waiting;
    /// use [`lock_timeout`](Self::lock_timeout) to get an error instead.
    pub fn lock(&self) -> SpinGuard<'_> {
        let me = current_pid();
        // Acquire: pairs with the Release in `unlock`.
        if self
            .word
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Without a deadline the slow path only returns Ok.
            let _ = self.lock_slow(me, None);
        }
        SpinGuard { lock: self }
    }

    /// Takes the lock, giving up after `timeout` (or as soon as the holder is
    /// seen to be dead) with an error that names the holder.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<SpinGuard<'_>, LockError> {
        let me = current_pid();
        if self
            .word
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Ok(SpinGuard { lock: self });
        }
        let deadline = Instant::now() + timeout;
        self.lock_slow(me, Some((deadline, timeout)))?;
        Ok(SpinGuard { lock: self })
    }

    fn lock_slow(&self, me: u32, deadline: Option<(Instant, Duration)>) -> Result<(), LockError> {
        let mut spins = 0;
        let mut slept = false;
        let mut dead_reported = false;
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if v & LOW == 0 {
                // Free. Once we have slept, other sleepers may exist that the
                // releaser's single wake did not reach, so take the lock with
                // WAITERS set to pass the wake on when we release.
                let keep = if slept { WAITERS } else { v & WAITERS };
                // Acquire: pairs with the Release in `unlock`.
                if self
                    .word
                    .compare_exchange_weak(v, me | keep, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                spin_hint();
                continue;
            }
            // Announce a sleeper. Relaxed: no data is published by this bit.
            if v & WAITERS == 0
                && self
                    .word
                    .compare_exchange_weak(v, v | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let Some(slice) = wait_slice(deadline) else {
                // Out of time. If the lock is free with sleepers, our wake
                // may have been the one consumed: pass it on.
                let now = self.word.load(Ordering::Relaxed);
                if now & LOW == 0 && now & WAITERS != 0 {
                    futex_wake(&self.word, 1);
                }
                let pid = now & LOW;
                return Err(give_up(deadline, pid, Holder::Process(pid)));
            };
            let timed_out = futex_wait(&self.word, v | WAITERS, slice);
            slept = true;
            let now = self.word.load(Ordering::Relaxed);
            let pid = now & LOW;
            // Only after a full slice with the same holder, and never for
            // our own pid (another thread of this process): the check reads
            // /proc.
            if timed_out && pid != 0 && pid != me && pid == v & LOW && pid_is_dead(pid) {
                if deadline.is_some() {
                    if now & WAITERS != 0 {
                        // We leave; do not leave other sleepers without a
                        // chance to see the dead owner too.
                        futex_wake(&self.word, 1);
                    }
                    return Err(LockError::OwnerDead { pid });
                }
                report_dead_once(&mut dead_reported, pid, "spinlock");
            }
        }
    }

    fn unlock(&self) {
        // Release: everything written under the lock happens-before the next
        // holder's Acquire.
        let old = self.word.swap(0, Ordering::Release);
        if old & WAITERS != 0 {
            futex_wake(&self.word, 1);
        }
    }

    /// The pid of the process holding the lock, if it is held.
    pub fn holder_pid(&self) -> Option<u32> {
        match self.word.load(Ordering::Relaxed) & LOW {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Whether the lock is held by a process that no longer exists.
    pub fn is_owner_dead(&self) -> bool {
        self.holder_pid().is_some_and(pid_is_dead)
    }

    /// If the holder is dead, takes the lock over from it and returns the
    /// guard; otherwise `None`.
    ///
    /// Like a robust pthread mutex returning `EOWNERDEAD`: the lock is yours
    /// now, but the data it guards may have been left half-updated by the
    /// dead holder; repair or reinitialise it before releasing.
    pub fn take_over_dead_owner(&self) -> Option<SpinGuard<'_>> {
        let v = self.word.load(Ordering::Relaxed);
        let pid = v & LOW;
        if pid == 0 || !pid_is_dead(pid) {
            return None;
        }
        // Acquire: see the dead holder's writes, such as they are.
        self.word
            .compare_exchange(
                v,
                current_pid() | (v & WAITERS),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()
            .map(|_| SpinGuard { lock: self })
    }
}

/// A process-shared reader-writer lock (futex sleep after a short spin),
/// writer-preferring like DPDK's `rte_rwlock`: once a writer waits, new
/// readers hold off until it has had its turn.
///
/// Lock word: bit 31 `WAITERS`, bit 30 `WRITER`, bit 29 `WRITER_WAIT`, bits
/// 0..=28 the writer's pid (when `WRITER`) or the reader count.
///
/// Zero-filled memory is a valid unlocked `RwLock`. Taking a read lock
/// recursively while a writer waits deadlocks, as with DPDK's and std's.
#[repr(C)]
pub struct RwLock {
    word: AtomicU32,
}

impl Default for RwLock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RwLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwLock")
            .field("holder", &self.holder())
            .finish()
    }
}

/// Shared access to an [`RwLock`]; released when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ReadGuard<'a> {
    lock: &'a RwLock,
}

/// Exclusive access to an [`RwLock`]; released when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct WriteGuard<'a> {
    lock: &'a RwLock,
}

impl fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReadGuard")
    }
}

impl fmt::Debug for WriteGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WriteGuard")
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.lock.read_unlock();
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.lock.write_unlock();
    }
}

impl RwLock {
    /// An unlocked lock (all bits zero).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
        }
    }

    /// An unlocked lock (all bits zero).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
        }
    }

    /// Takes a read lock if no writer holds or waits for the lock.
    pub fn try_read(&self) -> Option<ReadGuard<'_>> {
        let v = self.word.load(Ordering::Relaxed);
        if !Self::can_read(v) {
            return None;
        }
        // Acquire: pairs with the Release in `write_unlock`.
        self.word
            .compare_exchange(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| ReadGuard { lock: self })
    }

    /// Takes the write lock if the lock is free.
    pub fn try_write(&self) -> Option<WriteGuard<'_>> {
        let v = self.word.load(Ordering::Relaxed);
        if v & (WRITER | LOW) != 0 {
            return None;
        }
        // Acquire: pairs with the Release in `read_unlock`/`write_unlock`.
        // Clears WRITER_WAIT (a waiting writer re-announces itself), keeps
        // WAITERS.
        self.word
            .compare_exchange(
                v,
                WRITER | current_pid() | (v & WAITERS),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()
            .map(|_| WriteGuard { lock: self })
    }

    /// Takes a read lock, waiting as long as it takes (logging once if the
    /// writer is seen dead).
    pub fn read(&self) -> ReadGuard<'_> {
        let _ = self.read_slow(None);
        ReadGuard { lock: self }
    }

    /// Takes a read lock, giving up after `timeout` or once the writer holding
    /// the lock is seen dead.
    pub fn read_timeout(&self, timeout: Duration) -> Result<ReadGuard<'_>, LockError> {
        self.read_slow(Some((Instant::now() + timeout, timeout)))?;
        Ok(ReadGuard { lock: self })
    }

    /// Takes the write lock, waiting as long as it takes (logging once if the
    /// holding writer is seen dead).
    pub fn write(&self) -> WriteGuard<'_> {
        let _ = self.write_slow(None);
        WriteGuard { lock: self }
    }

    /// Takes the write lock, giving up after `timeout` or once the writer
    /// holding the lock is seen dead.
    pub fn write_timeout(&self, timeout: Duration) -> Result<WriteGuard<'_>, LockError> {
        self.write_slow(Some((Instant::now() + timeout, timeout)))?;
        Ok(WriteGuard { lock: self })
    }

    fn can_read(v: u32) -> bool {
        v & (WRITER | WRITER_WAIT) == 0 && v & LOW < LOW
    }

    fn read_slow(&self, deadline: Option<(Instant, Duration)>) -> Result<(), LockError> {
        let mut spins = 0;
        let mut dead_reported = false;
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if Self::can_read(v) {
                // Acquire: pairs with the Release in `write_unlock`.
                if self
                    .word
                    .compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                spin_hint();
                continue;
            }
            self.sleep(v, deadline, &mut dead_reported)?;
        }
    }

    fn write_slow(&self, deadline: Option<(Instant, Duration)>) -> Result<(), LockError> {
        let me = current_pid();
        let mut spins = 0;
        let mut dead_reported = false;
        loop {
            let v = self.word.load(Ordering::Relaxed);
            if v & (WRITER | LOW) == 0 {
                // Free. Acquire: pairs with the Release in the unlocks.
                // Clears WRITER_WAIT: other waiting writers re-announce after
                // the wake-all at our release.
                if self
                    .word
                    .compare_exchange_weak(
                        v,
                        WRITER | me | (v & WAITERS),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if v & WRITER == 0 && v & WRITER_WAIT == 0 {
                // Readers hold it: stop new readers. Relaxed: no data.
                let _ = self.word.compare_exchange_weak(
                    v,
                    v | WRITER_WAIT,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                continue;
            }
            if spins < SPIN_LIMIT {
                spins += 1;
                spin_hint();
                continue;
            }
            if let Err(e) = self.sleep(v, deadline, &mut dead_reported) {
                // We announced ourselves with WRITER_WAIT; readers must not
                // keep waiting for a writer that left. Other waiting writers
                // re-announce once woken.
                let old = self.word.fetch_and(!WRITER_WAIT, Ordering::Relaxed);
                if old & WAITERS != 0 {
                    futex_wake(&self.word, u32::MAX);
                }
                return Err(e);
            }
        }
    }

    /// Sleeps on the word while it still equals `v` (plus `WAITERS`), at most
    /// until the deadline or for one dead-owner check interval. Errors when the
    /// deadline has passed or the writer is dead (timed callers only).
    fn sleep(
        &self,
        v: u32,
        deadline: Option<(Instant, Duration)>,
        dead_reported: &mut bool,
    ) -> Result<(), LockError> {
        // Announce a sleeper. Relaxed: no data is published by this bit.
        if v & WAITERS == 0
            && self
                .word
                .compare_exchange(v, v | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        let Some(slice) = wait_slice(deadline) else {
            let now = self.word.load(Ordering::Relaxed);
            let pid = if now & WRITER != 0 { now & LOW } else { 0 };
            return Err(give_up(deadline, pid, Self::holder_of(now)));
        };
        let timed_out = futex_wait(&self.word, v | WAITERS, slice);
        let now = self.word.load(Ordering::Relaxed);
        if timed_out
            && now & WRITER != 0
            && v & WRITER != 0
            && now & LOW == v & LOW
            && now & LOW != current_pid()
        {
            let pid = now & LOW;
            if pid_is_dead(pid) {
                if deadline.is_some() {
                    return Err(LockError::OwnerDead { pid });
                }
                report_dead_once(dead_reported, pid, "rwlock");
            }
        }
        Ok(())
    }

    fn read_unlock(&self) {
        // Release: our reads under the lock happen-before the next writer's
        // Acquire.
        let old = self.word.fetch_sub(1, Ordering::Release);
        if old & LOW == 1 && old & WAITERS != 0 {
            // Last reader out with sleepers (a writer, or readers held off
            // by WRITER_WAIT): clear the bit and wake everyone; whoever still
            // has to wait sets it again before sleeping, and a sleeper whose
            // expected value included the bit returns at once from FUTEX_WAIT.
            self.word.fetch_and(!WAITERS, Ordering::Relaxed);
            futex_wake(&self.word, u32::MAX);
        }
    }

    fn write_unlock(&self) {
        // Release: everything written under the lock happens-before the next
        // holder's Acquire. Clearing WRITER_WAIT is safe: the wake-all below
        // lets waiting writers re-announce.
        let old = self.word.swap(0, Ordering::Release);
        if old & WAITERS != 0 {
            futex_wake(&self.word, u32::MAX);
        }
    }

    fn holder_of(v: u32) -> Holder {
        if v & WRITER != 0 {
            Holder::Process(v & LOW)
        } else if v & LOW != 0 {
            Holder::Readers(v & LOW)
        } else {
            Holder::Nobody
        }
    }

    /// Who holds the lock right now (a snapshot).
    pub fn holder(&self) -> Holder {
        Self::holder_of(self.word.load(Ordering::Relaxed))
    }

    /// The pid of the process holding the write lock, if it is write-held.
    pub fn writer_pid(&self) -> Option<u32> {
        match self.holder() {
            Holder::Process(pid) => Some(pid),
            _ => None,
        }
    }

    /// Whether the lock is write-held by a process that no longer exists.
    /// (Readers are counted, not named: a dead reader is not detected.)
    pub fn is_owner_dead(&self) -> bool {
        self.writer_pid().is_some_and(pid_is_dead)
    }

    /// If the write lock is held by a dead process, takes it over and
    /// returns the guard; otherwise `None`. The guarded data may be
    /// half-updated (see [`SpinLock::take_over_dead_owner`]).
    pub fn take_over_dead_writer(&self) -> Option<WriteGuard<'_>> {
        let v = self.word.load(Ordering::Relaxed);
        if v & WRITER == 0 || !pid_is_dead(v & LOW) {
            return None;
        }
        // Acquire: see the dead holder's writes, such as they are.
        self.word
            .compare_exchange(
                v,
                WRITER | current_pid() | (v & WAITERS),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()
            .map(|_| WriteGuard { lock: self })
    }
}

/// How long to sleep next: the time left (capped at the dead-owner check
/// interval), or `None` if the deadline has passed.
fn wait_slice(deadline: Option<(Instant, Duration)>) -> Option<Duration> {
    match deadline {
        None => Some(DEAD_CHECK_INTERVAL),
        Some((at, _)) => {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                None
            } else {
                Some(left.min(DEAD_CHECK_INTERVAL))
            }
        }
    }
}

fn give_up(deadline: Option<(Instant, Duration)>, pid: u32, holder: Holder) -> LockError {
    if pid != 0 && pid_is_dead(pid) {
        return LockError::OwnerDead { pid };
    }
    LockError::Timeout {
        waited: deadline.map_or(Duration::ZERO, |(_, t)| t),
        holder,
    }
}

fn report_dead_once(reported: &mut bool, pid: u32, what: &str) {
    if !*reported {
        *reported = true;
        tracing::error!(
            pid,
            "shared {what} is held by pid {pid}, which has died; this waiter will wait \
             forever (use a *_timeout lock call or take_over_dead_* to recover)"
        );
    }
}

thread_local! {
    /// memplane locks (heap, hotplug, callback registry) this thread holds.
    static HELD: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Counts a memplane lock as held by this thread while alive: code that
/// may be re-entered (a global allocator) asks [`held_here`] before doing
/// anything that would wait for one of them.
#[derive(Debug)]
pub struct HeldMark(());

impl HeldMark {
    /// Marks one more lock held.
    pub fn new() -> HeldMark {
        let _ = HELD.try_with(|h| h.set(h.get() + 1));
        HeldMark(())
    }
}

impl Default for HeldMark {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HeldMark {
    fn drop(&mut self) {
        let _ = HELD.try_with(|h| h.set(h.get().saturating_sub(1)));
    }
}

/// How many memplane locks this thread holds (heap locks, the hotplug
/// lock, the callback registry).
pub fn held_here() -> u32 {
    HELD.try_with(std::cell::Cell::get).unwrap_or(0)
}

/// This process's pid, cached (cleared in a forked child): cheap enough
/// for fast paths that must notice a fork.
pub(crate) fn cached_pid() -> u32 {
    current_pid()
}

/// This process's pid as stored in lock words (always in `1..2^29`).
///
/// Cached: glibc's `getpid` is a system call, which would double the
/// cost of an uncontended lock. A fork handler clears the cache in the
/// child, so a forked process never takes locks under its parent's pid.
#[cfg(not(loom))]
fn current_pid() -> u32 {
    use std::sync::atomic::AtomicU32 as StdAtomicU32;
    static CACHED: StdAtomicU32 = StdAtomicU32::new(0);
    static HANDLER: std::sync::Once = std::sync::Once::new();
    extern "C" fn forget_pid() {
        CACHED.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    let pid = CACHED.load(std::sync::atomic::Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    HANDLER.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic, which
        // is async-signal-safe and valid in the child after fork.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
        if rc != 0 {
            tracing::warn!(
                rc,
                "pthread_atfork failed: lock words may carry a stale pid after fork"
            );
        }
    });
    let pid = std::process::id() & LOW;
    CACHED.store(pid, std::sync::atomic::Ordering::Relaxed);
    pid
}

/// This process's pid as stored in lock words (always in `1..2^29`).
#[cfg(loom)]
fn current_pid() -> u32 {
    std::process::id() & LOW
}

/// Whether no live process has this pid: `kill(pid, 0)` fails with ESRCH, or
/// `/proc/<pid>/stat` shows a zombie (a killed child not yet reaped by its
/// parent still answers `kill`).
pub fn pid_is_dead(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    if let Err(rustix::io::Errno::SRCH) = rustix::process::test_kill_process(p) {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // /proc not mounted or raced with exit: kill said it exists.
        return false;
    };
    // "pid (comm) S ..." where comm may contain spaces and parentheses.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .is_some_and(|state| state == 'Z' || state == 'X')
}

#[cfg(not(loom))]
fn spin_hint() {
    std::hint::spin_loop();
}

#[cfg(loom)]
fn spin_hint() {
    loom::thread::yield_now();
}

/// `FUTEX_WAIT` (shared, not private) while `*word == expected`, at most
/// `timeout`. Spurious returns are fine: callers re-check. Returns whether
/// the full timeout elapsed.
#[cfg(not(loom))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    use rustix::thread::futex;
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // EAGAIN (value changed), EINTR and ETIMEDOUT all mean "look again".
    matches!(
        futex::wait(word, futex::Flags::empty(), expected, Some(&ts)),
        Err(rustix::io::Errno::TIMEDOUT)
    )
}

#[cfg(loom)]
fn futex_wait(_word: &AtomicU32, _expected: u32, _timeout: Duration) -> bool {
    loom::thread::yield_now();
    false
}

/// `FUTEX_WAKE` (shared, not private) of up to `n` sleepers.
#[cfg(not(loom))]
fn futex_wake(word: &AtomicU32, n: u32) {
    use rustix::thread::futex;
    let _ = futex::wake(word, futex::Flags::empty(), n);
}

#[cfg(loom)]
fn futex_wake(_word: &AtomicU32, _n: u32) {}

#[cfg(all(test, not(loom)))]
#[allow(clippy::many_single_char_names)]
mod tests {
    use super::*;
    use std::cell::UnsafeCell;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A non-atomic counter guarded by an external lock.
    struct Shared<L> {
        lock: L,
        a: UnsafeCell<u64>,
        b: UnsafeCell<u64>,
    }
    // SAFETY: `a` and `b` are only accessed while holding `lock`.
    unsafe impl<L: Sync> Sync for Shared<L> {}

    #[test]
    fn layout_and_zero_is_unlocked() {
        let z = SpinLock::new();
        assert_eq!(z.holder_pid(), None);
        let g = z.try_lock().unwrap();
        assert_eq!(z.holder_pid(), Some(std::process::id()));
        assert!(!z.is_owner_dead());
        assert!(z.try_lock().is_none());
        drop(g);
        assert!(z.try_lock().is_some());
        let rw = RwLock::new();
        let r1 = rw.try_read().unwrap();
        let r2 = rw.read();
        assert_eq!(rw.holder(), Holder::Readers(2));
        assert!(rw.try_write().is_none());
        drop((r1, r2));
        let w = rw.write();
        assert_eq!(rw.writer_pid(), Some(std::process::id()));
        assert!(rw.try_read().is_none());
        drop(w);
        assert_eq!(rw.holder(), Holder::Nobody);
    }

    #[test]
    fn spin_timeout_names_live_holder() {
        let l = SpinLock::new();
        let _g = l.lock();
        let t0 = Instant::now();
        let e = l.lock_timeout(Duration::from_millis(150)).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert_eq!(
            e,
            LockError::Timeout {
                waited: Duration::from_millis(150),
                holder: Holder::Process(std::process::id())
            }
        );
        assert!(e.to_string().contains(&std::process::id().to_string()));
    }

    #[test]
    fn rw_timeouts_name_holders() {
        let l = RwLock::new();
        let r = l.read();
        let e = l.write_timeout(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(
            e,
            LockError::Timeout {
                holder: Holder::Readers(1),
                ..
            }
        ));
        // The writer gave up: readers must not be held off any more.
        let r2 = l.read_timeout(Duration::from_millis(50)).unwrap();
        drop((r, r2));
        let w = l.write();
        let e = l.read_timeout(Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(e, LockError::Timeout { holder: Holder::Process(p), .. } if p == std::process::id())
        );
        drop(w);
    }

    #[test]
    fn dead_pid_is_detected() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Zombie until reaped: still dead.
        std::thread::sleep(Duration::from_millis(50));
        assert!(pid_is_dead(pid));
        child.wait().unwrap();
        assert!(pid_is_dead(pid));
        assert!(!pid_is_dead(std::process::id()));
        // Fake a lock word held by the dead pid.
        let l = SpinLock {
            word: AtomicU32::new(pid),
        };
        assert!(l.is_owner_dead());
        assert_eq!(
            l.lock_timeout(Duration::from_secs(5)).unwrap_err(),
            LockError::OwnerDead { pid }
        );
        let g = l.take_over_dead_owner().unwrap();
        assert_eq!(l.holder_pid(), Some(std::process::id()));
        drop(g);
        let rw = RwLock {
            word: AtomicU32::new(WRITER | pid),
        };
        assert!(rw.is_owner_dead());
        assert_eq!(
            rw.read_timeout(Duration::from_secs(5)).unwrap_err(),
            LockError::OwnerDead { pid }
        );
        assert!(rw.take_over_dead_writer().is_some());
        assert_eq!(rw.holder(), Holder::Nobody);
    }

    /// Any guard, boxed.
    trait Held {}
    impl<T> Held for T {}

    /// Takes a lock, returning its guard.
    type Locker<L> = for<'x> fn(&'x L) -> Box<dyn Held + 'x>;

    fn hammer<L: Sync + Send + 'static>(lock: L, writer: Locker<L>, reader: Option<Locker<L>>) {
        const THREADS: u64 = 4;
        const ITERS: u64 = 20_000;
        let s = Arc::new(Shared {
            lock,
            a: UnsafeCell::new(0),
            b: UnsafeCell::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for _ in 0..THREADS {
            let s = s.clone();
            hs.push(std::thread::spawn(move || {
                for i in 0..ITERS {
                    let g = writer(&s.lock);
                    // SAFETY: exclusive access under the write guard.
                    unsafe {
                        *s.a.get() += 1;
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                        *s.b.get() += 1;
                    }
                    drop(g);
                }
            }));
        }
        let mut rs = Vec::new();
        if let Some(reader) = reader {
            for _ in 0..2 {
                let s = s.clone();
                let stop = stop.clone();
                rs.push(std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let g = reader(&s.lock);
                        // SAFETY: shared access under the read guard; writers
                        // are excluded.
                        let (a, b) = unsafe { (*s.a.get(), *s.b.get()) };
                        assert_eq!(a, b, "reader saw a half-done update");
                        drop(g);
                        n += 1;
                    }
                    n
                }));
            }
        }
        for h in hs {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in rs {
            assert!(r.join().unwrap() > 0);
        }
        let g = writer(&s.lock);
        // SAFETY: all threads joined, and we hold the lock.
        unsafe {
            assert_eq!(*s.a.get(), THREADS * ITERS);
            assert_eq!(*s.b.get(), THREADS * ITERS);
        }
        drop(g);
    }

    #[test]
    fn spinlock_stress_four_threads() {
        hammer(SpinLock::new(), |l| Box::new(l.lock()), None);
    }

    #[test]
    fn spinlock_try_and_timeout_stress() {
        hammer(
            SpinLock::new(),
            |l| loop {
                if let Some(g) = l.try_lock() {
                    return Box::new(g);
                }
                if let Ok(g) = l.lock_timeout(Duration::from_micros(50)) {
                    return Box::new(g);
                }
            },
            None,
        );
    }

    #[test]
    fn rwlock_stress_writers_and_readers() {
        hammer(
            RwLock::new(),
            |l| Box::new(l.write()),
            Some(|l| Box::new(l.read())),
        );
    }

    #[test]
    fn rwlock_timeout_stress() {
        hammer(
            RwLock::new(),
            |l| loop {
                if let Ok(g) = l.write_timeout(Duration::from_micros(100)) {
                    return Box::new(g);
                }
            },
            Some(|l| loop {
                if let Ok(g) = l.read_timeout(Duration::from_micros(100)) {
                    return Box::new(g);
                }
            }),
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Run (needs `[target.'cfg(loom)'.dependencies] loom.workspace = true`
    //! in crates/memplane/Cargo.toml):
    //! `RUSTFLAGS="--cfg loom" cargo test -p memplane --release --lib shm::lock::loom_tests`
    //!
    //! Until then, a scratch crate that depends on loom, rustix (thread,
    //! process), thiserror and tracing and whose lib.rs is
    //! `#[path = ".../crates/memplane/src/shm/lock.rs"] pub mod lock;` runs the
    //! same models with `RUSTFLAGS="--cfg loom" cargo test --release`.
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    struct Shared<L> {
        lock: L,
        v: UnsafeCell<u32>,
    }
    // SAFETY: `v` is only accessed while holding `lock`; loom checks it.
    unsafe impl<L: Sync> Sync for Shared<L> {}
    // SAFETY: as above.
    unsafe impl<L: Send> Send for Shared<L> {}

    #[test]
    fn spinlock_mutual_exclusion() {
        loom::model(|| {
            let s = Arc::new(Shared {
                lock: SpinLock::new(),
                v: UnsafeCell::new(0),
            });
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let s = s.clone();
                    thread::spawn(move || {
                        let _g = s.lock.lock();
                        // SAFETY: under the lock.
                        s.v.with_mut(|p| unsafe { *p += 1 });
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            let _g = s.lock.lock();
            // SAFETY: under the lock.
            assert_eq!(s.v.with(|p| unsafe { *p }), 2);
        });
    }

    /// Bounded preemptions keep the spin-with-yield loops tractable.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(f);
    }

    #[test]
    fn rwlock_writer_and_reader() {
        model(|| {
            let s = Arc::new(Shared {
                lock: RwLock::new(),
                v: UnsafeCell::new(0),
            });
            let w = {
                let s = s.clone();
                thread::spawn(move || {
                    let _g = s.lock.write();
                    // SAFETY: under the write lock.
                    s.v.with_mut(|p| unsafe { *p += 1 });
                })
            };
            {
                let _g = s.lock.read();
                // SAFETY: under the read lock.
                let v = s.v.with(|p| unsafe { *p });
                assert!(v <= 1);
            }
            w.join().unwrap();
            let _g = s.lock.read();
            // SAFETY: under the read lock.
            assert_eq!(s.v.with(|p| unsafe { *p }), 1);
        });
    }

    #[test]
    fn rwlock_two_writers() {
        model(|| {
            let s = Arc::new(Shared {
                lock: RwLock::new(),
                v: UnsafeCell::new(0),
            });
            let w = {
                let s = s.clone();
                thread::spawn(move || {
                    let _g = s.lock.write();
                    // SAFETY: under the write lock.
                    s.v.with_mut(|p| unsafe { *p += 1 });
                })
            };
            {
                let _g = s.lock.write();
                // SAFETY: under the write lock.
                s.v.with_mut(|p| unsafe { *p += 1 });
            }
            w.join().unwrap();
            let _g = s.lock.read();
            // SAFETY: under the read lock.
            assert_eq!(s.v.with(|p| unsafe { *p }), 2);
        });
    }
}
