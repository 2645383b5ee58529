//! memplane ring: a lock-free bounded FIFO whose header and slots live in
//! one caller-provided memory region, so the same region mapped into several
//! processes (at any addresses) is one ring.
//!
//! - Fixed capacity: a power of two, or exactly the requested count
//!   ([`RingConfig::exact`]).
//! - Producer and consumer sync modes chosen per ring ([`SyncMode`]):
//!   multi (CAS on head), single (claimed role, plain stores), RTS and HTS.
//! - One, bulk (all or nothing) and burst (as many as possible) transfers
//!   returning the free/available count; element sizes any multiple of 4.
//! - Typed face [`Ring<T>`](Ring) over [`Element`] types and a raw face
//!   [`RawRing`] over byte slices with a runtime element size.
//! - The region is anything implementing [`RingMemory`]: [`HeapRegion`],
//!   [`MmapRegion`] (anonymous or a mapped fd, e.g. from [`memfd_hugetlb`]),
//!   [`RawRegion`], or a memplane memzone ([`ZoneRegion`]: `Ring::create`
//!   / `Ring::lookup` / `free` by name in a [`memplane::Memory`]).
//!
//! The layout is in [`layout`] (module docs).
#![warn(missing_docs)]

mod error;
pub mod layout;
mod memory;
mod ring;
mod sync;
#[cfg(not(loom))]
mod zone;

pub use error::{BulkError, RingError};
pub use layout::{HEADER_SIZE, MAGIC, MAX_CAPACITY, NAME_MAX};
pub use memory::{memfd_hugetlb, HeapRegion, MmapRegion, RawRegion, RingMemory, HUGE_2M};
pub use ring::{
    memsize, Consumer, Element, Producer, RawConsumer, RawProducer, RawRing, Ring, RingConfig,
    SyncMode, Transfer,
};
#[cfg(not(loom))]
pub use zone::{rings, RingInfo, ZoneRegion, ZoneRingError, RING_ZONE_PREFIX, ZONE_RING_NAME_MAX};
