//! Reading usage out of upstream answers: whole bodies and stream chunks,
//! before and while they are forwarded. A chunk is read for what the meter
//! needs (usage, the length of its text); an upstream error sent with a
//! 200 is found here, so it can still fail over.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

use super::Observed;
use crate::error::GatewayError;
use crate::openai::scan::{in_top_level, member_values};
use crate::openai::{IdentityView, ReportedUsage, ResponseView};

/// What the gateway reads of one stream chunk.
pub struct ChunkFacts {
    pub observed: Observed,
    pub usage_only: bool,
}

/// Reads an upstream object before the client has seen any of it, so that
/// a broken one or an error sent with a 200 can still fail over.
pub fn read_view<'b>(backend: &str, body: &'b [u8]) -> Result<ResponseView<'b>, GatewayError> {
    let view = parse::<ResponseView<'_>>(backend, body)?;
    if view.is_error() {
        return Err(GatewayError::upstream_in_band(backend, body));
    }
    Ok(view)
}

/// Checked to be UTF-8 in one SIMD pass, then read as text: read as bytes,
/// each string would be checked on its own, which costs more.
fn parse<'b, T: Deserialize<'b>>(backend: &str, body: &'b [u8]) -> Result<T, GatewayError> {
    let not_json = |e: &dyn std::fmt::Display| {
        GatewayError::upstream_protocol(backend, format_args!("the body is not JSON: {e}"))
    };
    let text = simdutf8::compat::from_utf8(body).map_err(|e| not_json(&e))?;
    serde_json::from_str(text).map_err(|e| not_json(&e))
}

/// The model an upstream response or stream chunk says answered, when it
/// names one.
pub fn answering_model(body: &[u8]) -> Option<String> {
    let view: IdentityView<'_> = serde_json::from_slice(body).ok()?;
    Some(view.identity().model).filter(|model| !model.is_empty())
}

/// Reads one chunk. Most chunks carry a few characters of text and nothing
/// else the meter needs: they are checked to be framed as a JSON object
/// and their text measured, without being parsed. A chunk's usage is
/// parsed on its own, strictly; the rest of that chunk, as of any other,
/// is only measured. `"usage": null`, which OpenAI and Together put in
/// every chunk before the last, is no usage. A chunk that may be an error,
/// or whose usage may be Groq's (under `x_groq`, where it does not make
/// the chunk usage-only), is read in full. With the facts, where the
/// chunk's text is when that text is its first `content` member's, a
/// string, and the chunk has neither usage nor an error.
fn read(backend: &str, chunk: &[u8]) -> Result<(ChunkFacts, Option<TextAt>), GatewayError> {
    let mut usages = usage_values(chunk, 0).peekable();
    let k = &*KEYS;
    if k.error.find(chunk).is_some() || (usages.peek().is_some() && k.x_groq.find(chunk).is_some())
    {
        let view = read_view(backend, chunk)?;
        let facts = ChunkFacts {
            observed: Observed::of(&view),
            usage_only: view.is_usage_only(),
        };
        return Ok((facts, None));
    }
    if !framed_as_object(chunk) {
        return Err(GatewayError::upstream_protocol(
            backend,
            "a stream chunk is not a JSON object",
        ));
    }
    let Some((_, reported)) = own_usage(chunk, usages) else {
        let (text_chars, text_at) = text(chunk);
        return Ok((text_only(text_chars), text_at));
    };
    let reported = reported.map_err(|e| {
        GatewayError::upstream_protocol(
            backend,
            format_args!("a stream chunk's usage cannot be read: {e}"),
        )
    })?;
    // The usage-only chunk has no choices, so no text.
    let usage_only = member_values(&k.choices, chunk)
        .next()
        .is_some_and(empty_array);
    let text_chars = if usage_only { 0 } else { text(chunk).0 };
    let facts = ChunkFacts {
        observed: Observed {
            usage: Some(reported.read()),
            text_chars,
        },
        usage_only,
    };
    Ok((facts, None))
}

/// The chunk's own usage member among `usages` (its `"usage"` members),
/// not a nested object's: legacy completions key their top
/// log-probabilities by token, `"usage"` among them. It is the one that
/// ends the chunk, as every upstream puts it, or else the first a scan of
/// what comes before it finds in the chunk's top level. With its value,
/// as read.
fn own_usage<'c>(
    chunk: &'c [u8],
    usages: impl Iterator<Item = &'c [u8]>,
) -> Option<(&'c [u8], Result<ReportedUsage, String>)> {
    for value in usages {
        let read = usage_at(value);
        let ends_the_chunk = matches!(&read, Ok((_, rest)) if rest.trim_ascii() == b"}");
        if ends_the_chunk || in_top_level(chunk, chunk.len() - value.len()) {
            return Some((value, read.map(|(usage, _)| usage)));
        }
    }
    None
}

/// The usage `value` (to the end of its chunk) starts with, and what
/// follows it.
fn usage_at(value: &[u8]) -> Result<(ReportedUsage, &[u8]), String> {
    // Checked as UTF-8 in one pass: read as bytes, each name would be
    // checked on its own, which costs more.
    let text = simdutf8::compat::from_utf8(value).map_err(|e| e.to_string())?;
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<ReportedUsage>();
    match values.next() {
        Some(Ok(usage)) => Ok((usage, &value[values.byte_offset()..])),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("no value".to_owned()),
    }
}

/// Whether `value` (to the end of its chunk) starts with `[]`.
fn empty_array(value: &[u8]) -> bool {
    value
        .strip_prefix(b"[")
        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"]"))
}

/// The facts of a chunk with text and neither usage nor an error.
fn text_only(text_chars: usize) -> ChunkFacts {
    ChunkFacts {
        observed: Observed {
            usage: None,
            text_chars,
        },
        usage_only: false,
    }
}

/// Where a chunk's text is: its string value from its opening quote
/// (`start`) to past its closing one (`end`, `None` when it is cut short).
#[derive(Clone, Copy)]
struct TextAt {
    start: usize,
    end: Option<usize>,
}

/// Reads the chunks of one stream, each as [`read`] does, with less
/// searching. A stream's chunks repeat the same opening (its id, model
/// and creation time, the choice's index) up to their text, and most
/// repeat what follows it too (`finish_reason: null` and the closing
/// brackets). Once a chunk with neither usage nor an error has had its
/// text found at its first `content` member, the next chunk that opens
/// with the same bytes has its text there too, and only what follows it
/// is searched for usage and errors; when that is the same as the kept
/// chunk's, it holds neither, and is not searched at all. A member name
/// is quoted, and a string's quotes are escaped, so the text holds none.
/// The `finish_reason`s that say how the answers ended are counted where
/// a chunk is searched: in what follows the text of a chunk whose ending
/// changed, and in a chunk read in full.
#[derive(Default)]
pub struct StreamReader {
    /// The last chunk read in full without its text (its opening, then
    /// what follows the text), when its text is the value of its first
    /// `content` member, a string, and it has neither usage nor an error;
    /// else empty.
    kept: Vec<u8>,
    /// Where the opening ends in `kept`.
    opening: usize,
    /// Chunks that did not open as the one before: a stream that puts
    /// what changes (Together's text and token id) before its `content`
    /// stops being compared.
    misses: u8,
    /// Chunks that opened as the one before but did not end as it did: a
    /// stream that puts what changes after its text (OpenAI's
    /// `obfuscation` padding) stops keeping its endings.
    ending_misses: u8,
    /// The `finish_reason`s read that name a reason: each ends an answer.
    finishes: u32,
}

/// The most kept of a chunk: an id, a model's name and an index take a
/// few hundred bytes, and an open stream holds what it keeps.
const MAX_KEPT: usize = 1024;
/// Misses after which a stream's openings, or its endings, are no longer
/// kept.
const MAX_MISSES: u8 = 3;

impl StreamReader {
    pub fn read(&mut self, backend: &str, chunk: &[u8]) -> Result<ChunkFacts, GatewayError> {
        if !self.kept.is_empty() {
            let (opening, closing) = self.kept.split_at(self.opening);
            match chunk
                .strip_prefix(opening)
                .and_then(|rest| Some((rest, string(rest)?)))
            {
                Some((rest, (text, end))) => {
                    let after = end.map(|end| &rest[end..]);
                    if !closing.is_empty() {
                        if after == Some(closing) {
                            return Ok(text_only(text));
                        }
                        self.ending_misses += 1;
                    }
                    // The opening held no usage, error or tool call, and
                    // its bytes are the same: any is past it. An ending
                    // that calls a tool is not kept, as `text` keeps no
                    // chunk that does; nor is one with usage in a nested
                    // object, which `read` tells from the chunk's own.
                    if usage_values(chunk, chunk.len() - rest.len())
                        .next()
                        .is_none()
                        && KEYS.error.find(rest).is_none()
                        && framed_as_object(chunk)
                    {
                        // A reason in the opening was counted with the kept
                        // chunk's, and the text holds no member.
                        let reasons = after.map_or(0, finish_reasons);
                        self.finishes = self.finishes.saturating_add(reasons);
                        let called = after.and_then(arguments);
                        self.keep_closing(after.filter(|_| called.is_none()));
                        return Ok(text_only(text + called.unwrap_or(0)));
                    }
                }
                None => self.misses += 1,
            }
            self.kept.clear();
        }
        let (facts, text_at) = read(backend, chunk)?;
        if !facts.usage_only {
            self.finishes = self.finishes.saturating_add(finish_reasons(chunk));
        }
        if self.misses < MAX_MISSES
            && let Some(at) = text_at
        {
            self.keep(chunk, at);
        }
        Ok(facts)
    }

    /// Whether the chunks read so far have said the end of `answers`
    /// answers (a `finish_reason` that is not `null` for each), as every
    /// upstream's last chunk for an answer does. A chunk that repeats the
    /// ending of the one before it is taken without search, so a reason
    /// it repeats counts once.
    pub fn finished(&self, answers: u32) -> bool {
        self.finishes >= answers
    }

    /// Keeps `chunk` without its text, at `at`.
    fn keep(&mut self, chunk: &[u8], at: TextAt) {
        self.kept.clear();
        if at.start <= MAX_KEPT {
            let closing = at.end.map_or(0, |end| chunk.len() - end);
            self.kept.reserve(at.start + closing);
            self.kept.extend_from_slice(&chunk[..at.start]);
            self.opening = at.start;
            self.keep_closing(at.end.map(|end| &chunk[end..]));
        }
    }

    /// Keeps `closing` as what follows the text, when it is known and fits
    /// and the stream's endings have not changed too often.
    fn keep_closing(&mut self, closing: Option<&[u8]>) {
        self.kept.truncate(self.opening);
        if self.ending_misses >= MAX_MISSES {
            return;
        }
        if let Some(closing) = closing.filter(|c| self.opening + c.len() <= MAX_KEPT) {
            self.kept.extend_from_slice(closing);
        }
    }
}

/// `chunk` without its `"usage"` member, as the bytes before it and after
/// it: for the usage so far the gateway asked an upstream for and the
/// client did not. `None` when it has none, or not as an object that ends
/// in the chunk. Cold: only a budgeted stream from vLLM has such chunks,
/// and every other chunk's path stays as short as it was.
#[cold]
pub fn without_usage(chunk: &[u8]) -> Option<(&[u8], &[u8])> {
    let (value, _) = own_usage(chunk, usage_values(chunk, 0))?;
    let start = chunk.len() - value.len();
    let end = start + object_len(value)?;
    let before = chunk[..start]
        .trim_ascii_end()
        .strip_suffix(b":")?
        .trim_ascii_end()
        .strip_suffix(b"\"usage\"")?
        .trim_ascii_end();
    Some(match before.strip_suffix(b",") {
        Some(before) => (before, &chunk[end..]),
        // The first member: the comma after it goes instead.
        None => {
            let after = &chunk[end..];
            let trimmed = after.trim_ascii_start();
            (before, trimmed.strip_prefix(b",").unwrap_or(after))
        }
    })
}

/// The length of the JSON object `value` starts with.
fn object_len(value: &[u8]) -> Option<usize> {
    if !value.starts_with(b"{") {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in value.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The values (each to the end of `chunk`) of its `"usage"` members that
/// are not `null`, from byte `from` on, nested ones too.
fn usage_values(chunk: &[u8], from: usize) -> impl Iterator<Item = &[u8]> {
    member_values(&KEYS.usage, &chunk[from..]).filter(|value| !value.starts_with(b"null"))
}

/// The keys a chunk is searched for, each searcher built once: building
/// one per search cost more than the search.
struct Keys {
    usage: Finder<'static>,
    error: Finder<'static>,
    x_groq: Finder<'static>,
    choices: Finder<'static>,
    content: Finder<'static>,
    text: Finder<'static>,
    reasoning_content: Finder<'static>,
    reasoning: Finder<'static>,
    arguments: Finder<'static>,
    finish_reason: Finder<'static>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    usage: Finder::new(b"\"usage\""),
    error: Finder::new(b"\"error"),
    x_groq: Finder::new(b"\"x_groq\""),
    choices: Finder::new(b"\"choices\""),
    content: Finder::new(b"\"content\""),
    text: Finder::new(b"\"text\""),
    reasoning_content: Finder::new(b"\"reasoning_content\""),
    reasoning: Finder::new(b"\"reasoning\""),
    arguments: Finder::new(b"\"arguments\""),
    finish_reason: Finder::new(b"\"finish_reason\""),
});

/// How many `finish_reason` members of `json` name a reason: a string, not
/// `null`. A log-probability keyed by the token `finish_reason` has a
/// number for its value, and is none.
fn finish_reasons(json: &[u8]) -> u32 {
    let reasons = member_values(&KEYS.finish_reason, json).filter(|value| value.starts_with(b"\""));
    u32::try_from(reasons.count()).unwrap_or(u32::MAX)
}

/// Bytes of generated text in a chunk, for an estimate when the upstream
/// reports no usage, and for a stream's running cost: the first string
/// value of a `content` member (chat) or else of a `text` member (legacy;
/// Together sends both, so only one counts), or else of a reasoning
/// member (`reasoning_content`, vLLM's and DeepSeek's; `reasoning`,
/// Together's and newer vLLM's: reasoning is output too), and every tool
/// call's `arguments`, measured as decoded, without parsing the chunk. The
/// reasoning names are looked for only in a chunk with neither of the
/// others. With it, where the value is when it is the first `content`
/// member's.
fn text(chunk: &[u8]) -> (usize, Option<TextAt>) {
    let k = &*KEYS;
    for (n, value) in member_values(&k.content, chunk).enumerate() {
        if let Some((chars, end)) = string(value) {
            let start = chunk.len() - value.len();
            let at = TextAt {
                start,
                end: end.map(|end| start + end),
            };
            // A chunk that calls a tool is not kept: a next chunk with its
            // bytes carries the call's arguments again, which count again.
            let called = arguments(chunk);
            let at = (n == 0 && called.is_none()).then_some(at);
            return (chars + called.unwrap_or(0), at);
        }
    }
    let chars = [&k.text, &k.reasoning_content, &k.reasoning]
        .into_iter()
        .find_map(|key| member_string(key, chunk))
        .unwrap_or(0);
    (chars + arguments(chunk).unwrap_or(0), None)
}

/// The decoded length of every tool call's `arguments` in `json`, or
/// `None` when it has no such member: a model's call is output it is
/// billed for, as its text is, and an upstream that ignores its limit may
/// stream a call of any length.
fn arguments(json: &[u8]) -> Option<usize> {
    let mut values = member_values(&KEYS.arguments, json).peekable();
    values.peek()?;
    Some(values.filter_map(|value| Some(string(value)?.0)).sum())
}

/// The decoded length of the first string value of a member named as
/// `key` searches for.
fn member_string(key: &Finder<'_>, chunk: &[u8]) -> Option<usize> {
    member_values(key, chunk).find_map(|value| Some(string(value)?.0))
}

/// The decoded length of the string that `value` (a member's value, to the
/// end of the chunk) starts with, and where in `value` it ends (past its
/// closing quote; `None` when it is cut short); `None` when it is no
/// string.
fn string(value: &[u8]) -> Option<(usize, Option<usize>)> {
    let text = value.strip_prefix(b"\"")?;
    let (mut at, mut decoded) = (0, 0);
    // Skips to each quote or backslash; a backslash starts an escape.
    while let Some(found) = memchr::memchr2(b'"', b'\\', &text[at..]) {
        let i = at + found;
        decoded += found;
        if text[i] == b'"' {
            return Some((decoded, Some(i + 2)));
        }
        let (written, bytes) = escape(&text[i..]);
        at = i + written;
        decoded += bytes;
        if at >= text.len() {
            break;
        }
    }
    // Cut short: count what there is.
    Some((decoded + text.len().saturating_sub(at), None))
}

/// An escape at the start of `text`: how many bytes it is written with,
/// and how many its character takes in UTF-8.
fn escape(text: &[u8]) -> (usize, usize) {
    let code = |at: usize| {
        text.get(at..at + 4)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
    };
    if text.get(1) != Some(&b'u') {
        return (2, 1);
    }
    match code(2) {
        // A high surrogate and its low half: one character of four bytes.
        Some(0xD800..=0xDBFF) if text.get(6..8) == Some(b"\\u") => (12, 4),
        Some(c) if c < 0x80 => (6, 1),
        Some(c) if c < 0x800 => (6, 2),
        _ => (6, 3),
    }
}

/// Whether a chunk starts and ends as a JSON object does. Chunks are passed
/// on as the upstream wrote them, and parsing each one in full to check it
/// would cost a large share of the gateway's CPU for a stream. The framing
/// catches what
/// upstreams send in place of a chunk (plain text, an HTML page, an object
/// cut short); any other fault is left to the client's JSON parser, as it
/// would be without a gateway.
fn framed_as_object(chunk: &[u8]) -> bool {
    let chunk = chunk.trim_ascii();
    chunk.first() == Some(&b'{') && chunk.last() == Some(&b'}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{ResponseView, Usage};

    const CONTENT: &str = r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}"#;

    /// A chunk read on its own.
    fn read_chunk(backend: &str, chunk: &[u8]) -> Result<ChunkFacts, GatewayError> {
        read(backend, chunk).map(|(facts, _)| facts)
    }

    fn text_chars(chunk: &[u8]) -> usize {
        text(chunk).0
    }

    /// What a read gives, as text that compares whole.
    fn facts(read: Result<ChunkFacts, GatewayError>) -> String {
        match read {
            Ok(f) => format!(
                "{:?} {} {}",
                f.observed.usage, f.observed.text_chars, f.usage_only
            ),
            Err(e) => format!("error {}", e.message()),
        }
    }

    /// The recorded streams' chunks.
    fn recorded() -> Vec<Vec<String>> {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openai");
        let mut streams = Vec::new();
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sse") {
                let text = std::fs::read_to_string(&path).unwrap();
                let chunks = text
                    .lines()
                    .filter_map(|line| line.strip_prefix("data: "))
                    .filter(|data| *data != "[DONE]")
                    .map(str::to_owned)
                    .collect();
                streams.push(chunks);
            }
        }
        assert!(streams.len() >= 4);
        streams
    }

    #[test]
    fn a_stream_read_in_turn_gives_what_each_chunk_read_alone_gives() {
        // Each chunk as recorded, then changed where a stream could change
        // it after chunks that opened the same way: usage, an error or
        // another text member added before or after the text, the text
        // not a string, escaped, cut short, or the chunk cut anywhere.
        let changes: Vec<fn(&str) -> String> = vec![
            |c| c.to_owned(),
            |c| {
                c.replacen(
                    "{",
                    r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},"#,
                    1,
                )
            },
            |c| c.replacen("{", r#"{"usage":null,"#, 1),
            |c| {
                format!(
                    "{},\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}",
                    &c[..c.len() - 1]
                )
            },
            |c| {
                format!(
                    "{},\"error\":{{\"message\":\"overloaded\"}}}}",
                    &c[..c.len() - 1]
                )
            },
            |c| format!("{},\"object\":\"error\"}}", &c[..c.len() - 1]),
            |c| c.replacen(r#""content":""#, r#""content":"\"\u00e9\ud83d\ude00"#, 1),
            |c| c.replacen(r#""content":""#, r#""content":null,"text":""#, 1),
            |c| c.replacen(r#""content":""#, r#""content": 7,"reasoning":""#, 1),
            |c| c.replacen(r#""content":""#, r#""content" : ""#, 1),
            |c| c.replace(r#""content""#, r#""contents""#),
        ];
        for stream in recorded() {
            for (n, change) in changes.iter().enumerate() {
                // The change on every chunk, and on every other one.
                for every in [1, 2] {
                    let mut reader = StreamReader::default();
                    for (i, chunk) in stream.iter().enumerate() {
                        let chunk = if i % every == 0 {
                            change(chunk)
                        } else {
                            chunk.clone()
                        };
                        let alone = facts(read_chunk("b", chunk.as_bytes()));
                        let in_turn = facts(reader.read("b", chunk.as_bytes()));
                        assert_eq!(in_turn, alone, "change {n}, chunk {i}: {chunk}");
                    }
                }
            }
            // Each chunk cut at every length, after the stream's chunks
            // before it.
            for (i, chunk) in stream.iter().enumerate() {
                for cut in 0..chunk.len() {
                    let mut reader = StreamReader::default();
                    for before in &stream[..i] {
                        let _ = reader.read("b", before.as_bytes());
                    }
                    let cut = &chunk.as_bytes()[..cut];
                    assert_eq!(facts(reader.read("b", cut)), facts(read_chunk("b", cut)));
                }
            }
        }
    }

    #[test]
    fn a_stream_whose_chunks_open_alike_is_searched_only_past_the_opening() {
        let mut reader = StreamReader::default();
        let _ = reader.read("b", CONTENT.as_bytes());
        let (opening, closing) = CONTENT.split_once(r#""hello""#).unwrap();
        let read_text = |reader: &mut StreamReader, chunk: &str| {
            reader
                .read("b", chunk.as_bytes())
                .unwrap()
                .observed
                .text_chars
        };
        let kept = |reader: &StreamReader| {
            let (opening, closing) = reader.kept.split_at(reader.opening);
            (
                String::from_utf8(opening.to_vec()).unwrap(),
                String::from_utf8(closing.to_vec()).unwrap(),
            )
        };
        assert_eq!(kept(&reader), (opening.into(), closing.into()));
        // The same around other text: nothing searched, nothing changed.
        let next = CONTENT.replace("hello", "wor\\\\ld!");
        assert_eq!(read_text(&mut reader, &next), 7);
        assert_eq!(kept(&reader), (opening.into(), closing.into()));
        // What follows the text changed: searched, and kept in its place.
        let stop = CONTENT.replace("null}", "\"stop\"}");
        let _ = reader.read("b", stop.as_bytes());
        let (_, stop_closing) = stop.split_once(r#""hello""#).unwrap();
        assert_eq!(kept(&reader), (opening.into(), stop_closing.into()));
        // An error member in the opening, even null: every chunk is read
        // in full. A null usage is kept in the opening: it stays null
        // while the opening's bytes stay the same.
        let mut reader = StreamReader::default();
        let _ = reader.read(
            "b",
            br#"{"error":null,"choices":[{"delta":{"content":"a"}}]}"#,
        );
        assert!(reader.kept.is_empty());
        let _ = reader.read(
            "b",
            br#"{"usage":null,"choices":[{"delta":{"content":"a"}}]}"#,
        );
        assert!(!reader.kept.is_empty());
        // Chunks that open otherwise each time: after three, none is kept.
        let mut reader = StreamReader::default();
        for n in 0..5 {
            let chunk = format!(r#"{{"text":"{n}","delta":{{"content":"{n}"}}}}"#);
            let _ = reader.read("b", chunk.as_bytes());
            assert_eq!(reader.kept.is_empty(), n >= 3, "{n}");
        }
        // Chunks that end otherwise each time: after three, the opening
        // alone is kept.
        let mut reader = StreamReader::default();
        for n in 0..6 {
            let chunk = CONTENT.replace("null}", &format!("null,\"pad\":\"{}\"}}", "x".repeat(n)));
            assert_eq!(read_text(&mut reader, &chunk), 5);
            assert_eq!(kept(&reader).0, opening);
            assert_eq!(kept(&reader).1.is_empty(), n >= 3, "{n}");
        }
        // A long opening is not kept; with a long closing, the opening is.
        let mut reader = StreamReader::default();
        let long = "x".repeat(MAX_KEPT);
        let _ = reader.read(
            "b",
            format!(r#"{{"id":"{long}","choices":[{{"delta":{{"content":"a"}}}}]}}"#).as_bytes(),
        );
        assert!(reader.kept.is_empty());
        let chunk = format!(r#"{{"choices":[{{"delta":{{"content":"a"}}}}],"x":"{long}"}}"#);
        let _ = reader.read("b", chunk.as_bytes());
        assert_eq!(kept(&reader).0, r#"{"choices":[{"delta":{"content":"#);
        assert_eq!(kept(&reader).1, "");
        assert_eq!(read_text(&mut reader, &chunk), 1);
    }

    #[test]
    fn text_is_measured_without_parsing() {
        assert_eq!(text_chars(CONTENT.as_bytes()), 5);
        assert_eq!(
            text_chars(br#"{"choices":[{"delta":{"content":"a\"b"}}]}"#),
            3
        );
        assert_eq!(
            text_chars(br#"{"choices":[{"text":"xyz","delta":{"content":"xyz"}}]}"#),
            3
        );
        assert_eq!(
            text_chars(br#"{"choices":[{"delta":{"content":null}}]}"#),
            0
        );
    }

    #[test]
    fn text_is_measured_whatever_its_length_and_where_its_escapes_fall() {
        for len in 0..72 {
            for escape_at in [None, Some(0), Some(31), Some(32), Some(33), Some(len)] {
                let mut text = "x".repeat(len);
                if let Some(at) = escape_at.filter(|at| *at <= len) {
                    text.insert_str(at, "\"\u{e9}\n");
                }
                let chunk = serde_json::json!({"choices": [{"delta": {"content": text}}]});
                let written = serde_json::to_string(&chunk).unwrap();
                assert_eq!(text_chars(written.as_bytes()), text.len(), "{written}");
            }
        }
    }

    #[test]
    fn reasoning_is_output_and_measured_too() {
        for (chunk, chars) in [
            (
                r#"{"choices":[{"delta":{"reasoning_content":"think","content":null}}]}"#,
                5,
            ),
            (r#"{"choices":[{"delta":{"reasoning":"hmm"}}]}"#, 3),
            (r#"{"choices":[{"delta":{"content":"answer"}}]}"#, 6),
        ] {
            assert_eq!(text_chars(chunk.as_bytes()), chars, "{chunk}");
        }
        let whole: ResponseView<'_> = serde_json::from_str(
            r#"{"choices":[{"message":{"reasoning_content":"think","content":"answer"}}]}"#,
        )
        .unwrap();
        assert_eq!(whole.text_chars(), 11);
    }

    /// How many answers `chunks`, read in turn, said the end of.
    fn finishes<'c>(chunks: impl IntoIterator<Item = &'c str>) -> u32 {
        let mut reader = StreamReader::default();
        for chunk in chunks {
            reader.read("b", chunk.as_bytes()).unwrap();
        }
        reader.finishes
    }

    #[test]
    fn a_finish_reason_is_counted_wherever_a_chunk_is_read_and_only_a_reason() {
        // Every recorded stream ends its answer once, read whichever way
        // its last chunks are (an ending searched, read in full, Groq's
        // and Together's with usage); without its finish chunk, none.
        for stream in recorded() {
            assert_eq!(finishes(stream.iter().map(String::as_str)), 1, "{stream:?}");
            let unfinished = stream
                .iter()
                .filter(|c| !c.contains(r#""finish_reason":""#));
            assert_eq!(finishes(unfinished.map(String::as_str)), 0, "{stream:?}");
        }
        // The reason in a chunk that opens and ends as the one before it
        // but for its ending, or in a chunk read in full; each answer of
        // two; a reason in text, or a token keyed `finish_reason`, is none.
        let chunk = |index: u32, text: &str, finish: &str| {
            format!(
                r#"{{"id":"c","choices":[{{"index":{index},"delta":{{"content":"{text}"}},"finish_reason":{finish}}}]}}"#
            )
        };
        let (a, b, stop) = (
            chunk(0, "a", "null"),
            chunk(0, "b", "null"),
            chunk(0, "", r#""stop""#),
        );
        assert_eq!(finishes([&a, &b, &b, &stop].map(String::as_str)), 1);
        assert_eq!(finishes([stop.as_str()]), 1);
        let two = [
            chunk(0, "a", "null"),
            chunk(1, "a", "null"),
            chunk(0, "", r#""stop""#),
            chunk(1, "", r#""length""#),
        ];
        assert_eq!(finishes(two.iter().map(String::as_str)), 2);
        let both = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{},"finish_reason":"tool_calls"}]}"#;
        assert_eq!(finishes([both]), 2);
        let said = chunk(0, r#"\"finish_reason\":\"stop\""#, "null");
        let keyed = r#"{"choices":[{"index":0,"text":"x","logprobs":{"top_logprobs":[{"finish_reason":-0.1}]},"finish_reason":null}]}"#;
        assert_eq!(finishes([&a, &said, &said].map(String::as_str)), 0);
        assert_eq!(finishes([keyed, keyed]), 0);
    }

    #[test]
    fn a_tool_calls_arguments_are_output_in_every_chunk_that_carries_them() {
        // Ollama-style chunks: an empty `content` beside each piece of the
        // call, the same bytes from chunk to chunk.
        let piece = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"","tool_calls":[{"index":0,"function":{"arguments":"tok "}}]}}]}"#;
        let opening = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"tok "}}]}"#;
        let mut reader = StreamReader::default();
        let mut read = |chunk: &str| {
            reader
                .read("b", chunk.as_bytes())
                .unwrap()
                .observed
                .text_chars
        };
        assert_eq!(read(opening), 4);
        for _ in 0..5 {
            assert_eq!(read(piece), 4);
        }
        // The call before the text: in the bytes a next chunk opens with.
        let before = r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"tok "}}],"content":""}}]}"#;
        for _ in 0..5 {
            assert_eq!(read(before), 4);
        }
        // OpenAI's and vLLM's: no content, and two calls in one chunk.
        let two = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"q\":"}},{"index":1,"function":{"arguments":"1}"}}]}}]}"#;
        assert_eq!(text_chars(two.as_bytes()), 5 + 2);
        let whole: ResponseView<'_> = serde_json::from_str(
            r#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{\"q\":1}"}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(whole.text_chars(), 7);
        // The older `functions` API's one call.
        let old = r#"{"choices":[{"message":{"content":null,"function_call":{"name":"f","arguments":"{}"}}}]}"#;
        let whole: ResponseView<'_> = serde_json::from_str(old).unwrap();
        assert_eq!((whole.text_chars(), text_chars(old.as_bytes())), (2, 2));
    }

    #[test]
    fn text_is_measured_as_json_reads_it_whatever_the_spacing_and_escapes() {
        let text = "caf\u{e9} \"q\"\n\u{1F600}\\";
        let chunk = serde_json::json!({
            "id": "c1",
            "choices": [{"index": 0, "logprobs": {"content": [{"token": "x"}]},
                         "delta": {"role": "assistant", "content": text}}]
        });
        for written in [
            serde_json::to_string(&chunk).unwrap(),
            serde_json::to_string_pretty(&chunk).unwrap(),
            serde_json::to_string(&chunk)
                .unwrap()
                .replace("\"content\":\"", "\"content\" :\t \""),
        ] {
            assert_eq!(text_chars(written.as_bytes()), text.len(), "{written}");
            let view: ResponseView<'_> = serde_json::from_str(&written).unwrap();
            assert_eq!(view.text_chars(), text.len());
        }
        // Escaped as some servers write non-ASCII text.
        let escaped = br#"{"choices":[{"delta":{"content":"caf\u00e9 \ud83d\ude00 \u20ac\/"}}]}"#;
        assert_eq!(text_chars(escaped), "café 😀 €/".len());
        assert_eq!(
            text_chars(br#"{"choices":[{"delta":{"role":"content","content" : "ab"}}]}"#),
            2,
            "a value that looks like a name is not one"
        );
    }

    #[test]
    fn chunks_not_framed_as_an_object_are_refused_without_parsing() {
        for good in [CONTENT, " {\"choices\":[]}\r\n"] {
            assert!(read_chunk("b", good.as_bytes()).is_ok(), "{good}");
        }
        for bad in [
            "Internal Server Error",
            "<html><body>502 Bad Gateway</body></html>",
            r#"{"id":"c1","choices":[{"delta":{"content":"cut"#,
            "[1,2]",
            "",
        ] {
            let error = read_chunk("b", bad.as_bytes()).err().expect(bad);
            assert_eq!(error.status(), axum::http::StatusCode::BAD_GATEWAY, "{bad}");
        }
        // Framed is enough for a chunk with nothing the meter reads.
        assert!(read_chunk("b", br#"{"id":"c1",choices}"#).is_ok());
        // Usage is read strictly; the rest of its chunk is only measured.
        let usage = r#"{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}"#;
        let chunk = format!(r#"{{"choices":[],"usage":{usage},oops}}"#);
        let facts = read_chunk("b", chunk.as_bytes()).unwrap();
        assert_eq!(facts.observed.usage, Some(Ok(Usage::new(3, 1))));
        assert!(facts.usage_only);
        for bad in [
            r#"{"prompt_tokens":3,}"#,
            r#""lots""#,
            r#"{"prompt_tokens":3 "completion_tokens":1}"#,
            "7",
        ] {
            let chunk = format!(r#"{{"choices":[],"usage":{bad}}}"#);
            let error = read_chunk("b", chunk.as_bytes()).err().expect(bad);
            assert!(
                error.message().contains("usage cannot be read"),
                "{}",
                error.message()
            );
        }
    }

    /// What reading `chunk` in full gives.
    fn parsed(chunk: &[u8]) -> String {
        facts(read_view("b", chunk).map(|view| ChunkFacts {
            observed: Observed::of(&view),
            usage_only: view.is_usage_only(),
        }))
    }

    /// A legacy completion chunk with log-probabilities whose tokens are
    /// `"usage` and `"content`, and no usage.
    const LOGPROBS: &str = r#"{"choices":[{"index":0,"text":"\"usage","logprobs":{"tokens":["\"usage"],"top_logprobs":[{"\"usage":-0.1,"\"content":-2.3}]}}]}"#;

    #[test]
    fn a_chunk_with_usage_gives_what_reading_it_in_full_gives() {
        let usage = r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}"#;
        let mut chunks: Vec<String> = recorded()
            .into_iter()
            .flatten()
            .filter(|chunk| {
                let chunk = chunk.as_bytes();
                own_usage(chunk, usage_values(chunk, 0)).is_some()
            })
            .collect();
        assert!(chunks.len() >= 4, "every recorded stream's usage");
        let shapes = [
            format!(r#"{{"id":"c1","choices":[],"usage":{usage}}}"#),
            format!(r#"{{"choices" : [ ],"usage" : {usage}}}"#),
            format!(r#"{{"usage":{usage},"choices":[]}}"#),
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"content":"bye"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            ),
            format!(r#"{{"choices":[{{"index":0,"text":"bye"}}],"usage":{usage}}}"#),
            format!(r#"{{"usage":{usage}}}"#),
            r#"{"choices":[],"usage":{"prompt_tokens":-1,"completion_tokens":4}}"#.to_owned(),
            r#"{"choices":[],"usage":{}}"#.to_owned(),
            format!(r#"{{"choices":[],"usage":null,"x_groq":{{"usage":{usage}}}}}"#),
            format!(r#"{{"choices":[],"x_groq":{{"id":"q"}},"usage":{usage}}}"#),
            // Legacy completions' top log-probabilities are keyed by token:
            // a token that ends `"usage` or `"choices` is a key whose last
            // bytes are a name in quotes, its first quote escaped.
            LOGPROBS.to_owned(),
            format!(r#"{},"usage":{usage}}}"#, &LOGPROBS[..LOGPROBS.len() - 1]),
            format!(
                r#"{{"choices":[{{"index":0,"text":"","logprobs":{{"top_logprobs":[{{"\\\"choices":[]}}]}}}}],"usage":{usage}}}"#
            ),
        ];
        chunks.extend(shapes);
        for chunk in chunks {
            let read = facts(read_chunk("b", chunk.as_bytes()));
            assert_eq!(read, parsed(chunk.as_bytes()), "{chunk}");
        }
    }

    #[test]
    fn a_chunks_usage_is_taken_out_wherever_it_is_and_the_rest_kept() {
        let cut = |chunk: &str| {
            without_usage(chunk.as_bytes()).map(|(before, after)| {
                let json = [before, after].concat();
                let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
                value.to_string()
            })
        };
        let usage = r#"{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":0}}"#;
        let content =
            r#""choices":[{"index":0,"delta":{"content":"a \"}\" b"},"finish_reason":null}]"#;
        let kept = format!(r#"{{"id":"c",{content}}}"#);
        let expected = serde_json::from_str::<serde_json::Value>(&kept)
            .unwrap()
            .to_string();
        for chunk in [
            format!(r#"{{"id":"c",{content},"usage":{usage}}}"#),
            format!(r#"{{"id":"c",{content} , "usage" : {usage} }}"#),
            format!(r#"{{"usage":{usage},"id":"c",{content}}}"#),
            format!(r#"{{"id":"c","usage":{usage},{content}}}"#),
        ] {
            assert_eq!(cut(&chunk).as_deref(), Some(expected.as_str()), "{chunk}");
        }
        assert_eq!(
            cut(&format!(r#"{{"usage":{usage}}}"#)).as_deref(),
            Some("{}")
        );
        for none in [
            kept.clone(),
            format!(r#"{{"id":"c","usage":null,{content}}}"#),
        ] {
            assert_eq!(cut(&none), None, "{none}");
        }
        assert_eq!(
            cut(r#"{"id":"c","usage":{"prompt_tokens":1"#),
            None,
            "cut short"
        );
    }

    #[test]
    fn usage_null_is_no_usage_and_costs_no_parse() {
        // Not JSON past its framing: read in full, it would be refused.
        for null in [
            r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null,oops}"#,
            r#"{"choices":[{"delta":{"content":"Hi"}}],"usage" :	null,oops}"#,
        ] {
            let facts = read_chunk("b", null.as_bytes()).expect(null);
            assert!(facts.observed.usage.is_none(), "{null}");
            assert_eq!(facts.observed.text_chars, 2, "{null}");
        }
        // Usage after a null one, as Groq nests it, is read.
        let nested = r#"{"choices":[{"delta":{}}],"usage":null,"x_groq":{"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}}"#;
        let facts = read_chunk("b", nested.as_bytes()).unwrap();
        let usage = facts.observed.usage.unwrap().unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 1));
        // A string "usage" is no member: the member after it is read.
        let named = r#"{"choices":[{"delta":{"content":"usage"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let facts = read_chunk("b", named.as_bytes()).unwrap();
        assert_eq!(facts.observed.usage.unwrap().unwrap().total_tokens, 4);
    }

    /// Random stream chunks in shapes upstreams send, and in shapes a
    /// model's output can put into them: strings holding quotes, member
    /// names, backslashes and control characters; log-probabilities keyed
    /// by tokens such as `"usage` or `x\`; members in any order.
    struct Chunks(fastrand::Rng);

    impl Chunks {
        fn text(&mut self) -> String {
            const PIECES: &[&str] = &[
                "hi",
                " ",
                "\"usage\":",
                "\\",
                "\\\"",
                "\"choices\":[]",
                "é",
                "\n",
                "\"error\":1",
                "\"content\":\"x\"",
                "\"arguments\":\"x\"",
                "usage",
                "\"",
                "{",
                "}",
                "\u{1}",
                "null",
                "😀",
            ];
            let n = self.0.usize(0..4);
            let text: String = (0..n)
                .map(|_| PIECES[self.0.usize(..PIECES.len())])
                .collect();
            serde_json::to_string(&text).unwrap()
        }

        fn name(&mut self) -> String {
            const NAMES: &[&str] = &[
                "\"usage",
                "\"choices",
                "x\\",
                "\"content",
                "\"error",
                "tok",
                "\"text",
                "usage\"",
                "\\\"usage",
                "\"arguments",
            ];
            self.one_of(NAMES)
        }

        /// A token as legacy completions' top log-probabilities key it,
        /// with a number for its value: any word, a member's name too.
        fn token(&mut self) -> String {
            const TOKENS: &[&str] = &[
                "usage",
                "content",
                "text",
                "error",
                "choices",
                "x_groq",
                "reasoning",
                "arguments",
                "finish_reason",
                "tok",
            ];
            self.one_of(TOKENS)
        }

        /// One of `strings`, as a JSON string.
        fn one_of(&mut self, strings: &[&str]) -> String {
            serde_json::to_string(strings[self.0.usize(..strings.len())]).unwrap()
        }

        fn value(&mut self, depth: u32) -> String {
            match self.0.usize(0..6) {
                0 => self.text(),
                1 => "-0.5".into(),
                2 => "null".into(),
                3 if depth < 2 => format!("{{{}:{}}}", self.name(), self.value(depth + 1)),
                4 if depth < 2 => format!("[{}]", self.value(depth + 1)),
                _ => "[]".into(),
            }
        }

        fn members(&mut self, mut members: Vec<String>) -> String {
            self.0.shuffle(&mut members);
            format!("{{{}}}", members.join(","))
        }

        /// A choice of a chat chunk (`delta`) or of a legacy completion's
        /// (`text`), with log-probabilities or without.
        fn choice(&mut self) -> String {
            let finish = ["null", r#""stop""#, r#""tool_calls""#][self.0.usize(..3)];
            let mut members = vec![
                r#""index":0"#.to_owned(),
                format!(r#""finish_reason":{finish}"#),
            ];
            if self.0.bool() {
                let content = if self.0.u8(..4) == 0 {
                    "null".into()
                } else {
                    self.text()
                };
                let calls = match self.0.u8(..3) {
                    0 => format!(
                        r#","tool_calls":[{{"index":0,"function":{{"name":{},"arguments":{}}}}},{{"index":1,"function":{{"arguments":{}}}}}]"#,
                        self.text(),
                        self.text(),
                        self.text()
                    ),
                    _ => String::new(),
                };
                members.push(format!(
                    r#""delta":{{"role":"assistant","content":{content}{calls}}}"#
                ));
            } else {
                members.push(format!(r#""text":{}"#, self.text()));
            }
            if self.0.bool() {
                let (token, first, second, value) =
                    (self.text(), self.token(), self.name(), self.value(0));
                members.push(format!(
                    r#""logprobs":{{"tokens":[{token}],"top_logprobs":[{{{first}:-0.1,{second}:{value}}}]}}"#
                ));
            }
            self.members(members)
        }

        /// A chunk of no choice or one (a stream with `n` over 1 sends each
        /// choice in chunks of its own), with usage, `"usage": null` or
        /// neither, and maybe one more member of any name.
        fn chunk(&mut self) -> String {
            let choices = if self.0.bool() {
                self.choice()
            } else {
                String::new()
            };
            let mut members = vec![
                r#""id":"c1""#.to_owned(),
                r#""model":"m""#.to_owned(),
                format!(r#""choices":[{choices}]"#),
            ];
            match self.0.u8(..3) {
                0 => members.push(r#""usage":null"#.into()),
                1 => members.push(
                    r#""usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#.into(),
                ),
                _ => {}
            }
            if self.0.bool() {
                members.push(format!("{}:{}", self.name(), self.value(0)));
            }
            self.members(members)
        }

        /// A chat chunk that opens as every chunk of its stream does, up to
        /// its text, and ends in any of the ways one can.
        fn next_in_stream(&mut self) -> String {
            const OPENING: &str =
                r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"#;
            let text = if self.0.u8(..8) == 0 {
                "null".into()
            } else {
                self.text()
            };
            let ending = match self.0.u8(..7) {
                0 => r#"}}],"usage":null}"#.into(),
                1 => r#"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
                    .into(),
                2 => format!(
                    r#"}},"logprobs":{{"top_logprobs":[{{{}:-0.1,{}:-0.2}}]}}}}]}}"#,
                    self.name(),
                    self.token()
                ),
                3 => format!(r#"}}}}],{}:{}}}"#, self.name(), self.value(0)),
                4 => format!(
                    r#","tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}}}]}}"#,
                    self.text()
                ),
                5 => r#"},"logprobs":null,"finish_reason":"stop"}]}"#.into(),
                _ => "}}]}".into(),
            };
            format!("{OPENING}{text}{ending}")
        }
    }

    #[test]
    fn chunks_of_any_shape_read_fast_give_what_reading_them_in_full_gives() {
        let mut chunks = Chunks(fastrand::Rng::with_seed(23));
        let mut stream = Stream::default();
        for _ in 0..10_000 {
            let chunk = chunks.chunk();
            let full = parsed(chunk.as_bytes());
            assert_eq!(facts(read_chunk("b", chunk.as_bytes())), full, "{chunk}");
            // And as the next chunk of a stream, after one that opened as
            // it does.
            assert_eq!(stream.read(&chunk), full, "{chunk}");
            stream.maybe_end(&mut chunks.0);
        }
        let mut stream = Stream::default();
        for _ in 0..20_000 {
            let chunk = chunks.next_in_stream();
            let full = parsed(chunk.as_bytes());
            assert_eq!(stream.read(&chunk), full, "{chunk}");
            stream.maybe_end(&mut chunks.0);
        }
    }

    /// Random chunks read in turn, as a stream that ends now and then: at
    /// its end, the reader has counted a reason when one of the chunks
    /// it took named one.
    #[derive(Default)]
    struct Stream {
        reader: StreamReader,
        named: bool,
        chunks: Vec<String>,
    }

    impl Stream {
        fn read(&mut self, chunk: &str) -> String {
            let read = self.reader.read("b", chunk.as_bytes());
            if read.is_ok() {
                let value: serde_json::Value = serde_json::from_str(chunk).unwrap();
                let choices = value["choices"].as_array().into_iter().flatten();
                self.named |= choices.into_iter().any(|c| c["finish_reason"].is_string());
            }
            self.chunks.push(chunk.to_owned());
            facts(read)
        }

        fn maybe_end(&mut self, rng: &mut fastrand::Rng) {
            if rng.u8(..4) == 0 {
                let counted = self.reader.finished(1);
                assert_eq!(counted, self.named, "{:#?}", self.chunks);
                *self = Self::default();
            }
        }
    }
}
