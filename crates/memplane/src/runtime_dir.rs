//! The per-prefix runtime directory and the primary lock.
//!
//! Every memplane instance (a "file prefix", DPDK's `--file-prefix`) owns a
//! directory `<base>/memplane/<prefix>/` with mode 0700, where `<base>` is
//! (like DPDK's `eal_create_runtime_dir`):
//!
//! 1. `$RUNTIME_DIRECTORY` (set by systemd's `RuntimeDirectory=`; the first
//!    entry when it lists several), else
//! 2. `/var/run` when running as root, else
//! 3. `$XDG_RUNTIME_DIR`, else
//! 4. `/tmp`.
//!
//! An explicit override (the CLI's `--runtime-dir`) replaces `<base>`; the
//! `memplane/<prefix>` part is always appended so that several prefixes can
//! share one base.
//!
//! # The primary lock
//!
//! The primary process of a prefix holds an exclusive **open file description
//! lock** (`fcntl(F_OFD_SETLK)`, a write lock over the whole file) on
//! `<dir>/config` for as long as it lives. Because the lock belongs to the
//! open file description:
//!
//! - the kernel drops it when the process exits in any way, SIGKILL included,
//!   so a dead primary never leaves a held lock behind;
//! - closing some *other* descriptor of the config file (for example one the
//!   shared-config layer opened to map it) does not release it, unlike a
//!   classic `F_SETLK` record lock;
//! - two [`RuntimeDir`]s of the same prefix in one process conflict, exactly
//!   as two processes do;
//! - it can be tested without taking it (`F_OFD_GETLK`), so probing for a
//!   live primary ([`RuntimeDir::primary_status`]) never disturbs a primary
//!   that is starting at the same moment.
//!
//! OFD locks do not record an owner pid, so the holder writes its pid to
//! `<dir>/primary.pid` right after taking the lock. When reporting the holder,
//! memplane trusts that file only after checking in `/proc/<pid>/fdinfo` that
//! this process really holds an OFD write lock on the config file, and
//! otherwise scans `/proc/*/fdinfo` for the holder.
//!
//! Other layers must not `flock`/`fcntl`-lock the config file themselves; they
//! can use the locked descriptor through [`PrimaryLock::config_fd`].

use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use serde::Serialize;

use crate::error::{Error, Result};

/// The directory below the base that holds one directory per prefix.
pub const RUNTIME_SUBDIR: &str = "memplane";
/// Name of the shared config file inside a prefix's runtime directory.
pub const CONFIG_FILE: &str = "config";
/// Name of the file where the primary records its pid.
pub const PID_FILE: &str = "primary.pid";
/// Longest accepted file prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = crate::options::MAX_FILE_PREFIX_LEN;

/// Where the runtime base directory is, from the environment: the pure part
/// of the resolution (see the [module docs](self) for the order).
///
/// `env` looks up an environment variable; empty and relative values are
/// treated as unset (as the XDG base directory spec asks for
/// `XDG_RUNTIME_DIR`). `is_root` is whether the effective uid is 0.
///
/// ```
/// use memplane::runtime_dir::base_dir;
/// use std::path::Path;
/// let env = |k: &str| (k == "XDG_RUNTIME_DIR").then(|| "/run/user/1000".to_string());
/// assert_eq!(base_dir(&env, false), Path::new("/run/user/1000"));
/// assert_eq!(base_dir(&env, true), Path::new("/var/run"));
/// ```
pub fn base_dir(env: &impl Fn(&str) -> Option<String>, is_root: bool) -> PathBuf {
    let get = |key: &str| -> Option<PathBuf> {
        let value = env(key)?;
        // systemd joins several RuntimeDirectory= entries with ':'.
        let first = value.split(':').next().unwrap_or_default();
        let path = PathBuf::from(first);
        path.is_absolute().then_some(path)
    };
    if let Some(dir) = get("RUNTIME_DIRECTORY") {
        return dir;
    }
    if is_root {
        return PathBuf::from("/var/run");
    }
    if let Some(dir) = get("XDG_RUNTIME_DIR") {
        return dir;
    }
    PathBuf::from("/tmp")
}

/// Checks that a file prefix can name a directory and hugepage files: 1 to
/// [`MAX_PREFIX_LEN`] bytes of ASCII letters, digits, `_`, `-` and `.`, not
/// starting with `.`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    crate::options::check_file_prefix("--file-prefix", prefix).map_err(Error::from)
}

/// What holds the primary lock of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum PrimaryStatus {
    /// There is no config file: no primary ever ran with this prefix here
    /// (or its directory was removed).
    NoPrimary,
    /// A live process holds the lock. `pid` is 0 when it cannot be named
    /// (for example the holder is in another pid namespace).
    Live {
        /// The holder's pid, 0 if unknown.
        pid: u32,
    },
    /// The config file exists but nobody holds its lock: the primary that
    /// wrote it is dead. The directory can be reused by a new primary.
    Stale,
}

/// The role a process plays for a prefix (DPDK's `--proc-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRole {
    /// Creates and owns the shared state.
    Primary,
    /// Attaches to a live primary's shared state.
    Secondary,
}

/// Decides the role of a process from what it asked for (`None` = `auto`) and
/// the prefix's [`PrimaryStatus`].
///
/// `auto` becomes [`ProcessRole::Secondary`] exactly when a live primary
/// holds the lock. Asking for a primary while one is live gives
/// [`Error::PrefixInUse`]; asking for a secondary without a live primary
/// gives an error naming the prefix and the fix.
pub fn resolve_role(
    prefix: &str,
    requested: Option<ProcessRole>,
    status: PrimaryStatus,
) -> Result<ProcessRole> {
    match (requested, status) {
        (None, PrimaryStatus::Live { .. })
        | (Some(ProcessRole::Secondary), PrimaryStatus::Live { .. }) => Ok(ProcessRole::Secondary),
        (None | Some(ProcessRole::Primary), PrimaryStatus::NoPrimary | PrimaryStatus::Stale) => {
            Ok(ProcessRole::Primary)
        }
        (Some(ProcessRole::Primary), PrimaryStatus::Live { pid }) => Err(Error::PrefixInUse {
            prefix: prefix.to_string(),
            pid,
        }),
        (Some(ProcessRole::Secondary), PrimaryStatus::NoPrimary | PrimaryStatus::Stale) => {
            let found = if status == PrimaryStatus::Stale {
                "only the config file of a dead primary"
            } else {
                "no primary at all"
            };
            Err(Error::System(format!(
                "--proc-type secondary asked for file prefix '{prefix}', but there is {found}; \
                 start the primary first, or use --proc-type auto"
            )))
        }
    }
}

/// The runtime directory of one prefix, created and owned by this user.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    path: PathBuf,
    prefix: String,
}

impl RuntimeDir {
    /// The path of `prefix`'s runtime directory, without touching the file
    /// system. `override_dir` replaces the base taken from the environment.
    pub fn resolve(prefix: &str, override_dir: Option<&Path>) -> Result<PathBuf> {
        validate_prefix(prefix)?;
        let base = match override_dir {
            Some(dir) => dir.to_path_buf(),
            None => base_dir(
                &|key: &str| std::env::var(key).ok(),
                rustix::process::geteuid().is_root(),
            ),
        };
        Ok(base.join(RUNTIME_SUBDIR).join(prefix))
    }

    /// Creates (or reuses) `prefix`'s runtime directory with mode 0700.
    ///
    /// Missing ancestors of the base are created with mode 0700 too. The
    /// `memplane` and `<prefix>` directories must not be symlinks and must be
    /// owned by this process's effective uid (otherwise another user could
    /// read or replace our files); a pre-existing one with a looser mode is
    /// tightened to 0700. On failure, every directory this call created is
    /// removed again, and the error names the path and the fix.
    pub fn create(prefix: &str, override_dir: Option<&Path>) -> Result<RuntimeDir> {
        let path = Self::resolve(prefix, override_dir)?;
        let mut created = Vec::new();
        match create_dirs(&path, &mut created) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), created = created.len(), "runtime directory ready");
                Ok(RuntimeDir {
                    path,
                    prefix: prefix.to_string(),
                })
            }
            Err(err) => {
                for dir in created.iter().rev() {
                    if let Err(e) = fs::remove_dir(dir) {
                        tracing::warn!(path = %dir.display(), error = %e, "cannot roll back runtime directory");
                    }
                }
                Err(err)
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<dir>/config`: the shared config file, whose lock marks the primary.
    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }

    /// `<dir>/primary.pid`: where the primary records its pid.
    pub fn pid_path(&self) -> PathBuf {
        self.path.join(PID_FILE)
    }

    /// Becomes the primary of this prefix: creates `<dir>/config` if needed
    /// (mode 0600) and takes the exclusive lock on it without waiting.
    ///
    /// Fails with [`Error::PrefixInUse`] naming the live holder's pid (0 if it
    /// cannot be found) when another process, or another [`RuntimeDir`] of
    /// this process, holds it. A config file left by a dead primary is simply
    /// reused; [`PrimaryLock::was_stale`] tells the caller so it can
    /// reinitialise it.
    ///
    /// The lock is an open-file-description lock: a child forked by
    /// another thread while a [`PrimaryLock`] was open shares it until the
    /// child's `exec` (or exit) closes the descriptor, so a lock dropped
    /// at that moment is free again only then.
    pub fn try_lock_primary(&self) -> Result<PrimaryLock> {
        let config = self.config_path();
        let existed = match fs::symlink_metadata(&config) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("inspecting", &config, e)),
        };
        let fd = rustix::fs::open(
            &config,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| open_error("opening the config file", &config, e.into()))?;
        if !ofd_lock(&fd, libc::F_WRLCK).map_err(|e| Error::io("locking", &config, e))? {
            let pid = self.holder_pid(&fd).unwrap_or(0);
            tracing::debug!(prefix = %self.prefix, pid, "primary lock is taken");
            return Err(Error::PrefixInUse {
                prefix: self.prefix.clone(),
                pid,
            });
        }
        let pid = std::process::id();
        write_pid_file(&self.pid_path(), pid)?;
        tracing::info!(prefix = %self.prefix, dir = %self.path.display(), pid, stale = existed, "primary lock taken");
        Ok(PrimaryLock {
            fd,
            config,
            pid_path: self.pid_path(),
            pid,
            was_stale: existed,
        })
    }

    /// Whether a primary runs for this prefix, without taking the lock.
    pub fn primary_status(&self) -> Result<PrimaryStatus> {
        let config = self.config_path();
        let fd = match rustix::fs::open(
            &config,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(PrimaryStatus::NoPrimary),
            Err(e) => return Err(open_error("opening the config file", &config, e.into())),
        };
        if ofd_held(&fd).map_err(|e| Error::io("testing the lock of", &config, e))? {
            Ok(PrimaryStatus::Live {
                pid: self.holder_pid(&fd).unwrap_or(0),
            })
        } else {
            Ok(PrimaryStatus::Stale)
        }
    }

    /// Finds the process holding the OFD write lock on the config file that
    /// `fd` refers to.
    fn holder_pid(&self, fd: &OwnedFd) -> Option<u32> {
        let st = rustix::fs::fstat(fd).ok()?;
        let target = (st.st_dev, st.st_ino);
        let proc_root = Path::new("/proc");
        let me = std::process::id();
        // The pid file is a hint; believe it only when /proc confirms it.
        // The primary writes it right after locking, so a fresh primary may
        // not have written it yet: then scan every process.
        let hinted = fs::read_to_string(self.pid_path())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = hinted {
            if holds_ofd_write_lock(proc_root, pid, target, None) {
                return Some(pid);
            }
        }
        let pids = crate::hugepages::files::list_pids(proc_root).ok()?;
        // Our own probe descriptor never holds the lock, so our pid is only
        // reported when another descriptor of ours does.
        let own_fd = Some((me, std::os::fd::AsRawFd::as_raw_fd(fd)));
        pids.into_iter()
            .find(|&pid| holds_ofd_write_lock(proc_root, pid, target, own_fd))
    }
}

/// Holding this is being the primary of a prefix. Dropping it (or exiting
/// in any way) releases the lock.
#[derive(Debug)]
pub struct PrimaryLock {
    fd: OwnedFd,
    config: PathBuf,
    pid_path: PathBuf,
    pid: u32,
    was_stale: bool,
}

impl PrimaryLock {
    /// The locked config file, open read-write, for the shared-config layer
    /// to size and map. Keep this descriptor (do not re-lock the file).
    pub fn config_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The config file's path.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Whether a config file of an earlier, dead primary was found (its
    /// contents are stale and must be reinitialised).
    pub fn was_stale(&self) -> bool {
        self.was_stale
    }
}

impl Drop for PrimaryLock {
    fn drop(&mut self) {
        // Remove the pid file only if it still names us; the lock itself goes
        // away when `fd` is closed right after.
        let ours = fs::read_to_string(&self.pid_path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(self.pid);
        if ours {
            if let Err(e) = fs::remove_file(&self.pid_path) {
                tracing::debug!(path = %self.pid_path.display(), error = %e, "cannot remove pid file");
            }
        }
        tracing::debug!(config = %self.config.display(), "primary lock released");
    }
}

/// Creates `path` and its missing ancestors, recording what it created.
fn create_dirs(path: &Path, created: &mut Vec<PathBuf>) -> Result<()> {
    let euid = rustix::process::geteuid().as_raw();
    // The last two components (memplane/<prefix>) get the strict checks.
    let prefix_dir = path;
    let memplane_dir = path.parent().unwrap_or(path);
    let base = memplane_dir.parent().unwrap_or(memplane_dir);

    // Missing ancestors, deepest existing first.
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        match fs::symlink_metadata(p) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(p.to_path_buf());
                cur = p.parent();
            }
            Err(e) => return Err(dir_error(p, base, &e)),
        }
    }
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(dir_error(dir, base, &e)),
        }
    }
    for dir in [memplane_dir, prefix_dir] {
        check_own_dir(dir, euid, base)?;
    }
    // Existing directories on a read-only file system, or not writable by
    // us: say so now rather than when the config file is created.
    if let Err(e) = rustix::fs::access(
        prefix_dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    ) {
        return Err(dir_error(prefix_dir, base, &e.into()));
    }
    Ok(())
}

/// Opens `dir` without following a symlink and checks owner and mode,
/// tightening the mode to 0700 when it is looser.
fn check_own_dir(dir: &Path, euid: u32, base: &Path) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Error::System(format!(
            "runtime directory {} is a symlink or not a directory; refusing to use it \
             (remove it, or set RUNTIME_DIRECTORY / --runtime-dir to another base)",
            dir.display()
        )),
        e => dir_error(dir, base, &e.into()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("inspecting", dir, e.into()))?;
    if st.st_uid != euid {
        return Err(Error::System(format!(
            "runtime directory {} belongs to uid {}, not to this process (uid {euid}); \
             refusing to use it (use another --file-prefix, or set RUNTIME_DIRECTORY / \
             --runtime-dir to a directory of your own)",
            dir.display(),
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode != 0o700 {
        tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "tightening runtime directory mode to 0700");
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(|e| Error::io("setting mode 0700 on", dir, e.into()))?;
    }
    Ok(())
}

/// The error for a runtime directory that cannot be created or used.
fn dir_error(dir: &Path, base: &Path, err: &io::Error) -> Error {
    let fix = format!(
        "make {} writable, or set RUNTIME_DIRECTORY (or pass --runtime-dir) to a writable directory",
        base.display()
    );
    let denied = matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM));
    if denied {
        Error::Permission {
            what: format!("creating runtime directory {}", dir.display()),
            fix,
        }
    } else {
        Error::System(format!(
            "cannot create runtime directory {}: {err}; {fix}",
            dir.display()
        ))
    }
}

/// The error for a config file that cannot be opened.
fn open_error(action: &'static str, path: &Path, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::ELOOP) {
        return Error::System(format!(
            "{} is a symlink; refusing to use it (remove it)",
            path.display()
        ));
    }
    Error::io(action, path, err)
}

/// A whole-file `struct flock` of type `ty`.
fn whole_file(ty: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Tries to take an OFD lock of type `ty` on the whole file; `Ok(false)` when
/// another open file description holds a conflicting one.
fn ofd_lock(fd: &OwnedFd, ty: libc::c_int) -> io::Result<bool> {
    let mut fl = whole_file(ty);
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and
    // `fl` is a properly initialised `struct flock` that lives across it; the
    // kernel only reads it for F_OFD_SETLK.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::F_OFD_SETLK,
            std::ptr::addr_of_mut!(fl),
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Whether some other open file description holds a lock that would conflict
/// with a whole-file write lock (`F_OFD_GETLK`; takes nothing).
fn ofd_held(fd: &OwnedFd) -> io::Result<bool> {
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: `fd` is a valid open descriptor and `fl` a valid, writable
    // `struct flock` that outlives the call; F_OFD_GETLK writes only into it.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::F_OFD_GETLK,
            std::ptr::addr_of_mut!(fl),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether process `pid` has a descriptor on the file `target` (dev, ino)
/// whose `fdinfo` shows an OFD write lock. `skip` excludes one (pid, fd).
fn holds_ofd_write_lock(
    proc_root: &Path,
    pid: u32,
    target: (u64, u64),
    skip: Option<(u32, i32)>,
) -> bool {
    let fd_dir = proc_root.join(pid.to_string()).join("fd");
    let Ok(entries) = fs::read_dir(&fd_dir) else {
        return false;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(fd) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if skip == Some((pid, fd)) {
            continue;
        }
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        if (meta.dev(), meta.ino()) != target {
            continue;
        }
        let info = proc_root.join(pid.to_string()).join("fdinfo").join(&name);
        if let Ok(text) = fs::read_to_string(info) {
            let locked = text
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains("WRITE"));
            if locked {
                return true;
            }
        }
    }
    false
}

/// Writes `pid` to `path` atomically (temporary file + rename).
fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension(format!("pid.{pid}.tmp"));
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{pid}")?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("writing the pid file", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        move |key: &str| owned.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn prefix_validation() {
        for ok in ["rte", "app-1", "a.b_c", "x"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            let err = validate_prefix(bad).unwrap_err().to_string();
            assert!(err.contains("for --file-prefix"), "{bad}: {err}");
        }
    }

    #[test]
    fn base_dir_order() {
        let all = env_of(&[
            ("RUNTIME_DIRECTORY", "/run/svc"),
            ("XDG_RUNTIME_DIR", "/run/user/7"),
        ]);
        assert_eq!(base_dir(&all, true), Path::new("/run/svc"));
        assert_eq!(base_dir(&all, false), Path::new("/run/svc"));
        let xdg = env_of(&[("XDG_RUNTIME_DIR", "/run/user/7")]);
        assert_eq!(base_dir(&xdg, true), Path::new("/var/run"));
        assert_eq!(base_dir(&xdg, false), Path::new("/run/user/7"));
        let none = env_of(&[]);
        assert_eq!(base_dir(&none, true), Path::new("/var/run"));
        assert_eq!(base_dir(&none, false), Path::new("/tmp"));
        // Empty and relative values count as unset; systemd lists use ':'.
        let odd = env_of(&[("RUNTIME_DIRECTORY", ""), ("XDG_RUNTIME_DIR", "rel/dir")]);
        assert_eq!(base_dir(&odd, false), Path::new("/tmp"));
        let list = env_of(&[("RUNTIME_DIRECTORY", "/run/a:/run/b")]);
        assert_eq!(base_dir(&list, false), Path::new("/run/a"));
    }

    #[test]
    fn role_resolution() {
        use PrimaryStatus::{Live, NoPrimary, Stale};
        use ProcessRole::{Primary, Secondary};
        let live = Live { pid: 42 };
        assert_eq!(resolve_role("p", None, live).unwrap(), Secondary);
        assert_eq!(resolve_role("p", None, Stale).unwrap(), Primary);
        assert_eq!(resolve_role("p", None, NoPrimary).unwrap(), Primary);
        assert_eq!(resolve_role("p", Some(Secondary), live).unwrap(), Secondary);
        assert_eq!(resolve_role("p", Some(Primary), Stale).unwrap(), Primary);
        match resolve_role("p", Some(Primary), live) {
            Err(Error::PrefixInUse { prefix, pid }) => {
                assert_eq!((prefix.as_str(), pid), ("p", 42));
            }
            other => panic!("{other:?}"),
        }
        let err = resolve_role("p", Some(Secondary), Stale)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dead primary") && err.contains("--proc-type auto"),
            "{err}"
        );
    }
}
