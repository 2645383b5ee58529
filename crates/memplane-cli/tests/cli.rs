//! Runs the `memplane` binary the way a user would.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn memplane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memplane"))
        .args(args)
        .output()
        .expect("memplane runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn sys_counter(size_kb: u64, name: &str) -> u64 {
    fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/{name}"
    ))
    .map_or(0, |t| t.trim().parse().unwrap())
}

/// Serializes tests that touch the hugepage pool, across threads and
/// processes: exclusive to change the pool or to assert that free pages did
/// not move; shared to take pages or to compare totals. Released when the
/// returned file is dropped.
fn pool_lock(exclusive: bool) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("memplane-test-pool.lock"))
        .unwrap();
    let mode = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    rustix::fs::flock(&f, mode).unwrap();
    f
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips (printing why) off CI; fails under CI=true.
fn require(cond: bool, why: &str) -> bool {
    assert!(
        cond || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test {why}"
    );
    if !cond {
        eprintln!("SKIPPED: this test {why}");
    }
    cond
}

#[test]
fn status_json_agrees_with_meminfo_and_sysfs() {
    let _pool = pool_lock(false);
    let o = memplane(&["hugepages", "status", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    let default_bytes = field("Hugepagesize:") * 1024;
    let sizes = v["sizes"].as_array().unwrap();
    let default = sizes.iter().find(|s| s["is_default"] == true).unwrap();
    assert_eq!(default["page_size"].as_u64().unwrap(), default_bytes);
    assert_eq!(
        default["total"].as_u64().unwrap(),
        field("HugePages_Total:")
    );
    for s in sizes {
        let kb = s["page_size"].as_u64().unwrap() / 1024;
        assert_eq!(
            s["total"].as_u64().unwrap(),
            sys_counter(kb, "nr_hugepages")
        );
        assert_eq!(
            s["overcommit"].as_u64().unwrap(),
            sys_counter(kb, "nr_overcommit_hugepages")
        );
    }
    assert!(v["nodes"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(0)));
    assert!(v["mounts"].is_array() && v["files"].is_array() && v["processes"].is_array());
}

#[test]
fn status_human_names_sizes_and_sections() {
    let o = memplane(&["hugepages"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("(default size)"), "{out}");
    for section in [
        "hugetlbfs mounts:",
        "cgroup hugetlb limits:",
        "memlock limit:",
        "files in hugetlbfs mounts:",
        "processes holding hugepages:",
    ] {
        assert!(out.contains(section), "missing {section}: {out}");
    }
}

#[test]
fn reserve_then_status_shows_the_new_pool() {
    if !require(is_root(), "must run as root to change the hugepage pool") {
        return;
    }
    let _pool = pool_lock(true);
    let before = sys_counter(2048, "nr_hugepages");
    let target = before + 3;
    let o = memplane(&["hugepages", "reserve", &format!("2M={target}")]);
    let (out, err) = text(&o);
    let restore = || {
        let o = memplane(&["hugepages", "reserve", &format!("2M={before}")]);
        assert!(o.status.success(), "{}", text(&o).1);
    };
    if !o.status.success() {
        restore();
        panic!("reserve failed: {out}{err}");
    }
    assert!(
        out.contains(&format!("2M: {before} -> {target} pages system-wide")),
        "{out}"
    );
    let st = memplane(&["hugepages", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let two = v["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["page_size"] == 2 << 20)
        .unwrap()
        .clone();
    restore();
    assert_eq!(two["total"].as_u64().unwrap(), target);
    assert_eq!(sys_counter(2048, "nr_hugepages"), before);
}

#[test]
fn reserve_per_node_on_a_fake_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let w = |rel: &str, v: &str| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, v).unwrap();
    };
    for n in ["nr_hugepages", "free_hugepages"] {
        w(
            &format!("sys/kernel/mm/hugepages/hugepages-2048kB/{n}"),
            "0\n",
        );
        w(
            &format!("sys/devices/system/node/node0/hugepages/hugepages-2048kB/{n}"),
            "0\n",
        );
        w(
            &format!("sys/devices/system/node/node1/hugepages/hugepages-2048kB/{n}"),
            "0\n",
        );
    }
    w("proc/meminfo", "Hugepagesize: 2048 kB\n");
    w("proc/self/limits", "Max locked memory 65536 65536 bytes\n");
    w("proc/self/mounts", "");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_memplane"))
            .args(args)
            .env("MEMPLANE_SYS_ROOT", root.join("sys"))
            .env("MEMPLANE_PROC_ROOT", root.join("proc"))
            .output()
            .unwrap()
    };
    let o = run(&["hugepages", "reserve", "2M=64", "--node", "1"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let node1 = root.join("sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages");
    assert_eq!(fs::read_to_string(&node1).unwrap(), "64");
    // Node 5 does not exist: refused, nothing written anywhere.
    let o = run(&["hugepages", "reserve", "2M=8", "--node", "5"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("NUMA node 5 does not exist; nodes on this machine: 0, 1"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&node1).unwrap(), "64");
}

#[test]
fn bad_reserve_input_is_refused_and_changes_nothing() {
    let _pool = pool_lock(false);
    let before = sys_counter(2048, "nr_hugepages");
    for (arg, expect) in [
        ("3M=1", "not a page size"),
        ("2M=abc", "'abc' is not a page count"),
        ("2M=-1", "is not a page count"),
        ("2M", "no '='"),
        ("7T=1", "this kernel has no 8T"),
        (
            "64K=1",
            "this kernel has no 64K hugepages; supported sizes:",
        ),
        ("2M=99999999999999999999", "is not a page count"),
    ] {
        // "7T" is not a power of two: parsed as a size error first.
        let o = memplane(&["hugepages", "reserve", "2M=4", arg]);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{arg} accepted");
        let expect = if arg == "7T=1" {
            "not a page size"
        } else {
            expect
        };
        assert!(err.contains(expect), "{arg}: {err}");
        assert_eq!(
            sys_counter(2048, "nr_hugepages"),
            before,
            "{arg} changed the pool"
        );
    }
    let o = memplane(&["hugepages", "reserve", "2M=1", "2M=2"]);
    assert!(text(&o).1.contains("given twice"));
}

#[test]
fn check_refuses_too_much_and_explains() {
    let _pool = pool_lock(true);
    let total =
        sys_counter(2048, "nr_hugepages") * 2 + sys_counter(1_048_576, "nr_hugepages") * 1024;
    let ask = (total + 64).to_string();
    let free_before = sys_counter(2048, "free_hugepages");
    let o = memplane(&["check", "--socket-mem", &ask]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("NUMA node 0: asked {ask}M (--socket-mem)")),
        "{err}"
    );
    assert!(err.contains("fix: memplane hugepages reserve"), "{err}");
    assert_eq!(sys_counter(2048, "free_hugepages"), free_before);
    let o = memplane(&["check", "--json", "--socket-mem", &ask]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shortfalls"][0]["node"], 0);
}

#[test]
fn check_rejects_bad_options() {
    let o = memplane(&["check", "--socket-mem", "1,,2"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--socket-mem"), "{:?}", text(&o));
    let o = memplane(&["check", "--no-huge", "--huge-unlink"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--no-huge") && err.contains("--huge-unlink"),
        "{err}"
    );
    let o = memplane(&["check", "--no-huge", "-m", "64"]);
    assert!(o.status.success(), "{:?}", text(&o));
    // --json works after the EAL options too.
    let o = memplane(&["check", "--no-huge", "-m", "64", "--json"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["entries"].is_array(), "{v}");
}

#[test]
fn mount_and_remount_a_private_hugetlbfs() {
    if !require(is_root(), "must run as root to mount hugetlbfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("huge");
    let t = target.to_str().unwrap();
    let o = memplane(&["hugepages", "mount", t, "--size", "2M"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let mounted = fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.contains(t) && l.contains("hugetlbfs") && l.contains("pagesize=2M"));
    let again = memplane(&["hugepages", "mount", t, "--size", "2M"]);
    let other = memplane(&["hugepages", "mount", t, "--size", "1G"]);
    rustix::mount::unmount(Path::new(t), rustix::mount::UnmountFlags::empty()).unwrap();
    assert!(mounted, "no hugetlbfs at {t}");
    assert!(
        text(&again).0.contains("already a hugetlbfs mount"),
        "{:?}",
        text(&again)
    );
    assert!(!other.status.success());
    assert!(
        text(&other)
            .1
            .contains("already a hugetlbfs mount for 2M pages"),
        "{:?}",
        text(&other)
    );
}

/// Root and the util-linux tools the private-namespace tests script with;
/// skips (printing why) off CI, fails under CI=true.
fn namespace_tools_ready() -> bool {
    let tools = ["unshare", "flock", "fallocate"].iter().all(|t| {
        Command::new("which")
            .arg(t)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    require(
        is_root() && tools,
        "needs root and unshare, flock, fallocate (util-linux)",
    )
}

/// `clear` in a private mount namespace on a private hugetlbfs: a stale file
/// (its process gone) is removed and its page freed; a file a live process
/// holds (`flock -s`, as DPDK does) is kept and the holder is named.
#[test]
fn clear_removes_stale_files_and_keeps_live_ones() {
    if !namespace_tools_ready() {
        return;
    }
    if !require(
        sys_counter(2048, "free_hugepages") >= 2,
        "needs 2 free 2M hugepages",
    ) {
        return;
    }
    let _pool = pool_lock(false);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().display().to_string();
    let bin = env!("CARGO_BIN_EXE_memplane");
    // The live holder runs `flock -s <file> sleep` in the background; the
    // stale file's writer (fallocate) has exited.
    let script = format!(
        r#"set -e
mount -t hugetlbfs -o pagesize=2M,size=8M none {m}
fallocate -l 2M {m}/clitest_deadmap_0
fallocate -l 2M {m}/clitest_livemap_0
( flock -s 9; exec sleep 60 ) 9<{m}/clitest_livemap_0 &
holder=$!
sleep 0.3
echo "HOLDER $holder"
{bin} hugepages status
echo "== clear"
{bin} hugepages clear
echo "== after"
ls {m}
kill -KILL $holder; wait $holder 2>/dev/null || true
{bin} hugepages clear --prefix clitest_live
ls {m} | wc -l
umount {m}
"#
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let holder: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("HOLDER "))
        .unwrap()
        .parse()
        .unwrap();
    let (status, rest) = out.split_once("== clear").unwrap();
    let (clear, after) = rest.split_once("== after").unwrap();
    assert!(
        status.contains("prefix clitest_dead") && status.contains("stale, no live holder"),
        "{status}"
    );
    assert!(
        status.contains(&format!("in use by pid {holder} (sleep)")),
        "{status}"
    );
    assert!(
        clear.contains("removed ") && clear.contains("clitest_deadmap_0"),
        "{clear}"
    );
    assert!(
        clear.contains("kept ") && clear.contains("clitest_livemap_0"),
        "{clear}"
    );
    assert!(clear.contains("1 x 2M"), "{clear}");
    let mut after_lines = after.lines().filter(|l| !l.is_empty());
    assert_eq!(after_lines.next(), Some("clitest_livemap_0"), "{after}");
    // After the holder died, clearing its prefix leaves the mount empty.
    assert!(
        after.contains("removed ") && after.trim_end().ends_with('0'),
        "{after}"
    );
}

/// Preflight's explanation names pages held by files of another prefix: the
/// stale ones with the clear command, the live ones with the holder's pid.
#[test]
fn check_explains_pages_held_by_files() {
    if !namespace_tools_ready() {
        return;
    }
    if !require(
        sys_counter(2048, "free_hugepages") >= 4,
        "needs 4 free 2M hugepages",
    ) {
        return;
    }
    let _pool = pool_lock(false);
    let total =
        sys_counter(2048, "nr_hugepages") * 2 + sys_counter(1_048_576, "nr_hugepages") * 1024;
    let ask = total + 64;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().display().to_string();
    let bin = env!("CARGO_BIN_EXE_memplane");
    let script = format!(
        r#"set -e
mount -t hugetlbfs -o pagesize=2M none {m}
fallocate -l 4M {m}/oldrunmap_0
fallocate -l 2M {m}/busymap_0
( flock -s 9; exec sleep 60 ) 9<{m}/busymap_0 &
holder=$!
sleep 0.3
echo "HOLDER $holder"
{bin} check --socket-mem {ask} || true
kill -KILL $holder; wait $holder 2>/dev/null || true
rm -f {m}/*
umount {m}
"#
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let holder = out.lines().find_map(|l| l.strip_prefix("HOLDER ")).unwrap();
    assert!(
        err.contains(&format!("2 pages (4M) are held by files of prefix 'oldrun' in {m}: stale: no live process holds them")),
        "{err}"
    );
    assert!(
        err.contains(
            "fix: memplane hugepages clear --prefix oldrun   (frees 4M held by stale files)"
        ),
        "{err}"
    );
    assert!(
        err.contains("1 pages (2M) are held by files of prefix 'busy'")
            && err.contains(&format!("in use by pid {holder} (sleep)")),
        "{err}"
    );
}

/// Without privileges, reserve and mount say so, print the fix, and change
/// nothing.
#[test]
fn unprivileged_reserve_and_mount_name_the_fix_and_change_nothing() {
    let has_setpriv = Command::new("which")
        .arg("setpriv")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(
        is_root() && has_setpriv,
        "needs root and setpriv (util-linux) to drop to an unprivileged user",
    ) {
        return;
    }
    let _pool = pool_lock(false);
    let before = sys_counter(2048, "nr_hugepages");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(env!("CARGO_BIN_EXE_memplane"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = as_nobody(&["hugepages", "reserve", &format!("2M={}", before + 1)]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("permission denied") && err.contains("sudo memplane hugepages reserve 2M="),
        "{err}"
    );
    assert_eq!(sys_counter(2048, "nr_hugepages"), before);
    let o = as_nobody(&["hugepages", "mount", target.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("permission denied") || err.contains("Permission denied"),
        "{err}"
    );
    assert!(!fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(target.to_str().unwrap()));
}

/// Returns false (after printing why) when fewer than `pages` 2 MiB
/// hugepages are free; panics instead under CI, where they must be there.
/// (The CLI tests' copy of `memplane/tests/common::need_hugepages`.)
fn need_hugepages(pages: u64) -> bool {
    let free = sys_counter(2048, "free_hugepages");
    require(
        free >= pages,
        &format!(
            "needs {pages} free 2048 kB hugepages, found {free}; reserve them with: \
             memplane hugepages reserve 2M={pages} (as root)"
        ),
    )
}

/// Free pages of every hugepage size, to compare before and after a run.
fn free_counts() -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = fs::read_dir("/sys/kernel/mm/hugepages")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let free = fs::read_to_string(e.path().join("free_hugepages"))
                        .map_or(0, |t| t.trim().parse().unwrap());
                    (n, free)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A file prefix no other test or process uses.
fn unique_prefix(tag: &str) -> String {
    format!("cli{tag}{}_", std::process::id())
}

/// `memplane memory ARGS --json`, asserting success and that every
/// hugepage came back; returns the report.
fn memory_json(args: &[&str]) -> serde_json::Value {
    let before = free_counts();
    let mut all = vec!["memory"];
    all.extend_from_slice(args);
    all.push("--json");
    let o = memplane(&all);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?}: {out}\n{err}");
    assert_eq!(free_counts(), before, "{args:?} did not give pages back");
    if before.iter().any(|(_, f)| *f > 0) {
        assert!(err.contains("all hugepages given back"), "{err}");
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn list_of_size(v: &serde_json::Value, page_size: u64) -> serde_json::Value {
    v["layout"]["lists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["page_size"] == page_size && l["node"] == 0)
        .unwrap_or_else(|| panic!("no {page_size} list on node 0: {v}"))
        .clone()
}

#[test]
fn memory_json_shows_the_preallocated_run() {
    if !need_hugepages(4) {
        return;
    }
    let _pool = pool_lock(true);
    let prefix = unique_prefix("mj");
    let v = memory_json(&["--socket-mem", "8", "--file-prefix", &prefix]);
    assert!(v["init_us"].as_u64().unwrap() > 0, "{v}");
    let layout = &v["layout"];
    assert_eq!(layout["prefix"], prefix.as_str());
    assert_eq!(layout["total_mapped"], 8 << 20);
    let runs = layout["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{layout}");
    assert_eq!(runs[0]["count"], 4);
    assert_eq!(runs[0]["page_size"], 2 << 20);
    assert_eq!(runs[0]["len"], 8 << 20);
    let list = list_of_size(&v, 2 << 20);
    assert_eq!(runs[0]["list"], list["index"]);
    assert_eq!((&list["used"], &list["pinned"]), (&4.into(), &4.into()));
    let base = layout["base_va"].as_u64().unwrap();
    let va = runs[0]["va"].as_u64().unwrap();
    assert!(va >= base && va < base + layout["va_len"].as_u64().unwrap());
    assert!(v.get("pages").is_none());
    // The node's heap holds the preallocated memory, all of it free.
    let heaps = v["heaps"].as_array().unwrap();
    assert_eq!(heaps.len(), 1, "{v}");
    assert_eq!(heaps[0]["name"], "socket_0");
    assert_eq!(heaps[0]["kind"], "native");
    assert_eq!(heaps[0]["stats"]["total_bytes"], 8 << 20);
    assert_eq!(heaps[0]["stats"]["alloc_count"], 0);
    assert_eq!(heaps[0]["stats"]["greatest_free"], (8 << 20) - 64);
}

#[test]
fn memory_memzone_reserves_and_lists_zones() {
    if !need_hugepages(8) {
        return;
    }
    let _pool = pool_lock(true);
    let prefix = unique_prefix("mz");
    let v = memory_json(&[
        "--memzone",
        "rx=64K",
        "--file-prefix",
        &prefix,
        "--memzone=table=3M@0",
    ]);
    let zones = v["memzones"]["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 2, "{v}");
    assert_eq!(zones[0]["name"], "rx");
    assert_eq!(zones[0]["len"], 64 << 10);
    assert_eq!(zones[1]["name"], "table");
    assert_eq!(zones[1]["len"], 3 << 20);
    assert_eq!(zones[1]["socket"], 0);
    assert_eq!(v["memzones"]["table"]["count"], 2);
    assert_eq!(v["memzones"]["table"]["capacity"], 2560);
    // Human form and bad input.
    let o = memplane(&["memory", "--memzone", "a=4K", "--file-prefix", &prefix]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("memzones: 1 of 2560"), "{out}");
    for (arg, want) in [
        ("nosize", "no '='"),
        ("a=lots", "NAME=SIZE"),
        ("a=4K@x", "not a NUMA node"),
    ] {
        let o = memplane(&["memory", "--memzone", arg, "--file-prefix", &prefix]);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{arg}: {out}");
        assert!(err.contains(want), "{arg}: {err}");
    }
    let o = memplane(&[
        "memory",
        "--memzone",
        "x=4K",
        "--memzone",
        "x=8K",
        "--file-prefix",
        &prefix,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("exists already"), "{err}");
}

#[test]
fn memory_alloc_adds_pages_and_shows_them() {
    if !need_hugepages(6) {
        return;
    }
    let _pool = pool_lock(true);
    let prefix = unique_prefix("ma");
    // The flags may come before or after the EAL options.
    let v = memory_json(&[
        "--socket-mem",
        "8",
        "--alloc",
        "2M=2",
        "--pages",
        "--file-prefix",
        &prefix,
    ]);
    assert_eq!(v["layout"]["total_mapped"], 12 << 20, "{v}");
    let list = list_of_size(&v, 2 << 20);
    assert_eq!((&list["used"], &list["pinned"]), (&6.into(), &4.into()));
    let pages = v["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 6);
    assert_eq!(pages.iter().filter(|p| p["pinned"] == true).count(), 4);

    // Human output: the summary, the lists, the runs, the pages, teardown.
    let before = free_counts();
    let o = memplane(&[
        "memory",
        "--pages",
        "--socket-mem",
        "8",
        "--file-prefix",
        &prefix,
        "--alloc=2M=2@0",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(free_counts(), before);
    for want in [
        &format!("prefix '{prefix}'") as &str,
        "init ",
        "alloc 2M=2@0 ",
        "node 0: 2 x 2M at 0x",
        "reservation ",
        " 12M (node 0: 12M)",
        "memseg lists:",
        "memseg-2048k-0",
        "6/",
        "mapped runs (VA-contiguous):",
        "Total memory mapped: 12M",
        "teardown ",
        "all hugepages given back",
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }
    assert_eq!(out.matches("Segment ").count(), 6, "{out}");
}

#[test]
fn memory_rejects_bad_alloc_specs_before_mapping_anything() {
    let _pool = pool_lock(true);
    let before = free_counts();
    for (spec, why) in [
        ("2M=0", "a page count of 0 maps nothing"),
        ("3M=1", "'3M' is not a page size"),
        ("2M=x", "'x' is not a page count"),
        ("2M", "expected SIZE=COUNT[@NODE]"),
        ("2M=1@n", "'n' is not a NUMA node number"),
    ] {
        let o = memplane(&["memory", "--socket-mem", "8", "--alloc", spec]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{spec}: {out}\n{err}");
        assert!(
            err.contains(&format!("invalid value '{spec}' for --alloc")) && err.contains(why),
            "{spec}: {err}"
        );
        assert!(out.is_empty(), "{spec} started an instance: {out}");
        assert_eq!(free_counts(), before, "{spec}");
    }
    let o = memplane(&["memory", "--socket-mem", "8", "--alloc"]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("'--alloc' needs a value"),
        "{:?}",
        text(&o)
    );
    let o = memplane(&["memory", "--no-such-option"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("unknown option '--no-such-option'"));
}

#[test]
fn memory_no_huge_works_without_hugepages() {
    let _pool = pool_lock(true);
    let prefix = unique_prefix("nh");
    let v = memory_json(&["--no-huge", "-m", "4", "--file-prefix", &prefix]);
    assert_eq!(v["layout"]["total_mapped"], 4 << 20, "{v}");
    let lists = v["layout"]["lists"].as_array().unwrap();
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0]["page_size"], 4096);
    assert_eq!(lists[0]["pinned"], 1024);
    let runs = v["layout"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["count"], 1024);
    // Memory is fixed with --no-huge: an extra allocation is refused, and
    // the library's message says why.
    let o = memplane(&[
        "memory",
        "--no-huge",
        "-m",
        "4",
        "--file-prefix",
        &prefix,
        "--alloc",
        "4K=1",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("not possible with --no-huge"), "{err}");
}

/// `--hold`: the pages are held while it waits (seen from outside), and
/// Ctrl-C ends the wait with a normal teardown.
#[test]
fn memory_hold_keeps_pages_until_interrupted() {
    use std::io::BufRead as _;
    if !need_hugepages(4) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_counts();
    let free_2m = sys_counter(2048, "free_hugepages");
    let prefix = unique_prefix("ho");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memplane"))
        .args([
            "memory",
            "--socket-mem",
            "8",
            "--file-prefix",
            &prefix,
            "--json",
            "--hold",
            "60",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON is printed (and flushed) before the wait starts.
    let mut json = String::new();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        json.push_str(&line);
        json.push('\n');
        if line == "}" {
            break;
        }
    }
    let held = sys_counter(2048, "free_hugepages");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["layout"]["total_mapped"], 8 << 20);
    assert_eq!(held, free_2m - 4, "4 pages held while waiting");
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("holding the instance for 60 s") && err.contains("interrupted"),
        "{err}"
    );
    assert!(err.contains("all hugepages given back"), "{err}");
    assert_eq!(free_counts(), before);
}

#[test]
fn info_attaches_to_a_running_instance_and_reports_json() {
    if !need_hugepages(8) {
        return;
    }
    // Exclusive: the primary's teardown checks that every hugepage came back.
    let _pool = pool_lock(true);
    let prefix = unique_prefix("info");
    let rundir = tempfile::tempdir().unwrap();
    let rd = rundir.path().to_str().unwrap().to_string();
    // Nothing running yet: a clear error.
    let o = memplane(&["info", "--file-prefix", &prefix, "--runtime-dir", &rd]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no primary process is running"), "{err}");

    let primary = Command::new(env!("CARGO_BIN_EXE_memplane"))
        .args([
            "memory",
            "--hold",
            "60",
            "--memzone",
            "rx=64K",
            "--ring",
            "q=1024",
            "--mempool",
            "pkts=1000x100/32",
            "--mempool",
            "st=600x64/16+stats",
            "--mempool",
            "blk=1000x64/16@bucket",
            "-n",
            "3",
            "--file-prefix",
            &prefix,
            "--runtime-dir",
            &rd,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = rundir
        .path()
        .join("memplane")
        .join(&prefix)
        .join("mp_socket");
    let t = std::time::Instant::now();
    while !socket.exists() {
        assert!(t.elapsed().as_secs() < 20, "the primary never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The primary reserves its zones right after init: wait for them.
    let mut v = serde_json::Value::Null;
    while t.elapsed().as_secs() < 20 {
        let o = memplane(&[
            "info",
            "--json",
            "--file-prefix",
            &prefix,
            "--runtime-dir",
            &rd,
        ]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        if v["mempools"].as_array().is_some_and(|r| r.len() == 3) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(v["prefix"], prefix.as_str());
    assert_eq!(v["primary_pid"], primary.id());
    // The primary's -n 3, read by this secondary from the shared config.
    assert_eq!(
        (&v["memory_channels"], &v["memory_ranks"]),
        (&3.into(), &0.into()),
        "{v}"
    );
    assert_ne!(v["reader_pid"], primary.id());
    let zones = v["memzones"]["zones"].as_array().unwrap();
    let names: Vec<&str> = zones.iter().map(|z| z["name"].as_str().unwrap()).collect();
    assert_eq!(names[..2], ["rx", "RG_q"], "{v}");
    for z in ["MP_pkts", "MP_pkts_0", "RG_MP_pkts", "MC_st", "MB_blk"] {
        assert!(names.contains(&z), "{z} in {names:?}");
    }
    // The mempool: sizes, counts, the primary's lcore cache.
    let pools = v["mempools"].as_array().unwrap();
    assert_eq!(pools.len(), 3, "{v}");
    let pool = |name: &str| {
        pools
            .iter()
            .find(|pool| pool["name"] == name)
            .unwrap_or_else(|| panic!("no pool {name}: {v}"))
    };
    let p = pool("pkts");
    assert_eq!(p["name"], "pkts");
    assert_eq!(p["handler"], "ring_mp_mc");
    assert_eq!(p["size"], 1000);
    assert_eq!(p["elt_size"], 100);
    assert_eq!(p["cache_size"], 32);
    assert_eq!(p["avail"], 1000);
    assert_eq!(p["in_use"], 0);
    let caches = p["cache_counts"].as_array().unwrap();
    assert_eq!(caches.len(), 1, "one lcore cache: {p}");
    assert_eq!(caches[0][1], 32, "{p}");
    assert_eq!(p["common_pool_count"], 1000 - 32);
    let obj = p["obj_size"]["total_size"].as_u64().unwrap();
    // 64-byte header + 104-byte element: 3 lines, coprime with DPDK's
    // default 4 channels, but not with this instance's 3: grown to 4.
    assert_eq!(obj, 256, "spread over -n 3: {p}");
    assert!(p["memory_bytes"].as_u64().unwrap() >= 1000 * obj, "{p}");
    assert!(p.get("stats").is_none(), "statistics off: none shown: {p}");
    // The pool with statistics on: the primary's get of 16 (a refill of
    // 16 + 16 from the backend) and put of 16 (a flush of 16), counted in
    // its lcore's row.
    let st = pool("st");
    assert_eq!(st["name"], "st");
    assert_eq!(st["stats"]["enabled"], true, "{st}");
    let totals = &st["stats"]["totals"];
    for (k, want) in [
        ("put_bulk", 1),
        ("put_objs", 16),
        ("put_common_pool_bulk", 1),
        ("put_common_pool_objs", 16),
        ("get_common_pool_bulk", 1),
        ("get_common_pool_objs", 32),
        ("get_success_bulk", 1),
        ("get_success_objs", 16),
        ("get_fail_bulk", 0),
        ("get_fail_objs", 0),
        ("get_success_blks", 0),
        ("get_fail_blks", 0),
    ] {
        assert_eq!(totals[k], want, "{k}: {st}");
    }
    let rows = st["stats"]["lcores"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{st}");
    assert_eq!(rows[0]["lcore"], caches[0][0], "the primary's lcore: {st}");
    // The bucket pool: its handler and block size (64 KiB buckets of
    // 128-byte objects, 2 lines being coprime with -n 3: 503 after a
    // 1088-byte header).
    let blk = pool("blk");
    assert_eq!(blk["name"], "blk");
    assert_eq!(blk["handler"], "bucket");
    assert_eq!(blk["obj_size"]["total_size"], 128, "{blk}");
    assert_eq!(blk["contig_block_size"], 503, "{blk}");
    assert_eq!(blk["block_layout"]["block_size"], 65536, "{blk}");
    assert_eq!(blk["block_layout"]["header"], 1088, "{blk}");
    assert_eq!(blk["avail"], 1000);
    assert!(p["contig_block_size"].is_null(), "{p}");
    let rings = v["rings"].as_array().unwrap();
    assert_eq!(rings[0]["name"], "q");
    assert_eq!(rings[0]["capacity"], 1024);
    assert_eq!(rings[0]["element_size"], 8);
    assert_eq!(v["heaps"][0]["name"], "socket_0");
    assert!(v["heaps"][0]["stats"]["alloc_count"].as_u64().unwrap() >= 2);
    let segs = v["memsegs"].as_array().unwrap();
    assert!(segs
        .iter()
        .any(|s| s["page_size"] == 2 << 20 && s["pages"].as_u64().unwrap() >= 1));
    // Human form.
    let o = memplane(&["info", "--file-prefix", &prefix, "--runtime-dir", &rd]);
    let (out, _) = text(&o);
    assert!(
        out.contains("memzones: 13 of 2560")
            && out.contains("rings:")
            && out.contains(
                "memory channels x ranks (-n/-r, mempool object spreading): 3 x 1 (not given)"
            ),
        "{out}"
    );
    let line = out
        .lines()
        .skip_while(|l| !l.starts_with("mempools:"))
        .find(|l| l.trim_start().starts_with("pkts "))
        .unwrap_or_else(|| panic!("no mempool row: {out}"));
    for field in ["ring_mp_mc", "1000", "100", "32", ":32"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    let cells: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("mempools:"))
        .find(|l| l.trim_start().starts_with("blk "))
        .unwrap_or_else(|| panic!("no bucket row: {out}"))
        .split_whitespace()
        .collect();
    // name, handler, size, elt, obj, block, ...
    assert_eq!(
        cells[..6],
        ["blk", "bucket", "1000", "64", "128", "503"],
        "{out}"
    );
    // The statistics table: the lcore's row and the total, DPDK's order
    // (puts, put objs, cp puts, cp put objs, cp gets, cp get objs, gets,
    // get objs, failed gets, failed objs).
    let stats: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("mempool statistics"))
        .filter(|l| l.trim_start().starts_with("st "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(stats.len(), 2, "{out}");
    let counts = [
        "1", "16", "1", "16", "1", "32", "1", "16", "0", "0", "0", "0",
    ];
    assert_eq!(stats[0][2..], counts, "{out}");
    assert_eq!(stats[1][1..], [&["all"][..], &counts[..]].concat(), "{out}");
    assert!(
        !out.lines()
            .skip_while(|l| !l.starts_with("mempool statistics"))
            .any(|l| l.trim_start().starts_with("pkts ")),
        "no statistics row for pkts: {out}"
    );
    // End the hold early with Ctrl-C: the primary tears down cleanly.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(primary.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = primary.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
