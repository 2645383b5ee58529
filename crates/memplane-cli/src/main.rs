//! The `memplane` command-line tool.
//!
//! `memplane hugepages` is the tool DPDK users know as `dpdk-hugepages.py`,
//! made better: it shows where every hugepage went, reserves and mounts, and
//! clears stale files without touching live ones. `memplane check` runs the
//! preflight of a set of EAL-style memory options. `memplane memory` starts
//! a real instance with such options and shows where its memory went.

mod check;
mod demo;
mod hugepages;
mod info;
mod memory;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use memplane::hugepages::{Discovery, SystemRoots};

/// memplane: hugepage memory for data-plane programs.
#[derive(Debug, Parser)]
#[command(name = "memplane", version, about, long_about = None)]
struct Cli {
    /// Root of sysfs to read (for tests on fake trees).
    #[arg(
        long,
        global = true,
        hide = true,
        default_value = "/sys",
        env = "MEMPLANE_SYS_ROOT"
    )]
    sys_root: PathBuf,
    /// Root of procfs to read (for tests on fake trees).
    #[arg(
        long,
        global = true,
        hide = true,
        default_value = "/proc",
        env = "MEMPLANE_PROC_ROOT"
    )]
    proc_root: PathBuf,
    /// Log level filter (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hugepage status, reservation, mounts and stale files.
    Hugepages(hugepages::Args),
    /// Check whether EAL-style memory options can be served on this machine,
    /// without mapping anything (e.g. `memplane check --socket-mem 1024`).
    Check(check::Args),
    /// Start an instance with EAL-style memory options, show its memseg lists
    /// and mapped pages, tear it down and check every hugepage went back
    /// (e.g. `memplane memory --socket-mem 64 --alloc 2M=4`).
    Memory(memory::Args),
    /// Attach to a running instance (by --file-prefix) as a secondary and
    /// show its memory: memory types, memsegs, heaps, memzones, rings
    /// (DPDK's dpdk-proc-info), as tables or --json.
    Info(info::Args),
    /// The whole stack at work: a primary and a secondary process move
    /// packets through shared hugepage memory (an mbuf pool and two rings),
    /// check every byte, and report throughput and where the memory came
    /// from (e.g. `memplane demo --duration 5`).
    Demo(demo::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let discovery = Discovery::new(SystemRoots {
        sys: cli.sys_root.clone(),
        proc: cli.proc_root.clone(),
    });
    let result = match cli.command {
        Command::Hugepages(args) => hugepages::run(&discovery, args),
        Command::Check(args) => check::run(&discovery, &args),
        Command::Memory(args) => memory::run(&discovery, args),
        Command::Info(args) => info::run(&discovery, &args),
        Command::Demo(args) => demo::run(&discovery, args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
