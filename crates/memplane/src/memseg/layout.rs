//! The `repr(C)` structures of the shared config, as every process sees
//! them, with compile-time size and offset checks.
//!
//! ```text
//! config region (a memfd, mapped at `config_va` inside the instance's
//! one address-space reservation):
//!
//!   ConfigHeader (512 bytes)
//!   ListHeader x max_lists (128 bytes each)
//!   fbarray of list 0: header, bitmap, capacity x Memseg (48 bytes each)
//!   fbarray of list 1 ...
//!   (later layers append their sections: heaps, memzones)
//! ```
//!
//! Only offsets relative to the config start and absolute virtual
//! addresses inside the reservation are stored: the reservation is mapped
//! at the same address in every process, so both mean the same everywhere.
//! No process-local pointer ever lands here.

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::shm::lock::RwLock;

/// "MPCONFG1" as a little-endian u64, stored last by the primary once the
/// config is complete.
pub const CONFIG_MAGIC: u64 = u64::from_le_bytes(*b"MPCONFG1");

/// Bumped whenever any structure in this file changes shape.
pub const LAYOUT_VERSION: u32 = 5;

/// Bytes reserved for the build identity string.
pub const BUILD_ID_LEN: usize = 64;

/// Bytes reserved for a list name.
pub const LIST_NAME_LEN: usize = 32;

/// Section slots in the header, for this layer and the ones above it.
pub const SECTION_SLOTS: usize = 8;

/// Section index of the memseg list headers.
pub const SECTION_LISTS: usize = 0;

/// A memseg flag: preallocated at init (`--socket-mem`/`-m`), never given
/// back while the instance runs.
pub const MEMSEG_DO_NOT_FREE: u32 = 1 << 0;
/// A memseg flag: the page may hold old data (reused file under
/// `--huge-unlink=never`); fresh pages come zeroed from the kernel.
pub const MEMSEG_DIRTY: u32 = 1 << 1;

/// A memseg flag: the page belongs to a malloc heap; only the heap gives
/// it back.
pub const MEMSEG_HEAP: u32 = 1 << 2;

/// Section index of the heap table.
pub const SECTION_HEAPS: usize = 1;
/// Section index of the external memory table.
pub const SECTION_EXTMEM: usize = 2;
/// Section index of the thread-cache slots of the native heaps.
pub const SECTION_TCACHE: usize = 3;
/// Section index of the memzone table (header, entries, name index).
pub const SECTION_MEMZONES: usize = 4;

/// Config flag: `--legacy-mem`.
pub const CFG_LEGACY: u32 = 1 << 0;
/// Config flag: `--single-file-segments`.
pub const CFG_SINGLE_FILE: u32 = 1 << 1;
/// Config flag: `--no-huge`.
pub const CFG_NO_HUGE: u32 = 1 << 2;
/// Config flag: `--in-memory`.
pub const CFG_IN_MEMORY: u32 = 1 << 3;
/// Config flag: IOVA mode is PA (else VA).
pub const CFG_IOVA_PA: u32 = 1 << 4;

/// One page of a memseg list, as stored in the list's fbarray.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memseg {
    /// Virtual address of the page.
    pub va: u64,
    /// Its IOVA (physical address in PA mode, the VA in VA mode).
    pub iova: u64,
    /// Length in bytes (= page size).
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// NUMA node the page is on.
    pub node: u32,
    /// `MEMSEG_*` flags.
    pub flags: u32,
    /// Offset of the page in its backing file or memfd.
    pub file_offset: u64,
}

/// Descriptor of one memseg list ("memory type" = node + page size).
#[repr(C)]
pub struct ListHeader {
    /// First virtual address of the list's slots.
    pub base_va: u64,
    /// Bytes of address space = capacity x page size.
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Bumped on every map or unmap: secondaries compare it to resync.
    pub version: AtomicU64,
    /// Offset of the list's fbarray from the config start.
    pub fbarray_off: u64,
    /// Bytes of the fbarray region.
    pub fbarray_len: u64,
    /// NUMA node.
    pub node: u32,
    /// Slots (= pages the list can ever hold).
    pub capacity: u32,
    /// `BackingKind` as u32.
    pub backing: u32,
    /// Index of the list in the table.
    pub index: u32,
    /// Pages currently mapped (mirrors the fbarray's used count).
    pub used: AtomicU32,
    /// Pages flagged do-not-free.
    pub pinned: AtomicU32,
    /// NUL-padded list name, e.g. `memseg-2048k-0`.
    pub name: [u8; LIST_NAME_LEN],
    /// Room to grow.
    pub reserved: [u64; 3],
}

/// Where a section of the config lives.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Section {
    /// Offset from the config start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The start of the shared config.
#[repr(C)]
pub struct ConfigHeader {
    /// [`CONFIG_MAGIC`] once the primary finished init (Release).
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// `size_of::<ConfigHeader>()`, a cheap shape check.
    pub header_size: u32,
    /// Crate name, version and layout; must match in every process.
    pub build_id: [u8; BUILD_ID_LEN],
    /// Where this config is mapped (same in every process).
    pub config_va: u64,
    /// Bytes of the config region.
    pub config_len: u64,
    /// First address of the whole reservation.
    pub mem_va: u64,
    /// Bytes of the whole reservation.
    pub mem_len: u64,
    /// The primary's pid.
    pub primary_pid: u32,
    /// `CFG_*` flags.
    pub flags: u32,
    /// Number of lists in use.
    pub n_lists: u32,
    /// Capacity of the list table (`--max-memseg-lists`).
    pub max_lists: u32,
    /// Memory hotplug lock: held for writing while pages are mapped or
    /// unmapped, for reading by walks.
    pub hotplug_lock: RwLock,
    /// Padding.
    pub reserved0: u32,
    /// Sections of this and later layers.
    pub sections: [Section; SECTION_SLOTS],
    /// Next socket id an external heap gets (counting up from 256, never
    /// reused, as in DPDK); 0 until the first one.
    pub next_ext_socket: AtomicU64,
    /// The primary's `-n` (memory channels), 0 when not given (from the
    /// reserved words: an older primary reads as "not given").
    pub memory_channels: u32,
    /// The primary's `-r` (memory ranks), 0 when not given.
    pub memory_ranks: u32,
    /// Room to grow without a layout change.
    pub reserved: [u64; 22],
}

// Loom's atomics (in the lock) are larger: the shapes hold for real builds.
#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<Memseg>() == 48);
    assert!(std::mem::offset_of!(Memseg, node) == 32);
    assert!(std::mem::offset_of!(Memseg, file_offset) == 40);
    assert!(size_of::<ListHeader>() == 128);
    assert!(std::mem::offset_of!(ListHeader, version) == 24);
    assert!(std::mem::offset_of!(ListHeader, node) == 48);
    assert!(std::mem::offset_of!(ListHeader, name) == 72);
    assert!(std::mem::offset_of!(ConfigHeader, build_id) == 16);
    assert!(std::mem::offset_of!(ConfigHeader, config_va) == 80);
    assert!(std::mem::offset_of!(ConfigHeader, hotplug_lock) == 128);
    assert!(std::mem::offset_of!(ConfigHeader, sections) == 136);
    assert!(size_of::<ConfigHeader>() == 456);
};

/// The build identity every process of an instance must share: the crate
/// version and the layout version.
pub fn build_id() -> [u8; BUILD_ID_LEN] {
    let s = format!(
        "memplane {} layout {} {}",
        env!("CARGO_PKG_VERSION"),
        LAYOUT_VERSION,
        std::env::consts::ARCH
    );
    let mut out = [0u8; BUILD_ID_LEN];
    let n = s.len().min(BUILD_ID_LEN);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// A NUL-padded fixed-size name as a `&str` (up to the first NUL).
pub fn name_str(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).unwrap_or("?")
}

/// Where everything sits inside the config region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLayout {
    /// Offset of the list header table.
    pub lists_off: usize,
    /// Offset and length of each list's fbarray.
    pub fbarrays: Vec<(usize, usize)>,
    /// Offset of the heap table (`max_heaps` heap heads).
    pub heaps_off: usize,
    /// Offset of the external memory table.
    pub extmem_off: usize,
    /// Offset of the thread-cache slots (one array per native heap).
    pub tcache_off: usize,
    /// Offset and length of the memzone table.
    pub memzones: (usize, usize),
    /// Total bytes, rounded up to the system page size.
    pub total: usize,
}

impl ConfigLayout {
    /// Computes the layout for a table of `max_lists` entries and lists of
    /// the given capacities.
    pub fn new(
        max_lists: u32,
        capacities: &[u32],
        max_heaps: u32,
        max_extmem: u32,
        native_heaps: u32,
        max_memzones: u32,
    ) -> crate::Result<ConfigLayout> {
        let lists_off = size_of::<ConfigHeader>().next_multiple_of(64);
        let mut off = lists_off + max_lists as usize * size_of::<ListHeader>();
        let mut fbarrays = Vec::with_capacity(capacities.len());
        for &cap in capacities {
            off = off.next_multiple_of(crate::fbarray::DATA_ALIGN);
            let len = crate::fbarray::FbArray::required_size(cap, size_of::<Memseg>() as u32)?;
            fbarrays.push((off, len));
            off += len;
        }
        let heaps_off = off.next_multiple_of(64);
        off = heaps_off + max_heaps as usize * crate::heap::HEAP_HEADER_SIZE;
        let extmem_off = off.next_multiple_of(64);
        off = extmem_off + max_extmem as usize * crate::heap::EXTMEM_ENTRY_SIZE;
        let tcache_off = off.next_multiple_of(64);
        off = tcache_off + native_heaps as usize * crate::heap::TCACHE_BYTES_PER_HEAP;
        let zones_off = off.next_multiple_of(64);
        let zones_len = crate::memzone::table_bytes(max_memzones);
        off = zones_off + zones_len;
        let total = off.next_multiple_of(rustix::param::page_size());
        Ok(ConfigLayout {
            lists_off,
            fbarrays,
            heaps_off,
            extmem_off,
            tcache_off,
            memzones: (zones_off, zones_len),
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_fbarrays_after_the_table_without_overlap() {
        let l = ConfigLayout::new(128, &[12288, 24, 5], 32, 128, 2, 2560).unwrap();
        assert_eq!(l.lists_off, 512);
        assert!(l.fbarrays[0].0 >= 512 + 128 * 128);
        for w in l.fbarrays.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
            assert_eq!(w[1].0 % 64, 0);
        }
        let last = l.fbarrays[2];
        assert!(last.0 + last.1 <= l.heaps_off);
        assert!(l.heaps_off + 32 * crate::heap::HEAP_HEADER_SIZE <= l.extmem_off);
        assert!(l.extmem_off + 128 * crate::heap::EXTMEM_ENTRY_SIZE <= l.tcache_off);
        assert!(l.tcache_off + 2 * crate::heap::TCACHE_BYTES_PER_HEAP <= l.memzones.0);
        assert_eq!(l.memzones.1, crate::memzone::table_bytes(2560));
        assert!(l.memzones.0 + l.memzones.1 <= l.total);
        assert_eq!(l.total % rustix::param::page_size(), 0);
    }

    #[test]
    fn build_id_names_version_and_layout() {
        let id = build_id();
        let s = name_str(&id);
        assert!(s.starts_with("memplane "), "{s}");
        assert!(s.contains("layout 5"), "{s}");
    }
}
