//! The `--listen` endpoint: a socket path, `unix:///path`, or the Linux
//! abstract socket `unix:///@name` (as kube-apiserver reads `endpoint:`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// Where the plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket name (no file, no permissions).
    Abstract(String),
}

/// Why an endpoint string is not usable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Empty string or empty path.
    #[error("endpoint is empty")]
    Empty,
    /// A URL with another scheme than unix.
    #[error(
        "endpoint {0:?}: only unix sockets are supported (unix:///path, unix:///@name or /path)"
    )]
    Scheme(String),
    /// A relative path, or unix:// without an absolute path.
    #[error("endpoint {0:?}: the socket path must be absolute")]
    Relative(String),
    /// A directory-like path such as `/` or `/run/`.
    #[error("endpoint {0:?}: the socket path must name a file, not a directory")]
    NoFileName(String),
    /// Longer than a unix socket address can hold.
    #[error("endpoint {0:?}: a unix socket path is at most 107 bytes")]
    TooLong(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(EndpointError::Empty);
        }
        let path = if let Some(rest) = s.strip_prefix("unix://") {
            rest
        } else if s.contains("://") {
            return Err(EndpointError::Scheme(s.to_owned()));
        } else {
            s
        };
        if let Some(name) = path.strip_prefix("/@") {
            if name.is_empty() {
                return Err(EndpointError::Empty);
            }
            if name.len() > 107 {
                return Err(EndpointError::TooLong(s.to_owned()));
            }
            return Ok(Endpoint::Abstract(name.to_owned()));
        }
        if !path.starts_with('/') {
            return Err(EndpointError::Relative(s.to_owned()));
        }
        if path.len() > 107 {
            return Err(EndpointError::TooLong(s.to_owned()));
        }
        if path.ends_with('/') {
            return Err(EndpointError::NoFileName(s.to_owned()));
        }
        Ok(Endpoint::Path(PathBuf::from(path)))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Path(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Abstract(name) => write!(f, "unix:///@{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_forms() {
        assert_eq!(
            "/run/kms.sock".parse(),
            Ok(Endpoint::Path("/run/kms.sock".into()))
        );
        assert_eq!(
            "unix:///run/kms.sock".parse(),
            Ok(Endpoint::Path("/run/kms.sock".into()))
        );
        assert_eq!(
            "unix:///@kms-plugin".parse(),
            Ok(Endpoint::Abstract("kms-plugin".into()))
        );
        assert_eq!(Endpoint::Abstract("x".into()).to_string(), "unix:///@x");
        assert_eq!(Endpoint::Path("/a/b".into()).to_string(), "unix:///a/b");
    }

    #[test]
    fn refuses_the_rest_with_a_reason() {
        assert_eq!("".parse::<Endpoint>(), Err(EndpointError::Empty));
        assert_eq!("unix:///@".parse::<Endpoint>(), Err(EndpointError::Empty));
        assert!(matches!(
            "tcp://1.2.3.4:5".parse::<Endpoint>(),
            Err(EndpointError::Scheme(_))
        ));
        assert!(matches!(
            "run/kms.sock".parse::<Endpoint>(),
            Err(EndpointError::Relative(_))
        ));
        assert!(matches!(
            "unix://run/kms.sock".parse::<Endpoint>(),
            Err(EndpointError::Relative(_))
        ));
        assert!(matches!(
            "unix:///".parse::<Endpoint>(),
            Err(EndpointError::NoFileName(_))
        ));
        assert!(matches!(
            "/run/".parse::<Endpoint>(),
            Err(EndpointError::NoFileName(_))
        ));
        let long = format!("/{}", "a".repeat(200));
        assert!(matches!(
            long.parse::<Endpoint>(),
            Err(EndpointError::TooLong(_))
        ));
    }
}
