//! Helpers of the heap tests: per-test options, block fill and check,
//! error unwrapping.

use std::ptr::NonNull;

use memplane::heap::HeapError;
use memplane::{Error, MemOptions};

/// Options with the prefix `<tag>_<name>_<pid>`, a private runtime
/// directory (kept alive by the returned guard) and `extra` options.
pub fn test_opts(tag: &str, name: &str, extra: &[&str]) -> (MemOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec![
        "--file-prefix".into(),
        format!("{tag}_{name}_{}", std::process::id()),
        "--runtime-dir".into(),
        dir.path().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (MemOptions::parse_args(&refs).unwrap(), dir)
}

/// Writes `byte` over `len` bytes of a live block.
pub fn fill(p: NonNull<u8>, len: usize, byte: u8) {
    // SAFETY: the caller passes a live block of at least `len` bytes.
    unsafe { std::ptr::write_bytes(p.as_ptr(), byte, len) };
}

/// Whether all `len` bytes of a live block are `byte`.
pub fn all(p: NonNull<u8>, len: usize, byte: u8) -> bool {
    // SAFETY: as in `fill`.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), len) }
        .iter()
        .all(|&b| b == byte)
}

/// The heap error inside `e` (panics on any other error).
pub fn heap_err(e: Error) -> HeapError {
    match e {
        Error::Heap(h) => h,
        other => panic!("expected a heap error, got {other}"),
    }
}
