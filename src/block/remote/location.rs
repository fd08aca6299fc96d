//! Which remote store a name means, in QEMU's spellings:
//!
//! - `rbd:pool[/namespace]/image[@snapshot][:conf=PATH][:id=USER][:key=value...]`, QEMU's
//!   legacy RBD filename (other keys are Ceph options, as `rados_conf_set` takes them);
//! - `nbd+unix:///export?socket=PATH`, `nbd://host[:port]/export` (`nbd+tcp://` too),
//!   `nbd:unix:PATH[:exportname=NAME]` and `nbd:HOST:PORT[:exportname=NAME]`;
//! - `json:{"driver": "rbd" | "nbd", ...}` with the options of QEMU's `blockdev-add`, which is
//!   also what the qemu-storage-daemon command line's `--blockdev driver=rbd|nbd` nodes
//!   become ([`RemoteSpec::json_name`]).
//!
//! Any other name is a local path. Names stored inside images are never read as remote
//! locations (an image must not make vubd connect anywhere): only names the user gave are.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::keyval::{flatten_json, Opts, Taker};

/// A remote store, as named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteSpec {
    Rbd(RbdSpec),
    Nbd(NbdSpec),
}

/// A Ceph RBD image (QEMU's `BlockdevOptionsRbd`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snapshot: Option<String>,
    /// The Ceph configuration file (default: Ceph's own search, `/etc/ceph/ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The Ceph user, without `client.` (default `admin`).
    pub user: Option<String>,
    /// Further Ceph options (`mon_host`, `keyring`, ...), set after the configuration file.
    pub options: BTreeMap<String, String>,
}

/// An NBD export (QEMU's `BlockdevOptionsNbd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdSpec {
    pub server: NbdServer,
    /// The export name (default: the empty name, the server's default export).
    pub export: String,
    /// `tls-creds`: the id of a `tls-creds-x509` object with `endpoint=client`.
    pub tls_creds: Option<String>,
    /// `tls-hostname`: the name the server's certificate must carry (default: the host).
    pub tls_hostname: Option<String>,
    /// `reconnect-delay`: how long requests wait for a lost connection to come back before
    /// they fail (QEMU's default 0: they fail at once; reconnecting goes on regardless).
    pub reconnect_delay: Duration,
    /// `open-timeout`: how long the first connection is retried before opening fails.
    pub open_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdServer {
    Unix(PathBuf),
    Inet { host: String, port: u16 },
}

/// NBD's IANA port.
pub const NBD_PORT: u16 = 10809;

impl RemoteSpec {
    /// The remote store `name` means, `None` if it names a local file.
    pub fn parse(name: &str) -> Option<Result<RemoteSpec, String>> {
        if let Some(json) = name.strip_prefix("json:") {
            return Some(parse_json(json));
        }
        if let Some(rest) = name.strip_prefix("rbd:") {
            return Some(parse_rbd_filename(rest).map(RemoteSpec::Rbd));
        }
        for scheme in ["nbd://", "nbd+tcp://", "nbd+unix://"] {
            if let Some(rest) = name.strip_prefix(scheme) {
                return Some(parse_nbd_uri(scheme, rest).map(RemoteSpec::Nbd));
            }
        }
        if let Some(rest) = name.strip_prefix("nbd:") {
            return Some(parse_nbd_legacy(rest).map(RemoteSpec::Nbd));
        }
        None
    }

    /// A node of driver `driver` (`rbd`, `nbd`) from `blockdev-add` options (dotted keys, as
    /// [`crate::cli::keyval`] flattens them); `what` names the option for messages.
    pub fn from_options(what: &str, driver: &str, opts: Opts) -> Result<RemoteSpec, String> {
        let mut t = Taker::new(what.to_string(), opts);
        t.take("driver");
        t.take("node-name");
        let spec = match driver {
            "rbd" => RemoteSpec::Rbd(rbd_options(&mut t)?),
            "nbd" => RemoteSpec::Nbd(nbd_options(&mut t)?),
            other => return Err(format!("{what}: driver={other} is not a remote protocol")),
        };
        t.ignore(&[
            "read-only",
            "auto-read-only",
            "discard",
            "detect-zeroes",
            "cache.direct",
            "cache.no-flush",
        ]);
        t.finish().map_err(|f| f.message)?;
        Ok(spec)
    }

    /// The name that reopens this store, in QEMU's `json:` form: what vubd's graph carries
    /// where a path would be.
    pub fn json_name(&self) -> String {
        let mut obj = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            obj.insert(k.to_string(), v);
        };
        match self {
            RemoteSpec::Rbd(r) => {
                put("driver", "rbd".into());
                put("pool", r.pool.clone().into());
                if let Some(ns) = &r.namespace {
                    put("namespace", ns.clone().into());
                }
                put("image", r.image.clone().into());
                if let Some(s) = &r.snapshot {
                    put("snapshot", s.clone().into());
                }
                if let Some(c) = &r.conf {
                    put("conf", c.display().to_string().into());
                }
                if let Some(u) = &r.user {
                    put("user", u.clone().into());
                }
                for (k, v) in &r.options {
                    put(&format!("x-ceph.{k}"), v.clone().into());
                }
            }
            RemoteSpec::Nbd(n) => {
                put("driver", "nbd".into());
                let server = match &n.server {
                    NbdServer::Unix(path) => {
                        serde_json::json!({"type": "unix", "path": path.display().to_string()})
                    }
                    NbdServer::Inet { host, port } => {
                        serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
                    }
                };
                put("server", server);
                put("export", n.export.clone().into());
                if let Some(t) = &n.tls_creds {
                    put("tls-creds", t.clone().into());
                }
                if let Some(h) = &n.tls_hostname {
                    put("tls-hostname", h.clone().into());
                }
                put("reconnect-delay", n.reconnect_delay.as_secs().into());
                put("open-timeout", n.open_timeout.as_secs().into());
            }
        }
        format!("json:{}", serde_json::Value::Object(obj))
    }
}

impl fmt::Display for RemoteSpec {
    /// A short name for messages: `rbd:pool/image`, `nbd+unix:///export?socket=PATH`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteSpec::Rbd(r) => {
                write!(f, "rbd:{}/", r.pool)?;
                if let Some(ns) = &r.namespace {
                    write!(f, "{ns}/")?;
                }
                write!(f, "{}", r.image)?;
                if let Some(s) = &r.snapshot {
                    write!(f, "@{s}")?;
                }
                Ok(())
            }
            RemoteSpec::Nbd(n) => match &n.server {
                NbdServer::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", n.export, p.display()),
                NbdServer::Inet { host, port } => write!(f, "nbd://{host}:{port}/{}", n.export),
            },
        }
    }
}

fn parse_json(text: &str) -> Result<RemoteSpec, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("json: name: invalid JSON: {e}"))?;
    let mut opts = Opts::new();
    flatten_json("", &value, &mut opts);
    // QEMU nests the node as "file" in some json: names (`{"file": {"driver": ...}}`).
    if !opts.contains_key("driver") && opts.keys().any(|k| k.starts_with("file.")) {
        opts = opts
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("file.").map(|k| (k.to_string(), v)))
            .collect();
    }
    let driver = opts
        .get("driver")
        .cloned()
        .ok_or("json: name: 'driver' is required (rbd or nbd)")?;
    RemoteSpec::from_options("json: name", &driver, opts)
}

/// `blockdev-add` options of an `rbd` node.
fn rbd_options(t: &mut Taker) -> Result<RbdSpec, String> {
    let required = |t: &mut Taker, key: &str| {
        t.take(key)
            .ok_or_else(|| format!("{}: '{key}' is required", t.what))
    };
    let mut spec = RbdSpec {
        pool: required(t, "pool")?,
        image: required(t, "image")?,
        namespace: t.take("namespace").filter(|n| !n.is_empty()),
        snapshot: t.take("snapshot"),
        conf: t.take("conf").map(PathBuf::from),
        user: t.take("user"),
        options: BTreeMap::new(),
    };
    // Monitors given as `server.N.host`/`server.N.port` become Ceph's `mon_host`.
    let servers = t.take_prefixed("server");
    let mut mons = Vec::new();
    for i in 0.. {
        let Some(host) = servers.get(&format!("{i}.host")) else {
            break;
        };
        let port = servers
            .get(&format!("{i}.port"))
            .map_or(String::new(), |p| format!(":{p}"));
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        mons.push(format!("{host}{port}"));
    }
    if mons.len() * 2 < servers.len() {
        return Err(format!(
            "{}: 'server' takes a list of {{host, port}} monitors",
            t.what
        ));
    }
    if !mons.is_empty() {
        spec.options.insert("mon_host".into(), mons.join(","));
    }
    if let Some(auth) = t.take("auth-client-required.0") {
        let mut methods = vec![auth];
        for i in 1.. {
            match t.take(&format!("auth-client-required.{i}")) {
                Some(m) => methods.push(m),
                None => break,
            }
        }
        spec.options
            .insert("auth_client_required".into(), methods.join(";"));
    }
    if t.take("key-secret").is_some() {
        return Err(format!(
            "{}: key-secret (a secret object) is not supported; give the key in a keyring \
             named by the Ceph configuration file ('conf')",
            t.what
        ));
    }
    // What a legacy filename's extra keys became (see `json_name`).
    for (k, v) in t.take_prefixed("x-ceph") {
        spec.options.insert(k, v);
    }
    check_rbd(&spec).map(|()| spec)
}

fn check_rbd(spec: &RbdSpec) -> Result<(), String> {
    for (what, v) in [("pool", &spec.pool), ("image", &spec.image)] {
        if v.is_empty() {
            return Err(format!("rbd: the {what} name is empty"));
        }
    }
    if spec.options.keys().any(|k| k.is_empty()) {
        return Err("rbd: an option has an empty name".into());
    }
    Ok(())
}

/// Split `text` at unescaped `sep`, removing the backslashes of `\sep` and `\\`.
fn split_escaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            c if c == sep => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

/// QEMU's `rbd:pool[/namespace]/image[@snap][:key=value...]`.
fn parse_rbd_filename(text: &str) -> Result<RbdSpec, String> {
    let mut fields = split_escaped(text, ':').into_iter();
    let path = fields.next().unwrap_or_default();
    let (path, snapshot) = match path.split_once('@') {
        Some((p, s)) => (p.to_string(), Some(s.to_string())),
        None => (path, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, None, *image),
        [pool, ns, image] => (*pool, Some(ns.to_string()), *image),
        _ => {
            return Err(format!(
                "rbd:{text}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"
            ))
        }
    };
    let mut spec = RbdSpec {
        pool: pool.to_string(),
        namespace,
        image: image.to_string(),
        snapshot,
        ..RbdSpec::default()
    };
    for field in fields {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("rbd:{text}: '{field}' is not key=value"))?;
        match k {
            "conf" => spec.conf = Some(PathBuf::from(v)),
            "id" => spec.user = Some(v.to_string()),
            _ => {
                spec.options.insert(k.to_string(), v.to_string());
            }
        }
    }
    check_rbd(&spec).map(|()| spec)
}

/// `blockdev-add` options of an `nbd` node.
fn nbd_options(t: &mut Taker) -> Result<NbdSpec, String> {
    let server = match t.take("server.type").as_deref() {
        Some("unix") => {
            NbdServer::Unix(PathBuf::from(t.take("server.path").ok_or_else(|| {
                format!("{}: server.type=unix needs server.path", t.what)
            })?))
        }
        Some("inet") => {
            let host = t
                .take("server.host")
                .ok_or_else(|| format!("{}: server.type=inet needs server.host", t.what))?;
            let port = match t.take("server.port") {
                None => NBD_PORT,
                Some(p) => p
                    .parse()
                    .map_err(|_| format!("{}: server.port={p} is not a port number", t.what))?,
            };
            NbdServer::Inet { host, port }
        }
        Some(other) => {
            return Err(format!(
                "{}: server.type={other}: expected unix or inet",
                t.what
            ))
        }
        None => {
            return Err(format!(
                "{}: server.type (unix or inet) is required",
                t.what
            ))
        }
    };
    let seconds = |t: &mut Taker, key: &str| -> Result<Duration, String> {
        match t.take(key) {
            None => Ok(Duration::ZERO),
            Some(v) => v
                .parse::<u32>()
                .map(|s| Duration::from_secs(s.into()))
                .map_err(|_| format!("{}: {key}={v}: expected whole seconds", t.what)),
        }
    };
    Ok(NbdSpec {
        server,
        export: t.take("export").unwrap_or_default(),
        tls_creds: t.take("tls-creds"),
        tls_hostname: t.take("tls-hostname"),
        reconnect_delay: seconds(t, "reconnect-delay")?,
        open_timeout: seconds(t, "open-timeout")?,
    })
}

fn nbd_spec(server: NbdServer, export: String) -> NbdSpec {
    NbdSpec {
        server,
        export,
        tls_creds: None,
        tls_hostname: None,
        reconnect_delay: Duration::ZERO,
        open_timeout: Duration::ZERO,
    }
}

/// `nbd://host[:port]/export`, `nbd+tcp://...`, `nbd+unix:///export?socket=PATH`.
fn parse_nbd_uri(scheme: &str, rest: &str) -> Result<NbdSpec, String> {
    let bad = |why: &str| format!("{scheme}{rest}: {why}");
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let export = percent_decode(export).ok_or_else(|| bad("invalid %-escape"))?;
    let mut socket = None;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        match param.split_once('=') {
            Some(("socket", v)) => {
                socket = Some(percent_decode(v).ok_or_else(|| bad("invalid %-escape"))?)
            }
            _ => return Err(bad(&format!("unknown parameter '{param}'"))),
        }
    }
    if scheme == "nbd+unix://" {
        if !authority.is_empty() {
            return Err(bad(
                "a unix URI has no host (nbd+unix:///EXPORT?socket=PATH)",
            ));
        }
        let socket = socket.ok_or_else(|| bad("'?socket=PATH' is required"))?;
        return Ok(nbd_spec(NbdServer::Unix(socket.into()), export));
    }
    if socket.is_some() {
        return Err(bad("'socket' is for nbd+unix:// URIs"));
    }
    let (host, port) = split_host_port(authority).ok_or_else(|| bad("invalid host or port"))?;
    Ok(nbd_spec(
        NbdServer::Inet {
            host,
            port: port.unwrap_or(NBD_PORT),
        },
        export,
    ))
}

/// `nbd:unix:PATH[:exportname=NAME]`, `nbd:HOST:PORT[:exportname=NAME]`.
fn parse_nbd_legacy(rest: &str) -> Result<NbdSpec, String> {
    let bad = |why: &str| format!("nbd:{rest}: {why}");
    let (rest, export) = match rest.split_once(":exportname=") {
        Some((r, e)) => (r, e.to_string()),
        None => (rest, String::new()),
    };
    if let Some(path) = rest.strip_prefix("unix:") {
        return Ok(nbd_spec(NbdServer::Unix(path.into()), export));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("expected nbd:unix:PATH or nbd:HOST:PORT"))?;
    let port = port.parse().map_err(|_| bad("invalid port"))?;
    Ok(nbd_spec(
        NbdServer::Inet {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        },
        export,
    ))
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((host.to_string(), port))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str) -> RemoteSpec {
        RemoteSpec::parse(name).unwrap().unwrap()
    }

    #[test]
    fn local_paths_are_not_remote() {
        for name in ["disk.raw", "/var/lib/rbd:x", "./rbd:pool/image", "nbdx"] {
            assert!(RemoteSpec::parse(name).is_none(), "{name}");
        }
    }

    #[test]
    fn rbd_legacy_filenames() {
        let RemoteSpec::Rbd(r) =
            parse("rbd:vms/ns1/disk@snap:conf=/etc/c.conf:id=vubd:mon_host=a\\:1")
        else {
            panic!()
        };
        assert_eq!(
            (r.pool.as_str(), r.namespace.as_deref(), r.image.as_str()),
            ("vms", Some("ns1"), "disk")
        );
        assert_eq!(r.snapshot.as_deref(), Some("snap"));
        assert_eq!(r.conf, Some(PathBuf::from("/etc/c.conf")));
        assert_eq!(r.user.as_deref(), Some("vubd"));
        assert_eq!(r.options["mon_host"], "a:1");
        assert!(RemoteSpec::parse("rbd:onlypool").unwrap().is_err());
        assert!(RemoteSpec::parse("rbd:p/i:novalue").unwrap().is_err());
    }

    #[test]
    fn nbd_uris_and_legacy_names() {
        let unix = parse("nbd+unix:///exp?socket=/run/n%20bd.sock");
        let RemoteSpec::Nbd(n) = &unix else { panic!() };
        assert_eq!(n.server, NbdServer::Unix("/run/n bd.sock".into()));
        assert_eq!(n.export, "exp");
        let RemoteSpec::Nbd(n) = parse("nbd://[::1]:1234/e") else {
            panic!()
        };
        assert_eq!(
            n.server,
            NbdServer::Inet {
                host: "::1".into(),
                port: 1234
            }
        );
        let RemoteSpec::Nbd(n) = parse("nbd+tcp://localhost") else {
            panic!()
        };
        assert_eq!(
            (n.server, n.export.as_str()),
            (
                NbdServer::Inet {
                    host: "localhost".into(),
                    port: NBD_PORT
                },
                ""
            )
        );
        let RemoteSpec::Nbd(n) = parse("nbd:unix:/s.sock:exportname=x") else {
            panic!()
        };
        assert_eq!(
            (n.server, n.export.as_str()),
            (NbdServer::Unix("/s.sock".into()), "x")
        );
        assert!(RemoteSpec::parse("nbd+unix:///e").unwrap().is_err());
        assert!(RemoteSpec::parse("nbd://h:99999/e").unwrap().is_err());
    }

    #[test]
    fn blockdev_options_round_trip_through_json_names() {
        let opts: Opts = [
            ("driver", "nbd"),
            ("server.type", "inet"),
            ("server.host", "127.0.0.1"),
            ("server.port", "10810"),
            ("export", "vm1"),
            ("reconnect-delay", "5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let spec = RemoteSpec::from_options("--blockdev", "nbd", opts).unwrap();
        assert_eq!(parse(&spec.json_name()), spec);
        let rbd = parse("rbd:p/i@s:conf=/c:id=u:keyring=/k");
        assert_eq!(parse(&rbd.json_name()), rbd);
        assert_eq!(rbd.to_string(), "rbd:p/i@s");
    }

    #[test]
    fn rbd_monitors_and_refused_options() {
        let opts: Opts = [
            ("pool", "p"),
            ("image", "i"),
            ("server.0.host", "10.0.0.1"),
            ("server.0.port", "6789"),
            ("server.1.host", "::2"),
            ("server.1.port", "3300"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let RemoteSpec::Rbd(r) = RemoteSpec::from_options("x", "rbd", opts.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(r.options["mon_host"], "10.0.0.1:6789,[::2]:3300");
        let mut secret = opts.clone();
        secret.insert("key-secret".into(), "sec0".into());
        assert!(RemoteSpec::from_options("x", "rbd", secret)
            .unwrap_err()
            .contains("keyring"));
        let mut unknown = opts;
        unknown.insert("bogus".into(), "1".into());
        assert!(RemoteSpec::from_options("x", "rbd", unknown)
            .unwrap_err()
            .contains("bogus"));
    }
}
