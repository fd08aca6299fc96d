//! The Prometheus endpoint (`--metrics unix:PATH` or `--metrics tcp:HOST:PORT`): a minimal
//! HTTP/1.1 server that answers `GET /metrics` with the statistics in text format.
//!
//! Scrapers are network clients, so untrusted: one at a time, the request head bounded
//! (8 KiB) and read under a deadline (2 s), everything but `GET /metrics` refused, the
//! connection closed after each answer. The server runs on its own thread and never touches
//! the request path: it only reads what the queues publish.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::socket::{bind_unix, RemoveOnDrop, SocketError};

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            MetricsAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("--metrics unix:PATH needs a path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr.parse().map(MetricsAddr::Tcp).map_err(|_| {
                format!("--metrics tcp:{addr}: expected tcp:ADDRESS:PORT (e.g. tcp:127.0.0.1:9100)")
            });
        }
        Err(format!(
            "--metrics {s}: expected unix:PATH or tcp:ADDRESS:PORT"
        ))
    }
}

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(2);

enum Listener {
    Unix {
        listener: UnixListener,
        /// The socket file goes with the endpoint.
        _remove: RemoveOnDrop,
    },
    Tcp(TcpListener),
}

/// A running endpoint; stops when dropped.
pub struct MetricsEndpoint {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Listen on `addr` and answer with what `render` returns at each scrape.
    pub fn start(
        addr: &MetricsAddr,
        render: impl Fn() -> String + Send + 'static,
    ) -> Result<MetricsEndpoint, SocketError> {
        let listener = match addr {
            MetricsAddr::Unix(path) => {
                let listener = bind_unix(path, 0o600, "--metrics")?;
                Listener::Unix {
                    listener,
                    _remove: RemoveOnDrop(path.clone()),
                }
            }
            MetricsAddr::Tcp(addr) => {
                Listener::Tcp(TcpListener::bind(addr).map_err(|e| listen_error(addr, e))?)
            }
        };
        let describe = addr.to_string();
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| listen_error(&describe, e))?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vubd-metrics".into())
            .spawn(move || serve(listener, &thread_stop, render))
            .map_err(|e| listen_error(&describe, e))?;
        Ok(MetricsEndpoint {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen_error(address: &impl std::fmt::Display, source: io::Error) -> SocketError {
    SocketError::Listen {
        option: "--metrics",
        address: address.to_string(),
        source,
    }
}

/// Wait until `listener` has a client (true) or `stop` fires (false).
fn wait(listener: RawFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return ret > 0 && fds[1].revents == 0 && fds[0].revents & libc::POLLIN != 0;
    }
}

fn serve(listener: Listener, stop: &EventFd, render: impl Fn() -> String) {
    let fd = match &listener {
        Listener::Unix { listener, .. } => listener.as_raw_fd(),
        Listener::Tcp(l) => l.as_raw_fd(),
    };
    while wait(fd, stop) {
        let result = match &listener {
            Listener::Unix { listener, .. } => listener.accept().and_then(|(mut s, _)| {
                s.set_read_timeout(Some(READ_DEADLINE))?;
                s.set_write_timeout(Some(READ_DEADLINE))?;
                answer(&mut s, &render)?;
                s.shutdown(std::net::Shutdown::Write)?;
                drain(&mut s)
            }),
            Listener::Tcp(l) => l.accept().and_then(|(mut s, _)| {
                s.set_read_timeout(Some(READ_DEADLINE))?;
                s.set_write_timeout(Some(READ_DEADLINE))?;
                answer(&mut s, &render)?;
                s.shutdown(std::net::Shutdown::Write)?;
                drain(&mut s)
            }),
        };
        if let Err(e) = result {
            log::debug!("metrics client: {e}");
        }
    }
}

/// After answering: read what the client still sends (bounded, briefly), so that closing does
/// not reset the connection before the client has read the answer.
fn drain(stream: &mut impl Read) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut buf = [0u8; 4096];
    let mut left = 64usize << 10;
    while left > 0 && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

/// Read one request head and answer it.
fn answer(stream: &mut (impl Read + Write), render: &impl Fn() -> String) -> io::Result<()> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || Instant::now() > deadline {
            return respond(stream, "431 Request Header Fields Too Large", "");
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => respond(stream, "200 OK", &render()),
        (b"GET", _) => respond(stream, "404 Not Found", "see /metrics\n"),
        _ => respond(stream, "405 Method Not Allowed", ""),
    }
}

fn respond(stream: &mut impl Write, status: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_get_metrics_and_refuses_the_rest() {
        // Port 0 would not tell us the port: bind one ourselves first, then reuse it.
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let endpoint =
            MetricsEndpoint::start(&MetricsAddr::Tcp(addr), || "vubd_up 1\n".into()).unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("version=0.0.4"));
        assert!(ok.ends_with("\r\n\r\nvubd_up 1\n"));
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
        // A client that sends nothing and leaves does not stop the endpoint.
        drop(TcpStream::connect(addr).unwrap());
        assert!(get(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").contains("vubd_up 1"));
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "the endpoint stopped");
    }

    #[test]
    fn addresses_parse_and_errors_name_the_option() {
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:9100".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert!("tcp:nowhere"
            .parse::<MetricsAddr>()
            .unwrap_err()
            .contains("--metrics"));
        assert!("http://x"
            .parse::<MetricsAddr>()
            .unwrap_err()
            .contains("--metrics"));
        assert!("unix:".parse::<MetricsAddr>().is_err());
    }
}
