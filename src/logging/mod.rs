//! Log output: one line per event, in tracing's default layout, formatted
//! without `fmt` machinery where it can be avoided (the access-log line is
//! written for every request) and written to stderr by a thread of its own.

mod buffer;
mod format;

pub use buffer::{FlushOnDrop, LogBuffer, start};
pub use format::{Fields, Timestamp};
