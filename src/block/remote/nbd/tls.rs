//! TLS for the NBD client (proto.md, "TLS support", "Client-side requirements"): credentials
//! from QEMU's `tls-creds-x509` directory layout with `endpoint=client`, checked with rustls.
//!
//! The server's certificate must chain to `ca-cert.pem` and carry the name the client checks,
//! in a subjectAltName (rustls, like browsers, ignores the subject's CN, which GnuTLS still
//! falls back to: a certificate QEMU accepts only by its CN is refused here).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::error::NbdClientError;
use crate::block::remote::location::{NbdServer, NbdSpec};

/// Client credentials, loaded once and used for every (re)connection.
#[derive(Clone)]
pub struct TlsClientCreds {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsClientCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClientCreds")
    }
}

const LAYOUT: &str = "a client tls-creds-x509 directory holds ca-cert.pem, maybe ca-crl.pem, \
                      and client-cert.pem with client-key.pem for servers that verify their \
                      clients";

fn creds_err(path: &Path, reason: impl Into<String>) -> NbdClientError {
    NbdClientError::Creds {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NbdClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| creds_err(path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| creds_err(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(creds_err(
            path,
            "no certificate in the file (expected PEM \"CERTIFICATE\" blocks)",
        ));
    }
    Ok(certs)
}

impl TlsClientCreds {
    /// Load QEMU's client layout from `dir`: `ca-cert.pem` (the CAs the server's certificate
    /// must chain to, required); optionally `ca-crl.pem` (revoked certificates: the server's
    /// must not be one; as with GnuTLS, a certificate whose issuer has no list there passes);
    /// and optionally `client-cert.pem` (this client's certificate, then any intermediates)
    /// with `client-key.pem` (its key: PKCS#8, PKCS#1 or SEC1), which servers with
    /// `verify-peer=on` (QEMU's default) ask for.
    pub fn load(dir: &Path) -> Result<TlsClientCreds, NbdClientError> {
        let ca_path = dir.join("ca-cert.pem");
        let cert_path = dir.join("client-cert.pem");
        let key_path = dir.join("client-key.pem");
        if !ca_path.exists() {
            return Err(creds_err(&ca_path, format!("missing ({LAYOUT})")));
        }
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&ca_path)? {
            roots
                .add(cert)
                .map_err(|e| creds_err(&ca_path, format!("not a usable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| creds_err(dir, format!("TLS setup: {e}")))?;
        let crl_path = dir.join("ca-crl.pem");
        let builder = if crl_path.exists() {
            let crls = CertificateRevocationListDer::pem_file_iter(&crl_path)
                .map_err(|e| creds_err(&crl_path, format!("cannot read: {e}")))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| creds_err(&crl_path, format!("not valid PEM: {e}")))?;
            if crls.is_empty() {
                return Err(creds_err(
                    &crl_path,
                    "no revocation list in the file (expected PEM \"X509 CRL\" blocks)",
                ));
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| creds_err(&crl_path, format!("not usable: {e}")))?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder.with_root_certificates(roots)
        };
        let config = match (cert_path.exists(), key_path.exists()) {
            (false, false) => builder.with_no_client_auth(),
            (true, true) => {
                let certs = read_certs(&cert_path)?;
                let key = PrivateKeyDer::from_pem_file(&key_path)
                    .map_err(|e| creds_err(&key_path, format!("no usable private key: {e}")))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    creds_err(&key_path, format!("does not go with client-cert.pem: {e}"))
                })?
            }
            (true, false) => return Err(creds_err(&key_path, format!("missing ({LAYOUT})"))),
            (false, true) => return Err(creds_err(&cert_path, format!("missing ({LAYOUT})"))),
        };
        Ok(TlsClientCreds {
            config: Arc::new(config),
        })
    }

    /// A new session checking the server's certificate for `name`.
    pub(super) fn session(
        &self,
        name: &ServerName<'static>,
    ) -> Result<ClientConnection, rustls::Error> {
        ClientConnection::new(self.config.clone(), name.clone())
    }
}

/// The name the server's certificate must carry: `tls-hostname`, else the TCP host (a DNS
/// name or an IP address). A UNIX socket has no host: as QEMU does (its block/nbd.c takes
/// the host only for inet addresses, and crypto/tlssession.c then refuses "No hostname for
/// certificate validation"), `tls-hostname` is required there; vubd says so before
/// connecting instead of after the TLS handshake.
pub(super) fn server_name(
    spec: &NbdSpec,
    display: &str,
) -> Result<ServerName<'static>, NbdClientError> {
    let host = match (&spec.tls_hostname, &spec.server) {
        (Some(h), _) => h.clone(),
        (None, NbdServer::Inet { host, .. }) => host.clone(),
        (None, NbdServer::Unix(_)) => {
            return Err(NbdClientError::TlsHostname {
                server: display.to_string(),
            })
        }
    };
    ServerName::try_from(host.clone()).map_err(|_| NbdClientError::BadTlsHostname {
        server: display.to_string(),
        host,
    })
}

/// The `tls-creds-x509` objects with `endpoint=client`, by id: process-wide, as QEMU's
/// objects are, so that an `nbd` node's `tls-creds=ID` finds them wherever it is opened
/// (command line, `blockdev-add`, a `json:` name).
static CLIENT_CREDS: std::sync::Mutex<std::collections::BTreeMap<String, TlsClientCreds>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn registry() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, TlsClientCreds>>
{
    CLIENT_CREDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Add object `id`; false if an object of that id exists.
pub fn register_client_creds(id: &str, creds: TlsClientCreds) -> bool {
    let mut map = registry();
    if map.contains_key(id) {
        return false;
    }
    map.insert(id.to_string(), creds);
    true
}

/// Remove object `id`; false if there was none (nodes already open keep their copy).
pub fn unregister_client_creds(id: &str) -> bool {
    registry().remove(id).is_some()
}

/// Object `id`, if it was added.
pub fn client_creds(id: &str) -> Option<TlsClientCreds> {
    registry().get(id).cloned()
}
