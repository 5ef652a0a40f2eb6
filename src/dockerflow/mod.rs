//! The Dockerflow routes the sidecar answers itself.

mod heartbeat;
mod version;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResponseBody;

pub use heartbeat::Heartbeat;
pub use version::version;

/// `/__lbheartbeat__`: 200 with an empty body (load balancers want 200, not
/// 204), or 503 once draining. Never touches the app.
pub fn lbheartbeat(draining: bool) -> Response<ResponseBody> {
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = status;
    resp
}

/// A short plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
