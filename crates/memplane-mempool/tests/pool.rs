//! Mempools on real hugepages: layout and footprint, every handler, caches,
//! many threads with sequence-checked objects, the typed face, iteration,
//! audit, dump, bad input.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u64 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{have_hugepages, instance};
use memplane::iova::BAD_IOVA;
use memplane_mempool::{
    handler_names, mempool_names, register_handler, register_thread, required_memory,
    unregister_thread, Backend, BackendParams, Handler, Mempool, MempoolCache, MempoolConfig,
    MempoolError, MempoolFlags, TypedMempool, LCORE_ZONE,
};

fn zones_of(mem: &memplane::Memory, name: &str) -> Vec<(String, usize)> {
    let p = format!("MP_{name}_");
    mem.memzones()
        .into_iter()
        .filter(|z| z.name.starts_with(&p))
        .map(|z| (z.name, z.len))
        .collect()
}

#[test]
fn layout_footprint_lookup_iteration_dump_and_free() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("layout");
    let mem = &inst.mem;
    for (name, n, elt, flags) in [
        ("plain", 1000u32, 100u32, MempoolFlags::NONE),
        ("packed", 777, 13, MempoolFlags::NO_CACHE_ALIGN),
        ("virt", 300, 2048, MempoolFlags::NO_IOVA_CONTIG),
    ] {
        let need = required_memory(n, elt, flags).unwrap();
        let cfg = MempoolConfig::new(n, elt).flags(flags).private_size(100);
        let pool = Mempool::create(mem, name, &cfg).unwrap();
        let zones = zones_of(mem, name);
        assert_eq!(zones.len(), 1, "{zones:?}");
        assert_eq!(
            zones.iter().map(|z| z.1).sum::<usize>(),
            need,
            "{name}: footprint"
        );
        let chunks = pool.chunks();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].count, n);
        assert!(mem.memzone_lookup(&format!("MP_{name}")).is_some());
        let sz = pool.obj_size();
        let align = if flags.contains(MempoolFlags::NO_CACHE_ALIGN) {
            8
        } else {
            64
        };
        let objs: Vec<*mut u8> = pool.objects().collect();
        assert_eq!(objs.len(), n as usize);
        for (i, &o) in objs.iter().enumerate() {
            assert_eq!(o as usize % align, 0);
            assert_eq!(pool.index_of(o as usize), Some(i as u32));
            let iova = pool.virt2iova(o).unwrap();
            assert_ne!(iova, BAD_IOVA);
            if !flags.contains(MempoolFlags::NO_IOVA_CONTIG) {
                assert_eq!(iova, chunks[0].iova + (o as usize - chunks[0].va) as u64);
            }
        }
        assert_eq!(objs[1] as usize - objs[0] as usize, sz.total_size as usize);
        assert_eq!(pool.private_area().1, 128);
        // Lookup by name sees the same pool.
        let same = Mempool::lookup(mem, name).unwrap();
        assert_eq!(same.addr(), pool.addr());
        assert_eq!(same.handler(), "ring_mp_mc");
        assert_eq!(same.avail_count(), n);
        let mut text = Vec::new();
        pool.dump(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(&format!("mempool <{name}>")), "{text}");
        assert!(text.contains(&format!("size={n}")));
        let j = pool.dump_json();
        assert_eq!(j["size"], n);
        assert_eq!(j["handler"], "ring_mp_mc");
        assert_eq!(j["obj_size"]["total_size"], sz.total_size);
        let rep = pool.audit().unwrap();
        assert_eq!((rep.in_backend, rep.out), (n, 0));
    }
    let mut names = mempool_names(mem);
    names.sort();
    assert_eq!(names, ["packed", "plain", "virt"]);
    for name in names {
        Mempool::lookup(mem, &name).unwrap().free().unwrap();
    }
    assert!(mempool_names(mem).is_empty());
    let left: Vec<String> = mem.memzones().into_iter().map(|z| z.name).collect();
    assert_eq!(left, [LCORE_ZONE], "only the lcore registry stays");
}

#[test]
fn every_handler_gets_all_or_nothing_and_takes_everything_back() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("handlers");
    let mem = &inst.mem;
    let names = handler_names();
    for h in [
        "ring_mp_mc",
        "ring_sp_sc",
        "ring_mp_sc",
        "ring_sp_mc",
        "ring_mt_rts",
        "ring_mt_hts",
        "stack",
        "lf_stack",
        "bucket",
    ] {
        assert!(names.iter().any(|n| n == h), "{h} in {names:?}");
        let n = 500;
        let pool = Mempool::create(mem, h, &MempoolConfig::new(n, 64).handler(h)).unwrap();
        assert_eq!(pool.handler(), h);
        let mut out = vec![std::ptr::null_mut(); 400];
        pool.get_bulk(&mut out).unwrap();
        assert_eq!(pool.in_use_count(), 400);
        // 101 > 100 left: refused, nothing taken.
        let mut more = vec![std::ptr::null_mut(); 101];
        let e = pool.get_bulk(&mut more).unwrap_err();
        assert!(
            matches!(
                e,
                MempoolError::NotEnough {
                    requested: 101,
                    available: 100
                }
            ),
            "{h}: {e}"
        );
        assert_eq!(pool.avail_count(), 100);
        let mut rest = vec![std::ptr::null_mut(); 100];
        pool.get_bulk(&mut rest).unwrap();
        assert!(pool.is_empty());
        assert!(pool.get().is_err());
        let mut all: Vec<usize> = out.iter().chain(&rest).map(|&p| p as usize).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n as usize, "{h}: every object handed out once");
        pool.put_bulk(&out).unwrap();
        pool.put_bulk(&rest).unwrap();
        assert!(pool.is_full());
        pool.audit().unwrap();
        // Found by name, the handler resolved by name.
        assert_eq!(Mempool::lookup(mem, h).unwrap().handler(), h);
        pool.free().unwrap();
    }
    // Flags pick the ring handler.
    let p = Mempool::create(
        mem,
        "spsc",
        &MempoolConfig::new(10, 8).flags(MempoolFlags::SP_PUT | MempoolFlags::SC_GET),
    )
    .unwrap();
    assert_eq!(p.handler(), "ring_sp_sc");
    p.free().unwrap();
}

#[test]
fn caches_serve_gets_and_flush_by_policy() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("cache");
    let mem = &inst.mem;
    let n = 1000;
    let pool = Mempool::create(mem, "c", &MempoolConfig::new(n, 64).cache_size(32)).unwrap();
    // Unregistered: no cache.
    let o = pool.get().unwrap();
    assert_eq!(pool.cache_count(), 0);
    pool.put(o).unwrap();
    let id = register_thread(mem).unwrap();
    assert_eq!(register_thread(mem).unwrap(), id, "idempotent");
    // A get refills the cache to size + n and leaves size.
    let o = pool.get().unwrap();
    assert_eq!(pool.cache_count(), 32);
    assert_eq!(pool.avail_count(), n - 1);
    pool.put(o).unwrap();
    assert_eq!(pool.cache_count(), 33);
    // LIFO: the object just put comes back first.
    assert_eq!(pool.get().unwrap(), o);
    pool.put(o).unwrap();
    // Put over the threshold (48) flushes down to 32.
    let mut objs = vec![std::ptr::null_mut(); 15];
    pool.get_bulk(&mut objs).unwrap();
    assert_eq!(pool.cache_count(), 18);
    pool.put_bulk(&objs).unwrap();
    assert_eq!(pool.cache_count(), 33);
    // Taken by an unregistered thread, straight from the backend.
    let more: Vec<*mut u8> = std::thread::scope(|s| {
        s.spawn(|| {
            let mut v = vec![std::ptr::null_mut(); 20];
            pool.get_bulk(&mut v).unwrap();
            v.into_iter().map(|p| p as usize).collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    })
    .into_iter()
    .map(|a| a as *mut u8)
    .collect();
    assert_eq!(pool.cache_count(), 33);
    pool.put_bulk(&more).unwrap();
    assert_eq!(
        pool.cache_count(),
        32,
        "53 > 48: flushed down to the cache size"
    );
    assert_eq!(pool.avail_count(), n);
    // A bulk larger than 2 x size bypasses the cache.
    let mut big = vec![std::ptr::null_mut(); 100];
    pool.get_bulk(&mut big).unwrap();
    assert_eq!(pool.cache_count(), 32);
    pool.put_bulk(&big).unwrap();
    assert_eq!(pool.cache_count(), 32);
    // Counts are exact; flush empties the cache.
    assert_eq!(pool.info().cache_counts, vec![(id, 32)]);
    pool.cache_flush().unwrap();
    assert_eq!(pool.cache_count(), 0);
    assert_eq!(pool.info().common_pool_count, n);
    pool.audit().unwrap();
    // A get that the backend cannot serve fully takes nothing.
    let mut all = vec![std::ptr::null_mut(); n as usize - 10];
    pool.get_bulk(&mut all).unwrap();
    let mut eleven = vec![std::ptr::null_mut(); 11];
    assert!(pool.get_bulk(&mut eleven).is_err());
    assert_eq!(pool.avail_count(), 10);
    pool.put_bulk(&all).unwrap();
    pool.cache_flush().unwrap();
    assert!(unregister_thread(mem).unwrap());
    // User-owned cache.
    let mut uc = MempoolCache::new(16).unwrap();
    let mut objs = vec![std::ptr::null_mut(); 4];
    pool.get_bulk_with(&mut uc, &mut objs).unwrap();
    assert_eq!(uc.len(), 16);
    assert_eq!(
        pool.in_use_count(),
        20,
        "objects in a user cache count as in use"
    );
    pool.put_bulk_with(&mut uc, &objs).unwrap();
    assert_eq!(uc.len(), 20);
    uc.flush(&pool).unwrap();
    assert!(pool.is_full());
    // Cache size rules.
    assert!(MempoolCache::new(0).is_err());
    assert!(MempoolCache::new(513).is_err());
    pool.free().unwrap();
}

/// Objects carry an owner word: a get must find it 0 (else the object was
/// handed out twice), a put clears it.
#[test]
fn many_threads_never_lose_or_duplicate_objects() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("threads");
    let mem = &inst.mem;
    let rounds = if cfg!(debug_assertions) { 3000 } else { 50_000 };
    for (h, cache) in [
        ("ring_mp_mc", 64),
        ("ring_mp_mc", 0),
        ("ring_mt_rts", 0),
        ("ring_mt_hts", 16),
        ("stack", 16),
        ("lf_stack", 0),
        ("lf_stack", 32),
        ("bucket", 0),
        ("bucket", 32),
    ] {
        let n = 2048;
        let name = format!("t_{h}_{cache}");
        // obj_init: clear the owner word of every object.
        let pool = Mempool::create_with(
            mem,
            &name,
            &MempoolConfig::new(n, 64).cache_size(cache).handler(h),
            // SAFETY: a fresh 64-byte element, 64-aligned.
            |_, o| unsafe { o.cast::<u64>().write(0) },
        )
        .unwrap();
        let served = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pool, served) = (&pool, &served);
                s.spawn(move || {
                    if t != 3 {
                        register_thread(mem).unwrap(); // one thread stays cacheless
                    }
                    let mut r = t.wrapping_mul(0x9e37_79b9) | 1;
                    let mut objs = vec![std::ptr::null_mut(); 64];
                    for i in 0..rounds {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        let k = (r % 64) as usize + 1;
                        if pool.get_bulk(&mut objs[..k]).is_err() {
                            continue;
                        }
                        let tag = (t + 1) << 32 | i;
                        for &o in &objs[..k] {
                            // SAFETY: our object, 64 bytes, 64-aligned.
                            let w = unsafe { &*o.cast::<AtomicU64>() };
                            assert_eq!(w.swap(tag, Ordering::AcqRel), 0, "handed out twice");
                        }
                        std::thread::yield_now();
                        for &o in &objs[..k] {
                            // SAFETY: as above.
                            let w = unsafe { &*o.cast::<AtomicU64>() };
                            assert_eq!(w.swap(0, Ordering::AcqRel), tag, "changed while held");
                        }
                        pool.put_bulk(&objs[..k]).unwrap();
                        served.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    pool.cache_flush().unwrap();
                });
            }
        });
        assert!(served.load(Ordering::Relaxed) > 0);
        assert_eq!(pool.avail_count(), n, "{name}");
        assert_eq!(pool.info().common_pool_count, n, "{name}: caches flushed");
        let rep = pool.audit().unwrap();
        assert_eq!(rep.in_backend, n);
        pool.free().unwrap();
    }
}

struct Counted(u64, Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn typed_pool_boxes_go_back_on_drop() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("typed");
    let mem = &inst.mem;
    let drops = Arc::new(AtomicUsize::new(0));
    let pool: TypedMempool<'_, Counted> =
        TypedMempool::create(mem, "typed", &MempoolConfig::new(8, 0)).unwrap();
    {
        let mut boxes: Vec<_> = (0..8)
            .map(|i| pool.alloc(Counted(i, drops.clone())).unwrap())
            .collect();
        assert!(pool.alloc(Counted(99, drops.clone())).is_err());
        boxes[3].0 += 100;
        assert_eq!(boxes[3].0, 103);
        assert_eq!(pool.raw().in_use_count(), 8);
        assert_eq!(PoolBox_addr(&boxes[0]) % 64, 0);
    }
    assert_eq!(
        drops.load(Ordering::Relaxed),
        9,
        "8 boxes + the refused value"
    );
    assert!(pool.raw().is_full());
    // Looked up with a type that does not fit.
    assert!(matches!(
        TypedMempool::<[u64; 64]>::lookup(mem, "typed"),
        Err(MempoolError::TypeMismatch { .. })
    ));
    let again = TypedMempool::<Counted>::lookup(mem, "typed").unwrap();
    drop(again.alloc(Counted(1, drops.clone())).unwrap());
    pool.free().unwrap();
}

#[allow(non_snake_case)]
fn PoolBox_addr<T>(b: &memplane_mempool::PoolBox<'_, T>) -> usize {
    memplane_mempool::PoolBox::as_ptr(b) as usize
}

#[test]
fn bad_input_is_a_typed_error_and_leaves_nothing_behind() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bad");
    let mem = &inst.mem;
    memplane_mempool::lcore_id(mem).unwrap(); // creates the lcore registry zone
    let zones_before = mem.memzone_count();
    let e = |cfg: MempoolConfig| Mempool::create(mem, "bad", &cfg).unwrap_err();
    assert!(matches!(
        e(MempoolConfig::new(0, 64)),
        MempoolError::ZeroObjects
    ));
    assert!(matches!(
        e(MempoolConfig::new(10, 0)),
        MempoolError::BadEltSize { .. }
    ));
    assert!(matches!(
        e(MempoolConfig::new(10, u32::MAX)),
        MempoolError::BadEltSize { .. }
    ));
    assert!(matches!(
        e(MempoolConfig::new(10_000, 64).cache_size(513)),
        MempoolError::BadCacheSize { .. }
    ));
    assert!(matches!(
        e(MempoolConfig::new(100, 64).cache_size(68)),
        MempoolError::BadCacheSize { .. }
    ));
    assert!(matches!(
        e(MempoolConfig::new(10, 64).handler("no_such_handler")),
        MempoolError::UnknownHandler { .. }
    ));
    assert!(MempoolFlags::from_bits(0x100).is_err());
    // Too much memory for the machine: the zone error, nothing left.
    assert!(matches!(
        e(MempoolConfig::new(1 << 20, 1 << 20)),
        MempoolError::TooLarge { .. }
    ));
    assert!(matches!(
        Mempool::create(mem, "", &MempoolConfig::new(1, 8)),
        Err(MempoolError::BadName { .. })
    ));
    assert!(matches!(
        Mempool::create(mem, &"x".repeat(26), &MempoolConfig::new(1, 8)),
        Err(MempoolError::BadName { .. })
    ));
    assert_eq!(mem.memzone_count(), zones_before);
    // A 25-byte name works (ring zone RG_MP_<name> is 31 bytes).
    let long = "y".repeat(25);
    Mempool::create(mem, &long, &MempoolConfig::new(4, 8))
        .unwrap()
        .free()
        .unwrap();
    // Name clash.
    let a = Mempool::create(mem, "a", &MempoolConfig::new(10, 64)).unwrap();
    assert!(matches!(
        Mempool::create(mem, "a", &MempoolConfig::new(10, 64)),
        Err(MempoolError::Exists { .. })
    ));
    assert!(matches!(
        Mempool::lookup(mem, "nope"),
        Err(MempoolError::NotFound { .. })
    ));
    // More than exist: refused, nothing taken (with and without a cache).
    let mut eleven = vec![std::ptr::null_mut(); 11];
    assert!(matches!(
        a.get_bulk(&mut eleven),
        Err(MempoolError::NotEnough { requested: 11, .. })
    ));
    assert!(a.is_full());
    let c = Mempool::create(mem, "c", &MempoolConfig::new(12, 64).cache_size(8)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            register_thread(mem).unwrap();
            let mut thirteen = vec![std::ptr::null_mut(); 13];
            assert!(c.get_bulk(&mut thirteen).is_err());
            let o = c.get().unwrap();
            assert!(c.get_bulk(&mut thirteen[..12]).is_err());
            assert_eq!(c.avail_count(), 11, "nothing taken");
            c.put(o).unwrap();
            c.cache_flush().unwrap();
        });
    });
    assert!(c.is_full());
    c.free().unwrap();
    // Foreign objects: another pool's (named), and a stack address.
    let b = Mempool::create(mem, "b", &MempoolConfig::new(10, 64)).unwrap();
    let ob = b.get().unwrap();
    match a.put(ob).unwrap_err() {
        MempoolError::ForeignObject { owner, .. } => assert_eq!(owner.as_deref(), Some("b")),
        other => panic!("{other}"),
    }
    let mut local = [0u8; 256];
    assert!(matches!(
        a.put(local.as_mut_ptr()),
        Err(MempoolError::ForeignObject { owner: None, .. })
    ));
    // The same with room in a's ring (two of a's objects out), so that
    // the refusal is the membership check's and not a full ring's, for
    // one object and for a burst.
    let held = a.get().unwrap();
    let held2 = a.get().unwrap();
    assert!(matches!(a.put(ob), Err(MempoolError::ForeignObject { .. })));
    assert!(matches!(
        a.put(local.as_mut_ptr()),
        Err(MempoolError::ForeignObject { .. })
    ));
    assert!(matches!(
        a.put_bulk(&[held, ob]),
        Err(MempoolError::ForeignObject { .. })
    ));
    assert_eq!(a.avail_count(), 8, "nothing put");
    a.put_bulk(&[held, held2]).unwrap();
    // A pointer inside an object is not an object (debug builds check the
    // object boundary; release builds only the pool's memory range).
    let oa = a.get().unwrap();
    if cfg!(debug_assertions) {
        // SAFETY: inside the 64-byte element.
        assert!(a.put(unsafe { oa.add(8) }).is_err());
    }
    assert_eq!(a.in_use_count(), 1);
    // Free while objects are out: refused, pool intact.
    assert!(matches!(
        a.free(),
        Err(MempoolError::InUse { in_use: 1, .. })
    ));
    let a = Mempool::lookup(mem, "a").unwrap();
    a.put(oa).unwrap();
    if cfg!(debug_assertions) {
        // Double put: caught by the cookie, nothing returned.
        assert!(matches!(a.put(oa), Err(MempoolError::DoublePut { .. })));
        assert!(matches!(
            a.put_bulk(&[ob, ob]),
            Err(MempoolError::ForeignObject { .. })
        ));
        let o2 = a.get().unwrap();
        assert!(matches!(
            a.put_bulk(&[o2, o2]),
            Err(MempoolError::DoublePut { .. })
        ));
        a.put(o2).unwrap();
    }
    a.audit().unwrap();
    a.free().unwrap();
    // free_forced with an object out.
    assert_eq!(b.in_use_count(), 1);
    b.free_forced().unwrap();
    assert_eq!(mem.memzone_count(), zones_before, "only the lcore registry");
}

#[test]
fn audit_catches_an_object_put_twice_past_the_checks() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("audit");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "au", &MempoolConfig::new(16, 64).handler("stack")).unwrap();
    let o = pool.get().unwrap();
    pool.put(o).unwrap();
    // Smuggle a second copy into the backend through a raw handler
    // attached to the same pool (bypassing put's checks).
    let backend = memplane_mempool::handler::find_handler("stack")
        .unwrap()
        .attach(
            mem,
            &BackendParams {
                name: "au".into(),
                n: 16,
                socket: -1,
                flags: 0,
                obj_size: pool.obj_size(),
                layout: None,
            },
        )
        .unwrap();
    let mut two = [std::ptr::null_mut(); 2];
    // Take two out via the raw backend (`o` is on top), put `o` back twice.
    backend.dequeue(&mut two).unwrap();
    assert!(two.contains(&o));
    backend.enqueue(&[o, o]).unwrap();
    let e = pool.audit().unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    drop(backend);
    pool.free_forced().unwrap();
}

/// A user handler: a stack of its own in a memzone, registered by name.
struct Tagged;
impl Handler for Tagged {
    fn create<'m>(
        &self,
        mem: &'m memplane::Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        memplane_mempool::handler::find_handler("stack")?.create(mem, p)
    }
    fn attach<'m>(
        &self,
        mem: &'m memplane::Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        memplane_mempool::handler::find_handler("stack")?.attach(mem, p)
    }
}

#[test]
fn user_handlers_are_registered_and_resolved_by_name() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("user");
    let mem = &inst.mem;
    register_handler("tagged_stack", Arc::new(Tagged)).unwrap();
    assert!(register_handler("tagged_stack", Arc::new(Tagged)).is_err());
    assert!(register_handler(&"h".repeat(32), Arc::new(Tagged)).is_err());
    let pool = Mempool::create(
        mem,
        "u",
        &MempoolConfig::new(100, 32).handler("tagged_stack"),
    )
    .unwrap();
    let o = pool.get().unwrap();
    pool.put(o).unwrap();
    assert_eq!(Mempool::lookup(mem, "u").unwrap().handler(), "tagged_stack");
    pool.free().unwrap();
}

#[test]
fn lcore_ids_are_released_at_thread_exit_and_caches_stay_counted() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("lcores");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "l", &MempoolConfig::new(100, 64).cache_size(8)).unwrap();
    let ids: Vec<u32> = (0..3)
        .map(|_| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let id = register_thread(mem).unwrap();
                    // Leave objects in this lcore's cache.
                    let o = pool.get().unwrap();
                    pool.put(o).unwrap();
                    assert_eq!(pool.cache_count(), 9);
                    id
                })
                .join()
                .unwrap()
            })
        })
        .collect();
    // The id went back at each exit, so each thread got the same one.
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert!(memplane_mempool::registered_lcores(mem).unwrap().is_empty());
    // The exited threads' cached objects still count as available, and
    // the next holder of the id uses them.
    assert!(pool.is_full());
    assert_eq!(pool.info().cache_counts, vec![(ids[0], 9)]);
    assert_eq!(register_thread(mem).unwrap(), ids[0]);
    assert_eq!(pool.cache_count(), 9);
    pool.cache_flush().unwrap();
    assert_eq!(pool.info().common_pool_count, 100);
    pool.free().unwrap();
}

#[test]
fn single_producer_pools_refuse_concurrent_use_with_an_error() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("spsc");
    let mem = &inst.mem;
    let pool =
        Mempool::create(mem, "sp", &MempoolConfig::new(64, 64).handler("ring_sp_sc")).unwrap();
    // Hold the ring's single consumer role through a second handle.
    let ring = memplane_ring::RawRing::lookup(mem, "MP_sp").unwrap();
    let consumer = ring.consumer().unwrap();
    assert!(matches!(
        pool.get(),
        Err(MempoolError::SingleRoleBusy {
            role: "consumer",
            ..
        })
    ));
    drop(consumer);
    let o = pool.get().unwrap();
    pool.put(o).unwrap();
    pool.free().unwrap();
}

#[test]
fn lcore_cache_handle_serves_the_threads_cache_and_pins_its_lcore_id() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("lcore_cache");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "lc", &MempoolConfig::new(1000, 64).cache_size(32)).unwrap();
    let nocache = Mempool::create(mem, "lc0", &MempoolConfig::new(100, 64)).unwrap();
    assert!(nocache.lcore_cache().is_none(), "no caches");
    assert!(pool.lcore_cache().is_none(), "no lcore id yet");
    let id = register_thread(mem).unwrap();
    let lc = pool.lcore_cache().unwrap();
    assert_eq!(lc.lcore_id(), id);
    let mut objs = vec![std::ptr::null_mut(); 40];
    for part in objs.chunks_mut(8) {
        lc.get_bulk(part).unwrap();
    }
    let distinct: std::collections::BTreeSet<_> = objs.iter().collect();
    assert_eq!(distinct.len(), 40);
    // The handle's cache is the thread's: the pool sees the same count.
    assert_eq!(lc.len(), pool.cache_count());
    for part in objs.chunks(4) {
        lc.put_bulk(part).unwrap();
    }
    // Policy as put_bulk: at most 1.5 x 32 after a put.
    assert!(lc.len() <= 48, "{}", lc.len());
    assert_eq!(pool.in_use_count(), 0);
    // The same checks as put_bulk: a foreign pointer fails the whole call.
    let mut two = [std::ptr::null_mut(); 2];
    lc.get_bulk(&mut two).unwrap();
    let before = lc.len();
    assert!(matches!(
        lc.put_bulk(&[two[0], 0x40 as *mut u8]),
        Err(MempoolError::ForeignObject { addr: 0x40, .. })
    ));
    assert_eq!(lc.len(), before, "nothing returned");
    // While the handle lives, the lcore id stays this thread's.
    assert!(matches!(
        unregister_thread(mem),
        Err(MempoolError::LcoreCacheHeld { handles: 1, .. })
    ));
    // put_bulk_unchecked: for callers that know.
    // SAFETY: both came from this pool and are out.
    unsafe { pool.put_bulk_unchecked(&two) }.unwrap();
    lc.flush().unwrap();
    assert!(lc.is_empty());
    drop(lc);
    assert!(pool.is_full());
    assert!(unregister_thread(mem).unwrap());
    pool.free().unwrap();
    nocache.free().unwrap();
}

/// A user-owned cache belongs to one pool while it holds objects: used
/// with another pool it is refused and nothing moves; empty, it moves to
/// the other pool; a pointer that is not the pool's is refused through it.
#[test]
fn a_user_cache_holding_objects_stays_with_its_pool() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("ucbind");
    let mem = &inst.mem;
    let a = Mempool::create(mem, "uc_a", &MempoolConfig::new(256, 64)).unwrap();
    let b = Mempool::create(mem, "uc_b", &MempoolConfig::new(256, 64)).unwrap();
    let mut uc = MempoolCache::new(8).unwrap();
    let mut objs = vec![std::ptr::null_mut(); 3];
    a.get_bulk_with(&mut uc, &mut objs).unwrap();
    let held = uc.len();
    assert!(held > 0);
    // Holding a's objects: b refuses the cache, for a get and a put.
    let mut other = vec![std::ptr::null_mut(); 2];
    assert!(matches!(
        b.get_bulk_with(&mut uc, &mut other),
        Err(MempoolError::ForeignObject { .. })
    ));
    let mut bobj = vec![std::ptr::null_mut(); 1];
    b.get_bulk(&mut bobj).unwrap();
    assert!(matches!(
        b.put_bulk_with(&mut uc, &bobj),
        Err(MempoolError::ForeignObject { .. })
    ));
    assert_eq!(uc.len(), held, "a refused call moves nothing");
    assert_eq!(b.avail_count(), 255);
    // b's object through a's cache: not a's, refused.
    assert!(matches!(
        a.put_bulk_with(&mut uc, &bobj),
        Err(MempoolError::ForeignObject { .. })
    ));
    assert_eq!(uc.len(), held);
    // Back home, then empty: the cache can serve b.
    a.put_bulk_with(&mut uc, &objs).unwrap();
    uc.flush(&a).unwrap();
    assert!(a.is_full());
    b.get_bulk_with(&mut uc, &mut other).unwrap();
    b.put_bulk_with(&mut uc, &other).unwrap();
    b.put_bulk_with(&mut uc, &bobj).unwrap();
    uc.flush(&b).unwrap();
    assert!(b.is_full());
    a.free().unwrap();
    b.free().unwrap();
}
