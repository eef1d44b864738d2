//! `-u USER`: the launched command runs with that user's ids and groups,
//! and is traced as any other.

mod common;

use std::{os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use common::*;

/// `id OPTION nobody`: the user database as the system's own tool reads it.
fn id_of_nobody(option: &str) -> Vec<u64> {
    let out = Command::new("id").args([option, "nobody"]).output().expect("id");
    assert!(out.status.success(), "id {option} nobody: {}", String::from_utf8_lossy(&out.stderr));
    let mut ids: Vec<u64> =
        String::from_utf8(out.stdout).unwrap().split_whitespace().map(|n| n.parse().unwrap()).collect();
    ids.sort_unstable();
    ids
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v.as_array().expect("an id list").iter().map(u).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_command_run_as_nobody_has_its_ids_and_is_still_traced() {
    if !need_root("a_command_run_as_nobody_has_its_ids_and_is_still_traced") {
        return;
    }
    // A copy of the workload that `nobody` can run wherever the build is.
    let dir = std::env::temp_dir().join(format!("cow-trace-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let workload = dir.join("cow-workload");
    std::fs::copy(WORKLOAD, &workload).unwrap();
    std::fs::set_permissions(&workload, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut args = vec!["--json".to_string(), "-u".into(), "nobody".into(), "--".into()];
    args.push(workload.to_string_lossy().into_owned());
    args.extend(STANDARD.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run(&args, Duration::from_secs(120));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);

    let report = r.workload();
    let (uid, gid) = (id_of_nobody("-u"), id_of_nobody("-g"));
    assert_ne!(uid, [0], "nobody is not root here");
    // Real, effective, saved and filesystem ids alike: no way back to root.
    assert_eq!(ids(&report["uids"]), [uid[0]; 4], "{report}");
    assert_eq!(ids(&report["gids"]), [gid[0]; 4], "{report}");
    assert_eq!(ids(&report["groups"]), id_of_nobody("-G"), "{report}");

    // Still traced: its fork and the copies its construction implies.
    let s = r.summary();
    assert_eq!(s["ended_by"], "command exited");
    ok(workload::check_summary(s, report, &STANDARD, Timing::Sampled));
}
