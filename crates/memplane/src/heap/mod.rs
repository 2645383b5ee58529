//! The malloc heap: DPDK's `rte_malloc`, with one heap per NUMA node
//! (`socket_<n>`) plus named external heaps, all of it in shared memory.
//!
//! The heaps' heads (lock, free lists, counters) sit in the shared config;
//! element headers sit inline in the heap's pages. Both are at the same
//! address in every process, so any process of the instance can allocate
//! and free from any heap.
//!
//! - A heap grows by mapping just enough pages when no free element fits
//!   (validators and `--socket-limit` are consulted, memory events fire),
//!   and gives whole pages back as soon as a free leaves them unused
//!   (except the `--socket-mem` memory, kept until shutdown).
//! - Free lists are two-level size classes with bitmaps: finding a block is
//!   two bit scans, whatever the fragmentation or alignment.
//! - Headers carry cookies: a bad pointer, a double free or an overwritten
//!   header is an error, never silently accepted.
//!   [`heap_validate`](crate::Instance::heap_validate) walks everything and
//!   names the first corruption.
//! - Memory is zeroed only where it may be dirty: fresh pages come zeroed
//!   from the kernel and are not cleared again.
//!
//! # Example
//!
//! ```no_run
//! use memplane::{MemOptions, Memory};
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-heap"])?)?;
//! let p = mem.zmalloc(4096, 64)?;                 // 4 KiB, zeroed, 64-byte aligned
//! println!("block at {p:p}, IOVA {:?}", mem.malloc_virt2iova(p));
//! let stats = mem.heap_stats(0)?;                 // heap of NUMA node 0
//! assert_eq!(stats.alloc_count, 1);
//! // SAFETY: `p` came from this instance and is not used after this.
//! unsafe { mem.free(p)? };
//! # Ok::<(), memplane::Error>(())
//! ```

mod allocator;
mod boxed;
mod classes;
mod core;
mod extmem;
mod global;
mod malloc;
mod tcache;

use std::fmt;

use serde::Serialize;

pub use self::allocator::HeapAllocator;
pub use self::boxed::{HeapBox, HeapSlice, Zeroable};
pub use self::core::{Corruption, ElemInfo, HeapStats};
pub use self::extmem::ExtChunkInfo;
pub use self::global::{HugepageGlobalAlloc, InstallError};
pub use self::malloc::{AllocRequest, HeapInfo, PageSizes};
pub(crate) use self::malloc::{Heaps, PageMap};

/// Any NUMA node: the caller's first, then the others (DPDK's
/// `SOCKET_ID_ANY`).
pub const SOCKET_ID_ANY: i32 = -1;

/// Longest heap name in bytes (DPDK: 31 characters plus the NUL).
pub const HEAP_NAME_MAX: usize = 31;

/// Socket id of the first external heap; later ones count up (DPDK starts
/// at 256 as well).
pub const EXTERNAL_SOCKET_BASE: i32 = 256;

/// Bytes of one heap head in the shared config.
pub const HEAP_HEADER_SIZE: usize = std::mem::size_of::<self::core::HeapHeader>();
/// Bytes of the thread-cache slots of one native heap in the shared config.
pub const TCACHE_BYTES_PER_HEAP: usize = tcache::SLOT_SIZE * tcache::SLOTS_PER_HEAP;
/// Bytes of one external memory entry in the shared config.
pub const EXTMEM_ENTRY_SIZE: usize = std::mem::size_of::<self::extmem::ExtChunk>();

/// Why a heap operation was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeapError {
    /// Size 0.
    #[error("cannot allocate 0 bytes")]
    ZeroSize,
    /// The alignment is not a power of two.
    #[error("alignment {align} is not a power of two (use 0 for the default of 64)")]
    BadAlign {
        /// What was asked.
        align: usize,
    },
    /// The boundary is not a power of two or smaller than the size.
    #[error("boundary {bound} for a block of {size} bytes: {why}")]
    BadBound {
        /// Boundary asked.
        bound: usize,
        /// Size asked.
        size: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// Size and alignment do not fit in the address space.
    #[error("{size} bytes with alignment {align} is larger than any heap can hold")]
    TooLarge {
        /// Size asked (for calloc: the product overflowed).
        size: usize,
        /// Alignment asked.
        align: usize,
    },
    /// No heap has this socket id.
    #[error("no heap has socket id {socket}; heaps: {known}")]
    NoSuchSocket {
        /// Socket asked for.
        socket: i32,
        /// The heaps there are.
        known: String,
    },
    /// No heap has this name.
    #[error("no heap is named {name:?}; heaps: {known}")]
    NoSuchHeap {
        /// Name asked for.
        name: String,
        /// The heaps there are.
        known: String,
    },
    /// Nothing fits and the heap could not grow.
    #[error("cannot allocate {size} bytes (align {align}{extra}) on {socket}: {why}")]
    OutOfMemory {
        /// Size asked.
        size: usize,
        /// Alignment.
        align: usize,
        /// Other constraints, preformatted.
        extra: String,
        /// Which heaps were tried.
        socket: String,
        /// What each heap had and why growing failed.
        why: String,
    },
    /// The pointer is not in any heap's memory.
    #[error("{addr:#x} was not allocated by this instance's heaps (not inside any heap's memory)")]
    NotFromHeap {
        /// The pointer.
        addr: usize,
    },
    /// The pointer is inside a block, not at its start.
    #[error("{addr:#x} points inside the block at {block:#x}, not at its start")]
    InsideBlock {
        /// The pointer.
        addr: usize,
        /// The block's start.
        block: usize,
    },
    /// The block was freed already.
    #[error("double free: the block at {addr:#x} is already free")]
    DoubleFree {
        /// The pointer.
        addr: usize,
    },
    /// A header or a heap structure is corrupt.
    #[error("heap {heap} is corrupt at {addr:#x}: {what}")]
    Corrupt {
        /// Heap name.
        heap: String,
        /// Where.
        addr: usize,
        /// What was found.
        what: String,
    },
    /// A heap name is empty, too long or malformed.
    #[error("heap name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A heap of this name exists.
    #[error("a heap named {name:?} exists already")]
    HeapExists {
        /// The name.
        name: String,
    },
    /// The heap still has allocations or memory.
    #[error("heap {name:?} {why}")]
    HeapBusy {
        /// The name.
        name: String,
        /// What keeps it.
        why: String,
    },
    /// Native heaps cannot be changed this way.
    #[error("heap {name:?} is a NUMA node's own heap; only external heaps can be {what}")]
    NativeHeap {
        /// The name.
        name: String,
        /// What was attempted.
        what: &'static str,
    },
    /// A table is full.
    #[error("{what} is full ({max} entries); raise it with {option}")]
    TableFull {
        /// Which table.
        what: &'static str,
        /// Its size.
        max: u32,
        /// The option that sets it.
        option: &'static str,
    },
    /// External memory arguments are invalid.
    #[error("external memory {va:#x}+{len:#x}: {why}")]
    BadExtMem {
        /// Start.
        va: usize,
        /// Length.
        len: usize,
        /// What is wrong.
        why: String,
    },
    /// No such external memory chunk.
    #[error("no external memory {va:#x}+{len:#x} is {what}")]
    NoSuchChunk {
        /// Start.
        va: usize,
        /// Length.
        len: usize,
        /// Where it was looked for.
        what: String,
    },
    /// A heap call from inside a memory event callback or validator.
    #[error("{what} called from inside a memory event callback or validator (the heap may be growing on this thread); allocate outside the callback")]
    Reentrant {
        /// The call.
        what: &'static str,
    },
}

/// A socket id as shown in messages.
pub(crate) struct SocketName(pub i32);

impl fmt::Display for SocketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == SOCKET_ID_ANY {
            f.write_str("any node")
        } else {
            write!(f, "socket {}", self.0)
        }
    }
}

/// Validates a heap name.
pub(crate) fn check_name(name: &str) -> Result<(), HeapError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > HEAP_NAME_MAX {
        "longer than 31 bytes"
    } else if name.bytes().any(|b| b == 0 || b.is_ascii_control()) {
        "contains a NUL or control character"
    } else {
        return Ok(());
    };
    Err(HeapError::BadName {
        name: name.into(),
        why,
    })
}

/// What kind of heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeapKind {
    /// A NUMA node's heap, growing and shrinking with pages.
    Native,
    /// An external heap over user memory.
    External,
}
