//! TLS for the NBD server (proto.md, "TLS support"): credentials from QEMU's
//! `tls-creds-x509` directory layout, served with rustls after NBD_OPT_STARTTLS.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use super::conn::Transport;
use super::NbdError;

/// Server credentials, loaded once and shared by every connection.
#[derive(Clone)]
pub struct TlsCreds {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsCreds")
    }
}

const LAYOUT: &str =
    "a tls-creds-x509 directory holds ca-cert.pem, server-cert.pem and server-key.pem";

fn tls_err(path: &Path, reason: impl Into<String>) -> NbdError {
    NbdError::Tls {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NbdError> {
    if !path.exists() {
        return Err(tls_err(path, format!("missing ({LAYOUT})")));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(
            path,
            "no certificate in the file (expected PEM \"CERTIFICATE\" blocks)",
        ));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Load QEMU's x509 layout from `dir`: `server-cert.pem` (the server's certificate, then
    /// any intermediates), `server-key.pem` (its private key, PKCS#8, PKCS#1 or SEC1), and
    /// `ca-cert.pem`. With `verify_peer`, clients must present a certificate signed by the CA
    /// in `ca-cert.pem` (QEMU's `verify-peer=on`, its default); without, no client
    /// certificate is asked for and `ca-cert.pem` is not needed.
    pub fn load_x509(dir: &Path, verify_peer: bool) -> Result<TlsCreds, NbdError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = dir.join("server-cert.pem");
        let key_path = dir.join("server-key.pem");
        let ca_path = dir.join("ca-cert.pem");

        let certs = read_certs(&cert_path)?;
        if !key_path.exists() {
            return Err(tls_err(&key_path, format!("missing ({LAYOUT})")));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| tls_err(&key_path, format!("no usable private key: {e}")))?;

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(dir, format!("TLS setup: {e}")))?;
        let builder = if verify_peer {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(&ca_path)? {
                roots
                    .add(cert)
                    .map_err(|e| tls_err(&ca_path, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err(&ca_path, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| tls_err(&key_path, format!("does not go with server-cert.pem: {e}")))?;
        Ok(TlsCreds {
            config: Arc::new(config),
        })
    }

    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

/// A TLS session over a connection's stream.
pub(crate) struct TlsStream {
    inner: StreamOwned<ServerConnection, Box<dyn Transport>>,
}

impl TlsStream {
    pub fn new(session: ServerConnection, plain: Box<dyn Transport>) -> TlsStream {
        TlsStream {
            inner: StreamOwned::new(session, plain),
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for TlsStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.sock.set_timeout(timeout)
    }
}
