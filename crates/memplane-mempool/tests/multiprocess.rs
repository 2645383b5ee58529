//! Two processes share a pool: the primary creates it, a secondary (this
//! test binary re-executed with `--proc-type secondary`) finds it by name,
//! gets its own lcore id and cache, takes objects the primary initialised,
//! writes them, and puts them back; the primary sees every object back,
//! with the secondary's writes, and the pool audits clean.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u64 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{have_hugepages, instance, opts};
use memplane::Memory;
use memplane_mempool::{register_thread, registered_lcores, Mempool, MempoolConfig};

const ROLE: &str = "MPL_MEMPOOL_CHILD";
const PREFIX: &str = "MPL_MEMPOOL_PREFIX";
const RUNDIR: &str = "MPL_MEMPOOL_RUNDIR";
const N: u32 = 4000;

fn child() {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    for h in ["ring_mp_mc", "stack"] {
        let pool = Mempool::lookup(&mem, &format!("shared_{h}")).unwrap();
        assert_eq!(pool.handler(), h);
        let id = register_thread(&mem).unwrap();
        let mut objs = vec![std::ptr::null_mut(); 1000];
        for round in 0..20u64 {
            for part in objs.chunks_mut(32) {
                pool.get_bulk(part).unwrap();
            }
            for &o in &objs {
                let idx = u64::from(pool.index_of(o as usize).unwrap());
                // SAFETY: our object (64-aligned, >= 16 bytes).
                let w = unsafe { &mut *o.cast::<[u64; 2]>() };
                assert_eq!(w[0], idx, "the primary's obj_init value");
                w[1] = (u64::from(std::process::id()) << 32) | round;
            }
            for part in objs.chunks(32) {
                pool.put_bulk(part).unwrap();
            }
        }
        assert!(
            pool.cache_count() > 0,
            "the secondary's lcore {id} has a cache"
        );
        pool.cache_flush().unwrap();
        println!("@{h} lcore={id} avail={}", pool.avail_count());
    }
    std::io::stdout().flush().unwrap();
}

#[test]
fn a_secondary_gets_and_puts_objects_of_the_primarys_pool() {
    if std::env::var(ROLE).is_ok() {
        child();
        return;
    }
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mp");
    let mem = &inst.mem;
    let me = register_thread(mem).unwrap();
    let pools: Vec<Mempool<'_>> = ["ring_mp_mc", "stack"]
        .iter()
        .map(|h| {
            Mempool::create_with(
                mem,
                &format!("shared_{h}"),
                &MempoolConfig::new(N, 64).cache_size(128).handler(h),
                // SAFETY: a fresh 64-byte element.
                |i, o| unsafe { o.cast::<[u64; 2]>().write([u64::from(i), 0]) },
            )
            .unwrap()
        })
        .collect();
    // Some objects stay out in the primary meanwhile.
    let mut held = vec![std::ptr::null_mut(); 100];
    pools[0].get_bulk(&mut held).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_secondary_gets_and_puts_objects_of_the_primarys_pool",
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
    let child_pid = out.id();
    let mut lines = Vec::new();
    let mut child = out;
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if let Some((_, m)) = l.split_once('@') {
            lines.push(m.to_string());
        }
    }
    assert!(child.wait().unwrap().success(), "secondary failed");
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The secondary saw the 100 objects held here as out.
    assert!(lines[0].starts_with("ring_mp_mc lcore="), "{lines:?}");
    // (avail counts every lcore's cache, the primary's too).
    assert!(
        lines[0].ends_with(&format!("avail={}", N - 100)),
        "{lines:?}"
    );
    assert!(lines[1].ends_with(&format!("avail={N}")), "{lines:?}");
    let other_id: u32 = lines[0]
        .split_once("lcore=")
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(other_id, me, "the secondary got an lcore id of its own");
    pools[0].put_bulk(&held).unwrap();
    for p in &pools {
        p.cache_flush().unwrap();
        assert!(p.is_full(), "{}: every object back", p.name());
        p.audit().unwrap();
        // The secondary wrote its pid into objects it held.
        let touched = p
            .objects()
            // SAFETY: objects are in the pool; nobody uses them now.
            .filter(|&o| unsafe { (*o.cast::<[u64; 2]>())[1] } >> 32 == u64::from(child_pid))
            .count();
        assert!(
            touched >= 1000,
            "{}: {touched} objects written by the secondary",
            p.name()
        );
    }
    // The secondary's thread is gone: its lcore slot is free again or
    // reclaimable.
    let _ = registered_lcores(mem).unwrap();
    for p in pools {
        p.free().unwrap();
    }
}
