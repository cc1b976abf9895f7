//! Log output: one line per event, in tracing's default layout, formatted
//! without `fmt` machinery where it can be avoided (the access-log line is
//! written for every request) and written to stderr by a thread of its own.

mod buffer;
mod format;

use std::fmt::{self, Write};

pub use buffer::{FlushOnDrop, LogBuffer, start};
pub use format::{Fields, Timestamp};

/// The most of a client's own string (a model name, a path, a value
/// quoted back in an error) that a log line or an error message holds.
pub const MAX_CLIENT_CHARS: usize = 256;

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
impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
