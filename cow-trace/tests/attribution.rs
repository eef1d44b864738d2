//! Who made the copies, against ground truth: a C program built here with
//! symbols, whose child's two named functions write known numbers of pages
//! to two named global arrays after a fork. Need root and a C compiler.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use serde_json::Value;

/// The pages `write_big` and `write_small` write (tests/workloads/attr.c).
const BIG: u64 = 3000;
const SMALL: u64 = 700;
/// Pages around them: the child's stack, libc and loader data.
const SLACK: u64 = 16;

/// Builds tests/workloads/attr.c into the test's temporary directory.
fn build(name: &str, extra: &[&str]) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/attr.c");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let st = Command::new("cc")
        .args(["-g", "-O1", "-fno-omit-frame-pointer", "-o"])
        .arg(&out)
        .arg(src)
        .args(extra)
        .status()
        .expect("cc: a C compiler is needed for this test");
    assert!(st.success(), "cc failed on {src}");
    out
}

/// The one fork episode of running `prog` under cow-trace.
fn episode_of(prog: &Path) -> Value {
    let prog = prog.to_str().unwrap();
    let r = run(&["--json", "--top", "0", "--", prog], Duration::from_secs(60));
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let eps: Vec<&Value> = r.records.iter().filter(|v| v["type"] == "episode").collect();
    assert_eq!(eps.len(), 1, "{}", r.stdout);
    eps[0].clone()
}

fn pages_where(list: &Value, f: impl Fn(&Value) -> bool) -> u64 {
    list.as_array().unwrap().iter().filter(|w| f(w)).map(|w| u(&w["pages"])).sum()
}

#[test]
fn copies_are_attributed_to_the_functions_and_arrays_that_wrote_them() {
    if !need_root("copies_are_attributed_to_the_functions_and_arrays_that_wrote_them") {
        return;
    }
    let prog = build("cow-attr", &[]);
    let e = episode_of(&prog);
    let copies = u(&e["parent_copies"]) + u(&e["child_copies"]);
    let (writers, data) = (&e["top_writers"], &e["top_data"]);
    let by_fn = |name: &str| pages_where(writers, |w| w["function"] == name);
    assert_eq!((by_fn("write_big"), by_fn("write_small")), (BIG, SMALL), "{e:#}");
    let ours = writers.as_array().unwrap().iter().find(|w| w["function"] == "write_big").unwrap();
    assert_eq!(ours["module"], prog.to_str().unwrap());
    assert!(ours["source"].as_str().unwrap().starts_with("attr.c:"), "{ours}");
    let by_obj = |name: &str| pages_where(data, |d| d["object"] == name);
    assert_eq!((by_obj("big_array"), by_obj("small_array")), (BIG, SMALL), "{e:#}");
    // Every copy has a writer and a target, and the few beyond the
    // arrays are named: a function or a module, never unknown.
    assert!((BIG + SMALL..=BIG + SMALL + SLACK).contains(&copies), "{e:#}");
    assert_eq!(pages_where(writers, |_| true), copies);
    assert_eq!(pages_where(data, |_| true), copies);
    assert_eq!(pages_where(writers, |w| w["module"] == "[unknown]"), 0, "{e:#}");
    let share = writers[0]["share"].as_f64().unwrap();
    assert!((share - BIG as f64 / copies as f64).abs() < 1e-9, "{e:#}");
}

#[test]
fn a_stripped_module_is_shown_as_module_and_offset() {
    if !need_root("a_stripped_module_is_shown_as_module_and_offset") {
        return;
    }
    let prog = build("cow-attr-stripped", &["-s"]);
    let e = episode_of(&prog);
    let path = prog.to_str().unwrap();
    let ours: Vec<&Value> =
        e["top_writers"].as_array().unwrap().iter().filter(|w| w["module"] == path).collect();
    // The two writing instructions, never given a name, each with its
    // count; main's own stack writes may add an address or two.
    let mut counts: Vec<u64> = ours.iter().map(|w| u(&w["pages"])).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(counts[..2], [BIG, SMALL], "{e:#}");
    assert!(counts[2..].iter().sum::<u64>() <= SLACK, "{e:#}");
    for w in &ours {
        assert!(w["function"].is_null() && w["stripped"] == true && w["module_offset"].is_u64(), "{w}");
    }
}
