//! cow-trace: what fork() and copy-on-write cost, per process, live.

mod backend;
mod cli;
mod kernel;
mod launch;
mod preflight;

use cow_trace::{aggregate, episode, output, regions, stream};

use std::{collections::HashSet, io::Write as _, os::fd::OwnedFd, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use cow_trace_common::counter;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    aggregate::Aggregator,
    backend::{KernelFeatures, LoadOptions, Selection, Tracer},
    cli::{Args, Mode},
    episode::Episodes,
    output::{KernelTotals, StartRecord},
};

fn main() -> ExitCode {
    let args = match Args::try_parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(cli::ArgsError::Info(e)) => e.exit(),
        Err(cli::ArgsError::Usage(line)) => {
            eprintln!("cow-trace: error: {line}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
    match run(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("cow-trace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How often the ring buffer is drained when no event woke us.
const DRAIN_PERIOD: std::time::Duration = std::time::Duration::from_millis(25);

/// How often targets are checked for an exit the ring buffer did not bring.
const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the run ended.
enum End {
    Signal(&'static str),
    Duration,
    TargetsGone,
    CommandExited(i32),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Signal(s) => format!("signal {s}"),
            End::Duration => "duration".into(),
            End::TargetsGone => "targets exited".into(),
            End::CommandExited(_) => "command exited".into(),
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let mode = args.mode().map_err(anyhow::Error::msg)?;
    preflight::check_privileges()?;
    if let Mode::Pids(pids) = &mode {
        for &pid in pids {
            preflight::check_pid(pid)?;
        }
    }
    // Everything needed from BTF is read here, and the parsed BTF freed
    // before aya parses its own copy for loading: halves peak memory.
    let btf = kernel::load_vmlinux_btf()?;
    let offsets = kernel::KernelOffsets::from_btf(&btf)?;
    let tracefs = kernel::tracefs()?;
    let features = KernelFeatures::probe(&btf, &tracefs);
    drop(btf);
    let opts = LoadOptions {
        trace_all: mode == Mode::System,
        follow: !args.no_follow,
        ring_buffer_size: args.ring_buffer_size,
        empty_programs: args.bench_empty_programs,
        sample_every: args.sample_every,
    };
    // A command that cannot run is refused before anything is loaded; it
    // waits at its gate until it is in the traced set.
    let mut gated = match &mode {
        Mode::Launch(argv) => Some(launch::spawn_gated(argv)?),
        _ => None,
    };
    let (selection, mut tracer) = choose_backend(args.backend, &offsets, &tracefs, &features, &opts)?;

    let targets: Option<HashSet<u32>> = match &mode {
        Mode::System => None,
        Mode::Pids(pids) => {
            tracer.trace_pids(pids)?;
            // A target that died between the check and now would never send
            // its exit: refuse rather than wait forever.
            for &pid in pids {
                if !preflight::alive(pid) {
                    anyhow::bail!("PID {pid} exited before tracing started");
                }
            }
            Some(pids.iter().copied().collect())
        }
        Mode::Launch(_) => {
            let g = gated.as_ref().expect("launch mode");
            tracer.trace_pids(&[g.pid])?;
            Some(HashSet::from([g.pid]))
        }
    };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(trace(args, selection, tracer, targets, gated.as_mut()))
}

/// Prints the episodes whose child exited since the last call.
fn print_episodes(out: &mut impl std::io::Write, agg: &mut Aggregator, json: bool) -> Result<()> {
    let Some(eps) = agg.episodes.as_mut() else { return Ok(()) };
    for ep in eps.take_finished() {
        if json {
            let rec = output::EpisodeRecord { kind: "episode", episode: &ep };
            writeln!(out, "{}", output::json_line(&rec))?;
        } else {
            writeln!(out, "episode: {}", ep.line())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Loads the first backend of `choice` the kernel accepts. With `auto`,
/// each one passed over gets a line on stderr saying why; a backend asked
/// for by name that cannot run is an error, never a silent fallback.
fn choose_backend(
    choice: cli::BackendChoice,
    offsets: &kernel::KernelOffsets,
    tracefs: &std::path::Path,
    features: &KernelFeatures,
    opts: &LoadOptions,
) -> Result<(Selection, Tracer)> {
    let mut rejected = Vec::new();
    for kind in backend::candidates(choice) {
        // Loading and attaching is the honest test of what a kernel allows
        // (it can list a function and still refuse a trampoline on it).
        let attempt = features.check(kind).map_err(anyhow::Error::msg).and_then(|funcs| {
            Tracer::load(kind, &funcs, offsets, tracefs, features, opts).map(|t| (funcs, t))
        });
        match attempt {
            Ok((funcs, tracer)) => {
                let sel = Selection {
                    kind,
                    reason: backend::reason(choice, kind, &rejected),
                    fork_latency_means: kind.fork_latency_means(),
                    cow_latency_means: kind.cow_latency_means(),
                    dup_mmap_split: funcs.contains(&"dup_mmap"),
                    rejected,
                };
                return Ok((sel, tracer));
            }
            Err(e) if choice == cli::BackendChoice::Auto => {
                let line = format!("{}: {e:#}", kind.name());
                eprintln!("cow-trace: backend {line}");
                rejected.push(line);
            }
            Err(e) => anyhow::bail!(
                "backend {} is not available on this kernel: {e:#} (use --backend auto to pick one that is)",
                kind.name()
            ),
        }
    }
    anyhow::bail!("no backend can run on this kernel: {}", rejected.join("; "))
}

/// Registers a descriptor-owning object with the runtime for readability.
fn watch<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: every T passed here (ring buffer, logger, pidfd) owns its
    // descriptor for as long as it lives, and so for the AsyncFd's lifetime.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
}

async fn next_tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn deadline(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn exited(fd: &Option<AsyncFd<OwnedFd>>) {
    match fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn trace(
    args: Args,
    sel: Selection,
    mut tracer: Tracer,
    targets: Option<HashSet<u32>>,
    mut gated: Option<&mut launch::Gated>,
) -> Result<i32> {
    let backend = sel.kind.name();
    let sample_every = args.sample_every;
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let launched = gated.is_some();
    let mut agg = Aggregator::new(
        page_size,
        targets,
        !args.no_follow,
        Box::new(preflight::ppid_of),
        Box::new(preflight::comm_of),
    )
    .with_episodes(Episodes::new(page_size, Box::new(regions::read_maps)));
    let ring = tracer.take_ring()?;
    let mut ring = watch(ring)?;
    if let Some(logger) = tracer.logger.take() {
        let mut logger = watch(logger)?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let rec = StartRecord {
            kind: "start",
            backend,
            reason: &sel.reason,
            rejected: &sel.rejected,
            fork_latency: sel.fork_latency_means,
            fork_dup_mmap: sel.dup_mmap_split,
            cow_latency: sel.cow_latency_means,
            page_size,
        };
        writeln!(stdout, "{}", output::json_line(&rec))?;
    } else {
        writeln!(stdout, "cow-trace: backend {backend}: {}", sel.reason)?;
        writeln!(
            stdout,
            "cow-trace: fork latency = {}{}; CoW latency = {}",
            sel.fork_latency_means,
            if sel.dup_mmap_split { " (DUPMM: its dup_mmap share)" } else { "" },
            sel.cow_latency_means
        )?;
        let what = match (&gated, args.pids.is_empty()) {
            (Some(g), _) => format!("command {} (PID {})", g.program, g.pid),
            (None, false) => {
                format!("PID {}", args.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
            }
            (None, true) => "all processes".into(),
        };
        let follow =
            if args.no_follow || args.pids.is_empty() && !launched { "" } else { " and descendants" };
        writeln!(stdout, "cow-trace: tracing {what}{follow}; Ctrl-C to end\n")?;
    }
    stdout.flush()?;

    let child_fd = match gated.as_deref_mut() {
        Some(g) => {
            let fd = launch::pidfd(g.pid).context("pidfd_open")?;
            g.release()?;
            Some(watch(fd)?)
        }
        None => None,
    };

    let start = Instant::now();
    let stop_at = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = args.interval.map(|d| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });

    // Fault events do not wake us (see the BPF side): drain on a timer.
    let mut drain_tick = tokio::time::interval(DRAIN_PERIOD);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Targets whose exit event was dropped are found by looking, on the
    // drain tick (see Aggregator::sweep_targets); a launched command has
    // its pidfd instead.
    let mut last_sweep = Instant::now();

    let end = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                // Read before draining: see Episodes::settle.
                let closing = agg.episodes.as_ref().is_some_and(Episodes::closing);
                let oldest_unsent = if closing { tracer.oldest_unsent()? } else { None };
                stream::drain(ring.get_mut(), &mut agg, sample_every);
                if let Some(eps) = agg.episodes.as_mut() {
                    eps.settle(oldest_unsent);
                }
                print_episodes(&mut stdout, &mut agg, args.json)?;
                if !launched && last_sweep.elapsed() >= SWEEP_PERIOD {
                    last_sweep = Instant::now();
                    let gone = agg.sweep_targets(preflight::alive);
                    if gone > 0 {
                        log::warn!("{gone} traced processes ended without an exit event (dropped?); no longer waiting for them");
                    }
                }
                if !launched && agg.targets_gone() {
                    break End::TargetsGone;
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                stream::drain(guard.get_inner_mut(), &mut agg, sample_every);
                guard.clear_ready();
                print_episodes(&mut stdout, &mut agg, args.json)?;
                if !launched && agg.targets_gone() {
                    break End::TargetsGone;
                }
            }
            _ = next_tick(&mut ticker) => {
                stream::drain(ring.get_mut(), &mut agg, sample_every);
                print_episodes(&mut stdout, &mut agg, args.json)?;
                let dropped = tracer.counters()?[counter::DROPPED as usize];
                let rows = agg.take_interval();
                let elapsed = start.elapsed().as_secs_f64();
                if args.json {
                    let rec = output::IntervalRecord { kind: "interval", backend, elapsed_s: elapsed, dropped_events: dropped, processes: &rows };
                    writeln!(stdout, "{}", output::json_line(&rec))?;
                } else {
                    writeln!(stdout, "[{elapsed:.0}s] dropped events: {dropped}")?;
                    write!(stdout, "{}", output::table(&rows, args.top))?;
                    writeln!(stdout)?;
                }
                stdout.flush()?;
            }
            _ = sigint.recv() => break End::Signal("SIGINT"),
            _ = sigterm.recv() => break End::Signal("SIGTERM"),
            _ = sighup.recv() => break End::Signal("SIGHUP"),
            _ = deadline(stop_at) => break End::Duration,
            _ = exited(&child_fd) => {
                let pid = gated.as_ref().expect("launched").pid;
                break End::CommandExited(launch::exit_code(launch::reap(pid)));
            }
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    // Stop the programs, let any still running on another CPU finish, then
    // take everything they committed: the counters read after this drain
    // describe exactly the events it could have received.
    tracer.detach();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    stream::drain(ring.get_mut(), &mut agg, sample_every);
    // Fault outcomes the programs batched but never sent: each CPU's are
    // newer than anything it sent, so they come last.
    for (ts, r) in tracer.unsent_faults()? {
        stream::apply_fault(ts, &r, &mut agg, sample_every);
    }
    if let Some(eps) = agg.episodes.as_mut() {
        eps.finish_closing();
    }
    print_episodes(&mut stdout, &mut agg, args.json)?;
    let c = tracer.counters()?;
    let totals = KernelTotals {
        events: aggregate::EventCounts::from_kernel(&c),
        unclassified_faults: c[counter::UNCLASSIFIED as usize],
        traced_full: c[counter::TRACED_FULL as usize],
    };
    let dropped = c[counter::DROPPED as usize];
    // Detach everything before printing: the summary is the last word.
    drop(ring);
    drop(tracer);

    let rows = agg.totals();
    let episodes = agg.episodes.as_ref().map(Episodes::all).unwrap_or_default();
    let command_exit = match end {
        End::CommandExited(code) => Some(code),
        _ => None,
    };
    if args.json {
        let rec = output::SummaryRecord {
            kind: "summary",
            backend,
            elapsed_s: elapsed,
            ended_by: &end.describe(),
            dropped_events: dropped,
            kernel_totals: totals,
            events_received: agg.seen,
            command_exit_code: command_exit,
            processes: &rows,
            histograms: output::Histograms {
                fork_latency_ns: agg.fork_lat_all.to_log2(1).nonzero_rows(),
                cow_latency_ns: agg.cow_lat_all.to_log2(1).nonzero_rows(),
                fork_dup_mmap_ns: agg.dup_mmap_all.to_log2(1).nonzero_rows(),
            },
            episodes: &episodes,
        };
        writeln!(stdout, "{}", output::json_line(&rec))?;
    } else {
        writeln!(stdout, "=== summary: {elapsed:.1}s, ended by {} ===", end.describe())?;
        write!(stdout, "{}", output::table(&rows, args.top))?;
        let unit = args.unit;
        write!(stdout, "{}", output::episode_list(&episodes, args.top))?;
        if agg.fork_lat_all.count() > 0 {
            writeln!(stdout, "\nfork latency ({}):", sel.fork_latency_means)?;
            write!(stdout, "{}", agg.fork_lat_all.to_log2(unit.divisor()).render(unit.label()))?;
        }
        if agg.dup_mmap_all.count() > 0 {
            writeln!(stdout, "\nof which dup_mmap (copying the address space: VMAs and page tables):")?;
            write!(stdout, "{}", agg.dup_mmap_all.to_log2(unit.divisor()).render(unit.label()))?;
        }
        if agg.cow_lat_all.count() > 0 {
            writeln!(stdout, "\nCoW latency ({}):", sel.cow_latency_means)?;
            write!(stdout, "{}", agg.cow_lat_all.to_log2(unit.divisor()).render(unit.label()))?;
        }
        writeln!(
            stdout,
            "\nkernel totals: {} forks, {} CoW copies, {} reuses, {} zero-fills, {} huge-page faults; dropped events: {dropped}",
            totals.events.spawns,
            totals.events.cow_copies,
            totals.events.cow_reuses,
            totals.events.zero_fills,
            totals.events.huge_cows
        )?;
        if let Some(code) = command_exit {
            writeln!(stdout, "command exited with status {code}")?;
        }
    }
    stdout.flush()?;
    if dropped > 0 {
        log::warn!("{dropped} events did not fit in the ring buffer; per-process figures undercount (try --ring-buffer-size 64M)");
    }
    if totals.unclassified_faults > 0 || totals.traced_full > 0 {
        log::warn!(
            "{} write faults left unclassified (thread-id slot collisions), {} children not followed (traced-process map full)",
            totals.unclassified_faults,
            totals.traced_full
        );
    }
    Ok(command_exit.unwrap_or(0))
}
