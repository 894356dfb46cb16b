//! Two-phase messages on the participant side: the initiator's local transaction, committed with
//! its barrier record ([`Participant::local_transaction`]), and the back-check route the coordinator
//! asks when a message is still prepared at its timeout (`GET {base}/back-check?gid=...`).

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tcc_core::barrier::{ActionOutcome, BackCheckOutcome, BarrierError, Op, Refusal, Step, decide};
use tcc_core::{BranchId, Gid, Timestamp};
use tracing::{debug, warn};

use super::async_calls::MAX_RUNS;
use super::{GID_HEADER, Participant, Runtime, Store};
use crate::error::ApiError;
use crate::protocol::REFUSED;
use crate::staged::{CommitAbort, Disposition, Phase as CtxPhase, TccContext, TccError};

/// The branch id under which a message's local transaction is recorded in the participant's
/// barrier (DTM's, so DTM's back-check calls find it too). A message's actions are its branches
/// `01`, `02`, ...: they never collide with it.
pub const LOCAL_BRANCH: &str = "00";

/// The [`LOCAL_BRANCH`] as a branch id.
pub(super) fn local_branch() -> BranchId {
    match LOCAL_BRANCH.parse() {
        Ok(b) => b,
        Err(_) => unreachable!("{LOCAL_BRANCH:?} is a valid branch id"),
    }
}

/// Why a message's local transaction did not commit (or may not have). What to do with the
/// prepared message follows from the variant:
///
/// | variant | committed? | the message |
/// |---|---|---|
/// | [`Business`](LocalError::Business), [`RolledBack`](LocalError::RolledBack), [`Contended`](LocalError::Contended), [`Failed`](LocalError::Failed) | no | abort it (or let the back-check abort it) |
/// | [`AlreadyCommitted`](LocalError::AlreadyCommitted) | yes, earlier | submit it |
/// | [`Unknown`](LocalError::Unknown) | maybe | leave it: at its timeout the back-check tells |
#[derive(Debug, thiserror::Error)]
pub enum LocalError<E> {
    /// The business closure returned this error; nothing was committed.
    #[error("the local transaction failed: {0}")]
    Business(E),
    /// The message's back-check came first and settled it as rolled back, so this local
    /// transaction may never commit: nothing was committed.
    #[error("the message's back-check already settled it as rolled back; nothing was committed")]
    RolledBack,
    /// A local transaction of this message already committed; nothing ran now.
    #[error("the local transaction of this message already committed; nothing ran now")]
    AlreadyCommitted,
    /// Its writes kept conflicting with other writes ([`MAX_RUNS`] runs); nothing was committed.
    #[error("the local transaction kept conflicting with other writes; nothing was committed")]
    Contended,
    /// The participant failed before committing (storage, a closure's store fault); nothing was
    /// committed.
    #[error("the local transaction failed: {0}")]
    Failed(String),
    /// The commit's outcome is unknown (committed, but not known to be on disk): the back-check
    /// settles it.
    #[error("the local transaction's outcome is unknown: {0}")]
    Unknown(String),
}

impl<E> LocalError<E> {
    /// Whether the local transaction certainly did not commit, so the message can be aborted now.
    ///
    /// ```
    /// use tcc_http::participant::LocalError;
    /// assert!(LocalError::<String>::RolledBack.not_committed());
    /// assert!(!LocalError::<String>::AlreadyCommitted.not_committed());
    /// assert!(!LocalError::<String>::Unknown("flush".into()).not_committed());
    /// ```
    pub fn not_committed(&self) -> bool {
        matches!(
            self,
            LocalError::Business(_) | LocalError::RolledBack | LocalError::Contended | LocalError::Failed(_)
        )
    }
}

impl Participant {
    /// Runs the local transaction of the two-phase message `gid`: `f`'s writes, staged in a
    /// [`TccContext`] as an operation's are, commit in one sled transaction with the barrier
    /// record that the message's back-check reads. Once it returns `Ok`, the writes are on disk
    /// and the back-check answers "committed"; if the back-check came first, the local transaction
    /// is refused ([`LocalError::RolledBack`]), so the answer the coordinator acted on stays true.
    ///
    /// `f` may run more than once (after a version conflict, on fresh reads): keep every effect in
    /// the context. An error whose [`TccError::disposition`] is [`Disposition::Retry`] runs it again
    /// too; any other error commits nothing ([`LocalError::Business`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tcc_http::{DurableDb, Gid, Participant, TccContext};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let db = DurableDb::temporary()?;
    /// let orders = Participant::builder().sled(&db, &["orders"])?;
    /// let gid = Gid::generate();
    /// // (First prepare the message with the coordinator, its back-check at
    /// // {this participant's base}/back-check; then:)
    /// orders
    ///     .local_transaction(&gid, |ctx: TccContext| async move {
    ///         ctx.insert_new("orders", "order-7", &"placed")?;
    ///         Ok::<_, tcc_http::staged::StoreError>(())
    ///     })
    ///     .await?;
    /// // (then submit the message.) Running it again commits nothing:
    /// let again = orders.local_transaction(&gid, |_ctx| async { Ok::<_, tcc_http::staged::StoreError>(()) });
    /// assert!(matches!(again.await, Err(tcc_http::participant::LocalError::AlreadyCommitted)));
    /// # Ok(()) }
    /// ```
    pub async fn local_transaction<T, E, F, Fut>(&self, gid: &Gid, f: F) -> Result<T, LocalError<E>>
    where
        F: Fn(TccContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: TccError,
    {
        let sled = self.sled_parts();
        let branch = local_branch();
        let _branch = self.rt.locks.lock(gid, &branch).await;
        for _ in 0..MAX_RUNS {
            let existing = sled.barrier.get(gid, &branch).map_err(|e| LocalError::Failed(e.to_string()))?;
            match decide(Op::Local { request: &[] }, existing.as_ref(), sled.barrier.clock().now()) {
                Step::Run(_) => {}
                Step::Duplicate(_) => return Err(LocalError::AlreadyCommitted),
                Step::Refuse(Refusal::RolledBack) => return Err(LocalError::RolledBack),
                Step::Refuse(r) => return Err(LocalError::Failed(r.to_string())),
                Step::RecordOnly(_) | Step::Nothing => {
                    return Err(LocalError::Failed("the barrier does not run this local transaction".into()));
                }
            }
            let (ctx, handle) = TccContext::new(
                Arc::clone(&sled.trees),
                gid.clone(),
                branch.clone(),
                Timestamp(0),
                CtxPhase::Local,
                "local",
            );
            let result = f(ctx).await;
            let stage = handle.close();
            if let Some(fault) = stage.fault() {
                return Err(LocalError::Failed(fault.to_string()));
            }
            let value = match result {
                Ok(v) => v,
                Err(e) if e.disposition() == Disposition::Retry => continue,
                Err(e) => return Err(LocalError::Business(e)),
            };
            let (barrier, g, b) = (sled.barrier.clone(), gid.clone(), branch.clone());
            let committed = tokio::task::spawn_blocking(move || {
                // The barrier runs this only where no record exists yet: a fresh local transaction.
                barrier.local(&g, &b, &[], |tx| stage.commit(tx.trees()))
            })
            .await
            .map_err(|e| LocalError::Failed(format!("the commit panicked: {e}")))?;
            match committed {
                Ok(ActionOutcome::Ran) => {
                    self.rt.durable().await.map_err(|e| LocalError::Unknown(e.to_string()))?;
                    debug!(%gid, "message local transaction committed");
                    return Ok(value);
                }
                Ok(ActionOutcome::Duplicate) => return Err(LocalError::AlreadyCommitted),
                Err(BarrierError::Business(CommitAbort::Conflict | CommitAbort::Retry)) => continue,
                Err(BarrierError::Refused(Refusal::RolledBack)) => return Err(LocalError::RolledBack),
                Err(e @ BarrierError::NotFlushed(_)) => return Err(LocalError::Unknown(e.to_string())),
                Err(e) => return Err(LocalError::Failed(e.to_string())),
            }
        }
        Err(LocalError::Contended)
    }
}

/// The back-check's query: DTM's (`gid`, `trans_type`, `branch_id`, `op`) or tcc's (`gid`).
#[derive(Debug, serde::Deserialize)]
pub(super) struct BackCheckQuery {
    gid: Option<String>,
    branch_id: Option<String>,
}

/// `GET {base}/back-check?gid=...`: whether the message's local transaction committed. 200
/// `{"dtm_result":"SUCCESS"}` when it did; 409 `rolled_back` when it did not (and now never will).
pub(super) async fn back_check(
    State(rt): State<Arc<Runtime>>,
    query: Result<Query<BackCheckQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    match serve_back_check(&rt, query, &headers).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn serve_back_check(
    rt: &Runtime,
    query: Result<Query<BackCheckQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::malformed(e.body_text()))?;
    let from_header = super::header(headers, GID_HEADER)?;
    let gid = match (query.gid.as_deref(), from_header) {
        (Some(q), Some(h)) if q != h => {
            return Err(ApiError::malformed(format!(
                "the gid of the query and of header {GID_HEADER} differ"
            )));
        }
        (Some(g), _) | (None, Some(g)) => g,
        (None, None) => {
            return Err(ApiError::malformed(format!("gid is missing (query or header {GID_HEADER})")));
        }
    };
    let gid: Gid = gid.parse().map_err(|e| ApiError::malformed(format!("gid: {e}")))?;
    if let Some(b) = query.branch_id.as_deref().filter(|b| *b != LOCAL_BRANCH) {
        return Err(ApiError::malformed(format!(
            "branch_id {b:?}: a message's local transaction is branch {LOCAL_BRANCH:?}"
        )));
    }
    let branch = local_branch();
    let outcome = match &rt.store {
        Store::Sled(sled) => {
            let (barrier, g, b) = (sled.barrier.clone(), gid.clone(), branch.clone());
            let r = tokio::task::spawn_blocking(move || barrier.back_check(&g, &b))
                .await
                .map_err(|_| super::panicked())?;
            let outcome = r.map_err(|e| super::barrier_error(e.widen()))?;
            rt.durable().await.map_err(|e| super::not_flushed(e.to_string()))?;
            outcome
        }
        #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
        Store::Sql(barrier) => barrier.back_check(&gid, &branch).await.map_err(super::sql::sql_error)?,
    };
    debug!(%gid, ?outcome, "message back-check");
    Ok(match outcome {
        BackCheckOutcome::Committed => {
            let mut res =
                (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"dtm_result":"SUCCESS"}"#)
                    .into_response();
            res.headers_mut().insert(super::OUTCOME_HEADER, HeaderValue::from_static("committed"));
            res
        }
        BackCheckOutcome::RolledBack => {
            warn!(%gid, "message back-check: the local transaction did not commit; settled as rolled back");
            ApiError::new(
                REFUSED,
                "rolled_back",
                "the message's local transaction did not commit, and now never will",
            )
            .with_detail(serde_json::json!({ "dtm_result": "FAILURE" }))
            .into_response()
        }
    })
}

/// 405 for anything but `GET` on the back-check route.
pub(super) async fn get_only() -> Response {
    let mut res =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "the back-check takes GET only")
            .into_response();
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    res
}
