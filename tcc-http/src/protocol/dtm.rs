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

/// What a participant's answer to `op` means, by DTM's conventions (see `tcc_http::server::dtm`, "Calling branches").
pub fn classify(op: &str, status: http::StatusCode, body: &[u8]) -> Result<(), CallError> {
    let text = || {
        let end = body.len().min(MAX_ERROR_TEXT);
        String::from_utf8_lossy(&body[..end]).into_owned()
    };
    if status == http::StatusCode::TOO_EARLY || contains(body, RESULT_ONGOING) {
        return Err(CallError::Transient(format!(
            "participant answered {status} (ongoing) to {op}: {}",
            text()
        )));
    }
    if status == http::StatusCode::CONFLICT || contains(body, RESULT_FAILURE) {
        return Err(CallError::Permanent(format!(
            "participant answered {status} (failure) to {op}, which must not fail: {}",
            text()
        )));
    }
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        return Err(CallError::Permanent(format!(
            "participant answered {status} (a redirect) to {op}; tcc never follows redirects"
        )));
    }
    let message = format!("participant answered {status} to {op}: {}", text());
    let transient =
        status.is_server_error() || status.is_informational() || matches!(status.as_u16(), 408 | 429);
    Err(if transient { CallError::Transient(message) } else { CallError::Permanent(message) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_dtm_reads_them() {
        use http::StatusCode as S;
        let kind = |s: S, body: &str| match classify("confirm", s, body.as_bytes()) {
            Ok(()) => "ok",
            Err(CallError::Transient(_)) => "transient",
            Err(CallError::Permanent(_)) => "permanent",
        };
        assert_eq!(kind(S::OK, r#"{"dtm_result":"SUCCESS"}"#), "ok");
        assert_eq!(kind(S::OK, ""), "ok");
        assert_eq!(kind(S::NO_CONTENT, ""), "ok");
        assert_eq!(kind(S::OK, r#"{"dtm_result":"FAILURE"}"#), "permanent");
        assert_eq!(kind(S::OK, r#"{"dtm_result":"ONGOING"}"#), "transient");
        assert_eq!(kind(S::CONFLICT, ""), "permanent");
        assert_eq!(kind(S::TOO_EARLY, ""), "transient");
        // ONGOING is looked for first, as DTM does.
        assert_eq!(kind(S::CONFLICT, "ONGOING"), "transient");
        assert_eq!(kind(S::INTERNAL_SERVER_ERROR, "oops"), "transient");
        assert_eq!(kind(S::INTERNAL_SERVER_ERROR, "FAILURE"), "permanent");
        assert_eq!(kind(S::SERVICE_UNAVAILABLE, ""), "transient");
        assert_eq!(kind(S::TOO_MANY_REQUESTS, ""), "transient");
        assert_eq!(kind(S::REQUEST_TIMEOUT, ""), "transient");
        assert_eq!(kind(S::FOUND, ""), "permanent");
        assert_eq!(kind(S::TEMPORARY_REDIRECT, ""), "permanent");
        assert_eq!(kind(S::NOT_FOUND, ""), "permanent");
        assert_eq!(kind(S::BAD_REQUEST, ""), "permanent");
        // Lower case is not DTM's result word.
        assert_eq!(kind(S::OK, "no failure here"), "ok");
    }
}
