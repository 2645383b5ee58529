//! Where a memseg list's pages come from: the [`PageStore`] interface and
//! its memfd implementation (hugetlb memfd by default, plain shmem memfd for
//! `--no-huge`).
//!
//! A store only takes pages from the kernel and gives them back; mapping
//! them into the list's address space is the allocator's job. Every store
//! *reserves* pages (`fallocate`) before anyone maps or touches them, so a
//! shortfall or a hugetlb cgroup limit is an `ENOSPC` error here rather than
//! a SIGBUS later.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::FallocateFlags;
use serde::Serialize;

use super::MemsegError;
use crate::units::PageSize;

/// What backs a memseg list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum BackingKind {
    /// One hugetlb memfd per list (the default).
    HugetlbMemfd = 1,
    /// Files in a hugetlbfs mount, one per page.
    HugetlbfsFilePerPage = 2,
    /// Files in a hugetlbfs mount, one per list (`--single-file-segments`).
    HugetlbfsFilePerList = 3,
    /// A plain shmem memfd of 4 KiB pages (`--no-huge`).
    AnonymousMemfd = 4,
}

impl BackingKind {
    /// From the value stored in shared memory.
    pub fn from_u32(v: u32) -> Option<BackingKind> {
        Some(match v {
            1 => BackingKind::HugetlbMemfd,
            2 => BackingKind::HugetlbfsFilePerPage,
            3 => BackingKind::HugetlbfsFilePerList,
            4 => BackingKind::AnonymousMemfd,
            _ => return None,
        })
    }

    /// A short human name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackingKind::HugetlbMemfd => "hugetlb memfd",
            BackingKind::HugetlbfsFilePerPage => "hugetlbfs file per page",
            BackingKind::HugetlbfsFilePerList => "hugetlbfs file per list",
            BackingKind::AnonymousMemfd => "anonymous memfd (4 KiB pages)",
        }
    }
}

/// Whether freshly reserved pages are known to be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// New pages from the kernel: zero-filled.
    Zeroed,
    /// Pages that may hold old data (reused files).
    Dirty,
}

/// One run of slots that is a single mapping: `count` pages of `fd`
/// starting at `file_offset`, for slots `first..first + count`.
#[derive(Debug, Clone, Copy)]
pub struct Extent<'a> {
    /// The descriptor to map.
    pub fd: BorrowedFd<'a>,
    /// Offset of slot `first` in it.
    pub file_offset: u64,
    /// First slot.
    pub first: u32,
    /// Number of slots.
    pub count: u32,
}

/// A source of pages for one memseg list, addressed by slot index.
///
/// Implementations are process-local objects (they own descriptors); what
/// they reserve is visible to every process that maps the same descriptors.
pub trait PageStore: Send + Sync + fmt::Debug {
    /// What kind of store this is.
    fn kind(&self) -> BackingKind;

    /// Takes the pages of slots `first..first + count` from the kernel, all
    /// or nothing: on error nothing stays reserved. After `Ok`, mapping and
    /// touching those pages cannot fault for lack of memory.
    fn reserve(&self, first: u32, count: u32) -> Result<Freshness, MemsegError>;

    /// Calls `f` for each extent covering slots `first..first + count`, in
    /// slot order (one extent when the store is a single descriptor).
    fn extents(
        &self,
        first: u32,
        count: u32,
        f: &mut dyn FnMut(Extent<'_>) -> Result<(), MemsegError>,
    ) -> Result<(), MemsegError>;

    /// Gives the pages of slots `first..first + count` back to the kernel.
    /// They must no longer be mapped by this process.
    fn release(&self, first: u32, count: u32) -> Result<(), MemsegError>;

    /// Called once when the instance shuts down, after every page was
    /// released: remove files, close descriptors.
    fn shutdown(&self) {}
}

/// A whole list in one memfd: slot `i` at offset `i * page_size`.
#[derive(Debug)]
pub struct MemfdStore {
    fd: OwnedFd,
    page_size: u64,
    hugetlb: bool,
    name: String,
}

impl MemfdStore {
    /// Creates the memfd for a list of `capacity` pages of `page_size`
    /// (hugetlb unless `page_size` is the system page size) and sizes it.
    /// Sizing a memfd reserves nothing: pages are taken by [`reserve`].
    ///
    /// [`reserve`]: PageStore::reserve
    pub fn create(name: &str, page_size: PageSize, capacity: u32) -> Result<Self, MemsegError> {
        let hugetlb = page_size.bytes() != rustix::param::page_size() as u64;
        let flags = if hugetlb {
            crate::hugepages::hugetlb_memfd_flags(page_size)
        } else {
            rustix::fs::MemfdFlags::CLOEXEC
        };
        let fd = rustix::fs::memfd_create(name, flags).map_err(|e| MemsegError::Backing {
            what: format!("memfd_create({name}, {page_size} pages)"),
            source: e.into(),
        })?;
        let len = u64::from(capacity) * page_size.bytes();
        rustix::fs::ftruncate(&fd, len).map_err(|e| MemsegError::Backing {
            what: format!("sizing memfd {name} to {len} bytes"),
            source: e.into(),
        })?;
        Ok(MemfdStore {
            fd,
            page_size: page_size.bytes(),
            hugetlb,
            name: name.to_string(),
        })
    }

    /// The memfd (for secondaries, later sent over the IPC socket).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn punch(&self, first: u32, count: u32) -> rustix::io::Result<()> {
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            u64::from(first) * self.page_size,
            u64::from(count) * self.page_size,
        )
    }
}

impl PageStore for MemfdStore {
    fn kind(&self) -> BackingKind {
        if self.hugetlb {
            BackingKind::HugetlbMemfd
        } else {
            BackingKind::AnonymousMemfd
        }
    }

    fn reserve(&self, first: u32, count: u32) -> Result<Freshness, MemsegError> {
        let off = u64::from(first) * self.page_size;
        let len = u64::from(count) * self.page_size;
        match rustix::fs::fallocate(&self.fd, FallocateFlags::empty(), off, len) {
            Ok(()) => Ok(Freshness::Zeroed),
            Err(e) => {
                // A failed fallocate keeps the pages it got before failing:
                // give them back, or they stay taken until we exit. The
                // range held nothing of ours before (the slots were free).
                if let Err(pe) = self.punch(first, count) {
                    tracing::error!(memfd = %self.name, error = %pe, "cannot roll back a partial fallocate");
                }
                if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::NOMEM {
                    Err(MemsegError::OutOfPages {
                        asked: count,
                        page_size: self.page_size,
                        detail: format!("fallocate on {}: {e}", self.name),
                    })
                } else {
                    Err(MemsegError::Backing {
                        what: format!("fallocate of {count} pages on {}", self.name),
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn extents(
        &self,
        first: u32,
        count: u32,
        f: &mut dyn FnMut(Extent<'_>) -> Result<(), MemsegError>,
    ) -> Result<(), MemsegError> {
        f(Extent {
            fd: self.fd.as_fd(),
            file_offset: u64::from(first) * self.page_size,
            first,
            count,
        })
    }

    fn release(&self, first: u32, count: u32) -> Result<(), MemsegError> {
        self.punch(first, count).map_err(|e| MemsegError::Backing {
            what: format!("punching {count} pages out of {}", self.name),
            source: e.into(),
        })
    }
}
