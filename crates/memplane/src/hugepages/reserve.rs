//! Changing the hugepage pool: reserving pages (`nr_hugepages`) and mounting
//! hugetlbfs. These are the only functions in discovery's tree that write.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::info;

use super::{Discovery, HugepageSnapshot};
use crate::error::{Error, Result};
use crate::units::PageSize;

/// What a reservation asked for and what the kernel granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReserveOutcome {
    /// The page size.
    pub page_size: PageSize,
    /// The node, or `None` for the system-wide pool.
    pub node: Option<u32>,
    /// Pages in the pool before.
    pub before: u64,
    /// Pages asked for.
    pub requested: u64,
    /// Pages in the pool after (the kernel may grant fewer when memory is
    /// fragmented or short).
    pub granted: u64,
}

impl ReserveOutcome {
    /// Whether the kernel granted the full request.
    pub fn is_complete(&self) -> bool {
        self.granted >= self.requested
    }
}

/// Checks that `page_size` and `node` exist in `snap`, naming what does exist
/// when they don't.
pub fn check_target(snap: &HugepageSnapshot, page_size: PageSize, node: Option<u32>) -> Result<()> {
    if snap.size(page_size).is_none() {
        return Err(Error::NotFound {
            what: format!(
                "this kernel has no {page_size} hugepages; supported sizes: {}",
                snap.size_list()
            ),
        });
    }
    if let Some(n) = node {
        if !snap.nodes.contains(&n) {
            let nodes: Vec<String> = snap.nodes.iter().map(u32::to_string).collect();
            return Err(Error::NotFound {
                what: format!(
                    "NUMA node {n} does not exist; nodes on this machine: {}",
                    nodes.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Sets the pool of `page_size` pages (on `node`, or system-wide) to
/// `count` pages. Validates first, so a bad size or node changes nothing.
///
/// The kernel may grant fewer pages than asked (fragmented memory); the
/// outcome says how many it gave. Shrinking below the pages in use leaves
/// the used ones as surplus until freed.
pub fn set_pool_size(
    discovery: &Discovery,
    page_size: PageSize,
    node: Option<u32>,
    count: u64,
) -> Result<ReserveOutcome> {
    let snap = discovery.discover()?;
    check_target(&snap, page_size, node)?;
    let file = pool_file(discovery, page_size, node);
    let before = read_count(&file)?;
    if let Err(e) = fs::write(&file, count.to_string()) {
        return Err(match e.kind() {
            ErrorKind::PermissionDenied => Error::Permission {
                what: format!("writing {count} to {}", file.display()),
                fix: format!(
                    "run as root (sudo memplane hugepages reserve {page_size}={count}{}), or ask an administrator to reserve the pages at boot with the kernel command line 'hugepagesz={page_size} hugepages={count}'",
                    node.map(|n| format!(" --node {n}")).unwrap_or_default()
                ),
            },
            _ => Error::io("writing", &file, e),
        });
    }
    let granted = read_count(&file)?;
    info!(%page_size, ?node, before, requested = count, granted, "hugepage pool resized");
    Ok(ReserveOutcome {
        page_size,
        node,
        before,
        requested: count,
        granted,
    })
}

fn pool_file(discovery: &Discovery, page_size: PageSize, node: Option<u32>) -> PathBuf {
    let sys = &discovery.roots().sys;
    match node {
        Some(n) => sys.join(format!(
            "devices/system/node/node{n}/hugepages/{}/nr_hugepages",
            page_size.sysfs_dir_name()
        )),
        None => sys.join(format!(
            "kernel/mm/hugepages/{}/nr_hugepages",
            page_size.sysfs_dir_name()
        )),
    }
}

fn read_count(path: &Path) -> Result<u64> {
    let t = fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    t.trim().parse().map_err(|_| Error::Parse {
        path: path.to_path_buf(),
        detail: format!("not a page count: '{}'", t.trim()),
    })
}

/// Mounts a hugetlbfs for `page_size` at `dir` (created if missing). When a
/// hugetlbfs of that size is already mounted there, does nothing and returns
/// `false`.
pub fn mount_hugetlbfs(discovery: &Discovery, dir: &Path, page_size: PageSize) -> Result<bool> {
    let snap = discovery.discover()?;
    check_target(&snap, page_size, None)?;
    if let Some(existing) = snap.mounts.iter().find(|m| m.path == dir) {
        if existing.page_size == page_size {
            return Ok(false);
        }
        return Err(Error::System(format!(
            "{} is already a hugetlbfs mount for {} pages; unmount it first (umount {}) or pick another directory",
            dir.display(),
            existing.page_size,
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let data = format!("pagesize={page_size},mode=1770");
    let data_c = std::ffi::CString::new(data.clone())
        .map_err(|_| Error::System("mount options contain a NUL byte".into()))?;
    rustix::mount::mount(
        "nodev",
        dir,
        "hugetlbfs",
        rustix::mount::MountFlags::empty(),
        Some(data_c.as_c_str()),
    )
        .map_err(|e| {
            if e == rustix::io::Errno::PERM || e == rustix::io::Errno::ACCESS {
                Error::Permission {
                    what: format!("mounting hugetlbfs at {}", dir.display()),
                    fix: format!(
                        "run as root: sudo memplane hugepages mount {} --size {page_size} (memplane's default memfd backing needs no mount at all)",
                        dir.display()
                    ),
                }
            } else {
                Error::System(format!(
                    "mount -t hugetlbfs -o {data} nodev {} failed: {e}",
                    dir.display()
                ))
            }
        })?;
    info!(dir = %dir.display(), %page_size, "mounted hugetlbfs");
    Ok(true)
}
