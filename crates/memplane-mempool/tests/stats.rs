//! Statistics on real hugepages: exact counts for a scripted sequence
//! through every way in (the pool, an `LcoreCache`, a user-owned cache; a
//! pool with and without caches; threads with and without lcore ids),
//! switching off and on with leak tracking in the mix, concurrent
//! counting, dumps, and a secondary process whose gets and puts show in
//! the primary's counters.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{have_hugepages, instance, opts};
use memplane::Memory;
use memplane_mempool::{
    register_thread, Mempool, MempoolCache, MempoolConfig, MempoolError, StatsCounters,
    STATS_ZONE_PREFIX,
};

type Objs = Vec<*mut u8>;

fn objs(n: usize) -> Objs {
    vec![std::ptr::null_mut(); n]
}

/// Counters from DPDK's field order: puts, objs, cp puts, cp objs, cp
/// gets, cp objs, gets, objs, failed gets, objs.
fn counters(v: [u64; 10]) -> StatsCounters {
    StatsCounters {
        put_bulk: v[0],
        put_objs: v[1],
        put_common_pool_bulk: v[2],
        put_common_pool_objs: v[3],
        get_common_pool_bulk: v[4],
        get_common_pool_objs: v[5],
        get_success_bulk: v[6],
        get_success_objs: v[7],
        get_fail_bulk: v[8],
        get_fail_objs: v[9],
        ..StatsCounters::default()
    }
}

/// The scripted sequence through a cache of 32 (flush threshold 48) that
/// starts empty, on a pool of 300 objects that starts full. `get`/`put`
/// go through the cache under test, `flush` empties it into the backend.
fn script_through_a_cache_of_32(
    mut get: impl FnMut(&mut [*mut u8]) -> Result<(), MempoolError>,
    mut put: impl FnMut(&[*mut u8]) -> Result<(), MempoolError>,
    flush: impl FnOnce() -> Result<(), MempoolError>,
) {
    let (mut a10, mut b20, mut c40) = (objs(10), objs(20), objs(40));
    let (mut too_many, mut big) = (objs(300), objs(65));
    // Empty cache: refilled with 32 + 10 from the backend, 32 left.
    get(&mut a10).unwrap();
    // Served by the cache (the hot path while statistics are off): 12 left.
    get(&mut b20).unwrap();
    // Short by 28: refilled with 32 + 28, 32 left.
    get(&mut c40).unwrap();
    // Fits under the threshold (hot path while off): 42 cached.
    put(&a10).unwrap();
    // 62 > 48: flushed down to 32 (30 to the backend).
    put(&b20).unwrap();
    // 72 > 48: flushed down to 32 (40 to the backend).
    put(&c40).unwrap();
    // More than the pool has: fails, takes nothing.
    assert!(matches!(
        get(&mut too_many),
        Err(MempoolError::NotEnough { .. })
    ));
    // Above 2 x 32: straight from the backend, and back (above 48).
    get(&mut big).unwrap();
    put(&big).unwrap();
    // The 32 cached go back.
    flush().unwrap();
}

/// What the script counts.
fn script_counts() -> StatsCounters {
    counters([
        4,
        10 + 20 + 40 + 65,
        4,
        30 + 40 + 65 + 32,
        3,
        42 + 60 + 65,
        4,
        10 + 20 + 40 + 65,
        1,
        300,
    ])
}

/// Exact counts for the script through `get_bulk`/`put_bulk`, through an
/// `LcoreCache` and through a user-owned cache, all counted in this
/// thread's lcore row. The gets served by a cache and the puts under its
/// threshold are counted too: the hot paths are closed while statistics
/// are on.
#[test]
fn a_scripted_sequence_counts_exactly_through_every_cache() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_exact");
    let mem = &inst.mem;
    let id = register_thread(mem).unwrap();
    let cached = Mempool::create(
        mem,
        "exact_c",
        &MempoolConfig::new(300, 64).cache_size(32).stats(true),
    )
    .unwrap();
    let plain = Mempool::create(mem, "exact_u", &MempoolConfig::new(300, 64).stats(true)).unwrap();
    assert!(cached.stats_enabled() && plain.stats_enabled());
    assert!(cached.stats().totals.is_zero(), "population is not counted");
    let check = |pool: &Mempool<'_>, how: &str| {
        let st = pool.stats();
        assert!(st.enabled);
        assert_eq!(st.totals, script_counts(), "{how}:\n{st}");
        assert_eq!(st.lcores.len(), 1, "{how}: one row:\n{st}");
        assert_eq!(st.lcores[0].lcore, Some(id), "{how}");
        assert_eq!(st.lcore(Some(id)), script_counts(), "{how}");
        assert_eq!(st.lcore(None), StatsCounters::default(), "{how}");
        assert!(pool.is_full(), "{how}");
        pool.reset_stats();
        assert!(pool.stats().totals.is_zero(), "{how}: reset");
        assert!(pool.stats().lcores.is_empty(), "{how}: reset");
    };

    // The pool's own calls (this thread's lcore cache).
    script_through_a_cache_of_32(
        |o| cached.get_bulk(o),
        |o| cached.put_bulk(o),
        || cached.cache_flush(),
    );
    check(&cached, "get_bulk/put_bulk");

    // An LcoreCache handle.
    let lc = cached.lcore_cache().unwrap();
    script_through_a_cache_of_32(|o| lc.get_bulk(o), |o| lc.put_bulk(o), || lc.flush());
    drop(lc);
    check(&cached, "LcoreCache");

    // The unchecked put takes the same counted path.
    script_through_a_cache_of_32(
        |o| cached.get_bulk(o),
        // SAFETY: the script puts back only objects it took from this pool.
        |o| unsafe { cached.put_bulk_unchecked(o) },
        || cached.cache_flush(),
    );
    check(&cached, "put_bulk_unchecked");

    // A user-owned cache on the pool without caches.
    let uc = std::cell::RefCell::new(MempoolCache::new(32).unwrap());
    script_through_a_cache_of_32(
        |o| plain.get_bulk_with(&mut uc.borrow_mut(), o),
        |o| plain.put_bulk_with(&mut uc.borrow_mut(), o),
        || uc.borrow_mut().flush(&plain),
    );
    check(&plain, "user-owned cache");

    for p in [cached, plain] {
        p.free().unwrap();
    }
    for n in ["exact_c", "exact_u"] {
        assert!(
            mem.memzone_lookup(&format!("{STATS_ZONE_PREFIX}{n}"))
                .is_none(),
            "the table goes with the pool"
        );
    }
}

/// A pool without caches: every get and put is one backend call, counted
/// in the lcore's row for a registered thread and in the shared row for
/// threads without an lcore id (also on a pool with caches, which such
/// threads bypass). Refused puts count nothing.
#[test]
fn without_a_cache_every_call_is_backend_traffic() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_nocache");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "nocache", &MempoolConfig::new(100, 64)).unwrap();
    let cached = Mempool::create(
        mem,
        "nocache_c",
        &MempoolConfig::new(100, 64).cache_size(16),
    )
    .unwrap();
    assert!(!pool.stats_enabled());
    assert!(!pool.stats().enabled && pool.stats().totals.is_zero());
    pool.set_stats(true).unwrap();
    cached.set_stats(true).unwrap();
    let script = |p: &Mempool<'_>| {
        let mut a = objs(10);
        p.get_bulk(&mut a).unwrap();
        p.put_bulk(&a[..4]).unwrap();
        p.put(a[4]).unwrap();
        assert!(matches!(
            p.get_bulk(&mut objs(101)),
            Err(MempoolError::NotEnough { .. })
        ));
        // A foreign pointer: refused, nothing counted.
        let mut bad = a[5..].to_vec();
        bad[1] = 0x1000 as *mut u8;
        assert!(matches!(
            p.put_bulk(&bad),
            Err(MempoolError::ForeignObject { .. })
        ));
        p.put_bulk(&a[5..]).unwrap();
        // Calls of no objects are not counted.
        p.get_bulk(&mut []).unwrap();
        p.put_bulk(&[]).unwrap();
    };
    let want = counters([3, 10, 3, 10, 1, 10, 1, 10, 1, 101]);
    // A thread without an lcore id: the shared row, on both pools.
    std::thread::scope(|s| {
        s.spawn(|| {
            script(&pool);
            script(&cached);
        });
    });
    for p in [&pool, &cached] {
        let st = p.stats();
        assert_eq!(st.lcores.len(), 1, "{st}");
        assert_eq!(st.lcores[0].lcore, None, "{st}");
        assert_eq!(st.totals, want, "{st}");
    }
    // A registered thread on the pool without caches: its lcore's row.
    let id = register_thread(mem).unwrap();
    script(&pool);
    let st = pool.stats();
    assert_eq!(st.lcore(Some(id)), want, "{st}");
    assert_eq!(st.lcore(None), want, "{st}");
    let mut twice = want;
    twice += want;
    assert_eq!(st.totals, twice, "{st}");
    assert!(pool.is_full());
    pool.free().unwrap();
    cached.free().unwrap();
}

/// Off stops counting (the counters stay, and go on when switched on
/// again); statistics and leak tracking share the hot-path gates, and
/// switching statistics off while tracking is on leaves them closed:
/// gets served by a warm cache (lcore, `LcoreCache`, user-owned) are
/// still recorded by tracking.
#[test]
fn switching_off_stops_counting_and_leaves_tracking_closed() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_switch");
    let mem = &inst.mem;
    let id = register_thread(mem).unwrap();
    let pool = Mempool::create(
        mem,
        "switch",
        &MempoolConfig::new(500, 64).cache_size(64).stats(true),
    )
    .unwrap();
    let user = Mempool::create(mem, "switch_u", &MempoolConfig::new(500, 64)).unwrap();
    let mut uc = MempoolCache::new(64).unwrap();
    // Warm the caches.
    let mut warm = objs(32);
    pool.get_bulk(&mut warm).unwrap();
    pool.put_bulk(&warm).unwrap();
    user.get_bulk_with(&mut uc, &mut warm).unwrap();
    user.put_bulk_with(&mut uc, &warm).unwrap();
    assert!(pool.cache_count() >= 32 && uc.len() >= 32);
    user.set_stats(true).unwrap();
    pool.reset_stats();
    // On: gets served by the warm caches count.
    let mut a = objs(3);
    pool.get_bulk(&mut a).unwrap();
    pool.put_bulk(&a).unwrap();
    user.get_bulk_with(&mut uc, &mut a).unwrap();
    user.put_bulk_with(&mut uc, &a).unwrap();
    let one = counters([1, 3, 0, 0, 0, 0, 1, 3, 0, 0]);
    assert_eq!(pool.stats().lcore(Some(id)), one);
    assert_eq!(user.stats().lcore(Some(id)), one);
    // Off: nothing counted, the counters stay readable.
    pool.set_stats(false).unwrap();
    user.set_stats(false).unwrap();
    assert!(!pool.stats_enabled());
    let lc = pool.lcore_cache().unwrap();
    for _ in 0..5 {
        pool.get_bulk(&mut a).unwrap();
        pool.put_bulk(&a).unwrap();
        lc.get_bulk(&mut a).unwrap();
        lc.put_bulk(&a).unwrap();
        user.get_bulk_with(&mut uc, &mut a).unwrap();
        user.put_bulk_with(&mut uc, &a).unwrap();
    }
    let st = pool.stats();
    assert!(!st.enabled);
    assert_eq!(st.totals, one, "{st}");
    assert_eq!(user.stats().totals, one);
    assert!(
        pool.info().stats.is_none(),
        "info carries stats only when on"
    );
    // On again: counting goes on from there.
    pool.set_stats(true).unwrap();
    lc.get_bulk(&mut a).unwrap();
    lc.put_bulk(&a).unwrap();
    let mut two = one;
    two += one;
    assert_eq!(pool.stats().totals, two);

    // Tracking on, then statistics off: the hot paths stay closed, so
    // tracking still sees gets served by the warm caches.
    for p in [&pool, &user] {
        p.set_leak_tracking(true).unwrap();
        p.set_stats(true).unwrap();
        p.set_stats(false).unwrap();
        assert!(p.leak_tracking() && !p.stats_enabled());
    }
    let mut b = objs(2);
    let mut c = objs(4);
    pool.get_bulk(&mut a).unwrap();
    lc.get_bulk(&mut b).unwrap();
    user.get_bulk_with(&mut uc, &mut c).unwrap();
    let out: Vec<usize> = pool.outstanding().unwrap().iter().map(|o| o.addr).collect();
    assert_eq!(out.len(), 5, "tracking recorded the cache hits: {out:?}");
    assert_eq!(user.outstanding().unwrap().len(), 4);
    assert_eq!(pool.stats().totals, two, "statistics are off");
    // And the other way: statistics on, tracking off: still closed.
    pool.set_stats(true).unwrap();
    pool.set_leak_tracking(false).unwrap();
    pool.put_bulk(&a).unwrap();
    lc.put_bulk(&b).unwrap();
    let mut three = two;
    three += counters([2, 5, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(pool.stats().totals, three, "puts under the threshold count");
    user.put_bulk_with(&mut uc, &c).unwrap();
    drop(lc);
    pool.cache_flush().unwrap();
    uc.flush(&user).unwrap();
    assert!(pool.is_full() && user.is_full());
    pool.free().unwrap();
    user.free().unwrap();
}

/// Many threads at once: lcore rows (plain stores by their owners) and
/// the shared row (atomic adds from threads without an lcore id) lose no
/// count. Two threads with lcore ids use their lcore caches; three
/// without one share a row: one goes to the backend, two use user-owned
/// caches (so they hit the shared row back to back, with nothing else
/// between their counts).
#[test]
fn concurrent_threads_lose_no_count() {
    const ROUNDS: u64 = 20_000;
    const THREADS: usize = 5;
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_mt");
    let mem = &inst.mem;
    let pool = Mempool::create(
        mem,
        "mt",
        &MempoolConfig::new(4000, 64).cache_size(64).stats(true),
    )
    .unwrap();
    // All run at once (two lcore ids held together).
    let start = std::sync::Barrier::new(THREADS);
    let end = std::sync::Barrier::new(THREADS);
    let ids: Vec<Option<u32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let (pool, start, end) = (&pool, &start, &end);
                s.spawn(move || {
                    let id = (t < 2).then(|| register_thread(mem).unwrap());
                    let mut user = (t >= 3).then(|| MempoolCache::new(64).unwrap());
                    start.wait();
                    let mut o = objs(3);
                    for _ in 0..ROUNDS {
                        if let Some(c) = user.as_mut() {
                            pool.get_bulk_with(c, &mut o).unwrap();
                            pool.put_bulk_with(c, &o).unwrap();
                        } else {
                            pool.get_bulk(&mut o).unwrap();
                            pool.put_bulk(&o).unwrap();
                        }
                    }
                    match user.as_mut() {
                        Some(c) => c.flush(pool).unwrap(),
                        None => pool.cache_flush().unwrap(),
                    }
                    end.wait();
                    id
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let st = pool.stats();
    let mut lcores: Vec<u32> = ids.iter().flatten().copied().collect();
    lcores.sort_unstable();
    lcores.dedup();
    assert_eq!(lcores.len(), 2, "{ids:?}");
    for id in lcores {
        let c = st.lcore(Some(id));
        assert_eq!(
            (c.get_success_bulk, c.put_objs),
            (ROUNDS, 3 * ROUNDS),
            "{st}"
        );
    }
    let shared = st.lcore(None);
    assert_eq!(
        (
            shared.get_success_bulk,
            shared.get_success_objs,
            shared.put_bulk
        ),
        (3 * ROUNDS, 9 * ROUNDS, 3 * ROUNDS),
        "three threads without an lcore id share one row: {st}"
    );
    assert_eq!(st.totals.get_success_bulk, 5 * ROUNDS);
    assert_eq!(
        st.totals.get_common_pool_objs, st.totals.put_common_pool_objs,
        "every object back in the backend: {st}"
    );
    assert!(pool.is_full());
    pool.free().unwrap();
}

/// The dump (text and JSON) and `info()` carry the counters while they
/// are on, not while they are off; a zone squatting on the table's name
/// is refused cleanly.
#[test]
fn dumps_show_the_counters_while_on() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_dump");
    let mem = &inst.mem;
    let pool = Mempool::create(mem, "dump", &MempoolConfig::new(100, 64)).unwrap();
    let text = |p: &Mempool<'_>| {
        let mut t = Vec::new();
        p.dump(&mut t).unwrap();
        String::from_utf8(t).unwrap()
    };
    assert!(text(&pool).contains("  stats: off\n"), "{}", text(&pool));
    assert!(pool.dump_json().get("stats").is_none());
    pool.set_stats(true).unwrap();
    // This thread has no lcore id: the shared row.
    let mut o = objs(7);
    pool.get_bulk(&mut o).unwrap();
    pool.put_bulk(&o).unwrap();
    let t = text(&pool);
    for line in [
        "  stats: on\n",
        "    put_bulk=1\n",
        "    put_objs=7\n",
        "    put_common_pool_objs=7\n",
        "    get_success_bulk=1\n",
        "    get_success_objs=7\n",
        "    get_fail_bulk=0\n",
        "    no lcore: put_bulk=1 put_objs=7",
    ] {
        assert!(t.contains(line), "{line:?} in\n{t}");
    }
    let j = pool.dump_json();
    assert_eq!(j["stats"]["enabled"], true);
    assert_eq!(j["stats"]["totals"]["get_success_objs"], 7);
    assert_eq!(j["stats"]["lcores"][0]["lcore"], serde_json::Value::Null);
    assert_eq!(j["stats"]["lcores"][0]["put_objs"], 7);
    assert_eq!(pool.stats().to_json()["totals"]["put_bulk"], 1);
    pool.free().unwrap();

    let squat = mem
        .memzone_reserve_aligned(
            &format!("{STATS_ZONE_PREFIX}squat"),
            64,
            memplane::heap::SOCKET_ID_ANY,
            memplane::memzone::MemzoneFlags::NONE,
            64,
        )
        .unwrap();
    match Mempool::create(mem, "squat", &MempoolConfig::new(10, 64).stats(true)) {
        Err(MempoolError::Corrupt { why, .. }) => {
            assert!(why.contains("statistics table"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        Mempool::lookup(mem, "squat").is_err(),
        "nothing left behind"
    );
    let pool = Mempool::create(mem, "squat", &MempoolConfig::new(10, 64)).unwrap();
    assert!(matches!(
        pool.set_stats(true),
        Err(MempoolError::Corrupt { .. })
    ));
    assert!(!pool.stats_enabled(), "still off");
    pool.free().unwrap();
    assert!(
        mem.memzone_lookup(&format!("{STATS_ZONE_PREFIX}squat"))
            .is_some(),
        "a zone that is not the pool's table stays"
    );
    squat.free().unwrap();
}

const ROLE: &str = "MPL_STATS_CHILD";
const PREFIX: &str = "MPL_STATS_PREFIX";
const RUNDIR: &str = "MPL_STATS_RUNDIR";

/// The secondary: finds statistics off, switches them on (creating the
/// table from this process), runs a script through its own lcore cache
/// and reports its lcore id.
fn child() {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    let pool = Mempool::lookup(&mem, "shared_stats").unwrap();
    assert!(!pool.stats_enabled(), "the primary left statistics off");
    pool.set_stats(true).unwrap();
    let id = register_thread(&mem).unwrap();
    assert_eq!(pool.cache_count(), 0, "a fresh lcore cache");
    // Cache of 16 (threshold 24).
    let (mut a, mut b) = (objs(8), objs(30));
    pool.get_bulk(&mut a).unwrap(); // refill 16 + 8
    pool.put_bulk(&a).unwrap(); // 24 cached, no flush
    pool.get_bulk(&mut b).unwrap(); // short by 6: refill 16 + 6
    pool.put_bulk(&b).unwrap(); // above 24: straight to the backend
    assert!(pool.get_bulk(&mut objs(5000)).is_err());
    pool.cache_flush().unwrap(); // 16
    println!("@lcore={id}");
    std::io::stdout().flush().unwrap();
}

/// A secondary's gets and puts show in the primary's statistics, in the
/// secondary's lcore row; the switch and the table are shared both ways.
#[test]
fn a_secondarys_operations_show_in_the_primarys_stats() {
    if std::env::var(ROLE).is_ok() {
        child();
        return;
    }
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("stats_mp");
    let mem = &inst.mem;
    let me = register_thread(mem).unwrap();
    let pool = Mempool::create(
        mem,
        "shared_stats",
        &MempoolConfig::new(2000, 64).cache_size(16),
    )
    .unwrap();
    // Off: not counted.
    let mut mine = objs(5);
    pool.get_bulk(&mut mine).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_secondarys_operations_show_in_the_primarys_stats",
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
    let mut line = None;
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if let Some((_, m)) = l.split_once('@') {
            line = Some(m.to_string());
        }
    }
    assert!(child.wait().unwrap().success(), "secondary failed");
    let id: u32 = line
        .expect("the secondary's report line")
        .strip_prefix("lcore=")
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(id, me);
    assert!(pool.stats_enabled(), "the secondary switched them on");
    let st = pool.stats();
    assert_eq!(
        st.lcore(Some(id)),
        counters([2, 38, 2, 30 + 16, 2, 24 + 22, 2, 38, 1, 5000]),
        "{st}"
    );
    assert_eq!(st.lcores.len(), 1, "only the secondary counted: {st}");
    // The primary's own calls count in its row from now on.
    pool.put_bulk(&mine).unwrap();
    pool.get_bulk(&mut mine).unwrap();
    pool.put_bulk(&mine).unwrap();
    let c = pool.stats().lcore(Some(me));
    assert_eq!((c.put_bulk, c.put_objs, c.get_success_bulk), (2, 10, 1));
    pool.cache_flush().unwrap();
    assert!(pool.is_full());
    pool.free().unwrap();
    assert!(mem
        .memzone_lookup(&format!("{STATS_ZONE_PREFIX}shared_stats"))
        .is_none());
}
