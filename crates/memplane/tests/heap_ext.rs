//! External memory on a real instance: heaps over memory the test maps
//! itself (a hugetlb memfd of 2 MiB pages, and plain anonymous 4 KiB
//! pages), with and without an IOVA table; memory registered without a
//! heap; memory events; and every kind of bad input, each a typed error
//! that changes nothing.

mod common;

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use memplane::heap::{AllocRequest, ExtChunkInfo, HeapError, HeapKind, EXTERNAL_SOCKET_BASE};
use memplane::iova::BAD_IOVA;
use memplane::memseg::{MemEvent, MemEventKind};
use memplane::{Error, MemOptions, Memory};

use common::heapkit::{all, fill, heap_err};
use common::{need_hugepages, pool_lock};

const KB: usize = 1 << 10;
const MB: usize = 1 << 20;
const PAGE_2M: usize = 2 * MB;
const PAGE_4K: usize = 4 * KB;

fn opts_with(name: &str, extra: &[&str]) -> (MemOptions, tempfile::TempDir) {
    // Pinned native memory holds the IOVA tables and the few native
    // blocks: no growth, so no dependence on the pool while it runs.
    let mut all_extra = vec!["--pagesz-mem", "1G:0", "--socket-mem", "2"];
    all_extra.extend_from_slice(extra);
    common::heapkit::test_opts("hx", name, &all_extra)
}

/// `Memory::init`, waiting a little if another process just emptied the
/// hugepage pool.
fn init(o: &MemOptions) -> Memory {
    let mut tries = 0;
    loop {
        match Memory::init(o) {
            Ok(m) => return m,
            Err(e) if e.to_string().contains("the kernel would not give") && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("Memory::init: {e}"),
        }
    }
}

/// Memory the test maps itself; unmapped on drop.
struct UserMap {
    ptr: NonNull<u8>,
    len: usize,
    _fd: Option<rustix::fd::OwnedFd>,
}

impl UserMap {
    /// `pages` 2 MiB hugepages of a hugetlb memfd, mapped shared and
    /// populated (so a short pool is an mmap error, never a SIGBUS).
    fn hugetlb(pages: usize) -> UserMap {
        use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let len = pages * PAGE_2M;
        let fd = memfd_create(
            "heap_ext",
            MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
        )
        .unwrap();
        ftruncate(&fd, len as u64).unwrap();
        // The pool may be empty for a moment when another process uses it.
        let mut tries = 0;
        let p = loop {
            // SAFETY: a fresh mapping of our own memfd, at an address the
            // kernel picks.
            let r = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::POPULATE,
                    &fd,
                    0,
                )
            };
            match r {
                Ok(p) => break p,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("mmap of {pages} hugepages: {e}"),
            }
        };
        UserMap {
            ptr: NonNull::new(p.cast::<u8>()).unwrap(),
            len,
            _fd: Some(fd),
        }
    }

    /// `pages` anonymous 4 KiB pages.
    fn anon(pages: usize) -> UserMap {
        use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
        let len = pages * PAGE_4K;
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .unwrap();
        UserMap {
            ptr: NonNull::new(p.cast::<u8>()).unwrap(),
            len,
            _fd: None,
        }
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The address `off` bytes in.
    fn at(&self, off: usize) -> NonNull<u8> {
        assert!(off <= self.len);
        NonNull::new((self.addr() + off) as *mut u8).unwrap()
    }

    fn contains(&self, p: NonNull<u8>, size: usize) -> bool {
        let a = p.as_ptr() as usize;
        a >= self.addr() && a + size <= self.addr() + self.len
    }

    /// Fills the whole mapping with `byte` (user memory is dirty).
    fn scribble(&self, byte: u8) {
        // SAFETY: our own mapping, not in any heap yet.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), byte, self.len) };
    }
}

impl Drop for UserMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the heap gave it up before (or the test
        // failed and the Memory is gone already).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Records the memory events of `mem`.
fn record_events(mem: &Memory) -> Arc<Mutex<Vec<MemEvent>>> {
    let events = Arc::new(Mutex::new(Vec::<MemEvent>::new()));
    let ev = Arc::clone(&events);
    mem.register_event_callback("heap_ext", move |e| ev.lock().unwrap().push(*e))
        .unwrap();
    events
}

/// The events that touch `[addr, addr+len)`, as (kind, addr, len, page size).
fn events_in(
    events: &Mutex<Vec<MemEvent>>,
    addr: usize,
    len: usize,
) -> Vec<(MemEventKind, usize, usize, u64)> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.addr < addr + len && e.addr + e.len > addr)
        .map(|e| (e.kind, e.addr, e.len, e.page_size.bytes()))
        .collect()
}

/// What must not change when a call is refused: every external chunk and
/// every heap with what it holds and hands out (the IOVA tables live in
/// native heaps, so a leaked table shows up here too). Free-list shape and
/// thread-cache contents may move and are left out.
fn snapshot(mem: &Memory) -> (Vec<ExtChunkInfo>, Vec<String>) {
    let heaps = mem
        .heaps()
        .iter()
        .map(|h| {
            format!(
                "{} {} {:?} total {} allocated {} in {} blocks, free {}",
                h.name,
                h.socket,
                h.kind,
                h.stats.total_bytes,
                h.stats.alloc_bytes,
                h.stats.alloc_count,
                h.stats.free_bytes
            )
        })
        .collect();
    (mem.ext_chunks(), heaps)
}

fn native_allocs(mem: &Memory) -> u64 {
    mem.heaps()
        .iter()
        .filter(|h| h.kind == HeapKind::Native)
        .map(|h| h.stats.alloc_count)
        .sum()
}

#[test]
#[allow(clippy::many_single_char_names)]
fn hugetlb_heap_follows_its_iova_table() {
    if !need_hugepages(2048, 12) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("iova", &[]);
    let mem = init(&o);
    let events = record_events(&mem);
    let map = UserMap::hugetlb(4);
    map.scribble(0xee);
    let (va, len) = (map.addr(), map.len);

    let sock = mem.heap_create("ext_iova").unwrap();
    assert!(sock >= EXTERNAL_SOCKET_BASE, "{sock}");
    assert_eq!(mem.heap_socket("ext_iova").unwrap(), sock);
    assert!(mem.heap_socket_is_external(sock).unwrap());
    assert!(!mem.heap_socket_is_external(0).unwrap());
    let info = mem.heaps().into_iter().find(|h| h.socket == sock).unwrap();
    assert_eq!(
        (info.name.as_str(), info.kind),
        ("ext_iova", HeapKind::External)
    );
    assert_eq!(info.stats.total_bytes, 0);
    // An empty external heap has nothing to give and does not grow.
    let e = heap_err(mem.malloc_socket(64, 0, sock).unwrap_err());
    assert!(matches!(e, HeapError::OutOfMemory { .. }), "{e}");

    // Pages 0-1 are IOVA-contiguous, and so are pages 2-3, elsewhere.
    let base = 0x40_0000_0000u64;
    let iovas = [
        base,
        base + PAGE_2M as u64,
        base + 64 * MB as u64,
        base + 66 * MB as u64,
    ];
    let natives = native_allocs(&mem);
    // SAFETY: our mapping, kept until the memory is removed below.
    unsafe { mem.heap_memory_add("ext_iova", map.ptr, len, Some(&iovas), PAGE_2M) }.unwrap();
    assert_eq!(
        native_allocs(&mem),
        natives + 1,
        "the IOVA table is a block of a native heap"
    );
    assert_eq!(
        events_in(&events, va, len),
        vec![(MemEventKind::Alloc, va, len, PAGE_2M as u64)],
        "adding memory is an Alloc event of exactly its range"
    );
    assert_eq!(
        mem.ext_chunks(),
        vec![ExtChunkInfo {
            va,
            len,
            page_size: PAGE_2M as u64,
            heap: Some("ext_iova".into()),
            has_iova: true,
        }]
    );
    let st = mem.heap_stats(sock).unwrap();
    assert_eq!(
        (st.total_bytes, st.free_bytes, st.alloc_count),
        (len as u64, len as u64, 0)
    );
    mem.heap_validate_deep().unwrap();

    let iova_of = |a: usize| iovas[(a - va) / PAGE_2M] + ((a - va) % PAGE_2M) as u64;

    // Blocks come from the user memory, their IOVAs from the table.
    let mut blocks = Vec::new();
    for (i, (size, align)) in [
        (100, 0),
        (5000, 4096),
        (300_000, 64),
        (MB, MB),
        (64, 2 * MB),
    ]
    .into_iter()
    .enumerate()
    {
        let p = mem.malloc_socket(size, align, sock).unwrap();
        assert!(
            map.contains(p, size),
            "{p:p}+{size} outside the user memory"
        );
        assert_eq!(p.as_ptr() as usize % align.max(64), 0);
        let a = p.as_ptr() as usize;
        assert_eq!(mem.malloc_virt2iova(p), Some(iova_of(a)), "{p:p}");
        assert_eq!(
            mem.extmem_virt2iova(a + size - 1),
            Some(iova_of(a + size - 1))
        );
        fill(p, size, i as u8 + 1);
        blocks.push((p, size, i as u8 + 1));
    }
    // User memory was dirty: zeroed blocks are zeroed all the same.
    let z = mem.zmalloc_socket(20_000, 0, sock).unwrap();
    assert!(map.contains(z, 20_000));
    assert!(all(z, 20_000, 0), "zmalloc on dirty user memory");
    let c = mem.calloc_socket(10, 1000, 256, sock).unwrap();
    assert!(map.contains(c, 10_000));
    assert!(all(c, 10_000, 0), "calloc on dirty user memory");
    fill(z, 20_000, 0x21);
    fill(c, 10_000, 0x22);
    blocks.push((z, 20_000, 0x21));
    blocks.push((c, 10_000, 0x22));
    // A move within the external heap stays in it.
    let (p, size, byte) = blocks.remove(0);
    // SAFETY: a live block; replaced by the result.
    let p = unsafe { mem.realloc_socket(Some(p), 700_000, 0, sock) }.unwrap();
    assert!(map.contains(p, 700_000));
    assert!(all(p, size, byte), "realloc kept the contents");
    fill(p, 700_000, byte);
    blocks.push((p, 700_000, byte));
    // Any node never means an external heap.
    let n = mem.malloc(4096, 0).unwrap();
    assert!(!map.contains(n, 1));
    assert_eq!(
        mem.heap_stats(sock).unwrap().alloc_count,
        blocks.len() as u64
    );
    mem.heap_validate().unwrap();
    // SAFETY: not used afterwards.
    unsafe { mem.free(n).unwrap() };

    // The heap never grows: a request larger than what is free fails and
    // says why, mapping nothing.
    let mapped = mem.total_mapped();
    let before = mem.heap_stats(sock).unwrap();
    let e = heap_err(mem.malloc_socket(16 * MB, 0, sock).unwrap_err());
    assert!(matches!(e, HeapError::OutOfMemory { .. }), "{e}");
    assert!(e.to_string().contains("external heaps do not grow"), "{e}");
    assert_eq!(mem.total_mapped(), mapped);
    assert_eq!(mem.heap_stats(sock).unwrap(), before);

    assert_eq!(before.grow_count, 0, "an external heap never grew");
    // Pointers that are not blocks of it: refused, nothing changes.
    let (p0, _, _) = blocks[0];
    // SAFETY: each must be refused without touching the heap.
    unsafe {
        let inside = NonNull::new(p0.as_ptr().add(64)).unwrap();
        let e = heap_err(mem.free(inside).unwrap_err());
        assert!(
            matches!(e, HeapError::InsideBlock { .. } | HeapError::Corrupt { .. }),
            "{e}"
        );
        let e = heap_err(mem.free(map.at(len - 64)).unwrap_err());
        assert!(
            matches!(
                e,
                HeapError::InsideBlock { .. } | HeapError::NotFromHeap { .. }
            ),
            "{e}"
        );
    }
    assert_eq!(mem.heap_stats(sock).unwrap(), before);
    mem.heap_validate().unwrap();

    // Refused while blocks are live: removing the memory, destroying the heap.
    let e = heap_err(
        mem.heap_memory_remove("ext_iova", map.ptr, len)
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::HeapBusy { .. }), "{e}");
    let e = heap_err(mem.heap_destroy("ext_iova").unwrap_err());
    assert!(matches!(e, HeapError::HeapBusy { .. }), "{e}");
    assert_eq!(mem.ext_chunks().len(), 1);
    let stale = blocks[0].0;
    for (p, size, byte) in blocks.drain(..) {
        assert!(all(p, size, byte), "block {p:p} kept its contents");
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    // SAFETY: freed above: must be refused.
    let e = heap_err(unsafe { mem.free(stale) }.unwrap_err());
    assert!(matches!(e, HeapError::DoubleFree { .. }), "{e}");
    mem.heap_validate_deep().unwrap();
    let st = mem.heap_stats(sock).unwrap();
    assert_eq!((st.alloc_count, st.free_count), (0, 1), "merged back");

    // IOVA-contiguous blocks only where the table says pages are: a block
    // of 4 MiB less its header fills exactly pages 0-1 or pages 2-3.
    let mut contig = Vec::new();
    for _ in 0..2 {
        let size = 4 * MB - 64;
        let p = mem
            .heap_alloc(&AllocRequest::new(size).contig().socket(sock))
            .unwrap();
        let a = p.as_ptr() as usize;
        assert!(map.contains(p, size));
        assert_eq!(
            (a - va) / (4 * MB),
            (a + size - 1 - va) / (4 * MB),
            "{p:p} crosses the IOVA gap between pages 1 and 2"
        );
        assert_eq!(iova_of(a + size - 1), iova_of(a) + size as u64 - 1);
        contig.push(p);
    }
    assert_eq!(
        mem.heap_stats(sock).unwrap().free_bytes,
        0,
        "both halves taken"
    );
    let e = heap_err(mem.malloc_socket(64, 0, sock).unwrap_err());
    assert!(e.to_string().contains("external heaps do not grow"), "{e}");
    for p in contig.drain(..) {
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    // Three pages are never IOVA-contiguous here...
    let e = heap_err(
        mem.heap_alloc(&AllocRequest::new(5 * MB).contig().socket(sock))
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::OutOfMemory { .. }), "{e}");
    assert!(e.to_string().contains("IOVA-contiguous"), "{e}");
    // ...but without the constraint the block spans the gap.
    let p = mem.malloc_socket(5 * MB, 0, sock).unwrap();
    assert!(map.contains(p, 5 * MB));
    // What is left lies in pages 2-3, contiguous with each other.
    let q = mem
        .heap_alloc(&AllocRequest::new(MB + MB / 2).contig().socket(sock))
        .unwrap();
    let qa = q.as_ptr() as usize;
    assert!(map.contains(q, MB + MB / 2));
    assert_eq!(
        iova_of(qa + MB + MB / 2 - 1),
        iova_of(qa) + (MB + MB / 2) as u64 - 1
    );
    mem.heap_validate().unwrap();
    // SAFETY: not used afterwards.
    unsafe {
        mem.free(q).unwrap();
        mem.free(p).unwrap();
    }

    // The wrong length is another chunk; the right one goes, with a Free
    // event of its range, its IOVA table and its bytes.
    let e = heap_err(
        mem.heap_memory_remove("ext_iova", map.ptr, len - PAGE_2M)
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::NoSuchChunk { .. }), "{e}");
    mem.heap_memory_remove("ext_iova", map.ptr, len).unwrap();
    assert_eq!(
        events_in(&events, va, len),
        vec![
            (MemEventKind::Alloc, va, len, PAGE_2M as u64),
            (MemEventKind::Free, va, len, PAGE_2M as u64)
        ]
    );
    assert!(mem.ext_chunks().is_empty());
    assert_eq!(native_allocs(&mem), natives, "the IOVA table was freed");
    assert_eq!(mem.extmem_virt2iova(va), None);
    let st = mem.heap_stats(sock).unwrap();
    assert_eq!((st.total_bytes, st.free_bytes, st.alloc_count), (0, 0, 0));
    mem.heap_validate().unwrap();

    // A block pointer into memory that left the heap is no block at all.
    // SAFETY: must be refused without touching the memory.
    let e = heap_err(unsafe { mem.free(stale) }.unwrap_err());
    assert!(matches!(e, HeapError::NotFromHeap { .. }), "{e}");

    mem.heap_destroy("ext_iova").unwrap();
    let e = heap_err(mem.heap_stats(sock).unwrap_err());
    assert!(matches!(e, HeapError::NoSuchSocket { .. }), "{e}");
    assert!(mem.heaps().iter().all(|h| h.kind == HeapKind::Native));
    let e = heap_err(mem.heap_socket("ext_iova").unwrap_err());
    assert!(matches!(e, HeapError::NoSuchHeap { .. }), "{e}");
    let e = heap_err(mem.malloc_socket(64, 0, sock).unwrap_err());
    assert!(matches!(e, HeapError::NoSuchSocket { .. }), "{e}");
    // The memory is the test's again.
    map.scribble(0x33);
    drop(mem);
}

/// What another thread got from the external heap while the Alloc event
/// of the memory being added was still being delivered (`None`: it was
/// still waiting when the callback gave up).
type DuringCallback = Arc<Mutex<Option<(Option<bool>, std::thread::JoinHandle<Option<usize>>)>>>;

#[test]
fn added_memory_is_not_handed_out_before_its_alloc_event() {
    // Subscribers (DMA mapping) learn of memory before any block of it is
    // handed out: while the Alloc callback of an added chunk runs, another
    // thread must not get a block from that chunk.
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("evorder", &[]);
    let mem = Arc::new(init(&o));
    let sock = mem.heap_create("ev_order").unwrap();
    let map = UserMap::anon(16);
    let (va, len) = (map.addr(), map.len);
    let during: DuringCallback = Arc::new(Mutex::new(None));
    let (weak, seen) = (Arc::downgrade(&mem), Arc::clone(&during));
    mem.register_event_callback("order", move |e| {
        if e.kind != MemEventKind::Alloc || e.addr != va {
            return;
        }
        let Some(m) = weak.upgrade() else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = m.malloc_socket(64, 0, sock).ok();
            let _ = tx.send(r.is_some());
            r.map(|p| p.as_ptr() as usize)
        });
        let got = rx.recv_timeout(std::time::Duration::from_millis(300)).ok();
        *seen.lock().unwrap() = Some((got, t));
    })
    .unwrap();
    // SAFETY: our mapping, kept until removed below.
    unsafe { mem.heap_memory_add("ev_order", map.ptr, len, None, PAGE_4K) }.unwrap();
    let (got, t) = during
        .lock()
        .unwrap()
        .take()
        .expect("the Alloc event fired");
    let block = t.join().unwrap();
    mem.unregister_event_callback("order").unwrap();
    if let Some(b) = block {
        assert!(b >= va && b < va + len);
        // SAFETY: the block the other thread got, not used by anyone.
        unsafe { mem.free(NonNull::new(b as *mut u8).unwrap()).unwrap() };
    }
    mem.heap_memory_remove("ev_order", map.ptr, len).unwrap();
    mem.heap_destroy("ev_order").unwrap();
    assert_ne!(
        got,
        Some(true),
        "a block of the added memory was handed out while its Alloc event was \
         still being delivered (a DMA-mapping subscriber would not know it yet)"
    );
}

#[test]
fn callbacks_can_translate_external_memory_both_ways() {
    // A DMA-mapping subscriber maps on Alloc and unmaps on Free, and needs
    // the IOVA both times (VFIO unmaps by IOVA): inside the callbacks the
    // memory must still translate, as native pages do (their Free fires
    // before the unmap).
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("evtrans", &[]);
    let mem = Arc::new(init(&o));
    let heap_map = UserMap::anon(8);
    let reg_map = UserMap::anon(8);
    let iovas: Vec<u64> = (0..8u64).map(|i| 0x9000_0000 + i * 4096).collect();
    let seen = Arc::new(Mutex::new(Vec::<(MemEventKind, usize, Option<u64>)>::new()));
    let (weak, log) = (Arc::downgrade(&mem), Arc::clone(&seen));
    let ranges = [heap_map.addr(), reg_map.addr()];
    mem.register_event_callback("translate", move |e| {
        if !ranges.contains(&e.addr) {
            return;
        }
        let Some(m) = weak.upgrade() else { return };
        let last = e.addr + e.len - 1;
        log.lock()
            .unwrap()
            .push((e.kind, e.addr, m.extmem_virt2iova(last)));
    })
    .unwrap();
    let want_last = Some(iovas[7] + 4095);

    mem.heap_create("ev_trans").unwrap();
    // SAFETY: our mappings, kept until removed or unregistered below.
    unsafe {
        mem.heap_memory_add(
            "ev_trans",
            heap_map.ptr,
            heap_map.len,
            Some(&iovas),
            PAGE_4K,
        )
        .unwrap();
        mem.extmem_register(reg_map.ptr, reg_map.len, Some(&iovas), PAGE_4K)
            .unwrap();
    }
    mem.heap_memory_remove("ev_trans", heap_map.ptr, heap_map.len)
        .unwrap();
    mem.extmem_unregister(reg_map.ptr, reg_map.len).unwrap();
    mem.heap_destroy("ev_trans").unwrap();
    mem.unregister_event_callback("translate").unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (MemEventKind::Alloc, heap_map.addr(), want_last),
            (MemEventKind::Alloc, reg_map.addr(), want_last),
            (MemEventKind::Free, heap_map.addr(), want_last),
            (MemEventKind::Free, reg_map.addr(), want_last),
        ],
        "IOVAs seen from inside the callbacks"
    );
    assert_eq!(mem.extmem_virt2iova(heap_map.addr()), None);
    assert_eq!(mem.extmem_virt2iova(reg_map.addr()), None);
}

#[test]
fn anonymous_4k_chunks_without_iovas() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("anon", &[]);
    let mem = init(&o);
    let events = record_events(&mem);
    // Two adjacent chunks of 64 KiB each.
    let map = UserMap::anon(32);
    map.scribble(0xa5);
    let half = map.len / 2;
    let sock = mem.heap_create("anon4k").unwrap();
    let natives = native_allocs(&mem);
    for off in [0, half] {
        // SAFETY: our mapping, kept until removed below.
        unsafe { mem.heap_memory_add("anon4k", map.at(off), half, None, PAGE_4K) }.unwrap();
    }
    assert_eq!(
        native_allocs(&mem),
        natives,
        "no IOVA table, no native block"
    );
    let chunks = mem.ext_chunks();
    assert_eq!(chunks.len(), 2);
    assert!(chunks.iter().all(|c| c.page_size == PAGE_4K as u64
        && !c.has_iova
        && c.heap.as_deref() == Some("anon4k")
        && c.len == half));
    assert_eq!(
        events_in(&events, map.addr(), map.len),
        vec![
            (MemEventKind::Alloc, map.addr(), half, PAGE_4K as u64),
            (MemEventKind::Alloc, map.addr() + half, half, PAGE_4K as u64),
        ]
    );
    assert_eq!(mem.heap_stats(sock).unwrap().total_bytes, map.len as u64);

    // Blocks never span two chunks, adjacent as they are.
    let e = heap_err(mem.malloc_socket(100 * KB, 0, sock).unwrap_err());
    assert!(e.to_string().contains("external heaps do not grow"), "{e}");
    let big = mem.malloc_socket(40 * KB, 0, sock).unwrap();
    assert!(map.contains(big, 40 * KB));
    fill(big, 40 * KB, 1);
    // No IOVA: lookups say so and IOVA-contiguous requests fail, even for
    // one byte.
    assert_eq!(mem.malloc_virt2iova(big), None);
    assert_eq!(mem.extmem_virt2iova(big.as_ptr() as usize), None);
    let e = heap_err(
        mem.heap_alloc(&AllocRequest::new(1).contig().socket(sock))
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::OutOfMemory { .. }), "{e}");
    // Dirty user memory, zeroed blocks all the same.
    let z = mem.zmalloc_socket(8 * KB, 0, sock).unwrap();
    assert!(map.contains(z, 8 * KB));
    assert!(all(z, 8 * KB, 0));
    fill(z, 8 * KB, 2);
    let c = mem.calloc_socket(3, 1000, 4096, sock).unwrap();
    assert_eq!(c.as_ptr() as usize % 4096, 0);
    assert!(all(c, 3000, 0));
    fill(c, 3000, 3);
    // realloc on this socket grows in place or moves within the heap.
    // SAFETY: a live block, replaced by the result.
    let c = unsafe { mem.realloc_socket(Some(c), 12_000, 0, sock) }.unwrap();
    assert!(map.contains(c, 12_000));
    assert!(all(c, 3000, 3));
    fill(c, 12_000, 3);
    mem.heap_validate_deep().unwrap();

    // The chunk without blocks can go while the other is busy.
    let busy_half = |p: NonNull<u8>| (p.as_ptr() as usize - map.addr()) / half;
    let blocks = [(big, 40 * KB, 1u8), (z, 8 * KB, 2), (c, 12_000, 3)];
    let mut in_use: Vec<usize> = blocks.iter().map(|b| busy_half(b.0)).collect();
    in_use.sort_unstable();
    in_use.dedup();
    if in_use.len() == 1 {
        let idle = 1 - in_use[0];
        mem.heap_memory_remove("anon4k", map.at(idle * half), half)
            .unwrap();
        assert_eq!(mem.ext_chunks().len(), 1);
        assert_eq!(mem.heap_stats(sock).unwrap().total_bytes, half as u64);
        mem.heap_validate().unwrap();
    }
    let busy = in_use[0];
    let e = heap_err(
        mem.heap_memory_remove("anon4k", map.at(busy * half), half)
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::HeapBusy { .. }), "{e}");
    for (p, size, byte) in blocks {
        assert!(all(p, size, byte));
        // SAFETY: not used afterwards.
        unsafe { mem.free(p).unwrap() };
    }
    mem.heap_validate_deep().unwrap();
    for ch in mem.ext_chunks() {
        mem.heap_memory_remove("anon4k", map.at(ch.va - map.addr()), ch.len)
            .unwrap();
    }
    assert!(mem.ext_chunks().is_empty());
    let frees: Vec<_> = events_in(&events, map.addr(), map.len)
        .into_iter()
        .filter(|e| e.0 == MemEventKind::Free)
        .map(|e| (e.1, e.2))
        .collect();
    assert_eq!(frees.len(), 2, "one Free event per chunk: {frees:?}");
    assert!(frees.contains(&(map.addr(), half)) && frees.contains(&(map.addr() + half, half)));
    mem.heap_destroy("anon4k").unwrap();
    mem.heap_validate().unwrap();
}

#[test]
fn extmem_register_without_a_heap() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("reg", &[]);
    let mem = init(&o);
    let events = record_events(&mem);
    let map = UserMap::anon(8);
    let va = map.addr();
    let mut iovas: Vec<u64> = (0..8u64).map(|i| 0x7700_0000 + i * 0x1_0000).collect();
    iovas[5] = BAD_IOVA;
    let natives = native_allocs(&mem);
    let heaps_before = format!(
        "{:?}",
        mem.heaps().iter().map(|h| &h.name).collect::<Vec<_>>()
    );

    // SAFETY: our mapping, kept until unregistered.
    unsafe { mem.extmem_register(map.ptr, map.len, Some(&iovas), PAGE_4K) }.unwrap();
    assert_eq!(
        events_in(&events, va, map.len),
        vec![(MemEventKind::Alloc, va, map.len, PAGE_4K as u64)]
    );
    assert_eq!(
        mem.ext_chunks(),
        vec![ExtChunkInfo {
            va,
            len: map.len,
            page_size: PAGE_4K as u64,
            heap: None,
            has_iova: true,
        }]
    );
    assert_eq!(native_allocs(&mem), natives + 1, "the IOVA table");
    assert_eq!(
        format!(
            "{:?}",
            mem.heaps().iter().map(|h| &h.name).collect::<Vec<_>>()
        ),
        heaps_before,
        "no heap is made"
    );
    assert_eq!(mem.extmem_virt2iova(va), Some(iovas[0]));
    assert_eq!(mem.extmem_virt2iova(va + 5000), Some(iovas[1] + 904));
    assert_eq!(
        mem.extmem_virt2iova(va + map.len - 1),
        Some(iovas[7] + 4095)
    );
    assert_eq!(
        mem.extmem_virt2iova(va + 5 * PAGE_4K + 10),
        None,
        "BAD_IOVA page"
    );
    assert_eq!(mem.extmem_virt2iova(va + map.len), None, "past the end");
    assert_eq!(mem.malloc_virt2iova(map.at(5000)), Some(iovas[1] + 904));
    // Registered memory is no heap's: nothing frees into it.
    // SAFETY: must be refused without touching the memory.
    let e = heap_err(unsafe { mem.free(map.at(64)) }.unwrap_err());
    assert!(matches!(e, HeapError::NotFromHeap { .. }), "{e}");
    assert_eq!(mem.heap_stats(0).unwrap().alloc_count, natives + 1);

    let snap = snapshot(&mem);
    // Registering it again, or part of it, or adding it to a heap: refused.
    // SAFETY: refused before the memory is used.
    let e = heap_err(unsafe { mem.extmem_register(map.ptr, map.len, None, PAGE_4K) }.unwrap_err());
    assert!(matches!(e, HeapError::BadExtMem { .. }), "{e}");
    assert!(e.to_string().contains("overlaps"), "{e}");
    // SAFETY: as above.
    let e = heap_err(
        unsafe { mem.extmem_register(map.at(PAGE_4K), PAGE_4K, Some(&[1]), PAGE_4K) }.unwrap_err(),
    );
    assert!(matches!(e, HeapError::BadExtMem { .. }), "{e}");
    let sock = mem.heap_create("reg_heap").unwrap();
    // SAFETY: as above.
    let e = heap_err(
        unsafe { mem.heap_memory_add("reg_heap", map.ptr, map.len, None, PAGE_4K) }.unwrap_err(),
    );
    assert!(matches!(e, HeapError::BadExtMem { .. }), "{e}");
    let e = heap_err(
        mem.heap_memory_remove("reg_heap", map.ptr, map.len)
            .unwrap_err(),
    );
    assert!(matches!(e, HeapError::NoSuchChunk { .. }), "{e}");
    assert_eq!(mem.heap_stats(sock).unwrap().total_bytes, 0);
    mem.heap_destroy("reg_heap").unwrap();
    assert_eq!(snapshot(&mem), snap, "refusals changed nothing");

    // Unregistering: wrong length refused, then gone with a Free event.
    let e = heap_err(mem.extmem_unregister(map.ptr, PAGE_4K).unwrap_err());
    assert!(matches!(e, HeapError::NoSuchChunk { .. }), "{e}");
    mem.extmem_unregister(map.ptr, map.len).unwrap();
    assert_eq!(
        events_in(&events, va, map.len),
        vec![
            (MemEventKind::Alloc, va, map.len, PAGE_4K as u64),
            (MemEventKind::Free, va, map.len, PAGE_4K as u64)
        ]
    );
    assert!(mem.ext_chunks().is_empty());
    assert_eq!(native_allocs(&mem), natives, "the IOVA table was freed");
    assert_eq!(mem.extmem_virt2iova(va + 5000), None);
    let e = heap_err(mem.extmem_unregister(map.ptr, map.len).unwrap_err());
    assert!(matches!(e, HeapError::NoSuchChunk { .. }), "{e}");

    // Hugepage memory, without IOVAs: known, but no IOVA.
    let huge = UserMap::hugetlb(2);
    // SAFETY: our mapping, kept until unregistered.
    unsafe { mem.extmem_register(huge.ptr, huge.len, None, PAGE_2M) }.unwrap();
    assert_eq!(
        events_in(&events, huge.addr(), huge.len),
        vec![(MemEventKind::Alloc, huge.addr(), huge.len, PAGE_2M as u64)]
    );
    assert_eq!(mem.extmem_virt2iova(huge.addr() + 100), None);
    assert!(!mem.ext_chunks()[0].has_iova);
    assert_eq!(native_allocs(&mem), natives);
    mem.extmem_unregister(huge.ptr, huge.len).unwrap();
    assert_eq!(
        events_in(&events, huge.addr(), huge.len).last(),
        Some(&(MemEventKind::Free, huge.addr(), huge.len, PAGE_2M as u64))
    );
    assert!(mem.ext_chunks().is_empty());
    mem.heap_validate().unwrap();
}

#[test]
#[allow(clippy::many_single_char_names)]
#[allow(clippy::too_many_lines)]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("bad", &[]);
    let mem = init(&o);
    let events = record_events(&mem);
    // A heap with one chunk (with IOVAs) and a second, empty heap.
    let a = UserMap::anon(16);
    let b = UserMap::anon(16);
    mem.heap_create("ext_bad").unwrap();
    mem.heap_create("ext_other").unwrap();
    let iovas: Vec<u64> = (0..16u64).map(|i| 0x1000_0000 + i * 4096).collect();
    // SAFETY: our mapping, kept until removed below.
    unsafe { mem.heap_memory_add("ext_bad", a.ptr, a.len, Some(&iovas), PAGE_4K) }.unwrap();
    let n_events = events.lock().unwrap().len();
    let snap = snapshot(&mem);

    let name32 = "n".repeat(32);
    let base = NonNull::new(mem.base_va() as *mut u8).unwrap();
    let res_end = mem.base_va() + mem.va_len();
    let wrap = NonNull::new((usize::MAX - PAGE_4K + 1) as *mut u8).unwrap();
    let add = |name: &str, p: NonNull<u8>, len: usize, iovas: Option<&[u64]>, page: usize| {
        // SAFETY: every call here must be refused before the range is
        // used (the ranges are our own mappings or not touched at all).
        unsafe { mem.heap_memory_add(name, p, len, iovas, page) }.unwrap_err()
    };
    let reg = |p: NonNull<u8>, len: usize, iovas: Option<&[u64]>, page: usize| {
        // SAFETY: as above.
        unsafe { mem.extmem_register(p, len, iovas, page) }.unwrap_err()
    };
    let fifteen = vec![0u64; 15];
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        Box<dyn Fn() -> Error + '_>,
        fn(&HeapError) -> bool,
        &str,
    )> = vec![
        (
            "empty name",
            Box::new(|| mem.heap_create("").unwrap_err()),
            |e| matches!(e, HeapError::BadName { .. }),
            "empty",
        ),
        (
            "32-byte name",
            Box::new(|| mem.heap_create(&name32).unwrap_err()),
            |e| matches!(e, HeapError::BadName { .. }),
            "longer than 31",
        ),
        (
            "control character",
            Box::new(|| mem.heap_create("tab\there").unwrap_err()),
            |e| matches!(e, HeapError::BadName { .. }),
            "control",
        ),
        (
            "duplicate name",
            Box::new(|| mem.heap_create("ext_bad").unwrap_err()),
            |e| matches!(e, HeapError::HeapExists { .. }),
            "exists",
        ),
        (
            "a native heap's name",
            Box::new(|| mem.heap_create("socket_0").unwrap_err()),
            |e| matches!(e, HeapError::HeapExists { .. }),
            "exists",
        ),
        (
            "destroy socket_0",
            Box::new(|| mem.heap_destroy("socket_0").unwrap_err()),
            |e| matches!(e, HeapError::NativeHeap { .. }),
            "only external heaps",
        ),
        (
            "destroy an unknown heap",
            Box::new(|| mem.heap_destroy("nosuch").unwrap_err()),
            |e| matches!(e, HeapError::NoSuchHeap { .. }),
            "ext_bad",
        ),
        (
            "destroy with an empty name",
            Box::new(|| mem.heap_destroy("").unwrap_err()),
            |e| matches!(e, HeapError::BadName { .. }),
            "empty",
        ),
        (
            "destroy with memory attached",
            Box::new(|| mem.heap_destroy("ext_bad").unwrap_err()),
            |e| matches!(e, HeapError::HeapBusy { .. }),
            "1 memory chunk",
        ),
        (
            "add to socket_0",
            Box::new(|| add("socket_0", b.ptr, b.len, None, PAGE_4K)),
            |e| matches!(e, HeapError::NativeHeap { .. }),
            "only external heaps",
        ),
        (
            "add to an unknown heap",
            Box::new(|| add("nosuch", b.ptr, b.len, None, PAGE_4K)),
            |e| matches!(e, HeapError::NoSuchHeap { .. }),
            "nosuch",
        ),
        (
            "page size 0",
            Box::new(|| add("ext_other", b.ptr, b.len, None, 0)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "page size 0",
        ),
        (
            "page size not a power of two",
            Box::new(|| add("ext_other", b.ptr, b.len, None, 3 * PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "not a power of two",
        ),
        (
            "page size under 4 KiB",
            Box::new(|| add("ext_other", b.ptr, b.len, None, 2048)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "at least 4096",
        ),
        (
            "misaligned start",
            Box::new(|| add("ext_other", b.at(64), 8 * PAGE_4K, None, PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "multiples of the page size",
        ),
        (
            "misaligned length",
            Box::new(|| add("ext_other", b.ptr, 8 * PAGE_4K + 64, None, PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "multiples of the page size",
        ),
        (
            "4 KiB memory as 2 MiB pages",
            Box::new(|| {
                add(
                    "ext_other",
                    NonNull::new((b.addr() | PAGE_4K) as *mut u8).unwrap(),
                    PAGE_2M,
                    None,
                    PAGE_2M,
                )
            }),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "multiples of the page size",
        ),
        (
            "length 0",
            Box::new(|| add("ext_other", b.ptr, 0, None, PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "length 0",
        ),
        (
            "IOVA count mismatch",
            Box::new(|| add("ext_other", b.ptr, b.len, Some(&fifteen), PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "15 IOVAs given for 16 pages",
        ),
        (
            "overlapping chunk, with IOVAs",
            Box::new(|| {
                add(
                    "ext_other",
                    a.at(4 * PAGE_4K),
                    4 * PAGE_4K,
                    Some(&iovas[..4]),
                    PAGE_4K,
                )
            }),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "overlaps external memory",
        ),
        (
            "the same chunk again, same heap",
            Box::new(|| add("ext_bad", a.ptr, a.len, Some(&iovas), PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "overlaps external memory",
        ),
        (
            "overlapping from below",
            Box::new(|| {
                // `b` may sit right below `a` or anywhere else: a range ending
                // inside `a` that starts one page before it.
                add(
                    "ext_other",
                    NonNull::new((a.addr() - PAGE_4K) as *mut u8).unwrap(),
                    2 * PAGE_4K,
                    None,
                    PAGE_4K,
                )
            }),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "overlaps external memory",
        ),
        (
            "registering a heap's chunk",
            Box::new(|| reg(a.ptr, a.len, None, PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "overlaps external memory",
        ),
        (
            "memplane's own reservation",
            Box::new(|| add("ext_other", base, PAGE_2M, None, PAGE_2M)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "reservation",
        ),
        (
            "straddling the end of the reservation",
            Box::new(|| {
                add(
                    "ext_other",
                    NonNull::new((res_end - PAGE_4K) as *mut u8).unwrap(),
                    2 * PAGE_4K,
                    None,
                    PAGE_4K,
                )
            }),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "reservation",
        ),
        (
            "registering the reservation",
            Box::new(|| reg(base, PAGE_4K, Some(&[0x1000]), PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "reservation",
        ),
        (
            "wrapping around",
            Box::new(|| add("ext_other", wrap, 2 * PAGE_4K, None, PAGE_4K)),
            |e| matches!(e, HeapError::BadExtMem { .. }),
            "wraps",
        ),
        (
            "remove an unknown chunk",
            Box::new(|| mem.heap_memory_remove("ext_bad", b.ptr, b.len).unwrap_err()),
            |e| matches!(e, HeapError::NoSuchChunk { .. }),
            "in heap \"ext_bad\"",
        ),
        (
            "remove with the wrong length",
            Box::new(|| {
                mem.heap_memory_remove("ext_bad", a.ptr, a.len / 2)
                    .unwrap_err()
            }),
            |e| matches!(e, HeapError::NoSuchChunk { .. }),
            "in heap",
        ),
        (
            "remove from another heap",
            Box::new(|| {
                mem.heap_memory_remove("ext_other", a.ptr, a.len)
                    .unwrap_err()
            }),
            |e| matches!(e, HeapError::NoSuchChunk { .. }),
            "in heap \"ext_other\"",
        ),
        (
            "remove from socket_0",
            Box::new(|| {
                mem.heap_memory_remove("socket_0", a.ptr, a.len)
                    .unwrap_err()
            }),
            |e| matches!(e, HeapError::NativeHeap { .. }),
            "only external heaps",
        ),
        (
            "remove from an unknown heap",
            Box::new(|| mem.heap_memory_remove("nosuch", a.ptr, a.len).unwrap_err()),
            |e| matches!(e, HeapError::NoSuchHeap { .. }),
            "nosuch",
        ),
        (
            "unregister what was never registered",
            Box::new(|| mem.extmem_unregister(b.ptr, b.len).unwrap_err()),
            |e| matches!(e, HeapError::NoSuchChunk { .. }),
            "registered",
        ),
        (
            "unregister a heap's chunk",
            Box::new(|| mem.extmem_unregister(a.ptr, a.len).unwrap_err()),
            |e| matches!(e, HeapError::NoSuchChunk { .. }),
            "registered",
        ),
        (
            "socket of an unknown heap",
            Box::new(|| mem.heap_socket("nosuch").unwrap_err()),
            |e| matches!(e, HeapError::NoSuchHeap { .. }),
            "nosuch",
        ),
    ];
    for (what, call, kind, text) in cases {
        let e = call();
        let shown = e.to_string();
        let h = heap_err(e);
        assert!(kind(&h), "{what}: wrong error kind: {h:?}");
        assert!(shown.contains(text), "{what}: {shown:?} lacks {text:?}");
        assert_eq!(snapshot(&mem), snap, "{what}: changed something");
    }
    assert_eq!(
        events.lock().unwrap().len(),
        n_events,
        "no event for refused calls"
    );
    mem.heap_validate().unwrap();

    // A 31-byte name is fine.
    let name31 = "n".repeat(31);
    let s = mem.heap_create(&name31).unwrap();
    assert_eq!(mem.heap_socket(&name31).unwrap(), s);
    mem.heap_destroy(&name31).unwrap();
    assert_eq!(snapshot(&mem), snap);

    mem.heap_memory_remove("ext_bad", a.ptr, a.len).unwrap();
    mem.heap_destroy("ext_bad").unwrap();
    mem.heap_destroy("ext_other").unwrap();
    assert!(mem.ext_chunks().is_empty());
    assert!(mem.heaps().iter().all(|h| h.kind == HeapKind::Native));
    mem.heap_validate().unwrap();
}

#[test]
fn tables_fill_up_and_name_their_option() {
    if !need_hugepages(2048, 2) {
        return;
    }
    let _pool = pool_lock(false);
    let (o, _rt) = opts_with("full", &["--max-heaps", "4", "--max-memseg-lists", "8"]);
    let mem = init(&o);
    let natives = mem.heaps().len();
    assert!(natives < 4, "one native heap per node: {natives}");

    let mut sockets = Vec::new();
    for i in 0..4 - natives {
        sockets.push(mem.heap_create(&format!("h{i}")).unwrap());
    }
    let mut sorted = sockets.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), sockets.len(), "distinct socket ids");
    assert!(sockets.iter().all(|&s| s >= EXTERNAL_SOCKET_BASE));
    let snap = snapshot(&mem);
    let e = mem.heap_create("one_too_many").unwrap_err();
    let shown = e.to_string();
    let h = heap_err(e);
    assert!(matches!(h, HeapError::TableFull { max: 4, .. }), "{h:?}");
    assert!(shown.contains("--max-heaps"), "{shown}");
    assert_eq!(snapshot(&mem), snap, "a full table changed nothing");
    // A freed slot is used again (its socket id may be reused: memplane
    // numbers external heaps by slot, DPDK counts up and never reuses).
    let last = sockets.len() - 1;
    mem.heap_destroy(&format!("h{last}")).unwrap();
    let again = mem.heap_create("again").unwrap();
    assert!(again >= EXTERNAL_SOCKET_BASE && !sockets[..last].contains(&again));
    assert_eq!(mem.heap_socket("again").unwrap(), again);
    assert!(mem.heap_create("and_again").is_err());

    // The external memory table holds --max-memseg-lists entries.
    let map = UserMap::anon(16);
    let mut n = 0;
    let err = loop {
        // SAFETY: our mapping, one distinct page per entry, unregistered
        // below.
        match unsafe { mem.extmem_register(map.at(n * PAGE_4K), PAGE_4K, None, PAGE_4K) } {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 16, "the table never filled up");
    };
    assert_eq!(n, 8);
    let shown = err.to_string();
    assert!(
        matches!(heap_err(err), HeapError::TableFull { max: 8, .. }),
        "{shown}"
    );
    assert!(shown.contains("--max-memseg-lists"), "{shown}");
    assert_eq!(mem.ext_chunks().len(), 8);
    for i in 0..n {
        mem.extmem_unregister(map.at(i * PAGE_4K), PAGE_4K).unwrap();
    }
    assert!(mem.ext_chunks().is_empty());
    for h in mem.heaps() {
        if h.kind == HeapKind::External {
            mem.heap_destroy(&h.name).unwrap();
        }
    }
    assert_eq!(mem.heaps().len(), natives);
    let e = mem.heap_create(&"x".repeat(32)).unwrap_err();
    assert!(matches!(heap_err(e), HeapError::BadName { .. }));
}

// --- random sequences on an external heap ----------------------------------------

mod random {
    use super::*;

    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    use memplane::heap::HeapStats;

    #[derive(Debug, Clone)]
    pub enum Op {
        Alloc {
            size: usize,
            align: usize,
            zero: bool,
        },
        /// `heap_alloc` with a boundary (`size.next_power_of_two() <<
        /// shift`) and/or IOVA contiguity.
        Constrained {
            size: usize,
            align: usize,
            shift: Option<u32>,
            contig: bool,
        },
        Realloc {
            pick: Index,
            size: usize,
            align: usize,
        },
        Free {
            pick: Index,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = prop_oneof![4 => 1usize..=512, 3 => 512usize..=8192, 1 => 8192usize..=96 * KB];
        let align = prop_oneof![3 => Just(0usize), 1 => (6u32..=14).prop_map(|e| 1usize << e)];
        prop_oneof![
            4 => (size.clone(), align.clone(), any::<bool>())
                .prop_map(|(size, align, zero)| Op::Alloc { size, align, zero }),
            2 => (size.clone(), align.clone(), proptest::option::of(0u32..3), any::<bool>())
                .prop_map(|(size, align, shift, contig)| Op::Constrained { size, align, shift, contig }),
            2 => (any::<Index>(), size, align)
                .prop_map(|(pick, size, align)| Op::Realloc { pick, size, align }),
            3 => any::<Index>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    #[derive(Debug, Clone, Copy)]
    struct Block {
        ptr: NonNull<u8>,
        size: usize,
        align: usize,
        bound: usize,
        contig: bool,
        fill: u8,
    }

    /// Chunks of the test's mapping given to the heap: (offset, length).
    /// The first two are adjacent (they must never merge); then a gap.
    const CHUNKS: [(usize, usize); 3] = [(0, 64 * KB), (64 * KB, 128 * KB), (256 * KB, 256 * KB)];
    /// IOVA of the last chunk's first page. Only that chunk has IOVAs:
    /// its first half is contiguous, and so is its second half, elsewhere.
    const IOVA_BASE: u64 = 0x5000_0000;
    const IOVA_JUMP: u64 = 1 << 30;

    /// The IOVA of byte `off` of the last chunk.
    fn iova_at(off: usize) -> u64 {
        let half = CHUNKS[CHUNKS.len() - 1].1 / 2;
        IOVA_BASE + off as u64 + if off >= half { IOVA_JUMP } else { 0 }
    }

    struct Case<'a> {
        mem: &'a Memory,
        map: &'a UserMap,
        name: &'static str,
        sock: i32,
        live: Vec<Block>,
        added: Vec<(usize, usize)>,
        fills: u32,
    }

    impl Drop for Case<'_> {
        fn drop(&mut self) {
            for b in self.live.drain(..) {
                // SAFETY: a live block of the heap, not used after this.
                let _ = unsafe { self.mem.free(b.ptr) };
            }
            for (off, len) in self.added.drain(..) {
                let _ = self
                    .mem
                    .heap_memory_remove(self.name, self.map.at(off), len);
            }
            let _ = self.mem.heap_destroy(self.name);
        }
    }

    fn fail(msg: String) -> TestCaseError {
        TestCaseError::fail(msg)
    }

    fn first_not(p: NonNull<u8>, len: usize, byte: u8) -> Option<usize> {
        // SAFETY: a live block of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(p.as_ptr(), len) }
            .iter()
            .position(|&b| b != byte)
    }

    impl Case<'_> {
        fn stats(&self) -> HeapStats {
            self.mem.heap_stats(self.sock).unwrap()
        }

        /// The chunk holding `[a, a+len)` whole, if one does.
        fn chunk_of(&self, a: usize, len: usize) -> Option<usize> {
            self.added.iter().position(|&(off, clen)| {
                let start = self.map.addr() + off;
                a >= start && a + len <= start + clen
            })
        }

        /// A refusal must be OutOfMemory, change nothing, and be right:
        /// no free element could have held the block wherever it starts.
        fn refused(
            &self,
            what: &str,
            e: Error,
            before: &HeapStats,
            size: usize,
            align: usize,
        ) -> Result<(), TestCaseError> {
            let shown = e.to_string();
            let h = heap_err(e);
            prop_assert!(
                matches!(h, HeapError::OutOfMemory { .. }),
                "{}: {}",
                what,
                shown
            );
            prop_assert!(shown.contains("external heaps do not grow"), "{}", shown);
            let after = self.stats();
            prop_assert_eq!(&after, before, "{} refused but changed the heap", what);
            let worst = size.next_multiple_of(64) as u64 + align.max(64) as u64 - 64;
            prop_assert!(
                after.greatest_free < worst,
                "{}({}, align {}) refused with a free block of {}: {}",
                what,
                size,
                align,
                after.greatest_free,
                shown
            );
            Ok(())
        }

        fn admit(&mut self, p: NonNull<u8>, size: usize, align: usize, fill: u8) {
            self.admit_with(Block {
                ptr: p,
                size,
                align,
                bound: 0,
                contig: false,
                fill,
            });
        }

        fn admit_with(&mut self, b: Block) {
            // SAFETY: a live block of `size` bytes.
            unsafe { std::ptr::write_bytes(b.ptr.as_ptr(), b.fill, b.size) };
            self.live.push(b);
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            self.fills += 1;
            let fill = (self.fills % 255 + 1) as u8;
            let before = self.stats();
            match *op {
                Op::Alloc { size, align, zero } => {
                    let r = if zero {
                        self.mem.zmalloc_socket(size, align, self.sock)
                    } else {
                        self.mem.malloc_socket(size, align, self.sock)
                    };
                    match r {
                        Ok(p) => {
                            if zero {
                                if let Some(i) = first_not(p, size, 0) {
                                    return Err(fail(format!(
                                        "zmalloc({size}) at {p:p}: byte {i} not zero"
                                    )));
                                }
                            }
                            self.admit(p, size, align, fill);
                        }
                        Err(e) => self.refused("malloc", e, &before, size, align)?,
                    }
                }
                Op::Constrained {
                    size,
                    align,
                    shift,
                    contig,
                } => {
                    let bound = shift.map_or(0, |s| size.next_power_of_two() << s);
                    let mut req = AllocRequest::new(size)
                        .align(align)
                        .bound(bound)
                        .socket(self.sock);
                    if contig {
                        req = req.contig();
                    }
                    match self.mem.heap_alloc(&req) {
                        Ok(ptr) => self.admit_with(Block {
                            ptr,
                            size,
                            align,
                            bound,
                            contig,
                            fill,
                        }),
                        Err(e) => {
                            // Where the block could have gone is not simple
                            // to say here: only the kind and "nothing
                            // changed".
                            let shown = e.to_string();
                            let h = heap_err(e);
                            prop_assert!(
                                matches!(h, HeapError::OutOfMemory { .. }),
                                "{:?}: {}",
                                req,
                                shown
                            );
                            prop_assert_eq!(&self.stats(), &before, "{:?} refused", req);
                        }
                    }
                }
                Op::Realloc { pick, size, align } => {
                    if self.live.is_empty() {
                        return Ok(());
                    }
                    let i = pick.index(self.live.len());
                    let old = self.live[i];
                    // SAFETY: a live block; on success the model drops the
                    // old pointer, on failure it stays valid.
                    match unsafe {
                        self.mem
                            .realloc_socket(Some(old.ptr), size, align, self.sock)
                    } {
                        Ok(p) => {
                            let keep = old.size.min(size);
                            if let Some(at) = first_not(p, keep, old.fill) {
                                return Err(fail(format!(
                                    "realloc {old:?} -> {p:p} ({size}): byte {at} lost"
                                )));
                            }
                            self.live.swap_remove(i);
                            self.admit(p, size, align, old.fill);
                        }
                        Err(e) => {
                            // A move needs a whole new block; growing in
                            // place may have failed for lack of a free
                            // neighbour. Only the counters are compared.
                            let shown = e.to_string();
                            let h = heap_err(e);
                            prop_assert!(
                                matches!(h, HeapError::OutOfMemory { .. }),
                                "realloc: {}",
                                shown
                            );
                            prop_assert_eq!(&self.stats(), &before, "realloc refused: {}", shown);
                        }
                    }
                }
                Op::Free { pick } => {
                    if self.live.is_empty() {
                        return Ok(());
                    }
                    let b = self.live.swap_remove(pick.index(self.live.len()));
                    // SAFETY: a live block, dropped from the model.
                    unsafe { self.mem.free(b.ptr) }
                        .map_err(|e| fail(format!("free {b:?}: {e}")))?;
                }
            }
            Ok(())
        }

        fn check(&self) -> Result<(), TestCaseError> {
            let mut spans = Vec::new();
            let mut usable_sum = 0u64;
            for b in &self.live {
                let a = b.ptr.as_ptr() as usize;
                prop_assert_eq!(a % b.align.max(64), 0, "{:?} misaligned", b);
                if let Some(at) = first_not(b.ptr, b.size, b.fill) {
                    return Err(fail(format!("{b:?}: byte {at} changed")));
                }
                let usable = self
                    .mem
                    .malloc_usable_size(b.ptr)
                    .map_err(|e| fail(format!("{b:?}: {e}")))?;
                prop_assert!(usable >= b.size);
                let Some(chunk) = self.chunk_of(a - 64, usable + 64) else {
                    return Err(fail(format!(
                        "{b:?} (usable {usable}) is not inside one chunk"
                    )));
                };
                // Only the last chunk has IOVAs.
                let start = self.map.addr() + self.added[chunk].0;
                let last = chunk == CHUNKS.len() - 1;
                let iova = last.then(|| iova_at(a - start));
                prop_assert_eq!(self.mem.malloc_virt2iova(b.ptr), iova, "{:?}", b);
                if b.bound != 0 {
                    let above = !(b.bound - 1);
                    prop_assert_eq!(a & above, (a + b.size - 1) & above, "{:?} crosses", b);
                }
                if b.contig {
                    prop_assert!(last, "{:?}: IOVA-contiguous outside the IOVA chunk", b);
                    prop_assert_eq!(
                        iova_at(a + b.size - 1 - start),
                        iova_at(a - start) + b.size as u64 - 1,
                        "{:?} is not IOVA-contiguous",
                        b
                    );
                }
                usable_sum += usable as u64 + 64;
                spans.push((a - 64, a + usable));
            }
            spans.sort_unstable();
            for w in spans.windows(2) {
                prop_assert!(w[0].1 <= w[1].0, "blocks overlap: {:x?}", w);
            }
            // (Not deep: user memory is dirty, so the external heap has
            // nothing clean to check, and the native heap's clean memory
            // is not what this test is about; the case ends deep.)
            self.mem
                .heap_validate()
                .map_err(|e| fail(format!("heap_validate: {e}")))?;
            let st = self.stats();
            let total: usize = self.added.iter().map(|c| c.1).sum();
            prop_assert_eq!(st.total_bytes, total as u64, "{:?}", st);
            prop_assert_eq!(st.alloc_count, self.live.len() as u64, "{:?}", st);
            prop_assert_eq!(st.total_bytes, st.alloc_bytes + st.free_bytes, "{:?}", st);
            prop_assert_eq!(st.alloc_bytes, usable_sum, "{:?}", st);
            Ok(())
        }
    }

    pub fn run(flags: &[&str], tag: &str) {
        if !need_hugepages(2048, 2) {
            return;
        }
        let _pool = pool_lock(false);
        let (o, _rt) = opts_with(tag, flags);
        let mem = init(&o);
        let map = UserMap::anon(128);
        let natives = native_allocs(&mem);
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(128);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 1024,
            ..Config::default()
        });
        let result = runner.run(
            &(proptest::collection::vec(op(), 1..80), any::<u8>()),
            |(ops, dirt)| {
                map.scribble(dirt);
                let sock = mem
                    .heap_create("prop")
                    .map_err(|e| fail(format!("heap_create: {e}")))?;
                let mut case = Case {
                    mem: &mem,
                    map: &map,
                    name: "prop",
                    sock,
                    live: Vec::new(),
                    added: Vec::new(),
                    fills: 0,
                };
                for (i, &(off, len)) in CHUNKS.iter().enumerate() {
                    // The last chunk comes with IOVAs.
                    let iovas: Vec<u64> = (0..len / PAGE_4K)
                        .map(|p| iova_at(p * PAGE_4K))
                        .collect();
                    let table = (i == CHUNKS.len() - 1).then_some(iovas.as_slice());
                    // SAFETY: our mapping, removed from the heap when the
                    // case ends.
                    unsafe { mem.heap_memory_add("prop", map.at(off), len, table, PAGE_4K) }
                        .map_err(|e| fail(format!("heap_memory_add: {e}")))?;
                    case.added.push((off, len));
                }
                case.check()?;
                for (i, op) in ops.iter().enumerate() {
                    case.step(op)
                        .and_then(|()| case.check())
                        .map_err(|e| fail(format!("step {i} ({op:?}): {e}")))?;
                }
                while let Some(b) = case.live.pop() {
                    // SAFETY: a live block, dropped from the model.
                    unsafe { mem.free(b.ptr) }.map_err(|e| fail(format!("free: {e}")))?;
                }
                case.check()?;
                mem.heap_validate_deep()
                    .map_err(|e| fail(format!("heap_validate_deep: {e}")))?;
                let st = case.stats();
                prop_assert_eq!(
                    st.free_count,
                    CHUNKS.len() as u64,
                    "one free element per chunk once all is free (adjacent chunks do not merge): {:?}",
                    st
                );
                for (off, len) in std::mem::take(&mut case.added) {
                    mem.heap_memory_remove("prop", map.at(off), len)
                        .map_err(|e| fail(format!("heap_memory_remove: {e}")))?;
                }
                mem.heap_destroy("prop")
                    .map_err(|e| fail(format!("heap_destroy: {e}")))?;
                prop_assert!(mem.ext_chunks().is_empty());
                prop_assert_eq!(native_allocs(&mem), natives, "IOVA tables freed");
                Ok(())
            },
        );
        if let Err(e) = result {
            panic!("{tag}: {e}");
        }
        mem.heap_validate().unwrap();
        assert!(mem.heaps().iter().all(|h| h.kind == HeapKind::Native));
    }
}

#[test]
fn random_sequences_on_an_external_heap() {
    random::run(&[], "rnd");
}

#[test]
fn random_sequences_on_an_external_heap_match_allocations() {
    random::run(&["--match-allocations"], "rndm");
}

#[test]
fn external_socket_ids_are_never_reused() {
    let _pool = common::pool_lock(false);
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("hx_ids_{}", std::process::id());
    let o = memplane::MemOptions::parse_args(&[
        "--file-prefix",
        &prefix,
        "--runtime-dir",
        &dir.path().display().to_string(),
        "--no-huge",
        "-m",
        "4",
    ])
    .unwrap();
    let mem = memplane::Memory::init(&o).unwrap();
    let a = mem.heap_create("ids-a").unwrap();
    mem.heap_destroy("ids-a").unwrap();
    let b = mem.heap_create("ids-b").unwrap();
    assert!(a >= 256 && b > a, "ids {a} then {b}");
    assert!(
        mem.heap_stats(a).is_err(),
        "the destroyed heap's id leads nowhere"
    );
    assert_eq!(mem.heap_socket("ids-b").unwrap(), b);
    mem.heap_destroy("ids-b").unwrap();
}
