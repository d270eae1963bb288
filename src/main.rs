//! The `obim` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand, ValueEnum};
use obim::commands::{self, Format, Io};
use obim::device::{Device, DeviceRequest};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

const EXIT_CODES: &str = "Exit codes:
  0  success (warnings allowed)
  1  the recipe has errors (or `fmt --check` found unformatted files)
  2  usage error (bad arguments, unknown code, unreadable recipe path)
  3  failure while running (I/O, a bad checkpoint)";

/// Compile and run `.obim` model-merge recipes.
#[derive(Parser)]
#[command(name = "obim", version, after_help = EXIT_CODES)]
struct Cli {
    /// When to color diagnostics.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
    Dot,
}

impl From<CheckFormat> for Format {
    fn from(f: CheckFormat) -> Format {
        match f {
            CheckFormat::Text => Format::Text,
            CheckFormat::Json => Format::Json,
        }
    }
}

impl From<PlanFormat> for Format {
    fn from(f: PlanFormat) -> Format {
        match f {
            PlanFormat::Text => Format::Text,
            PlanFormat::Json => Format::Json,
            PlanFormat::Dot => Format::Dot,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check recipes and report every problem.
    Check {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// `json` prints diagnostics on stdout for editors and CI.
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Print the execution plan of a recipe.
    Plan {
        recipe: PathBuf,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        #[command(flatten)]
        limits: LimitArgs,
        /// The cache `run` uses (default: as `run`): shows the `auto` candidate its scores choose.
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Rewrite recipes in the canonical layout (comments kept).
    Fmt {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// Change nothing; exit 1 if a file is not formatted.
        #[arg(long)]
        check: bool,
    },
    /// Run a recipe: merge and write every output.
    Run(RunArgs),
    /// Greedy exact-match accuracy of models on jsonl files (`prompt`, `answer`), or `--loss`.
    Eval {
        /// Model directories, Hugging Face ids in the local cache, or a recipe's
        /// merge as `RECIPE.obim:MERGE` (`RECIPE.obim`: its first output's merge).
        #[arg(required = true)]
        models: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Where a recipe's merges are computed (default: as `run`).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// jsonl files with `prompt` and `answer` fields (repeatable).
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// Use only the first N examples of each file.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
        /// Mean next-token loss (nats) and perplexity of each file's texts instead of exact match.
        #[arg(long)]
        loss: bool,
        /// With --loss: score the whole text of this jsonl field. Without it,
        /// files whose lines have `prompt` and `answer` are scored on the
        /// answer given the prompt, others on the field `text`.
        #[arg(long)]
        field: Option<String>,
        /// Where forward passes run: `auto`, `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Calibration statistics of one model (Σ x² of every linear layer's input).
    Stats {
        /// A model directory (or a Hugging Face id in the local cache).
        model: String,
        /// A `.jsonl` file, or a glob of text files.
        #[arg(long)]
        data: PathBuf,
        /// The jsonl field holding the text.
        #[arg(long, default_value = "text")]
        field: String,
        /// Draw this many texts (default: all).
        #[arg(long)]
        samples: Option<u64>,
        /// Truncate sequences to this many tokens.
        #[arg(long, default_value_t = 512)]
        seq_len: u64,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the statistics (safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// Where forward passes run: `auto`, `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Explain a diagnostic code, with an example, or a merge method's maths.
    Explain { code: String },
    /// Translate a mergekit config (mergekit-yaml or mergekit-multi) into a recipe.
    Import {
        config: PathBuf,
        /// Write the recipe here (default: print it). Local model paths are
        /// made relative to it.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite an existing recipe.
        #[arg(long)]
        force: bool,
    },
}

/// What the checker may be told, on the commands that check recipes.
#[derive(clap::Args, Clone, Copy)]
struct LimitArgs {
    /// The most `auto` candidates one merge may have.
    #[arg(long, default_value_t = obim::recipe::MAX_CANDIDATES)]
    max_candidates: usize,
}

impl From<LimitArgs> for obim::Limits {
    fn from(a: LimitArgs) -> obim::Limits {
        obim::Limits {
            max_candidates: a.max_candidates,
        }
    }
}

/// `obim run`'s arguments.
#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    limits: LimitArgs,
    recipe: PathBuf,
    /// Where to write an output instead of the recipe's path: `-o DIR` for a
    /// recipe with one output, `-o NAME=DIR` for the output of merge NAME
    /// (repeatable; DIR is relative to the working directory).
    #[arg(short = 'o', long = "output", value_name = "[NAME=]DIR")]
    outputs: Vec<String>,
    /// Where forward passes run (calibration, selection; merging runs on the CPU): `auto`, `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Cache directory (default: $XDG_CACHE_HOME/obim or ~/.cache/obim).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Replace existing outputs.
    #[arg(long)]
    force: bool,
    /// Print what would run and what is already up to date; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Merge inputs that hold NaN or infinite values instead of stopping (E0112).
    #[arg(long)]
    allow_non_finite: bool,
    /// Write only the K-th of N parts of every output's shards (1-based), into
    /// `OUTPUT.obim-parts/` beside it; the parts can run at once, on machines
    /// that share the filesystem. Then `--assemble`.
    #[arg(long, value_name = "K/N", value_parser = parse_part, conflicts_with_all = ["assemble", "dry_run"])]
    part: Option<(usize, usize)>,
    /// Put the shards of every part in place and write the rest of each
    /// output (index, config, tokenizer, report, card).
    #[arg(long, conflicts_with = "dry_run")]
    assemble: bool,
}

/// `K/N` with 1 ≤ K ≤ N.
fn parse_part(text: &str) -> Result<(usize, usize), String> {
    let (k, n) = text
        .split_once('/')
        .ok_or_else(|| format!("`{text}` is not K/N"))?;
    let (k, n): (usize, usize) = (
        k.trim()
            .parse()
            .map_err(|_| format!("`{k}` is not a whole number"))?,
        n.trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a whole number"))?,
    );
    if k == 0 || k > n {
        return Err(format!("part {k} of {n}: K must be 1 to N"));
    }
    if n > 1_000_000 {
        return Err(format!("{n} parts: at most 1,000,000"));
    }
    Ok((k, n))
}

fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads
        && rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .is_err()
    {
        eprintln!("warning: could not set --threads {n}");
    }
}

/// Draws the executor's events: a progress bar on a terminal, one line per
/// output otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    /// Without a terminal: the output being written (tensors written of all,
    /// bytes written of all) and when a progress line was last printed.
    writing: (usize, usize, u64, u64),
    heartbeat: std::time::Instant,
}

/// Without a terminal, a progress line at most this often while writing.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

impl Progress {
    fn new() -> Progress {
        Progress {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            writing: (0, 0, 0, 0),
            heartbeat: std::time::Instant::now(),
        }
    }
}

impl Progress {
    /// Without a terminal: counts a written tensor, and says how far the
    /// output is when the last line is [`HEARTBEAT`] old.
    fn heartbeat(&mut self, bytes: u64, now: std::time::Instant) -> Option<String> {
        let (done, tensors, written, total) = &mut self.writing;
        *done += 1;
        *written += bytes;
        if now.duration_since(self.heartbeat) < HEARTBEAT {
            return None;
        }
        self.heartbeat = now;
        Some(format!(
            "… {done}/{tensors} tensors, {:.1} of {:.1} MB",
            *written as f64 / 1e6,
            *total as f64 / 1e6
        ))
    }
}

/// A bar counting `total` bytes, with throughput and time left.
fn bytes_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

impl Progress {
    fn event(&mut self, event: obim::exec::Event) {
        self.draw(&event);
        if let Some(line) = line(&event) {
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
    }

    /// Byte-counting bars for downloads and outputs, on a terminal.
    fn draw(&mut self, event: &obim::exec::Event) {
        use obim::exec::Event;
        match event {
            Event::DownloadStarted { file, bytes } if self.terminal => {
                let bar = bytes_bar(*bytes);
                bar.set_message(file.clone());
                self.bar = Some(bar);
            }
            Event::OutputStarted { bytes, .. } if self.terminal => {
                self.bar = Some(bytes_bar(*bytes));
            }
            Event::OutputStarted { tensors, bytes, .. } => {
                self.writing = (0, *tensors, 0, *bytes);
                self.heartbeat = std::time::Instant::now();
            }
            Event::TensorWritten { bytes, .. } if !self.terminal => {
                if let Some(line) = self.heartbeat(*bytes, std::time::Instant::now()) {
                    eprintln!("{line}");
                }
            }
            Event::Downloaded { bytes } => {
                if let Some(bar) = &self.bar {
                    bar.inc(*bytes);
                }
            }
            Event::TensorWritten { name, bytes } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(name.clone());
                    bar.inc(*bytes);
                }
            }
            Event::DownloadFinished | Event::OutputWritten { .. } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

/// The line an event prints, if any (per-tensor events only move a bar).
fn line(event: &obim::exec::Event) -> Option<String> {
    use obim::exec::Event;
    Some(match event {
        Event::OutputStarted {
            path,
            tensors,
            shards,
            ..
        } => format!(
            "writing {} ({tensors} tensors, {shards} shard{})",
            path.display(),
            if *shards == 1 { "" } else { "s" }
        ),
        Event::OutputWritten {
            path,
            seconds,
            bytes,
        } => format!(
            "wrote {} ({:.1} MB in {seconds:.2} s)",
            path.display(),
            *bytes as f64 / 1e6
        ),
        Event::Warning { message } => format!("warning: {message}"),
        Event::UpToDate { path } => format!(
            "{} is up to date (written by this plan); nothing to do (--force rewrites it)",
            path.display()
        ),
        Event::CalibrationStarted {
            input,
            data,
            sequences,
            tokens,
        } => {
            format!("calibrating {input} on {data} ({sequences} sequences, {tokens} tokens)…")
        }
        Event::Calibrated {
            input,
            data,
            tokens,
            cached: true,
            ..
        } => format!("statistics of {input} on {data}: from the cache ({tokens} tokens)"),
        Event::Calibrated {
            input,
            data,
            tokens,
            seconds,
            ..
        } => format!(
            "calibrated {input} on {data}: {tokens} tokens in {seconds:.2} s ({:.0} tokens/s)",
            *tokens as f64 / seconds.max(1e-9)
        ),
        Event::CandidateScored {
            merge,
            candidate,
            losses,
            mean,
            accuracy,
            cached,
        } => {
            let per: Vec<String> = losses.iter().map(|(d, l)| format!("{d} {l:.4}")).collect();
            let accuracy = accuracy.map_or(String::new(), |a| format!("accuracy {a:.3}, "));
            format!(
                "{merge}: {candidate:<32} {accuracy}loss {mean:.4} ({}){}",
                per.join(", "),
                if *cached { " [cached]" } else { "" }
            )
        }
        Event::Selected {
            merge,
            candidate,
            mean,
            accuracy,
            seconds,
        } => {
            let accuracy = accuracy.map_or(String::new(), |a| format!("accuracy {a:.3}, "));
            format!("{merge}: chose {candidate} ({accuracy}loss {mean:.4}; {seconds:.2} s)")
        }
        _ => return None,
    })
}

fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("obim")
}

/// Opens the device the user asked for, or exits with a usage error.
fn open_device(request: DeviceRequest) -> Device {
    Device::open(request).unwrap_or_else(|e| {
        eprintln!("error: {}", obim::errors::with_causes(&e));
        std::process::exit(commands::exit::USAGE);
    })
}

/// `obim run`: opens the device, installs the Ctrl-C handler, draws progress.
fn run(io: &mut Io, args: RunArgs) -> i32 {
    let device = open_device(args.device);
    set_threads(args.threads);
    static CANCEL: AtomicBool = AtomicBool::new(false);
    // Ctrl-C, SIGTERM and SIGHUP (ctrlc's `termination` feature) all stop
    // the run between tensors, so its staging directory is removed.
    let _ = ctrlc::set_handler(|| CANCEL.store(true, Ordering::Relaxed));
    let options = obim::exec::RunOptions {
        force: args.force,
        cancel: &CANCEL,
        cache: args.cache.unwrap_or_else(cache_dir),
        device: &device,
        allow_non_finite: args.allow_non_finite,
        part: match (args.part, args.assemble) {
            (Some((k, n)), _) => Some(obim::exec::Part::Shards { k, n }),
            (None, true) => Some(obim::exec::Part::Assemble),
            (None, false) => None,
        },
    };
    let mut progress = Progress::new();
    commands::run(
        io,
        &args.recipe,
        &options,
        args.dry_run,
        &args.outputs,
        &mut |e| progress.event(e),
    )
}

fn main() {
    let cli = Cli::parse();
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        color,
        limits: match &cli.command {
            Command::Check { limits, .. }
            | Command::Plan { limits, .. }
            | Command::Eval { limits, .. }
            | Command::Run(RunArgs { limits, .. }) => (*limits).into(),
            _ => obim::Limits::default(),
        },
    };
    let code = match cli.command {
        Command::Check {
            recipes, format, ..
        } => commands::check(&mut io, &recipes, format.into()),
        Command::Plan {
            recipe,
            format,
            cache,
            ..
        } => {
            let cache = cache.unwrap_or_else(cache_dir);
            commands::plan(&mut io, &recipe, format.into(), Some(&cache))
        }
        Command::Fmt { recipes, check } => commands::format(&mut io, &recipes, check),
        Command::Explain { code } => commands::explain(&mut io, &code),
        Command::Import {
            config,
            output,
            force,
        } => commands::import(&mut io, &config, output.as_deref(), force),
        Command::Eval {
            limits: _,
            models,
            data,
            limit,
            format,
            loss,
            field,
            threads,
            device,
            cache,
        } => {
            set_threads(threads);
            let options = commands::EvalOptions {
                limit,
                json: matches!(format, CheckFormat::Json),
                loss: loss.then_some(match field {
                    Some(f) => commands::LossOf::Field(f),
                    None => commands::LossOf::Auto,
                }),
                cache: cache.unwrap_or_else(cache_dir),
                device: open_device(device),
            };
            let bar = std::sync::Mutex::new(None::<indicatif::ProgressBar>);
            let terminal = std::io::stderr().is_terminal();
            let progress = |p: commands::EvalProgress| {
                let Ok(mut bar) = bar.lock() else { return };
                match p {
                    commands::EvalProgress::Started { model, file, items } if terminal => {
                        let b = indicatif::ProgressBar::new(items as u64);
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{msg:40!} [{bar:30}] {pos}/{len} {eta}",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                        b.set_message(format!("{model} on {file}"));
                        *bar = Some(b);
                    }
                    commands::EvalProgress::Started { model, file, items } => {
                        eprintln!("evaluating {model} on {file} ({items} items)…");
                    }
                    commands::EvalProgress::Done(n) => {
                        if let Some(b) = bar.as_ref() {
                            b.inc(n as u64);
                            if b.position() >= b.length().unwrap_or(0) {
                                b.finish_and_clear();
                            }
                        }
                    }
                }
            };
            commands::eval(&mut io, &models, &data, &options, &progress)
        }
        Command::Stats {
            model,
            data,
            field,
            samples,
            seq_len,
            seed,
            output,
            threads,
            device,
        } => {
            set_threads(threads);
            let device = open_device(device);
            let data = commands::StatsData {
                path: data,
                field,
                samples,
                seq_len,
                seed,
            };
            commands::stats(&mut io, &model, &data, &output, &device)
        }
        Command::Run(args) => run(&mut io, args),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_a_heartbeat_every_ten_seconds() {
        let start = std::time::Instant::now();
        let mut p = Progress {
            bar: None,
            terminal: false,
            writing: (0, 3, 0, 3_000_000),
            heartbeat: start,
        };
        assert_eq!(p.heartbeat(1_000_000, start), None);
        let later = start + HEARTBEAT;
        assert_eq!(
            p.heartbeat(1_000_000, later).as_deref(),
            Some("… 2/3 tensors, 2.0 of 3.0 MB")
        );
        assert_eq!(p.heartbeat(1_000_000, later), None, "one line per period");
    }
}
