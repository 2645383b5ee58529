//! Mbuf operations on real hugepage pools: layout and footprint, alloc and
//! free (single, bulk, chains), data operations, indirect mbufs, clones,
//! external buffers, and the bad-input list.

// Short names for pools and mbufs (a, b, d, i, m, t) read best here; the
// pool private area is 64-byte aligned.
#![allow(clippy::many_single_char_names, clippy::cast_ptr_alignment)]

// The mempool crate's test support (hugepage check, instances, pool lock).
#[path = "../../memplane-mempool/tests/common.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut};
use common::{have_hugepages, instance};
use memplane_mbuf::layout::PktmbufPoolPrivate;
use memplane_mbuf::{
    ol_flags, ExtMem, ExtSharedInfo, Mbuf, MbufError, MbufPool, MbufPoolConfig, DEFAULT_BUF_SIZE,
    HEADROOM, MAX_NB_SEGS, MBUF_HEADER_SIZE, PORT_INVALID,
};
use memplane_mempool::MempoolConfig;

fn fill(m: &mut Mbuf<'_>, bytes: &[u8]) {
    m.append(bytes.len()).unwrap().copy_from_slice(bytes);
}

#[test]
fn pool_layout_footprint_and_fresh_mbufs_follow_dpdk() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_layout");
    let mem = &inst.mem;
    let pool = MbufPool::pktmbuf_pool_create(mem, "lay", 1000, 32, 64, 2176, -1).unwrap();
    assert_eq!((pool.data_room(), pool.priv_size()), (2176, 64));
    assert_eq!(DEFAULT_BUF_SIZE, 2176);
    assert_eq!(MBUF_HEADER_SIZE, 128);
    let os = pool.mempool().obj_size();
    assert_eq!(pool.mempool().elt_size() as usize, 128 + 64 + 2176);
    // DPDK 22.11: a 64-byte object header + 2368-byte element = 2432
    // bytes = 38 lines, spread to 39 (coprime to 4 channels x 1 rank).
    assert_eq!((64 + 128 + 64 + 2176usize).next_multiple_of(64), 2432);
    assert_eq!(os.total_size, 2496);
    assert_eq!(pool.mempool().handler(), "ring_mp_mc");
    // Footprint: the object zones are exactly what the mempool says n
    // mbufs of header + private area + data room take.
    let zones: usize = pool.mempool().chunks().iter().map(|c| c.len).sum();
    let need = memplane_mempool::required_memory(
        1000,
        128 + 64 + 2176,
        memplane_mempool::MempoolFlags::NONE,
    )
    .unwrap();
    assert_eq!(zones, need);
    assert_eq!(need, (1000 * os.total_size as usize).next_multiple_of(64));
    let (p, len) = pool.mempool().private_area();
    assert!(len >= std::mem::size_of::<PktmbufPoolPrivate>());
    // SAFETY: the private area holds the pktmbuf sizes.
    let pp = unsafe { *p.cast::<PktmbufPoolPrivate>() };
    assert_eq!((pp.mbuf_data_room_size, pp.mbuf_priv_size), (2176, 64));

    let mut m = pool.alloc().unwrap();
    let h = m.header();
    let addr = m.as_ptr() as usize;
    assert_eq!(
        h.buf_addr as usize,
        addr + 128 + 64,
        "buffer after header and private area"
    );
    assert_eq!(h.buf_len, 2176);
    assert_eq!(h.data_off, HEADROOM);
    assert_eq!((h.data_len, h.pkt_len, h.nb_segs), (0, 0, 1));
    assert_eq!(h.port, PORT_INVALID);
    assert_eq!(h.pool, pool.addr());
    assert!(h.next.is_null() && h.shinfo.is_null());
    assert_eq!(h.priv_size, 64);
    assert_eq!(m.refcnt(), 1);
    let iova = pool.mempool().virt2iova(addr as *const u8).unwrap();
    assert_eq!(h.buf_iova, iova + 128 + 64);
    assert_eq!(m.data_iova(), h.buf_iova + 128);
    assert_eq!(m.headroom(), 128);
    assert_eq!(m.tailroom(), 2048);
    assert_eq!(m.priv_data().len(), 64);
    m.priv_data_mut()[0] = 7;
    m.set_port(3);
    m.set_rss_hash(0xdead_beef);
    m.set_vlan_tci(42);
    m.set_packet_type(0x11);
    m.set_tx_offload(99);
    m.set_timesync(1);
    m.dynfields_mut()[8] = 5;
    m.set_ol_flags(u64::MAX);
    assert_eq!(
        m.ol_flags() & (ol_flags::INDIRECT | ol_flags::EXTERNAL),
        0,
        "ownership bits kept"
    );
    assert_eq!((m.port(), m.rss_hash(), m.vlan_tci()), (3, 0xdead_beef, 42));
    assert_eq!(
        (m.packet_type(), m.tx_offload(), m.timesync()),
        (0x11, 99, 1)
    );
    assert_eq!(m.dynfields()[8], 5);
    assert_eq!(pool.in_use_count(), 1);
    drop(m);
    pool.cache_flush().unwrap();
    assert!(pool.is_full());
    // Every alloc is reset, every field, through alloc and alloc_bulk:
    // dirty all 1000 mbufs, free them, take them all again.
    let check_fresh = |m: &memplane_mbuf::Mbuf<'_>, what: &str| {
        let h = m.header();
        assert_eq!(
            (
                h.data_off,
                h.refcnt.load(std::sync::atomic::Ordering::Relaxed)
            ),
            (HEADROOM, 1),
            "{what}"
        );
        assert_eq!(
            (h.nb_segs, h.port, h.ol_flags),
            (1, PORT_INVALID, 0),
            "{what}"
        );
        assert_eq!((h.packet_type, h.pkt_len, h.data_len), (0, 0, 0), "{what}");
        assert_eq!(
            (h.vlan_tci, h.hash, h.vlan_tci_outer),
            (0, [0, 0], 0),
            "{what}"
        );
        assert!(h.next.is_null() && h.tx_offload == 0, "{what}");
        // What the reset leaves alone.
        assert_eq!(
            (h.buf_len, h.pool, h.priv_size),
            (2176, pool.addr(), 64),
            "{what}"
        );
        assert_eq!(
            h.buf_addr as usize,
            m.as_ptr() as usize + 128 + 64,
            "{what}"
        );
        assert!(h.shinfo.is_null(), "{what}");
    };
    let mut all = Vec::new();
    pool.alloc_bulk(&mut all, 1000).unwrap();
    for m in &mut all {
        check_fresh(m, "first alloc");
        m.append(100).unwrap();
        m.prepend(10).unwrap();
        m.set_port(3);
        m.set_rss_hash(0xdead_beef);
        m.set_vlan_tci(42);
        m.set_packet_type(0x11);
        m.set_tx_offload(99);
        m.set_ol_flags(u64::MAX);
        // SAFETY: a plain field, not part of the chain or buffer state.
        unsafe { m.header_mut().vlan_tci_outer = 7 };
    }
    Mbuf::free_vec(&mut all);
    for _ in 0..500 {
        all.push(pool.alloc().unwrap());
    }
    pool.alloc_bulk(&mut all, 500).unwrap();
    for (i, m) in all.iter().enumerate() {
        check_fresh(m, if i < 500 { "alloc" } else { "alloc_bulk" });
    }
    drop(all);
    pool.free().unwrap();
    // A data room shorter than the headroom: data_off is the whole room.
    let small = MbufPool::pktmbuf_pool_create(mem, "small", 10, 0, 0, 64, -1).unwrap();
    let m = small.alloc().unwrap();
    assert_eq!((m.headroom(), m.tailroom()), (64, 0));
    drop(m);
    small.free().unwrap();
}

#[test]
fn lookup_recovers_sizes_and_refuses_plain_mempools() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_lookup");
    let mem = &inst.mem;
    let cfg = MbufPoolConfig::new(200)
        .data_room(1000)
        .priv_size(16)
        .handler("stack");
    let a = MbufPool::create(mem, "lk", &cfg).unwrap();
    let b = MbufPool::lookup(mem, "lk").unwrap();
    assert_eq!((b.data_room(), b.priv_size()), (1000, 16));
    assert_eq!(b.addr(), a.addr());
    assert_eq!(b.mempool().handler(), "stack");
    let m = b.alloc().unwrap();
    assert_eq!(m.tailroom(), 1000 - 128);
    drop(m);
    let plain =
        memplane_mempool::Mempool::create(mem, "plain", &MempoolConfig::new(10, 64)).unwrap();
    assert!(matches!(
        MbufPool::lookup(mem, "plain"),
        Err(MbufError::NotMbufPool { .. })
    ));
    plain.free().unwrap();
    assert!(matches!(
        MbufPool::lookup(mem, "nope"),
        Err(MbufError::Mempool(
            memplane_mempool::MempoolError::NotFound { .. }
        ))
    ));
    assert!(matches!(
        a.clone().free(),
        Err(MbufError::PoolBusy { handles: 3, .. })
    ));
    drop(b);
    a.free().unwrap();
}

#[test]
fn bad_pool_sizes_are_refused_and_leave_nothing() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("mb_badpool");
    let mem = &inst.mem;
    let zones = mem.memzone_count();
    let c = |priv_size, data_room, n, cache| {
        MbufPool::pktmbuf_pool_create(mem, "bad", n, cache, priv_size, data_room, -1)
    };
    assert!(matches!(
        c(12, 2176, 10, 0),
        Err(MbufError::BadPoolParam {
            what: "priv_size",
            ..
        })
    ));
    assert!(matches!(
        c(1 << 16, 2176, 10, 0),
        Err(MbufError::BadPoolParam {
            what: "priv_size",
            ..
        })
    ));
    assert!(matches!(
        c(0, 70000, 10, 0),
        Err(MbufError::BadPoolParam {
            what: "data_room",
            ..
        })
    ));
    assert!(matches!(c(0, 2176, 0, 0), Err(MbufError::Mempool(_))));
    assert!(matches!(c(0, 2176, 10, 9), Err(MbufError::Mempool(_))));
    assert!(matches!(
        MbufPool::create(mem, "", &MbufPoolConfig::new(10)),
        Err(MbufError::Mempool(_))
    ));
    assert!(matches!(
        MbufPool::create(mem, "h", &MbufPoolConfig::new(10).handler("nosuch")),
        Err(MbufError::Mempool(_))
    ));
    let z = mem
        .memzone_reserve("ext", 4096, -1, memplane::memzone::MemzoneFlags::NONE)
        .unwrap();
    let ext = [ExtMem::from_memzone(&z, 1024)];
    assert!(matches!(
        // SAFETY: the zone is ours and outlives the attempt (refused).
        unsafe { MbufPool::create_extbuf(mem, "e", &MbufPoolConfig::new(5), &ext) },
        Err(MbufError::BadPoolParam { what: "n", .. })
    ));
    assert!(matches!(
        // SAFETY: as above.
        unsafe { MbufPool::create_extbuf(mem, "e", &MbufPoolConfig::new(1), &[]) },
        Err(MbufError::BadPoolParam {
            what: "ext_num",
            ..
        })
    ));
    assert!(matches!(
        // SAFETY: as above.
        unsafe {
            MbufPool::create_extbuf(
                mem,
                "e",
                &MbufPoolConfig::new(1),
                &[ExtMem {
                    elt_size: 0,
                    ..ext[0]
                }],
            )
        },
        Err(MbufError::BadPoolParam {
            what: "elt_size",
            ..
        })
    ));
    z.free().unwrap();
    assert_eq!(mem.memzone_count(), zones, "nothing left behind");
}

#[test]
fn data_operations_and_their_bad_input() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_data");
    let pool = MbufPool::create(&inst.mem, "d", &MbufPoolConfig::new(64).data_room(512)).unwrap();
    let mut m = pool.alloc().unwrap();
    fill(&mut m, b"world");
    m.prepend(6).unwrap().copy_from_slice(b"hello ");
    assert_eq!(m.data(), b"hello world");
    assert_eq!((m.pkt_len(), m.data_len(), m.headroom()), (11, 11, 122));
    // Bad input changes nothing.
    assert!(matches!(
        m.append(513),
        Err(MbufError::NoTailroom {
            len: 513,
            tailroom: 379
        })
    ));
    assert!(matches!(
        m.prepend(123),
        Err(MbufError::NoHeadroom {
            len: 123,
            headroom: 122
        })
    ));
    assert!(matches!(
        m.adj(12),
        Err(MbufError::OutOfRange { op: "adj", .. })
    ));
    assert!(matches!(
        m.trim(12),
        Err(MbufError::OutOfRange { op: "trim", .. })
    ));
    let mut scratch = [0u8; 16];
    assert!(matches!(
        m.read(5, 7, &mut scratch),
        Err(MbufError::OutOfRange { op: "read", .. })
    ));
    assert_eq!(m.data(), b"hello world");
    assert_eq!((m.pkt_len(), m.headroom(), m.tailroom()), (11, 122, 379));
    m.adj(6).unwrap();
    m.trim(2).unwrap();
    assert_eq!(m.data(), b"wor");
    m.data_mut().unwrap()[0] = b'W';
    assert_eq!(m.read(0, 3, &mut []).unwrap(), b"Wor");
    // A chain: adj/trim cut only the first/last segment, as DPDK.
    let mut t = pool.alloc().unwrap();
    fill(&mut t, b"ld!");
    let mut c = m.chain(t).unwrap();
    assert_eq!((c.nb_segs(), c.pkt_len()), (2, 6));
    assert!(matches!(
        c.adj(4),
        Err(MbufError::SegmentTooShort { which: "first", .. })
    ));
    assert!(matches!(
        c.trim(4),
        Err(MbufError::SegmentTooShort { which: "last", .. })
    ));
    let mut buf = [0u8; 6];
    assert_eq!(c.read(0, 6, &mut buf).unwrap(), b"World!");
    assert!(matches!(
        c.read(1, 5, &mut [0u8; 4]),
        Err(MbufError::ShortBuffer { need: 5, have: 4 })
    ));
    assert_eq!(
        c.read(3, 2, &mut []).unwrap(),
        b"ld",
        "a view when in one segment"
    );
    assert_eq!(c.to_vec(), b"World!");
    // Buf over the chain, BufMut over the tailroom.
    let mut r = c.reader();
    assert_eq!(r.remaining(), 6);
    let mut got = vec![0u8; 6];
    r.copy_to_slice(&mut got);
    assert_eq!(got, b"World!");
    let mut w = c.writer();
    assert_eq!(w.remaining_mut(), 512 - 128 - 3);
    w.put_u16(0x0a0b);
    assert_eq!(c.to_vec(), b"World!\x0a\x0b");
    assert_eq!(c.pkt_len(), 8);
    // A deep copy: bytes and metadata, into new direct mbufs.
    c.set_port(7);
    c.set_vlan_tci(9);
    c.dynfields_mut()[0] = 3;
    let cp = c.copy_in(&pool, 1, 5).unwrap();
    assert_eq!(cp.to_vec(), b"orld!");
    assert_eq!((cp.port(), cp.vlan_tci(), cp.dynfields()[0]), (7, 9, 3));
    assert!(cp.is_direct() && cp.refcnt() == 1);
    assert_eq!(
        c.copy_in(&pool, 0, usize::MAX).unwrap().to_vec(),
        c.to_vec()
    );
    assert!(matches!(
        c.copy_in(&pool, 9, 1),
        Err(MbufError::OutOfRange { op: "copy", .. })
    ));
    let empty = MbufPool::create(&inst.mem, "e0", &MbufPoolConfig::new(4).data_room(0)).unwrap();
    assert!(matches!(
        c.copy_in(&empty, 0, 3),
        Err(MbufError::NoTailroom { .. })
    ));
    assert!(empty.is_full());
    empty.free().unwrap();
    drop(cp);
    assert_eq!(pool.in_use_count(), 2);
    c.linearize().unwrap();
    assert_eq!(
        (c.nb_segs(), c.data(), c.pkt_len()),
        (1, &b"World!\x0a\x0b"[..], 8)
    );
    assert_eq!(pool.in_use_count(), 1, "the linearized tail went back");
    c.reset();
    assert_eq!((c.pkt_len(), c.data_len(), c.headroom()), (0, 0, 128));
    drop(c);
    assert_eq!(pool.in_use_count(), 0);
    pool.free().unwrap();
}

#[test]
fn bulk_alloc_is_all_or_nothing_and_free_bulk_returns_chains_to_their_pools() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_bulk");
    let a = MbufPool::create(&inst.mem, "a", &MbufPoolConfig::new(100).cache_size(16)).unwrap();
    let b = MbufPool::create(&inst.mem, "b", &MbufPoolConfig::new(100).data_room(256)).unwrap();
    let mut v = Vec::new();
    a.alloc_bulk(&mut v, 90).unwrap();
    assert!(a.alloc_bulk(&mut v, 11).is_err());
    assert_eq!(v.len(), 90, "nothing taken on failure");
    let mut w = Vec::new();
    b.alloc_bulk(&mut w, 50).unwrap();
    // Mixed chains: a-head with b-tail and the reverse.
    let mut chains = Vec::new();
    for _ in 0..40 {
        let h = v.pop().unwrap();
        let t = w.pop().unwrap();
        chains.push(h.chain(t).unwrap());
    }
    for _ in 0..5 {
        let h = w.pop().unwrap();
        let t = v.pop().unwrap();
        chains.push(h.chain(t).unwrap());
    }
    Mbuf::free_bulk(chains.into_iter().chain(v).chain(w));
    a.cache_flush().unwrap();
    assert!(a.is_full() && b.is_full());
    // Raw bulk alloc/free.
    let mut raw = [std::ptr::null_mut(); 32];
    // SAFETY: freed below, once.
    unsafe { a.alloc_bulk_raw(&mut raw).unwrap() };
    assert_eq!(a.in_use_count(), 32);
    // SAFETY: ours, freed once.
    unsafe { memplane_mbuf::free_bulk_raw(&raw) };
    a.cache_flush().unwrap();
    assert!(a.is_full());
    // free_vec: chains across pools and a clone's shared segment; the
    // vector is left empty with its capacity, the clone keeps its data.
    let mut burst = Vec::with_capacity(64);
    a.alloc_bulk(&mut burst, 30).unwrap();
    let mut tail = Vec::new();
    b.alloc_bulk(&mut tail, 3).unwrap();
    let mut head = burst.pop().unwrap();
    head.append(4).unwrap().copy_from_slice(b"keep");
    let head = head.chain(tail.pop().unwrap()).unwrap();
    let clone = head.clone_in(&a).unwrap();
    burst.push(head);
    burst.append(&mut tail);
    a.cache_flush().unwrap();
    // a: 30 in the burst (one the chain's head) + 2 indirect clone
    // segments; b: the chain's tail + 2 in the burst.
    assert_eq!((a.in_use_count(), b.in_use_count()), (32, 3));
    Mbuf::free_vec(&mut burst);
    assert!(burst.is_empty() && burst.capacity() >= 64);
    a.cache_flush().unwrap();
    // The clone still holds both data segments (refcount 2 -> 1).
    assert_eq!((a.in_use_count(), b.in_use_count()), (3, 1));
    let mut copy = [0u8; 4];
    assert_eq!(clone.read(0, 4, &mut copy).unwrap(), b"keep");
    drop((clone, burst, tail));
    a.cache_flush().unwrap();
    assert!(a.is_full() && b.is_full());
    a.free().unwrap();
    b.free().unwrap();
}

#[test]
fn burst_free_keeps_shared_mbufs_and_ignores_freed_ones() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_burst_ref");
    // No cache: the pool's counts are exact at every step.
    let a = MbufPool::create(&inst.mem, "a", &MbufPoolConfig::new(64)).unwrap();
    // A burst below and one above the out-of-line threshold (8).
    for n in [5usize, 32] {
        let mut burst = Vec::with_capacity(n);
        a.alloc_bulk(&mut burst, n).unwrap();
        // Every third mbuf has a second reference, held as a raw pointer.
        let mut shared = Vec::new();
        for (i, m) in burst.iter_mut().enumerate() {
            if i % 3 == 1 {
                fill(m, &[i as u8; 3]);
                // SAFETY: the extra reference is adopted below, once.
                unsafe { m.refcnt_update(1).unwrap() };
                shared.push((i, m.as_ptr()));
            }
        }
        Mbuf::free_vec(&mut burst);
        assert_eq!(
            a.in_use_count() as usize,
            shared.len(),
            "n={n}: a burst free returns only the mbufs it held the last reference to"
        );
        for (i, p) in shared {
            // SAFETY: the extra reference taken above, adopted once.
            let m = unsafe { Mbuf::from_raw(p, &a) }.unwrap();
            assert_eq!(m.refcnt(), 1, "n={n}");
            assert_eq!(m.data(), &[i as u8; 3], "n={n}: data of a shared mbuf kept");
        }
        assert!(a.is_full(), "n={n}");
        // A raw burst freed twice: the second free finds refcount 0 on
        // every mbuf and gives the pool nothing.
        let mut raw = vec![std::ptr::null_mut(); n];
        // SAFETY: freed below.
        unsafe { a.alloc_bulk_raw(&mut raw).unwrap() };
        // SAFETY: ours, freed once.
        unsafe { memplane_mbuf::free_bulk_raw(&raw) };
        assert!(a.is_full(), "n={n}");
        for &p in &raw {
            // SAFETY: a free mbuf's header stays mapped while its pool lives.
            let r = unsafe { (*p).refcnt.load(Ordering::Relaxed) };
            assert_eq!(r, 0, "n={n}: a free mbuf has refcount 0");
        }
        // SAFETY: deliberately wrong (freed mbufs); refused before the
        // pool sees them.
        unsafe { memplane_mbuf::free_bulk_raw(&raw) };
        assert_eq!(a.avail_count(), 64, "n={n}: nothing put twice");
        a.mempool().audit().unwrap();
    }
    a.free().unwrap();
}

#[test]
fn raw_round_trip_and_refcount_zero_is_refused() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_raw");
    let pool = MbufPool::create(&inst.mem, "r", &MbufPoolConfig::new(16)).unwrap();
    let mut m = pool.alloc().unwrap();
    fill(&mut m, b"abc");
    let raw = m.into_raw();
    // SAFETY: from into_raw, adopted once.
    let m = unsafe { Mbuf::from_raw(raw, &pool).unwrap() };
    assert_eq!(m.data(), b"abc");
    drop(m);
    assert!(pool.is_full());
    // The mbuf is free now: refcount 0, refused.
    assert!(matches!(
        // SAFETY: the header is mapped; from_raw reads it and refuses.
        unsafe { Mbuf::from_raw(raw, &pool) },
        Err(MbufError::NotAllocated { .. })
    ));
    // A raw free of the freed mbuf (refcount 0) is ignored: the pool does
    // not get it twice.
    // SAFETY: deliberately wrong (a freed mbuf); prefree refuses it
    // before the pool sees it.
    unsafe { memplane_mbuf::free_bulk_raw(&[raw]) };
    assert!(pool.is_full());
    pool.mempool().audit().unwrap();
    // An allocated mbuf whose pool has no handle in this process is
    // refused until the pool is looked up.
    let other = MbufPool::create(&inst.mem, "other", &MbufPoolConfig::new(4)).unwrap();
    let raw_other = other.alloc().unwrap().into_raw();
    drop(other);
    assert!(matches!(
        // SAFETY: an allocated mbuf we own; refused, so not adopted.
        unsafe { Mbuf::from_raw(raw_other, &pool) },
        Err(MbufError::PoolNotOpen { .. })
    ));
    let other = MbufPool::lookup(&inst.mem, "other").unwrap();
    // SAFETY: as above; its pool is open now.
    drop(unsafe { Mbuf::from_raw(raw_other, &other) }.unwrap());
    assert!(other.is_full());
    other.free().unwrap();
    // SAFETY: null is refused before any read.
    assert!(unsafe { Mbuf::from_raw(std::ptr::null_mut(), &pool) }.is_err());
    assert!(pool.is_full(), "nothing freed twice");
    pool.free().unwrap();
}

#[test]
fn chain_limit_is_dpdks_and_a_refused_chain_hands_both_back() {
    if !have_hugepages(64) {
        return;
    }
    let inst = instance("mb_chainmax");
    let n = u32::from(MAX_NB_SEGS) + 1;
    let pool = MbufPool::create(&inst.mem, "c", &MbufPoolConfig::new(n).data_room(0)).unwrap();
    let mut v = Vec::new();
    pool.alloc_bulk(&mut v, n as usize).unwrap();
    // Pairwise merges: each level walks every chain once.
    while v.len() > 2 {
        let mut next = Vec::with_capacity(v.len() / 2 + 1);
        let mut it = v.into_iter();
        while let Some(a) = it.next() {
            match it.next() {
                Some(b) => next.push(a.chain(b).unwrap()),
                None => next.push(a),
            }
        }
        v = next;
    }
    let b = v.pop().unwrap();
    let a = v.pop().unwrap();
    assert_eq!(u32::from(a.nb_segs()) + u32::from(b.nb_segs()), n);
    let memplane_mbuf::ChainError {
        error,
        head: mut a,
        tail: b,
    } = a.chain(b).unwrap_err();
    assert!(matches!(
        error,
        MbufError::TooManySegments { max: 65535, .. }
    ));
    assert_eq!(u32::from(a.nb_segs()) + u32::from(b.nb_segs()), n);
    assert!(pool.alloc().is_err(), "every mbuf is out");
    // Fewer segments fit.
    a.reset(); // frees a's other segments
    assert_eq!(a.nb_segs(), 1);
    let c = a.chain(b).unwrap();
    assert!(c.nb_segs() < MAX_NB_SEGS);
    drop(c);
    drop(v);
    assert!(pool.is_full());
    pool.free().unwrap();
}

#[test]
fn indirect_mbufs_share_the_buffer_and_free_the_direct_last() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_indirect");
    let mem = &inst.mem;
    let d = MbufPool::create(mem, "direct", &MbufPoolConfig::new(32)).unwrap();
    let i = MbufPool::create(mem, "ind", &MbufPoolConfig::new(32).data_room(0)).unwrap();
    let other = MbufPool::create(mem, "priv", &MbufPoolConfig::new(8).priv_size(8)).unwrap();
    let mut m = d.alloc().unwrap();
    fill(&mut m, b"shared bytes");
    let mut t = d.alloc().unwrap();
    fill(&mut t, b" and more");
    let m = m.chain(t).unwrap();
    // A manual attach.
    let mut mi = i.alloc().unwrap();
    mi.attach(&m).unwrap();
    assert!(mi.is_indirect());
    assert_eq!(mi.data(), b"shared bytes");
    assert_eq!(m.refcnt(), 2);
    assert!(matches!(mi.data_mut(), Err(MbufError::NotWritable { .. })));
    assert!(matches!(mi.append(1), Err(MbufError::NotWritable { .. })));
    assert!(matches!(mi.prepend(1), Err(MbufError::NotWritable { .. })));
    let mut m = m;
    assert!(
        matches!(m.data_mut(), Err(MbufError::NotWritable { .. })),
        "direct with attached mbufs"
    );
    // Attach across incompatible pools, of an attached mbuf, detach of a direct.
    let mut p = other.alloc().unwrap();
    assert!(matches!(p.attach(&m), Err(MbufError::Incompatible { .. })));
    assert!(matches!(mi.attach(&m), Err(MbufError::Incompatible { .. })));
    assert!(matches!(p.detach(), Err(MbufError::NotAttached)));
    assert_eq!(m.refcnt(), 2, "refused attaches changed nothing");
    drop(p);
    // A clone of the chain.
    let c = m.clone_in(&i).unwrap();
    assert_eq!((c.nb_segs(), c.pkt_len()), (2, 21));
    assert_eq!(c.to_vec(), b"shared bytes and more");
    assert_eq!(m.refcnt(), 3);
    assert_eq!(
        m.segments()
            .nth(1)
            .unwrap()
            .header()
            .refcnt
            .load(Ordering::Relaxed),
        2
    );
    // The owner lets go first: the buffers stay until the last user.
    drop(m);
    assert_eq!(d.in_use_count(), 2);
    assert_eq!(c.to_vec(), b"shared bytes and more");
    mi.detach().unwrap();
    assert!(mi.is_direct());
    assert_eq!((mi.pkt_len(), mi.data_len(), mi.headroom()), (0, 0, 0));
    assert_eq!(mi.header().buf_len, 0);
    assert_eq!(d.in_use_count(), 2, "the clone still holds them");
    drop(c);
    assert_eq!(d.in_use_count(), 0);
    drop(mi);
    assert_eq!(i.in_use_count(), 0);
    d.free().unwrap();
    i.free().unwrap();
    other.free().unwrap();
}

#[test]
fn refcounts_with_clones_across_threads() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_threads");
    let d = MbufPool::create(&inst.mem, "d", &MbufPoolConfig::new(64).cache_size(8)).unwrap();
    let i = MbufPool::create(
        &inst.mem,
        "i",
        &MbufPoolConfig::new(4096).data_room(0).cache_size(64),
    )
    .unwrap();
    for round in 0..20 {
        let mut m = d.alloc().unwrap();
        fill(&mut m, format!("round {round}").as_bytes());
        let clones: Vec<Mbuf<'_>> = (0..400).map(|_| m.clone_in(&i).unwrap()).collect();
        assert_eq!(m.refcnt(), 401);
        let expect = m.to_vec();
        std::thread::scope(|s| {
            let mut rest = clones;
            while !rest.is_empty() {
                let part: Vec<Mbuf<'_>> = rest.drain(..rest.len().min(100)).collect();
                let expect = &expect;
                s.spawn(move || {
                    for c in part {
                        assert_eq!(&c.to_vec(), expect);
                        drop(c);
                    }
                });
            }
            if round % 2 == 0 {
                drop(m);
            } else {
                // The owner may also be the last.
                s.spawn(move || drop(m));
            }
        });
    }
    d.cache_flush().unwrap();
    i.cache_flush().unwrap();
    assert_eq!(d.in_use_count(), 0);
    assert_eq!(i.in_use_count(), 0);
    d.mempool().audit().unwrap();
    i.mempool().audit().unwrap();
    d.free().unwrap();
    i.free().unwrap();
}

static CALLS: AtomicUsize = AtomicUsize::new(0);
unsafe extern "C" fn count_free(_addr: *mut u8, opaque: *mut u8) {
    assert_eq!(opaque as usize, 0x5eed);
    CALLS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn external_buffer_free_callback_runs_exactly_once() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_ext");
    let mem = &inst.mem;
    let pool = MbufPool::create(mem, "m", &MbufPoolConfig::new(32).data_room(0)).unwrap();
    let zone = mem
        .memzone_reserve("extbuf", 4096, -1, memplane::memzone::MemzoneFlags::NONE)
        .unwrap();
    let buf = zone.as_mut_ptr();
    let mut len: u16 = 4096;
    // SAFETY: the zone outlives every mbuf using it (freed at the end).
    let sh = unsafe {
        ExtSharedInfo::init_at_end(buf, &mut len, Some(count_free), 0x5eed as *mut u8).unwrap()
    };
    assert!((4096 - 32..4096).contains(&len));
    let mut a = pool.alloc().unwrap();
    // SAFETY: the buffer and shinfo live until the callback; refcnt 1 counts `a`.
    unsafe {
        a.attach_extbuf(buf, zone.iova(), len, std::ptr::NonNull::new(sh).unwrap())
            .unwrap();
    }
    assert!(a.has_extbuf() && !a.is_direct());
    fill(&mut a, b"external");
    assert_eq!(a.headroom(), 0);
    let c1 = a.clone_in(&pool).unwrap();
    let c2 = c1.clone_in(&pool).unwrap();
    // SAFETY: shinfo is live.
    assert_eq!(unsafe { (*sh).refcnt.load(Ordering::SeqCst) }, 3);
    assert!(matches!(a.append(1), Err(MbufError::NotWritable { .. })));
    assert_eq!(c2.data(), b"external");
    drop(a);
    drop(c1);
    assert_eq!(CALLS.load(Ordering::SeqCst), 0);
    drop(c2);
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    assert!(pool.is_full(), "the mbufs went back with their own buffers");
    let m = pool.alloc().unwrap();
    assert!(m.is_direct() && m.header().shinfo.is_null());
    drop(m);
    // Detach calls it too (once).
    let mut len: u16 = 4096;
    // SAFETY: as above.
    let sh = unsafe {
        ExtSharedInfo::init_at_end(buf, &mut len, Some(count_free), 0x5eed as *mut u8).unwrap()
    };
    let mut b = pool.alloc().unwrap();
    // SAFETY: as above.
    unsafe {
        b.attach_extbuf(buf, 0, len, std::ptr::NonNull::new(sh).unwrap())
            .unwrap();
    }
    b.detach().unwrap();
    assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    assert!(b.is_direct());
    drop(b);
    assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    assert!(pool.is_full());
    pool.free().unwrap();
    zone.free().unwrap();
}

#[test]
fn pinned_external_buffer_pool_keeps_buffers_and_waits_for_attached_users() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_pinned");
    let mem = &inst.mem;
    let z1 = mem
        .memzone_reserve("ext1", 10 * 1024, -1, memplane::memzone::MemzoneFlags::NONE)
        .unwrap();
    let z2 = mem
        .memzone_reserve("ext2", 8 * 1024, -1, memplane::memzone::MemzoneFlags::NONE)
        .unwrap();
    let ext = [
        ExtMem::from_memzone(&z1, 1024),
        ExtMem::from_memzone(&z2, 1024),
    ];
    // SAFETY: the zones are ours, used by nothing else, freed after the pool.
    let pool = unsafe {
        MbufPool::create_extbuf(mem, "pin", &MbufPoolConfig::new(18).cache_size(4), &ext)
    }
    .unwrap();
    assert!(pool.is_pinned_extbuf());
    let ind = MbufPool::create(mem, "ind", &MbufPoolConfig::new(8).data_room(0)).unwrap();
    let mut v = Vec::new();
    pool.alloc_bulk(&mut v, 18).unwrap();
    let mut bufs: Vec<usize> = v.iter().map(|m| m.header().buf_addr as usize).collect();
    bufs.sort_unstable();
    let expect: Vec<usize> = (0..10)
        .map(|k| z1.as_ptr() as usize + k * 1024)
        .chain((0..8).map(|k| z2.as_ptr() as usize + k * 1024))
        .collect();
    assert_eq!(bufs, expect, "each mbuf has its own slice of the regions");
    for m in &v {
        assert!(m.has_extbuf());
        assert_eq!(m.header().buf_len, 1024);
        assert_eq!(m.headroom(), 128);
    }
    let mut m = v.pop().unwrap();
    fill(&mut m, b"pinned");
    assert!(matches!(m.detach(), Err(MbufError::NotAttached)));
    drop(v.pop());
    assert!(
        matches!(m.clone_in(&pool), Err(MbufError::Incompatible { .. })),
        "a pinned pool's mbufs keep their buffers"
    );
    pool.cache_flush().unwrap();
    assert_eq!((pool.in_use_count(), ind.in_use_count()), (17, 0));
    let c = m.clone_in(&ind).unwrap();
    let buf = m.header().buf_addr;
    drop(m);
    pool.cache_flush().unwrap();
    assert_eq!(
        pool.in_use_count(),
        17,
        "the pinned mbuf waits for its buffer's users"
    );
    assert_eq!(c.data(), b"pinned");
    drop(c);
    pool.cache_flush().unwrap();
    assert_eq!(pool.in_use_count(), 16);
    drop(v);
    pool.cache_flush().unwrap();
    assert!(pool.is_full() && ind.is_full());
    let mut all = Vec::new();
    pool.alloc_bulk(&mut all, 18).unwrap();
    assert!(
        all.iter().any(|m| m.header().buf_addr == buf),
        "the buffer stayed with its mbuf"
    );
    drop(all);
    pool.free().unwrap();
    ind.free().unwrap();
    z1.free().unwrap();
    z2.free().unwrap();
}

#[test]
fn refcnt_update_is_checked() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("mb_refcnt");
    let pool = MbufPool::create(&inst.mem, "r", &MbufPoolConfig::new(8)).unwrap();
    let m = pool.alloc().unwrap();
    // SAFETY: the extra reference is given up below.
    unsafe {
        assert!(matches!(
            m.refcnt_update(-1),
            Err(MbufError::BadRefcnt {
                refcnt: 1,
                delta: -1
            })
        ));
        assert!(matches!(
            m.refcnt_update(70000),
            Err(MbufError::BadRefcnt { .. })
        ));
        assert_eq!(m.refcnt_update(1).unwrap(), 2);
        let raw = m.as_ptr();
        // The second owner frees first: the mbuf stays out.
        drop(Mbuf::from_raw(raw, &pool).unwrap());
    }
    assert_eq!((m.refcnt(), pool.in_use_count()), (1, 1));
    drop(m);
    assert!(pool.is_full());
    pool.free().unwrap();
}

#[test]
fn handles_come_and_go_while_other_threads_free_mbufs() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_handles");
    let mem = &inst.mem;
    let a = MbufPool::create(mem, "a", &MbufPoolConfig::new(2048).cache_size(32)).unwrap();
    let b = MbufPool::create(mem, "b", &MbufPoolConfig::new(2048).data_room(256)).unwrap();
    std::thread::scope(|s| {
        // Open and close handles of both pools (the process-local map
        // changes, shortcuts go stale) ...
        s.spawn(|| {
            for _ in 0..2000 {
                let x = MbufPool::lookup(mem, "a").unwrap();
                let y = MbufPool::lookup(mem, "b").unwrap();
                drop(x);
                drop(y.clone());
                drop(y);
            }
        });
        // ... while mixed chains are allocated and freed here.
        for round in 0..2000 {
            let mut m = a.alloc().unwrap();
            m.append(4).unwrap().copy_from_slice(b"head");
            let mut t = b.alloc().unwrap();
            t.append(4).unwrap().copy_from_slice(b"tail");
            let c = m.chain(t).unwrap();
            assert_eq!(c.to_vec(), b"headtail");
            if round % 2 == 0 {
                drop(c);
            } else {
                Mbuf::free_bulk([c]);
            }
        }
    });
    a.cache_flush().unwrap();
    assert!(a.is_full() && b.is_full());
    a.mempool().audit().unwrap();
    b.mempool().audit().unwrap();
    a.free().unwrap();
    b.free().unwrap();
}

#[test]
fn a_leaked_handle_of_a_dropped_instance_is_replaced_not_reused() {
    if !have_hugepages(16) {
        return;
    }
    let first = {
        let inst = instance("mb_leak1");
        let pool = MbufPool::create(&inst.mem, "leak", &MbufPoolConfig::new(64)).unwrap();
        let addr = pool.addr();
        // Leaked: its entry stays in the map after the instance is gone.
        std::mem::forget(pool);
        addr
    };
    let inst = instance("mb_leak2");
    let pool =
        MbufPool::create(&inst.mem, "leak", &MbufPoolConfig::new(64).data_room(512)).unwrap();
    if pool.addr() != first {
        eprintln!("note: the new pool is elsewhere; nothing stale to replace");
    }
    // The new instance's sizes, not the stale entry's.
    let mut m = pool.alloc().unwrap();
    assert_eq!(m.tailroom(), 512 - 128);
    m.append(3).unwrap().copy_from_slice(b"new");
    let c = m.clone_in(&pool).unwrap();
    drop(m);
    drop(c);
    assert!(pool.is_full());
    let again = MbufPool::lookup(&inst.mem, "leak").unwrap();
    assert_eq!(again.data_room(), 512);
    drop(again);
    pool.free().unwrap();
}
