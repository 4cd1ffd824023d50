//! A minimal HTTP/1.0 client (enough for loopback listeners: the plugin's
//! metrics, the kube-apiserver stand-in) and a parser for the Prometheus / OpenMetrics text format.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response to [`http_get`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines as `(lower-case name, value)`.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path HTTP/1.0`: the server closes the connection after the body, so
/// reading to the end needs neither chunked decoding nor keep-alive.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    http_request(addr, "GET", path, None, None).await
}

/// Any request over HTTP/1.0 (the server closes after the answer), with an
/// optional bearer token and JSON body. The one hand-written HTTP client of
/// the test kits: the plugin's metrics listener and the stand-in use it.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if method != "GET" || !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream
        .write_all(head.as_bytes())
        .await
        .with_context(|| format!("sending {method} {path} to {addr}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .with_context(|| format!("reading the answer to {method} {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path} on {addr}: no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path} on {addr}: bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// One sample line of the text exposition format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name as exposed (with `_total`, `_bucket`… suffixes).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// The page as served.
    pub text: String,
    /// Every sample.
    pub samples: Vec<Sample>,
    /// Families named by `# TYPE` lines.
    pub families: BTreeSet<String>,
}

impl Metrics {
    /// Parses the text exposition format; fails on a line it cannot read.
    pub fn parse(text: &str) -> Result<Self> {
        let mut metrics = Metrics {
            text: text.to_owned(),
            ..Default::default()
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    metrics.families.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            metrics
                .samples
                .push(parse_sample(line).with_context(|| format!("bad metrics line {line:?}"))?);
        }
        Ok(metrics)
    }

    /// Samples called `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the matching samples, None when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for sample in self.matching(name, labels) {
            *found.get_or_insert(0.0) += sample.value;
        }
        found
    }

    /// Sum of the matching samples, 0 when there is none (counters not yet touched).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The label names used by samples called `name`.
    pub fn label_names(&self, name: &str) -> BTreeSet<String> {
        self.matching(name, &[])
            .flat_map(|s| s.labels.keys().cloned())
            .collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace).context("no value")?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, rest) = s.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("dangling escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_families() {
        let text = "# TYPE a_total counter\na_total{method=\"Encrypt\",outcome=\"ok\"} 3\n\
                    a_total{method=\"Status\",outcome=\"o\\\"k\"} 1.5\nb 2 123\nh_bucket{le=\"+Inf\"} 4\n# EOF\n";
        let m = Metrics::parse(text).unwrap();
        assert!(m.families.contains("a_total"));
        assert_eq!(m.get("a_total", &[("method", "Encrypt")]), Some(3.0));
        assert_eq!(m.get("a_total", &[]), Some(4.5));
        assert_eq!(m.get("a_total", &[("outcome", "o\"k")]), Some(1.5));
        assert_eq!(m.get("b", &[]), Some(2.0));
        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(m.get("missing", &[]), None);
        assert_eq!(
            m.label_names("a_total").into_iter().collect::<Vec<_>>(),
            ["method", "outcome"]
        );
    }

    #[test]
    fn rejects_garbage_lines() {
        assert!(Metrics::parse("a_total{method=\"x} 1\n").is_err());
        assert!(Metrics::parse("a_total notanumber\n").is_err());
    }
}
