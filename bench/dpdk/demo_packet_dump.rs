//! `demo_packet_dump SIZE SEQ`: packet SEQ of SIZE bytes in hex as
//! `memplane demo` sends it, then as its secondary rewrites it, straight
//! from crates/memplane-cli/src/demo/packet.rs. bench/demo_vs_dpdk.sh
//! builds it with rustc and compares its output with `demo_pipeline --dump
//! SIZE SEQ` (the C port in demo_pipeline.c): same bytes, or the two sides
//! do not do the same work.
#![allow(dead_code)]

#[path = "../../crates/memplane-cli/src/demo/packet.rs"]
mod packet;

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
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
