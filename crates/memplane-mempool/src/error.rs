//! The mempool's error type.

use memplane_ring::ZoneRingError;

/// Why a mempool operation was refused. Unless a variant says otherwise,
/// nothing changed: no object was taken or returned, no zone was left
/// behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MempoolError {
    /// The pool name is empty, too long or holds a NUL byte.
    #[error("mempool name {name:?} is invalid: {why} (1 to {max} bytes, no NUL; the header zone is named MP_<name>)", max = crate::NAME_MAX)]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `n == 0`.
    #[error("a mempool needs at least one object (n = 0)")]
    ZeroObjects,
    /// More objects than a pool can index.
    #[error("{n} objects is more than a mempool holds (at most {max})")]
    TooManyObjects {
        /// What was asked.
        n: u64,
        /// The limit.
        max: u32,
    },
    /// The element size is 0 or too large.
    #[error("element size {size} is invalid: {why}")]
    BadEltSize {
        /// What was asked.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The cache size breaks DPDK's rule (at most 512 and at most n / 1.5).
    #[error("cache size {cache_size} is invalid for {n} objects: {why}")]
    BadCacheSize {
        /// What was asked.
        cache_size: u32,
        /// Objects in the pool.
        n: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// The private area is too large.
    #[error("private area of {size} bytes is too large (at most {max})")]
    PrivateTooLarge {
        /// What was asked.
        size: u64,
        /// The limit.
        max: u32,
    },
    /// Flag bits that are not mempool flags.
    #[error("unknown mempool flag bits {bits:#x}")]
    BadFlags {
        /// The unknown bits.
        bits: u32,
    },
    /// No handler of that name is registered in this process.
    #[error("no mempool handler named {name:?} in this process (registered: {known}); register it with register_handler before creating or looking up the pool")]
    UnknownHandler {
        /// The name.
        name: String,
        /// The names that are registered.
        known: String,
    },
    /// A handler could not be registered.
    #[error("cannot register mempool handler {name:?}: {why}")]
    BadHandler {
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A pool (or another zone) has the name already.
    #[error("a mempool named {name:?} exists already (memzone MP_{name} is taken); free it or choose another name")]
    Exists {
        /// The name.
        name: String,
    },
    /// No pool of that name.
    #[error("no mempool named {name:?} (no memzone MP_{name} with a published pool header)")]
    NotFound {
        /// The name.
        name: String,
    },
    /// A bulk get asked for more objects than are available now. Nothing
    /// was taken.
    #[error("asked for {requested} objects, only {available} available in the backend now (objects in other threads' caches are not counted)")]
    NotEnough {
        /// Objects asked for.
        requested: u32,
        /// What the backend (plus this thread's cache) held.
        available: u32,
    },
    /// [`Mempool::get_contig_blocks`](crate::Mempool::get_contig_blocks)
    /// asked for more whole blocks than the backend holds now (blocks
    /// broken by single gets, or whose objects sit in caches, do not
    /// count). Nothing was taken.
    #[error("asked for {requested} contiguous blocks of {block_size} objects, only {available} whole block(s) in the backend now (a block is whole again once every one of its objects is back in the backend: flush the caches that hold some)")]
    NotEnoughBlocks {
        /// Blocks asked for.
        requested: u32,
        /// Whole blocks the backend held.
        available: u32,
        /// Objects per block.
        block_size: u32,
    },
    /// [`Mempool::get_contig_blocks`](crate::Mempool::get_contig_blocks)
    /// on a pool whose handler has no contiguous blocks (every built-in
    /// handler but `bucket`).
    #[error("mempool {name:?}: handler {handler:?} has no contiguous blocks (contig_block_size is None); create the pool with the \"bucket\" handler to get them")]
    ContigBlocksUnsupported {
        /// The pool.
        name: String,
        /// Its handler.
        handler: String,
    },
    /// A pool's objects do not fit its handler's blocks: the element
    /// (with its object header and padding) and the block header are
    /// bigger than a `bucket` handler's bucket. Nothing was reserved.
    #[error("a bucket of {bucket_size} bytes holds no object of {total_size} bytes (a {elt_size}-byte element with its object header and padding) after its {header}-byte bucket header; a bucket holds objects of at most {max_total} bytes (element, object header and padding): use smaller elements, or a handler with bigger buckets (BucketHandler::new, registered under a name of its own)")]
    BucketTooSmall {
        /// Bytes per bucket.
        bucket_size: u32,
        /// The bucket header for one object.
        header: u32,
        /// Bytes per object.
        total_size: u32,
        /// Element size (rounded up to 8).
        elt_size: u32,
        /// The largest object size one bucket holds.
        max_total: u32,
    },
    /// A put of a pointer that is not an object of this pool. Nothing was
    /// returned.
    #[error("{addr:#x} is not an object of mempool {pool:?}{}", owner.as_ref().map(|o| format!(" (it belongs to mempool {o:?})")).unwrap_or_default())]
    ForeignObject {
        /// The pointer.
        addr: usize,
        /// This pool.
        pool: String,
        /// The pool its header names, when it is an object of another pool
        /// of the same instance.
        owner: Option<String>,
    },
    /// A put of an object that is in the pool already (debug builds check
    /// the object's cookie). Nothing was returned.
    #[error("object {addr:#x} of mempool {pool:?} is put back twice (its cookie says it is in the pool)")]
    DoublePut {
        /// The object.
        addr: usize,
        /// The pool.
        pool: String,
    },
    /// `free` while objects are out.
    #[error("mempool {name:?} still has {in_use} of {n} objects out (in use, or in user-owned caches); put them back first, or free_forced")]
    InUse {
        /// The pool.
        name: String,
        /// Objects out.
        in_use: u32,
        /// Objects in the pool.
        n: u32,
    },
    /// The objects could not be placed in at most [`MAX_CHUNKS`](crate::MAX_CHUNKS) memzones.
    #[error("cannot place {n} objects of {total_size} bytes in {max} memzones (memory too fragmented or too little)")]
    TooManyChunks {
        /// Objects.
        n: u32,
        /// Bytes per object.
        total_size: u32,
        /// The chunk limit.
        max: usize,
    },
    /// The object memory could not be reserved: not enough free memory
    /// (hugepages, or heap space within the instance's limits) on the
    /// nodes the pool may use. Nothing was reserved.
    #[error("mempool {name:?}: cannot reserve {need} bytes of object memory on socket {socket} ({objects} objects of {total_size} bytes); free per node: {}; heaps grow into free hugepages only within the instance's limits (--socket-limit, --pagesz-mem); use fewer or smaller objects, or raise the limits", fmt_nodes(nodes))]
    NoMemory {
        /// The pool.
        name: String,
        /// Bytes of object memory asked for (what
        /// [`required_memory_for`](crate::required_memory_for) says for the
        /// objects still to place).
        need: usize,
        /// Objects still to place.
        objects: u32,
        /// Bytes per object.
        total_size: u32,
        /// The socket asked (`SOCKET_ID_ANY`: any node).
        socket: i32,
        /// What each NUMA node had free when the reservation failed.
        nodes: Vec<NodeFree>,
    },
    /// `populate_*` on a pool that cannot take it: every object is placed
    /// already, or (`populate_anon`) some are. Nothing changed.
    #[error("cannot populate mempool {name:?} ({populated} of {n} objects placed): {why}")]
    PopulateRefused {
        /// The pool.
        name: String,
        /// Objects placed so far.
        populated: u32,
        /// Objects in the pool.
        n: u32,
        /// Why.
        why: &'static str,
    },
    /// `populate_virt` with a region too small for one object. Nothing
    /// changed.
    #[error("mempool {name:?}: the region at {addr:#x} of {len} bytes holds no {total_size}-byte object (after aligning its start)")]
    RegionTooSmall {
        /// The pool.
        name: String,
        /// Start of the region.
        addr: usize,
        /// Its length.
        len: usize,
        /// Bytes per object.
        total_size: u32,
    },
    /// The pool was made with `create_empty` and is not fully populated
    /// yet: only its creator can use it until then.
    #[error("mempool {name:?} is not fully populated yet ({populated} of {n} objects placed); it can be looked up once its creator has populated it")]
    NotPopulated {
        /// The pool.
        name: String,
        /// Objects placed.
        populated: u32,
        /// Objects in the pool.
        n: u32,
    },
    /// The pool's objects are (partly) in memory only its creating process
    /// has (`populate_anon`, or `populate_virt` with memory outside the
    /// instance): another process cannot use it.
    #[error("mempool {name:?} has {chunks} object chunk(s) in memory private to its creator (pid {creator}; anonymous memory or memory outside the instance): it cannot be used from another process")]
    ProcessLocal {
        /// The pool.
        name: String,
        /// Chunks in process-local memory.
        chunks: u32,
        /// Pid of the creating process.
        creator: u32,
    },
    /// The objects need more memory than the instance can ever map.
    #[error("the objects need {need} bytes; this instance can map at most {max} (all memseg lists); use fewer or smaller objects, or more memory (--socket-limit / --pagesz-mem / more hugepages)")]
    TooLarge {
        /// Bytes needed.
        need: usize,
        /// Bytes the instance's memseg lists can hold.
        max: usize,
    },
    /// Every lcore id of the instance's registry is taken.
    #[error("all {max} lcore ids of this instance are registered; unregister threads that no longer use mempools")]
    NoLcore {
        /// The registry size.
        max: usize,
    },
    /// An SP/SC backend side is in use by another thread at this moment:
    /// the pool was created single-producer/consumer but is used
    /// concurrently.
    #[error("mempool {name:?}: the backend's single {role} side is in use by another thread or process (pool created with SP_PUT/SC_GET but used concurrently)")]
    SingleRoleBusy {
        /// The pool.
        name: String,
        /// "producer" or "consumer".
        role: &'static str,
    },
    /// A typed pool was looked up with another element type.
    #[error("mempool {name:?} holds {elt_size}-byte elements; the type needs {size} bytes aligned to {align}")]
    TypeMismatch {
        /// The pool.
        name: String,
        /// Its element size.
        elt_size: u32,
        /// `size_of::<T>()`.
        size: usize,
        /// `align_of::<T>()`.
        align: usize,
    },
    /// The thread still holds [`LcoreCache`](crate::LcoreCache) handles
    /// on its lcore id, so the id cannot be released.
    #[error("lcore {lcore} cannot be unregistered while this thread holds {handles} LcoreCache handle(s) on it; drop them first")]
    LcoreCacheHeld {
        /// The thread's lcore id.
        lcore: u32,
        /// Live handles.
        handles: u32,
    },
    /// Leak tracking was never switched on for this pool, so there is no
    /// owner table to report from.
    #[error("mempool {name:?} has no leak tracking table: switch tracking on first (Mempool::set_leak_tracking(true) or MempoolConfig::leak_tracking)")]
    LeakTrackingOff {
        /// Pool name.
        name: String,
    },
    /// The pool this handle names is gone (freed by another handle or
    /// process): its header no longer holds a published pool.
    #[error("mempool {name:?} is gone (freed through another handle or process)")]
    Gone {
        /// Pool name.
        name: String,
    },
    /// [`register_event_callback`](crate::register_event_callback) with
    /// an `Arc` that is registered already (DPDK's `-EEXIST` for the same
    /// `(func, user_data)`). Nothing changed.
    #[error("this mempool event callback (the same Arc) is registered already, as {id}; unregister it first or register a new Arc")]
    EventCallbackExists {
        /// The id it is registered under.
        id: crate::EventCallbackId,
    },
    /// [`unregister_event_callback`](crate::unregister_event_callback)
    /// with an id that is not registered (never was, or was unregistered
    /// already; DPDK's `-ENOENT`). Nothing changed.
    #[error(
        "no mempool event callback {id} is registered in this process (unregistered already?)"
    )]
    UnknownEventCallback {
        /// The id asked for.
        id: crate::EventCallbackId,
    },
    /// The pool's shared structures are inconsistent.
    #[error("mempool {name:?} is corrupt: {why}")]
    Corrupt {
        /// The pool.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A memzone could not be reserved, found or freed.
    #[error(transparent)]
    Memory(#[from] memplane::Error),
    /// The backend ring could not be created or found.
    #[error(transparent)]
    Ring(#[from] ZoneRingError),
}

/// What one NUMA node had free, for [`MempoolError::NoMemory`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeFree {
    /// The node.
    pub node: u32,
    /// Bytes free in the node's heap (mapped memory not in use).
    pub heap_free: u64,
    /// The largest block the node's heap can hand out without growing.
    pub heap_largest: u64,
    /// Bytes of free hugepages on the node (all page sizes; the heap can
    /// grow into them within the instance's limits).
    pub hugepages_free: u64,
}

fn fmt_nodes(nodes: &[NodeFree]) -> String {
    if nodes.is_empty() {
        return "unknown".into();
    }
    nodes
        .iter()
        .map(|n| {
            format!(
                "node {}: {} bytes in the heap (largest block {}) + {} bytes of free hugepages",
                n.node, n.heap_free, n.heap_largest, n.hugepages_free
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
