//! One decision per request: a Dockerflow route answered here, or the proxy.
//! Every path through here ends with exactly one request.summary line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::body::ClientBody;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::body::ResponseBody;
use crate::dockerflow;
use crate::metrics::RouteClass;
use crate::mozlog::RequestSummary;
use crate::App;

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/__version__`.
    Version,
    /// `/__heartbeat__`.
    Heartbeat,
    /// `/__lbheartbeat__`.
    LbHeartbeat,
    /// A configured report path.
    Report,
    /// Everything else goes to the app.
    Proxy,
}

/// Classifies by the raw path: exact match, one trailing slash allowed; the
/// query is not part of the path. No percent-decoding: `/%5F%5Fheartbeat%5F%5F`
/// is the app's business.
pub fn classify(path: &str) -> Route {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    match path {
        "/__version__" => Route::Version,
        "/__heartbeat__" => Route::Heartbeat,
        "/__lbheartbeat__" => Route::LbHeartbeat,
        _ => Route::Proxy,
    }
}

/// The request id: the incoming header's value, or a fresh uuid4 when it is
/// absent or empty.
fn request_id(app: &App, req: &Request<ClientBody>) -> HeaderValue {
    match req.headers().get(&app.rid_header) {
        Some(value) if !value.is_empty() => value.clone(),
        _ => {
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"))
        }
    }
}

/// Answers one request. While draining, an HTTP/1 response also closes
/// its connection (`Connection: close`), so that keep-alive clients (a load
/// balancer's pooled connections) move to a new connection, and so off this
/// instance, before the listener closes; hyper's graceful shutdown does the
/// same for HTTP/2 with GOAWAY when the drain ends.
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    https: bool,
    req: Request<ClientBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let http1 = req.version() < Version::HTTP_2;
    let mut resp = answer(&app, peer, https, req).await;
    if http1 && app.shutdown.is_draining() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

async fn answer(
    app: &Arc<App>,
    peer: SocketAddr,
    https: bool,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let rid = request_id(app, &req);
    let mut summary = RequestSummary::start(
        app.logger.clone(),
        app.metrics.clone(),
        start,
        req.method(),
        req.uri(),
        req.headers(),
        rid.clone(),
        app.config.logging.querystring.then_some(&*app.scrubber),
    );

    let route = match classify(req.uri().path()) {
        Route::Proxy if app.reports.matches(req.uri().path()) => Route::Report,
        route => route,
    };
    summary.set_route(match route {
        Route::Proxy => RouteClass::Proxy,
        Route::Report => RouteClass::Report,
        _ => RouteClass::Dockerflow,
    });
    if req.method() == Method::CONNECT {
        // The destination is only ever the configured upstream.
        let resp = dockerflow::text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
        return finish(app, resp, rid, summary);
    }
    if let Some(reason) = refusal(&req) {
        let mut resp = dockerflow::text(StatusCode::BAD_REQUEST, reason);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        summary.fail(400, format!("malformed request: {reason}"));
        return finish(app, resp, rid, summary);
    }
    if route == Route::Proxy {
        return app.proxy.forward(req, peer, https, rid, summary).await;
    }
    if route == Route::Report {
        // The request head, kept only when accepted reports are passed on.
        let head = app.config.reports.forward.then(|| {
            let mut head = Request::new(());
            *head.method_mut() = req.method().clone();
            *head.uri_mut() = req.uri().clone();
            *head.headers_mut() = req.headers().clone();
            head
        });
        let outcome = app.reports.handle(req, peer).await;
        if let (Some(head), Some(body)) = (head, outcome.forward) {
            app.proxy.send_copy(head, body, peer, https, rid.clone());
        }
        return finish(app, outcome.response, rid, summary);
    }

    let resp = if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = dockerflow::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        resp
    } else {
        let draining = app.shutdown.is_draining();
        match route {
            Route::LbHeartbeat => dockerflow::lbheartbeat(draining),
            Route::Version => dockerflow::version(&app.config.version.files).await,
            Route::Heartbeat => app.heartbeat.respond(draining).await,
            Route::Proxy | Route::Report => unreachable!("handled above"),
        }
    };
    finish(app, resp, rid, summary)
}

/// Why a request hyper accepted must still be refused: what RFC 9112 says
/// a server must reject, so that no request reaches the app that another
/// parser could read differently.
fn refusal(req: &Request<ClientBody>) -> Option<&'static str> {
    let headers = req.headers();
    if req.version() == Version::HTTP_11 {
        // §3.2: exactly one Host.
        let mut hosts = headers.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (None, _) => return Some("no Host header"),
            (Some(_), Some(_)) => return Some("more than one Host header"),
            _ => {}
        }
    }
    // Transfer-Encoding with Content-Length (§6.3) never gets here as such:
    // hyper drops the Content-Length, reads the body as chunked and closes
    // the connection after the response, so nothing behind the body is
    // read as a request; the app gets it re-framed, chunked.
    // §3.2.3, §3.2.4: authority-form is for CONNECT, asterisk-form for
    // OPTIONS only.
    let uri = req.uri();
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Some("an authority-form target is only for CONNECT");
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Some("an asterisk-form target is only for OPTIONS");
    }
    None
}

/// Adds the request id and attaches the summary to a local response.
fn finish(
    app: &App,
    mut resp: Response<ResponseBody>,
    rid: HeaderValue,
    mut summary: RequestSummary,
) -> Response<ResponseBody> {
    summary.set_code(resp.status().as_u16());
    resp.headers_mut().insert(app.rid_header.clone(), rid);
    resp.map(|b| b.with_summary(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerflow_paths_match_exactly_with_one_optional_slash() {
        assert_eq!(classify("/__heartbeat__"), Route::Heartbeat);
        assert_eq!(classify("/__heartbeat__/"), Route::Heartbeat);
        assert_eq!(classify("/__lbheartbeat__"), Route::LbHeartbeat);
        assert_eq!(classify("/__version__/"), Route::Version);
        assert_eq!(classify("/__heartbeat__//"), Route::Proxy);
        assert_eq!(classify("//__heartbeat__"), Route::Proxy);
        assert_eq!(classify("/__heartbeat__/.."), Route::Proxy);
        assert_eq!(classify("/%5F%5Fheartbeat%5F%5F"), Route::Proxy);
        assert_eq!(classify("/app/__heartbeat__"), Route::Proxy);
        assert_eq!(classify("/"), Route::Proxy);
    }
}
