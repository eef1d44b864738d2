//! Human-readable numbers: the leaf every renderer uses.

/// Human-readable nanoseconds: `850ns`, `2.4us`, `21.3ms`, `1.20s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0 => "-".into(),
        n if n < 1_000 => format!("{n}ns"),
        n if n < 1_000_000 => format!("{:.1}us", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.2}s", n as f64 / 1e9),
    }
}

/// Binary-prefixed bytes: `0`, `4.0KiB`, `380.2MiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b}{}", if b == 0 { "" } else { "B" });
    }
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

/// A signal's name: `SIGTERM`, or `signal 42` for one without a common name.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(fmt_ns(0), "-");
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(2_400), "2.4us");
        assert_eq!(fmt_ns(21_300_000), "21.3ms");
        assert_eq!(fmt_ns(1_200_000_000), "1.20s");
        assert_eq!(fmt_bytes(0), "0");
        assert_eq!(fmt_bytes(100), "100B");
        assert_eq!(fmt_bytes(4096), "4.0KiB");
        assert_eq!(fmt_bytes(92_825 * 4096), "362.6MiB");
    }
}
