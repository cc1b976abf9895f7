//! Log output: one line per event, in tracing's default layout, formatted
//! without `fmt` machinery where it can be avoided (the access-log line is
//! written for every request) and written to stderr by a thread of its own.

mod buffer;
mod format;

pub use buffer::{FlushOnDrop, LogBuffer, start};
pub use format::{Fields, Timestamp};

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
