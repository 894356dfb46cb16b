//! Streamed batch answers: `application/x-ndjson`, one JSON line per call of a batch, written as
//! each call is done, so one slow call holds up no other's answer.
//!
//! The coordinator answers `POST /v1/batch` so, and the participant runtime its phase-two batches
//! and batches of tries. [`Lines`] is the answer's body on the serving side; [`read_lines`] reads
//! one on the calling side.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;

/// The content type of a streamed batch answer.
pub(crate) const CONTENT_TYPE: &str = "application/x-ndjson";

/// The `Accept` header of a batch request: a streamed answer, or a whole one.
pub(crate) const ACCEPT: &str = "application/x-ndjson, application/json";

/// Whether `media` (a content type or one entry of `Accept`, parameters and all) names
/// [`CONTENT_TYPE`].
fn names_ndjson(media: &str) -> bool {
    media.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(CONTENT_TYPE))
}

/// Whether `res` is a streamed batch answer (by its content type).
pub(crate) fn is_ndjson(res: &reqwest::Response) -> bool {
    res.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(names_ndjson)
}

/// Whether a request's `Accept` header takes a streamed batch answer.
pub(crate) fn accepted(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(names_ndjson))
}

/// An answer's body: the lines as they come; ends when every sender is gone. Each line comes with
/// whether it may wait for others (`false`: one of `quick` lines held until all of them are there).
///
/// Lines finished together go in one frame, so one write, and the client reads them in one go:
/// - The `quick` lines (the coordinator's operations that do not wait for phase two) are held until
///   the last of them is there: they finish within a flush or two of each other.
/// - After that, lines go as they come, but a ready line yields once first. The calls of a batch
///   tend to finish in bunches (one flush answers all its writers) and each is woken on its own: the
///   yield lets those woken with it add their lines.
///
/// Measured with `tcc-bench` (coordinator_only, `perf stat`), these took the coordinator's `writev`
/// calls from about 1.2 to 0.8 per transaction.
#[derive(Debug)]
pub(crate) struct Lines {
    rx: mpsc::Receiver<(Bytes, bool)>,
    ready: Vec<u8>,
    yielded: bool,
    /// Quick lines that have not come yet.
    quick: usize,
}

impl Lines {
    /// The body of the lines sent on `rx`, `quick` of them held until all those are there.
    pub(crate) fn new(rx: mpsc::Receiver<(Bytes, bool)>, quick: usize) -> Lines {
        Lines { rx, ready: Vec::new(), yielded: false, quick }
    }

    /// The body of `first`, then of the lines sent on `rx`: `first` goes in the first frame at
    /// once (with whatever else is there by then), so that it leaves with the answer's head.
    pub(crate) fn starting_with(rx: mpsc::Receiver<(Bytes, bool)>, first: Bytes) -> Lines {
        Lines { rx, ready: first.to_vec(), yielded: true, quick: 0 }
    }
}

impl http_body::Body for Lines {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let ended = loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some((line, may_wait))) => {
                    this.ready.extend_from_slice(&line);
                    if !may_wait {
                        this.quick = this.quick.saturating_sub(1);
                    }
                }
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        };
        if this.ready.is_empty() {
            return if ended { Poll::Ready(None) } else { Poll::Pending };
        }
        if !ended {
            if this.quick > 0 {
                return Poll::Pending;
            }
            if !this.yielded {
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        this.yielded = false;
        let frame = Bytes::from(std::mem::take(&mut this.ready));
        Poll::Ready(Some(Ok(http_body::Frame::data(frame))))
    }
}

/// Why reading a streamed answer stopped early.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The connection failed.
    Transport(reqwest::Error),
    /// A line was longer than allowed, or `each` refused it: the answer is not what it should be.
    Line(String),
}

/// Reads the lines of `res` as they come, handing each (without its newline) to `each`, until the
/// answer ends. A line over `max_line` bytes, or one `each` refuses, stops the reading. A last line
/// without its newline is a cut answer and is not handed on.
pub(crate) async fn read_lines(
    res: &mut reqwest::Response,
    max_line: usize,
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), ReadError> {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(ReadError::Transport)? {
        buf.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = buf[start..].iter().position(|b| *b == b'\n').map(|n| start + n) {
            each(&buf[start..end]).map_err(ReadError::Line)?;
            start = end + 1;
        }
        buf.drain(..start);
        if buf.len() > max_line {
            return Err(ReadError::Line(format!("a batch answer line is over {max_line} bytes")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    fn poll(body: &mut Lines) -> Poll<Option<Vec<u8>>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(body).poll_frame(&mut cx).map(|frame| {
            frame.map(|f| f.unwrap_or_else(|e| match e {}).into_data().unwrap_or_default().to_vec())
        })
    }

    #[tokio::test]
    async fn lines_finished_together_go_in_one_frame() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = Lines::new(rx, 2);
        assert_eq!(poll(&mut body), Poll::Pending);
        tx.send((Bytes::from_static(b"a\n"), false)).await.unwrap_or_else(|_| unreachable!());
        assert_eq!(poll(&mut body), Poll::Pending, "held until the other quick line is there");
        tx.send((Bytes::from_static(b"b\n"), false)).await.unwrap_or_else(|_| unreachable!());
        assert_eq!(poll(&mut body), Poll::Pending, "yields once");
        assert_eq!(poll(&mut body), Poll::Ready(Some(b"a\nb\n".to_vec())));
        // A line that may wait: after one yield, with whatever came meanwhile.
        tx.send((Bytes::from_static(b"c\n"), true)).await.unwrap_or_else(|_| unreachable!());
        assert_eq!(poll(&mut body), Poll::Pending);
        tx.send((Bytes::from_static(b"d\n"), true)).await.unwrap_or_else(|_| unreachable!());
        assert_eq!(poll(&mut body), Poll::Ready(Some(b"c\nd\n".to_vec())));
        // The last line goes at once when nothing else can come.
        tx.send((Bytes::from_static(b"e\n"), true)).await.unwrap_or_else(|_| unreachable!());
        drop(tx);
        assert_eq!(poll(&mut body), Poll::Ready(Some(b"e\n".to_vec())));
        assert_eq!(poll(&mut body), Poll::Ready(None));
    }

    #[tokio::test]
    async fn a_first_line_given_goes_at_once_and_later_lines_as_they_come() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = Lines::starting_with(rx, Bytes::from_static(b"a\n"));
        assert_eq!(poll(&mut body), Poll::Ready(Some(b"a\n".to_vec())), "no yield before the first frame");
        assert_eq!(poll(&mut body), Poll::Pending);
        tx.send((Bytes::from_static(b"b\n"), true)).await.unwrap_or_else(|_| unreachable!());
        drop(tx);
        assert_eq!(poll(&mut body), Poll::Ready(Some(b"b\n".to_vec())));
        assert_eq!(poll(&mut body), Poll::Ready(None));
    }
}
