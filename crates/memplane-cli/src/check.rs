//! `memplane check`: preflight of EAL-style memory options.

use std::process::ExitCode;

use memplane::hugepages::Discovery;
use memplane::units::format_size;
use memplane::{Error, MemOptions};

/// Arguments of `memplane check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the plan or the failure as JSON.
    #[arg(long)]
    json: bool,
    /// EAL-style memory options, e.g. `--socket-mem 1024,0 --huge-dir /dev/hugepages`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "EAL_OPTIONS"
    )]
    options: Vec<String>,
}

pub fn run(discovery: &Discovery, args: &Args) -> Result<ExitCode, Error> {
    // Everything after the first EAL option reaches us unparsed: pick our
    // own `--json` out of it (up to a `--`), wherever the user put it.
    let end = args
        .options
        .iter()
        .position(|a| a == "--")
        .unwrap_or(args.options.len());
    let json = args.json || args.options[..end].iter().any(|a| a == "--json");
    let eal: Vec<&String> = args
        .options
        .iter()
        .enumerate()
        .filter(|&(i, a)| !(i < end && a == "--json") && i != end)
        .map(|(_, a)| a)
        .collect();
    let opts = MemOptions::parse_args(&eal)?;
    match memplane::preflight::check_options(&opts, discovery) {
        Ok(plan) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).expect("plan serializes")
                );
            } else {
                if plan.entries.is_empty() {
                    println!("ok: nothing to preallocate; memory will grow on demand");
                } else {
                    println!("ok: {} can be preallocated:", format_size(plan.bytes()));
                }
                for e in &plan.entries {
                    println!("  node {}: {} x {} pages", e.node, e.pages, e.page_size);
                }
                if !plan.usable_sizes.is_empty() {
                    let s: Vec<String> =
                        plan.usable_sizes.iter().map(ToString::to_string).collect();
                    println!("  usable page sizes: {}", s.join(", "));
                }
                for w in &plan.warnings {
                    println!("warning: {w}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(Error::Preflight(p)) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&p).expect("error serializes")
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e),
    }
}
