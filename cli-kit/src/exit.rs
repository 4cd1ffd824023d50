//! Exit codes declared once per binary, as an enum whose table is rendered
//! into `--help` ([`exit_codes!`](crate::exit_codes)).

use std::fmt::Write as _;

/// Renders `Exit codes:` and one line per code; a meaning's own line breaks
/// become indented continuation lines.
pub fn render<'a>(codes: impl IntoIterator<Item = (u8, &'a str)>) -> String {
    let mut out = String::from("Exit codes:\n");
    for (code, meaning) in codes {
        let mut lines = meaning.lines();
        let first = lines.next().unwrap_or_default();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {code}  {first}");
        for line in lines {
            let _ = writeln!(out, "     {line}");
        }
    }
    out
}

/// Declares a binary's exit codes once: an enum (`#[repr(u8)]`) with the
/// code and its meaning, `ALL` in order, `code()`, `meaning()`, `help()` (the
/// text for clap's `after_help`) and `From<_> for std::process::ExitCode`.
///
/// ```
/// cli_kit::exit_codes! {
///     /// What `tool` exits with.
///     pub enum Exit {
///         /// Done.
///         Ok = 0 => "success",
///         /// Bad flags.
///         Usage = 2 => "usage error",
///     }
/// }
/// assert_eq!(Exit::Usage.code(), 2);
/// assert_eq!(Exit::help(), "Exit codes:\n  0  success\n  2  usage error\n");
/// ```
#[macro_export]
macro_rules! exit_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $text:expr, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $code, )+
        }

        impl $name {
            /// Every exit code, in the order `--help` lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The process exit status.
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// What the code means, as `--help` says it.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The `Exit codes:` block for clap's `after_help`.
            pub fn help() -> String {
                $crate::exit::render(Self::ALL.iter().map(|c| (c.code(), c.meaning())))
            }

            /// The codes a rendered `--help` does not show as [`help`](Self::help)
            /// renders them (every code when the block is missing): what each
            /// binary's test of its `--help` asserts is empty.
            pub fn missing_from(rendered_help: &str) -> Vec<Self> {
                if !rendered_help.contains(&Self::help()) {
                    return Self::ALL.to_vec();
                }
                Self::ALL
                    .iter()
                    .copied()
                    .filter(|c| {
                        let first = c.meaning().lines().next().unwrap_or_default();
                        !rendered_help.contains(&format!("  {}  {first}", c.code()))
                    })
                    .collect()
            }
        }

        impl From<$name> for ::std::process::ExitCode {
            fn from(code: $name) -> Self {
                ::std::process::ExitCode::from(code.code())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::exit_codes! {
        /// Test codes.
        enum Codes {
            /// ok
            Ok = 0 => "clean",
            /// two lines
            Findings = 1 => "findings:\nsee the report",
            /// usage
            Usage = 2 => "usage error",
        }
    }

    #[test]
    fn missing_from_names_what_a_help_text_lacks() {
        let full = format!("Usage: x\n\n{}", Codes::help());
        assert!(Codes::missing_from(&full).is_empty(), "{full}");
        assert_eq!(Codes::missing_from("Usage: x"), Codes::ALL.to_vec());
    }

    #[test]
    fn renders_every_code_in_order() {
        assert_eq!(
            Codes::help(),
            "Exit codes:\n  0  clean\n  1  findings:\n     see the report\n  2  usage error\n"
        );
        assert_eq!(Codes::Findings.code(), 1);
        assert_eq!(Codes::ALL.len(), 3);
        assert_eq!(Codes::Ok.meaning(), "clean");
    }
}
