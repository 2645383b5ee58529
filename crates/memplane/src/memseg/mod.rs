//! Memseg lists: the address space of every page memplane can ever map,
//! reserved up front, and the pages mapped into it and unmapped from it at
//! run time.
//!
//! One list per "memory type" (NUMA node x page size). Each list is a slot
//! range of the instance's single address-space reservation and an fbarray
//! of [`Memseg`] descriptors in the shared config; a used slot is a mapped
//! page. The page allocator itself lives on [`crate::Instance`], reached
//! through a [`crate::Memory`] handle
//! ([`Instance::alloc_pages`](crate::Instance::alloc_pages),
//! [`Instance::free_pages`](crate::Instance::free_pages)); this module holds
//! the types, the shared layout and the page stores.

pub mod events;
pub mod hugetlbfs;
pub mod layout;
pub mod store;

use serde::Serialize;

pub use events::{MemEvent, MemEventKind};
pub use layout::Memseg;
pub use store::{BackingKind, Freshness, PageStore};

use crate::shm::vaspace::VaError;
use crate::units::{format_size, PageSize};

/// Why a memseg operation was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemsegError {
    /// Zero pages were asked for.
    #[error("a page request must ask for at least one page")]
    ZeroPages,
    /// No such NUMA node.
    #[error("NUMA node {node} does not exist (nodes: {nodes:?})")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes there are.
        nodes: Vec<u32>,
    },
    /// No memseg list for this page size on this node.
    #[error("no {page_size} pages on node {node}: this instance has {}; {fix}", sizes_list(.available))]
    NoSuchPageSize {
        /// Node.
        node: u32,
        /// Size asked for.
        page_size: PageSize,
        /// Sizes this node has lists for.
        available: Vec<PageSize>,
        /// How to get the size.
        fix: String,
    },
    /// The list has no (contiguous) room left for the request.
    #[error(
        "memseg list {list} cannot take {asked} more page(s): {free} of {capacity} slots free, \
         the largest contiguous run is {largest_run}; raise the list size with --socket-limit \
         or --pagesz-mem, or ask for non-contiguous pages"
    )]
    NoRoom {
        /// List name.
        list: String,
        /// Pages asked for.
        asked: u32,
        /// Free slots.
        free: u32,
        /// Slots in the list.
        capacity: u32,
        /// Largest run of free slots.
        largest_run: u32,
    },
    /// The kernel has fewer free pages than asked for.
    #[error(
        "the kernel would not give {asked} {} hugepage(s) ({detail}); free some, reserve more \
         (`memplane hugepages reserve {}=<count>`) or raise the limit, and see `memplane hugepages status`",
        format_size(*.page_size), format_size(*.page_size)
    )]
    OutOfPages {
        /// Pages asked for.
        asked: u32,
        /// Page size in bytes.
        page_size: u64,
        /// The failing call.
        detail: String,
    },
    /// A limit (`--socket-limit` or a registered validator) refused growth.
    #[error(
        "allocating {} on node {node} would bring it to {} of memory, over the {} limit of {} set by {by}",
        format_size(*.asked), format_size(*.new_total), .by, format_size(*.limit)
    )]
    LimitExceeded {
        /// Node.
        node: u32,
        /// Bytes asked for.
        asked: u64,
        /// Node total after the allocation.
        new_total: u64,
        /// The limit.
        limit: u64,
        /// Who set it: `--socket-limit` or the validator's name.
        by: String,
    },
    /// An address is not inside any memseg list.
    #[error("address {addr:#x} is not inside any memseg list of this instance")]
    NotInAnyList {
        /// The address.
        addr: usize,
    },
    /// A range crosses the end of its list or is not page-aligned.
    #[error("range {addr:#x}+{len:#x} is not a whole number of {} pages inside list {list}", format_size(*.page_size))]
    BadRange {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
        /// The list the start is in.
        list: String,
        /// Its page size.
        page_size: u64,
    },
    /// A page of the range is not allocated (a double free?).
    #[error("page {addr:#x} of list {list} is not allocated (double free?)")]
    NotAllocated {
        /// Address of the first free page found.
        addr: usize,
        /// List name.
        list: String,
    },
    /// A page of the range was preallocated and is kept until shutdown.
    #[error("page {addr:#x} was preallocated by --socket-mem/-m and is kept until shutdown")]
    Pinned {
        /// Address of the page.
        addr: usize,
    },
    /// A store operation only the primary process does.
    #[error("{what} is done by the primary process, not by a secondary")]
    Secondary {
        /// The operation.
        what: &'static str,
    },
    /// A page of the range belongs to a malloc heap.
    #[error("page {addr:#x} belongs to a malloc heap; free the heap's blocks instead, the heap gives its pages back")]
    HeapOwned {
        /// Address of the page.
        addr: usize,
    },
    /// Page allocation is fixed in this mode.
    #[error("{what} is not possible with {mode}: memory is fixed at init")]
    FixedMemory {
        /// What was attempted.
        what: &'static str,
        /// The option fixing memory.
        mode: &'static str,
    },
    /// A page landed on another NUMA node than asked.
    #[error(
        "page {addr:#x} was asked for on node {wanted} but the kernel placed it on node {got}"
    )]
    WrongNode {
        /// Address.
        addr: usize,
        /// Node asked for.
        wanted: u32,
        /// Node it is on.
        got: u32,
    },
    /// The physical address of a page could not be read in PA mode.
    #[error("cannot read the physical address of page {addr:#x} (IOVA mode pa): {detail}")]
    NoPhysAddr {
        /// Address.
        addr: usize,
        /// Why.
        detail: String,
    },
    /// A callback or validator name is empty, too long, or taken.
    #[error("callback name {name:?}: {why}")]
    CallbackName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No callback or validator of that name.
    #[error("no callback {name:?} is registered{}", .node.map(|n| format!(" for node {n}")).unwrap_or_default())]
    NoSuchCallback {
        /// Name.
        name: String,
        /// Node, for validators.
        node: Option<u32>,
    },
    /// A memory-event callback tried to allocate or free pages, heap
    /// blocks or memzones; it would deadlock (the walks work there).
    #[error("{what} called from inside a memory event callback or validator (it would deadlock); only the walks (memseg_walk, contig_walk, virt2memseg) work there")]
    Reentrant {
        /// What was called.
        what: &'static str,
    },
    /// A backing call failed.
    #[error("{what}: {source}")]
    Backing {
        /// What was done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Address-space trouble.
    #[error(transparent)]
    Va(#[from] VaError),
    /// fbarray trouble.
    #[error(transparent)]
    FbArray(#[from] crate::fbarray::FbArrayError),
}

fn sizes_list(sizes: &[PageSize]) -> String {
    if sizes.is_empty() {
        "no memseg list there".into()
    } else {
        let v: Vec<String> = sizes.iter().map(ToString::to_string).collect();
        format!("lists of {}", v.join(", "))
    }
}

/// What [`Instance::alloc_pages`](crate::Instance::alloc_pages) should map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// NUMA node.
    pub node: u32,
    /// Page size.
    pub page_size: PageSize,
    /// Pages wanted.
    pub count: u32,
    /// All pages in one virtual-address-contiguous run (else best effort:
    /// several runs).
    pub contiguous: bool,
    /// All or nothing (else as many as the kernel can give, at least one).
    pub exact: bool,
}

impl PageRequest {
    /// `count` pages of `page_size` on `node`, contiguous, all or nothing.
    pub fn new(node: u32, page_size: PageSize, count: u32) -> Self {
        PageRequest {
            node,
            page_size,
            count,
            contiguous: true,
            exact: true,
        }
    }

    /// Allows several runs instead of one contiguous one.
    #[must_use]
    pub fn best_effort_contiguity(mut self) -> Self {
        self.contiguous = false;
        self
    }

    /// Accepts fewer pages than asked (at least one).
    #[must_use]
    pub fn as_many_as_possible(mut self) -> Self {
        self.exact = false;
        self
    }
}

/// A run of pages mapped by one allocation: consecutive slots of one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PageRun {
    /// Index of the list.
    pub list: u32,
    /// First slot.
    pub first: u32,
    /// Number of pages.
    pub count: u32,
    /// Virtual address of the first page.
    pub va: usize,
    /// Bytes (= count x page size).
    pub len: usize,
    /// Page size.
    pub page_size: PageSize,
    /// NUMA node.
    pub node: u32,
    /// Whether the pages are known to be zero-filled.
    pub zeroed: bool,
}

/// A snapshot of one memseg list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListInfo {
    /// Index in the table.
    pub index: u32,
    /// Name, e.g. `memseg-2048k-0`.
    pub name: String,
    /// NUMA node.
    pub node: u32,
    /// Page size.
    pub page_size: PageSize,
    /// First virtual address.
    pub base_va: usize,
    /// Bytes of address space.
    pub len: usize,
    /// Slots.
    pub capacity: u32,
    /// Pages mapped.
    pub used: u32,
    /// Of which preallocated (kept until shutdown).
    pub pinned: u32,
    /// What backs it.
    pub backing: BackingKind,
    /// Map/unmap counter.
    pub version: u64,
}

/// A snapshot of one used page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemsegInfo {
    /// List index.
    pub list: u32,
    /// Slot in the list.
    pub slot: u32,
    /// Virtual address.
    pub va: usize,
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub len: usize,
    /// NUMA node.
    pub node: u32,
    /// Preallocated, kept until shutdown.
    pub pinned: bool,
    /// May hold old data.
    pub dirty: bool,
}

/// A VA-contiguous run of used pages of one list, as the contiguous walk
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ContigRun {
    /// List index.
    pub list: u32,
    /// First slot.
    pub first: u32,
    /// Pages.
    pub count: u32,
    /// Virtual address.
    pub va: usize,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: PageSize,
    /// NUMA node.
    pub node: u32,
}
