//! Browser security reports: intake (limits, CORS, rate limits), the shapes
//! browsers send, cleaning (control characters, query strings), and storage.

mod clean;
mod intake;
pub mod schema;
pub mod store;

use serde::Serialize;

pub use intake::Intake;

/// The fields of one report as logged, stored and published: cleaned (no
/// control characters, URLs without query strings unless configured).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReportFields {
    /// uuid (v7, time-ordered) of the stored row (of the first report, when deduplicated).
    pub id: String,
    /// Report type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Document URL.
    pub url: Option<String>,
    /// Effective directive, feature or error type.
    pub directive: Option<String>,
    /// What was blocked.
    pub blocked_url: Option<String>,
    /// enforce / report.
    pub disposition: Option<String>,
    /// Where.
    pub source_file: Option<String>,
    /// Line.
    pub line: Option<u64>,
    /// Column.
    pub column: Option<u64>,
    /// Document status.
    pub status_code: Option<u64>,
    /// Browser.
    pub user_agent: Option<String>,
    /// Milliseconds between the incident and the upload.
    pub age: u64,
}
