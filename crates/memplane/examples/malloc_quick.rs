//! Quick look at malloc/free latency (malloc_perf_autotest's loop shape):
//! `cargo run --release --example malloc_quick`.
use std::time::Instant;

use memplane::{MemOptions, Memory};

fn main() -> Result<(), memplane::Error> {
    let prefix = format!("mq{}", std::process::id());
    // Extra EAL options from MQ_ARGS, e.g. MQ_ARGS="--socket-mem 1024".
    let extra = std::env::var("MQ_ARGS").unwrap_or_default();
    let mut args = vec!["--file-prefix", &prefix];
    args.extend(extra.split_whitespace());
    let mem = Memory::init(&MemOptions::parse_args(&args)?)?;
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![64, 128, 1024, 4096, 65536, 1 << 20]
    } else {
        sizes
    };
    for &size in &sizes {
        let runs = 10_000usize.min((512usize << 20) / size);
        let mut v = Vec::with_capacity(runs);
        for _ in 0..std::env::var("REPEAT")
            .ok()
            .and_then(|r| r.parse::<u32>().ok())
            .unwrap_or(0)
        {
            for _ in 0..runs {
                v.push(mem.malloc(size, 0)?);
            }
            for p in v.drain(..) {
                // SAFETY: not used afterwards.
                unsafe { mem.free(p)? };
            }
        }
        let t = Instant::now();
        for _ in 0..runs {
            v.push(mem.malloc(size, 0)?);
        }
        let alloc = t.elapsed();
        for p in &v {
            // SAFETY: live blocks of `size` bytes.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0, size) };
        }
        let t = Instant::now();
        for p in v.drain(..) {
            // SAFETY: not used afterwards.
            unsafe { mem.free(p)? };
        }
        let free = t.elapsed();
        println!(
            "{size:>8} x {runs:>5}: alloc {:.3} us, free {:.3} us",
            alloc.as_secs_f64() * 1e6 / runs as f64,
            free.as_secs_f64() * 1e6 / runs as f64
        );
    }
    Ok(())
}
