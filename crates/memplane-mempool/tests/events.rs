//! Mempool events (DPDK's rte_mempool_event_callback_register): Ready once
//! per pool when it becomes full (one-step and two-step creation), Destroy
//! before the memory is released and only when the free goes ahead, the
//! registry's errors, (un)registering from inside a callback, panicking
//! callbacks, concurrent creators, and replay of pools ready before.
//!
//! Callbacks are process-wide and the tests of this binary run in
//! parallel: each recorder keeps only the events of its own instance.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u32 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::{have_hugepages, instance, opts, pool_lock};
use memplane::iova::BAD_IOVA;
use memplane::memzone::MemzoneFlags;
use memplane::Memory;
use memplane_mempool::{
    event_callback_id, register_event_callback, replay_ready, unregister_event_callback, ChunkInfo,
    EventCallback, EventCallbackId, Mempool, MempoolConfig, MempoolError, MempoolEvent,
    MempoolView,
};

/// What a callback saw.
#[derive(Debug, Clone)]
struct Seen {
    event: MempoolEvent,
    name: String,
    populated: u32,
    size: u32,
    chunks: Vec<ChunkInfo>,
    /// The pool's zones (`MP_<name>`, `MP_<name>_<k>`) present in the
    /// instance during the call.
    zones: usize,
    /// `Mempool::lookup` of the name succeeded during the call.
    lookup_ok: bool,
    /// Sum of the first byte of every chunk, read during the call: the
    /// read itself is the check (an anonymous chunk unmapped before
    /// Destroy would fault).
    _first_bytes: u64,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn mem_key(mem: &Memory) -> usize {
    std::ptr::from_ref(mem) as usize
}

fn observe(event: MempoolEvent, v: &MempoolView<'_, '_>) -> Seen {
    let name = v.name().to_string();
    let chunks = v.chunks();
    let zones = v
        .memory()
        .memzones()
        .into_iter()
        .filter(|z| z.name == format!("MP_{name}") || z.name.starts_with(&format!("MP_{name}_")))
        .count();
    let lookup_ok = Mempool::lookup(v.memory(), &name).is_ok();
    let first_bytes = chunks
        .iter()
        // SAFETY: the pool's chunk, mapped during the callback (that is
        // what is tested); a volatile byte read.
        .map(|c| u64::from(unsafe { std::ptr::read_volatile(c.va as *const u8) }))
        .sum();
    Seen {
        event,
        name,
        populated: v.populated(),
        size: v.size(),
        chunks,
        zones,
        lookup_ok,
        _first_bytes: first_bytes,
    }
}

/// A callback recording the events of `mem`'s pools.
fn recorder(mem: &Memory) -> (EventCallback, Log) {
    let log: Log = Arc::default();
    let key = mem_key(mem);
    let l = Arc::clone(&log);
    let cb: EventCallback = Arc::new(move |ev, v| {
        if mem_key(v.memory()) == key {
            let s = observe(ev, v);
            l.lock().unwrap().push(s);
        }
    });
    (cb, log)
}

fn events(log: &Log) -> Vec<(MempoolEvent, String)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| (s.event, s.name.clone()))
        .collect()
}

fn ready(name: &str) -> (MempoolEvent, String) {
    (MempoolEvent::Ready, name.to_string())
}

fn destroy(name: &str) -> (MempoolEvent, String) {
    (MempoolEvent::Destroy, name.to_string())
}

#[test]
fn create_fires_ready_once_and_free_fires_destroy_before_the_memory_goes() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("ev_create");
    let mem = &inst.mem;
    let (cb, log) = recorder(mem);
    let id = register_event_callback(cb).unwrap();
    let pool = Mempool::create(mem, "ev_a", &MempoolConfig::new(1000, 100)).unwrap();
    assert_eq!(events(&log), [ready("ev_a")]);
    {
        let l = log.lock().unwrap();
        let s = &l[0];
        assert_eq!((s.populated, s.size), (1000, 1000), "full when Ready");
        assert_eq!(s.chunks, pool.chunks(), "the view shows the pool's chunks");
        assert!(s.chunks.iter().all(|c| c.iova != BAD_IOVA));
        assert!(s.lookup_ok, "published when Ready fires");
    }
    // Other handles, gets and puts fire nothing.
    let other = Mempool::lookup(mem, "ev_a").unwrap();
    let o = other.get().unwrap();
    other.put(o).unwrap();
    drop(other);
    assert_eq!(events(&log).len(), 1);
    let chunks = pool.chunks();
    pool.free().unwrap();
    assert_eq!(events(&log), [ready("ev_a"), destroy("ev_a")]);
    {
        let l = log.lock().unwrap();
        let s = &l[1];
        assert_eq!(s.chunks, chunks, "Destroy sees the chunk list");
        assert_eq!(s.zones, 2, "header and object zone still there: {s:?}");
        assert!(!s.lookup_ok, "unpublished before Destroy");
    }
    assert!(mem
        .memzones()
        .iter()
        .all(|z| !z.name.starts_with("MP_ev_a")));
    unregister_event_callback(id).unwrap();
    // Unregistered: nothing more.
    Mempool::create(mem, "ev_b", &MempoolConfig::new(10, 64))
        .unwrap()
        .free()
        .unwrap();
    assert_eq!(events(&log).len(), 2);
}

#[test]
fn two_step_pools_fire_ready_after_the_last_populate_call_only() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("ev_twostep");
    let mem = &inst.mem;
    let (cb, log) = recorder(mem);
    let id = register_event_callback(cb).unwrap();

    // populate_virt twice: Ready only after the second.
    let n = 300u32;
    let mut pool = Mempool::create_empty(mem, "ev_virt", &MempoolConfig::new(n, 64)).unwrap();
    let total = pool.obj_size().total_size as usize;
    let z = mem
        .memzone_reserve("ev_user", 2 * 200 * total, -1, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: the zone outlives the pool (freed after it below).
    let added = unsafe { pool.populate_virt(z.as_mut_ptr(), 200 * total) }.unwrap();
    assert_eq!(added, 200);
    assert!(events(&log).is_empty(), "not full yet: no Ready");
    // SAFETY: as above; the second half of the zone.
    let added =
        unsafe { pool.populate_virt(z.as_mut_ptr().add(200 * total), 200 * total) }.unwrap();
    assert_eq!(added, 100);
    assert_eq!(events(&log), [ready("ev_virt")]);
    assert_eq!(log.lock().unwrap()[0].chunks.len(), 2, "both chunks");
    assert_eq!(log.lock().unwrap()[0].populated, n);
    // A refused populate fires nothing.
    // SAFETY: as above (refused, nothing placed).
    let e = unsafe { pool.populate_virt(z.as_mut_ptr(), 200 * total) }.unwrap_err();
    assert!(matches!(e, MempoolError::PopulateRefused { .. }), "{e}");
    assert!(pool.populate_default().is_err());
    assert_eq!(events(&log).len(), 1);
    pool.free().unwrap();
    z.free().unwrap();
    assert_eq!(events(&log), [ready("ev_virt"), destroy("ev_virt")]);

    // populate_virt part, populate_default the rest.
    let mut pool = Mempool::create_empty(mem, "ev_mix", &MempoolConfig::new(n, 64)).unwrap();
    let z = mem
        .memzone_reserve("ev_user2", 100 * total, -1, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: the zone outlives the pool.
    unsafe { pool.populate_virt(z.as_mut_ptr(), 100 * total) }.unwrap();
    assert_eq!(events(&log).len(), 2);
    assert_eq!(pool.populate_default().unwrap(), 200);
    assert_eq!(events(&log)[2], ready("ev_mix"));
    pool.free().unwrap();
    z.free().unwrap();

    // populate_anon.
    let mut pool = Mempool::create_empty(mem, "ev_anon", &MempoolConfig::new(50, 64)).unwrap();
    assert!(events(&log).len() == 4);
    pool.populate_anon().unwrap();
    assert_eq!(events(&log)[4], ready("ev_anon"));
    assert_eq!(log.lock().unwrap()[4].chunks[0].iova, BAD_IOVA);
    pool.free().unwrap();
    assert_eq!(
        events(&log),
        [
            ready("ev_virt"),
            destroy("ev_virt"),
            ready("ev_mix"),
            destroy("ev_mix"),
            ready("ev_anon"),
            destroy("ev_anon"),
        ]
    );
    unregister_event_callback(id).unwrap();
}

/// An instance whose heap may not grow past 8 MiB: a 16 MiB pool cannot
/// be populated.
#[test]
fn a_pool_that_fails_to_populate_fires_no_ready() {
    if !have_hugepages(16) {
        return;
    }
    let _lock = pool_lock();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("mpl_ev_nomem_{}", std::process::id());
    let mem = Memory::init(&opts(
        &prefix,
        dir.path().to_str().unwrap(),
        &["--socket-limit", "8"],
    ))
    .unwrap();
    let (cb, log) = recorder(&mem);
    let id = register_event_callback(cb).unwrap();
    let big = MempoolConfig::new(16 * 1024, 960);
    // One step: refused, nothing fired (the pool was never handed out, so
    // its rollback fires no Destroy either).
    let e = Mempool::create(&mem, "ev_big", &big).unwrap_err();
    assert!(matches!(e, MempoolError::NoMemory { .. }), "{e}");
    assert!(events(&log).is_empty(), "{:?}", events(&log));
    // Two steps: the failed populate fires nothing; freeing the empty
    // pool fires Destroy (as DPDK's rte_mempool_free), with populated 0.
    let mut p = Mempool::create_empty(&mem, "ev_big2", &big).unwrap();
    assert!(matches!(
        p.populate_default().unwrap_err(),
        MempoolError::NoMemory { .. }
    ));
    assert!(events(&log).is_empty());
    p.free().unwrap();
    assert_eq!(events(&log), [destroy("ev_big2")]);
    let s = log.lock().unwrap()[0].clone();
    assert_eq!((s.populated, s.chunks.len()), (0, 0));
    // A pool that fits still fires.
    Mempool::create(&mem, "ev_small", &MempoolConfig::new(100, 960))
        .unwrap()
        .free()
        .unwrap();
    assert_eq!(
        events(&log),
        [destroy("ev_big2"), ready("ev_small"), destroy("ev_small")]
    );
    unregister_event_callback(id).unwrap();
}

#[test]
fn a_refused_free_fires_no_destroy() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_inuse");
    let mem = &inst.mem;
    let (cb, log) = recorder(mem);
    let id = register_event_callback(cb).unwrap();
    let pool = Mempool::create(mem, "ev_inuse", &MempoolConfig::new(100, 64)).unwrap();
    let o = pool.get().unwrap();
    let e = pool.free().unwrap_err();
    assert!(matches!(e, MempoolError::InUse { in_use: 1, .. }), "{e}");
    assert_eq!(events(&log), [ready("ev_inuse")], "no Destroy");
    let pool = Mempool::lookup(mem, "ev_inuse").unwrap();
    pool.put(o).unwrap();
    pool.free().unwrap();
    assert_eq!(events(&log), [ready("ev_inuse"), destroy("ev_inuse")]);
    // free_forced fires Destroy too.
    let pool = Mempool::create(mem, "ev_forced", &MempoolConfig::new(100, 64)).unwrap();
    let _o = pool.get().unwrap();
    pool.free_forced().unwrap();
    assert_eq!(events(&log)[3], destroy("ev_forced"));
    let s = log.lock().unwrap()[3].clone();
    assert_eq!(s.zones, 2, "memory still there during Destroy");
    unregister_event_callback(id).unwrap();
}

#[test]
fn duplicate_and_unknown_callbacks_are_refused_and_change_nothing() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_dup");
    let mem = &inst.mem;
    let (cb, log) = recorder(mem);
    let id = register_event_callback(Arc::clone(&cb)).unwrap();
    assert_eq!(event_callback_id(&cb), Some(id));
    let e = register_event_callback(Arc::clone(&cb)).unwrap_err();
    assert!(
        matches!(e, MempoolError::EventCallbackExists { id: i } if i == id),
        "{e}"
    );
    assert!(e.to_string().contains("registered already"), "{e}");
    assert_eq!(event_callback_id(&cb), Some(id), "still registered once");
    // Registered once: one call per event.
    Mempool::create(mem, "ev_dup", &MempoolConfig::new(10, 64))
        .unwrap()
        .free()
        .unwrap();
    assert_eq!(events(&log), [ready("ev_dup"), destroy("ev_dup")]);
    // A different Arc of the same code is another callback.
    let (cb2, log2) = recorder(mem);
    let id2 = register_event_callback(cb2).unwrap();
    assert_ne!(id, id2);
    unregister_event_callback(id2).unwrap();
    assert!(log2.lock().unwrap().is_empty());
    // Unknown: refused, the others stay registered.
    let e = unregister_event_callback(id2).unwrap_err();
    assert!(
        matches!(e, MempoolError::UnknownEventCallback { id: i } if i == id2),
        "{e}"
    );
    assert_eq!(event_callback_id(&cb), Some(id));
    Mempool::create(mem, "ev_dup2", &MempoolConfig::new(10, 64))
        .unwrap()
        .free()
        .unwrap();
    assert_eq!(events(&log).len(), 4, "the first callback still fires");
    unregister_event_callback(id).unwrap();
    assert_eq!(event_callback_id(&cb), None);
    assert!(matches!(
        unregister_event_callback(id),
        Err(MempoolError::UnknownEventCallback { .. })
    ));
    // Once unregistered, the same Arc may be registered again (new id).
    let id3 = register_event_callback(Arc::clone(&cb)).unwrap();
    assert_ne!(id3, id);
    unregister_event_callback(id3).unwrap();
}

#[test]
fn callbacks_register_and_unregister_from_inside_a_callback() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_reent");
    let mem = &inst.mem;
    let key = mem_key(mem);
    let (late, late_log) = recorder(mem);
    let late_id: Arc<Mutex<Option<EventCallbackId>>> = Arc::default();
    let victim_calls = Arc::new(AtomicU32::new(0));
    let victim: EventCallback = {
        let c = Arc::clone(&victim_calls);
        Arc::new(move |_, v| {
            if mem_key(v.memory()) == key {
                c.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let first_calls = Arc::new(AtomicU32::new(0));
    let my_id: Arc<Mutex<Option<EventCallbackId>>> = Arc::default();
    let victim_id: Arc<Mutex<Option<EventCallbackId>>> = Arc::default();
    // On its first event, `first` registers `late`, unregisters `victim`
    // (registered after it, so in the same snapshot) and itself.
    let first: EventCallback = {
        let (calls, my_id, victim_id, late_id) = (
            Arc::clone(&first_calls),
            Arc::clone(&my_id),
            Arc::clone(&victim_id),
            Arc::clone(&late_id),
        );
        let late = Arc::clone(&late);
        Arc::new(move |_, v| {
            if mem_key(v.memory()) != key {
                return;
            }
            calls.fetch_add(1, Ordering::SeqCst);
            *late_id.lock().unwrap() = Some(register_event_callback(Arc::clone(&late)).unwrap());
            unregister_event_callback(victim_id.lock().unwrap().unwrap()).unwrap();
            unregister_event_callback(my_id.lock().unwrap().unwrap()).unwrap();
        })
    };
    // Register `first` and `victim` before any pool exists.
    *my_id.lock().unwrap() = Some(register_event_callback(first).unwrap());
    *victim_id.lock().unwrap() = Some(register_event_callback(victim).unwrap());
    let pool = Mempool::create(mem, "ev_r1", &MempoolConfig::new(10, 64)).unwrap();
    assert_eq!(first_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        victim_calls.load(Ordering::SeqCst),
        0,
        "unregistered before its turn in the snapshot: not called"
    );
    assert!(
        late_log.lock().unwrap().is_empty(),
        "registered during the firing: sees the next events only"
    );
    pool.free().unwrap();
    assert_eq!(first_calls.load(Ordering::SeqCst), 1, "unregistered itself");
    assert_eq!(victim_calls.load(Ordering::SeqCst), 0);
    assert_eq!(events(&late_log), [destroy("ev_r1")]);

    // A callback may create and free another pool: its events fire nested.
    let nested: EventCallback = Arc::new(move |ev, v| {
        if mem_key(v.memory()) == key && ev == MempoolEvent::Ready && v.name() == "ev_outer" {
            Mempool::create(v.memory(), "ev_inner", &MempoolConfig::new(10, 64))
                .unwrap()
                .free()
                .unwrap();
        }
    });
    // Registered after `late`: `late` sees outer's Ready first.
    let nested_id = register_event_callback(nested).unwrap();
    Mempool::create(mem, "ev_outer", &MempoolConfig::new(10, 64))
        .unwrap()
        .free()
        .unwrap();
    assert_eq!(
        events(&late_log),
        [
            destroy("ev_r1"),
            ready("ev_outer"),
            ready("ev_inner"),
            destroy("ev_inner"),
            destroy("ev_outer"),
        ]
    );
    unregister_event_callback(nested_id).unwrap();
    unregister_event_callback(late_id.lock().unwrap().unwrap()).unwrap();
}

#[test]
fn a_panicking_callback_is_caught_and_the_pool_is_whole() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_panic");
    let mem = &inst.mem;
    let key = mem_key(mem);
    let panicky: EventCallback = Arc::new(move |ev, v| {
        assert!(
            mem_key(v.memory()) != key,
            "callback panics on {ev} of {}",
            v.name()
        );
    });
    let pid = register_event_callback(panicky).unwrap();
    let (cb, log) = recorder(mem);
    let id = register_event_callback(cb).unwrap();
    let pool = Mempool::create(mem, "ev_panic", &MempoolConfig::new(100, 64).cache_size(8))
        .expect("creation goes on");
    assert_eq!(
        events(&log),
        [ready("ev_panic")],
        "later callbacks still run"
    );
    // The pool is whole: full, published, usable.
    assert!(pool.is_full());
    let other = Mempool::lookup(mem, "ev_panic").unwrap();
    let mut objs = vec![std::ptr::null_mut(); 100];
    other.get_bulk(&mut objs).unwrap();
    other.put_bulk(&objs).unwrap();
    other.cache_flush().unwrap();
    drop(other);
    // Two-step path too.
    let mut p2 = Mempool::create_empty(mem, "ev_panic2", &MempoolConfig::new(10, 64)).unwrap();
    assert_eq!(p2.populate_default().unwrap(), 10);
    assert!(Mempool::lookup(mem, "ev_panic2").is_ok());
    // Free goes on, and releases everything.
    pool.free().unwrap();
    p2.free().unwrap();
    assert!(mem.memzones().iter().all(|z| !z.name.starts_with("MP_ev")));
    assert_eq!(
        events(&log),
        [
            ready("ev_panic"),
            ready("ev_panic2"),
            destroy("ev_panic"),
            destroy("ev_panic2")
        ]
    );
    // The registry is not poisoned.
    unregister_event_callback(pid).unwrap();
    let (cb2, _) = recorder(mem);
    let id2 = register_event_callback(cb2).unwrap();
    unregister_event_callback(id2).unwrap();
    unregister_event_callback(id).unwrap();
}

#[test]
fn pools_created_by_two_threads_at_once_each_fire_ready_then_destroy_once() {
    const ROUNDS: usize = 20;
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("ev_threads");
    let mem = &inst.mem;
    let (cb, log) = recorder(mem);
    let id = register_event_callback(cb).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                for i in 0..ROUNDS {
                    let name = format!("ev_t{t}_{i}");
                    if i % 2 == 0 {
                        Mempool::create(mem, &name, &MempoolConfig::new(64, 64))
                            .unwrap()
                            .free()
                            .unwrap();
                    } else {
                        let mut p =
                            Mempool::create_empty(mem, &name, &MempoolConfig::new(64, 64)).unwrap();
                        p.populate_default().unwrap();
                        p.free().unwrap();
                    }
                }
            });
        }
    });
    let seen = events(&log);
    assert_eq!(seen.len(), 2 * 2 * ROUNDS);
    for t in 0..2 {
        for i in 0..ROUNDS {
            let name = format!("ev_t{t}_{i}");
            let mine: Vec<_> = seen.iter().filter(|(_, n)| *n == name).collect();
            assert_eq!(
                mine,
                [&ready(&name), &destroy(&name)],
                "{name}: Ready then Destroy, once each"
            );
        }
    }
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.event != MempoolEvent::Ready || s.populated == 64));
    unregister_event_callback(id).unwrap();
}

#[test]
fn replay_reports_the_pools_ready_before_registration() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_replay");
    let mem = &inst.mem;
    let a = Mempool::create(mem, "ev_ra", &MempoolConfig::new(10, 64)).unwrap();
    let b = Mempool::create(mem, "ev_rb", &MempoolConfig::new(10, 64)).unwrap();
    let mut unfinished = Mempool::create_empty(mem, "ev_rc", &MempoolConfig::new(10, 64)).unwrap();
    let (cb, log) = recorder(mem);
    let id = register_event_callback(Arc::clone(&cb)).unwrap();
    assert!(events(&log).is_empty(), "registering reports nothing");
    assert_eq!(replay_ready(mem, &*cb), 2);
    let mut seen = events(&log);
    seen.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(
        seen,
        [ready("ev_ra"), ready("ev_rb")],
        "not the unfinished one"
    );
    assert_eq!(log.lock().unwrap()[0].chunks.len(), 1);
    // The unfinished one reports Ready itself when it completes.
    unfinished.populate_default().unwrap();
    assert_eq!(events(&log)[2], ready("ev_rc"));
    // A panicking replay callback is caught too; the count is the same.
    assert_eq!(replay_ready(mem, |_, _| panic!("replay panics")), 3);
    for p in [a, b, unfinished] {
        p.free().unwrap();
    }
    assert_eq!(replay_ready(mem, |_, _| {}), 0);
    unregister_event_callback(id).unwrap();
}

#[test]
fn create_with_fires_ready_after_obj_init() {
    if !have_hugepages(4) {
        return;
    }
    let inst = instance("ev_objinit");
    let mem = &inst.mem;
    let key = mem_key(mem);
    // At Ready, every element holds what obj_init wrote.
    let stamped = Arc::new(AtomicU32::new(u32::MAX));
    let s = Arc::clone(&stamped);
    let cb: EventCallback = Arc::new(move |ev, v| {
        if mem_key(v.memory()) == key && ev == MempoolEvent::Ready {
            let hs = v.obj_size().header_size as usize;
            let ts = v.obj_size().total_size as usize;
            let ok = v
                .chunks()
                .iter()
                .flat_map(|c| (0..c.count as usize).map(move |i| c.va + i * ts + hs))
                // SAFETY: an element of the pool (64-aligned, 64 bytes).
                .filter(|&e| unsafe { std::ptr::read_volatile(e as *const u32) } == 0xfeed)
                .count();
            s.store(u32::try_from(ok).unwrap(), Ordering::SeqCst);
        }
    });
    let id = register_event_callback(cb).unwrap();
    let pool = Mempool::create_with(mem, "ev_init", &MempoolConfig::new(100, 64), |_, e| {
        // SAFETY: a fresh 64-byte element, 64-aligned.
        unsafe { e.cast::<u32>().write(0xfeed) }
    })
    .unwrap();
    assert_eq!(stamped.load(Ordering::SeqCst), 100);
    pool.free().unwrap();
    unregister_event_callback(id).unwrap();
}
