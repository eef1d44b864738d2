//! Command-line interface.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// Largest PID Linux can hand out (PID_MAX_LIMIT on 64-bit).
pub const PID_MAX_LIMIT: u32 = 4_194_304;
const MAX_INTERVAL_SECS: u64 = 86_400;
const MAX_DURATION_SECS: u64 = 30 * 86_400;
/// Where `--serve` listens when given no address: loopback only. The
/// exporter port range 9100-9999 is fully allocated to other exporters.
pub const DEFAULT_SERVE: &str = "127.0.0.1:19808";

const EXAMPLES: &str = "\
EXAMPLES:
    cow-trace -p 1234                  # trace PID 1234 and the children it forks; Ctrl-C for the summary
    cow-trace -p 1234 -i 1             # print per-second figures, then the summary
    cow-trace -T -p 1234 1 5           # bcc style: five 1-second intervals, timestamped, then the summary
    cow-trace -p 1234 -p 5678 -d 60    # two processes, stop after 60 seconds
    cow-trace -p 1234 --no-follow      # the process only, not its children
    cow-trace --json -p 1234           # newline-delimited JSON for scripts
    cow-trace -d 10                    # every process on the system for 10 seconds
    cow-trace -- python3 job.py        # run a command and trace it and its descendants
    cow-trace -u app -- ./job.sh       # the same, the command run as user app (ids and groups)
    cow-trace --serve                  # Prometheus exporter on 127.0.0.1:19808/metrics until SIGTERM
    cow-trace --cgroup system.slice/redis-server.service   # one service (and its sub-cgroups) only
    cow-trace -p 1234 --flamegraph cow.svg   # a flame graph of the stacks that copied (implies --stacks)

A fork is counted in the process that called fork/clone; copy-on-write faults in
the process that took them (the child's copies are the child's). Fork latency is
how long the parent was held by the fork; see README.md for what each backend
measures.";

#[derive(Debug, Parser)]
#[command(
    name = "cow-trace",
    version,
    about = "Show what fork() and copy-on-write cost, per process, on a live system",
    after_help = EXAMPLES,
    // `cow-trace -p 1 -- cmd` is refused below with a clear message.
    args_override_self = false
)]
pub struct Args {
    /// Trace this process (repeatable). Its children are followed unless --no-follow.
    #[arg(short = 'p', long = "pid", value_name = "PID", value_parser = parse_pid, allow_negative_numbers = true)]
    pub pids: Vec<u32>,

    /// Do not trace the children that traced processes fork.
    #[arg(long)]
    pub no_follow: bool,

    /// Print the figures of each interval of SECS seconds, then the summary.
    #[arg(short = 'i', long, value_name = "SECS", value_parser = parse_interval, allow_negative_numbers = true)]
    pub interval: Option<Duration>,

    /// Stop after SECS seconds.
    #[arg(short = 'd', long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    pub duration: Option<Duration>,

    /// Newline-delimited JSON on stdout instead of tables.
    #[arg(long)]
    pub json: bool,

    /// Probe backend. `auto` tries fentry, then kprobe, then tracepoint, and
    /// says why it passed over each; a named backend the kernel cannot give
    /// is an error.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Unit of the latency histograms.
    #[arg(long, value_enum, default_value_t = Unit::Us)]
    pub unit: Unit,

    /// Rows of the per-process table, writers and data shown per episode,
    /// and stacks in the summary (0: all). JSON has every table row.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub top: usize,

    /// Size of the kernel-to-user event ring buffer, a power of two
    /// (suffixes K, M). Events that do not fit are counted as dropped.
    #[arg(long, value_name = "BYTES", default_value = "8M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// In a burst of write faults, time one in N for the CoW latency
    /// histograms, each standing for N (every backend; a power of two,
    /// 1 = time every fault). A task's first 64 faults after it is
    /// scheduled in are always timed, so only bursts are sampled: each
    /// timing costs two clock reads, about as much as the rest of the
    /// fault's tracing. Counts of copies and reuses are always exact.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = parse_sample_every, allow_negative_numbers = true)]
    pub sample_every: u32,

    /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics (and
    /// /health) until SIGTERM or SIGINT; ADDR defaults to 127.0.0.1:19808.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_SERVE)]
    pub serve: Option<SocketAddr>,

    /// Most (comm, cgroup) label sets exported; processes beyond go to one
    /// `other` series (counted in cow_trace_series_folded_total).
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub series_cap: u32,

    /// Trace only the processes of this cgroup v2 and its descendants
    /// (repeatable; a path under the cgroup2 mount, or relative to it).
    /// Filtered in the kernel.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,

    /// Whole-system runs: show an episode (live and in the summary) only if
    /// it copied at least this much (suffixes K, M, G; 0 shows all)...
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub min_episode_copied: u64,

    /// ...or its fork held the parent at least this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub min_episode_fork_ms: u64,

    /// Benchmark aid: attach the same hooks with programs that return at
    /// once (the overhead floor). Reports nothing.
    #[arg(long, hide = true)]
    pub bench_empty_programs: bool,

    /// Report only processes named COMM (and episodes whose parent or
    /// child is): a filter on the report; everything traced is still
    /// counted in the kernel totals.
    #[arg(short = 'c', long = "comm", value_name = "COMM")]
    pub comm: Option<String>,

    /// Write the report (tables or JSON) to FILE instead of stdout: a
    /// launched command's own output then stays apart from it.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,

    /// Count the user stack (frame pointers) of every copy, in the kernel,
    /// and list the stacks that copied most in the summary (JSON: `stacks`).
    /// Off by default: each copy then costs a stack walk.
    #[arg(long)]
    pub stacks: bool,

    /// Write the copies' stacks to FILE as folded stacks (`comm;outer;...;inner
    /// copies`, the flame-graph tools' input). Implies --stacks.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// Write a copy-on-write flame graph (SVG) of the copies' stacks to FILE.
    /// Implies --stacks.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,

    /// Print a wall-clock time (HH:MM:SS) on each interval's header (JSON:
    /// `time`), as bcc's tools do.
    #[arg(short = 'T', long = "timestamp")]
    pub timestamp: bool,

    /// The bcc tools' positional form: an interval, like -i.
    #[arg(value_name = "INTERVAL", value_parser = parse_interval)]
    pub interval_pos: Option<Duration>,

    /// ... and how many intervals to print before ending (like -d
    /// INTERVAL x COUNT).
    #[arg(value_name = "COUNT", value_parser = parse_count)]
    pub count: Option<u32>,

    /// Command to run and trace, with its arguments (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,

    /// Run the command after `--` as USER: that user's uid, gid and
    /// supplementary groups (like `strace -u`), its environment left as
    /// is. cow-trace itself keeps its privileges.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// Whether `--` was given: clap cannot tell `cow-trace --` (a command
    /// forgotten) from plain `cow-trace` (the whole system).
    #[arg(skip)]
    pub dashdash: bool,
}

/// Why the command line was not accepted.
#[derive(Debug)]
pub enum ArgsError {
    /// `--help` or `--version`: print it and exit 0 (clap does both).
    Info(clap::Error),
    /// A usage error, as one line (no `error: ` prefix).
    Usage(String),
}

impl Args {
    /// Whether copies' stacks are counted: `--stacks`, or a file to
    /// write them to.
    pub fn stacks_on(&self) -> bool {
        self.stacks || self.folded.is_some() || self.flamegraph.is_some()
    }

    /// Parses `argv` (program name first). Usage errors come back as one
    /// line naming the problem, like every other error of the tool; clap's
    /// own rendering spans several (a blank line, a usage block, a tip).
    pub fn try_parse_args<I, T>(argv: I) -> Result<Self, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        use clap::error::ErrorKind;
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let mut args = Args::try_parse_from(&argv).map_err(|e| match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => ArgsError::Info(e),
            _ => ArgsError::Usage(one_line(&e)),
        })?;
        args.dashdash = argv.iter().skip(1).any(|a| a == "--");
        if args.user.is_some() && args.command.is_empty() {
            return Err(ArgsError::Usage(
                "-u/--user runs a launched command as USER: name the command after `--`, \
                 e.g. cow-trace -u nobody -- ./job.sh (see cow-trace --help)"
                    .into(),
            ));
        }
        args.positional_interval().map_err(ArgsError::Usage)?;
        Ok(args)
    }
}

fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{first} (see cow-trace --help)")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// fentry, else kprobe, else tracepoint.
    Auto,
    /// fentry/fexit on the kernel's fork and fault functions (BPF trampolines).
    Fentry,
    /// kprobes/kretprobes on the same functions (CONFIG_KPROBES).
    Kprobe,
    /// Tracepoints only: works wherever BTF and tracepoints do.
    Tracepoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unit {
    Ns,
    Us,
    Ms,
}

impl Unit {
    pub fn divisor(self) -> u64 {
        match self {
            Unit::Ns => 1,
            Unit::Us => 1_000,
            Unit::Ms => 1_000_000,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Unit::Ns => "nsecs",
            Unit::Us => "usecs",
            Unit::Ms => "msecs",
        }
    }
}

/// What to trace, once the arguments are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    System,
    Pids(Vec<u32>),
    Launch(Vec<OsString>),
}

impl Args {
    /// Folds the positional `[INTERVAL [COUNT]]` into -i and -d.
    fn positional_interval(&mut self) -> Result<(), String> {
        let Some(every) = self.interval_pos else { return Ok(()) };
        if self.interval.is_some() {
            return Err("an interval given twice: use either -i SECS or the positional INTERVAL".into());
        }
        self.interval = Some(every);
        if let Some(n) = self.count {
            if self.duration.is_some() {
                return Err("use either -d SECS or a COUNT of intervals, not both".into());
            }
            self.duration = Some(every * n);
        }
        Ok(())
    }

    /// Checks the combinations clap cannot express.
    pub fn mode(&self) -> Result<Mode, String> {
        if self.dashdash && self.command.is_empty() {
            return Err("nothing follows `--`: name the command to run after it \
                        (e.g. cow-trace -- ./job.sh), or leave `--` out"
                .into());
        }
        match (self.pids.is_empty(), self.command.is_empty()) {
            (false, false) => Err("use either -p PID or -- COMMAND, not both".into()),
            (false, true) => {
                let mut pids = self.pids.clone();
                pids.sort_unstable();
                pids.dedup();
                Ok(Mode::Pids(pids))
            }
            (true, false) => {
                if self.command[0].is_empty() {
                    return Err("the command after `--` is empty".into());
                }
                Ok(Mode::Launch(self.command.clone()))
            }
            (true, true) => {
                if self.no_follow {
                    return Err(
                        "--no-follow needs -p PID or a command; whole-system tracing follows nothing".into(),
                    );
                }
                Ok(Mode::System)
            }
        }
    }
}

fn parse_pid(s: &str) -> Result<u32, String> {
    let n: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a PID: expected a positive integer such as 1234"))?;
    if n <= 0 || n > PID_MAX_LIMIT as i64 {
        return Err(format!("{n} is not a valid PID: PIDs are 1 to {PID_MAX_LIMIT}"));
    }
    Ok(n as u32)
}

fn parse_secs(s: &str, what: &str, max: u64) -> Result<Duration, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds: expected an integer 1 to {max}"))?;
    if n == 0 || n > max {
        return Err(format!("{what} of {n} s is out of range: use 1 to {max} seconds"));
    }
    Ok(Duration::from_secs(n))
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_secs(s, "an interval", MAX_INTERVAL_SECS)
}

fn parse_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{s}' is not a count of intervals: expected an integer from 1")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_secs(s, "a duration", MAX_DURATION_SECS)
}

fn parse_sample_every(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 1024 => Ok(n),
        _ => Err(format!("--sample-every {s} is not a power of two from 1 to 1024 (1 times every fault)")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    size_with_suffix(s, "0, 512K or 1M")
}

/// Bytes, with an optional K, M or G suffix; `examples` for the error.
fn size_with_suffix(s: &str, examples: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1u64 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1u64 << 30),
        _ => (t, 1),
    };
    let n: u64 =
        num.parse().map_err(|_| format!("'{s}' is not a size: expected bytes such as {examples}"))?;
    Ok(n.saturating_mul(mult))
}

pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let bytes = size_with_suffix(s, "65536, 64K or 8M")?;
    // The kernel wants a power-of-two multiple of the page size; keep the
    // upper end sane (the ring buffer is locked kernel memory).
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!("ring buffer size {s} is not a power of two between 4K and 1G (try 8M)"));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("cow-trace").chain(args.iter().copied()))
    }

    fn parse_checked(args: &[&str]) -> Result<Args, ArgsError> {
        Args::try_parse_args(std::iter::once("cow-trace").chain(args.iter().copied()))
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_problem() {
        for (args, needle) in [
            (&["-p", "abc"][..], "'abc' is not a PID"),
            (&["--frobnicate"], "unexpected argument '--frobnicate'"),
            (&["-i"], "a value is required for '--interval <SECS>'"),
            (&["--backend", "magic"], "invalid value 'magic'"),
        ] {
            match parse_checked(args) {
                Err(ArgsError::Usage(line)) => {
                    assert!(line.contains(needle), "{args:?}: {line}");
                    assert!(!line.contains('\n') && !line.starts_with("error:"), "{line:?}");
                    assert!(line.ends_with("(see cow-trace --help)"), "{line}");
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
        for args in [&["-u", "nobody"][..], &["--user", "nobody", "-p", "1"], &["-u", "nobody", "--"]] {
            match parse_checked(args) {
                Err(ArgsError::Usage(line)) => {
                    assert!(line.starts_with("-u/--user runs a launched command"), "{line}")
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let a = parse_checked(&["-u", "nobody", "--", "id"]).unwrap();
        assert_eq!((a.user.as_deref(), a.mode().unwrap()), (Some("nobody"), Mode::Launch(vec!["id".into()])));
        assert!(matches!(parse_checked(&["--help"]), Err(ArgsError::Info(_))));
        assert!(matches!(parse_checked(&["--version"]), Err(ArgsError::Info(_))));
    }

    #[test]
    fn sample_every_is_a_power_of_two_up_to_1024() {
        assert_eq!(parse(&[]).unwrap().sample_every, 16);
        for (arg, want) in [("1", 1), ("16", 16), ("1024", 1024)] {
            assert_eq!(parse(&["--sample-every", arg]).unwrap().sample_every, want);
        }
        for bad in ["0", "3", "2048", "-1", "x"] {
            match parse_checked(&["--sample-every", bad]) {
                Err(ArgsError::Usage(line)) => {
                    assert!(line.contains("power of two from 1 to 1024"), "{bad}: {line}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_bare_double_dash_is_a_forgotten_command_not_the_whole_system() {
        for args in [&["--"][..], &["--json", "--"], &["-p", "1", "--"]] {
            let err = parse_checked(args).unwrap().mode().unwrap_err();
            assert!(err.contains("nothing follows `--`"), "{args:?}: {err}");
        }
        assert_eq!(parse_checked(&["--json"]).unwrap().mode().unwrap(), Mode::System);
        let a = parse_checked(&["--", "sh", "-c", "echo --"]).unwrap();
        assert_eq!(a.mode().unwrap(), Mode::Launch(vec!["sh".into(), "-c".into(), "echo --".into()]));
    }

    #[test]
    fn the_bcc_positional_interval_and_count_are_minus_i_and_minus_d() {
        let a = parse_checked(&["-T", "-p", "1", "2", "5"]).unwrap();
        assert_eq!((a.interval, a.duration), (Some(Duration::from_secs(2)), Some(Duration::from_secs(10))));
        assert!(a.timestamp);
        let a = parse_checked(&["3", "--", "sleep", "1"]).unwrap();
        assert_eq!((a.interval, a.duration), (Some(Duration::from_secs(3)), None));
        assert_eq!(a.mode().unwrap(), Mode::Launch(vec!["sleep".into(), "1".into()]));
        for bad in [&["-i", "1", "2"][..], &["-d", "5", "1", "3"], &["1", "0"], &["0"]] {
            assert!(
                matches!(
                    Args::try_parse_args(std::iter::once("cow-trace").chain(bad.iter().copied())),
                    Err(ArgsError::Usage(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn defaults_trace_the_whole_system() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.mode().unwrap(), Mode::System);
        assert_eq!(a.ring_buffer_size, 8 << 20);
        assert_eq!((a.json, a.no_follow, a.top), (false, false, 20));
        assert_eq!(a.backend, BackendChoice::Auto);
        assert_eq!(a.unit, Unit::Us);
        assert_eq!((a.serve, a.series_cap), (None, 500));
        assert_eq!((a.min_episode_copied, a.min_episode_fork_ms), (1 << 20, 10));
        let a = parse(&["--min-episode-copied", "0", "--min-episode-fork-ms", "50"]).unwrap();
        assert_eq!((a.min_episode_copied, a.min_episode_fork_ms), (0, 50));
        assert_eq!(parse(&["--min-episode-copied", "64K"]).unwrap().min_episode_copied, 64 << 10);
        assert!(parse(&["--min-episode-copied", "lots"]).is_err());
    }

    #[test]
    fn serve_defaults_to_loopback_and_takes_an_address() {
        let a = parse(&["--serve"]).unwrap();
        assert_eq!(a.serve, Some(DEFAULT_SERVE.parse().unwrap()));
        assert!(a.serve.unwrap().ip().is_loopback());
        let a = parse(&["--serve", "0.0.0.0:9000", "-p", "1"]).unwrap();
        assert_eq!(a.serve, Some("0.0.0.0:9000".parse().unwrap()));
        let a = parse(&["--serve", "--", "sleep", "1"]).unwrap();
        assert_eq!(a.mode().unwrap(), Mode::Launch(vec!["sleep".into(), "1".into()]));
        assert!(parse(&["--serve", "localhost"]).is_err());
        assert!(parse(&["--series-cap", "0"]).is_err());
    }

    #[test]
    fn pids_repeat_and_dedup() {
        let a = parse(&["-p", "42", "--pid", "7", "-p", "42", "-i", "2", "-d", "10"]).unwrap();
        assert_eq!(a.mode().unwrap(), Mode::Pids(vec![7, 42]));
        assert_eq!(a.interval, Some(Duration::from_secs(2)));
        assert_eq!(a.duration, Some(Duration::from_secs(10)));
    }

    #[test]
    fn launch_mode_keeps_command_arguments_verbatim() {
        let a = parse(&["--json", "--", "sh", "-c", "echo -p 1"]).unwrap();
        assert_eq!(a.mode().unwrap(), Mode::Launch(vec!["sh".into(), "-c".into(), "echo -p 1".into()]));
        assert!(a.json);
    }

    #[test]
    fn bad_pids_are_rejected_with_the_reason() {
        for (arg, needle) in [
            ("0", "not a valid PID"),
            ("-5", "not a valid PID"),
            ("abc", "is not a PID"),
            ("99999999", "not a valid PID"),
            ("", "is not a PID"),
        ] {
            let err = parse(&["-p", arg]).unwrap_err().to_string();
            assert!(err.contains(needle), "{arg}: {err}");
        }
    }

    #[test]
    fn conflicting_or_absurd_options() {
        assert!(parse(&["-p", "1", "--", "true"]).unwrap().mode().unwrap_err().contains("not both"));
        assert!(parse(&["--no-follow"]).unwrap().mode().unwrap_err().contains("--no-follow"));
        assert!(parse(&["--", ""]).unwrap().mode().unwrap_err().contains("empty"));
        for bad in [["-i", "0"], ["-i", "100000"], ["-d", "0"], ["-d", "x"], ["-i", "-1"]] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--backend", "magic"]).is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("8M"), Ok(8 << 20));
        assert_eq!(parse_ring_size("64k"), Ok(64 << 10));
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert!(parse_ring_size("3M").is_err());
        assert!(parse_ring_size("1024").is_err());
        assert!(parse_ring_size("2G").is_err());
        assert!(parse_ring_size("lots").is_err());
    }

    #[test]
    fn help_teaches() {
        let help = parse(&["--help"]).unwrap_err().to_string();
        assert!(help.contains("EXAMPLES:"));
        assert!(help.contains("cow-trace -p 1234"));
        assert!(help.contains("--ring-buffer-size"));
    }
}
