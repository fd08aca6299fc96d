//! What connecting can fail with, and the errno a request fails with for each NBD error.
//!
//! Every message is one line naming the server as the user named it
//! (`nbd+unix:///exp?socket=/run/x.sock`, `nbd://host:port/exp`) and, where there is one,
//! what to do about it.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::nbd::wire;

#[derive(Debug, Error)]
pub enum NbdClientError {
    /// The socket could not be connected.
    #[error("{server}: cannot connect: {source} (is the NBD server running and listening there?)")]
    Connect { server: String, source: io::Error },
    /// Reading or writing failed during the handshake (a timeout, the server hanging up).
    #[error("{server}: the handshake failed: {source}")]
    Handshake { server: String, source: io::Error },
    /// The server broke the protocol, or is no NBD server.
    #[error("{server}: {reason}")]
    Protocol { server: String, reason: String },
    /// `NBD_REP_ERR_UNKNOWN`, or a server closing the connection on `NBD_OPT_EXPORT_NAME`.
    #[error(
        "{server}: the server has no export '{export}'{detail}; check the export name \
         (`nbdinfo --list` shows what a server exports)"
    )]
    NoSuchExport {
        server: String,
        export: String,
        detail: String,
    },
    /// `NBD_REP_ERR_TLS_REQD`.
    #[error(
        "{server}: the server requires TLS{detail}; give tls-creds (a tls-creds-x509 object \
         with endpoint=client)"
    )]
    TlsRequired { server: String, detail: String },
    /// Any other error reply to an option.
    #[error("{server}: the server refused {option}: {why}{detail}")]
    Refused {
        server: String,
        option: &'static str,
        why: &'static str,
        detail: String,
    },
    /// TLS was asked for and the server does not do it.
    #[error(
        "{server}: the server does not offer TLS ({why}); start it with TLS credentials, or \
         connect without tls-creds if the network is trusted"
    )]
    NoTls { server: String, why: String },
    /// The TLS handshake failed (certificate not trusted, wrong name...).
    #[error(
        "{server}: TLS handshake failed: {reason} (the server's certificate must chain to \
         ca-cert.pem and carry '{name}' in its subjectAltName)"
    )]
    TlsHandshake {
        server: String,
        reason: String,
        name: String,
    },
    /// The server ended the session right after the TLS handshake: it refused our client
    /// certificate, or our lack of one.
    #[error(
        "{server}: the server ended the TLS session ({source}); if it verifies clients \
         (verify-peer=on, QEMU's default), it needs client-cert.pem and client-key.pem signed \
         by its CA"
    )]
    TlsRejected { server: String, source: io::Error },
    /// TLS over a UNIX socket without `tls-hostname`.
    #[error(
        "{server}: TLS over a unix socket needs tls-hostname, the name the server's \
         certificate carries (a socket path has no host name to check)"
    )]
    TlsHostname { server: String },
    /// A `tls-hostname` (or host) that is neither a DNS name nor an IP address.
    #[error("{server}: '{host}' is not a valid TLS server name (DNS name or IP address)")]
    BadTlsHostname { server: String, host: String },
    /// An export name the protocol cannot carry (proto.md, "Conventions": strings are at
    /// most 4096 bytes).
    #[error("{server}: the export name is {len} bytes long, NBD allows at most 4096")]
    ExportNameTooLong { server: String, len: usize },
    /// The spec names TLS credentials but none were handed to the client.
    #[error(
        "{server}: tls-creds={id}: no tls-creds-x509 object '{id}' with endpoint=client; add \
         --object tls-creds-x509,id={id},endpoint=client,dir=DIR (or object-add) first"
    )]
    TlsCredsMissing { server: String, id: String },
    /// A file of the TLS credentials directory is missing or unusable.
    #[error("TLS credentials {}: {reason}", path.display())]
    Creds { path: PathBuf, reason: String },
    /// `open-timeout` passed without a connection.
    #[error("{last} (still failing after open-timeout={secs} s)")]
    OpenTimeout {
        secs: u64,
        last: Box<NbdClientError>,
    },
    /// A thread could not be started.
    #[error("{server}: cannot start the NBD client's {what} thread: {source}")]
    Thread {
        server: String,
        what: &'static str,
        source: io::Error,
    },
}

/// The errno a request fails with for NBD error `value` (proto.md, "Error values"). NBD took
/// its values from Linux's, so each maps to itself; anything else is treated as `EINVAL`, as
/// the spec asks ("The client SHOULD treat an unexpected error value as if it had been
/// NBD_EINVAL").
pub(super) fn errno(value: u32) -> i32 {
    match value {
        0 => 0,
        wire::EPERM => libc::EPERM,
        wire::EIO => libc::EIO,
        wire::ENOMEM => libc::ENOMEM,
        wire::EINVAL => libc::EINVAL,
        wire::ENOSPC => libc::ENOSPC,
        wire::EOVERFLOW => libc::EOVERFLOW,
        wire::ENOTSUP => libc::ENOTSUP,
        wire::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// A string the server sent (an error message, an export name), made safe for one log line:
/// no control characters, at most 200 characters.
pub(super) fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_errors_map_to_errnos_and_unknown_ones_to_einval() {
        for (nbd, e) in [
            (1, libc::EPERM),
            (5, libc::EIO),
            (12, libc::ENOMEM),
            (22, libc::EINVAL),
            (28, libc::ENOSPC),
            (75, libc::EOVERFLOW),
            (95, libc::ENOTSUP),
            (108, libc::ESHUTDOWN),
            (4242, libc::EINVAL),
        ] {
            assert_eq!(errno(nbd), e, "NBD error {nbd}");
        }
    }

    #[test]
    fn server_strings_stay_on_one_line() {
        assert_eq!(printable(b"no\nsuch\x1b[31m export"), "no such [31m export");
        assert_eq!(printable(&[b'x'; 5000]).len(), 200);
    }
}
