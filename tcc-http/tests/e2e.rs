//! End to end over real loopback sockets, with the coordinator embedded in the initiator and as a
//! standalone server: every scenario runs in both modes.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use tcc_core::{Clock, ManualClock};

use support::{BOTH, Mode, Participant, Tcc, Where, eventually};
use tcc_http::client::ClientError;
use tcc_http::server::native::StateView;

const LONG: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_confirms_every_branch_once() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let (flight, hotel) =
            (Participant::start(Mode::Healthy).await, Participant::start(Mode::Healthy).await);
        let (ft, ht) = (flight.target("seat"), hotel.target("room"));
        let mut gid = None;
        let results = tcc
            .client
            .run(LONG, |tx| {
                gid = Some(tx.gid().to_string());
                async move {
                    let a = tx.try_branch("flight", &ft, b"{\"seat\":\"1A\"}".to_vec()).await?;
                    let b = tx.try_branch("hotel", &ht, b"{\"room\":7}".to_vec()).await?;
                    Ok((a, b))
                }
            })
            .await
            .unwrap();
        assert_eq!(&results.0[..], b"try ok", "{mode:?}");
        let gid = gid.unwrap();
        let done = tcc.client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{mode:?}");
        assert_eq!(flight.phases(&gid), ["try", "confirm"], "{mode:?}");
        assert_eq!(hotel.phases(&gid), ["try", "confirm"], "{mode:?}");
        // The deadline travelled with the try and with phase two.
        let deadline = done.deadline_ms.to_string();
        assert!(flight.calls().iter().all(|c| c.3 == deadline && c.1 == "flight"), "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_try_cancels_every_registered_branch() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flight = Participant::start(Mode::Healthy).await;
        let hotel = Participant::start(Mode::RefuseTry).await;
        let (ft, ht) = (flight.target("seat"), hotel.target("room"));
        let mut gid = None;
        let err = tcc
            .client
            .run(LONG, |tx| {
                gid = Some(tx.gid().to_string());
                async move {
                    tx.try_branch("flight", &ft, b"1A".to_vec()).await?;
                    tx.try_branch("hotel", &ht, b"7".to_vec()).await?;
                    Ok(())
                }
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { code, message, .. } if code == "refused" && message == "sold out")
        );
        let gid = gid.unwrap();
        let done = tcc.client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Cancelled, "{mode:?}");
        assert_eq!(flight.phases(&gid), ["try", "cancel"], "{mode:?}");
        // The refused branch was registered before its try, so it is cancelled too (an empty cancel
        // for the participant's barrier).
        assert_eq!(hotel.phases(&gid), ["try", "cancel"], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_during_confirm_is_retried_until_it_is_back() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flight = Participant::start(Mode::Healthy).await;
        let mut hotel = Participant::start(Mode::Healthy).await;
        let tx = tcc.client.begin(LONG).await.unwrap();
        tx.try_branch("flight", &flight.target("seat"), b"1A".to_vec()).await.unwrap();
        tx.try_branch("hotel", &hotel.target("room"), b"7".to_vec()).await.unwrap();
        hotel.down().await;
        tx.confirm().await.unwrap();
        let gid = tx.gid().clone();
        let client = tcc.client.clone();
        eventually("a failed confirm round", LONG, async || {
            let t = client.get(&gid).await.unwrap();
            t.attempts >= 2 && t.state == StateView::Confirming
        })
        .await;
        assert_eq!(flight.phases(gid.as_str()), ["try", "confirm"], "{mode:?}");
        hotel.up().await;
        let done = tcc.client.wait(&gid, LONG).await.unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{mode:?}");
        assert_eq!(hotel.phases(gid.as_str()), ["try", "confirm"], "{mode:?}");
        // The flight was confirmed once: retries only call branches not yet acknowledged.
        assert_eq!(flight.phases(gid.as_str()), ["try", "confirm"], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_confirm_is_flagged_not_retried_forever_and_an_operator_can_retry() {
    for mode in BOTH {
        let mut core = support::fast_core();
        core.retry.max_attempts = 3;
        let tcc = Tcc::start_with(mode, core, Default::default()).await;
        let hotel = Participant::start(Mode::Healthy).await;
        let tx = tcc.client.begin(LONG).await.unwrap();
        tx.try_branch("hotel", &hotel.target("room"), b"7".to_vec()).await.unwrap();
        hotel.set_mode(Mode::FailPhaseTwo);
        tx.confirm().await.unwrap();
        let flagged = tcc.client.wait(tx.gid(), LONG).await.unwrap();
        assert_eq!(flagged.state, StateView::Flagged, "{mode:?}");
        assert_eq!(flagged.attempts, 3);
        assert!(flagged.last_error.as_deref().unwrap_or_default().contains("503"), "{flagged:?}");
        if let Where::Standalone = mode {
            // The operator retries through the API once the participant is fixed.
            hotel.set_mode(Mode::Healthy);
            let http = reqwest::Client::new();
            let url = format!("{}/v1/transactions/{}/retry", tcc.url(), tx.gid());
            assert_eq!(http.post(url).send().await.unwrap().status(), 200);
            let done = tcc.client.wait(tx.gid(), LONG).await.unwrap();
            assert_eq!(done.state, StateView::Confirmed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_while_trying_cancels() {
    for mode in BOTH {
        // The engine's clock moves only when the test moves it: the try always lands before the
        // deadline, and the deadline passes exactly when the test says.
        let clock = ManualClock::new(tcc_core::SystemClock.now());
        let tcc = Tcc::start_on_clock(mode, support::fast_core(), Default::default(), clock.clone()).await;
        let flight = Participant::start(Mode::Healthy).await;
        let tx = tcc.client.begin(Duration::from_millis(300)).await.unwrap();
        tx.try_branch("flight", &flight.target("seat"), b"1A".to_vec()).await.unwrap();
        assert_eq!(tcc.client.get(tx.gid()).await.unwrap().state, StateView::Trying, "{mode:?}");
        // The initiator goes quiet; at the deadline the coordinator's sweep cancels. (The clock
        // goes on in small steps, so a scheduler that went to sleep during the first step wakes.)
        clock.advance(Duration::from_millis(300));
        eventually("the deadline sweep cancels", LONG, async || {
            clock.advance(Duration::from_millis(10));
            tcc.client.get(tx.gid()).await.unwrap().state == StateView::Cancelled
        })
        .await;
        let done = tcc.client.wait(tx.gid(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Cancelled, "{mode:?}");
        assert_eq!(flight.phases(tx.gid().as_str()), ["try", "cancel"], "{mode:?}");
        // Past the deadline, confirm is refused with 422 and a stable code.
        let err = tx.confirm().await.unwrap_err();
        assert_eq!(err.code(), Some("illegal_transition"), "{mode:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_participant_is_never_followed_and_the_transaction_is_flagged() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let hotel = Participant::start(Mode::Healthy).await;
        let tx = tcc.client.begin(LONG).await.unwrap();
        tx.try_branch("hotel", &hotel.target("room"), b"7".to_vec()).await.unwrap();
        hotel.set_mode(Mode::Redirect);
        tx.confirm().await.unwrap();
        let done = tcc.client.wait(tx.gid(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Flagged, "{mode:?}");
        assert!(done.last_error.unwrap_or_default().contains("redirect"));
        assert_eq!(hotel.phases(tx.gid().as_str()), ["try", "confirm"], "called once, not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_participant_urls_are_refused_at_registration_and_never_called() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let tx = tcc.client.begin(LONG).await.unwrap();
        for url in
            ["http://169.254.169.254/latest/meta-data", "http://example.com/tcc/x", "file:///etc/passwd"]
        {
            let err = tx.try_branch("evil", url, b"x".to_vec()).await.unwrap_err();
            assert_eq!(err.code(), Some("participant_not_allowed"), "{mode:?} {url}: {err}");
        }
        let now = tcc.client.get(tx.gid()).await.unwrap();
        assert!(now.branches.is_empty(), "{mode:?}: nothing stored");
        assert_eq!(now.state, StateView::Trying);
    }
}

fn planned(branch: &str, target: &str, request: &[u8]) -> tcc_http::client::PlannedBranch {
    tcc_http::client::PlannedBranch {
        branch: branch.into(),
        target: target.into(),
        request: request.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_registered_at_begin_are_tried_then_confirmed_or_cancelled_together() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flight = Participant::start(Mode::Healthy).await;
        let hotel = Participant::start(Mode::Healthy).await;
        let options = tcc_http::client::BeginOptions {
            branches: vec![
                planned("flight", &flight.target("seat"), b"{\"seat\":\"1A\"}"),
                planned("hotel", &hotel.target("room"), b"{\"room\":7}"),
            ],
            ..Default::default()
        };
        // Both registered by the begin itself.
        let tx = tcc.client.begin_with(LONG, options.clone()).await.unwrap();
        let view = tcc.client.get(tx.gid()).await.unwrap();
        assert_eq!(view.branches.len(), 2, "{mode:?}");
        assert_eq!(&tx.try_planned("flight").await.unwrap()[..], b"try ok", "{mode:?}");
        assert_eq!(&tx.try_planned("hotel").await.unwrap()[..], b"try ok", "{mode:?}");
        assert!(matches!(tx.try_planned("car").await, Err(ClientError::Invalid(_))), "{mode:?}");
        let done = tx.confirm_and_wait(LONG).await.unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{mode:?}");
        let gid = tx.gid().to_string();
        assert_eq!(flight.phases(&gid), ["try", "confirm"], "{mode:?}");
        assert_eq!(hotel.phases(&gid), ["try", "confirm"], "{mode:?}");

        // A refused try: the branch never tried is cancelled too (an empty cancel).
        hotel.set_mode(Mode::RefuseTry);
        let tx = tcc.client.begin_with(LONG, options).await.unwrap();
        tx.try_planned("hotel").await.unwrap_err();
        let done = tx.cancel_and_wait(LONG).await.unwrap();
        assert_eq!(done.state, StateView::Cancelled, "{mode:?}");
        let gid = tx.gid().to_string();
        assert_eq!(flight.phases(&gid), ["cancel"], "{mode:?}");
        assert_eq!(hotel.phases(&gid), ["try", "cancel"], "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disallowed_branch_at_begin_refuses_the_begin_and_stores_nothing() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flight = Participant::start(Mode::Healthy).await;
        let options = tcc_http::client::BeginOptions {
            gid: Some("refused-at-begin".parse().unwrap()),
            branches: vec![
                planned("flight", &flight.target("seat"), b"1A"),
                planned("hotel", "http://203.0.113.9/tcc/room", b"7"),
            ],
            ..Default::default()
        };
        let err = tcc.client.begin_with(LONG, options).await.unwrap_err();
        assert_eq!(err.code(), Some("participant_not_allowed"), "{mode:?}: {err}");
        let missing = tcc.client.get(&"refused-at-begin".parse().unwrap()).await.unwrap_err();
        assert_eq!(missing.code(), Some("not_found"), "{mode:?}");
        assert!(flight.calls().is_empty(), "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_tried_at_once_from_clones_of_one_transaction_are_all_confirmed() {
    // An embedded client judges each registration and the decision on its latest copy of the
    // transaction; registrations racing from clones must still all reach the decision.
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let p = Participant::start(Mode::Healthy).await;
        let tx = tcc.client.begin(LONG).await.unwrap();
        let tries = (0..6).map(|i| {
            let (tx, target) = (tx.clone(), p.target("seat"));
            async move { tx.try_branch(&format!("b{i}"), &target, b"1A".to_vec()).await }
        });
        for r in tcc_core::join::join_all(tries).await {
            r.unwrap();
        }
        let done = tx.confirm_and_wait(LONG).await.unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{mode:?}");
        assert_eq!(done.branches.len(), 6, "{mode:?}");
        let mut confirmed: Vec<String> =
            p.calls().into_iter().filter(|c| c.2 == "confirm").map(|c| c.1).collect();
        confirmed.sort();
        assert_eq!(confirmed, ["b0", "b1", "b2", "b3", "b4", "b5"], "{mode:?}");
    }
}
