//! One reservation of virtual address space that all of an instance's
//! memory lives in.
//!
//! The range is reserved `PROT_NONE` (no memory behind it, excluded from core
//! dumps) at a fixed address with `MAP_FIXED_NOREPLACE`, so it never silently
//! lands somewhere else and never clobbers an existing mapping. Pages are
//! mapped into it with `MAP_FIXED` and, when freed, replaced at once by a
//! fresh `PROT_NONE` mapping (one `mmap` call, so there is no moment when the
//! range is free for someone else to take). When a reservation fails because
//! something already sits there, the error names that mapping from
//! `/proc/self/maps`.

use std::fmt;
use std::os::fd::BorrowedFd;

use rustix::mm::{MapFlags, ProtFlags};

/// Where memplane places its memory when `--base-virtaddr` is not given:
/// high in the address space, where the kernel rarely puts other mappings
/// (SPDK uses the same base).
pub const DEFAULT_BASE_VA: usize = 0x2000_0000_0000;

/// Distance between the candidate bases tried when the default base is
/// taken (for example by another instance in the same process).
pub const BASE_VA_STRIDE: usize = 0x100_0000_0000; // 1 TiB

/// Candidate bases tried without `--base-virtaddr`.
pub const BASE_VA_ATTEMPTS: usize = 16;

/// Why address space could not be reserved or remapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaError {
    /// The requested range overlaps an existing mapping.
    #[error(
        "cannot reserve {len:#x} bytes of address space at {addr:#x}: the range is taken by {conflict}; \
         {fix}"
    )]
    Taken {
        /// Start of the range asked for.
        addr: usize,
        /// Its length.
        len: usize,
        /// The mapping in the way, as `/proc/self/maps` shows it.
        conflict: String,
        /// What to do about it.
        fix: String,
    },
    /// The address is not aligned as required.
    #[error("address {addr:#x} is not aligned to {align:#x} bytes")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The alignment it needs.
        align: usize,
    },
    /// A range falls outside the reservation.
    #[error("range {offset:#x}+{len:#x} is outside the reservation of {reserved:#x} bytes")]
    OutOfRange {
        /// Offset into the reservation.
        offset: usize,
        /// Length.
        len: usize,
        /// Size of the reservation.
        reserved: usize,
    },
    /// The kernel refused a mapping call.
    #[error("{call} of {len:#x} bytes at {addr:#x} failed: {source}")]
    Syscall {
        /// Which call.
        call: &'static str,
        /// Address.
        addr: usize,
        /// Length.
        len: usize,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

/// A `PROT_NONE` reservation of address space, unmapped on drop.
pub struct VaReservation {
    base: usize,
    len: usize,
}

impl fmt::Debug for VaReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VaReservation({:#x}..{:#x})",
            self.base,
            self.base + self.len
        )
    }
}

impl VaReservation {
    /// Reserves `len` bytes exactly at `addr` (which must be aligned to the
    /// system page size). Fails with [`VaError::Taken`] naming the mapping in
    /// the way when any part of the range is already mapped.
    pub fn reserve_at(addr: usize, len: usize) -> Result<VaReservation, VaError> {
        let page = rustix::param::page_size();
        if addr % page != 0 || addr == 0 {
            return Err(VaError::Misaligned { addr, align: page });
        }
        if len == 0 || len % page != 0 {
            return Err(VaError::Misaligned {
                addr: len,
                align: page,
            });
        }
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so
        // no memory anyone uses is affected; the new mapping is PROT_NONE.
        let got = unsafe {
            rustix::mm::mmap_anonymous(
                addr as *mut _,
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
            )
        };
        match got {
            Ok(p) if p as usize == addr => {}
            Ok(p) => {
                // Kernels before 4.17 treat the flag as a hint.
                // SAFETY: `p` is the mapping we just created, used by nobody.
                let _ = unsafe { rustix::mm::munmap(p, len) };
                return Err(VaError::Taken {
                    addr,
                    len,
                    conflict: "an existing mapping (this kernel ignores MAP_FIXED_NOREPLACE)"
                        .into(),
                    fix: "use Linux 4.17 or later".into(),
                });
            }
            Err(e) if e == rustix::io::Errno::EXIST => {
                return Err(VaError::Taken {
                    addr,
                    len,
                    conflict: find_conflict(addr, len)
                        .unwrap_or_else(|| "a mapping that has since gone".into()),
                    fix: "choose another --base-virtaddr".into(),
                });
            }
            Err(e) => {
                return Err(VaError::Syscall {
                    call: "mmap(PROT_NONE)",
                    addr,
                    len,
                    source: e.into(),
                })
            }
        }
        // SAFETY: the range is our fresh PROT_NONE mapping.
        let advised =
            unsafe { rustix::mm::madvise(addr as *mut _, len, rustix::mm::Advice::LinuxDontDump) };
        if let Err(e) = advised {
            tracing::debug!(error = %e, "MADV_DONTDUMP refused on the reservation");
        }
        tracing::debug!(
            base = format_args!("{addr:#x}"),
            len,
            "address space reserved"
        );
        Ok(VaReservation { base: addr, len })
    }

    /// Reserves `len` bytes at the first free candidate base starting at
    /// `hint` (stepping by [`BASE_VA_STRIDE`]). With `exact`, only `hint`
    /// itself is tried.
    pub fn reserve_near(hint: usize, len: usize, exact: bool) -> Result<VaReservation, VaError> {
        let attempts = if exact { 1 } else { BASE_VA_ATTEMPTS };
        let mut first_err = None;
        for i in 0..attempts {
            let Some(addr) = hint.checked_add(i * BASE_VA_STRIDE) else {
                break;
            };
            match Self::reserve_at(addr, len) {
                Ok(r) => return Ok(r),
                Err(e @ VaError::Taken { .. }) => {
                    tracing::debug!(error = %e, "base address taken, trying the next one");
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_err.unwrap_or(VaError::Misaligned {
            addr: hint,
            align: 0,
        }))
    }

    /// First address of the reservation.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a reservation is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    fn check(&self, offset: usize, len: usize) -> Result<usize, VaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len && len > 0 => Ok(self.base + offset),
            _ => Err(VaError::OutOfRange {
                offset,
                len,
                reserved: self.len,
            }),
        }
    }

    /// Maps `len` bytes of `fd` at `file_offset` shared and read-write over
    /// `[base + offset, +len)`, replacing the reservation there.
    ///
    /// With `populate`, page tables are filled at once (the pages must
    /// already exist in the file, or the call fails rather than faulting
    /// later).
    ///
    /// # Safety
    ///
    /// Nobody may be using the bytes at that range (they are replaced).
    pub unsafe fn map_shared(
        &self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        populate: bool,
    ) -> Result<*mut u8, VaError> {
        let addr = self.check(offset, len)?;
        let mut flags = MapFlags::SHARED | MapFlags::FIXED;
        if populate {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: the range lies inside our reservation (checked), and the
        // caller guarantees nobody uses it; MAP_FIXED replaces only it.
        let p = unsafe {
            rustix::mm::mmap(
                addr as *mut _,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                flags,
                fd,
                file_offset,
            )
        }
        .map_err(|e| VaError::Syscall {
            call: "mmap(MAP_SHARED|MAP_FIXED)",
            addr,
            len,
            source: e.into(),
        })?;
        Ok(p.cast())
    }

    /// Puts `[base + offset, +len)` back to the reserved `PROT_NONE` state,
    /// dropping whatever was mapped there, in one call.
    ///
    /// # Safety
    ///
    /// Nobody may use the bytes at that range any more.
    pub unsafe fn unmap(&self, offset: usize, len: usize) -> Result<(), VaError> {
        let addr = self.check(offset, len)?;
        // SAFETY: inside our reservation (checked); the caller guarantees
        // the old contents are unused. MAP_FIXED swaps the mapping atomically
        // so the range is never free for another thread's mmap.
        unsafe {
            rustix::mm::mmap_anonymous(
                addr as *mut _,
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
            )
        }
        .map_err(|e| VaError::Syscall {
            call: "mmap(PROT_NONE|MAP_FIXED)",
            addr,
            len,
            source: e.into(),
        })?;
        Ok(())
    }
}

impl Drop for VaReservation {
    fn drop(&mut self) {
        // SAFETY: the whole range is ours; whoever owns this reservation has
        // stopped using everything mapped inside it before dropping it.
        if let Err(e) = unsafe { rustix::mm::munmap(self.base as *mut _, self.len) } {
            tracing::error!(base = format_args!("{:#x}", self.base), error = %e, "cannot unmap the reservation");
        }
    }
}

/// The first line of `/proc/self/maps` that overlaps `[addr, addr + len)`.
pub fn find_conflict(addr: usize, len: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    conflict_in(&maps, addr, len)
}

fn conflict_in(maps: &str, addr: usize, len: usize) -> Option<String> {
    let end = addr.saturating_add(len);
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (lo, hi) = range.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        (lo < end && hi > addr).then(|| line.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_lookup_finds_the_overlapping_line() {
        let maps = "\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 123  /usr/bin/x
7f0000000000-7f0000200000 rw-s 00000000 00:10 9    /dev/hugepages/rtemap_0
";
        let hit = conflict_in(maps, 0x7f00_0010_0000, 0x1000).unwrap();
        assert!(hit.contains("/dev/hugepages/rtemap_0"), "{hit}");
        assert!(conflict_in(maps, 0x7f00_0020_0000, 0x1000).is_none());
        assert!(conflict_in(maps, 0x55d0_bfff_f000, 0x1000).is_none());
        assert!(conflict_in(maps, 0x55d0_bfff_f000, 0x2000).is_some());
    }

    #[test]
    fn reserve_twice_at_one_address_names_the_first() {
        let a = VaReservation::reserve_near(DEFAULT_BASE_VA + 0x50 * BASE_VA_STRIDE, 1 << 30, true)
            .unwrap();
        let err = VaReservation::reserve_at(a.base() + (1 << 20), 1 << 21).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VaError::Taken { .. }), "{msg}");
        assert!(msg.contains(&format!("{:x}", a.base())), "{msg}");
        assert!(msg.contains("--base-virtaddr"), "{msg}");
        // Not exact: the next candidate is used.
        let b = VaReservation::reserve_near(a.base(), 1 << 30, false).unwrap();
        assert_eq!(b.base(), a.base() + BASE_VA_STRIDE);
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(matches!(
            VaReservation::reserve_at(0x2000_0000_0001, 4096),
            Err(VaError::Misaligned { .. })
        ));
        assert!(matches!(
            VaReservation::reserve_at(0x2000_0000_0000, 0),
            Err(VaError::Misaligned { .. })
        ));
        let r = VaReservation::reserve_near(DEFAULT_BASE_VA + 0x52 * BASE_VA_STRIDE, 1 << 21, true)
            .unwrap();
        // SAFETY: nothing uses the range.
        let e = unsafe { r.unmap(1 << 20, 1 << 21) }.unwrap_err();
        assert!(matches!(e, VaError::OutOfRange { .. }), "{e}");
    }
}
