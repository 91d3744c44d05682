//! Fuzzes the client-message decoder (the proxy's trust boundary): any byte sequence must
//! decode, ask for more bytes, or be refused with a `DecodeError` — never panic, never
//! allocate beyond the stated limits, and always make progress.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use taskflow_proxy_core::wire::frontend::{decode_message, decode_startup, parse_sasl_initial, FrontendMessage};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the mode; the rest is the stream.
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut buf = BytesMut::from(rest);
    if mode & 1 == 0 {
        let before = buf.len();
        match decode_startup(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "a decoded packet consumes bytes"),
            Ok(None) => assert_eq!(buf.len(), before, "incomplete input is left untouched"),
            Err(_) => {}
        }
        return;
    }
    loop {
        let before = buf.len();
        match decode_message(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a decoded message consumes bytes");
                assert_eq!(frame.raw.len(), before - buf.len());
                if let FrontendMessage::Password(b) = frame.msg {
                    let _ = parse_sasl_initial(b);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
