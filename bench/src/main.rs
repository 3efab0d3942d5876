//! `mlschat-bench`: benchmarks of mlschat against real peers on loopback, each figure running its
//! peer in the same run, interleaved (A B A B), and reporting the ratio.
//!
//! ```text
//! cargo run --release -p mlschat-bench -- <figure|all> [--quick] [--rounds N] [--out FILE]
//!                                           [--subscribers 10,100]   (figures 2 and 6)
//! ```
//!
//! Figures: 1 end-to-end latency, 2 DS fan-out, 3 commit processing, 4 add one member,
//! 5 durable appends, 6 DS memory, 7 client cost per message, 8 TUI cold start.
//! The run exits non-zero if any delivery was lost (or a figure could not run at all);
//! ratios never fail it, because timing on a shared machine is noise.

mod brokers;
mod ds;
mod durable;
mod fanout;
mod latency;
mod mls;
mod report;
mod track;
mod tui;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context as _, Result};

use report::{Machine, Row, markdown_table};

/// How a run is sized.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    /// Interleaved rounds per figure (A B A B ...).
    pub rounds: usize,
}

/// Failures collected over the run: any of them makes the exit status non-zero.
#[derive(Default)]
pub struct Failures {
    lost: Mutex<Vec<String>>,
    errors: Mutex<Vec<String>>,
}

impl Failures {
    pub fn lost(&self, what: String) {
        eprintln!("LOST DELIVERY: {what}");
        if let Ok(mut lost) = self.lost.lock() {
            lost.push(what);
        }
    }

    pub fn error(&self, what: String) {
        eprintln!("ERROR: {what}");
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(what);
        }
    }

    fn take(&self) -> (Vec<String>, Vec<String>) {
        let lost = self.lost.lock().map(|l| l.clone()).unwrap_or_default();
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        (lost, errors)
    }
}

/// Benchmarks of mlschat against real peers, interleaved in one run (docs/benchmarks.md).
#[derive(Debug, clap::Parser)]
#[command(name = "mlschat-bench")]
struct Args {
    /// Figures to run: `all`, or numbers from 1 to 8 separated by commas (`2,6`).
    #[arg(required = true, value_parser = parse_figures)]
    figures: Vec<Vec<u8>>,
    /// One round of every figure with fewer messages: the CI smoke run, under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Interleaved rounds per figure [default: 3, or 1 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Subscriber counts for figures 2 and 6, separated by commas [default: 10,100,1000, or
    /// 10,100 with --quick].
    #[arg(long, value_delimiter = ',', value_parser = parse_subscribers)]
    subscribers: Vec<usize>,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/mlschat-bench/results.json")]
    out: PathBuf,
}

impl Args {
    /// The figures asked for, in order, each once.
    fn figures(&self) -> Vec<u8> {
        let mut figures: Vec<u8> = self.figures.iter().flatten().copied().collect();
        figures.sort_unstable();
        figures.dedup();
        figures
    }
}

fn parse_figures(list: &str) -> Result<Vec<u8>, String> {
    let mut figures = Vec::new();
    for figure in list.split(',') {
        match figure {
            "all" => figures.extend(1..=8),
            number => match number.parse::<u8>() {
                Ok(number) if (1..=8).contains(&number) => figures.push(number),
                _ => return Err(format!("`{number}` is not a figure: use 1 to 8 or `all`")),
            },
        }
    }
    Ok(figures)
}

fn parse_subscribers(count: &str) -> Result<usize, String> {
    match count.parse::<usize>() {
        Ok(count) if (1..=5000).contains(&count) => Ok(count),
        _ => Err(format!(
            "`{count}` is not a subscriber count from 1 to 5000"
        )),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Child-process roles (the DS under test).
    if args.first().map(String::as_str) == Some("__ds-server") {
        let dir = args.get(1).context("__ds-server DIR")?;
        return ds::serve_child(std::path::Path::new(dir));
    }
    let args = <Args as clap::Parser>::parse();
    let figures = &args.figures();
    let settings = Settings {
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let failures = Failures::default();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut timings = Vec::new();
    runtime.block_on(async {
        // Copy this binary for the DS children before figure 8 may rebuild it.
        if let Err(error) = ds::prepare_ds_child_binary() {
            failures.error(format!("cannot prepare the DS child binary: {error}"));
        }
        for &figure in figures {
            // Figure 6 is measured in figure 2's runs when both are asked for.
            if figure == 6 && figures.contains(&2) {
                continue;
            }
            let figure_started = Instant::now();
            eprintln!("== figure {figure}");
            let new_rows = match figure {
                1 => latency::figure(&settings, &failures).await,
                2 | 6 => {
                    let sizes: &[usize] = match (args.subscribers.is_empty(), settings.quick) {
                        (false, _) => &args.subscribers,
                        (true, true) => &[10, 100],
                        (true, false) => &[10, 100, 1000],
                    };
                    fanout::figures(
                        &settings,
                        sizes,
                        figure == 2,
                        figure == 6 || figures.contains(&6),
                        &failures,
                    )
                    .await
                }
                3 => mls::figure3(&settings, &failures).await,
                4 => mls::figure4(&settings, &failures).await,
                5 => durable::figure(&settings, &failures).await,
                7 => mls::figure7(&settings, &failures).await,
                8 => tui::figure(&settings, &failures).await,
                _ => Vec::new(),
            };
            timings.push((figure, figure_started.elapsed().as_secs_f64()));
            eprint!("{}", markdown_table(&new_rows));
            rows.extend(new_rows);
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    rows.sort_by_key(|row| row.figure);
    let machine = Machine::probe();
    let (lost, errors) = failures.take();
    println!(
        "\nmlschat-bench {} ({} round(s), {:.0} s) on {} x {}, {} MiB, kernel {}",
        if settings.quick {
            "--quick"
        } else {
            "full run"
        },
        settings.rounds,
        started.elapsed().as_secs_f64(),
        machine.cpus,
        machine.cpu_model,
        machine.memory_kib / 1024,
        machine.kernel
    );
    println!("ratio = mlschat / peer, measured in the same run, interleaved\n");
    print!("{}", markdown_table(&rows));
    let report = serde_json::json!({
        "quick": settings.quick,
        "rounds": settings.rounds,
        "seconds": started.elapsed().as_secs_f64(),
        "figure_seconds": timings,
        "machine": machine,
        "rows": rows,
        "lost_deliveries": lost,
        "errors": errors,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("\nJSON: {}", args.out.display());
    ds::remove_ds_child_binary();
    if !lost.is_empty() || !errors.is_empty() {
        eprintln!(
            "FAILED: {} lost-delivery failure(s), {} error(s)",
            lost.len(),
            errors.len()
        );
        for what in lost.iter().chain(&errors) {
            eprintln!("  {what}");
        }
        std::process::exit(1);
    }
    println!("no delivery lost");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let parse = |args: &[&str]| {
            <Args as clap::Parser>::try_parse_from(
                std::iter::once("mlschat-bench").chain(args.iter().copied()),
            )
        };
        let args = parse(&["all", "--quick"]).expect("parses");
        assert_eq!(args.figures(), (1..=8).collect::<Vec<_>>());
        assert!(args.quick);
        let args = parse(&["6,2", "2"]).expect("parses");
        assert_eq!(args.figures(), vec![2, 6]);
        assert!(args.subscribers.is_empty());
        let args = parse(&["2", "--subscribers", "1000,10"]).expect("parses");
        assert_eq!(args.subscribers, vec![1000, 10]);
        assert!(parse(&["2", "--subscribers", "0"]).is_err());
        assert!(parse(&["9"]).is_err());
        assert!(parse(&["2,x"]).is_err());
        assert!(parse(&[]).is_err());
    }
}
