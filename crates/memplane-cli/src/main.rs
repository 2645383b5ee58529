//! The `memplane` command-line tool.
fn main() {}
