//! NUMA topology (fake sysfs trees and the real machine) and placement.

mod common;
mod hugemap;

use std::fs;
use std::path::Path;

use memplane::hugepages::SystemRoots;
use memplane::numa::{
    current_cpu_and_node, current_policy, mbind_range, node_of_address, NodeInfo, NumaError,
    PolicyGuard, PolicyMode, Topology,
};
use memplane::PageSize;

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

/// Runs `f` on a fresh thread, whose memory policy starts as the default.
fn on_fresh_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(f).join().unwrap()
}

#[test]
fn fake_two_node_topology() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "sys/devices/system/node/online", "0-1\n");
    write(r, "sys/devices/system/node/possible", "0-3\n");
    write(r, "sys/devices/system/node/node0/cpulist", "0-3,8\n");
    write(
        r,
        "sys/devices/system/node/node0/meminfo",
        "Node 0 MemTotal:       1024 kB\nNode 0 MemFree:        512 kB\n",
    );
    write(r, "sys/devices/system/node/node1/cpulist", "4-7,9-10\n");
    write(
        r,
        "sys/devices/system/node/node1/meminfo",
        "Node 1 MemTotal:       2048 kB\n",
    );
    // Offline: listed as a directory but not in `online`.
    write(r, "sys/devices/system/node/node2/cpulist", "\n");
    let topo = Topology::discover(&SystemRoots::under(r)).unwrap();
    assert!(topo.numa_sysfs());
    assert_eq!(
        topo.nodes(),
        &[
            NodeInfo {
                id: 0,
                cpus: vec![0, 1, 2, 3, 8],
                mem_total: 1 << 20,
            },
            NodeInfo {
                id: 1,
                cpus: vec![4, 5, 6, 7, 9, 10],
                mem_total: 2 << 20,
            },
        ]
    );
    assert_eq!(topo.node_ids(), vec![0, 1]);
    assert_eq!(topo.node_of_cpu(8), Some(0));
    assert_eq!(topo.node_of_cpu(9), Some(1));
    assert_eq!(topo.node_of_cpu(11), None);
    assert!(topo.contains(1) && !topo.contains(2));
    assert_eq!(topo.node(1).unwrap().mem_total, 2 << 20);
    let json = serde_json::to_value(&topo).unwrap();
    assert_eq!(json["nodes"][1]["cpus"][4], 9);

    // Without `online`, the node directories count (memory-only node 2 too).
    fs::remove_file(r.join("sys/devices/system/node/online")).unwrap();
    write(
        r,
        "sys/devices/system/node/node2/meminfo",
        "Node 2 MemTotal: 4 kB\n",
    );
    let topo = Topology::discover(&SystemRoots::under(r)).unwrap();
    assert_eq!(topo.node_ids(), vec![0, 1, 2]);
    assert!(topo.node(2).unwrap().cpus.is_empty());
}

#[test]
fn fake_topology_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "sys/devices/system/node/online", "0\n");
    write(r, "sys/devices/system/node/node0/cpulist", "0-x\n");
    write(
        r,
        "sys/devices/system/node/node0/meminfo",
        "Node 0 MemTotal: 1 kB\n",
    );
    let e = Topology::discover(&SystemRoots::under(r)).unwrap_err();
    assert!(
        matches!(&e, NumaError::Parse { path, .. } if path.ends_with("node0/cpulist")),
        "{e}"
    );
    write(r, "sys/devices/system/node/node0/cpulist", "0\n");
    fs::remove_file(r.join("sys/devices/system/node/node0/meminfo")).unwrap();
    let e = Topology::discover(&SystemRoots::under(r)).unwrap_err();
    assert!(
        matches!(&e, NumaError::Io { path, .. } if path.ends_with("node0/meminfo")),
        "{e}"
    );
}

#[test]
fn fake_topology_without_numa_sysfs() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "sys/devices/system/cpu/online", "0-5\n");
    write(
        r,
        "proc/meminfo",
        "MemTotal:       16384 kB\nMemFree: 1 kB\n",
    );
    let topo = Topology::discover(&SystemRoots::under(r)).unwrap();
    assert!(!topo.numa_sysfs());
    assert_eq!(
        topo.nodes(),
        &[NodeInfo {
            id: 0,
            cpus: (0..6).collect(),
            mem_total: 16 << 20,
        }]
    );
    // An empty node directory is the same thing.
    fs::create_dir_all(r.join("sys/devices/system/node")).unwrap();
    assert_eq!(
        Topology::discover(&SystemRoots::under(r))
            .unwrap()
            .node_ids(),
        vec![0]
    );
}

#[test]
fn real_topology_holds_the_current_cpu() {
    let topo = Topology::discover(&SystemRoots::real()).unwrap();
    assert!(topo.contains(0), "{topo:?}");
    assert!(topo.nodes().iter().all(|n| n.mem_total > 0));
    let (cpu, node) = current_cpu_and_node();
    assert_eq!(topo.node_of_cpu(cpu), Some(node), "{topo:?}");
}

#[test]
fn guard_restores_the_previous_policy() {
    on_fresh_thread(|| {
        let Some(before) = current_policy().unwrap() else {
            eprintln!("SKIPPED: the kernel has no NUMA policy support");
            return;
        };
        assert_eq!(before.mode, PolicyMode::Default);
        {
            let strict = PolicyGuard::bind_thread(0, true).unwrap();
            assert!(!strict.is_noop());
            let now = current_policy().unwrap().unwrap();
            assert_eq!((now.mode, now.nodes), (PolicyMode::Bind, vec![0]));
            {
                // Nested: restores the strict binding, not the default.
                let _pref = PolicyGuard::bind_thread(0, false).unwrap();
                let now = current_policy().unwrap().unwrap();
                assert_eq!((now.mode, now.nodes), (PolicyMode::Preferred, vec![0]));
            }
            assert_eq!(current_policy().unwrap().unwrap().mode, PolicyMode::Bind);
        }
        assert_eq!(current_policy().unwrap().unwrap(), before);
        PolicyGuard::bind_thread(0, false)
            .unwrap()
            .restore()
            .unwrap();
        assert_eq!(current_policy().unwrap().unwrap(), before);
    });
}

#[test]
fn binding_to_a_missing_node_fails_and_changes_nothing() {
    on_fresh_thread(|| {
        let topo = Topology::discover(&SystemRoots::real()).unwrap();
        let before = current_policy().unwrap();
        for node in [999, 4096, u32::MAX] {
            let e = PolicyGuard::bind_thread(node, true).unwrap_err();
            match &e {
                NumaError::NoSuchNode { node: n, nodes } => {
                    assert_eq!(*n, node);
                    assert!(nodes.contains(&0));
                    assert!(nodes.iter().all(|&id| topo.contains(id)), "{nodes:?}");
                }
                other => panic!("expected NoSuchNode, got {other}"),
            }
            assert!(e.to_string().contains("usable nodes: 0"), "{e}");
            assert_eq!(current_policy().unwrap(), before);
        }
        let e = mbind_range(0, 4096, 999, true).unwrap_err();
        assert!(matches!(e, NumaError::NoSuchNode { node: 999, .. }), "{e}");
    });
}

#[test]
fn bound_hugepage_lands_on_node_0() {
    if !common::need_hugepages(2048, 1) {
        return;
    }
    let _pool = common::pool_lock(false);
    on_fresh_thread(|| {
        let guard = PolicyGuard::bind_thread(0, true).unwrap();
        let map = hugemap::HugeMap::new(PageSize::SIZE_2M, 1);
        map.touch();
        drop(guard);
        let node = node_of_address(map.addr()).unwrap();
        if current_policy().unwrap().is_some() {
            assert_eq!(node, Some(0));
        } else {
            assert_eq!(node, None);
        }
        assert_eq!(node_of_address(map.addr() + map.len() - 1).unwrap(), node);
    });
}

#[test]
fn mbind_checks_and_places_pages() {
    if !common::need_hugepages(2048, 2) {
        return;
    }
    let _pool = common::pool_lock(false);
    let map = hugemap::HugeMap::new(PageSize::SIZE_2M, 2);
    mbind_range(map.addr(), map.len(), 0, false).unwrap();
    map.touch();
    // Strict with pages present: succeeds only if every one is on node 0.
    mbind_range(map.addr(), map.len(), 0, true).unwrap();
    let expect = current_policy().unwrap().map(|_| 0);
    assert_eq!(node_of_address(map.addr()).unwrap(), expect);
    if expect.is_some() {
        // Not hugepage aligned: the kernel refuses to split the mapping
        // (the policy must differ from the current one, or it has nothing
        // to split).
        let e = mbind_range(map.addr() + 4096, 4096, 0, false).unwrap_err();
        assert!(matches!(e, NumaError::Syscall { .. }), "{e}");
    }
}

#[test]
fn node_of_an_unmapped_address_is_an_error() {
    if current_policy().unwrap().is_none() {
        return;
    }
    // Page 0 is never mapped (mmap_min_addr).
    let e = node_of_address(16).unwrap_err();
    assert!(matches!(e, NumaError::Syscall { .. }), "{e}");
}
