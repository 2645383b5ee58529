//! External memory: named heaps over memory the user mapped, and memory
//! registered without a heap (DPDK's `rte_malloc_heap_*` and
//! `rte_extmem_*`). External heaps never grow or shrink on their own.
//!
//! Each chunk is an entry of a table in the shared config (its size is
//! `--max-memseg-lists`); its IOVA table, when given, lives in a block of
//! a native heap, so every process sees it.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use super::core::{HEAP_KIND_EXTERNAL, HEAP_KIND_NATIVE, HEAP_KIND_UNUSED, HEAP_MATCH_ALLOC};
use super::malloc::Heaps;
use super::{check_name, HeapError};
use crate::iova::BAD_IOVA;
use crate::memseg::{MemEvent, MemEventKind};
use crate::units::PageSize;
use crate::{Instance, Result};

/// Segment ids of external chunks start here (native lists are below).
pub(crate) const EXT_SEG_BASE: u32 = 1 << 24;

const CHUNK_UNUSED: u32 = 0;
const CHUNK_HEAP: u32 = 1;
const CHUNK_REGISTERED: u32 = 2;

/// One external memory chunk, in the shared config.
#[repr(C)]
pub(crate) struct ExtChunk {
    /// `CHUNK_*`; written under the hotplug lock.
    state: AtomicU32,
    /// Heap slot (for `CHUNK_HEAP`).
    heap: u32,
    va: u64,
    len: u64,
    page_size: u64,
    /// VA of a native-heap block of `n_pages` IOVAs, or 0.
    iova_table: u64,
    n_pages: u64,
    reserved: [u64; 2],
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<ExtChunk>() == 64);

/// One external chunk, for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtChunkInfo {
    /// Start.
    pub va: usize,
    /// Bytes.
    pub len: usize,
    /// Page size.
    pub page_size: u64,
    /// Heap name, or `None` for memory registered without a heap.
    pub heap: Option<String>,
    /// Whether IOVAs were given.
    pub has_iova: bool,
}

impl Heaps {
    fn chunk(&self, i: u32) -> &ExtChunk {
        // SAFETY: i < max_ext; the table is in the config mapping, which
        // outlives `self`. Plain fields are written only while the state
        // is CHUNK_UNUSED (before the Release store that publishes it).
        unsafe { &*self.ext.add(i as usize) }
    }

    fn chunk_mut(&self, i: u32) -> *mut ExtChunk {
        // SAFETY: as in `chunk`.
        unsafe { self.ext.add(i as usize) }
    }

    fn live_chunks(&self) -> impl Iterator<Item = (u32, &ExtChunk)> {
        (0..self.max_ext)
            .map(|i| (i, self.chunk(i)))
            .filter(|(_, c)| c.state.load(Ordering::Acquire) != CHUNK_UNUSED)
    }

    fn chunk_at(&self, addr: usize) -> Option<(u32, &ExtChunk)> {
        let a = addr as u64;
        self.live_chunks()
            .find(|(_, c)| a >= c.va && a - c.va < c.len)
    }

    /// (heap slot, segment id) of the external heap chunk holding `addr`.
    pub(crate) fn ext_chunk_of(&self, addr: usize) -> Option<(u16, u32)> {
        let (i, c) = self.chunk_at(addr)?;
        (c.state.load(Ordering::Acquire) == CHUNK_HEAP).then_some((c.heap as u16, EXT_SEG_BASE + i))
    }

    pub(crate) fn ext_page_size(&self, seg: u32) -> Option<u64> {
        let i = seg.checked_sub(EXT_SEG_BASE)?;
        (i < self.max_ext).then(|| self.chunk(i).page_size)
    }

    /// Whether `[addr, addr+len)` lies in one chunk of heap `idx`.
    pub(crate) fn ext_contains(&self, idx: u16, addr: usize, len: usize) -> bool {
        self.chunk_at(addr).is_some_and(|(_, c)| {
            c.state.load(Ordering::Acquire) == CHUNK_HEAP
                && c.heap == u32::from(idx)
                && (addr as u64 + len as u64) <= c.va + c.len
        })
    }

    #[allow(clippy::unused_self)]
    fn iova_of(&self, c: &ExtChunk, addr: usize) -> Option<u64> {
        if c.iova_table == 0 {
            return None;
        }
        let off = addr as u64 - c.va;
        let page = off / c.page_size;
        // SAFETY: the table holds n_pages u64s in a live heap block, and
        // page < n_pages because addr lies in the chunk.
        let iova = unsafe { (c.iova_table as *const u64).add(page as usize).read() };
        (iova != BAD_IOVA).then(|| iova + off % c.page_size)
    }

    pub(crate) fn ext_virt2iova(&self, addr: usize) -> Option<u64> {
        let (_, c) = self.chunk_at(addr)?;
        self.iova_of(c, addr)
    }

    pub(crate) fn ext_contiguous(&self, addr: usize, len: usize) -> bool {
        let Some((_, c)) = self.chunk_at(addr) else {
            return false;
        };
        let Some(first) = self.iova_of(c, addr) else {
            return false;
        };
        let p = c.page_size as usize;
        let mut page = (addr / p + 1) * p;
        while page < addr + len {
            match self.iova_of(c, page) {
                Some(i) if i == first + (page - addr) as u64 => {}
                _ => return false,
            }
            page += p;
        }
        true
    }
}

impl Instance {
    /// Creates an empty external heap; returns its socket id (DPDK's
    /// `rte_malloc_heap_create`).
    pub fn heap_create(&self, name: &str) -> Result<i32> {
        check_name(name)?;
        let _g = self.hotplug_write();
        if self.heap.by_name(name).is_some() {
            return Err(HeapError::HeapExists { name: name.into() }.into());
        }
        let max = self.heap.max();
        let idx = (0..max as u16)
            .find(|&i| self.heap.kind(i) == HEAP_KIND_UNUSED)
            .ok_or(HeapError::TableFull {
                what: "the heap table",
                max,
                option: "--max-heaps",
            })?;
        let socket = self.next_external_socket().ok_or(HeapError::TableFull {
            what: "the external heaps' socket ids",
            max: i32::MAX as u32,
            option: "a restart",
        })?;
        let mut l = self.heap.lock(idx);
        let flags = if self.options().match_allocations {
            HEAP_MATCH_ALLOC
        } else {
            0
        };
        l.reset(socket, flags, name);
        drop(l);
        self.heap
            .kind_word(idx)
            .store(HEAP_KIND_EXTERNAL, Ordering::Release);
        tracing::info!(name, socket, "external heap created");
        Ok(socket)
    }

    /// Destroys an external heap with no memory left in it.
    pub fn heap_destroy(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let _g = self.hotplug_write();
        let idx = self.ext_heap(name, "destroyed")?;
        let chunks = self.heap.live_chunks_of(idx);
        let st = self.heap.lock(idx).stats();
        if st.alloc_count > 0 || !chunks.is_empty() {
            return Err(HeapError::HeapBusy {
                name: name.into(),
                why: format!(
                    "still has {} allocation(s) and {} memory chunk(s); free them and remove the memory first",
                    st.alloc_count,
                    chunks.len()
                ),
            }
            .into());
        }
        self.heap
            .kind_word(idx)
            .store(HEAP_KIND_UNUSED, Ordering::Release);
        Ok(())
    }

    fn ext_heap(&self, name: &str, what: &'static str) -> Result<u16, HeapError> {
        let idx = self.heap_of_name(name)?;
        if self.heap.kind(idx) == HEAP_KIND_NATIVE {
            return Err(HeapError::NativeHeap {
                name: name.into(),
                what,
            });
        }
        Ok(idx)
    }

    /// Adds user memory `[va, va+len)` (mapped by the caller, page-aligned,
    /// whole pages of `page_size`) to the external heap `name`. `iovas`, if
    /// given, has one IOVA per page (else the memory has no IOVA and
    /// IOVA-contiguous requests fail on it). The memory must stay mapped
    /// until [`heap_memory_remove`](Self::heap_memory_remove).
    ///
    /// # Safety
    /// The range must be mapped read-write in this process and not used by
    /// anything else while it is in the heap.
    pub unsafe fn heap_memory_add(
        &self,
        name: &str,
        va: NonNull<u8>,
        len: usize,
        iovas: Option<&[u64]>,
        page_size: usize,
    ) -> Result<()> {
        check_name(name)?;
        let idx = self.ext_heap(name, "given memory")?;
        let i = self.ext_insert(va, len, iovas, page_size, Some(idx))?;
        let seg = super::extmem::EXT_SEG_BASE + i;
        // Subscribers (DMA mapping) learn of the memory before any block of
        // it can be handed out, as for a native heap's growth.
        self.fire_ext(MemEventKind::Alloc, va.as_ptr() as usize, len, page_size);
        let mut l = self.heap.lock(idx);
        // User memory is not known to be zero.
        l.add_memory(
            va.as_ptr() as u64,
            len as u64,
            seg,
            true,
            (len / page_size) as u32,
        );
        drop(l);
        Ok(())
    }

    /// Removes a chunk added with [`heap_memory_add`](Self::heap_memory_add)
    /// (same `va` and `len`); refused while blocks are allocated in it.
    pub fn heap_memory_remove(&self, name: &str, va: NonNull<u8>, len: usize) -> Result<()> {
        check_name(name)?;
        let idx = self.ext_heap(name, "changed")?;
        let guard = self.hotplug_write();
        let (i, c) = self
            .heap
            .live_chunks()
            .find(|(_, c)| {
                c.va == va.as_ptr() as u64
                    && c.len == len as u64
                    && c.heap == u32::from(idx)
                    && c.state.load(Ordering::Acquire) == CHUNK_HEAP
            })
            .ok_or_else(|| HeapError::NoSuchChunk {
                va: va.as_ptr() as usize,
                len,
                what: format!("in heap {name:?}"),
            })?;
        let page_size = c.page_size as usize;
        let mut l = self.heap.lock(idx);
        let seg = EXT_SEG_BASE + i;
        // The chunk must be one whole free element.
        let mut whole = None;
        l.walk(|e| {
            if e.seg == seg && e.free && e.addr == c.va && e.size == c.len {
                whole = Some(e.addr);
            }
        });
        let Some(addr) = whole else {
            return Err(HeapError::HeapBusy {
                name: name.into(),
                why: format!(
                    "has blocks allocated in {:#x}+{len:#x}; free them first",
                    c.va
                ),
            }
            .into());
        };
        l.take_range(addr, c.va, c.va + c.len);
        drop(l);
        // Out of the heap, but subscribers (DMA unmapping) still translate
        // it, as native pages before their unmap.
        self.fire_ext(MemEventKind::Free, va.as_ptr() as usize, len, page_size);
        let table = c.iova_table;
        c.state.store(CHUNK_UNUSED, Ordering::Release);
        drop(guard);
        if let Some(t) = NonNull::new(table as *mut u8) {
            // SAFETY: the table block was allocated for this chunk only.
            if let Err(e) = unsafe { self.free(t) } {
                tracing::error!(error = %e, "cannot free an external chunk's IOVA table");
            }
        }
        Ok(())
    }

    /// Registers user memory in the page tables without a heap (DPDK's
    /// `rte_extmem_register`): [`extmem_virt2iova`](Self::extmem_virt2iova)
    /// and [`malloc_virt2iova`](Self::malloc_virt2iova) translate it and
    /// memory events report it; no allocation comes from it.
    ///
    /// # Safety
    /// The range must stay mapped until unregistered.
    pub unsafe fn extmem_register(
        &self,
        va: NonNull<u8>,
        len: usize,
        iovas: Option<&[u64]>,
        page_size: usize,
    ) -> Result<()> {
        self.ext_insert(va, len, iovas, page_size, None)?;
        self.fire_ext(MemEventKind::Alloc, va.as_ptr() as usize, len, page_size);
        Ok(())
    }

    /// Drops a registration made with
    /// [`extmem_register`](Self::extmem_register).
    pub fn extmem_unregister(&self, va: NonNull<u8>, len: usize) -> Result<()> {
        let g = self.hotplug_write();
        let (_, c) = self
            .heap
            .live_chunks()
            .find(|(_, c)| {
                c.va == va.as_ptr() as u64
                    && c.len == len as u64
                    && c.state.load(Ordering::Acquire) == CHUNK_REGISTERED
            })
            .ok_or_else(|| HeapError::NoSuchChunk {
                va: va.as_ptr() as usize,
                len,
                what: "registered".into(),
            })?;
        let table = c.iova_table;
        let page_size = c.page_size as usize;
        // Subscribers (DMA unmapping) still translate it, as native pages
        // before their unmap.
        self.fire_ext(MemEventKind::Free, va.as_ptr() as usize, len, page_size);
        c.state.store(CHUNK_UNUSED, Ordering::Release);
        drop(g);
        if let Some(t) = NonNull::new(table as *mut u8) {
            // SAFETY: the table block was allocated for this chunk only.
            if let Err(e) = unsafe { self.free(t) } {
                tracing::error!(error = %e, "cannot free an external chunk's IOVA table");
            }
        }
        Ok(())
    }

    /// The IOVA of an address in registered external memory.
    pub fn extmem_virt2iova(&self, addr: usize) -> Option<u64> {
        self.heap.ext_virt2iova(addr)
    }

    /// Every external chunk.
    pub fn ext_chunks(&self) -> Vec<ExtChunkInfo> {
        self.heap
            .live_chunks()
            .map(|(_, c)| ExtChunkInfo {
                va: c.va as usize,
                len: c.len as usize,
                page_size: c.page_size,
                heap: (c.state.load(Ordering::Acquire) == CHUNK_HEAP)
                    .then(|| self.heap_name_of(c.heap as u16)),
                has_iova: c.iova_table != 0,
            })
            .collect()
    }

    fn heap_name_of(&self, idx: u16) -> String {
        self.heap.head_name(idx)
    }

    fn fire_ext(&self, kind: MemEventKind, addr: usize, len: usize, page_size: usize) {
        if let Some(ps) = PageSize::new(page_size as u64) {
            self.fire_events(&[MemEvent {
                kind,
                addr,
                len,
                page_size: ps,
                node: u32::MAX,
            }]);
        }
    }

    /// Validates and records a chunk; returns its table index.
    fn ext_insert(
        &self,
        va: NonNull<u8>,
        len: usize,
        iovas: Option<&[u64]>,
        page_size: usize,
        heap: Option<u16>,
    ) -> Result<u32> {
        let addr = va.as_ptr() as usize;
        let bad = |why: String| HeapError::BadExtMem { va: addr, len, why };
        if page_size == 0 || !page_size.is_power_of_two() || page_size < 4096 {
            return Err(bad(format!(
                "page size {page_size} is not a power of two of at least 4096"
            ))
            .into());
        }
        if len == 0 {
            return Err(bad("length 0".into()).into());
        }
        if addr % page_size != 0 || len % page_size != 0 {
            return Err(bad(format!(
                "start and length must be multiples of the page size {page_size}"
            ))
            .into());
        }
        let n_pages = len / page_size;
        if let Some(t) = iovas {
            if t.len() != n_pages {
                return Err(bad(format!("{} IOVAs given for {n_pages} pages", t.len())).into());
            }
        }
        let Some(end) = addr.checked_add(len) else {
            return Err(bad("wraps around the address space".into()).into());
        };
        let base = self.base_va();
        if addr < base + self.va_len() && end > base {
            return Err(bad("overlaps memplane's own address-space reservation".into()).into());
        }
        // The IOVA table goes to a native heap, outside the hotplug lock
        // (allocation may grow a heap).
        let table = match iovas {
            Some(t) => {
                let p = self.malloc(t.len() * 8, 0)?;
                // SAFETY: the block holds t.len() u64s and is 64-aligned.
                #[allow(clippy::cast_ptr_alignment)]
                unsafe {
                    std::ptr::copy_nonoverlapping(t.as_ptr(), p.as_ptr().cast::<u64>(), t.len());
                }
                Some(p)
            }
            None => None,
        };
        let result = (|| {
            let _g = self.hotplug_write();
            if let Some((_, c)) = self
                .heap
                .live_chunks()
                .find(|(_, c)| (addr as u64) < c.va + c.len && end as u64 > c.va)
            {
                return Err(HeapError::BadExtMem {
                    va: addr,
                    len,
                    why: format!(
                        "overlaps external memory {:#x}+{:#x} added earlier",
                        c.va, c.len
                    ),
                });
            }
            let i = (0..self.heap.max_ext)
                .find(|&i| self.heap.chunk(i).state.load(Ordering::Acquire) == CHUNK_UNUSED)
                .ok_or(HeapError::TableFull {
                    what: "the external memory table",
                    max: self.heap.max_ext,
                    option: "--max-memseg-lists",
                })?;
            let p = self.heap.chunk_mut(i);
            // SAFETY: the entry is unused (checked under the hotplug lock,
            // which every writer of the table holds) and nobody reads its
            // plain fields before the Release store below.
            unsafe {
                (*p).heap = heap.map_or(u32::MAX, u32::from);
                (*p).va = addr as u64;
                (*p).len = len as u64;
                (*p).page_size = page_size as u64;
                (*p).iova_table = table.map_or(0, |t| t.as_ptr() as u64);
                (*p).n_pages = n_pages as u64;
            }
            self.heap.chunk(i).state.store(
                if heap.is_some() {
                    CHUNK_HEAP
                } else {
                    CHUNK_REGISTERED
                },
                Ordering::Release,
            );
            Ok(i)
        })();
        match result {
            Ok(i) => Ok(i),
            Err(e) => {
                if let Some(t) = table {
                    // SAFETY: allocated above, never published.
                    let _ = unsafe { self.free(t) };
                }
                Err(e.into())
            }
        }
    }
}

impl Heaps {
    fn live_chunks_of(&self, idx: u16) -> Vec<u32> {
        self.live_chunks()
            .filter(|(_, c)| {
                c.state.load(Ordering::Acquire) == CHUNK_HEAP && c.heap == u32::from(idx)
            })
            .map(|(i, _)| i)
            .collect()
    }
}
