//! Shared helpers for the cross-crate and multi-process tests in `tests/tests/` and the `tcc-bench`
//! and `tcc-chaos` binaries.

pub mod bench_db;
pub mod chaos_check;
pub mod fault_proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tcc_core::transport::{BranchCall, CallError, Transport};
use tcc_core::{BranchId, Decision, Gid};

/// A free loopback TCP port (bound, then released for the caller's process to bind).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `tcc-coordinator` binary a harness starts: `explicit` (its flag) if given, else the one cargo
/// built next to the running binary, unless that one was built well before the running one: it may
/// then predate the code under test (`cargo run --bin tcc-chaos` does not rebuild it). One cargo run
/// builds both within minutes. `None`: the harness serves the same server code itself.
pub fn coordinator_binary(explicit: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    if let Some(bin) = explicit {
        return Some(bin.to_owned());
    }
    let me = std::env::current_exe().ok()?;
    let sibling = me.with_file_name(format!("tcc-coordinator{}", std::env::consts::EXE_SUFFIX));
    let built = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!(
        (built(&sibling), built(&me)),
        (Some(a), Some(b)) if a + std::time::Duration::from_secs(600) >= b
    );
    fresh.then_some(sibling)
}

type Seen = Arc<Mutex<HashMap<(Gid, BranchId), Vec<Decision>>>>;

/// Participants kept in memory: they answer (or, when `hang` is set, never answer) and count what
/// they were told per branch.
#[derive(Clone, Debug, Default)]
pub struct MemParticipants {
    hang: bool,
    seen: Seen,
}

impl MemParticipants {
    /// Participants that answer every call.
    pub fn healthy() -> MemParticipants {
        MemParticipants::default()
    }

    /// Participants that never answer, so phase two stays in flight.
    pub fn hanging() -> MemParticipants {
        MemParticipants { hang: true, ..MemParticipants::default() }
    }

    /// The decisions branch `branch` of `gid` was told, in order.
    pub fn seen(&self, gid: &Gid, branch: &BranchId) -> Vec<Decision> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(&(gid.clone(), branch.clone())).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl Transport for MemParticipants {
    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.entry((call.gid.clone(), call.branch.id.clone())).or_default().push(call.decision);
        Ok(())
    }
}
