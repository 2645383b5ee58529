//! The hugetlbfs page stores on real 2M hugepages, in the machine's 2M
//! hugetlbfs mount (e.g. `/dev/hugepages`).
//!
//! Every test uses its own file prefix (`hts_<test>_<pid>_`) and removes its
//! `<prefix>map_*` files on the way out, also when an assertion fails.
//! Tests that assert exact free-page counts hold the pool lock exclusively.
//! Other processes are real: a `flock` holder (`sh` + `flock`) and this
//! binary again in the "crash" role. Without hugepages these tests are
//! skipped with the reason (and fail under `CI=true`).

mod common;
mod procs;

use std::fs;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use memplane::hugepages::{Discovery, SystemRoots};
use memplane::memseg::hugetlbfs::{reclaim_stale, HugetlbfsStore};
use memplane::memseg::{BackingKind, Freshness, MemsegError, PageStore};
use memplane::options::HugeUnlink;
use memplane::PageSize;

const KB_2M: u64 = 2048;
const MB2: usize = 2 << 20;

fn free_2m() -> u64 {
    common::real_counter(KB_2M, "free_hugepages")
}

/// The 2M hugetlbfs mount of this machine, if any.
fn mount_2m() -> Option<PathBuf> {
    let d = Discovery::new(SystemRoots::real());
    let default = d.default_page_size().ok().flatten();
    d.mounts(default)
        .ok()?
        .into_iter()
        .find(|m| m.page_size == PageSize::SIZE_2M)
        .map(|m| m.path)
}

/// What a test runs with: the mount, its prefix, the pool lock and the
/// cleanup guard.
struct Env {
    dir: PathBuf,
    prefix: String,
    _cleanup: Cleanup,
    _pool: fs::File,
}

impl Env {
    /// `None` (test skipped, or failed under CI) when there are fewer than
    /// `pages` free 2M pages or no writable 2M hugetlbfs mount.
    fn new(test: &str, pages: u64, exclusive: bool) -> Option<Env> {
        let pool = common::pool_lock(exclusive);
        if !common::need_hugepages(KB_2M, pages) {
            return None;
        }
        let dir = match mount_2m() {
            Some(d) if rustix::fs::access(&d, rustix::fs::Access::WRITE_OK).is_ok() => d,
            found => {
                let why = match found {
                    Some(d) => format!("cannot write to the 2M hugetlbfs mount {}", d.display()),
                    None => "no 2M hugetlbfs is mounted (mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages)".into(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true and {why}"
                );
                eprintln!("SKIPPED: {why}");
                return None;
            }
        };
        let prefix = format!("hts_{test}_{}_", std::process::id());
        Some(Env {
            _cleanup: Cleanup {
                dir: dir.clone(),
                prefix: prefix.clone(),
            },
            dir,
            prefix,
            _pool: pool,
        })
    }

    fn store(&self, list: u32, capacity: u32, single: bool, unlink: HugeUnlink) -> HugetlbfsStore {
        HugetlbfsStore::create(
            &self.dir,
            &self.prefix,
            list,
            PageSize::SIZE_2M,
            capacity,
            single,
            unlink,
        )
        .unwrap()
    }

    fn path(&self, rest: &str) -> PathBuf {
        self.dir.join(format!("{}map_{rest}", self.prefix))
    }

    /// The names of this test's files, sorted.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{}map_", self.prefix)))
            .collect();
        v.sort();
        v
    }

    fn names(&self, rests: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = rests
            .iter()
            .map(|r| format!("{}map_{r}", self.prefix))
            .collect();
        v.sort();
        v
    }
}

/// Removes `<prefix>map_*` from the mount on drop (pass or fail).
struct Cleanup {
    dir: PathBuf,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let want = format!("{}map_", self.prefix);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&want) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Maps `len` bytes of `fd` at `offset` (shared, kernel-chosen address),
/// runs `f` on them and unmaps.
fn with_mapping<R>(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    // SAFETY: a new shared mapping at an address the kernel picks, so no
    // existing mapping is replaced; the pages were reserved by the store, so
    // touching them cannot fault for lack of memory.
    let addr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            offset,
        )
    }
    .expect("mmap");
    // SAFETY: `addr` is a fresh readable and writable mapping of `len`
    // bytes that nothing else in this process refers to until it is unmapped
    // below.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
    let r = f(bytes);
    // SAFETY: unmaps exactly the mapping made above; `bytes` is not used
    // any more.
    unsafe { rustix::mm::munmap(addr, len) }.expect("munmap");
    r
}

/// Fills every 4K of `page` with `tag` followed by the offset.
fn write_pattern(page: &mut [u8], tag: u8) {
    for (i, chunk) in page.chunks_mut(4096).enumerate() {
        chunk[0] = tag;
        chunk[1..9].copy_from_slice(&(i as u64).to_le_bytes());
    }
}

fn has_pattern(page: &[u8], tag: u8) -> bool {
    page.chunks(4096)
        .enumerate()
        .all(|(i, c)| c[0] == tag && c[1..9] == (i as u64).to_le_bytes())
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Collects (fd, offset, first, count) of the extents of a range, with
/// each fd duplicated so it outlives the callback.
fn extents(
    store: &HugetlbfsStore,
    first: u32,
    count: u32,
) -> Vec<(std::os::fd::OwnedFd, u64, u32, u32)> {
    let mut v = Vec::new();
    store
        .extents(first, count, &mut |e| {
            v.push((
                e.fd.try_clone_to_owned().unwrap(),
                e.file_offset,
                e.first,
                e.count,
            ));
            Ok(())
        })
        .unwrap();
    v
}

/// Creates a file of one allocated page holding `tag`'s pattern, as a
/// process that died would leave it.
fn leave_file(path: &Path, tag: u8) {
    let f = fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, MB2 as u64).unwrap();
    with_mapping(f.as_fd(), 0, MB2, |p| write_pattern(p, tag));
}

#[test]
fn file_per_page_reserve_map_release() {
    let Some(env) = Env::new("fpp", 3, true) else {
        return;
    };
    let store = env.store(1, 8, false, HugeUnlink::Existing);
    assert_eq!(store.kind(), BackingKind::HugetlbfsFilePerPage);
    let free0 = free_2m();

    assert_eq!(store.reserve(2, 3).unwrap(), Freshness::Zeroed);
    assert_eq!(env.files(), env.names(&["1_2", "1_3", "1_4"]));
    assert_eq!(store.file_path(3), env.path("1_3"));
    assert_eq!(free_2m(), free0 - 3);

    let ext = extents(&store, 2, 3);
    assert_eq!(
        ext.iter().map(|e| (e.1, e.2, e.3)).collect::<Vec<_>>(),
        vec![(0, 2, 1), (0, 3, 1), (0, 4, 1)]
    );
    for (fd, off, slot, _) in &ext {
        with_mapping(fd.as_fd(), *off, MB2, |p| {
            assert!(is_zero(p), "slot {slot} not zeroed");
            write_pattern(p, *slot as u8);
        });
    }
    for (fd, off, slot, _) in &ext {
        with_mapping(fd.as_fd(), *off, MB2, |p| {
            assert!(has_pattern(p, *slot as u8));
        });
    }
    drop(ext);

    // A slot held twice, or not at all, is refused without changes.
    assert!(store.reserve(4, 2).is_err());
    assert!(store.release(4, 2).is_err());
    assert!(store.reserve(7, 2).is_err(), "beyond capacity");
    assert!(matches!(store.reserve(0, 0), Err(MemsegError::ZeroPages)));
    assert_eq!(env.files().len(), 3);
    assert_eq!(free_2m(), free0 - 3);

    store.release(2, 3).unwrap();
    assert_eq!(env.files(), Vec::<String>::new());
    assert_eq!(free_2m(), free0);
    store.shutdown();
}

#[test]
fn single_file_reserve_punch_shutdown() {
    let Some(env) = Env::new("single", 3, true) else {
        return;
    };
    let store = env.store(0, 16, true, HugeUnlink::Existing);
    assert_eq!(store.kind(), BackingKind::HugetlbfsFilePerList);
    let free0 = free_2m();
    assert_eq!(
        env.files(),
        Vec::<String>::new(),
        "created on first reserve"
    );

    assert_eq!(store.reserve(5, 3).unwrap(), Freshness::Zeroed);
    assert_eq!(env.files(), env.names(&["0"]));
    assert_eq!(free_2m(), free0 - 3);

    let ext = extents(&store, 5, 3);
    assert_eq!(ext.len(), 1);
    assert_eq!((ext[0].1, ext[0].2, ext[0].3), (5 * MB2 as u64, 5, 3));
    with_mapping(ext[0].0.as_fd(), ext[0].1, 3 * MB2, |p| {
        assert!(is_zero(p));
        write_pattern(p, 0x5a);
    });
    drop(ext);

    store.release(6, 1).unwrap();
    assert_eq!(free_2m(), free0 - 2);
    assert!(
        store.extents(6, 1, &mut |_| Ok(())).is_err(),
        "slot 6 is free"
    );
    assert!(store.reserve(7, 1).is_err(), "slot 7 is still held");
    // Slots 5 and 7 kept their content.
    for slot in [5u32, 7] {
        let ext = extents(&store, slot, 1);
        with_mapping(ext[0].0.as_fd(), ext[0].1, MB2, |p| {
            assert_eq!(p[0], 0x5a, "slot {slot}");
        });
    }

    store.shutdown();
    assert_eq!(env.files(), Vec::<String>::new());
    assert_eq!(free_2m(), free0);
}

#[test]
fn over_ask_is_out_of_pages_and_leaves_nothing() {
    let Some(env) = Env::new("overask", 1, true) else {
        return;
    };
    // One descriptor per page: make room for them.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    )
    .unwrap();
    for single in [false, true] {
        let free0 = free_2m();
        let ask = u32::try_from(free0 + 1).unwrap();
        let store = env.store(0, ask + 4, single, HugeUnlink::Existing);
        let err = store.reserve(2, ask).unwrap_err();
        assert!(
            matches!(err, MemsegError::OutOfPages { asked, .. } if asked == ask),
            "single={single}: {err}"
        );
        eprintln!("over-ask (single={single}): {err}");
        assert!(
            err.to_string().contains("would not give")
                && err.to_string().contains("hugepages reserve 2M"),
            "{err}"
        );
        assert_eq!(env.files(), Vec::<String>::new(), "single={single}");
        assert_eq!(free_2m(), free0, "single={single}");
        // Nothing is held: the store still works.
        store.reserve(0, 1).unwrap();
        assert_eq!(free_2m(), free0 - 1);
        store.release(0, 1).unwrap();
        store.shutdown();
        assert_eq!(free_2m(), free0);
        assert_eq!(env.files(), Vec::<String>::new());
    }
}

#[test]
fn unlink_always_leaves_no_files() {
    let Some(env) = Env::new("always", 2, true) else {
        return;
    };
    for single in [false, true] {
        let store = env.store(3, 4, single, HugeUnlink::Always);
        let free0 = free_2m();
        assert_eq!(store.reserve(0, 2).unwrap(), Freshness::Zeroed);
        assert_eq!(env.files(), Vec::<String>::new(), "single={single}");
        assert_eq!(free_2m(), free0 - 2);
        for (fd, off, _, count) in extents(&store, 0, 2) {
            with_mapping(fd.as_fd(), off, count as usize * MB2, |p| {
                write_pattern(p, 7);
                assert!(has_pattern(p, 7));
            });
        }
        store.release(0, 2).unwrap();
        assert_eq!(free_2m(), free0, "single={single}");
        store.shutdown();
        assert_eq!(free_2m(), free0);
    }
}

#[test]
fn unlink_never_keeps_and_reuses_files() {
    let Some(env) = Env::new("never", 1, true) else {
        return;
    };
    let free0 = free_2m();
    {
        let a = env.store(0, 4, false, HugeUnlink::Never);
        assert_eq!(a.reserve(1, 1).unwrap(), Freshness::Zeroed);
        let ext = extents(&a, 1, 1);
        with_mapping(ext[0].0.as_fd(), 0, MB2, |p| write_pattern(p, 0xab));
        drop(ext);
        a.release(1, 1).unwrap();
        assert_eq!(
            env.files(),
            env.names(&["0_1"]),
            "the file survives release"
        );
        assert_eq!(free_2m(), free0 - 1, "and keeps its page");
        a.shutdown();
    }
    assert_eq!(env.files(), env.names(&["0_1"]), "and shutdown");
    assert_eq!(free_2m(), free0 - 1);

    let b = env.store(0, 4, false, HugeUnlink::Never);
    assert_eq!(b.reserve(1, 1).unwrap(), Freshness::Dirty);
    assert_eq!(free_2m(), free0 - 1, "the old page is reused");
    let ext = extents(&b, 1, 1);
    with_mapping(ext[0].0.as_fd(), 0, MB2, |p| {
        assert!(has_pattern(p, 0xab), "old content seen");
    });
    drop(ext);
    b.release(1, 1).unwrap();
    drop(b);
    assert_eq!(env.files(), env.names(&["0_1"]));

    let report = reclaim_stale(&env.dir, &env.prefix).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:#?}");
    assert_eq!(env.files(), Vec::<String>::new());
    assert_eq!(free_2m(), free0);
}

#[test]
fn stale_file_replaced_live_file_refused() {
    let Some(env) = Env::new("stale", 4, true) else {
        return;
    };
    let free0 = free_2m();

    // A leftover of a dead process: replaced, and the page comes zeroed.
    let stale = env.path("0_0");
    leave_file(&stale, 0xcd);
    let old_ino = fs::metadata(&stale).unwrap().ino();
    assert_eq!(free_2m(), free0 - 1);
    let store = env.store(0, 8, false, HugeUnlink::Existing);
    assert_eq!(store.reserve(0, 1).unwrap(), Freshness::Zeroed);
    assert_ne!(fs::metadata(&stale).unwrap().ino(), old_ino, "re-created");
    assert_eq!(free_2m(), free0 - 1, "the stale page was freed");
    let ext = extents(&store, 0, 1);
    with_mapping(ext[0].0.as_fd(), 0, MB2, |p| {
        assert!(is_zero(p), "old content gone");
    });
    drop(ext);
    store.release(0, 1).unwrap();
    assert_eq!(free_2m(), free0);

    // A file a live process holds (shared flock, as every user does).
    let held = env.path("0_2");
    leave_file(&held, 0xef);
    let ino = fs::metadata(&held).unwrap().ino();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "exec 9<\"$1\" && flock -s 9 && echo {} && exec sleep 60",
            procs::READY
        ),
        "sh",
    ])
    .arg(&held);
    let holder = procs::Child::start(cmd);
    let free1 = free_2m();
    assert_eq!(free1, free0 - 1);

    let err = store.reserve(1, 3).unwrap_err();
    let msg = err.to_string();
    eprintln!("held file: {msg}");
    assert!(msg.contains(&held.display().to_string()), "{msg}");
    assert!(msg.contains("live process"), "{msg}");
    assert!(msg.contains(&format!("pid {}", holder.pid)), "{msg}");
    // Nothing changed: slot 1 rolled back, slot 3 never made, the held
    // file untouched.
    assert_eq!(env.files(), env.names(&["0_2"]));
    assert_eq!(fs::metadata(&held).unwrap().ino(), ino);
    assert_eq!(free_2m(), free1);
    with_mapping(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&held)
            .unwrap()
            .as_fd(),
        0,
        MB2,
        |p| assert!(has_pattern(p, 0xef)),
    );
    // Slots around it still work.
    store.reserve(1, 1).unwrap();
    store.release(1, 1).unwrap();
    drop(holder);

    // Once the holder is gone the file is stale and gets replaced.
    assert_eq!(store.reserve(2, 1).unwrap(), Freshness::Zeroed);
    assert_eq!(free_2m(), free1);
    store.release(2, 1).unwrap();
    store.shutdown();
    assert_eq!(env.files(), Vec::<String>::new());
    assert_eq!(free_2m(), free0);
}

#[test]
fn drop_without_shutdown_keeps_files_others_hold() {
    let Some(env) = Env::new("drop", 3, true) else {
        return;
    };
    let free0 = free_2m();
    for single in [false, true] {
        let store = env.store(0, 4, single, HugeUnlink::Existing);
        store.reserve(1, 2).unwrap();
        assert_eq!(free_2m(), free0 - 2);
        drop(store);
        assert_eq!(env.files(), Vec::<String>::new(), "single={single}");
        assert_eq!(free_2m(), free0, "single={single}");
    }

    // A page another process still holds stays, file and all.
    let store = env.store(0, 4, false, HugeUnlink::Existing);
    store.reserve(0, 1).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "exec 9<\"$1\" && flock -s 9 && echo {} && exec sleep 60",
            procs::READY
        ),
        "sh",
    ])
    .arg(env.path("0_0"));
    let mut holder = procs::Child::start(cmd);
    drop(store);
    assert_eq!(env.files(), env.names(&["0_0"]));
    assert_eq!(free_2m(), free0 - 1);
    holder.kill();
    let report = reclaim_stale(&env.dir, &env.prefix).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:#?}");
    assert_eq!(free_2m(), free0);
}

/// Child role "crash": reserves and maps two pages with the store, says
/// ready and waits to be killed.
#[test]
fn child_crash() {
    if procs::role().as_deref() != Some("crash") {
        return;
    }
    let dir = PathBuf::from(std::env::var("HTS_DIR").unwrap());
    let prefix = std::env::var("HTS_PREFIX").unwrap();
    let store = HugetlbfsStore::create(
        &dir,
        &prefix,
        0,
        PageSize::SIZE_2M,
        4,
        false,
        HugeUnlink::Existing,
    )
    .unwrap();
    store.reserve(0, 2).unwrap();
    let mut maps = Vec::new();
    store
        .extents(0, 2, &mut |e| {
            // SAFETY: a new shared mapping at a kernel-chosen address; the
            // page is reserved. It is never unmapped: the process is killed.
            let addr = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    MB2,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED,
                    e.fd,
                    e.file_offset,
                )
            }
            .unwrap();
            // SAFETY: `addr` is the start of the writable mapping above.
            unsafe { addr.cast::<u8>().write(1) };
            maps.push(addr as usize);
            Ok(())
        })
        .unwrap();
    std::mem::forget(store);
    procs::ready_and_wait();
}

#[test]
fn crash_leaves_files_reclaim_removes_them() {
    let Some(env) = Env::new("crash", 2, true) else {
        return;
    };
    let free0 = free_2m();
    let mut cmd = procs::self_command("child_crash", "crash");
    cmd.env("HTS_DIR", &env.dir).env("HTS_PREFIX", &env.prefix);
    let mut child = procs::Child::start(cmd);
    assert_eq!(env.files(), env.names(&["0_0", "0_1"]));
    assert_eq!(free_2m(), free0 - 2);

    // While it lives, its files are not stale.
    let report = reclaim_stale(&env.dir, &env.prefix).unwrap();
    assert!(report.removed.is_empty(), "{report:#?}");
    assert_eq!(report.kept_in_use.len(), 2, "{report:#?}");

    child.kill();
    assert_eq!(
        env.files(),
        env.names(&["0_0", "0_1"]),
        "SIGKILL leaves the files"
    );
    assert_eq!(free_2m(), free0 - 2, "and their pages");

    let report = reclaim_stale(&env.dir, &env.prefix).unwrap();
    let mut removed: Vec<PathBuf> = report.removed.iter().map(|f| f.path.clone()).collect();
    removed.sort();
    assert_eq!(
        removed,
        vec![env.path("0_0"), env.path("0_1")],
        "{report:#?}"
    );
    assert_eq!(report.pages_freed.iter().map(|p| p.pages).sum::<u64>(), 2);
    assert_eq!(env.files(), Vec::<String>::new());
    assert_eq!(free_2m(), free0);
}

#[test]
fn bad_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = HugetlbfsStore::create(
        tmp.path(),
        "hts_bad_",
        0,
        PageSize::SIZE_2M,
        4,
        false,
        HugeUnlink::Existing,
    )
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("bad dir: {msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(msg.contains("not on a hugetlbfs mount"), "{msg}");
    assert!(msg.contains("mount -t hugetlbfs -o pagesize=2M"), "{msg}");

    let err = reclaim_stale(tmp.path(), "hts_bad_")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not on a hugetlbfs mount"), "{err}");

    let missing = tmp.path().join("nope");
    let err = HugetlbfsStore::create(
        &missing,
        "x",
        0,
        PageSize::SIZE_2M,
        4,
        false,
        HugeUnlink::Existing,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    if let Some(dir) = mount_2m() {
        let err = HugetlbfsStore::create(
            &dir,
            "x",
            0,
            PageSize::SIZE_1G,
            4,
            false,
            HugeUnlink::Existing,
        )
        .unwrap_err()
        .to_string();
        eprintln!("wrong size: {err}");
        assert!(err.contains("hugetlbfs of 2M pages, not 1G"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
        let err = HugetlbfsStore::create(
            &dir,
            "a/b",
            0,
            PageSize::SIZE_2M,
            4,
            false,
            HugeUnlink::Existing,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("'/'"), "{err}");
    }
}
