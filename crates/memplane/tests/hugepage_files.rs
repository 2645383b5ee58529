//! Files in hugetlbfs mounts: scanning, holders, grouping and clearing, on
//! real hugepages.
//!
//! Tests that need hugepages mount a private hugetlbfs (with a `size=` limit,
//! so the mount's own `statfs` counts its pages exactly even while other
//! tests use hugepages) inside a private mount namespace: the test binary
//! re-runs itself under `unshare --mount`, so the mount is invisible to other
//! processes and disappears, with its pages, when that child exits. Holders
//! are real processes (this binary again, in the "holder" role).
//! Without hugepages (or root, or `unshare`) these tests are skipped with the
//! reason, and fail when `CI=true`.

mod procs;

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memplane::hugepages::files::{
    clear_stale, find_holders, group_by_prefix, parse_maps_line, scan_all, scan_mount, FileId,
    HugeFile, LockState, PageCount, DIR_LOCK_WAIT,
};
use memplane::hugepages::HugetlbfsMount;
use memplane::PageSize;

const MB2: u64 = 2 << 20;
const SIZE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn proc_root() -> &'static Path {
    Path::new("/proc")
}

/// Whether this machine can run the hugepage tests; otherwise says why
/// (and fails under CI=true).
fn can_run(pages: u64) -> bool {
    let free: u64 = fs::read_to_string(format!("{SIZE_2M}/free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let why = if !rustix::process::geteuid().is_root() {
        Some("not root: cannot mount hugetlbfs".to_string())
    } else if !Path::new(SIZE_2M).is_dir() {
        Some("this kernel has no 2M hugepages".to_string())
    } else if free < pages {
        Some(format!(
            "needs {pages} free 2M hugepages, {free} free (echo 64 > /proc/sys/vm/nr_hugepages)"
        ))
    } else if std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .is_err()
    {
        Some("the unshare command (util-linux) is missing".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("hugepage test cannot run under CI=true: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Runs `body` in a private mount namespace when hugepages are available.
fn isolated(test: &str, pages: u64, body: fn()) {
    match procs::role().as_deref() {
        Some("isolated") => body(),
        Some(_) => {}
        None => {
            if can_run(pages) {
                procs::run_in_mount_namespace(test, "isolated");
            }
        }
    }
}

/// A private hugetlbfs of `pages` 2M pages; unmounted on drop.
struct TestMount {
    dir: tempfile::TempDir,
    mount: HugetlbfsMount,
}

impl TestMount {
    fn new(pages: u64) -> TestMount {
        let dir = tempfile::tempdir().unwrap();
        let options = format!("pagesize=2M,size={}", pages * MB2);
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", &options, "none"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount hugetlbfs on {}",
            dir.path().display()
        );
        let mount = HugetlbfsMount {
            path: dir.path().to_path_buf(),
            page_size: PageSize::SIZE_2M,
            options,
            size_limit: Some(pages * MB2),
        };
        TestMount { dir, mount }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file with `pages` pages allocated (fallocate).
    fn file(&self, name: &str, pages: u64) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let f = fs::File::create(&path).unwrap();
        if pages > 0 {
            rustix::fs::fallocate(
                f.as_fd(),
                rustix::fs::FallocateFlags::empty(),
                0,
                pages * MB2,
            )
            .unwrap();
        }
        path
    }

    /// (pages in the mount, free pages in the mount), from statfs.
    fn usage(&self) -> (u64, u64) {
        let st = rustix::fs::statfs(self.dir.path()).unwrap();
        (st.f_blocks, st.f_bfree)
    }

    fn all_free(&self) -> bool {
        let (total, free) = self.usage();
        total == free
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn global_free() -> u64 {
    fs::read_to_string(format!("{SIZE_2M}/free_hugepages"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn by_name<'a>(files: &'a [HugeFile], name: &str) -> &'a HugeFile {
    files
        .iter()
        .find(|f| f.path.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} not in {files:#?}"))
}

/// Child role: holds `MEMPLANE_TEST_FILE` as `MEMPLANE_TEST_MODE` says
/// ("flock": shared flock + mapping, like DPDK; "map": mapping only, no fd,
/// no lock; "dirlock": exclusive flock on a directory), until killed.
#[test]
fn child_holder() {
    if procs::role().as_deref() != Some("holder") {
        return;
    }
    let path = PathBuf::from(std::env::var("MEMPLANE_TEST_FILE").unwrap());
    let mode = std::env::var("MEMPLANE_TEST_MODE").unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(mode != "dirlock")
        .open(&path)
        .unwrap();
    match mode.as_str() {
        "dirlock" => {
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
            std::mem::forget(file);
        }
        "flock" | "map" => {
            if mode == "flock" {
                rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared).unwrap();
            }
            if file.metadata().unwrap().len() < MB2 {
                rustix::fs::ftruncate(&file, MB2).unwrap();
            }
            // SAFETY: a fresh shared mapping of a 2 MiB file we just sized;
            // the kernel picks the address, so nothing existing is replaced.
            let addr = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    MB2 as usize,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED,
                    &file,
                    0,
                )
            }
            .unwrap();
            // SAFETY: `addr` is the start of a live, writable 2 MiB mapping;
            // writing one byte faults in its single hugepage.
            unsafe { addr.cast::<u8>().write_volatile(0x5a) };
            if mode == "map" {
                drop(file); // only the mapping holds it now
            } else {
                std::mem::forget(file);
            }
        }
        other => panic!("unknown holder mode {other}"),
    }
    procs::ready_and_wait();
}

fn hold(path: &Path, mode: &str) -> procs::Child {
    let mut cmd = procs::self_command("child_holder", "holder");
    cmd.env("MEMPLANE_TEST_FILE", path)
        .env("MEMPLANE_TEST_MODE", mode);
    procs::Child::start(cmd)
}

fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_string()
}

/// Waits (up to 5 s) for the global free count to reach `want`; other tests
/// on the machine may hold pages meanwhile, so this only checks "went back
/// up".
fn eventually_global_free_at_least(want: u64) {
    let start = Instant::now();
    loop {
        let now = global_free();
        if now >= want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "HugePages_Free stayed at {now}, expected at least {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn scan_counts_pages_prefixes_and_fake_holders() {
    isolated(
        "scan_counts_pages_prefixes_and_fake_holders",
        4,
        scan_scenario,
    );
}

fn scan_scenario() {
    let m = TestMount::new(4);
    m.file("scanpfx_map_0_0", 1);
    let single = m.file("scanpfx_map_1", 2);
    m.file("rtemap_7", 0);
    m.file("notes.txt", 0);
    m.file("sub/inner", 1);
    assert_eq!(m.usage(), (4, 0));

    let files = scan_mount(&m.mount, proc_root()).unwrap();
    assert_eq!(files.len(), 5, "{files:#?}");
    let f = by_name(&files, "scanpfx_map_0_0");
    assert_eq!(
        (f.prefix.as_deref(), f.pages, f.bytes, f.page_size),
        (Some("scanpfx_"), 1, MB2, PageSize::SIZE_2M)
    );
    assert_eq!(f.lock, LockState::Free);
    assert!(!f.in_use() && f.holders.is_empty());
    assert_eq!(f.mount, m.mount.path);
    let s = by_name(&files, "scanpfx_map_1");
    assert_eq!((s.pages, s.len), (2, 2 * MB2));
    assert_eq!(by_name(&files, "rtemap_7").prefix.as_deref(), Some("rte"));
    assert_eq!(by_name(&files, "rtemap_7").pages, 0);
    assert_eq!(by_name(&files, "notes.txt").prefix, None);
    let inner = by_name(&files, "inner");
    assert_eq!((inner.prefix.as_deref(), inner.pages), (None, 1));

    let groups = group_by_prefix(&files);
    let names: Vec<Option<&str>> = groups.iter().map(|g| g.prefix.as_deref()).collect();
    assert_eq!(names, [Some("rte"), Some("scanpfx_"), None]);
    assert_eq!(
        groups[1].pages,
        [PageCount {
            page_size: PageSize::SIZE_2M,
            pages: 3
        }]
    );
    assert!(!groups[1].live);
    assert_eq!(groups[2].files.len(), 2);

    // Listing the same file system twice counts it once.
    let twice = scan_all(&[m.mount.clone(), m.mount.clone()], proc_root()).unwrap();
    assert_eq!(twice.len(), 5);

    // A fake proc root naming a holder of one file: the scan reports it.
    let fake = tempfile::tempdir().unwrap();
    let pid_dir = fake.path().join("4242");
    fs::create_dir_all(pid_dir.join("fd")).unwrap();
    fs::write(pid_dir.join("comm"), "fakeholder\n").unwrap();
    std::os::unix::fs::symlink(&single, pid_dir.join("fd/7")).unwrap();
    let files = scan_mount(&m.mount, fake.path()).unwrap();
    let s = by_name(&files, "scanpfx_map_1");
    assert_eq!(s.holders.len(), 1);
    assert_eq!(
        (s.holders[0].pid, s.holders[0].comm.as_str()),
        (4242, "fakeholder")
    );
    assert!(s.in_use() && s.lock == LockState::Free);
    let groups = group_by_prefix(&files);
    assert!(groups[1].live);
    assert_eq!(groups[1].holders[0].pid, 4242);
    assert!(!by_name(&files, "scanpfx_map_0_0").in_use());
}

#[test]
fn live_holder_is_reported_and_kept_then_cleared_after_sigkill() {
    isolated(
        "live_holder_is_reported_and_kept_then_cleared_after_sigkill",
        2,
        live_holder_scenario,
    );
}

fn live_holder_scenario() {
    let m = TestMount::new(2);
    let path = m.file("heldpfx_map_0_0", 0);
    let mut child = hold(&path, "flock");
    assert_eq!(m.usage(), (2, 1), "the child faulted one page in");

    let files = scan_mount(&m.mount, proc_root()).unwrap();
    let f = by_name(&files, "heldpfx_map_0_0");
    assert_eq!(f.pages, 1);
    assert_eq!(f.lock, LockState::Held);
    assert!(f.in_use());
    assert_eq!(f.holders.len(), 1, "{:?}", f.holders);
    let h = &f.holders[0];
    assert_eq!(h.pid, child.pid);
    assert_eq!(h.comm, comm_of(child.pid));
    assert!(h.open && h.mapped);
    let groups = group_by_prefix(&files);
    assert!(groups[0].live);
    assert_eq!(groups[0].holders[0].pid, child.pid);

    for dry_run in [true, false] {
        let report = clear_stale(
            std::slice::from_ref(&m.mount),
            proc_root(),
            Some("heldpfx_"),
            dry_run,
        )
        .unwrap();
        assert!(report.removed.is_empty(), "{report:#?}");
        assert_eq!(report.kept_in_use.len(), 1);
        assert_eq!(report.kept_in_use[0].holders[0].pid, child.pid);
        assert!(path.exists());
    }
    let free_while_held = global_free();

    child.kill();
    let files = scan_mount(&m.mount, proc_root()).unwrap();
    let f = by_name(&files, "heldpfx_map_0_0");
    assert_eq!((f.lock, f.in_use(), f.pages), (LockState::Free, false, 1));

    let dry = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.removed.len(), 1);
    assert!(path.exists(), "a dry run removes nothing");

    let report = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, false).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:#?}");
    assert_eq!(report.removed[0].path, path);
    assert_eq!(
        report.pages_freed,
        [PageCount {
            page_size: PageSize::SIZE_2M,
            pages: 1
        }]
    );
    assert!(report.kept_in_use.is_empty() && report.failed.is_empty());
    assert!(!path.exists());
    assert!(m.all_free(), "mount usage after clear: {:?}", m.usage());
    eventually_global_free_at_least(free_while_held + 1);
}

#[test]
fn mapping_without_lock_counts_as_in_use() {
    isolated(
        "mapping_without_lock_counts_as_in_use",
        1,
        mapped_only_scenario,
    );
}

fn mapped_only_scenario() {
    let m = TestMount::new(1);
    let path = m.file("mappfx_map_3", 0);
    let mut child = hold(&path, "map");
    let files = scan_mount(&m.mount, proc_root()).unwrap();
    let f = by_name(&files, "mappfx_map_3");
    assert_eq!((f.lock, f.pages), (LockState::Free, 1));
    assert!(f.in_use());
    assert_eq!(f.holders.len(), 1);
    assert_eq!(f.holders[0].pid, child.pid);
    assert!(f.holders[0].mapped && !f.holders[0].open);

    let report = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, false).unwrap();
    assert!(report.removed.is_empty(), "{report:#?}");
    assert_eq!(report.kept_in_use[0].holders[0].pid, child.pid);
    assert!(path.exists());

    child.kill();
    let report = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, false).unwrap();
    assert_eq!(report.removed.len(), 1);
    assert!(!path.exists());
    assert!(m.all_free());
}

#[test]
fn clear_touches_only_stale_page_files() {
    isolated(
        "clear_touches_only_stale_page_files",
        3,
        clear_safety_scenario,
    );
}

fn clear_safety_scenario() {
    let m = TestMount::new(3);
    let a = m.file("stalea_map_0", 1);
    let b = m.file("staleb_map_0", 1);
    let keep = m.file("keep.dat", 1);
    let link = m.path("linkpfx_map_0");
    // Some kernels refuse symlinks on hugetlbfs (EINVAL); test them when
    // they can exist.
    let have_link = match std::os::unix::fs::symlink(&a, &link) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("no symlink on hugetlbfs here ({e}); that case is not tested");
            false
        }
    };
    fs::create_dir(m.path("dirpfx_map_0")).unwrap();
    let nested = m.file("dirpfx_map_0/deep_map_0", 0);

    // Filtered: only that prefix, and the rest is not even reported.
    let r = clear_stale(
        std::slice::from_ref(&m.mount),
        proc_root(),
        Some("stalea_"),
        false,
    )
    .unwrap();
    let removed: Vec<&Path> = r.removed.iter().map(|f| f.path.as_path()).collect();
    assert_eq!(removed, [a.as_path()]);
    assert!(r.skipped_unknown.is_empty(), "{r:#?}");
    assert!(b.exists() && !a.exists());

    // A live process holding the directory lock (as DPDK does while it
    // allocates) makes clear wait, then skip the mount.
    let mut dirlock = hold(&m.mount.path, "dirlock");
    let start = Instant::now();
    let r = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, false).unwrap();
    assert_eq!(r.busy_mounts, std::slice::from_ref(&m.mount.path));
    assert!(r.removed.is_empty() && b.exists());
    assert!(start.elapsed() >= DIR_LOCK_WAIT);
    dirlock.kill();

    let r = clear_stale(std::slice::from_ref(&m.mount), proc_root(), None, false).unwrap();
    let removed: Vec<&Path> = r.removed.iter().map(|f| f.path.as_path()).collect();
    assert_eq!(removed, [b.as_path()]);
    let mut skipped = r.skipped_unknown.clone();
    skipped.sort();
    let mut want = vec![m.path("dirpfx_map_0"), keep.clone()];
    if have_link {
        want.push(link.clone());
    }
    want.sort();
    assert_eq!(skipped, want);
    assert!(keep.exists() && nested.exists());
    if have_link {
        assert!(fs::symlink_metadata(&link).is_ok(), "symlink left alone");
    }

    fs::remove_file(&keep).unwrap();
    assert!(m.all_free(), "{:?}", m.usage());
}

#[test]
fn non_hugetlbfs_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("rtemap_0"), "not a hugepage").unwrap();
    let mount = HugetlbfsMount {
        path: dir.path().to_path_buf(),
        page_size: PageSize::SIZE_2M,
        options: String::new(),
        size_limit: None,
    };
    let err = scan_mount(&mount, proc_root()).unwrap_err().to_string();
    assert!(err.contains("not a hugetlbfs mount"), "{err}");
    let err = clear_stale(&[mount], proc_root(), None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a hugetlbfs mount"), "{err}");
    assert!(dir.path().join("rtemap_0").exists());
}

#[test]
fn holders_from_a_fake_proc_tree() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("rtemap_0");
    let other = data.path().join("unrelated");
    fs::write(&file, "x").unwrap();
    fs::write(&other, "y").unwrap();
    let id = FileId::of(&file).unwrap();

    let proc = tempfile::tempdir().unwrap();
    let p = proc.path();
    let mk = |rel: &str| fs::create_dir_all(p.join(rel)).unwrap();
    // 100: has it open on fd 3 (plus a socket and an unrelated file).
    mk("100/fd");
    fs::write(p.join("100/comm"), "opener\n").unwrap();
    std::os::unix::fs::symlink(&file, p.join("100/fd/3")).unwrap();
    std::os::unix::fs::symlink("socket:[1234]", p.join("100/fd/4")).unwrap();
    std::os::unix::fs::symlink(&other, p.join("100/fd/5")).unwrap();
    // 200: maps it (no descriptor).
    mk("200/fd");
    fs::write(p.join("200/comm"), "mapper\n").unwrap();
    let maj = rustix::fs::major(id.dev);
    let min = rustix::fs::minor(id.dev);
    let maps = format!(
        "7f0000000000-7f0000200000 rw-s 00000000 {maj:02x}:{min:02x} {}    {}\n\
         7ffd1000-7ffd2000 rw-p 00000000 00:00 0     [stack]\n",
        id.ino,
        file.display()
    );
    fs::write(p.join("200/maps"), &maps).unwrap();
    assert_eq!(parse_maps_line(maps.lines().next().unwrap()), Some(id));
    // 300: unrelated; "self" and junk entries are ignored.
    mk("300/fd");
    fs::write(p.join("300/comm"), "bystander\n").unwrap();
    mk("self");
    mk("sys");

    let found = find_holders(p, &[id], &[]);
    let holders = &found[&id];
    let summary: Vec<(u32, &str, bool, bool)> = holders
        .iter()
        .map(|h| (h.pid, h.comm.as_str(), h.open, h.mapped))
        .collect();
    assert_eq!(
        summary,
        [(100, "opener", true, false), (200, "mapper", false, true)]
    );
    // A descriptor the caller names as its own is not a holder.
    let found = find_holders(p, &[id], &[(100, 3)]);
    assert_eq!(found[&id].len(), 1);
    assert_eq!(found[&id][0].pid, 200);
    // A proc root that does not exist yields no holders rather than an error.
    assert!(find_holders(&p.join("missing"), &[id], &[]).is_empty());
}

fn fake_file(prefix: Option<&str>, size: PageSize, pages: u64, holder: Option<u32>) -> HugeFile {
    HugeFile {
        path: PathBuf::from(format!("/x/{}map_{pages}", prefix.unwrap_or("other"))),
        mount: PathBuf::from("/x"),
        page_size: size,
        prefix: prefix.map(str::to_string),
        pages,
        bytes: pages * size.bytes(),
        len: pages * size.bytes(),
        uid: 0,
        lock: if holder.is_some() {
            LockState::Held
        } else {
            LockState::Free
        },
        holders: holder
            .map(|pid| memplane::hugepages::files::Holder {
                pid,
                comm: "app".into(),
                open: true,
                mapped: pid % 2 == 0,
            })
            .into_iter()
            .collect(),
    }
}

#[test]
fn grouping_by_prefix_sums_pages_per_size_and_merges_holders() {
    let files = vec![
        fake_file(None, PageSize::SIZE_2M, 1, None),
        fake_file(Some("b"), PageSize::SIZE_2M, 2, Some(7)),
        fake_file(Some("a"), PageSize::SIZE_1G, 1, None),
        fake_file(Some("b"), PageSize::SIZE_1G, 1, Some(7)),
        fake_file(Some("b"), PageSize::SIZE_2M, 3, Some(8)),
        fake_file(Some("a"), PageSize::SIZE_2M, 4, None),
    ];
    let groups = group_by_prefix(&files);
    let names: Vec<Option<&str>> = groups.iter().map(|g| g.prefix.as_deref()).collect();
    assert_eq!(names, [Some("a"), Some("b"), None]);
    let a = &groups[0];
    assert!(!a.live && a.holders.is_empty());
    assert_eq!(
        a.pages,
        [
            PageCount {
                page_size: PageSize::SIZE_2M,
                pages: 4
            },
            PageCount {
                page_size: PageSize::SIZE_1G,
                pages: 1
            }
        ]
    );
    assert_eq!(a.bytes, 4 * MB2 + (1 << 30));
    let b = &groups[1];
    assert!(b.live);
    let pids: Vec<u32> = b.holders.iter().map(|h| h.pid).collect();
    assert_eq!(pids, [7, 8]);
    assert_eq!(b.pages[0].pages, 5);
    assert_eq!(groups[2].files.len(), 1);
    // It serializes for `--json` output.
    let json = serde_json::to_string(&groups).unwrap();
    assert!(json.contains("\"prefix\":\"b\""), "{json}");
}
