//! Handlers are resolved by name in every process: the primary creates a
//! pool with every built-in handler and one with a user handler; a
//! secondary (this test binary re-executed) that registers the user
//! handler under the same name uses all of them, concurrently with the
//! primary on the multi-producer/consumer ones, every object carrying an
//! owner stamp (a get must find it free, a put must find its own stamp):
//! at the end every object index is in the pool exactly once. A second
//! secondary without the user handler gets an error naming it; a pool
//! populated (populate_virt) in a memzone is shared like any other; pools in
//! process-local memory (populate_anon) and unfinished pools
//! (create_empty) are refused to secondaries with typed errors.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u64 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{have_hugepages, instance, opts};
use memplane::Memory;
use memplane_mempool::{
    register_handler, register_thread, Backend, BackendParams, Handler, Mempool, MempoolConfig,
    MempoolError,
};

const ROLE: &str = "MPL_MPH_CHILD";
const PREFIX: &str = "MPL_MPH_PREFIX";
const RUNDIR: &str = "MPL_MPH_RUNDIR";
const N: u32 = 2048;
const USER: &str = "user_counting";
const SHARED: [&str; 7] = [
    "ring_mp_mc",
    "ring_mt_rts",
    "ring_mt_hts",
    "stack",
    "lf_stack",
    "bucket",
    USER,
];
const SINGLE: [&str; 3] = ["ring_sp_sc", "ring_mp_sc", "ring_sp_mc"];

/// Puts through this process's user-handler backends.
static USER_PUTS: AtomicU64 = AtomicU64::new(0);

/// A user handler: counts puts in this process, stores objects in a
/// lock-free stack (`lf_stack`'s shared zone).
struct Counting;
struct CountingBackend<'m>(Box<dyn Backend + 'm>);
impl Backend for CountingBackend<'_> {
    fn enqueue(&self, objs: &[*mut u8]) -> Result<(), MempoolError> {
        USER_PUTS.fetch_add(1, Ordering::Relaxed);
        self.0.enqueue(objs)
    }
    fn dequeue(&self, out: &mut [*mut u8]) -> Result<(), MempoolError> {
        self.0.dequeue(out)
    }
    fn count(&self) -> u32 {
        self.0.count()
    }
    fn destroy(self: Box<Self>) -> Result<(), MempoolError> {
        self.0.destroy()
    }
}
impl Handler for Counting {
    fn create<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let inner = memplane_mempool::handler::find_handler("lf_stack")?.create(mem, p)?;
        Ok(Box::new(CountingBackend(inner)))
    }
    fn attach<'m>(
        &self,
        mem: &'m Memory,
        p: &BackendParams,
    ) -> Result<Box<dyn Backend + 'm>, MempoolError> {
        let inner = memplane_mempool::handler::find_handler("lf_stack")?.attach(mem, p)?;
        Ok(Box::new(CountingBackend(inner)))
    }
}

fn pool_name(h: &str) -> String {
    format!("h_{h}")
}

/// `rounds` of: get 1..=32 objects, stamp each (it must be free: 0),
/// check, unstamp, put. Returns the objects served.
fn churn(pool: &Mempool<'_>, tag: u64, rounds: u64) -> u64 {
    let mut objs = [std::ptr::null_mut(); 32];
    let mut served = 0;
    let mut r = tag | 1;
    for i in 0..rounds {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        let k = (r % 32) as usize + 1;
        if pool.get_bulk(&mut objs[..k]).is_err() {
            continue;
        }
        let stamp = tag << 32 | i;
        for &o in &objs[..k] {
            // SAFETY: an object of ours, 64-aligned; word 1 is the owner
            // stamp (word 0 holds the index written by obj_init).
            let w = unsafe { &*o.cast::<AtomicU64>().add(1) };
            assert_eq!(
                w.swap(stamp, Ordering::AcqRel),
                0,
                "object handed out twice"
            );
            let idx = pool.index_of(o as usize).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { o.cast::<u64>().read() }, u64::from(idx));
        }
        for &o in &objs[..k] {
            // SAFETY: as above.
            let w = unsafe { &*o.cast::<AtomicU64>().add(1) };
            assert_eq!(w.swap(0, Ordering::AcqRel), stamp, "changed while held");
        }
        pool.put_bulk(&objs[..k]).unwrap();
        served += k as u64;
    }
    pool.cache_flush().unwrap();
    served
}

fn child(role: &str) {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    if role == "nohandler" {
        let e = Mempool::lookup(&mem, &pool_name(USER)).unwrap_err();
        assert!(
            matches!(&e, MempoolError::UnknownHandler { name, .. } if name == USER),
            "{e:?}"
        );
        assert!(e.to_string().contains(USER), "{e}");
        println!("@nohandler {e}");
        std::io::stdout().flush().unwrap();
        return;
    }
    register_handler(USER, Arc::new(Counting)).unwrap();
    register_thread(&mem).unwrap();
    let e = Mempool::lookup(&mem, "anon_p").unwrap_err();
    assert!(matches!(e, MempoolError::ProcessLocal { .. }), "{e:?}");
    println!("@anon {e}");
    let e = Mempool::lookup(&mem, "unfinished").unwrap_err();
    assert!(
        matches!(e, MempoolError::NotPopulated { populated: 0, .. }),
        "{e:?}"
    );
    println!("@unfinished {e}");
    let tag = u64::from(std::process::id());
    // A pool populated with populate_virt in a memzone: shared memory, so
    // usable here.
    let virt = Mempool::lookup(&mem, "virt_p").unwrap();
    println!("@served virt_p {}", churn(&virt, tag, 3000));
    drop(virt);
    for h in SHARED.iter().chain(SINGLE.iter()) {
        let pool = Mempool::lookup(&mem, &pool_name(h)).unwrap();
        assert_eq!(pool.handler(), *h);
        let served = churn(&pool, tag, 3000);
        println!("@served {h} {served}");
    }
    println!("@user_puts {}", USER_PUTS.load(Ordering::Relaxed));
    std::io::stdout().flush().unwrap();
}

fn spawn(inst: &common::Inst, role: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_handler_works_from_a_secondary_that_resolves_it_by_name",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(PREFIX, &inst.prefix)
        .env(RUNDIR, inst.rundir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn markers(mut child: std::process::Child) -> Vec<String> {
    let lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once('@').map(|(_, m)| m.to_string()))
        .collect();
    assert!(child.wait().unwrap().success(), "secondary failed");
    lines
}

#[test]
fn every_handler_works_from_a_secondary_that_resolves_it_by_name() {
    if let Ok(role) = std::env::var(ROLE) {
        child(&role);
        return;
    }
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mph");
    let mem = &inst.mem;
    register_handler(USER, Arc::new(Counting)).unwrap();
    register_thread(mem).unwrap();
    let pools: Vec<Mempool<'_>> = SHARED
        .iter()
        .chain(SINGLE.iter())
        .enumerate()
        .map(|(i, h)| {
            // Caches on some, none on others.
            let cache = if i % 2 == 0 { 64 } else { 0 };
            Mempool::create_with(
                mem,
                &pool_name(h),
                &MempoolConfig::new(N, 64).cache_size(cache).handler(h),
                // SAFETY: a fresh 64-byte element: index, owner stamp 0.
                |idx, o| unsafe { o.cast::<[u64; 2]>().write([u64::from(idx), 0]) },
            )
            .unwrap()
        })
        .collect();
    let mut anon = Mempool::create_empty(mem, "anon_p", &MempoolConfig::new(100, 64)).unwrap();
    anon.populate_anon().unwrap();
    let unfinished =
        Mempool::create_empty(mem, "unfinished", &MempoolConfig::new(100, 64)).unwrap();
    // Two-step with memory from a memzone the test reserves.
    let mut virt = Mempool::create_empty(mem, "virt_p", &MempoolConfig::new(N, 64)).unwrap();
    let total = virt.obj_size().total_size as usize;
    let zone = mem
        .memzone_reserve(
            "virt_mem",
            N as usize * total,
            -1,
            memplane::memzone::MemzoneFlags::NONE,
        )
        .unwrap();
    // SAFETY: the zone is freed only after the pool (below).
    let placed = unsafe { virt.populate_virt(zone.as_mut_ptr(), zone.len()) }.unwrap();
    assert_eq!(placed, N);
    virt.obj_iter(|idx, o| {
        // SAFETY: a 64-byte element nobody holds yet.
        unsafe { o.cast::<[u64; 2]>().write([u64::from(idx), 0]) }
    });

    let full = spawn(&inst, "full");
    // Meanwhile the primary churns the multi-producer/consumer pools.
    let mut served_here = 0;
    for p in &pools[..SHARED.len()] {
        served_here += churn(p, 1, 3000);
    }
    let lines = markers(full);
    assert!(served_here > 0);
    assert!(lines.iter().any(|l| l.starts_with("anon ")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("unfinished ")),
        "{lines:?}"
    );
    for h in SHARED.iter().chain(SINGLE.iter()).chain(["virt_p"].iter()) {
        let l = lines
            .iter()
            .find(|l| l.starts_with(&format!("served {h} ")))
            .unwrap_or_else(|| panic!("{h}: {lines:?}"));
        let n: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 1000, "{h}: the secondary got objects: {l}");
    }
    let user_puts: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("user_puts "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(user_puts > 0, "the secondary's own user handler ran");
    assert!(USER_PUTS.load(Ordering::Relaxed) > 0);

    let lines = markers(spawn(&inst, "nohandler"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(USER), "{lines:?}");

    // Nothing lost or duplicated: every index once, every stamp cleared.
    for p in pools.iter().chain(std::iter::once(&virt)) {
        assert!(p.is_full(), "{}: {} of {N} back", p.name(), p.avail_count());
        let rep = p.audit().unwrap();
        assert_eq!(rep.in_backend + rep.in_caches, N, "{}", p.name());
        let mut all = vec![std::ptr::null_mut(); N as usize];
        p.get_bulk(&mut all).unwrap();
        let mut seen = vec![false; N as usize];
        for &o in &all {
            let idx = p.index_of(o as usize).unwrap() as usize;
            assert!(
                !std::mem::replace(&mut seen[idx], true),
                "{}: {idx} twice",
                p.name()
            );
            // SAFETY: our object; nobody else uses the pool now.
            assert_eq!(unsafe { o.cast::<[u64; 2]>().read() }, [idx as u64, 0]);
        }
        p.put_bulk(&all).unwrap();
        p.cache_flush().unwrap();
    }
    for p in pools {
        p.free().unwrap();
    }
    anon.free().unwrap();
    unfinished.free().unwrap();
    virt.free().unwrap();
    zone.free().unwrap();
}
