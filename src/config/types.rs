//! Value types that validate themselves while they are deserialized, so a bad
//! value is reported by figment with its key and the source that set it.

use std::fmt;
use std::path::PathBuf;

use http::uri::{Authority, Scheme};
use http::{HeaderName, StatusCode, Uri};
use serde::{Deserialize, Serialize};

/// Where the app listens: `http://host:port`, `https://host:port` or
/// `unix:/path/to.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum UpstreamUrl {
    /// A TCP address; `authority` is `host:port` (port defaults to 80).
    Http {
        /// `host:port`.
        authority: Authority,
    },
    /// A TCP address spoken to over TLS (port defaults to 443); the
    /// certificate must be valid for its host.
    Https {
        /// `host:port`.
        authority: Authority,
    },
    /// A Unix domain socket.
    Unix {
        /// Path of the socket.
        path: PathBuf,
    },
}

impl Default for UpstreamUrl {
    fn default() -> Self {
        UpstreamUrl::Http {
            authority: Authority::from_static("127.0.0.1:8080"),
        }
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        const VALID: &str =
            "expected `http://host:port`, `https://host:port` or `unix:/path/to.sock`";
        if let Some(path) = value.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(format!(
                    "`{value}` is not valid: the socket path must be absolute; {VALID}"
                ));
            }
            return Ok(UpstreamUrl::Unix {
                path: PathBuf::from(path),
            });
        }
        let uri: Uri = value
            .parse()
            .map_err(|e| format!("`{value}` is not a URL ({e}); {VALID}"))?;
        let https = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            _ => return Err(format!("`{value}` has an unsupported scheme; {VALID}")),
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("`{value}` has no host; {VALID}"));
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "`{value}` has a path or query; the sidecar forwards each request's own path, {VALID}"
            ));
        }
        if authority.as_str().contains('@') {
            return Err(format!("`{value}` carries credentials; {VALID}"));
        }
        let authority = if authority.port().is_some() {
            authority.clone()
        } else {
            let port = if https { 443 } else { 80 };
            format!("{}:{port}", authority.host())
                .parse()
                .map_err(|e| format!("`{value}`: {e}; {VALID}"))?
        };
        Ok(match https {
            true => UpstreamUrl::Https { authority },
            false => UpstreamUrl::Http { authority },
        })
    }
}

impl From<UpstreamUrl> for String {
    fn from(value: UpstreamUrl) -> Self {
        value.to_string()
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamUrl::Http { authority } => write!(f, "http://{authority}"),
            UpstreamUrl::Https { authority } => write!(f, "https://{authority}"),
            UpstreamUrl::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The status `/__heartbeat__` answers when a check fails: 200–599.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct FailedStatus(pub StatusCode);

impl Default for FailedStatus {
    fn default() -> Self {
        FailedStatus(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl TryFrom<u16> for FailedStatus {
    type Error = String;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        match StatusCode::from_u16(value) {
            Ok(code) if (200..=599).contains(&value) => Ok(FailedStatus(code)),
            _ => Err(format!(
                "{value} is not valid: expected an HTTP status code from 200 to 599"
            )),
        }
    }
}

impl From<FailedStatus> for u16 {
    fn from(value: FailedStatus) -> Self {
        value.0.as_u16()
    }
}

/// A header name, checked to be a valid HTTP token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HeaderNameValue {
    /// The lower-cased name (HTTP header names are case-insensitive).
    pub name: HeaderName,
    /// The name as configured, for display.
    pub display: String,
}

impl Default for HeaderNameValue {
    fn default() -> Self {
        HeaderNameValue {
            name: HeaderName::from_static("x-request-id"),
            display: "X-Request-ID".to_owned(),
        }
    }
}

impl TryFrom<String> for HeaderNameValue {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let name = HeaderName::try_from(value.as_str()).map_err(|_| {
            format!("`{value}` is not valid: expected an HTTP header name such as X-Request-ID")
        })?;
        Ok(HeaderNameValue {
            name,
            display: value,
        })
    }
}

impl From<HeaderNameValue> for String {
    fn from(value: HeaderNameValue) -> Self {
        value.display
    }
}

/// An origin-form request target: `/path` with an optional `?query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestPath(pub http::uri::PathAndQuery);

impl RequestPath {
    /// The path as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for RequestPath {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        const VALID: &str =
            "expected a path starting with `/`, such as \"/\" or \"/health?full=1\"";
        if !value.starts_with('/') {
            return Err(format!("`{value}` is not valid: {VALID}"));
        }
        value
            .parse::<http::uri::PathAndQuery>()
            .map(RequestPath)
            .map_err(|e| format!("`{value}` is not valid ({e}): {VALID}"))
    }
}

impl From<RequestPath> for String {
    fn from(value: RequestPath) -> Self {
        value.0.as_str().to_owned()
    }
}

/// Deserializes a string that may arrive as a number or a boolean: figment
/// reads `DOCKERFLOW_LOGGING__LOGGER=123` as an integer, and a name that
/// happens to look like one must still be accepted.
pub fn string_or_scalar<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(deserializer)? {
        Scalar::Text(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

/// A size in bytes, written "64 KiB", "1 MiB" or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;

    fn try_from(value: SizeRepr) -> Result<Self, Self::Error> {
        match value {
            SizeRepr::Bytes(bytes) => Ok(ByteSize(bytes)),
            SizeRepr::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|size| ByteSize(size.as_u64()))
                .map_err(|_| {
                    format!(
                        "`{text}` is not valid: expected a size such as \"64 KiB\" or \"1 MiB\""
                    )
                }),
        }
    }
}

impl From<ByteSize> for String {
    fn from(value: ByteSize) -> Self {
        bytesize::ByteSize(value.0).display().iec().to_string()
    }
}

/// A duration written like "5s" or "2h", for lists of durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HumanDuration(#[serde(with = "humantime_serde")] pub std::time::Duration);
