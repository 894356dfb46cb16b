//! The wire protocol between initiators, the coordinator and participants (the native one; the
//! DTM-compatible one is in [`crate::dtm`]).
//!
//! A branch's *target* is the base URL of one TCC operation at a participant, for example
//! `http://127.0.0.1:8081/tcc/flights/hold_seat`. Its three phases are
//!
//! | phase   | request                  | body                                   | success |
//! |---------|--------------------------|----------------------------------------|---------|
//! | try     | `POST {target}/try`      | the request                            | 200, the result as the body |
//! | confirm | `POST {target}/confirm`  | the payload registered with the branch | 200 |
//! | cancel  | `POST {target}/cancel`   | the payload registered with the branch | 200 |
//!
//! Every call carries the transaction id, the branch id and the transaction's deadline in the
//! headers [`GID_HEADER`], [`BRANCH_HEADER`] and [`DEADLINE_HEADER`] (unix milliseconds), so a
//! participant cut off from the coordinator still knows when to release what it holds.
//!
//! Answers other than 200 carry an [`ErrorBody`]. The coordinator reads them as follows:
//! - 409 ([`REFUSED`]): the participant refused (business refusal, late try, suspended try). At try,
//!   the initiator cancels the transaction. Confirm and cancel are never refused for business
//!   reasons, so at phase two it is a permanent failure and the transaction is flagged.
//! - 410 ([`GONE`]): the reservation expired on the participant's own deadline: permanent.
//! - 400, 404, 405, 413, 422 and other 4xx: the call can never succeed as made: permanent.
//! - 3xx: never followed (the coordinator would otherwise call a URL nobody allowed): permanent.
//! - 408, 425, 429, 5xx, timeouts and connection errors: transient, retried with backoff.

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Header carrying the global transaction id.
pub const GID_HEADER: &str = "tcc-gid";
/// Header carrying the branch id.
pub const BRANCH_HEADER: &str = "tcc-branch";
/// Header carrying the transaction's deadline, in milliseconds since the unix epoch.
pub const DEADLINE_HEADER: &str = "tcc-deadline";

/// Path suffix of the try phase under a branch target.
pub const TRY_PATH: &str = "try";
/// Path suffix of the confirm phase under a branch target.
pub const CONFIRM_PATH: &str = "confirm";
/// Path suffix of the cancel phase under a branch target.
pub const CANCEL_PATH: &str = "cancel";

/// Status of a refusal by a participant.
pub const REFUSED: StatusCode = StatusCode::CONFLICT;
/// Status of a call for a reservation the participant already released on its own deadline.
pub const GONE: StatusCode = StatusCode::GONE;

/// Largest request body the coordinator and participants accept: 1 MiB.
pub const MAX_BODY: usize = 1 << 20;

/// The one shape of every error answer, from the coordinator and from participants.
///
/// ```
/// let body: tcc_http::protocol::ErrorBody =
///     serde_json::from_str(r#"{"code":"not_found","message":"transaction x not found"}"#).unwrap();
/// assert_eq!(body.code, "not_found");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code, for example `not_found` or `illegal_transition`.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
    /// Machine-readable details, when there are any: for a participant's business refusal, the
    /// refusal itself as JSON (the typed error a `#[tcc]` client decodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}
