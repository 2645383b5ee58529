//! An mbuf crosses processes as a raw pointer: the primary allocates a
//! two-segment chain and an indirect clone, hands their addresses to a
//! secondary (this test binary re-executed with `--proc-type secondary`),
//! which looks the pools up, adopts the mbufs, reads and modifies them,
//! and frees them there; 100 more mbufs go through a memplane ring (raw
//! addresses as u64), are checked and freed in bulk by the secondary; the
//! primary then finds its pools full again and sees the secondary's bytes
//! in the buffers.

// The mempool crate's test support (hugepage check, instances, pool lock).
#[path = "../../memplane-mempool/tests/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{have_hugepages, instance, opts};
use memplane::Memory;
use memplane_mbuf::{Mbuf, MbufHeader, MbufPool, MbufPoolConfig};
use memplane_mempool::register_thread;
use memplane_ring::{Ring, RingConfig, ZoneRegion};

const ROLE: &str = "MPL_MBUF_CHILD";
const PREFIX: &str = "MPL_MBUF_PREFIX";
const RUNDIR: &str = "MPL_MBUF_RUNDIR";
const CHAIN: &str = "MPL_MBUF_CHAIN";
const CLONE: &str = "MPL_MBUF_CLONE";
const RING_MBUFS: usize = 100;

fn child() {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    register_thread(&mem).unwrap();
    let pkts = MbufPool::lookup(&mem, "pkts").unwrap();
    let clones = MbufPool::lookup(&mem, "clones").unwrap();
    assert_eq!((pkts.data_room(), pkts.priv_size()), (1024, 8));
    let addr = |k| std::env::var(k).unwrap().parse::<usize>().unwrap() as *mut MbufHeader;
    // SAFETY: the primary gave up these references for us; the pools are
    // open here for the whole function.
    let (mut chain, clone) = unsafe {
        (
            Mbuf::from_raw(addr(CHAIN), &pkts).unwrap(),
            Mbuf::from_raw(addr(CLONE), &clones).unwrap(),
        )
    };
    println!("@chain {}", String::from_utf8_lossy(&chain.to_vec()));
    println!("@clone {}", String::from_utf8_lossy(&clone.to_vec()));
    assert_eq!(chain.priv_data()[0], 0xab);
    // The chain's buffers are shared with the clone: read-only.
    assert!(chain.append(1).is_err());
    drop(clone);
    // Now they are ours alone: modify, add a segment of our own.
    chain.data_mut().unwrap()[..4].copy_from_slice(b"HELO");
    chain.append(8).unwrap().copy_from_slice(b" (sec'y)");
    let mut mine = pkts.alloc().unwrap();
    mine.append(4).unwrap().copy_from_slice(b" end");
    let chain = chain.chain(mine).unwrap();
    println!(
        "@modified {} segs={}",
        String::from_utf8_lossy(&chain.to_vec()),
        chain.nb_segs()
    );
    drop(chain);
    // Mbufs through a ring.
    let ring: Ring<u64, ZoneRegion<'_>> = Ring::lookup(&mem, "mbufs").unwrap();
    let mut addrs = [0u64; RING_MBUFS];
    ring.consumer().unwrap().dequeue_bulk(&mut addrs).unwrap();
    let got: Vec<Mbuf<'_>> = addrs
        .iter()
        // SAFETY: the primary enqueued each mbuf once and gave it up.
        .map(|&a| unsafe { Mbuf::from_raw(a as usize as *mut MbufHeader, &pkts) }.unwrap())
        .collect();
    let ok = got
        .iter()
        .enumerate()
        .all(|(i, m)| m.data() == format!("pkt {i}").as_bytes());
    Mbuf::free_bulk(got);
    println!("@ring {RING_MBUFS} ok={ok}");
    pkts.cache_flush().unwrap();
    clones.cache_flush().unwrap();
    println!("@in_use {} {}", pkts.in_use_count(), clones.in_use_count());
    std::io::stdout().flush().unwrap();
}

#[test]
fn an_mbuf_allocated_in_the_primary_is_modified_and_freed_in_a_secondary() {
    if std::env::var(ROLE).is_ok() {
        child();
        return;
    }
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mbuf_mp");
    let mem = &inst.mem;
    register_thread(mem).unwrap();
    let pkts = MbufPool::create(
        mem,
        "pkts",
        &MbufPoolConfig::new(511)
            .data_room(1024)
            .priv_size(8)
            .cache_size(32),
    )
    .unwrap();
    let clones = MbufPool::create(
        mem,
        "clones",
        &MbufPoolConfig::new(63).data_room(0).priv_size(8),
    )
    .unwrap();
    let mut a = pkts.alloc().unwrap();
    a.append(6).unwrap().copy_from_slice(b"hello ");
    a.priv_data_mut()[0] = 0xab;
    let mut b = pkts.alloc().unwrap();
    b.append(7).unwrap().copy_from_slice(b"world!!");
    b.trim(1).unwrap();
    let chain = a.chain(b).unwrap();
    let head = chain.as_ptr() as usize;
    let clone = chain.clone_in(&clones).unwrap();
    assert_eq!(pkts.in_use_count(), 2);
    let (chain_raw, clone_raw) = (chain.into_raw() as usize, clone.into_raw() as usize);
    let ring: Ring<u64, ZoneRegion<'_>> =
        Ring::create(mem, "mbufs", 128, -1, RingConfig::MPMC).unwrap();
    let mut addrs = Vec::new();
    for i in 0..RING_MBUFS {
        let mut m = pkts.alloc().unwrap();
        let text = format!("pkt {i}");
        m.append(text.len())
            .unwrap()
            .copy_from_slice(text.as_bytes());
        addrs.push(m.into_raw() as u64);
    }
    ring.producer().unwrap().enqueue_bulk(&addrs).unwrap();
    assert_eq!(pkts.in_use_count(), 2 + RING_MBUFS as u32);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_mbuf_allocated_in_the_primary_is_modified_and_freed_in_a_secondary",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "1")
        .env(PREFIX, &inst.prefix)
        .env(RUNDIR, inst.rundir.path())
        .env(CHAIN, chain_raw.to_string())
        .env(CLONE, clone_raw.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.split_once('@').map(|(_, m)| m.to_string()))
        .collect();
    assert!(
        child.wait().unwrap().success(),
        "secondary failed: {lines:?}"
    );
    assert_eq!(
        lines,
        [
            "chain hello world!",
            "clone hello world!",
            "modified HELOo world! (sec'y) end segs=3",
            "ring 100 ok=true",
            "in_use 0 0",
        ]
    );
    pkts.cache_flush().unwrap();
    assert!(pkts.is_full(), "every mbuf back: {}", pkts.in_use_count());
    assert!(clones.is_full());
    pkts.mempool().audit().unwrap();
    clones.mempool().audit().unwrap();
    // The secondary's writes are in the (shared) buffer.
    let h = head as *const MbufHeader;
    // SAFETY: the mbuf is in the pool (nobody uses it); its buffer holds
    // the last bytes written.
    let bytes = unsafe { std::slice::from_raw_parts((*h).buf_addr.add(128), 4) };
    assert_eq!(bytes, b"HELO");
    ring.free().unwrap();
    pkts.free().unwrap();
    clones.free().unwrap();
}
