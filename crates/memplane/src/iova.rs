//! Physical addresses of virtual pages, from `/proc/self/pagemap`.
//!
//! The kernel keeps one 8-byte entry per base page (index `va /
//! system_page_size`): bit 63 says the page is present, and then bits 0..=54
//! are its page frame number (PFN). The physical address is `PFN *
//! system_page_size + va % system_page_size`, as DPDK's `rte_mem_virt2phy`
//! computes it. Without `CAP_SYS_ADMIN` the kernel reports PFN 0; the
//! decision is taken with the credentials of whoever *opened* the file, so a
//! [`Pagemap`] opened while privileged keeps working after privileges drop.
//!
//! A hugepage has an entry for each base page it covers, with consecutive
//! PFNs, so the entry of its first base page gives its physical address.
//!
//! # Cost
//!
//! [`Pagemap::phys_addrs`] is on the page-allocation path. It reads the
//! whole span in one `pread` for base pages, and one 8-byte `pread` per page
//! for larger pages (reading the whole span would also fetch the 511 unused
//! entries of every 2 MiB page). Measured on the development machine (2
//! cores, Linux 6.18, root, release build, best of 50): 512 touched 2 MiB
//! pages take about 0.47 ms (0.9 µs per page); reading the span in one
//! `pread` instead (256 Ki entries, 2 MiB) takes about 1.35 ms. The ignored
//! test `phys_addrs_timing` in `tests/iova.rs` measures both.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use crate::hugepages::PagemapAccess as PaAccess;

/// The IOVA of a page whose physical address is unknown (DPDK's
/// `RTE_BAD_IOVA`).
pub const BAD_IOVA: u64 = u64::MAX;

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;
const ENTRY: usize = 8;

/// Errors reading physical addresses.
#[derive(Debug, thiserror::Error)]
pub enum IovaError {
    /// The pagemap file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The pagemap entries could not be read.
    #[error("cannot read {} at the entry of virtual address {va:#x}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The first virtual address asked for.
        va: usize,
        /// The error.
        source: io::Error,
    },
    /// The page size is not a power-of-two multiple of the system page size.
    #[error("page size {page_size} is not a power of two of at least the system page size {base}")]
    PageSize {
        /// The page size asked for.
        page_size: usize,
        /// The system page size.
        base: usize,
    },
    /// The pages asked for run past the end of the address space.
    #[error(
        "{count} pages of {page_size} bytes from {va:#x} run past the end of the address space"
    )]
    Range {
        /// First virtual address.
        va: usize,
        /// Number of pages.
        count: usize,
        /// Page size.
        page_size: usize,
    },
}

/// An open pagemap file of this process.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    path: PathBuf,
    base: usize,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Pagemap, IovaError> {
        Self::open_path("/proc/self/pagemap")
    }

    /// Opens a pagemap-format file (tests use fake ones).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Pagemap, IovaError> {
        let path = path.as_ref().to_path_buf();
        match File::open(&path) {
            Ok(file) => Ok(Pagemap {
                file,
                path,
                base: rustix::param::page_size(),
            }),
            Err(source) => Err(IovaError::Open { path, source }),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The physical address of `va`; `None` when its page is not present
    /// (never touched, or swapped out) or its frame number reads as 0 (no
    /// `CAP_SYS_ADMIN`).
    pub fn phys_addr(&self, va: usize) -> Result<Option<u64>, IovaError> {
        let mut buf = [0u8; ENTRY];
        self.read_entries(va, &mut buf)?;
        Ok(entry_to_pa(u64::from_ne_bytes(buf), va, self.base))
    }

    /// The physical addresses of `count` pages of `page_size` bytes starting
    /// at `va` (element `i` is that of `va + i * page_size`), each as
    /// [`Pagemap::phys_addr`] gives it. `page_size` must be a power of two of
    /// at least the system page size.
    pub fn phys_addrs(
        &self,
        va: usize,
        count: usize,
        page_size: usize,
    ) -> Result<Vec<Option<u64>>, IovaError> {
        if !page_size.is_power_of_two() || page_size < self.base {
            return Err(IovaError::PageSize {
                page_size,
                base: self.base,
            });
        }
        let range = || IovaError::Range {
            va,
            count,
            page_size,
        };
        count
            .checked_mul(page_size)
            .and_then(|len| va.checked_add(len))
            .ok_or_else(range)?;
        if page_size == self.base {
            let mut buf = vec![0u8; count.checked_mul(ENTRY).ok_or_else(range)?];
            self.read_entries(va, &mut buf)?;
            return Ok(buf
                .chunks_exact(ENTRY)
                .zip(0..)
                .map(|(e, i)| {
                    let entry = u64::from_ne_bytes(e.try_into().unwrap_or([0; ENTRY]));
                    entry_to_pa(entry, va + i * page_size, self.base)
                })
                .collect());
        }
        (0..count)
            .map(|i| {
                let page_va = va + i * page_size;
                let mut buf = [0u8; ENTRY];
                self.read_entries(page_va, &mut buf)?;
                Ok(entry_to_pa(u64::from_ne_bytes(buf), page_va, self.base))
            })
            .collect()
    }

    /// Whether this pagemap reveals physical addresses: maps and touches one
    /// anonymous base page and reads its entry.
    pub fn access(&self) -> PaAccess {
        let Some(page) = TouchedPage::new(self.base) else {
            // No memory to probe with; the file itself may well be fine.
            return PaAccess::ZeroedFrames;
        };
        match self.phys_addr(page.addr()) {
            Ok(Some(_)) => PaAccess::PhysicalAddresses,
            Ok(None) => PaAccess::ZeroedFrames,
            Err(_) => PaAccess::Unreadable,
        }
    }

    /// Reads the entries of the base pages from `va` on into `buf`.
    fn read_entries(&self, va: usize, buf: &mut [u8]) -> Result<(), IovaError> {
        let offset = (va / self.base) as u64 * ENTRY as u64;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| IovaError::Read {
                path: self.path.clone(),
                va,
                source,
            })
    }
}

impl PaAccess {
    /// Whether physical addresses can be read in this process (IOVA-as-PA is
    /// possible): opens `/proc/self/pagemap`, maps and touches one anonymous
    /// base page and reads its entry.
    pub fn probe() -> PaAccess {
        Pagemap::open().map_or(PaAccess::Unreadable, |p| p.access())
    }
}

/// The physical address in a pagemap entry for `va`, if present and
/// revealed.
fn entry_to_pa(entry: u64, va: usize, base: usize) -> Option<u64> {
    let pfn = entry & PFN_MASK;
    if entry & PRESENT == 0 || pfn == 0 {
        return None;
    }
    pfn.checked_mul(base as u64)?
        .checked_add((va % base) as u64)
}

/// Whether the pages are physically contiguous: all addresses known and each
/// `page_size` after the previous. An empty slice is contiguous.
pub fn is_phys_contiguous(pas: &[Option<u64>], page_size: u64) -> bool {
    if pas.iter().any(Option::is_none) {
        return false;
    }
    pas.windows(2).all(|w| match (w[0], w[1]) {
        (Some(a), Some(b)) => a.checked_add(page_size) == Some(b),
        _ => false,
    })
}

/// One private anonymous base page, mapped and written to, unmapped on drop.
struct TouchedPage {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

impl TouchedPage {
    fn new(len: usize) -> Option<TouchedPage> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // (null hint, no MAP_FIXED) cannot alias any existing memory.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .ok()?;
        // SAFETY: `ptr` is the start of a readable and writable mapping of
        // `len` >= 1 bytes that only this struct knows about.
        unsafe { ptr.cast::<u8>().write_volatile(1) };
        Some(TouchedPage { ptr, len })
    }

    fn addr(&self) -> usize {
        self.ptr as usize
    }
}

impl Drop for TouchedPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no
        // reference into it outlives this struct.
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode() {
        let base = 4096;
        assert_eq!(
            entry_to_pa(PRESENT | 0x1234, 0x5678, base),
            Some(0x1234 * 4096 + 0x678)
        );
        assert_eq!(entry_to_pa(0x1234, 0x5000, base), None, "not present");
        assert_eq!(entry_to_pa(PRESENT, 0x5000, base), None, "PFN hidden");
        // Bits 55..=62 (soft-dirty, exclusive, file, swapped) are not PFN.
        assert_eq!(entry_to_pa(PRESENT | 0x7f << 55 | 1, 0, base), Some(4096));
    }

    #[test]
    fn contiguity() {
        let p = 2u64 << 20;
        assert!(is_phys_contiguous(&[], p));
        assert!(is_phys_contiguous(&[Some(p)], p));
        assert!(is_phys_contiguous(&[Some(p), Some(2 * p), Some(3 * p)], p));
        assert!(!is_phys_contiguous(&[Some(p), Some(3 * p)], p));
        assert!(!is_phys_contiguous(&[Some(2 * p), Some(p)], p));
        assert!(!is_phys_contiguous(&[Some(p), None], p));
        assert!(!is_phys_contiguous(&[None], p));
        assert!(!is_phys_contiguous(&[Some(u64::MAX), Some(p)], p));
    }

    #[test]
    fn fake_pagemap_file() {
        let base = rustix::param::page_size();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pagemap");
        let mut data = vec![0u8; 8 * ENTRY];
        for (i, entry) in [
            (2, PRESENT | 0x64),
            (3, PRESENT | 0x65),
            (4, 0x66),
            (5, PRESENT),
        ] {
            data[i * ENTRY..(i + 1) * ENTRY].copy_from_slice(&u64::to_ne_bytes(entry));
        }
        std::fs::write(&path, &data).unwrap();
        let pm = Pagemap::open_path(&path).unwrap();
        let b = base as u64;
        assert_eq!(pm.phys_addr(2 * base + 5).unwrap(), Some(0x64 * b + 5));
        assert_eq!(
            pm.phys_addrs(2 * base, 4, base).unwrap(),
            vec![Some(0x64 * b), Some(0x65 * b), None, None]
        );
        assert_eq!(
            pm.phys_addrs(2 * base, 2, 2 * base).unwrap(),
            vec![Some(0x64 * b), None]
        );
        assert!(pm.phys_addrs(0, 0, base).unwrap().is_empty());
        assert!(matches!(
            pm.phys_addrs(0, 1, base + 1),
            Err(IovaError::PageSize { .. })
        ));
        assert!(matches!(
            pm.phys_addrs(0, 1, base / 2),
            Err(IovaError::PageSize { .. })
        ));
        assert!(matches!(
            pm.phys_addrs(usize::MAX - base, 2, base),
            Err(IovaError::Range { .. })
        ));
        let e = pm.phys_addr(100 * base).unwrap_err();
        assert!(matches!(e, IovaError::Read { .. }), "{e}");
        assert!(matches!(
            Pagemap::open_path(dir.path().join("missing")),
            Err(IovaError::Open { .. })
        ));
    }
}
