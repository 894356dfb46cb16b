//! How transactions are laid out as bytes in a store.
//!
//! A record is one format byte followed by the postcard encoding of [`Transaction`]. The format byte
//! lets a later version read old records; a damaged or foreign record decodes to an error, never a
//! panic.

use crate::error::{Error, Result};
use crate::model::Transaction;

/// The format byte of records written by this version.
pub const FORMAT_V1: u8 = 1;

/// Encodes a transaction record.
pub fn encode(tx: &Transaction) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_V1];
    let body = postcard::to_allocvec(tx).map_err(|e| Error::Storage(format!("encoding {}: {e}", tx.gid)))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a transaction record written by [`encode`].
///
/// ```
/// use tcc_core::store::codec::decode;
/// assert!(decode(b"\x01garbage").is_err());
/// assert!(decode(b"").is_err());
/// ```
pub fn decode(bytes: &[u8]) -> Result<Transaction> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes(body).map_err(|e| Error::Storage(format!("damaged transaction record: {e}")))
        }
        Some((other, _)) => Err(Error::Storage(format!("unknown transaction record format {other}"))),
        None => Err(Error::Storage("empty transaction record".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Gid, Timestamp};

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
        fn truncated_or_flipped_records_are_errors_or_valid(cut in 0usize..200, flip in any::<(usize, u8)>()) {
            let tx = crate::state::begin(Gid::generate(), Timestamp(5), Timestamp(10));
            let mut bytes = encode(&tx).unwrap();
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1;
            bytes.truncate(cut.min(bytes.len()));
            // Either an error or some transaction; what matters is no panic and no abort.
            let _ = decode(&bytes);
        }
    }
}
