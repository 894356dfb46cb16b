//! A small fault-injecting HTTP proxy, put between the callers of a participant (the initiator's
//! tries, the coordinator's confirms and cancels) and the participant itself.
//!
//! Each request draws one [`Fault`] (or none) at the configured rate: an injected 503 before or
//! after the participant acted, a connection dropped before or after it acted, a request held past
//! the caller's timeout and then dropped, a slow answer, or a late delivery (held past the caller's
//! timeout, dropped, and only then forwarded). Faults "after" are the nasty ones: the
//! participant did the work and the caller never hears of it, so the caller must retry and the
//! participant must recognise the duplicate. While the participant is down (its port closed), the
//! proxy answers 502, as a load balancer would.
//!
//! The proxy keeps listening when the participant behind it is killed and restarted on the same
//! address, so callers keep one URL.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answer 503 without forwarding.
    RefuseBefore,
    /// Forward, then answer 503 instead of the participant's answer.
    RefuseAfter,
    /// Close the connection without forwarding or answering.
    DropBefore,
    /// Forward, then close the connection instead of answering.
    DropAfter,
    /// Hold the request past the caller's timeout, then close the connection, never forwarding.
    Hang,
    /// Wait a little (up to [`SLOW_MAX`]), then forward and answer normally.
    Slow,
    /// Hold the request past the caller's timeout, close the connection, and only then forward it:
    /// the participant gets it after its caller gave up (a try landing after the initiator's
    /// cancel, a confirm repeated after the coordinator's retry).
    Late,
}

impl Fault {
    /// Every fault, in the order [`FaultProxy::counts`] reports them.
    pub const ALL: [Fault; 7] = [
        Fault::RefuseBefore,
        Fault::RefuseAfter,
        Fault::DropBefore,
        Fault::DropAfter,
        Fault::Hang,
        Fault::Slow,
        Fault::Late,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::RefuseBefore => "503_before",
            Fault::RefuseAfter => "503_after",
            Fault::DropBefore => "drop_before",
            Fault::DropAfter => "drop_after",
            Fault::Hang => "hang",
            Fault::Slow => "slow",
            Fault::Late => "late",
        }
    }
}

/// The longest a [`Fault::Slow`] request waits before it is forwarded.
pub const SLOW_MAX: Duration = Duration::from_millis(400);

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    http: reqwest::Client,
    /// Faults per million requests.
    rate_ppm: AtomicU32,
    hang: Duration,
    rng: Mutex<StdRng>,
    forwarded: AtomicU64,
    upstream_down: AtomicU64,
    late_pending: AtomicU64,
    counts: [AtomicU64; Fault::ALL.len()],
}

impl Shared {
    fn draw(&self) -> (Option<Fault>, Duration) {
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = self.rate_ppm.load(Ordering::Relaxed);
        let fault = (rng.random_range(0..1_000_000) < rate)
            .then(|| Fault::ALL[rng.random_range(0..Fault::ALL.len())]);
        let max = u64::try_from(SLOW_MAX.as_millis()).unwrap_or(u64::MAX);
        (fault, Duration::from_millis(rng.random_range(20..=max)))
    }
}

/// Why the proxy closed a connection without answering (hyper then drops the connection).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the fault proxy")]
struct Dropped;

/// A running proxy. Dropping it stops listening.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`. A [`Fault::Hang`] holds a request
    /// for `hang` (make it longer than the callers' timeouts); `seed` makes the draws repeatable.
    pub async fn start(upstream: SocketAddr, hang: Duration, seed: u64) -> std::io::Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            upstream,
            http,
            rate_ppm: AtomicU32::new(0),
            hang,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            forwarded: AtomicU64::new(0),
            upstream_down: AtomicU64::new(0),
            late_pending: AtomicU64::new(0),
            counts: Default::default(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared, task })
    }

    /// Where callers reach the participant through this proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the share (0 to 1) of requests that get a fault; 0 turns injection off.
    pub fn set_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
        self.shared.rate_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Faults injected so far, by kind, in [`Fault::ALL`] order.
    pub fn counts(&self) -> Vec<(Fault, u64)> {
        Fault::ALL.iter().zip(&self.shared.counts).map(|(f, c)| (*f, c.load(Ordering::Relaxed))).collect()
    }

    /// Requests forwarded to the participant (whatever was then answered).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// [`Fault::Late`] requests not forwarded yet.
    pub fn late_pending(&self) -> u64 {
        self.shared.late_pending.load(Ordering::Relaxed)
    }

    /// Requests answered 502 because the participant could not be reached.
    pub fn upstream_down(&self) -> u64 {
        self.shared.upstream_down.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            // An error here is a dropped connection, injected or not; either way the caller sees it.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    res
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let (fault, slow) = shared.draw();
    if let Some(f) = fault {
        shared.counts[Fault::ALL.iter().position(|x| *x == f).unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Some(Fault::RefuseBefore) => return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "injected fault")),
        Some(Fault::DropBefore) => return Err(Dropped),
        Some(Fault::Hang) => {
            tokio::time::sleep(shared.hang).await;
            return Err(Dropped);
        }
        Some(Fault::Slow) => tokio::time::sleep(slow).await,
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return Err(Dropped) };
    if fault == Some(Fault::Late) {
        tokio::time::sleep(shared.hang).await;
        shared.late_pending.fetch_add(1, Ordering::Relaxed);
        let late = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(slow).await;
            let _ = forward(&late, parts, body).await;
            late.late_pending.fetch_sub(1, Ordering::Relaxed);
        });
        return Err(Dropped);
    }
    let answer = forward(&shared, parts, body).await;
    match fault {
        Some(Fault::RefuseAfter) => Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "injected fault")),
        Some(Fault::DropAfter) => Err(Dropped),
        _ => Ok(answer),
    }
}

/// Sends the request on to the participant and returns its answer (502 if it cannot be reached).
async fn forward(shared: &Shared, parts: hyper::http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forward = shared.http.request(parts.method, format!("http://{}{path}", shared.upstream));
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST
            && name != hyper::header::CONTENT_LENGTH
            && name != hyper::header::CONNECTION
        {
            forward = forward.header(name, value);
        }
    }
    shared.forwarded.fetch_add(1, Ordering::Relaxed);
    match forward.body(body).send().await {
        Ok(res) => {
            let status = res.status();
            let content_type = res.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            match res.bytes().await {
                Ok(bytes) => {
                    let mut out = Response::new(Full::new(bytes));
                    *out.status_mut() = status;
                    if let Some(ct) = content_type {
                        out.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
                    }
                    out
                }
                Err(_) => plain(StatusCode::BAD_GATEWAY, "participant answer cut off"),
            }
        }
        Err(_) => {
            shared.upstream_down.fetch_add(1, Ordering::Relaxed);
            plain(StatusCode::BAD_GATEWAY, "participant unreachable")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn upstream() -> SocketAddr {
        let app = axum::Router::new().fallback(|body: Bytes| async move { body });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn without_faults_it_forwards_and_with_every_request_faulted_none_gets_through_cleanly() {
        let proxy = FaultProxy::start(upstream().await, Duration::from_millis(50), 7).await.unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{}/echo?x=1", proxy.addr());
        for _ in 0..20 {
            let res = http.post(&url).body("hello").send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.text().await.unwrap(), "hello");
        }
        assert_eq!(proxy.forwarded(), 20);
        proxy.set_rate(1.0);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let send = http.post(&url).body("hello").send();
            calls.spawn(async move { matches!(send.await, Ok(r) if r.status() == 200) });
        }
        let clean = calls.join_all().await.into_iter().filter(|ok| *ok).count() as u64;
        let counts = proxy.counts();
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 200);
        assert!(counts.iter().all(|(_, n)| *n > 0), "every kind drawn: {counts:?}");
        let count = |kind: Fault| counts.iter().find(|(f, _)| *f == kind).map_or(0, |(_, n)| *n);
        assert_eq!(clean, count(Fault::Slow), "only slow requests are answered 200");
        // Late ones reach the participant after their caller gave up; the ones refused, dropped or
        // held before forwarding never do.
        for _ in 0..200 {
            if proxy.late_pending() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reached =
            [Fault::RefuseAfter, Fault::DropAfter, Fault::Slow, Fault::Late].map(count).iter().sum::<u64>();
        assert_eq!(proxy.forwarded(), 20 + reached);
    }

    #[tokio::test]
    async fn a_participant_that_is_down_is_answered_502() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let proxy = FaultProxy::start(dead, Duration::from_millis(50), 1).await.unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let res = http.get(format!("http://{}/", proxy.addr())).send().await.unwrap();
        assert_eq!(res.status(), 502);
        assert_eq!(proxy.upstream_down(), 1);
    }
}
