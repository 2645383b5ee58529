//! `demo_packet_dump SIZE SEQ`: packet SEQ of SIZE bytes in hex as
//! `memplane demo` sends it, then as its secondary rewrites it, straight
//! from crates/memplane-cli/src/demo/packet.rs. bench/demo_vs_dpdk.sh
//! builds it with rustc and compares its output with `demo_pipeline --dump
//! SIZE SEQ` (the C port in demo_pipeline.c): same bytes, or the two sides
//! do not do the same work. `demo_packet_dump bench SIZE N` times the
//! packet work alone (see `bench`).
#![allow(dead_code)]

#[path = "../../crates/memplane-cli/src/demo/packet.rs"]
mod packet;

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// `bench SIZE N`: the per-packet work alone, on one core, one buffer:
/// N x (fill, check_and_rewrite, check_returned); prints ns per packet
/// (the C twin is `demo_pipeline --bench SIZE N`).
fn bench(size: usize, n: u64) -> std::process::ExitCode {
    let mut p = vec![0u8; size];
    let start = std::time::Instant::now();
    for seq in 0..n {
        packet::fill(&mut p, seq);
        let back = packet::check_and_rewrite(&mut p)
            .map_err(|why| why.to_string())
            .and_then(|_| packet::check_returned(&p, seq, size).map_err(|why| why.to_string()));
        if let Err(why) = back {
            println!("packet {seq}: {why}");
            return std::process::ExitCode::FAILURE;
        }
    }
    println!(
        "{:.1} ns per packet",
        start.elapsed().as_secs_f64() * 1e9 / n as f64
    );
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "bench" {
        let size = args[2].parse::<usize>().ok();
        let n = args[3].parse::<u64>().ok().filter(|&n| n > 0);
        if let (Some(size), Some(n)) = (size, n) {
            if (packet::MIN_PACKET..=packet::MAX_PACKET).contains(&size) {
                return bench(size, n);
            }
        }
        eprintln!("usage: demo_packet_dump bench SIZE(58..1514) N");
        return std::process::ExitCode::from(2);
    }
    let parsed = (args.len() == 3)
        .then(|| Some((args[1].parse::<usize>().ok()?, args[2].parse::<u64>().ok()?)))
        .flatten()
        .filter(|(size, _)| (packet::MIN_PACKET..=packet::MAX_PACKET).contains(size));
    let Some((size, seq)) = parsed else {
        eprintln!("usage: demo_packet_dump SIZE(58..1514) SEQ");
        return std::process::ExitCode::from(2);
    };
    let mut p = vec![0u8; size];
    packet::fill(&mut p, seq);
    println!("{}", hex(&p));
    if let Err(why) = packet::check_and_rewrite(&mut p) {
        println!("check_and_rewrite: {why}");
        return std::process::ExitCode::FAILURE;
    }
    println!("{}", hex(&p));
    if let Err(why) = packet::check_returned(&p, seq, size) {
        println!("check_returned: {why}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
