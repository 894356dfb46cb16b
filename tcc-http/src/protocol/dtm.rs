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

/// The only transaction type served.
pub const TCC: &str = "tcc";

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

#[cfg(test)]
mod tests {
    use super::*;

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
