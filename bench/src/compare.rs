//! Side-by-side runner: DPDK's `ring_perf_autotest` and memplane's mirror,
//! alternated `runs` times, medians and ratios per row.

use std::collections::BTreeMap;
use std::process::Command;

/// One parsed result line: (section, test) -> cycles.
type Results = Vec<(String, f64)>;

/// Parses DPDK 22.11 ring_perf_autotest output (and the mirror's, which
/// prints the same format). Keys are `"<section> | <line without value>"`.
pub fn parse(out: &str) -> Results {
    let mut section = String::new();
    let mut res = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if let Some(h) = l.strip_prefix("### Testing ") {
            section = h.trim_end_matches(" ###").to_string();
            continue;
        }
        if !(l.starts_with("legacy APIs:") || l.starts_with("elem APIs:")) {
            continue;
        }
        if let Some((k, v)) = l.rsplit_once(": ") {
            if let Ok(v) = v.parse::<f64>() {
                res.push((format!("{section} | {k}"), v));
            }
        }
    }
    res
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        v[n / 2 - 1] * 0.5 + v[n / 2] * 0.5
    }
}

fn run_dpdk() -> Result<String, String> {
    // --no-huge keeps DPDK off the hugepage pool other engineers use; the
    // ring is a few pages in L1/L2 either way. A per-run file prefix avoids
    // clashing with any other DPDK process on the machine.
    let prefix = format!("mpring{}", std::process::id());
    let mut child = Command::new("dpdk-test")
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "-l",
            "0-1",
            "--file-prefix",
            &prefix,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run dpdk-test: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(b"ring_perf_autotest\nquit\n")
            .map_err(|e| format!("writing to dpdk-test: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string());
    // DPDK 22.11 leaves its runtime directory (/var/run/dpdk/<prefix>).
    crate::compare_mem::remove_dpdk_runtime_dir(&prefix);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains("Test OK") {
        return Err(format!(
            "dpdk-test ring_perf_autotest did not report Test OK:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

fn run_memplane(sizes: &[u32]) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sizes: Vec<String> = sizes.iter().map(u32::to_string).collect();
    let out = Command::new(exe)
        .args(["ring-perf", "--sizes", &sizes.join(",")])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "memplane ring-perf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the comparison; returns the process exit code.
pub fn ring(runs: usize, sizes: &[u32]) -> i32 {
    let mut dpdk: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ours: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for run in 1..=runs {
        eprintln!("run {run}/{runs}: dpdk-test ring_perf_autotest ...");
        let d = match run_dpdk() {
            Ok(t) => parse(&t),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
        eprintln!("run {run}/{runs}: memplane ring-perf ...");
        let m = match run_memplane(sizes) {
            Ok(t) => parse(&t),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
        for (k, v) in d {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            dpdk.entry(k).or_default().push(v);
        }
        for (k, v) in m {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            ours.entry(k).or_default().push(v);
        }
    }
    println!(
        "\nring_perf_autotest (DPDK 22.11, dpdk-test) vs memplane mirror: medians of {runs} alternating runs"
    );
    println!("units as DPDK 22.11 prints them: single/burst/bulk/empty rows = cycles per enqueue+dequeue call pair");
    println!(
        "(divide by n for cycles per element); two-core rows = enqueue+dequeue cycles per element."
    );
    println!("ratio = memplane / DPDK (< 1.00 means memplane is faster)\n");
    println!(
        "{:<84} {:>10} {:>10} {:>7}",
        "test", "DPDK", "memplane", "ratio"
    );
    let mut worst: f64 = 0.0;
    for k in &order {
        let d = dpdk.get_mut(k).map(|v| median(v));
        let m = ours.get_mut(k).map(|v| median(v));
        let fmt = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        let ratio = match (d, m) {
            (Some(d), Some(m)) if d > 0.0 => {
                worst = worst.max(m / d);
                format!("{:.2}", m / d)
            }
            _ => "-".into(),
        };
        println!("{k:<84} {:>10} {:>10} {ratio:>7}", fmt(d), fmt(m));
    }
    println!("\nworst ratio: {worst:.2}");
    0
}
