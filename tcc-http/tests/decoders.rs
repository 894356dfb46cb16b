//! The participant runtime's decoder of the requests it stores in barrier records, fed arbitrary
//! bytes: a damaged record is "not stored by the runtime", never a panic. (The other decoders of
//! stored records are fuzzed where they live: tcc-core's transaction codec, barrier records and
//! index keys, the sled store's index keys, and the staged business values.)
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tcc_http::participant::decode_stored_request;

proptest! {
    #[test]
    fn arbitrary_stored_requests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Some((name, body)) = decode_stored_request(&bytes) {
            // Whatever decodes is a valid operation name followed by the rest of the bytes.
            prop_assert!(!name.is_empty() && name.len() + body.len() + 2 == bytes.len());
        }
    }

    #[test]
    fn a_stored_request_gives_back_its_operation_and_body(
        name in "[A-Za-z0-9_-]{1,64}",
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut stored = vec![1, u8::try_from(name.len()).unwrap()];
        stored.extend_from_slice(name.as_bytes());
        stored.extend_from_slice(&body);
        prop_assert_eq!(decode_stored_request(&stored), Some((name.as_str(), &body[..])));
    }
}
