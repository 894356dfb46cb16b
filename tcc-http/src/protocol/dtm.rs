//! DTM's conventions for calling a branch and reading its answer (see the module documentation of
//! `tcc_http::server::dtm`, "Calling branches"): the result words and how an answer is classified.
//! The coordinator's transport calls DTM-style branches with them; the DTM API answers with the
//! same words.

use tcc_core::transport::CallError;

/// The result word of a success.
pub const RESULT_SUCCESS: &str = "SUCCESS";
/// The result word of a failure; DTM clients look for it in bodies.
pub const RESULT_FAILURE: &str = "FAILURE";
/// The result word of an operation still in progress.
pub const RESULT_ONGOING: &str = "ONGOING";

/// The transaction type of TCC.
pub const TCC: &str = "tcc";
/// The transaction type of sagas.
pub const SAGA: &str = "saga";
/// The transaction type of two-phase messages.
pub const MSG: &str = "msg";

/// Most bytes of a participant's answer read.
pub const MAX_ANSWER: usize = 64 * 1024;
/// Most bytes of a participant's answer kept in an error message.
pub const MAX_ERROR_TEXT: usize = 512;

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// What a participant's answer to `op` means, by DTM's conventions (see `tcc_http::server::dtm`,
/// "Calling branches"): a 2xx without `FAILURE` or `ONGOING` in its body is done; anything else is
/// worth another try. DTM's server (`getBranchResult`) treats only a saga action's `FAILURE` as
/// final: a TCC confirm or cancel must not fail, so one that answers otherwise is called again until
/// it succeeds. tcc does the same under its retry policy, and flags the transaction only once the
/// policy is spent.
pub fn classify(op: &str, status: http::StatusCode, body: &[u8]) -> Result<(), CallError> {
    let text = || {
        let end = body.len().min(MAX_ERROR_TEXT);
        String::from_utf8_lossy(&body[..end]).into_owned()
    };
    let why = if status == http::StatusCode::TOO_EARLY || contains(body, RESULT_ONGOING) {
        " (ongoing)"
    } else if status == http::StatusCode::CONFLICT || contains(body, RESULT_FAILURE) {
        " (failure, which a confirm or cancel must not answer)"
    } else if status.is_redirection() {
        " (a redirect; tcc never follows redirects)"
    } else if status.is_success() {
        return Ok(());
    } else {
        ""
    };
    Err(CallError::Transient(format!("participant answered {status}{why} to {op}: {}", text())))
}

/// What a saga action's answer means: as [`classify`], except that a refusal (409 or `FAILURE`)
/// is final ([`CallError::Permanent`]): the saga is compensated, as DTM's server does.
pub fn classify_action(status: http::StatusCode, body: &[u8]) -> Result<(), CallError> {
    let ongoing = status == http::StatusCode::TOO_EARLY || contains(body, RESULT_ONGOING);
    if !ongoing && (status == http::StatusCode::CONFLICT || contains(body, RESULT_FAILURE)) {
        let end = body.len().min(MAX_ERROR_TEXT);
        return Err(CallError::Permanent(format!(
            "participant answered {status} (failure) to action: {}",
            String::from_utf8_lossy(&body[..end])
        )));
    }
    classify("action", status, body)
}

/// What a message's back-check (`query_prepared`) answer means, as DTM reads it: a 2xx without
/// `FAILURE` or `ONGOING` is committed; 409 or `FAILURE` rolled back; anything else (425 or
/// `ONGOING`, other statuses) says nothing yet.
pub fn classify_back_check(status: http::StatusCode, body: &[u8]) -> tcc_core::transport::LocalOutcome {
    use tcc_core::transport::LocalOutcome;
    let ongoing = status == http::StatusCode::TOO_EARLY || contains(body, RESULT_ONGOING);
    let end = body.len().min(MAX_ERROR_TEXT);
    let text = || String::from_utf8_lossy(&body[..end]).into_owned();
    if ongoing {
        LocalOutcome::Unknown(format!("back-check answered {status} (ongoing): {}", text()))
    } else if status == http::StatusCode::CONFLICT || contains(body, RESULT_FAILURE) {
        LocalOutcome::RolledBack
    } else if status.is_success() {
        LocalOutcome::Committed
    } else {
        LocalOutcome::Unknown(format!("back-check answered {status}: {}", text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_action_refusal_is_final_and_a_back_check_reads_dtm_words() {
        use http::StatusCode as S;
        use tcc_core::transport::LocalOutcome as L;
        let action = |s: S, body: &str| match classify_action(s, body.as_bytes()) {
            Ok(()) => "ok",
            Err(CallError::Transient(_)) => "transient",
            Err(CallError::Permanent(_)) => "refused",
        };
        assert_eq!(action(S::OK, r#"{"dtm_result":"SUCCESS"}"#), "ok");
        assert_eq!(action(S::CONFLICT, ""), "refused");
        assert_eq!(action(S::OK, r#"{"dtm_result":"FAILURE"}"#), "refused");
        assert_eq!(action(S::TOO_EARLY, ""), "transient");
        assert_eq!(action(S::INTERNAL_SERVER_ERROR, "oops"), "transient");
        let check = |s: S, body: &str| classify_back_check(s, body.as_bytes());
        assert_eq!(check(S::OK, r#"{"dtm_result":"SUCCESS"}"#), L::Committed);
        assert_eq!(check(S::CONFLICT, ""), L::RolledBack);
        assert_eq!(check(S::OK, "FAILURE"), L::RolledBack);
        assert!(matches!(check(S::OK, "ONGOING"), L::Unknown(_)));
        assert!(matches!(check(S::INTERNAL_SERVER_ERROR, ""), L::Unknown(_)));
        assert!(matches!(check(S::NOT_FOUND, ""), L::Unknown(_)));
    }

    #[test]
    fn only_a_success_is_final_everything_else_is_retried_as_dtm_retries_it() {
        use http::StatusCode as S;
        let kind = |s: S, body: &str| match classify("confirm", s, body.as_bytes()) {
            Ok(()) => "ok",
            Err(CallError::Transient(_)) => "transient",
            Err(CallError::Permanent(_)) => "permanent",
        };
        assert_eq!(kind(S::OK, r#"{"dtm_result":"SUCCESS"}"#), "ok");
        assert_eq!(kind(S::OK, ""), "ok");
        assert_eq!(kind(S::NO_CONTENT, ""), "ok");
        // Lower case is not DTM's result word.
        assert_eq!(kind(S::OK, "no failure here"), "ok");
        // A confirm or cancel that says FAILURE is retried (DTM retries it; tcc until its policy
        // is spent), whatever the status.
        assert_eq!(kind(S::OK, r#"{"dtm_result":"FAILURE"}"#), "transient");
        assert_eq!(kind(S::CONFLICT, ""), "transient");
        assert_eq!(kind(S::SERVICE_UNAVAILABLE, r#"{"dtm_result":"FAILURE"}"#), "transient");
        assert_eq!(kind(S::INTERNAL_SERVER_ERROR, "FAILURE"), "transient");
        assert_eq!(kind(S::OK, r#"{"dtm_result":"ONGOING"}"#), "transient");
        assert_eq!(kind(S::TOO_EARLY, ""), "transient");
        for other in [
            S::INTERNAL_SERVER_ERROR,
            S::TOO_MANY_REQUESTS,
            S::REQUEST_TIMEOUT,
            S::FOUND,
            S::TEMPORARY_REDIRECT,
            S::NOT_FOUND,
            S::BAD_REQUEST,
        ] {
            assert_eq!(kind(other, "oops"), "transient", "{other}");
        }
    }
}
