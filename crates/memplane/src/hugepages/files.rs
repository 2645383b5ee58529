//! Files in hugetlbfs mounts: what is there, who holds it, and clearing what
//! is stale.
//!
//! Pages faulted into a hugetlbfs file stay allocated until the file is
//! removed and nobody maps it any more, so files left by dead processes keep
//! pages out of `HugePages_Free` (DPDK's classic "rm -rf /dev/hugepages/*"
//! problem). This module finds such files, names the processes that still
//! hold live ones, and removes the stale ones safely.
//!
//! # Naming
//!
//! DPDK names page files `<prefix>map_<n>` (legacy and older dynamic mode,
//! e.g. `rtemap_17`, `spdk_pid1234map_5`), `<prefix>map_<list>_<seg>`
//! (current dynamic mode, e.g. `rtemap_0_17`) and `<prefix>map_<list>`
//! (`--single-file-segments`). memplane uses the same patterns. The prefix of
//! a top-level file is the text before the **last** `map_`
//! ([`prefix_of`]); a file whose name has no `map_` has no prefix and is never
//! removed.
//!
//! # In use
//!
//! A file is in use when
//!
//! - a non-blocking exclusive `flock` on it fails: every DPDK (and memplane)
//!   process keeps a shared `flock` on each page file it maps; or
//! - some live process has it open (`/proc/<pid>/fd/*`) or mapped
//!   (`/proc/<pid>/maps`), which also catches programs that do not lock.
//!
//! Holders are reported as [`Holder`]s (pid and `comm`). The proc root comes
//! from the caller (normally [`SystemRoots::proc`](super::SystemRoots)) so
//! fake trees can be used in tests.
//!
//! # Clearing
//!
//! [`clear_stale`] takes DPDK's directory lock (`flock(LOCK_EX)` on the mount
//! directory, which DPDK processes hold while they create, lock and unlink
//! page files), then for each candidate file opens it without following
//! symlinks, takes `LOCK_EX | LOCK_NB` on that descriptor, re-checks `/proc`
//! for holders, checks that the name still refers to the same inode, and
//! unlinks it while still holding the lock. Removing a name that somebody
//! still maps would not free anything nor hurt that process, but it hides the
//! file; the checks avoid that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use serde::Serialize;

use super::HugetlbfsMount;
use crate::error::{Error, Result};
use crate::units::PageSize;

/// `f_type` of a hugetlbfs mount (`HUGETLBFS_MAGIC`).
pub const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;

/// How long [`clear_stale`] waits for the directory lock of a mount that a
/// live process is allocating in.
pub const DIR_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Files are locked and checked in batches of this many descriptors, to stay
/// well below `RLIMIT_NOFILE` when thousands of files were left behind.
const BATCH: usize = 256;

/// A file identity: device and inode number, as `stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (following symlinks).
    pub fn of(path: &Path) -> Result<FileId> {
        let meta = fs::metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
        Ok(FileId::from_meta(&meta))
    }

    fn from_meta(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    // The field widths of `struct stat` differ across targets.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(st: &rustix::fs::Stat) -> FileId {
        FileId {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }
}

/// A process that has a hugepage file open or mapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Process id (as seen in the scanned proc root).
    pub pid: u32,
    /// The process's `comm` (executable name, at most 15 bytes).
    pub comm: String,
    /// It has a descriptor open on the file.
    pub open: bool,
    /// It maps the file.
    pub mapped: bool,
}

/// The state of the `flock` on a file, as seen by a non-blocking exclusive
/// attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    /// Nobody holds a lock on it.
    Free,
    /// Some process holds a lock (DPDK and memplane hold `LOCK_SH` on every
    /// page file they map).
    Held,
    /// The file could not be opened to test (for example, it belongs to
    /// another user). Counted as in use.
    Unknown,
}

/// A regular file in a hugetlbfs mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugeFile {
    /// The file.
    pub path: PathBuf,
    /// The mount it is in.
    pub mount: PathBuf,
    /// The mount's page size.
    pub page_size: PageSize,
    /// The DPDK/memplane file prefix ([`prefix_of`]); `None` when the name
    /// does not follow the `<prefix>map_*` pattern or the file is not at the
    /// top of the mount.
    pub prefix: Option<String>,
    /// Hugepages allocated to the file (allocated bytes / page size;
    /// hugetlbfs files are sparse, so this can be less than `len` says).
    pub pages: u64,
    /// Allocated bytes (`st_blocks * 512`).
    pub bytes: u64,
    /// Logical length (`st_size`).
    pub len: u64,
    /// Owner uid.
    pub uid: u32,
    /// The state of its `flock`.
    pub lock: LockState,
    /// Live processes that have it open or mapped.
    pub holders: Vec<Holder>,
}

impl HugeFile {
    /// Whether a live process holds the file: its lock is held (or cannot be
    /// tested), or some process has it open or mapped.
    pub fn in_use(&self) -> bool {
        self.lock != LockState::Free || !self.holders.is_empty()
    }
}

/// The prefix of a hugepage file name: the text before the last `map_`
/// (`rtemap_0_17` → `rte`, `spdk_pid1234map_5` → `spdk_pid1234`,
/// `app_map_0` → `app_`). `None` when the name has no `map_`.
///
/// ```
/// use memplane::hugepages::files::prefix_of;
/// assert_eq!(prefix_of("rtemap_17"), Some("rte"));
/// assert_eq!(prefix_of("spdk_pid1234map_5"), Some("spdk_pid1234"));
/// assert_eq!(prefix_of("qemu_back_mem.pc.ram"), None);
/// ```
pub fn prefix_of(name: &str) -> Option<&str> {
    name.rfind("map_").map(|i| &name[..i])
}

/// Page counts for one page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PageCount {
    /// The page size.
    pub page_size: PageSize,
    /// Number of pages.
    pub pages: u64,
}

/// Files of one prefix, for `memplane hugepages status` and preflight's
/// explanation of pages held by others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrefixGroup {
    /// The prefix; `None` groups files that do not follow the naming.
    pub prefix: Option<String>,
    /// Its files.
    pub files: Vec<HugeFile>,
    /// Pages held, per page size (smallest size first).
    pub pages: Vec<PageCount>,
    /// Bytes held in all page sizes.
    pub bytes: u64,
    /// Whether any of its files is in use ([`HugeFile::in_use`]).
    pub live: bool,
    /// Every process holding any of its files, once per pid.
    pub holders: Vec<Holder>,
}

/// What [`clear_stale`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClearReport {
    /// Whether this was a dry run (nothing removed).
    pub dry_run: bool,
    /// Files removed (in a dry run: that would be removed).
    pub removed: Vec<HugeFile>,
    /// Pages those files held, per page size.
    pub pages_freed: Vec<PageCount>,
    /// Files kept because a live process holds them, with the holders.
    pub kept_in_use: Vec<HugeFile>,
    /// Files left alone because they do not look like DPDK/memplane page
    /// files (no `map_` in the name, not at the top of the mount, or not a
    /// regular file).
    pub skipped_unknown: Vec<PathBuf>,
    /// Mounts skipped because a live process kept their directory lock for
    /// longer than [`DIR_LOCK_WAIT`] (it is allocating pages there).
    pub busy_mounts: Vec<PathBuf>,
    /// Files that could not be removed, with the reason.
    pub failed: Vec<ClearFailure>,
}

/// A file [`clear_stale`] wanted to remove but could not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClearFailure {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub error: String,
}

/// Lists the regular files of a hugetlbfs mount, with their page counts,
/// lock state and holders.
///
/// Files at the top of the mount (where DPDK and memplane put theirs) and
/// one directory level below (other programs' files still hold pages) are
/// listed; symlinks and deeper levels are not followed. Fails when `mount`
/// is not a hugetlbfs mount.
pub fn scan_mount(mount: &HugetlbfsMount, proc_root: &Path) -> Result<Vec<HugeFile>> {
    let dir = open_mount(&mount.path)?;
    let mut files = Vec::new();
    list_files(mount, &dir, &mount.path, true, &mut files)?;
    let targets: Vec<FileId> = files.iter().map(|(_, id)| *id).collect();
    let mut holders = find_holders(proc_root, &targets, &[]);
    let out = files
        .into_iter()
        .map(|(mut f, id)| {
            f.holders = holders.remove(&id).unwrap_or_default();
            f
        })
        .collect();
    Ok(out)
}

/// [`scan_mount`] over several mounts; a file system mounted twice (bind
/// mounts) is listed once, under its first mount.
pub fn scan_all(mounts: &[HugetlbfsMount], proc_root: &Path) -> Result<Vec<HugeFile>> {
    let mut out = Vec::new();
    for mount in dedup_mounts(mounts)? {
        out.extend(scan_mount(mount, proc_root)?);
    }
    Ok(out)
}

/// Groups files by prefix: named prefixes in name order, then the files
/// without one.
pub fn group_by_prefix(files: &[HugeFile]) -> Vec<PrefixGroup> {
    let mut by_prefix: BTreeMap<(bool, Option<String>), Vec<HugeFile>> = BTreeMap::new();
    for f in files {
        by_prefix
            .entry((f.prefix.is_none(), f.prefix.clone()))
            .or_default()
            .push(f.clone());
    }
    by_prefix
        .into_iter()
        .map(|((_, prefix), files)| {
            let mut holders: Vec<Holder> = Vec::new();
            for h in files.iter().flat_map(|f| &f.holders) {
                match holders.iter_mut().find(|x| x.pid == h.pid) {
                    Some(x) => {
                        x.open |= h.open;
                        x.mapped |= h.mapped;
                    }
                    None => holders.push(h.clone()),
                }
            }
            holders.sort_by_key(|h| h.pid);
            PrefixGroup {
                pages: count_pages(&files),
                bytes: files.iter().map(|f| f.bytes).sum(),
                live: files.iter().any(HugeFile::in_use),
                prefix,
                files,
                holders,
            }
        })
        .collect()
}

/// Removes the stale page files of `mounts`: top-level files named
/// `*map_*` (of prefix `prefix_filter` only, when given) whose lock is free
/// and that no live process has open or mapped. Files in use are kept and
/// reported with their holders; other files are reported as skipped.
///
/// With `dry_run`, does every check but removes nothing. Per-file failures
/// are reported in [`ClearReport::failed`]; only a mount that cannot be read
/// at all (or is not hugetlbfs) fails the whole call.
pub fn clear_stale(
    mounts: &[HugetlbfsMount],
    proc_root: &Path,
    prefix_filter: Option<&str>,
    dry_run: bool,
) -> Result<ClearReport> {
    let mut report = ClearReport {
        dry_run,
        ..ClearReport::default()
    };
    for mount in dedup_mounts(mounts)? {
        clear_mount(mount, proc_root, prefix_filter, &mut report)?;
    }
    report.pages_freed = count_pages(&report.removed);
    tracing::info!(
        removed = report.removed.len(),
        kept = report.kept_in_use.len(),
        skipped = report.skipped_unknown.len(),
        failed = report.failed.len(),
        dry_run,
        "hugepage files cleared"
    );
    Ok(report)
}

/// Finds the processes under `proc_root` that have any of `targets` open
/// (`/proc/<pid>/fd/*`) or mapped (`/proc/<pid>/maps`).
///
/// Descriptors listed in `skip` (pid, fd) do not count, so a caller can
/// check files it has open itself. Processes that vanish or cannot be read during the scan
/// are ignored (an unprivileged caller only sees its own processes).
pub fn find_holders(
    proc_root: &Path,
    targets: &[FileId],
    skip: &[(u32, i32)],
) -> HashMap<FileId, Vec<Holder>> {
    let targets: HashSet<FileId> = targets.iter().copied().collect();
    let skip: HashSet<(u32, i32)> = skip.iter().copied().collect();
    let mut found: HashMap<FileId, Vec<Holder>> = HashMap::new();
    if targets.is_empty() {
        return found;
    }
    let Ok(pids) = list_pids(proc_root) else {
        tracing::warn!(proc = %proc_root.display(), "cannot list processes; holders unknown");
        return found;
    };
    for pid in pids {
        let pid_dir = proc_root.join(pid.to_string());
        let mut hits: BTreeMap<FileId, (bool, bool)> = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(pid_dir.join("fd")) {
            for entry in entries.flatten() {
                let fd = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok());
                if fd.is_some_and(|fd| skip.contains(&(pid, fd))) {
                    continue;
                }
                // Sockets, pipes and anonymous inodes do not link to a path.
                let Ok(link) = fs::read_link(entry.path()) else {
                    continue;
                };
                if !link.is_absolute() {
                    continue;
                }
                if let Ok(meta) = fs::metadata(entry.path()) {
                    let id = FileId::from_meta(&meta);
                    if targets.contains(&id) {
                        hits.entry(id).or_default().0 = true;
                    }
                }
            }
        }
        if let Ok(maps) = fs::read_to_string(pid_dir.join("maps")) {
            for id in maps.lines().filter_map(parse_maps_line) {
                if targets.contains(&id) {
                    hits.entry(id).or_default().1 = true;
                }
            }
        }
        if hits.is_empty() {
            continue;
        }
        let comm = fs::read_to_string(pid_dir.join("comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        for (id, (open, mapped)) in hits {
            found.entry(id).or_default().push(Holder {
                pid,
                comm: comm.clone(),
                open,
                mapped,
            });
        }
    }
    found
}

/// The file identity named by one line of `/proc/<pid>/maps`, if the line
/// maps a file (`<addr> <perms> <offset> <maj>:<min> <inode> <path>`, with
/// major and minor in hex).
pub fn parse_maps_line(line: &str) -> Option<FileId> {
    let mut fields = line.split_ascii_whitespace();
    let dev = fields.nth(3)?;
    let ino: u64 = fields.next()?.parse().ok()?;
    if ino == 0 {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    let maj = u32::from_str_radix(maj, 16).ok()?;
    let min = u32::from_str_radix(min, 16).ok()?;
    Some(FileId {
        dev: rustix::fs::makedev(maj, min),
        ino,
    })
}

/// The numeric entries of a proc root, ascending.
pub(crate) fn list_pids(proc_root: &Path) -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> = fs::read_dir(proc_root)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// Opens a mount directory and checks that it is hugetlbfs.
fn open_mount(path: &Path) -> Result<OwnedFd> {
    let dir = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("opening hugetlbfs mount", path, e.into()))?;
    let st = rustix::fs::fstatfs(&dir).map_err(|e| Error::io("statfs", path, e.into()))?;
    if st.f_type as u32 != HUGETLBFS_MAGIC {
        return Err(Error::System(format!(
            "{} is not a hugetlbfs mount (file system type {:#x}); pass the mount point of a \
             hugetlbfs (see `grep hugetlbfs /proc/mounts`)",
            path.display(),
            st.f_type
        )));
    }
    Ok(dir)
}

/// Drops mounts of a file system already listed.
fn dedup_mounts(mounts: &[HugetlbfsMount]) -> Result<Vec<&HugetlbfsMount>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in mounts {
        let meta = fs::metadata(&m.path).map_err(|e| Error::io("inspecting", &m.path, e))?;
        if seen.insert(meta.dev()) {
            out.push(m);
        } else {
            tracing::debug!(mount = %m.path.display(), "same file system mounted twice; listed once");
        }
    }
    Ok(out)
}

/// Collects the regular files of `dir` (and, when `top`, of its
/// subdirectories), with their identities; holders are filled in later.
fn list_files(
    mount: &HugetlbfsMount,
    dir_fd: &OwnedFd,
    dir: &Path,
    top: bool,
    out: &mut Vec<(HugeFile, FileId)>,
) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let name = entry.file_name();
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() && top {
            match rustix::fs::openat(
                dir_fd,
                name.as_os_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => list_files(mount, &sub, &path, false, out)?,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot list subdirectory");
                }
            }
            continue;
        }
        if !ft.is_file() {
            if !ft.is_dir() && !ft.is_symlink() && !ft.is_fifo() && !ft.is_socket() {
                tracing::debug!(path = %path.display(), "not a regular file; ignored");
            }
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let prefix = if top {
            name.to_str().and_then(prefix_of).map(str::to_string)
        } else {
            None
        };
        let lock = match open_file(dir_fd, name.as_os_str()) {
            Ok(file) => {
                if try_lock_ex(&file) {
                    LockState::Free
                } else {
                    LockState::Held
                }
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot test lock");
                LockState::Unknown
            }
        };
        let id = FileId::from_meta(&meta);
        out.push((make_file(mount, path, prefix, &meta, lock), id));
    }
    Ok(())
}

fn make_file(
    mount: &HugetlbfsMount,
    path: PathBuf,
    prefix: Option<String>,
    meta: &fs::Metadata,
    lock: LockState,
) -> HugeFile {
    let bytes = meta.blocks().saturating_mul(512);
    HugeFile {
        path,
        mount: mount.path.clone(),
        page_size: mount.page_size,
        prefix,
        pages: bytes / mount.page_size.bytes(),
        bytes,
        len: meta.size(),
        uid: meta.uid(),
        lock,
        holders: Vec::new(),
    }
}

/// Opens a file of `dir_fd` read-only without following symlinks or
/// blocking.
fn open_file(dir_fd: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir_fd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Takes `LOCK_EX | LOCK_NB` on `file`; the lock lasts until the file is
/// closed (or unlocked).
fn try_lock_ex(file: &File) -> bool {
    rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive).is_ok()
}

fn count_pages(files: &[HugeFile]) -> Vec<PageCount> {
    let mut by_size: BTreeMap<PageSize, u64> = BTreeMap::new();
    for f in files {
        *by_size.entry(f.page_size).or_default() += f.pages;
    }
    by_size
        .into_iter()
        .map(|(page_size, pages)| PageCount { page_size, pages })
        .collect()
}

/// Takes DPDK's directory lock on a mount, waiting up to [`DIR_LOCK_WAIT`].
fn lock_dir(dir: &OwnedFd) -> io::Result<bool> {
    let start = Instant::now();
    loop {
        match rustix::fs::flock(dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < DIR_LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A candidate for removal, locked exclusively through `file`.
struct Candidate {
    name: std::ffi::OsString,
    file: File,
    info: HugeFile,
    id: FileId,
}

fn clear_mount(
    mount: &HugetlbfsMount,
    proc_root: &Path,
    prefix_filter: Option<&str>,
    report: &mut ClearReport,
) -> Result<()> {
    let dir = open_mount(&mount.path)?;
    // A dry run changes nothing, so it need not exclude allocators.
    if !report.dry_run && !lock_dir(&dir).map_err(|e| Error::io("locking", &mount.path, e))? {
        tracing::warn!(mount = %mount.path.display(), "directory lock held by a live process; mount skipped");
        report.busy_mounts.push(mount.path.clone());
        return Ok(());
    }
    let mut names = Vec::new();
    let entries = fs::read_dir(&mount.path).map_err(|e| Error::io("listing", &mount.path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", &mount.path, e))?;
        let name = entry.file_name();
        let prefix = name.to_str().and_then(prefix_of);
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        // With a filter, other prefixes (and unnamed files) are not ours to
        // judge and are not reported; without one, everything left is.
        let wanted = match (prefix, prefix_filter) {
            (Some(p), Some(want)) => p == want,
            (None, Some(_)) => false,
            (_, None) => true,
        };
        if !wanted {
            continue;
        }
        if prefix.is_some() && is_file {
            names.push(name);
        } else {
            report.skipped_unknown.push(entry.path());
        }
    }
    names.sort();
    for batch in names.chunks(BATCH) {
        clear_batch(mount, &dir, proc_root, batch, report);
    }
    Ok(())
}

fn clear_batch(
    mount: &HugetlbfsMount,
    dir: &OwnedFd,
    proc_root: &Path,
    names: &[std::ffi::OsString],
    report: &mut ClearReport,
) {
    let mut candidates = Vec::new();
    let mut busy = Vec::new();
    for name in names {
        let path = mount.path.join(name);
        let file = match open_file(dir, name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                report.skipped_unknown.push(path);
                continue;
            }
            Err(e) => {
                report.failed.push(ClearFailure {
                    path,
                    error: format!("cannot open: {e}"),
                });
                continue;
            }
        };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.is_file() {
            report.skipped_unknown.push(path);
            continue;
        }
        let prefix = name.to_str().and_then(prefix_of).map(str::to_string);
        let locked = try_lock_ex(&file);
        let lock = if locked {
            LockState::Free
        } else {
            LockState::Held
        };
        let candidate = Candidate {
            name: name.clone(),
            info: make_file(mount, path, prefix, &meta, lock),
            id: FileId::from_meta(&meta),
            file,
        };
        if locked {
            candidates.push(candidate);
        } else {
            busy.push(candidate);
        }
    }
    // One /proc scan for the whole batch, while we hold every lock. Our own
    // descriptors on the candidates are not holders.
    let targets: Vec<FileId> = candidates.iter().chain(&busy).map(|c| c.id).collect();
    let me = std::process::id();
    let own: Vec<(u32, i32)> = candidates
        .iter()
        .chain(&busy)
        .map(|c| (me, c.file.as_raw_fd()))
        .collect();
    let mut holders = find_holders(proc_root, &targets, &own);
    for mut c in busy {
        c.info.holders = holders.remove(&c.id).unwrap_or_default();
        report.kept_in_use.push(c.info);
    }
    for mut c in candidates {
        let held_by = holders.remove(&c.id).unwrap_or_default();
        if !held_by.is_empty() {
            c.info.holders = held_by;
            report.kept_in_use.push(c.info);
            continue;
        }
        if report.dry_run {
            report.removed.push(c.info);
            continue;
        }
        // The name must still be the file we locked.
        match rustix::fs::statat(dir, c.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileId::from_stat(&st) == c.id => {}
            _ => {
                tracing::debug!(path = %c.info.path.display(), "file replaced or gone before removal; left alone");
                continue;
            }
        }
        match rustix::fs::unlinkat(dir, c.name.as_os_str(), AtFlags::empty()) {
            Ok(()) => {
                tracing::info!(path = %c.info.path.display(), pages = c.info.pages, "removed stale hugepage file");
                report.removed.push(c.info);
            }
            Err(e) => report.failed.push(ClearFailure {
                path: c.info.path.clone(),
                error: format!("cannot remove: {e}"),
            }),
        }
        // `c.file` closes here, dropping our lock and the last reference.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(prefix_of("rtemap_17"), Some("rte"));
        assert_eq!(prefix_of("rtemap_0_17"), Some("rte"));
        assert_eq!(prefix_of("spdk_pid1234map_5"), Some("spdk_pid1234"));
        assert_eq!(prefix_of("testpfx_map_0_0"), Some("testpfx_"));
        assert_eq!(prefix_of("mapmap_1"), Some("map"));
        assert_eq!(prefix_of("map_3"), Some(""));
        assert_eq!(prefix_of("libvirt"), None);
    }

    #[test]
    fn maps_lines() {
        let line = "7f0000000000-7f0000200000 rw-s 00000000 00:2d 11700                      /dev/hugepages/rtemap_0";
        assert_eq!(
            parse_maps_line(line),
            Some(FileId {
                dev: rustix::fs::makedev(0, 0x2d),
                ino: 11700
            })
        );
        assert_eq!(
            parse_maps_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0     [stack]"),
            None
        );
        assert_eq!(parse_maps_line("garbage"), None);
        assert_eq!(
            parse_maps_line("a-b r--p 0 fd:01 42 /usr/lib/x.so").map(|i| i.ino),
            Some(42)
        );
    }
}
