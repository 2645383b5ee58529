//! [`MemOptions`]: DPDK's EAL memory flags as a typed, validated struct.
//!
//! The library takes a [`MemOptions`]; the CLI (and users who already have
//! EAL-style strings) build one with [`MemOptions::parse_args`]. Every flag
//! DPDK users know keeps its DPDK spelling and meaning (`--socket-mem`,
//! `--numa-mem`, `-m`, `--legacy-mem`, ...), and the combinations DPDK rejects
//! are rejected here too, at parse time, with an error that names both flags
//! and says what to do. `docs/options.md` is the reference of every option.
//!
//! Amounts are stored in **bytes**. On the command line a bare number is MB,
//! as in DPDK (`--socket-mem 1024,1024`, `-m 512`); a size suffix is also
//! accepted (`--socket-mem 1G,512M`).
//!
//! ```
//! use memplane::options::{HugeUnlink, MemOptions, OptionsError};
//! use memplane::units::MIB;
//!
//! let opts = MemOptions::parse_args(&["--socket-mem", "1024,0", "--file-prefix=app1"])?;
//! assert_eq!(opts.socket_mem, Some(vec![1024 * MIB, 0]));
//! assert_eq!(opts.file_prefix, "app1");
//!
//! // The same thing, built in code; `build` validates.
//! let built = MemOptions::new().socket_mem([1024 * MIB, 0]).file_prefix("app1").build()?;
//! assert_eq!(built, opts);
//!
//! // Options hand themselves to a child process and come back equal.
//! assert_eq!(MemOptions::parse_args(&opts.to_args())?, opts);
//!
//! // DPDK's rejected combinations are rejected, naming both flags.
//! let err = MemOptions::parse_args(&["--no-huge", "--huge-unlink"]).unwrap_err();
//! assert!(matches!(err, OptionsError::Conflict { .. }));
//! assert!(err.to_string().contains("--no-huge") && err.to_string().contains("--huge-unlink"));
//! # Ok::<(), OptionsError>(())
//! ```

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::units::{PageSize, GIB, KIB, MIB};

/// Default `--file-prefix`. DPDK's is `rte`; ours differs so that memplane's
/// files and runtime directories never collide with a DPDK process's.
pub const DEFAULT_FILE_PREFIX: &str = "mp";
/// Longest accepted `--file-prefix`, in bytes (it becomes part of file names
/// and of a unix socket path, which is limited to 108 bytes).
pub const MAX_FILE_PREFIX_LEN: usize = 64;
/// Default `--max-memzones` (DPDK's default since 23.07, `RTE_MAX_MEMZONE`
/// before).
pub const DEFAULT_MAX_MEMZONES: u32 = 2560;
/// Largest accepted `--max-memzones`.
pub const MAX_MAX_MEMZONES: u32 = 1 << 20;
/// Default `--max-memseg-lists` (DPDK's `RTE_MAX_MEMSEG_LISTS`).
pub const DEFAULT_MAX_MEMSEG_LISTS: u32 = 128;
/// Largest accepted `--max-memseg-lists`.
pub const MAX_MAX_MEMSEG_LISTS: u32 = 4096;
/// Default `--max-heaps` (DPDK's `RTE_MAX_HEAPS`): NUMA heaps plus named
/// external heaps.
pub const DEFAULT_MAX_HEAPS: u32 = 32;
/// Largest accepted `--max-heaps`.
pub const MAX_MAX_HEAPS: u32 = 1024;
/// Largest `-n` / `--memory-channels`.
pub const MAX_MEMORY_CHANNELS: u32 = 64;
/// Largest `-r` / `--memory-ranks` (DPDK's bound).
pub const MAX_MEMORY_RANKS: u32 = 16;
/// Most entries accepted in a `--socket-mem` / `--socket-limit` list: Linux's
/// largest `MAX_NUMNODES` (DPDK stops at its compile-time
/// `RTE_MAX_NUMA_NODES`, 32). Whether the nodes exist is checked at init.
pub const MAX_NUMA_NODES: usize = 1024;
/// `--base-virtaddr` must be a multiple of this (16 MiB, the alignment DPDK
/// rounds the address up to).
pub const BASE_VIRTADDR_ALIGN: u64 = 16 * MIB;
/// `--base-virtaddr` must be below this: the top of the largest Linux user
/// address space (x86-64 with 5-level paging).
pub const BASE_VIRTADDR_LIMIT: u64 = 1 << 56;
/// Memory used by `--no-huge` when neither `-m` nor anything else sizes it
/// (DPDK's default, 64 MB).
pub const NO_HUGE_DEFAULT_MEMORY: u64 = 64 * MIB;

/// What happens to hugepage files (`--huge-unlink[=existing|always|never]`).
///
/// Only meaningful with hugetlbfs files (`--huge-dir`); memfd-backed memory
/// has no files.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HugeUnlink {
    /// Stale files are removed at start and files are re-created before
    /// mapping, so pages come zeroed (the default; same as not giving the
    /// option).
    #[default]
    Existing,
    /// Also unlink each file right after opening it, leaving no files behind
    /// (bare `--huge-unlink`).
    Always,
    /// Never unlink existing files: they are re-mapped with their old
    /// content (pages are treated as dirty) and survive for reuse after a
    /// restart.
    Never,
}

impl HugeUnlink {
    /// The command-line spelling (`existing`, `always`, `never`).
    pub const fn as_str(self) -> &'static str {
        match self {
            HugeUnlink::Existing => "existing",
            HugeUnlink::Always => "always",
            HugeUnlink::Never => "never",
        }
    }
}

impl fmt::Display for HugeUnlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HugeUnlink {
    type Err = OptionsError;

    /// Accepts `existing`, `always` or `never` (any case).
    fn from_str(s: &str) -> Result<Self, OptionsError> {
        match s.to_ascii_lowercase().as_str() {
            "existing" => Ok(HugeUnlink::Existing),
            "always" => Ok(HugeUnlink::Always),
            "never" => Ok(HugeUnlink::Never),
            _ => Err(bad(
                "--huge-unlink",
                s,
                "expected existing, always or never (write --huge-unlink=always, or bare \
                 --huge-unlink for always)",
            )),
        }
    }
}

/// The role a process asks for (`--proc-type primary|secondary|auto`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProcType {
    /// Create and own the shared state (the default).
    #[default]
    Primary,
    /// Attach to the running primary of the same file prefix.
    Secondary,
    /// Secondary if a live primary holds the prefix, else primary.
    Auto,
}

impl ProcType {
    /// The command-line spelling (`primary`, `secondary`, `auto`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ProcType::Primary => "primary",
            ProcType::Secondary => "secondary",
            ProcType::Auto => "auto",
        }
    }
}

impl fmt::Display for ProcType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProcType {
    type Err = OptionsError;

    /// Accepts `primary`, `secondary` or `auto` (any case, as DPDK).
    fn from_str(s: &str) -> Result<Self, OptionsError> {
        match s.to_ascii_lowercase().as_str() {
            "primary" => Ok(ProcType::Primary),
            "secondary" => Ok(ProcType::Secondary),
            "auto" => Ok(ProcType::Auto),
            _ => Err(bad("--proc-type", s, "expected primary, secondary or auto")),
        }
    }
}

/// How device addresses (IOVAs) relate to memory (`--iova-mode pa|va`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IovaMode {
    /// IOVA = physical address (needs root to read `/proc/self/pagemap`).
    Pa,
    /// IOVA = virtual address (needs an IOMMU for real devices).
    Va,
}

impl IovaMode {
    /// The command-line spelling (`pa`, `va`).
    pub const fn as_str(self) -> &'static str {
        match self {
            IovaMode::Pa => "pa",
            IovaMode::Va => "va",
        }
    }
}

impl fmt::Display for IovaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IovaMode {
    type Err = OptionsError;

    /// Accepts `pa` or `va` (any case).
    fn from_str(s: &str) -> Result<Self, OptionsError> {
        match s.to_ascii_lowercase().as_str() {
            "pa" => Ok(IovaMode::Pa),
            "va" => Ok(IovaMode::Va),
            _ => Err(bad(
                "--iova-mode",
                s,
                "expected pa or va (or auto, the default, to let memplane choose)",
            )),
        }
    }
}

/// A bad option, value or combination of options.
///
/// Every message names the input and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// An option memplane does not know at all.
    #[error(
        "unknown option '{option}'{}; memplane's options are: {}",
        did_you_mean(.suggestion.as_deref()),
        option_list()
    )]
    UnknownOption {
        /// The option as given (without any `=value`).
        option: String,
        /// A known option it looks like, if any.
        suggestion: Option<String>,
    },

    /// A DPDK EAL option that is not about memory (`-l`, `-n`, `--vdev`,
    /// ...). memplane handles only memory options.
    #[error(
        "'{option}' is DPDK's EAL option for {what}, not a memory option; memplane does not \
         handle it. Remove it (MemOptions::parse_known_args sets such options aside). \
         memplane's options are: {}",
        option_list()
    )]
    NotMemoryOption {
        /// The option as given.
        option: String,
        /// What DPDK uses it for.
        what: String,
    },

    /// An option that needs a value got none.
    #[error("option '{option}' needs a value: {expected}")]
    MissingValue {
        /// The option as given.
        option: String,
        /// What the value looks like, with an example.
        expected: String,
    },

    /// A flag that takes no value was given one (`--no-huge=1`).
    #[error("option '{option}' takes no value but was given '{value}'; write just {option}")]
    UnexpectedValue {
        /// The option as given.
        option: String,
        /// The value it was given.
        value: String,
    },

    /// An argument that is not an option.
    #[error("unexpected argument '{arg}': {hint}")]
    UnexpectedArgument {
        /// The argument.
        arg: String,
        /// What to do about it.
        hint: String,
    },

    /// An option's value is malformed or out of range.
    #[error("invalid value '{value}' for {option}: {reason}")]
    BadValue {
        /// The option as given (or its canonical name when the value was set
        /// in code).
        option: String,
        /// The value (as given, or as formatted from the field).
        value: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// Two options that cannot be used together.
    #[error("{a} cannot be used together with {b}: {reason}")]
    Conflict {
        /// The first option.
        a: String,
        /// The second option.
        b: String,
        /// Why, and what to do.
        reason: String,
    },
}

fn bad(option: &str, value: &str, reason: impl Into<String>) -> OptionsError {
    OptionsError::BadValue {
        option: option.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |s| format!(" (did you mean {s}?)"))
}

fn option_list() -> String {
    let names: Vec<String> = SPECS
        .iter()
        .map(|s| match (s.alias, s.display == s.long) {
            (Some(alias), _) => format!("{} ({alias})", s.display),
            (None, false) => format!("{} ({})", s.display, s.long),
            (None, true) => s.display.to_string(),
        })
        .collect();
    format!("{} (see docs/options.md)", names.join(", "))
}

/// memplane's memory options: DPDK's EAL memory flags plus memplane's table
/// sizes.
///
/// Build one with [`MemOptions::parse_args`] or the builder methods
/// ([`MemOptions::new`] … [`MemOptions::build`]); both validate. Fields are
/// public for reading; if you change them directly, call
/// [`MemOptions::validate`]. `docs/options.md` documents every option.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MemOptions {
    /// `--socket-mem` (alias `--numa-mem`): bytes to preallocate and keep on
    /// each NUMA node, index = node. MB on the command line.
    pub socket_mem: Option<Vec<u64>>,
    /// `--socket-limit` (alias `--numa-limit`): most bytes each node's heap
    /// may grow to, index = node; 0 = no limit on that node. MB on the
    /// command line.
    pub socket_limit: Option<Vec<u64>>,
    /// `-m` / `--memory-size`: total bytes to preallocate at init, spread
    /// over nodes. MB on the command line.
    pub memory_size: Option<u64>,
    /// `--pagesz-mem <size>:<limit>` (repeatable): most bytes of each page
    /// size memplane may use (and reserve address space for); 0 disables the
    /// size. Sizes not listed get [`default_pagesz_limit`]. One entry per
    /// page size.
    pub pagesz_mem: Vec<(PageSize, u64)>,
    /// `--legacy-mem`: map all memory at init, never grow or shrink.
    pub legacy_mem: bool,
    /// `--single-file-segments`: one file (or memfd) per memseg list instead
    /// of one per page.
    pub single_file_segments: bool,
    /// `--in-memory`: create no files and no shared config at all (implies
    /// `--no-shconf`; no secondaries).
    pub in_memory: bool,
    /// `--no-huge`: use ordinary 4 KiB pages instead of hugepages.
    pub no_huge: bool,
    /// `--no-shconf`: no shared config file (no secondaries).
    pub no_shconf: bool,
    /// `--huge-dir`: back memory with files in this hugetlbfs mount instead
    /// of memfds. Absolute path.
    pub huge_dir: Option<PathBuf>,
    /// `--huge-unlink[=existing|always|never]`.
    pub huge_unlink: HugeUnlink,
    /// `--file-prefix`: names this instance's runtime directory and files;
    /// distinct prefixes are independent instances. Default
    /// [`DEFAULT_FILE_PREFIX`].
    pub file_prefix: String,
    /// `--proc-type`.
    pub proc_type: ProcType,
    /// `--iova-mode`; `None` = choose automatically.
    pub iova_mode: Option<IovaMode>,
    /// `--match-allocations`: give hugepages back to the OS only in the
    /// exact chunks they were allocated in.
    pub match_allocations: bool,
    /// `--numa-lenient`: a page the kernel placed on another NUMA node than
    /// asked is a warning instead of an error (memplane extension).
    pub numa_lenient: bool,
    /// `--base-virtaddr`: where memplane's address-space reservation starts.
    /// A multiple of [`BASE_VIRTADDR_ALIGN`]. `None` = memplane's default.
    pub base_virtaddr: Option<u64>,
    /// `--max-memzones`: size of the memzone table. Default
    /// [`DEFAULT_MAX_MEMZONES`].
    pub max_memzones: u32,
    /// `--max-memseg-lists`: size of the memseg list table (one list per
    /// page size and node, plus registered external memory). Default
    /// [`DEFAULT_MAX_MEMSEG_LISTS`].
    pub max_memseg_lists: u32,
    /// `--max-heaps`: size of the heap table (one heap per NUMA node plus
    /// named external heaps). Default [`DEFAULT_MAX_HEAPS`].
    pub max_heaps: u32,
    /// `--runtime-dir`: base directory for runtime files instead of the one
    /// taken from the environment. Absolute path.
    pub runtime_dir: Option<PathBuf>,
    /// `-n` / `--memory-channels`: memory channels per socket (1 to
    /// [`MAX_MEMORY_CHANNELS`]). Mempools pad their objects so consecutive
    /// ones start on different channels; unset, they assume DPDK's 4.
    /// The primary's value is the instance's (secondaries read it).
    pub memory_channels: Option<u32>,
    /// `-r` / `--memory-ranks`: memory ranks (1 to [`MAX_MEMORY_RANKS`]);
    /// unset, mempools assume 1.
    pub memory_ranks: Option<u32>,
}

impl Default for MemOptions {
    fn default() -> Self {
        MemOptions {
            socket_mem: None,
            socket_limit: None,
            memory_size: None,
            pagesz_mem: Vec::new(),
            legacy_mem: false,
            single_file_segments: false,
            in_memory: false,
            no_huge: false,
            no_shconf: false,
            huge_dir: None,
            huge_unlink: HugeUnlink::Existing,
            file_prefix: DEFAULT_FILE_PREFIX.to_string(),
            proc_type: ProcType::Primary,
            iova_mode: None,
            match_allocations: false,
            numa_lenient: false,
            base_virtaddr: None,
            max_memzones: DEFAULT_MAX_MEMZONES,
            max_memseg_lists: DEFAULT_MAX_MEMSEG_LISTS,
            max_heaps: DEFAULT_MAX_HEAPS,
            runtime_dir: None,
            memory_channels: None,
            memory_ranks: None,
        }
    }
}

/// The default `--pagesz-mem` limit of a page size when none is given:
/// min(64 GiB, 32768 pages), as in DPDK 26.07.
pub const fn default_pagesz_limit(page_size: PageSize) -> u64 {
    let pages = page_size.bytes().saturating_mul(32768);
    if pages < 64 * GIB {
        pages
    } else {
        64 * GIB
    }
}

// ---------------------------------------------------------------------------
// The option table.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    SocketMem,
    SocketLimit,
    MemorySize,
    PageszMem,
    LegacyMem,
    SingleFileSegments,
    InMemory,
    NoHuge,
    NoShconf,
    HugeDir,
    HugeUnlink,
    FilePrefix,
    ProcType,
    IovaMode,
    MatchAllocations,
    NumaLenient,
    BaseVirtaddr,
    MaxMemzones,
    MaxMemsegLists,
    MaxHeaps,
    RuntimeDir,
    MemoryChannels,
    MemoryRanks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    /// No value.
    Flag,
    /// `--opt value` or `--opt=value`.
    Value,
    /// Only `--opt=value`; bare `--opt` has a meaning of its own.
    Optional,
}

struct Spec {
    key: Key,
    /// Long name, with the dashes.
    long: &'static str,
    /// A second long name.
    alias: Option<&'static str>,
    /// Short name (`-m`, `-n`, `-r`).
    short: Option<char>,
    /// The name used in messages and by `to_args`.
    display: &'static str,
    arity: Arity,
    /// Placeholder for the value in help text.
    value: &'static str,
    /// What the value looks like, with an example (for `MissingValue`).
    expected: &'static str,
    /// One-line description.
    help: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        key: Key::SocketMem,
        long: "--socket-mem",
        alias: Some("--numa-mem"),
        short: None,
        display: "--socket-mem",
        arity: Arity::Value,
        value: "<MB,MB,...>",
        expected: "memory to preallocate per NUMA node, in MB, comma separated (e.g. --socket-mem 1024,1024)",
        help: "Memory to preallocate and keep on each NUMA node, in MB (or with a K/M/G/T suffix)",
    },
    Spec {
        key: Key::SocketLimit,
        long: "--socket-limit",
        alias: Some("--numa-limit"),
        short: None,
        display: "--socket-limit",
        arity: Arity::Value,
        value: "<MB,MB,...>",
        expected: "the most memory each NUMA node may use, in MB, comma separated, 0 = no limit (e.g. --socket-limit 2048,0)",
        help: "Most memory each NUMA node's heap may grow to, in MB; 0 = no limit on that node",
    },
    Spec {
        key: Key::MemorySize,
        long: "--memory-size",
        alias: None,
        short: Some('m'),
        display: "-m",
        arity: Arity::Value,
        value: "<MB>",
        expected: "total memory to preallocate, in MB (e.g. -m 512)",
        help: "Total memory to preallocate at init, in MB, spread over the NUMA nodes",
    },
    Spec {
        key: Key::PageszMem,
        long: "--pagesz-mem",
        alias: None,
        short: None,
        display: "--pagesz-mem",
        arity: Arity::Value,
        value: "<pagesz>:<limit>",
        expected: "a page size and the most memory of that size, e.g. --pagesz-mem 1G:4G (0 disables the size)",
        help: "Most memory of one page size (repeatable); 0 disables that size",
    },
    Spec {
        key: Key::LegacyMem,
        long: "--legacy-mem",
        alias: None,
        short: None,
        display: "--legacy-mem",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "Static memory: map everything at init, never grow or shrink",
    },
    Spec {
        key: Key::SingleFileSegments,
        long: "--single-file-segments",
        alias: None,
        short: None,
        display: "--single-file-segments",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "One file per memseg list instead of one per page",
    },
    Spec {
        key: Key::InMemory,
        long: "--in-memory",
        alias: None,
        short: None,
        display: "--in-memory",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "Create no files and no shared config (no secondary processes)",
    },
    Spec {
        key: Key::NoHuge,
        long: "--no-huge",
        alias: None,
        short: None,
        display: "--no-huge",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "Use ordinary 4 KiB pages instead of hugepages (64 MB unless -m says otherwise)",
    },
    Spec {
        key: Key::NoShconf,
        long: "--no-shconf",
        alias: None,
        short: None,
        display: "--no-shconf",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "No shared config file (no secondary processes)",
    },
    Spec {
        key: Key::HugeDir,
        long: "--huge-dir",
        alias: None,
        short: None,
        display: "--huge-dir",
        arity: Arity::Value,
        value: "<path>",
        expected: "an absolute path to a hugetlbfs mount (e.g. --huge-dir /dev/hugepages)",
        help: "Back memory with files in this hugetlbfs mount instead of memfds",
    },
    Spec {
        key: Key::HugeUnlink,
        long: "--huge-unlink",
        alias: None,
        short: None,
        display: "--huge-unlink",
        arity: Arity::Optional,
        value: "[=existing|always|never]",
        expected: "",
        help: "When hugepage files are unlinked; bare --huge-unlink means always",
    },
    Spec {
        key: Key::FilePrefix,
        long: "--file-prefix",
        alias: None,
        short: None,
        display: "--file-prefix",
        arity: Arity::Value,
        value: "<name>",
        expected: "a name for this instance (e.g. --file-prefix app1)",
        help: "Name of this instance's runtime directory and files (default mp)",
    },
    Spec {
        key: Key::ProcType,
        long: "--proc-type",
        alias: None,
        short: None,
        display: "--proc-type",
        arity: Arity::Value,
        value: "<primary|secondary|auto>",
        expected: "primary, secondary or auto (e.g. --proc-type secondary)",
        help: "Process role (default primary)",
    },
    Spec {
        key: Key::IovaMode,
        long: "--iova-mode",
        alias: None,
        short: None,
        display: "--iova-mode",
        arity: Arity::Value,
        value: "<pa|va>",
        expected: "pa or va (e.g. --iova-mode va)",
        help: "Device addresses are physical (pa) or virtual (va) addresses (default: automatic)",
    },
    Spec {
        key: Key::MatchAllocations,
        long: "--match-allocations",
        alias: None,
        short: None,
        display: "--match-allocations",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "Give hugepages back only in the exact chunks they were allocated in",
    },
    Spec {
        key: Key::NumaLenient,
        long: "--numa-lenient",
        alias: None,
        short: None,
        display: "--numa-lenient",
        arity: Arity::Flag,
        value: "",
        expected: "",
        help: "Warn, instead of failing, when a page lands on another NUMA node than asked",
    },
    Spec {
        key: Key::BaseVirtaddr,
        long: "--base-virtaddr",
        alias: None,
        short: None,
        display: "--base-virtaddr",
        arity: Arity::Value,
        value: "<hex>",
        expected: "a hexadecimal address, a multiple of 16 MiB (e.g. --base-virtaddr 0x200000000000)",
        help: "Start of memplane's address-space reservation (hex, multiple of 16 MiB)",
    },
    Spec {
        key: Key::MaxMemzones,
        long: "--max-memzones",
        alias: None,
        short: None,
        display: "--max-memzones",
        arity: Arity::Value,
        value: "<n>",
        expected: "the number of entries in the memzone table (e.g. --max-memzones 8192)",
        help: "Size of the memzone table (default 2560)",
    },
    Spec {
        key: Key::MaxMemsegLists,
        long: "--max-memseg-lists",
        alias: None,
        short: None,
        display: "--max-memseg-lists",
        arity: Arity::Value,
        value: "<n>",
        expected: "the number of entries in the memseg list table (e.g. --max-memseg-lists 256)",
        help: "Size of the memseg list table (default 128)",
    },
    Spec {
        key: Key::MaxHeaps,
        long: "--max-heaps",
        alias: None,
        short: None,
        display: "--max-heaps",
        arity: Arity::Value,
        value: "<n>",
        expected: "the number of entries in the heap table (e.g. --max-heaps 64)",
        help: "Size of the heap table: NUMA heaps plus named external heaps (default 32)",
    },
    Spec {
        key: Key::MemoryChannels,
        long: "--memory-channels",
        alias: None,
        short: Some('n'),
        display: "-n",
        arity: Arity::Value,
        value: "<n>",
        expected: "memory channels per socket, from 1 to 64 (e.g. -n 4)",
        help: "Memory channels per socket: mempools spread objects across them (default: assume 4)",
    },
    Spec {
        key: Key::MemoryRanks,
        long: "--memory-ranks",
        alias: None,
        short: Some('r'),
        display: "-r",
        arity: Arity::Value,
        value: "<n>",
        expected: "memory ranks, from 1 to 16 (e.g. -r 2)",
        help: "Memory ranks: mempools spread objects across channels x ranks (default: assume 1)",
    },
    Spec {
        key: Key::RuntimeDir,
        long: "--runtime-dir",
        alias: None,
        short: None,
        display: "--runtime-dir",
        arity: Arity::Value,
        value: "<path>",
        expected: "an absolute directory path (e.g. --runtime-dir /run/myapp)",
        help: "Base directory for runtime files instead of the one from the environment",
    },
];

fn spec(key: Key) -> &'static Spec {
    SPECS.iter().find(|s| s.key == key).unwrap_or(&SPECS[0])
}

fn find_long(name: &str) -> Option<&'static Spec> {
    SPECS
        .iter()
        .find(|s| s.long == name || s.alias == Some(name))
}

fn find_short(c: char) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.short == Some(c))
}

/// DPDK EAL options that are not about memory: (long, short, arity, what).
/// Known so that they get a precise error, or are set aside with their value
/// by `parse_known_args`.
const EAL_OTHER: &[(&str, Option<char>, Arity, &str)] = &[
    ("--allow", Some('a'), Arity::Value, "the device allow-list"),
    ("--auto-probing", None, Arity::Flag, "device probing"),
    ("--block", Some('b'), Arity::Value, "the device block-list"),
    ("--coremask", Some('c'), Arity::Value, "the core mask"),
    ("--create-uio-dev", None, Arity::Flag, "UIO devices"),
    ("--driver-path", Some('d'), Arity::Value, "driver loading"),
    (
        "--force-max-simd-bitwidth",
        None,
        Arity::Value,
        "SIMD width",
    ),
    ("--help", Some('h'), Arity::Flag, "help"),
    (
        "--huge-worker-stack",
        None,
        Arity::Optional,
        "worker thread stacks",
    ),
    ("--lcores", Some('l'), Arity::Value, "the lcore list"),
    ("--log-color", None, Arity::Optional, "logging"),
    ("--log-level", None, Arity::Value, "logging"),
    ("--log-timestamp", None, Arity::Optional, "logging"),
    ("--main-lcore", None, Arity::Value, "the main lcore"),
    ("--master-lcore", None, Arity::Value, "the main lcore"),
    (
        "--mbuf-pool-ops-name",
        None,
        Arity::Value,
        "the mbuf pool ops",
    ),
    (
        "--no-auto-probing",
        Some('A'),
        Arity::Flag,
        "device probing",
    ),
    ("--no-hpet", None, Arity::Flag, "the HPET timer"),
    ("--no-pci", None, Arity::Flag, "PCI devices"),
    ("--no-telemetry", None, Arity::Flag, "telemetry"),
    (
        "--pci-blacklist",
        None,
        Arity::Value,
        "the device block-list",
    ),
    (
        "--pci-whitelist",
        Some('w'),
        Arity::Value,
        "the device allow-list",
    ),
    (
        "--remap-lcore-ids",
        Some('R'),
        Arity::Flag,
        "lcore numbering",
    ),
    (
        "--service-corelist",
        Some('S'),
        Arity::Value,
        "service cores",
    ),
    (
        "--service-coremask",
        Some('s'),
        Arity::Value,
        "service cores",
    ),
    ("--syslog", None, Arity::Optional, "logging"),
    ("--telemetry", None, Arity::Flag, "telemetry"),
    ("--trace", None, Arity::Value, "tracing"),
    ("--trace-bufsz", None, Arity::Value, "tracing"),
    ("--trace-dir", None, Arity::Value, "tracing"),
    ("--trace-mode", None, Arity::Value, "tracing"),
    ("--vdev", None, Arity::Value, "virtual devices"),
    ("--version", Some('v'), Arity::Flag, "the version banner"),
    ("--vfio-intr", None, Arity::Value, "VFIO interrupts"),
    ("--vfio-vf-token", None, Arity::Value, "VFIO"),
    ("--vmware-tsc-map", None, Arity::Flag, "the TSC"),
];

fn find_other_long(name: &str) -> Option<(Arity, &'static str)> {
    EAL_OTHER
        .iter()
        .find(|(long, ..)| *long == name)
        .map(|&(_, _, arity, what)| (arity, what))
}

fn find_other_short(c: char) -> Option<(Arity, &'static str)> {
    EAL_OTHER
        .iter()
        .find(|(_, short, ..)| *short == Some(c))
        .map(|&(_, _, arity, what)| (arity, what))
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// A known option that `name` looks like (typo, underscores, wrong case,
/// one dash, unique prefix).
fn suggest(name: &str) -> Option<String> {
    let normalized = format!(
        "--{}",
        name.trim_start_matches('-')
            .to_ascii_lowercase()
            .replace('_', "-")
    );
    let candidates = SPECS
        .iter()
        .flat_map(|s| std::iter::once(s.long).chain(s.alias));
    let mut best: Option<(usize, &str)> = None;
    for cand in candidates.clone() {
        let d = levenshtein(&normalized, cand);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, cand));
        }
    }
    if let Some((d, cand)) = best {
        if d <= 2 && cand != name {
            return Some(cand.to_string());
        }
    }
    let mut prefixed = candidates.filter(|c| normalized.len() > 3 && c.starts_with(&normalized));
    match (prefixed.next(), prefixed.next()) {
        (Some(only), None) => Some(only.to_string()),
        (Some(first), Some(second)) => Some(format!("{first} or {second}")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Value parsers.

/// Parses one amount of a `--socket-mem`-style value: a bare number is MB,
/// a K/M/G/T suffix is honoured. Returns bytes.
fn parse_mb_amount(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err("the amount is empty".into());
    }
    if s.starts_with('-') {
        return Err("amounts cannot be negative".into());
    }
    if s.chars().any(char::is_whitespace) {
        return Err("remove the spaces".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let mb: u64 = s
            .parse()
            .map_err(|_| format!("{s} MB does not fit in 64 bits"))?;
        return mb
            .checked_mul(MIB)
            .ok_or_else(|| format!("{s} MB overflows 64 bits of bytes"));
    }
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "'{s}' is not a number; give MB as digits (e.g. 1024) or a size with a K/M/G/T \
             suffix (e.g. 1G)"
        ));
    }
    crate::units::parse_size(s)
}

fn parse_mb_list(option: &str, value: &str) -> Result<Vec<u64>, OptionsError> {
    if value.is_empty() {
        return Err(bad(
            option,
            value,
            "the list is empty; give one amount in MB per NUMA node, comma separated \
             (e.g. 1024,1024)",
        ));
    }
    let entries: Vec<&str> = value.split(',').collect();
    if entries.len() > MAX_NUMA_NODES {
        return Err(bad(
            option,
            value,
            format!(
                "{} entries, but at most {MAX_NUMA_NODES} NUMA nodes are supported",
                entries.len()
            ),
        ));
    }
    let last = entries.len() - 1;
    entries
        .iter()
        .enumerate()
        .map(|(node, entry)| {
            if entry.is_empty() {
                let why = if node == last {
                    "it ends with a comma; remove the trailing comma".to_string()
                } else {
                    format!(
                        "the entry for NUMA node {node} is empty; write 0 for a node that \
                         needs no memory"
                    )
                };
                return Err(bad(option, value, why));
            }
            parse_mb_amount(entry)
                .map_err(|why| bad(option, value, format!("NUMA node {node}: {why}")))
        })
        .collect()
}

fn parse_pagesz_mem(option: &str, value: &str) -> Result<(PageSize, u64), OptionsError> {
    let Some((size, limit)) = value.split_once(':') else {
        return Err(bad(
            option,
            value,
            "expected <pagesz>:<limit>, e.g. 1G:4G or 2M:0",
        ));
    };
    let page_size: PageSize = size
        .parse()
        .map_err(|why: String| bad(option, value, why))?;
    if limit.starts_with('-') {
        return Err(bad(option, value, "the limit cannot be negative"));
    }
    let limit = crate::units::parse_size(limit).map_err(|why| {
        bad(
            option,
            value,
            format!("the limit: {why} (a bare number is bytes)"),
        )
    })?;
    Ok((page_size, limit))
}

fn parse_hex_addr(option: &str, value: &str) -> Result<u64, OptionsError> {
    let digits = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .unwrap_or(value);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            option,
            value,
            "not a hexadecimal address; write e.g. 0x200000000000",
        ));
    }
    u64::from_str_radix(digits, 16).map_err(|_| bad(option, value, "does not fit in 64 bits"))
}

fn parse_count(option: &str, value: &str, max: u32) -> Result<u32, OptionsError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            option,
            value,
            format!("expected a whole number from 1 to {max}"),
        ));
    }
    value
        .parse()
        .map_err(|_| bad(option, value, format!("too large; at most {max}")))
}

/// Formats bytes for an MB-style option: MB when exact, else K, else bytes
/// with a `B` suffix. `parse_mb_amount` reads every form back exactly.
fn fmt_mb_amount(bytes: u64) -> String {
    if bytes % MIB == 0 {
        (bytes / MIB).to_string()
    } else if bytes % KIB == 0 {
        format!("{}K", bytes / KIB)
    } else {
        format!("{bytes}B")
    }
}

/// Formats bytes exactly with the largest binary suffix that divides them.
fn fmt_bytes_exact(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(GIB * KIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")];
    if bytes == 0 {
        return "0".into();
    }
    for (unit, name) in UNITS {
        if bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

fn fmt_list(list: &[u64]) -> String {
    list.iter()
        .map(|&b| fmt_mb_amount(b))
        .collect::<Vec<_>>()
        .join(",")
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Option names as the user spelled them (for messages); canonical names
/// when the options were set in code.
struct Names<'a>(&'a [(Key, String)]);

impl Names<'_> {
    fn of(&self, key: Key) -> String {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map_or_else(|| spec(key).display.to_string(), |(_, s)| s.clone())
    }

    fn unlink(&self, mode: HugeUnlink) -> String {
        let name = self.of(Key::HugeUnlink);
        match mode {
            HugeUnlink::Always => name,
            other => format!("{name}={other}"),
        }
    }
}

fn conflict(a: String, b: String, reason: impl Into<String>) -> OptionsError {
    OptionsError::Conflict {
        a,
        b,
        reason: reason.into(),
    }
}

fn looks_like_option(arg: &str) -> bool {
    arg.starts_with("--")
        || (arg.len() > 1
            && arg.starts_with('-')
            && !arg[1..].starts_with(|c: char| c.is_ascii_digit()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Known,
}

// ---------------------------------------------------------------------------

impl MemOptions {
    /// The defaults (same as [`MemOptions::default`]): dynamic memory,
    /// nothing preallocated, memfd backing, prefix [`DEFAULT_FILE_PREFIX`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses memory options from an argument list **without** the program
    /// name, then [validates](MemOptions::validate) them.
    ///
    /// Accepts `--flag value` and `--flag=value`, `-m 512` and `-m512`, and
    /// the DPDK aliases (`--numa-mem`, `--numa-limit`, `--memory-size`). A
    /// repeated option overrides the earlier one (`--pagesz-mem` overrides
    /// per page size). Any other argument is an error: DPDK's non-memory EAL
    /// options (`-l 0-3`, `-n 4`, ...) get [`OptionsError::NotMemoryOption`],
    /// anything else [`OptionsError::UnknownOption`] or
    /// [`OptionsError::UnexpectedArgument`]. To pull memory options out of a
    /// full EAL command line, use [`MemOptions::parse_known_args`].
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<MemOptions, OptionsError> {
        Self::parse_impl(args, Mode::Strict).map(|(opts, _)| opts)
    }

    /// Like [`MemOptions::parse_args`], but sets aside DPDK's non-memory EAL
    /// options (with their values), plain arguments, and everything from a
    /// `--` on, returning them in order. Options neither memplane nor DPDK
    /// knows are still an error (their value, if any, cannot be told apart
    /// from an argument).
    ///
    /// ```
    /// use memplane::MemOptions;
    /// let (opts, rest) =
    ///     MemOptions::parse_known_args(&["-l", "0-3", "-n", "4", "--socket-mem=512", "--", "-p", "1"])?;
    /// assert_eq!(opts.socket_mem, Some(vec![512 << 20]));
    /// assert_eq!(opts.memory_channels, Some(4));
    /// assert_eq!(rest, ["-l", "0-3", "--", "-p", "1"]);
    /// # Ok::<(), memplane::options::OptionsError>(())
    /// ```
    pub fn parse_known_args<S: AsRef<str>>(
        args: &[S],
    ) -> Result<(MemOptions, Vec<String>), OptionsError> {
        Self::parse_impl(args, Mode::Known)
    }

    fn parse_impl<S: AsRef<str>>(
        args: &[S],
        mode: Mode,
    ) -> Result<(MemOptions, Vec<String>), OptionsError> {
        let mut opts = MemOptions::default();
        let mut used: Vec<(Key, String)> = Vec::new();
        let mut rest: Vec<String> = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_ref();
            i += 1;
            if arg == "--" {
                if mode == Mode::Known {
                    rest.extend(args[i - 1..].iter().map(|a| a.as_ref().to_string()));
                    break;
                }
                if let Some(next) = args.get(i) {
                    return Err(OptionsError::UnexpectedArgument {
                        arg: next.as_ref().to_string(),
                        hint: "memplane takes only options; arguments after '--' belong to the \
                               application, not to memplane"
                            .into(),
                    });
                }
                break;
            }
            if let Some(body) = arg.strip_prefix("--") {
                let (name, inline) = match body.split_once('=') {
                    Some((n, v)) => (&arg[..2 + n.len()], Some(v)),
                    None => (arg, None),
                };
                if let Some(spec) = find_long(name) {
                    let value = take_value(spec, name, inline, args, &mut i)?;
                    opts.apply(spec.key, name, value)?;
                    used.push((spec.key, name.to_string()));
                    continue;
                }
                if let Some((arity, what)) = find_other_long(name) {
                    if mode == Mode::Strict {
                        return Err(OptionsError::NotMemoryOption {
                            option: name.to_string(),
                            what: what.to_string(),
                        });
                    }
                    rest.push(arg.to_string());
                    if arity == Arity::Value && inline.is_none() {
                        if let Some(v) = args.get(i) {
                            rest.push(v.as_ref().to_string());
                            i += 1;
                        }
                    }
                    continue;
                }
                return Err(OptionsError::UnknownOption {
                    option: name.to_string(),
                    suggestion: suggest(name),
                });
            }
            if looks_like_option(arg) {
                // A long option written with one dash: say so instead of
                // reading "-socket-mem" as DPDK's -s.
                if find_long(&format!("-{}", arg.split('=').next().unwrap_or(arg))).is_some() {
                    let name = arg.split('=').next().unwrap_or(arg);
                    return Err(OptionsError::UnknownOption {
                        option: name.to_string(),
                        suggestion: Some(format!("-{name}")),
                    });
                }
                let c = arg[1..].chars().next().unwrap_or('-');
                let attached = &arg[1 + c.len_utf8()..];
                let name = &arg[..=c.len_utf8()];
                if let Some(spec) = find_short(c) {
                    let value = if attached.is_empty() {
                        take_value(spec, name, None, args, &mut i)?
                    } else {
                        Some(attached)
                    };
                    opts.apply(spec.key, name, value)?;
                    used.push((spec.key, name.to_string()));
                    continue;
                }
                if let Some((arity, what)) = find_other_short(c) {
                    if mode == Mode::Strict {
                        return Err(OptionsError::NotMemoryOption {
                            option: name.to_string(),
                            what: what.to_string(),
                        });
                    }
                    rest.push(arg.to_string());
                    if arity == Arity::Value && attached.is_empty() {
                        if let Some(v) = args.get(i) {
                            rest.push(v.as_ref().to_string());
                            i += 1;
                        }
                    }
                    continue;
                }
                return Err(OptionsError::UnknownOption {
                    option: name.to_string(),
                    suggestion: suggest(arg),
                });
            }
            if mode == Mode::Known {
                rest.push(arg.to_string());
                continue;
            }
            let hint = match used.last() {
                Some((Key::HugeUnlink, name)) if HugeUnlink::from_str(arg).is_ok() => {
                    format!("{name} takes its value only after '=': write {name}={arg}")
                }
                _ => "memplane takes only options (see docs/options.md); quote a value that \
                      contains spaces"
                    .to_string(),
            };
            return Err(OptionsError::UnexpectedArgument {
                arg: arg.to_string(),
                hint,
            });
        }
        opts.check(&Names(&used))?;
        Ok((opts, rest))
    }

    /// Sets one option from its command-line value.
    fn apply(&mut self, key: Key, name: &str, value: Option<&str>) -> Result<(), OptionsError> {
        let v = value.unwrap_or_default();
        match key {
            Key::SocketMem => self.socket_mem = Some(parse_mb_list(name, v)?),
            Key::SocketLimit => self.socket_limit = Some(parse_mb_list(name, v)?),
            Key::MemorySize => {
                self.memory_size = Some(parse_mb_amount(v).map_err(|why| {
                    let why = if v.starts_with('=') {
                        format!("{why} (write -m 512 or -m512, without '=')")
                    } else {
                        why
                    };
                    bad(name, v, why)
                })?);
            }
            Key::PageszMem => {
                let (size, limit) = parse_pagesz_mem(name, v)?;
                set_pagesz(&mut self.pagesz_mem, size, limit);
            }
            Key::LegacyMem => self.legacy_mem = true,
            Key::SingleFileSegments => self.single_file_segments = true,
            Key::InMemory => self.in_memory = true,
            Key::NoHuge => self.no_huge = true,
            Key::NoShconf => self.no_shconf = true,
            Key::MatchAllocations => self.match_allocations = true,
            Key::NumaLenient => self.numa_lenient = true,
            Key::HugeDir => self.huge_dir = Some(PathBuf::from(v)),
            Key::RuntimeDir => self.runtime_dir = Some(PathBuf::from(v)),
            Key::HugeUnlink => {
                self.huge_unlink = match value {
                    None => HugeUnlink::Always,
                    Some(s) => s.parse().map_err(|e| rename(e, name))?,
                };
            }
            Key::FilePrefix => self.file_prefix = v.to_string(),
            Key::ProcType => self.proc_type = v.parse().map_err(|e| rename(e, name))?,
            Key::IovaMode => {
                self.iova_mode = if v.eq_ignore_ascii_case("auto") {
                    None
                } else {
                    Some(v.parse().map_err(|e| rename(e, name))?)
                };
            }
            Key::BaseVirtaddr => self.base_virtaddr = Some(parse_hex_addr(name, v)?),
            Key::MaxMemzones => self.max_memzones = parse_count(name, v, MAX_MAX_MEMZONES)?,
            Key::MaxMemsegLists => {
                self.max_memseg_lists = parse_count(name, v, MAX_MAX_MEMSEG_LISTS)?;
            }
            Key::MaxHeaps => self.max_heaps = parse_count(name, v, MAX_MAX_HEAPS)?,
            Key::MemoryChannels => {
                self.memory_channels = Some(parse_count(name, v, MAX_MEMORY_CHANNELS)?);
            }
            Key::MemoryRanks => self.memory_ranks = Some(parse_count(name, v, MAX_MEMORY_RANKS)?),
        }
        Ok(())
    }

    /// Checks every value and every combination, the way DPDK does (see
    /// `docs/options.md` for the list). [`MemOptions::parse_args`] and
    /// [`MemOptions::build`] call it; call it yourself after changing fields
    /// directly.
    pub fn validate(&self) -> Result<(), OptionsError> {
        self.check(&Names(&[]))
    }

    fn check(&self, names: &Names<'_>) -> Result<(), OptionsError> {
        self.check_values(names)?;
        self.check_combinations(names)
    }

    fn check_values(&self, names: &Names<'_>) -> Result<(), OptionsError> {
        for (key, list) in [
            (Key::SocketMem, &self.socket_mem),
            (Key::SocketLimit, &self.socket_limit),
        ] {
            let Some(list) = list else { continue };
            let name = names.of(key);
            if list.is_empty() {
                return Err(bad(
                    &name,
                    "",
                    "the list is empty; give one amount per NUMA node",
                ));
            }
            if list.len() > MAX_NUMA_NODES {
                return Err(bad(
                    &name,
                    &format!("<{} entries>", list.len()),
                    format!("at most {MAX_NUMA_NODES} NUMA nodes are supported"),
                ));
            }
            if key == Key::SocketMem
                && list
                    .iter()
                    .try_fold(0u64, |acc, &b| acc.checked_add(b))
                    .is_none()
            {
                return Err(bad(
                    &name,
                    &fmt_list(list),
                    "the total overflows 64 bits; ask for less memory",
                ));
            }
        }

        let pagesz_name = names.of(Key::PageszMem);
        for (idx, &(size, limit)) in self.pagesz_mem.iter().enumerate() {
            let value = format!("{size}:{}", fmt_bytes_exact(limit));
            if limit % size.bytes() != 0 {
                return Err(bad(
                    &pagesz_name,
                    &value,
                    format!(
                        "the limit must be a multiple of the page size {size}; use {}",
                        fmt_bytes_exact(limit.div_ceil(size.bytes()) * size.bytes())
                    ),
                ));
            }
            if self.pagesz_mem[..idx].iter().any(|&(s, _)| s == size) {
                return Err(bad(
                    &pagesz_name,
                    &value,
                    format!("page size {size} is listed twice; give one limit per page size"),
                ));
            }
        }

        for (key, dir) in [
            (Key::HugeDir, &self.huge_dir),
            (Key::RuntimeDir, &self.runtime_dir),
        ] {
            let Some(dir) = dir else { continue };
            let name = names.of(key);
            if dir.as_os_str().is_empty() {
                return Err(bad(
                    &name,
                    "",
                    format!("the path is empty; {}", spec(key).expected),
                ));
            }
            if dir.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(bad(&name, &path_str(dir), "the path contains a NUL byte"));
            }
            if dir.to_str().is_none() {
                return Err(bad(
                    &name,
                    &path_str(dir),
                    "the path is not valid UTF-8; options are passed as strings",
                ));
            }
            if !dir.is_absolute() {
                return Err(bad(
                    &name,
                    &path_str(dir),
                    "give an absolute path, so that every process (secondaries, children) \
                     finds the same directory",
                ));
            }
        }

        check_file_prefix(&names.of(Key::FilePrefix), &self.file_prefix)?;

        if let Some(addr) = self.base_virtaddr {
            let name = names.of(Key::BaseVirtaddr);
            let value = format!("{addr:#x}");
            if addr == 0 {
                return Err(bad(
                    &name,
                    &value,
                    "the address must not be 0; leave the option out for the default, or give \
                     e.g. 0x200000000000",
                ));
            }
            if addr >= BASE_VIRTADDR_LIMIT {
                return Err(bad(
                    &name,
                    &value,
                    format!(
                        "above the largest Linux user address space ({BASE_VIRTADDR_LIMIT:#x}); \
                         give e.g. 0x200000000000"
                    ),
                ));
            }
            if addr % BASE_VIRTADDR_ALIGN != 0 {
                let up = addr.next_multiple_of(BASE_VIRTADDR_ALIGN);
                let fix = if up < BASE_VIRTADDR_LIMIT {
                    format!("use {up:#x} (rounded up, as DPDK would do silently)")
                } else {
                    format!("use {:#x}", addr - addr % BASE_VIRTADDR_ALIGN)
                };
                return Err(bad(
                    &name,
                    &value,
                    format!("the address must be a multiple of 16 MiB; {fix}"),
                ));
            }
        }

        for (key, n, max) in [
            (Key::MaxMemzones, self.max_memzones, MAX_MAX_MEMZONES),
            (
                Key::MaxMemsegLists,
                self.max_memseg_lists,
                MAX_MAX_MEMSEG_LISTS,
            ),
            (Key::MaxHeaps, self.max_heaps, MAX_MAX_HEAPS),
            (
                Key::MemoryChannels,
                self.memory_channels.unwrap_or(1),
                MAX_MEMORY_CHANNELS,
            ),
            (
                Key::MemoryRanks,
                self.memory_ranks.unwrap_or(1),
                MAX_MEMORY_RANKS,
            ),
        ] {
            if n == 0 || n > max {
                return Err(bad(
                    &names.of(key),
                    &n.to_string(),
                    format!("must be from 1 to {max}"),
                ));
            }
        }
        Ok(())
    }

    fn check_combinations(&self, names: &Names<'_>) -> Result<(), OptionsError> {
        let n = |k| names.of(k);
        // DPDK's own rejections (eal_parse_args / eal_check_common_options).
        if self.memory_size.is_some() && self.socket_mem.is_some() {
            return Err(conflict(
                n(Key::MemorySize),
                n(Key::SocketMem),
                "both say how much memory to preallocate; give per-node amounts with \
                 --socket-mem or a total with -m, not both",
            ));
        }
        if self.no_huge && self.socket_mem.is_some() {
            return Err(conflict(
                n(Key::SocketMem),
                n(Key::NoHuge),
                "--no-huge memory is one list on node 0, not per node; size it with -m, or \
                 drop --no-huge",
            ));
        }
        if self.no_huge && self.huge_unlink == HugeUnlink::Always && !self.in_memory {
            return Err(conflict(
                names.unlink(self.huge_unlink),
                n(Key::NoHuge),
                "--no-huge creates no hugepage files to unlink; drop --huge-unlink",
            ));
        }
        if self.socket_limit.is_some() && self.legacy_mem {
            return Err(conflict(
                n(Key::SocketLimit),
                n(Key::LegacyMem),
                "limits apply to heaps that grow at run time, and --legacy-mem never grows \
                 them; drop one of the two",
            ));
        }
        if self.socket_limit.is_some() && self.no_huge {
            return Err(conflict(
                n(Key::SocketLimit),
                n(Key::NoHuge),
                "--no-huge memory is static (DPDK treats it as --legacy-mem) and never grows, \
                 so there is nothing to limit; drop --socket-limit",
            ));
        }
        if self.single_file_segments && self.huge_unlink == HugeUnlink::Always && !self.in_memory {
            return Err(conflict(
                n(Key::SingleFileSegments),
                names.unlink(self.huge_unlink),
                "a single file holds many pages, so it cannot be unlinked before each page is \
                 mapped; drop one, or use --in-memory, which gives file-less single segments",
            ));
        }
        if self.in_memory && self.huge_unlink == HugeUnlink::Never {
            return Err(conflict(
                n(Key::InMemory),
                names.unlink(self.huge_unlink),
                "--in-memory keeps no files, so there are none to keep for reuse; drop \
                 --huge-unlink=never",
            ));
        }
        if self.legacy_mem && self.in_memory {
            return Err(conflict(
                n(Key::LegacyMem),
                n(Key::InMemory),
                "--in-memory needs dynamic memory; drop --legacy-mem",
            ));
        }
        if self.legacy_mem && self.match_allocations {
            return Err(conflict(
                n(Key::LegacyMem),
                n(Key::MatchAllocations),
                "--legacy-mem never gives pages back, so there is nothing to match; drop \
                 --match-allocations",
            ));
        }
        if self.no_huge && self.match_allocations {
            return Err(conflict(
                n(Key::NoHuge),
                n(Key::MatchAllocations),
                "--no-huge memory is static and never given back, so there is nothing to \
                 match; drop --match-allocations",
            ));
        }
        if self.no_huge && self.single_file_segments {
            return Err(conflict(
                n(Key::NoHuge),
                n(Key::SingleFileSegments),
                "--no-huge already keeps all its memory in one segment; drop \
                 --single-file-segments",
            ));
        }
        if !self.pagesz_mem.is_empty() && self.no_huge {
            return Err(conflict(
                n(Key::PageszMem),
                n(Key::NoHuge),
                "--no-huge uses only 4K pages, so there are no page sizes to cap; drop \
                 --pagesz-mem",
            ));
        }
        if !self.pagesz_mem.is_empty() && self.legacy_mem {
            return Err(conflict(
                n(Key::PageszMem),
                n(Key::LegacyMem),
                "per-page-size limits apply to dynamic memory only; drop one of the two",
            ));
        }

        // memplane's own checks (DPDK fails later, at init, or not at all).
        if let (Some(mem), Some(limit)) = (&self.socket_mem, &self.socket_limit) {
            for (node, (&want, &cap)) in mem.iter().zip(limit).enumerate() {
                if cap != 0 && want > cap {
                    return Err(conflict(
                        n(Key::SocketMem),
                        n(Key::SocketLimit),
                        format!(
                            "on NUMA node {node} the limit ({} MB) is below the memory to \
                             preallocate ({} MB); raise the limit (0 = no limit) or lower \
                             the preallocation",
                            fmt_mb_amount(cap),
                            fmt_mb_amount(want)
                        ),
                    ));
                }
            }
        }
        if self.proc_type == ProcType::Secondary {
            for (flag, key) in [
                (self.in_memory, Key::InMemory),
                (self.no_shconf, Key::NoShconf),
            ] {
                if flag {
                    return Err(conflict(
                        format!("{} secondary", n(Key::ProcType)),
                        n(key),
                        format!(
                            "{} shares no config, so a secondary has nothing to attach to; \
                             drop it here (the primary may use it, but then it accepts no \
                             secondaries)",
                            n(key)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The arguments that [`MemOptions::parse_args`] turns back into these
    /// options (used to hand options to a child process). Only options that
    /// differ from the defaults are written; values use `--opt=value` so
    /// that values starting with `-` survive. Amounts are written in MB
    /// (with a `K` or `B` suffix when not a whole number of MB).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(list) = &self.socket_mem {
            out.push(format!("--socket-mem={}", fmt_list(list)));
        }
        if let Some(list) = &self.socket_limit {
            out.push(format!("--socket-limit={}", fmt_list(list)));
        }
        if let Some(bytes) = self.memory_size {
            out.push("-m".to_string());
            out.push(fmt_mb_amount(bytes));
        }
        for &(size, limit) in &self.pagesz_mem {
            out.push(format!("--pagesz-mem={size}:{}", fmt_bytes_exact(limit)));
        }
        for (set, flag) in [
            (self.legacy_mem, "--legacy-mem"),
            (self.single_file_segments, "--single-file-segments"),
            (self.in_memory, "--in-memory"),
            (self.no_huge, "--no-huge"),
            (self.no_shconf, "--no-shconf"),
            (self.match_allocations, "--match-allocations"),
            (self.numa_lenient, "--numa-lenient"),
        ] {
            if set {
                out.push(flag.to_string());
            }
        }
        if let Some(dir) = &self.huge_dir {
            out.push(format!("--huge-dir={}", path_str(dir)));
        }
        if self.huge_unlink != HugeUnlink::Existing {
            out.push(format!("--huge-unlink={}", self.huge_unlink));
        }
        if self.file_prefix != DEFAULT_FILE_PREFIX {
            out.push(format!("--file-prefix={}", self.file_prefix));
        }
        if self.proc_type != ProcType::Primary {
            out.push(format!("--proc-type={}", self.proc_type));
        }
        if let Some(mode) = self.iova_mode {
            out.push(format!("--iova-mode={mode}"));
        }
        if let Some(addr) = self.base_virtaddr {
            out.push(format!("--base-virtaddr={addr:#x}"));
        }
        for (n, default, flag) in [
            (self.max_memzones, DEFAULT_MAX_MEMZONES, "--max-memzones"),
            (
                self.max_memseg_lists,
                DEFAULT_MAX_MEMSEG_LISTS,
                "--max-memseg-lists",
            ),
            (self.max_heaps, DEFAULT_MAX_HEAPS, "--max-heaps"),
        ] {
            if n != default {
                out.push(format!("{flag}={n}"));
            }
        }
        if let Some(dir) = &self.runtime_dir {
            out.push(format!("--runtime-dir={}", path_str(dir)));
        }
        if let Some(n) = self.memory_channels {
            out.push(format!("--memory-channels={n}"));
        }
        if let Some(n) = self.memory_ranks {
            out.push(format!("--memory-ranks={n}"));
        }
        out
    }

    /// Help text listing every option, its value and meaning (for the CLI's
    /// `--help`).
    pub fn usage() -> String {
        let mut out = String::from("Memory options (DPDK EAL spellings accepted):\n");
        for s in SPECS {
            let mut names = String::new();
            if let Some(c) = s.short {
                let _ = write!(names, "-{c}, ");
            }
            names.push_str(s.long);
            if let Some(alias) = s.alias {
                let _ = write!(names, ", {alias}");
            }
            let sep = if s.arity == Arity::Optional || s.value.is_empty() {
                ""
            } else {
                " "
            };
            let _ = write!(out, "  {names}{sep}{}\n      {}\n", s.value, s.help);
        }
        out
    }

    /// The memory asked for explicitly at init: `-m`, or the sum of
    /// `--socket-mem`; `None` when neither is given (then dynamic mode
    /// preallocates nothing, `--legacy-mem` maps what is available, and
    /// `--no-huge` uses [`NO_HUGE_DEFAULT_MEMORY`]).
    pub fn requested_memory(&self) -> Option<u64> {
        self.memory_size.or_else(|| {
            self.socket_mem
                .as_ref()
                .map(|l| l.iter().fold(0u64, |a, &b| a.saturating_add(b)))
        })
    }

    /// Whether memory grows and shrinks at run time (neither `--legacy-mem`
    /// nor `--no-huge`).
    pub fn dynamic_memory(&self) -> bool {
        !self.legacy_mem && !self.no_huge
    }

    /// Whether a shared config is created, so that secondaries can attach
    /// (neither `--in-memory` nor `--no-shconf`).
    pub fn shared_config(&self) -> bool {
        !self.in_memory && !self.no_shconf
    }

    /// The unlink policy in effect: `--in-memory` implies
    /// [`HugeUnlink::Always`], as in DPDK.
    pub fn effective_huge_unlink(&self) -> HugeUnlink {
        if self.in_memory {
            HugeUnlink::Always
        } else {
            self.huge_unlink
        }
    }

    /// The most memory of `page_size` memplane may use: the `--pagesz-mem`
    /// entry for it, else [`default_pagesz_limit`].
    pub fn pagesz_limit(&self, page_size: PageSize) -> u64 {
        self.pagesz_mem
            .iter()
            .find(|&&(s, _)| s == page_size)
            .map_or_else(|| default_pagesz_limit(page_size), |&(_, l)| l)
    }

    // --- builder -----------------------------------------------------------

    /// Sets `--socket-mem`: bytes to preallocate per NUMA node.
    #[must_use]
    pub fn socket_mem(mut self, bytes_per_node: impl IntoIterator<Item = u64>) -> Self {
        self.socket_mem = Some(bytes_per_node.into_iter().collect());
        self
    }

    /// Sets `--socket-limit`: most bytes per NUMA node, 0 = no limit.
    #[must_use]
    pub fn socket_limit(mut self, bytes_per_node: impl IntoIterator<Item = u64>) -> Self {
        self.socket_limit = Some(bytes_per_node.into_iter().collect());
        self
    }

    /// Sets `-m`: total bytes to preallocate.
    #[must_use]
    pub fn memory_size(mut self, bytes: u64) -> Self {
        self.memory_size = Some(bytes);
        self
    }

    /// Adds (or replaces) the `--pagesz-mem` limit of one page size, in
    /// bytes; 0 disables the size.
    #[must_use]
    pub fn pagesz_mem(mut self, page_size: PageSize, limit: u64) -> Self {
        set_pagesz(&mut self.pagesz_mem, page_size, limit);
        self
    }

    /// Sets `--legacy-mem`.
    #[must_use]
    pub fn legacy_mem(mut self, on: bool) -> Self {
        self.legacy_mem = on;
        self
    }

    /// Sets `--single-file-segments`.
    #[must_use]
    pub fn single_file_segments(mut self, on: bool) -> Self {
        self.single_file_segments = on;
        self
    }

    /// Sets `--in-memory`.
    #[must_use]
    pub fn in_memory(mut self, on: bool) -> Self {
        self.in_memory = on;
        self
    }

    /// Sets `--no-huge`.
    #[must_use]
    pub fn no_huge(mut self, on: bool) -> Self {
        self.no_huge = on;
        self
    }

    /// Sets `--no-shconf`.
    #[must_use]
    pub fn no_shconf(mut self, on: bool) -> Self {
        self.no_shconf = on;
        self
    }

    /// Sets `--huge-dir`.
    #[must_use]
    pub fn huge_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.huge_dir = Some(dir.into());
        self
    }

    /// Sets `--huge-unlink`.
    #[must_use]
    pub fn huge_unlink(mut self, mode: HugeUnlink) -> Self {
        self.huge_unlink = mode;
        self
    }

    /// Sets `--file-prefix`.
    #[must_use]
    pub fn file_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.file_prefix = prefix.into();
        self
    }

    /// Sets `--proc-type`.
    #[must_use]
    pub fn proc_type(mut self, proc_type: ProcType) -> Self {
        self.proc_type = proc_type;
        self
    }

    /// Sets `--iova-mode` (`None` = automatic).
    #[must_use]
    pub fn iova_mode(mut self, mode: impl Into<Option<IovaMode>>) -> Self {
        self.iova_mode = mode.into();
        self
    }

    /// Sets `--match-allocations`.
    #[must_use]
    pub fn match_allocations(mut self, on: bool) -> Self {
        self.match_allocations = on;
        self
    }

    /// Sets `--numa-lenient`.
    #[must_use]
    pub fn numa_lenient(mut self, on: bool) -> Self {
        self.numa_lenient = on;
        self
    }

    /// Sets `--base-virtaddr` (must be a multiple of
    /// [`BASE_VIRTADDR_ALIGN`]).
    #[must_use]
    pub fn base_virtaddr(mut self, addr: u64) -> Self {
        self.base_virtaddr = Some(addr);
        self
    }

    /// Sets `--max-memzones`.
    #[must_use]
    pub fn max_memzones(mut self, n: u32) -> Self {
        self.max_memzones = n;
        self
    }

    /// Sets `--max-memseg-lists`.
    #[must_use]
    pub fn max_memseg_lists(mut self, n: u32) -> Self {
        self.max_memseg_lists = n;
        self
    }

    /// Sets `--max-heaps`.
    #[must_use]
    pub fn max_heaps(mut self, n: u32) -> Self {
        self.max_heaps = n;
        self
    }

    /// Sets `-n` / `--memory-channels`.
    #[must_use]
    pub fn memory_channels(mut self, n: u32) -> Self {
        self.memory_channels = Some(n);
        self
    }

    /// Sets `-r` / `--memory-ranks`.
    #[must_use]
    pub fn memory_ranks(mut self, n: u32) -> Self {
        self.memory_ranks = Some(n);
        self
    }

    /// Sets `--runtime-dir`.
    #[must_use]
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Validates and returns the options.
    pub fn build(self) -> Result<MemOptions, OptionsError> {
        self.validate()?;
        Ok(self)
    }
}

fn set_pagesz(list: &mut Vec<(PageSize, u64)>, size: PageSize, limit: u64) {
    match list.iter_mut().find(|(s, _)| *s == size) {
        Some(entry) => entry.1 = limit,
        None => list.push((size, limit)),
    }
}

/// Re-labels a value error from `FromStr` with the option as spelled.
fn rename(err: OptionsError, name: &str) -> OptionsError {
    match err {
        OptionsError::BadValue { value, reason, .. } => OptionsError::BadValue {
            option: name.to_string(),
            value,
            reason,
        },
        other => other,
    }
}

/// Reads the value of an option from `inline` (`--opt=value`) or the next
/// argument.
fn take_value<'a, S: AsRef<str>>(
    spec: &Spec,
    name: &str,
    inline: Option<&'a str>,
    args: &'a [S],
    i: &mut usize,
) -> Result<Option<&'a str>, OptionsError> {
    match spec.arity {
        Arity::Flag => match inline {
            Some(v) => Err(OptionsError::UnexpectedValue {
                option: name.to_string(),
                value: v.to_string(),
            }),
            None => Ok(None),
        },
        Arity::Optional => Ok(inline),
        Arity::Value => {
            if inline.is_some() {
                return Ok(inline);
            }
            match args.get(*i).map(AsRef::as_ref) {
                Some(next) if !looks_like_option(next) => {
                    *i += 1;
                    Ok(Some(next))
                }
                Some(next) => Err(OptionsError::MissingValue {
                    option: name.to_string(),
                    expected: format!(
                        "{}; the next argument '{next}' is an option (if the value really \
                         starts with '-', write {name}=VALUE)",
                        spec.expected
                    ),
                }),
                None => Err(OptionsError::MissingValue {
                    option: name.to_string(),
                    expected: spec.expected.to_string(),
                }),
            }
        }
    }
}

/// `--file-prefix` rules: 1 to [`MAX_FILE_PREFIX_LEN`] bytes of ASCII
/// letters, digits, `_`, `-` and `.`, not starting with `.`.
pub(crate) fn check_file_prefix(name: &str, prefix: &str) -> Result<(), OptionsError> {
    let why = if prefix.is_empty() {
        "the prefix is empty; give a name such as app1, or leave the option out for the \
         default (mp)"
            .to_string()
    } else if prefix.contains('%') {
        "'%' is not allowed (DPDK forbids it too: the prefix goes into printf-style file \
         name templates); use letters, digits, '_', '-' or '.'"
            .to_string()
    } else if prefix.contains('/') {
        "'/' is not allowed: the prefix is one file name, not a path (to move the runtime \
         files, use --runtime-dir)"
            .to_string()
    } else if prefix.len() > MAX_FILE_PREFIX_LEN {
        format!(
            "the prefix is {} bytes long; at most {MAX_FILE_PREFIX_LEN}",
            prefix.len()
        )
    } else if prefix.starts_with('.') {
        "the prefix must not start with '.' (hidden files, '.' and '..')".to_string()
    } else if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        format!("{c:?} is not allowed; use letters, digits, '_', '-' or '.'")
    } else {
        return Ok(());
    };
    Err(bad(name, prefix, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(args: &[&str]) -> Result<MemOptions, OptionsError> {
        MemOptions::parse_args(args)
    }

    fn err(args: &[&str]) -> OptionsError {
        match parse(args) {
            Ok(o) => panic!("{args:?} should be rejected, got {o:?}"),
            Err(e) => e,
        }
    }

    fn assert_conflict(args: &[&str], a: &str, b: &str) {
        let e = err(args);
        let OptionsError::Conflict { a: ea, b: eb, .. } = &e else {
            panic!("{args:?}: expected a conflict, got {e:?}");
        };
        let pair = [ea.as_str(), eb.as_str()];
        assert!(
            pair.contains(&a) && pair.contains(&b),
            "{args:?}: conflict names {pair:?}, expected {a} and {b}"
        );
        let msg = e.to_string();
        assert!(msg.contains(a) && msg.contains(b), "{msg}");
    }

    fn bad_value(args: &[&str]) -> (String, String, String) {
        match err(args) {
            OptionsError::BadValue {
                option,
                value,
                reason,
            } => (option, value, reason),
            other => panic!("{args:?}: expected BadValue, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let d = MemOptions::new();
        assert_eq!(d, MemOptions::default());
        assert_eq!(d.file_prefix, "mp");
        assert_eq!(d.max_memzones, 2560);
        assert_eq!(d.max_memseg_lists, 128);
        assert_eq!(d.max_heaps, 32);
        assert_eq!(d.huge_unlink, HugeUnlink::Existing);
        assert_eq!(d.proc_type, ProcType::Primary);
        assert_eq!(d.iova_mode, None);
        assert!(d.validate().is_ok());
        assert!(d.to_args().is_empty());
        assert_eq!(parse(&[]).unwrap(), d);
        assert!(d.dynamic_memory() && d.shared_config());
        assert_eq!(d.requested_memory(), None);
    }

    #[test]
    fn socket_mem_all_spellings() {
        let want = Some(vec![1024 * MIB, 0, 512 * MIB]);
        for args in [
            &["--socket-mem", "1024,0,512"][..],
            &["--socket-mem=1024,0,512"],
            &["--numa-mem", "1024,0,512"],
            &["--numa-mem=1024,0,512"],
            &["--socket-mem", "1G,0,512M"],
        ] {
            assert_eq!(parse(args).unwrap().socket_mem, want, "{args:?}");
        }
        assert_eq!(
            parse(&["--socket-mem", "3"]).unwrap().requested_memory(),
            Some(3 * MIB)
        );
    }

    #[test]
    fn socket_limit_all_spellings() {
        let want = Some(vec![2048 * MIB, 0]);
        for args in [
            &["--socket-limit", "2048,0"][..],
            &["--socket-limit=2048,0"],
            &["--numa-limit", "2048,0"],
            &["--numa-limit=2048,0"],
        ] {
            assert_eq!(parse(args).unwrap().socket_limit, want, "{args:?}");
        }
    }

    #[test]
    fn memory_size_all_spellings() {
        for args in [
            &["-m", "512"][..],
            &["-m512"],
            &["--memory-size", "512"],
            &["--memory-size=512"],
            &["-m", "512M"],
        ] {
            assert_eq!(
                parse(args).unwrap().memory_size,
                Some(512 * MIB),
                "{args:?}"
            );
        }
        assert_eq!(parse(&["-m", "1G"]).unwrap().memory_size, Some(GIB));
        let (opt, _, reason) = bad_value(&["-m=512"]);
        assert_eq!(opt, "-m");
        assert!(reason.contains("without '='"), "{reason}");
    }

    #[test]
    fn pagesz_mem_parsing() {
        let o = parse(&[
            "--pagesz-mem",
            "1G:4G",
            "--pagesz-mem=2M:0",
            "--pagesz-mem=1G:2G",
        ])
        .unwrap();
        assert_eq!(
            o.pagesz_mem,
            vec![(PageSize::SIZE_1G, 2 * GIB), (PageSize::SIZE_2M, 0)]
        );
        assert_eq!(o.pagesz_limit(PageSize::SIZE_2M), 0);
        assert_eq!(o.pagesz_limit(PageSize::SIZE_1G), 2 * GIB);
        let d = MemOptions::new();
        assert_eq!(d.pagesz_limit(PageSize::SIZE_2M), 64 * GIB);
        assert_eq!(d.pagesz_limit(PageSize::SIZE_1G), 64 * GIB);
        assert_eq!(d.pagesz_limit(PageSize::SIZE_4K), 128 * MIB);
        for bad_arg in ["1G", "3M:1G", "2M:3M", "2M:-2M", "2M:x", ":1G", "2M:"] {
            let (opt, value, reason) = bad_value(&["--pagesz-mem", bad_arg]);
            assert_eq!(opt, "--pagesz-mem");
            assert_eq!(value, bad_arg);
            assert!(!reason.is_empty());
        }
        let (_, _, reason) = bad_value(&["--pagesz-mem", "2M:3M"]);
        assert!(reason.contains("use 4M"), "{reason}");
        let dup = MemOptions {
            pagesz_mem: vec![(PageSize::SIZE_2M, 0), (PageSize::SIZE_2M, 2 * MIB)],
            ..MemOptions::default()
        };
        assert!(matches!(dup.validate(), Err(OptionsError::BadValue { .. })));
    }

    #[test]
    fn flags() {
        let o = parse(&["--legacy-mem", "--single-file-segments", "--no-shconf"]).unwrap();
        assert!(o.legacy_mem && o.single_file_segments && o.no_shconf);
        assert!(!o.dynamic_memory() && !o.shared_config());
        let o = parse(&["--in-memory", "--match-allocations"]).unwrap();
        assert!(o.in_memory && o.match_allocations);
        assert_eq!(o.effective_huge_unlink(), HugeUnlink::Always);
        let o = parse(&["--no-huge"]).unwrap();
        assert!(o.no_huge);
        assert!(!o.dynamic_memory());
        let o = parse(&["--numa-lenient"]).unwrap();
        assert!(o.numa_lenient);
        let args = o.to_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(parse(&args).unwrap(), o);
        let e = err(&["--no-huge=1"]);
        assert!(
            matches!(&e, OptionsError::UnexpectedValue { option, value } if option == "--no-huge" && value == "1"),
            "{e:?}"
        );
    }

    #[test]
    fn huge_dir_and_runtime_dir() {
        for args in [
            &["--huge-dir", "/dev/hugepages"][..],
            &["--huge-dir=/dev/hugepages"],
        ] {
            assert_eq!(
                parse(args).unwrap().huge_dir,
                Some(PathBuf::from("/dev/hugepages"))
            );
        }
        for args in [&["--runtime-dir", "/run/x"][..], &["--runtime-dir=/run/x"]] {
            assert_eq!(
                parse(args).unwrap().runtime_dir,
                Some(PathBuf::from("/run/x"))
            );
        }
        for opt in ["--huge-dir", "--runtime-dir"] {
            let (o, _, reason) = bad_value(&[&format!("{opt}=")]);
            assert_eq!(o, opt);
            assert!(reason.contains("empty"), "{reason}");
            let (_, v, reason) = bad_value(&[opt, "relative/dir"]);
            assert_eq!(v, "relative/dir");
            assert!(reason.contains("absolute"), "{reason}");
        }
    }

    #[test]
    fn huge_unlink_forms() {
        assert_eq!(
            parse(&["--huge-unlink"]).unwrap().huge_unlink,
            HugeUnlink::Always
        );
        for (v, want) in [
            ("existing", HugeUnlink::Existing),
            ("always", HugeUnlink::Always),
            ("never", HugeUnlink::Never),
            ("NEVER", HugeUnlink::Never),
        ] {
            assert_eq!(
                parse(&[&format!("--huge-unlink={v}")]).unwrap().huge_unlink,
                want
            );
        }
        let (o, v, _) = bad_value(&["--huge-unlink=sometimes"]);
        assert_eq!((o.as_str(), v.as_str()), ("--huge-unlink", "sometimes"));
        // The value must be attached: a separate word is not consumed.
        let e = err(&["--huge-unlink", "never"]);
        assert!(
            matches!(&e, OptionsError::UnexpectedArgument { hint, .. } if hint.contains("--huge-unlink=never")),
            "{e:?}"
        );
        // Bare form followed by another option works.
        let o = parse(&["--huge-unlink", "--file-prefix", "x"]).unwrap();
        assert_eq!(o.huge_unlink, HugeUnlink::Always);
        assert_eq!(o.file_prefix, "x");
    }

    #[test]
    fn file_prefix_rules() {
        for args in [
            &["--file-prefix", "app_1.x-y"][..],
            &["--file-prefix=app_1.x-y"],
        ] {
            assert_eq!(parse(args).unwrap().file_prefix, "app_1.x-y");
        }
        for (prefix, needle) in [
            ("", "empty"),
            ("a%d", "'%'"),
            ("a/b", "'/'"),
            ("..", "'.'"),
            (".hidden", "'.'"),
            ("a b", "' '"),
            ("a\nb", "'\\n'"),
        ] {
            let (o, v, reason) = bad_value(&[&format!("--file-prefix={prefix}")]);
            assert_eq!(o, "--file-prefix");
            assert_eq!(v, prefix);
            assert!(reason.contains(needle), "{prefix:?}: {reason}");
        }
        let long = "x".repeat(MAX_FILE_PREFIX_LEN + 1);
        let (_, _, reason) = bad_value(&["--file-prefix", &long]);
        assert!(reason.contains("at most 64"), "{reason}");
        assert!(parse(&["--file-prefix", &"x".repeat(MAX_FILE_PREFIX_LEN)]).is_ok());
        // A prefix starting with '-' can be given with '=' and survives to_args.
        let o = parse(&["--file-prefix=-x"]).unwrap();
        assert_eq!(o.file_prefix, "-x");
        assert_eq!(MemOptions::parse_args(&o.to_args()).unwrap(), o);
    }

    #[test]
    fn proc_type_and_iova_mode() {
        for (v, want) in [
            ("primary", ProcType::Primary),
            ("secondary", ProcType::Secondary),
            ("auto", ProcType::Auto),
            ("Secondary", ProcType::Secondary),
        ] {
            assert_eq!(parse(&["--proc-type", v]).unwrap().proc_type, want);
            assert_eq!(
                parse(&[&format!("--proc-type={v}")]).unwrap().proc_type,
                want
            );
        }
        let (o, v, reason) = bad_value(&["--proc-type", "tertiary"]);
        assert_eq!((o.as_str(), v.as_str()), ("--proc-type", "tertiary"));
        assert!(reason.contains("primary, secondary or auto"));
        for (v, want) in [
            ("pa", Some(IovaMode::Pa)),
            ("va", Some(IovaMode::Va)),
            ("VA", Some(IovaMode::Va)),
            ("auto", None),
        ] {
            assert_eq!(parse(&["--iova-mode", v]).unwrap().iova_mode, want);
            assert_eq!(
                parse(&[&format!("--iova-mode={v}")]).unwrap().iova_mode,
                want
            );
        }
        let (o, v, reason) = bad_value(&["--iova-mode=dc"]);
        assert_eq!((o.as_str(), v.as_str()), ("--iova-mode", "dc"));
        assert!(reason.contains("pa or va"));
    }

    #[test]
    fn base_virtaddr_rules() {
        for args in [
            &["--base-virtaddr", "0x200000000000"][..],
            &["--base-virtaddr=0x200000000000"],
            &["--base-virtaddr", "200000000000"],
            &["--base-virtaddr", "0X200000000000"],
        ] {
            assert_eq!(
                parse(args).unwrap().base_virtaddr,
                Some(0x2000_0000_0000),
                "{args:?}"
            );
        }
        let (_, _, reason) = bad_value(&["--base-virtaddr", "0x100001000"]);
        assert!(reason.contains("use 0x101000000"), "{reason}");
        let (_, _, reason) = bad_value(&["--base-virtaddr", "0"]);
        assert!(reason.contains("not be 0"), "{reason}");
        let (_, _, reason) = bad_value(&["--base-virtaddr", "0x0"]);
        assert!(reason.contains("not be 0"), "{reason}");
        for garbage in ["0x", "", "xyz", "0x12g", "-0x1000000", "0x1_000000"] {
            let (o, v, reason) = bad_value(&[&format!("--base-virtaddr={garbage}")]);
            assert_eq!(o, "--base-virtaddr");
            assert_eq!(v, garbage);
            assert!(reason.contains("hexadecimal"), "{reason}");
        }
        let (_, _, reason) = bad_value(&["--base-virtaddr", "0x1ffffffffffffffff"]);
        assert!(reason.contains("64 bits"), "{reason}");
        let (_, _, reason) = bad_value(&["--base-virtaddr", "0xff00000000000000"]);
        assert!(
            reason.contains("largest Linux user address space"),
            "{reason}"
        );
    }

    #[test]
    fn memory_channels_and_ranks() {
        let o = parse(&["-n", "3", "-r2"]).unwrap();
        assert_eq!((o.memory_channels, o.memory_ranks), (Some(3), Some(2)));
        let o = parse(&["--memory-channels=8", "--memory-ranks", "16"]).unwrap();
        assert_eq!((o.memory_channels, o.memory_ranks), (Some(8), Some(16)));
        assert_eq!(
            o.to_args(),
            ["--memory-channels=8", "--memory-ranks=16"],
            "round trip"
        );
        assert_eq!(MemOptions::parse_args(&o.to_args()).unwrap(), o);
        let d = parse(&[]).unwrap();
        assert_eq!((d.memory_channels, d.memory_ranks), (None, None));
        for (args, opt, why) in [
            (&["-n", "0"][..], "-n", "from 1 to 64"),
            (&["-n", "65"], "-n", "from 1 to 64"),
            (&["-n", "four"], "-n", "whole number"),
            (&["-r", "0"], "-r", "from 1 to 16"),
            (&["-r", "17"], "-r", "from 1 to 16"),
        ] {
            let (o, _, reason) = bad_value(args);
            assert_eq!(o, opt, "{args:?}");
            assert!(reason.contains(why), "{args:?}: {reason}");
        }
        // Set in code: validate refuses the same values.
        assert!(MemOptions::default().memory_ranks(17).validate().is_err());
        assert!(MemOptions::default().memory_channels(0).validate().is_err());
        assert!(MemOptions::default()
            .memory_channels(4)
            .memory_ranks(2)
            .validate()
            .is_ok());
    }

    #[test]
    fn table_sizes() {
        let o = parse(&[
            "--max-memzones",
            "8192",
            "--max-memseg-lists=256",
            "--max-heaps",
            "64",
        ])
        .unwrap();
        assert_eq!(
            (o.max_memzones, o.max_memseg_lists, o.max_heaps),
            (8192, 256, 64)
        );
        for opt in ["--max-memzones", "--max-memseg-lists", "--max-heaps"] {
            for v in ["0", "-1", "x", "", "99999999999", "1K"] {
                let (o, value, _) = bad_value(&[&format!("{opt}={v}")]);
                assert_eq!((o.as_str(), value.as_str()), (opt, v));
            }
        }
        let (_, _, reason) = bad_value(&["--max-heaps", "1025"]);
        assert!(reason.contains("1 to 1024"), "{reason}");
    }

    #[test]
    fn malformed_lists() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (",", "NUMA node 0"),
            ("1024,", "trailing comma"),
            ("1024,,1024", "NUMA node 1"),
            (",1024", "NUMA node 0"),
            ("abc", "not a number"),
            ("1024,abc", "NUMA node 1"),
            ("12x", "suffix"),
            ("-1", "negative"),
            ("1024,-5", "negative"),
            ("1024, 1024", "spaces"),
            ("99999999999999999", "overflows"),
            ("99999999999999999999999", "64 bits"),
            ("1.5", "suffix"),
            ("0x10", "suffix"),
        ];
        for opt in [
            "--socket-mem",
            "--numa-mem",
            "--socket-limit",
            "--numa-limit",
        ] {
            for &(value, needle) in cases {
                let (o, v, reason) = bad_value(&[opt, value]);
                assert_eq!(o, opt, "{value:?}");
                assert_eq!(v, value);
                assert!(reason.contains(needle), "{opt} {value:?}: {reason}");
            }
        }
        let (_, _, reason) = bad_value(&["-m", "99999999999999999"]);
        assert!(reason.contains("overflows"), "{reason}");
        let (_, _, reason) = bad_value(&["-m", "-5"]);
        assert!(reason.contains("negative"), "{reason}");
        // Too many nodes.
        let many = vec!["1"; MAX_NUMA_NODES + 1].join(",");
        let (_, _, reason) = bad_value(&["--socket-mem", &many]);
        assert!(reason.contains("at most 1024"), "{reason}");
        // Sum overflow.
        let (_, _, reason) = bad_value(&["--socket-mem", "16000000T,16000000T"]);
        assert!(reason.contains("total overflows"), "{reason}");
    }

    #[test]
    fn missing_values() {
        for opt in [
            "--socket-mem",
            "--numa-mem",
            "--socket-limit",
            "--numa-limit",
            "-m",
            "--memory-size",
            "--pagesz-mem",
            "--huge-dir",
            "--file-prefix",
            "--proc-type",
            "--iova-mode",
            "--base-virtaddr",
            "--max-memzones",
            "--max-memseg-lists",
            "--max-heaps",
            "--runtime-dir",
        ] {
            let e = err(&[opt]);
            assert!(
                matches!(&e, OptionsError::MissingValue { option, expected } if option == opt && !expected.is_empty()),
                "{e:?}"
            );
            let e = err(&[opt, "--no-huge"]);
            assert!(
                matches!(&e, OptionsError::MissingValue { expected, .. } if expected.contains("'--no-huge' is an option")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn unknown_and_non_memory_options() {
        let e = err(&["--socket_mem", "1024"]);
        assert!(
            matches!(&e, OptionsError::UnknownOption { suggestion: Some(s), .. } if s == "--socket-mem"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("did you mean --socket-mem") && msg.contains("--huge-unlink"),
            "{msg}"
        );
        let e = err(&["-socket-mem", "1024"]);
        assert!(
            matches!(&e, OptionsError::UnknownOption { suggestion: Some(s), .. } if s == "--socket-mem"),
            "{e:?}"
        );
        let e = err(&["--bogus"]);
        assert!(
            matches!(&e, OptionsError::UnknownOption { option, suggestion: None } if option == "--bogus"),
            "{e:?}"
        );
        let e = err(&["--bogus=3"]);
        assert!(
            matches!(&e, OptionsError::UnknownOption { option, .. } if option == "--bogus"),
            "{e:?}"
        );
        let e = err(&["--in-mem"]);
        assert!(
            matches!(&e, OptionsError::UnknownOption { suggestion: Some(s), .. } if s == "--in-memory"),
            "{e:?}"
        );
        let e = err(&["-x"]);
        assert!(matches!(&e, OptionsError::UnknownOption { .. }), "{e:?}");
        for (args, name) in [
            (&["-l", "0-3"][..], "-l"),
            (&["-l0-3"], "-l"),
            (&["--lcores", "0-3"], "--lcores"),
            (&["--vdev=net_null0"], "--vdev"),
            (&["--huge-worker-stack"], "--huge-worker-stack"),
        ] {
            let e = err(args);
            assert!(
                matches!(&e, OptionsError::NotMemoryOption { option, .. } if option == name),
                "{e:?}"
            );
            assert!(e.to_string().contains("--socket-mem"));
        }
        let e = err(&["512"]);
        assert!(
            matches!(&e, OptionsError::UnexpectedArgument { .. }),
            "{e:?}"
        );
        let e = err(&["--", "x"]);
        assert!(
            matches!(&e, OptionsError::UnexpectedArgument { .. }),
            "{e:?}"
        );
        assert!(parse(&["--"]).is_ok());
    }

    #[test]
    fn parse_known_args_sets_aside_eal_options() {
        let (o, rest) = MemOptions::parse_known_args(&[
            "-l",
            "0-3",
            "-n4",
            "--no-pci",
            "--log-level=eal,8",
            "--vdev",
            "net_null0",
            "--huge-worker-stack",
            "--in-memory",
            "app-arg",
            "-m",
            "256",
            "--",
            "--no-huge",
        ])
        .unwrap();
        assert!(o.in_memory && !o.no_huge);
        assert_eq!(o.memory_size, Some(256 * MIB));
        assert_eq!(o.memory_channels, Some(4), "-n is a memory option now");
        assert_eq!(
            rest,
            [
                "-l",
                "0-3",
                "--no-pci",
                "--log-level=eal,8",
                "--vdev",
                "net_null0",
                "--huge-worker-stack",
                "app-arg",
                "--",
                "--no-huge"
            ]
        );
        assert!(MemOptions::parse_known_args(&["--bogus"]).is_err());
        assert!(MemOptions::parse_known_args(&["-m", "512", "--socket-mem", "1"]).is_err());
    }

    #[test]
    fn dpdk_rejected_combinations() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["-m", "512", "--socket-mem", "512"], "-m", "--socket-mem"),
            (
                &["--memory-size=512", "--numa-mem=512"],
                "--memory-size",
                "--numa-mem",
            ),
            (
                &["--no-huge", "--socket-mem", "512"],
                "--no-huge",
                "--socket-mem",
            ),
            (
                &["--no-huge", "--numa-mem", "512"],
                "--no-huge",
                "--numa-mem",
            ),
            (
                &["--socket-limit", "512", "--legacy-mem"],
                "--socket-limit",
                "--legacy-mem",
            ),
            (
                &["--numa-limit", "512", "--legacy-mem"],
                "--numa-limit",
                "--legacy-mem",
            ),
            (
                &["--legacy-mem", "--in-memory"],
                "--legacy-mem",
                "--in-memory",
            ),
            (
                &["--legacy-mem", "--match-allocations"],
                "--legacy-mem",
                "--match-allocations",
            ),
            (
                &["--no-huge", "--match-allocations"],
                "--no-huge",
                "--match-allocations",
            ),
            (
                &["--no-huge", "--huge-unlink"],
                "--no-huge",
                "--huge-unlink",
            ),
            (
                &["--no-huge", "--huge-unlink=always"],
                "--no-huge",
                "--huge-unlink",
            ),
            (
                &["--single-file-segments", "--huge-unlink"],
                "--single-file-segments",
                "--huge-unlink",
            ),
            (
                &["--no-huge", "--single-file-segments"],
                "--no-huge",
                "--single-file-segments",
            ),
            (
                &["--in-memory", "--huge-unlink=never"],
                "--in-memory",
                "--huge-unlink=never",
            ),
            (
                &["--pagesz-mem", "2M:0", "--no-huge"],
                "--pagesz-mem",
                "--no-huge",
            ),
            (
                &["--pagesz-mem", "2M:0", "--legacy-mem"],
                "--pagesz-mem",
                "--legacy-mem",
            ),
            // DPDK logs an error for these but carries on (its --no-huge
            // sets legacy mode); memplane rejects them.
            (
                &["--socket-limit", "64", "--no-huge"],
                "--socket-limit",
                "--no-huge",
            ),
            (
                &["--numa-limit=64", "--no-huge"],
                "--numa-limit",
                "--no-huge",
            ),
        ];
        for &(args, a, b) in cases {
            assert_conflict(args, a, b);
            // Order of the flags does not matter.
            let reversed: Vec<&str> = {
                let mut groups: Vec<Vec<&str>> = Vec::new();
                for &x in args {
                    if x.starts_with('-') {
                        groups.push(vec![x]);
                    } else if let Some(g) = groups.last_mut() {
                        g.push(x);
                    }
                }
                groups.into_iter().rev().flatten().collect()
            };
            assert_conflict(&reversed, a, b);
        }
    }

    #[test]
    fn dpdk_accepted_combinations() {
        // DPDK 22.11 accepts these (in-memory implies unlinking; "existing"
        // is the default; no-huge with -m sizes the anonymous memory),
        // except --no-huge + --in-memory, which memplane accepts on purpose
        // (see docs/options.md).
        for args in [
            &["--no-huge", "--in-memory"][..],
            &["--in-memory", "--huge-unlink"],
            &["--in-memory", "--single-file-segments", "--huge-unlink"],
            &["--no-huge", "--in-memory", "--huge-unlink"],
            &["--no-huge", "--huge-unlink=existing"],
            &["--no-huge", "--huge-unlink=never"],
            &["--no-huge", "-m", "128"],
            &["--no-huge", "--legacy-mem"],
            &["--legacy-mem", "-m", "1024"],
            &["--socket-mem", "1024,1024", "--socket-limit", "2048,0"],
            &["--in-memory", "--single-file-segments"],
            &["--match-allocations", "--socket-mem", "512"],
            &["--proc-type", "secondary", "--no-huge"],
            &["--proc-type", "auto", "--no-shconf"],
            &["--in-memory", "--no-shconf"],
        ] {
            assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args));
        }
    }

    #[test]
    fn memplane_rejected_combinations() {
        assert_conflict(
            &["--socket-mem", "1024,2048", "--socket-limit", "0,1024"],
            "--socket-mem",
            "--socket-limit",
        );
        let e = err(&["--socket-mem", "1024,2048", "--numa-limit", "0,1024"]);
        assert!(e.to_string().contains("node 1"), "{e}");
        assert_conflict(
            &["--proc-type", "secondary", "--in-memory"],
            "--proc-type secondary",
            "--in-memory",
        );
        assert_conflict(
            &["--proc-type=secondary", "--no-shconf"],
            "--proc-type secondary",
            "--no-shconf",
        );
    }

    #[test]
    fn validate_uses_canonical_names() {
        let o = MemOptions::new().memory_size(MIB).socket_mem([MIB]);
        let e = o.build().unwrap_err();
        assert!(
            matches!(&e, OptionsError::Conflict { a, b, .. } if a == "-m" && b == "--socket-mem"),
            "{e:?}"
        );
        let e = MemOptions::new()
            .no_huge(true)
            .huge_unlink(HugeUnlink::Always)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("--huge-unlink"), "{e}");
        let e = MemOptions::new().socket_mem([]).build().unwrap_err();
        assert!(matches!(e, OptionsError::BadValue { .. }));
        let e = MemOptions::new().base_virtaddr(0x1000).build().unwrap_err();
        assert!(e.to_string().contains("0x1000000"), "{e}");
        let e = MemOptions::new().max_memzones(0).build().unwrap_err();
        assert!(e.to_string().contains("--max-memzones"), "{e}");
        let e = MemOptions::new().huge_dir("").build().unwrap_err();
        assert!(e.to_string().contains("--huge-dir"), "{e}");
        let e = MemOptions::new()
            .runtime_dir("/run/a\0b")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn builder_matches_parser() {
        let built = MemOptions::new()
            .socket_mem([1024 * MIB, 512 * MIB])
            .socket_limit([0, 4096 * MIB])
            .pagesz_mem(PageSize::SIZE_1G, 4 * GIB)
            .pagesz_mem(PageSize::SIZE_2M, 0)
            .single_file_segments(true)
            .match_allocations(true)
            .huge_dir("/dev/hugepages")
            .huge_unlink(HugeUnlink::Never)
            .file_prefix("app1")
            .proc_type(ProcType::Auto)
            .iova_mode(IovaMode::Va)
            .base_virtaddr(0x2000_0000_0000)
            .max_memzones(10_000)
            .max_memseg_lists(64)
            .max_heaps(8)
            .runtime_dir("/run/app1")
            .build()
            .unwrap();
        let parsed = parse(&[
            "--numa-mem",
            "1024,512",
            "--numa-limit=0,4096",
            "--pagesz-mem",
            "1G:4G",
            "--pagesz-mem",
            "2M:0",
            "--single-file-segments",
            "--match-allocations",
            "--huge-dir",
            "/dev/hugepages",
            "--huge-unlink=never",
            "--file-prefix",
            "app1",
            "--proc-type",
            "auto",
            "--iova-mode",
            "va",
            "--base-virtaddr",
            "0x200000000000",
            "--max-memzones",
            "10000",
            "--max-memseg-lists",
            "64",
            "--max-heaps",
            "8",
            "--runtime-dir",
            "/run/app1",
        ])
        .unwrap();
        assert_eq!(built, parsed);
        assert_eq!(MemOptions::parse_args(&built.to_args()).unwrap(), built);
        let o = MemOptions::new()
            .memory_size(MIB)
            .legacy_mem(true)
            .no_huge(true)
            .in_memory(false)
            .no_shconf(true)
            .iova_mode(None)
            .build()
            .unwrap();
        assert_eq!(MemOptions::parse_args(&o.to_args()).unwrap(), o);
    }

    #[test]
    fn last_occurrence_wins() {
        let o = parse(&[
            "-m",
            "1",
            "--memory-size",
            "2",
            "--file-prefix=a",
            "--file-prefix=b",
        ])
        .unwrap();
        assert_eq!(o.memory_size, Some(2 * MIB));
        assert_eq!(o.file_prefix, "b");
        let o = parse(&["--huge-unlink=never", "--huge-unlink"]).unwrap();
        assert_eq!(o.huge_unlink, HugeUnlink::Always);
    }

    #[test]
    fn odd_amounts_round_trip() {
        let o = MemOptions::new()
            .socket_mem([1536 * KIB, 1000, 0, 7 * GIB])
            .build()
            .unwrap();
        assert_eq!(o.to_args(), ["--socket-mem=1536K,1000B,0,7168"]);
        assert_eq!(MemOptions::parse_args(&o.to_args()).unwrap(), o);
    }

    #[test]
    fn serde_round_trip() {
        let o = parse(&[
            "--socket-mem",
            "1,2",
            "--iova-mode",
            "pa",
            "--pagesz-mem",
            "2M:4M",
        ])
        .unwrap();
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("\"iova_mode\":\"pa\""), "{json}");
        let back: MemOptions = serde_json::from_str(&json).unwrap();
        assert_eq!(back, o);
        let partial: MemOptions = serde_json::from_str(r#"{"no_huge":true}"#).unwrap();
        assert_eq!(partial, MemOptions::new().no_huge(true));
    }

    #[test]
    fn error_messages_name_input_and_fix() {
        let msg = err(&["--socket-mem", "1024,"]).to_string();
        assert!(
            msg.contains("'1024,'") && msg.contains("--socket-mem") && msg.contains("remove"),
            "{msg}"
        );
        let msg = err(&["-m", "512", "--numa-mem", "512"]).to_string();
        assert!(
            msg.starts_with("-m cannot be used together with --numa-mem"),
            "{msg}"
        );
        let msg = err(&["-l", "0-3"]).to_string();
        assert!(msg.contains("lcore list"), "{msg}");
    }

    #[test]
    fn usage_lists_every_option() {
        let usage = MemOptions::usage();
        for s in SPECS {
            assert!(usage.contains(s.long), "{}", s.long);
            if let Some(alias) = s.alias {
                assert!(usage.contains(alias));
            }
        }
    }

    #[test]
    fn docs_list_every_option() {
        let doc = include_str!("../../../docs/options.md");
        for s in SPECS {
            assert!(
                doc.contains(&format!("`{}", s.long)),
                "docs/options.md lacks {}",
                s.long
            );
            if let Some(alias) = s.alias {
                assert!(doc.contains(alias), "docs/options.md lacks {alias}");
            }
        }
    }

    /// Turns arbitrary options into valid ones by dropping what conflicts.
    fn sanitize(mut o: MemOptions) -> MemOptions {
        if o.memory_size.is_some() && o.socket_mem.is_some() {
            o.memory_size = None;
        }
        if o.no_huge {
            o.socket_mem = None;
            o.socket_limit = None;
            o.match_allocations = false;
            o.single_file_segments = false;
            o.pagesz_mem.clear();
            if o.huge_unlink == HugeUnlink::Always {
                o.huge_unlink = HugeUnlink::Existing;
            }
        }
        if o.legacy_mem {
            o.socket_limit = None;
            o.in_memory = false;
            o.match_allocations = false;
            o.pagesz_mem.clear();
        }
        if o.in_memory && o.huge_unlink == HugeUnlink::Never {
            o.huge_unlink = HugeUnlink::Existing;
        }
        if o.single_file_segments && o.huge_unlink == HugeUnlink::Always && !o.in_memory {
            o.huge_unlink = HugeUnlink::Existing;
        }
        if let (Some(mem), Some(limit)) = (&o.socket_mem, &mut o.socket_limit) {
            for (cap, want) in limit.iter_mut().zip(mem) {
                if *cap != 0 && want > cap {
                    *cap = 0;
                }
            }
        }
        if o.proc_type == ProcType::Secondary && (o.in_memory || o.no_shconf) {
            o.proc_type = ProcType::Auto;
        }
        o
    }

    fn amount() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..100_000).prop_map(|mb| mb * MIB),
            (0u64..1_000_000).prop_map(|k| k * KIB),
            0u64..10_000_000,
        ]
    }

    fn page_size() -> impl Strategy<Value = PageSize> {
        (12u32..31).prop_map(|shift| PageSize::new(1 << shift).unwrap())
    }

    prop_compose! {
        fn any_options()(
            socket_mem in proptest::option::of(proptest::collection::vec(amount(), 1..6)),
            socket_limit in proptest::option::of(proptest::collection::vec(amount(), 1..6)),
            memory_size in proptest::option::of(amount()),
            pagesz in proptest::collection::vec((page_size(), 0u64..64), 0..4),
            flags in proptest::array::uniform7(any::<bool>()),
            huge_dir in proptest::option::of("/[a-z0-9_=,. -]{0,12}"),
            huge_unlink in prop_oneof![Just(HugeUnlink::Existing), Just(HugeUnlink::Always), Just(HugeUnlink::Never)],
            file_prefix in "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}",
            proc_type in prop_oneof![Just(ProcType::Primary), Just(ProcType::Secondary), Just(ProcType::Auto)],
            iova_mode in proptest::option::of(prop_oneof![Just(IovaMode::Pa), Just(IovaMode::Va)]),
            base in proptest::option::of(1u64..(BASE_VIRTADDR_LIMIT / BASE_VIRTADDR_ALIGN)),
            tables in (1..=MAX_MAX_MEMZONES, 1..=MAX_MAX_MEMSEG_LISTS, 1..=MAX_MAX_HEAPS),
            runtime_dir in proptest::option::of("/[a-z0-9=]{1,12}"),
        ) -> MemOptions {
            let mut o = MemOptions::new()
                .legacy_mem(flags[0])
                .single_file_segments(flags[1])
                .in_memory(flags[2])
                .no_huge(flags[3])
                .no_shconf(flags[4])
                .match_allocations(flags[5])
                .huge_unlink(huge_unlink)
                .file_prefix(file_prefix)
                .proc_type(proc_type)
                .iova_mode(iova_mode)
                .max_memzones(tables.0)
                .max_memseg_lists(tables.1)
                .max_heaps(tables.2);
            o.socket_mem = socket_mem;
            o.socket_limit = socket_limit;
            o.memory_size = memory_size;
            for (size, pages) in pagesz {
                o = o.pagesz_mem(size, pages * size.bytes());
            }
            o.huge_dir = huge_dir.map(PathBuf::from);
            o.runtime_dir = runtime_dir.map(PathBuf::from);
            o.base_virtaddr = base.map(|b| b * BASE_VIRTADDR_ALIGN);
            let _ = flags[6];
            sanitize(o)
        }
    }

    proptest! {
        #[test]
        fn to_args_round_trips(o in any_options()) {
            prop_assert!(o.validate().is_ok(), "{:?}: {:?}", o, o.validate());
            let args = o.to_args();
            let back = MemOptions::parse_args(&args);
            prop_assert_eq!(back.as_ref().ok(), Some(&o), "args {:?} gave {:?}", args, back);
            // Also through the separate "--flag value" form where one exists.
            let split: Vec<String> = args
                .iter()
                .flat_map(|a| match a.split_once('=') {
                    Some((k, v)) if !v.starts_with('-') && k != "--huge-unlink" && !v.is_empty() => {
                        vec![k.to_string(), v.to_string()]
                    }
                    _ => vec![a.clone()],
                })
                .collect();
            prop_assert_eq!(MemOptions::parse_args(&split).ok(), Some(o));
        }

        #[test]
        fn parse_never_panics(args in proptest::collection::vec(
            prop_oneof![
                Just("--socket-mem".to_string()),
                Just("-m".to_string()),
                Just("--huge-unlink".to_string()),
                Just("--no-huge".to_string()),
                Just("--".to_string()),
                Just("-".to_string()),
                Just("-l".to_string()),
                Just("--pagesz-mem".to_string()),
                Just("--base-virtaddr".to_string()),
                "[-=,:0-9a-zA-Z%/é ]{0,12}",
                ".{0,8}",
            ],
            0..8,
        )) {
            let _ = MemOptions::parse_args(&args);
            let _ = MemOptions::parse_known_args(&args);
        }
    }
}
