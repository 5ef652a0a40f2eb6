//! TLS on the public listener: a certificate made in the test (rcgen, with
//! its own CA), HTTP/1.1 and h2 by ALPN, X-Forwarded-Proto, and rotation
//! while a client keeps connecting (files changed, SIGHUP, a bad file).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::{Sidecar, SidecarBuilder, Upstream};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};

/// A test CA that signs `localhost` certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dockerflow-sidecar test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `localhost` whose common name is `name`: (cert PEM, key PEM).
    fn leaf(&self, name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// Installs the pair as Kubernetes updates a mounted secret: both files
/// in a new directory, then one atomic rename of the `current` symlink, so
/// no reader ever sees a certificate with the other pair's key.
fn install(dir: &Path, (cert, key): &(String, String)) {
    static VERSION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let version = VERSION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let target = dir.join(format!("v{version}"));
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("tls.crt"), cert).unwrap();
    std::fs::write(target.join("tls.key"), key).unwrap();
    let link = dir.join(format!("current.{version}"));
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::fs::rename(&link, dir.join("current")).unwrap();
}

fn sidecar(app: &Upstream, dir: &Path, reload: &str) -> Sidecar {
    SidecarBuilder::new(&app.url())
        .toml(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"{reload}\"\n",
            dir.join("current/tls.crt").display(),
            dir.join("current/tls.key").display()
        ))
        .start()
}

/// What one request over a new TLS connection saw.
struct Seen {
    alpn: Option<Vec<u8>>,
    common_name: String,
    version: http::Version,
    body: serde_json::Value,
}

async fn fetch(sidecar: &Sidecar, ca: &Ca, alpn: &[&[u8]], path: &str) -> Result<Seen, String> {
    let tcp = tokio::net::TcpStream::connect(sidecar.addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = ca
        .client(alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf: CertificateDer<'static> = session.peer_certificates().unwrap()[0].clone();
    let common_name = common_name(&leaf);
    let uri = format!("https://localhost:{}{path}", sidecar.addr.port());
    let req = http::Request::builder()
        .uri(&uri)
        .header("host", format!("localhost:{}", sidecar.addr.port()))
        .header("x-forwarded-proto", "http")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let io = TokioIo::new(tls);
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().remove("host");
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().unwrap();
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let version = resp.version();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Seen {
        alpn,
        common_name,
        version,
        body: serde_json::from_slice(&body.to_bytes()).unwrap_or_default(),
    })
}

/// The certificate's CN, found in its DER (the test's own names are unique
/// ASCII strings, so a search is enough).
fn common_name(der: &[u8]) -> String {
    for name in ["first", "second", "third"] {
        let needle = format!("cert-{name}");
        if der.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            return needle;
        }
    }
    "unknown".into()
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn_and_says_https() {
    let app = Upstream::start();
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &ca.leaf("cert-first"));
    let sidecar = sidecar(&app, dir.path(), "10s");

    let h1 = fetch(&sidecar, &ca, &[b"http/1.1"], "/echo").await.unwrap();
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.version, http::Version::HTTP_11);
    assert_eq!(h1.common_name, "cert-first");
    let headers = h1.body["headers"].to_string();
    assert!(
        headers.contains("[\"x-forwarded-proto\",\"https\"]"),
        "the client's claim is replaced: {headers}"
    );

    let h2 = fetch(&sidecar, &ca, &[b"h2", b"http/1.1"], "/echo")
        .await
        .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert!(h2.body["headers"]
        .to_string()
        .contains("[\"x-forwarded-proto\",\"https\"]"));

    // Plain HTTP on the TLS port is refused, not served.
    let plain = tokio::time::timeout(
        common::DEADLINE,
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Empty<Bytes>>()
            .get(sidecar.url("/echo").parse().unwrap()),
    )
    .await
    .unwrap();
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn certificates_rotate_while_clients_keep_connecting() {
    let app = Upstream::start();
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &ca.leaf("cert-first"));
    let mut sidecar = sidecar(&app, dir.path(), "100ms");
    assert_eq!(
        fetch(&sidecar, &ca, &[], "/").await.unwrap().common_name,
        "cert-first"
    );

    // Rotation by file change: every connection succeeds, first with the
    // old certificate, then with the new one.
    install(dir.path(), &ca.leaf("cert-second"));
    let end = Instant::now() + common::DEADLINE;
    let mut connections = 0;
    loop {
        let seen = fetch(&sidecar, &ca, &[], "/")
            .await
            .expect("no failed connection");
        connections += 1;
        if seen.common_name == "cert-second" {
            break;
        }
        assert_eq!(seen.common_name, "cert-first");
        assert!(
            Instant::now() < end,
            "still the old certificate after {connections} connections"
        );
    }
    sidecar.stdout.wait_for("the reload line", |l| {
        l.contains("TLS certificate reloaded")
    });

    // A bad new pair (key of another certificate) keeps the current one.
    let (cert, _) = ca.leaf("cert-third");
    let (_, other_key) = ca.leaf("cert-other");
    install(dir.path(), &(cert, other_key));
    let line = sidecar.stdout.wait_for("the refusal", |l| {
        l.contains("TLS certificate not reloaded")
    });
    assert!(line.contains("does not match"), "{line}");
    assert_eq!(
        fetch(&sidecar, &ca, &[], "/").await.unwrap().common_name,
        "cert-second"
    );

    sidecar.signal(libc::SIGTERM);
    assert_eq!(sidecar.wait_exit(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_certificate_at_once() {
    let app = Upstream::start();
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &ca.leaf("cert-first"));
    // The file check would wait an hour: only SIGHUP can explain a reload.
    let sidecar = sidecar(&app, dir.path(), "1h");
    install(dir.path(), &ca.leaf("cert-third"));
    assert_eq!(
        fetch(&sidecar, &ca, &[], "/").await.unwrap().common_name,
        "cert-first"
    );
    sidecar.signal(libc::SIGHUP);
    sidecar.stdout.wait_for("the reload line", |l| {
        l.contains("TLS certificate reloaded")
    });
    assert_eq!(
        fetch(&sidecar, &ca, &[], "/").await.unwrap().common_name,
        "cert-third"
    );
}

#[test]
fn a_bad_certificate_stops_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    let out = std::process::Command::new(common::binary())
        .args(["--upstream", "http://127.0.0.1:1"])
        .env("DOCKERFLOW_LISTEN", "127.0.0.1:0")
        .env("DOCKERFLOW_ADMIN__ENABLED", "false")
        .env("DOCKERFLOW_TLS__CERT", dir.path().join("tls.crt"))
        .env("DOCKERFLOW_TLS__KEY", dir.path().join("tls.key"))
        .env_remove("DOCKERFLOW_CONFIG")
        .env_remove("PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Logged as a mozlog error line, like every start-up failure.
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("\"Severity\":3")
            && log.contains("tls.cert: ")
            && log.contains("holds no certificate"),
        "{log}"
    );
    // Half a pair is a configuration error naming the key.
    let out = std::process::Command::new(common::binary())
        .args(["check-config", "--upstream", "http://127.0.0.1:1"])
        .env("DOCKERFLOW_TLS__CERT", dir.path().join("tls.crt"))
        .env_remove("DOCKERFLOW_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`tls.key`"), "{err}");
}

/// A rustls server configuration for a leaf (PEM pair).
fn server_config((cert, key): &(String, String)) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
}

#[tokio::test]
async fn an_https_upstream_and_https_hooks_are_verified_with_the_configured_ca() {
    let ca = Ca::new();
    let app = Upstream::start_tls(server_config(&ca.leaf("cert-first")));
    let port = app.addr.unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let url = format!("https://localhost:{port}");
    let hook = format!(
        "[[hooks]]\nname = \"tls-hook\"\nevents = [\"report.received\"]\nurl = \"{url}/hook\"\n"
    );
    let sidecar = SidecarBuilder::new(&url)
        .env("DOCKERFLOW_UPSTREAM__CA_FILE", ca_file.to_str().unwrap())
        .toml(&format!(
            "[delivery]\nca_file = \"{}\"\n{hook}",
            ca_file.display()
        ))
        .start();
    let reply = common::get(&sidecar.url("/over-tls?x=1"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["uri"], "/over-tls?x=1");
    // An upload and a download far larger than the socket buffers, over
    // TLS to the app.
    let upload = common::request("POST", &sidecar.url("/count"), &[], vec![7u8; 8 << 20]).await;
    assert_eq!(upload.status, 200);
    assert_eq!(upload.json()["bytes"], 8 << 20);
    let download = common::get(&sidecar.url(&format!("/download/{}", 8 << 20)), &[]).await;
    assert_eq!((download.status, download.body.len()), (200, 8 << 20));
    assert_eq!(
        common::get(&sidecar.url("/__heartbeat__"), &[])
            .await
            .status,
        200
    );
    // A hook to the same https server is delivered (it answers 200).
    let report = r#"{"csp-report": {"document-uri": "https://a.example/", "violated-directive": "img-src"}}"#;
    let stored = common::post_csp_report(&sidecar, report).await;
    assert_eq!(stored.status, 204);
    let end = Instant::now() + common::DEADLINE;
    loop {
        let out = sidecar.cli(&["hooks", "list", "--json"]);
        let rows = String::from_utf8_lossy(&out.stdout).into_owned();
        if rows.contains("\"status\":\"sent\"") {
            break;
        }
        assert!(Instant::now() < end, "the hook was not delivered: {rows}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(sidecar);

    // Without the CA the app's certificate is refused: 502, and the log says why.
    let sidecar = SidecarBuilder::new(&url).start();
    let reply = common::get(&sidecar.url("/over-tls"), &[("x-request-id", "tls-502")]).await;
    assert_eq!(reply.status, 502);
    let line = sidecar.summary_for("tls-502");
    let msg = line["Fields"]["msg"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("certificate"), "{msg}");
}
