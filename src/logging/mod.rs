//! Log output: one line per event, written to stderr by a thread of its
//! own. As text, in tracing's default layout, formatted without `fmt`
//! machinery where it can be avoided (the access-log line is written for
//! every request); as JSON, one object per line.

mod buffer;
mod format;
mod words;

use std::fmt::{self, Write};
use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;

pub use words::echo_words;

pub use buffer::{FlushOnDrop, LogBuffer, start};
pub use format::{Fields, Line, Timestamp};

/// How log lines are written (`[logging] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `TIME LEVEL target: message name=value …`, for people.
    #[default]
    Text,
    /// `{"timestamp":…,"level":…,"message":…,"name":value,…}`, every field
    /// at the top level, for a log pipeline.
    Json,
}

/// Sends this process's log lines to stderr in `format`, filtered by
/// `RUST_LOG` (default `info`). Dropping what it returns writes the lines
/// still queued.
pub fn install(format: LogFormat) -> FlushOnDrop {
    let (writer, flush) = start(std::io::stderr());
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(format, writer, ansi))
        .expect("the log subscriber is installed once");
    flush
}

/// The subscriber that writes each event to `writer` in `format`.
fn subscriber<W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        // aws-sigv4 traces the canonical request, Bedrock's session token
        // included: whatever RUST_LOG says, it never logs.
        .add_directive("aws_sigv4=off".parse().expect("a valid directive"));
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(Timestamp)
        .with_writer(writer);
    match format {
        // The access-log line is written for every request: it is
        // formatted without `fmt` machinery, to the same layout.
        LogFormat::Text => Box::new(
            lines
                .with_ansi(ansi)
                .fmt_fields(Fields)
                .event_format(Line::default())
                .finish(),
        ),
        LogFormat::Json => Box::new(
            lines
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// The most of a client's own string (a model name, a path, a value
/// quoted back in an error) that a log line or an error message holds.
pub const MAX_CLIENT_CHARS: usize = 256;

/// The most of an error message a client sees and a log line holds:
/// messages echo what clients and upstreams sent.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// `text` with control characters written as escapes, so that it cannot
/// forge a log line, and cut to `max` characters, marked with `…`.
pub fn bounded(text: String, max: usize) -> String {
    if text.len() <= max && !text.chars().any(char::is_control) {
        return text;
    }
    let mut out = String::with_capacity(text.len().min(max + 3));
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push('…');
            break;
        }
        // Writing to a String does not fail.
        let _ = push_escaped(&mut out, c);
    }
    out
}

/// Writes `c`, or its escape when it is a control character.
fn push_escaped(out: &mut impl Write, c: char) -> fmt::Result {
    if c.is_control() {
        c.escape_default().try_for_each(|e| out.write_char(e))
    } else {
        out.write_char(c)
    }
}

/// A writer keeping everything written, for tests to read back.
#[cfg(test)]
#[derive(Clone, Default)]
struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
impl tracing_subscriber::fmt::MakeWriter<'_> for Sink {
    type Writer = Sink;

    fn make_writer(&self) -> Sink {
        self.clone()
    }
}

#[cfg(test)]
impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged_json(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Sink::default();
        tracing::subscriber::with_default(subscriber(LogFormat::Json, out.clone(), false), log);
        out.text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    #[test]
    fn json_lines_hold_every_field_at_the_top_level() {
        let lines = logged_json(|| {
            tracing::info!(
                request_id = "req-1",
                status = 200u16,
                estimated = false,
                cost_usd = 0.000125,
                "request done"
            );
            tracing::warn!(error = %"bad\nline\u{1b}[2J", "upstream failed");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let done = &lines[0];
        assert_eq!(done["level"], "INFO");
        assert_eq!(done["message"], "request done");
        assert_eq!(done["request_id"], "req-1");
        assert_eq!(done["status"], 200);
        assert_eq!(done["estimated"], false);
        assert_eq!(done["cost_usd"], 0.000125);
        let time = done["timestamp"].as_str().unwrap();
        assert_eq!(time.len(), "2026-12-02T03:36:15.123456Z".len(), "{time}");
        // Control characters stay inside the string, escaped by JSON.
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["error"], "bad\nline\u{1b}[2J");
    }
}
