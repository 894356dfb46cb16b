//! The `tcc-coordinator` binary as a child process, for the tests that kill it: started with quick
//! retries on a loopback port, its output in a log file, `kill -9` and `SIGTERM`. Included with
//! `#[path]` by the tests that use it (each passes `env!("CARGO_BIN_EXE_tcc-coordinator")`).
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use super::support::eventually;

const READY_WITHIN: Duration = Duration::from_secs(30);

/// A port free on the loopback interface now (a restart reuses it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `tcc-coordinator`; killed when dropped.
pub struct CoordinatorProcess {
    child: Child,
    /// Its base URL.
    pub url: String,
    log: std::path::PathBuf,
}

impl CoordinatorProcess {
    /// Starts `bin` on `port`, retrying phase two quickly (50 ms to 200 ms, a 2 s call timeout, a
    /// 3 s lease), with `env` on top (the store: `TCC_DATA_DIR` or `TCC_STORE`, and whatever the
    /// test needs), logging into a new file under `logs`; waits until it is ready.
    pub async fn spawn(
        bin: &str,
        logs: &std::path::Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> CoordinatorProcess {
        let log = logs.join(format!("log-{}", tcc_core::Gid::generate()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("TCC_LISTEN", format!("127.0.0.1:{port}"))
            .env("TCC_RETRY_INITIAL", "50ms")
            .env("TCC_RETRY_MAX_BACKOFF", "200ms")
            .env("TCC_LEASE", "3s")
            .env("TCC_CALL_TIMEOUT", "2s")
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut c = CoordinatorProcess { child, url: format!("http://127.0.0.1:{port}"), log };
        let http = reqwest::Client::new();
        let ready = format!("{}/readyz", c.url);
        eventually("the coordinator to be ready", READY_WITHIN, async || {
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!("the coordinator exited with {status}:\n{}", c.log());
            }
            http.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        c
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL on unix
        self.child.wait().unwrap();
    }

    /// SIGTERM; its exit status and its whole log.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        (status, self.log())
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
