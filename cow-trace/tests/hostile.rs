//! A hostile process cannot reach the operator's terminal: a workload that
//! names itself with an escape sequence, a newline and a bell, and maps a
//! file whose name holds the same, is traced. The text output holds none of
//! those bytes and keeps its rows; the JSON carries the exact name and
//! path; the copies still match the workload's construction.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const PAGES: u64 = 2048;
const CHILD_PAGES: u64 = 1000;
const PARENT_PAGES: u64 = 500;
/// The name as the text output must print it (see `sanitize::for_terminal`).
const SHOWN_NAME: &str = r"\x1b[31mEV\nIL\x07";
const SHOWN_FILE: &str = r"map \x1b[2J\nfile\x07 (deleted)";

/// Runs the workload under cow-trace with `extra` options; returns the run
/// and the workload's report.
fn trace_hostile(extra: &[&str]) -> (Run, Value) {
    let dir = std::env::temp_dir().join(format!("cow-trace-hostile-{}-{}", std::process::id(), extra.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/hostile.py");
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(["--".into(), "python3".into(), script.into(), dir.to_string_lossy().into_owned()]);
    args.extend([PAGES, CHILD_PAGES, PARENT_PAGES].map(|n| n.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run(&args, Duration::from_secs(120));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let report_line = r.stdout.lines().find(|l| l.starts_with("{\"parent\"")).expect("workload report");
    let report: Value = serde_json::from_str(report_line).unwrap();
    assert_eq!(report["status"], 0, "{report}");
    (r, report)
}

#[test]
fn json_carries_the_exact_name_and_path_and_the_copies_by_construction() {
    if !need_root("json_carries_the_exact_name_and_path_and_the_copies_by_construction") {
        return;
    }
    let (r, w) = trace_hostile(&["--json"]);
    let (name, path, page) = (w["name"].as_str().unwrap(), w["path"].as_str().unwrap(), u(&w["page_size"]));
    assert_eq!(name, "\x1b[31mEV\nIL\x07");
    assert!(path.ends_with("/map \x1b[2J\nfile\x07 (deleted)"), "{path:?}");
    let s = r.summary();
    for pid in [&w["parent"], &w["child"]] {
        let row = row(s, u(pid)).unwrap_or_else(|| panic!("no row for {pid}: {s}"));
        assert_eq!(row["comm"], name, "{row}");
    }
    let ep = s["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["child"] == w["child"])
        .unwrap_or_else(|| panic!("no episode for the fork: {s}"));
    assert_eq!((ep["kind"].as_str(), ep["parent"].clone()), (Some("fork"), w["parent"].clone()), "{ep}");
    assert_eq!((&ep["parent_comm"], &ep["child_comm"]), (&w["name"], &w["name"]), "{ep}");
    // The child wrote CHILD_PAGES of the file mapping and of the buffer, the
    // parent PARENT_PAGES of the buffer: each one copy, found in the region
    // it was written in (Python's own copies fall elsewhere).
    let regions: Vec<(String, u64)> = ep["top_regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["region"].as_str().unwrap().to_string(), u(&r["bytes"])))
        .collect();
    let anon = format!("[anon {:x}]", u(&w["anon_addr"]));
    assert!(regions.contains(&(path.to_string(), CHILD_PAGES * page)), "{regions:?}");
    assert!(regions.contains(&(anon, (CHILD_PAGES + PARENT_PAGES) * page)), "{regions:?}");
    assert!(u(&ep["child_copies"]) >= 2 * CHILD_PAGES, "{ep}");
    assert!(u(&ep["parent_copies"]) >= PARENT_PAGES, "{ep}");
}

#[test]
fn text_output_holds_no_control_byte_and_keeps_its_rows() {
    if !need_root("text_output_holds_no_control_byte_and_keeps_its_rows") {
        return;
    }
    // Every row shown, so that each is checked.
    let (r, w) = trace_hostile(&["--top", "0"]);
    // The workload shares stdout; its own report line is not ours to check.
    let ours: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with("{\"parent\"")).collect();
    for line in &ours {
        assert!(!line.chars().any(|c| c.is_control()), "control character in {line:?}");
    }
    assert!(!r.stderr.chars().any(|c| c.is_control() && c != '\n'), "{:?}", r.stderr);

    // Every table row has the header's columns (COMM is one word here),
    // aligned under them: the COMM column is as wide as the escaped name.
    let mut tables = 0;
    let mut rows_named = 0;
    for (i, line) in ours.iter().enumerate() {
        if !line.trim_start().starts_with("PID") {
            continue;
        }
        tables += 1;
        let columns = line.split_whitespace().count();
        for row in
            ours[i + 1..].iter().take_while(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        {
            assert_eq!(row.split_whitespace().count(), columns, "row {row:?} under {line:?}");
            assert_eq!(row.chars().count(), line.chars().count(), "row {row:?} under {line:?}");
            rows_named += row.contains(&format!(" {SHOWN_NAME}")) as usize;
        }
    }
    assert!(
        tables >= 1 && rows_named >= 2,
        "tables {tables}, rows naming the workload {rows_named}:\n{}",
        r.stdout
    );

    // The fork's episode, live and in the summary, with the file's region.
    let fork = format!("fork {SHOWN_NAME}[{}] -> {SHOWN_NAME}[{}]: ", w["parent"], w["child"]);
    let episodes: Vec<&&str> = ours.iter().filter(|l| l.contains(&fork)).collect();
    assert_eq!(episodes.len(), 2, "live and summary lines for {fork:?}:\n{}", r.stdout);
    for line in episodes {
        assert!(line.contains(&format!("/{SHOWN_FILE} ")), "{line}");
    }
    assert!(ours.iter().any(|l| l.starts_with("=== summary")), "{}", r.stdout);
    assert!(ours.iter().any(|l| l.starts_with("kernel totals: ")), "{}", r.stdout);
}
