//! `/__version__`: the app's version.json, served as it is on disk.

use std::path::PathBuf;

use http::{Response, StatusCode};

use crate::body::ResponseBody;

/// Reads the first of `files` that exists. 404 `version.json not found` when
/// none does; 500 (and an error line) when it is not a JSON object.
/// Read on every request: the app may write it after the sidecar started.
pub async fn version(files: &[PathBuf]) -> Response<ResponseBody> {
    for path in files {
        match tokio::fs::read(path).await {
            Ok(bytes) => {
                return match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(
                    &bytes,
                ) {
                    Ok(_) => super::json(StatusCode::OK, bytes),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "version file is not a JSON object");
                        super::text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "version.json is not valid JSON",
                        )
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read version file");
                return super::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "version.json could not be read",
                );
            }
        }
    }
    super::text(StatusCode::NOT_FOUND, "version.json not found")
}
