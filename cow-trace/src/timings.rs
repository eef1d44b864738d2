//! `COW_TRACE_TIMINGS=1`: how long each phase of starting and ending a run
//! takes, one line per phase on stderr. Off by default; it exists to find
//! where a user's wait at either end of a run goes (docs/performance.md,
//! "Starting and stopping").

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The variable that turns the lines on.
pub const ENV: &str = "COW_TRACE_TIMINGS";

/// The run's origin when timings are on.
static ORIGIN: OnceLock<Option<Instant>> = OnceLock::new();

/// Reads the variable once; later calls reuse the answer. Call first thing
/// in `main`, so that phases are placed from the process's start.
pub fn init() {
    ORIGIN.get_or_init(|| std::env::var_os(ENV).is_some_and(|v| v != "0").then(Instant::now));
}

fn origin() -> Option<Instant> {
    *ORIGIN.get_or_init(|| None)
}

pub fn enabled() -> bool {
    origin().is_some()
}

/// A phase that reports its duration when dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    label: String,
    start: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(origin) = origin() {
            line(&self.label, self.start.elapsed(), self.start.duration_since(origin));
        }
    }
}

/// Starts timing a phase; the label is only built when timings are on.
pub fn span(label: impl FnOnce() -> String) -> Option<Span> {
    enabled().then(|| Span { label: label(), start: Instant::now() })
}

/// Reports a phase measured elsewhere, that started at `start`.
pub fn record(label: &str, start: Instant) {
    if let Some(origin) = origin() {
        line(label, start.elapsed(), start.saturating_duration_since(origin));
    }
}

fn line(label: &str, took: Duration, at: Duration) {
    eprintln!(
        "cow-trace: timing: {:>8.2} ms  {label} (from {:.2} ms)",
        took.as_secs_f64() * 1e3,
        at.as_secs_f64() * 1e3
    );
}

/// Runs `f`, timed as one phase.
pub fn time<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    let _span = span(label);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_asked_and_then_labels_are_never_built() {
        // The test harness does not set the variable, and `init` reads it
        // once: off for the whole process.
        if std::env::var_os(ENV).is_some() {
            eprintln!("SKIPPED: {ENV} is set for this test process");
            return;
        }
        init();
        assert!(!enabled());
        assert_eq!(time(|| unreachable!("a label built while timings are off"), || 7), 7);
        assert!(span(|| unreachable!()).is_none());
    }
}
