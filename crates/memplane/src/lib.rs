//! memplane: a hugepage memory subsystem for data-plane programs.
//!
//! It does the job of DPDK's EAL memory layer (hugepage discovery and
//! mapping, memseg lists, a NUMA-aware heap, memzones, multi-process
//! sharing) as a safe Rust library with no global state: everything hangs off
//! a handle, so two independent instances can live in one process.
//!
//! This crate is built bottom-up. What exists today:
//!
//! - [`hugepages`]: discovery of page sizes, per-node counts, hugetlbfs
//!   mounts, cgroup limits, memlock and pagemap access; files left in mounts;
//!   reserving pages and mounting hugetlbfs.
//! - [`preflight`]: checks a memory request against what the machine can
//!   really give before anything is mapped, and explains any shortfall.
//! - [`options`]: [`MemOptions`], the typed form of DPDK's EAL memory flags.
//! - [`runtime_dir`]: the per-prefix runtime directory and primary lock.
//! - [`Memory`]: one instance: the shared config and memseg lists in one
//!   address-space reservation, pages mapped and unmapped at run time
//!   ([`memseg`]), with [`numa`] placement and [`iova`] addresses.
//! - [`heap`]: the malloc heaps on top (`malloc`, `zmalloc`, `realloc`,
//!   `free` and friends on [`Memory`]), external heaps, stats, validation.
//! - [`memzone`]: named reservations any process of the instance can look
//!   up by name, with page-size, contiguity, alignment and boundary
//!   constraints.
//!
//! # Example
//!
//! ```no_run
//! use memplane::hugepages::{Discovery, SystemRoots};
//!
//! let snapshot = Discovery::new(SystemRoots::real()).discover()?;
//! for size in &snapshot.sizes {
//!     println!("{}: {} of {} free", size.page_size, size.free, size.total);
//! }
//! # Ok::<(), memplane::Error>(())
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod fbarray;
pub mod heap;
pub mod hugepages;
pub mod iova;
pub mod ipc;
mod memory;
pub mod memseg;
pub mod memzone;
pub mod mp;
pub mod numa;
pub mod options;
pub mod preflight;
pub mod runtime_dir;
pub mod shm;
pub mod units;

pub use error::{Error, Result};
pub use memory::{Instance, Memory, MemoryLayout};
pub use options::MemOptions;
pub use units::PageSize;
