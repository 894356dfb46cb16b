//! `tcc-bench` as a smoke test: every mode completes transactions and the JSON report has the keys
//! the README's table is built from. A benchmark, not a timed test: no figure is asserted.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn every_mode_completes_and_the_json_has_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcc-bench"));
    // The recovery and history modes at a tiny size: a second or two each; each mode open-loop at
    // half its peak too.
    cmd.args(["--duration", "0.5", "--concurrency", "8", "--recover", "200", "--history", "2000"])
        .args(["--half-peak", "--json"])
        .arg(&json)
        .env_remove("TCC_COORDINATOR_BIN");
    let mut modes = vec!["raw", "embedded", "standalone", "coordinator_only"];
    // With a database (CI starts one), the PostgreSQL modes too.
    if let Ok(url) = std::env::var("TCC_TEST_POSTGRES_URL") {
        cmd.args(["--postgres", &url]);
        modes.extend(["postgres_1", "postgres_3"]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for mode in &modes {
        let half = format!("{mode}@half ");
        assert!(stdout.lines().any(|l| l.starts_with(&half)), "no row for {half}:\n{stdout}");
    }
    for mode in modes.into_iter().chain(["recover:", "history:"]) {
        assert!(stdout.lines().any(|l| l.starts_with(mode)), "no row for {mode}:\n{stdout}");
    }
    let report = std::fs::read_to_string(&json).unwrap();
    let half_peak = ["raw", "embedded", "standalone", "coordinator_only"]
        .into_iter()
        .flat_map(|m| ["rate", "p50_ms", "p99_ms"].map(|k| format!("\"{m}_half_peak_{k}\": ")));
    for key in [
        "\"raw_tx_per_s\": ",
        "\"embedded_tx_per_s\": ",
        "\"standalone_tx_per_s\": ",
        "\"coordinator_only_tx_per_s\": ",
        "\"embedded_ratio\": ",
        "\"standalone_ratio\": ",
        "\"recover_n\": ",
        "\"recover_healthy_ms\": ",
        "\"recover_s\": ",
        "\"recover_tx_per_s\": ",
        "\"recover_cancel_calls\": ",
        "\"history_n\": ",
        "\"history_fill_s\": ",
        "\"history_store_mb\": ",
        "\"history_standalone_empty_tx_per_s\": ",
        "\"history_standalone_filled_tx_per_s\": ",
        "\"history_standalone_ratio\": ",
        "\"history_embedded_empty_tx_per_s\": ",
        "\"history_embedded_filled_tx_per_s\": ",
        "\"history_embedded_ratio\": ",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(half_peak)
    {
        let key = key.as_str();
        let value = report.split(key).nth(1).and_then(|r| r.split([',', '\n']).next()).unwrap_or("missing");
        let v: f64 = value.trim().parse().unwrap_or_else(|_| panic!("{key} is {value:?} in\n{report}"));
        assert!(v > 0.0, "{key} {v}");
    }
}

#[test]
fn rounds_report_medians_and_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tcc-bench"))
        .args(["--duration", "0.3", "--concurrency", "4", "--modes", "raw,embedded", "--rounds", "3"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = |prefix: &str| stdout.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!((rows("round "), rows("raw "), rows("embedded ")), (3, 3 + 1, 3 + 1), "{stdout}");
    assert!(stdout.contains("over 3 rounds"), "{stdout}");
    let report = std::fs::read_to_string(&json).unwrap();
    let list = |key: &str| -> Vec<f64> {
        let rest =
            report.split(&format!("\"{key}\": [")).nth(1).unwrap_or_else(|| panic!("{key} in {report}"));
        rest.split(']').next().unwrap().split(", ").map(|v| v.parse().unwrap()).collect()
    };
    let (rates, ratios) = (list("embedded_tx_per_s_rounds"), list("embedded_ratio_rounds"));
    assert_eq!((rates.len(), ratios.len(), list("raw_tx_per_s_rounds").len()), (3, 3, 3));
    // The reported ratio is the median of the rounds' ratios.
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let reported: f64 = report
        .split("\"embedded_ratio\": ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((reported - sorted[1]).abs() < 0.001, "{reported} is not the median of {ratios:?}");
}

/// `--participant-db`: on PostgreSQL and on MySQL, both database modes complete transactions and
/// the report has `raw_db_tx_per_s` and `participant_db_ratio` (no figure asserted). Needs
/// `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL` (skipped without, failing with
/// `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1`).
#[test]
fn the_database_modes_report_raw_db_and_the_participant_db_ratio() {
    use tcc_core::barrier::sql::testing::{test_mysql_url, test_postgres_url};
    let (Some(pg), Some(my)) = (test_postgres_url(), test_mysql_url()) else { return };
    for url in [pg, my] {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bench.json");
        let out = Command::new(env!("CARGO_BIN_EXE_tcc-bench"))
            .args(["--duration", "0.5", "--concurrency", "8", "--modes", "raw_db,participant_db"])
            .args(["--participant-db", &url, "--json"])
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        for mode in ["raw_db ", "participant_db ", "participant_db over raw_db on "] {
            assert!(stdout.lines().any(|l| l.starts_with(mode)), "no row for {mode}:\n{stdout}");
        }
        let report = std::fs::read_to_string(&json).unwrap();
        for key in ["\"raw_db_tx_per_s\": ", "\"participant_db_tx_per_s\": ", "\"participant_db_ratio\": "] {
            let value =
                report.split(key).nth(1).and_then(|r| r.split([',', '\n']).next()).unwrap_or("missing");
            let v: f64 = value.trim().parse().unwrap_or_else(|_| panic!("{key} is {value:?} in\n{report}"));
            assert!(v > 0.0, "{key} {v}");
        }
    }
}
