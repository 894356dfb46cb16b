//! Model-based test: random histories of begin, register, confirm, cancel, participant failures, clock
//! jumps and coordinator crashes, checked against a small reference model.
//!
//! After every history the participants heal, flagged transactions get an operator retry and time
//! runs on; then every transaction must be final, all its branches confirmed or all cancelled (at the
//! participants too, with no branch left reserved), and the outcome must match what the coordinator
//! acknowledged: an accepted confirm ends confirmed, an accepted cancel or a passed deadline cancelled.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Fault, Rig};
use proptest::prelude::*;
use tcc_core::{BranchState, Clock, Decision, Error, Gid, Timestamp, TxState};

const PARTICIPANTS: [&str; 3] = ["flight", "hotel", "car"];

#[derive(Clone, Debug)]
enum Op {
    /// Begin with a timeout (seconds) and register the first `branches` participants.
    Begin {
        timeout_s: u64,
        branches: usize,
    },
    Confirm(usize),
    Cancel(usize),
    Fault {
        participant: usize,
        fault: u8,
    },
    Advance(u64),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..30, 0usize..=3).prop_map(|(timeout_s, branches)| Op::Begin { timeout_s, branches }),
        3 => any::<usize>().prop_map(Op::Confirm),
        2 => any::<usize>().prop_map(Op::Cancel),
        2 => (0usize..3, 0u8..4).prop_map(|(participant, fault)| Op::Fault { participant, fault }),
        2 => (0u64..15_000).prop_map(Op::Advance),
        1 => Just(Op::Crash),
    ]
}

/// What the reference model knows of one transaction.
#[derive(Debug)]
struct Expect {
    deadline: Timestamp,
    branches: usize,
    /// The outcome the coordinator has committed to, as far as the model can tell.
    decision: Option<Decision>,
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut rig = Rig::new().await;
    let mut model: Vec<(Gid, Expect)> = Vec::new();
    for op in ops {
        match op {
            Op::Begin { timeout_s, branches } => {
                let gid = rig.begin_with(&PARTICIPANTS[..branches], Duration::from_secs(timeout_s)).await;
                let deadline = rig.tc().get(&gid).await.unwrap().deadline;
                model.push((gid, Expect { deadline, branches, decision: None }));
            }
            Op::Confirm(i) if !model.is_empty() => {
                let n = model.len();
                let (gid, exp) = &mut model[i % n];
                let before_deadline = rig.clock.now() < exp.deadline;
                match rig.tc().confirm(gid).await {
                    Ok(_) => {
                        prop_assert!(exp.decision != Some(Decision::Cancel), "confirm accepted after cancel");
                        prop_assert!(before_deadline || exp.decision == Some(Decision::Confirm));
                        exp.decision = Some(Decision::Confirm);
                    }
                    Err(Error::DeadlinePassed { .. }) => {
                        prop_assert!(!before_deadline && exp.decision.is_none());
                        exp.decision = Some(Decision::Cancel); // the sweep will cancel it
                    }
                    Err(Error::IllegalTransition { .. }) => {
                        // Cancelled by request, or by the deadline sweep.
                        prop_assert!(exp.decision == Some(Decision::Cancel) || !before_deadline);
                        prop_assert!(exp.decision != Some(Decision::Confirm));
                        exp.decision = Some(Decision::Cancel);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("confirm: {e}"))),
                }
            }
            Op::Cancel(i) if !model.is_empty() => {
                let n = model.len();
                let (gid, exp) = &mut model[i % n];
                match rig.tc().cancel(gid).await {
                    Ok(_) => {
                        prop_assert!(
                            exp.decision != Some(Decision::Confirm),
                            "cancel accepted after confirm"
                        );
                        exp.decision = Some(Decision::Cancel);
                    }
                    Err(Error::IllegalTransition { .. }) => {
                        prop_assert!(exp.decision == Some(Decision::Confirm));
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("cancel: {e}"))),
                }
            }
            Op::Fault { participant, fault } => {
                let fault = match fault {
                    0 => Fault::Healthy,
                    1 => Fault::FailTimes(2),
                    2 => Fault::Down,
                    _ => Fault::Permanent,
                };
                rig.mem.set_fault(&format!("mem://{}", PARTICIPANTS[participant]), fault);
            }
            Op::Advance(ms) => {
                rig.clock.advance(Duration::from_millis(ms));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Op::Crash => rig.restart().await,
            Op::Confirm(_) | Op::Cancel(_) => {}
        }
    }

    // Heal everything, let an operator retry what is flagged, and let time run until all is final.
    rig.mem.heal_all();
    let gids: Vec<Gid> = model.iter().map(|(g, _)| g.clone()).collect();
    let settled = rig
        .run_until(Duration::from_millis(500), 4_000, async |tc| {
            let mut all_final = true;
            for gid in &gids {
                let tx = tc.get(gid).await.unwrap();
                if tx.state == TxState::Flagged {
                    tc.retry(gid).await.unwrap();
                }
                all_final &= tx.state.is_final();
            }
            all_final
        })
        .await;
    prop_assert!(settled, "not every transaction became final");

    prop_assert_eq!(rig.mem.violations(), Vec::<String>::new());
    let mut outcomes = HashMap::new();
    for (gid, exp) in &model {
        let tx = rig.tc().get(gid).await.unwrap();
        prop_assert_eq!(tx.branches.len(), exp.branches);
        let want = match tx.state {
            TxState::Confirmed => BranchState::Confirmed,
            TxState::Cancelled => BranchState::Cancelled,
            s => return Err(TestCaseError::fail(format!("{gid} ended {s}"))),
        };
        prop_assert!(tx.branches.iter().all(|b| b.state == want), "{gid}: mixed branch states");
        match exp.decision {
            Some(Decision::Confirm) => {
                prop_assert_eq!(tx.state, TxState::Confirmed, "{} was acknowledged as confirmed", gid)
            }
            // Never decided and past the deadline by now: the sweep cancelled it.
            Some(Decision::Cancel) | None => prop_assert_eq!(tx.state, TxState::Cancelled, "{}", gid),
        }
        for name in &PARTICIPANTS[..exp.branches] {
            let e = rig.mem.effects(gid, name);
            let ok = match want {
                BranchState::Confirmed => e.confirms == 1 && e.cancels == 0,
                _ => e.cancels == 1 && e.confirms == 0,
            };
            prop_assert!(ok, "{} {}: participant saw {:?} for a {} transaction", gid, name, e, tx.state);
        }
        outcomes.insert(gid.clone(), tx.state);
    }
    rig.crash().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn every_history_ends_all_confirmed_or_all_cancelled(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
