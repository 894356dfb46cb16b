//! The `tcc-coordinator` binary as a real process: `kill -9` in the middle of phase two and a restart
//! on the same data finishes the transaction; SIGTERM stops it cleanly; the token never reaches its
//! logs.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Mode, Participant, eventually};
use tcc_http::client::TccClient;
use tcc_http::server::Token;
use tcc_http::server::native::StateView;

const LONG: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_tcc-coordinator");

struct Coordinator {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Coordinator {
    async fn spawn(dir: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Coordinator {
        let log = dir.join(format!("log-{}", uuid_like()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("TCC_LISTEN", format!("127.0.0.1:{port}"))
            .env("TCC_DATA_DIR", dir.join("data"))
            .env("TCC_RETRY_INITIAL", "50ms")
            .env("TCC_RETRY_MAX_BACKOFF", "200ms")
            .env("TCC_LEASE", "3s")
            .env("TCC_CALL_TIMEOUT", "2s")
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut c = Coordinator { child, url: format!("http://127.0.0.1:{port}"), log };
        let http = reqwest::Client::new();
        let health = format!("{}/healthz", c.url);
        eventually("the coordinator to listen", LONG, async || {
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!("the coordinator exited with {status}:\n{}", c.log());
            }
            http.get(&health).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        c
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL on unix
        self.child.wait().unwrap();
    }

    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        (status, std::fs::read_to_string(&self.log).unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uuid_like() -> String {
    tcc_core::Gid::generate().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_phase_two_then_restart_finishes_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flight = Participant::start(Mode::Healthy).await;
    let hotel = Participant::start(Mode::Healthy).await;
    let tc = Coordinator::spawn(dir.path(), port, &[]).await;
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
    let tc = Coordinator::spawn(dir.path(), port, &[]).await;
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
    let tc = Coordinator::spawn(dir.path(), port, &[]).await;
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
    let _tc = Coordinator::spawn(dir.path(), port, &[]).await;
    let done = client.wait(tx.gid(), LONG).await.unwrap();
    assert_eq!(done.state, StateView::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_reaches_the_logs() {
    let secret = "tok-3f9a1c77e0b24d5d";
    let wrong = "wrong-2c5e8b1a44f0";
    let dir = tempfile::tempdir().unwrap();
    let tc =
        Coordinator::spawn(dir.path(), free_port(), &[("TCC_TOKEN", secret), ("RUST_LOG", "trace")]).await;
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
