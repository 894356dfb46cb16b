//! The `tcc-coordinator` binary as a real process: `kill -9` in the middle of phase two and a restart
//! on the same data finishes the transaction; SIGTERM stops it cleanly; the token never reaches its
//! logs.
#![allow(clippy::unwrap_used)]

#[path = "support/coordinator_process.rs"]
mod coordinator_process;
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use coordinator_process::{CoordinatorProcess, free_port};
use support::{Mode, Participant, eventually};
use tcc_http::client::TccClient;
use tcc_http::server::Token;
use tcc_http::server::native::StateView;

const LONG: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_tcc-coordinator");

/// The binary on `port` with its sled store in `dir` (a restart on the same `dir` and `port` finds
/// everything again), `extra` settings on top.
async fn spawn(dir: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> CoordinatorProcess {
    let data = dir.join("data");
    let mut env = vec![("TCC_DATA_DIR", data.to_str().unwrap())];
    env.extend_from_slice(extra);
    CoordinatorProcess::spawn(BIN, dir, port, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_phase_two_then_restart_finishes_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flight = Participant::start(Mode::Healthy).await;
    let hotel = Participant::start(Mode::Healthy).await;
    let mut tc = spawn(dir.path(), port, &[]).await;
    let client = TccClient::remote(&tc.url, None).unwrap();

    let tx = client.begin(LONG).await.unwrap();
    tx.try_branch("flight", &flight.target("seat"), b"1A".to_vec()).await.unwrap();
    tx.try_branch("hotel", &hotel.target("room"), b"7".to_vec()).await.unwrap();
    hotel.set_mode(Mode::FailPhaseTwo);
    let decided = tx.confirm().await.unwrap();
    assert_eq!(decided.decision, Some(tcc_http::server::native::DecisionView::Confirm));
    let gid = tx.gid().as_str().to_owned();
    eventually("phase two to be in flight", LONG, async || hotel.phases(&gid).iter().any(|p| p == "confirm"))
        .await;
    tc.kill9();

    hotel.set_mode(Mode::Healthy);
    let tc = spawn(dir.path(), port, &[]).await;
    let done = client.wait(tx.gid(), LONG).await.unwrap();
    assert_eq!(done.state, StateView::Confirmed, "log:\n{}", tc.log());
    assert_eq!(flight.phases(&gid).first().map(String::as_str), Some("try"));
    assert!(flight.phases(&gid).iter().skip(1).all(|p| p == "confirm"), "{:?}", flight.phases(&gid));
    assert_eq!(hotel.phases(&gid).last().map(String::as_str), Some("confirm"));
    assert!(!hotel.phases(&gid).iter().any(|p| p == "cancel"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_work_resumes_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hotel = Participant::start(Mode::Healthy).await;
    let tc = spawn(dir.path(), port, &[]).await;
    let client = TccClient::remote(&tc.url, None).unwrap();
    let tx = client.begin(LONG).await.unwrap();
    tx.try_branch("hotel", &hotel.target("room"), b"7".to_vec()).await.unwrap();
    hotel.set_mode(Mode::FailPhaseTwo);
    tx.cancel().await.unwrap();
    let (status, log) = tc.terminate();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("stopped; unfinished transactions resume"), "{log}");

    hotel.set_mode(Mode::Healthy);
    let _tc = spawn(dir.path(), port, &[]).await;
    let done = client.wait(tx.gid(), LONG).await.unwrap();
    assert_eq!(done.state, StateView::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_the_logs() {
    let secret = "tok-3f9a1c77e0b24d5d";
    let wrong = "wrong-2c5e8b1a44f0";
    let dir = tempfile::tempdir().unwrap();
    let tc = spawn(dir.path(), free_port(), &[("TCC_TOKEN", secret), ("RUST_LOG", "trace")]).await;
    let http = reqwest::Client::new();
    let begin = format!("{}/v1/transactions", tc.url);
    assert_eq!(
        http.post(&begin).bearer_auth(wrong).json(&serde_json::json!({})).send().await.unwrap().status(),
        401
    );
    let ok = TccClient::remote(&tc.url, Some(Token::new(secret).unwrap())).unwrap();
    let tx = ok.begin(LONG).await.unwrap();
    tx.cancel().await.unwrap();
    let (_, log) = tc.terminate();
    assert!(log.contains("tcc-coordinator listening"), "{log}");
    assert!(!log.contains(secret), "the token appears in the log");
    assert!(!log.contains(wrong), "a presented token appears in the log");
}

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").stdout(Stdio::piped()).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "TCC_LISTEN"),
        ("--data-dir", "TCC_DATA_DIR"),
        ("--token", "TCC_TOKEN"),
        ("--allow-participant", "TCC_ALLOW_PARTICIPANT"),
        ("--default-timeout", "TCC_DEFAULT_TIMEOUT"),
        ("--retry-initial", "TCC_RETRY_INITIAL"),
        ("--retry-max-attempts", "TCC_RETRY_MAX_ATTEMPTS"),
        ("--call-timeout", "TCC_CALL_TIMEOUT"),
    ] {
        assert!(help.contains(flag) && help.contains(env), "{flag} / {env} missing from --help");
    }
    let bad = Command::new(BIN).args(["--allow-participant", "ftp://nope/"]).env_clear().output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "bad configuration exits with 2");
}
