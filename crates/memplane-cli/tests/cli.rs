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
