//! Two-step creation (create_empty, then populate_default / populate_virt
//! / populate_anon, then obj_iter), the footprint, and the out-of-memory
//! error with per-node numbers.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u64 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use common::{have_hugepages, instance, opts, pool_lock};
use memplane::iova::BAD_IOVA;
use memplane::memzone::MemzoneFlags;
use memplane::Memory;
use memplane_mempool::{
    required_memory, Mempool, MempoolConfig, MempoolError, MempoolFlags, LCORE_ZONE,
};

fn zone_bytes(mem: &Memory, name: &str) -> usize {
    let p = format!("MP_{name}_");
    mem.memzones()
        .into_iter()
        .filter(|z| z.name.starts_with(&p))
        .map(|z| z.len)
        .sum()
}

fn only_lcore_zone_left(mem: &Memory) {
    let left: Vec<String> = mem.memzones().into_iter().map(|z| z.name).collect();
    assert_eq!(left, [LCORE_ZONE], "only the lcore registry stays");
}

/// Gets every object, checks each index is seen once and the stamp
/// obj_iter wrote, puts them back.
fn drain_and_check(pool: &Mempool<'_>) {
    let n = pool.size() as usize;
    let mut all = vec![std::ptr::null_mut(); n];
    pool.get_bulk(&mut all).unwrap();
    let mut seen = vec![false; n];
    for &o in &all {
        let idx = pool.index_of(o as usize).unwrap() as usize;
        assert!(
            !std::mem::replace(&mut seen[idx], true),
            "object {idx} twice"
        );
        // SAFETY: our object, 64-aligned, at least 8 bytes.
        assert_eq!(unsafe { o.cast::<u64>().read() }, 0xab00 + idx as u64);
    }
    assert!(pool.get().is_err(), "nothing beyond n");
    pool.put_bulk(&all).unwrap();
    assert!(pool.is_full());
}

#[test]
fn create_empty_then_populate_default_then_obj_iter() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("two_step");
    let mem = &inst.mem;
    let (n, elt) = (1000u32, 100u32);
    let mut pool =
        Mempool::create_empty(mem, "empty", &MempoolConfig::new(n, elt).cache_size(32)).unwrap();
    assert_eq!(pool.populated(), 0);
    assert_eq!(zone_bytes(mem, "empty"), 0, "no object memory yet");
    assert!(pool.get().is_err(), "no object to get yet");
    // Not visible to other handles until fully populated.
    let e = Mempool::lookup(mem, "empty").unwrap_err();
    assert!(
        matches!(
            e,
            MempoolError::NotPopulated {
                populated: 0,
                n: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert!(memplane_mempool::mempool_names(mem).is_empty());
    assert_eq!(pool.populate_default().unwrap(), n);
    assert_eq!(pool.populated(), n);
    // Footprint: exactly what required_memory says.
    assert_eq!(
        zone_bytes(mem, "empty"),
        required_memory(n, elt, MempoolFlags::NONE).unwrap()
    );
    let sum: usize = pool.chunks().iter().map(|c| c.len).sum();
    assert_eq!(sum, n as usize * pool.obj_size().total_size as usize);
    // Full: populate again is refused and changes nothing.
    let e = pool.populate_default().unwrap_err();
    assert!(matches!(e, MempoolError::PopulateRefused { .. }), "{e}");
    let e = pool.populate_anon().unwrap_err();
    assert!(matches!(e, MempoolError::PopulateRefused { .. }), "{e}");
    assert_eq!(pool.populated(), n);
    assert_eq!(pool.avail_count(), n);
    // obj_iter initialises the objects (population order = index).
    let seen = pool.obj_iter(|i, o| {
        // SAFETY: a 100-byte element, 64-aligned; nobody holds it.
        unsafe { o.cast::<u64>().write(0xab00 + u64::from(i)) }
    });
    assert_eq!(seen, n);
    let same = Mempool::lookup(mem, "empty").unwrap();
    assert_eq!(same.addr(), pool.addr());
    drain_and_check(&same);
    for c in pool.chunks() {
        assert_ne!(c.iova, BAD_IOVA, "IOVA-contiguous zones");
    }
    drop(same);
    pool.free().unwrap();
    only_lcore_zone_left(mem);
}

#[test]
fn populate_virt_places_objects_in_memzones_the_user_gives() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("virt");
    let mem = &inst.mem;
    let n = 300u32;
    let mut pool = Mempool::create_empty(mem, "virt", &MempoolConfig::new(n, 64)).unwrap();
    let total = pool.obj_size().total_size as usize;
    assert_eq!(total, 192, "64-byte elements spread to 3 lines");
    // Region 1: 200 objects' worth, starting 1 byte into a zone (the pool
    // aligns the start up to 64, so only 199 fit).
    let z1 = mem
        .memzone_reserve("user_a", 200 * total + 1, -1, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: the zone outlives the pool (freed after it below).
    let added = unsafe { pool.populate_virt(z1.as_mut_ptr().add(1), 200 * total) }.unwrap();
    assert_eq!(added, 199);
    assert_eq!(pool.populated(), 199);
    // A region too small for one object: refused, nothing changes.
    // SAFETY: as above (and nothing is placed).
    let e = unsafe { pool.populate_virt(z1.as_mut_ptr(), total - 1) }.unwrap_err();
    assert!(matches!(e, MempoolError::RegionTooSmall { .. }), "{e}");
    assert_eq!(pool.populated(), 199);
    assert!(matches!(
        Mempool::lookup(mem, "virt").unwrap_err(),
        MempoolError::NotPopulated { populated: 199, .. }
    ));
    // Region 2 is larger than needed: only the 101 missing are placed.
    let z2 = mem
        .memzone_reserve("user_b", 200 * total, -1, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: as above.
    let added = unsafe { pool.populate_virt(z2.as_mut_ptr(), 200 * total) }.unwrap();
    assert_eq!(added, 101);
    // SAFETY: as above (and nothing is placed).
    let e = unsafe { pool.populate_virt(z2.as_mut_ptr(), 200 * total) }.unwrap_err();
    assert!(matches!(e, MempoolError::PopulateRefused { .. }), "{e}");
    assert_eq!(zone_bytes(mem, "virt"), 0, "no zone of the pool's own");
    // IOVAs come from the memsegs, per object.
    for o in pool.objects() {
        let iova = pool.virt2iova(o).unwrap();
        assert_ne!(iova, BAD_IOVA);
        assert_eq!(Some(iova), mem.virt2iova(o as usize));
        let a = o as usize;
        assert!(
            (a > z1.as_ptr() as usize && a < z1.as_ptr() as usize + z1.len())
                || (a >= z2.as_ptr() as usize && a < z2.as_ptr() as usize + z2.len())
        );
    }
    pool.obj_iter(|i, o| {
        // SAFETY: a 64-byte element, nobody holds it.
        unsafe { o.cast::<u64>().write(0xab00 + u64::from(i)) }
    });
    let found = Mempool::lookup(mem, "virt").unwrap();
    drain_and_check(&found);
    drop(found);
    pool.free().unwrap();
    // The user's zones are the user's: still there, freed by the user.
    z1.free().unwrap();
    z2.free().unwrap();
    only_lcore_zone_left(mem);
}

#[test]
fn populate_anon_and_foreign_memory_give_objects_without_iova() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("anon");
    let mem = &inst.mem;
    let n = 500u32;
    let mut pool =
        Mempool::create_empty(mem, "anon", &MempoolConfig::new(n, 200).cache_size(16)).unwrap();
    assert_eq!(pool.populate_anon().unwrap(), n);
    let e = pool.populate_anon().unwrap_err();
    assert!(matches!(e, MempoolError::PopulateRefused { .. }), "{e}");
    assert_eq!(zone_bytes(mem, "anon"), 0);
    assert_eq!(pool.chunks().len(), 1);
    for o in pool.objects() {
        assert_eq!(pool.virt2iova(o), Some(BAD_IOVA), "anonymous: no IOVA");
        assert!(mem.virt2memseg_list(o as usize).is_none());
    }
    pool.obj_iter(|i, o| {
        // SAFETY: a 200-byte element in the anonymous mapping.
        unsafe { o.cast::<u64>().write(0xab00 + u64::from(i)) }
    });
    // This process may look it up (other processes may not: see
    // tests/multiprocess_handlers.rs).
    drain_and_check(&Mempool::lookup(mem, "anon").unwrap());
    pool.free().unwrap();

    // Process-local memory given to populate_virt (a heap buffer).
    let mut pool = Mempool::create_empty(mem, "heapbuf", &MempoolConfig::new(10, 64)).unwrap();
    let mut buf = vec![0u8; 11 * 192 + 64];
    // SAFETY: `buf` outlives the pool (freed before `buf` is dropped).
    let added = unsafe { pool.populate_virt(buf.as_mut_ptr(), buf.len()) }.unwrap();
    assert_eq!(added, 10);
    for o in pool.objects() {
        assert_eq!(pool.virt2iova(o), Some(BAD_IOVA));
    }
    let o = pool.get().unwrap();
    pool.put(o).unwrap();
    pool.free().unwrap();
    drop(buf);
    only_lcore_zone_left(mem);
}

#[test]
fn a_pool_that_cannot_fit_says_what_it_needed_and_what_each_node_had() {
    if !have_hugepages(40) {
        return;
    }
    let _lock = pool_lock();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("mpl_nomem_{}", std::process::id());
    // The heap may grow to 32 MiB per node: a 64 MiB pool cannot fit.
    let mem = Memory::init(&opts(
        &prefix,
        dir.path().to_str().unwrap(),
        &["--socket-limit", "32"],
    ))
    .unwrap();
    let (n, elt) = (64 * 1024u32, 960u32);
    let need = required_memory(n, elt, MempoolFlags::NONE).unwrap();
    let e = Mempool::create(&mem, "big", &MempoolConfig::new(n, elt)).unwrap_err();
    let MempoolError::NoMemory {
        need: said,
        objects,
        nodes,
        ..
    } = &e
    else {
        panic!("expected NoMemory, got {e:?}");
    };
    assert_eq!((*said, *objects), (need, n));
    assert!(!nodes.is_empty());
    assert!(nodes.iter().all(|f| f.heap_free <= 32 << 20), "{nodes:?}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&need.to_string()), "{msg}");
    assert!(msg.contains("node 0:"), "{msg}");
    // Nothing left behind; a smaller pool still fits.
    assert!(mem.memzones().iter().all(|z| !z.name.starts_with("MP_big")));
    let p = Mempool::create(&mem, "small", &MempoolConfig::new(1000, elt)).unwrap();
    p.free().unwrap();
    // Two-step: populate_default fails the same way and leaves the pool
    // empty and usable for another try.
    let mut p = Mempool::create_empty(&mem, "big2", &MempoolConfig::new(n, elt)).unwrap();
    let e = p.populate_default().unwrap_err();
    assert!(matches!(e, MempoolError::NoMemory { .. }), "{e}");
    assert_eq!((p.populated(), p.chunks().len()), (0, 0));
    assert_eq!(zone_bytes(&mem, "big2"), 0);
    p.free().unwrap();
}

#[test]
fn create_empty_refuses_bad_input_like_create_and_leaves_nothing() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("empty_bad");
    let mem = &inst.mem;
    memplane_mempool::lcore_id(mem).unwrap(); // creates the lcore registry zone
    let bad = |cfg: MempoolConfig| Mempool::create_empty(mem, "e", &cfg).unwrap_err();
    assert!(matches!(
        bad(MempoolConfig::new(0, 64)),
        MempoolError::ZeroObjects
    ));
    assert!(matches!(
        bad(MempoolConfig::new(10, 0)),
        MempoolError::BadEltSize { .. }
    ));
    assert!(matches!(
        bad(MempoolConfig::new(10, u32::MAX)),
        MempoolError::BadEltSize { .. }
    ));
    assert!(matches!(
        bad(MempoolConfig::new(10_000, 64).cache_size(513)),
        MempoolError::BadCacheSize { .. }
    ));
    assert!(matches!(
        bad(MempoolConfig::new(10, 64).cache_size(8)),
        MempoolError::BadCacheSize { .. }
    ));
    let e = bad(MempoolConfig::new(10, 64).handler("no_such"));
    assert!(
        matches!(&e, MempoolError::UnknownHandler { name, .. } if name == "no_such"),
        "{e}"
    );
    only_lcore_zone_left(mem);
    // Name clash with a pool still being populated.
    let p = Mempool::create_empty(mem, "e", &MempoolConfig::new(10, 64)).unwrap();
    assert!(matches!(
        bad(MempoolConfig::new(10, 64)),
        MempoolError::Exists { .. }
    ));
    assert!(matches!(
        Mempool::create(mem, "e", &MempoolConfig::new(10, 64)),
        Err(MempoolError::Exists { .. })
    ));
    p.free().unwrap();
    only_lcore_zone_left(mem);
}

/// A pool bigger than a 2 MiB page, in PA mode on 2 MiB pages only: its
/// objects are either in one IOVA-contiguous zone or (when the pages are
/// not physically contiguous) in ONE zone cut into chunks at the IOVA
/// jumps. Either way every chunk is IOVA-contiguous page by page, no
/// object crosses a chunk end, every object is handed out once, and a put
/// of a pointer outside the pool is refused.
#[test]
fn objects_never_straddle_an_iova_jump() {
    if !have_hugepages(64) {
        return;
    }
    let _lock = pool_lock();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("mpl_straddle_{}", std::process::id());
    let mem = Memory::init(&opts(
        &prefix,
        dir.path().to_str().unwrap(),
        &["--iova-mode", "pa", "--pagesz-mem", "1G:0"],
    ))
    .unwrap();
    let n = 6000;
    let pool = Mempool::create(
        &mem,
        "straddle",
        &MempoolConfig::new(n, 2048).cache_size(64),
    )
    .unwrap();
    let total = pool.obj_size().total_size as usize;
    let chunks = pool.chunks();
    let zones: Vec<_> = mem
        .memzones()
        .into_iter()
        .filter(|z| z.name.starts_with("MP_straddle_"))
        .collect();
    eprintln!("{} chunk(s) in {} zone(s)", chunks.len(), zones.len());
    assert_eq!(chunks.iter().map(|c| c.count).sum::<u32>(), n);
    for c in &chunks {
        assert_eq!(c.len, c.count as usize * total);
        assert!(
            zones
                .iter()
                .any(|z| c.va >= z.addr && c.va + c.len <= z.addr + z.len),
            "each chunk lies in one of the pool's zones"
        );
        if c.iova == BAD_IOVA {
            continue; // VA mode or no physical addresses: nothing to check
        }
        // Every 4 KiB step of the chunk is where the chunk's IOVA says.
        let mut at = c.va;
        while at < c.va + c.len {
            assert_eq!(
                mem.virt2iova(at),
                Some(c.iova + (at - c.va) as u64),
                "chunk at {:#x}: IOVA jumps inside it at {at:#x}",
                c.va
            );
            at = (at / 4096 + 1) * 4096;
        }
    }
    let mut all = vec![std::ptr::null_mut(); n as usize];
    pool.get_bulk(&mut all).unwrap();
    let mut seen = vec![false; n as usize];
    for &o in &all {
        let i = pool.index_of(o as usize).expect("an object of the pool") as usize;
        assert!(!std::mem::replace(&mut seen[i], true), "object {i} twice");
    }
    pool.put_bulk(&all).unwrap();
    let outside = (zones.iter().map(|z| z.addr + z.len).max().unwrap() + 4096) as *mut u8;
    assert!(matches!(
        pool.put_bulk(&[outside]),
        Err(MempoolError::ForeignObject { .. })
    ));
    pool.cache_flush().unwrap();
    assert!(pool.is_full());
    pool.free().unwrap();
}
