//! Times `Memory::init` with `--socket-mem 1024` (2 MiB pages) and its drop.
//!
//! `cargo run --release -p memplane --example startup [MiB] [runs]`

use std::time::Instant;

use memplane::{MemOptions, Memory, PageSize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let rt = std::env::temp_dir().join(format!("memplane-startup-{}", std::process::id()));
    let opts = MemOptions::new()
        .file_prefix("startup")
        .runtime_dir(&rt)
        .socket_mem([mib << 20])
        .pagesz_mem(PageSize::SIZE_1G, 0)
        .build()?;
    for _ in 0..runs {
        let t = Instant::now();
        let mem = Memory::init(&opts)?;
        let init = t.elapsed();
        let t = Instant::now();
        drop(mem);
        let fini = t.elapsed();
        println!(
            "init {:>8.2} ms   drop {:>8.2} ms",
            init.as_secs_f64() * 1e3,
            fini.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(rt);
    Ok(())
}
