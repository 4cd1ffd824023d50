//! Text that somebody else controls (an etcd key, a KMS key_id, a caller's
//! `uid`) made safe to print: no raw newline, carriage return, ESC or any other
//! control character reaches a terminal or splits a log line.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Escapes every control character of `text` (`\n`, `\r`, `\t`, `\u{1b}`, C1
/// controls, …) and every bidirectional override as its Rust escape (`\n`,
/// `\u{1b}`). Backslashes stay as they are, so text that is already escaped
/// (a `Debug` rendering) is not escaped twice. Returns `text` unchanged (and
/// unallocated) when it holds none of these.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            // `escape_default` writes `\n`, `\u{1b}`; writing to a String cannot fail.
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// Unicode bidirectional overrides and isolates, which reorder what a terminal
/// shows (not `char::is_control`, but just as able to disguise text).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed() {
        assert!(matches!(
            escape_control("/registry/secrets/default/a-b.c"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(
            escape_control("a\nb\r\u{1b}[31mc\t\u{7f}\u{85}"),
            "a\\nb\\r\\u{1b}[31mc\\t\\u{7f}\\u{85}"
        );
        assert_eq!(escape_control("a\\nb"), "a\\nb");
        assert_eq!(escape_control("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape_control("grüße 鍵"), "grüße 鍵");
    }
}
