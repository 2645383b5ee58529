//! Primary and secondary processes on real hugepages. The test binary
//! re-executes itself as the secondary (`MP_CHILD_ROLE` selects what it
//! does); the two sides talk over the child's stdin/stdout, one line per
//! step.

// Zones are 64-byte aligned: u64 reads and writes at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memseg::{MemEvent, MemEventKind, PageRequest};
use memplane::memzone::MemzoneFlags;
use memplane::mp::MpError;
use memplane::{Error, MemOptions, Memory, PageSize};

use common::{need_hugepages, pool_lock};

/// The test binary's allocator: the system's, except that a thread that
/// armed [`STALL_AT_NEXT_ALLOC`] is parked for good at its next
/// allocation, after saying `@stalled` on stdout. A child uses it to stop
/// inside a zone walk (which allocates as it copies the zones) so the
/// parent can kill it there, deterministically.
struct StallingAlloc;

thread_local! {
    static STALL_AT_NEXT_ALLOC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn stall_if_armed() {
    if STALL_AT_NEXT_ALLOC
        .try_with(|s| s.replace(false))
        .unwrap_or(false)
    {
        let msg = b"\n@stalled\n";
        // SAFETY: writes a static buffer to stdout (no allocation, nothing
        // of Rust's buffered stdout is touched: it was flushed by `tell`).
        let _ = unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
        loop {
            // SAFETY: sleeps until a signal; the parent SIGKILLs us.
            unsafe { libc::pause() };
        }
    }
}

// SAFETY: forwards to the system allocator; the stall only sleeps.
unsafe impl std::alloc::GlobalAlloc for StallingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        stall_if_armed();
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        stall_if_armed();
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        stall_if_armed();
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: StallingAlloc = StallingAlloc;

const ROLE: &str = "MP_CHILD_ROLE";
const PREFIX: &str = "MP_CHILD_PREFIX";
const RUNDIR: &str = "MP_CHILD_RUNDIR";
const MB: usize = 1 << 20;

fn opts(prefix: &str, rundir: &str, extra: &[&str]) -> MemOptions {
    let mut args = vec!["--file-prefix", prefix, "--runtime-dir", rundir];
    args.extend_from_slice(extra);
    MemOptions::parse_args(&args).unwrap()
}

/// Printed (on stderr) by a child's panic hook: a child that panics on its
/// own fails the test even if the parent kills it afterwards anyway.
const CHILD_PANIC: &str = "MP-CHILD-PANICKED";

/// A secondary child process and the line channel to it.
struct Secondary {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    /// Everything the child wrote on stderr so far (echoed to ours too).
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Secondary {
    fn spawn(role: &str, prefix: &str, rundir: &str) -> Secondary {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "secondary_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(PREFIX, prefix)
            .env(RUNDIR, rundir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let (pipe, buf) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
            Some(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[secondary] {line}");
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            }))
        };
        Secondary {
            child,
            to,
            from,
            stderr,
            stderr_reader,
        }
    }

    /// The child's stderr; complete once the child has been reaped.
    fn stderr_text(&mut self) -> String {
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
        }
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILLs a child that must still be running, and fails (with the
    /// child's stderr) if it had died on its own: exited, panicked (its
    /// hook prints [`CHILD_PANIC`]) or was ended by another signal.
    fn kill_running(mut self, what: &str) {
        let early = self.child.try_wait().unwrap();
        let _ = self.child.kill();
        let st = self.child.wait().unwrap();
        let err = self.stderr_text();
        assert!(
            early.is_none(),
            "{what}: the secondary died on its own ({st}) before it was killed; its stderr:\n{err}"
        );
        assert!(
            !err.contains(CHILD_PANIC),
            "{what}: the secondary panicked before it was killed; its stderr:\n{err}"
        );
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{what}: the secondary ended with {st}, not by our SIGKILL; its stderr:\n{err}"
        );
    }

    /// The next line the child printed that starts with "@" (the test
    /// harness prints its own lines too).
    fn expect(&mut self, want: &str) -> String {
        let mut line = String::new();
        let mut other = String::new();
        loop {
            line.clear();
            let n = self.from.read_line(&mut line).unwrap();
            if n == 0 {
                let st = self.child.wait().unwrap();
                let err = self.stderr_text();
                panic!("secondary exited ({st}) before saying {want:?}; its output:\n{other}\nits stderr:\n{err}");
            }
            other.push_str(&line);
            // The harness may print "test secondary_child ... " first.
            if let Some(msg) = line.trim().split_once('@').map(|(_, m)| m) {
                assert!(
                    msg.starts_with(want),
                    "secondary said {msg:?}, expected {want:?}"
                );
                return msg.to_string();
            }
        }
    }

    fn say(&mut self, what: &str) {
        writeln!(self.to, "{what}").unwrap();
        self.to.flush().unwrap();
    }

    fn wait_ok(mut self) {
        let st = self.child.wait().unwrap();
        let err = self.stderr_text();
        assert!(st.success(), "secondary failed: {st}; its stderr:\n{err}");
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        // A failed test must not leave a child holding hugepages.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Child side: prints `@...` lines, reads commands from stdin.
fn tell(what: &str) {
    println!("\n@{what}");
    std::io::stdout().flush().unwrap();
}

fn hear() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line.trim().to_string()
}

#[test]
fn secondary_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // not a child: nothing to do
    };
    // A panic anywhere in the child leaves a marker the parent looks for.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("{CHILD_PANIC} (pid {}): {info}", std::process::id());
        default_hook(info);
    }));
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    match role.as_str() {
        "share" => child_share(&prefix, &rundir),
        "events" => child_events(&prefix, &rundir),
        "churn" => child_churn(&prefix, &rundir),
        "zchurn" => child_zone_churn(&prefix, &rundir),
        "zlook" => child_zone_reader(&prefix, &rundir),
        "zstall" => child_zone_stall(&prefix, &rundir),
        "primary" => {
            // Far from the default base: the test process attaches to it
            // while other tests' primaries sit at the default.
            let mem = Memory::init(&opts(
                &prefix,
                &rundir,
                &["--base-virtaddr", "0x600000000000"],
            ))
            .unwrap();
            let z = mem
                .memzone_reserve("p", 4096, 0, MemzoneFlags::NONE)
                .unwrap();
            // SAFETY: our zone.
            unsafe { z.as_mut_ptr().write(42) };
            tell("ready");
            let _ = hear(); // killed before anything comes
            drop(mem);
        }
        "auto" => {
            let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "auto"])).unwrap();
            assert!(mem.is_secondary());
            tell(&format!("auto {}", mem.memzone_count()));
        }
        "idle" => {
            let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
            tell("ready");
            let _ = hear();
            drop(mem);
        }
        other => panic!("unknown role {other}"),
    }
}

fn child_share(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    // The primary's zone and its contents.
    let z = mem.memzone_lookup("from-primary").expect("primary's zone");
    // SAFETY: the primary wrote it before starting us and does not touch it.
    let bytes = unsafe { z.as_slice() };
    assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    // Heap growth from here: the primary maps the pages for everybody.
    let p = mem.malloc(8 * MB, 0).unwrap();
    // SAFETY: our fresh block.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5c, 8 * MB) };
    let z2 = mem
        .memzone_reserve("from-secondary", 64, SOCKET_ID_ANY, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: our zone.
    unsafe { z2.as_mut_ptr().cast::<u64>().write(p.as_ptr() as u64) };
    mem.heap_validate().unwrap();
    tell("done");
    // Wait until the primary looked, then free the block here: the heap
    // gives pages back through the primary.
    assert_eq!(hear(), "free");
    // SAFETY: our block, not used after.
    unsafe { mem.free(p).unwrap() };
    mem.heap_validate().unwrap();
    tell("freed");
}

fn child_events(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<MemEvent>::new()));
    let s = Arc::clone(&seen);
    mem.register_event_callback("rec", move |e| s.lock().unwrap().push(*e))
        .unwrap();
    tell("ready");
    // The primary maps 4 pages, writes them, then frees them.
    let va: usize = hear().parse().unwrap();
    // Mapped here already: read what the primary wrote.
    // SAFETY: the primary mapped and filled these pages and waits for us.
    let v = unsafe { std::ptr::read_volatile(va as *const u64) };
    assert_eq!(v, 0xfeed_f00d);
    tell("read");
    assert_eq!(hear(), "check");
    let evs = seen.lock().unwrap().clone();
    let kinds: Vec<(MemEventKind, usize, usize)> =
        evs.iter().map(|e| (e.kind, e.addr, e.len)).collect();
    tell(&format!("events {kinds:?}"));
    assert_eq!(
        kinds,
        vec![
            (MemEventKind::Alloc, va, 8 * MB),
            (MemEventKind::Free, va, 8 * MB)
        ]
    );
}

/// Allocates, frees, reserves and frees zones forever (until killed).
fn child_churn(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let me = std::process::id();
    let mut live = Vec::new();
    let mut zones = Vec::new();
    let mut seed = u64::from(me) | 1;
    for i in 0u64.. {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = match seed % 16 {
            0 => 3 * MB,
            1..=4 => 64 << (seed % 12),
            _ => 64 + (seed % 2000) as usize,
        };
        if let Ok(p) = mem.malloc(size, 0) {
            // SAFETY: our fresh block.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0xa5, size.min(4096)) };
            live.push(p);
        }
        if live.len() > 64 || seed % 3 == 0 {
            if let Some(p) = live.pop() {
                // SAFETY: our block, not used after.
                unsafe { mem.free(p).unwrap() };
            }
        }
        if seed % 5 == 0 {
            if let Ok(z) = mem.memzone_reserve(
                &format!("churn-{me}-{i}"),
                64 + (seed % 5000) as usize,
                SOCKET_ID_ANY,
                MemzoneFlags::NONE,
            ) {
                zones.push(z);
            }
        }
        if zones.len() > 8 {
            zones.remove(0).free().unwrap();
        }
        if i == 50 {
            tell("ready");
        }
    }
}

/// Reserves and frees its own zones as fast as it can (until killed), so a
/// kill often lands while it holds the memzone table lock. Every free of
/// its own zone must succeed.
fn child_zone_churn(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let me = std::process::id();
    let mut zones = std::collections::VecDeque::new();
    let mut seed = u64::from(me) | 1;
    for i in 0u64.. {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let z = mem
            .memzone_reserve(
                &format!("zchurn-{me}-{i}"),
                64 + (seed % 3000) as usize,
                SOCKET_ID_ANY,
                MemzoneFlags::NONE,
            )
            .unwrap();
        zones.push_back(z);
        if zones.len() > 12 || seed % 4 == 0 {
            let z = zones.pop_front().unwrap();
            let name = z.name().to_string();
            z.free()
                .unwrap_or_else(|e| panic!("freeing my own zone {name}: {e}"));
        }
        if i == 20 {
            tell("ready");
        }
    }
}

/// Zones the primary of the reader tests reserves first and keeps: the
/// readers check they always see all of them.
const STABLE_ZONES: usize = 300;

fn stable_name(k: usize) -> String {
    format!("stable-{k}")
}

/// Stable zone `k`'s length: the readers check each zone they see has
/// its own (a torn read would mix entries up).
fn stable_len(k: usize) -> usize {
    64 * (1 + k % 5)
}

/// Looks zones up, reads the table's counters, walks and dumps the table
/// (until killed), checking what it sees against the stable zones the
/// primary keeps while the primary's other zones come and go.
fn child_zone_reader(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let mut seed = u64::from(std::process::id()) | 1;
    for round in 0u64.. {
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let k = (seed % STABLE_ZONES as u64) as usize;
            let name = stable_name(k);
            let z = mem
                .memzone_lookup(&name)
                .unwrap_or_else(|| panic!("{name} not found"));
            assert_eq!((z.name(), z.len()), (name.as_str(), stable_len(k)));
            assert!(mem.memzone_lookup(&format!("absent-{k}")).is_none());
        }
        let st = mem.memzone_stats();
        assert!(st.count as usize >= STABLE_ZONES, "{st:?}");
        assert!(st.reserves >= st.frees + STABLE_ZONES as u64, "{st:?}");
        let mut seen = 0;
        mem.memzone_walk(|z| {
            if let Some(k) = z.name.strip_prefix("stable-") {
                let k: usize = k.parse().unwrap();
                assert_eq!(z.len, stable_len(k), "{z:?}");
                seen += 1;
            }
        });
        assert_eq!(seen, STABLE_ZONES);
        if round % 4 == 0 {
            mem.memzone_dump(&mut std::io::sink()).unwrap();
        }
        if round == 1 {
            tell("ready");
        }
    }
}

/// Stops for good inside a zone walk or dump (see [`StallingAlloc`]).
fn child_zone_stall(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.memzones().len() >= 2);
    tell("ready");
    let what = hear();
    STALL_AT_NEXT_ALLOC.with(|s| s.set(true));
    match what.as_str() {
        "walk" => mem.memzone_walk(|_| {}),
        "dump" => mem.memzone_dump(&mut std::io::sink()).unwrap(),
        other => panic!("unknown command {other}"),
    }
    STALL_AT_NEXT_ALLOC.with(|s| s.set(false));
    tell("did not stall");
}

/// Runs `f` (table writes) on a thread and fails if it takes longer than
/// `limit`: a writer wedged by a dead reader waits for ever, and the test
/// must say so rather than hang.
fn within<R: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|e| {
        panic!(
            "{what}: memzone table writers still waiting after {:?} ({e}): wedged by a killed reader",
            t.elapsed()
        )
    })
}

/// Reserves and frees a zone, and frees and reserves stable zone `k`
/// again: every kind of table write.
fn write_the_table(mem: &Memory, tag: &str, k: usize) {
    let z = mem
        .memzone_reserve(tag, 4096, SOCKET_ID_ANY, MemzoneFlags::NONE)
        .unwrap();
    z.free().unwrap();
    let name = stable_name(k);
    mem.memzone_lookup(&name).unwrap().free().unwrap();
    mem.memzone_reserve(&name, stable_len(k), SOCKET_ID_ANY, MemzoneFlags::NONE)
        .unwrap();
}

fn reserve_stable_zones(mem: &Memory, n: usize) {
    for k in 0..n {
        mem.memzone_reserve(
            &stable_name(k),
            stable_len(k),
            SOCKET_ID_ANY,
            MemzoneFlags::NONE,
        )
        .unwrap();
    }
}

fn free_stable_zones(mem: &Memory, n: usize) {
    for k in 0..n {
        mem.memzone_lookup(&stable_name(k)).unwrap().free().unwrap();
    }
}

/// Checks that every zone the table lists is found under its name at its
/// own index (two zones sharing an entry, or an index that lost a name,
/// show up here).
fn check_zone_table(mem: &Memory, what: &str) {
    let zones = mem.memzones();
    let mut seen = std::collections::HashSet::new();
    for z in &zones {
        assert!(
            seen.insert(z.index),
            "{what}: entry {} listed twice",
            z.index
        );
        let found = mem.memzone_lookup(&z.name).unwrap_or_else(|| {
            panic!(
                "{what}: zone {} (entry {}) not found by name",
                z.name, z.index
            )
        });
        assert_eq!(
            found.index(),
            z.index,
            "{what}: zone {} found at another entry",
            z.name
        );
    }
    // The count may be higher: it includes claims a killed reserver left
    // (dropped only when the table is rebuilt or the name claimed again).
    assert!(
        mem.memzone_count() >= zones.len(),
        "{what}: count {} below the {} zones listed",
        mem.memzone_count(),
        zones.len()
    );
}

/// Fails if fewer 2 MiB pages are free than `before`, once every page of
/// this process's instances went back. The counter is the machine's: other
/// programs (another checkout's tests or benchmarks, which do not take
/// [`pool_lock`]) may hold pages for a moment (seen: a benchmark holding 6
/// pages as the check ran) or give some back meanwhile, so more free pages
/// pass, and fewer are looked at again for a while; pages this process
/// lost stay lost.
fn assert_no_hugepages_lost(before: u64, what: &str) {
    let t = Instant::now();
    loop {
        let now = common::real_counter(2048, "free_hugepages");
        if now >= before {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "hugepages lost {what}: {now} free after {:?}, {before} before",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn setup(tag: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (format!("mp_{tag}_{}", std::process::id()), dir)
}

#[test]
fn secondary_sees_zones_allocates_through_the_primary_and_frees() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("share");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let z = mem
        .memzone_reserve("from-primary", 100_000, 0, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: our fresh zone.
    let bytes = unsafe { z.as_mut_slice() };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let total_before = mem.heap_stats(0).unwrap().total_bytes;
    let mut sec = Secondary::spawn("share", &prefix, &rundir);
    sec.expect("done");
    // The secondary's block: allocated there, visible here.
    let zs = mem.memzone_lookup("from-secondary").unwrap();
    // SAFETY: the secondary wrote the address and waits.
    let addr = unsafe { zs.as_ptr().cast::<u64>().read() } as usize;
    // SAFETY: the block is 8 MiB, mapped here by the primary's growth.
    let block = unsafe { std::slice::from_raw_parts(addr as *const u8, 8 * MB) };
    assert!(block.iter().all(|&b| b == 0x5c));
    assert!(mem.heap_stats(0).unwrap().total_bytes >= total_before + 8 * MB as u64);
    sec.say("free");
    sec.expect("freed");
    sec.wait_ok();
    mem.heap_validate().unwrap();
    // The secondary's zone may sit in the last page its block needed.
    zs.free().unwrap();
    mem.heap_cache_flush();
    assert_eq!(
        mem.heap_stats(0).unwrap().total_bytes,
        total_before,
        "the pages the secondary's block needed went back"
    );
    z.free().unwrap();
}

#[test]
fn secondary_follows_page_changes_with_events_in_order() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("ev");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let mut sec = Secondary::spawn("events", &prefix, &rundir);
    sec.expect("ready");
    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap();
    let run = runs[0];
    // SAFETY: our fresh pages.
    unsafe { (run.va as *mut u64).write_volatile(0xfeed_f00d) };
    sec.say(&run.va.to_string());
    sec.expect("read");
    mem.free_pages(run.va, run.len).unwrap();
    sec.say("check");
    let got = sec.expect("events");
    eprintln!("secondary saw: {got}");
    sec.wait_ok();
}

#[test]
fn auto_becomes_secondary_and_a_killed_secondary_does_not_wedge_the_primary() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("kill");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let z = mem.memzone_reserve("z", 64, 0, MemzoneFlags::NONE).unwrap();
    let mut auto = Secondary::spawn("auto", &prefix, &rundir);
    assert_eq!(auto.expect("auto"), "auto 1");
    auto.wait_ok();
    // A secondary killed while attached: the next page change skips it.
    let mut idle = Secondary::spawn("idle", &prefix, &rundir);
    idle.expect("ready");
    idle.child.kill().unwrap();
    idle.child.wait().unwrap();
    let t = Instant::now();
    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap();
    mem.free_pages(runs[0].va, runs[0].len).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a dead secondary held up the primary for {:?}",
        t.elapsed()
    );
    z.free().unwrap();
    mem.heap_validate().unwrap();
}

#[test]
fn attach_errors_name_the_problem() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("err");
    let rundir = dir.path().to_str().unwrap().to_string();
    // No primary.
    let e = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::NoPrimary { .. })), "{e}");
    assert!(e.to_string().contains("start the primary first"), "{e}");
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    // Options that must agree.
    let e = Memory::init(&opts(
        &prefix,
        &rundir,
        &["--proc-type", "secondary", "--single-file-segments"],
    ))
    .unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::Refused { .. })), "{e}");
    assert!(
        e.to_string().contains("--single-file-segments") && e.to_string().contains("primary"),
        "{e}"
    );
    // In this very process the primary's range is taken (by the primary):
    // the error names the mapping and a base that is free.
    let e = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap_err();
    match &e {
        Error::Mp(MpError::VaConflict { base, suggest, .. }) => {
            assert_eq!(*base, mem.base_va());
            assert_ne!(suggest, base);
            assert!(e.to_string().contains("--base-virtaddr"), "{e}");
        }
        other => panic!("expected a VA conflict, got {other}"),
    }
    drop(mem);
}

#[test]
fn secondaries_killed_at_random_moments_leave_a_working_primary() {
    if !need_hugepages(2048, 64) {
        return;
    }
    let _pool = pool_lock(true);
    let free_before = common::real_counter(2048, "free_hugepages");
    let (prefix, dir) = setup("churn");
    let rundir = dir.path().to_str().unwrap().to_string();
    let rounds: u64 = std::env::var("MP_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    {
        let mem = Arc::new(Memory::init(&opts(&prefix, &rundir, &[])).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The primary keeps allocating and freeing meanwhile.
        let worker = {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = mem.malloc(1000 + (n % 300_000) as usize, 0).unwrap();
                    let z = mem
                        .memzone_reserve(&format!("prim-{}", n % 4), 256, 0, MemzoneFlags::NONE)
                        .unwrap();
                    // SAFETY: our block, not used after.
                    unsafe { mem.free(p).unwrap() };
                    z.free().unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut seed = 0x1234_5678_u64;
        let t = Instant::now();
        for round in 0..rounds {
            eprintln!("round {round}: spawn at {:?}", t.elapsed());
            let mut child = Secondary::spawn("churn", &prefix, &rundir);
            child.expect("ready");
            eprintln!("round {round}: ready at {:?}", t.elapsed());
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_micros(seed % 20_000));
            child.kill_running(&format!("round {round}"));
            eprintln!("round {round}: killed at {:?}", t.elapsed());
            let r = Instant::now();
            let p = mem.malloc(5 * MB, 0).unwrap();
            // SAFETY: our block.
            unsafe { mem.free(p).unwrap() };
            mem.heap_trim();
            mem.heap_validate()
                .unwrap_or_else(|e| panic!("round {round}: heap invalid after a kill: {e}"));
            eprintln!("round {round}: primary ok after {:?}", r.elapsed());
            assert!(
                !worker.is_finished(),
                "round {round}: the primary's worker stopped (panicked)"
            );
            assert!(
                r.elapsed() < Duration::from_secs(8),
                "round {round}: the primary needed {:?} after the kill",
                r.elapsed()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = worker.join().unwrap();
        eprintln!(
            "{rounds} kills in {:?}; the primary's worker did {n} rounds meanwhile",
            t.elapsed()
        );
        check_zone_table(&mem, "after the kills");
        // Zones of the dead stay (zones outlive their creator) until freed.
        let mut freed = 0;
        mem.memzone_walk(|z| {
            if z.name.starts_with("churn-") {
                freed += 1;
            }
        });
        for z in mem.memzones() {
            if z.name.starts_with("churn-") {
                mem.memzone_lookup(&z.name).unwrap().free().unwrap();
            }
        }
        eprintln!("{freed} zones of killed secondaries freed");
        mem.heap_validate().unwrap();
        let mem = Arc::try_unwrap(mem).unwrap();
        drop(mem);
    }
    assert_no_hugepages_lost(free_before, "after the kills");
}

/// The memzone side of the test above, aggressively: secondaries that do
/// little but reserve and free their own zones are killed after a short
/// random time (often inside the memzone table lock) while two primary
/// threads reserve and free zones too (often between the two halves of a
/// free). No live process may see its own zone go stale, no entry may be
/// handed out twice, and the table stays consistent.
#[test]
fn secondaries_killed_while_churning_zones_leave_live_zones_alone() {
    if !need_hugepages(2048, 64) {
        return;
    }
    let _pool = pool_lock(true);
    let free_before = common::real_counter(2048, "free_hugepages");
    let (prefix, dir) = setup("zchurn");
    let rundir = dir.path().to_str().unwrap().to_string();
    let rounds: u64 = std::env::var("MP_ZKILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    {
        let mem = Arc::new(Memory::init(&opts(&prefix, &rundir, &[])).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut held = std::collections::VecDeque::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let name = format!("prim-{w}-{}", n % 64);
                        let z = mem
                            .memzone_reserve(
                                &name,
                                64 + (n % 7) as usize * 512,
                                0,
                                MemzoneFlags::NONE,
                            )
                            .unwrap_or_else(|e| panic!("worker {w}: reserving {name}: {e}"));
                        held.push_back(z);
                        if held.len() > 3 {
                            let z = held.pop_front().unwrap();
                            let name = z.name().to_string();
                            z.free().unwrap_or_else(|e| {
                                panic!("worker {w}: freeing my own zone {name}: {e}")
                            });
                        }
                        n += 1;
                    }
                    for z in held {
                        let name = z.name().to_string();
                        z.free().unwrap_or_else(|e| {
                            panic!("worker {w}: freeing my own zone {name}: {e}")
                        });
                    }
                    n
                })
            })
            .collect();
        let mut seed = 0x9e37_79b9_u64;
        let t = Instant::now();
        let mut dead_pid = None;
        for round in 0..rounds {
            let mut child = Secondary::spawn("zchurn", &prefix, &rundir);
            child.expect("ready");
            // While this one churns, free the zones the previous one left
            // (zones reserved by a dead process, freed by a live one).
            if let Some(pid) = dead_pid.take() {
                let prefix = format!("zchurn-{pid}-");
                for z in mem.memzones() {
                    if z.name.starts_with(&prefix) {
                        let name = z.name.clone();
                        mem.memzone_lookup(&name)
                            .unwrap_or_else(|| panic!("round {round}: {name} not found"))
                            .free()
                            .unwrap_or_else(|e| panic!("round {round}: freeing {name}: {e}"));
                    }
                }
            }
            dead_pid = Some(child.child.id());
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_micros(seed % 3_000));
            child.kill_running(&format!("round {round}"));
            assert!(
                workers.iter().all(|w| !w.is_finished()),
                "round {round}: a primary worker stopped (panicked)"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!(
            "{rounds} kills in {:?}; the primary's workers did {n:?} rounds meanwhile",
            t.elapsed()
        );
        check_zone_table(&mem, "after the kills");
        // Zones of the dead stay until freed; nothing else is left.
        for z in mem.memzones() {
            assert!(z.name.starts_with("zchurn-"), "unexpected zone {z:?}");
            let name = z.name.clone();
            mem.memzone_lookup(&name)
                .unwrap()
                .free()
                .unwrap_or_else(|e| panic!("freeing {name} of a dead secondary: {e}"));
        }
        assert!(mem.memzones().is_empty());
        // A kill inside a heap split or merge leaves a chain the next
        // lock holder repairs (new headers are written before the write
        // that links them; a merge cut short is finished by the rebuild).
        mem.heap_validate()
            .unwrap_or_else(|e| panic!("heap damaged by the kills: {e}"));
        let mem = Arc::try_unwrap(mem).unwrap();
        drop(mem);
    }
    assert_no_hugepages_lost(free_before, "after the kills");
}

/// A secondary stopped for good in the middle of a zone walk (or dump)
/// and killed there must not hold up anybody's later table writes. (The
/// walk used to hold the table's read lock, which counts readers without
/// naming them: every later writer waited for ever.)
#[test]
fn a_secondary_killed_inside_a_zone_walk_does_not_wedge_writers() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("zstall");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Arc::new(Memory::init(&opts(&prefix, &rundir, &[])).unwrap());
    reserve_stable_zones(&mem, 8);
    for (round, what) in ["walk", "dump", "walk"].into_iter().enumerate() {
        let mut child = Secondary::spawn("zstall", &prefix, &rundir);
        child.expect("ready");
        child.say(what);
        child.expect("stalled");
        child.kill_running(&format!("{what} {round}"));
        let m = Arc::clone(&mem);
        within(
            Duration::from_secs(5),
            &format!("after a kill inside a {what}"),
            move || write_the_table(&m, &format!("after-{round}"), round),
        );
        check_zone_table(&mem, what);
    }
    free_stable_zones(&mem, 8);
    assert_eq!(mem.memzone_count(), 0);
    mem.heap_validate().unwrap();
}

/// Secondaries that only read the zone table (lookups, stats, walks,
/// dumps) are killed at random moments while a primary thread reserves and
/// frees zones; after each kill the primary's table writes must finish
/// within seconds, and every reader must have seen a consistent table
/// (the stable zones, each with its own length) until it was killed.
#[test]
fn secondaries_killed_while_reading_zones_do_not_wedge_writers() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("zlook");
    let rundir = dir.path().to_str().unwrap().to_string();
    let rounds: u64 = std::env::var("MP_ZREAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mem = Arc::new(Memory::init(&opts(&prefix, &rundir, &[])).unwrap());
    reserve_stable_zones(&mem, STABLE_ZONES);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Table writes all along, so readers race with writers.
    let worker = {
        let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let z = mem
                    .memzone_reserve(
                        &format!("w-{}", n % 16),
                        64,
                        SOCKET_ID_ANY,
                        MemzoneFlags::NONE,
                    )
                    .unwrap();
                z.free().unwrap();
                n += 1;
                if n % 64 == 0 {
                    // Leave the second core to the reader now and then.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            n
        })
    };
    let mut seed = 0x2545_f491_u64;
    let t = Instant::now();
    for round in 0..rounds {
        let mut child = Secondary::spawn("zlook", &prefix, &rundir);
        child.expect("ready");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % 5_000));
        child.kill_running(&format!("round {round}"));
        let m = Arc::clone(&mem);
        let k = (seed % STABLE_ZONES as u64) as usize;
        within(
            Duration::from_secs(5),
            &format!("round {round}"),
            move || write_the_table(&m, &format!("round-{round}"), k),
        );
        assert!(
            !worker.is_finished(),
            "round {round}: the primary's worker stopped (panicked)"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = worker.join().unwrap();
    eprintln!(
        "{rounds} readers killed in {:?}; the primary's worker did {n} reserve/free pairs meanwhile",
        t.elapsed()
    );
    check_zone_table(&mem, "after the kills");
    free_stable_zones(&mem, STABLE_ZONES);
    assert_eq!(mem.memzone_count(), 0);
    mem.heap_validate().unwrap();
}

#[test]
fn a_dead_primary_fails_the_secondarys_next_page_request_cleanly() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("deadp");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mut primary = Secondary::spawn("primary", &prefix, &rundir);
    primary.expect("ready");
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    let z = mem.memzone_lookup("p").unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    // What is mapped stays readable.
    // SAFETY: the zone's page stays mapped in this process.
    assert_eq!(unsafe { z.as_ptr().read() }, 42);
    let t = Instant::now();
    let e = mem.malloc(64 * MB, 0).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("is gone or not answering"), "{e}");
    let e = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::PrimaryGone { .. })), "{e}");
    drop(mem);
}
