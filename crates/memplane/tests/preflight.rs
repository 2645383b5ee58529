//! Preflight: plans on fake trees, diagnoses shortfalls, and on the real
//! machine refuses an oversized request without mapping anything.

mod common;

use std::path::PathBuf;

use common::FakeSystem;
use memplane::hugepages::{Discovery, SystemRoots};
use memplane::preflight::{check, Backing, Demand, PlanEntry, Reason, Request};
use memplane::units::{PageSize, GIB, MIB};
use memplane::Error;

fn request(demands: Vec<(Option<u32>, u64)>) -> Request {
    Request {
        demands: demands
            .into_iter()
            .map(|(node, bytes)| Demand {
                node,
                bytes,
                origin: "--socket-mem".into(),
            })
            .collect(),
        backing: Backing::Memfd,
        size_caps: Vec::new(),
        own_prefix: "mp".into(),
    }
}

/// Two nodes with 2M and 1G pages.
fn two_nodes() -> FakeSystem {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 1024, 1000, 0, 0, 0);
    f.size(1_048_576, 4, 4, 0, 0, 0);
    f.node_size(0, 2048, 512, 500);
    f.node_size(1, 2048, 512, 500);
    f.node_size(0, 1_048_576, 2, 2);
    f.node_size(1, 1_048_576, 2, 2);
    f
}

fn preflight_error(err: Error) -> memplane::preflight::PreflightError {
    match err {
        Error::Preflight(p) => p,
        other => panic!("expected a preflight error, got {other}"),
    }
}

#[test]
fn plans_largest_pages_first_then_rounds_up_with_small_ones() {
    let f = two_nodes();
    let plan = check(
        &request(vec![(Some(0), 2 * GIB + 3 * MIB), (Some(1), 512 * MIB)]),
        &Discovery::new(f.roots()),
    )
    .unwrap();
    assert_eq!(
        plan.entries,
        vec![
            PlanEntry {
                node: 0,
                page_size: PageSize::SIZE_1G,
                pages: 2
            },
            PlanEntry {
                node: 0,
                page_size: PageSize::SIZE_2M,
                pages: 2
            },
            PlanEntry {
                node: 1,
                page_size: PageSize::SIZE_2M,
                pages: 256
            },
        ]
    );
    assert_eq!(
        plan.usable_sizes,
        vec![PageSize::SIZE_1G, PageSize::SIZE_2M]
    );
}

#[test]
fn any_node_demand_spills_over_nodes() {
    let f = two_nodes();
    // 4G of 1G pages (2 per node) + 1000 free 2M pages (500 per node).
    let plan = check(&request(vec![(None, 5 * GIB)]), &Discovery::new(f.roots())).unwrap();
    assert_eq!(plan.bytes(), 5 * GIB);
    let err = check(&request(vec![(None, 6 * GIB)]), &Discovery::new(f.roots())).unwrap_err();
    let p = preflight_error(err);
    assert_eq!(p.shortfalls[0].servable, 4 * GIB + 1000 * 2 * MIB);
}

#[test]
fn shortfall_names_node_sizes_and_fix() {
    let f = two_nodes();
    let err = check(
        &request(vec![(Some(1), 4 * GIB)]),
        &Discovery::new(f.roots()),
    )
    .unwrap_err();
    let msg = err.to_string();
    let p = preflight_error(err);
    let s = &p.shortfalls[0];
    assert_eq!(s.node, Some(1));
    assert_eq!(s.asked, 4 * GIB);
    assert_eq!(s.servable, 2 * GIB + 1000 * MIB);
    // 1 GiB + 24 MiB short = 524 more 2M pages on node 1 (512 there now).
    assert!(
        s.fixes
            .iter()
            .any(|f| f.starts_with("memplane hugepages reserve 2M=1036 --node 1")),
        "{:?}",
        s.fixes
    );
    assert!(
        msg.contains("NUMA node 1: asked 4G (--socket-mem)"),
        "{msg}"
    );
    assert!(msg.contains("2M pages: 512 reserved, 500 free"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
}

#[test]
fn unused_page_sizes_are_not_mentioned() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 10, 10, 0, 0, 0);
    f.size(1_048_576, 0, 0, 0, 0, 0);
    let err = check(&request(vec![(Some(0), GIB)]), &Discovery::new(f.roots())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("2M pages"), "{msg}");
    assert!(
        !msg.contains("1G pages"),
        "1G pages are irrelevant here: {msg}"
    );
}

#[test]
fn promised_pages_are_not_usable() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 100, 100, 60, 0, 0);
    let err = check(
        &request(vec![(Some(0), 100 * MIB)]),
        &Discovery::new(f.roots()),
    )
    .unwrap_err();
    let p = preflight_error(err);
    assert_eq!(p.shortfalls[0].servable, 80 * MIB);
    assert!(p.shortfalls[0].sizes[0]
        .reasons
        .contains(&Reason::PromisedToOthers { pages: 60 }));
}

#[test]
fn cgroup_limit_caps_and_is_explained() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 1024, 1024, 0, 0, 0);
    f.write(
        "proc/self/mounts",
        "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
    );
    f.write("proc/self/cgroup", "0::/pod\n");
    f.write("sys/fs/cgroup/pod/hugetlb.2MB.max", "8388608\n");
    f.write("sys/fs/cgroup/pod/hugetlb.2MB.current", "4194304\n");
    let err = check(
        &request(vec![(Some(0), 64 * MIB)]),
        &Discovery::new(f.roots()),
    )
    .unwrap_err();
    let msg = err.to_string();
    let p = preflight_error(err);
    assert_eq!(p.shortfalls[0].servable, 4 * MIB);
    assert!(msg.contains("hugetlb cgroup limit"), "{msg}");
    assert!(
        msg.contains("hugetlb.2MB.max allows 8M, 4M already used"),
        "{msg}"
    );
    assert!(
        p.shortfalls[0]
            .fixes
            .iter()
            .any(|f| f.contains("echo 71303168 >")),
        "{:?}",
        p.shortfalls[0].fixes
    );
}

#[test]
fn size_cap_option_disables_a_size() {
    let f = two_nodes();
    let mut req = request(vec![(Some(0), 2 * GIB)]);
    req.size_caps = vec![(PageSize::SIZE_1G, 0)];
    let plan = check(&req, &Discovery::new(f.roots()));
    let p = preflight_error(plan.unwrap_err());
    let d1g = p.shortfalls[0]
        .sizes
        .iter()
        .find(|d| d.page_size == PageSize::SIZE_1G)
        .unwrap();
    assert!(d1g.reasons.contains(&Reason::CappedByOption { cap: 0 }));
    assert_eq!(d1g.usable, 0);
}

#[test]
fn unknown_node_is_refused_naming_the_nodes() {
    let f = two_nodes();
    let err = check(&request(vec![(Some(7), MIB)]), &Discovery::new(f.roots())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotFound { .. }), "{msg}");
    assert!(msg.contains("node 7") && msg.contains("0, 1"), "{msg}");
}

#[test]
fn no_hugepages_at_all_fails_even_without_a_demand() {
    let f = FakeSystem::new();
    f.default_size_kb(2048);
    f.size(2048, 0, 0, 0, 0, 0);
    let err = check(&request(vec![]), &Discovery::new(f.roots())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no 2M pages are reserved"), "{msg}");
    assert!(msg.contains("memplane hugepages reserve 2M=1"), "{msg}");
}

#[test]
fn anonymous_backing_needs_no_hugepages() {
    let f = FakeSystem::new();
    let mut req = request(vec![(Some(0), GIB)]);
    req.backing = Backing::Anonymous;
    assert!(check(&req, &Discovery::new(f.roots()))
        .unwrap()
        .entries
        .is_empty());
}

#[test]
fn huge_dir_outside_any_mount_is_refused() {
    let f = two_nodes();
    let mut req = request(vec![(Some(0), MIB)]);
    req.backing = Backing::Hugetlbfs(PathBuf::from("/nonexistent/huge"));
    let msg = check(&req, &Discovery::new(f.roots()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("--huge-dir /nonexistent/huge is not inside a hugetlbfs mount"),
        "{msg}"
    );
}

fn hugetlbfs_files() -> usize {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        .map(|l| {
            let dir = l.split_whitespace().nth(1).unwrap();
            std::fs::read_dir(dir).map_or(0, Iterator::count)
        })
        .sum()
}

#[test]
fn real_machine_refuses_more_than_free_and_maps_nothing() {
    if !common::need_hugepages(2048, 1) {
        return;
    }
    let _pool = common::pool_lock(true);
    let total = common::real_counter(2048, "nr_hugepages");
    let free_before = common::real_counter(2048, "free_hugepages");
    let files_before = hugetlbfs_files();
    // More than the whole 2M pool plus every 1G page: can never be served.
    let ask = (total + 1) * 2 * MIB + common::real_counter(1_048_576, "nr_hugepages") * GIB;
    let err = check(
        &request(vec![(Some(0), ask)]),
        &Discovery::new(SystemRoots::real()),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("NUMA node 0: asked"), "{msg}");
    assert!(
        msg.contains(&format!("2M pages: {total} reserved")),
        "{msg}"
    );
    assert!(msg.contains("fix: memplane hugepages reserve 2M="), "{msg}");
    // Nothing was taken: no pages and no files.
    assert_eq!(common::real_counter(2048, "free_hugepages"), free_before);
    assert_eq!(hugetlbfs_files(), files_before);
    // A request that fits is planned.
    let plan = check(
        &request(vec![(Some(0), 2 * MIB)]),
        &Discovery::new(SystemRoots::real()),
    )
    .unwrap();
    assert_eq!(plan.bytes(), 2 * MIB);
}
