//! How transactions are laid out as bytes in a store.
//!
//! A record is one format byte followed by the postcard encoding of [`Transaction`]. The format byte
//! lets a later version read old records; a damaged or foreign record decodes to an error, never a
//! panic.
//!
//! - format 1: the layout before per-transaction options ([`TxOptions`]) existed; read with default
//!   options, never written any more;
//! - format 2: the layout before the bounded history ([`Transaction::history`]) and before sagas
//!   and messages ([`TxKind`]); read with an empty history as TCC, never written any more;
//! - format 3: the current layout (format 2's fields, then the history, then the kind).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Branch, Decision, Gid, Timestamp, Transaction, TxKind, TxOptions, TxState};

/// The format byte of records written before per-transaction options.
pub const FORMAT_V1: u8 = 1;
/// The format byte of records written before the history and before sagas and messages.
pub const FORMAT_V2: u8 = 2;
/// The format byte of records written by this version.
pub const FORMAT_V3: u8 = 3;

/// Encodes a transaction record.
pub fn encode(tx: &Transaction) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_V3];
    let body = postcard::to_allocvec(tx).map_err(|e| Error::Storage(format!("encoding {}: {e}", tx.gid)))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a transaction record written by [`encode`], by this version or an earlier one.
///
/// ```
/// use tcc_core::store::codec::decode;
/// assert!(decode(b"\x02garbage").is_err());
/// assert!(decode(b"").is_err());
/// ```
pub fn decode(bytes: &[u8]) -> Result<Transaction> {
    let damaged = |e: postcard::Error| Error::Storage(format!("damaged transaction record: {e}"));
    match bytes.split_first() {
        Some((&FORMAT_V3, body)) => postcard::from_bytes(body).map_err(damaged),
        Some((&FORMAT_V2, body)) => {
            postcard::from_bytes::<TransactionV2>(body).map(Into::into).map_err(damaged)
        }
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes::<TransactionV1>(body).map(Into::into).map_err(damaged)
        }
        Some((other, _)) => Err(Error::Storage(format!("unknown transaction record format {other}"))),
        None => Err(Error::Storage("empty transaction record".to_owned())),
    }
}

/// The start of a record in either format: the fields every format begins with, in order.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    _gid: &'a str,
    state: TxState,
    _decision: Option<Decision>,
    _created_at: Timestamp,
    updated_at: Timestamp,
}

/// The state of a record and when it last changed, read without decoding the rest (what pruning
/// finished transactions looks at, over the whole history).
///
/// ```
/// use tcc_core::store::codec::{encode, state_and_updated_at};
/// let tx = tcc_core::state::begin(tcc_core::Gid::generate(), tcc_core::Timestamp(7), tcc_core::Timestamp(9));
/// assert_eq!(state_and_updated_at(&encode(&tx).unwrap()).unwrap(), (tx.state, tx.updated_at));
/// ```
pub fn state_and_updated_at(bytes: &[u8]) -> Result<(TxState, Timestamp)> {
    let damaged = |e: postcard::Error| Error::Storage(format!("damaged transaction record: {e}"));
    match bytes.split_first() {
        Some((&(FORMAT_V1 | FORMAT_V2 | FORMAT_V3), body)) => {
            let (head, _) = postcard::take_from_bytes::<Head<'_>>(body).map_err(damaged)?;
            Ok((head.state, head.updated_at))
        }
        Some((other, _)) => Err(Error::Storage(format!("unknown transaction record format {other}"))),
        None => Err(Error::Storage("empty transaction record".to_owned())),
    }
}

/// The format-1 layout: [`Transaction`] without `options`. Field order is the encoding: never
/// change it.
#[derive(Serialize, Deserialize)]
struct TransactionV1 {
    gid: Gid,
    state: TxState,
    decision: Option<Decision>,
    created_at: Timestamp,
    updated_at: Timestamp,
    deadline: Timestamp,
    branches: Vec<Branch>,
    attempts: u32,
    last_error: Option<String>,
    due_at: Option<Timestamp>,
    lease_owner: Option<String>,
    version: u64,
}

impl From<TransactionV1> for Transaction {
    fn from(v: TransactionV1) -> Transaction {
        Transaction {
            gid: v.gid,
            state: v.state,
            decision: v.decision,
            created_at: v.created_at,
            updated_at: v.updated_at,
            deadline: v.deadline,
            branches: v.branches,
            attempts: v.attempts,
            last_error: v.last_error,
            due_at: v.due_at,
            lease_owner: v.lease_owner,
            options: TxOptions::default(),
            version: v.version,
            history: Vec::new(),
            kind: TxKind::Tcc,
        }
    }
}

/// The format-2 layout: [`Transaction`] without `history` and `kind` (every transaction was TCC).
/// Field order is the encoding: never change it.
#[derive(Serialize, Deserialize)]
struct TransactionV2 {
    gid: Gid,
    state: TxState,
    decision: Option<Decision>,
    created_at: Timestamp,
    updated_at: Timestamp,
    deadline: Timestamp,
    branches: Vec<Branch>,
    attempts: u32,
    last_error: Option<String>,
    due_at: Option<Timestamp>,
    lease_owner: Option<String>,
    options: TxOptions,
    version: u64,
}

impl From<TransactionV2> for Transaction {
    fn from(v: TransactionV2) -> Transaction {
        Transaction {
            gid: v.gid,
            state: v.state,
            decision: v.decision,
            created_at: v.created_at,
            updated_at: v.updated_at,
            deadline: v.deadline,
            branches: v.branches,
            attempts: v.attempts,
            last_error: v.last_error,
            due_at: v.due_at,
            lease_owner: v.lease_owner,
            options: v.options,
            version: v.version,
            history: Vec::new(),
            kind: TxKind::Tcc,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Gid, Timestamp};

    /// A format-1 record as the previous version wrote it (frozen bytes), so old stores still open.
    #[test]
    fn records_of_format_1_are_read_with_default_options() {
        let gid: Gid = "0190d7a8-1b2c-7d3e-8f40-112233445566".parse().unwrap();
        let old = TransactionV1 {
            gid: gid.clone(),
            state: TxState::Confirming,
            decision: Some(Decision::Confirm),
            created_at: Timestamp(1),
            updated_at: Timestamp(2),
            deadline: Timestamp(3),
            branches: Vec::new(),
            attempts: 1,
            last_error: Some("boom".into()),
            due_at: Some(Timestamp(4)),
            lease_owner: Some("a".into()),
            version: 7,
        };
        let mut bytes = vec![FORMAT_V1];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        assert_eq!(
            bytes,
            [
                &[1u8, 36][..],
                b"0190d7a8-1b2c-7d3e-8f40-112233445566",
                &[1, 1, 0, 1, 2, 3, 0, 1, 1, 4, b'b', b'o', b'o', b'm', 1, 4, 1, 1, b'a', 7][..]
            ]
            .concat(),
            "the frozen format-1 layout"
        );
        let tx = decode(&bytes).unwrap();
        assert_eq!((&tx.gid, tx.state, tx.version, tx.attempts), (&gid, TxState::Confirming, 7, 1));
        assert_eq!(tx.options, TxOptions::default());
        assert_eq!(tx.due_at, Some(Timestamp(4)));
        assert_eq!(encode(&tx).unwrap()[0], FORMAT_V3, "rewritten in the current format");
    }

    /// A format-2 record as the previous version wrote it (frozen bytes): read with an empty
    /// history, the options kept.
    #[test]
    fn records_of_format_2_are_read_with_an_empty_history() {
        let bytes = [&[2u8, 3][..], b"g-1", &[1, 1, 0, 1, 2, 3, 0, 0, 0, 0, 0, 1, 250, 1, 0, 9][..]].concat();
        let tx = decode(&bytes).unwrap();
        assert_eq!((tx.gid.as_str(), tx.state, tx.version), ("g-1", TxState::Confirming, 9));
        assert_eq!(tx.options, TxOptions { retry_interval_ms: Some(250), call_timeout_ms: None });
        assert!(tx.history.is_empty());
        let again = encode(&tx).unwrap();
        assert_eq!(again[0], FORMAT_V3, "rewritten in the current format");
        assert_eq!(decode(&again).unwrap(), tx);
    }

    #[test]
    fn the_history_is_kept_in_the_record() {
        let mut tx = crate::state::begin(Gid::generate(), Timestamp(5), Timestamp(10));
        tx.state = TxState::Flagged;
        tx.record(
            Timestamp(7),
            crate::model::Happening::Round { done: 1, failed: 2, error: Some("503".into()) },
        );
        let back = decode(&encode(&tx).unwrap()).unwrap();
        assert_eq!(back.history.len(), 2);
        assert_eq!(back, tx);
    }

    /// A format-2 record as the previous version wrote it (frozen bytes): read as a TCC
    /// transaction, options kept.
    #[test]
    fn records_of_format_2_are_read_as_tcc() {
        let gid: Gid = "g-2".parse().unwrap();
        let old = TransactionV2 {
            gid: gid.clone(),
            state: TxState::Trying,
            decision: None,
            created_at: Timestamp(1),
            updated_at: Timestamp(2),
            deadline: Timestamp(3),
            branches: Vec::new(),
            attempts: 0,
            last_error: None,
            due_at: Some(Timestamp(3)),
            lease_owner: None,
            options: TxOptions { retry_interval_ms: Some(5), call_timeout_ms: None },
            version: 1,
        };
        let mut bytes = vec![FORMAT_V2];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        assert_eq!(
            bytes,
            [&[2u8, 3][..], b"g-2", &[0, 0, 1, 2, 3, 0, 0, 0, 1, 3, 0, 1, 5, 0, 1][..]].concat(),
            "the frozen format-2 layout"
        );
        let tx = decode(&bytes).unwrap();
        assert_eq!((&tx.gid, tx.state, tx.version), (&gid, TxState::Trying, 1));
        assert_eq!(tx.options.retry_interval_ms, Some(5));
        assert_eq!(tx.kind, TxKind::Tcc);
        assert_eq!(encode(&tx).unwrap()[0], FORMAT_V3, "rewritten in the current format");
    }

    #[test]
    fn sagas_and_messages_round_trip() {
        use crate::model::{Msg, Saga, SagaStep};
        let mut tx = crate::state::begin(Gid::generate(), Timestamp(5), Timestamp(10));
        tx.kind = TxKind::Saga(Box::new(Saga {
            concurrent: true,
            steps: vec![SagaStep { compensate: "c".into(), after: vec![0, 2], started: true }],
        }));
        assert_eq!(decode(&encode(&tx).unwrap()).unwrap(), tx);
        tx.kind = TxKind::Msg(Box::new(Msg { query_prepared: "q".into() }));
        assert_eq!(decode(&encode(&tx).unwrap()).unwrap(), tx);
    }

    #[test]
    fn a_record_round_trips() {
        let tx = crate::state::begin(Gid::generate(), Timestamp(5), Timestamp(10));
        assert_eq!(decode(&encode(&tx).unwrap()).unwrap(), tx);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_record_round_trips(tx in fuzz::transaction()) {
            let bytes = encode(&tx).unwrap();
            prop_assert_eq!(state_and_updated_at(&bytes).unwrap(), (tx.state, tx.updated_at));
            prop_assert_eq!(decode(&bytes).unwrap(), tx);
        }

        /// Whatever a record holds (a saga's order naming steps that do not exist, steps and
        /// branches of different lengths), the state machine answers every event without a panic.
        #[test]
        fn no_record_panics_the_state_machine(tx in fuzz::transaction(), now in 0u64..u64::MAX / 2) {
            use crate::state::{apply, runnable_steps, Context, Event, LocalOutcome};
            let ctx = Context { now: Timestamp(now), owner: "o", lease_until: Timestamp(now), max_branches: 8, max_tx_payload: 64 };
            let _ = runnable_steps(&tx);
            let ids: Vec<_> = tx.branches.iter().map(|b| b.id.clone()).collect();
            for event in [
                Event::Confirm,
                Event::Cancel,
                Event::DeadlineReached,
                Event::OperatorRetry,
                Event::OperatorForce(Decision::Cancel),
                Event::OperatorForce(Decision::Confirm),
                Event::StepsFinished { decision: Decision::Confirm, done: ids.clone(), failed: vec![], refused: None, retry_at: None },
                Event::StepsFinished { decision: Decision::Confirm, done: vec![], failed: vec![], refused: ids.first().map(|i| (i.clone(), "409".into())), retry_at: None },
                Event::StepsFinished { decision: Decision::Cancel, done: ids.clone(), failed: vec![], refused: None, retry_at: None },
                Event::BackChecked { outcome: LocalOutcome::Committed, retry_at: None },
                Event::BackChecked { outcome: LocalOutcome::Unknown("x".into()), retry_at: None },
            ] {
                if let Ok(crate::state::Transition::Changed(next, _)) = apply(&tx, &event, &ctx) {
                    let _ = runnable_steps(&next);
                }
            }
        }

        /// Damaged copies of real records of either format: they reach the decoder proper (random
        /// bytes mostly stop at the format byte), and whatever decodes is a transaction that
        /// round-trips, read the same way by the head-only reader that pruning uses.
        #[test]
        fn damaged_records_are_errors_or_consistent_transactions(bytes in fuzz::damaged_record()) {
            match decode(&bytes) {
                Ok(tx) => {
                    prop_assert_eq!(decode(&encode(&tx).unwrap()).unwrap(), tx.clone());
                    prop_assert_eq!(state_and_updated_at(&bytes).unwrap(), (tx.state, tx.updated_at));
                }
                Err(e) => prop_assert!(matches!(e, Error::Storage(_)), "{}", e),
            }
        }
    }
}

/// Strategies for fuzzing the record decoders from valid records (this module's tests and the
/// sled store's).
#[cfg(test)]
pub(crate) mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::model::BranchState;

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        prop_oneof![Just(0u64), 1u64..2_000_000_000_000, Just(u64::MAX)].prop_map(Timestamp)
    }

    fn happening() -> impl Strategy<Value = crate::model::Happening> {
        use crate::model::Happening;
        let decision = || prop_oneof![Just(Decision::Confirm), Just(Decision::Cancel)];
        prop_oneof![
            Just(Happening::Begun),
            decision().prop_map(Happening::Decided),
            Just(Happening::Expired),
            (any::<u32>(), any::<u32>(), proptest::option::of(".{0,16}"))
                .prop_map(|(done, failed, error)| Happening::Round { done, failed, error }),
            Just(Happening::OperatorRetry),
            decision().prop_map(Happening::OperatorForce),
        ]
    }

    fn history() -> impl Strategy<Value = Vec<crate::model::HistoryEntry>> {
        let entry = (timestamp(), proptest::sample::select(TxState::ALL.to_vec()), happening())
            .prop_map(|(at, state, what)| crate::model::HistoryEntry { at, state, what });
        proptest::collection::vec(entry, 0..4)
    }

    fn branch() -> impl Strategy<Value = Branch> {
        (
            "[A-Za-z0-9_.:-]{1,16}",
            ".{0,24}",
            proptest::collection::vec(any::<u8>(), 0..24),
            prop_oneof![
                Just(BranchState::Registered),
                Just(BranchState::Confirmed),
                Just(BranchState::Cancelled)
            ],
            proptest::option::of(".{0,16}"),
        )
            .prop_map(|(id, target, payload, state, last_error)| Branch {
                id: id.parse().expect("a valid branch id"),
                target,
                payload,
                state,
                last_error,
            })
    }

    /// Any transaction a store might hold.
    pub(crate) fn transaction() -> impl Strategy<Value = Transaction> {
        (
            (
                "[A-Za-z0-9_.:-]{1,40}",
                proptest::sample::select(TxState::ALL.to_vec()),
                proptest::option::of(prop_oneof![Just(Decision::Confirm), Just(Decision::Cancel)]),
                timestamp(),
                timestamp(),
                timestamp(),
            ),
            (
                proptest::collection::vec(branch(), 0..4),
                any::<u32>(),
                proptest::option::of(".{0,24}"),
                proptest::option::of(timestamp()),
                proptest::option::of("[a-z0-9-]{0,12}"),
                (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>())),
                any::<u64>(),
                (history(), kind()),
            ),
        )
            .prop_map(|((gid, state, decision, created_at, updated_at, deadline), rest)| {
                let (
                    branches,
                    attempts,
                    last_error,
                    due_at,
                    lease_owner,
                    (retry, timeout),
                    version,
                    (history, kind),
                ) = rest;
                Transaction {
                    gid: gid.parse().expect("a valid gid"),
                    state,
                    decision,
                    created_at,
                    updated_at,
                    deadline,
                    branches,
                    attempts,
                    last_error,
                    due_at,
                    lease_owner,
                    options: TxOptions { retry_interval_ms: retry, call_timeout_ms: timeout },
                    version,
                    history,
                    kind,
                }
            })
    }

    fn kind() -> impl Strategy<Value = TxKind> {
        use crate::model::{Msg, Saga, SagaStep};
        let step = (".{0,16}", proptest::collection::vec(any::<u32>(), 0..3), any::<bool>())
            .prop_map(|(compensate, after, started)| SagaStep { compensate, after, started });
        prop_oneof![
            Just(TxKind::Tcc),
            (any::<bool>(), proptest::collection::vec(step, 0..4))
                .prop_map(|(concurrent, steps)| TxKind::Saga(Box::new(Saga { concurrent, steps }))),
            ".{0,16}".prop_map(|query_prepared| TxKind::Msg(Box::new(Msg { query_prepared }))),
        ]
    }

    /// The record of `tx` in format 1 (options, history and kind dropped), 2 (history and kind dropped)
    /// or 3.
    fn record(tx: Transaction, format: u8) -> Vec<u8> {
        if format == FORMAT_V2 {
            let old = TransactionV2 {
                gid: tx.gid,
                state: tx.state,
                decision: tx.decision,
                created_at: tx.created_at,
                updated_at: tx.updated_at,
                deadline: tx.deadline,
                branches: tx.branches,
                attempts: tx.attempts,
                last_error: tx.last_error,
                due_at: tx.due_at,
                lease_owner: tx.lease_owner,
                options: tx.options,
                version: tx.version,
            };
            let mut bytes = vec![FORMAT_V2];
            bytes.extend(postcard::to_allocvec(&old).expect("encodes"));
            return bytes;
        }
        if format != FORMAT_V1 {
            return encode(&tx).expect("encodes");
        }
        let old = TransactionV1 {
            gid: tx.gid,
            state: tx.state,
            decision: tx.decision,
            created_at: tx.created_at,
            updated_at: tx.updated_at,
            deadline: tx.deadline,
            branches: tx.branches,
            attempts: tx.attempts,
            last_error: tx.last_error,
            due_at: tx.due_at,
            lease_owner: tx.lease_owner,
            version: tx.version,
        };
        let mut bytes = vec![FORMAT_V1];
        bytes.extend(postcard::to_allocvec(&old).expect("encodes"));
        bytes
    }

    #[derive(Clone, Debug)]
    enum Edit {
        Flip(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        Truncate(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Edit::Flip(i, x)),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            1 => any::<usize>().prop_map(Edit::Remove),
            1 => any::<usize>().prop_map(Edit::Truncate),
        ]
    }

    /// A valid record of any format with one to four edits after its format byte (flipped,
    /// inserted or removed bytes, or a cut), so that nearly every case gets past the format byte.
    pub(crate) fn damaged_record() -> impl Strategy<Value = Vec<u8>> {
        (transaction(), FORMAT_V1..=FORMAT_V3, proptest::collection::vec(edit(), 1..5)).prop_map(
            |(tx, format, edits)| {
                let mut bytes = record(tx, format);
                for e in edits {
                    // Position 0 is the format byte; edits land after it.
                    let at = |i: usize, len: usize| 1 + i % len.max(1);
                    match e {
                        Edit::Flip(i, x) if bytes.len() > 1 => {
                            let i = at(i, bytes.len() - 1);
                            bytes[i] ^= x;
                        }
                        Edit::Insert(i, b) => {
                            let i = at(i, bytes.len());
                            bytes.insert(i.min(bytes.len()), b);
                        }
                        Edit::Remove(i) if bytes.len() > 1 => {
                            bytes.remove(at(i, bytes.len() - 1));
                        }
                        Edit::Truncate(i) => bytes.truncate(at(i, bytes.len())),
                        _ => {}
                    }
                }
                bytes
            },
        )
    }
}
