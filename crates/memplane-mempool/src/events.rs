//! Mempool events (DPDK's `rte_mempool_event_callback_register` /
//! `_unregister`): callbacks told when a pool becomes ready (every object
//! placed) and when a pool is about to be destroyed, with a read-only
//! [`MempoolView`] of the pool: its name and its memory chunks (address,
//! length, IOVA), what a driver needs to register the pool's memory for
//! DMA and to unregister it.
//!
//! - [`MempoolEvent::Ready`] fires once per pool, in the process that
//!   completes it: at the end of [`Mempool::create`] (after `obj_init`,
//!   and after leak tracking was switched on when asked), or at the end
//!   of the `populate_*` call that places the last object of a
//!   [`Mempool::create_empty`] pool. A pool whose creation or population
//!   fails does not fire it.
//! - [`MempoolEvent::Destroy`] fires in the process that frees the pool,
//!   once the free is certain to go ahead ([`Mempool::free`] refused with
//!   [`MempoolError::InUse`] fires nothing), after the pool is unpublished
//!   (lookups fail) and before any of its memory is released: the view's
//!   chunks are still mapped. As DPDK, it fires for every pool freed by
//!   [`Mempool::free`] / [`Mempool::free_forced`], also for a
//!   [`create_empty`](Mempool::create_empty) pool that never became ready
//!   (its view says [`populated`](MempoolView::populated) `<`
//!   [`size`](MempoolView::size)); it does not fire when a failed
//!   [`Mempool::create`] rolls back the pool it never handed out.
//!
//! Callbacks are per process, as DPDK's: the registry is in this process's
//! memory (callbacks are code), and a pool's events fire only in the
//! process that populates or frees it. A secondary process that looks up
//! a pool created elsewhere gets no `Ready` for it; [`replay_ready`] (what
//! DPDK drivers do by hand with `rte_mempool_walk`) calls a callback for
//! every pool of an instance that is ready already. The registry is also
//! shared by every [`Memory`] instance of the process: a callback sees the
//! pools of all of them and can tell them apart with
//! [`MempoolView::memory`] (`std::ptr::eq(view.memory(), mem)`).
//!
//! A callback runs on the thread that completes or frees the pool, with no
//! lock of the registry held: it may register and unregister callbacks
//! (itself included), and create, populate or free *other* pools (their
//! events fire nested). It must not free the pool it is told about. Each
//! firing works on a snapshot of the registry taken when it starts: a
//! callback registered meanwhile sees the next events; a callback
//! unregistered meanwhile is not called any more once
//! [`unregister_event_callback`] returned (a call already running on
//! another thread may still finish). A callback that panics is caught and
//! logged (`tracing` error with the callback id, the pool and the panic
//! message): the pool's creation or free goes on, the other callbacks
//! still run, and the registry stays usable.
//!
//! None of this touches the get/put paths: events fire only from
//! creation, population and free.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memplane::{MemOptions, Memory};
//! use memplane_mempool::{
//!     register_event_callback, unregister_event_callback, EventCallback, Mempool,
//!     MempoolConfig, MempoolEvent,
//! };
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ev"])?)?;
//! let cb: EventCallback = Arc::new(|ev, pool| {
//!     for c in pool.chunks() {
//!         match ev {
//!             MempoolEvent::Ready => println!("{}: map {:#x}+{} at IOVA {:#x}", pool.name(), c.va, c.len, c.iova),
//!             MempoolEvent::Destroy => println!("{}: unmap {:#x}+{}", pool.name(), c.va, c.len),
//!             _ => {}
//!         }
//!     }
//! });
//! let id = register_event_callback(Arc::clone(&cb))?;
//! memplane_mempool::replay_ready(&mem, &*cb); // pools that were ready before
//! let pool = Mempool::create(&mem, "pkts", &MempoolConfig::new(1023, 2048))?; // Ready
//! pool.free()?; // Destroy
//! unregister_event_callback(id)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use memplane::Memory;
use serde::Serialize;

use crate::{ChunkInfo, Mempool, MempoolError, MempoolFlags, MempoolInfo, ObjSize};

/// What happened to a pool (DPDK's `enum rte_mempool_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MempoolEvent {
    /// Every object of the pool is placed (DPDK's
    /// `RTE_MEMPOOL_EVENT_READY`). Fired once per pool.
    Ready,
    /// The pool is being freed; its memory is still mapped (DPDK's
    /// `RTE_MEMPOOL_EVENT_DESTROY`).
    Destroy,
}

impl std::fmt::Display for MempoolEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::Destroy => "destroy",
        })
    }
}

/// What a callback sees of the pool an event is about: read-only (no get,
/// put or free), valid for the duration of the call.
#[derive(Clone, Copy)]
pub struct MempoolView<'p, 'm> {
    pool: &'p Mempool<'m>,
}

impl std::fmt::Debug for MempoolView<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MempoolView")
            .field("name", &self.pool.name())
            .field("addr", &self.pool.addr())
            .field("size", &self.pool.size())
            .field("populated", &self.pool.populated())
            .finish_non_exhaustive()
    }
}

impl<'m> MempoolView<'_, 'm> {
    /// Pool name.
    pub fn name(&self) -> &str {
        self.pool.name()
    }

    /// Address of the pool header (the same in every process).
    pub fn addr(&self) -> usize {
        self.pool.addr()
    }

    /// The instance the pool belongs to.
    pub fn memory(&self) -> &'m Memory {
        self.pool.memory()
    }

    /// Handler name.
    pub fn handler(&self) -> &str {
        self.pool.handler()
    }

    /// Objects in the pool.
    pub fn size(&self) -> u32 {
        self.pool.size()
    }

    /// Objects placed (equal to [`size`](Self::size) for `Ready`; less
    /// for `Destroy` of a pool that never became ready).
    pub fn populated(&self) -> u32 {
        self.pool.populated()
    }

    /// Flags.
    pub fn flags(&self) -> MempoolFlags {
        self.pool.flags()
    }

    /// Object sizes.
    pub fn obj_size(&self) -> ObjSize {
        self.pool.obj_size()
    }

    /// The memory chunks holding the objects, in population order: first
    /// byte, bytes, IOVA of the first byte (`BAD_IOVA` when the chunk has
    /// none, e.g. `populate_anon`), what DMA registration needs (DPDK's
    /// `rte_mempool_mem_iter`).
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        self.pool.chunks()
    }

    /// A snapshot of the pool (as [`Mempool::info`]).
    pub fn info(&self) -> MempoolInfo {
        self.pool.info()
    }
}

/// A mempool event callback: `cb(event, pool)`. Registered with
/// [`register_event_callback`]; the `Arc`'s allocation is its identity
/// (registering the same `Arc` twice is refused, as DPDK refuses the same
/// `(func, user_data)` twice). Captured state plays DPDK's `user_data`.
pub type EventCallback = Arc<dyn Fn(MempoolEvent, &MempoolView<'_, '_>) + Send + Sync>;

/// The key of a registered callback, for [`unregister_event_callback`].
/// Ids are never reused within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EventCallbackId(u64);

impl EventCallbackId {
    /// The id as a number (for logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for EventCallbackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// This process's callbacks, in registration order.
static CALLBACKS: Mutex<Vec<(EventCallbackId, EventCallback)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn registry() -> std::sync::MutexGuard<'static, Vec<(EventCallbackId, EventCallback)>> {
    // Callbacks never run under this lock, so nothing can poison it; if
    // something did, the Vec is still consistent (every update is one
    // push or one remove).
    CALLBACKS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `cb` for the events of every pool of this process (DPDK's
/// `rte_mempool_event_callback_register`); returns its id. The same `Arc`
/// (by [`Arc::ptr_eq`]) registered already is refused with
/// [`MempoolError::EventCallbackExists`] naming its id, and nothing
/// changes. May be called from inside a callback (the new callback sees
/// the next events, not the one being fired). Pools that are ready
/// already are not reported: see [`replay_ready`].
pub fn register_event_callback(cb: EventCallback) -> Result<EventCallbackId, MempoolError> {
    let mut reg = registry();
    if let Some((id, _)) = reg.iter().find(|(_, c)| Arc::ptr_eq(c, &cb)) {
        return Err(MempoolError::EventCallbackExists { id: *id });
    }
    let id = EventCallbackId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    reg.push((id, cb));
    tracing::debug!(callback = id.0, "mempool event callback registered");
    Ok(id)
}

/// Unregisters the callback `id` (DPDK's
/// `rte_mempool_event_callback_unregister`). Once this returns, the
/// callback is not called again (a call already running on another thread
/// may still finish). An id not registered (never, or unregistered
/// already) is refused with [`MempoolError::UnknownEventCallback`]. May be
/// called from inside a callback, itself included.
pub fn unregister_event_callback(id: EventCallbackId) -> Result<(), MempoolError> {
    let mut reg = registry();
    let at = reg
        .iter()
        .position(|(i, _)| *i == id)
        .ok_or(MempoolError::UnknownEventCallback { id })?;
    // The Arc is dropped after the lock is released (its captured state's
    // Drop may use the registry).
    let (_, cb) = reg.remove(at);
    drop(reg);
    drop(cb);
    tracing::debug!(callback = id.0, "mempool event callback unregistered");
    Ok(())
}

/// The id of `cb` when that `Arc` is registered.
pub fn event_callback_id(cb: &EventCallback) -> Option<EventCallbackId> {
    registry()
        .iter()
        .find(|(_, c)| Arc::ptr_eq(c, cb))
        .map(|(id, _)| *id)
}

/// Calls `cb(Ready, pool)` for every pool of `mem` that is ready now and
/// that this process can open (pools with process-local memory of another
/// process, or with a handler this process lacks, are skipped and logged
/// at debug level); returns how many. DPDK has no such call (drivers walk
/// the pools with `rte_mempool_walk` after registering). A panic in `cb`
/// is caught and logged, as in a firing. To miss no pool, register first
/// and replay after: a pool that becomes ready in between is then
/// reported twice, so the callback must tolerate a repeated `Ready` (as
/// DPDK drivers' do). Like [`mempools`](crate::mempools), this must not
/// race with another thread freeing a pool of `mem`.
pub fn replay_ready(mem: &Memory, cb: impl Fn(MempoolEvent, &MempoolView<'_, '_>)) -> u32 {
    let mut n = 0;
    for name in crate::mempool_names(mem) {
        match Mempool::lookup(mem, &name) {
            Ok(pool) => {
                call_guarded(None, &cb, MempoolEvent::Ready, &pool);
                n += 1;
            }
            Err(e) => {
                tracing::debug!(pool = name, error = %e, "replay_ready skips a pool this process cannot open");
            }
        }
    }
    n
}

/// Fires `event` for `pool` through this process's callbacks (a snapshot;
/// each is skipped if unregistered meanwhile).
pub(crate) fn fire(event: MempoolEvent, pool: &Mempool<'_>) {
    let snapshot: Vec<(EventCallbackId, EventCallback)> = registry().clone();
    for (id, cb) in snapshot {
        if !registry().iter().any(|(i, _)| *i == id) {
            continue;
        }
        call_guarded(Some(id), &*cb, event, pool);
    }
}

/// Runs one callback, catching and logging a panic.
fn call_guarded(
    id: Option<EventCallbackId>,
    cb: &(impl Fn(MempoolEvent, &MempoolView<'_, '_>) + ?Sized),
    event: MempoolEvent,
    pool: &Mempool<'_>,
) {
    let view = MempoolView { pool };
    // The pool is only read through the view, so a panic half-way leaves
    // nothing of ours inconsistent; the callback's own state is its
    // business.
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| cb(event, &view))) {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string panic payload)".to_string());
        tracing::error!(
            callback = id.map(EventCallbackId::get),
            pool = pool.name(),
            %event,
            panic = msg,
            "a mempool event callback panicked; the panic was caught and the pool operation goes on"
        );
    }
}
