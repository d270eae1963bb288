//! The `obim` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand, ValueEnum};
use obim::commands::{self, Format, Io};
use std::io::IsTerminal;
use std::path::PathBuf;

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

#[derive(Subcommand)]
enum Command {
    /// Check recipes and report every problem.
    Check {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// `json` prints diagnostics on stdout for editors and CI.
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
    },
    /// Print the execution plan of a recipe.
    Plan {
        recipe: PathBuf,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Rewrite recipes in the canonical layout (comments kept).
    Fmt {
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// Change nothing; exit 1 if a file is not formatted.
        #[arg(long)]
        check: bool,
    },
    /// Explain a diagnostic code, with an example.
    Explain { code: String },
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
    };
    let code = match cli.command {
        Command::Check { recipes, format } => commands::check(
            &mut io,
            &recipes,
            if matches!(format, CheckFormat::Json) {
                Format::Json
            } else {
                Format::Text
            },
        ),
        Command::Plan { recipe, format } => {
            let format = match format {
                PlanFormat::Text => Format::Text,
                PlanFormat::Json => Format::Json,
                PlanFormat::Dot => Format::Dot,
            };
            commands::plan(&mut io, &recipe, format)
        }
        Command::Fmt { recipes, check } => commands::format(&mut io, &recipes, check),
        Command::Explain { code } => commands::explain(&mut io, &code),
    };
    std::process::exit(code);
}
