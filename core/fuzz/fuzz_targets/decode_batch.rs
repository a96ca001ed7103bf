//! Feeds arbitrary bytes to every decoder that takes untrusted input. Any panic, overflow or
//! runaway allocation is a bug; a decoded batch must re-encode and decode to itself.
#![no_main]

use driftless_core::codec::{decode_batch, decode_key, decode_payload, encode_batch, Dictionaries, EncodeOptions, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_decompressed: 1 << 20, ..Limits::default() };
    if let Ok(batch) = decode_batch(data, &limits, &Dictionaries::default()) {
        let again = encode_batch(&batch, EncodeOptions { level: None, dictionary: None });
        assert_eq!(decode_batch(&again, &limits, &Dictionaries::default()).ok(), Some(batch));
    }
    let _ = decode_payload(data, &limits);
    let _ = decode_key(data, &limits);
});
