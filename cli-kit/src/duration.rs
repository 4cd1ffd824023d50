//! The one duration grammar of every flag: Go's `time.ParseDuration`, as
//! kube-apiserver reads a KMS provider's `timeout` (`1m30s`, `500ms`, `1.5s`,
//! `2h`, units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`; a bare `0` is zero). The
//! grammar itself is [`storage_encryption::parse_go_duration`]; this module adds
//! what a flag needs: a minimum, and a clap value parser.

use std::time::Duration;

pub use storage_encryption::{format_go_duration, parse_go_duration};

/// Parses a duration flag value; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<Duration, String> {
    parse_go_duration(text).map_err(|e| format!("{e} (use e.g. 500ms, 3s, 1m30s)"))
}

/// A clap value parser accepting durations of at least `min`:
/// `#[arg(long, value_parser = cli_kit::duration::at_least(Duration::from_millis(100)))]`.
/// A shorter value is a usage error naming the flag (clap exits 2), so a
/// `--poll-interval 1ns` cannot make a loop burn a core.
pub fn at_least(
    min: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| check_min(parse(text)?, min)
}

/// `value` if it is at least `min`, else the message a flag error shows.
pub fn check_min(value: Duration, min: Duration) -> Result<Duration, String> {
    if value < min {
        return Err(format!("must be at least {}", format_go_duration(min)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_forms_parse() {
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "7", "5x", "s", "-1s", "soon"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn minimum_is_enforced_and_named() {
        let p = at_least(Duration::from_millis(100));
        assert_eq!(p("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(p("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(p("1ns").unwrap_err(), "must be at least 100ms");
        assert_eq!(p("0").unwrap_err(), "must be at least 100ms");
        assert!(p("x").unwrap_err().contains("e.g. 500ms"));
    }

    #[test]
    fn clap_names_the_flag_and_exits_2() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[arg(long, value_parser = at_least(Duration::from_secs(1)))]
            interval: Duration,
        }
        let e = <Cli as clap::Parser>::try_parse_from(["t", "--interval", "1ns"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains("--interval"), "{text}");
        assert!(text.contains("must be at least 1s"), "{text}");
    }
}
