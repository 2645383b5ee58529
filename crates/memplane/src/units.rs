//! Byte sizes and hugepage sizes: parsing ("2M", "1G", "2048kB",
//! "hugepages-2048kB") and human formatting.

use std::fmt;
use std::str::FromStr;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// A page size in bytes (always a power of two).
///
/// ```
/// use memplane::PageSize;
/// let p: PageSize = "2M".parse().unwrap();
/// assert_eq!(p.bytes(), 2 << 20);
/// assert_eq!(p.to_string(), "2M");
/// assert_eq!(PageSize::from_sysfs_dir_name("hugepages-1048576kB"), Some(PageSize::SIZE_1G));
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "u64", try_from = "u64")]
pub struct PageSize(u64);

impl PageSize {
    /// The base 4 KiB page.
    pub const SIZE_4K: PageSize = PageSize(4 * KIB);
    /// x86-64's 2 MiB hugepage.
    pub const SIZE_2M: PageSize = PageSize(2 * MIB);
    /// x86-64's 1 GiB hugepage.
    pub const SIZE_1G: PageSize = PageSize(GIB);

    /// A page size from a byte count; `None` unless it is a power of two of
    /// at least 4 KiB.
    pub const fn new(bytes: u64) -> Option<PageSize> {
        if bytes.is_power_of_two() && bytes >= 4 * KIB {
            Some(PageSize(bytes))
        } else {
            None
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size in KiB, as sysfs names it.
    pub const fn kib(self) -> u64 {
        self.0 / KIB
    }

    /// Parses a sysfs directory name such as `hugepages-2048kB`.
    pub fn from_sysfs_dir_name(name: &str) -> Option<PageSize> {
        let kb = name.strip_prefix("hugepages-")?.strip_suffix("kB")?;
        PageSize::new(kb.parse::<u64>().ok()?.checked_mul(KIB)?)
    }

    /// The sysfs directory name for this size (`hugepages-2048kB`).
    pub fn sysfs_dir_name(self) -> String {
        format!("hugepages-{}kB", self.kib())
    }
}

impl From<PageSize> for u64 {
    fn from(p: PageSize) -> u64 {
        p.0
    }
}

impl TryFrom<u64> for PageSize {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        PageSize::new(v).ok_or_else(|| format!("{v} is not a valid page size"))
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl FromStr for PageSize {
    type Err = String;

    /// Accepts `2M`, `2MB`, `2MiB`, `1G`, `2048k`, `2048kB`, `2097152` (bytes),
    /// case-insensitive.
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = parse_size(s)?;
        PageSize::new(bytes).ok_or_else(|| {
            format!("'{s}' is not a page size (a power of two of at least 4K, e.g. 2M or 1G)")
        })
    }
}

/// Parses a byte size with an optional binary suffix: `K`, `M`, `G`, `T`
/// (optionally followed by `B` or `iB`, any case). A bare number is bytes.
///
/// ```
/// assert_eq!(memplane::units::parse_size("1G").unwrap(), 1 << 30);
/// assert_eq!(memplane::units::parse_size("2048kB").unwrap(), 2 << 20);
/// assert!(memplane::units::parse_size("-1M").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected digits then an optional K/M/G/T suffix"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let mult = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * KIB,
        _ => {
            return Err(format!(
                "'{s}' has an unknown size suffix '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' overflows 64 bits"))
}

/// Formats a byte count with the largest binary unit that divides it
/// exactly (`2M`, `1G`, `1536K`), or with one decimal when it does not
/// (`1.5G` style is avoided for page sizes, which always divide exactly).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(GIB * KIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")];
    if bytes == 0 {
        return "0".into();
    }
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return format!("{:.1}{name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2m").unwrap(), 2 * MIB);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * MIB);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("2X").is_err());
        assert!(parse_size("-2M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!("1G".parse::<PageSize>().unwrap(), PageSize::SIZE_1G);
        assert!("3M".parse::<PageSize>().is_err());
        assert!("1K".parse::<PageSize>().is_err());
        assert_eq!(PageSize::SIZE_2M.sysfs_dir_name(), "hugepages-2048kB");
        assert_eq!(
            PageSize::from_sysfs_dir_name("hugepages-64kB"),
            Some(PageSize(64 * KIB))
        );
        assert_eq!(PageSize::from_sysfs_dir_name("hugepages-x"), None);
        assert_eq!(PageSize::SIZE_1G.to_string(), "1G");
        assert_eq!(format_size(3 * MIB / 2), "1536K");
        assert_eq!(format_size(1000), "1000B");
    }
}
