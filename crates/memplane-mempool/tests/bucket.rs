//! The `bucket` handler on real hugepages: objects laid out in aligned
//! 64 KiB buckets (footprint as `required_memory_handler` says, no object
//! crossing a bucket), contiguous blocks (contiguous, inside the pool,
//! disjoint, all or nothing, whole again only once every object is back),
//! caches and blocks, handlers without blocks, exact block counters, bad
//! input, two-step population, leak tracking, many threads, and a
//! secondary process that gets and puts objects and blocks of a primary's
//! pool.
// Under `--cfg loom` the library is built for its models only.
#![cfg(not(loom))]
// Objects are 64-byte aligned: u64 accesses at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{have_hugepages, instance, opts};
use memplane::memzone::MemzoneFlags;
use memplane::Memory;
use memplane_mempool::bucket::{BucketHandler, DEFAULT_BUCKET_SIZE};
use memplane_mempool::{
    channels_x_ranks, register_handler, register_thread, required_memory_for,
    required_memory_handler, Mempool, MempoolConfig, MempoolError, MempoolFlags, StatsCounters,
};

const B: usize = DEFAULT_BUCKET_SIZE as usize;
/// Objects of a 64 KiB bucket with 64-byte elements (192-byte objects
/// after a 768-byte bucket header).
const PB: usize = 337;
const NULL: *mut u8 = std::ptr::null_mut();

fn bucket_of(p: *mut u8) -> usize {
    p as usize & !(B - 1)
}

fn zones_of(mem: &Memory, name: &str) -> Vec<(usize, usize)> {
    let p = format!("MP_{name}_");
    mem.memzones()
        .into_iter()
        .filter(|z| z.name.starts_with(&p))
        .map(|z| (z.addr, z.len))
        .collect()
}

/// The objects of the blocks starting at `first`.
fn block_objects(pool: &Mempool<'_>, first: &[*mut u8]) -> Vec<*mut u8> {
    let (pb, total) = (
        pool.contig_block_size().unwrap() as usize,
        pool.obj_size().total_size as usize,
    );
    first
        .iter()
        .flat_map(|&f| (0..pb).map(move |j| f.wrapping_add(j * total)))
        .collect()
}

/// Checks blocks: each block's objects are consecutive objects of the
/// pool at the object stride, in one bucket; no object is in two blocks
/// or in `also`. Returns their indexes.
fn check_blocks(pool: &Mempool<'_>, first: &[*mut u8], also: &HashSet<u32>) -> HashSet<u32> {
    let pb = pool.contig_block_size().unwrap() as usize;
    let mut seen = HashSet::new();
    for &f in first {
        let i0 = pool
            .index_of(f as usize)
            .expect("a block starts at an object");
        for (j, &o) in block_objects(pool, &[f]).iter().enumerate() {
            let i = pool
                .index_of(o as usize)
                .expect("a block's objects are the pool's");
            assert_eq!(i, i0 + j as u32, "contiguous: object {j} of the block");
            assert_eq!(bucket_of(o), bucket_of(f), "one bucket");
            assert!(seen.insert(i) && !also.contains(&i), "object {i} twice");
        }
    }
    assert_eq!(seen.len(), first.len() * pb);
    seen
}

#[test]
fn bucket_pools_lay_objects_out_in_aligned_buckets_and_required_memory_matches() {
    use MempoolFlags as F;
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("bk_layout");
    let mem = &inst.mem;
    let cxr = channels_x_ranks(mem);
    for (name, n, elt, flags) in [
        ("one", 1u32, 64u32, F::NONE),
        ("exact", PB as u32, 64, F::NONE),
        ("plus1", PB as u32 + 1, 64, F::NONE),
        ("many", 5000, 64, F::NONE),
        ("packed", 3000, 13, F::NO_CACHE_ALIGN),
        ("big", 100, 2048, F::NONE),
        ("largest", 3, 60_000, F::NONE),
        ("virt", 1000, 200, F::NO_IOVA_CONTIG),
    ] {
        let need = required_memory_handler(n, elt, flags, cxr, "bucket").unwrap();
        let pool = Mempool::create(
            mem,
            name,
            &MempoolConfig::new(n, elt).flags(flags).handler("bucket"),
        )
        .unwrap();
        let zones = zones_of(mem, name);
        assert_eq!(zones.len(), 1, "{name}: {zones:?}");
        assert_eq!(zones[0].1, need, "{name}: footprint");
        let info = pool.info();
        let l = info.block_layout.expect("blocks");
        let pb = pool.contig_block_size().unwrap();
        assert_eq!(info.contig_block_size, Some(pb));
        assert_eq!((l.block_size as usize, l.objs_per_block), (B, pb));
        let sz = pool.obj_size();
        let (total, hs) = (sz.total_size as usize, sz.header_size as usize);
        // As many objects as fit after the header (one line + 2 bytes per
        // object, rounded up to 64), and not one more.
        let header = |k: usize| (64 + 2 * k).next_multiple_of(64);
        assert_eq!(l.header as usize, header(pb as usize), "{name}");
        assert!(header(pb as usize) + pb as usize * total <= B, "{name}");
        assert!(
            header(pb as usize + 1) + (pb as usize + 1) * total > B,
            "{name}"
        );
        if name == "exact" || name == "many" {
            assert_eq!(pb as usize, PB);
        }
        let chunks = pool.chunks();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].va % B, 0, "{name}: chunk aligned to a bucket");
        for (i, o) in pool.objects().enumerate() {
            assert_eq!(pool.index_of(o as usize), Some(i as u32), "{name}");
            let start = o as usize - hs;
            let bucket = start & !(B - 1);
            assert_eq!(
                bucket,
                chunks[0].va + (i / pb as usize) * B,
                "{name}: object {i} in bucket {}",
                i / pb as usize
            );
            assert_eq!((start + total - 1) & !(B - 1), bucket, "{name}: crosses");
            assert_eq!(
                start - bucket,
                l.header as usize + (i % pb as usize) * total,
                "{name}: object {i}"
            );
            assert!(pool.virt2iova(o).is_some());
        }
        // Dump and JSON show the handler and the block size.
        let mut text = Vec::new();
        pool.dump(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        for want in [
            "handler=bucket".to_string(),
            format!("contig_block_size={pb}"),
            format!(
                "block_size={B} block_header={} objs_per_block={pb}",
                l.header
            ),
        ] {
            assert!(text.contains(&want), "{want} in {text}");
        }
        let j = pool.dump_json();
        assert_eq!(j["handler"], "bucket");
        assert_eq!(j["contig_block_size"], pb);
        assert_eq!(j["block_layout"]["objs_per_block"], pb);
        assert_eq!(j["block_layout"]["block_size"], B);
        // Another handle finds the same layout.
        let same = Mempool::lookup(mem, name).unwrap();
        assert_eq!(same.contig_block_size(), Some(pb));
        assert_eq!(
            same.objects().collect::<Vec<_>>(),
            pool.objects().collect::<Vec<_>>()
        );
        drop(same);
        assert_eq!(pool.audit().unwrap().in_backend, n);
        pool.free().unwrap();
        assert!(
            mem.memzone_lookup(&format!("MB_{name}")).is_none(),
            "state zone freed"
        );
    }
    // Back-to-back handlers: the same bytes as required_memory_for, no
    // blocks.
    for h in ["ring_mp_mc", "stack", "lf_stack"] {
        assert_eq!(
            required_memory_handler(1000, 64, F::NONE, cxr, h).unwrap(),
            required_memory_for(1000, 64, F::NONE, cxr).unwrap()
        );
    }
    let p = Mempool::create(mem, "ring", &MempoolConfig::new(100, 64)).unwrap();
    let j = p.dump_json();
    assert!(
        j["block_layout"].is_null() && j["contig_block_size"].is_null(),
        "{j}"
    );
    p.free().unwrap();
}

#[test]
fn contig_blocks_are_contiguous_disjoint_inside_the_pool_and_all_or_nothing() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_blocks");
    let mem = &inst.mem;
    // Three whole buckets and a short one of 10 (never a block).
    let n = 3 * PB as u32 + 10;
    let pool = Mempool::create(mem, "blk", &MempoolConfig::new(n, 64).handler("bucket")).unwrap();
    assert_eq!(pool.contig_block_size(), Some(PB as u32));
    // More blocks than exist: refused, nothing taken.
    let mut four = [NULL; 4];
    let e = pool.get_contig_blocks(&mut four).unwrap_err();
    assert!(
        matches!(
            e,
            MempoolError::NotEnoughBlocks {
                requested: 4,
                available: 3,
                block_size: 337
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("whole"), "{e}");
    assert!(four.iter().all(|p| p.is_null()));
    assert!(pool.is_full());
    let mut none: [*mut u8; 0] = [];
    pool.get_contig_blocks(&mut none).unwrap();
    // All three.
    let mut three = [NULL; 3];
    pool.get_contig_blocks(&mut three).unwrap();
    let in_blocks = check_blocks(&pool, &three, &HashSet::new());
    assert_eq!(pool.avail_count(), 10);
    assert_eq!(pool.in_use_count(), 3 * PB as u32);
    let mut one = [NULL; 1];
    assert!(matches!(
        pool.get_contig_blocks(&mut one),
        Err(MempoolError::NotEnoughBlocks { available: 0, .. })
    ));
    // The short bucket's 10 singly, then nothing.
    let mut ten = [NULL; 10];
    pool.get_bulk(&mut ten).unwrap();
    for &o in &ten {
        assert!(!in_blocks.contains(&pool.index_of(o as usize).unwrap()));
    }
    assert!(matches!(
        pool.get(),
        Err(MempoolError::NotEnough {
            requested: 1,
            available: 0
        })
    ));
    pool.audit().unwrap();
    // Back one by one: a block is whole again only with all its objects.
    let b0 = block_objects(&pool, &three[..1]);
    for &o in &b0[..PB - 1] {
        pool.put(o).unwrap();
    }
    assert!(matches!(
        pool.get_contig_blocks(&mut one),
        Err(MempoolError::NotEnoughBlocks { available: 0, .. })
    ));
    // A single get takes from that partial bucket.
    let o = pool.get().unwrap();
    assert_eq!(bucket_of(o), bucket_of(three[0]));
    pool.put(o).unwrap();
    pool.put(b0[PB - 1]).unwrap();
    pool.get_contig_blocks(&mut one).unwrap();
    assert_eq!(one[0], three[0], "the block is whole again");
    // Block 1 whole again, 5 of block 2 back: single gets take from the
    // partial bucket, the whole block stays whole.
    let b1 = block_objects(&pool, &three[1..2]);
    let b2 = block_objects(&pool, &three[2..3]);
    pool.put_bulk(&b1).unwrap();
    pool.put_bulk(&b2[..5]).unwrap();
    let mut three_singles = [NULL; 3];
    pool.get_bulk(&mut three_singles).unwrap();
    for &o in &three_singles {
        assert_eq!(bucket_of(o), bucket_of(three[2]), "from the partial bucket");
    }
    let mut again = [NULL; 1];
    pool.get_contig_blocks(&mut again).unwrap();
    assert_eq!(again[0], three[1]);
    // Everything back: every bucket whole, all blocks again.
    pool.put_bulk(&three_singles).unwrap();
    pool.put_bulk(&b2[5..]).unwrap();
    pool.put_bulk(&block_objects(&pool, &again)).unwrap();
    pool.put_bulk(&block_objects(&pool, &one)).unwrap();
    pool.put_bulk(&ten).unwrap();
    assert!(pool.is_full());
    pool.audit().unwrap();
    pool.get_contig_blocks(&mut three).unwrap();
    check_blocks(&pool, &three, &HashSet::new());
    pool.put_bulk(&block_objects(&pool, &three)).unwrap();
    pool.free().unwrap();
}

#[test]
fn objects_in_a_cache_keep_their_block_broken_until_the_cache_is_flushed() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_cache");
    let mem = &inst.mem;
    register_thread(mem).unwrap();
    let n = 2 * PB as u32;
    let pool = Mempool::create(
        mem,
        "cached",
        &MempoolConfig::new(n, 64).cache_size(32).handler("bucket"),
    )
    .unwrap();
    let mut two = [NULL; 2];
    pool.get_contig_blocks(&mut two).unwrap();
    assert_eq!(pool.cache_count(), 0, "blocks bypass the cache");
    // One by one through this thread's cache: it flushes down to 32
    // whenever it goes above 48, and ends with 48 (337 = 48 + 17 x 17).
    for o in block_objects(&pool, &two[..1]) {
        pool.put(o).unwrap();
    }
    assert_eq!(pool.cache_count(), 48);
    assert_eq!(
        pool.avail_count(),
        PB as u32,
        "cached objects count as available"
    );
    let mut one = [NULL; 1];
    let e = pool.get_contig_blocks(&mut one).unwrap_err();
    assert!(
        matches!(e, MempoolError::NotEnoughBlocks { available: 0, .. }),
        "{e}"
    );
    pool.cache_flush().unwrap();
    pool.get_contig_blocks(&mut one).unwrap();
    assert_eq!(one[0], two[0]);
    // A bulk put above the flush threshold goes straight to the backend.
    pool.put_bulk(&block_objects(&pool, &two)).unwrap();
    assert_eq!(pool.cache_count(), 0);
    pool.get_contig_blocks(&mut two).unwrap();
    pool.put_bulk(&block_objects(&pool, &two)).unwrap();
    assert!(pool.is_full());
    pool.free().unwrap();
}

#[test]
fn contig_blocks_are_unsupported_on_handlers_without_blocks() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_unsup");
    let mem = &inst.mem;
    for h in [
        "ring_mp_mc",
        "ring_sp_sc",
        "ring_mt_rts",
        "ring_mt_hts",
        "stack",
        "lf_stack",
    ] {
        let pool =
            Mempool::create(mem, h, &MempoolConfig::new(500, 64).handler(h).stats(true)).unwrap();
        assert_eq!(pool.contig_block_size(), None, "{h}");
        for k in [0usize, 1, 3] {
            let mut first = vec![NULL; k];
            let e = pool.get_contig_blocks(&mut first).unwrap_err();
            match &e {
                MempoolError::ContigBlocksUnsupported { name, handler } => {
                    assert_eq!((name.as_str(), handler.as_str()), (h, h));
                }
                other => panic!("{h}: {other}"),
            }
            assert!(e.to_string().contains("bucket"), "{e}");
            assert!(first.iter().all(|p| p.is_null()));
        }
        assert!(pool.is_full());
        assert!(pool.stats().totals.is_zero(), "{h}: not counted");
        pool.free().unwrap();
    }
}

#[test]
fn block_counters_are_exact() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_stats");
    let mem = &inst.mem;
    let n = 2 * PB as u32 + 5;
    let pool = Mempool::create(
        mem,
        "cnt",
        &MempoolConfig::new(n, 64).handler("bucket").stats(true),
    )
    .unwrap();
    // This thread has no lcore id: the shared row.
    let mut two = [NULL; 2];
    pool.get_contig_blocks(&mut two).unwrap();
    let mut one = [NULL; 1];
    assert!(pool.get_contig_blocks(&mut one).is_err());
    let mut five = [NULL; 5];
    pool.get_bulk(&mut five).unwrap();
    let mut all = block_objects(&pool, &two);
    all.extend_from_slice(&five);
    pool.put_bulk(&all).unwrap();
    pool.get_contig_blocks(&mut two).unwrap();
    let want = StatsCounters {
        put_bulk: 1,
        put_objs: u64::from(n),
        put_common_pool_bulk: 1,
        put_common_pool_objs: u64::from(n),
        get_common_pool_bulk: 1,
        get_common_pool_objs: 5,
        get_success_bulk: 3,
        get_success_objs: 5,
        get_fail_bulk: 1,
        get_fail_objs: 0,
        get_success_blks: 4,
        get_fail_blks: 1,
    };
    let st = pool.stats();
    assert_eq!(st.totals, want, "{st}");
    assert_eq!(st.lcore(None), want);
    assert_eq!(st.lcores.len(), 1);
    let text = st.to_string();
    assert!(
        text.contains("    get_success_blks=4\n") && text.contains("    get_fail_blks=1\n"),
        "{text}"
    );
    let j = pool.dump_json();
    assert_eq!(j["stats"]["totals"]["get_success_blks"], 4, "{j}");
    assert_eq!(j["stats"]["totals"]["get_fail_blks"], 1, "{j}");
    let mut d = Vec::new();
    pool.dump(&mut d).unwrap();
    assert!(String::from_utf8(d).unwrap().contains("get_success_blks=4"));
    // A thread with an lcore id counts in its row.
    let id = std::thread::scope(|s| {
        s.spawn(|| {
            let id = register_thread(mem).unwrap();
            let mut b = [NULL; 1];
            assert!(pool.get_contig_blocks(&mut b).is_err(), "none whole");
            id
        })
        .join()
        .unwrap()
    });
    let mine = pool.stats().lcore(Some(id));
    assert_eq!(
        (
            mine.get_fail_bulk,
            mine.get_fail_blks,
            mine.get_success_blks
        ),
        (1, 1, 0)
    );
    pool.put_bulk(&block_objects(&pool, &two)).unwrap();
    pool.reset_stats();
    assert!(pool.stats().totals.is_zero());
    pool.free().unwrap();
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_bad");
    let mem = &inst.mem;
    let before: Vec<String> = mem.memzones().into_iter().map(|z| z.name).collect();
    // An element too big for a 64 KiB bucket.
    let e = Mempool::create(
        mem,
        "huge",
        &MempoolConfig::new(10, 65_536).handler("bucket"),
    )
    .unwrap_err();
    match &e {
        MempoolError::BucketTooSmall {
            bucket_size: 65_536,
            total_size,
            max_total,
            ..
        } => assert!(total_size > max_total),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("65536"), "{e}");
    assert!(matches!(
        required_memory_handler(10, 65_536, MempoolFlags::NONE, 0, "bucket"),
        Err(MempoolError::BucketTooSmall { .. })
    ));
    let after: Vec<String> = mem.memzones().into_iter().map(|z| z.name).collect();
    assert_eq!(before, after, "nothing reserved");
    // Buckets too small for one object: a 4 KiB bucket handler.
    register_handler("bucket_4k", Arc::new(BucketHandler::new(4096).unwrap())).unwrap();
    let e = Mempool::create(
        mem,
        "b4k",
        &MempoolConfig::new(10, 4000).handler("bucket_4k"),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            MempoolError::BucketTooSmall {
                bucket_size: 4096,
                ..
            }
        ),
        "{e}"
    );
    let after: Vec<String> = mem.memzones().into_iter().map(|z| z.name).collect();
    assert_eq!(before, after, "nothing reserved");
    // ... which does hold three 1088-byte objects.
    let p4 = Mempool::create(
        mem,
        "b4k",
        &MempoolConfig::new(10, 1000).handler("bucket_4k"),
    )
    .unwrap();
    assert_eq!(p4.contig_block_size(), Some(3));
    assert_eq!(p4.chunks()[0].va % 4096, 0);
    let mut blocks = [NULL; 3];
    p4.get_contig_blocks(&mut blocks).unwrap();
    check_blocks(&p4, &blocks, &HashSet::new());
    p4.put_bulk(&block_objects(&p4, &blocks)).unwrap();
    p4.free().unwrap();
    // Bucket sizes that are not a power of two from 1 KiB to 1 MiB.
    for size in [0, 512, 1000, 3 << 10, 2 << 20] {
        let e = BucketHandler::new(size).unwrap_err();
        assert!(matches!(e, MempoolError::BadHandler { .. }), "{size}: {e}");
        assert!(e.to_string().contains("power of two"), "{e}");
    }
    assert_eq!(BucketHandler::new(1 << 20).unwrap().bucket_size(), 1 << 20);
    // Pointers inside a bucket that are not objects: refused, nothing
    // returned.
    let pool =
        Mempool::create(mem, "ptrs", &MempoolConfig::new(100, 64).handler("bucket")).unwrap();
    let o = pool.get().unwrap();
    let o2 = pool.get().unwrap();
    let total = pool.obj_size().total_size as usize;
    for bad in [
        o.wrapping_add(8),
        o.wrapping_add(total / 2),
        (bucket_of(o) + 64) as *mut u8,
    ] {
        for objs in [vec![bad], vec![o2, bad]] {
            let e = pool.put_bulk(&objs).unwrap_err();
            assert!(matches!(e, MempoolError::ForeignObject { .. }), "{e}");
            assert_eq!(pool.avail_count(), 98, "nothing returned");
        }
    }
    pool.put_bulk(&[o, o2]).unwrap();
    // A second put of an object: its (short) bucket has all its objects.
    let e = pool.put(o).unwrap_err();
    assert!(matches!(e, MempoolError::DoublePut { .. }), "{e}");
    assert_eq!(pool.avail_count(), 100);
    pool.audit().unwrap();
    pool.free().unwrap();
}

#[test]
fn populate_virt_and_anon_align_chunks_to_buckets() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_pop");
    let mem = &inst.mem;
    let n = 1000u32;
    let need = required_memory_handler(n, 64, MempoolFlags::NONE, channels_x_ranks(mem), "bucket")
        .unwrap();
    // A region that starts 100 bytes past a bucket boundary: the chunk
    // starts at the next one.
    let zone = mem
        .memzone_reserve_aligned("bk_mem", need + B + 100, -1, MemzoneFlags::NONE, B)
        .unwrap();
    let mut pool =
        Mempool::create_empty(mem, "virt", &MempoolConfig::new(n, 64).handler("bucket")).unwrap();
    // Too small once aligned: nothing placed.
    // SAFETY: the zone outlives the pool (freed after it).
    let e = unsafe { pool.populate_virt(zone.as_mut_ptr().add(100), B - 100) }.unwrap_err();
    assert!(matches!(e, MempoolError::RegionTooSmall { .. }), "{e}");
    assert_eq!(pool.populated(), 0);
    // SAFETY: as above.
    let placed = unsafe { pool.populate_virt(zone.as_mut_ptr().add(100), need + B) }.unwrap();
    assert_eq!(placed, n);
    let c = pool.chunks()[0];
    assert_eq!(c.va, zone.as_ptr() as usize + B);
    assert_eq!(c.len, need);
    let mut two = [NULL; 2];
    pool.get_contig_blocks(&mut two).unwrap();
    check_blocks(&pool, &two, &HashSet::new());
    let mut rest = vec![NULL; n as usize - 2 * PB];
    pool.get_bulk(&mut rest).unwrap();
    assert!(pool.get().is_err());
    pool.put_bulk(&rest).unwrap();
    pool.put_bulk(&block_objects(&pool, &two)).unwrap();
    assert!(pool.is_full());
    pool.audit().unwrap();
    pool.free().unwrap();
    zone.free().unwrap();

    let mut anon =
        Mempool::create_empty(mem, "anon", &MempoolConfig::new(n, 64).handler("bucket")).unwrap();
    assert_eq!(anon.populate_anon().unwrap(), n);
    let c = anon.chunks()[0];
    assert_eq!(c.va % B, 0);
    let mut all = vec![NULL; n as usize];
    anon.get_bulk(&mut all).unwrap();
    for &o in &all {
        // SAFETY: our object, writable.
        unsafe { o.cast::<u64>().write(1) };
    }
    anon.put_bulk(&all).unwrap();
    anon.get_contig_blocks(&mut two).unwrap();
    anon.put_bulk(&block_objects(&anon, &two)).unwrap();
    anon.free().unwrap();
}

#[test]
fn leak_tracking_records_every_object_of_a_block() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_leak");
    let mem = &inst.mem;
    let pool = Mempool::create(
        mem,
        "lk",
        &MempoolConfig::new(2 * PB as u32, 64)
            .handler("bucket")
            .leak_tracking(true),
    )
    .unwrap();
    let mut one = [NULL; 1];
    pool.get_contig_blocks(&mut one).unwrap();
    let out = pool.outstanding().unwrap();
    assert_eq!(out.len(), PB);
    let objs = block_objects(&pool, &one);
    let mut addrs: Vec<usize> = out.iter().map(|o| o.addr).collect();
    addrs.sort_unstable();
    assert_eq!(addrs, objs.iter().map(|&p| p as usize).collect::<Vec<_>>());
    pool.put_bulk(&objs[..10]).unwrap();
    assert_eq!(pool.outstanding().unwrap().len(), PB - 10);
    pool.put_bulk(&objs[10..]).unwrap();
    assert!(pool.outstanding().unwrap().is_empty());
    pool.free().unwrap();
}

/// Stamps each object's first word with `tag` (it must be 0: not held by
/// anyone else), then clears it (it must still be `tag`).
fn stamp_and_clear(objs: &[*mut u8], tag: u64) {
    for &o in objs {
        // SAFETY: an object of a pool of 64-byte elements, 64-aligned.
        let w = unsafe { &*o.cast::<AtomicU64>() };
        assert_eq!(w.swap(tag, Ordering::AcqRel), 0, "handed out twice");
    }
    std::thread::yield_now();
    for &o in objs {
        // SAFETY: as above.
        let w = unsafe { &*o.cast::<AtomicU64>() };
        assert_eq!(w.swap(0, Ordering::AcqRel), tag, "changed while held");
    }
}

#[test]
fn every_object_comes_and_goes_from_several_threads_with_blocks_in_the_mix() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_threads");
    let mem = &inst.mem;
    let rounds = if cfg!(debug_assertions) { 3000 } else { 30_000 };
    let buckets = 16;
    let n = (buckets * PB) as u32;
    for cache in [0, 32] {
        let name = format!("thr{cache}");
        let pool = Mempool::create_with(
            mem,
            &name,
            &MempoolConfig::new(n, 64)
                .cache_size(cache)
                .handler("bucket"),
            // SAFETY: a fresh 64-byte element, 64-aligned.
            |_, o| unsafe { o.cast::<u64>().write(0) },
        )
        .unwrap();
        let (served, blocks) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pool, served, blocks) = (&pool, &served, &blocks);
                s.spawn(move || {
                    if t != 3 {
                        register_thread(mem).unwrap(); // one thread stays cacheless
                    }
                    let mut r = t.wrapping_mul(0x9e37_79b9) | 1;
                    let mut objs = vec![NULL; 64];
                    let mut first = [NULL; 2];
                    for i in 0..rounds {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        let tag = (t + 1) << 32 | i;
                        // Threads 1 and 3 also take blocks, now and then.
                        if (t == 1 || t == 3) && r % 4 == 0 {
                            let k = (r / 4 % 2) as usize + 1;
                            if pool.get_contig_blocks(&mut first[..k]).is_ok() {
                                let objs = block_objects(pool, &first[..k]);
                                stamp_and_clear(&objs, tag);
                                pool.put_bulk(&objs).unwrap();
                                blocks.fetch_add(k as u64, Ordering::Relaxed);
                            }
                            continue;
                        }
                        let k = (r % 64) as usize + 1;
                        if pool.get_bulk(&mut objs[..k]).is_err() {
                            continue;
                        }
                        stamp_and_clear(&objs[..k], tag);
                        pool.put_bulk(&objs[..k]).unwrap();
                        served.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    pool.cache_flush().unwrap();
                });
            }
        });
        assert!(served.load(Ordering::Relaxed) > 0, "{name}");
        assert!(blocks.load(Ordering::Relaxed) > 0, "{name}: blocks served");
        assert_eq!(pool.avail_count(), n, "{name}");
        assert_eq!(pool.info().common_pool_count, n, "{name}: caches flushed");
        assert_eq!(pool.audit().unwrap().in_backend, n, "{name}");
        // Every object is back, so every bucket is whole: all blocks.
        let mut first = vec![NULL; buckets];
        pool.get_contig_blocks(&mut first).unwrap();
        let objs = block_objects(&pool, &first);
        assert_eq!(
            check_blocks(&pool, &first, &HashSet::new()).len(),
            n as usize
        );
        for &o in &objs {
            // SAFETY: as in stamp_and_clear.
            assert_eq!(unsafe { o.cast::<u64>().read() }, 0, "{name}: stamp left");
        }
        pool.put_bulk(&objs).unwrap();
        pool.free().unwrap();
    }
}

const ROLE: &str = "MPL_BK_CHILD";
const PREFIX: &str = "MPL_BK_PREFIX";
const RUNDIR: &str = "MPL_BK_RUNDIR";
const MP_BUCKETS: usize = 8;

/// `rounds` of: a block or a bulk of single objects, each object stamped
/// with the owner tag while held (it must be free: 0), put back.
/// Returns (objects served singly, blocks served).
fn churn(pool: &Mempool<'_>, tag: u64, rounds: u64) -> (u64, u64) {
    let mut objs = [NULL; 32];
    let (mut served, mut blocks) = (0, 0);
    let mut r = tag | 1;
    for i in 0..rounds {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        let stamp = tag << 32 | i;
        if r % 3 == 0 {
            let mut first = [NULL; 1];
            if pool.get_contig_blocks(&mut first).is_ok() {
                check_blocks(pool, &first, &HashSet::new());
                let objs = block_objects(pool, &first);
                stamp_and_clear(&objs, stamp);
                pool.put_bulk(&objs).unwrap();
                blocks += 1;
            }
            continue;
        }
        let k = (r % 32) as usize + 1;
        if pool.get_bulk(&mut objs[..k]).is_err() {
            continue;
        }
        stamp_and_clear(&objs[..k], stamp);
        pool.put_bulk(&objs[..k]).unwrap();
        served += k as u64;
    }
    pool.cache_flush().unwrap();
    (served, blocks)
}

fn child() {
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    register_thread(&mem).unwrap();
    let pool = Mempool::lookup(&mem, "bk_mp").unwrap();
    assert_eq!(pool.handler(), "bucket");
    assert_eq!(pool.contig_block_size(), Some(PB as u32));
    // More blocks than the pool has: refused.
    let mut too_many = vec![NULL; MP_BUCKETS + 1];
    assert!(matches!(
        pool.get_contig_blocks(&mut too_many),
        Err(MempoolError::NotEnoughBlocks { requested: 9, .. })
    ));
    let (served, blocks) = churn(&pool, u64::from(std::process::id()), 4000);
    println!("@served {served} blocks {blocks}");
    std::io::stdout().flush().unwrap();
}

#[test]
fn a_secondary_gets_and_puts_objects_and_blocks_of_a_primarys_bucket_pool() {
    if std::env::var(ROLE).is_ok() {
        child();
        return;
    }
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("bk_mp");
    let mem = &inst.mem;
    register_thread(mem).unwrap();
    let n = (MP_BUCKETS * PB) as u32;
    let pool = Mempool::create_with(
        mem,
        "bk_mp",
        &MempoolConfig::new(n, 64)
            .cache_size(16)
            .handler("bucket")
            .stats(true),
        // SAFETY: a fresh 64-byte element.
        |_, o| unsafe { o.cast::<u64>().write(0) },
    )
    .unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_secondary_gets_and_puts_objects_and_blocks_of_a_primarys_bucket_pool",
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
    // Meanwhile the primary churns the same pool.
    let (mine, my_blocks) = churn(&pool, 1, 4000);
    let mut child = child;
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once('@').map(|(_, m)| m.to_string()))
        .collect();
    assert!(child.wait().unwrap().success(), "secondary failed");
    let l = lines
        .iter()
        .find_map(|l| l.strip_prefix("served "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    let (served, blocks) = l.split_once(" blocks ").unwrap();
    let (served, blocks): (u64, u64) = (served.parse().unwrap(), blocks.parse().unwrap());
    assert!(
        served > 1000 && blocks > 10,
        "the secondary got objects and blocks: {l}"
    );
    assert!(mine > 0 && my_blocks > 0);
    // Its gets and blocks counted in the same table.
    let st = pool.stats();
    assert_eq!(st.totals.get_success_blks, blocks + my_blocks, "{st}");
    assert!(st.lcores.len() >= 2, "{st}");
    // Everything back: every bucket whole, every object once, no stamp.
    assert!(pool.is_full());
    assert_eq!(pool.audit().unwrap().in_backend, n);
    let mut first = vec![NULL; MP_BUCKETS];
    pool.get_contig_blocks(&mut first).unwrap();
    let objs = block_objects(&pool, &first);
    assert_eq!(
        check_blocks(&pool, &first, &HashSet::new()).len(),
        n as usize
    );
    for &o in &objs {
        // SAFETY: our object; nobody else uses the pool now.
        assert_eq!(unsafe { o.cast::<u64>().read() }, 0);
    }
    pool.put_bulk(&objs).unwrap();
    pool.free().unwrap();
}

/// Small buckets (1 KiB: four objects each) make buckets change lists
/// all the time; eight threads (six with lcore ids) on a small pool get
/// and put singly and in bulks, and take blocks: no object is ever held
/// twice, and at the end every bucket is whole again.
#[test]
fn small_buckets_under_contention_stay_consistent() {
    if !have_hugepages(8) {
        return;
    }
    let inst = instance("bk_small");
    let mem = &inst.mem;
    register_handler("bucket_1k", Arc::new(BucketHandler::new(1024).unwrap())).unwrap();
    let rounds = if cfg!(debug_assertions) { 4000 } else { 40_000 };
    let n = 4 * 64;
    let pool = Mempool::create_with(
        mem,
        "small",
        &MempoolConfig::new(n, 64).handler("bucket_1k"),
        // SAFETY: a fresh 64-byte element, 64-aligned.
        |_, o| unsafe { o.cast::<u64>().write(0) },
    )
    .unwrap();
    assert_eq!(pool.contig_block_size(), Some(4));
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let pool = &pool;
            s.spawn(move || {
                if t < 6 {
                    register_thread(mem).unwrap();
                }
                let mut r = t.wrapping_mul(0x9e37_79b9) | 1;
                let mut objs = [NULL; 12];
                for i in 0..rounds {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    let tag = (t + 1) << 32 | i;
                    if r % 5 == 0 {
                        let mut first = [NULL; 2];
                        if pool.get_contig_blocks(&mut first).is_ok() {
                            let objs = block_objects(pool, &first);
                            stamp_and_clear(&objs, tag);
                            // Back in two halves, from the end.
                            pool.put_bulk(&objs[4..]).unwrap();
                            pool.put_bulk(&objs[..4]).unwrap();
                        }
                        continue;
                    }
                    let k = (r % 12) as usize + 1;
                    if pool.get_bulk(&mut objs[..k]).is_err() {
                        continue;
                    }
                    stamp_and_clear(&objs[..k], tag);
                    for part in objs[..k].chunks(3) {
                        pool.put_bulk(part).unwrap();
                    }
                }
            });
        }
    });
    assert!(pool.is_full());
    assert_eq!(pool.audit().unwrap().in_backend, n);
    let mut first = vec![NULL; 64];
    pool.get_contig_blocks(&mut first).unwrap();
    assert_eq!(
        check_blocks(&pool, &first, &HashSet::new()).len(),
        n as usize
    );
    pool.put_bulk(&block_objects(&pool, &first)).unwrap();
    let mut all = vec![NULL; n as usize];
    pool.get_bulk(&mut all).unwrap();
    pool.put_bulk(&all).unwrap();
    pool.free().unwrap();
}
