//! [`Memory`]: one memplane instance. Init builds the shared config and the
//! memseg lists inside one address-space reservation, preallocates
//! `--socket-mem`/`-m`, and then maps and unmaps pages on request; drop
//! gives everything back.

use std::fmt::{self, Write as _};
use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use crate::fbarray::FbArray;
use crate::hugepages::{Discovery, SystemRoots};
use crate::iova::{Pagemap, BAD_IOVA};
use crate::memseg::events::{self, EventCallback, Registry, Validator};
use crate::memseg::hugetlbfs::{reclaim_stale, HugetlbfsStore};
use crate::memseg::layout::{
    self, ConfigHeader, ConfigLayout, ListHeader, Memseg, Section, CFG_IN_MEMORY, CFG_IOVA_PA,
    CFG_LEGACY, CFG_NO_HUGE, CFG_SINGLE_FILE, CONFIG_MAGIC, LAYOUT_VERSION, LIST_NAME_LEN,
    MEMSEG_DIRTY, MEMSEG_DO_NOT_FREE, MEMSEG_HEAP, SECTION_EXTMEM, SECTION_HEAPS, SECTION_LISTS,
    SECTION_MEMZONES, SECTION_TCACHE,
};
use crate::memseg::store::{Freshness, MemfdStore, PageStore};
use crate::memseg::{
    ContigRun, ListInfo, MemEvent, MemEventKind, MemsegError, MemsegInfo, PageRequest, PageRun,
};
use crate::numa::Topology;
use crate::options::{IovaMode, MemOptions, ProcType, NO_HUGE_DEFAULT_MEMORY};
use crate::preflight::{self, Backing, Plan};
use crate::runtime_dir::{PrimaryLock, RuntimeDir};
use crate::shm::vaspace::{VaReservation, DEFAULT_BASE_VA};
use crate::units::{format_size, PageSize};
use crate::{Error, Result};

mod multiproc;

/// One list as this process sees it: the shared header and fbarray, and
/// the process-local store holding the backing descriptors.
struct List {
    header: NonNull<ListHeader>,
    segs: FbArray<'static>,
    store: Box<dyn PageStore>,
    index: u32,
    name: String,
    node: u32,
    page_size: PageSize,
    /// Offset of the list's first slot inside the reservation.
    va_off: usize,
    base_va: usize,
    capacity: u32,
}

impl List {
    fn header(&self) -> &ListHeader {
        // SAFETY: the header lives in the config mapping, which outlives
        // every `List` (both are owned by `Memory`, lists dropped first).
        unsafe { self.header.as_ref() }
    }

    fn slot_va(&self, slot: u32) -> usize {
        self.base_va + slot as usize * self.page_size.bytes() as usize
    }

    fn seg(&self, slot: u32) -> Memseg {
        match self.segs.get_ptr::<Memseg>(slot) {
            // SAFETY: slot < capacity and the element is a plain-data
            // Memseg; callers hold the hotplug lock (or are inside its
            // holder's callback), so nobody writes it concurrently.
            Ok(p) => unsafe { p.as_ptr().read() },
            Err(_) => Memseg::default(),
        }
    }

    /// The public snapshot of slot `slot` (same locking rule as `seg`).
    fn seg_info(&self, slot: u32) -> MemsegInfo {
        let seg = self.seg(slot);
        MemsegInfo {
            list: self.index,
            slot,
            va: seg.va as usize,
            iova: seg.iova,
            len: seg.len as usize,
            node: seg.node,
            pinned: seg.flags & MEMSEG_DO_NOT_FREE != 0,
            dirty: seg.flags & MEMSEG_DIRTY != 0,
        }
    }

    fn set_seg(&self, slot: u32, seg: Memseg) {
        if let Ok(p) = self.segs.get_ptr::<Memseg>(slot) {
            // SAFETY: as in `seg`, with the hotplug lock held for writing.
            unsafe { p.as_ptr().write(seg) };
        }
    }

    fn info(&self) -> ListInfo {
        let h = self.header();
        ListInfo {
            index: self.index,
            name: self.name.clone(),
            node: self.node,
            page_size: self.page_size,
            base_va: self.base_va,
            len: self.capacity as usize * self.page_size.bytes() as usize,
            capacity: self.capacity,
            used: h.used.load(Ordering::Relaxed),
            pinned: h.pinned.load(Ordering::Relaxed),
            backing: self.store.kind(),
            version: h.version.load(Ordering::Relaxed),
        }
    }
}

/// The memory of one memplane instance (one file prefix): the owning
/// handle. Every method is on [`Instance`], which it dereferences to.
///
/// There is no global state: two instances with different prefixes can
/// live in one process. Dropping the handle unmaps every page, gives the
/// hugepages back to the kernel, removes files and the runtime directory.
///
/// # Example
///
/// ```no_run
/// use memplane::{Memory, MemOptions, PageSize};
/// use memplane::memseg::PageRequest;
///
/// let opts = MemOptions::new().file_prefix("example").build()?;
/// let mem = Memory::init(&opts)?;
/// let runs = mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))?;
/// let run = runs[0];
/// // SAFETY: the run is ours until freed.
/// unsafe { std::ptr::write_bytes(run.va as *mut u8, 0xab, run.len) };
/// mem.free_pages(run.va, run.len)?;
/// # Ok::<(), memplane::Error>(())
/// ```
pub struct Memory {
    inner: std::sync::Arc<Instance>,
}

impl std::ops::Deref for Memory {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        &self.inner
    }
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Memory {
    /// Starts an instance as primary: validates the options, checks the
    /// request against the machine (preflight), reserves the address space,
    /// builds the shared config and memseg lists, and preallocates
    /// `--socket-mem` / `-m`. A failed init leaves nothing behind.
    pub fn init(opts: &MemOptions) -> Result<Memory> {
        Self::init_with_roots(opts, &SystemRoots::real())
    }

    /// [`init`](Self::init) reading the machine's facts under other roots
    /// (tests).
    pub fn init_with_roots(opts: &MemOptions, roots: &SystemRoots) -> Result<Memory> {
        let secondary = match opts.proc_type {
            ProcType::Primary => false,
            ProcType::Secondary => true,
            ProcType::Auto => {
                opts.validate()?;
                let dir = RuntimeDir::create(&opts.file_prefix, opts.runtime_dir.as_deref())?;
                matches!(
                    dir.primary_status()?,
                    crate::runtime_dir::PrimaryStatus::Live { .. }
                )
            }
        };
        let instance = if secondary {
            opts.validate()?;
            Instance::attach(opts, roots)?
        } else {
            Instance::init_with_roots(opts, roots)?
        };
        let inner = std::sync::Arc::new(instance);
        inner.start_ipc(&inner)?;
        Ok(Memory { inner })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // Stop the IPC threads first: a handler may hold a reference to the
        // instance, which must be dropped here, not on that thread.
        self.inner.stop_ipc();
    }
}

/// One memplane instance: the shared config, the memseg lists, the heaps,
/// the memzones. Reached through a [`Memory`] handle.
pub struct Instance {
    // Field order is drop order: the lists (and their fbarray views) go
    // before the config mapping and the reservation they point into.
    lists: Vec<List>,
    pub(crate) heap: crate::heap::Heaps,
    pub(crate) zones: crate::memzone::ZoneTable,
    pub(crate) mp: crate::mp::MpState,
    registry: std::sync::RwLock<Registry>,
    config: NonNull<ConfigHeader>,
    config_fd: OwnedFd,
    reservation: VaReservation,
    topology: Topology,
    pagemap: Option<Pagemap>,
    iova_mode: IovaMode,
    socket_limits: Vec<u64>,
    fixed: Option<&'static str>,
    opts: MemOptions,
    plan: Plan,
    primary: Option<(RuntimeDir, PrimaryLock)>,
}

// SAFETY: the raw pointers point into the shared config mapping owned by
// this value; everything reachable through them is either atomic, guarded
// by the process-shared hotplug lock, or guarded by the fbarray locks.
unsafe impl Send for Instance {}
// SAFETY: as above; `&Memory` methods synchronise through those locks.
unsafe impl Sync for Instance {}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memory")
            .field("prefix", &self.opts.file_prefix)
            .field("reservation", &self.reservation)
            .field("lists", &self.lists.len())
            .field("iova_mode", &self.iova_mode)
            .finish_non_exhaustive()
    }
}

/// One memory type to build a list for.
#[derive(Debug)]
struct ListPlan {
    node: u32,
    page_size: PageSize,
    capacity: u32,
    va_off: usize,
}

impl Instance {
    /// Builds a primary instance (see [`Memory::init`]).
    fn init_with_roots(opts: &MemOptions, roots: &SystemRoots) -> Result<Instance> {
        let started = std::time::Instant::now();
        opts.validate()?;
        let primary = if opts.shared_config() {
            let dir = RuntimeDir::create(&opts.file_prefix, opts.runtime_dir.as_deref())?;
            let lock = dir.try_lock_primary()?;
            Some((dir, lock))
        } else {
            None
        };

        let discovery = Discovery::new(roots.clone());
        let plan = preflight::check_options(opts, &discovery)?;
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let topology = Topology::discover(roots).map_err(|e| Error::System(e.to_string()))?;
        let snapshot = if opts.no_huge {
            None
        } else {
            Some(discovery.discover()?)
        };
        let pa_possible = snapshot
            .as_ref()
            .is_some_and(|s| s.pagemap == crate::hugepages::PagemapAccess::PhysicalAddresses);
        let iova_mode = match opts.iova_mode {
            Some(IovaMode::Pa) if !pa_possible => {
                return Err(Error::Permission {
                    what: "--iova-mode pa needs physical addresses from /proc/self/pagemap".into(),
                    fix: "run as root (CAP_SYS_ADMIN), or use --iova-mode va".into(),
                })
            }
            Some(m) => m,
            None if pa_possible => IovaMode::Pa,
            None => IovaMode::Va,
        };
        let pagemap = if iova_mode == IovaMode::Pa {
            Some(Pagemap::open().map_err(|e| Error::System(e.to_string()))?)
        } else {
            None
        };

        let backing = preflight::Request::from_options(opts).backing;
        let types = plan_lists(opts, &plan, &topology)?;
        let caps: Vec<u32> = types.iter().map(|t| t.capacity).collect();
        let layout = ConfigLayout::new(
            opts.max_memseg_lists,
            &caps,
            opts.max_heaps,
            opts.max_memseg_lists,
            topology.nodes().len() as u32,
            opts.max_memzones,
        )?;
        let lists_end = types
            .iter()
            .map(|t| t.va_off + t.capacity as usize * t.page_size.bytes() as usize)
            .max()
            .unwrap_or(0);
        let config_off = lists_end.next_multiple_of(rustix::param::page_size());
        let total = config_off + layout.total;
        let max_page = types
            .iter()
            .map(|t| t.page_size.bytes() as usize)
            .max()
            .unwrap_or(4096);

        let reservation = match opts.base_virtaddr {
            Some(hint) => {
                let hint = usize::try_from(hint).unwrap_or(usize::MAX);
                if hint % max_page != 0 {
                    return Err(Error::System(format!(
                        "--base-virtaddr {hint:#x} is not aligned to the largest page size in use ({}); \
                         use {:#x}",
                        format_size(max_page as u64),
                        hint.next_multiple_of(max_page)
                    )));
                }
                VaReservation::reserve_near(hint, total, true).map_err(MemsegError::from)?
            }
            None => VaReservation::reserve_near(DEFAULT_BASE_VA, total, false)
                .map_err(MemsegError::from)?,
        };

        // The config: a memfd mapped at the end of the reservation.
        let config_fd = rustix::fs::memfd_create(
            format!("{}config", opts.file_prefix),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(|e| Error::io("creating", "config memfd", e.into()))?;
        rustix::fs::ftruncate(&config_fd, layout.total as u64)
            .map_err(|e| Error::io("sizing", "config memfd", e.into()))?;
        // SAFETY: the config range of the fresh reservation is unused.
        let config_ptr = unsafe {
            reservation.map_shared(config_off, layout.total, config_fd.as_fd(), 0, false)
        }
        .map_err(MemsegError::from)?;
        // The mapping is page-aligned, more than any config structure needs.
        #[allow(clippy::cast_ptr_alignment)]
        let config = NonNull::new(config_ptr.cast::<ConfigHeader>())
            .ok_or_else(|| Error::System("config mapped at address 0".into()))?;

        let mut flags = 0;
        if opts.legacy_mem {
            flags |= CFG_LEGACY;
        }
        if opts.single_file_segments {
            flags |= CFG_SINGLE_FILE;
        }
        if opts.no_huge {
            flags |= CFG_NO_HUGE;
        }
        if opts.in_memory {
            flags |= CFG_IN_MEMORY;
        }
        if iova_mode == IovaMode::Pa {
            flags |= CFG_IOVA_PA;
        }
        let mut sections = [Section::default(); layout::SECTION_SLOTS];
        sections[SECTION_LISTS] = Section {
            offset: layout.lists_off as u64,
            len: u64::from(opts.max_memseg_lists) * size_of::<ListHeader>() as u64,
        };
        sections[SECTION_HEAPS] = Section {
            offset: layout.heaps_off as u64,
            len: u64::from(opts.max_heaps) * crate::heap::HEAP_HEADER_SIZE as u64,
        };
        sections[SECTION_TCACHE] = Section {
            offset: layout.tcache_off as u64,
            len: (topology.nodes().len() * crate::heap::TCACHE_BYTES_PER_HEAP) as u64,
        };
        sections[SECTION_EXTMEM] = Section {
            offset: layout.extmem_off as u64,
            len: u64::from(opts.max_memseg_lists) * crate::heap::EXTMEM_ENTRY_SIZE as u64,
        };
        sections[SECTION_MEMZONES] = Section {
            offset: layout.memzones.0 as u64,
            len: layout.memzones.1 as u64,
        };
        // SAFETY: the config mapping is fresh (zero-filled), at least
        // `layout.total` bytes and page-aligned; nobody else has it yet.
        unsafe {
            config.as_ptr().write(ConfigHeader {
                magic: 0.into(),
                layout_version: LAYOUT_VERSION,
                header_size: size_of::<ConfigHeader>() as u32,
                build_id: layout::build_id(),
                config_va: config_ptr as u64,
                config_len: layout.total as u64,
                mem_va: reservation.base() as u64,
                mem_len: reservation.len() as u64,
                primary_pid: std::process::id(),
                flags,
                n_lists: types.len() as u32,
                max_lists: opts.max_memseg_lists,
                hotplug_lock: crate::shm::lock::RwLock::new(),
                reserved0: 0,
                sections,
                next_ext_socket: 0.into(),
                memory_channels: opts.memory_channels.unwrap_or(0),
                memory_ranks: opts.memory_ranks.unwrap_or(0),
                reserved: [0; 22],
            });
        }

        // Under --huge-unlink=never, files left by an earlier run are kept
        // for reuse (their pages come back as dirty), as DPDK does.
        let reclaim = opts.effective_huge_unlink() != crate::options::HugeUnlink::Never;
        if let (Backing::Hugetlbfs(dir), true) = (&backing, reclaim) {
            match reclaim_stale(dir, &opts.file_prefix) {
                Ok(report) if !report.removed.is_empty() => tracing::info!(
                    dir = %dir.display(),
                    files = report.removed.len(),
                    "removed stale hugepage files of dead processes"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot reclaim stale hugepage files");
                }
            }
        }

        let mut lists = Vec::with_capacity(types.len());
        for (i, t) in types.iter().enumerate() {
            let index = i as u32;
            let name = format!("memseg-{}k-{}", t.page_size.kib(), t.node);
            let store: Box<dyn PageStore> = match &backing {
                Backing::Hugetlbfs(dir) => Box::new(HugetlbfsStore::create(
                    dir,
                    &opts.file_prefix,
                    index,
                    t.page_size,
                    t.capacity,
                    opts.single_file_segments,
                    opts.effective_huge_unlink(),
                )?),
                Backing::Memfd | Backing::Anonymous => Box::new(MemfdStore::create(
                    &format!("{}seg_{index}", opts.file_prefix),
                    t.page_size,
                    t.capacity,
                )?),
            };
            let (fb_off, fb_len) = layout.fbarrays[i];
            // SAFETY: inside the config mapping (layout computed the range),
            // unused by anyone else yet; the mapping lives as long as `List`.
            let segs = unsafe {
                FbArray::init(
                    config_ptr.add(fb_off),
                    fb_len,
                    &name,
                    t.capacity,
                    size_of::<Memseg>() as u32,
                )
            }?;
            let mut name_buf = [0u8; LIST_NAME_LEN];
            name_buf[..name.len().min(LIST_NAME_LEN)]
                .copy_from_slice(&name.as_bytes()[..name.len().min(LIST_NAME_LEN)]);
            let base_va = reservation.base() + t.va_off;
            // lists_off and 128-byte entries keep 8-byte alignment.
            #[allow(clippy::cast_ptr_alignment)]
            // SAFETY: the header table lies inside the config mapping
            // (lists_off + max_lists * 128 <= layout.total) and i < n_lists
            // <= max_lists.
            let header = unsafe {
                let p = config_ptr
                    .add(layout.lists_off + i * size_of::<ListHeader>())
                    .cast::<ListHeader>();
                p.write(ListHeader {
                    base_va: base_va as u64,
                    len: u64::from(t.capacity) * t.page_size.bytes(),
                    page_size: t.page_size.bytes(),
                    version: 0.into(),
                    fbarray_off: fb_off as u64,
                    fbarray_len: fb_len as u64,
                    node: t.node,
                    capacity: t.capacity,
                    backing: store.kind() as u32,
                    index,
                    used: 0.into(),
                    pinned: 0.into(),
                    name: name_buf,
                    reserved: [0; 3],
                });
                NonNull::new_unchecked(p)
            };
            lists.push(List {
                header,
                segs,
                store,
                index,
                name,
                node: t.node,
                page_size: t.page_size,
                va_off: t.va_off,
                base_va,
                capacity: t.capacity,
            });
        }

        let socket_limits = opts.socket_limit.clone().unwrap_or_default();
        // SAFETY: the heap and extmem tables lie inside the fresh config
        // mapping (layout computed them), zero-filled, and live as long as
        // the Memory that owns the mapping.
        let heap = unsafe {
            crate::heap::Heaps::init(
                config_ptr.add(layout.heaps_off),
                opts.max_heaps,
                config_ptr.add(layout.extmem_off),
                opts.max_memseg_lists,
                config_ptr.add(layout.tcache_off),
                &topology,
                opts.match_allocations,
            )
        }?;
        // SAFETY: the memzone section lies inside the fresh, zero-filled
        // config mapping (layout computed it) and lives as long as `Memory`.
        let zones = unsafe {
            crate::memzone::ZoneTable::init(
                config_ptr.add(layout.memzones.0),
                layout.memzones.1,
                opts.max_memzones,
            )
        };
        let mut mem = Instance {
            lists,
            heap,
            zones,
            mp: crate::mp::MpState::primary(),
            registry: std::sync::RwLock::new(Registry::default()),
            config,
            config_fd,
            reservation,
            topology,
            pagemap,
            iova_mode,
            socket_limits,
            fixed: None,
            opts: opts.clone(),
            plan,
            primary,
        };

        // Preallocate what was asked for, pinned until shutdown; it is
        // the heaps' first memory.
        let mut heap_runs: Vec<PageRun> = Vec::new();
        let entries = mem.plan.entries.clone();
        for e in &entries {
            let count = u32::try_from(e.pages).map_err(|_| {
                Error::System(format!("{} pages of {} is too many", e.pages, e.page_size))
            })?;
            let req = PageRequest::new(e.node, e.page_size, count).best_effort_contiguity();
            heap_runs.extend(mem.alloc_inner(&req, MEMSEG_DO_NOT_FREE | MEMSEG_HEAP)?);
        }
        if opts.no_huge {
            let bytes = opts.requested_memory().unwrap_or(NO_HUGE_DEFAULT_MEMORY);
            let pages = bytes.div_ceil(PageSize::SIZE_4K.bytes());
            if pages > 0 {
                let count = u32::try_from(pages).map_err(|_| {
                    Error::System(format!("{bytes} bytes of 4 KiB pages is too many"))
                })?;
                let req = PageRequest::new(0, PageSize::SIZE_4K, count).best_effort_contiguity();
                heap_runs.extend(mem.alloc_inner(&req, MEMSEG_DO_NOT_FREE | MEMSEG_HEAP)?);
            }
            mem.fixed = Some("--no-huge");
        } else if opts.legacy_mem {
            if opts.requested_memory().is_none() {
                // DPDK's legacy mode without -m maps every available page.
                let wanted: Vec<(u32, PageSize, u32)> = mem
                    .lists
                    .iter()
                    .map(|l| {
                        let free = snapshot
                            .as_ref()
                            .and_then(|s| s.node_size(l.node, l.page_size))
                            .map_or(0, |n| n.free);
                        (l.node, l.page_size, free.min(u64::from(l.capacity)) as u32)
                    })
                    .filter(|w| w.2 > 0)
                    .collect();
                for (node, size, count) in wanted {
                    let req = PageRequest::new(node, size, count)
                        .best_effort_contiguity()
                        .as_many_as_possible();
                    match mem.alloc_inner(&req, MEMSEG_DO_NOT_FREE | MEMSEG_HEAP) {
                        Ok(runs) => heap_runs.extend(runs),
                        Err(e) => {
                            tracing::warn!(node, %size, error = %e, "--legacy-mem: could not map the available pages");
                        }
                    }
                }
            }
            mem.fixed = Some("--legacy-mem");
        }

        mem.heap.set_page_map(mem.heap_page_map());
        mem.heap.add_initial(&mem, &heap_runs);

        // Complete: other processes may attach from now on.
        mem.config_header()
            .magic
            .store(CONFIG_MAGIC, Ordering::Release);
        tracing::info!(
            prefix = %opts.file_prefix,
            lists = mem.lists.len(),
            preallocated = %format_size(mem.plan.bytes()),
            base = format_args!("{:#x}", mem.reservation.base()),
            elapsed_us = started.elapsed().as_micros() as u64,
            "memory initialised"
        );
        Ok(mem)
    }

    /// Starts the multi-process endpoint (primary: serves secondaries;
    /// secondary: follows the primary's memory map).
    fn start_ipc(&self, me: &std::sync::Arc<Instance>) -> Result<()> {
        self.start_ipc_impl(me)
    }

    /// Stops the multi-process endpoint's threads.
    fn stop_ipc(&self) {
        self.mp.stop();
    }

    fn config_header(&self) -> &ConfigHeader {
        // SAFETY: the config mapping lives as long as `self`.
        unsafe { self.config.as_ref() }
    }

    /// Views of the lists' fbarrays for the heaps' crash recovery.
    fn heap_page_map(&self) -> crate::heap::PageMap {
        let base = self.config.as_ptr().cast::<u8>();
        let lists = self
            .lists
            .iter()
            .filter_map(|l| {
                let h = l.header();
                // SAFETY: the fbarray region lies in the config mapping,
                // which outlives the heaps (both owned by the instance).
                let view = unsafe {
                    let region = base.add(h.fbarray_off as usize);
                    if self.mp.is_secondary() {
                        FbArray::attach_lock_free(region, h.fbarray_len as usize)
                    } else {
                        FbArray::attach(region, h.fbarray_len as usize)
                    }
                }
                .ok()?;
                Some((
                    l.base_va,
                    l.capacity as usize * l.page_size.bytes() as usize,
                    l.page_size.bytes() as usize,
                    view,
                ))
            })
            .collect();
        crate::heap::PageMap { lists }
    }

    /// The primary process's pid (this process's in a primary).
    pub fn primary_pid(&self) -> u32 {
        self.config_header().primary_pid
    }

    /// Memory channels per socket as the primary was told (`-n`), 0 when
    /// it was not (DPDK's `rte_memory_get_nchannel`). Mempools then assume
    /// 4.
    pub fn memory_channels(&self) -> u32 {
        self.config_header().memory_channels
    }

    /// Memory ranks as the primary was told (`-r`), 0 when it was not
    /// (`rte_memory_get_nrank`). Mempools then assume 1.
    pub fn memory_ranks(&self) -> u32 {
        self.config_header().memory_ranks
    }

    /// The hotplug lock for writing. A holder that died (a secondary
    /// killed while changing the heap table) is taken over, with an error
    /// logged: its change may be half done.
    fn hotplug_write_guard(&self) -> crate::shm::lock::WriteGuard<'_> {
        let lock = &self.config_header().hotplug_lock;
        loop {
            match lock.write_timeout(std::time::Duration::from_millis(200)) {
                Ok(g) => return g,
                Err(crate::shm::lock::LockError::OwnerDead { pid }) => {
                    if let Some(g) = lock.take_over_dead_writer() {
                        tracing::error!(pid, "took over the hotplug lock from a dead process");
                        return g;
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// A stable id of this instance, for the per-thread callback marker.
    fn id(&self) -> usize {
        self.config.as_ptr() as usize
    }

    /// The id that marks this instance's callbacks on a thread.
    pub(crate) fn callback_id(&self) -> usize {
        self.id()
    }

    /// Takes the hotplug lock for writing (heap table and external memory
    /// changes).
    pub(crate) fn hotplug_write(
        &self,
    ) -> (crate::shm::lock::HeldMark, crate::shm::lock::WriteGuard<'_>) {
        let g = self.hotplug_write_guard();
        (crate::shm::lock::HeldMark::new(), g)
    }

    /// A fresh socket id for an external heap: counts up, never reused.
    pub(crate) fn next_external_socket(&self) -> Option<i32> {
        let n = self
            .config_header()
            .next_ext_socket
            .fetch_add(1, Ordering::AcqRel);
        i32::try_from(n)
            .ok()?
            .checked_add(crate::heap::EXTERNAL_SOCKET_BASE)
    }

    /// Fires memory events (external memory added or removed).
    pub(crate) fn fire_events(&self, evs: &[MemEvent]) {
        self.fire(evs);
    }

    /// The options the instance was started with.
    pub fn options(&self) -> &MemOptions {
        &self.opts
    }

    /// NUMA topology seen at init.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The IOVA mode in effect.
    pub fn iova_mode(&self) -> IovaMode {
        self.iova_mode
    }

    /// First address of the instance's address-space reservation.
    pub fn base_va(&self) -> usize {
        self.reservation.base()
    }

    /// Bytes of the reservation (all lists and the config).
    pub fn va_len(&self) -> usize {
        self.reservation.len()
    }

    /// The shared config's memfd (secondaries map it).
    pub fn config_fd(&self) -> BorrowedFd<'_> {
        self.config_fd.as_fd()
    }

    /// The preallocation plan carried out at init.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Snapshots of all memseg lists.
    pub fn lists(&self) -> Vec<ListInfo> {
        self.lists.iter().map(List::info).collect()
    }

    /// Bytes of pages mapped on `node` (all sizes).
    pub fn node_total(&self, node: u32) -> u64 {
        self.lists
            .iter()
            .filter(|l| l.node == node)
            .map(|l| u64::from(l.header().used.load(Ordering::Relaxed)) * l.page_size.bytes())
            .sum()
    }

    /// Bytes of pages mapped, all nodes.
    pub fn total_mapped(&self) -> u64 {
        self.lists
            .iter()
            .map(|l| u64::from(l.header().used.load(Ordering::Relaxed)) * l.page_size.bytes())
            .sum()
    }

    fn list_for(&self, node: u32, page_size: PageSize) -> Result<&List, MemsegError> {
        if !self.topology.contains(node) {
            return Err(MemsegError::NoSuchNode {
                node,
                nodes: self.topology.nodes().iter().map(|n| n.id).collect(),
            });
        }
        self.lists
            .iter()
            .find(|l| l.node == node && l.page_size == page_size)
            .ok_or_else(|| MemsegError::NoSuchPageSize {
                node,
                page_size,
                available: self
                    .lists
                    .iter()
                    .filter(|l| l.node == node)
                    .map(|l| l.page_size)
                    .collect(),
                fix: if self.opts.no_huge {
                    "--no-huge uses 4 KiB pages only".into()
                } else {
                    format!(
                        "lists exist for page sizes that had free pages at init; reserve {page_size} pages \
                         (`memplane hugepages reserve {page_size}=<count>`) before starting"
                    )
                },
            })
    }

    fn list_of_addr(&self, addr: usize) -> Option<&List> {
        self.lists.iter().find(|l| {
            addr >= l.base_va
                && addr - l.base_va < l.capacity as usize * l.page_size.bytes() as usize
        })
    }

    /// Runs `f` with the hotplug lock held for reading, or directly when
    /// this thread is inside one of this instance's callbacks (it holds the
    /// lock for writing already).
    fn read_locked<R>(&self, f: impl FnOnce() -> R) -> R {
        if events::is_in_callback(self.id()) {
            f()
        } else if self.mp.is_secondary() {
            // A secondary never holds the shared lock for reading: killed
            // while holding it, it would block the primary for good (readers
            // are counted, not named). Its walks exclude its own resyncs,
            // which are the only changes to its mappings.
            let _g = self.mp.local_hotplug.read();
            let _held = crate::shm::lock::HeldMark::new();
            f()
        } else {
            let _g = self.config_header().hotplug_lock.read();
            let _held = crate::shm::lock::HeldMark::new();
            f()
        }
    }

    /// Maps pages: `req.count` pages of `req.page_size` on `req.node`, into
    /// free slots of that memory type's list. Returns the runs mapped (one
    /// when `req.contiguous`). Pages are reserved from the kernel before they
    /// are mapped (a shortfall is [`MemsegError::OutOfPages`], never
    /// SIGBUS), validators and `--socket-limit` are consulted first, and
    /// [`MemEventKind::Alloc`] events fire after the mapping. On error
    /// nothing changed.
    pub fn alloc_pages(&self, req: &PageRequest) -> Result<Vec<PageRun>> {
        if let Some(mode) = self.fixed {
            return Err(MemsegError::FixedMemory {
                what: "allocating pages at run time",
                mode,
            }
            .into());
        }
        self.alloc_inner(req, 0)
    }

    fn alloc_inner(&self, req: &PageRequest, seg_flags: u32) -> Result<Vec<PageRun>> {
        let pin = seg_flags & MEMSEG_DO_NOT_FREE != 0;
        events::not_in_callback(self.id(), "alloc_pages")?;
        if req.count == 0 {
            return Err(MemsegError::ZeroPages.into());
        }
        if self.mp.is_secondary() {
            // Only the primary maps pages: it maps them for everybody.
            self.list_for(req.node, req.page_size)?;
            return self.mp_request_pages(&crate::mp::PagesOp::Alloc {
                node: req.node,
                page_size: req.page_size.bytes(),
                count: req.count,
                contiguous: req.contiguous,
                exact: req.exact,
                heap: seg_flags & MEMSEG_HEAP != 0,
            });
        }
        let list = self.list_for(req.node, req.page_size)?;
        let psz = req.page_size.bytes();
        let _g = self.hotplug_write_guard();
        let _held = crate::shm::lock::HeldMark::new();

        let asked = u64::from(req.count) * psz;
        let current = self.node_total(req.node);
        let new_total = current + asked;
        if let Some(&limit) = self.socket_limits.get(req.node as usize) {
            if limit > 0 && new_total > limit {
                return Err(MemsegError::LimitExceeded {
                    node: req.node,
                    asked,
                    new_total,
                    limit,
                    by: "--socket-limit".into(),
                }
                .into());
            }
        }
        let validators = self
            .registry
            .read()
            .map_err(|_| Error::System("callback registry poisoned".into()))?
            .validators_for(req.node);
        events::validate(self.id(), &validators, req.node, asked, new_total)?;

        // Slots.
        let runs = find_slots(list, req)?;
        // Pages from the kernel, on the right node.
        let _policy = if self.topology.nodes().len() > 1 {
            Some(
                crate::numa::PolicyGuard::bind_thread(req.node, true)
                    .map_err(|e| Error::System(e.to_string()))?,
            )
        } else {
            None
        };
        let mut reserved: Vec<(u32, u32, Freshness)> = Vec::new();
        let rollback = |reserved: &[(u32, u32, Freshness)]| {
            for &(first, count, _) in reserved {
                if let Err(e) = list.store.release(first, count) {
                    tracing::error!(list = %list.name, first, count, error = %e, "cannot give pages back during rollback");
                }
            }
        };
        let mut shortfall = None;
        for &(first, count) in &runs {
            match list.store.reserve(first, count) {
                Ok(f) => reserved.push((first, count, f)),
                Err(e @ MemsegError::OutOfPages { .. }) if !req.exact => {
                    // As many as possible: one page at a time until the
                    // kernel says no.
                    for s in first..first + count {
                        match list.store.reserve(s, 1) {
                            Ok(f) => reserved.push((s, 1, f)),
                            Err(_) => break,
                        }
                    }
                    shortfall = Some(e);
                    break;
                }
                Err(e) => {
                    rollback(&reserved);
                    return Err(explain_shortfall(e, req).into());
                }
            }
        }
        if reserved.is_empty() {
            return Err(explain_shortfall(shortfall.unwrap_or(MemsegError::ZeroPages), req).into());
        }
        let reserved = merge_runs(reserved);

        // Map, then learn IOVAs and check placement.
        let mut mapped: Vec<(u32, u32)> = Vec::new();
        let unmap_all = |mapped: &[(u32, u32)]| {
            for &(first, count) in mapped {
                let off = list.va_off + first as usize * psz as usize;
                // SAFETY: these slots were mapped by this call and nobody
                // was told about them yet.
                let undone = unsafe { self.reservation.unmap(off, count as usize * psz as usize) };
                if let Err(e) = undone {
                    tracing::error!(error = %e, "cannot unmap during rollback");
                }
            }
        };
        let mut segs: Vec<(u32, Memseg)> = Vec::new();
        let result: Result<(), MemsegError> = (|| {
            for &(first, count, fresh) in &reserved {
                list.store.extents(first, count, &mut |ext| {
                    let off = list.va_off + ext.first as usize * psz as usize;
                    let len = ext.count as usize * psz as usize;
                    // SAFETY: the slots are free (claimed under the hotplug
                    // lock), so nobody uses that part of the reservation.
                    unsafe {
                        self.reservation
                            .map_shared(off, len, ext.fd, ext.file_offset, true)
                    }?;
                    mapped.push((ext.first, ext.count));
                    for k in 0..ext.count {
                        let slot = ext.first + k;
                        segs.push((
                            slot,
                            Memseg {
                                va: list.slot_va(slot) as u64,
                                iova: BAD_IOVA,
                                len: psz,
                                page_size: psz,
                                node: req.node,
                                flags: seg_flags
                                    | if fresh == Freshness::Dirty {
                                        MEMSEG_DIRTY
                                    } else {
                                        0
                                    },
                                file_offset: ext.file_offset + u64::from(k) * psz,
                            },
                        ));
                    }
                    Ok(())
                })?;
            }
            self.fill_iovas(&mut segs, psz)?;
            self.check_nodes(&segs, req.node)?;
            Ok(())
        })();
        if let Err(e) = result {
            unmap_all(&mapped);
            rollback(&reserved);
            return Err(e.into());
        }

        // Record.
        {
            let w = list.segs.write_lock();
            for &(slot, seg) in &segs {
                list.set_seg(slot, seg);
                w.set_used(slot)?;
            }
        }
        let h = list.header();
        h.used.fetch_add(segs.len() as u32, Ordering::Relaxed);
        if pin {
            h.pinned.fetch_add(segs.len() as u32, Ordering::Relaxed);
        }
        h.version.fetch_add(1, Ordering::Release);
        // Every secondary maps the pages before anyone hears of them.
        if let Err(e) = self.mp_sync_all() {
            for &(first, count, _) in &reserved {
                if let Err(e) = self.release_slots(list, first, count, false) {
                    tracing::error!(list = %list.name, error = %e, "cannot roll back pages after a failed sync");
                }
            }
            return Err(e.into());
        }

        let out: Vec<PageRun> = reserved
            .iter()
            .map(|&(first, count, fresh)| PageRun {
                list: list.index,
                first,
                count,
                va: list.slot_va(first),
                len: count as usize * psz as usize,
                page_size: req.page_size,
                node: req.node,
                zeroed: fresh == Freshness::Zeroed,
            })
            .collect();
        let evs: Vec<MemEvent> = out
            .iter()
            .map(|r| MemEvent {
                kind: MemEventKind::Alloc,
                addr: r.va,
                len: r.len,
                page_size: r.page_size,
                node: r.node,
            })
            .collect();
        self.fire(&evs);
        tracing::debug!(list = %list.name, pages = segs.len(), runs = out.len(), "pages mapped");
        Ok(out)
    }

    fn fill_iovas(&self, segs: &mut [(u32, Memseg)], psz: u64) -> Result<(), MemsegError> {
        match &self.pagemap {
            None => {
                for (_, s) in segs.iter_mut() {
                    s.iova = s.va;
                }
            }
            Some(pm) => {
                // Consecutive slots are consecutive VAs: read in one go.
                let mut i = 0;
                while i < segs.len() {
                    let mut j = i + 1;
                    while j < segs.len() && segs[j].0 == segs[j - 1].0 + 1 {
                        j += 1;
                    }
                    let va = segs[i].1.va as usize;
                    let pas = pm.phys_addrs(va, j - i, psz as usize).map_err(|e| {
                        MemsegError::NoPhysAddr {
                            addr: va,
                            detail: e.to_string(),
                        }
                    })?;
                    for (k, pa) in pas.into_iter().enumerate() {
                        let seg = &mut segs[i + k].1;
                        seg.iova = pa.ok_or_else(|| MemsegError::NoPhysAddr {
                            addr: seg.va as usize,
                            detail: "page not present or frame number hidden".into(),
                        })?;
                    }
                    i = j;
                }
            }
        }
        Ok(())
    }

    fn check_nodes(&self, segs: &[(u32, Memseg)], node: u32) -> Result<(), MemsegError> {
        if self.topology.nodes().len() < 2 {
            return Ok(());
        }
        for (_, s) in segs {
            match crate::numa::node_of_address(s.va as usize) {
                Ok(Some(got)) if got != node => {
                    let e = MemsegError::WrongNode {
                        addr: s.va as usize,
                        wanted: node,
                        got,
                    };
                    if !self.opts.numa_lenient {
                        return Err(e);
                    }
                    tracing::warn!("{e} (--numa-lenient: kept)");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(addr = format_args!("{:#x}", s.va), error = %e, "cannot verify the page's node");
                }
            }
        }
        Ok(())
    }

    fn fire(&self, evs: &[MemEvent]) {
        let cbs = match self.registry.read() {
            Ok(r) => r.callbacks(),
            Err(_) => return,
        };
        events::fire(self.id(), &cbs, evs);
    }

    /// Unmaps the pages of `[addr, addr + len)` and gives them back to the
    /// kernel at once. The range must be whole allocated pages of one list,
    /// none of them preallocated. [`MemEventKind::Free`] fires before the
    /// unmap. On error nothing changed.
    pub fn free_pages(&self, addr: usize, len: usize) -> Result<()> {
        self.free_pages_inner(addr, len, false)
    }

    /// Maps pages for a heap: like [`alloc_pages`](Self::alloc_pages), the
    /// pages flagged as the heap's.
    pub(crate) fn alloc_heap_pages(&self, req: &PageRequest) -> Result<Vec<PageRun>> {
        if let Some(mode) = self.fixed {
            return Err(MemsegError::FixedMemory {
                what: "growing a heap",
                mode,
            }
            .into());
        }
        self.alloc_inner(req, MEMSEG_HEAP)
    }

    /// Gives back pages a heap no longer uses.
    pub(crate) fn free_heap_pages(&self, addr: usize, len: usize) -> Result<()> {
        self.free_pages_inner(addr, len, true)
    }

    /// Whether memory is fixed at init (`--legacy-mem`, `--no-huge`): the
    /// option that fixes it.
    pub(crate) fn fixed_by(&self) -> Option<&'static str> {
        self.fixed
    }

    /// The memseg flags of the page holding `addr`, read without the
    /// hotplug lock (a u32 load: callers use it for pages whose flags they
    /// own, such as a heap checking its own pages under its lock). `None`
    /// outside every list or for an unused page.
    pub(crate) fn page_flags(&self, addr: usize) -> Option<(u32, u32, u64)> {
        let list = self.list_of_addr(addr)?;
        let slot = ((addr - list.base_va) / list.page_size.bytes() as usize) as u32;
        let p = list.segs.get_ptr::<Memseg>(slot).ok()?;
        // SAFETY: the element lies in the config mapping; an aligned u32
        // field read cannot tear, and `len` is 0 for unused slots.
        let (flags, len) = unsafe {
            (
                std::ptr::addr_of!((*p.as_ptr()).flags).read_volatile(),
                std::ptr::addr_of!((*p.as_ptr()).len).read_volatile(),
            )
        };
        (len != 0).then_some((list.index, flags, list.page_size.bytes()))
    }

    /// Whether every mapped page of list `index` is preallocated (then a
    /// heap has nothing to give back there).
    pub(crate) fn list_all_pinned(&self, index: u32) -> bool {
        self.lists.get(index as usize).is_none_or(|l| {
            let h = l.header();
            h.pinned.load(Ordering::Relaxed) >= h.used.load(Ordering::Relaxed)
        })
    }

    /// List index, node and memseg flags of the page holding `addr`, in
    /// one lookup; `None` outside every list. An unused page has flags 0.
    #[inline]
    pub(crate) fn page_of(&self, addr: usize) -> Option<(u32, u32, u32)> {
        let list = self.list_of_addr(addr)?;
        let slot = ((addr - list.base_va) / list.page_size.bytes() as usize) as u32;
        let flags = list.segs.get_ptr::<Memseg>(slot).ok().map_or(0, |p| {
            // SAFETY: the element lies in the config mapping; an aligned
            // u32 read cannot tear. Only the page's owner changes it.
            unsafe { std::ptr::addr_of!((*p.as_ptr()).flags).read_volatile() }
        });
        Some((list.index, list.node, flags))
    }

    /// Index, node and page size of the list holding `addr`.
    pub(crate) fn list_at(&self, addr: usize) -> Option<(u32, u32, PageSize)> {
        self.list_of_addr(addr)
            .map(|l| (l.index, l.node, l.page_size))
    }

    /// Node and page size of list `index`.
    pub(crate) fn list_meta(&self, index: u32) -> Option<(u32, PageSize, usize, usize)> {
        self.lists.get(index as usize).map(|l| {
            (
                l.node,
                l.page_size,
                l.base_va,
                l.capacity as usize * l.page_size.bytes() as usize,
            )
        })
    }

    /// Page sizes of the lists of `node`, smallest first.
    pub(crate) fn node_page_sizes(&self, node: u32) -> Vec<PageSize> {
        let mut v: Vec<PageSize> = self
            .lists
            .iter()
            .filter(|l| l.node == node)
            .map(|l| l.page_size)
            .collect();
        v.sort();
        v
    }

    fn free_pages_inner(&self, addr: usize, len: usize, heap: bool) -> Result<()> {
        if let Some(mode) = self.fixed {
            return Err(MemsegError::FixedMemory {
                what: "freeing pages at run time",
                mode,
            }
            .into());
        }
        events::not_in_callback(self.id(), "free_pages")?;
        let list = self
            .list_of_addr(addr)
            .ok_or(MemsegError::NotInAnyList { addr })?;
        if self.mp.is_secondary() {
            self.mp_request_pages(&crate::mp::PagesOp::Free {
                addr: addr as u64,
                len: len as u64,
                heap,
            })?;
            return Ok(());
        }
        let psz = list.page_size.bytes() as usize;
        let off = addr - list.base_va;
        let list_len = list.capacity as usize * psz;
        if len == 0 || off % psz != 0 || len % psz != 0 || off + len > list_len {
            return Err(MemsegError::BadRange {
                addr,
                len,
                list: list.name.clone(),
                page_size: psz as u64,
            }
            .into());
        }
        let first = (off / psz) as u32;
        let count = (len / psz) as u32;
        let _g = self.hotplug_write_guard();
        let _held = crate::shm::lock::HeldMark::new();
        for s in first..first + count {
            if !list.segs.is_used(s)? {
                return Err(MemsegError::NotAllocated {
                    addr: list.slot_va(s),
                    list: list.name.clone(),
                }
                .into());
            }
            let flags = list.seg(s).flags;
            if flags & MEMSEG_DO_NOT_FREE != 0 {
                return Err(MemsegError::Pinned {
                    addr: list.slot_va(s),
                }
                .into());
            }
            if flags & MEMSEG_HEAP != 0 && !heap {
                return Err(MemsegError::HeapOwned {
                    addr: list.slot_va(s),
                }
                .into());
            }
        }
        self.release_slots(list, first, count, true)?;
        Ok(())
    }

    /// Frees a run returned by [`alloc_pages`](Self::alloc_pages).
    pub fn free_run(&self, run: &PageRun) -> Result<()> {
        self.free_pages(run.va, run.len)
    }

    /// Fires FREE (with `events`), unmaps, records, has every secondary
    /// unmap, then gives the pages back to the kernel. The caller holds
    /// the hotplug write lock and checked the slots are used.
    fn release_slots(
        &self,
        list: &List,
        first: u32,
        count: u32,
        events: bool,
    ) -> Result<(), MemsegError> {
        let psz = list.page_size.bytes() as usize;
        if events {
            self.fire(&[MemEvent {
                kind: MemEventKind::Free,
                addr: list.slot_va(first),
                len: count as usize * psz,
                page_size: list.page_size,
                node: list.node,
            }]);
        }
        // SAFETY: the pages are ours and their owner gave them up; the
        // range goes straight back to PROT_NONE.
        unsafe {
            self.reservation
                .unmap(list.va_off + first as usize * psz, count as usize * psz)
        }?;
        let mut pinned = 0;
        {
            let w = list.segs.write_lock();
            for s in first..first + count {
                if list.seg(s).flags & MEMSEG_DO_NOT_FREE != 0 {
                    pinned += 1;
                }
                list.set_seg(s, Memseg::default());
                w.set_free(s)?;
            }
        }
        let h = list.header();
        h.used.fetch_sub(count, Ordering::Relaxed);
        h.pinned.fetch_sub(pinned, Ordering::Relaxed);
        h.version.fetch_add(1, Ordering::Release);
        // Secondaries unmap before the pages go back to the kernel (a
        // mapping over a released memfd range would fault in new pages).
        // The slots stay unclaimable meanwhile: we hold the write lock.
        if let Err(e) = self.mp_sync_all() {
            tracing::error!(list = %list.name, first, count, error = %e, "secondaries did not all unmap freed pages");
        }
        if let Err(e) = list.store.release(first, count) {
            // The VA is already gone; keep the books straight anyway.
            tracing::error!(list = %list.name, first, count, error = %e, "cannot give pages back to the kernel");
        }
        tracing::debug!(list = %list.name, first, count, "pages unmapped");
        Ok(())
    }

    // --- walks and lookups ---------------------------------------------------

    /// Calls `f` for every used page of every list, in address order per
    /// list, with the hotplug lock held for reading (no lock inside a memory
    /// callback of this instance, whose thread holds it already: DPDK's
    /// `_thread_unsafe` variants are not needed). Stops when `f` breaks and
    /// returns its value.
    pub fn memseg_walk<B>(&self, mut f: impl FnMut(&MemsegInfo) -> ControlFlow<B>) -> Option<B> {
        self.read_locked(|| {
            for list in &self.lists {
                let mut next = list.segs.find_next_used(0).ok().flatten();
                while let Some(slot) = next {
                    if let ControlFlow::Break(b) = f(&list.seg_info(slot)) {
                        return Some(b);
                    }
                    next = if slot + 1 < list.capacity {
                        list.segs.find_next_used(slot + 1).ok().flatten()
                    } else {
                        None
                    };
                }
            }
            None
        })
    }

    /// Calls `f` once per VA-contiguous run of used pages (per list), with
    /// the same locking as [`memseg_walk`](Self::memseg_walk).
    pub fn contig_walk<B>(&self, mut f: impl FnMut(&ContigRun) -> ControlFlow<B>) -> Option<B> {
        self.read_locked(|| {
            for list in &self.lists {
                let mut start = 0;
                while start < list.capacity {
                    let Some(first) = list.segs.find_next_used(start).ok().flatten() else {
                        break;
                    };
                    let count = list.segs.find_contig_used(first).unwrap_or(1).max(1);
                    let psz = list.page_size.bytes() as usize;
                    let run = ContigRun {
                        list: list.index,
                        first,
                        count,
                        va: list.slot_va(first),
                        len: count as usize * psz,
                        page_size: list.page_size,
                        node: list.node,
                    };
                    if let ControlFlow::Break(b) = f(&run) {
                        return Some(b);
                    }
                    start = first + count;
                }
            }
            None
        })
    }

    /// Calls `f` once per list.
    pub fn list_walk<B>(&self, mut f: impl FnMut(&ListInfo) -> ControlFlow<B>) -> Option<B> {
        self.read_locked(|| {
            for list in &self.lists {
                if let ControlFlow::Break(b) = f(&list.info()) {
                    return Some(b);
                }
            }
            None
        })
    }

    /// The list whose address range covers `addr`.
    pub fn virt2memseg_list(&self, addr: usize) -> Option<ListInfo> {
        self.list_of_addr(addr).map(List::info)
    }

    /// The used page covering `addr`, if any.
    pub fn virt2memseg(&self, addr: usize) -> Option<MemsegInfo> {
        let list = self.list_of_addr(addr)?;
        let slot = ((addr - list.base_va) / list.page_size.bytes() as usize) as u32;
        self.read_locked(|| {
            if !list.segs.is_used(slot).unwrap_or(false) {
                return None;
            }
            Some(list.seg_info(slot))
        })
    }

    /// The IOVA of `addr` (inside a used page), or `None`.
    pub fn virt2iova(&self, addr: usize) -> Option<u64> {
        let seg = self.virt2memseg(addr)?;
        (seg.iova != BAD_IOVA).then(|| seg.iova + (addr - seg.va) as u64)
    }

    /// The virtual address of `iova`, searching every used page.
    pub fn iova2virt(&self, iova: u64) -> Option<usize> {
        self.memseg_walk(|s| {
            if s.iova != BAD_IOVA && iova >= s.iova && iova - s.iova < s.len as u64 {
                ControlFlow::Break(s.va + (iova - s.iova) as usize)
            } else {
                ControlFlow::Continue(())
            }
        })
    }

    /// Whether `[addr, addr + len)` lies in used pages whose IOVAs are
    /// contiguous (always, in VA mode, when the pages are used).
    pub fn is_iova_contiguous(&self, addr: usize, len: usize) -> Result<bool> {
        Ok(self.iova_break(addr, len)?.is_none())
    }

    /// Where `[addr, addr + len)` stops being IOVA-contiguous: `None` when
    /// it is contiguous, else the address of the page a contiguous run
    /// could start at (the page after an unmapped one or one without an
    /// IOVA, or the page whose IOVA does not follow its predecessor's).
    /// Lets a search for a contiguous block jump past a break instead of
    /// trying every aligned start before it.
    pub(crate) fn iova_break(&self, addr: usize, len: usize) -> Result<Option<usize>> {
        let list = self
            .list_of_addr(addr)
            .ok_or(MemsegError::NotInAnyList { addr })?;
        let psz = list.page_size.bytes() as usize;
        let end = addr
            .checked_add(len)
            .filter(|&e| len > 0 && e <= list.base_va + list.capacity as usize * psz);
        let Some(end) = end else {
            return Err(MemsegError::BadRange {
                addr,
                len,
                list: list.name.clone(),
                page_size: psz as u64,
            }
            .into());
        };
        let first = (addr - list.base_va) / psz;
        let last = (end - 1 - list.base_va) / psz;
        Ok(self.read_locked(|| {
            contig_break(first as u32, last as u32, psz as u64, |slot| {
                list.segs
                    .is_used(slot)
                    .unwrap_or(false)
                    .then(|| list.seg(slot).iova)
            })
            .map(|slot| list.base_va + slot as usize * psz)
        }))
    }

    // --- callbacks -----------------------------------------------------------

    /// Registers a memory event callback under `name` (unique, 1..=63
    /// bytes). It runs in this process for every run of pages mapped
    /// (after) or unmapped (before), with the hotplug lock held: it may
    /// walk, but not allocate or free.
    pub fn register_event_callback(
        &self,
        name: &str,
        cb: impl Fn(&MemEvent) + Send + Sync + 'static,
    ) -> Result<()> {
        self.refuse_if_fixed("memory event callbacks")?;
        let cb: EventCallback = Arc::new(cb);
        let _held = crate::shm::lock::HeldMark::new();
        self.registry
            .write()
            .map_err(|_| Error::System("callback registry poisoned".into()))?
            .add_callback(name, cb)?;
        Ok(())
    }

    /// Removes the callback registered under `name`.
    pub fn unregister_event_callback(&self, name: &str) -> Result<()> {
        self.refuse_if_fixed("memory event callbacks")?;
        let _held = crate::shm::lock::HeldMark::new();
        self.registry
            .write()
            .map_err(|_| Error::System("callback registry poisoned".into()))?
            .remove_callback(name)?;
        Ok(())
    }

    /// Registers a validator for `node`: before the node's mapped memory
    /// grows past `limit`, `v(node, limit, new_total)` is asked and may
    /// refuse by returning false (the allocation fails with
    /// [`MemsegError::LimitExceeded`] naming the validator).
    pub fn register_validator(
        &self,
        name: &str,
        node: u32,
        limit: u64,
        v: impl Fn(u32, u64, u64) -> bool + Send + Sync + 'static,
    ) -> Result<()> {
        self.refuse_if_fixed("allocation validators")?;
        if !self.topology.contains(node) {
            return Err(MemsegError::NoSuchNode {
                node,
                nodes: self.topology.nodes().iter().map(|n| n.id).collect(),
            }
            .into());
        }
        let v: Validator = Arc::new(v);
        let _held = crate::shm::lock::HeldMark::new();
        self.registry
            .write()
            .map_err(|_| Error::System("callback registry poisoned".into()))?
            .add_validator(name, node, limit, v)?;
        Ok(())
    }

    /// Removes the validator `name` of `node`.
    pub fn unregister_validator(&self, name: &str, node: u32) -> Result<()> {
        self.refuse_if_fixed("allocation validators")?;
        let _held = crate::shm::lock::HeldMark::new();
        self.registry
            .write()
            .map_err(|_| Error::System("callback registry poisoned".into()))?
            .remove_validator(name, node)?;
        Ok(())
    }

    fn refuse_if_fixed(&self, what: &'static str) -> Result<(), MemsegError> {
        match self.fixed {
            Some(mode) => Err(MemsegError::FixedMemory { what, mode }),
            None => Ok(()),
        }
    }

    // --- reporting -------------------------------------------------------------

    /// A serialisable picture of the instance: lists and used runs.
    pub fn layout(&self) -> MemoryLayout {
        let mut runs = Vec::new();
        self.contig_walk(|r| {
            runs.push(*r);
            ControlFlow::<()>::Continue(())
        });
        MemoryLayout {
            prefix: self.opts.file_prefix.clone(),
            base_va: self.reservation.base(),
            va_len: self.reservation.len(),
            iova_mode: self.iova_mode,
            lists: self.lists(),
            runs,
            total_mapped: self.total_mapped(),
        }
    }

    /// Writes one line per used page, in the style of DPDK's
    /// `rte_dump_physmem_layout`, then the total.
    pub fn dump(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut res = Ok(());
        self.memseg_walk(|s| {
            let r = writeln!(
                out,
                "Segment {}-{}: IOVA:{:#x}, len:{}, virt:{:#x}, node:{}, page_size:{}{}{}",
                s.list,
                s.slot,
                s.iova,
                s.len,
                s.va,
                s.node,
                format_size(s.len as u64),
                if s.pinned { ", pinned" } else { "" },
                if s.dirty { ", dirty" } else { "" },
            );
            match r {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    res = Err(e);
                    ControlFlow::Break(())
                }
            }
        });
        res?;
        writeln!(
            out,
            "Total memory mapped: {}",
            format_size(self.total_mapped())
        )
    }

    /// Unmaps every page (preallocated ones too) and releases the backing,
    /// as [`Drop`] does.
    fn shutdown(&mut self) {
        let _g = self.hotplug_write_guard();
        let _held = crate::shm::lock::HeldMark::new();
        for list in &self.lists {
            let mut start = 0;
            while start < list.capacity {
                let Some(first) = list.segs.find_next_used(start).ok().flatten() else {
                    break;
                };
                let count = list.segs.find_contig_used(first).unwrap_or(1).max(1);
                if let Err(e) = self.release_slots(list, first, count, true) {
                    tracing::error!(list = %list.name, error = %e, "cannot release pages at shutdown");
                }
                start = first + count;
            }
            list.store.shutdown();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Thread-exit hooks of the caches must not touch the config once
        // it goes: wait for running ones, stop later ones.
        if self.mp.is_secondary() {
            // Blocks this thread cached go back to the shared heap; those
            // of other threads went back when the threads exited.
            self.heap_cache_flush();
        }
        self.heap.token().kill();
        if self.mp.is_secondary() {
            // The primary owns the pages and files: just let go of the
            // mappings (the reservation goes with this value).
            tracing::debug!(prefix = %self.opts.file_prefix, "secondary detached");
            return;
        }
        self.shutdown();
        if let Some((dir, lock)) = self.primary.take() {
            let config = dir.config_path();
            drop(lock);
            let _ = std::fs::remove_file(&config);
            if let Err(e) = std::fs::remove_dir(dir.path()) {
                tracing::debug!(dir = %dir.path().display(), error = %e, "runtime directory left in place");
            }
        }
        tracing::debug!(prefix = %self.opts.file_prefix, "memory shut down");
    }
}

/// What [`Instance::layout`] returns.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryLayout {
    /// File prefix.
    pub prefix: String,
    /// Reservation start.
    pub base_va: usize,
    /// Reservation length.
    pub va_len: usize,
    /// IOVA mode.
    pub iova_mode: IovaMode,
    /// Lists.
    pub lists: Vec<ListInfo>,
    /// Used runs.
    pub runs: Vec<ContigRun>,
    /// Bytes mapped.
    pub total_mapped: u64,
}

/// Memory types and list capacities from the options and the machine.
fn plan_lists(opts: &MemOptions, plan: &Plan, topology: &Topology) -> Result<Vec<ListPlan>> {
    let mut types = Vec::new();
    if opts.no_huge {
        let limit = opts
            .socket_limit
            .as_ref()
            .and_then(|l| l.first().copied())
            .filter(|&l| l > 0)
            .or(opts.requested_memory())
            .unwrap_or(NO_HUGE_DEFAULT_MEMORY)
            .max(opts.requested_memory().unwrap_or(0));
        let cap = limit.div_ceil(PageSize::SIZE_4K.bytes());
        types.push((0u32, PageSize::SIZE_4K, cap));
    } else {
        let mut sizes = plan.usable_sizes.clone();
        sizes.sort_by_key(|s| std::cmp::Reverse(s.bytes()));
        for &size in &sizes {
            for node in topology.nodes() {
                let mut limit = opts.pagesz_limit(size).min(node.mem_total);
                if let Some(&l) = opts
                    .socket_limit
                    .as_ref()
                    .and_then(|v| v.get(node.id as usize))
                {
                    if l > 0 {
                        limit = limit.min(l.next_multiple_of(size.bytes()));
                    }
                }
                let cap = limit / size.bytes();
                if cap > 0 {
                    types.push((node.id, size, cap));
                }
            }
        }
    }
    if types.len() > opts.max_memseg_lists as usize {
        return Err(Error::System(format!(
            "{} memory types (NUMA nodes x page sizes) need {} memseg lists but --max-memseg-lists is {}; raise it",
            types.len(),
            types.len(),
            opts.max_memseg_lists
        )));
    }
    let mut off = 0usize;
    let mut out = Vec::with_capacity(types.len());
    for (node, size, cap) in types {
        let capacity = u32::try_from(cap).unwrap_or(u32::MAX);
        let psz = size.bytes() as usize;
        off = off.next_multiple_of(psz);
        out.push(ListPlan {
            node,
            page_size: size,
            capacity,
            va_off: off,
        });
        off += capacity as usize * psz;
    }
    Ok(out)
}

/// Free slot runs for a request (one run when contiguous).
fn find_slots(list: &List, req: &PageRequest) -> Result<Vec<(u32, u32)>, MemsegError> {
    let no_room = |largest: u32| MemsegError::NoRoom {
        list: list.name.clone(),
        asked: req.count,
        free: list.capacity - list.segs.count_used(),
        capacity: list.capacity,
        largest_run: largest,
    };
    let largest = || {
        list.segs
            .find_biggest_free(0)
            .ok()
            .flatten()
            .map_or(0, |(_, n)| n)
    };
    if req.count > list.capacity {
        return Err(no_room(largest()));
    }
    if req.contiguous {
        return match list.segs.find_next_n_free(0, req.count)? {
            Some(first) => Ok(vec![(first, req.count)]),
            None if !req.exact => {
                let big = largest();
                match list.segs.find_biggest_free(0)? {
                    Some((first, n)) if n > 0 => Ok(vec![(first, n.min(req.count))]),
                    _ => Err(no_room(big)),
                }
            }
            None => Err(no_room(largest())),
        };
    }
    let mut runs = Vec::new();
    let mut left = req.count;
    let mut start = 0;
    while left > 0 && start < list.capacity {
        let Some(first) = list.segs.find_next_free(start)? else {
            break;
        };
        let n = list.segs.find_contig_free(first)?.min(left);
        runs.push((first, n));
        left -= n;
        start = first + n;
    }
    if left > 0 && (req.exact || runs.is_empty()) {
        return Err(no_room(largest()));
    }
    Ok(runs)
}

/// Adds the likely cause to an [`MemsegError::OutOfPages`]: when the
/// node had enough free pages, a hugetlb cgroup limit stopped it.
fn explain_shortfall(e: MemsegError, req: &PageRequest) -> MemsegError {
    let MemsegError::OutOfPages {
        asked,
        page_size,
        detail,
    } = e
    else {
        return e;
    };
    let free = std::fs::read_to_string(format!(
        "/sys/devices/system/node/node{}/hugepages/{}/free_hugepages",
        req.node,
        req.page_size.sysfs_dir_name()
    ))
    .or_else(|_| {
        std::fs::read_to_string(format!(
            "/sys/kernel/mm/hugepages/{}/free_hugepages",
            req.page_size.sysfs_dir_name()
        ))
    })
    .ok()
    .and_then(|t| t.trim().parse::<u64>().ok());
    let mut detail = detail;
    if let Some(free) = free {
        let _ = write!(detail, "; {free} are free on node {}", req.node);
        if free >= u64::from(asked) {
            let limit = Discovery::new(SystemRoots::real())
                .discover()
                .ok()
                .and_then(|snap| snap.cgroup_limit(req.page_size).cloned());
            match limit {
                Some(l) => {
                    let _ = write!(
                        detail,
                        ", so the hugetlb cgroup limit stopped it: {} in {}{}",
                        format_size(l.limit.unwrap_or(0)),
                        l.source.display(),
                        l.usage
                            .map(|u| format!(" ({} in use)", format_size(u)))
                            .unwrap_or_default()
                    );
                }
                None => {
                    detail.push_str(", so a limit of this process (a hugetlb cgroup?) stopped it");
                }
            }
        }
    }
    MemsegError::OutOfPages {
        asked,
        page_size,
        detail,
    }
}

/// Joins adjacent reserved runs (page-at-a-time fallback) into runs.
fn merge_runs(mut runs: Vec<(u32, u32, Freshness)>) -> Vec<(u32, u32, Freshness)> {
    runs.sort_by_key(|r| r.0);
    let mut out: Vec<(u32, u32, Freshness)> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == r.0 && last.2 == r.2 => last.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// The first page slot in `first..=last` at which a contiguous run could
/// restart, or `None` when the pages are all mapped with IOVAs following
/// each other (`psz` apart). `iova(slot)` is `None` for an unmapped page.
/// An unmapped page or one without an IOVA breaks before the next slot; an
/// IOVA that does not follow its predecessor's breaks at its own slot.
fn contig_break(first: u32, last: u32, psz: u64, iova: impl Fn(u32) -> Option<u64>) -> Option<u32> {
    let mut prev: Option<u64> = None;
    for slot in first..=last {
        match iova(slot) {
            None | Some(BAD_IOVA) => return Some(slot + 1),
            Some(i) => {
                if prev.is_some_and(|p| i != p + psz) {
                    return Some(slot);
                }
                prev = Some(i);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {

    /// Where a run of pages stops being IOVA-contiguous, and where a
    /// contiguous run may start again.
    #[test]
    fn contig_break_names_the_page_a_contiguous_run_can_restart_at() {
        const P: u64 = 2 << 20;
        let pages = |v: Vec<Option<u64>>| move |s: u32| v[s as usize];
        // All following each other: no break.
        let f = pages(vec![Some(10 * P), Some(11 * P), Some(12 * P)]);
        assert_eq!(super::contig_break(0, 2, P, &f), None);
        // A jump at slot 2: a run can start at slot 2 itself.
        let f = pages(vec![Some(10 * P), Some(11 * P), Some(40 * P), Some(41 * P)]);
        assert_eq!(super::contig_break(0, 3, P, &f), Some(2));
        assert_eq!(super::contig_break(2, 3, P, &f), None);
        // An unmapped page or one without an IOVA: after it.
        let f = pages(vec![Some(10 * P), None, Some(12 * P)]);
        assert_eq!(super::contig_break(0, 2, P, &f), Some(2));
        let f = pages(vec![Some(BAD_IOVA), Some(11 * P)]);
        assert_eq!(super::contig_break(0, 1, P, &f), Some(1));
        // One page is always contiguous.
        assert_eq!(super::contig_break(1, 1, P, &f), None);
    }
    use super::*;

    /// What a secondary will do: map the config memfd (here at an address
    /// of the kernel's choosing), check the header, and attach the lists'
    /// fbarrays through offsets only.
    #[test]
    #[allow(clippy::cast_ptr_alignment)] // the view is page-aligned
    fn config_is_self_describing_through_its_descriptor() {
        let rt = tempfile::tempdir().unwrap();
        let opts = MemOptions::new()
            .file_prefix(format!("cfg_{}", std::process::id()))
            .runtime_dir(rt.path())
            .no_huge(true)
            .memory_size(1 << 20)
            .build()
            .unwrap();
        let mem = Memory::init(&opts).unwrap();
        let h = mem.config_header();
        assert_eq!(h.magic.load(Ordering::Acquire), CONFIG_MAGIC);
        assert_eq!(h.layout_version, LAYOUT_VERSION);
        assert_eq!(h.build_id, layout::build_id());
        assert_eq!(h.config_va, mem.config.as_ptr() as u64);
        assert_eq!(h.mem_va, mem.base_va() as u64);
        assert!(h.config_va >= h.mem_va && h.config_va + h.config_len <= h.mem_va + h.mem_len);
        assert_eq!(h.n_lists, 1);
        assert_eq!(h.flags & CFG_NO_HUGE, CFG_NO_HUGE);

        let len = h.config_len as usize;
        // SAFETY: a fresh read-only view of the memfd at a kernel-chosen
        // address; unmapped below.
        let view = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                mem.config_fd(),
                0,
            )
        }
        .unwrap()
        .cast::<u8>();
        // SAFETY: the view holds a complete config (magic checked below).
        let vh = unsafe { &*view.cast::<ConfigHeader>() };
        assert_eq!(vh.magic.load(Ordering::Acquire), CONFIG_MAGIC);
        let lists = vh.sections[SECTION_LISTS];
        // SAFETY: the section lies inside the view.
        let lh = unsafe { &*view.add(lists.offset as usize).cast::<ListHeader>() };
        assert_eq!(lh.page_size, 4096);
        assert_eq!(lh.base_va, mem.lists()[0].base_va as u64);
        // SAFETY: the fbarray region lies inside the view.
        let fb =
            unsafe { FbArray::attach(view.add(lh.fbarray_off as usize), lh.fbarray_len as usize) }
                .unwrap();
        assert_eq!(
            fb.count_used(),
            256,
            "1 MiB of 4 KiB pages, seen through the other view"
        );
        let seg = fb.get_ptr::<Memseg>(0).unwrap();
        // SAFETY: a plain-data element inside the view.
        let seg = unsafe { seg.as_ptr().read() };
        assert_eq!(seg.va, lh.base_va);
        assert_eq!(seg.flags & MEMSEG_DO_NOT_FREE, MEMSEG_DO_NOT_FREE);
        // SAFETY: our own view, unused from here on.
        unsafe { rustix::mm::munmap(view.cast(), len) }.unwrap();
    }

    #[test]
    fn list_plan_sizes_lists_from_limits_and_node_memory() {
        let topo = Topology::discover(&SystemRoots::real()).unwrap();
        let plan = Plan {
            usable_sizes: vec![PageSize::SIZE_2M, PageSize::SIZE_1G],
            ..Plan::default()
        };
        let opts = MemOptions::new().socket_limit([3 << 30]).build().unwrap();
        let lists = plan_lists(&opts, &plan, &topo).unwrap();
        let node0: Vec<_> = lists.iter().filter(|l| l.node == 0).collect();
        assert_eq!(node0[0].page_size, PageSize::SIZE_1G, "largest first");
        assert_eq!(node0[0].capacity, 3);
        assert_eq!(node0[1].capacity, 1536);
        for l in &lists {
            assert_eq!(l.va_off % l.page_size.bytes() as usize, 0);
        }
        let opts = MemOptions::new().max_memseg_lists(1).build().unwrap();
        let e = plan_lists(&opts, &plan, &topo).unwrap_err();
        assert!(e.to_string().contains("--max-memseg-lists"), "{e}");
    }
}
