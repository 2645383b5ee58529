//! Reads the kernel's view of hugepages from sysfs and procfs.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::debug;

use super::{
    CgroupLimit, HugepageSnapshot, HugetlbfsMount, MemlockLimit, NodePageInfo, PageSizeInfo,
    PagemapAccess, SystemRoots,
};
use crate::error::{Error, Result};
use crate::units::{parse_size, PageSize, KIB};

/// Reads hugepage facts from a [`SystemRoots`].
///
/// ```no_run
/// use memplane::hugepages::{Discovery, SystemRoots};
/// let snap = Discovery::new(SystemRoots::real()).discover()?;
/// println!("{} NUMA node(s)", snap.nodes.len());
/// # Ok::<(), memplane::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Discovery {
    roots: SystemRoots,
}

impl Discovery {
    /// Discovery over the given roots.
    pub fn new(roots: SystemRoots) -> Self {
        Discovery { roots }
    }

    /// The roots this discovery reads.
    pub fn roots(&self) -> &SystemRoots {
        &self.roots
    }

    /// Takes a full snapshot.
    pub fn discover(&self) -> Result<HugepageSnapshot> {
        let default_size = self.default_page_size()?;
        let sizes = self.page_sizes(default_size)?;
        let nodes = self.nodes()?;
        let per_node = self.per_node(&nodes, &sizes)?;
        let mounts = self.mounts(default_size)?;
        let cgroup_limits = self.cgroup_limits(&sizes);
        let memlock = self.memlock()?;
        let pagemap = self.pagemap_access();
        let snap = HugepageSnapshot {
            sizes,
            nodes,
            per_node,
            mounts,
            cgroup_limits,
            memlock,
            pagemap,
        };
        debug!(?snap, "hugepage discovery");
        Ok(snap)
    }

    /// The kernel's default hugepage size (`Hugepagesize:` in
    /// `/proc/meminfo`), `None` when the kernel has no hugepage support.
    pub fn default_page_size(&self) -> Result<Option<PageSize>> {
        let path = self.roots.proc.join("meminfo");
        let text = read(&path)?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Hugepagesize:") {
                let kb = rest.trim().trim_end_matches("kB").trim();
                let kb: u64 = kb.parse().map_err(|_| parse_err(&path, line))?;
                return Ok(PageSize::new(kb * KIB));
            }
        }
        Ok(None)
    }

    fn page_sizes(&self, default_size: Option<PageSize>) -> Result<Vec<PageSizeInfo>> {
        let dir = self.roots.sys.join("kernel/mm/hugepages");
        let mut sizes = Vec::new();
        for (name, path) in list_dir(&dir)? {
            let Some(page_size) = PageSize::from_sysfs_dir_name(&name) else {
                continue;
            };
            sizes.push(PageSizeInfo {
                page_size,
                is_default: Some(page_size) == default_size,
                total: read_u64(&path.join("nr_hugepages"))?,
                free: read_u64(&path.join("free_hugepages"))?,
                reserved: read_u64_or_zero(&path.join("resv_hugepages"))?,
                surplus: read_u64_or_zero(&path.join("surplus_hugepages"))?,
                overcommit: read_u64_or_zero(&path.join("nr_overcommit_hugepages"))?,
            });
        }
        sizes.sort_by_key(|s| s.page_size);
        Ok(sizes)
    }

    fn nodes(&self) -> Result<Vec<u32>> {
        let dir = self.roots.sys.join("devices/system/node");
        let mut nodes: Vec<u32> = list_dir(&dir)?
            .into_iter()
            .filter_map(|(name, _)| name.strip_prefix("node")?.parse().ok())
            .collect();
        nodes.sort_unstable();
        if nodes.is_empty() {
            // A kernel without NUMA support still has one node.
            nodes.push(0);
        }
        Ok(nodes)
    }

    fn per_node(&self, nodes: &[u32], sizes: &[PageSizeInfo]) -> Result<Vec<NodePageInfo>> {
        let mut out = Vec::new();
        for &node in nodes {
            let node_dir = self
                .roots
                .sys
                .join(format!("devices/system/node/node{node}/hugepages"));
            for size in sizes {
                let dir = node_dir.join(size.page_size.sysfs_dir_name());
                if dir.is_dir() {
                    out.push(NodePageInfo {
                        node,
                        page_size: size.page_size,
                        total: read_u64(&dir.join("nr_hugepages"))?,
                        free: read_u64(&dir.join("free_hugepages"))?,
                        surplus: read_u64_or_zero(&dir.join("surplus_hugepages"))?,
                    });
                } else if nodes.len() == 1 {
                    // No per-node files (non-NUMA kernel): the one node has it all.
                    out.push(NodePageInfo {
                        node,
                        page_size: size.page_size,
                        total: size.total,
                        free: size.free,
                        surplus: size.surplus,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Mounted hugetlbfs file systems, from `/proc/self/mounts` (falling
    /// back to `/proc/mounts`).
    pub fn mounts(&self, default_size: Option<PageSize>) -> Result<Vec<HugetlbfsMount>> {
        let text = self.read_mounts()?;
        let mut mounts = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_src), Some(target), Some(fstype), Some(options)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if fstype != "hugetlbfs" {
                continue;
            }
            let mut page_size = default_size;
            let mut size_limit = None;
            for opt in options.split(',') {
                if let Some(v) = opt.strip_prefix("pagesize=") {
                    page_size = v.parse().ok();
                } else if let Some(v) = opt.strip_prefix("size=") {
                    size_limit = parse_size(v).ok();
                }
            }
            let Some(page_size) = page_size else {
                debug!(line, "hugetlbfs mount with unknown page size ignored");
                continue;
            };
            mounts.push(HugetlbfsMount {
                path: PathBuf::from(unescape_mount_path(target)),
                page_size,
                options: options.to_string(),
                size_limit,
            });
        }
        Ok(mounts)
    }

    fn read_mounts(&self) -> Result<String> {
        let own = self.roots.proc.join("self/mounts");
        match fs::read_to_string(&own) {
            Ok(t) => Ok(t),
            Err(_) => read(&self.roots.proc.join("mounts")),
        }
    }

    /// hugetlb cgroup limits on this process, the tightest along the path
    /// from its cgroup up to the root (limits are hierarchical).
    fn cgroup_limits(&self, sizes: &[PageSizeInfo]) -> Vec<CgroupLimit> {
        let Ok(membership) = fs::read_to_string(self.roots.proc.join("self/cgroup")) else {
            return Vec::new();
        };
        let Ok(mounts) = self.read_mounts() else {
            return Vec::new();
        };
        let Some((mount, cgroup_path, v2)) = hugetlb_cgroup_dir(&membership, &mounts) else {
            return Vec::new();
        };
        let mount = self.rebase(&mount);
        let mut out = Vec::new();
        for size in sizes {
            let name = cgroup_size_name(size.page_size);
            let (limit_file, usage_file) = if v2 {
                (
                    format!("hugetlb.{name}.max"),
                    format!("hugetlb.{name}.current"),
                )
            } else {
                (
                    format!("hugetlb.{name}.limit_in_bytes"),
                    format!("hugetlb.{name}.usage_in_bytes"),
                )
            };
            let mut tightest: Option<CgroupLimit> = None;
            let mut dir = Some(cgroup_path.as_str());
            while let Some(rel) = dir {
                let cg_dir = mount.join(rel.trim_start_matches('/'));
                let source = cg_dir.join(&limit_file);
                if let Ok(text) = fs::read_to_string(&source) {
                    let limit = parse_cgroup_limit(text.trim());
                    let usage = fs::read_to_string(cg_dir.join(&usage_file))
                        .ok()
                        .and_then(|u| u.trim().parse().ok());
                    let tighter = match (&tightest, limit) {
                        (None, _) => true,
                        (Some(t), Some(l)) => t.limit.is_none_or(|tl| l < tl),
                        (Some(_), None) => false,
                    };
                    if tighter {
                        tightest = Some(CgroupLimit {
                            page_size: size.page_size,
                            limit,
                            usage,
                            source,
                        });
                    }
                }
                dir = parent_cgroup(rel);
            }
            out.extend(tightest);
        }
        out
    }

    /// Maps an absolute path from the mount table onto the configured sysfs
    /// root (identity for the real roots).
    fn rebase(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("/sys") {
            Ok(rest) if self.roots.sys != Path::new("/sys") => self.roots.sys.join(rest),
            _ => path.to_path_buf(),
        }
    }

    fn memlock(&self) -> Result<MemlockLimit> {
        let path = self.roots.proc.join("self/limits");
        let text = read(&path)?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Max locked memory") {
                let mut f = rest.split_whitespace();
                let soft = f.next().ok_or_else(|| parse_err(&path, line))?;
                let hard = f.next().ok_or_else(|| parse_err(&path, line))?;
                let parse = |v: &str| -> Result<Option<u64>> {
                    if v == "unlimited" {
                        Ok(None)
                    } else {
                        v.parse().map(Some).map_err(|_| parse_err(&path, line))
                    }
                };
                return Ok(MemlockLimit {
                    soft: parse(soft)?,
                    hard: parse(hard)?,
                });
            }
        }
        Err(parse_err(&path, "no 'Max locked memory' line"))
    }

    /// Whether `pagemap` reveals physical frames: reads the entry for a page
    /// this function has just touched.
    fn pagemap_access(&self) -> PagemapAccess {
        use std::io::{Read, Seek, SeekFrom};
        let probe = std::hint::black_box([1u8; 64]);
        let addr = std::ptr::from_ref(&probe) as u64;
        let page = rustix::param::page_size() as u64;
        let Ok(mut file) = fs::File::open(self.roots.proc.join("self/pagemap")) else {
            return PagemapAccess::Unreadable;
        };
        let mut entry = [0u8; 8];
        let ok = file.seek(SeekFrom::Start(addr / page * 8)).is_ok()
            && file.read_exact(&mut entry).is_ok();
        std::hint::black_box(&probe);
        if !ok {
            return PagemapAccess::Unreadable;
        }
        let entry = u64::from_ne_bytes(entry);
        let present = entry >> 63 & 1 == 1;
        let pfn = entry & ((1 << 55) - 1);
        if present && pfn != 0 {
            PagemapAccess::PhysicalAddresses
        } else {
            PagemapAccess::ZeroedFrames
        }
    }
}

/// The kernel's name for a page size in hugetlb cgroup files (`2MB`, `1GB`,
/// `64KB`).
pub fn cgroup_size_name(size: PageSize) -> String {
    let b = size.bytes();
    if b >= 1 << 30 {
        format!("{}GB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{}MB", b >> 20)
    } else {
        format!("{}KB", b >> 10)
    }
}

/// `max` or a byte count; v1 reports "unlimited" as a huge page-rounded
/// number, which we treat as no limit.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    if text == "max" {
        return None;
    }
    match text.parse::<u64>() {
        Ok(v) if v < 1 << 62 => Some(v),
        _ => None,
    }
}

/// Finds the hugetlb cgroup of this process: (mount point, path inside the
/// hierarchy, is v2). Prefers a v1 `hugetlb` controller, else the v2 unified
/// hierarchy when it has the hugetlb controller enabled.
fn hugetlb_cgroup_dir(membership: &str, mounts: &str) -> Option<(PathBuf, String, bool)> {
    let mut v2_path = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "hugetlb") {
            let mount = mounts.lines().find_map(|m| {
                let f: Vec<&str> = m.split_whitespace().collect();
                (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "hugetlb"))
                    .then(|| PathBuf::from(unescape_mount_path(f[1])))
            })?;
            return Some((mount, path.to_string(), false));
        }
    }
    let path = v2_path?;
    let mount = mounts.lines().find_map(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        (f.len() >= 3 && f[2] == "cgroup2").then(|| PathBuf::from(unescape_mount_path(f[1])))
    })?;
    Some((mount, path, true))
}

fn parent_cgroup(path: &str) -> Option<&str> {
    if path == "/" || path.is_empty() {
        return None;
    }
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) if i > 0 => Some(&trimmed[..i]),
        _ => Some("/"),
    }
}

/// Undoes the octal escapes (`\040` for space) the kernel uses in mount
/// tables.
pub(crate) fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = read(path)?;
    text.trim()
        .parse()
        .map_err(|_| parse_err(path, text.trim()))
}

fn read_u64_or_zero(path: &Path) -> Result<u64> {
    if path.exists() {
        read_u64(path)
    } else {
        Ok(0)
    }
}

fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    Ok(out)
}

fn parse_err(path: &Path, detail: &str) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        detail: format!("unexpected content '{detail}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(
            unescape_mount_path("/mnt/huge\\040pages"),
            "/mnt/huge pages"
        );
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/trail\\04"), "/trail\\04");
    }

    #[test]
    fn cgroup_names_and_limits() {
        assert_eq!(cgroup_size_name(PageSize::SIZE_2M), "2MB");
        assert_eq!(cgroup_size_name(PageSize::SIZE_1G), "1GB");
        assert_eq!(cgroup_size_name(PageSize::new(64 * KIB).unwrap()), "64KB");
        assert_eq!(parse_cgroup_limit("max"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712"), None);
        assert_eq!(parse_cgroup_limit("4194304"), Some(4_194_304));
    }

    #[test]
    fn cgroup_parents() {
        assert_eq!(parent_cgroup("/a/b"), Some("/a"));
        assert_eq!(parent_cgroup("/a"), Some("/"));
        assert_eq!(parent_cgroup("/"), None);
    }
}
