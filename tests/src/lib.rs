//! Shared helpers for the cross-crate and multi-process tests in `tests/tests/` and the `tcc-bench`
//! and `tcc-chaos` binaries.

pub mod chaos_check;
pub mod fault_proxy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tcc_core::transport::{BranchCall, CallError, Transport};
use tcc_core::{BranchId, Decision, Gid};

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
