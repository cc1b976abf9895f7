//! A request's long text (a message's `content`, a text part's `text`),
//! read with serde_json's search for a string's closing quote, which
//! steps 32 bytes at a time (`memchr2`), rather than with its check of
//! every byte for a raw control character, which steps 8 and costs about
//! 2.7 instructions a byte of prompt. JSON forbids raw control characters
//! in every string, so [`read_json`](super::read_json) checks the whole
//! body for them once, before parsing it ([`controls_escaped`]): a body
//! with no byte below 0x20, as the SDKs write them, in one vectorised
//! pass. Text read outside `read_json` is not checked for them.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A JSON string read as text, as described above.
#[derive(Debug)]
pub struct MessageText(pub String);

impl<'de> Deserialize<'de> for MessageText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Read;
        impl<'de> Visitor<'de> for Read {
            type Value = MessageText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageText, E> {
                Ok(MessageText(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<MessageText, E> {
                Ok(MessageText(text))
            }

            fn visit_bytes<E: de::Error>(self, text: &[u8]) -> Result<MessageText, E> {
                from_bytes(text).map(MessageText)
            }
        }
        // Asked for bytes, serde_json finds the string's end without
        // checking each byte on the way, and undoes its escapes.
        deserializer.deserialize_bytes(Read)
    }
}

/// An optional text member (`null` or absent is `None`).
pub fn optional<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<MessageText>::deserialize(deserializer)?.map(|MessageText(text)| text))
}

/// A string's bytes, as serde_json gives them when asked for bytes: its
/// escapes undone, but neither the bytes nor the escapes checked to be
/// Unicode, which is done here.
pub fn from_bytes<E: de::Error>(text: &[u8]) -> Result<String, E> {
    match simdutf8::basic::from_utf8(text) {
        Ok(text) => Ok(text.to_owned()),
        Err(_) => Err(E::custom(
            "is not valid Unicode: it holds bytes that are not UTF-8, or a surrogate escape \
             (\\uD800 to \\uDFFF) without its pair",
        )),
    }
}

/// Whether every string of the JSON text `body` is free of raw control
/// characters (U+0000 to U+001F), which JSON allows only escaped. Outside
/// its strings, a body may hold only whitespace below 0x20.
pub fn controls_escaped(body: &[u8]) -> bool {
    if !has_control(body) {
        return true;
    }
    let mut at = 0;
    // Outside strings, a quote opens one; inside, a backslash escapes the
    // byte after it. A body that is not JSON may be cut wrongly here, and
    // is refused by the parse either way.
    while let Some(open) = memchr::memchr(b'"', &body[at..]) {
        let mut i = at + open + 1;
        loop {
            let Some(stop) = memchr::memchr2(b'"', b'\\', &body[i..]) else {
                return !has_control(&body[i..]);
            };
            if has_control(&body[i..i + stop]) {
                return false;
            }
            i += stop;
            if body[i] == b'"' {
                at = i + 1;
                break;
            }
            i += 2;
            if i >= body.len() {
                return true;
            }
        }
    }
    true
}

/// Whether `bytes` holds a byte below 0x20. The least byte of each 256 is
/// what the compiler vectorises best: one `pminub` per 16 bytes.
fn has_control(bytes: &[u8]) -> bool {
    bytes
        .chunks(256)
        .any(|chunk| chunk.iter().fold(u8::MAX, |least, &b| least.min(b)) < 0x20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_control_character_is_found_in_any_string_and_only_in_strings() {
        for body in [
            "{\"a\":\"x\ty\"}",
            "{\"a\":\"x\\\"\ny\"}",
            "{\"a\":\n  \"ok\", \"b\": [\"\\\\\", \"\u{1}\"]}",
            "{\"a\":\"unterminated\n",
            // A control character is found wherever a long string holds it.
            &format!("{{\"a\":\"{}\u{1f}{}\"}}", "x".repeat(70), "y".repeat(40)),
        ] {
            assert!(!controls_escaped(body.as_bytes()), "{body:?}");
        }
        for body in [
            "{\"a\":\"x\\ty\"}",
            "{\n\t\"a\": \"x\\\\\",\r\n \"b\": [\"\\\"\", \"\\u0001\"]\n}",
            "{\"a\":\"é\"}",
            "{\"a\":\"\\",
            &format!("{{\"a\":\"{}\"}}", "x".repeat(100)),
        ] {
            assert!(controls_escaped(body.as_bytes()), "{body:?}");
        }
    }

    #[test]
    fn every_cut_of_a_string_is_read_as_serde_json_reads_it() {
        // Each control character, at each offset from a 32-byte step.
        for control in 0u8..0x20 {
            for at in 0..70 {
                let mut text = "x".repeat(70).into_bytes();
                text[at] = control;
                let body = [b"{\"a\":\"", &text[..], b"\"}"].concat();
                let serde_json_reads = serde_json::from_slice::<de::IgnoredAny>(&body).is_ok();
                assert_eq!(
                    controls_escaped(&body),
                    serde_json_reads,
                    "{control} at {at}"
                );
            }
        }
    }

    #[test]
    fn text_is_read_with_its_escapes_undone_and_unpaired_surrogates_refused() {
        let read = |json: &str| serde_json::from_str::<MessageText>(json).map(|MessageText(t)| t);
        assert_eq!(
            read(r#""caf\u00e9 \"q\" \ud83d\ude00""#).unwrap(),
            "café \"q\" 😀"
        );
        assert_eq!(read("\"plain\"").unwrap(), "plain");
        let error = read(r#""\ud800 alone""#).unwrap_err().to_string();
        assert!(error.contains("without its pair"), "{error}");
        let error = serde_json::from_slice::<MessageText>(b"\"\xff\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not UTF-8"), "{error}");
        let error = read("5").unwrap_err().to_string();
        assert!(error.contains("expected a string"), "{error}");
        // Read from a value, as a translated request is.
        let value = serde_json::json!("from a value");
        assert_eq!(MessageText::deserialize(&value).unwrap().0, "from a value");
    }
}
