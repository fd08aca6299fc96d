//! One connection: the byte stream it runs over (plain socket, TLS, or any `Read + Write` for
//! tests and fuzzing), the reads and writes the protocol code uses, and the driver that runs
//! the handshake and then the transmission phase.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handshake::{self, Exports};
pub(crate) use super::socket::Socket;
use super::transmission;
use super::{ExportEntry, ExportSource, TlsCreds};

/// A byte stream a connection runs over. Generic code sees only this, so plain sockets, TLS
/// and in-memory streams share every line of the protocol.
pub(crate) trait Transport: Read + Write + Send {
    /// Bound how long the next reads and writes may block (the handshake deadline: a client
    /// that neither sends nor reads must not hold its slot); `None` for no bound. Streams
    /// that cannot block ignore it.
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// Any `Read + Write` stream, without timeouts (tests, the fuzz target).
pub(crate) struct Plain<S>(pub S);

impl<S: Read> Read for Plain<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Plain<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<S: Read + Write + Send> Transport for Plain<S> {
    fn set_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Socket {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Socket::set_timeout(self, timeout)
    }
}

/// Stands in for the stream while STARTTLS moves it into a TLS session.
struct Detached;

impl Read for Detached {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
}

impl Write for Detached {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Detached {
    fn set_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client said goodbye (NBD_OPT_ABORT, NBD_CMD_DISC) or closed between messages.
    Done,
    /// The stream failed (including the handshake deadline and a hard export removal).
    Io(io::Error),
    /// The client broke the protocol in a way that leaves no choice but to close.
    Protocol(String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Io(e)
    }
}

/// A connection's stream plus what the protocol code needs around it: byte counts (the
/// transcript), the handshake deadline, and an output buffer so that a reply's header and
/// small payload leave in one write.
pub(crate) struct Conn {
    stream: Box<dyn Transport>,
    read: u64,
    written: u64,
    deadline: Option<Instant>,
    pub out: Vec<u8>,
}

impl Conn {
    pub fn new(stream: Box<dyn Transport>) -> Conn {
        Conn {
            stream,
            read: 0,
            written: 0,
            deadline: None,
            out: Vec::with_capacity(512),
        }
    }

    /// Reads must finish before `deadline` (the handshake); `None` lifts the bound.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        self.deadline = deadline;
        if deadline.is_none() {
            self.stream.set_timeout(None)?;
        }
        Ok(())
    }

    /// Before blocking on the stream: bound the wait by what is left of the deadline.
    fn arm(&mut self) -> io::Result<()> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake not finished in time",
                ));
            }
            self.stream.set_timeout(Some(left))?;
        }
        Ok(())
    }

    /// Fill `buf` from the client. End of stream before the first byte is `Ok(false)` (a
    /// client leaving between messages); in the middle of `buf` it is an error.
    pub fn read_msg(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            self.arm()?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) if done == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    done += n;
                    self.read += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Like `read_msg`, but end of stream anywhere is an error.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.read_msg(buf)? {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Read and drop `n` bytes (a write's payload on a read-only export) through a small
    /// buffer: nothing is allocated by the client's length.
    pub fn discard(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let take = n.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..take])?;
            n -= take as u64;
        }
        Ok(())
    }

    /// Send what is in `out`, then `data`, and flush.
    pub fn send_with(&mut self, data: &[u8]) -> io::Result<()> {
        self.arm()?;
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.written += self.out.len() as u64;
            self.out.clear();
        }
        if !data.is_empty() {
            self.stream.write_all(data)?;
            self.written += data.len() as u64;
        }
        self.stream.flush()
    }

    /// Send what is in `out` and flush.
    pub fn send(&mut self) -> io::Result<()> {
        self.send_with(&[])
    }

    /// Wrap the stream in a TLS server session (after NBD_OPT_STARTTLS was acknowledged). The
    /// TLS handshake itself runs on the next read, within the handshake deadline.
    pub fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let plain = std::mem::replace(&mut self.stream, Box::new(Detached));
        self.stream = Box::new(super::tls::TlsStream::new(session, plain));
        Ok(())
    }

    pub fn counts(&self) -> (u64, u64) {
        (self.read, self.written)
    }
}

impl Transport for Box<dyn Transport> {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_timeout(timeout)
    }
}

/// What the server's side of one connection saw: for the fuzz target and tests, which check
/// the bytes sent against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    /// Bytes read from and written to the client during the handshake (up to the start of
    /// transmission, or in all if transmission never started).
    pub handshake_read: u64,
    pub handshake_written: u64,
    /// Set when the transmission phase started.
    pub transmission: Option<Transmission>,
    /// Why the connection ended, for logs.
    pub end: String,
}

/// The parameters a connection's transmission phase ran with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission {
    pub export: String,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Selected meta contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
}

/// Everything a connection needs from the server around it.
pub(crate) struct Env<'a> {
    pub exports: &'a dyn Exports,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Bound on the whole handshake; `None` for none (in-memory streams).
    pub handshake_timeout: Option<Duration>,
    /// This connection's id in the server's table (for `Exports::attach`).
    pub id: u64,
}

/// Run one connection to its end: handshake, then transmission.
pub(crate) fn run(stream: Box<dyn Transport>, env: &Env<'_>) -> Transcript {
    let mut conn = Conn::new(stream);
    let mut transcript = Transcript::default();
    let result = (|| -> Result<(), End> {
        conn.set_deadline(env.handshake_timeout.map(|t| Instant::now() + t))?;
        let negotiated = handshake::negotiate(&mut conn, env);
        (transcript.handshake_read, transcript.handshake_written) = conn.counts();
        let session = negotiated?;
        conn.set_deadline(None)?;
        transcript.transmission = Some(session.describe());
        transmission::serve(&mut conn, &session)
    })();
    transcript.end = match result {
        Ok(()) | Err(End::Done) => "client disconnected".to_string(),
        Err(End::Io(e)) => format!("connection error: {e}"),
        Err(End::Protocol(why)) => format!("protocol error: {why}"),
    };
    transcript
}

/// A fixed set of exports (for `serve_stream`).
struct StaticExports(Vec<Arc<ExportEntry>>);

impl Exports for StaticExports {
    fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>> {
        self.0.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self) -> Vec<Arc<ExportEntry>> {
        self.0.clone()
    }
    fn attach(&self, _: u64, _: &Arc<ExportEntry>) -> bool {
        true
    }
}

/// Serve one client over any byte stream until it leaves, with a fixed set of exports
/// (name, description, source) and optional TLS: what each connection thread of
/// [`super::NbdServer`] does, without sockets, threads, timeouts or limits. For tests and the
/// fuzz target.
#[doc(hidden)]
pub fn serve_stream<S: Read + Write + Send + 'static>(
    stream: S,
    exports: Vec<(String, Option<String>, Arc<dyn ExportSource>)>,
    tls: Option<Arc<TlsCreds>>,
) -> Transcript {
    let exports = StaticExports(
        exports
            .into_iter()
            .map(|(name, description, source)| {
                Arc::new(ExportEntry {
                    name,
                    description,
                    source,
                })
            })
            .collect(),
    );
    let env = Env {
        exports: &exports,
        tls: tls.map(|t| t.config()),
        handshake_timeout: None,
        id: 0,
    };
    run(Box::new(Plain(stream)), &env)
}
