//! Logging setup shared by every binary: events go to stderr, filtered by
//! `ATREST_LOG` (tracing `EnvFilter` syntax, e.g. `info`, `debug`,
//! `kms_plugin=debug`), as plain lines or one JSON object per line; the
//! binary's name and version are logged at start (level INFO).
//!
//! In the plain format every field value and message is written with its
//! control characters escaped ([`escape_control`]), so a value a caller chose
//! (a `uid`, a `key_id`) cannot forge a log line with `\n` or reach the
//! terminal with ESC sequences. The JSON format escapes by construction.

use std::fmt;
use std::io::IsTerminal as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;

use crate::escape::escape_control;

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; values are escaped.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Which binary is logging and how.
#[derive(Debug, Clone, Copy)]
pub struct LogSettings {
    /// The binary's name, as in its `--help` (e.g. `kms-plugin`).
    pub name: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")` of the binary's crate).
    pub version: &'static str,
    /// Plain or JSON.
    pub format: LogFormat,
    /// The filter when `ATREST_LOG` is unset or invalid (e.g. `info`, `warn`).
    pub default_filter: &'static str,
}

/// Installs the global subscriber writing to stderr and logs the version.
/// Calling it again in the same process changes nothing.
pub fn init(settings: LogSettings) {
    let filter = EnvFilter::try_from_env("ATREST_LOG")
        .unwrap_or_else(|_| EnvFilter::new(settings.default_filter));
    let ansi = std::io::stderr().is_terminal();
    let installed = match settings.format {
        LogFormat::Plain => plain_subscriber(filter, std::io::stderr, ansi).try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    if installed.is_ok() {
        tracing::info!(version = settings.version, "{} starting", settings.name);
    }
}

/// The plain-format subscriber builder, writing to `writer`.
fn plain_subscriber<W>(
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    EscapingFields,
    tracing_subscriber::fmt::format::Format,
    EnvFilter,
    W,
>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .fmt_fields(EscapingFields)
}

/// Formats fields like tracing-subscriber's default (`name=value`, the
/// message bare, strings quoted), with control characters escaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapingFields;

impl<'w> FormatFields<'w> for EscapingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let value = escape_control(value);
        self.result = match field.name() {
            "message" => write!(self.writer, "{sep}{value}"),
            name => write!(
                self.writer,
                "{sep}{}={value}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn plain_lines_escape_caller_values_in_events_and_spans() {
        let buffer = Buffer::default();
        let subscriber = plain_subscriber(EnvFilter::new("debug"), buffer.clone(), false).finish();
        tracing::subscriber::with_default(subscriber, || {
            let uid = "u1\nFAKE ERROR forged line \u{1b}[31m";
            let span = tracing::debug_span!("decrypt", uid = %uid, key_id = tracing::field::Empty);
            let _entered = span.enter();
            span.record("key_id", "k\r\n1");
            tracing::debug!(reason = %"bad\nthing", "refused {}", "x\ny");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(
            text.contains("uid=u1\\nFAKE ERROR forged line \\u{1b}[31m"),
            "{text}"
        );
        assert!(text.contains("key_id=\"k\\r\\n1\""), "{text}");
        assert!(text.contains("refused x\\ny reason=bad\\nthing"), "{text}");
    }
}
