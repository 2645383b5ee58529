//! Multi-process: secondaries attach to a primary's instance and stay in
//! sync with its memory map.
//!
//! - **Attach.** A secondary binds its own socket in the runtime
//!   directory and sends `mp_attach` to the primary with its build
//!   identity and the options that must agree. The primary answers with
//!   the shared config's and every memseg list's descriptor (`SCM_RIGHTS`:
//!   no paths, no shared mount namespace needed). The secondary reserves
//!   the same address range with `MAP_FIXED_NOREPLACE`, maps the config and
//!   every used page at the same addresses, and from then on uses the heaps
//!   and memzones in shared memory directly.
//! - **Sync.** Pages are only ever mapped or unmapped by the primary,
//!   holding the hotplug lock for writing. After recording a change (list
//!   `version` bumped) it sends `mp_sync` to every secondary and waits for
//!   the answers before it lets go of the lock: each secondary maps or
//!   unmaps exactly the slots whose state changed, firing its own memory
//!   events (ALLOC after mapping, FREE before unmapping). Freed pages go
//!   back to the kernel only after every secondary unmapped them.
//! - **Secondaries ask.** A secondary that needs pages (heap growth) or
//!   gives them back sends `mp_pages` to the primary, which does the work,
//!   syncs everybody (the asker included) and answers.
//!
//! Failure handling: a secondary that cannot be reached (dead) is skipped;
//! one that answers with an error or not at all makes an allocation roll
//! back; a dead primary makes a secondary's next page request fail with
//! [`MpError::PrimaryGone`].

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ipc::{Endpoint, Incoming, IpcError, Message};

/// A secondary asks to attach.
pub(crate) const ATTACH: &str = "mp_attach";
/// A secondary says goodbye (one-way).
pub(crate) const DETACH: &str = "mp_detach";
/// A secondary asks for pages or gives pages back.
pub(crate) const PAGES: &str = "mp_pages";
/// The primary tells secondaries to resync their memory map.
pub(crate) const SYNC: &str = "mp_sync";

/// How long a page request or a sync may take (DPDK's 5 s).
pub const MP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a multi-process operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MpError {
    /// No primary listens for this prefix.
    #[error("no primary process is running with file prefix '{prefix}' (no socket at {socket}); start the primary first, or use --proc-type auto")]
    NoPrimary {
        /// The file prefix.
        prefix: String,
        /// The socket tried.
        socket: PathBuf,
    },
    /// The primary and this process cannot share memory.
    #[error("cannot attach to the primary (pid {primary_pid}) of prefix '{prefix}': {why}")]
    Refused {
        /// The file prefix.
        prefix: String,
        /// The primary's pid.
        primary_pid: u32,
        /// What differs, naming both sides.
        why: String,
    },
    /// The primary's address range is taken in this process.
    #[error("cannot map the primary's memory at {base:#x} (+{len:#x}) in this process: the range is taken by {conflict}; restart the primary with --base-virtaddr={suggest:#x} (free here), or start this process before whatever mapped that range")]
    VaConflict {
        /// Start of the primary's reservation.
        base: usize,
        /// Its length.
        len: usize,
        /// The mapping in the way (from `/proc/self/maps`).
        conflict: String,
        /// A base that is free in this process.
        suggest: usize,
    },
    /// The primary died or stopped answering.
    #[error("the primary (pid {pid}) is gone or not answering: {why}")]
    PrimaryGone {
        /// Its pid.
        pid: u32,
        /// What happened.
        why: String,
    },
    /// The primary refused or failed a page request.
    #[error("the primary could not {op}: {why}")]
    Remote {
        /// The request.
        op: &'static str,
        /// The primary's reason.
        why: String,
    },
    /// Secondaries did not all follow a memory map change.
    #[error("memory sync with secondaries failed: {why}")]
    SyncFailed {
        /// Who failed and how.
        why: String,
    },
    /// A malformed message from a peer.
    #[error("malformed {what} message: {why}")]
    Protocol {
        /// The message.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// What a secondary says when it asks to attach.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub build_id: String,
    pub layout_version: u32,
    pub pid: u32,
    pub no_huge: bool,
    pub legacy_mem: bool,
    pub single_file_segments: bool,
}

/// The primary's answer to [`Hello`]; the descriptors travel with it:
/// the config first, then one per list in `lists` order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Welcome {
    pub error: Option<String>,
    pub primary_pid: u32,
    pub config_va: u64,
    pub config_len: u64,
    pub mem_va: u64,
    pub mem_len: u64,
    pub lists: Vec<u32>,
}

/// A secondary's page request.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum PagesOp {
    Alloc {
        node: u32,
        page_size: u64,
        count: u32,
        contiguous: bool,
        exact: bool,
        heap: bool,
    },
    Free {
        addr: u64,
        len: u64,
        heap: bool,
    },
}

/// One run of pages, on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct RunWire {
    pub list: u32,
    pub first: u32,
    pub count: u32,
    pub va: u64,
    pub len: u64,
    pub page_size: u64,
    pub node: u32,
    pub zeroed: bool,
}

/// The answer to a page request.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PagesReply {
    pub error: Option<String>,
    pub runs: Vec<RunWire>,
}

/// A secondary's answer to a sync.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SyncReply {
    pub error: Option<String>,
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    bytes: &'a [u8],
) -> Result<T, MpError> {
    serde_json::from_slice(bytes).map_err(|e| MpError::Protocol {
        what,
        why: e.to_string(),
    })
}

/// A secondary's view of one list: which slots it has mapped.
#[derive(Debug)]
pub(crate) struct MappedSlots {
    /// One bit per slot.
    pub bits: Mutex<Vec<u64>>,
    /// The list version last synced.
    pub version: AtomicU64,
}

impl MappedSlots {
    pub(crate) fn new(capacity: u32) -> MappedSlots {
        MappedSlots {
            bits: Mutex::new(vec![0; (capacity as usize).div_ceil(64)]),
            version: AtomicU64::new(u64::MAX),
        }
    }
}

/// Whether slot `i` is set in `bits`.
pub(crate) fn bit(bits: &[u64], i: u32) -> bool {
    bits[i as usize / 64] & (1 << (i % 64)) != 0
}

/// Sets or clears slot `i`.
pub(crate) fn set_bit(bits: &mut [u64], i: u32, on: bool) {
    let w = &mut bits[i as usize / 64];
    if on {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

/// What a secondary keeps about its primary.
#[derive(Debug)]
pub(crate) struct SecondaryState {
    pub primary_socket: PathBuf,
    pub primary_pid: u32,
    /// Per list, in list order.
    pub mapped: Vec<MappedSlots>,
}

/// The instance's multi-process state.
#[derive(Debug, Default)]
pub(crate) struct MpState {
    /// The IPC endpoint (none with `--in-memory`/`--no-shconf`).
    pub endpoint: OnceLock<Endpoint>,
    /// Set in a secondary.
    pub secondary: Option<SecondaryState>,
    /// Primary: sockets of the secondaries that attached.
    pub attached: Mutex<HashSet<PathBuf>>,
    /// Serializes syncs in a secondary (handler and self-resync).
    pub sync_lock: Mutex<()>,
    /// A secondary's stand-in for the shared hotplug lock: walks read,
    /// resyncs write.
    pub local_hotplug: std::sync::RwLock<()>,
}

impl MpState {
    /// A primary's state (endpoint started later).
    pub(crate) fn primary() -> MpState {
        MpState::default()
    }

    /// A secondary's state around an endpoint that is already bound.
    pub(crate) fn secondary(endpoint: Endpoint, state: SecondaryState) -> MpState {
        let s = MpState {
            secondary: Some(state),
            ..MpState::default()
        };
        let _ = s.endpoint.set(endpoint);
        s
    }

    pub(crate) fn is_secondary(&self) -> bool {
        self.secondary.is_some()
    }

    /// Closes the endpoint: threads stop, pending requests fail.
    pub(crate) fn stop(&self) {
        if let Some(ep) = self.endpoint.get() {
            if let Some(s) = &self.secondary {
                let _ = ep.send(&s.primary_socket, Message::new(DETACH, Vec::new()));
            }
            ep.close();
        }
    }

    /// Secondaries that attached and have not said goodbye.
    pub(crate) fn has_secondaries(&self) -> bool {
        self.attached.lock().is_ok_and(|a| !a.is_empty())
    }
}

/// Runs `f` on the instance behind `weak` if it is still alive.
pub(crate) fn with_instance(weak: &Weak<crate::Instance>, f: impl FnOnce(&crate::Instance)) {
    if let Some(inst) = weak.upgrade() {
        f(&inst);
    }
}

/// Answers a request with a JSON body, logging a failure to send.
pub(crate) fn answer<T: Serialize>(req: Incoming, body: &T, fds: Vec<OwnedFd>) {
    let name = req.name().to_string();
    if let Err(e) = req.reply(Message::with_fds(name.clone(), encode(body), fds)) {
        tracing::warn!(action = %name, error = %e, "cannot answer a multi-process request");
    }
}

/// Whether an IPC failure means the peer is simply gone or not ready
/// (skipped by a sync) rather than failing.
pub(crate) fn peer_absent(e: &IpcError) -> bool {
    matches!(e, IpcError::NoPeer { .. } | IpcError::NoHandler { .. })
}

/// Registers the handlers of a primary on its endpoint.
pub(crate) fn serve_primary(ep: &Endpoint, inst: &Arc<crate::Instance>) -> Result<(), IpcError> {
    let weak = Arc::downgrade(inst);
    ep.register_action(ATTACH, move |req| {
        let w = weak.clone();
        with_instance(&w, |inst| inst.mp_handle_attach(req));
    })?;
    let weak = Arc::downgrade(inst);
    ep.register_action(PAGES, move |req| {
        with_instance(&weak, |inst| inst.mp_handle_pages(req));
    })?;
    let weak = Arc::downgrade(inst);
    ep.register_action(DETACH, move |req| {
        with_instance(&weak, |inst| {
            if let Ok(mut a) = inst.mp.attached.lock() {
                a.remove(&req.peer.path);
            }
            tracing::info!(pid = req.peer.pid, "secondary detached");
        });
    })?;
    Ok(())
}

/// Registers the sync handler of a secondary.
pub(crate) fn serve_secondary(ep: &Endpoint, inst: &Arc<crate::Instance>) -> Result<(), IpcError> {
    let weak = Arc::downgrade(inst);
    ep.register_action(SYNC, move |req| {
        let mut reply = SyncReply::default();
        with_instance(&weak, |inst| {
            // The primary holds the hotplug lock for writing while it waits
            // for this answer: read the lists without taking it.
            if let Err(e) = inst.mp_resync(false) {
                reply.error = Some(e.to_string());
            }
        });
        answer(req, &reply, Vec::new());
    })
}

/// A base address at or above `from`, aligned to 1 GiB, where `len` bytes
/// are free in this process.
pub(crate) fn free_base(from: usize, len: usize) -> usize {
    const ALIGN: usize = 1 << 30;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut ranges: Vec<(usize, usize)> = maps
        .lines()
        .filter_map(|l| {
            let r = l.split_whitespace().next()?;
            let (a, b) = r.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    ranges.sort_unstable();
    let mut base = from.next_multiple_of(ALIGN);
    for &(a, b) in &ranges {
        if b <= base {
            continue;
        }
        if a >= base.saturating_add(len) {
            break;
        }
        base = b.next_multiple_of(ALIGN);
    }
    base
}

/// The socket of the primary of `dir`.
pub(crate) fn primary_socket(dir: &Path) -> PathBuf {
    Endpoint::primary_path(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_messages() {
        let mut b = vec![0u64; 2];
        set_bit(&mut b, 70, true);
        assert!(bit(&b, 70) && !bit(&b, 69));
        set_bit(&mut b, 70, false);
        assert!(!bit(&b, 70));
        let op = PagesOp::Alloc {
            node: 0,
            page_size: 2 << 20,
            count: 3,
            contiguous: true,
            exact: true,
            heap: true,
        };
        let back: PagesOp = decode("pages", &encode(&op)).unwrap();
        assert!(matches!(back, PagesOp::Alloc { count: 3, .. }));
        assert!(decode::<PagesOp>("pages", b"{nonsense").is_err());
    }

    #[test]
    fn free_base_skips_this_process_mappings() {
        let stack_var = 0u8;
        let here = std::ptr::addr_of!(stack_var) as usize;
        let base = free_base(here & !((1 << 30) - 1), 1 << 30);
        assert!(base > here, "{base:#x} vs {here:#x}");
        assert_eq!(base % (1 << 30), 0);
    }
}
