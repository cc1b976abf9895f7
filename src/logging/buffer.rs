//! Log lines gathered in memory and written to stderr by a thread of their
//! own: a request pays for a copy under an uncontended lock. Under load the
//! thread writes a batch every few milliseconds, so no request pays for a
//! write to stderr or for waking a thread (handing each line to a writer
//! thread costs about 10 µs of CPU per request on one core); when idle it
//! sleeps until the next line, and only that line wakes it: a line that
//! comes while a batch gathers leaves it asleep.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long lines gather after a write before the next one.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Past this much unwritten text (stderr blocked), new lines are dropped
/// and counted instead of growing memory without bound.
const MAX_PENDING: usize = 16 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    text: Vec<u8>,
    dropped: u64,
    closing: bool,
    /// The writer waits for a first line, which is to wake it.
    idle: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` for the fmt layer: each line is appended whole.
#[derive(Clone)]
pub struct LogBuffer {
    shared: Arc<Shared>,
}

/// Writes what is left and stops the writer thread when dropped.
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread, writing to `out`.
pub fn start(out: impl Write + Send + 'static) -> (LogBuffer, FlushOnDrop) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
    });
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let shared = shared.clone();
            move || write_until_closed(&shared, out)
        })
        .expect("the log writer thread starts");
    (
        LogBuffer {
            shared: shared.clone(),
        },
        FlushOnDrop {
            shared,
            thread: Some(thread),
        },
    )
}

fn write_until_closed(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            pending.idle = true;
            let mut pending = shared
                .wake
                .wait_while(pending, |p| p.text.is_empty() && !p.closing)
                .unwrap_or_else(PoisonError::into_inner);
            pending.idle = false;
            std::mem::swap(&mut batch, &mut pending.text);
            if pending.dropped > 0 {
                let note = format!(
                    "WARN log lines dropped while stderr was blocked: {}\n",
                    pending.dropped
                );
                batch.extend_from_slice(note.as_bytes());
                pending.dropped = 0;
            }
            pending.closing
        };
        if !batch.is_empty() {
            // Nowhere to report a failing stderr; the lines are lost.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        }
        if closing {
            return;
        }
        // Lets the next lines gather; closing cuts it short.
        drop(
            shared
                .wake
                .wait_timeout_while(shared.lock(), FLUSH_EVERY, |p| !p.closing),
        );
    }
}

impl Write for LogBuffer {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.text.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
            return Ok(line.len());
        }
        pending.text.extend_from_slice(line);
        let wake = std::mem::take(&mut pending.idle);
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Sink;
    use super::*;

    #[test]
    fn lines_are_written_in_order_soon_and_all_of_them_on_drop() {
        let sink = Sink::default();
        let (buffer, flush) = start(sink.clone());
        // Each written by the thread's next round, without any flush asked
        // for: the first wakes it from waiting for a line, the second comes
        // as it lets a batch gather.
        let steps = [
            ("one\n", "one\n", FLUSH_EVERY * 3),
            ("two\n", "one\ntwo\n", Duration::ZERO),
        ];
        for (line, so_far, pause) in steps {
            std::thread::sleep(pause);
            buffer.make_writer().write_all(line.as_bytes()).unwrap();
            let waited = std::time::Instant::now();
            while sink.text() != so_far && waited.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(FLUSH_EVERY / 4);
            }
            assert_eq!(sink.text(), so_far);
        }
        for i in 0..1000 {
            buffer
                .make_writer()
                .write_all(format!("{i}\n").as_bytes())
                .unwrap();
        }
        drop(flush);
        let written = sink.text();
        let expected: String = ["one\n".to_owned(), "two\n".to_owned()]
            .into_iter()
            .chain((0..1000).map(|i| format!("{i}\n")))
            .collect();
        assert_eq!(written, expected);
    }

    /// A stderr whose writes block until it is opened.
    #[derive(Clone, Default)]
    struct Blocked {
        open: Arc<(Mutex<bool>, Condvar)>,
        sink: Sink,
    }

    impl Blocked {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Blocked {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            drop(
                opened
                    .wait_while(open.lock().unwrap(), |open| !*open)
                    .unwrap(),
            );
            self.sink.write(bytes)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_stderr_never_blocks_a_line_holds_at_most_max_pending_and_counts_what_it_drops() {
        let stderr = Blocked::default();
        let (buffer, flush) = start(stderr.clone());
        buffer.make_writer().write_all(b"first\n").unwrap();
        // The writer takes it, and blocks writing it.
        let waited = std::time::Instant::now();
        while !buffer.shared.lock().text.is_empty() && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(FLUSH_EVERY / 4);
        }
        let line = [[b'x'; 1023].as_slice(), b"\n"].concat();
        let fit = MAX_PENDING / line.len();
        let over = 100;
        // Each returns at once, stderr blocked or not.
        for _ in 0..fit + over {
            buffer.make_writer().write_all(&line).unwrap();
        }
        let (held, dropped) = {
            let pending = buffer.shared.lock();
            (pending.text.len(), pending.dropped)
        };
        // Opened before anything is checked: a failed check would
        // otherwise wait for the blocked writer as the buffer drops.
        stderr.open();
        assert_eq!(held, fit * line.len());
        assert_eq!(dropped, over as u64);
        drop(flush);
        let written = stderr.sink.text();
        let kept = written.strip_prefix("first\n").unwrap();
        let note = format!("WARN log lines dropped while stderr was blocked: {over}\n");
        let lines = kept.strip_suffix(&note).unwrap();
        assert_eq!(lines.len(), fit * line.len());
        assert!(
            lines
                .lines()
                .all(|l| l.len() == 1023 && l.bytes().all(|b| b == b'x'))
        );
    }
}
