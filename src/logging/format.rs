//! A text log line written directly, where tracing would format it with
//! `fmt` machinery: formatted with `fmt`, the access-log line would cost
//! more CPU than anything else the gateway does for a request but parse
//! it. The output is tracing's default layout.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// A whole line, `TIME LEVEL target: fields`, gathered in a `String` and
/// written once. In colour (to a terminal) or within a span, tracing's
/// own formatter writes it.
pub struct Line {
    styled: Format<Full, Timestamp>,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            styled: Format::default().with_timer(Timestamp),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() || ctx.event_scope().is_some() {
            return self.styled.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        let mut line = FieldWriter::new();
        write_time(&mut line.out)?;
        line.out.push(' ');
        line.out.push_str(level(meta.level()));
        line.out.push(' ');
        line.out.push_str(meta.target());
        line.out.push_str(": ");
        event.record(&mut line);
        line.result?;
        line.out.push('\n');
        writer.write_str(&line.out)
    }
}

/// The level as tracing writes it without colour: five characters.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Fields as `name=value`, space-separated; the message bare, strings
/// quoted and escaped as `Debug` writes them.
pub struct Fields;

impl<'writer> FormatFields<'writer> for Fields {
    /// The fields are gathered in a `String` and written once: each write
    /// through `Writer` is a dynamic call, and the access-log line makes
    /// about ninety.
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = FieldWriter::new();
        fields.record(&mut visitor);
        visitor.result?;
        writer.write_str(&visitor.out)
    }
}

struct FieldWriter {
    out: String,
    first: bool,
    result: fmt::Result,
}

impl FieldWriter {
    fn new() -> Self {
        Self {
            // The access-log line's length, about.
            out: String::with_capacity(512),
            first: true,
            result: Ok(()),
        }
    }

    /// Writes the separator and `name=`, or nothing for the message.
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.out.write_char(' ')?;
        }
        if field.name() == "message" {
            return Ok(());
        }
        self.out.write_str(field.name())?;
        self.out.write_char('=')
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| value(&mut self.out));
        }
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }
}

/// Passes text on with control characters escaped: what is written as it
/// is (a message, a `%` or `?` field) cannot start a forged line.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Control characters are C0, DEL and C1, whose UTF-8 starts 0xC2:
        // text without those bytes has none, and is checked byte by byte.
        let plain = |b: u8| b >= 0x20 && b != 0x7F && b != 0xC2;
        if all(text, plain) || !text.chars().any(char::is_control) {
            return self.0.write_str(text);
        }
        text.chars()
            .try_for_each(|c| super::push_escaped(self.0, c))
    }
}

/// Whether every byte of `text` is `plain`: read without an early exit,
/// so that the compiler checks 16 bytes an instruction (a request id is
/// 32).
fn all(text: &str, plain: impl Fn(u8) -> bool) -> bool {
    text.bytes().fold(true, |all, b| all & plain(b))
}

impl Visit for FieldWriter {
    fn record_str(&mut self, field: &Field, value: &str) {
        let message = field.name() == "message";
        self.field(field, |out| {
            if message {
                return Escaping(out).write_str(value);
            }
            // What `Debug` leaves unescaped is written as it is.
            let plain = |b: u8| (b.is_ascii_graphic() && b != b'"' && b != b'\\') || b == b' ';
            if all(value, plain) {
                out.write_char('"')?;
                out.write_str(value)?;
                out.write_char('"')
            } else {
                write!(out, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    /// As the JSON lines write it (`0.00005`, where `Debug` writes `5e-5`),
    /// in about 600 instructions where `Debug` takes 940.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| out.write_str(ryu::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| write!(Escaping(out), "{value:?}"));
    }
}

/// UTC time to the microsecond, as tracing's default timer writes it
/// (`2026-12-02T03:36:15.123456Z`); the text up to the second is made once
/// a second.
pub struct Timestamp;

thread_local! {
    /// The second last formatted and its text, up to and with the `.`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w)
    }
}

fn write_time(w: &mut impl fmt::Write) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != now.as_secs() {
            *second = now.as_secs();
            text.clear();
            write_second(text, now.as_secs())?;
        }
        w.write_str(text)
    })?;
    // Six digits: a leading 1 keeps the zeros, and is dropped.
    let mut digits = itoa::Buffer::new();
    w.write_str(&digits.format(1_000_000 + now.subsec_micros())[1..])?;
    w.write_char('Z')
}

fn write_second(text: &mut String, unix_seconds: u64) -> fmt::Result {
    let t = i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    write!(
        text,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::format::DefaultFields;

    use super::super::Sink;
    use super::*;

    /// What `log` logs, its fields formatted with `fields`.
    fn logged<F: for<'w> FormatFields<'w> + Send + Sync + 'static>(
        fields: F,
        log: impl FnOnce(),
    ) -> String {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Sink::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(fields)
                .without_time()
                .with_ansi(false)
                .with_writer(out.clone()),
        );
        tracing::subscriber::with_default(subscriber, log);
        out.text()
    }

    /// Formats the same event's fields with `fields`.
    fn line<F: for<'w> FormatFields<'w> + Send + Sync + 'static>(fields: F) -> String {
        logged(fields, || {
            tracing::info!(
                text = "plain text",
                quoted = "say \"hi\"\\n",
                accented = "café\t",
                count = 7u64,
                negative = -3i64,
                status = 200u16,
                flag = true,
                cost = 0.000125,
                shown = %"display",
                "request done"
            );
            tracing::info!(message = "a plain message", kind = "x");
        })
    }

    #[test]
    fn fields_are_written_as_debug_would_write_them() {
        let ours = line(Fields);
        assert_eq!(
            ours,
            " INFO tollgate::logging::format::tests: request done text=\"plain text\" \
             quoted=\"say \\\"hi\\\"\\\\n\" accented=\"café\\t\" count=7 negative=-3 \
             status=200 flag=true cost=0.000125 shown=display\n \
             INFO tollgate::logging::format::tests: a plain message kind=\"x\"\n"
        );
        // tracing's own, which styles names apart only with ANSI on.
        assert_eq!(ours, line(DefaultFields::new()));
    }

    #[test]
    fn floats_are_written_as_the_json_lines_write_them() {
        let text = logged(Fields, || {
            tracing::info!(small = 0.00005, cost = 0.000125, whole = 2.0)
        });
        assert!(
            text.ends_with("small=0.00005 cost=0.000125 whole=2.0\n"),
            "{text}"
        );
        assert_eq!(serde_json::to_string(&0.00005).unwrap(), "0.00005");
    }

    /// What `log` logs as whole lines formatted by `format`, in colour or
    /// not, with their timestamps cut out.
    fn lines<E>(format: E, ansi: bool, log: impl FnOnce()) -> String
    where
        E: for<'a> FormatEvent<tracing_subscriber::Registry, Fields> + Send + Sync + 'static,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Sink::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .fmt_fields(Fields)
                .event_format(format)
                .with_writer(out.clone()),
        );
        tracing::subscriber::with_default(subscriber, log);
        out.text()
            .lines()
            .map(|line| {
                // The first `Z` ends the timestamp, colour codes or not.
                let end = line.find('Z').expect("a timestamp") + 1;
                let stamp = &line.as_bytes()[end - 27..end];
                assert_eq!(
                    (stamp[4], stamp[10], stamp[19]),
                    (b'-', b'T', b'.'),
                    "{line}"
                );
                format!("{}{}\n", &line[..end - 27], &line[end..])
            })
            .collect()
    }

    fn events() {
        tracing::info!(
            request_id = "req-1",
            status = 200u16,
            cost_usd = 0.25,
            "request done"
        );
        tracing::warn!(target: "tollgate::reload", path = "/etc/tollgate.toml", "kept");
        tracing::error!(error = ?"boom", "failed");
        tracing::debug!(n = 3u64, "counted");
        tracing::trace!("traced");
        tracing::info_span!("request", id = 7u64).in_scope(|| tracing::info!(x = 1u64, "inside"));
    }

    #[test]
    fn lines_are_laid_out_as_tracing_lays_them_out_in_colour_and_in_spans() {
        let theirs = || Format::default().with_timer(Timestamp);
        let plain = lines(Line::default(), false, events);
        assert_eq!(plain, lines(theirs(), false, events));
        assert!(
            plain.starts_with(
                "  INFO tollgate::logging::format::tests: request done \
                 request_id=\"req-1\" status=200 cost_usd=0.25\n  \
                 WARN tollgate::reload: kept path=\"/etc/tollgate.toml\"\n"
            ),
            "{plain}"
        );
        assert!(
            plain.contains("request{id=7}: tollgate::logging::format::tests: inside x=1"),
            "{plain}"
        );
        assert_eq!(plain.lines().count(), 6, "{plain}");
        let coloured = lines(Line::default(), true, events);
        assert!(coloured.contains('\u{1b}'), "{coloured}");
        assert_eq!(coloured, lines(theirs(), true, events));
    }

    #[test]
    fn no_field_can_start_a_line_of_its_own() {
        let forged = "x\n2026-12-04T00:00:00.000000Z  INFO forged\u{1b}[2J";
        let text = logged(Fields, || {
            tracing::info!(shown = %forged, debugged = ?forged, plain = forged, "{forged}");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("shown=x\\n2026"), "{text}");
    }

    #[test]
    fn timestamps_match_tracings_own_to_the_second() {
        let mut ours = String::new();
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        assert_eq!(ours.len(), "2026-12-02T03:36:15.123456Z".len(), "{ours}");
        assert!(ours.ends_with('Z'));
        // The same second unless the clock ticked over between the two.
        let second = |t: &str| t[..19].to_owned();
        assert!(
            second(&ours) == second(&theirs) || ours < theirs,
            "{ours} {theirs}"
        );
        let mut epoch = String::new();
        write_second(&mut epoch, 0).unwrap();
        assert_eq!(epoch, "1970-01-01T00:00:00.");
        epoch.clear();
        write_second(&mut epoch, 1_764_644_175).unwrap();
        assert_eq!(epoch, "2025-12-02T02:56:15.");
    }
}
