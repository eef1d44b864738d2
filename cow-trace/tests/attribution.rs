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

/// `--stacks` on the ground-truth program built with frame pointers in
/// every function (-O0: GCC keeps no frame in a leaf at -O1, even with
/// -fno-omit-frame-pointer), written to folded and SVG files in `dir`.
fn stacks_of(prog: &Path, dir: &Path) -> (Run, String, String) {
    let folded = dir.join("stacks.folded");
    let svg = dir.join("stacks.svg");
    let r = run(
        &[
            "--json",
            "--top",
            "0",
            "--folded",
            folded.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
            "--",
            prog.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let folded = std::fs::read_to_string(&folded).expect("folded stacks written");
    let svg = std::fs::read_to_string(&svg).expect("flame graph written");
    (r, folded, svg)
}

/// `(stack, count)` of each folded line; panics on a line not of the form
/// `frames count`.
fn folded_lines(folded: &str) -> Vec<(&str, u64)> {
    folded
        .lines()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a folded line: {l:?}"));
            (stack, n.parse().unwrap_or_else(|_| panic!("no count in {l:?}")))
        })
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn copies_stacks_are_folded_and_drawn_with_the_pages_each_function_wrote() {
    if !need_root("copies_stacks_are_folded_and_drawn_with_the_pages_each_function_wrote") {
        return;
    }
    let dir = scratch("stacks");
    let prog = build("cow-attr-fp", &["-O0"]);
    let (r, folded, svg) = stacks_of(&prog, &dir);
    let lines = folded_lines(&folded);
    let ending =
        |suffix: &str| lines.iter().filter(|(s, _)| s.ends_with(suffix)).map(|(_, n)| n).sum::<u64>();
    // Every copy each function made, under main, in the child named as
    // the program.
    assert_eq!((ending(";main;write_big"), ending(";main;write_small")), (BIG, SMALL), "{folded}");
    for (stack, _) in lines.iter().filter(|(s, _)| s.ends_with(";main;write_big")) {
        assert!(stack.starts_with("cow-attr-fp;"), "{stack}");
    }
    // Every copy the kernel counted is on some stack, none lost.
    let s = r.summary();
    let stacks = &s["stacks"];
    let total: u64 = lines.iter().map(|(_, n)| n).sum();
    assert_eq!(total, u(&s["kernel_totals"]["cow_copies"]), "{folded}");
    assert_eq!(u(&stacks["copies"]), total);
    assert_eq!(stacks["distinct"].as_u64(), Some(lines.len() as u64));
    assert!(stacks["lost"].as_object().unwrap().values().all(|v| v == 0), "{stacks}");
    // The program keeps frame pointers everywhere: not said to lack them.
    let no_fp = stacks["no_frame_pointers"].as_array().unwrap();
    assert!(no_fp.iter().all(|m| m["module"] != prog.to_str().unwrap()), "{stacks}");
    // JSON carries the same stacks, root first.
    let big = stacks["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["frames"].as_array().unwrap().last().unwrap() == "write_big")
        .unwrap();
    assert_eq!(big["comm"], "cow-attr-fp");
    assert_eq!(u(&big["copies"]), BIG);
    // The SVG: one document, naming both functions.
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count(), "{svg}");
    assert!(svg.contains("write_big") && svg.contains("write_small"));
}

#[test]
fn a_leaf_without_a_frame_pointer_is_said_to_lose_its_caller() {
    if !need_root("a_leaf_without_a_frame_pointer_is_said_to_lose_its_caller") {
        return;
    }
    let dir = scratch("stacks-no-fp");
    // -O1: GCC sets up no frame in write_big and write_small, leaves (the
    // test checks the binary's first bytes itself, in case a compiler does).
    let prog = build("cow-attr-leaf", &[]);
    let bytes = std::fs::read(&prog).unwrap();
    let nm = Command::new("nm").arg(&prog).output().expect("nm (binutils)");
    let addr = String::from_utf8(nm.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with(" write_big"))
        .map(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap())
        .unwrap();
    // A PIE's text is mapped at file offset = address in GCC's default
    // layout (first segment at 0).
    let start = &bytes[addr as usize..addr as usize + 8];
    let has_fp = start[..4] == [0x55, 0x48, 0x89, 0xe5] || start[4..] == [0x55, 0x48, 0x89, 0xe5];
    let (r, folded, _) = stacks_of(&prog, &dir);
    let lines = folded_lines(&folded);
    let under_main: u64 = lines.iter().filter(|(s, _)| s.ends_with(";main;write_big")).map(|(_, n)| n).sum();
    let listed = r.summary()["stacks"]["no_frame_pointers"].as_array().unwrap().iter().any(|m| {
        m["module"] == prog.to_str().unwrap()
            && m["functions"].as_array().unwrap().contains(&"write_big".into())
    });
    // Without its own frame, the walk skips main: what lies beyond
    // write_big is cut, not shown as callers it may not have.
    assert_eq!((listed, under_main == BIG), (!has_fp, has_fp), "{folded}");
    if !has_fp {
        assert!(r.stderr.contains("no frame pointers in") && r.stderr.contains("write_big"), "{}", r.stderr);
        let cut: u64 = lines
            .iter()
            .filter(|(s, _)| *s == "cow-attr-leaf;[stack cut: no frame pointer];write_big")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(cut, BIG, "{folded}");
    }
}

#[test]
fn a_hostile_program_name_cannot_forge_folded_lines() {
    if !need_root("a_hostile_program_name_cannot_forge_folded_lines") {
        return;
    }
    let dir = scratch("stacks-hostile");
    let built = build("cow-attr-hostile", &["-O0"]);
    // The name is the process's comm (first 15 bytes) and its path.
    let evil = "x;y\nfake;main 9";
    let prog = dir.join(evil);
    std::fs::copy(&built, &prog).unwrap();
    let (r, folded, svg) = stacks_of(&prog, &dir);
    let lines = folded_lines(&folded);
    let stacks = &r.summary()["stacks"];
    assert_eq!(stacks["distinct"].as_u64(), Some(lines.len() as u64), "{folded}");
    let big: Vec<_> = lines.iter().filter(|(s, _)| s.ends_with(";main;write_big")).collect();
    assert_eq!(big.len(), 1, "{folded}");
    // One field for the name, escaped: no `;` or newline of its own.
    assert!(big[0].0.starts_with("x\\x3by\\nfake\\x3bmain 9;"), "{folded}");
    assert_eq!(big[0].1, BIG);
    assert!(!folded.lines().any(|l| l.starts_with("fake")), "{folded}");
    // JSON has the name exactly; the SVG has it escaped by the renderer.
    let json_big = stacks["stacks"].as_array().unwrap().iter().find(|st| u(&st["copies"]) == BIG).unwrap();
    assert_eq!(json_big["comm"], &evil[..evil.len().min(15)]);
    assert!(!svg.contains("\nfake"), "the raw name reached the SVG");
}

#[test]
fn an_unwritable_stacks_file_is_refused_before_anything_runs() {
    if !need_root("an_unwritable_stacks_file_is_refused_before_anything_runs") {
        return;
    }
    let r = run(&["--folded", "/nonexistent-dir/stacks.folded", "--", "true"], Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].contains("cannot write the folded stacks to /nonexistent-dir/stacks.folded"),
        "{}",
        r.stderr
    );
}
