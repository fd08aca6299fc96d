//! Connecting and the handshake (proto.md, "Fixed newstyle negotiation"): `NBDMAGIC`,
//! `IHAVEOPT`, client flags `FIXED_NEWSTYLE | NO_ZEROES`; `NBD_OPT_STARTTLS` first when TLS is
//! configured (everything after it over TLS); `NBD_OPT_STRUCTURED_REPLY`; then `NBD_OPT_GO`
//! with the export name and an `NBD_INFO_BLOCK_SIZE` request, falling back to
//! `NBD_OPT_EXPORT_NAME` only for a server that does not know `NBD_OPT_GO`.
//!
//! The server is untrusted: every length it sends is bounded before anything is read or
//! allocated by it, and the whole handshake runs under a socket timeout.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::error::{printable, NbdClientError};
use super::info::{ExportInfo, DEFAULT_MAX_PAYLOAD};
use super::socket::{self, Socket};
use super::tls::TlsClientCreds;
use super::transport::Wire;
use crate::block::remote::location::NbdSpec;
use crate::nbd::wire::*;

/// The oldstyle handshake's second magic (proto.md, "Oldstyle negotiation"), refused.
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// How long any one read or write of the handshake may block: a server that accepts and then
/// says nothing must not hold a connection attempt forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest option reply accepted: an error message is at most 4096 bytes and an info
/// reply a few, so anything near this is no NBD server.
const MAX_REPLY: u32 = MAX_OPTION;
/// Most replies read for one option before the server is deemed broken.
const MAX_REPLIES: usize = 64;
/// How to reach the export.
pub(super) struct Config {
    /// The server as messages name it (`nbd+unix:///exp?socket=PATH`).
    pub name: String,
    pub spec: NbdSpec,
    pub tls: Option<(TlsClientCreds, ServerName<'static>)>,
}

/// A connection attempt that another thread may cut short (the client being dropped while a
/// reconnection is under way).
#[derive(Default)]
pub(super) struct Attempt {
    closing: AtomicBool,
    socket: Mutex<Option<Socket>>,
}

impl Attempt {
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Stop every attempt, now and later.
    pub fn abort(&self) {
        let slot = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        self.closing.store(true, Ordering::Release);
        if let Some(s) = &*slot {
            s.shutdown();
        }
    }

    /// Make `sock` the attempt [`Attempt::abort`] ends (`None`: done); false if closing.
    fn register(&self, sock: Option<&Socket>) -> bool {
        let mut slot = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = sock.and_then(|s| s.try_clone().ok());
        !self.closing()
    }
}

/// Connect and negotiate: the transport of a connection in transmission and what it serves.
pub(super) fn establish(
    cfg: &Config,
    attempt: &Attempt,
) -> Result<(Wire, ExportInfo), NbdClientError> {
    let sock = socket::connect(&cfg.spec.server).map_err(|source| NbdClientError::Connect {
        server: cfg.name.clone(),
        source,
    })?;
    if !attempt.register(Some(&sock)) {
        return Err(io_err(cfg, io::ErrorKind::Interrupted.into()));
    }
    let result = negotiate(cfg, sock);
    attempt.register(None);
    let (wire, info) = result?;
    wire.socket()
        .set_timeout(None)
        .map_err(|e| io_err(cfg, e))?;
    Ok((wire, info))
}

fn io_err(cfg: &Config, e: io::Error) -> NbdClientError {
    let e = if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(e.kind(), "the server closed the connection")
    } else {
        e
    };
    NbdClientError::Handshake {
        server: cfg.name.clone(),
        source: e,
    }
}

fn protocol(cfg: &Config, reason: impl Into<String>) -> NbdClientError {
    NbdClientError::Protocol {
        server: cfg.name.clone(),
        reason: reason.into(),
    }
}

fn negotiate(cfg: &Config, sock: Socket) -> Result<(Wire, ExportInfo), NbdClientError> {
    sock.set_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| io_err(cfg, e))?;
    let mut neg = Negotiation {
        cfg,
        no_zeroes: false,
        replies: Cell::new(0),
    };
    let fixed = neg.greeting(&mut &sock)?;
    let Some((creds, name)) = &cfg.tls else {
        let info = neg.options(&mut &sock, fixed)?;
        return Ok((Wire::Plain(sock), info));
    };
    if !fixed {
        return Err(NbdClientError::NoTls {
            server: cfg.name.clone(),
            why: "it does not do fixed newstyle negotiation, which STARTTLS needs".into(),
        });
    }
    neg.starttls(&mut &sock)?;
    let tls_failed = |e: String| NbdClientError::TlsHandshake {
        server: cfg.name.clone(),
        reason: e,
        name: name.to_str().into_owned(),
    };
    let mut session = creds.session(name).map_err(|e| tls_failed(e.to_string()))?;
    while session.is_handshaking() {
        session
            .complete_io(&mut &sock)
            .map_err(|e| tls_failed(e.to_string()))?;
    }
    let replies = neg.replies.get();
    let info = neg
        .options(&mut rustls::Stream::new(&mut session, &mut &sock), true)
        .map_err(|e| match e {
            // With TLS 1.3 the client's side of the handshake is over before the server has
            // checked the client's certificate: a refusal shows as the connection ending at
            // the first option.
            NbdClientError::Handshake { server, source } if neg.replies.get() == replies => {
                NbdClientError::TlsRejected { server, source }
            }
            e => e,
        })?;
    let session = Box::new(Mutex::new(session));
    Ok((Wire::Tls { sock, session }, info))
}

/// The option haggling of one handshake.
struct Negotiation<'a> {
    cfg: &'a Config,
    /// `NBD_FLAG_C_NO_ZEROES` was sent: `NBD_OPT_EXPORT_NAME`'s reply has no padding.
    no_zeroes: bool,
    /// Option replies received so far.
    replies: Cell<usize>,
}

impl Negotiation<'_> {
    fn read<S: Read>(&self, s: &mut S, buf: &mut [u8]) -> Result<(), NbdClientError> {
        s.read_exact(buf).map_err(|e| io_err(self.cfg, e))
    }

    fn u64<S: Read>(&self, s: &mut S) -> Result<u64, NbdClientError> {
        let mut b = [0u8; 8];
        self.read(s, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The server's greeting, and our client flags. Returns whether the server does fixed
    /// newstyle (proto.md, "Newstyle negotiation").
    fn greeting<S: Read + Write>(&mut self, s: &mut S) -> Result<bool, NbdClientError> {
        if self.u64(s)? != NBDMAGIC {
            return Err(protocol(
                self.cfg,
                "not an NBD server (no NBDMAGIC greeting)",
            ));
        }
        match self.u64(s)? {
            IHAVEOPT => {}
            CLISERV_MAGIC => {
                return Err(protocol(
                    self.cfg,
                    "the server speaks the oldstyle handshake, which vubd does not; \
                     start it with newstyle negotiation (the default of qemu-nbd and nbdkit)",
                ))
            }
            other => {
                return Err(protocol(
                    self.cfg,
                    format!("not an NBD server (magic {other:#x} after NBDMAGIC)"),
                ))
            }
        }
        let mut b = [0u8; 2];
        self.read(s, &mut b)?;
        let flags = u16::from_be_bytes(b);
        let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client = 0;
        if fixed {
            client |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            client |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&client.to_be_bytes())
            .map_err(|e| io_err(self.cfg, e))?;
        Ok(fixed)
    }

    fn send_option<S: Write>(
        &self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<(), NbdClientError> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        s.write_all(&msg)
            .and_then(|()| s.flush())
            .map_err(|e| io_err(self.cfg, e))
    }

    /// One option reply (proto.md, "Fixed newstyle negotiation"): its type and its data,
    /// refused beyond [`MAX_REPLY`] bytes before anything is allocated for it.
    fn reply<S: Read>(&self, s: &mut S, option: u32) -> Result<(u32, Vec<u8>), NbdClientError> {
        let mut head = [0u8; 20];
        self.read(s, &mut head)?;
        let field = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&head[r]);
            u32::from_be_bytes(b)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[..8]);
        if u64::from_be_bytes(magic) != REPLY_MAGIC {
            return Err(protocol(self.cfg, "option reply without the reply magic"));
        }
        let (echo, kind, len) = (field(8..12), field(12..16), field(16..20));
        if echo != option {
            return Err(protocol(
                self.cfg,
                format!("the server answered option {echo} to option {option}"),
            ));
        }
        if len > MAX_REPLY {
            return Err(protocol(
                self.cfg,
                format!(
                    "the server sent a {len}-byte reply to option {option} (at most {MAX_REPLY} \
                     make sense): a broken or hostile server"
                ),
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.read(s, &mut data)?;
        self.replies.set(self.replies.get() + 1);
        Ok((kind, data))
    }

    /// The error for error reply `kind` to `option`, with the server's message.
    fn refused(&self, option: u32, kind: u32, data: &[u8]) -> NbdClientError {
        let server = self.cfg.name.clone();
        let detail = detail(data);
        match kind {
            REP_ERR_UNKNOWN => NbdClientError::NoSuchExport {
                server,
                export: self.cfg.spec.export.clone(),
                detail,
            },
            REP_ERR_TLS_REQD => NbdClientError::TlsRequired { server, detail },
            _ => NbdClientError::Refused {
                server,
                option: match option {
                    OPT_GO => "NBD_OPT_GO",
                    OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
                    _ => "an option",
                },
                why: why(kind),
                detail,
            },
        }
    }

    /// `NBD_OPT_STARTTLS` (proto.md, "TLS support"): anything but an ACK ends the attempt, a
    /// client that wants TLS must not go on without it.
    fn starttls<S: Read + Write>(&self, s: &mut S) -> Result<(), NbdClientError> {
        self.send_option(s, OPT_STARTTLS, &[])?;
        match self.reply(s, OPT_STARTTLS)? {
            (REP_ACK, _) => Ok(()),
            (kind, data) if kind & REP_FLAG_ERROR != 0 => Err(NbdClientError::NoTls {
                server: self.cfg.name.clone(),
                why: format!("NBD_OPT_STARTTLS refused: {}{}", why(kind), detail(&data)),
            }),
            (kind, _) => Err(protocol(
                self.cfg,
                format!("reply {kind} to NBD_OPT_STARTTLS"),
            )),
        }
    }

    /// The options after the greeting (and STARTTLS): what the export is.
    fn options<S: Read + Write>(
        &self,
        s: &mut S,
        fixed: bool,
    ) -> Result<ExportInfo, NbdClientError> {
        if !fixed {
            // Old newstyle servers close the connection on any option they do not know.
            return self.export_name(s, false);
        }
        let structured = self.structured_reply(s)?;
        match self.go(s, structured)? {
            Some(info) => Ok(info),
            None => self.export_name(s, structured),
        }
    }

    fn structured_reply<S: Read + Write>(&self, s: &mut S) -> Result<bool, NbdClientError> {
        self.send_option(s, OPT_STRUCTURED_REPLY, &[])?;
        match self.reply(s, OPT_STRUCTURED_REPLY)? {
            (REP_ACK, _) => Ok(true),
            (REP_ERR_TLS_REQD, data) => {
                Err(self.refused(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &data))
            }
            // Unsupported, or refused: simple replies it is.
            (kind, _) if kind & REP_FLAG_ERROR != 0 => Ok(false),
            (kind, _) => Err(protocol(
                self.cfg,
                format!("reply {kind} to NBD_OPT_STRUCTURED_REPLY"),
            )),
        }
    }

    /// `NBD_OPT_GO` (proto.md, "NBD_OPT_INFO and NBD_OPT_GO"). `None`: the server does not
    /// know the option (`NBD_REP_ERR_UNSUP`).
    fn go<S: Read + Write>(
        &self,
        s: &mut S,
        structured: bool,
    ) -> Result<Option<ExportInfo>, NbdClientError> {
        let name = self.cfg.spec.export.as_bytes();
        let mut data = Vec::with_capacity(name.len() + 8);
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(s, OPT_GO, &data)?;
        let mut export = None;
        let mut sizes = None;
        for _ in 0..MAX_REPLIES {
            let (kind, data) = self.reply(s, OPT_GO)?;
            match kind {
                REP_INFO => self.info(&data, &mut export, &mut sizes)?,
                REP_ACK => {
                    let Some((size, flags)) = export else {
                        return Err(protocol(
                            self.cfg,
                            "NBD_OPT_GO succeeded without NBD_INFO_EXPORT",
                        ));
                    };
                    let (min_block, preferred_block, max_block) =
                        sizes.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
                    return Ok(Some(ExportInfo {
                        size,
                        flags,
                        min_block,
                        preferred_block,
                        max_block,
                        structured,
                    }));
                }
                REP_ERR_UNSUP => return Ok(None),
                k if k & REP_FLAG_ERROR != 0 => return Err(self.refused(OPT_GO, k, &data)),
                // Other replies (proto.md lets servers add information) are not for us.
                _ => {}
            }
        }
        Err(protocol(
            self.cfg,
            format!("more than {MAX_REPLIES} replies to NBD_OPT_GO"),
        ))
    }

    /// One `NBD_REP_INFO`: the export's size and flags, or its block sizes; other
    /// information is ignored, as proto.md asks.
    #[allow(clippy::type_complexity)]
    fn info(
        &self,
        data: &[u8],
        export: &mut Option<(u64, u16)>,
        sizes: &mut Option<(u32, u32, u32)>,
    ) -> Result<(), NbdClientError> {
        let mut c = Cursor::new(data);
        let bad = |what: &str| protocol(self.cfg, format!("malformed NBD_INFO_{what} reply"));
        match c.u16() {
            Some(INFO_EXPORT) => {
                let (Some(size), Some(flags), 0) = (c.take(8), c.u16(), c.remaining()) else {
                    return Err(bad("EXPORT"));
                };
                let mut b = [0u8; 8];
                b.copy_from_slice(size);
                *export = Some((u64::from_be_bytes(b), flags));
            }
            Some(INFO_BLOCK_SIZE) => {
                let (Some(min), Some(pref), Some(max), 0) =
                    (c.u32(), c.u32(), c.u32(), c.remaining())
                else {
                    return Err(bad("BLOCK_SIZE"));
                };
                // proto.md, "Size constraints": powers of two, the minimum at most 64 KiB, the
                // preferred at least the minimum, the maximum a multiple of the minimum.
                let valid = min.is_power_of_two()
                    && min <= 65536
                    && pref.is_power_of_two()
                    && pref >= min
                    && max >= min
                    && (max.is_multiple_of(min) || max == u32::MAX);
                if !valid {
                    return Err(protocol(
                        self.cfg,
                        format!(
                            "invalid block sizes: minimum {min}, preferred {pref}, maximum {max}"
                        ),
                    ));
                }
                *sizes = Some((min, pref, max));
            }
            Some(_) => {}
            None => return Err(bad("")),
        }
        Ok(())
    }

    /// `NBD_OPT_EXPORT_NAME`: no reply header; the server hangs up on an unknown export.
    fn export_name<S: Read + Write>(
        &self,
        s: &mut S,
        structured: bool,
    ) -> Result<ExportInfo, NbdClientError> {
        self.send_option(s, OPT_EXPORT_NAME, self.cfg.spec.export.as_bytes())?;
        let mut b = [0u8; 10];
        if let Err(e) = s.read_exact(&mut b) {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => NbdClientError::NoSuchExport {
                    server: self.cfg.name.clone(),
                    export: self.cfg.spec.export.clone(),
                    detail: " (it hung up on NBD_OPT_EXPORT_NAME)".into(),
                },
                _ => io_err(self.cfg, e),
            });
        }
        if !self.no_zeroes {
            self.read(s, &mut [0u8; 124])?;
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[..8]);
        Ok(ExportInfo {
            size: u64::from_be_bytes(size),
            flags: u16::from_be_bytes([b[8], b[9]]),
            min_block: 1,
            preferred_block: 4096,
            max_block: DEFAULT_MAX_PAYLOAD,
            structured,
        })
    }
}

/// What an option error reply means (proto.md, "Option reply types").
fn why(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "not supported",
        REP_ERR_POLICY => "forbidden by its policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on its platform",
        REP_ERR_TLS_REQD => "TLS required first",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "it wants block sizes negotiated",
        REP_ERR_TOO_BIG => "request too big",
        _ => "unknown error",
    }
}

/// The message an error reply carried, for the end of ours.
fn detail(data: &[u8]) -> String {
    match printable(data) {
        m if m.is_empty() => String::new(),
        m => format!(" (server: {m})"),
    }
}
