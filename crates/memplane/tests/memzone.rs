//! Memzones on real hugepages: every flag on 2 MiB and 1 GiB pages,
//! IOVA-contiguous zones checked against pagemap in PA mode, the biggest
//! block, the table filled to capacity, bad input, races on one name,
//! alignment and boundary properties.

mod common;

use std::sync::{Arc, Barrier};

use memplane::heap::{HeapError, SOCKET_ID_ANY};
use memplane::iova::{PaAccess, Pagemap};
use memplane::memzone::{MemzoneError, MemzoneFlags, MEMZONE_NAME_MAX};
use memplane::{Error, MemOptions, Memory};
use proptest::prelude::*;

use common::{need_hugepages, pool_lock, real_counter};

const MB: usize = 1 << 20;
const GB: usize = 1 << 30;

fn opts(name: &str, extra: &[&str]) -> (MemOptions, tempfile::TempDir) {
    common::heapkit::test_opts("mz", name, extra)
}

fn mz_err(e: Error) -> MemzoneError {
    match e {
        Error::Memzone(m) => m,
        other => panic!("expected a memzone error, got {other}"),
    }
}

fn free_2m() -> u64 {
    real_counter(2048, "free_hugepages")
}

fn free_1g() -> u64 {
    real_counter(1_048_576, "free_hugepages")
}

/// Physical address of `addr` from pagemap.
fn phys(pm: &Pagemap, addr: usize) -> u64 {
    pm.phys_addr(addr)
        .unwrap()
        .unwrap_or_else(|| panic!("{addr:#x} has no physical address"))
}

/// Checks with pagemap that `[addr, addr + len)` is physically
/// contiguous and starts at `iova`.
fn assert_phys_contiguous(addr: usize, len: usize, page: usize, iova: u64) {
    let pm = Pagemap::open().unwrap();
    let first = phys(&pm, addr);
    assert_eq!(first, iova, "IOVA of {addr:#x} is not its physical address");
    let mut p = (addr / page + 1) * page;
    while p < addr + len {
        assert_eq!(
            phys(&pm, p),
            first + (p - addr) as u64,
            "zone at {addr:#x} ({len} bytes) breaks at {p:#x}"
        );
        p += page;
    }
}

#[test]
fn reserve_with_every_flag_on_2m_pages() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("flags2m", &[]);
    let mem = Memory::init(&o).unwrap();
    let f = MemzoneFlags::NONE;
    let cases = [
        ("plain", 100, f),
        ("p2m", 5000, MemzoneFlags::PAGE_2M),
        (
            "p1g-hint",
            64,
            MemzoneFlags::PAGE_1G | MemzoneFlags::SIZE_HINT_ONLY,
        ),
        (
            "p2m-contig",
            MB,
            MemzoneFlags::PAGE_2M | MemzoneFlags::IOVA_CONTIG,
        ),
        ("contig", 3000, MemzoneFlags::IOVA_CONTIG),
        ("zero", 8192, MemzoneFlags::ZERO),
        (
            "many-sizes",
            4096,
            MemzoneFlags::PAGE_256K
                | MemzoneFlags::PAGE_2M
                | MemzoneFlags::PAGE_16M
                | MemzoneFlags::PAGE_16G,
        ),
    ];
    for (name, len, flags) in cases {
        let z = mem
            .memzone_reserve(name, len, SOCKET_ID_ANY, flags)
            .unwrap();
        assert_eq!(z.name(), name);
        assert_eq!(z.len(), len.next_multiple_of(64), "{name}");
        assert_eq!(z.as_ptr() as usize % 64, 0, "{name}");
        assert_eq!(z.flags(), flags);
        assert_eq!(z.socket(), 0);
        let list = mem.virt2memseg_list(z.as_ptr() as usize).unwrap();
        assert_eq!(z.page_size(), list.page_size.bytes(), "{name}");
        if flags.contains(MemzoneFlags::PAGE_2M) {
            assert_eq!(z.page_size(), 2 * MB as u64, "{name}");
        }
        assert_eq!(Some(z.iova()), mem.virt2iova(z.as_ptr() as usize));
        // SAFETY: the zone is fresh and only this test uses it.
        let bytes = unsafe { z.as_mut_slice() };
        if flags.contains(MemzoneFlags::ZERO) {
            assert!(bytes.iter().all(|&b| b == 0));
        }
        bytes.fill(0x5a);
    }
    assert_eq!(mem.memzone_count(), cases.len());
    for (name, len, _) in cases {
        let z = mem.memzone_lookup(name).unwrap();
        // SAFETY: nobody writes the zone meanwhile.
        assert!(unsafe { z.as_slice() }.iter().all(|&b| b == 0x5a));
        assert_eq!(z.len(), len.next_multiple_of(64));
        z.free().unwrap();
        assert!(mem.memzone_lookup(name).is_none());
    }
    assert_eq!(mem.memzone_count(), 0);
    let st = mem.memzone_stats();
    assert_eq!(
        (st.reserves, st.frees),
        (cases.len() as u64, cases.len() as u64)
    );
    // A freed name is free again; a ZERO zone on reused (dirty) memory is
    // still zero.
    let z = mem
        .memzone_reserve("zero", 8192, SOCKET_ID_ANY, MemzoneFlags::ZERO)
        .unwrap();
    // SAFETY: only this test uses the zone.
    assert!(unsafe { z.as_slice() }.iter().all(|&b| b == 0));
    z.free().unwrap();
    mem.heap_validate_deep().unwrap();
}

#[test]
fn reserve_on_1g_pages() {
    if !need_hugepages(2048, 4) {
        return;
    }
    if free_1g() < 1 {
        eprintln!(
            "SKIPPED: no free 1 GiB hugepage (reserve one with: memplane hugepages reserve 1G=1)"
        );
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("flags1g", &[]);
    let mem = Memory::init(&o).unwrap();
    let big = mem
        .memzone_reserve(
            "big",
            600 * MB,
            0,
            MemzoneFlags::PAGE_1G | MemzoneFlags::IOVA_CONTIG,
        )
        .unwrap();
    assert_eq!(big.page_size(), GB as u64);
    assert_eq!(big.len(), 600 * MB);
    let small = mem
        .memzone_reserve_aligned("small-on-1g", 100, 0, MemzoneFlags::PAGE_1G, 4096)
        .unwrap();
    assert_eq!(small.page_size(), GB as u64);
    assert_eq!(small.as_ptr() as usize % 4096, 0);
    // 2M strict still lands on 2M pages next to the 1G page.
    let two = mem
        .memzone_reserve("on-2m", 100, 0, MemzoneFlags::PAGE_2M)
        .unwrap();
    assert_eq!(two.page_size(), 2 * MB as u64);
    if PaAccess::probe() == PaAccess::PhysicalAddresses {
        let pm = Pagemap::open().unwrap();
        assert_eq!(phys(&pm, big.as_ptr() as usize), big.iova());
    }
    for z in [big, small, two] {
        z.free().unwrap();
    }
    mem.heap_validate().unwrap();
}

#[test]
fn iova_contiguous_zones_are_physically_contiguous_in_pa_mode() {
    if !need_hugepages(2048, 24) {
        return;
    }
    if PaAccess::probe() != PaAccess::PhysicalAddresses {
        assert!(
            std::env::var("CI").as_deref() != Ok("true") || !rustix::process::geteuid().is_root(),
            "CI=true, root, and pagemap shows no physical addresses"
        );
        eprintln!("SKIPPED: pagemap shows no physical addresses (needs root)");
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("pa", &["--iova-mode", "pa"]);
    let mem = Memory::init(&o).unwrap();
    let mut zones = Vec::new();
    // Within one 2M page: always contiguous.
    for i in 0..4 {
        let z = mem
            .memzone_reserve(
                &format!("in-page-{i}"),
                MB + MB / 2,
                0,
                MemzoneFlags::PAGE_2M | MemzoneFlags::IOVA_CONTIG,
            )
            .unwrap();
        assert_phys_contiguous(z.as_ptr() as usize, z.len(), 2 * MB, z.iova());
        zones.push(z);
    }
    // Across 2M pages: either the heap found contiguous pages (checked
    // here against pagemap) or it says it could not.
    match mem.memzone_reserve(
        "across-pages",
        5 * MB,
        0,
        MemzoneFlags::PAGE_2M | MemzoneFlags::IOVA_CONTIG,
    ) {
        Ok(z) => {
            assert_phys_contiguous(z.as_ptr() as usize, z.len(), 2 * MB, z.iova());
            zones.push(z);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("IOVA-contiguous"), "{msg}");
            eprintln!("5 MiB on 2M pages not contiguous here: {msg}");
        }
    }
    // The biggest contiguous free block, in PA mode.
    let z = mem
        .memzone_reserve("biggest-contig", 0, 0, MemzoneFlags::IOVA_CONTIG)
        .unwrap();
    assert!(z.len() >= 64);
    let page = z.page_size() as usize;
    assert_phys_contiguous(z.as_ptr() as usize, z.len(), page, z.iova());
    zones.push(z);
    for z in zones {
        z.free().unwrap();
    }
    mem.heap_validate().unwrap();
}

#[test]
fn len_zero_takes_the_biggest_free_block() {
    if !need_hugepages(2048, 40) {
        return;
    }
    let _pool = pool_lock(false);
    // 64 MiB preallocated: the heap has one big free block.
    let (o, _rt) = opts("biggest", &["--socket-mem", "64"]);
    let mem = Memory::init(&o).unwrap();
    let a = mem
        .memzone_reserve("a", 10 * MB, 0, MemzoneFlags::NONE)
        .unwrap();
    mem.heap_cache_flush();
    let before = mem.heap_stats(0).unwrap();
    let greatest = before.greatest_free;
    let big = mem
        .memzone_reserve("big", 0, 0, MemzoneFlags::NONE)
        .unwrap();
    assert_eq!(
        big.len() as u64,
        greatest,
        "len 0 = the heap's greatest free block"
    );
    // The heap's own counters: the system's free page count moves with
    // the other tests of this binary, which run alongside.
    let after = mem.heap_stats(0).unwrap();
    assert_eq!(
        (after.total_bytes, after.grow_count),
        (before.total_bytes, before.grow_count),
        "len 0 never grows the heap"
    );
    assert_eq!(mem.heap_stats(0).unwrap().greatest_free, 0);
    // len 0 with a bound: bound bytes.
    big.free().unwrap();
    let b = mem
        .memzone_reserve_bounded("bounded", 0, 0, MemzoneFlags::NONE, 0, 2 * MB)
        .unwrap();
    assert_eq!(b.len(), 2 * MB);
    assert_eq!(
        b.as_ptr() as usize % (2 * MB),
        0,
        "2 MiB inside a 2 MiB boundary"
    );
    // With strict page flags the heap has none of: an error.
    let e = mz_err(
        mem.memzone_reserve("none", 0, 0, MemzoneFlags::PAGE_1G)
            .unwrap_err(),
    );
    assert!(
        matches!(
            e,
            MemzoneError::NoPageSize { .. } | MemzoneError::Alloc { .. }
        ),
        "{e}"
    );
    for z in [a, b] {
        z.free().unwrap();
    }
    mem.heap_validate().unwrap();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("bad", &[]);
    let mem = Memory::init(&o).unwrap();
    let keep = mem
        .memzone_reserve("keep", 4096, 0, MemzoneFlags::NONE)
        .unwrap();
    mem.heap_cache_flush();
    let before = (mem.memzone_stats(), mem.heap_stats(0).unwrap());
    let n = MemzoneFlags::NONE;
    let long = "x".repeat(MEMZONE_NAME_MAX + 1);
    let cases: Vec<(Error, &str)> = vec![
        (
            mem.memzone_reserve("", 64, 0, n).unwrap_err(),
            "cannot be empty",
        ),
        (
            mem.memzone_reserve(&long, 64, 0, n).unwrap_err(),
            "at most 31",
        ),
        (mem.memzone_reserve("a\0b", 64, 0, n).unwrap_err(), "NUL"),
        (
            mem.memzone_reserve("keep", 64, 0, n).unwrap_err(),
            "exists already",
        ),
        (
            mem.memzone_reserve_aligned("al", 64, 0, n, 48).unwrap_err(),
            "not a power of two",
        ),
        (
            mem.memzone_reserve_bounded("bd", 64, 0, n, 0, 1000)
                .unwrap_err(),
            "not a power of two",
        ),
        (
            mem.memzone_reserve_bounded("bd", 5000, 0, n, 0, 4096)
                .unwrap_err(),
            "smaller than the length",
        ),
        (
            mem.memzone_reserve("big", usize::MAX - 10, 0, n)
                .unwrap_err(),
            "larger than any heap",
        ),
        (
            mem.memzone_reserve("sock", 64, -2, n).unwrap_err(),
            "socket id -2",
        ),
        (
            mem.memzone_reserve("sock", 64, 77, n).unwrap_err(),
            "no heap has socket id 77",
        ),
        (
            mem.memzone_reserve("pg", 64, 0, MemzoneFlags::PAGE_16G)
                .unwrap_err(),
            "page sizes this instance has none of",
        ),
        (
            mem.memzone_reserve("huge", 1 << 46, 0, n).unwrap_err(),
            "cannot reserve memzone \"huge\"",
        ),
    ];
    for (e, want) in &cases {
        let msg = e.to_string();
        assert!(msg.contains(want), "{msg:?} should say {want:?}");
    }
    assert!(matches!(
        mz_err(mem.memzone_reserve("keep", 64, 0, n).unwrap_err()),
        MemzoneError::Exists { pid, .. } if pid == std::process::id()
    ));
    assert!(matches!(
        MemzoneFlags::from_bits(1 << 20 | 1 << 3),
        Err(MemzoneError::BadFlags { bits: 8 })
    ));
    mem.heap_cache_flush();
    let after = (mem.memzone_stats(), mem.heap_stats(0).unwrap());
    assert_eq!(before.0, after.0, "table changed");
    assert_eq!(before.1.alloc_count, after.1.alloc_count, "heap changed");
    assert_eq!(before.1.total_bytes, after.1.total_bytes, "heap changed");
    assert!(mem.memzone_lookup("").is_none());
    assert!(mem.memzone_lookup(&long).is_none());
    // Freeing twice through two handles.
    let other = mem.memzone_lookup("keep").unwrap();
    assert!(other.is_live());
    keep.free().unwrap();
    assert!(!other.is_live());
    assert!(matches!(
        mz_err(other.free().unwrap_err()),
        MemzoneError::Stale { ref name } if name == "keep"
    ));
    // ... even when a new zone took the same slot and name.
    let stale = mem.memzone_reserve("k2", 64, 0, n).unwrap();
    let stale_copy = mem.memzone_lookup("k2").unwrap();
    stale.free().unwrap();
    let fresh = mem.memzone_reserve("k2", 64, 0, n).unwrap();
    assert_eq!(fresh.index(), stale_copy.index());
    assert!(matches!(
        mz_err(stale_copy.free().unwrap_err()),
        MemzoneError::Stale { .. }
    ));
    assert!(fresh.is_live());
    fresh.free().unwrap();
    assert_eq!(mem.memzone_count(), 0);
    mem.heap_validate().unwrap();
}

#[test]
fn table_fills_to_capacity_and_past() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    // More than DPDK's compile-time 2560.
    let (o, _rt) = opts("full", &["--max-memzones", "3000"]);
    let mem = Memory::init(&o).unwrap();
    assert_eq!(mem.memzone_capacity(), 3000);
    let mut zones = Vec::new();
    for i in 0..3000 {
        zones.push(
            mem.memzone_reserve(&format!("z{i}"), 64, SOCKET_ID_ANY, MemzoneFlags::NONE)
                .unwrap(),
        );
    }
    let e = mz_err(
        mem.memzone_reserve("one-more", 64, 0, MemzoneFlags::NONE)
            .unwrap_err(),
    );
    assert!(
        matches!(e, MemzoneError::TableFull { capacity: 3000 }),
        "{e}"
    );
    assert!(e.to_string().contains("--max-memzones"), "{e}");
    assert_eq!(mem.memzone_count(), 3000);
    for i in (0..3000).step_by(7) {
        let z = mem.memzone_lookup(&format!("z{i}")).unwrap();
        assert_eq!(z.as_ptr(), zones[i].as_ptr());
    }
    // Free one: its entry is reused.
    let gone = zones.remove(1234);
    let slot = gone.index();
    gone.free().unwrap();
    let again = mem
        .memzone_reserve("one-more", 64, 0, MemzoneFlags::NONE)
        .unwrap();
    assert_eq!(again.index(), slot);
    zones.push(again);
    assert!(mem.memzone_lookup("z1234").is_none());
    // The walk sees every zone once, in table order.
    let mut seen = Vec::new();
    mem.memzone_walk(|z| seen.push(z.index));
    assert_eq!(seen.len(), 3000);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    for z in zones {
        z.free().unwrap();
    }
    assert_eq!(mem.memzone_count(), 0);
    mem.heap_validate().unwrap();
}

#[test]
fn concurrent_reservers_of_one_name_exactly_one_wins() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 300;
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("race", &[]);
    let mem = Arc::new(Memory::init(&o).unwrap());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let mem = Arc::clone(&mem);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut wins = Vec::new();
                for r in 0..ROUNDS {
                    barrier.wait();
                    // Different sizes: whoever wins, the zone is theirs.
                    match mem.memzone_reserve(
                        &format!("race-{r}"),
                        64 * (t + 1),
                        SOCKET_ID_ANY,
                        MemzoneFlags::NONE,
                    ) {
                        Ok(z) => {
                            assert_eq!(z.len(), 64 * (t + 1));
                            wins.push(r);
                        }
                        Err(Error::Memzone(MemzoneError::Exists { .. })) => {}
                        Err(e) => panic!("thread {t} round {r}: {e}"),
                    }
                    // Distinct names at the same time: lookups stay right.
                    let mine = format!("t{t}-r{r}");
                    let z = mem
                        .memzone_reserve(&mine, 128, SOCKET_ID_ANY, MemzoneFlags::NONE)
                        .unwrap();
                    assert_eq!(mem.memzone_lookup(&mine).unwrap().as_ptr(), z.as_ptr());
                    z.free().unwrap();
                }
                wins
            })
        })
        .collect();
    let mut winners = vec![0; ROUNDS];
    for h in handles {
        for r in h.join().unwrap() {
            winners[r] += 1;
        }
    }
    assert!(winners.iter().all(|&w| w == 1), "{winners:?}");
    assert_eq!(mem.memzone_count(), ROUNDS);
    for r in 0..ROUNDS {
        mem.memzone_lookup(&format!("race-{r}"))
            .unwrap()
            .free()
            .unwrap();
    }
    assert_eq!(mem.memzone_count(), 0);
    mem.heap_validate().unwrap();
}

#[test]
fn dump_and_json_list_the_zones() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("dump", &[]);
    let mem = Memory::init(&o).unwrap();
    let a = mem
        .memzone_reserve("rx-ring", 8192, 0, MemzoneFlags::IOVA_CONTIG)
        .unwrap();
    let b = mem
        .memzone_reserve("tx-ring", 100, 0, MemzoneFlags::NONE)
        .unwrap();
    let mut out = Vec::new();
    mem.memzone_dump(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("memzones: 2 of 2560"), "{text}");
    assert!(
        text.contains("rx-ring") && text.contains("IOVA_CONTIG"),
        "{text}"
    );
    let j = mem.memzone_dump_json();
    let zones = j["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 2);
    assert_eq!(zones[0]["name"], "rx-ring");
    assert_eq!(zones[0]["len"], 8192);
    assert_eq!(zones[1]["len"], 128);
    assert_eq!(j["table"]["capacity"], 2560);
    assert_eq!(j["table"]["bytes"], 8192 + 128);
    a.free().unwrap();
    b.free().unwrap();
}

#[test]
fn reserve_from_a_memory_event_callback_is_refused() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("cb", &[]);
    let mem = Arc::new(Memory::init(&o).unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (m, s) = (Arc::downgrade(&mem), Arc::clone(&seen));
    mem.register_event_callback("zone-in-cb", move |_| {
        if let Some(m) = m.upgrade() {
            let r = m.memzone_reserve("from-cb", 64, 0, MemzoneFlags::NONE);
            s.lock()
                .unwrap()
                .push(r.map(|_| ()).unwrap_err().to_string());
            // A lookup is fine: it does not wait for anything this thread holds.
            assert!(m.memzone_lookup("outer").is_none());
        }
    })
    .unwrap();
    let z = mem
        .memzone_reserve("outer", MB, 0, MemzoneFlags::NONE)
        .unwrap();
    let seen_now = seen.lock().unwrap().clone();
    assert!(!seen_now.is_empty(), "growth fired no event");
    assert!(seen_now[0].contains("callback"), "{seen_now:?}");
    z.free().unwrap();
    mem.unregister_event_callback("zone-in-cb").unwrap();
}

#[test]
fn hugepages_come_back_after_zones_and_instance_go() {
    if !need_hugepages(2048, 20) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    {
        let (o, _rt) = opts("leak", &[]);
        let mem = Memory::init(&o).unwrap();
        let z = mem
            .memzone_reserve("z", 16 * MB, 0, MemzoneFlags::PAGE_2M)
            .unwrap();
        assert!(free_2m() <= before - 8);
        z.free().unwrap();
        assert_eq!(free_2m(), before, "freeing the zone gives its pages back");
        // Zones still reserved when the instance goes: pages come back too.
        let _keep = mem
            .memzone_reserve("kept", 8 * MB, 0, MemzoneFlags::NONE)
            .unwrap();
    }
    assert_eq!(free_2m(), before);
}

fn heap_of(e: &MemzoneError) -> Option<&HeapError> {
    match e {
        MemzoneError::Alloc { source, .. } => match source.as_ref() {
            Error::Heap(h) => Some(h),
            _ => None,
        },
        _ => None,
    }
}

#[test]
fn out_of_memory_names_the_heap_reason() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts("oom", &["--socket-limit", "16"]);
    let mem = Memory::init(&o).unwrap();
    let e = mz_err(
        mem.memzone_reserve("too-big", 64 * MB, 0, MemzoneFlags::NONE)
            .unwrap_err(),
    );
    assert!(
        matches!(heap_of(&e), Some(HeapError::OutOfMemory { .. })),
        "{e}"
    );
    assert_eq!(mem.memzone_count(), 0);
    // The name was not taken by the failed attempt.
    mem.memzone_reserve("too-big", MB, 0, MemzoneFlags::NONE)
        .unwrap()
        .free()
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every zone is aligned, inside its boundary, as long as asked, and
    /// the heap validates after each step.
    #[test]
    fn alignment_and_bound_hold(reqs in prop::collection::vec(
        (1usize..(3 << 20), 0u32..22, prop::option::of(0u32..6)), 1..12))
    {
        if !need_hugepages(2048, 40) {
            return Ok(());
        }
        let _pool = pool_lock(false);
        let (o, _rt) = opts("prop", &[]);
        let mem = Memory::init(&o).unwrap();
        let mut zones = Vec::new();
        for (i, (len, align_log, bound_extra)) in reqs.into_iter().enumerate() {
            let align = 1usize << align_log;
            let rounded = len.next_multiple_of(64);
            let bound = bound_extra.map_or(0, |k| (rounded.next_power_of_two()) << k);
            let z = mem
                .memzone_reserve_bounded(&format!("p{i}"), len, 0, MemzoneFlags::NONE, align, bound)
                .unwrap();
            let a = z.as_ptr() as usize;
            prop_assert_eq!(a % align.max(64), 0);
            prop_assert_eq!(z.len(), rounded);
            if let (Some(first), Some(last)) = (a.checked_div(bound), (a + rounded - 1).checked_div(bound)) {
                prop_assert_eq!(first, last, "crosses {}", bound);
            }
            mem.heap_validate().unwrap();
            zones.push(z);
        }
        for z in zones {
            z.free().unwrap();
            mem.heap_validate().unwrap();
        }
    }
}
