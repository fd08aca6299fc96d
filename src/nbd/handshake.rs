//! The handshake: fixed newstyle negotiation and option haggling (proto.md, "Handshake",
//! "Fixed newstyle negotiation", "Option types"), up to the start of transmission.

use std::sync::Arc;

use log::debug;

use super::conn::{Conn, End, Env, Transmission};
use super::proto::*;
use super::ExportEntry;

/// The export table as a connection sees it.
pub(crate) trait Exports: Send + Sync {
    fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>>;
    fn list(&self) -> Vec<Arc<ExportEntry>>;
    /// Record that connection `id` entered transmission on `export`; false if the export was
    /// removed since it was looked up (the client is then told it does not exist).
    fn attach(&self, id: u64, export: &Arc<ExportEntry>) -> bool;
}

/// A selected meta context (proto.md, "Metadata querying").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`, by index into the source's `bitmaps()`.
    Bitmap(usize),
}

impl Context {
    /// Context ids, stable within a connection: 0 for `base:allocation`, 1 + index for
    /// bitmaps (QEMU numbers its own the same way, after its allocation-depth context).
    pub fn id(self) -> Option<u32> {
        match self {
            Context::Allocation => Some(0),
            Context::Bitmap(i) => u32::try_from(i).ok()?.checked_add(1),
        }
    }

    pub fn name(self, bitmaps: &[String]) -> String {
        match self {
            Context::Allocation => "base:allocation".to_string(),
            Context::Bitmap(i) => format!("qemu:dirty-bitmap:{}", bitmaps[i]),
        }
    }
}

/// What the handshake agreed on.
pub(crate) struct Session {
    pub export: Arc<ExportEntry>,
    pub structured: bool,
    pub contexts: Vec<Context>,
    pub flags: u16,
}

impl Session {
    pub fn describe(&self) -> Transmission {
        let bitmaps = self.export.source.bitmaps();
        Transmission {
            export: self.export.name.clone(),
            size: self.export.source.size(),
            flags: self.flags,
            structured: self.structured,
            contexts: self
                .contexts
                .iter()
                .filter_map(|c| Some((c.id()?, c.name(&bitmaps))))
                .collect(),
        }
    }
}

/// Transmission flags of every export: read-only, so no flush is needed (a flush is still
/// answered), CACHE is a no-op success, and several connections see the same data
/// (CAN_MULTI_CONN is safe for read-only exports, proto.md "Transmission flags").
fn export_flags(structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    // DF ("don't fragment") only means something with structured replies; every read is
    // answered with one content chunk anyway.
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// Per-connection haggling state.
struct State {
    no_zeroes: bool,
    tls_done: bool,
    structured: bool,
    /// Contexts selected by the last NBD_OPT_SET_META_CONTEXT, and the export it named.
    meta: Option<(String, Vec<Context>)>,
}

/// Run the handshake. `Ok(session)` enters transmission; errors (and NBD_OPT_ABORT, as
/// `End::Done`) end the connection.
pub(crate) fn negotiate(conn: &mut Conn, env: &Env<'_>) -> Result<Session, End> {
    conn.out.extend_from_slice(&greeting());
    conn.send()?;

    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    // proto.md: a server MUST close on unknown client flags; we serve fixed newstyle only.
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(End::Protocol(format!("unknown client flags {flags:#x}")));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(End::Protocol("client does not speak fixed newstyle".into()));
    }
    let mut st = State {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        tls_done: false,
        structured: false,
        meta: None,
    };

    loop {
        let mut header = [0u8; OptionHeader::SIZE];
        if !conn.read_msg(&mut header)? {
            return Err(End::Done);
        }
        let h = OptionHeader::decode(&header);
        if h.magic != IHAVEOPT {
            return Err(End::Protocol(format!("bad option magic {:#x}", h.magic)));
        }
        if h.length > MAX_OPTION {
            // Refuse without reading (nor allocating) what the client claims, then close:
            // the rest of the stream is its unread payload.
            if h.option != OPT_EXPORT_NAME {
                error_reply(conn, h.option, REP_ERR_TOO_BIG, "option too long")?;
            }
            return Err(End::Protocol(format!(
                "option {} of {} bytes (at most {MAX_OPTION})",
                h.option, h.length
            )));
        }
        let mut data = vec![0u8; h.length as usize];
        conn.read_exact(&mut data)?;

        // FORCEDTLS (proto.md, "TLS support"): before STARTTLS only STARTTLS and ABORT.
        if env.tls.is_some() && !st.tls_done {
            match h.option {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    return Err(End::Protocol("NBD_OPT_EXPORT_NAME before TLS".into()));
                }
                _ => {
                    error_reply(conn, h.option, REP_ERR_TLS_REQD, "TLS is required")?;
                    continue;
                }
            }
        }

        match h.option {
            OPT_EXPORT_NAME => return export_name(conn, env, &st, &data),
            OPT_ABORT => {
                // The client may already be gone: a failed ACK is not an error.
                put_option_reply(&mut conn.out, h.option, REP_ACK, 0);
                let _ = conn.send();
                return Err(End::Done);
            }
            OPT_LIST => list(conn, env, &data)?,
            OPT_STARTTLS => starttls(conn, env, &mut st, &data)?,
            OPT_INFO | OPT_GO => {
                if let Some(session) = info(conn, env, &st, h.option, &data)? {
                    return Ok(session);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(conn, h.option, REP_ERR_INVALID, "no payload expected")?;
                } else if st.structured {
                    error_reply(
                        conn,
                        h.option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    )?;
                } else {
                    st.structured = true;
                    ack(conn, h.option)?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(conn, env, &mut st, h.option, &data)?
            }
            // Extended headers (and anything newer or unknown) are not offered.
            other => {
                debug!("nbd: unsupported option {other}");
                error_reply(conn, other, REP_ERR_UNSUP, "option not supported")?;
            }
        }
    }
}

fn ack(conn: &mut Conn, option: u32) -> Result<(), End> {
    put_option_reply(&mut conn.out, option, REP_ACK, 0);
    Ok(conn.send()?)
}

/// An error reply with a human-readable message (proto.md: error replies MAY carry one).
fn error_reply(conn: &mut Conn, option: u32, reply: u32, message: &str) -> Result<(), End> {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
    put_option_reply(&mut conn.out, option, reply, message.len() as u32);
    conn.out.extend_from_slice(message);
    Ok(conn.send()?)
}

/// An export name from the wire: names are UTF-8 (proto.md, "Conventions"); a name that is
/// not cannot match an export.
fn lookup(env: &Env<'_>, name: &[u8]) -> Option<Arc<ExportEntry>> {
    std::str::from_utf8(name)
        .ok()
        .and_then(|n| env.exports.lookup(n))
}

/// The meta contexts that apply to `export` once transmission starts: those set for the same
/// export name (proto.md, NBD_OPT_SET_META_CONTEXT: the last SET must name the export used).
fn contexts_for(st: &State, export: &ExportEntry) -> Vec<Context> {
    match &st.meta {
        Some((name, contexts)) if *name == export.name => contexts.clone(),
        _ => Vec::new(),
    }
}

/// NBD_OPT_EXPORT_NAME: no error reply exists, so an unknown export closes the connection.
fn export_name(conn: &mut Conn, env: &Env<'_>, st: &State, name: &[u8]) -> Result<Session, End> {
    let export = lookup(env, name)
        .filter(|e| env.exports.attach(env.id, e))
        .ok_or_else(|| End::Protocol("NBD_OPT_EXPORT_NAME of an unknown export".into()))?;
    let flags = export_flags(st.structured);
    conn.out
        .extend_from_slice(&export.source.size().to_be_bytes());
    conn.out.extend_from_slice(&flags.to_be_bytes());
    if !st.no_zeroes {
        conn.out.extend_from_slice(&[0u8; 124]);
    }
    conn.send()?;
    Ok(Session {
        contexts: contexts_for(st, &export),
        export,
        structured: st.structured,
        flags,
    })
}

/// NBD_OPT_LIST: one NBD_REP_SERVER per export (name, then its description as QEMU does).
fn list(conn: &mut Conn, env: &Env<'_>, data: &[u8]) -> Result<(), End> {
    if !data.is_empty() {
        return error_reply(conn, OPT_LIST, REP_ERR_INVALID, "no payload expected");
    }
    for export in env.exports.list() {
        let name = export.name.as_bytes();
        let desc = export.description.as_deref().unwrap_or("").as_bytes();
        let desc = &desc[..desc.len().min(MAX_STRING)];
        put_option_reply(
            &mut conn.out,
            OPT_LIST,
            REP_SERVER,
            (4 + name.len() + desc.len()) as u32,
        );
        conn.out
            .extend_from_slice(&(name.len() as u32).to_be_bytes());
        conn.out.extend_from_slice(name);
        conn.out.extend_from_slice(desc);
        conn.send()?;
    }
    ack(conn, OPT_LIST)
}

/// NBD_OPT_STARTTLS: acknowledge, then continue haggling inside TLS with a fresh state
/// (proto.md: nothing negotiated before TLS carries over).
fn starttls(conn: &mut Conn, env: &Env<'_>, st: &mut State, data: &[u8]) -> Result<(), End> {
    let Some(config) = env.tls.clone() else {
        return error_reply(conn, OPT_STARTTLS, REP_ERR_POLICY, "TLS not configured");
    };
    if !data.is_empty() {
        return error_reply(conn, OPT_STARTTLS, REP_ERR_INVALID, "no payload expected");
    }
    if st.tls_done {
        return error_reply(conn, OPT_STARTTLS, REP_ERR_INVALID, "TLS already started");
    }
    ack(conn, OPT_STARTTLS)?;
    conn.start_tls(config)?;
    st.tls_done = true;
    st.structured = false;
    st.meta = None;
    Ok(())
}

/// NBD_OPT_INFO and NBD_OPT_GO. Returns the session for a successful GO.
fn info(
    conn: &mut Conn,
    env: &Env<'_>,
    st: &State,
    option: u32,
    data: &[u8],
) -> Result<Option<Session>, End> {
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let len = c.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        let name = c.take(len)?;
        let n = c.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(c.remaining() / 2));
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        (c.remaining() == 0).then_some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        error_reply(conn, option, REP_ERR_INVALID, "malformed request")?;
        return Ok(None);
    };
    let Some(export) = lookup(env, name) else {
        error_reply(conn, option, REP_ERR_UNKNOWN, "export not found")?;
        return Ok(None);
    };
    let flags = export_flags(st.structured);

    // NBD_INFO_EXPORT always; name and description when asked; block sizes always (the
    // spec lets a server send what was not asked, and clients want the 32 MiB maximum).
    put_info(conn, option, INFO_EXPORT, &{
        let mut b = export.source.size().to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b
    })?;
    if requests.contains(&INFO_NAME) {
        put_info(conn, option, INFO_NAME, export.name.as_bytes())?;
    }
    if let Some(desc) = export.description.as_deref() {
        if requests.contains(&INFO_DESCRIPTION) {
            let desc = &desc.as_bytes()[..desc.len().min(MAX_STRING)];
            put_info(conn, option, INFO_DESCRIPTION, desc)?;
        }
    }
    let mut sizes = Vec::with_capacity(12);
    for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    put_info(conn, option, INFO_BLOCK_SIZE, &sizes)?;

    if option == OPT_INFO {
        ack(conn, option)?;
        return Ok(None);
    }
    if !env.exports.attach(env.id, &export) {
        // Removed between the lookup and now.
        error_reply(conn, option, REP_ERR_UNKNOWN, "export not found")?;
        return Ok(None);
    }
    ack(conn, option)?;
    Ok(Some(Session {
        contexts: contexts_for(st, &export),
        export,
        structured: st.structured,
        flags,
    }))
}

fn put_info(conn: &mut Conn, option: u32, kind: u16, data: &[u8]) -> Result<(), End> {
    put_option_reply(&mut conn.out, option, REP_INFO, (2 + data.len()) as u32);
    conn.out.extend_from_slice(&kind.to_be_bytes());
    conn.out.extend_from_slice(data);
    Ok(conn.send()?)
}

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
fn meta_context(
    conn: &mut Conn,
    env: &Env<'_>,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<(), End> {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // "replaces all previously-set metadata contexts (including when this command fails)"
        st.meta = None;
        if !st.structured {
            return error_reply(
                conn,
                option,
                REP_ERR_INVALID,
                "structured replies not negotiated",
            );
        }
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let len = c.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        let name = c.take(len)?;
        let n = c.u32()?;
        Some((name, n))
    })();
    let Some((name, n)) = parsed else {
        return error_reply(conn, option, REP_ERR_INVALID, "malformed request");
    };
    if n > MAX_QUERIES {
        return error_reply(conn, option, REP_ERR_TOO_BIG, "too many queries");
    }
    let mut queries = Vec::with_capacity((n as usize).min(c.remaining() / 4));
    for _ in 0..n {
        let Some(q) = c
            .u32()
            .filter(|&l| l as usize <= MAX_STRING)
            .and_then(|l| c.take(l as usize))
        else {
            return error_reply(conn, option, REP_ERR_INVALID, "malformed query");
        };
        queries.push(q);
    }
    if c.remaining() != 0 {
        return error_reply(conn, option, REP_ERR_INVALID, "trailing bytes");
    }
    let Some(export) = lookup(env, name) else {
        return error_reply(conn, option, REP_ERR_UNKNOWN, "export not found");
    };

    let bitmaps = export.source.bitmaps();
    let mut base = false;
    let mut dirty = vec![false; bitmaps.len()];
    if queries.is_empty() && !set {
        // LIST with no query: everything available.
        base = true;
        dirty.iter_mut().for_each(|d| *d = true);
    }
    for q in &queries {
        match_query(q, set, &bitmaps, &mut base, &mut dirty);
    }
    let mut selected = Vec::new();
    if base {
        selected.push(Context::Allocation);
    }
    selected.extend(
        (0..bitmaps.len())
            .filter(|&i| dirty[i])
            .map(Context::Bitmap),
    );

    for ctx in &selected {
        let Some(id) = ctx.id() else { continue };
        let name = ctx.name(&bitmaps);
        // Context names: the bitmap name comes from the source; keep within the string bound.
        let name = &name.as_bytes()[..name.len().min(MAX_STRING)];
        // proto.md: ids in LIST replies are reserved and SHOULD be zero.
        let id = if set { id } else { 0 };
        put_option_reply(
            &mut conn.out,
            option,
            REP_META_CONTEXT,
            (4 + name.len()) as u32,
        );
        conn.out.extend_from_slice(&id.to_be_bytes());
        conn.out.extend_from_slice(name);
        conn.send()?;
    }
    if set {
        st.meta = Some((export.name.clone(), selected));
    }
    ack(conn, option)
}

/// Match one query. Full names select a context; in LIST, the namespace alone (`base:`,
/// `qemu:`, `qemu:dirty-bitmap:`) lists all of it, as QEMU does. Unknown namespaces and
/// malformed queries select nothing (proto.md: the server MUST ignore unknown namespaces).
fn match_query(q: &[u8], set: bool, bitmaps: &[String], base: &mut bool, dirty: &mut [bool]) {
    let Ok(q) = std::str::from_utf8(q) else {
        return;
    };
    if let Some(leaf) = q.strip_prefix("base:") {
        if leaf == "allocation" || (!set && leaf.is_empty()) {
            *base = true;
        }
    } else if let Some(rest) = q.strip_prefix("qemu:") {
        if !set && rest.is_empty() {
            dirty.iter_mut().for_each(|d| *d = true);
        } else if let Some(bitmap) = rest.strip_prefix("dirty-bitmap:") {
            if !set && bitmap.is_empty() {
                dirty.iter_mut().for_each(|d| *d = true);
            } else if let Some(i) = bitmaps.iter().position(|b| b == bitmap) {
                dirty[i] = true;
            }
        }
    }
}
