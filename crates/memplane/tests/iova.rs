//! Physical addresses from the real `/proc/self/pagemap`.

mod common;
mod hugemap;

use std::time::Instant;

use memplane::iova::{is_phys_contiguous, PaAccess, Pagemap};
use memplane::PageSize;

/// Whether PA tests can run: physical addresses must be visible (root).
fn pa_visible() -> bool {
    match PaAccess::probe() {
        PaAccess::PhysicalAddresses => true,
        other => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true")
                    || !rustix::process::geteuid().is_root(),
                "CI=true, running as root, and pagemap gives {other:?}"
            );
            eprintln!("SKIPPED: pagemap gives {other:?} (needs CAP_SYS_ADMIN)");
            false
        }
    }
}

#[test]
fn probe_agrees_with_privileges() {
    let access = PaAccess::probe();
    if rustix::process::geteuid().is_root() {
        assert_eq!(access, PaAccess::PhysicalAddresses);
    } else {
        assert_ne!(access, PaAccess::PhysicalAddresses);
    }
}

#[test]
fn untouched_anonymous_page_has_no_address() {
    let len = 4 * rustix::param::page_size();
    // SAFETY: a fresh private mapping at a kernel-chosen address aliases
    // nothing.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap();
    let pm = Pagemap::open().unwrap();
    let got = pm.phys_addr(ptr as usize);
    let all = pm.phys_addrs(ptr as usize, 4, rustix::param::page_size());
    // SAFETY: the mapping made above; nothing refers into it.
    unsafe { rustix::mm::munmap(ptr, len) }.unwrap();
    assert_eq!(got.unwrap(), None);
    assert_eq!(all.unwrap(), vec![None; 4]);
}

#[test]
fn hugepages_have_aligned_addresses_and_contiguous_subpages() {
    if !common::need_hugepages(2048, 4) || !pa_visible() {
        return;
    }
    let _pool = common::pool_lock(false);
    let size = 2u64 << 20;
    let map = hugemap::HugeMap::new(PageSize::SIZE_2M, 4);
    map.touch();
    let pm = Pagemap::open().unwrap();
    let pas = pm.phys_addrs(map.addr(), 4, size as usize).unwrap();
    assert_eq!(pas.len(), 4);
    for (i, pa) in pas.iter().enumerate() {
        let pa = pa.unwrap_or_else(|| panic!("page {i} has no physical address"));
        assert_eq!(pa % size, 0, "page {i} at {pa:#x}");
        assert_eq!(
            pm.phys_addr(map.addr() + i * size as usize).unwrap(),
            Some(pa)
        );
    }
    // Within one hugepage the base pages are consecutive, in one pread too.
    let base = rustix::param::page_size();
    let first = pas[0].unwrap();
    for k in [1, 2, 255, 511] {
        assert_eq!(
            pm.phys_addr(map.addr() + k * base).unwrap(),
            Some(first + (k * base) as u64)
        );
    }
    let sub = pm.phys_addrs(map.addr(), 512, base).unwrap();
    assert!(is_phys_contiguous(&sub, base as u64));
    assert_eq!(pm.phys_addr(map.addr() + 4100).unwrap(), Some(first + 4100));
    // Contiguity of the hugepages themselves is up to the allocator.
    let contiguous = is_phys_contiguous(&pas, size);
    eprintln!("4 x 2 MiB physically contiguous: {contiguous}");
}

#[test]
fn gigantic_page_is_1g_aligned() {
    if common::real_counter(1_048_576, "free_hugepages") < 1 {
        eprintln!("SKIPPED: no free 1 GiB hugepage");
        return;
    }
    if !pa_visible() {
        return;
    }
    let _pool = common::pool_lock(false);
    let map = hugemap::HugeMap::new(PageSize::SIZE_1G, 1);
    map.touch();
    let pm = Pagemap::open().unwrap();
    let pa = pm.phys_addr(map.addr()).unwrap().expect("present");
    assert_eq!(pa % (1 << 30), 0, "{pa:#x}");
    let last = map.addr() + map.len() - rustix::param::page_size();
    assert_eq!(
        pm.phys_addr(last).unwrap(),
        Some(pa + (map.len() - rustix::param::page_size()) as u64)
    );
}

/// Measures `phys_addrs` for 512 x 2 MiB pages (the module doc quotes it).
/// Run with `cargo test --release --test iova -- --ignored --nocapture`.
#[test]
#[ignore = "timing; takes 1 GiB of 2 MiB hugepages"]
fn phys_addrs_timing() {
    if !common::need_hugepages(2048, 512) || !pa_visible() {
        return;
    }
    let _pool = common::pool_lock(false);
    let map = hugemap::HugeMap::new(PageSize::SIZE_2M, 512);
    map.touch();
    let pm = Pagemap::open().unwrap();
    let base = rustix::param::page_size();
    let rounds = 50;
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        let t = Instant::now();
        let pas = pm.phys_addrs(map.addr(), 512, 2 << 20).unwrap();
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        assert!(pas.iter().all(Option::is_some));
        let t = Instant::now();
        let all = pm.phys_addrs(map.addr(), 512 * 512, base).unwrap();
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        assert!(all.iter().all(Option::is_some));
    }
    eprintln!(
        "phys_addrs, 512 x 2 MiB: per-page preads {:.3} ms, one pread of the span {:.3} ms (best of {rounds})",
        best[0] * 1e3,
        best[1] * 1e3
    );
}
