//! Rings in memzones: a ring created by name inside a [`memplane`]
//! instance's hugepage memory, found by name from any thread of the
//! instance (and, once secondaries attach, from any process), freed by
//! name.
//!
//! The ring lives in a memzone named `RG_<name>` (DPDK's prefix), so ring
//! names are at most [`ZONE_RING_NAME_MAX`] bytes. Header and slots are in
//! the zone; nothing process-local is stored.
//!
//! ```no_run
//! use memplane::heap::SOCKET_ID_ANY;
//! use memplane::{MemOptions, Memory};
//! use memplane_ring::{Ring, RingConfig, ZoneRegion};
//!
//! let mem = Memory::init(&MemOptions::parse_args(&["--file-prefix", "doc-ring"])?)?;
//! let ring: Ring<u64, ZoneRegion<'_>> =
//!     Ring::create(&mem, "rx", 1024, SOCKET_ID_ANY, RingConfig::MPMC)?;
//! ring.producer()?.try_enqueue(7).unwrap();
//!
//! let same: Ring<u64, ZoneRegion<'_>> = Ring::lookup(&mem, "rx")?;
//! assert_eq!(same.consumer()?.dequeue(), Some(7));
//! drop(same);
//! ring.free()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use memplane::memzone::{Memzone, MemzoneFlags, MemzoneInfo, MEMZONE_NAME_MAX};
use memplane::Memory;

use crate::{memsize, Element, RawRing, Ring, RingConfig, RingError, RingMemory};

/// Prefix of the memzone a ring lives in (as DPDK's `RTE_RING_MZ_PREFIX`).
pub const RING_ZONE_PREFIX: &str = "RG_";

/// Longest name of a ring in a memzone (the zone name adds the prefix).
pub const ZONE_RING_NAME_MAX: usize = MEMZONE_NAME_MAX - RING_ZONE_PREFIX.len();

/// Why a ring could not be created, found or freed in a memzone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZoneRingError {
    /// The ring itself refused (capacity, element size, name).
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The memzone could not be reserved or freed (name in use, table
    /// full, no memory; the message says which and what helps).
    #[error(transparent)]
    Memory(#[from] memplane::Error),
    /// No ring of that name.
    #[error("no ring named {name:?} (no memzone {RING_ZONE_PREFIX}{name})")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The name does not fit a memzone name with the prefix.
    #[error("ring name {name:?} is {len} bytes; rings in memzones allow at most {ZONE_RING_NAME_MAX} (the zone is named {RING_ZONE_PREFIX}<name>)")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
}

/// A memzone as ring memory.
pub struct ZoneRegion<'m> {
    zone: Memzone<'m>,
}

impl<'m> ZoneRegion<'m> {
    /// The zone.
    pub fn zone(&self) -> &Memzone<'m> {
        &self.zone
    }

    /// The zone, giving up the region.
    pub fn into_zone(self) -> Memzone<'m> {
        self.zone
    }
}

// SAFETY: a memzone's address and length never change while it exists,
// and it exists as long as the handle (freeing consumes the handle); the
// memory stays mapped as long as the `Memory` the handle borrows. Ring
// handles are the only users of the zone's bytes by convention of the
// `RG_` prefix.
unsafe impl RingMemory for ZoneRegion<'_> {
    fn as_ptr(&self) -> *mut u8 {
        self.zone.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.zone.len()
    }
}

fn zone_name(name: &str) -> Result<String, ZoneRingError> {
    if name.len() > ZONE_RING_NAME_MAX {
        return Err(ZoneRingError::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    if name.is_empty() {
        return Err(RingError::Invalid("a ring in a memzone needs a name").into());
    }
    Ok(format!("{RING_ZONE_PREFIX}{name}"))
}

/// Reserves the zone for a ring of `bytes`, runs `init` in it, and frees
/// the zone again if `init` refuses.
fn create_in_zone<'m, R>(
    mem: &'m Memory,
    name: &str,
    bytes: usize,
    socket: i32,
    init: impl FnOnce(ZoneRegion<'m>) -> Result<R, RingError>,
) -> Result<R, ZoneRingError> {
    let zname = zone_name(name)?;
    let zone = mem.memzone_reserve_aligned(&zname, bytes, socket, MemzoneFlags::NONE, 64)?;
    match init(ZoneRegion { zone }) {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Some(z) = mem.memzone_lookup(&zname) {
                z.free()?;
            }
            Err(e.into())
        }
    }
}

fn find_zone<'m>(mem: &'m Memory, name: &str) -> Result<ZoneRegion<'m>, ZoneRingError> {
    let zname = zone_name(name)?;
    let zone = mem
        .memzone_lookup(&zname)
        .ok_or_else(|| ZoneRingError::NotFound {
            name: name.to_string(),
        })?;
    Ok(ZoneRegion { zone })
}

impl<'m, T: Element> Ring<T, ZoneRegion<'m>> {
    /// Creates a ring of `capacity` `T`s named `name` in a new memzone
    /// `RG_<name>` on `socket` (a node or `SOCKET_ID_ANY`).
    ///
    /// Errors: the ring's (capacity, element type, name), or the memzone's
    /// (name in use: another ring or zone has it; table full; no memory).
    /// On error no zone is left behind.
    pub fn create(
        mem: &'m Memory,
        name: &str,
        capacity: usize,
        socket: i32,
        cfg: RingConfig,
    ) -> Result<Self, ZoneRingError> {
        let bytes = Self::memsize(capacity, cfg.exact)?;
        create_in_zone(mem, name, bytes, socket, |region| {
            Ring::init(region, name, capacity, cfg)
        })
    }

    /// The ring named `name`, created by this or another thread or
    /// process; its element size must be `size_of::<T>()`.
    pub fn lookup(mem: &'m Memory, name: &str) -> Result<Self, ZoneRingError> {
        Ok(Ring::attach(find_zone(mem, name)?)?)
    }

    /// Frees the ring's memzone. Other handles to the ring (lookups in
    /// this or other processes) must not be used afterwards.
    pub fn free(self) -> Result<(), ZoneRingError> {
        self.into_memory().zone.free()?;
        Ok(())
    }
}

impl<'m> RawRing<ZoneRegion<'m>> {
    /// Creates a ring of `capacity` elements of `esize` bytes named
    /// `name` in a new memzone `RG_<name>` on `socket`.
    pub fn create(
        mem: &'m Memory,
        name: &str,
        esize: usize,
        capacity: usize,
        socket: i32,
        cfg: RingConfig,
    ) -> Result<Self, ZoneRingError> {
        let bytes = memsize(esize, capacity, cfg.exact)?;
        create_in_zone(mem, name, bytes, socket, |region| {
            RawRing::init(region, name, esize, capacity, cfg)
        })
    }

    /// The ring named `name`, any element size.
    pub fn lookup(mem: &'m Memory, name: &str) -> Result<Self, ZoneRingError> {
        Ok(RawRing::attach(find_zone(mem, name)?)?)
    }

    /// Frees the ring's memzone.
    pub fn free(self) -> Result<(), ZoneRingError> {
        self.into_memory().zone.free()?;
        Ok(())
    }
}

/// A ring found in an instance's memzones, for reports (`memplane info`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RingInfo {
    /// Ring name (without the zone prefix).
    pub name: String,
    /// Elements it holds at most.
    pub capacity: u32,
    /// Element size in bytes.
    pub element_size: u32,
    /// Elements in it now (a snapshot).
    pub count: u32,
    /// Producer sync mode.
    pub producer: String,
    /// Consumer sync mode.
    pub consumer: String,
    /// The zone it lives in.
    pub zone: MemzoneInfo,
}

/// Every ring in `mem`'s memzones (zones named `RG_*` that hold a valid
/// ring header).
pub fn rings(mem: &Memory) -> Vec<RingInfo> {
    let mut out = Vec::new();
    for z in mem.memzones() {
        let Some(name) = z.name.strip_prefix(RING_ZONE_PREFIX) else {
            continue;
        };
        let Ok(ring) = RawRing::lookup(mem, name) else {
            continue;
        };
        out.push(RingInfo {
            name: name.to_string(),
            capacity: ring.capacity(),
            element_size: ring.element_size(),
            count: ring.count(),
            producer: format!("{:?}", ring.producer_mode()),
            consumer: format!("{:?}", ring.consumer_mode()),
            zone: z,
        });
    }
    out
}
