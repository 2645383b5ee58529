//! Memzones: named blocks of hugepage memory that any process of the
//! instance can find by name (DPDK's `rte_memzone`), the building block
//! under rings and mempools.
//!
//! A zone's memory comes from the malloc heap, with every constraint a
//! driver or a ring needs: page sizes (strict or as a hint), IOVA
//! contiguity, alignment, a boundary it must not cross. Its descriptor
//! sits in a table in the shared config:
//!
//! - the table's capacity is an option (`--max-memzones`, default 2560 as
//!   DPDK), with no compile-time ceiling;
//! - lookup by name is a hash probe, not DPDK's linear scan, so reserving
//!   and looking up cost the same with 10 zones or 100 000;
//! - lookups, walks and stats take no lock (optimistic copies checked
//!   against the table's change counter), so a process killed in one
//!   holds up nobody's reservations and frees;
//! - a name is reserved at most once, even under races between threads or
//!   processes: the name is claimed first, then the memory is allocated
//!   without holding the table lock (heap growth may take milliseconds and
//!   fire memory events), then the zone is published. A second reserver of
//!   a name that is being reserved waits for the outcome;
//! - a [`Memzone`] handle borrows its [`Instance`], so it cannot outlive
//!   the [`Memory`](crate::Memory) it came from; `free` consumes it, and a
//!   second handle to a freed zone is refused (`Stale`), never a double
//!   free.
//!
//! # Example
//!
//! ```no_run
//! use memplane::memzone::MemzoneFlags;
//! use memplane::heap::SOCKET_ID_ANY;
//! use memplane::{MemOptions, Memory};
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-mz"])?)?;
//! // 1 MiB on 2 MiB pages if there are any, physically contiguous.
//! let flags = MemzoneFlags::PAGE_2M | MemzoneFlags::SIZE_HINT_ONLY | MemzoneFlags::IOVA_CONTIG;
//! let mz = mem.memzone_reserve("rx-descriptors", 1 << 20, SOCKET_ID_ANY, flags)?;
//! println!("{} at {:p}, IOVA {:#x}", mz.name(), mz.as_ptr(), mz.iova());
//!
//! let same = mem.memzone_lookup("rx-descriptors").expect("it exists");
//! assert_eq!(same.as_ptr(), mz.as_ptr());
//! mz.free()?;
//! assert!(same.free().is_err()); // freed already
//! # Ok::<(), memplane::Error>(())
//! ```

mod table;

use std::fmt;
use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use self::table::{hash_name, Claim, EntrySnap, Table, NAME_BYTES, STATE_READY};
use crate::heap::{AllocRequest, HeapError, PageSizes, SOCKET_ID_ANY};
use crate::iova::BAD_IOVA;
use crate::units::{format_size, PageSize};
use crate::{Error, Instance, Result};

pub(crate) use self::table::table_bytes;

/// Longest memzone name in bytes (DPDK: 31 characters plus the NUL).
pub const MEMZONE_NAME_MAX: usize = NAME_BYTES - 1;

/// Smallest alignment and length granule of a zone (a cache line).
pub const MEMZONE_MIN_ALIGN: usize = 64;

/// Flags of a reservation: DPDK's `RTE_MEMZONE_*` bits, same values, plus
/// memplane's [`ZERO`](Self::ZERO).
///
/// Page-size flags name the page sizes the zone may lie on (several may be
/// given: any of them). Without [`SIZE_HINT_ONLY`](Self::SIZE_HINT_ONLY)
/// they are a requirement; with it, a preference.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemzoneFlags(u32);

impl MemzoneFlags {
    /// No constraint.
    pub const NONE: MemzoneFlags = MemzoneFlags(0);
    /// 2 MiB pages (`RTE_MEMZONE_2MB`).
    pub const PAGE_2M: MemzoneFlags = MemzoneFlags(0x1);
    /// 1 GiB pages (`RTE_MEMZONE_1GB`).
    pub const PAGE_1G: MemzoneFlags = MemzoneFlags(0x2);
    /// The page-size flags are a preference (`RTE_MEMZONE_SIZE_HINT_ONLY`).
    pub const SIZE_HINT_ONLY: MemzoneFlags = MemzoneFlags(0x4);
    /// 16 MiB pages (`RTE_MEMZONE_16MB`, POWER).
    pub const PAGE_16M: MemzoneFlags = MemzoneFlags(0x100);
    /// 16 GiB pages (`RTE_MEMZONE_16GB`, POWER).
    pub const PAGE_16G: MemzoneFlags = MemzoneFlags(0x200);
    /// 256 KiB pages (`RTE_MEMZONE_256KB`).
    pub const PAGE_256K: MemzoneFlags = MemzoneFlags(0x1_0000);
    /// 256 MiB pages (`RTE_MEMZONE_256MB`).
    pub const PAGE_256M: MemzoneFlags = MemzoneFlags(0x2_0000);
    /// 512 MiB pages (`RTE_MEMZONE_512MB`).
    pub const PAGE_512M: MemzoneFlags = MemzoneFlags(0x4_0000);
    /// 4 GiB pages (`RTE_MEMZONE_4GB`).
    pub const PAGE_4G: MemzoneFlags = MemzoneFlags(0x8_0000);
    /// The zone must be IOVA-contiguous (`RTE_MEMZONE_IOVA_CONTIG`).
    pub const IOVA_CONTIG: MemzoneFlags = MemzoneFlags(0x10_0000);
    /// memplane: the zone's bytes are zero when it is handed out (only
    /// memory that may be dirty is cleared; fresh pages already are zero).
    pub const ZERO: MemzoneFlags = MemzoneFlags(0x1000_0000);

    const PAGE_FLAGS: [(MemzoneFlags, u64, &'static str); 8] = [
        (Self::PAGE_256K, 256 << 10, "PAGE_256K"),
        (Self::PAGE_2M, 2 << 20, "PAGE_2M"),
        (Self::PAGE_16M, 16 << 20, "PAGE_16M"),
        (Self::PAGE_256M, 256 << 20, "PAGE_256M"),
        (Self::PAGE_512M, 512 << 20, "PAGE_512M"),
        (Self::PAGE_1G, 1 << 30, "PAGE_1G"),
        (Self::PAGE_4G, 4 << 30, "PAGE_4G"),
        (Self::PAGE_16G, 16 << 30, "PAGE_16G"),
    ];
    const OTHER_FLAGS: [(MemzoneFlags, &'static str); 3] = [
        (Self::SIZE_HINT_ONLY, "SIZE_HINT_ONLY"),
        (Self::IOVA_CONTIG, "IOVA_CONTIG"),
        (Self::ZERO, "ZERO"),
    ];
    const KNOWN: u32 = 0x1000_0000 | 0x10_0000 | 0xf_0000 | 0x300 | 0x7;

    /// The raw bits (DPDK's values).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from raw bits; unknown bits are an error.
    pub fn from_bits(bits: u32) -> std::result::Result<MemzoneFlags, MemzoneError> {
        if bits & !Self::KNOWN != 0 {
            return Err(MemzoneError::BadFlags {
                bits: bits & !Self::KNOWN,
            });
        }
        Ok(MemzoneFlags(bits))
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: MemzoneFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The page sizes named, in bytes, smallest first (empty: any).
    pub fn page_sizes(self) -> Vec<u64> {
        Self::PAGE_FLAGS
            .iter()
            .filter(|(f, _, _)| self.contains(*f))
            .map(|&(_, b, _)| b)
            .collect()
    }

    /// The flags for pages of `bytes` (`None` if DPDK names no flag for
    /// that size).
    pub fn for_page_size(bytes: u64) -> Option<MemzoneFlags> {
        Self::PAGE_FLAGS
            .iter()
            .find(|(_, b, _)| *b == bytes)
            .map(|&(f, _, _)| f)
    }

    fn heap_sizes(self) -> PageSizes {
        self.page_sizes()
            .into_iter()
            .filter_map(PageSize::new)
            .fold(PageSizes::ANY, PageSizes::with)
    }
}

impl std::ops::BitOr for MemzoneFlags {
    type Output = MemzoneFlags;
    fn bitor(self, rhs: MemzoneFlags) -> MemzoneFlags {
        MemzoneFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for MemzoneFlags {
    fn bitor_assign(&mut self, rhs: MemzoneFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for MemzoneFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = Self::PAGE_FLAGS
            .iter()
            .filter(|(fl, _, _)| self.contains(*fl))
            .map(|(_, _, n)| *n)
            .collect();
        names.extend(
            Self::OTHER_FLAGS
                .iter()
                .filter(|(fl, _)| self.contains(*fl))
                .map(|(_, n)| *n),
        );
        if names.is_empty() {
            f.write_str("NONE")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

impl fmt::Debug for MemzoneFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemzoneFlags({self})")
    }
}

/// Why a memzone operation was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemzoneError {
    /// The name is empty.
    #[error("a memzone name cannot be empty")]
    EmptyName,
    /// The name is longer than [`MEMZONE_NAME_MAX`] bytes.
    #[error("memzone name {name:?} is {len} bytes; at most {MEMZONE_NAME_MAX} are allowed")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name holds a NUL byte.
    #[error("memzone name {name:?} contains a NUL byte")]
    BadName {
        /// The name.
        name: String,
    },
    /// A zone of that name exists (DPDK's `EEXIST`).
    #[error("a memzone named {name:?} exists already ({len} bytes on socket {socket}, reserved by pid {pid}); free it or choose another name")]
    Exists {
        /// The name.
        name: String,
        /// The existing zone's length.
        len: u64,
        /// Its socket.
        socket: i32,
        /// The process that reserved it.
        pid: u32,
    },
    /// Every entry of the table is in use (DPDK's `ENOSPC`).
    #[error("the memzone table is full ({capacity} zones); start with a larger --max-memzones")]
    TableFull {
        /// The table's capacity.
        capacity: u32,
    },
    /// The alignment is not a power of two.
    #[error("memzone alignment {align} is not a power of two (0 means the default of 64)")]
    BadAlign {
        /// What was asked.
        align: usize,
    },
    /// The boundary is not a power of two, or smaller than the length.
    #[error("memzone boundary {bound} for {len} bytes: {why}")]
    BadBound {
        /// Boundary asked.
        bound: usize,
        /// Length asked.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The length overflows when rounded up.
    #[error("memzone length {len} is larger than any heap can hold")]
    TooLarge {
        /// Length asked.
        len: usize,
    },
    /// A negative socket id other than `SOCKET_ID_ANY` (-1).
    #[error("socket id {socket} is invalid: use a node number, an external heap's id or SOCKET_ID_ANY (-1)")]
    BadSocket {
        /// What was asked.
        socket: i32,
    },
    /// Bits that are not memzone flags.
    #[error("unknown memzone flag bits {bits:#x}")]
    BadFlags {
        /// The unknown bits.
        bits: u32,
    },
    /// Page-size flags (without `SIZE_HINT_ONLY`) that name no page size
    /// this instance has.
    #[error("memzone flags {flags} ask for page sizes this instance has none of (it has {have}); add SIZE_HINT_ONLY to accept others, or configure those pages")]
    NoPageSize {
        /// The flags.
        flags: MemzoneFlags,
        /// The page sizes the instance has.
        have: String,
    },
    /// The zone this handle referred to was freed (by another handle or
    /// another process).
    #[error("memzone {name:?} was freed already")]
    Stale {
        /// Its name.
        name: String,
    },
    /// Called from inside a memory event callback or validator.
    #[error("{what} called from inside a memory event callback or validator; call it outside the callback")]
    Reentrant {
        /// The call.
        what: &'static str,
    },
    /// The heap could not give the memory; the source says why.
    #[error("cannot reserve memzone {name:?} ({what}): {source}")]
    Alloc {
        /// The name.
        name: String,
        /// The request, preformatted.
        what: String,
        /// The heap's reason.
        source: Box<Error>,
    },
}

/// A snapshot of one zone, for walks, dumps and `memplane info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemzoneInfo {
    /// Slot in the table.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Virtual address of the first byte.
    pub addr: usize,
    /// IOVA of the first byte (`None`: unknown, e.g. external memory
    /// added without IOVAs).
    pub iova: Option<u64>,
    /// Length in bytes.
    pub len: usize,
    /// Page size under the zone.
    pub page_size: u64,
    /// Socket the memory came from.
    pub socket: i32,
    /// Flags asked for (DPDK bits).
    pub flags: u32,
    /// Flags asked for, by name.
    pub flags_text: String,
    /// Alignment (at least 64).
    pub align: u64,
    /// Boundary (0: none).
    pub bound: u64,
    /// Pid of the process that reserved it.
    pub owner_pid: u32,
}

/// Counters of the memzone table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemzoneTableStats {
    /// Entries (`--max-memzones`).
    pub capacity: u32,
    /// Zones that exist (or are being reserved right now).
    pub count: u32,
    /// Bytes in zones.
    pub bytes: u64,
    /// Reservations that succeeded since start.
    pub reserves: u64,
    /// Frees since start.
    pub frees: u64,
}

/// The process-local view of the memzone table in the shared config.
pub(crate) struct ZoneTable {
    t: Table,
}

// SAFETY: the pointers lead into the shared config mapping owned by the
// `Memory` that owns this value; every field that changes is an atomic,
// and writers are ordered by the table's process-shared lock.
unsafe impl Send for ZoneTable {}
// SAFETY: as above.
unsafe impl Sync for ZoneTable {}

impl ZoneTable {
    /// A view of the table another process set up.
    ///
    /// # Safety
    /// `base` points at a complete table in the config mapping, 64-byte
    /// aligned, that outlives the value.
    pub(crate) unsafe fn attach(base: *mut u8) -> ZoneTable {
        #[allow(clippy::cast_ptr_alignment)]
        // SAFETY: the header is at `base` (caller); its capacity was written
        // at init, before any secondary could attach.
        let capacity = unsafe { (*base.cast::<table::TableHeader>()).capacity };
        ZoneTable {
            // SAFETY: forwarded from the caller; the capacity is the table's.
            t: unsafe { Table::new(base, capacity, false) },
        }
    }

    /// Sets up a fresh table of `capacity` entries.
    ///
    /// # Safety
    /// `base` points at `len >= table_bytes(capacity)` zero-filled bytes of
    /// the config mapping, 64-byte aligned, that outlive the value.
    pub(crate) unsafe fn init(base: *mut u8, len: usize, capacity: u32) -> ZoneTable {
        debug_assert!(len >= table_bytes(capacity));
        ZoneTable {
            // SAFETY: forwarded from the caller.
            t: unsafe { Table::new(base, capacity, true) },
        }
    }
}

/// A named zone, borrowed from its [`Instance`] (so it cannot outlive the
/// [`Memory`](crate::Memory) it came from).
///
/// Dropping the handle does not free the zone (it is shared by name, as in
/// DPDK); [`free`](Self::free) does.
pub struct Memzone<'m> {
    mem: &'m Instance,
    index: u32,
    generation: u32,
    name: [u8; NAME_BYTES],
    addr: usize,
    iova: u64,
    len: usize,
    page_size: u64,
    socket: i32,
    flags: MemzoneFlags,
}

impl fmt::Debug for Memzone<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memzone")
            .field("name", &self.name())
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("page_size", &self.page_size)
            .field("socket", &self.socket)
            .field("flags", &self.flags)
            .finish()
    }
}

impl<'m> Memzone<'m> {
    fn from_entry(mem: &'m Instance, index: u32, e: &EntrySnap) -> Memzone<'m> {
        Memzone {
            mem,
            index,
            generation: e.generation,
            name: e.name,
            addr: e.addr as usize,
            iova: e.iova,
            len: e.len as usize,
            page_size: e.page_size,
            socket: e.socket,
            flags: MemzoneFlags(e.flags),
        }
    }

    /// The zone's name.
    pub fn name(&self) -> &str {
        crate::memseg::layout::name_str(&self.name)
    }

    /// First byte.
    pub fn addr(&self) -> NonNull<u8> {
        NonNull::new(self.addr as *mut u8).unwrap_or(NonNull::dangling())
    }

    /// First byte, for reading.
    pub fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }

    /// First byte, for writing (other handles and processes see the same
    /// bytes: synchronising access is the caller's business).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// IOVA of the first byte ([`BAD_IOVA`] when unknown).
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a zone has at least 64 bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size under the zone.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Socket the memory came from.
    pub fn socket(&self) -> i32 {
        self.socket
    }

    /// Flags it was reserved with.
    pub fn flags(&self) -> MemzoneFlags {
        self.flags
    }

    /// Slot in the table.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the zone still exists (not freed through another handle or
    /// by another process).
    pub fn is_live(&self) -> bool {
        let e = self.mem.zones.t.entry(self.index);
        e.generation.load(Ordering::Acquire) == self.generation
            && e.state.load(Ordering::Acquire) == STATE_READY
    }

    /// A snapshot for reports.
    pub fn info(&self) -> MemzoneInfo {
        // A handle's index is below the capacity: there is an entry.
        match self.mem.zones.t.read(|v| v.entry(self.index)) {
            Some(e) => self.info_from(&e),
            None => self.info_from(&EntrySnap::default()),
        }
    }

    /// The zone's bytes.
    ///
    /// # Safety
    /// Nobody (thread, process, device) may write the zone while the slice
    /// lives, and the zone must not be freed meanwhile.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the zone is `len` mapped bytes of the instance (it lives
        // as long as `Memory`, which outlives `self`); the caller
        // guarantees no concurrent writes and no free.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The zone's bytes, for writing.
    ///
    /// # Safety
    /// Nobody else may read or write the zone while the slice lives, and
    /// the zone must not be freed meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as `as_slice`, with exclusive access guaranteed by the
        // caller.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// Frees the zone: its name can be reserved again and its memory goes
    /// back to the heap. Fails with [`MemzoneError::Stale`] if the zone was
    /// freed already through another handle.
    ///
    /// Pointers into the zone (from this or other handles) must not be
    /// used afterwards.
    pub fn free(self) -> Result<()> {
        self.mem.zones_not_in_callback("memzone free")?;
        let ticket = self.unlink_for_free()?;
        self.finish_free(ticket)
    }

    /// First half of [`free`](Self::free): takes the zone out of the
    /// table (its name is free again), unless it is stale. Returns the
    /// ticket [`finish_free`](Self::finish_free) needs.
    fn unlink_for_free(&self) -> std::result::Result<u32, MemzoneError> {
        let mut w = self.mem.zones.t.write();
        let e = w.entry(self.index);
        if e.generation.load(Ordering::Acquire) != self.generation
            || e.state.load(Ordering::Acquire) != STATE_READY
        {
            return Err(MemzoneError::Stale {
                name: self.name().to_string(),
            });
        }
        Ok(w.unlink(self.index, crate::shm::lock::cached_pid()))
    }

    /// Second half of [`free`](Self::free): gives the memory back and
    /// recycles the entry.
    fn finish_free(self, ticket: u32) -> Result<()> {
        // The memory goes back outside the table lock: a free may unmap
        // pages and fire memory events, whose callbacks may look zones up.
        // The entry stays FREEING, in our name, meanwhile: a table rebuilt
        // by a writer that took over a dead one's lock leaves it to us.
        // SAFETY: the block is the zone's, unlinked above, so no new
        // handle can reach it; the caller gives up its pointers.
        let r = unsafe { self.mem.free_uncached(self.addr()) };
        self.mem.zones.t.write().release(self.index, ticket, true);
        tracing::debug!(name = self.name(), len = self.len, "memzone freed");
        r
    }
}

/// A name, checked and NUL-padded.
fn zone_key(name: &str) -> std::result::Result<[u8; NAME_BYTES], MemzoneError> {
    if name.is_empty() {
        return Err(MemzoneError::EmptyName);
    }
    if name.len() > MEMZONE_NAME_MAX {
        return Err(MemzoneError::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    if name.as_bytes().contains(&0) {
        return Err(MemzoneError::BadName {
            name: name.to_string(),
        });
    }
    let mut key = [0u8; NAME_BYTES];
    key[..name.len()].copy_from_slice(name.as_bytes());
    Ok(key)
}

/// A checked request.
struct ZoneRequest {
    key: [u8; NAME_BYTES],
    /// Rounded length; 0 = the biggest free block.
    len: usize,
    align: usize,
    bound: usize,
    socket: i32,
    flags: MemzoneFlags,
}

impl ZoneRequest {
    fn describe(&self) -> String {
        let mut s = if self.len == 0 {
            "the biggest free block".to_string()
        } else {
            format!("{} bytes", self.len)
        };
        if self.align > MEMZONE_MIN_ALIGN {
            let _ = write!(s, ", align {}", self.align);
        }
        if self.bound != 0 {
            let _ = write!(s, ", bound {}", self.bound);
        }
        if self.socket != SOCKET_ID_ANY {
            let _ = write!(s, ", socket {}", self.socket);
        }
        if self.flags != MemzoneFlags::NONE {
            let _ = write!(s, ", flags {}", self.flags);
        }
        s
    }
}

/// How long a reserver waits between looks at a name another reserver
/// holds.
const PENDING_POLL: Duration = Duration::from_micros(50);

impl Instance {
    /// Reserves `len` bytes named `name` on `socket` ([`SOCKET_ID_ANY`]: the
    /// caller's node first), aligned to 64 bytes.
    ///
    /// `len` is rounded up to a multiple of 64; `len == 0` reserves the
    /// biggest free block (without growing the heap). See
    /// [`memzone_reserve_bounded`](Self::memzone_reserve_bounded) for
    /// every rule.
    pub fn memzone_reserve(
        &self,
        name: &str,
        len: usize,
        socket: i32,
        flags: MemzoneFlags,
    ) -> Result<Memzone<'_>> {
        self.memzone_reserve_bounded(name, len, socket, flags, 0, 0)
    }

    /// [`memzone_reserve`](Self::memzone_reserve) with an alignment (a
    /// power of two; below 64 it is raised to 64).
    pub fn memzone_reserve_aligned(
        &self,
        name: &str,
        len: usize,
        socket: i32,
        flags: MemzoneFlags,
        align: usize,
    ) -> Result<Memzone<'_>> {
        self.memzone_reserve_bounded(name, len, socket, flags, align, 0)
    }

    /// Reserves a named zone with every constraint:
    ///
    /// - `name`: 1 to 31 bytes, no NUL, not in use;
    /// - `len`: rounded up to a multiple of 64. `0` with `bound == 0`: the
    ///   biggest free block on that socket (no heap growth), IOVA-contiguous
    ///   with [`MemzoneFlags::IOVA_CONTIG`]; `0` with a bound: `bound`
    ///   bytes;
    /// - `align`: 0 (64) or a power of two;
    /// - `bound`: 0 or a power of two `>= len`: the zone does not cross a
    ///   multiple of it;
    /// - `socket`: a node, an external heap's id, or [`SOCKET_ID_ANY`];
    /// - `flags`: page sizes (required, or preferred with
    ///   `SIZE_HINT_ONLY`), `IOVA_CONTIG`, `ZERO`.
    ///
    /// Errors leave the table and the heap as they were.
    pub fn memzone_reserve_bounded(
        &self,
        name: &str,
        len: usize,
        socket: i32,
        flags: MemzoneFlags,
        align: usize,
        bound: usize,
    ) -> Result<Memzone<'_>> {
        let req = self.check_zone_request(name, len, socket, flags, align, bound)?;
        self.zones_not_in_callback("memzone reserve")?;
        let index = self.claim_zone(&req)?;
        match self.zone_memory(&req) {
            Ok((ptr, got)) => Ok(self.publish_zone(&req, index, ptr, got)),
            Err(e) => {
                let mut w = self.zones.t.write();
                let ticket = w.unlink(index, crate::shm::lock::cached_pid());
                w.release(index, ticket, false);
                Err(MemzoneError::Alloc {
                    name: name.to_string(),
                    what: req.describe(),
                    source: Box::new(e),
                }
                .into())
            }
        }
    }

    /// The zone named `name`, if it exists (a zone still being reserved
    /// does not, yet).
    pub fn memzone_lookup(&self, name: &str) -> Option<Memzone<'_>> {
        let key = zone_key(name).ok()?;
        let hash = hash_name(&key);
        let (i, e) = self.zones.t.read(|v| v.lookup(&key, hash))?;
        Some(Memzone::from_entry(self, i, &e))
    }

    /// Zones that exist.
    pub fn memzone_count(&self) -> usize {
        self.memzone_stats().count as usize
    }

    /// Entries of the table (`--max-memzones`).
    pub fn memzone_capacity(&self) -> usize {
        self.zones.t.capacity() as usize
    }

    /// Counters of the table.
    pub fn memzone_stats(&self) -> MemzoneTableStats {
        self.zones.t.read(|v| {
            let mut bytes = 0u64;
            for i in 0..v.high_water() {
                if v.state(i) == Some(STATE_READY) {
                    bytes = bytes.wrapping_add(v.entry(i).map_or(0, |e| e.len));
                }
            }
            let (reserves, frees) = v.totals();
            MemzoneTableStats {
                capacity: self.zones.t.capacity(),
                count: v.count(),
                bytes,
                reserves,
                frees,
            }
        })
    }

    /// Every zone, in table order (a snapshot).
    pub fn memzones(&self) -> Vec<MemzoneInfo> {
        // Copied without the lock (a copy a writer spoils is made again),
        // then turned into reports.
        let mut ready: Vec<(u32, EntrySnap)> = Vec::new();
        self.zones.t.read(|v| {
            ready.clear();
            for i in 0..v.high_water() {
                if v.state(i) == Some(STATE_READY) {
                    ready.extend(v.entry(i).map(|e| (i, e)));
                }
            }
        });
        ready
            .iter()
            .map(|(i, e)| Memzone::from_entry(self, *i, e).info_from(e))
            .collect()
    }

    /// Calls `f` for every zone, in table order. `f` runs on a snapshot,
    /// outside the table lock, so it may reserve, look up or free zones.
    pub fn memzone_walk(&self, mut f: impl FnMut(&MemzoneInfo)) {
        for z in self.memzones() {
            f(&z);
        }
    }

    /// Writes a table of the zones, with a summary line.
    pub fn memzone_dump(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let zones = self.memzones();
        let st = self.memzone_stats();
        writeln!(
            out,
            "memzones: {} of {} (--max-memzones), {} in zones, {} reserved and {} freed since start",
            st.count,
            st.capacity,
            format_size(st.bytes),
            st.reserves,
            st.frees
        )?;
        if zones.is_empty() {
            return Ok(());
        }
        writeln!(
            out,
            "  {:>5}  {:<31}  {:>10}  {:>6}  {:>5}  {:>18}  {:>18}  flags",
            "index", "name", "len", "socket", "page", "virt", "iova"
        )?;
        for z in &zones {
            writeln!(
                out,
                "  {:>5}  {:<31}  {:>10}  {:>6}  {:>5}  {:>#18x}  {:>18}  {}",
                z.index,
                z.name,
                format_size(z.len as u64),
                z.socket,
                format_size(z.page_size),
                z.addr,
                z.iova
                    .map_or_else(|| "-".to_string(), |i| format!("{i:#x}")),
                z.flags_text
            )?;
        }
        Ok(())
    }

    /// The zones and the table's counters as JSON.
    pub fn memzone_dump_json(&self) -> serde_json::Value {
        serde_json::json!({
            "table": self.memzone_stats(),
            "zones": self.memzones(),
        })
    }

    fn zones_not_in_callback(&self, what: &'static str) -> std::result::Result<(), MemzoneError> {
        if crate::memseg::events::is_in_callback(self.callback_id()) {
            Err(MemzoneError::Reentrant { what })
        } else {
            Ok(())
        }
    }

    fn check_zone_request(
        &self,
        name: &str,
        len: usize,
        socket: i32,
        flags: MemzoneFlags,
        align: usize,
        bound: usize,
    ) -> std::result::Result<ZoneRequest, MemzoneError> {
        let key = zone_key(name)?;
        let flags = MemzoneFlags::from_bits(flags.bits())?;
        if align != 0 && !align.is_power_of_two() {
            return Err(MemzoneError::BadAlign { align });
        }
        let align = align.max(MEMZONE_MIN_ALIGN);
        if bound != 0 && !bound.is_power_of_two() {
            return Err(MemzoneError::BadBound {
                bound,
                len,
                why: "not a power of two",
            });
        }
        let rounded = if len == 0 {
            bound
        } else {
            len.checked_next_multiple_of(MEMZONE_MIN_ALIGN)
                .filter(|&l| isize::try_from(l).is_ok())
                .ok_or(MemzoneError::TooLarge { len })?
        };
        if bound != 0 && rounded > bound {
            return Err(MemzoneError::BadBound {
                bound,
                len,
                why: "smaller than the length (rounded up to 64)",
            });
        }
        if socket < SOCKET_ID_ANY {
            return Err(MemzoneError::BadSocket { socket });
        }
        self.check_socket(socket)
            .map_err(|e: HeapError| MemzoneError::Alloc {
                name: name.to_string(),
                what: format!("socket {socket}"),
                source: Box::new(e.into()),
            })?;
        let wanted = flags.page_sizes();
        if !wanted.is_empty() && !flags.contains(MemzoneFlags::SIZE_HINT_ONLY) {
            let have = self.instance_page_sizes();
            if !have.iter().any(|p| wanted.contains(p))
                && socket < crate::heap::EXTERNAL_SOCKET_BASE
            {
                return Err(MemzoneError::NoPageSize {
                    flags,
                    have: have
                        .iter()
                        .map(|&p| format_size(p))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(ZoneRequest {
            key,
            len: rounded,
            align,
            bound,
            socket,
            flags,
        })
    }

    /// Page sizes of the instance's memory types.
    fn instance_page_sizes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = (0..)
            .map_while(|i| self.list_meta(i))
            .map(|m| m.1.bytes())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Claims the name; waits while another reserver holds it.
    fn claim_zone(&self, req: &ZoneRequest) -> std::result::Result<u32, MemzoneError> {
        let hash = hash_name(&req.key);
        let pid = crate::shm::lock::cached_pid();
        let name = || crate::memseg::layout::name_str(&req.key).to_string();
        loop {
            let owner = {
                let mut w = self.zones.t.write();
                match w.claim(&req.key, hash, pid) {
                    Claim::Claimed(i) => return Ok(i),
                    Claim::Exists(i) => {
                        let e = w.entry(i).snapshot();
                        return Err(MemzoneError::Exists {
                            name: name(),
                            len: e.len,
                            socket: e.socket,
                            pid: e.owner_pid,
                        });
                    }
                    Claim::Full => {
                        return Err(MemzoneError::TableFull {
                            capacity: self.zones.t.capacity(),
                        })
                    }
                    Claim::Pending(owner) => owner,
                }
            };
            if owner != pid && crate::shm::lock::pid_is_dead(owner) {
                // The reserver died between claiming the name and
                // publishing the zone: drop its claim. (Its memory, if it
                // got any, is the multi-process recovery's business.)
                let mut w = self.zones.t.write();
                if let Some(i) = w.find(&req.key, hash) {
                    let e = w.entry(i);
                    if e.state.load(Ordering::Acquire) == table::STATE_RESERVING
                        && e.owner_pid.load(Ordering::Relaxed) == owner
                    {
                        tracing::warn!(name = %name(), pid = owner, "dropping the memzone claim of a dead process");
                        let ticket = w.unlink(i, pid);
                        w.release(i, ticket, false);
                    }
                }
                continue;
            }
            std::thread::sleep(PENDING_POLL);
        }
    }

    /// The memory of a zone: a heap block, or the biggest free block.
    fn zone_memory(&self, req: &ZoneRequest) -> Result<(NonNull<u8>, usize)> {
        let sizes = req.flags.heap_sizes();
        let hint = req.flags.contains(MemzoneFlags::SIZE_HINT_ONLY);
        let contig = req.flags.contains(MemzoneFlags::IOVA_CONTIG);
        let zero = req.flags.contains(MemzoneFlags::ZERO);
        if req.len == 0 {
            let got = match self.biggest_block(req.socket, req.align, sizes, contig) {
                Err(_) if hint && !sizes.is_any() => {
                    self.biggest_block(req.socket, req.align, PageSizes::ANY, contig)
                }
                r => r,
            }?;
            if zero {
                // SAFETY: the block was just allocated, `got.1` bytes.
                unsafe { std::ptr::write_bytes(got.0.as_ptr(), 0, got.1) };
            }
            return Ok(got);
        }
        let mut ar = AllocRequest::new(req.len)
            .uncached()
            .align(req.align)
            .bound(req.bound)
            .socket(req.socket)
            .page_sizes(sizes, hint);
        if contig {
            ar = ar.contig();
        }
        if zero {
            ar = ar.zeroed();
        }
        self.heap_alloc(&ar).map(|p| (p, req.len))
    }

    fn publish_zone(
        &self,
        req: &ZoneRequest,
        index: u32,
        ptr: NonNull<u8>,
        len: usize,
    ) -> Memzone<'_> {
        let iova = self.malloc_virt2iova(ptr).unwrap_or(BAD_IOVA);
        let (socket, page_size) = self.block_origin(ptr).unwrap_or((req.socket, 0));
        let mut w = self.zones.t.write();
        let e = w.entry_mut(index);
        e.addr.store(ptr.as_ptr() as u64, Ordering::Relaxed);
        e.iova.store(iova, Ordering::Relaxed);
        e.len.store(len as u64, Ordering::Relaxed);
        e.page_size.store(page_size, Ordering::Relaxed);
        e.align.store(req.align as u64, Ordering::Relaxed);
        e.bound.store(req.bound as u64, Ordering::Relaxed);
        e.socket.store(socket, Ordering::Relaxed);
        e.flags.store(req.flags.bits(), Ordering::Relaxed);
        w.publish(index);
        let mz = Memzone::from_entry(self, index, &w.entry(index).snapshot());
        drop(w);
        tracing::debug!(name = mz.name(), len, socket, page_size, "memzone reserved");
        mz
    }
}

impl Memzone<'_> {
    /// `info` with a copy of the entry at hand.
    fn info_from(&self, e: &EntrySnap) -> MemzoneInfo {
        MemzoneInfo {
            index: self.index,
            name: self.name().to_string(),
            addr: self.addr,
            iova: (self.iova != BAD_IOVA).then_some(self.iova),
            len: self.len,
            page_size: self.page_size,
            socket: self.socket,
            flags: self.flags.bits(),
            flags_text: self.flags.to_string(),
            align: e.align,
            bound: e.bound,
            owner_pid: e.owner_pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemOptions, Memory};

    /// A process that takes the memzone table's write lock and dies
    /// holding it (a secondary SIGKILLed inside a table update). With
    /// `freeing`, it dies in the middle of freeing that entry's zone (the
    /// entry marked FREEING in its name, still in the index, the table's
    /// change counter odd). Returns once it is dead and reaped.
    fn die_holding_the_table_lock(mem: &Memory, freeing: Option<u32>) {
        let lock = mem.zones.t.lock();
        // SAFETY: the child only does atomic operations on shared memory
        // and `_exit`s (async-signal-safe; nothing of the parent's other
        // threads is touched); the parent only waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = match freeing {
                None => lock.try_write().map(std::mem::forget).is_some(),
                Some(i) => {
                    // The lock is free: `write` takes it at once.
                    let mut w = mem.zones.t.write();
                    let e = w.entry_mut(i);
                    e.freer_pid.store(std::process::id(), Ordering::Relaxed);
                    e.state.store(table::STATE_FREEING, Ordering::Release);
                    std::mem::forget(w);
                    true
                }
            };
            // SAFETY: ends the forked child at once, without running the
            // parent's atexit handlers or destructors.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child could not take the lock ({status:#x})"
        );
        assert_eq!(lock.writer_pid(), Some(pid as u32));
    }

    /// A private `--no-huge` instance of 16 MB (prefix `tag` + pid) and
    /// its runtime directory: bind as `(_dir, mem)` so the instance drops
    /// first.
    fn no_huge_instance(tag: &str) -> (tempfile::TempDir, Memory) {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("{tag}{}", std::process::id());
        let opts = MemOptions::parse_args(&[
            "--no-huge",
            "-m",
            "16",
            "--file-prefix",
            &prefix,
            "--runtime-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let mem = Memory::init(&opts).unwrap();
        (dir, mem)
    }

    #[test]
    fn a_free_in_progress_survives_a_dead_lock_holder_and_the_rebuild() {
        let (_dir, mem) = no_huge_instance("mzdead");
        let reserve = |name: &str| {
            mem.memzone_reserve(name, 4096, SOCKET_ID_ANY, MemzoneFlags::NONE)
                .unwrap()
        };
        let freeing = reserve("freeing");
        let kept = reserve("kept");
        let freeing_index = freeing.index();
        // We are freeing a zone: unlinked, its memory on the way back.
        let ticket = freeing.unlink_for_free().unwrap();
        // Another process dies inside a table update meanwhile; the next
        // writer takes the lock over and rebuilds the table.
        die_holding_the_table_lock(&mem, None);
        let after = reserve("after");
        assert_ne!(
            after.index(),
            freeing_index,
            "the entry being freed was handed out"
        );
        // Our free completes; the entry is recycled once.
        freeing.finish_free(ticket).unwrap();
        let more = [reserve("more1"), reserve("more2")];
        let mut idx: Vec<u32> = [&kept, &after, &more[0], &more[1]]
            .iter()
            .map(|m| m.index())
            .collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), 4, "an entry was handed out twice");
        let [more1, more2] = more;
        for zone in [kept, after, more1, more2] {
            let name = zone.name().to_string();
            assert!(zone.is_live(), "{name}");
            zone.free()
                .unwrap_or_else(|err| panic!("freeing our own {name}: {err}"));
        }
        assert_eq!(mem.memzone_count(), 0);
        assert_eq!(mem.memzone_stats().frees, 5);
    }

    #[test]
    fn a_lookup_takes_over_from_a_writer_killed_inside_a_change() {
        let (_dir, mem) = no_huge_instance("mzseq");
        let a = mem
            .memzone_reserve("a", 4096, SOCKET_ID_ANY, MemzoneFlags::NONE)
            .unwrap();
        let b = mem
            .memzone_reserve("b", 8192, SOCKET_ID_ANY, MemzoneFlags::NONE)
            .unwrap();
        // Killed in the middle of freeing a: readers find the change
        // counter odd for good.
        die_holding_the_table_lock(&mem, Some(a.index()));
        assert!(mem.zones.t.seq().is_writing());
        // A lookup gives up on the counter, goes to the lock, takes it
        // over from the dead writer and rebuilds; the counter is even
        // again and every reader and writer goes on.
        let t0 = std::time::Instant::now();
        let found = mem.memzone_lookup("b").expect("b");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!((found.index(), found.len()), (b.index(), 8192));
        assert!(!mem.zones.t.seq().is_writing());
        assert_eq!(mem.zones.t.lock().writer_pid(), None);
        // The rebuild dropped the dead freer's half-done free: a is gone
        // (its memory stays allocated, as for any free cut short).
        assert!(mem.memzone_lookup("a").is_none());
        assert!(!a.is_live() && b.is_live());
        assert!(matches!(
            a.free(),
            Err(Error::Memzone(MemzoneError::Stale { .. }))
        ));
        assert_eq!(mem.memzone_stats().count, 1);
        assert_eq!(mem.memzones().len(), 1);
        b.free().unwrap();
        let c = mem
            .memzone_reserve("c", 64, SOCKET_ID_ANY, MemzoneFlags::NONE)
            .unwrap();
        c.free().unwrap();
        assert_eq!(mem.memzone_count(), 0);
    }

    #[test]
    fn names_are_checked() {
        assert!(matches!(zone_key(""), Err(MemzoneError::EmptyName)));
        assert!(zone_key(&"x".repeat(31)).is_ok());
        assert!(matches!(
            zone_key(&"x".repeat(32)),
            Err(MemzoneError::NameTooLong { len: 32, .. })
        ));
        assert!(matches!(
            zone_key("a\0b"),
            Err(MemzoneError::BadName { .. })
        ));
    }

    #[test]
    fn flags_have_dpdk_values_and_names() {
        assert_eq!(MemzoneFlags::PAGE_2M.bits(), 0x1);
        assert_eq!(MemzoneFlags::PAGE_1G.bits(), 0x2);
        assert_eq!(MemzoneFlags::IOVA_CONTIG.bits(), 0x10_0000);
        let f = MemzoneFlags::PAGE_1G | MemzoneFlags::PAGE_2M | MemzoneFlags::SIZE_HINT_ONLY;
        assert_eq!(f.to_string(), "PAGE_2M|PAGE_1G|SIZE_HINT_ONLY");
        assert_eq!(f.page_sizes(), vec![2 << 20, 1 << 30]);
        assert!(matches!(
            MemzoneFlags::from_bits(0x8),
            Err(MemzoneError::BadFlags { bits: 0x8 })
        ));
        assert_eq!(
            MemzoneFlags::for_page_size(16 << 30),
            Some(MemzoneFlags::PAGE_16G)
        );
        assert_eq!(MemzoneFlags::NONE.to_string(), "NONE");
    }
}
