//! TLS on the public listener: rustls with the ring provider, ALPN `h2` and
//! `http/1.1`, and a certificate that is reloaded without a restart when its
//! files change (Kubernetes rotates mounted secrets by swapping a symlink)
//! or on SIGHUP. A new pair that does not load keeps the old one serving
//! and is logged once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// The listener's certificate, swapped atomically on reload.
#[derive(Debug)]
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like at the last load attempt.
    seen: Mutex<Option<Fingerprint>>,
}

/// Enough of two files' metadata to notice a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([(Option<SystemTime>, u64); 2]);

impl Certificates {
    /// Loads `tls.cert` and `tls.key`; an error names the file and the problem.
    pub fn load(config: &TlsConfig) -> Result<Arc<Certificates>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = (config.cert.clone(), config.key.clone());
        let seen = fingerprint(&cert, &key);
        let loaded = load_pair(&cert, &key, &provider)?;
        Ok(Arc::new(Certificates {
            cert,
            key,
            provider,
            current: RwLock::new(Arc::new(loaded)),
            seen: Mutex::new(seen),
        }))
    }

    /// The rustls server configuration: this resolver, ALPN h2 then http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Loads the files again; on failure the current certificate stays.
    /// Blocking (file reads): call it off the runtime's threads.
    pub fn reload(&self) -> Result<(), String> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        self.load_locked(&mut seen)
    }

    /// Looks, loads and stores under the one lock: two reloads (the file
    /// check and SIGHUP) cannot store their pairs out of order.
    fn load_locked(&self, seen: &mut Option<Fingerprint>) -> Result<(), String> {
        *seen = fingerprint(&self.cert, &self.key);
        let loaded = load_pair(&self.cert, &self.key, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Reloads when the files changed since the last attempt (each change
    /// is tried, and logged, once).
    fn reload_if_changed(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == fingerprint(&self.cert, &self.key) {
            return;
        }
        match self.load_locked(&mut seen) {
            Ok(()) => tracing::info!(
                cert = %self.cert.display(),
                "TLS certificate reloaded"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "TLS certificate not reloaded: the previous one is still served"
            ),
        }
    }

    /// Checks the files every `every` until the process ends.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                // File reads are small, but they are blocking calls.
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            }
        });
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn fingerprint(cert: &Path, key: &Path) -> Option<Fingerprint> {
    let meta = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    Some(Fingerprint([meta(cert)?, meta(key)?]))
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls.cert: cannot read {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert: {} is not valid PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls.cert: {} holds no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "tls.key: cannot read a private key from {}: {e}",
            key.display()
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("tls.key: {} is not a usable key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "tls.key: {} does not match the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}
