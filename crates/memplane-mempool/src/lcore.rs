//! Lcore ids: a small registry of threads in a shared memzone
//! (`MPL_lcores`, one per instance), so per-lcore caches in pool headers
//! have exactly one user each, in any process.
//!
//! A thread gets an id with [`register_thread`]; the id is released when
//! the thread exits (a thread-local guard), or by [`unregister_thread`].
//! Threads that never register use no cache (DPDK's non-EAL threads).
//! A slot records `pid << 32 | tid`; when every slot is taken, slots of
//! threads that no longer exist (a killed process, a thread whose guard
//! could not run) are reclaimed.
//!
//! Caches belong to the id, not to the thread: objects a thread left in
//! its caches when it exited are still counted as available, and the next
//! thread given the same id uses them.
//!
//! The guard releases the slot at thread exit only while some pool handle
//! of the instance is alive in this process (a process-wide table counts
//! them), since the instance's memory may be unmapped otherwise; a slot
//! not released that way is reclaimed as above. After `fork`, a child's
//! threads must not use ids registered by the parent (not detected).

// Zones are 64-byte aligned (memzone minimum): header casts are aligned.
#![allow(clippy::cast_ptr_alignment)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memplane::memzone::MemzoneFlags;
use memplane::{Error, Memory};

use crate::layout::MAX_LCORES;
use crate::MempoolError;

/// Name of the registry's memzone.
pub const LCORE_ZONE: &str = "MPL_lcores";

#[repr(C, align(64))]
struct Registry {
    /// Random identity of this registry (set once by the first user).
    token: AtomicU64,
    _pad: [u64; 7],
    slots: [AtomicU64; MAX_LCORES],
}

/// A handle on an instance's registry (process-local: address + token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegistryRef {
    addr: usize,
    token: u64,
}

/// Registries with live pool handles in this process: address -> (token,
/// handles).
static LIVE: Mutex<Option<HashMap<usize, (u64, usize)>>> = Mutex::new(None);

fn live<R>(f: impl FnOnce(&mut HashMap<usize, (u64, usize)>) -> R) -> R {
    let mut g = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(g.get_or_insert_with(HashMap::new))
}

struct Tls {
    entries: Vec<(RegistryRef, u32)>,
}

impl Drop for Tls {
    fn drop(&mut self) {
        for (r, id) in self.entries.drain(..) {
            live(|m| {
                // Release only while a pool handle keeps the instance
                // mapped; the table's lock keeps it mapped while we write.
                if m.get(&r.addr).is_some_and(|&(t, c)| t == r.token && c > 0) {
                    // SAFETY: the registry is mapped (a live handle
                    // borrows its Memory, and handles are counted down
                    // under this lock before the Memory can be dropped).
                    let reg = unsafe { &*(r.addr as *const Registry) };
                    let _ = reg.slots[id as usize].compare_exchange(
                        owner_word(),
                        0,
                        Ordering::Release,
                        Ordering::Relaxed,
                    );
                }
            });
        }
    }
}

thread_local! {
    static TLS: RefCell<Tls> = const { RefCell::new(Tls { entries: Vec::new() }) };
    /// The last (registry address, token, id) looked up: the hot path
    /// (no destructor, so no lazy registration on access).
    static LAST: Last = const { Last(Cell::new((0, 0, 0))) };
    /// Live [`LcoreCache`](crate::LcoreCache) handles of this thread: the
    /// thread's lcore id cannot be unregistered while one lives.
    static CACHE_HANDLES: Cell<u32> = const { Cell::new(0) };
}

/// [`LAST`]'s cell, 32-byte aligned: its 24 bytes then never straddle
/// two cache lines, whatever order the linker gives the thread-locals
/// (every cached get and put reads it; an unrelated change once moved it
/// to `fs - 0xd0`, across a line boundary).
#[repr(align(32))]
struct Last(Cell<(usize, u64, u32)>);

/// An [`LcoreCache`](crate::LcoreCache) handle was made on this thread.
pub(crate) fn cache_handle_made() {
    CACHE_HANDLES.with(|c| c.set(c.get() + 1));
}

/// An [`LcoreCache`](crate::LcoreCache) handle of this thread was dropped.
pub(crate) fn cache_handle_dropped() {
    CACHE_HANDLES.with(|c| c.set(c.get().saturating_sub(1)));
}

fn owner_word() -> u64 {
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u64;
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u64;
    (pid << 32) | tid
}

fn owner_alive(word: u64) -> bool {
    let (pid, tid) = (word >> 32, word & 0xffff_ffff);
    std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

fn random_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(owner_word());
    h.finish() | 1
}

impl RegistryRef {
    /// The instance's registry, created on first use.
    pub(crate) fn open(mem: &Memory) -> Result<Self, MempoolError> {
        let size = std::mem::size_of::<Registry>();
        let zone = match mem.memzone_lookup(LCORE_ZONE) {
            Some(z) => z,
            None => match mem.memzone_reserve_aligned(
                LCORE_ZONE,
                size,
                memplane::heap::SOCKET_ID_ANY,
                MemzoneFlags::ZERO,
                64,
            ) {
                Ok(z) => z,
                Err(Error::Memzone(memplane::memzone::MemzoneError::Exists { .. })) => mem
                    .memzone_lookup(LCORE_ZONE)
                    .ok_or_else(|| MempoolError::Corrupt {
                        name: LCORE_ZONE.into(),
                        why: "lcore registry zone vanished".into(),
                    })?,
                Err(e) => return Err(e.into()),
            },
        };
        if zone.len() < size {
            return Err(MempoolError::Corrupt {
                name: LCORE_ZONE.into(),
                why: format!("zone is {} bytes, the registry needs {size}", zone.len()),
            });
        }
        // SAFETY: the zone is ours by name convention, at least `size`
        // bytes, 64-aligned, zeroed at creation; all fields are atomics.
        let reg = unsafe { &*zone.as_ptr().cast::<Registry>() };
        let token =
            match reg
                .token
                .compare_exchange(0, random_token(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => reg.token.load(Ordering::Acquire),
                Err(t) => t,
            };
        Ok(Self {
            addr: zone.as_ptr() as usize,
            token,
        })
    }

    fn reg(&self) -> &Registry {
        // SAFETY: only called while a pool handle (which borrows the
        // Memory) or the caller's `&Memory` keeps the zone mapped.
        unsafe { &*(self.addr as *const Registry) }
    }

    /// A pool handle starts using this registry.
    pub(crate) fn hold(self) {
        live(|m| {
            let e = m.entry(self.addr).or_insert((self.token, 0));
            if e.0 != self.token {
                *e = (self.token, 0);
            }
            e.1 += 1;
        });
    }

    /// A pool handle stops using it.
    pub(crate) fn release(self) {
        live(|m| {
            if let Some(e) = m.get_mut(&self.addr) {
                if e.0 == self.token {
                    e.1 = e.1.saturating_sub(1);
                    if e.1 == 0 {
                        m.remove(&self.addr);
                    }
                }
            }
        });
    }

    /// The calling thread's id in this registry, if registered.
    #[inline]
    pub(crate) fn current(self) -> Option<u32> {
        let (a, t, id) = LAST.with(|l| l.0.get());
        if a == self.addr && t == self.token {
            return Some(id);
        }
        self.current_slow()
    }

    #[cold]
    fn current_slow(self) -> Option<u32> {
        let id = TLS
            .try_with(|t| {
                let t = t.borrow();
                t.entries
                    .iter()
                    .find(|(r, _)| *r == self)
                    .map(|&(_, id)| id)
            })
            .ok()
            .flatten()?;
        LAST.with(|l| l.0.set((self.addr, self.token, id)));
        Some(id)
    }

    fn register(self) -> Result<u32, MempoolError> {
        if let Some(id) = self.current() {
            return Ok(id);
        }
        let me = owner_word();
        let reg = self.reg();
        let claim = |reclaim: bool| {
            reg.slots.iter().enumerate().find_map(|(i, s)| {
                let v = s.load(Ordering::Relaxed);
                let free = v == 0 || (reclaim && !owner_alive(v));
                (free
                    && s.compare_exchange(v, me, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok())
                .then_some(i as u32)
            })
        };
        let id = claim(false)
            .or_else(|| claim(true))
            .ok_or(MempoolError::NoLcore { max: MAX_LCORES })?;
        TLS.with(|t| t.borrow_mut().entries.push((self, id)));
        tracing::debug!(lcore = id, "thread registered");
        Ok(id)
    }

    fn unregister(self) -> Result<bool, MempoolError> {
        let Some(id) = self.current() else {
            return Ok(false);
        };
        let handles = CACHE_HANDLES.with(Cell::get);
        if handles != 0 {
            return Err(MempoolError::LcoreCacheHeld { lcore: id, handles });
        }
        let _ = self.reg().slots[id as usize].compare_exchange(
            owner_word(),
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
        TLS.with(|t| t.borrow_mut().entries.retain(|(r, _)| *r != self));
        LAST.with(|l| l.0.set((0, 0, 0)));
        Ok(true)
    }

    /// Registered ids.
    pub(crate) fn registered(self) -> Vec<(u32, u32, u32)> {
        self.reg()
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let v = s.load(Ordering::Relaxed);
                (v != 0).then_some((i as u32, (v >> 32) as u32, v as u32))
            })
            .collect()
    }
}

/// Gives the calling thread an lcore id in `mem`'s instance (the same id
/// for every pool of the instance), so its gets and puts go through the
/// pools' per-lcore caches. Idempotent. The id is released when the thread
/// exits, or by [`unregister_thread`].
pub fn register_thread(mem: &Memory) -> Result<u32, MempoolError> {
    RegistryRef::open(mem)?.register()
}

/// Releases the calling thread's lcore id (its caches keep their objects,
/// still counted as available). Returns whether it had one; refused with
/// [`MempoolError::LcoreCacheHeld`] while the thread holds
/// [`LcoreCache`](crate::LcoreCache) handles. Flush its
/// caches first ([`Mempool::cache_flush`](crate::Mempool::cache_flush)) if
/// the objects should go back to the backends now.
pub fn unregister_thread(mem: &Memory) -> Result<bool, MempoolError> {
    RegistryRef::open(mem)?.unregister()
}

/// The calling thread's lcore id in `mem`'s instance, if registered.
pub fn lcore_id(mem: &Memory) -> Result<Option<u32>, MempoolError> {
    Ok(RegistryRef::open(mem)?.current())
}

/// Registered lcore ids of the instance: `(id, pid, tid)`.
pub fn registered_lcores(mem: &Memory) -> Result<Vec<(u32, u32, u32)>, MempoolError> {
    Ok(RegistryRef::open(mem)?.registered())
}
