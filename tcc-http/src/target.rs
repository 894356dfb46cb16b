//! Where branches live, and which participant URLs this coordinator may call.
//!
//! A coordinator that calls any URL a client registers is a server-side request forgery engine. The
//! [`AllowList`] is checked when a branch is registered (a disallowed URL is refused with 422 and
//! never stored) and again before every call.

use std::net::IpAddr;

use url::Url;

/// A branch's target, as stored in [`tcc_core::Branch::target`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A native tcc participant operation: its base URL (see [`crate::protocol`]).
    Native(Url),
    /// A DTM-style branch: separate confirm and cancel URLs, called the way DTM's server calls them.
    Dtm {
        /// Called with `op=confirm`.
        confirm: Url,
        /// Called with `op=cancel`.
        cancel: Url,
    },
    /// One URL of a saga or message step, called as is: a saga's action or compensation or a
    /// message's action (`POST`, the payload as the body), or a message's back-check (`GET`).
    Step {
        /// How the URL is called.
        style: StepStyle,
        /// The URL.
        url: Url,
    },
}

/// How a [`Target::Step`] URL is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStyle {
    /// tcc's own: the payload as the body, tcc's `tcc-gid`, `tcc-branch` and `tcc-deadline`
    /// headers; answers read by status (see [`crate::protocol`]).
    Native,
    /// DTM's: its query parameters `gid`, `trans_type`, `branch_id` and `op` appended, answers read
    /// by DTM's result words (see `tcc_http::server::dtm`).
    Dtm {
        /// `saga` or `msg`.
        trans_type: &'static str,
        /// `action`, `compensate` or (a back-check) `msg`.
        op: &'static str,
    },
}

const DTM_PREFIX: &str = "dtm-tcc ";
const STEP_PREFIX: &str = "step ";
const DTM_STEP_PREFIX: &str = "dtm-step ";
/// The (trans_type, op) pairs a DTM step may have.
const DTM_STEP_OPS: [(&str, &str); 4] =
    [("saga", "action"), ("saga", "compensate"), ("msg", "action"), ("msg", "msg")];

impl Target {
    /// Parses a stored target: a URL, `dtm-tcc CONFIRM_URL CANCEL_URL`, `step URL` or
    /// `dtm-step TRANS_TYPE OP URL`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let url = |u: &str| Url::parse(u).map_err(|e| format!("invalid participant URL {u:?}: {e}"));
        if let Some(rest) = s.strip_prefix(STEP_PREFIX) {
            return Ok(Target::Step { style: StepStyle::Native, url: url(rest)? });
        }
        if let Some(rest) = s.strip_prefix(DTM_STEP_PREFIX) {
            let mut parts = rest.splitn(3, ' ');
            let (t, op, u) = match (parts.next(), parts.next(), parts.next()) {
                (Some(t), Some(op), Some(u)) => (t, op, u),
                _ => return Err(format!("invalid DTM step target {s:?}")),
            };
            let (trans_type, op) = DTM_STEP_OPS
                .into_iter()
                .find(|&(tt, o)| tt == t && o == op)
                .ok_or_else(|| format!("invalid DTM step target {s:?}"))?;
            return Ok(Target::Step { style: StepStyle::Dtm { trans_type, op }, url: url(u)? });
        }
        if let Some(rest) = s.strip_prefix(DTM_PREFIX) {
            let (confirm, cancel) =
                rest.split_once(' ').ok_or_else(|| format!("invalid DTM target {s:?}"))?;
            return Ok(Target::Dtm { confirm: url(confirm)?, cancel: url(cancel)? });
        }
        Ok(Target::Native(url(s)?))
    }

    /// The form stored in a branch; [`parse`](Self::parse) reads it back.
    ///
    /// ```
    /// use tcc_http::target::Target;
    /// let t = Target::Dtm { confirm: "http://127.0.0.1:1/c".parse().unwrap(), cancel: "http://127.0.0.1:1/x".parse().unwrap() };
    /// assert_eq!(Target::parse(&t.encode()).unwrap(), t);
    /// ```
    pub fn encode(&self) -> String {
        match self {
            Target::Native(u) => u.to_string(),
            Target::Dtm { confirm, cancel } => format!("{DTM_PREFIX}{confirm} {cancel}"),
            Target::Step { style: StepStyle::Native, url } => format!("{STEP_PREFIX}{url}"),
            Target::Step { style: StepStyle::Dtm { trans_type, op }, url } => {
                format!("{DTM_STEP_PREFIX}{trans_type} {op} {url}")
            }
        }
    }

    /// Every URL the coordinator may call for this target.
    pub fn urls(&self) -> Vec<&Url> {
        match self {
            Target::Native(u) => vec![u],
            Target::Dtm { confirm, cancel } => vec![confirm, cancel],
            Target::Step { url, .. } => vec![url],
        }
    }
}

/// The participant URLs a coordinator may call: those under one of the configured prefixes, or, with
/// none configured, loopback URLs only.
///
/// A prefix matches on whole components: scheme, host and port must be equal, and the path must
/// equal the prefix's path or continue it after a `/`. So `http://flights.internal/tcc` allows
/// `http://flights.internal/tcc/seat` but not `http://flights.internal/tcc-admin` nor
/// `http://flights.internal.evil.example/tcc`.
///
/// ```
/// use tcc_http::target::AllowList;
/// let only_loopback = AllowList::new(&[]).unwrap();
/// assert!(only_loopback.check("http://127.0.0.1:8080/tcc/seat").is_ok());
/// assert!(only_loopback.check("http://169.254.169.254/latest/meta-data").is_err());
///
/// let list = AllowList::new(&["http://flights.internal/tcc".to_string()]).unwrap();
/// assert!(list.check("http://flights.internal/tcc/seat").is_ok());
/// assert!(list.check("http://flights.internal/tcc-admin").is_err());
/// assert!(list.check("http://flights.internal.evil.example/tcc/seat").is_err());
/// ```
#[derive(Clone, Debug)]
pub struct AllowList {
    prefixes: Vec<Url>,
}

impl AllowList {
    /// An allow-list of URL prefixes; empty means loopback only.
    pub fn new(prefixes: &[String]) -> Result<AllowList, String> {
        let prefixes = prefixes
            .iter()
            .map(|p| {
                let u =
                    Url::parse(p).map_err(|e| format!("invalid --allow-participant prefix {p:?}: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
                    return Err(format!(
                        "--allow-participant prefix {p:?} must be an http(s) URL with a host"
                    ));
                }
                if u.query().is_some() || u.fragment().is_some() {
                    return Err(format!(
                        "--allow-participant prefix {p:?} must not have a query or fragment"
                    ));
                }
                Ok(u)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList { prefixes })
    }

    /// Whether only loopback URLs are allowed (no prefix configured).
    pub fn is_loopback_only(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The configured prefixes.
    pub fn prefixes(&self) -> &[Url] {
        &self.prefixes
    }

    /// Parses `url` and checks that it may be called.
    pub fn check(&self, url: &str) -> Result<Url, String> {
        let u = Url::parse(url).map_err(|e| format!("invalid participant URL {url:?}: {e}"))?;
        self.check_url(&u)?;
        Ok(u)
    }

    /// Checks that `u` may be called.
    pub fn check_url(&self, u: &Url) -> Result<(), String> {
        if !matches!(u.scheme(), "http" | "https") {
            return Err(format!("participant URL {u} must be http or https"));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("participant URLs must not carry credentials".to_owned());
        }
        if self.prefixes.is_empty() {
            return if is_loopback(u) {
                Ok(())
            } else {
                Err(format!(
                    "participant URL {u} is not allowed: with no --allow-participant prefix configured, \
                     only loopback participants are"
                ))
            };
        }
        if self.prefixes.iter().any(|p| under(p, u)) {
            Ok(())
        } else {
            Err(format!("participant URL {u} is not under any --allow-participant prefix"))
        }
    }
}

fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn under(prefix: &Url, u: &Url) -> bool {
    if prefix.scheme() != u.scheme()
        || prefix.host() != u.host()
        || prefix.port_or_known_default() != u.port_or_known_default()
    {
        return false;
    }
    let (p, path) = (prefix.path(), u.path());
    if p.ends_with('/') {
        path.starts_with(p)
    } else {
        path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only_by_default() {
        let a = AllowList::new(&[]).unwrap_or_else(|e| panic!("{e}"));
        for ok in ["http://127.0.0.1:1/x", "http://[::1]:9/x", "http://localhost/x", "https://127.3.4.5/"] {
            assert!(a.check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/x",
            "http://example.com/x",
            "http://localhost.example.com/x",
            "file:///etc/passwd",
            "http://user:pw@127.0.0.1/x",
            "gopher://127.0.0.1/",
            "not a url",
        ] {
            assert!(a.check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_match_whole_components() {
        let a = AllowList::new(&["http://svc:8080/tcc".into(), "https://h.example/api/".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.check("http://svc:8080/tcc").is_ok());
        assert!(a.check("http://svc:8080/tcc/a/b?x=1").is_ok());
        assert!(a.check("https://h.example:443/api/x").is_ok());
        for bad in [
            "http://svc:8081/tcc/a",
            "https://svc:8080/tcc/a",
            "http://svc:8080/tccx",
            "http://svc:8080/",
            "http://127.0.0.1/x",
            "https://h.example/apix",
        ] {
            assert!(a.check(bad).is_err(), "{bad}");
        }
        assert!(AllowList::new(&["ftp://x/".into()]).is_err());
        assert!(AllowList::new(&["http://x/?q".into()]).is_err());
    }

    #[test]
    fn targets_round_trip() {
        for s in [
            "http://127.0.0.1:1/tcc/op",
            "dtm-tcc http://127.0.0.1:1/c?a=b http://127.0.0.1:1/x",
            "step http://127.0.0.1:1/pay",
            "dtm-step saga compensate http://127.0.0.1:1/refund?x=1",
            "dtm-step msg msg http://127.0.0.1:1/query",
        ] {
            let t = Target::parse(s).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.encode(), s);
        }
        assert!(Target::parse("dtm-tcc http://a/").is_err());
        assert!(Target::parse("dtm-step saga confirm http://a/").is_err());
        assert!(Target::parse("dtm-step saga").is_err());
        assert!(Target::parse("").is_err());
    }
}
