//! Leak tracking on real hugepages: owners per thread (lcore id, tag),
//! switching off and on, the exact outstanding list around lcore caches,
//! a secondary process's gets seen by the primary, bad input; and the
//! unchecked put.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{have_hugepages, instance, opts};
use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::MemzoneFlags;
use memplane::Memory;
use memplane_mempool::{
    register_thread, set_caller_tag, Mempool, MempoolConfig, MempoolError, LEAK_ZONE_PREFIX,
};

fn addrs(v: &[*mut u8]) -> BTreeSet<usize> {
    v.iter().map(|&p| p as usize).collect()
}

fn my_tid() -> u32 {
    rustix::thread::gettid().as_raw_nonzero().get() as u32
}

#[test]
fn the_report_names_each_threads_lcore_tag_and_thread() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_owners");
    let mem = &inst.mem;
    let pool =
        Mempool::create(mem, "owners", &MempoolConfig::new(1000, 64).cache_size(32)).unwrap();
    pool.set_leak_tracking(true).unwrap();
    assert!(pool.leak_tracking());
    // (lcore, tid, objects) from each thread; the threads keep running
    // (and keep their lcore ids) until told to put their objects back.
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let pool = &pool;
        let mut go = Vec::new();
        for (tag, count, per_call) in [(0xAu64, 10usize, false), (0xB, 7, true)] {
            let tx = tx.clone();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            go.push(done_tx);
            s.spawn(move || {
                let id = register_thread(mem).unwrap();
                let mut objs = vec![std::ptr::null_mut(); count];
                if per_call {
                    pool.get_bulk_tagged(&mut objs, tag).unwrap();
                } else {
                    set_caller_tag(tag);
                    pool.get_bulk(&mut objs).unwrap();
                }
                tx.send((tag, id, my_tid(), addrs(&objs))).unwrap();
                done_rx.recv().unwrap();
                // Half back into this lcore's cache: in the pool again.
                pool.put_bulk(&objs[..count / 2]).unwrap();
                tx.send((tag, id, 0, addrs(&objs[count / 2..]))).unwrap();
                done_rx.recv().unwrap();
                pool.put_bulk(&objs[count / 2..]).unwrap();
                pool.cache_flush().unwrap();
            });
        }
        drop(tx);
        // This thread has no lcore id: its gets have no lcore.
        let mut mine = vec![std::ptr::null_mut(); 3];
        pool.get_bulk(&mut mine).unwrap();
        let mut got: Vec<(u64, u32, u32, BTreeSet<usize>)> =
            (0..2).map(|_| rx.recv().unwrap()).collect();
        got.sort_by_key(|g| g.0);
        let pid = std::process::id();
        let r = pool.leak_report().unwrap();
        assert!(r.tracking);
        assert_eq!((r.in_use, r.tracked, r.untracked), (20, 20, 0), "{r}");
        assert_eq!(r.groups.len(), 3, "{r}");
        for (tag, id, tid, objs) in &got {
            let g = r.groups.iter().find(|g| g.tag == *tag).unwrap();
            assert_eq!(
                (g.pid, g.lcore, g.count),
                (pid, Some(*id), objs.len() as u32),
                "{r}"
            );
            assert_eq!(g.tids, vec![*tid], "{r}");
            assert!(g.sample.iter().all(|a| objs.contains(a)), "{r}");
        }
        assert_ne!(got[0].1, got[1].1, "two lcore ids");
        let g = r.groups.iter().find(|g| g.lcore.is_none()).unwrap();
        assert_eq!(
            (g.pid, g.tag, g.count, &g.tids),
            (pid, 0, 3, &vec![my_tid()]),
            "{r}"
        );
        // outstanding(): exactly these 20, each with its owner.
        let out = pool.outstanding().unwrap();
        let all: BTreeSet<usize> = got
            .iter()
            .flat_map(|g| g.3.iter().copied())
            .chain(addrs(&mine))
            .collect();
        assert_eq!(out.iter().map(|o| o.addr).collect::<BTreeSet<_>>(), all);
        for o in &out {
            assert_eq!(pool.index_of(o.addr), Some(o.index));
            let want = got
                .iter()
                .find(|g| g.3.contains(&o.addr))
                .map_or((None, 0), |g| (Some(g.1), g.0));
            assert_eq!((o.owner.lcore, o.owner.tag), want, "{o:?}");
        }
        // The JSON report carries the same groups.
        let j = r.to_json();
        assert_eq!(j["groups"].as_array().unwrap().len(), 3);
        assert_eq!(j["tracked"], 20);
        // Half back (into the threads' lcore caches): those are in the
        // pool, not outstanding.
        for g in &go {
            g.send(()).unwrap();
        }
        let mut left: Vec<(u64, u32, u32, BTreeSet<usize>)> =
            (0..2).map(|_| rx.recv().unwrap()).collect();
        left.sort_by_key(|g| g.0);
        let out: BTreeSet<usize> = pool.outstanding().unwrap().iter().map(|o| o.addr).collect();
        let want: BTreeSet<usize> = left
            .iter()
            .flat_map(|g| g.3.iter().copied())
            .chain(addrs(&mine))
            .collect();
        assert_eq!(out, want);
        assert_eq!(pool.in_use_count(), want.len() as u32);
        for g in &go {
            g.send(()).unwrap();
        }
        pool.put_bulk(&mine).unwrap();
    });
    assert!(pool.outstanding().unwrap().is_empty());
    assert!(pool.is_full());
    pool.free().unwrap();
    assert!(
        mem.memzone_lookup(&format!("{LEAK_ZONE_PREFIX}owners"))
            .is_none(),
        "the table goes with the pool"
    );
}

#[test]
fn switching_off_then_on_starts_a_clean_table() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_switch");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "switch", &MempoolConfig::new(200, 32)).unwrap();
    let mut before = vec![std::ptr::null_mut(); 5];
    pool.get_bulk(&mut before).unwrap();
    // Never switched on: no table to report from.
    assert!(matches!(
        pool.outstanding(),
        Err(MempoolError::LeakTrackingOff { .. })
    ));
    assert!(matches!(
        pool.leak_report(),
        Err(MempoolError::LeakTrackingOff { .. })
    ));
    pool.set_leak_tracking(true).unwrap();
    // Taken before tracking: untracked.
    let r = pool.leak_report().unwrap();
    assert_eq!((r.in_use, r.tracked, r.untracked), (5, 0, 5), "{r}");
    let mut tagged = vec![std::ptr::null_mut(); 4];
    set_caller_tag(7);
    pool.get_bulk(&mut tagged).unwrap();
    set_caller_tag(0);
    let out = pool.outstanding().unwrap();
    assert_eq!(
        out.iter().map(|o| o.addr).collect::<BTreeSet<_>>(),
        addrs(&tagged)
    );
    assert!(out
        .iter()
        .all(|o| o.owner.tag == 7 && o.owner.lcore.is_none()));
    // Off: nothing recorded or cleared; the old records stay readable.
    pool.set_leak_tracking(false).unwrap();
    assert!(!pool.leak_tracking());
    let mut later = vec![std::ptr::null_mut(); 3];
    pool.get_bulk(&mut later).unwrap();
    pool.put_bulk(&tagged[..2]).unwrap();
    let r = pool.leak_report().unwrap();
    assert!(!r.tracking);
    assert_eq!(
        r.tracked, 4,
        "records of a switched-off pool are frozen: {r}"
    );
    // On again: a clean table; everything out is untracked.
    pool.set_leak_tracking(true).unwrap();
    let r = pool.leak_report().unwrap();
    assert_eq!((r.in_use, r.tracked, r.untracked), (10, 0, 10), "{r}");
    let mut fresh = vec![std::ptr::null_mut(); 6];
    pool.get_bulk(&mut fresh).unwrap();
    assert_eq!(
        pool.outstanding()
            .unwrap()
            .iter()
            .map(|o| o.addr)
            .collect::<BTreeSet<_>>(),
        addrs(&fresh)
    );
    // Switching on while on keeps the records.
    pool.set_leak_tracking(true).unwrap();
    assert_eq!(pool.outstanding().unwrap().len(), 6);
    // Sequence numbers grow: the newest get is last.
    pool.get_bulk(&mut tagged[..1]).unwrap();
    let out = pool.outstanding().unwrap();
    assert_eq!(out.last().unwrap().addr, tagged[0] as usize);
    assert!(out.windows(2).all(|w| w[0].owner.seq <= w[1].owner.seq));
    for v in [
        &before[..],
        &tagged[..1],
        &tagged[2..],
        &later[..],
        &fresh[..],
    ] {
        pool.put_bulk(v).unwrap();
    }
    assert!(pool.outstanding().unwrap().is_empty());
    assert!(pool.is_full());
    pool.free().unwrap();
}

#[test]
fn outstanding_is_exact_around_lcore_caches_and_bad_input_changes_nothing() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_exact");
    let mem = &inst.mem;
    register_thread(mem).unwrap();
    // A zone squatting on the table's name: switching on fails, cleanly.
    let squat = mem
        .memzone_reserve_aligned(
            &format!("{LEAK_ZONE_PREFIX}exact"),
            64,
            SOCKET_ID_ANY,
            MemzoneFlags::NONE,
            64,
        )
        .unwrap();
    let cfg = MempoolConfig::new(600, 128).cache_size(64);
    match Mempool::create(mem, "exact", &cfg.clone().leak_tracking(true)) {
        Err(MempoolError::Corrupt { why, .. }) => assert!(why.contains("leak table"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        Mempool::lookup(mem, "exact").is_err(),
        "nothing left behind"
    );
    let pool = Mempool::create(mem, "exact", &cfg).unwrap();
    assert!(matches!(
        pool.set_leak_tracking(true),
        Err(MempoolError::Corrupt { .. })
    ));
    assert!(!pool.leak_tracking(), "still off");
    squat.free().unwrap();
    pool.free().unwrap();

    let pool = Mempool::create(mem, "exact", &cfg.leak_tracking(true)).unwrap();
    assert!(
        pool.leak_tracking(),
        "MempoolConfig::leak_tracking starts it on"
    );
    let mut objs = vec![std::ptr::null_mut(); 100];
    for part in objs.chunks_mut(8) {
        pool.get_bulk(part).unwrap();
    }
    for part in objs[..40].chunks(4) {
        pool.put_bulk(part).unwrap();
    }
    let want = addrs(&objs[40..]);
    let check = || {
        let out = pool.outstanding().unwrap();
        assert_eq!(out.iter().map(|o| o.addr).collect::<BTreeSet<_>>(), want);
        assert_eq!(pool.in_use_count(), 60);
        assert_eq!(pool.leak_report().unwrap().untracked, 0);
    };
    assert!(
        pool.cache_count() > 0,
        "some of the 40 sit in this lcore's cache"
    );
    check();
    pool.cache_flush().unwrap();
    check();
    // A foreign pointer: refused, no record cleared.
    let mut bad = objs[40..44].to_vec();
    bad[2] = 0x1000 as *mut u8;
    assert!(matches!(
        pool.put_bulk(&bad),
        Err(MempoolError::ForeignObject { addr: 0x1000, .. })
    ));
    check();
    // The unchecked put (callers that know) clears records as well.
    // SAFETY: objects of this pool, out, put back once.
    unsafe { pool.put_bulk_unchecked(&objs[40..]) }.unwrap();
    assert!(pool.outstanding().unwrap().is_empty());
    pool.cache_flush().unwrap();
    assert!(pool.is_full());
    pool.free().unwrap();
    assert!(mem
        .memzone_lookup(&format!("{LEAK_ZONE_PREFIX}exact"))
        .is_none());
}

const ROLE: &str = "MPL_LEAK_CHILD";
const PREFIX: &str = "MPL_LEAK_PREFIX";
const RUNDIR: &str = "MPL_LEAK_RUNDIR";

/// The secondary: takes 12 objects through its own lcore id with tag
/// 0x5EC and exits holding them.
fn child() {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    let pool = Mempool::lookup(&mem, "shared_leak").unwrap();
    assert!(pool.leak_tracking(), "the primary switched tracking on");
    let id = register_thread(&mem).unwrap();
    set_caller_tag(0x5EC);
    let mut objs = vec![std::ptr::null_mut(); 12];
    pool.get_bulk(&mut objs).unwrap();
    let sum: usize = objs.iter().map(|&p| p as usize).sum();
    println!("@lcore={id} tid={} sum={sum}", my_tid());
    std::io::stdout().flush().unwrap();
    // Exits without putting them back: a leak the primary can see.
}

#[test]
fn a_secondarys_gets_show_in_the_primarys_report() {
    if std::env::var(ROLE).is_ok() {
        child();
        return;
    }
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_mp");
    let mem = &inst.mem;
    let me = register_thread(mem).unwrap();
    let pool = Mempool::create(
        mem,
        "shared_leak",
        &MempoolConfig::new(500, 64).cache_size(16),
    )
    .unwrap();
    pool.set_leak_tracking(true).unwrap();
    let mut mine = vec![std::ptr::null_mut(); 5];
    pool.get_bulk(&mut mine).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_secondarys_gets_show_in_the_primarys_report",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "1")
        .env(PREFIX, &inst.prefix)
        .env(RUNDIR, inst.rundir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let mut line = None;
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if let Some((_, m)) = l.split_once('@') {
            line = Some(m.to_string());
        }
    }
    assert!(child.wait().unwrap().success(), "secondary failed");
    let line = line.expect("the secondary's report line");
    let field = |k: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (id, tid, sum) = (field("lcore=") as u32, field("tid=") as u32, field("sum="));
    assert_ne!(id, me);
    let r = pool.leak_report().unwrap();
    assert_eq!((r.in_use, r.tracked), (17, 17), "{r}");
    let g = r
        .groups
        .iter()
        .find(|g| g.pid == child_pid)
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        (g.lcore, g.tag, g.count, &g.tids),
        (Some(id), 0x5EC, 12, &vec![tid]),
        "{r}"
    );
    let text = r.to_string();
    assert!(
        text.contains(&format!(
            "pid {child_pid} lcore {id} tag 0x5ec: 12 object(s)"
        )),
        "{text}"
    );
    // The primary takes the dead secondary's objects back by the list.
    let theirs: Vec<*mut u8> = pool
        .outstanding()
        .unwrap()
        .iter()
        .filter(|o| o.owner.pid == child_pid)
        .map(|o| o.addr as *mut u8)
        .collect();
    assert_eq!(theirs.iter().map(|&p| p as usize).sum::<usize>(), sum);
    pool.put_bulk(&theirs).unwrap();
    pool.put_bulk(&mine).unwrap();
    assert!(pool.outstanding().unwrap().is_empty());
    pool.cache_flush().unwrap();
    pool.free().unwrap();
}

/// Switching tracking on closes the lcore caches' hot paths (gets served
/// from a full cache, puts under the threshold, through the pool and
/// through an `LcoreCache` handle): every object out is recorded with its
/// lcore. Off reopens them, and what was out while off is untracked.
#[test]
fn tracking_on_records_gets_served_from_a_warm_lcore_cache() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_warm");
    let mem = &inst.mem;
    let id = register_thread(mem).unwrap();
    let pool = Mempool::create(mem, "warm", &MempoolConfig::new(500, 64).cache_size(64)).unwrap();
    // Warm the cache: 32 objects out and back, all now cached.
    let mut warm = vec![std::ptr::null_mut(); 32];
    pool.get_bulk(&mut warm).unwrap();
    pool.put_bulk(&warm).unwrap();
    assert!(pool.cache_count() >= 32);
    pool.set_leak_tracking(true).unwrap();
    let lc = pool.lcore_cache().unwrap();
    let mut a = vec![std::ptr::null_mut(); 3];
    let mut b = vec![std::ptr::null_mut(); 2];
    pool.get_bulk(&mut a).unwrap();
    lc.get_bulk(&mut b).unwrap();
    let out = pool.outstanding().unwrap();
    let want: BTreeSet<usize> = addrs(&a).union(&addrs(&b)).copied().collect();
    assert_eq!(out.iter().map(|o| o.addr).collect::<BTreeSet<_>>(), want);
    assert!(out.iter().all(|o| o.owner.lcore == Some(id)), "{out:?}");
    // Puts under the threshold are recorded too: nothing outstanding.
    lc.put_bulk(&b).unwrap();
    pool.put_bulk(&a).unwrap();
    assert!(pool.outstanding().unwrap().is_empty());
    assert_eq!(pool.leak_report().unwrap().untracked, 0);
    // Off: the hot paths serve again; objects taken are untracked.
    pool.set_leak_tracking(false).unwrap();
    lc.get_bulk(&mut b).unwrap();
    pool.set_leak_tracking(true).unwrap();
    assert_eq!(pool.leak_report().unwrap().untracked, 2);
    lc.put_bulk(&b).unwrap();
    drop(lc);
    pool.cache_flush().unwrap();
    pool.free().unwrap();
}

/// The same through a user-owned cache: while tracking is on its hot path
/// is closed (the pool's key no longer matches), so gets served from the
/// warm cache are recorded, and puts clear the records.
#[test]
fn tracking_on_records_gets_served_from_a_warm_user_cache() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_user");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "user", &MempoolConfig::new(500, 64)).unwrap();
    let mut cache = memplane_mempool::MempoolCache::new(64).unwrap();
    let mut warm = vec![std::ptr::null_mut(); 32];
    pool.get_bulk_with(&mut cache, &mut warm).unwrap();
    pool.put_bulk_with(&mut cache, &warm).unwrap();
    assert!(cache.len() >= 32);
    pool.set_leak_tracking(true).unwrap();
    let mut a = vec![std::ptr::null_mut(); 3];
    pool.get_bulk_with(&mut cache, &mut a).unwrap();
    let out = pool.outstanding().unwrap();
    assert_eq!(
        out.iter().map(|o| o.addr).collect::<BTreeSet<_>>(),
        addrs(&a)
    );
    pool.put_bulk_with(&mut cache, &a).unwrap();
    assert!(pool.outstanding().unwrap().is_empty());
    // Off: served by the hot path again, untracked (as is everything in
    // the user cache, which counts as out of the pool).
    pool.set_leak_tracking(false).unwrap();
    pool.get_bulk_with(&mut cache, &mut a).unwrap();
    pool.set_leak_tracking(true).unwrap();
    assert_eq!(pool.leak_report().unwrap().untracked, cache.len() + 3);
    pool.put_bulk_with(&mut cache, &a).unwrap();
    cache.flush(&pool).unwrap();
    assert!(pool.is_full());
    pool.free().unwrap();
}

/// `MempoolConfig::leak_tracking` holds for a two-step creation as for a
/// one-step one: gets from a pool still being populated are recorded, and
/// so are gets once it is full.
#[test]
fn a_two_step_pool_asked_to_track_tracks_from_its_first_object() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("leak_two_step");
    let mem = &inst.mem;
    let cfg = MempoolConfig::new(300, 64).leak_tracking(true).stats(true);
    let mut pool = Mempool::create_empty(mem, "two_step", &cfg).unwrap();
    assert!(pool.leak_tracking() && pool.stats_enabled());
    let total = pool.obj_size().total_size as usize;
    let z = mem
        .memzone_reserve("user_two_step", 100 * total, -1, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: the zone outlives the pool (freed after it below).
    let added = unsafe { pool.populate_virt(z.as_mut_ptr(), 100 * total) }.unwrap();
    assert_eq!(added, 100);
    // While half built: a get is recorded with its tag.
    let mut early = [std::ptr::null_mut(); 1];
    pool.get_bulk_tagged(&mut early, 0x51).unwrap();
    pool.populate_default().unwrap();
    let mut objs = vec![std::ptr::null_mut(); 5];
    pool.get_bulk_tagged(&mut objs, 0x52).unwrap();
    let r = pool.leak_report().unwrap();
    assert_eq!((r.in_use, r.tracked, r.untracked), (6, 6, 0), "{r}");
    let tags: BTreeSet<u64> = r.groups.iter().map(|g| g.tag).collect();
    assert_eq!(tags, BTreeSet::from([0x51, 0x52]), "{r}");
    let out = pool.outstanding().unwrap();
    pool.put_bulk(&out.iter().map(|o| o.addr as *mut u8).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(pool.leak_report().unwrap().tracked, 0);
    pool.free().unwrap();
    z.free().unwrap();
}
