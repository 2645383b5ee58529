//! Hugepage discovery on fake sysfs/procfs trees and on the real machine.

mod common;

use common::FakeSystem;
use memplane::hugepages::{Discovery, PagemapAccess};
use memplane::units::{PageSize, MIB};

/// Two nodes, three page sizes, odd mounts, cgroup v2 with a nested limit.
fn two_node_three_sizes() -> FakeSystem {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(64, 0, 0, 0, 0, 0);
    f.size(2048, 1024, 1000, 10, 0, 8);
    f.size(1_048_576, 4, 3, 0, 0, 0);
    f.node_size(0, 2048, 512, 500);
    f.node_size(1, 2048, 512, 500);
    f.node_size(0, 1_048_576, 2, 1);
    f.node_size(1, 1_048_576, 2, 2);
    f.node_size(0, 64, 0, 0);
    f.node_size(1, 64, 0, 0);
    f.write("sys/devices/system/node/online", "0-1\n");
    f.write(
        "proc/self/mounts",
        "sysfs /sys sysfs rw 0 0\n\
         hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
         none /mnt/huge\\0401G hugetlbfs rw,pagesize=1024M,size=4G 0 0\n\
         nodev /mnt/default hugetlbfs rw,relatime 0 0\n\
         cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
    );
    f.write("proc/self/cgroup", "0::/pod/app\n");
    f.write("sys/fs/cgroup/pod/hugetlb.2MB.max", "20971520\n");
    f.write("sys/fs/cgroup/pod/app/hugetlb.2MB.max", "max\n");
    f.write("sys/fs/cgroup/pod/app/hugetlb.2MB.current", "4194304\n");
    f.write("sys/fs/cgroup/pod/app/hugetlb.1GB.max", "max\n");
    f
}

#[test]
fn fake_two_nodes_three_sizes() {
    let f = two_node_three_sizes();
    let snap = Discovery::new(f.roots()).discover().unwrap();

    let sizes: Vec<u64> = snap.sizes.iter().map(|s| s.page_size.bytes()).collect();
    assert_eq!(sizes, vec![64 * 1024, 2 * MIB, 1024 * MIB]);
    let two = snap.size(PageSize::SIZE_2M).unwrap();
    assert!(two.is_default);
    assert_eq!(
        (two.total, two.free, two.reserved, two.overcommit),
        (1024, 1000, 10, 8)
    );
    assert_eq!(two.available(), 1000 - 10 + 8);
    assert!(!snap.size(PageSize::SIZE_1G).unwrap().is_default);

    assert_eq!(snap.nodes, vec![0, 1]);
    let n1g = snap.node_size(1, PageSize::SIZE_1G).unwrap();
    assert_eq!((n1g.total, n1g.free), (2, 2));
    assert_eq!(snap.node_size(0, PageSize::SIZE_1G).unwrap().free, 1);

    assert_eq!(snap.mounts.len(), 3);
    assert_eq!(snap.mounts[0].page_size, PageSize::SIZE_2M);
    assert_eq!(snap.mounts[1].path.to_str().unwrap(), "/mnt/huge 1G");
    assert_eq!(snap.mounts[1].page_size, PageSize::SIZE_1G);
    assert_eq!(snap.mounts[1].size_limit, Some(4 << 30));
    // No pagesize= option: the default size.
    assert_eq!(snap.mounts[2].page_size, PageSize::SIZE_2M);

    // The parent's 20 MiB limit is the tightest one on the path.
    let cg = snap.cgroup_limit(PageSize::SIZE_2M).unwrap();
    assert_eq!(cg.limit, Some(20 * MIB));
    assert!(cg.source.ends_with("pod/hugetlb.2MB.max"), "{cg:?}");
    assert!(snap.cgroup_limit(PageSize::SIZE_1G).is_none());

    assert_eq!(snap.memlock.soft, Some(8_388_608));
    assert_eq!(snap.memlock.hard, Some(16_777_216));
    // A fake tree has no pagemap.
    assert_eq!(snap.pagemap, PagemapAccess::Unreadable);
}

#[test]
fn fake_cgroup_v1_limit_and_usage() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 100, 100, 0, 0, 0);
    f.write(
        "proc/self/mounts",
        "cgroup /sys/fs/cgroup/hugetlb cgroup rw,nosuid,hugetlb 0 0\n\
         cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n",
    );
    f.write(
        "proc/self/cgroup",
        "5:hugetlb:/kubepods/pod1\n4:memory:/kubepods/pod1\n0::/\n",
    );
    f.write(
        "sys/fs/cgroup/hugetlb/kubepods/pod1/hugetlb.2MB.limit_in_bytes",
        "0\n",
    );
    f.write(
        "sys/fs/cgroup/hugetlb/kubepods/pod1/hugetlb.2MB.usage_in_bytes",
        "0\n",
    );
    f.write(
        "sys/fs/cgroup/hugetlb/hugetlb.2MB.limit_in_bytes",
        "9223372036854771712\n",
    );
    let snap = Discovery::new(f.roots()).discover().unwrap();
    let cg = snap.cgroup_limit(PageSize::SIZE_2M).unwrap();
    assert_eq!(cg.limit, Some(0));
    assert_eq!(cg.usage, Some(0));
    // One node without per-node files (non-NUMA kernel): counts come from the
    // global pool.
    assert_eq!(snap.nodes, vec![0]);
    assert_eq!(snap.node_size(0, PageSize::SIZE_2M).unwrap().free, 100);
}

#[test]
fn fake_no_hugepage_support() {
    let f = FakeSystem::new();
    let snap = Discovery::new(f.roots()).discover().unwrap();
    assert!(snap.sizes.is_empty());
    assert!(snap.default_size().is_none());
    assert_eq!(snap.size_list(), "none");
    assert!(snap.cgroup_limits.is_empty());
}

#[test]
fn fake_garbage_counter_is_a_parse_error_naming_the_file() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 1, 1, 0, 0, 0);
    f.write(
        "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
        "lots\n",
    );
    let err = Discovery::new(f.roots())
        .discover()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("free_hugepages") && err.contains("lots"),
        "{err}"
    );
}

#[test]
fn missing_proc_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Discovery::new(memplane::hugepages::SystemRoots::under(dir.path()))
        .discover()
        .unwrap_err()
        .to_string();
    assert!(err.contains("meminfo"), "{err}");
}

/// Reads a `/proc/meminfo` field.
fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap()
}

#[test]
fn real_machine_agrees_with_meminfo_and_sysfs() {
    let _pool = common::pool_lock(false);
    let snap = Discovery::new(memplane::hugepages::SystemRoots::real())
        .discover()
        .unwrap();
    let default_kb = meminfo("Hugepagesize");
    let default = snap.default_size().expect("kernel has hugepages");
    assert_eq!(default.kib(), default_kb);
    let d = snap.size(default).unwrap();
    // Counters move if another test allocates concurrently; total is stable.
    assert_eq!(d.total, meminfo("HugePages_Total"));
    for s in &snap.sizes {
        assert_eq!(
            s.total,
            common::real_counter(s.page_size.kib(), "nr_hugepages"),
            "{s:?}"
        );
        let node_total: u64 = snap
            .per_node
            .iter()
            .filter(|n| n.page_size == s.page_size)
            .map(|n| n.total)
            .sum();
        assert_eq!(
            node_total, s.total,
            "per-node totals add up for {}",
            s.page_size
        );
    }
    let is_root = rustix::process::geteuid().is_root();
    if is_root {
        assert_eq!(snap.pagemap, PagemapAccess::PhysicalAddresses);
    } else {
        assert_ne!(snap.pagemap, PagemapAccess::PhysicalAddresses);
    }
}
