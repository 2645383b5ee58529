//! Page stores backed by files in a hugetlbfs mount (`--huge-dir`), named,
//! locked and removed the way DPDK does it.
//!
//! # Files
//!
//! - File per page (the default): slot `s` of list `l` is the one-page file
//!   `<dir>/<prefix>map_<l>_<s>` (DPDK's current naming, e.g. `mpmap_0_17`).
//! - File per list (`--single-file-segments`): the whole list is the sparse
//!   file `<dir>/<prefix>map_<l>`, slot `s` at offset `s * page_size`. It is
//!   created on the first reserve and kept open, with its shared lock, until
//!   the store shuts down; released pages are punched out of it.
//!
//! # Locks
//!
//! - Every process that maps a page keeps a descriptor of its file open with
//!   a shared `flock`: the cross-process reference count. A process giving a
//!   page back tries a non-blocking exclusive `flock`; success means it was
//!   the last user, and it removes the file.
//! - A file that is already there when a slot is reserved is stale if a
//!   non-blocking exclusive `flock` on it succeeds (nobody holds it), and
//!   belongs to a live process otherwise; the latter is an error naming the
//!   file and, when `/proc` tells, the process.
//! - Creating, locking and removing files happens under an exclusive `flock`
//!   on the directory, as DPDK does during its page allocation walks (and as
//!   [`crate::hugepages::files::clear_stale`] does), so these sequences are
//!   atomic with respect to other memplane and DPDK processes.
//!
//! # `--huge-unlink`
//!
//! - [`HugeUnlink::Existing`] (default): stale files are removed and created
//!   afresh, so pages come zeroed; a page's file is removed when its last
//!   user gives it back.
//! - [`HugeUnlink::Always`]: as `Existing`, and each file is also removed
//!   right after it is opened; the descriptor keeps the page, nothing is
//!   visible in the directory, and closing the last descriptor frees it.
//! - [`HugeUnlink::Never`]: existing files are reused as they are (pages
//!   reported [`Freshness::Dirty`]) and never removed. In file-per-page mode
//!   a released page stays allocated in its file, for reuse after a restart
//!   (DPDK's behaviour); it goes back to the kernel only when the file is
//!   removed (e.g. by [`reclaim_stale`] once nobody holds it). In
//!   single-file mode a released page is punched out of the file at once, as
//!   DPDK does, since pages of one file cannot be kept per slot otherwise;
//!   only the pages still reserved at shutdown survive in the file.
//!
//! Every store reserves pages with `fallocate` before anyone maps them, so a
//! shortfall is [`MemsegError::OutOfPages`] here, never a SIGBUS later. A
//! failed `fallocate` on hugetlbfs keeps the pages it got; the store gives
//! them back before reporting the error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FallocateFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::store::{BackingKind, Extent, Freshness, PageStore};
use super::MemsegError;
use crate::hugepages::files::{self, ClearReport, FileId, HUGETLBFS_MAGIC};
use crate::hugepages::{Discovery, HugetlbfsMount, SystemRoots};
use crate::options::HugeUnlink;
use crate::units::PageSize;

/// How long a store waits for the exclusive `flock` on its directory, which
/// another process holds while it creates, locks or removes page files.
pub const DIR_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A memseg list whose pages are files in a hugetlbfs mount, one per page
/// or one per list (see the [module documentation](self)).
///
/// The descriptors are process-local: another process mapping the same
/// pages opens (and locks) the same files itself.
#[derive(Debug)]
pub struct HugetlbfsStore {
    dir: PathBuf,
    dir_fd: OwnedFd,
    prefix: String,
    list_index: u32,
    page_size: PageSize,
    capacity: u32,
    single_file: bool,
    unlink: HugeUnlink,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// File per page: the descriptor of each reserved slot.
    pages: BTreeMap<u32, OwnedFd>,
    /// Single file: the list's file, once created.
    list_file: Option<ListFile>,
    /// Single file: the reserved slots.
    held: BTreeSet<u32>,
}

#[derive(Debug)]
struct ListFile {
    fd: OwnedFd,
    /// An existing file reused under [`HugeUnlink::Never`].
    reused: bool,
}

/// A page file opened for reservation.
struct Opened {
    fd: OwnedFd,
    /// The file was there before (reused under [`HugeUnlink::Never`]).
    reused: bool,
}

/// The exclusive `flock` on the store's directory; released on drop.
struct DirLock<'a>(BorrowedFd<'a>);

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = rustix::fs::flock(self.0, FlockOperation::Unlock) {
            tracing::warn!(error = %e, "cannot unlock hugepage directory");
        }
    }
}

impl HugetlbfsStore {
    /// A store for list `list_index` (`capacity` slots of `page_size`) in
    /// `dir`, which must be a hugetlbfs mount of `page_size` pages or a
    /// directory inside one. Files are named with `prefix` (the file
    /// prefix, e.g. `mp`); nothing is created until pages are reserved.
    ///
    /// With `single_file`, the list is one file (`--single-file-segments`);
    /// otherwise one file per page. `unlink` is `--huge-unlink`.
    pub fn create(
        dir: &Path,
        prefix: &str,
        list_index: u32,
        page_size: PageSize,
        capacity: u32,
        single_file: bool,
        unlink: HugeUnlink,
    ) -> Result<Self, MemsegError> {
        if prefix.contains('/') || prefix.contains('\0') {
            return Err(MemsegError::Backing {
                what: format!("file prefix {prefix:?}"),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a file prefix cannot contain '/' or NUL",
                ),
            });
        }
        let dir_fd = open_hugetlbfs_dir(dir, Some(page_size))?.0;
        tracing::debug!(
            dir = %dir.display(), prefix, list = list_index, %page_size, capacity,
            single_file, unlink = unlink.as_str(), "hugetlbfs page store"
        );
        Ok(HugetlbfsStore {
            dir: dir.to_path_buf(),
            dir_fd,
            prefix: prefix.to_string(),
            list_index,
            page_size,
            capacity,
            single_file,
            unlink,
            state: Mutex::new(State::default()),
        })
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The name of the file holding `slot` (in single-file mode, the list's
    /// file for every slot).
    pub fn file_name(&self, slot: u32) -> String {
        if self.single_file {
            format!("{}map_{}", self.prefix, self.list_index)
        } else {
            format!("{}map_{}_{slot}", self.prefix, self.list_index)
        }
    }

    /// The path of the file holding `slot`; see [`file_name`](Self::file_name).
    pub fn file_path(&self, slot: u32) -> PathBuf {
        self.dir.join(self.file_name(slot))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is only updated after the fallible work, in steps that
        // cannot panic, so a panic elsewhere (an extent callback) cannot
        // leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ps(&self) -> u64 {
        self.page_size.bytes()
    }

    fn check_range(&self, first: u32, count: u32) -> Result<(), MemsegError> {
        match first.checked_add(count) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(MemsegError::Backing {
                what: format!(
                    "slots {first}..{} of list {}",
                    u64::from(first) + u64::from(count),
                    self.list_index
                ),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the list has {} slots", self.capacity),
                ),
            }),
        }
    }

    fn not_reserved(&self, slot: u32) -> MemsegError {
        MemsegError::Backing {
            what: format!("slot {slot} of list {}", self.list_index),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "not reserved in this store (double free?)",
            ),
        }
    }

    fn already_reserved(&self, slot: u32) -> MemsegError {
        MemsegError::Backing {
            what: format!("slot {slot} of list {}", self.list_index),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "already reserved in this store",
            ),
        }
    }

    /// Takes the directory lock, waiting up to [`DIR_LOCK_TIMEOUT`].
    fn lock_dir(&self) -> Result<DirLock<'_>, MemsegError> {
        let fd = self.dir_fd.as_fd();
        let start = Instant::now();
        loop {
            match rustix::fs::flock(fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DirLock(fd)),
                Err(Errno::WOULDBLOCK) if start.elapsed() < DIR_LOCK_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    let what = if e == Errno::WOULDBLOCK {
                        format!(
                            "locking hugepage directory {}: another process kept it locked for \
                             more than {}s",
                            self.dir.display(),
                            DIR_LOCK_TIMEOUT.as_secs()
                        )
                    } else {
                        format!("locking hugepage directory {}", self.dir.display())
                    };
                    return Err(MemsegError::Backing {
                        what,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Creates `name` exclusively, with a shared lock on it.
    fn create_file(&self, name: &str) -> Result<OwnedFd, Errno> {
        let fd = rustix::fs::openat(
            &self.dir_fd,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::RUSR | Mode::WUSR,
        )?;
        if let Err(e) = rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared) {
            // Only a process ignoring the directory lock can get here.
            self.remove(name);
            return Err(e);
        }
        tracing::debug!(path = %self.dir.join(name).display(), "created hugepage file");
        Ok(fd)
    }

    /// Removes `name` (logging, not failing: a leftover is reclaimable).
    fn remove(&self, name: &str) {
        match rustix::fs::unlinkat(&self.dir_fd, name, AtFlags::empty()) {
            Ok(()) => {
                tracing::debug!(path = %self.dir.join(name).display(), "removed hugepage file");
            }
            Err(e) => {
                tracing::warn!(path = %self.dir.join(name).display(), error = %e, "cannot remove hugepage file");
            }
        }
    }

    /// Removes `name` if it still is the file open as `fd`.
    fn remove_if_same(&self, name: &str, fd: &OwnedFd) {
        let same = match (
            rustix::fs::fstat(fd),
            rustix::fs::statat(&self.dir_fd, name, AtFlags::SYMLINK_NOFOLLOW),
        ) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        };
        if same {
            self.remove(name);
        } else {
            tracing::debug!(path = %self.dir.join(name).display(), "hugepage file replaced or gone; left alone");
        }
    }

    /// Opens the file `name` for `slot` with a shared lock, creating it, or
    /// replacing or reusing (per `--huge-unlink`) a file that is already
    /// there. Call with the directory lock held.
    fn open_file(&self, name: &str, slot: u32) -> Result<Opened, MemsegError> {
        let path = self.dir.join(name);
        match self.create_file(name) {
            Ok(fd) => return Ok(Opened { fd, reused: false }),
            Err(Errno::EXIST) => {}
            Err(e) => {
                let hint = if e == Errno::MFILE || e == Errno::NFILE {
                    " (one descriptor per page: raise the open-file limit, `ulimit -n`, or use \
                     --single-file-segments)"
                } else {
                    ""
                };
                return Err(MemsegError::Backing {
                    what: format!("creating hugepage file {}{hint}", path.display()),
                    source: e.into(),
                });
            }
        }
        let fd = rustix::fs::openat(
            &self.dir_fd,
            name,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| MemsegError::Backing {
            what: format!("opening existing hugepage file {}", path.display()),
            source: e.into(),
        })?;
        match rustix::fs::fstat(&fd) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
            Ok(_) => {
                return Err(MemsegError::Backing {
                    what: format!("existing {}", path.display()),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a regular file; remove it",
                    ),
                })
            }
            Err(e) => {
                return Err(MemsegError::Backing {
                    what: format!("inspecting {}", path.display()),
                    source: e.into(),
                })
            }
        }
        // Nobody may hold it, whatever the mode: a file a live process holds
        // is that process's page, not a leftover.
        if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(self.held_by_live(&path, &fd, slot));
        }
        if self.unlink == HugeUnlink::Never {
            // Keep it, content and all; the lock becomes a shared one.
            rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared).map_err(|e| {
                MemsegError::Backing {
                    what: format!("locking {}", path.display()),
                    source: e.into(),
                }
            })?;
            tracing::debug!(path = %path.display(), "reusing existing hugepage file (--huge-unlink=never)");
            return Ok(Opened { fd, reused: true });
        }
        // A leftover of a dead process: replace it, so the page comes zeroed.
        tracing::debug!(path = %path.display(), "removing stale hugepage file");
        self.remove(name);
        drop(fd);
        let fd = self.create_file(name).map_err(|e| MemsegError::Backing {
            what: format!("re-creating hugepage file {}", path.display()),
            source: e.into(),
        })?;
        Ok(Opened { fd, reused: false })
    }

    /// The error for a file a live process holds, naming it and, when
    /// `/proc` tells, the holders.
    fn held_by_live(&self, path: &Path, fd: &OwnedFd, slot: u32) -> MemsegError {
        let holders = FileId::of(path)
            .map(|id| {
                let me = (std::process::id(), fd.as_raw_fd());
                files::find_holders(Path::new("/proc"), &[id], &[me])
                    .remove(&id)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let mut who = String::new();
        for h in &holders {
            if !who.is_empty() {
                who.push_str(", ");
            }
            let _ = write!(who, "pid {} ({})", h.pid, h.comm);
        }
        if who.is_empty() {
            who = "its flock is taken".into();
        }
        MemsegError::Backing {
            what: format!(
                "cannot use {} for slot {slot} of list {}: a live process holds it ({who}); \
                 another instance uses file prefix {:?} in {}: stop it or choose another \
                 --file-prefix",
                path.display(),
                self.list_index,
                self.prefix,
                self.dir.display()
            ),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        }
    }

    fn alloc_error(&self, e: Errno, asked: u32, path: &Path) -> MemsegError {
        if e == Errno::NOSPC || e == Errno::NOMEM {
            MemsegError::OutOfPages {
                asked,
                page_size: self.ps(),
                detail: format!("fallocate on {}: {e}", path.display()),
            }
        } else {
            MemsegError::Backing {
                what: format!("fallocate of {asked} page(s) on {}", path.display()),
                source: e.into(),
            }
        }
    }

    /// Gives back a page file opened in a reserve that failed: a file
    /// created in it is removed, a reused one is closed as it was.
    fn undo(&self, name: &str, opened: Opened) {
        if !opened.reused && self.unlink != HugeUnlink::Always {
            self.remove(name);
        }
        drop(opened.fd);
    }

    /// Closes a page file this store is done with, removing it if this was
    /// its last user (a non-blocking exclusive lock succeeds) and the mode
    /// removes files.
    fn close_page_file(&self, name: &str, fd: OwnedFd) {
        if self.unlink == HugeUnlink::Existing
            && rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_ok()
        {
            self.remove_if_same(name, &fd);
        }
        drop(fd);
    }

    fn reserve_page(&self, slot: u32, asked: u32) -> Result<Opened, MemsegError> {
        let name = self.file_name(slot);
        let opened = self.open_file(&name, slot)?;
        if self.unlink == HugeUnlink::Always {
            self.remove(&name);
        }
        if let Err(e) = rustix::fs::fallocate(&opened.fd, FallocateFlags::empty(), 0, self.ps()) {
            self.undo(&name, opened);
            return Err(self.alloc_error(e, asked, &self.dir.join(&name)));
        }
        Ok(opened)
    }

    fn reserve_pages(
        &self,
        st: &mut State,
        first: u32,
        count: u32,
    ) -> Result<Freshness, MemsegError> {
        if let Some(s) = (first..first + count).find(|s| st.pages.contains_key(s)) {
            return Err(self.already_reserved(s));
        }
        let _dir = self.lock_dir()?;
        let mut done: Vec<(u32, Opened)> = Vec::new();
        for slot in first..first + count {
            match self.reserve_page(slot, count) {
                Ok(opened) => done.push((slot, opened)),
                Err(e) => {
                    for (s, opened) in done {
                        self.undo(&self.file_name(s), opened);
                    }
                    return Err(e);
                }
            }
        }
        let mut fresh = Freshness::Zeroed;
        for (slot, opened) in done {
            if opened.reused {
                fresh = Freshness::Dirty;
            }
            st.pages.insert(slot, opened.fd);
        }
        Ok(fresh)
    }

    fn punch(&self, fd: &OwnedFd, first: u32, count: u32) -> rustix::io::Result<()> {
        rustix::fs::fallocate(
            fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            u64::from(first) * self.ps(),
            u64::from(count) * self.ps(),
        )
    }

    fn reserve_in_list_file(
        &self,
        st: &mut State,
        first: u32,
        count: u32,
    ) -> Result<Freshness, MemsegError> {
        if let Some(&s) = st.held.range(first..first + count).next() {
            return Err(self.already_reserved(s));
        }
        let name = self.file_name(0);
        let path = self.dir.join(&name);
        let _dir = self.lock_dir()?;
        let created_now = st.list_file.is_none();
        let file = if let Some(f) = st.list_file.take() {
            f
        } else {
            let opened = self.open_file(&name, first)?;
            if self.unlink == HugeUnlink::Always {
                self.remove(&name);
            }
            ListFile {
                fd: opened.fd,
                reused: opened.reused,
            }
        };
        let res = rustix::fs::fallocate(
            &file.fd,
            FallocateFlags::empty(),
            u64::from(first) * self.ps(),
            u64::from(count) * self.ps(),
        );
        match res {
            Ok(()) => {
                st.held.extend(first..first + count);
                let fresh = if file.reused {
                    Freshness::Dirty
                } else {
                    Freshness::Zeroed
                };
                st.list_file = Some(file);
                Ok(fresh)
            }
            Err(e) => {
                // The slots were free: whatever the failed call got in their
                // range is ours to give back.
                if let Err(pe) = self.punch(&file.fd, first, count) {
                    tracing::error!(path = %path.display(), error = %pe, "cannot roll back a partial fallocate");
                }
                if created_now {
                    self.undo(
                        &name,
                        Opened {
                            fd: file.fd,
                            reused: file.reused,
                        },
                    );
                } else {
                    st.list_file = Some(file);
                }
                Err(self.alloc_error(e, count, &path))
            }
        }
    }

    /// Releases what is still held and closes every descriptor; with
    /// `punch`, reserved single-file slots are punched out first (not under
    /// `Never`, which keeps them).
    fn close_all(&self, punch: bool) {
        let mut st = self.state();
        if st.pages.is_empty() && st.list_file.is_none() {
            return;
        }
        let _dir = self
            .lock_dir()
            .map_err(
                |e| tracing::warn!(error = %e, "closing hugepage files without the directory lock"),
            )
            .ok();
        for (slot, fd) in std::mem::take(&mut st.pages) {
            self.close_page_file(&self.file_name(slot), fd);
        }
        let held = std::mem::take(&mut st.held);
        if let Some(file) = st.list_file.take() {
            let name = self.file_name(0);
            if punch && self.unlink != HugeUnlink::Never {
                for slot in held {
                    if let Err(e) = self.punch(&file.fd, slot, 1) {
                        tracing::warn!(path = %self.dir.join(&name).display(), slot, error = %e, "cannot punch page out");
                    }
                }
            }
            self.close_page_file(&name, file.fd);
        }
    }
}

impl PageStore for HugetlbfsStore {
    fn kind(&self) -> BackingKind {
        if self.single_file {
            BackingKind::HugetlbfsFilePerList
        } else {
            BackingKind::HugetlbfsFilePerPage
        }
    }

    /// Creates (or, per `--huge-unlink`, replaces or reuses) the files of
    /// the slots and allocates their pages, all or nothing. A file a live
    /// process holds is an error naming it.
    fn reserve(&self, first: u32, count: u32) -> Result<Freshness, MemsegError> {
        if count == 0 {
            return Err(MemsegError::ZeroPages);
        }
        self.check_range(first, count)?;
        let mut st = self.state();
        if self.single_file {
            self.reserve_in_list_file(&mut st, first, count)
        } else {
            self.reserve_pages(&mut st, first, count)
        }
    }

    /// One extent per page in file-per-page mode, one for the whole range
    /// in single-file mode. The store's lock is held while `f` runs: `f`
    /// must not call back into this store.
    fn extents(
        &self,
        first: u32,
        count: u32,
        f: &mut dyn FnMut(Extent<'_>) -> Result<(), MemsegError>,
    ) -> Result<(), MemsegError> {
        self.check_range(first, count)?;
        let st = self.state();
        if self.single_file {
            if let Some(s) = (first..first + count).find(|s| !st.held.contains(s)) {
                return Err(self.not_reserved(s));
            }
            let Some(file) = &st.list_file else {
                return Err(self.not_reserved(first));
            };
            if count == 0 {
                return Ok(());
            }
            return f(Extent {
                fd: file.fd.as_fd(),
                file_offset: u64::from(first) * self.ps(),
                first,
                count,
            });
        }
        if let Some(s) = (first..first + count).find(|s| !st.pages.contains_key(s)) {
            return Err(self.not_reserved(s));
        }
        for (&slot, fd) in st.pages.range(first..first + count) {
            f(Extent {
                fd: fd.as_fd(),
                file_offset: 0,
                first: slot,
                count: 1,
            })?;
        }
        Ok(())
    }

    /// File per page: closes each page's file and removes it when this was
    /// its last user (not under `Never`, whose files keep their pages for
    /// reuse). Single file: punches the pages out (under every mode). All
    /// slots must be reserved, else nothing changes.
    fn release(&self, first: u32, count: u32) -> Result<(), MemsegError> {
        self.check_range(first, count)?;
        let mut st = self.state();
        if self.single_file {
            if let Some(s) = (first..first + count).find(|s| !st.held.contains(s)) {
                return Err(self.not_reserved(s));
            }
            let Some(file) = &st.list_file else {
                return Err(self.not_reserved(first));
            };
            if count == 0 {
                return Ok(());
            }
            self.punch(&file.fd, first, count)
                .map_err(|e| MemsegError::Backing {
                    what: format!(
                        "punching {count} page(s) out of {}",
                        self.file_path(first).display()
                    ),
                    source: e.into(),
                })?;
            for s in first..first + count {
                st.held.remove(&s);
            }
            return Ok(());
        }
        if let Some(s) = (first..first + count).find(|s| !st.pages.contains_key(s)) {
            return Err(self.not_reserved(s));
        }
        let _dir = self.lock_dir()?;
        for slot in first..first + count {
            if let Some(fd) = st.pages.remove(&slot) {
                self.close_page_file(&self.file_name(slot), fd);
            }
        }
        Ok(())
    }

    /// Releases anything still held, closes every descriptor and removes
    /// the files no other process holds; under `Never` files (and the pages
    /// in them) are kept. Idempotent.
    fn shutdown(&self) {
        self.close_all(true);
    }
}

impl Drop for HugetlbfsStore {
    /// Closes every descriptor and removes the files no other process holds
    /// (not under `Never`); single-file pages are not punched, since this
    /// process may still map them.
    fn drop(&mut self) {
        self.close_all(false);
    }
}

/// Removes the `<prefix>map_*` files in `dir` (a hugetlbfs mount or a
/// directory in one) that no live process holds: their lock is free and no
/// process has them open or mapped. Run at start, before creating stores.
///
/// A thin wrapper over [`files::clear_stale`]: it takes DPDK's directory
/// lock and reports files kept because a live process holds them, and a
/// directory left alone because another process kept its lock
/// ([`ClearReport::busy_mounts`]). Files of other prefixes are not touched.
pub fn reclaim_stale(dir: &Path, prefix: &str) -> Result<ClearReport, MemsegError> {
    let page_size = open_hugetlbfs_dir(dir, None)?.1;
    let mount = HugetlbfsMount {
        path: dir.to_path_buf(),
        page_size,
        options: String::new(),
        size_limit: None,
    };
    files::clear_stale(
        std::slice::from_ref(&mount),
        Path::new("/proc"),
        Some(prefix),
        false,
    )
    .map_err(|e| MemsegError::Backing {
        what: format!("reclaiming stale {prefix}map_* files in {}", dir.display()),
        source: io::Error::other(e.to_string()),
    })
}

/// Opens `dir` and checks that it is on hugetlbfs (of `want` pages, when
/// given); returns the descriptor and the page size.
fn open_hugetlbfs_dir(
    dir: &Path,
    want: Option<PageSize>,
) -> Result<(OwnedFd, PageSize), MemsegError> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| MemsegError::Backing {
        what: format!(
            "opening hugepage directory {} ({})",
            dir.display(),
            mount_fix(dir, want, false)
        ),
        source: e.into(),
    })?;
    let st = rustix::fs::fstatfs(&fd).map_err(|e| MemsegError::Backing {
        what: format!("statfs {}", dir.display()),
        source: e.into(),
    })?;
    let bad = |why: String, on_hugetlbfs: bool| MemsegError::Backing {
        what: format!(
            "{} cannot hold {}hugepage files",
            dir.display(),
            want.map_or_else(String::new, |p| format!("{p} "))
        ),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{why}; {}", mount_fix(dir, want, on_hugetlbfs)),
        ),
    };
    if st.f_type as u32 != HUGETLBFS_MAGIC {
        return Err(bad(
            format!(
                "it is not on a hugetlbfs mount (file system type {:#x})",
                st.f_type
            ),
            false,
        ));
    }
    let Some(page_size) = PageSize::new(st.f_bsize as u64) else {
        return Err(bad(
            format!(
                "its hugetlbfs reports an unknown page size ({} bytes)",
                st.f_bsize
            ),
            true,
        ));
    };
    if let Some(want) = want {
        if page_size != want {
            return Err(bad(
                format!("it is on a hugetlbfs of {page_size} pages, not {want}"),
                true,
            ));
        }
    }
    Ok((fd, page_size))
}

/// How to get a hugetlbfs directory of `page_size` pages: the mounts there
/// are, and the mount command.
fn mount_fix(dir: &Path, page_size: Option<PageSize>, on_hugetlbfs: bool) -> String {
    let size = page_size.map_or_else(|| "<size>".to_string(), |p| p.to_string());
    let discovery = Discovery::new(SystemRoots::real());
    let default = discovery.default_page_size().ok().flatten();
    let mounts: Vec<String> = discovery
        .mounts(default)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| page_size.is_none_or(|p| m.page_size == p))
        .map(|m| m.path.display().to_string())
        .collect();
    let have = if mounts.is_empty() {
        format!("no hugetlbfs of {size} pages is mounted")
    } else {
        format!(
            "use a hugetlbfs mount of {size} pages ({}) or a directory inside one",
            mounts.join(", ")
        )
    };
    // A hugetlbfs of another size cannot be mounted over: suggest a
    // directory of its own.
    let target = if on_hugetlbfs {
        format!("/dev/hugepages-{size}")
    } else {
        dir.display().to_string()
    };
    format!("{have}; to mount one: mkdir -p {target} && mount -t hugetlbfs -o pagesize={size} nodev {target}")
}
