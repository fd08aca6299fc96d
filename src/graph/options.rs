//! What the runtime graph's commands take, parsed once from QEMU's option form — `key=value`
//! on the command line (`--nbd-server`, `--export type=nbd`, `--object`) or QMP arguments
//! flattened into the same dotted keys ([`crate::cli::keyval::flatten_json`]) — so that both
//! front ends accept exactly the same options and word their errors the same way.

use std::path::PathBuf;

use crate::block::remote::location::RemoteSpec;
use crate::block::Format;
use crate::cli::keyval::{Opts, Taker};
use crate::cli::Failure;

/// `blockdev-add` of a node added at runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub kind: NodeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A `file` protocol node: only a name for a file until a format node opens it.
    File(FileSpec),
    /// A `raw` or `qcow2` format node over a file.
    Format {
        format: Format,
        file: FileRef,
        /// qcow2: the external data file, if not the one the image names.
        data_file: Option<FileRef>,
        backing: BackingRef,
        read_only: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    pub filename: PathBuf,
    pub read_only: bool,
    pub direct: bool,
    pub locking: bool,
}

/// A format node's `file`: an added `file` node by name, or inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileRef {
    Node(String),
    Inline(FileSpec),
}

/// A qcow2 node's `backing`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackingRef {
    /// The backing file the image names (no `backing` option).
    FromImage,
    /// `"backing": null`.
    None,
    /// A node of the graph: for a fleecing image, the disk.
    Node(String),
}

/// `blockdev-backup` (only `sync: none`, QEMU's pull-mode backup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSpec {
    pub job_id: String,
    pub device: String,
    pub target: String,
}

/// Where the NBD server listens (QEMU's `SocketAddress`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Inet { host: String, port: String },
}

/// `nbd-server-start` / `--nbd-server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerSpec {
    pub addr: Addr,
    pub tls_creds: Option<String>,
    /// 0: no limit (QEMU's default).
    pub max_connections: usize,
}

/// A bitmap an NBD export offers: by name (looked up on the exported node and its backing
/// chain), or on a named node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapRef {
    pub node: Option<String>,
    pub name: String,
}

/// `block-export-add` / `--export` of `type: nbd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdExportSpec {
    pub id: String,
    pub node: String,
    /// The name clients ask for (default: the node name).
    pub name: String,
    pub description: Option<String>,
    pub bitmaps: Vec<BitmapRef>,
}

/// `block-export-add` / `--export` of `type: vhost-user-blk`, and vubd's own `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostExportSpec {
    pub id: String,
    pub node: String,
    /// The UNIX socket the VMM connects to (`addr.path`).
    pub socket: PathBuf,
    pub writable: bool,
    pub num_queues: u16,
    pub logical_block_size: u32,
    /// The device serial (a vubd option; default: derived from the image path).
    pub serial: Option<String>,
}

/// Longest serial a virtio-blk device returns (`VIRTIO_BLK_ID_BYTES`).
const SERIAL_BYTES: usize = 20;

/// `object-add` / `--object tls-creds-x509`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCredsSpec {
    pub id: String,
    pub dir: PathBuf,
    /// `endpoint=server` (vubd's NBD server) or `client` (`nbd` nodes' `tls-creds`).
    pub endpoint: TlsEndpoint,
    /// Servers only: clients must present a certificate the CA signed (a client always checks
    /// the server's).
    pub verify_peer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    Server,
    Client,
}

fn required(t: &mut Taker, key: &str) -> Result<String, Failure> {
    t.take(key)
        .ok_or_else(|| Failure::msg(format!("{}: '{key}' is required", t.what)))
}

/// A `file` node's options (`filename`, `cache.direct`, `read-only`, `locking`; QEMU's tuning
/// knobs accepted), shared with the qemu-storage-daemon command line.
pub(crate) fn file_spec(t: &mut Taker) -> Result<FileSpec, Failure> {
    let filename = PathBuf::from(required(t, "filename")?);
    let direct = t.take_bool("cache.direct")?.unwrap_or(false);
    let read_only = t.take_bool("read-only")?.unwrap_or(false);
    let locking = match t.take("locking").as_deref() {
        None | Some("on") | Some("auto") => true,
        Some("off") => false,
        Some(v) => {
            return Err(Failure::msg(format!(
                "{}: locking={v}: expected on, off or auto",
                t.what
            )))
        }
    };
    t.ignore(&[
        "aio",
        "discard",
        "cache.no-flush",
        "detect-zeroes",
        "auto-read-only",
    ]);
    Ok(FileSpec {
        filename,
        read_only,
        direct,
        locking,
    })
}

/// The protocol drivers vubd opens below its format nodes.
pub const PROTOCOL_DRIVERS: [&str; 3] = ["file", "rbd", "nbd"];

/// A protocol node's options (`driver` taken): a `file` node's by [`file_spec`]; an `rbd` or
/// `nbd` node's checked by [`RemoteSpec::from_options`], its file name the `json:` name that
/// reopens it.
pub(crate) fn protocol_spec(t: &mut Taker, driver: &str) -> Result<FileSpec, Failure> {
    if driver == "file" {
        return file_spec(t);
    }
    if !PROTOCOL_DRIVERS.contains(&driver) {
        return Err(Failure::msg(format!(
            "{}: driver={driver} is not a protocol vubd opens ({})",
            t.what,
            PROTOCOL_DRIVERS.join(", ")
        )));
    }
    let read_only = t.take_bool("read-only")?.unwrap_or(false);
    let direct = t.take_bool("cache.direct")?.unwrap_or(false);
    let spec = RemoteSpec::from_options(&t.what, driver, std::mem::take(&mut t.opts))
        .map_err(Failure::msg)?;
    Ok(FileSpec {
        filename: PathBuf::from(spec.json_name()),
        read_only,
        direct,
        locking: true,
    })
}

/// A format node's child `key` (`file`, `data-file`): an added `file` node by name, or inline
/// `key.driver=file,key.filename=...`; `None` if not given.
fn file_ref(t: &mut Taker, key: &str) -> Result<Option<FileRef>, Failure> {
    let inline = t.take_prefixed(key);
    match t.take(key) {
        Some(_) if !inline.is_empty() => Err(Failure::msg(format!(
            "{}: '{key}' is given both as a node name and inline",
            t.what
        ))),
        Some(name) => Ok(Some(FileRef::Node(name))),
        None if inline.is_empty() => Ok(None),
        None => {
            let mut child = Taker::new(format!("{} {key}", t.what), inline);
            let driver = child.take("driver").unwrap_or_default();
            let spec = protocol_spec(&mut child, &driver)?;
            child.finish()?;
            Ok(Some(FileRef::Inline(spec)))
        }
    }
}

impl NodeSpec {
    /// `blockdev-add` options: `driver`, `node-name`, and the driver's own.
    pub fn parse(opts: Opts) -> Result<NodeSpec, Failure> {
        let mut t = Taker::new("blockdev-add".into(), opts);
        let driver = required(&mut t, "driver")?;
        let name = required(&mut t, "node-name")?;
        t.what = format!("blockdev-add (node-name={name})");
        let kind = match driver.as_str() {
            "file" | "rbd" | "nbd" => NodeKind::File(protocol_spec(&mut t, &driver)?),
            "raw" | "qcow2" => {
                let format = if driver == "qcow2" {
                    Format::Qcow2
                } else {
                    Format::Raw
                };
                let file = file_ref(&mut t, "file")?.ok_or_else(|| {
                    Failure::msg(format!(
                        "{}: 'file' is required, as a node name or inline",
                        t.what
                    ))
                })?;
                let data_file = file_ref(&mut t, "data-file")?;
                if data_file.is_some() && format == Format::Raw {
                    return Err(Failure::msg(format!(
                        "{}: a raw node has no data-file",
                        t.what
                    )));
                }
                let backing = match t.take("backing").as_deref() {
                    None => BackingRef::FromImage,
                    Some("null") => BackingRef::None,
                    Some(_) if format == Format::Raw => {
                        return Err(Failure::msg(format!(
                            "{}: a raw node has no backing",
                            t.what
                        )))
                    }
                    Some(name) => BackingRef::Node(name.to_string()),
                };
                let read_only = t.take_bool("read-only")?.unwrap_or(false);
                t.ignore(&[
                    "discard",
                    "detect-zeroes",
                    "auto-read-only",
                    "cache.direct",
                    "cache.no-flush",
                ]);
                NodeKind::Format {
                    format,
                    file,
                    data_file,
                    backing,
                    read_only,
                }
            }
            other => {
                return Err(Failure::msg(format!(
                    "blockdev-add: driver '{other}' is not supported by vubd (file, rbd, nbd, \
                     raw, qcow2)"
                )))
            }
        };
        t.finish()?;
        Ok(NodeSpec { name, kind })
    }
}

impl BackupSpec {
    /// `blockdev-backup` options.
    pub fn parse(opts: Opts) -> Result<BackupSpec, Failure> {
        let mut t = Taker::new("blockdev-backup".into(), opts);
        let device = required(&mut t, "device")?;
        let target = required(&mut t, "target")?;
        let sync = required(&mut t, "sync")?;
        if sync != "none" {
            return Err(Failure::msg(format!(
                "blockdev-backup: sync={sync} is not supported: vubd runs pull-mode backups \
                 (sync=none into a fleecing node, read over NBD)"
            )));
        }
        let job_id = t.take("job-id").unwrap_or_else(|| device.clone());
        match t.take("on-cbw-error").as_deref() {
            None | Some("break-guest-write") => {}
            Some(v) => {
                return Err(Failure::msg(format!(
                    "blockdev-backup: on-cbw-error={v} is not supported (break-guest-write)"
                )))
            }
        }
        t.ignore(&[
            "speed",
            "auto-finalize",
            "auto-dismiss",
            "filter-node-name",
            "on-source-error",
            "on-target-error",
            "compress",
            "x-perf.use-copy-range",
            "x-perf.max-workers",
            "x-perf.max-chunk",
        ]);
        t.finish()?;
        Ok(BackupSpec {
            job_id,
            device,
            target,
        })
    }
}

/// A socket address under `prefix` (`addr`), flat (`addr.path`, the command line's and QEMU's
/// `SocketAddress`) or legacy (`addr.data.path`, QMP's `nbd-server-start`).
fn addr(t: &mut Taker, prefix: &str) -> Result<Addr, Failure> {
    let mut a = t.take_prefixed(prefix);
    let legacy: Opts = a
        .keys()
        .filter_map(|k| k.strip_prefix("data.").map(|s| (k.clone(), s.to_string())))
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|(k, s)| a.remove(&k).map(|v| (s, v)))
        .collect();
    a.extend(legacy);
    let mut a = Taker::new(format!("{} {prefix}", t.what), a);
    let kind = required(&mut a, "type")?;
    let addr = match kind.as_str() {
        "unix" => Addr::Unix(PathBuf::from(required(&mut a, "path")?)),
        "inet" => Addr::Inet {
            host: required(&mut a, "host")?,
            port: required(&mut a, "port")?,
        },
        other => {
            return Err(Failure::msg(format!(
                "{}: {prefix}.type={other} is not supported (unix, inet)",
                t.what
            )))
        }
    };
    a.ignore(&["abstract", "tight", "numeric", "ipv4", "ipv6", "keep-alive"]);
    a.finish()?;
    Ok(addr)
}

impl NbdServerSpec {
    /// `nbd-server-start` / `--nbd-server` options.
    pub fn parse(what: &str, opts: Opts) -> Result<NbdServerSpec, Failure> {
        let mut t = Taker::new(what.into(), opts);
        let addr = addr(&mut t, "addr")?;
        let tls_creds = t.take("tls-creds");
        let max_connections = match t.take("max-connections") {
            None => 0,
            Some(v) => v.parse().map_err(|_| {
                Failure::msg(format!("{what}: max-connections={v}: expected a number"))
            })?,
        };
        if t.take("tls-authz").is_some() {
            return Err(Failure::msg(format!(
                "{what}: tls-authz is not supported; use verify-peer on the tls-creds-x509 object"
            )));
        }
        t.ignore(&["handshake-max-seconds"]);
        t.finish()?;
        Ok(NbdServerSpec {
            addr,
            tls_creds,
            max_connections,
        })
    }
}

impl NbdExportSpec {
    /// `block-export-add` / `--export` options of `type=nbd`.
    pub fn parse(what: &str, opts: Opts) -> Result<NbdExportSpec, Failure> {
        let mut t = Taker::new(what.into(), opts);
        match t.take("type").as_deref() {
            Some("nbd") => {}
            _ => return Err(Failure::msg(format!("{what}: type must be nbd"))),
        }
        let id = required(&mut t, "id")?;
        let node = required(&mut t, "node-name")?;
        let name = t.take("name").unwrap_or_else(|| node.clone());
        let description = t.take("description");
        if t.take_bool("writable")?.unwrap_or(false) {
            return Err(Failure::msg(format!(
                "{what}: vubd's NBD exports are read-only (writable=off): they serve backups"
            )));
        }
        let mut bitmaps = Vec::new();
        for i in 0.. {
            let key = format!("bitmaps.{i}");
            if let Some(name) = t.take(&key) {
                bitmaps.push(BitmapRef { node: None, name });
                continue;
            }
            let item = t.take_prefixed(&key);
            if item.is_empty() {
                break;
            }
            let mut b = Taker::new(format!("{what} {key}"), item);
            let node = required(&mut b, "node")?;
            let name = required(&mut b, "name")?;
            b.finish()?;
            bitmaps.push(BitmapRef {
                node: Some(node),
                name,
            });
        }
        match t.take("allocation-depth").as_deref() {
            None | Some("off") => {}
            Some(_) => {
                return Err(Failure::msg(format!(
                    "{what}: allocation-depth is not supported (qemu:allocation-depth)"
                )))
            }
        }
        t.ignore(&["writethrough", "iothread", "fixed-iothread"]);
        t.finish()?;
        Ok(NbdExportSpec {
            id,
            node,
            name,
            description,
            bitmaps,
        })
    }
}

impl VhostExportSpec {
    /// `block-export-add` / `--export` options of `type=vhost-user-blk` (the type already
    /// taken). Without `id`, the id is the node name (vubd's `--disk`; QMP requires one).
    pub fn parse(what: &str, opts: Opts, require_id: bool) -> Result<VhostExportSpec, Failure> {
        let mut t = Taker::new(what.into(), opts);
        let node = required(&mut t, "node-name")?;
        let id = match t.take("id") {
            Some(id) => id,
            None if require_id => return Err(Failure::msg(format!("{what}: 'id' is required"))),
            None => node.clone(),
        };
        match t.take("addr.type").as_deref() {
            Some("unix") | None => {}
            Some(v) => {
                return Err(Failure::msg(format!(
                "{what}: addr.type={v}: vhost-user-blk listens on a UNIX socket (addr.type=unix)"
            )))
            }
        }
        let socket = PathBuf::from(required(&mut t, "addr.path")?);
        let writable = t.take_bool("writable")?.unwrap_or(false);
        let num_queues = match t.take("num-queues") {
            Some(v) => v
                .parse::<u16>()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| Failure::msg(format!("{what}: num-queues={v}: expected 1 to 64")))?,
            None => 1,
        };
        let logical_block_size = match t.take("logical-block-size").as_deref() {
            None | Some("512") => 512,
            Some("4096") => 4096,
            Some(v) => {
                return Err(Failure::msg(format!(
                    "{what}: logical-block-size={v}: expected 512 or 4096"
                )))
            }
        };
        let serial = t.take("serial");
        if let Some(s) = &serial {
            if s.len() > SERIAL_BYTES || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(Failure::msg(format!(
                    "{what}: serial must be at most {SERIAL_BYTES} printable ASCII characters"
                )));
            }
        }
        t.ignore(&["iothread", "fixed-iothread", "writethrough"]);
        t.finish()?;
        Ok(VhostExportSpec {
            id,
            node,
            socket,
            writable,
            num_queues,
            logical_block_size,
            serial,
        })
    }
}

impl TlsCredsSpec {
    /// `object-add` / `--object` options of `qom-type=tls-creds-x509` (the type already
    /// taken).
    pub fn parse(what: &str, opts: Opts) -> Result<TlsCredsSpec, Failure> {
        let mut t = Taker::new(what.into(), opts);
        let id = required(&mut t, "id")?;
        let dir = PathBuf::from(required(&mut t, "dir")?);
        let endpoint = match t.take("endpoint").as_deref() {
            None | Some("server") => TlsEndpoint::Server,
            Some("client") => TlsEndpoint::Client,
            Some(v) => {
                return Err(Failure::msg(format!(
                    "{what}: endpoint={v}: expected server (vubd's NBD server) or client (nbd \
                     nodes)"
                )))
            }
        };
        // QEMU's default: clients must present a certificate the CA signed.
        let verify_peer = t.take_bool("verify-peer")?.unwrap_or(true);
        if t.take("passwordid").is_some() || t.take("priority").is_some() {
            return Err(Failure::msg(format!(
                "{what}: passwordid and priority are not supported"
            )));
        }
        t.ignore(&["sanity-check"]);
        t.finish()?;
        Ok(TlsCredsSpec {
            id,
            dir,
            endpoint,
            verify_peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::keyval::{flatten_json, parse_options};

    fn json(v: serde_json::Value) -> Opts {
        let mut o = Opts::new();
        flatten_json("", &v, &mut o);
        o
    }

    #[test]
    fn a_fleecing_node_with_an_inline_file_and_the_disk_as_backing() {
        let spec = NodeSpec::parse(json(serde_json::json!({
            "driver": "qcow2", "node-name": "fleece",
            "file": {"driver": "file", "filename": "/tmp/f.qcow2"},
            "backing": "disk", "discard": "unmap"
        })))
        .unwrap();
        assert_eq!(spec.name, "fleece");
        assert_eq!(
            spec.kind,
            NodeKind::Format {
                format: Format::Qcow2,
                file: FileRef::Inline(FileSpec {
                    filename: "/tmp/f.qcow2".into(),
                    read_only: false,
                    direct: false,
                    locking: true
                }),
                data_file: None,
                backing: BackingRef::Node("disk".into()),
                read_only: false,
            }
        );
        assert!(NodeSpec::parse(json(serde_json::json!({
            "driver": "vmdk", "node-name": "x", "file": "f"
        })))
        .is_err());
    }

    #[test]
    fn nbd_server_addresses_flat_and_legacy() {
        let flat = NbdServerSpec::parse(
            "--nbd-server",
            parse_options("--nbd-server", "addr.type=unix,addr.path=/tmp/n.sock", None).unwrap(),
        )
        .unwrap();
        let legacy = NbdServerSpec::parse(
            "nbd-server-start",
            json(serde_json::json!({"addr": {"type": "unix", "data": {"path": "/tmp/n.sock"}}})),
        )
        .unwrap();
        assert_eq!(flat, legacy);
        assert_eq!(flat.addr, Addr::Unix("/tmp/n.sock".into()));
        let inet = NbdServerSpec::parse(
            "nbd-server-start",
            json(serde_json::json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}, "tls-creds": "tls0", "max-connections": 4})),
        )
        .unwrap();
        assert_eq!(inet.tls_creds.as_deref(), Some("tls0"));
        assert_eq!(inet.max_connections, 4);
    }

    #[test]
    fn nbd_exports_take_bitmaps_by_name_or_node_and_name() {
        let spec = NbdExportSpec::parse(
            "block-export-add",
            json(serde_json::json!({
                "type": "nbd", "id": "e0", "node-name": "fleece", "writable": false,
                "bitmaps": ["b0", {"node": "disk", "name": "b1"}]
            })),
        )
        .unwrap();
        assert_eq!(spec.name, "fleece");
        assert_eq!(
            spec.bitmaps,
            vec![
                BitmapRef {
                    node: None,
                    name: "b0".into()
                },
                BitmapRef {
                    node: Some("disk".into()),
                    name: "b1".into()
                }
            ]
        );
        assert!(NbdExportSpec::parse(
            "block-export-add",
            json(
                serde_json::json!({"type": "nbd", "id": "e0", "node-name": "n", "writable": true})
            ),
        )
        .is_err());
    }

    #[test]
    fn backups_are_sync_none() {
        let spec = BackupSpec::parse(json(serde_json::json!({
            "device": "disk", "target": "fleece", "sync": "none"
        })))
        .unwrap();
        assert_eq!(spec.job_id, "disk");
        assert!(BackupSpec::parse(json(serde_json::json!({
            "device": "disk", "target": "fleece", "sync": "full"
        })))
        .is_err());
    }
}
