//! Standard output for tools whose output is piped: `tool | head -1` must end
//! the tool quietly with exit 0 once the reader has gone, not with an error
//! (Rust ignores SIGPIPE, so a write to a closed pipe is an `EPIPE` error).

use std::error::Error;
use std::io::{self, Write as _};

/// Whether `error`, or any error in its `source()` chain, is an I/O
/// `BrokenPipe`: the reader of our stdout has gone.
pub fn is_broken_pipe(error: &(dyn Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// Writes `text` to stdout and flushes. When the reader has gone (broken
/// pipe) the process ends here, quietly, with exit 0: whoever closed the pipe
/// has read all they wanted. Any other write error is returned.
pub fn print(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot write the report")
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_a_broken_pipe_in_the_chain() {
        let pipe = Wrapper(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&pipe));
        let other = Wrapper(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!is_broken_pipe(&other));
    }
}
