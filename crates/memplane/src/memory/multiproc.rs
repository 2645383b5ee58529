//! The instance's side of multi-process ([`crate::mp`] has the protocol):
//! a primary's handlers (attach, page requests, syncing secondaries) and a
//! secondary's attach and resync.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Instance, List};
use crate::fbarray::FbArray;
use crate::hugepages::SystemRoots;
use crate::ipc::{Endpoint, Incoming, IpcError, Message, MAX_FDS};
use crate::memseg::events::{MemEvent, MemEventKind};
use crate::memseg::layout::{
    self, name_str, ConfigHeader, ListHeader, CFG_IOVA_PA, CFG_LEGACY, CFG_NO_HUGE,
    CFG_SINGLE_FILE, CONFIG_MAGIC, LAYOUT_VERSION, MEMSEG_HEAP, SECTION_EXTMEM, SECTION_HEAPS,
    SECTION_LISTS, SECTION_MEMZONES, SECTION_TCACHE,
};
use crate::memseg::store::{BackingKind, Extent, Freshness, PageStore};
use crate::memseg::{MemsegError, PageRequest, PageRun};
use crate::mp::{
    self, answer, bit, decode, encode, peer_absent, set_bit, Hello, MappedSlots, MpError, MpState,
    PagesOp, PagesReply, RunWire, SecondaryState, SyncReply, Welcome, ATTACH, MP_TIMEOUT, PAGES,
    SYNC,
};
use crate::options::{IovaMode, MemOptions};
use crate::runtime_dir::RuntimeDir;
use crate::shm::vaspace::{VaError, VaReservation, DEFAULT_BASE_VA};
use crate::units::PageSize;
use crate::{Error, Result};

/// A secondary's page store: the primary's descriptor of the list. Pages
/// are only mapped from it; reserving and releasing is the primary's job.
#[derive(Debug)]
struct RemoteStore {
    fd: OwnedFd,
    page_size: u64,
    kind: BackingKind,
}

impl PageStore for RemoteStore {
    fn kind(&self) -> BackingKind {
        self.kind
    }

    fn reserve(&self, _first: u32, _count: u32) -> Result<Freshness, MemsegError> {
        Err(MemsegError::Secondary {
            what: "reserving pages",
        })
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

    fn release(&self, _first: u32, _count: u32) -> Result<(), MemsegError> {
        Err(MemsegError::Secondary {
            what: "releasing pages",
        })
    }
}

impl Instance {
    /// Starts the endpoint of a primary (when the config is shared) or the
    /// sync handler of a secondary, then a secondary catches up with any
    /// change made while it attached.
    pub(super) fn start_ipc_impl(&self, me: &Arc<Instance>) -> Result<()> {
        if self.mp.is_secondary() {
            if let Some(ep) = self.mp.endpoint.get() {
                mp::serve_secondary(ep, me)?;
            }
            return self.mp_resync(true);
        }
        let Some((dir, _)) = &self.primary else {
            return Ok(());
        };
        let ep = Endpoint::bind_primary(dir.path())?;
        mp::serve_primary(&ep, me)?;
        let _ = self.mp.endpoint.set(ep);
        Ok(())
    }

    /// Whether this instance is a secondary.
    pub fn is_secondary(&self) -> bool {
        self.mp.is_secondary()
    }

    // --- primary -------------------------------------------------------------

    /// `mp_attach`: checks the secondary's hello and sends the descriptors.
    pub(crate) fn mp_handle_attach(&self, req: Incoming) {
        let h = self.config_header();
        let mut w = Welcome {
            primary_pid: std::process::id(),
            config_va: h.config_va,
            config_len: h.config_len,
            mem_va: h.mem_va,
            mem_len: h.mem_len,
            ..Welcome::default()
        };
        let fds = match decode::<Hello>("attach", &req.msg.payload)
            .map_err(|e| e.to_string())
            .and_then(|hello| self.check_hello(&hello))
            .and_then(|()| self.attach_fds(&mut w))
        {
            Ok(fds) => fds,
            Err(why) => {
                tracing::warn!(pid = req.peer.pid, %why, "secondary refused");
                w.error = Some(why);
                Vec::new()
            }
        };
        if w.error.is_none() {
            if let Ok(mut a) = self.mp.attached.lock() {
                a.insert(req.peer.path.clone());
            }
            tracing::info!(pid = req.peer.pid, "secondary attached");
        }
        answer(req, &w, fds);
    }

    /// Whether a secondary built and configured like `hello` can share
    /// this instance; the reason names both sides.
    fn check_hello(&self, hello: &Hello) -> std::result::Result<(), String> {
        let ours = name_str(&layout::build_id()).to_string();
        if hello.build_id != ours || hello.layout_version != LAYOUT_VERSION {
            return Err(format!(
                "the secondary is built as \"{}\" (layout {}), the primary as \"{ours}\" (layout {LAYOUT_VERSION}); build both from the same memplane version",
                hello.build_id, hello.layout_version
            ));
        }
        let flags = self.config_header().flags;
        for (theirs, bit, opt) in [
            (hello.no_huge, CFG_NO_HUGE, "--no-huge"),
            (hello.legacy_mem, CFG_LEGACY, "--legacy-mem"),
            (
                hello.single_file_segments,
                CFG_SINGLE_FILE,
                "--single-file-segments",
            ),
        ] {
            if theirs && flags & bit == 0 {
                return Err(format!(
                    "the secondary asks for {opt} but the primary runs without it; drop {opt} from the secondary (it follows the primary)"
                ));
            }
        }
        Ok(())
    }

    /// The config's and every list's descriptor, recording the lists in
    /// `w`.
    fn attach_fds(&self, w: &mut Welcome) -> std::result::Result<Vec<OwnedFd>, String> {
        let mut fds = Vec::with_capacity(self.lists.len() + 1);
        fds.push(
            self.config_fd
                .try_clone()
                .map_err(|e| format!("cannot duplicate the config descriptor: {e}"))?,
        );
        for list in &self.lists {
            if list.store.kind() == BackingKind::HugetlbfsFilePerPage {
                return Err(format!(
                    "list {} is backed by one hugetlbfs file per page; secondaries attach to the default memfd backing or to --single-file-segments",
                    list.name
                ));
            }
            let mut fd = None;
            list.store
                .extents(0, 1, &mut |ext| {
                    fd = Some(ext.fd.try_clone_to_owned());
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
            let fd = fd
                .ok_or_else(|| format!("list {} has no descriptor", list.name))?
                .map_err(|e| format!("cannot duplicate the descriptor of {}: {e}", list.name))?;
            fds.push(fd);
            w.lists.push(list.index);
        }
        if fds.len() > MAX_FDS {
            return Err(format!(
                "{} descriptors do not fit one message ({MAX_FDS} at most); use fewer memseg lists (--max-memseg-lists)",
                fds.len()
            ));
        }
        Ok(fds)
    }

    /// `mp_pages`: a secondary's page request, done here and synced.
    pub(crate) fn mp_handle_pages(&self, req: Incoming) {
        let attached = self
            .mp
            .attached
            .lock()
            .is_ok_and(|a| a.contains(&req.peer.path));
        if !attached {
            tracing::warn!(
                pid = req.peer.pid,
                "page request from a process that did not attach: refused"
            );
            let reply = PagesReply {
                error: Some("this process did not attach as a secondary (mp_attach)".into()),
                runs: Vec::new(),
            };
            answer(req, &reply, Vec::new());
            return;
        }
        let r: std::result::Result<Vec<RunWire>, String> =
            match decode::<PagesOp>("pages", &req.msg.payload) {
                Err(e) => Err(e.to_string()),
                Ok(PagesOp::Alloc {
                    node,
                    page_size,
                    count,
                    contiguous,
                    exact,
                    heap,
                }) => match PageSize::new(page_size) {
                    None => Err(format!("{page_size} is not a page size")),
                    Some(ps) => {
                        let preq = PageRequest {
                            node,
                            page_size: ps,
                            count,
                            contiguous,
                            exact,
                        };
                        let flags = if heap { MEMSEG_HEAP } else { 0 };
                        let fixed = self.fixed;
                        match fixed {
                            Some(mode) => Err(MemsegError::FixedMemory {
                                what: "allocating pages at run time",
                                mode,
                            }
                            .to_string()),
                            None => self
                                .alloc_inner(&preq, flags)
                                .map(|runs| runs.iter().map(run_to_wire).collect())
                                .map_err(|e| e.to_string()),
                        }
                    }
                },
                Ok(PagesOp::Free { addr, len, heap }) => self
                    .free_pages_inner(addr as usize, len as usize, heap)
                    .map(|()| Vec::new())
                    .map_err(|e| e.to_string()),
            };
        let reply = match r {
            Ok(runs) => PagesReply { error: None, runs },
            Err(why) => PagesReply {
                error: Some(why),
                runs: Vec::new(),
            },
        };
        answer(req, &reply, Vec::new());
    }

    /// Tells every attached secondary to resync and waits for them. Called
    /// with the hotplug lock held for writing. Absent peers are skipped.
    pub(super) fn mp_sync_all(&self) -> std::result::Result<(), MpError> {
        if self.mp.is_secondary() || !self.mp.has_secondaries() {
            return Ok(());
        }
        let Some(ep) = self.mp.endpoint.get() else {
            return Ok(());
        };
        let mut failed = Vec::new();
        for (peer, r) in ep.request_all(Message::new(SYNC, Vec::new()), MP_TIMEOUT) {
            match r {
                Ok(m) => match decode::<SyncReply>("sync reply", &m.payload) {
                    Ok(SyncReply { error: None }) => {}
                    Ok(SyncReply { error: Some(e) }) => {
                        failed.push(format!("{}: {e}", peer.display()));
                    }
                    Err(e) => failed.push(format!("{}: {e}", peer.display())),
                },
                Err(e) if peer_absent(&e) => {
                    if matches!(e, IpcError::NoPeer { .. }) {
                        if let Ok(mut a) = self.mp.attached.lock() {
                            if a.remove(&peer) {
                                tracing::warn!(peer = %peer.display(), "secondary gone without detaching");
                            }
                        }
                    }
                }
                Err(e) => failed.push(format!("{}: {e}", peer.display())),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(MpError::SyncFailed {
                why: failed.join("; "),
            })
        }
    }

    // --- secondary -----------------------------------------------------------

    /// Attaches to the live primary of `opts.file_prefix`.
    pub(super) fn attach(opts: &MemOptions, roots: &SystemRoots) -> Result<Instance> {
        let dir = RuntimeDir::resolve(&opts.file_prefix, opts.runtime_dir.as_deref())?;
        let socket = mp::primary_socket(&dir);
        let no_primary = || MpError::NoPrimary {
            prefix: opts.file_prefix.clone(),
            socket: socket.clone(),
        };
        if !dir.is_dir() {
            return Err(no_primary().into());
        }
        let ep = Endpoint::bind_secondary(&dir)?;
        let hello = Hello {
            build_id: name_str(&layout::build_id()).to_string(),
            layout_version: LAYOUT_VERSION,
            pid: std::process::id(),
            no_huge: opts.no_huge,
            legacy_mem: opts.legacy_mem,
            single_file_segments: opts.single_file_segments,
        };
        let reply = match ep.request(&socket, Message::new(ATTACH, encode(&hello)), MP_TIMEOUT) {
            Ok(r) => r,
            Err(IpcError::NoPeer { .. }) => return Err(no_primary().into()),
            Err(e) => return Err(e.into()),
        };
        let w: Welcome = decode("attach reply", &reply.payload)?;
        if let Some(why) = w.error {
            return Err(MpError::Refused {
                prefix: opts.file_prefix.clone(),
                primary_pid: w.primary_pid,
                why,
            }
            .into());
        }
        let mut fds = reply.fds.into_iter();
        let config_fd = fds.next().ok_or_else(|| MpError::Protocol {
            what: "attach reply",
            why: "no config descriptor".into(),
        })?;
        let list_fds: Vec<OwnedFd> = fds.collect();
        if list_fds.len() != w.lists.len() {
            return Err(MpError::Protocol {
                what: "attach reply",
                why: format!(
                    "{} list descriptors for {} lists",
                    list_fds.len(),
                    w.lists.len()
                ),
            }
            .into());
        }
        let (base, len) = (w.mem_va as usize, w.mem_len as usize);
        let reservation = VaReservation::reserve_at(base, len).map_err(|e| match e {
            VaError::Taken { conflict, .. } => Error::from(MpError::VaConflict {
                base,
                len,
                conflict,
                suggest: mp::free_base(DEFAULT_BASE_VA, len),
            }),
            other => Error::from(MemsegError::from(other)),
        })?;
        let config_off = (w.config_va - w.mem_va) as usize;
        // SAFETY: the config range lies in our fresh reservation, which
        // nobody else uses.
        let config_ptr = unsafe {
            reservation.map_shared(
                config_off,
                w.config_len as usize,
                config_fd.as_fd(),
                0,
                false,
            )
        }
        .map_err(MemsegError::from)?;
        #[allow(clippy::cast_ptr_alignment)] // page-aligned mapping
        let config = NonNull::new(config_ptr.cast::<ConfigHeader>())
            .ok_or_else(|| Error::System("config mapped at address 0".into()))?;
        // SAFETY: the mapping holds a complete config (the primary answers
        // only after setting the magic, checked next).
        let h = unsafe { config.as_ref() };
        if h.magic.load(Ordering::Acquire) != CONFIG_MAGIC
            || h.layout_version != LAYOUT_VERSION
            || h.header_size as usize != std::mem::size_of::<ConfigHeader>()
            || h.config_va != w.config_va
        {
            return Err(MpError::Protocol {
                what: "shared config",
                why: "bad magic, layout or address".into(),
            }
            .into());
        }
        let lists = attach_lists(h, config_ptr, w.mem_va, list_fds)?;
        let sec = |i: usize| h.sections[i];
        // SAFETY: the sections lie inside the config mapping, laid out by
        // the primary; the mapping lives as long as the instance.
        let heap = unsafe {
            crate::heap::Heaps::attach(
                config_ptr.add(sec(SECTION_HEAPS).offset as usize),
                (sec(SECTION_HEAPS).len as usize / crate::heap::HEAP_HEADER_SIZE) as u32,
                config_ptr.add(sec(SECTION_EXTMEM).offset as usize),
                (sec(SECTION_EXTMEM).len as usize / crate::heap::EXTMEM_ENTRY_SIZE) as u32,
                config_ptr.add(sec(SECTION_TCACHE).offset as usize),
            )
        };
        // SAFETY: as above, the memzone section.
        let zones = unsafe {
            crate::memzone::ZoneTable::attach(config_ptr.add(sec(SECTION_MEMZONES).offset as usize))
        };
        let topology =
            crate::numa::Topology::discover(roots).map_err(|e| Error::System(e.to_string()))?;
        let iova_mode = if h.flags & CFG_IOVA_PA != 0 {
            IovaMode::Pa
        } else {
            IovaMode::Va
        };
        let fixed = if h.flags & CFG_NO_HUGE != 0 {
            Some("--no-huge")
        } else if h.flags & CFG_LEGACY != 0 {
            Some("--legacy-mem")
        } else {
            None
        };
        let mapped = lists.iter().map(|l| MappedSlots::new(l.capacity)).collect();
        let inst = Instance {
            lists,
            heap,
            zones,
            registry: std::sync::RwLock::new(crate::memseg::events::Registry::default()),
            config,
            config_fd,
            reservation,
            topology,
            pagemap: None,
            iova_mode,
            socket_limits: Vec::new(),
            fixed,
            opts: opts.clone(),
            plan: crate::preflight::Plan::default(),
            primary: None,
            mp: MpState::secondary(
                ep,
                SecondaryState {
                    primary_socket: socket,
                    primary_pid: w.primary_pid,
                    mapped,
                },
            ),
        };
        inst.heap.set_page_map(inst.heap_page_map());
        inst.mp_resync(true)?;
        tracing::info!(
            prefix = %opts.file_prefix,
            primary = w.primary_pid,
            lists = inst.lists.len(),
            "attached to the primary"
        );
        Ok(inst)
    }

    /// Asks the primary for pages (or to free some) and catches up.
    pub(super) fn mp_request_pages(&self, op: &PagesOp) -> Result<Vec<PageRun>> {
        let Some(s) = &self.mp.secondary else {
            return Err(Error::System("not a secondary".into()));
        };
        let ep = self.mp.endpoint.get().ok_or(IpcError::Closed)?;
        let what = match op {
            PagesOp::Alloc { .. } => "allocate pages",
            PagesOp::Free { .. } => "free pages",
        };
        let reply = ep
            .request(
                &s.primary_socket,
                Message::new(PAGES, encode(&op)),
                MP_TIMEOUT,
            )
            .map_err(|e| MpError::PrimaryGone {
                pid: s.primary_pid,
                why: e.to_string(),
            })?;
        let r: PagesReply = decode("pages reply", &reply.payload)?;
        if let Some(why) = r.error {
            return Err(MpError::Remote { op: what, why }.into());
        }
        // The primary synced us before answering; make sure anyway.
        self.mp_resync(true)?;
        r.runs
            .iter()
            .map(|w| {
                Ok(PageRun {
                    list: w.list,
                    first: w.first,
                    count: w.count,
                    va: w.va as usize,
                    len: w.len as usize,
                    page_size: PageSize::new(w.page_size).ok_or(MpError::Protocol {
                        what: "pages reply",
                        why: "bad page size".into(),
                    })?,
                    node: w.node,
                    zeroed: w.zeroed,
                })
            })
            .collect()
    }

    /// Maps and unmaps whatever changed in the primary's lists since the
    /// last sync, firing this process's memory events. With `take_lock`,
    /// under the hotplug read lock; without, the caller (the primary,
    /// waiting for this sync) holds it for writing.
    pub(crate) fn mp_resync(&self, take_lock: bool) -> Result<()> {
        let Some(s) = &self.mp.secondary else {
            return Ok(());
        };
        let _serial = self
            .mp
            .sync_lock
            .lock()
            .map_err(|_| Error::System("sync lock poisoned".into()))?;
        // Walks in this process wait while mappings change. (The primary
        // holds the shared lock for writing whenever the lists change; a
        // self-resync reads the lists without it: a slot the primary is
        // changing right now is fixed by the sync that follows.)
        let _local = self
            .mp
            .local_hotplug
            .write()
            .map_err(|_| Error::System("local hotplug lock poisoned".into()))?;
        let _ = take_lock;
        for (list, m) in self.lists.iter().zip(&s.mapped) {
            let v = list.header().version.load(Ordering::Acquire);
            if m.version.load(Ordering::Relaxed) == v {
                continue;
            }
            let mut bits = m
                .bits
                .lock()
                .map_err(|_| Error::System("mapped-slots lock poisoned".into()))?;
            let (to_map, to_unmap) = diff_runs(list, &bits);
            let psz = list.page_size.bytes() as usize;
            let event = |kind, first: u32, count: u32| MemEvent {
                kind,
                addr: list.slot_va(first),
                len: count as usize * psz,
                page_size: list.page_size,
                node: list.node,
            };
            for &(first, count) in &to_unmap {
                self.fire(&[event(MemEventKind::Free, first, count)]);
                // SAFETY: the primary freed these pages; nobody may use
                // them any more (same contract as in the primary).
                unsafe {
                    self.reservation
                        .unmap(list.va_off + first as usize * psz, count as usize * psz)
                }
                .map_err(MemsegError::from)?;
                for slot in first..first + count {
                    set_bit(&mut bits, slot, false);
                }
            }
            for &(first, count) in &to_map {
                list.store.extents(first, count, &mut |ext| {
                    // SAFETY: the slots are unused in this process (not in
                    // `bits`), so nothing of ours lives there.
                    unsafe {
                        self.reservation.map_shared(
                            list.va_off + ext.first as usize * psz,
                            ext.count as usize * psz,
                            ext.fd,
                            ext.file_offset,
                            false,
                        )
                    }?;
                    Ok(())
                })?;
                for slot in first..first + count {
                    set_bit(&mut bits, slot, true);
                }
                self.fire(&[event(MemEventKind::Alloc, first, count)]);
            }
            m.version.store(v, Ordering::Relaxed);
            if !to_map.is_empty() || !to_unmap.is_empty() {
                tracing::debug!(list = %list.name, mapped = to_map.len(), unmapped = to_unmap.len(), "resynced with the primary");
            }
        }
        Ok(())
    }
}

fn run_to_wire(r: &PageRun) -> RunWire {
    RunWire {
        list: r.list,
        first: r.first,
        count: r.count,
        va: r.va as u64,
        len: r.len as u64,
        page_size: r.page_size.bytes(),
        node: r.node,
        zeroed: r.zeroed,
    }
}

/// Runs of slots used in the list but not mapped here, and mapped here but
/// no longer used.
/// Runs of slots: (first, count).
type Runs = Vec<(u32, u32)>;

fn diff_runs(list: &List, bits: &[u64]) -> (Runs, Runs) {
    let mut to_map: Vec<(u32, u32)> = Vec::new();
    let mut to_unmap: Vec<(u32, u32)> = Vec::new();
    let push = |runs: &mut Vec<(u32, u32)>, slot: u32| match runs.last_mut() {
        Some((first, count)) if *first + *count == slot => *count += 1,
        _ => runs.push((slot, 1)),
    };
    for slot in 0..list.capacity {
        let used = list.segs.is_used(slot).unwrap_or(false);
        let here = bit(bits, slot);
        if used && !here {
            push(&mut to_map, slot);
        } else if !used && here {
            push(&mut to_unmap, slot);
        }
    }
    (to_map, to_unmap)
}

/// The primary's lists, as views into the config plus its descriptors.
fn attach_lists(
    h: &ConfigHeader,
    config_ptr: *mut u8,
    mem_va: u64,
    fds: Vec<OwnedFd>,
) -> Result<Vec<List>> {
    let table = h.sections[SECTION_LISTS];
    let mut lists = Vec::with_capacity(fds.len());
    for (i, fd) in fds.into_iter().enumerate() {
        #[allow(clippy::cast_ptr_alignment)] // the table is 64-byte aligned
        // SAFETY: i < n_lists <= max_lists entries of the list table,
        // inside the config mapping.
        let header = unsafe {
            NonNull::new_unchecked(
                config_ptr
                    .add(table.offset as usize + i * std::mem::size_of::<ListHeader>())
                    .cast::<ListHeader>(),
            )
        };
        // SAFETY: as above; the header is complete (the primary wrote it
        // before setting the magic).
        let lh = unsafe { header.as_ref() };
        // SAFETY: the fbarray region lies inside the config mapping, which
        // lives as long as the lists (both owned by the instance).
        let segs = unsafe {
            FbArray::attach_lock_free(
                config_ptr.add(lh.fbarray_off as usize),
                lh.fbarray_len as usize,
            )
        }?;
        let page_size = PageSize::new(lh.page_size).ok_or_else(|| MpError::Protocol {
            what: "list header",
            why: format!("page size {}", lh.page_size),
        })?;
        let kind = BackingKind::from_u32(lh.backing).ok_or_else(|| MpError::Protocol {
            what: "list header",
            why: format!("backing {}", lh.backing),
        })?;
        lists.push(List {
            header,
            segs,
            store: Box::new(RemoteStore {
                fd,
                page_size: lh.page_size,
                kind,
            }),
            index: lh.index,
            name: name_str(&lh.name).to_string(),
            node: lh.node,
            page_size,
            va_off: (lh.base_va - mem_va) as usize,
            base_va: lh.base_va as usize,
            capacity: lh.capacity,
        });
    }
    Ok(lists)
}
