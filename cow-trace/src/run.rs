//! One tracing run: setting up (checks, backend, traced set), then the
//! [`Session`] that drains the ring buffer until the run ends, and its
//! shutdown and summary.

use std::{collections::HashSet, io::Write, os::fd::OwnedFd, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use cow_trace::{
    episode::{Episodes, Threshold},
    metrics::{Health, Metrics},
    output::{self, Format},
    sanitize::for_terminal,
    stacks::{Layouts, StackReport},
    symbolize::Symbolizer,
    tally::Tally,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, Signal, SignalKind},
    time::{Interval, MissedTickBehavior},
};

use crate::{
    backend::{self, KernelFeatures, LoadOptions, Selection, Tracer},
    cli::{Args, Mode},
    exporter::Exporter,
    kernel, launch, memcg, preflight, procfs, timings,
};

/// How often the ring buffer is drained when no event woke us.
const DRAIN_PERIOD: std::time::Duration = std::time::Duration::from_millis(25);

/// How often targets are checked for an exit the ring buffer did not bring.
const SWEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// How often `--serve` publishes a new snapshot for scrapes.
const PUBLISH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the run ended.
enum End {
    Signal(i32),
    Duration,
    TargetsGone,
    /// The launched command exited; its raw wait status.
    CommandExited(i32),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Signal(s) => format!("signal {}", cow_trace::fmt::signal_name(*s)),
            End::Duration => "duration".into(),
            End::TargetsGone => "targets exited".into(),
            End::CommandExited(_) => "command exited".into(),
        }
    }
}

/// Runs the whole trace; returns the exit code.
pub fn run(args: Args) -> Result<i32> {
    let mode = args.mode().map_err(anyhow::Error::msg)?;
    let user = args.user.as_deref().map(launch::lookup_user).transpose()?;
    preflight::check_privileges()?;
    // Refused before anything is loaded, like any other bad input.
    let out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot write the report to {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let stack_files = StackFiles::create(&args)?;
    if let Mode::Pids(pids) = &mode {
        for &pid in pids {
            preflight::check_pid(pid)?;
        }
    }
    let cgroups = preflight::resolve_cgroups(&args.cgroups)?;
    // The kernel's BTF is read once; offsets and features are looked up
    // by name in a lazily indexed copy, freed before the programs load.
    let btf = timings::time(|| "BTF read".into(), kernel::KernelBtf::read)?;
    let index = timings::time(|| "BTF indexed (btf-rs)".into(), || btf.index())?;
    let offsets =
        timings::time(|| "offsets read from BTF".into(), || kernel::KernelOffsets::from_btf(&index))?;
    let tracefs = timings::time(|| "tracefs found".into(), kernel::tracefs)?;
    let mut features =
        timings::time(|| "kernel features probed".into(), || KernelFeatures::probe(&index, &tracefs));
    drop(index);
    let opts = LoadOptions {
        trace_all: mode == Mode::System,
        follow: !args.no_follow,
        ring_buffer_size: args.ring_buffer_size,
        empty_programs: args.bench_empty_programs,
        sample_every: args.sample_every,
        cgroups,
        stacks: args.stacks_on(),
    };
    // A command that cannot run is refused before anything is loaded; it
    // waits at its gate until it is in the traced set.
    let mut gated = match &mode {
        Mode::Launch(argv) => Some(launch::spawn_gated(argv, user.as_ref())?),
        _ => None,
    };
    let (selection, mut tracer) = timings::time(
        || "backend chosen, loaded and attached".into(),
        || backend::choose(args.backend, &offsets, &mut features, &opts, &btf),
    )?;
    drop(btf);
    let targets = trace_targets(&mode, &mut tracer, gated.as_ref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let session = Session::start(&args, &selection, tracer, targets, gated.as_mut(), out, stack_files)?;
        // A run that fails part-way (a closed pipe, a full disk) skips the
        // shutdown that ends the command: end it here, by a pidfd of its own
        // so that a command already reaped is never mistaken for another.
        let command = session.command_pidfd()?;
        let result = session.run(&args, &selection).await;
        if let (Err(_), Some((pid, fd))) = (&result, command) {
            launch::end_abandoned(pid, fd, COMMAND_GRACE);
        }
        result
    })
}

/// `--folded` and `--flamegraph`: opened before anything is loaded, so an
/// unwritable path is refused like any other bad input.
struct StackFiles {
    folded: Option<(PathBuf, std::fs::File)>,
    flamegraph: Option<(PathBuf, std::fs::File)>,
}

impl StackFiles {
    fn create(args: &Args) -> Result<Option<Self>> {
        if !args.stacks_on() {
            return Ok(None);
        }
        let open = |p: &Option<PathBuf>, what: &str| -> Result<Option<(PathBuf, std::fs::File)>> {
            p.as_ref()
                .map(|p| {
                    let f = std::fs::File::create(p)
                        .with_context(|| format!("cannot write the {what} to {}", p.display()))?;
                    Ok((p.clone(), f))
                })
                .transpose()
        };
        Ok(Some(Self {
            folded: open(&args.folded, "folded stacks")?,
            flamegraph: open(&args.flamegraph, "flame graph")?,
        }))
    }

    /// Writes the files; says on stderr what the stacks lack.
    fn write(self, r: &StackReport) -> Result<()> {
        if let Some((path, f)) = self.folded {
            let mut w = std::io::BufWriter::new(f);
            r.write_folded(&mut w)
                .and_then(|()| w.flush())
                .with_context(|| format!("cannot write the folded stacks to {}", path.display()))?;
        }
        if let Some((path, f)) = self.flamegraph {
            let mut w = std::io::BufWriter::new(f);
            r.write_flamegraph(&mut w)
                .and_then(|()| Ok(w.flush()?))
                .with_context(|| format!("cannot write the flame graph to {}", path.display()))?;
        }
        for m in &r.no_frame_pointers {
            let fns: Vec<String> = m.functions.iter().take(3).map(|f| for_terminal(f).into_owned()).collect();
            let more = if m.functions.len() > 3 {
                format!(" and {} more", m.functions.len() - 3)
            } else {
                String::new()
            };
            eprintln!(
                "cow-trace: stacks: no frame pointers in {} ({}{more}): stacks are cut at them, their callers unknown (build it with -fno-omit-frame-pointer)",
                for_terminal(&m.module),
                fns.join(", ")
            );
        }
        if r.layouts_missing > 0 {
            eprintln!(
                "cow-trace: stacks: the layouts of {} process images were not kept (too many): their frames read [unknown]",
                r.layouts_missing
            );
        }
        let l = r.lost;
        if l.total() > 0 {
            eprintln!(
                "cow-trace: stacks: {} copies without their stack ({} stack-map collisions, {} walks failed, {} not taken, {} not counted: count map full)",
                l.total(),
                l.collision,
                l.walk_failed,
                l.not_taken,
                l.counts_full
            );
        }
        Ok(())
    }
}

/// Puts the targets in the kernel's traced set; returns the processes whose
/// end ends the run (`None`: whole system).
fn trace_targets(
    mode: &Mode,
    tracer: &mut Tracer,
    gated: Option<&launch::Gated>,
) -> Result<Option<HashSet<u32>>> {
    Ok(match mode {
        Mode::System => None,
        Mode::Pids(pids) => {
            tracer.trace_pids(pids)?;
            // A target that died between the check and now would never send
            // its exit: refuse rather than wait forever.
            for &pid in pids {
                if !procfs::alive(pid) {
                    return Err(preflight::exited_before_tracing(pid));
                }
            }
            Some(pids.iter().copied().collect())
        }
        Mode::Launch(_) => {
            let g = gated.expect("launch mode");
            tracer.trace_pids(&[g.pid])?;
            Some(HashSet::from([g.pid]))
        }
    })
}

/// Registers a descriptor-owning object with the runtime for readability.
fn watch<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: every T passed here (ring buffer, logger, pidfd) owns its
    // descriptor for as long as it lives, and so for the AsyncFd's lifetime.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
}

async fn next_tick(t: &mut Option<Interval>) {
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

async fn exited(child: &Option<(u32, AsyncFd<OwnedFd>)>) {
    match child {
        Some((_, fd)) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

fn ticker(period: std::time::Duration, first: tokio::time::Instant) -> Interval {
    let mut t = tokio::time::interval_at(first, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// The running trace: the loaded programs, their ring buffer, and what has
/// been learnt from it.
pub struct Session {
    tracer: Tracer,
    ring: AsyncFd<RingBuf<MapData>>,
    tally: Tally,
    /// Where the report goes: stdout, or `-o FILE`.
    out: Box<dyn Write>,
    format: Format,
    sample_every: u32,
    /// A launched command, with the pidfd that says it exited.
    child: Option<(u32, AsyncFd<OwnedFd>)>,
    /// Taken over before the header is written: a signal sent as soon as
    /// it appears ends the run with a summary.
    signals: Option<[Signal; 3]>,
    start: Instant,
    last_sweep: Instant,
    /// Whole-system runs: which episodes are shown (others are counted).
    threshold: Option<Threshold>,
    /// `--serve`: the HTTP side, and when it was last given a snapshot.
    exporter: Option<(Exporter, Option<Instant>)>,
    /// Drops have been reported on stderr.
    warned_drops: bool,
    /// `-T`: wall-clock times on interval headers.
    timestamps: bool,
    /// `-c`: the process name the report is limited to.
    comm: output::CommFilter,
    /// `--stacks`: where they go besides the summary.
    stack_files: Option<StackFiles>,
    top: usize,
}

/// What wakes the loop up.
enum Wake {
    /// The drain timer: take events, let closing episodes settle, look for
    /// targets gone without an exit event.
    DrainTick,
    /// The ring buffer woke us: take events.
    Ring,
    /// The `--interval` timer: take events, print the interval's figures.
    Interval,
}

impl Session {
    /// Writes the header, releases a launched command, and starts the clock.
    fn start(
        args: &Args,
        sel: &Selection,
        mut tracer: Tracer,
        targets: Option<HashSet<u32>>,
        gated: Option<&mut launch::Gated>,
        mut out: Box<dyn Write>,
        stack_files: Option<StackFiles>,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let threshold = (args.pids.is_empty() && args.command.is_empty()).then_some(Threshold {
            min_copied_bytes: args.min_episode_copied,
            min_fork_ns: args.min_episode_fork_ms.saturating_mul(1_000_000),
        });
        let tally = Tally::new(
            page_size,
            targets,
            !args.no_follow,
            Box::new(procfs::ppid_of),
            Box::new(procfs::comm_of),
        )
        .with_episodes({
            let eps = Episodes::new(page_size, Box::new(procfs::read_maps)).with_top(args.top);
            match threshold {
                Some(t) => eps.with_threshold(t),
                None => eps,
            }
        })
        .with_memcg({
            let mounts = memcg::Mounts::read();
            Box::new(move |pid| mounts.of(pid))
        });
        let tally = if args.interval.is_some() { tally } else { tally.without_intervals() };
        let tally = match stack_files {
            Some(_) => tally.with_stacks(Layouts::new(Box::new(procfs::read_maps), tracer.image_reader()?)),
            None => tally,
        };
        let tally = match args.serve {
            Some(_) => tally.with_metrics(Metrics::new(
                page_size,
                args.series_cap as usize,
                Box::new(procfs::cgroup_of),
                Box::new(procfs::comm_of),
            )),
            None => tally,
        };
        let exporter = args.serve.map(Exporter::start).transpose()?;
        if let Some(e) = &exporter {
            eprintln!("cow-trace: serving metrics at http://{}/metrics", e.addr);
        }
        let ring = watch(tracer.take_ring()?)?;
        if let Some(logger) = tracer.logger.take() {
            let mut logger = watch(logger)?;
            tokio::spawn(async move {
                while let Ok(mut guard) = logger.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        let signals = Some([
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ]);
        let format = match args.json {
            true => Format::Json,
            false => Format::Text { top: args.top, divisor: args.unit.divisor(), label: args.unit.label() },
        };

        let tracing = describe_targets(args, gated.as_deref());
        let pids: Option<Vec<u32>> = match (&gated, args.pids.is_empty()) {
            (Some(g), _) => Some(vec![g.pid]),
            (None, false) => Some(dedup(&args.pids)),
            (None, true) => None,
        };
        let start = output::Start {
            backend: sel.kind.name(),
            reason: &sel.reason,
            rejected: &sel.rejected,
            fork_latency_means: sel.fork_latency_means,
            cow_latency_means: sel.cow_latency_means,
            fork_share: sel.fork_share,
            page_size,
            tracing: &tracing,
            pids: pids.as_deref(),
            follow: !args.no_follow,
            timed: args.duration.is_some(),
        };
        // The JSON start record is part of the report; the text header is
        // status, for stderr, so a redirected table is the table alone.
        match format {
            Format::Json => output::write_start(&mut out, &start, format)?,
            Format::Text { .. } => output::write_start(&mut std::io::stderr().lock(), &start, format)?,
        }
        timings::record("session set up, header written", started);
        let child = match gated {
            Some(g) => {
                let fd = launch::pidfd(g.pid).context("pidfd_open")?;
                timings::time(|| "command released".into(), || g.release())?;
                Some((g.pid, watch(fd)?))
            }
            None => None,
        };
        let now = Instant::now();
        Ok(Self {
            tracer,
            ring,
            tally,
            out,
            format,
            sample_every: args.sample_every,
            child,
            signals,
            start: now,
            last_sweep: now,
            exporter: exporter.map(|e| (e, None)),
            threshold,
            warned_drops: false,
            timestamps: args.timestamp,
            comm: output::CommFilter(args.comm.clone()),
            stack_files,
            top: args.top,
        })
    }

    /// Drains until the run ends, then shuts down and writes the summary.
    async fn run(mut self, args: &Args, sel: &Selection) -> Result<i32> {
        let [mut sigint, mut sigterm, mut sighup] = self.signals.take().expect("run once");
        // One origin for both: with `INTERVAL COUNT`, the last interval
        // ends exactly when the run does.
        let t0 = tokio::time::Instant::now();
        let stop_at = args.duration.map(|d| t0 + d);
        let mut interval = args.interval.map(|d| ticker(d, t0 + d));
        // Fault events do not wake us (see the BPF side): drain on a timer.
        let mut drain_tick = ticker(DRAIN_PERIOD, tokio::time::Instant::now());
        let end = loop {
            // In this order: an end due at the same instant as an interval
            // wins, and the shutdown prints that interval as the last.
            let wake = tokio::select! {
                biased;
                _ = sigint.recv() => break End::Signal(libc::SIGINT),
                _ = sigterm.recv() => break End::Signal(libc::SIGTERM),
                _ = sighup.recv() => break End::Signal(libc::SIGHUP),
                _ = deadline(stop_at) => break End::Duration,
                _ = exited(&self.child) => {
                    let pid = self.child.as_ref().expect("launched").0;
                    break End::CommandExited(launch::reap(pid));
                }
                _ = next_tick(&mut interval) => Wake::Interval,
                _ = drain_tick.tick() => Wake::DrainTick,
                guard = self.ring.readable_mut() => {
                    // Cleared before the drain: a wakeup during it is kept.
                    guard?.clear_ready();
                    Wake::Ring
                }
            };
            if let Some(end) = self.step(wake, sel)? {
                break end;
            }
        };
        self.shut_down(end, sel, interval.is_some()).await
    }

    /// A second pidfd of the launched command, if any, that outlives the
    /// session.
    fn command_pidfd(&self) -> Result<Option<(u32, OwnedFd)>> {
        let Some((pid, fd)) = &self.child else { return Ok(None) };
        Ok(Some((*pid, fd.get_ref().try_clone().context("dup of the command's pidfd")?)))
    }

    /// Writes the interval since the last one, ending `elapsed_s` into the run.
    fn write_interval(&mut self, sel: &Selection, elapsed_s: f64) -> Result<()> {
        let dropped = self.tracer.dropped()?;
        let rows = self.comm.rows(self.tally.take_interval());
        let time = self.timestamps.then(local_time);
        output::write_interval(
            &mut self.out,
            sel.kind.name(),
            elapsed_s,
            dropped,
            &rows,
            self.format,
            time.as_deref(),
        )?;
        Ok(())
    }

    /// Handles one wake-up; `Some` when the run is over.
    fn step(&mut self, wake: Wake, sel: &Selection) -> Result<Option<End>> {
        self.drain_and_settle(matches!(wake, Wake::DrainTick))?;
        self.publish(sel)?;
        let launched = self.child.is_some();
        match wake {
            Wake::DrainTick if self.last_sweep.elapsed() >= SWEEP_PERIOD => {
                self.last_sweep = Instant::now();
                self.warn_of_first_drops()?;
                // Targets whose exit event was dropped are found by looking
                // (see Targets::sweep); a launched command has its pidfd.
                let gone = if launched { 0 } else { self.tally.sweep_targets(procfs::alive) };
                if gone > 0 {
                    log::warn!("{gone} traced processes ended without an exit event (dropped?); no longer waiting for them");
                }
            }
            Wake::Interval => {
                self.write_interval(sel, self.start.elapsed().as_secs_f64())?;
                return Ok(None);
            }
            _ => {}
        }
        Ok((!launched && self.tally.targets_gone()).then_some(End::TargetsGone))
    }

    /// Says on stderr, once, that events are being lost, as it happens: the
    /// summary's count comes only at the end.
    fn warn_of_first_drops(&mut self) -> Result<()> {
        if !self.warned_drops && self.tracer.dropped()? > 0 {
            self.warned_drops = true;
            log::warn!("events are being dropped: the ring buffer is full (try --ring-buffer-size 64M)");
        }
        Ok(())
    }

    /// Takes every record the ring buffer holds; with `settle`, then lets
    /// closing episodes finish (see `Episodes::settle`); prints the
    /// episodes that finished.
    fn drain_and_settle(&mut self, settle: bool) -> Result<()> {
        // Read before draining: see Episodes::settle.
        let closing = settle && self.tally.episodes().is_some_and(Episodes::closing);
        let oldest_unsent = if closing { self.tracer.oldest_unsent()? } else { None };
        self.drain();
        if let Some(eps) = self.tally.episodes_mut().filter(|_| settle) {
            eps.settle(oldest_unsent);
        }
        self.print_episodes()
    }

    fn drain(&mut self) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.tally.apply_record(&item, self.sample_every);
        }
    }

    fn print_episodes(&mut self) -> Result<()> {
        let Some(eps) = self.tally.episodes_mut() else { return Ok(()) };
        let mut finished = eps.take_finished();
        if let Some(m) = self.tally.metrics_mut() {
            finished.iter().for_each(|ep| m.episode(ep));
        }
        if let Some(t) = self.threshold {
            finished.retain(|ep| t.matters(ep));
        }
        let finished = self.comm.episodes(finished);
        output::write_episodes(&mut self.out, &finished, self.format)?;
        Ok(())
    }

    /// `--serve`: hands scrapes a new snapshot, at most once a period.
    fn publish(&mut self, sel: &Selection) -> Result<()> {
        let (Some((exporter, last)), Some(m)) = (self.exporter.as_mut(), self.tally.metrics()) else {
            return Ok(());
        };
        if last.is_some_and(|t| t.elapsed() < PUBLISH_PERIOD) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let health = Health {
            backend: sel.kind.name().into(),
            events: self.tally.seen().events.total(),
            dropped: self.tracer.dropped()?,
            dup_mmap_split: sel.fork_share.is_some(),
        };
        exporter.publish(m.snapshot(health));
        Ok(())
    }

    /// Stops the programs, takes everything they left, and writes the
    /// summary; returns the exit code.
    async fn shut_down(mut self, end: End, sel: &Selection, interval: bool) -> Result<i32> {
        // One cut-off instant: every program stops accounting at once while
        // all are still attached, so no outcome is misclassified by hooks
        // going away one after another (docs/kernel-notes.md, "The end of
        // a run"). Let any program still running on another CPU finish,
        // then take everything they committed: the counters read after
        // this describe exactly the events it could have received.
        // Children already gone at the cut-off whose exit no event may bring
        // (`--no-follow`): read before it, so that a child that exits just
        // after it is still said to run at the end.
        let shutdown = std::time::Instant::now();
        let mut step = shutdown;
        let mut mark = |label: &str| {
            timings::record(label, step);
            step = std::time::Instant::now();
        };
        let gone: Vec<u32> = self.tally.episodes().map(Episodes::running_children).unwrap_or_default();
        let gone: Vec<u32> = gone.into_iter().filter(|&c| !procfs::alive(c)).collect();
        let cut_off_ns = self.tracer.cut_off()?;
        let elapsed = self.start.elapsed().as_secs_f64();
        mark("shutdown: cut off");
        wait_for_running_programs().await;
        mark("shutdown: wait after the cut-off");
        let detaching = self.tracer.detach_in_background();
        self.drain();
        mark("shutdown: ring drained");
        // Fault outcomes the programs batched but never sent: each CPU's are
        // newer than anything it sent, so they come last.
        let (unsent, busy) = self.tracer.unsent_faults()?;
        for (ts, r) in unsent {
            self.tally.apply_unsent(ts, &r, self.sample_every);
        }
        if busy > 0 {
            log::warn!(
                "{busy} CPU fault batches were still being changed at the end and are left out (no RCU wait on this machine: one CPU or nohz_full)"
            );
        }
        if let Some(eps) = self.tally.episodes_mut() {
            eps.finish_closing();
            eps.mark_unseen_exits(|c| !gone.contains(&c));
        }
        mark("shutdown: unsent batches read");
        self.print_episodes()?;
        mark("shutdown: episodes printed");
        let faults_in_flight_at_end = self.tracer.faults_in_flight()?;
        mark("shutdown: faults in flight counted");
        if interval {
            // The last, partial interval: the intervals add up to the summary.
            self.write_interval(sel, elapsed)?;
        }
        let kernel = self.tracer.counters()?;
        mark("shutdown: counters read");
        let command = match (&end, self.child.take()) {
            (End::CommandExited(status), _) => Some(launch::command_end(*status, false)),
            (End::Signal(sig), Some((pid, fd))) => Some(end_command(pid, *sig, fd).await),
            (End::Duration, Some((pid, fd))) => Some(end_command(pid, libc::SIGTERM, fd).await),
            _ => None,
        };
        let stack_counts = match self.stack_files {
            Some(_) => Some(self.tracer.stack_counts()?),
            None => None,
        };
        let Session { tracer, ring, tally, mut out, format, comm, threshold, stack_files, top, .. } = self;
        drop(ring);
        // Named off the event path, from the files, now that the run is over.
        let stacks = match (&stack_counts, tally.layouts()) {
            (Some(counts), Some(layouts)) => {
                let rows = tally.totals();
                let comm_of = |pid: u32| rows.iter().find(|r| r.pid == pid).map(|r| r.comm.clone());
                Some(StackReport::build(counts, layouts, comm_of, &mut Symbolizer::new()))
            }
            _ => None,
        };
        let all_episodes = tally.episodes().map(Episodes::all).unwrap_or_default();
        let episodes_total = all_episodes.len() as u64 + tally.episodes().map_or(0, Episodes::dropped);
        let summary = output::RunSummary {
            backend: sel.kind.name(),
            fork_latency_means: sel.fork_latency_means,
            cow_latency_means: sel.cow_latency_means,
            elapsed_s: elapsed,
            ended_by: &end.describe(),
            cut_off_ns,
            faults_in_flight_at_end,
            kernel,
            seen: tally.seen(),
            command,
            processes: &comm.rows(tally.totals()),
            histograms: tally.histograms(),
            episodes: &comm.episodes(match threshold {
                Some(t) => t.rank(all_episodes),
                None => all_episodes,
            }),
            episodes_total,
            stacks: stacks.as_ref(),
            stacks_top: top,
        };
        if let (Some(files), Some(r)) = (stack_files, &stacks) {
            files.write(r)?;
        }
        // Written while the links are still being detached: everything it
        // says was read after the cut-off, and it is what the user waits
        // for. The process ends once every link is gone.
        output::write_summary(&mut out, &summary, format)?;
        out.flush()?;
        mark("shutdown: summary written");
        warn_about_losses(&kernel);
        if let Some(c) = command {
            eprintln!("cow-trace: command {}", c.describe());
        }
        detaching.wait();
        drop(tracer);
        mark("shutdown: programs detached");
        timings::record("shutdown, in all", shutdown);
        // A command that ended on its own passes its status on; one that
        // cow-trace ended did what the user asked.
        Ok(command.filter(|c| !c.ended_by_cow_trace).map_or(0, |c| c.exit_code))
    }
}

/// Returns once no program that read the `CUTOFF` value before it was
/// written can still be running. Every program runs inside an RCU read-side
/// critical section (tracepoints, raw tracepoints, kprobes and trampolines
/// alike), so the end of an RCU grace period proves it:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for one (`synchronize_rcu`),
/// a few milliseconds. It returns at once on a single CPU, where a program
/// preempted mid-run could still be running, and is refused where CPUs
/// run without the tick (`nohz_full`): there, a 20 ms pause, the rule this
/// replaced.
async fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: sysconf and membarrier take no pointers.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus > 1 && unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0 {
        return;
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

/// How long a launched command has, after the signal that ends it with the
/// run, before it is killed (like `timeout -k`; README, "Launch mode").
const COMMAND_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends a launched command still running when the run ends: `sig` (the
/// signal cow-trace received, SIGTERM after `-d`), then SIGKILL after
/// `COMMAND_GRACE`. A command started as root must not outlive its tracer.
async fn end_command(pid: u32, sig: i32, exited: AsyncFd<OwnedFd>) -> output::CommandEnd {
    // SAFETY: our own unreaped child: its PID cannot have been reused.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
    if tokio::time::timeout(COMMAND_GRACE, exited.readable()).await.is_err() {
        log::warn!(
            "the command did not end within {COMMAND_GRACE:?} of {}; killing it",
            cow_trace::fmt::signal_name(sig)
        );
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    launch::command_end(launch::reap(pid), true)
}

/// The local time of day, `HH:MM:SS`.
fn local_time() -> String {
    // SAFETY: time and localtime_r fill the structures given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        libc::localtime_r(&t, &mut tm);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn dedup(pids: &[u32]) -> Vec<u32> {
    let mut v = pids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// What the text header says is traced.
fn describe_targets(args: &Args, gated: Option<&launch::Gated>) -> String {
    let what = match (gated, args.pids.is_empty()) {
        (Some(g), _) => format!("command {} (PID {})", for_terminal(&g.program), g.pid),
        (None, false) => {
            format!("PID {}", dedup(&args.pids).iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
        }
        (None, true) => "all processes".into(),
    };
    let follow =
        if args.no_follow || args.pids.is_empty() && gated.is_none() { "" } else { " and descendants" };
    let cgroups = args.cgroups.iter().map(|c| c.display().to_string()).collect::<Vec<_>>();
    let within =
        if cgroups.is_empty() { String::new() } else { format!(" in cgroup {}", cgroups.join(", ")) };
    format!("{what}{follow}{within}")
}

fn warn_about_losses(k: &cow_trace::counts::KernelCounters) {
    if k.dropped > 0 {
        log::warn!(
            "{} events did not fit in the ring buffer; per-process figures undercount (try --ring-buffer-size 64M)",
            k.dropped
        );
    }
    let t = &k.totals;
    if t.unclassified_faults > 0 || t.traced_full > 0 {
        log::warn!(
            "{} write faults left unclassified (thread-id slot collisions, or a fault handler's return not seen), {} children not followed (traced-process map full)",
            t.unclassified_faults,
            t.traced_full
        );
    }
}
