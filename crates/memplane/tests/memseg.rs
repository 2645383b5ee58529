//! Memseg lists and the page allocator on real hugepages: every backing,
//! free counts back after free and after drop, no SIGBUS on shortfall,
//! IOVAs against pagemap, events, validators, bad input.

mod common;
mod procs;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use memplane::memseg::{MemEvent, MemEventKind, MemsegError, PageRequest};
use memplane::options::IovaMode;
use memplane::{Error, MemOptions, Memory, PageSize};

use common::{need_hugepages, pool_lock, real_counter};

const MB: u64 = 1 << 20;

fn free_2m() -> u64 {
    real_counter(2048, "free_hugepages")
}

fn free_1g() -> u64 {
    real_counter(1_048_576, "free_hugepages")
}

/// Options with a per-test prefix and a private runtime directory.
fn opts(name: &str) -> (MemOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let o = MemOptions::new()
        .file_prefix(format!("ms_{name}_{}", std::process::id()))
        .runtime_dir(dir.path())
        .build()
        .unwrap();
    (o, dir)
}

fn memseg_err(e: Error) -> MemsegError {
    match e {
        Error::Memseg(m) => m,
        other => panic!("expected a memseg error, got {other}"),
    }
}

/// Writes a pattern over a range and reads it back.
fn touch(va: usize, len: usize, byte: u8) {
    // SAFETY: the caller passes a range it allocated and nobody else uses.
    let s = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, len) };
    s[0] = byte;
    s[len / 2] = byte;
    s[len - 1] = byte;
    assert_eq!((s[0], s[len / 2], s[len - 1]), (byte, byte, byte));
}

#[test]
fn alloc_write_free_2m_memfd_gives_every_page_back() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, rt) = opts("basic");
    let mem = Memory::init(&o).unwrap();
    assert!(rt.path().join("memplane").join(&o.file_prefix).is_dir());
    assert_eq!(free_2m(), before, "dynamic mode maps nothing at init");

    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap();
    assert_eq!(runs.len(), 1);
    let r = runs[0];
    assert_eq!((r.count, r.len), (4, 8 * MB as usize));
    assert_eq!(r.va % (2 * MB as usize), 0);
    assert!(r.zeroed);
    assert_eq!(free_2m(), before - 4, "pages are reserved at allocation");
    // SAFETY: fresh pages, ours.
    let first = unsafe { *(r.va as *const u64) };
    assert_eq!(first, 0, "fresh hugepages come zeroed");
    touch(r.va, r.len, 0x5a);

    let mut seen = Vec::new();
    mem.memseg_walk(|s| {
        seen.push((s.va, s.len, s.node));
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0], (r.va, 2 * MB as usize, 0));
    let seg = mem.virt2memseg(r.va + 3 * MB as usize).unwrap();
    assert_eq!((seg.slot, seg.va), (r.first + 1, r.va + 2 * MB as usize));
    let list = mem.virt2memseg_list(r.va).unwrap();
    assert_eq!(list.used, 4);
    assert_eq!(list.page_size, PageSize::SIZE_2M);
    assert!(list.capacity >= 4);

    // A second allocation lands after the first; a best-effort one too.
    let r2 = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2).best_effort_contiguity())
        .unwrap();
    assert_eq!(r2.iter().map(|r| r.count).sum::<u32>(), 2);
    assert_eq!(free_2m(), before - 6);

    mem.free_pages(r.va, r.len).unwrap();
    assert_eq!(free_2m(), before - 2, "freed pages go back at once");
    assert!(mem.virt2memseg(r.va).is_none());
    // Freeing again is a typed error, and nothing moves.
    let e = memseg_err(mem.free_pages(r.va, r.len).unwrap_err());
    assert!(matches!(e, MemsegError::NotAllocated { .. }), "{e}");
    assert_eq!(free_2m(), before - 2);

    // The freed VA is reserved again: a new allocation reuses the slots.
    let r3 = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap();
    assert_eq!(r3[0].va, r.va);
    // SAFETY: fresh pages, ours.
    let again = unsafe { *(r3[0].va as *const u8) };
    assert_eq!(again, 0, "re-allocated pages are fresh, not the old data");

    drop(mem);
    assert_eq!(free_2m(), before, "drop gives everything back");
    assert!(
        !rt.path().join("memplane").join(&o.file_prefix).exists(),
        "the primary removes its runtime directory"
    );
}

#[test]
fn one_gig_pages_map_and_free() {
    if !need_hugepages(1_048_576, 1) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_1g();
    let (o, _rt) = opts("onegig");
    let mem = Memory::init(&o).unwrap();
    let lists = mem.lists();
    assert!(
        lists.iter().any(|l| l.page_size == PageSize::SIZE_1G),
        "a 1G list exists: {lists:?}"
    );
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_1G, 1))
        .unwrap()[0];
    assert_eq!(r.va % (1 << 30), 0, "1G pages are 1G-aligned");
    assert_eq!(free_1g(), before - 1);
    touch(r.va, r.len, 7);
    mem.free_run(&r).unwrap();
    assert_eq!(free_1g(), before);
    drop(mem);
    assert_eq!(free_1g(), before);
}

#[test]
fn socket_mem_is_preallocated_pinned_and_released_at_drop() {
    if !need_hugepages(2048, 32) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (mut o, _rt) = opts("sockmem");
    o.socket_mem = Some(vec![64 * MB]);
    o.pagesz_mem = vec![(PageSize::SIZE_1G, 0)];
    let mem = Memory::init(&o).unwrap();
    assert_eq!(free_2m(), before - 32);
    assert_eq!(mem.node_total(0), 64 * MB);
    let mut pinned = 0;
    let mut first_va = 0;
    mem.memseg_walk(|s| {
        assert!(s.pinned);
        if pinned == 0 {
            first_va = s.va;
        }
        pinned += 1;
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(pinned, 32);
    let e = memseg_err(mem.free_pages(first_va, 2 * MB as usize).unwrap_err());
    assert!(matches!(e, MemsegError::Pinned { .. }), "{e}");
    assert_eq!(free_2m(), before - 32);
    let mut runs = 0;
    mem.contig_walk(|r| {
        runs += 1;
        assert_eq!(r.count, 32, "one contiguous run");
        ControlFlow::<()>::Continue(())
    });
    assert_eq!(runs, 1);
    drop(mem);
    assert_eq!(free_2m(), before);
}

#[test]
fn asking_for_more_than_is_free_is_an_error_not_sigbus() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("overask");
    let mem = Memory::init(&o).unwrap();
    let cap = mem
        .lists()
        .iter()
        .find(|l| l.page_size == PageSize::SIZE_2M)
        .unwrap()
        .capacity;
    let ask = u32::try_from(before + 1).unwrap();
    assert!(ask <= cap, "the list can hold more than the pool");
    let e = memseg_err(
        mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, ask))
            .unwrap_err(),
    );
    assert!(matches!(e, MemsegError::OutOfPages { .. }), "{e}");
    assert!(e.to_string().contains("hugepages reserve"), "{e}");
    assert_eq!(free_2m(), before, "a failed fallocate keeps nothing");
    assert_eq!(mem.total_mapped(), 0);

    // As many as possible: every free page, then nothing is left over.
    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, ask).as_many_as_possible())
        .unwrap();
    let got: u32 = runs.iter().map(|r| r.count).sum();
    assert_eq!(u64::from(got), before);
    assert_eq!(free_2m(), 0);
    for r in &runs {
        mem.free_run(r).unwrap();
    }
    assert_eq!(free_2m(), before);
}

#[test]
fn events_fire_in_order_with_the_right_ranges() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("events");
    let mem = Arc::new(Memory::init(&o).unwrap());
    let log: Arc<Mutex<Vec<MemEvent>>> = Arc::default();
    let walked: Arc<Mutex<Vec<usize>>> = Arc::default();
    {
        let log = Arc::clone(&log);
        mem.register_event_callback("recorder", move |ev| log.lock().unwrap().push(*ev))
            .unwrap();
    }
    {
        // A callback may walk (the lock is held by its own thread) but
        // not allocate.
        let weak = Arc::downgrade(&mem);
        let walked = Arc::clone(&walked);
        mem.register_event_callback("walker", move |_| {
            let m = weak.upgrade().unwrap();
            let mut n = 0;
            m.memseg_walk(|_| {
                n += 1;
                ControlFlow::<()>::Continue(())
            });
            walked.lock().unwrap().push(n);
            let e = m
                .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
                .unwrap_err();
            assert!(
                matches!(e, Error::Memseg(MemsegError::Reentrant { .. })),
                "{e}"
            );
        })
        .unwrap();
    }
    let a = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2))
        .unwrap()[0];
    let b = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 3))
        .unwrap()[0];
    mem.free_run(&a).unwrap();
    mem.unregister_event_callback("walker").unwrap();
    mem.free_run(&b).unwrap();
    let log = log.lock().unwrap().clone();
    let want = |kind, r: &memplane::memseg::PageRun| MemEvent {
        kind,
        addr: r.va,
        len: r.len,
        page_size: PageSize::SIZE_2M,
        node: 0,
    };
    assert_eq!(
        log,
        vec![
            want(MemEventKind::Alloc, &a),
            want(MemEventKind::Alloc, &b),
            want(MemEventKind::Free, &a),
            want(MemEventKind::Free, &b),
        ]
    );
    // ALLOC fires after the pages are recorded, FREE before they go.
    assert_eq!(*walked.lock().unwrap(), vec![2, 5, 5]);
}

#[test]
fn validators_and_socket_limit_refuse_growth_over_their_limit() {
    if !need_hugepages(2048, 6) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("validator");
    let mem = Memory::init(&o).unwrap();
    let asked: Arc<Mutex<Vec<(u32, u64, u64)>>> = Arc::default();
    {
        let asked = Arc::clone(&asked);
        mem.register_validator("cap8m", 0, 8 * MB, move |node, limit, total| {
            asked.lock().unwrap().push((node, limit, total));
            false
        })
        .unwrap();
    }
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap()[0];
    assert!(asked.lock().unwrap().is_empty(), "at the limit: not asked");
    let e = memseg_err(
        mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
            .unwrap_err(),
    );
    assert!(matches!(e, MemsegError::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("cap8m"), "{e}");
    assert_eq!(*asked.lock().unwrap(), vec![(0, 8 * MB, 10 * MB)]);
    assert_eq!(
        mem.node_total(0),
        8 * MB,
        "the refused allocation changed nothing"
    );
    mem.unregister_validator("cap8m", 0).unwrap();
    let r2 = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    mem.free_run(&r2).unwrap();
    mem.free_run(&r).unwrap();
    drop(mem);

    // --socket-limit: a built-in validator, and the lists are sized by it.
    let (mut o, _rt) = opts("socklimit");
    o.socket_limit = Some(vec![6 * MB]);
    let mem = Memory::init(&o).unwrap();
    let l2m = mem
        .lists()
        .into_iter()
        .find(|l| l.page_size == PageSize::SIZE_2M)
        .unwrap();
    assert_eq!(l2m.capacity, 3, "list capacity comes from --socket-limit");
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 3))
        .unwrap()[0];
    let e = memseg_err(
        mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
            .unwrap_err(),
    );
    assert!(
        matches!(&e, MemsegError::LimitExceeded { by, .. } if by == "--socket-limit"),
        "{e}"
    );
    mem.free_run(&r).unwrap();
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("badinput");
    let mem = Memory::init(&o).unwrap();
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    let lists_before = mem.lists();
    let err = |res: memplane::Result<Vec<memplane::memseg::PageRun>>| memseg_err(res.unwrap_err());

    let e = err(mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 0)));
    assert!(matches!(e, MemsegError::ZeroPages), "{e}");
    let e = err(mem.alloc_pages(&PageRequest::new(7, PageSize::SIZE_2M, 1)));
    assert!(matches!(e, MemsegError::NoSuchNode { node: 7, .. }), "{e}");
    let e = err(mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_4K, 1)));
    assert!(matches!(e, MemsegError::NoSuchPageSize { .. }), "{e}");
    assert!(
        e.to_string().contains("2 MiB") || e.to_string().contains("2M"),
        "{e}"
    );
    let e = err(mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, u32::MAX)));
    assert!(matches!(e, MemsegError::NoRoom { .. }), "{e}");

    let fe = |res: memplane::Result<()>| memseg_err(res.unwrap_err());
    let e = fe(mem.free_pages(0x1000, 4096));
    assert!(matches!(e, MemsegError::NotInAnyList { .. }), "{e}");
    let e = fe(mem.free_pages(r.va + 4096, r.len));
    assert!(matches!(e, MemsegError::BadRange { .. }), "{e}");
    let e = fe(mem.free_pages(r.va, 0));
    assert!(matches!(e, MemsegError::BadRange { .. }), "{e}");
    let e = fe(mem.free_pages(r.va, 2 * r.len));
    assert!(matches!(e, MemsegError::NotAllocated { .. }), "{e}");
    let e = fe(mem.free_pages(r.va + r.len, r.len));
    assert!(matches!(e, MemsegError::NotAllocated { .. }), "{e}");

    let e = fe(mem.register_event_callback("", |_| {}));
    assert!(matches!(e, MemsegError::CallbackName { .. }), "{e}");
    let e = fe(mem.register_event_callback(&"x".repeat(64), |_| {}));
    assert!(matches!(e, MemsegError::CallbackName { .. }), "{e}");
    mem.register_event_callback("dup", |_| {}).unwrap();
    let e = fe(mem.register_event_callback("dup", |_| {}));
    assert!(matches!(e, MemsegError::CallbackName { .. }), "{e}");
    let e = fe(mem.unregister_event_callback("nope"));
    assert!(matches!(e, MemsegError::NoSuchCallback { .. }), "{e}");
    let e = fe(mem.register_validator("v", 9, 0, |_, _, _| true));
    assert!(matches!(e, MemsegError::NoSuchNode { .. }), "{e}");
    let e = fe(mem.unregister_validator("v", 0));
    assert!(matches!(e, MemsegError::NoSuchCallback { .. }), "{e}");

    assert_eq!(mem.lists(), lists_before, "no bad call changed a list");
    mem.free_run(&r).unwrap();

    // A VA hint that cannot be honoured: someone sits there.
    let (mut o2, _rt2) = opts("badhint");
    o2.base_virtaddr = Some(mem.base_va() as u64);
    let e = Memory::init(&o2).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--base-virtaddr"), "{msg}");
    // Aligned for the options (16 MiB) but not for a 1 GiB list, or
    // inside the first instance's range: refused either way, saying why.
    o2.base_virtaddr = Some(mem.base_va() as u64 + 16 * MB);
    let e = Memory::init(&o2).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--base-virtaddr"), "{msg}");
}

#[test]
fn two_instances_live_side_by_side() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (a_opts, _ra) = opts("twin_a");
    let (b_opts, _rb) = opts("twin_b");
    let a = Memory::init(&a_opts).unwrap();
    let b = Memory::init(&b_opts).unwrap();
    assert_ne!(a.base_va(), b.base_va());
    let ra = a
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    let rb = b
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    assert!(b.virt2memseg(ra.va).is_none());
    let e = memseg_err(b.free_run(&ra).unwrap_err());
    assert!(matches!(e, MemsegError::NotInAnyList { .. }), "{e}");
    a.free_run(&ra).unwrap();
    b.free_run(&rb).unwrap();
}

#[test]
fn iova_pa_mode_matches_pagemap_and_reports_contiguity() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let access = memplane::iova::PaAccess::probe();
    if access != memplane::iova::PaAccess::PhysicalAddresses {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root: pagemap must give frames"
        );
        eprintln!("SKIPPED: physical addresses are not readable here ({access:?})");
        return;
    }
    let _pool = pool_lock(false);
    let (mut o, _rt) = opts("iovapa");
    o.iova_mode = Some(IovaMode::Pa);
    let mem = Memory::init(&o).unwrap();
    assert_eq!(mem.iova_mode(), IovaMode::Pa);
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap()[0];
    let pm = memplane::iova::Pagemap::open().unwrap();
    let psz = 2 * MB as usize;
    let mut pas = Vec::new();
    for k in 0..4 {
        let va = r.va + k * psz;
        let pa = pm.phys_addr(va + 4096).unwrap().unwrap() - 4096;
        assert_eq!(pa % psz as u64, 0);
        assert_eq!(mem.virt2iova(va + 4096 + 17), Some(pa + 4096 + 17));
        assert_eq!(mem.iova2virt(pa + 99), Some(va + 99));
        pas.push(pa);
    }
    assert!(
        mem.is_iova_contiguous(r.va, psz).unwrap(),
        "one page is always contiguous"
    );
    let contiguous = pas.windows(2).all(|w| w[1] == w[0] + psz as u64);
    assert_eq!(
        mem.is_iova_contiguous(r.va, 4 * psz).unwrap(),
        contiguous,
        "{pas:x?}"
    );
    let pair = pas[1] == pas[0] + psz as u64;
    assert_eq!(mem.is_iova_contiguous(r.va + psz - 1, 2).unwrap(), pair);
    // Past the allocated pages: not contiguous (not even used).
    assert!(!mem.is_iova_contiguous(r.va, 5 * psz).unwrap());
    mem.free_run(&r).unwrap();
    drop(mem);

    let (mut o, _rt) = opts("iovava");
    o.iova_mode = Some(IovaMode::Va);
    let mem = Memory::init(&o).unwrap();
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2))
        .unwrap()[0];
    assert_eq!(mem.virt2iova(r.va + 5), Some(r.va as u64 + 5));
    assert!(mem.is_iova_contiguous(r.va, r.len).unwrap());
    mem.free_run(&r).unwrap();
}

#[test]
fn no_huge_uses_4k_pages_fixed_at_init() {
    let (mut o, _rt) = opts("nohuge");
    o.no_huge = true;
    o.memory_size = Some(8 * MB);
    let mem = Memory::init(&o).unwrap();
    let lists = mem.lists();
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].page_size, PageSize::SIZE_4K);
    assert_eq!(lists[0].used, 2048);
    assert_eq!(
        lists[0].backing,
        memplane::memseg::BackingKind::AnonymousMemfd
    );
    let mut first = None;
    mem.contig_walk(|r| {
        first = Some(*r);
        ControlFlow::<()>::Continue(())
    });
    let run = first.unwrap();
    touch(run.va, run.len, 3);
    let e = memseg_err(
        mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_4K, 1))
            .unwrap_err(),
    );
    assert!(matches!(e, MemsegError::FixedMemory { .. }), "{e}");
}

/// Child role: init, map 8 pages, report ready, wait to be killed.
#[test]
fn child_holds_pages() {
    if procs::role().as_deref() != Some("hold") {
        return;
    }
    let prefix = std::env::var("MS_PREFIX").unwrap();
    let rt = std::env::var("MS_RUNTIME").unwrap();
    let o = MemOptions::new()
        .file_prefix(prefix)
        .runtime_dir(rt)
        .build()
        .unwrap();
    let mem = Memory::init(&o).unwrap();
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 8))
        .unwrap()[0];
    touch(r.va, r.len, 1);
    std::mem::forget(mem);
    procs::ready_and_wait();
}

#[test]
fn sigkilled_holder_leaves_no_pages_behind() {
    if procs::role().is_some() || !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let rt = tempfile::tempdir().unwrap();
    let mut cmd = procs::self_command("child_holds_pages", "hold");
    cmd.env("MS_PREFIX", format!("ms_kill_{}", std::process::id()))
        .env("MS_RUNTIME", rt.path());
    let mut child = procs::Child::start(cmd);
    assert_eq!(free_2m(), before - 8, "the child holds 8 pages");
    child.kill();
    // The kernel frees a memfd's pages when its last user is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while free_2m() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(free_2m(), before, "SIGKILL left no hugepage taken");
}

/// Files of `prefix` in the hugetlbfs mount.
fn files_of(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/hugepages")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn hugetlbfs_mounted() -> bool {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/dev/hugepages") && l.contains("pagesize=2M")
        });
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: setup mounts hugetlbfs (pagesize=2M) at /dev/hugepages"
        );
        eprintln!("SKIPPED: no 2M hugetlbfs mount at /dev/hugepages");
    }
    mounted
}

#[test]
fn hugetlbfs_backing_file_per_page_and_per_list() {
    if !need_hugepages(2048, 4) || !hugetlbfs_mounted() {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    for single in [false, true] {
        let (mut o, _rt) = opts(if single { "fs_single" } else { "fs_page" });
        o.huge_dir = Some("/dev/hugepages".into());
        o.single_file_segments = single;
        let prefix = o.file_prefix.clone();
        let mem = Memory::init(&o).unwrap();
        let lists = mem.lists();
        assert_eq!(lists.len(), 1, "only the mount's page size: {lists:?}");
        let r = mem
            .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 3))
            .unwrap()[0];
        touch(r.va, r.len, 9);
        assert_eq!(free_2m(), before - 3);
        let files = files_of(&prefix);
        if single {
            assert_eq!(files, vec![format!("{prefix}map_0")]);
        } else {
            let want: Vec<String> = (r.first..r.first + 3)
                .map(|s| format!("{prefix}map_0_{s}"))
                .collect();
            let mut want = want;
            want.sort();
            assert_eq!(files, want);
        }
        // Free the middle page only.
        mem.free_pages(r.va + 2 * MB as usize, 2 * MB as usize)
            .unwrap();
        assert_eq!(free_2m(), before - 2);
        if !single {
            assert_eq!(files_of(&prefix).len(), 2);
        }
        drop(mem);
        assert_eq!(free_2m(), before, "single_file={single}");
        assert!(
            files_of(&prefix).is_empty(),
            "no file left: {:?}",
            files_of(&prefix)
        );
    }
}

/// Child role: hugetlbfs-backed instance holding 2 pages.
#[test]
fn child_holds_file_pages() {
    if procs::role().as_deref() != Some("hold_files") {
        return;
    }
    let o = MemOptions::new()
        .file_prefix(std::env::var("MS_PREFIX").unwrap())
        .runtime_dir(std::env::var("MS_RUNTIME").unwrap())
        .huge_dir("/dev/hugepages")
        .build()
        .unwrap();
    let mem = Memory::init(&o).unwrap();
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2))
        .unwrap()[0];
    touch(r.va, r.len, 1);
    std::mem::forget(mem);
    procs::ready_and_wait();
}

#[test]
fn files_of_a_killed_process_are_reclaimed_at_the_next_start() {
    if procs::role().is_some() || !need_hugepages(2048, 2) || !hugetlbfs_mounted() {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let rt = tempfile::tempdir().unwrap();
    let prefix = format!("ms_crash_{}", std::process::id());
    let mut cmd = procs::self_command("child_holds_file_pages", "hold_files");
    cmd.env("MS_PREFIX", &prefix).env("MS_RUNTIME", rt.path());
    let mut child = procs::Child::start(cmd);
    child.kill();
    assert_eq!(
        files_of(&prefix).len(),
        2,
        "hugetlbfs files outlive a SIGKILL"
    );
    assert_eq!(free_2m(), before - 2, "and keep their pages");
    let o = MemOptions::new()
        .file_prefix(&prefix)
        .runtime_dir(rt.path())
        .huge_dir("/dev/hugepages")
        .build()
        .unwrap();
    let mem = Memory::init(&o).unwrap();
    assert!(files_of(&prefix).is_empty(), "the next start reclaims them");
    assert_eq!(free_2m(), before);
    drop(mem);
}

#[test]
fn threads_allocating_and_freeing_at_once_never_share_a_page() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("threads");
    let mem = Memory::init(&o).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let mem = &mem;
            s.spawn(move || {
                for round in 0..50u32 {
                    let n = 1 + (round + u32::from(t)) % 3;
                    let req = PageRequest::new(0, PageSize::SIZE_2M, n);
                    let r = match mem.alloc_pages(&req) {
                        Ok(r) => r[0],
                        // Other tests may hold pages: running short is fine.
                        Err(Error::Memseg(MemsegError::OutOfPages { .. })) => continue,
                        Err(e) => panic!("{e}"),
                    };
                    // Stamp every page; another thread stamping ours would
                    // show up when we read it back.
                    for p in 0..n as usize {
                        let va = r.va + p * 2 * MB as usize;
                        // SAFETY: our pages until freed below.
                        unsafe {
                            std::ptr::write_volatile(va as *mut u32, u32::from(t) << 16 | round);
                        }
                    }
                    std::thread::yield_now();
                    for p in 0..n as usize {
                        let va = r.va + p * 2 * MB as usize;
                        // SAFETY: as above.
                        let v = unsafe { std::ptr::read_volatile(va as *const u32) };
                        assert_eq!(v, u32::from(t) << 16 | round, "page shared between threads");
                    }
                    mem.free_run(&r).unwrap();
                }
            });
        }
    });
    assert_eq!(mem.total_mapped(), 0);
    let lists = mem.lists();
    let l = lists
        .iter()
        .find(|l| l.page_size == PageSize::SIZE_2M)
        .unwrap();
    assert!(l.version >= 2, "every map and unmap bumps the version");
}

/// Removes a prefix's hugepage files when dropped.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in files_of(&self.0) {
            let _ = std::fs::remove_file(format!("/dev/hugepages/{f}"));
        }
    }
}

#[test]
fn huge_unlink_never_keeps_files_for_the_next_run_and_marks_pages_dirty() {
    if !need_hugepages(2048, 2) || !hugetlbfs_mounted() {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (mut o, _rt) = opts("never");
    o.huge_dir = Some("/dev/hugepages".into());
    o.huge_unlink = memplane::options::HugeUnlink::Never;
    let prefix = o.file_prefix.clone();
    let cleanup = Cleanup(prefix.clone());
    let mem = Memory::init(&o).unwrap();
    let r = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    assert!(r.zeroed);
    touch(r.va, r.len, 0x77);
    drop(mem);
    assert_eq!(files_of(&prefix).len(), 1, "never: the file survives");
    let mem = Memory::init(&o).unwrap();
    assert_eq!(
        files_of(&prefix).len(),
        1,
        "never: init does not reclaim it"
    );
    let r2 = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    assert_eq!(r2.first, r.first);
    assert!(!r2.zeroed, "a reused file is dirty");
    // SAFETY: our page.
    let old = unsafe { *(r2.va as *const u8) };
    assert_eq!(old, 0x77, "old content is back");
    assert!(mem.virt2memseg(r2.va).unwrap().dirty);
    drop(mem);
    drop(cleanup);
    assert_eq!(free_2m(), before);
}

/// The cgroup2 mount point with the hugetlb controller available, if any.
fn cgroup2_with_hugetlb() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let dir = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| std::path::PathBuf::from(f[1]))?;
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    controllers
        .split_whitespace()
        .any(|c| c == "hugetlb")
        .then_some(dir)
}

/// Child role: join the cgroup named in MS_CGROUP, then allocate past its
/// hugetlb limit.
#[test]
fn child_in_limited_cgroup() {
    if procs::role().as_deref() != Some("cgroup") {
        return;
    }
    let cg = std::env::var("MS_CGROUP").unwrap();
    std::fs::write(format!("{cg}/cgroup.procs"), "0").unwrap();
    let o = MemOptions::new()
        .file_prefix(std::env::var("MS_PREFIX").unwrap())
        .runtime_dir(std::env::var("MS_RUNTIME").unwrap())
        .build()
        .unwrap();
    let mem = Memory::init(&o).unwrap();
    let over = mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 3));
    let over = match over {
        Ok(_) => "over:ok".to_string(),
        Err(Error::Memseg(e @ MemsegError::OutOfPages { .. })) => {
            let msg = e.to_string();
            if msg.contains("cgroup limit stopped it") && msg.contains("hugetlb.2MB.max") {
                "over:OutOfPages".to_string()
            } else {
                format!("over:OutOfPages without naming the cgroup: {msg}")
            }
        }
        Err(e) => format!("over:{e}"),
    };
    let within = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 2))
        .map_or("within:err", |r| {
            touch(r[0].va, r[0].len, 5);
            "within:ok"
        });
    drop(mem);
    procs::report_and_exit(&format!("{over} {within}"));
}

/// Removes a cgroup directory when dropped.
struct RmCgroup(std::path::PathBuf);

impl Drop for RmCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn hugetlb_cgroup_limit_is_an_error_not_sigbus() {
    if procs::role().is_some() || !need_hugepages(2048, 3) {
        return;
    }
    let Some(root) = cgroup2_with_hugetlb().filter(|_| rustix::process::geteuid().is_root()) else {
        eprintln!("SKIPPED: needs root and a cgroup2 mount with the hugetlb controller");
        return;
    };
    let _pool = pool_lock(false);
    let subtree = root.join("cgroup.subtree_control");
    if std::fs::write(&subtree, "+hugetlb").is_err() {
        eprintln!(
            "SKIPPED: cannot enable the hugetlb controller in {}",
            subtree.display()
        );
        return;
    }
    let cg = root.join(format!("memplane_test_{}", std::process::id()));
    std::fs::create_dir(&cg).unwrap();
    let _rm = RmCgroup(cg.clone());
    std::fs::write(cg.join("hugetlb.2MB.max"), (4 * MB).to_string()).unwrap();
    let rt = tempfile::tempdir().unwrap();
    let mut cmd = procs::self_command("child_in_limited_cgroup", "cgroup");
    cmd.env("MS_CGROUP", &cg)
        .env("MS_PREFIX", format!("ms_cg_{}", std::process::id()))
        .env("MS_RUNTIME", rt.path());
    let result = procs::run_for_result(cmd);
    assert_eq!(
        result, "over:OutOfPages within:ok",
        "past the cgroup limit: a typed error, and the child lived to say so"
    );
}

#[test]
fn legacy_mem_maps_at_init_and_stays_fixed() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let before_1g = free_1g();
    let (mut o, _rt) = opts("legacy");
    o.legacy_mem = true;
    o.memory_size = Some(16 * MB);
    let mem = Memory::init(&o).unwrap();
    assert_eq!(free_2m(), before - 8, "16M in 2M pages, not a 1G page");
    let e = memseg_err(
        mem.alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
            .unwrap_err(),
    );
    assert!(matches!(e, MemsegError::FixedMemory { .. }), "{e}");
    let e = memseg_err(mem.register_event_callback("x", |_| {}).unwrap_err());
    assert!(matches!(e, MemsegError::FixedMemory { .. }), "{e}");
    drop(mem);
    assert_eq!(free_2m(), before);

    // Without -m: every available page of every usable size.
    let (mut o, _rt) = opts("legacy_all");
    o.legacy_mem = true;
    let mem = Memory::init(&o).unwrap();
    assert_eq!(free_2m(), 0, "legacy mode without -m maps all 2M pages");
    assert_eq!(free_1g(), 0, "and all 1G pages");
    assert_eq!(mem.total_mapped(), before * 2 * MB + before_1g * 1024 * MB);
    drop(mem);
    assert_eq!(free_2m(), before);
    assert_eq!(free_1g(), before_1g);
}
