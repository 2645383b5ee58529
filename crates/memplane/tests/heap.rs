//! The malloc heap on real hugepages: allocation with every constraint,
//! growth and shrink seen through HugePages_Free and memory events, bad
//! input, corruption detection, external heaps, threads.

#![allow(clippy::many_single_char_names)]

mod common;

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use memplane::heap::{AllocRequest, HeapError, PageSizes, SOCKET_ID_ANY};
use memplane::memseg::{MemEvent, MemEventKind, MemsegError, PageRequest};
use memplane::{Error, MemOptions, Memory, PageSize};

use common::heapkit::{all, fill, heap_err};
use common::{need_hugepages, pool_lock, real_counter};

const MB: usize = 1 << 20;

fn free_2m() -> u64 {
    real_counter(2048, "free_hugepages")
}

fn opts_with(name: &str, extra: &[&str]) -> (MemOptions, tempfile::TempDir) {
    common::heapkit::test_opts("hp", name, extra)
}

#[test]
fn malloc_free_grows_and_gives_every_page_back() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts_with("grow", &[]);
    let mem = Memory::init(&o).unwrap();
    let events = Arc::new(Mutex::new(Vec::<MemEvent>::new()));
    let ev = Arc::clone(&events);
    mem.register_event_callback("rec", move |e| ev.lock().unwrap().push(*e))
        .unwrap();
    assert_eq!(free_2m(), before);

    let a = mem.malloc(100, 0).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    assert_eq!(free_2m(), before - 1, "one page for a small block");
    fill(a, 100, 0xaa);
    let st = mem.heap_stats(0).unwrap();
    assert_eq!(st.alloc_count, 1);
    assert_eq!(st.total_bytes, 2 * MB as u64);
    assert_eq!(st.grow_count, 1);

    // 5 MiB needs 3 more pages (plus the header).
    let b = mem.malloc(5 * MB, 0).unwrap();
    fill(b, 5 * MB, 0xbb);
    assert!(free_2m() <= before - 3);
    mem.heap_validate().unwrap();

    // SAFETY: not used afterwards.
    unsafe { mem.free(b).unwrap() };
    mem.heap_validate().unwrap();
    assert!(all(a, 100, 0xaa), "freeing a neighbour keeps data");
    // SAFETY: as above.
    unsafe { mem.free(a).unwrap() };
    mem.heap_validate().unwrap();
    // The small block waits in this thread's cache: free for the stats,
    // and it keeps its page until the cache is flushed.
    let st = mem.heap_stats(0).unwrap();
    assert_eq!((st.alloc_count, st.cached_count), (0, 1));
    assert_eq!(st.total_bytes, 2 * MB as u64);
    mem.heap_cache_flush();
    let st = mem.heap_stats(0).unwrap();
    assert_eq!((st.total_bytes, st.alloc_count, st.free_count), (0, 0, 0));
    assert_eq!(mem.total_mapped(), 0);
    assert_eq!(
        free_2m(),
        before,
        "every page is back once all blocks are free"
    );
    assert!(st.shrink_count >= 1);

    let evs = events.lock().unwrap();
    let mapped: usize = evs
        .iter()
        .filter(|e| e.kind == MemEventKind::Alloc)
        .map(|e| e.len)
        .sum();
    let unmapped: usize = evs
        .iter()
        .filter(|e| e.kind == MemEventKind::Free)
        .map(|e| e.len)
        .sum();
    assert!(mapped >= 8 * MB);
    assert_eq!(
        mapped, unmapped,
        "events saw every page mapped and unmapped"
    );
    drop(evs);
    drop(mem);
    assert_eq!(free_2m(), before);
}

#[test]
fn socket_mem_stays_and_zmalloc_returns_zero_memory() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("sockmem", &["--socket-mem", "8", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let st = mem.heap_stats(0).unwrap();
    assert_eq!(st.total_bytes, 8 * MB as u64);
    assert_eq!(st.grow_count, 0);
    let mut blocks = Vec::new();
    for i in 0..64 {
        let p = mem.malloc(4096 + i * 64, 0).unwrap();
        fill(p, 4096 + i * 64, 0xff);
        blocks.push(p);
    }
    for p in blocks.drain(..) {
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    let st = mem.heap_stats(0).unwrap();
    assert_eq!(st.total_bytes, 8 * MB as u64, "--socket-mem memory is kept");
    assert_eq!(st.free_count, 1, "everything merged back into one element");
    // Dirty memory comes back zeroed from zmalloc, fresh memory too.
    for size in [64, 1000, 4096, 100_000] {
        let p = mem.zmalloc(size, 0).unwrap();
        assert!(all(p, size, 0), "zmalloc({size}) not zero");
        fill(p, size, 0x11);
        blocks.push(p);
    }
    let c = mem.calloc(100, 24, 128).unwrap();
    assert_eq!(c.as_ptr() as usize % 128, 0);
    assert!(all(c, 2400, 0));
    blocks.push(c);
    mem.heap_validate_deep().unwrap();
    for p in blocks {
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    mem.heap_validate_deep().unwrap();
}

#[test]
fn alignment_bound_and_contiguity_hold() {
    if !need_hugepages(2048, 40) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("align", &[]);
    let mem = Memory::init(&o).unwrap();
    let mut blocks = Vec::new();
    for (size, align) in [
        (1, 4096),
        (5000, 4096),
        (64, 1 << 20),
        (3 * MB, 2 * MB),
        (100, 256),
    ] {
        let p = mem.malloc(size, align).unwrap();
        assert_eq!(p.as_ptr() as usize % align, 0, "size {size} align {align}");
        fill(p, size, 0x5a);
        blocks.push(p);
    }
    for (size, bound) in [(3000, 4096), (60_000, 65_536), (MB, 2 * MB)] {
        for _ in 0..5 {
            let req = AllocRequest::new(size).bound(bound).align(64);
            let p = mem.heap_alloc(&req).unwrap();
            let a = p.as_ptr() as usize;
            assert_eq!(a / bound, (a + size - 1) / bound, "{size} crosses {bound}");
            blocks.push(p);
        }
    }
    // Fits one 2M page: contiguous whatever the pages.
    let p = mem
        .heap_alloc(&AllocRequest::new(MB + MB / 2).contig())
        .unwrap();
    assert!(mem
        .is_iova_contiguous(p.as_ptr() as usize, MB + MB / 2)
        .unwrap());
    blocks.push(p);
    if real_counter(1_048_576, "free_hugepages") >= 1 {
        // Larger than a 2M page: the heap grows with a 1G page.
        let p = mem.heap_alloc(&AllocRequest::new(3 * MB).contig()).unwrap();
        assert!(mem.is_iova_contiguous(p.as_ptr() as usize, 3 * MB).unwrap());
        assert_eq!(
            mem.virt2memseg_list(p.as_ptr() as usize).unwrap().page_size,
            PageSize::SIZE_1G
        );
        blocks.push(p);
    }
    let p = mem
        .heap_alloc(&AllocRequest::new(4096).page_sizes(PageSizes::only(PageSize::SIZE_2M), false))
        .unwrap();
    assert_eq!(
        mem.virt2memseg_list(p.as_ptr() as usize).unwrap().page_size,
        PageSize::SIZE_2M
    );
    assert!(mem.malloc_virt2iova(p).is_some());
    blocks.push(p);
    mem.heap_validate().unwrap();
    for p in blocks {
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    mem.heap_cache_flush();
    mem.heap_validate().unwrap();
    assert_eq!(mem.heap_stats(0).unwrap().total_bytes, 0);
}

#[test]
#[allow(clippy::many_single_char_names)]
fn realloc_in_place_and_moving_keeps_contents() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("realloc", &[]);
    let mem = Memory::init(&o).unwrap();
    // Keeps the first page in the heap, so the freed block below stays
    // mapped heap memory.
    let keeper = mem.malloc(64, 0).unwrap();
    // Sizes above the thread caches' classes, so blocks are carved in
    // address order.
    let p = mem.malloc(1100, 0).unwrap();
    fill(p, 1100, 7);
    // SAFETY: `p` is not used after each call; the result replaces it.
    let q = unsafe { mem.realloc(Some(p), 3000, 0).unwrap() };
    assert_eq!(p, q, "the next element is free: grows in place");
    assert!(all(q, 1100, 7));
    let blocker = mem.malloc(1100, 0).unwrap();
    // SAFETY: as above.
    let r = unsafe { mem.realloc(Some(q), 10_000, 0).unwrap() };
    assert_ne!(r, q, "the blocker sits right after: the block moves");
    assert!(all(r, 1100, 7));
    // SAFETY: as above.
    let s = unsafe { mem.realloc(Some(r), 200, 0).unwrap() };
    assert_eq!(s, r, "shrinking stays in place");
    assert!(all(s, 200, 7));
    assert!(mem.malloc_usable_size(s).unwrap() >= 200);
    mem.heap_validate().unwrap();
    // SAFETY: not used afterwards.
    unsafe {
        mem.free(s).unwrap();
        mem.free(blocker).unwrap();
    }
    // realloc of a freed block is an error, and nothing changes.
    // SAFETY: the call must detect the freed block.
    let e = heap_err(unsafe { mem.realloc(Some(s), 10, 0) }.unwrap_err());
    assert!(matches!(e, HeapError::DoubleFree { .. }), "{e}");
    mem.heap_validate().unwrap();
    // SAFETY: not used afterwards.
    unsafe { mem.free(keeper).unwrap() };
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("bad", &["--socket-mem", "2", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let keep = mem.malloc(128, 0).unwrap();
    let before = mem.heap_stats(0).unwrap();
    let cases: Vec<(Error, &str)> = vec![
        (mem.malloc(0, 0).unwrap_err(), "0 bytes"),
        (mem.malloc(64, 3).unwrap_err(), "power of two"),
        (mem.malloc(usize::MAX - 10, 0).unwrap_err(), "larger than"),
        (mem.calloc(usize::MAX / 2, 3, 0).unwrap_err(), "larger than"),
        (
            mem.heap_alloc(&AllocRequest::new(4096).bound(1024))
                .unwrap_err(),
            "smaller than the size",
        ),
        (
            mem.heap_alloc(&AllocRequest::new(100).bound(1000))
                .unwrap_err(),
            "not a power of two",
        ),
        (
            mem.malloc_socket(64, 0, 7).unwrap_err(),
            "no heap has socket id 7",
        ),
        (mem.heap_stats(9).unwrap_err(), "no heap has socket id 9"),
    ];
    for (e, want) in &cases {
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
    }
    // Pointers that are not blocks.
    let stack = 0u64;
    let foreign = NonNull::from(&stack).cast::<u8>();
    // SAFETY: all these must be refused without touching memory.
    unsafe {
        let e = heap_err(mem.free(foreign).unwrap_err());
        assert!(matches!(e, HeapError::NotFromHeap { .. }), "{e}");
        let inside = NonNull::new(keep.as_ptr().add(64)).unwrap();
        let e = heap_err(mem.free(inside).unwrap_err());
        assert!(
            matches!(e, HeapError::InsideBlock { .. } | HeapError::Corrupt { .. }),
            "{e}"
        );
        let odd = NonNull::new(keep.as_ptr().add(8)).unwrap();
        let e = heap_err(mem.free(odd).unwrap_err());
        assert!(matches!(e, HeapError::NotFromHeap { .. }), "{e}");
    }
    assert_eq!(
        mem.heap_stats(0).unwrap(),
        before,
        "bad input changed nothing"
    );
    mem.heap_validate().unwrap();

    // Double free.
    // SAFETY: the second free must be detected.
    unsafe {
        mem.free(keep).unwrap();
        let e = heap_err(mem.free(keep).unwrap_err());
        assert!(matches!(e, HeapError::DoubleFree { .. }), "{e}");
    }
    mem.heap_validate().unwrap();
}

#[test]
fn an_overrun_is_caught_as_corruption() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("corrupt", &["--socket-mem", "2", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    // Larger than the thread caches' classes: carved one after the other.
    let a = mem.malloc(1088, 0).unwrap();
    let b = mem.malloc(1088, 0).unwrap();
    assert_eq!(
        b.as_ptr() as usize,
        a.as_ptr() as usize + 1152,
        "b right after a"
    );
    // Overrun a into b's header.
    // SAFETY: reads b's header (heap memory, mapped).
    let saved = unsafe { std::ptr::read(a.as_ptr().add(1088).cast::<[u8; 16]>()) };
    // SAFETY: deliberately writes past `a` into b's header (heap memory).
    unsafe { std::ptr::write_bytes(a.as_ptr().add(1088), 0x41, 16) };
    let e = heap_err(mem.heap_validate().unwrap_err());
    match &e {
        HeapError::Corrupt { addr, what, .. } => {
            assert_eq!(*addr, b.as_ptr() as usize - 64, "{e}");
            assert!(what.contains("cookie"), "{e}");
        }
        other => panic!("{other}"),
    }
    // SAFETY: must be refused: b's header is bad.
    let e = heap_err(unsafe { mem.free(b) }.unwrap_err());
    assert!(matches!(e, HeapError::Corrupt { .. }), "{e}");
    // Repair and everything is fine again.
    // SAFETY: restores the header bytes saved above.
    unsafe { std::ptr::write(a.as_ptr().add(1088).cast::<[u8; 16]>(), saved) };
    mem.heap_validate().unwrap();
    // SAFETY: live blocks.
    unsafe {
        mem.free(a).unwrap();
        mem.free(b).unwrap();
    }
}

#[test]
fn fixed_memory_does_not_grow_and_says_why() {
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("nohuge", &["--no-huge", "-m", "4"]);
    let mem = Memory::init(&o).unwrap();
    let st = mem.heap_stats(0).unwrap();
    assert_eq!(st.total_bytes, 4 * MB as u64);
    let e = mem.malloc(8 * MB, 0).unwrap_err();
    assert!(e.to_string().contains("--no-huge"), "{e}");
    // --no-huge: any socket number means any.
    let p = mem.malloc_socket(MB, 0, 3).unwrap();
    // SAFETY: not used afterwards.
    unsafe { mem.free(p).unwrap() };
    assert_eq!(mem.heap_stats(0).unwrap().total_bytes, 4 * MB as u64);
    mem.heap_validate().unwrap();
}

#[test]
fn heap_pages_cannot_be_freed_under_the_heap() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("owned", &[]);
    let mem = Memory::init(&o).unwrap();
    let p = mem.malloc(100, 0).unwrap();
    let page = p.as_ptr() as usize / (2 * MB) * (2 * MB);
    let e = mem.free_pages(page, 2 * MB).unwrap_err();
    assert!(
        matches!(e, Error::Memseg(MemsegError::HeapOwned { .. })),
        "{e}"
    );
    // And a block pointer inside user pages is not the heap's.
    let run = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap()[0];
    let fake = NonNull::new((run.va + 4096) as *mut u8).unwrap();
    // SAFETY: must be refused.
    let e = heap_err(unsafe { mem.free(fake) }.unwrap_err());
    assert!(matches!(e, HeapError::NotFromHeap { .. }), "{e}");
    mem.free_run(&run).unwrap();
    // SAFETY: not used afterwards.
    unsafe { mem.free(p).unwrap() };
}

#[test]
fn threads_allocate_and_free_concurrently() {
    if !need_hugepages(2048, 64) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("threads", &[]);
    let mem = Arc::new(Memory::init(&o).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let mem = Arc::clone(&mem);
            std::thread::spawn(move || {
                let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
                let mut x = u64::from(t) * 7919 + 1;
                for _ in 0..20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if live.len() < 200 && x % 3 != 0 {
                        let size = 1 + (x % 20_000) as usize;
                        let p = mem.malloc(size, 0).unwrap();
                        fill(p, size, t);
                        live.push((p, size));
                    } else if let Some((p, size)) = live.pop() {
                        assert!(all(p, size, t), "another thread wrote into our block");
                        // SAFETY: ours, not used afterwards.
                        unsafe { mem.free(p).unwrap() };
                    }
                }
                for (p, size) in live {
                    assert!(all(p, size, t));
                    // SAFETY: as above.
                    unsafe { mem.free(p).unwrap() };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    mem.heap_validate().unwrap();
    let st = mem.heap_stats(SOCKET_ID_ANY.max(0)).unwrap();
    assert_eq!(
        st.alloc_count, 0,
        "blocks in exited threads' caches count as free"
    );
    // The exited threads' caches are flushed by the next trim.
    assert!(mem.heap_trim() > 0);
    let st = mem.heap_stats(0).unwrap();
    assert_eq!((st.alloc_count, st.cached_count), (0, 0));
    assert_eq!(st.total_bytes, 0, "every page given back");
    mem.heap_validate().unwrap();
}

#[test]
fn page_size_flags_hint_and_biggest_block() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("flags", &["--socket-mem", "8", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let st = mem.heap_stats(0).unwrap();
    // The biggest block is what the stats call the greatest free size.
    let (big, len) = mem.malloc_biggest(0, 0, PageSizes::ANY).unwrap();
    assert_eq!(len as u64, st.greatest_free);
    assert_eq!(len, 8 * MB - 64);
    fill(big, len, 1);
    assert_eq!(mem.heap_stats(0).unwrap().free_count, 0);
    // SAFETY: not used afterwards.
    unsafe { mem.free(big).unwrap() };

    // No 1G list here (--pagesz-mem 1G:0): strict fails, a hint falls back.
    let one_g = PageSizes::only(PageSize::SIZE_1G);
    let e = heap_err(
        mem.heap_alloc(&AllocRequest::new(4096).page_sizes(one_g, false))
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::OutOfMemory { .. }), "{e}");
    let p = mem
        .heap_alloc(&AllocRequest::new(4096).page_sizes(one_g, true))
        .unwrap();
    assert_eq!(
        mem.virt2memseg_list(p.as_ptr() as usize).unwrap().page_size,
        PageSize::SIZE_2M
    );
    // SAFETY: not used afterwards.
    unsafe { mem.free(p).unwrap() };
    mem.heap_validate().unwrap();
}

#[test]
fn one_gig_pages_on_request() {
    if !need_hugepages(2048, 2) || !need_hugepages(1_048_576, 1) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("onegig", &[]);
    let mem = Memory::init(&o).unwrap();
    let before_1g = real_counter(1_048_576, "free_hugepages");
    let p = mem
        .heap_alloc(&AllocRequest::new(64).page_sizes(PageSizes::only(PageSize::SIZE_1G), false))
        .unwrap();
    assert_eq!(
        mem.virt2memseg_list(p.as_ptr() as usize).unwrap().page_size,
        PageSize::SIZE_1G
    );
    assert_eq!(real_counter(1_048_576, "free_hugepages"), before_1g - 1);
    // Free memory of any page size serves requests without flags.
    let q = mem.malloc(64, 0).unwrap();
    assert_eq!(
        mem.virt2memseg_list(q.as_ptr() as usize).unwrap().page_size,
        PageSize::SIZE_1G
    );
    // SAFETY: not used afterwards.
    unsafe {
        mem.free(p).unwrap();
        mem.free(q).unwrap();
    }
    mem.heap_cache_flush();
    assert_eq!(
        real_counter(1_048_576, "free_hugepages"),
        before_1g,
        "the 1G page went back"
    );
    mem.heap_validate().unwrap();
}

#[test]
fn socket_limit_and_validators_bound_growth() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("limit", &["--socket-limit", "8", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let a = mem.malloc(5 * MB, 0).unwrap();
    let e = mem.malloc(5 * MB, 0).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--socket-limit"), "{msg}");
    assert!(msg.contains("growing failed"), "{msg}");
    let refused = Arc::new(Mutex::new(0u32));
    let r = Arc::clone(&refused);
    mem.register_validator("no-more", 0, 4 * MB as u64, move |_, _, _| {
        *r.lock().unwrap() += 1;
        false
    })
    .unwrap();
    // Fits in the free tail of the current pages: no growth, no validator.
    let b = mem.malloc(64, 0).unwrap();
    assert_eq!(*refused.lock().unwrap(), 0);
    // SAFETY: not used afterwards.
    unsafe {
        mem.free(a).unwrap();
        mem.free(b).unwrap();
    }
    // All pages went back (once the cached small block is flushed); 5M
    // needs 6M, over the validator's 4M.
    mem.heap_cache_flush();
    assert_eq!(mem.heap_stats(0).unwrap().total_bytes, 0);
    let e = mem.malloc(5 * MB, 0).unwrap_err();
    assert!(e.to_string().contains("no-more"), "{e}");
    assert_eq!(*refused.lock().unwrap(), 1);
    mem.heap_validate().unwrap();
}

#[test]
fn heap_calls_inside_a_memory_callback_are_refused() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("reent", &[]);
    let mem = Arc::new(Memory::init(&o).unwrap());
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (m, s) = (Arc::downgrade(&mem), Arc::clone(&seen));
    mem.register_event_callback("alloc-inside", move |_| {
        if let Some(m) = m.upgrade() {
            let r = m.malloc(64, 0);
            s.lock().unwrap().push(match r {
                Ok(_) => "allocated".into(),
                Err(e) => e.to_string(),
            });
        }
    })
    .unwrap();
    let p = mem.malloc(64, 0).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].contains("inside a memory event callback"),
        "{seen:?}"
    );
    // SAFETY: not used afterwards.
    unsafe { mem.free(p).unwrap() };
    mem.unregister_event_callback("alloc-inside").unwrap();
}

/// The heap's metadata is shared memory with process-shared locks: a
/// forked child (a real second process, same mappings) allocates and frees
/// in the parent's heap, and the parent sees its blocks.
#[test]
fn another_process_allocates_in_the_same_heap() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("fork", &["--socket-mem", "8", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let mine = mem.malloc(1000, 0).unwrap();
    fill(mine, 1000, 0x77);
    let mut fds = [0i32; 2];
    // SAFETY: fills two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child calls only the heap (no std allocation on this
    // path: one node, preallocated memory), raw writes and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut ptrs = [0usize; 64];
        let mut ok = true;
        for (i, slot) in ptrs.iter_mut().enumerate() {
            // Small sizes: the child's frees go into its thread cache.
            match mem.malloc(64 * (1 + i % 8), 0) {
                Ok(p) => {
                    // SAFETY: fresh block of at least 64 bytes.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8, 64) };
                    *slot = p.as_ptr() as usize;
                }
                Err(_) => ok = false,
            }
        }
        // Free every odd one here; the parent frees the rest.
        for (i, &p) in ptrs.iter().enumerate() {
            if i % 2 == 1 && p != 0 {
                // SAFETY: the child's own block.
                ok &= unsafe { mem.free(NonNull::new(p as *mut u8).unwrap()) }.is_ok();
            }
        }
        // SAFETY: plain bytes of a local array.
        let bytes = unsafe { std::slice::from_raw_parts(ptrs.as_ptr().cast::<u8>(), 64 * 8) };
        // SAFETY: writes our bytes to our pipe.
        let _ = unsafe { libc::write(wr, bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    // SAFETY: our copy of the write end.
    unsafe { libc::close(wr) };
    let mut buf = vec![0u8; 64 * 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled part of `buf`.
        let n = unsafe { libc::read(rd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        assert!(n > 0, "child closed the pipe early");
        got += n as usize;
    }
    // SAFETY: our read end.
    unsafe { libc::close(rd) };
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: {status:#x}"
    );
    mem.heap_validate().unwrap();
    assert_eq!(mem.heap_stats(0).unwrap().alloc_count, 1 + 32);
    assert!(all(mine, 1000, 0x77));
    for (i, c) in buf.chunks_exact(8).enumerate() {
        let p = usize::from_ne_bytes(c.try_into().unwrap());
        let p = NonNull::new(p as *mut u8).unwrap();
        if i % 2 == 0 {
            assert!(all(p, 64, i as u8), "block {i} written by the child");
            // SAFETY: the child's block, handed over.
            unsafe { mem.free(p).unwrap() };
        } else {
            // Freed by the child: a second free is caught here.
            // SAFETY: must be refused.
            let e = heap_err(unsafe { mem.free(p) }.unwrap_err());
            assert!(
                matches!(
                    e,
                    HeapError::DoubleFree { .. } | HeapError::InsideBlock { .. }
                ),
                "{e}"
            );
        }
    }
    // SAFETY: not used afterwards.
    unsafe { mem.free(mine).unwrap() };
    // The child's thread cache (a dead process's slot) and ours go back.
    assert!(mem.heap_trim() >= 32);
    let st = mem.heap_stats(0).unwrap();
    assert_eq!((st.alloc_count, st.free_count, st.cached_count), (0, 1, 0));
    mem.heap_validate().unwrap();
}

#[test]
fn thread_cache_reuses_blocks_zeroes_dirty_ones_and_counts_them_free() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("tcache", &["--socket-mem", "2", "--pagesz-mem", "1G:0"]);
    let mem = Memory::init(&o).unwrap();
    let p = mem.malloc(100, 0).unwrap();
    fill(p, 100, 0xff);
    // SAFETY: not used afterwards.
    unsafe { mem.free(p).unwrap() };
    let st = mem.heap_stats(0).unwrap();
    // The block, and the blocks the first miss carved ahead.
    assert_eq!(st.alloc_count, 0);
    assert!(st.cached_count >= 1, "{st:?}");
    // The cached block comes back for the same class, zeroed on request.
    let q = mem.zmalloc(128, 0).unwrap();
    assert_eq!(q, p, "the thread cache hands the block back");
    assert!(all(q, 128, 0), "a dirty cached block is cleared by zmalloc");
    assert_eq!(mem.heap_stats(0).unwrap().alloc_count, 1);
    // Overflowing a bin gives half of it back to the heap, merged.
    let blocks: Vec<_> = (0..200).map(|_| mem.malloc(64, 0).unwrap()).collect();
    for b in blocks {
        // SAFETY: not used afterwards.
        unsafe { mem.free(b).unwrap() };
    }
    mem.heap_validate().unwrap();
    let st = mem.heap_stats(0).unwrap();
    assert_eq!(st.alloc_count, 1);
    // Two classes in use (64 and 128 bytes), at most a full bin each.
    assert!(st.cached_count <= 64, "{st:?}");
    // The dump shows cached blocks as such, and JSON has the same.
    let mut out = Vec::new();
    mem.heap_dump(&mut out, true).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("CACHED"));
    let j = mem.heap_dump_json(true);
    assert_eq!(j[0]["name"], "socket_0", "{j}");
    assert_eq!(j[0]["stats"]["alloc_count"], 1, "{j}");
    let els = j[0]["elements"].as_array().unwrap();
    assert_eq!(
        els.iter()
            .filter(|e| e["free"] == false && e["cached"] == false)
            .count(),
        1
    );
    assert!(els.iter().any(|e| e["cached"] == true));
    // SAFETY: not used afterwards.
    unsafe { mem.free(q).unwrap() };
    mem.heap_cache_flush();
    let st = mem.heap_stats(0).unwrap();
    assert_eq!((st.alloc_count, st.cached_count, st.free_count), (0, 0, 1));
    mem.heap_validate_deep().unwrap();
}
