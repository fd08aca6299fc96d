//! The qemu-storage-daemon command line for a vhost-user-blk export:
//!
//! ```text
//! --blockdev driver=file,node-name=disk,filename=disk.raw
//! --blockdev driver=file,node-name=meta,filename=meta.qcow2
//! --blockdev driver=qcow2,node-name=fmt,file=meta,data-file=disk
//! --object iothread,id=io0
//! --export type=vhost-user-blk,id=exp0,node-name=fmt,addr.type=unix,addr.path=vubd.sock,
//!          writable=on,num-queues=2,iothread=io0
//! ```
//!
//! The subset vubd implements: `file`, `rbd`, `nbd`, `raw` and `qcow2` nodes (children by node name or
//! inline as `file.driver=...`), `vhost-user-blk` exports on UNIX sockets (any number, each
//! its own disk), and iothread objects. Options are `key=value` lists (`,,` is a literal comma) or JSON objects. Any
//! option outside that subset is an error naming it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::keyval::{parse_options, Opts, Taker};
use super::spec::DiskSpec;
use super::Failure;
use crate::block::{BackingChoice, Format, Locking, NodeNames, OpenOptions};
use crate::graph::options::{VhostExportSpec, PROTOCOL_DRIVERS};

/// A block node definition.
#[derive(Clone, Debug)]
struct Node {
    driver: String,
    opts: Opts,
}

/// What a `file` node contributes.
#[derive(Clone, Debug)]
struct FileSpec {
    filename: PathBuf,
    direct: bool,
    read_only: bool,
    /// `locking=off`: take no image locks.
    no_locking: bool,
    node_name: Option<String>,
}

struct Graph {
    nodes: BTreeMap<String, Node>,
}

impl Graph {
    /// A child given by node name (`key=name`) or inline (`key.driver=...`).
    fn child(&self, parent: &mut Taker, key: &str) -> Result<Option<Node>, Failure> {
        let inline = parent.take_prefixed(key);
        match parent.take(key) {
            Some(_) if !inline.is_empty() => Err(Failure::msg(format!(
                "{}: '{key}' is given both as a node name and inline",
                parent.what
            ))),
            Some(name) if name == "null" => Ok(None),
            Some(name) => self.nodes.get(&name).cloned().map(Some).ok_or_else(|| {
                Failure::msg(format!("{}: no block node named '{name}'", parent.what))
            }),
            None if inline.is_empty() => Ok(None),
            None => {
                let driver = inline.get("driver").cloned().ok_or_else(|| {
                    Failure::msg(format!(
                        "{}: inline '{key}' needs {key}.driver",
                        parent.what
                    ))
                })?;
                Ok(Some(Node {
                    driver,
                    opts: inline,
                }))
            }
        }
    }

    fn file(&self, node: &Node) -> Result<FileSpec, Failure> {
        let what = format!("--blockdev driver={} ({})", node.driver, node_label(node));
        let mut t = Taker::new(what, node.opts.clone());
        t.take("driver");
        t.take("node-name");
        let file = crate::graph::options::protocol_spec(&mut t, &node.driver)?;
        t.finish()?;
        Ok(FileSpec {
            filename: file.filename,
            direct: file.direct,
            read_only: file.read_only,
            no_locking: !file.locking,
            node_name: node.opts.get("node-name").cloned(),
        })
    }

    /// The file under a format node, which must be a protocol node (`file`, `rbd`, `nbd`).
    fn format_child_file(
        &self,
        parent: &mut Taker,
        key: &str,
    ) -> Result<Option<FileSpec>, Failure> {
        match self.child(parent, key)? {
            None => Ok(None),
            Some(n) if PROTOCOL_DRIVERS.contains(&n.driver.as_str()) => self.file(&n).map(Some),
            Some(n) => Err(Failure::msg(format!(
                "{}: '{key}' must be a protocol node, driver=file, rbd or nbd (got driver={})",
                parent.what, n.driver
            ))),
        }
    }
}

fn node_label(node: &Node) -> String {
    node.opts
        .get("node-name")
        .map(|n| format!("node-name={n}"))
        .unwrap_or_else(|| "inline".into())
}

/// The disks of a qemu-storage-daemon command line: one per vhost-user-blk `--export`.
pub fn parse(
    blockdevs: &[String],
    exports: &[String],
    objects: &[String],
) -> Result<Vec<DiskSpec>, Failure> {
    for object in objects {
        let opts = parse_options("--object", object, Some("qom-type"))?;
        match opts.get("qom-type").map(String::as_str) {
            Some("iothread") => {}
            Some(other) => {
                return Err(Failure::msg(format!(
                    "--object {other}: only iothread objects are supported"
                )))
            }
            None => {
                return Err(Failure::msg(
                    "--object: missing the object type (e.g. iothread,id=io0)",
                ))
            }
        }
    }
    let mut graph = Graph {
        nodes: BTreeMap::new(),
    };
    for b in blockdevs {
        let opts = parse_options("--blockdev", b, None)?;
        let driver = opts
            .get("driver")
            .cloned()
            .ok_or_else(|| Failure::msg(format!("--blockdev {b}: driver is required")))?;
        let name = opts
            .get("node-name")
            .cloned()
            .ok_or_else(|| Failure::msg(format!("--blockdev {b}: node-name is required")))?;
        if !matches!(driver.as_str(), "file" | "rbd" | "nbd" | "raw" | "qcow2") {
            return Err(Failure::msg(format!(
                "--blockdev driver={driver}: vubd supports the file, rbd, nbd, raw and qcow2 \
                 drivers"
            )));
        }
        if graph
            .nodes
            .insert(name.clone(), Node { driver, opts })
            .is_some()
        {
            return Err(Failure::msg(format!(
                "--blockdev: node-name '{name}' is used twice"
            )));
        }
    }
    exports
        .iter()
        .map(|export| disk_spec(&graph, export))
        .collect()
}

/// One `--export type=vhost-user-blk` and the graph below its node.
fn disk_spec(graph: &Graph, export: &str) -> Result<DiskSpec, Failure> {
    let mut opts = parse_options("--export", export, None)?;
    match opts.remove("type").as_deref() {
        Some("vhost-user-blk") => {}
        Some(t) => {
            return Err(Failure::msg(format!(
                "--export type={t}: vubd exports vhost-user-blk and nbd"
            )))
        }
        None => return Err(Failure::msg("--export: type=vhost-user-blk is required")),
    }
    let export = VhostExportSpec::parse("--export", opts, false)?;
    let node_name = export.node.clone();
    let node = graph
        .nodes
        .get(&node_name)
        .cloned()
        .ok_or_else(|| Failure::msg(format!("--export: no block node named '{node_name}'")))?;
    let what = format!("--blockdev driver={} (node-name={node_name})", node.driver);
    let mut open = OpenOptions {
        read_only: !export.writable,
        ..OpenOptions::default()
    };
    let mut node_names = NodeNames::derived(&node_name);
    let (image, format) = match node.driver.as_str() {
        "file" | "rbd" | "nbd" => {
            let f = graph.file(&node)?;
            open.direct = f.direct;
            open.read_only |= f.read_only;
            if f.no_locking {
                open.locking = Locking::Off;
            }
            (f.filename, Format::Raw)
        }
        "raw" | "qcow2" => {
            let mut t = Taker::new(what.clone(), node.opts.clone());
            t.take("driver");
            t.take("node-name");
            open.read_only |= t.take_bool("read-only")?.unwrap_or(false);
            let file = graph
                .format_child_file(&mut t, "file")?
                .ok_or_else(|| Failure::msg(format!("{what}: file is required")))?;
            open.direct = file.direct;
            open.read_only |= file.read_only;
            if file.no_locking {
                // One setting for the whole graph: off if any of its files asks for it.
                open.locking = Locking::Off;
            }
            if let Some(name) = &file.node_name {
                node_names.file = name.clone();
            }
            let format = if node.driver == "qcow2" {
                if let Some(data) = graph.format_child_file(&mut t, "data-file")? {
                    if let Some(name) = &data.node_name {
                        node_names.data_file = Some(name.clone());
                    }
                    if data.no_locking {
                        open.locking = Locking::Off;
                    }
                    open.data_file = Some(data.filename);
                }
                let has_backing_key = t.opts.contains_key("backing")
                    || t.opts.keys().any(|k| k.starts_with("backing."));
                open.backing = match graph.child(&mut t, "backing")? {
                    None if has_backing_key => BackingChoice::Disabled,
                    None => BackingChoice::FromImage,
                    Some(b) => backing_choice(graph, &b)?,
                };
                if let Some(v) = t.take("l2-cache-size").or_else(|| t.take("cache-size")) {
                    open.l2_cache_bytes = Some(
                        super::parse_size(&v).map_err(|e| Failure::msg(format!("{what}: {e}")))?,
                    );
                }
                Format::Qcow2
            } else {
                Format::Raw
            };
            t.ignore(&[
                "discard",
                "detect-zeroes",
                "auto-read-only",
                "cache.direct",
                "cache.no-flush",
                "lazy-refcounts",
            ]);
            t.finish()?;
            (file.filename, format)
        }
        other => {
            return Err(Failure::msg(format!(
                "--export: cannot export a driver={other} node"
            )))
        }
    };
    Ok(DiskSpec {
        image,
        format,
        open,
        node_names,
        export,
        socket_option: "--export addr.path",
    })
}

/// The control socket from `--chardev socket,id=ID,path=PATH,server=on,wait=off` and
/// `--monitor chardev=ID` (QMP mode).
pub fn monitor_socket(
    chardevs: &[String],
    monitors: &[String],
) -> Result<Option<PathBuf>, Failure> {
    let mut sockets = BTreeMap::new();
    for c in chardevs {
        let mut t = Taker::new(
            "--chardev".into(),
            parse_options("--chardev", c, Some("backend"))?,
        );
        match t.take("backend").as_deref() {
            Some("socket") => {}
            other => {
                return Err(Failure::msg(format!(
                    "--chardev {}: only socket chardevs (for --monitor) are supported",
                    other.unwrap_or("?")
                )))
            }
        }
        let id = t
            .take("id")
            .ok_or_else(|| Failure::msg("--chardev: id is required"))?;
        let path = t
            .take("path")
            .ok_or_else(|| Failure::msg("--chardev: path= (a UNIX socket) is required"))?;
        if t.take_bool("server")? == Some(false) {
            return Err(Failure::msg(
                "--chardev: vubd's monitor listens (server=on)",
            ));
        }
        t.ignore(&["wait"]);
        t.finish()?;
        sockets.insert(id, PathBuf::from(path));
    }
    let mut found = None;
    for m in monitors {
        let mut t = Taker::new(
            "--monitor".into(),
            parse_options("--monitor", m, Some("chardev"))?,
        );
        let id = t
            .take("chardev")
            .ok_or_else(|| Failure::msg("--monitor: chardev= is required"))?;
        match t.take("mode").as_deref() {
            None | Some("control") => {}
            Some(other) => {
                return Err(Failure::msg(format!(
                    "--monitor mode={other}: only QMP (control) is supported"
                )))
            }
        }
        t.ignore(&["pretty"]);
        t.finish()?;
        let path = sockets
            .get(&id)
            .cloned()
            .ok_or_else(|| Failure::msg(format!("--monitor: no --chardev with id={id}")))?;
        if found.replace(path).is_some() {
            return Err(Failure::msg(
                "vubd has one control socket; give one --monitor",
            ));
        }
    }
    Ok(found)
}

/// A backing node: a format node over a file (or a plain file, served as raw).
fn backing_choice(graph: &Graph, node: &Node) -> Result<BackingChoice, Failure> {
    match node.driver.as_str() {
        "file" => Ok(BackingChoice::Use(graph.file(node)?.filename, Format::Raw)),
        "raw" | "qcow2" => {
            let mut t = Taker::new(format!("backing ({})", node_label(node)), node.opts.clone());
            t.take("driver");
            t.take("node-name");
            t.take("read-only");
            let file = graph
                .format_child_file(&mut t, "file")?
                .ok_or_else(|| Failure::msg("backing node: file is required"))?;
            let format = if node.driver == "qcow2" {
                Format::Qcow2
            } else {
                Format::Raw
            };
            t.ignore(&["discard", "detect-zeroes", "auto-read-only", "backing"]);
            t.finish()?;
            Ok(BackingChoice::Use(file.filename, format))
        }
        other => Err(Failure::msg(format!(
            "backing: driver={other} is not supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::remote::location::RemoteSpec;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn qcow2_over_a_raw_data_file() {
        let spec = parse(
            &strings(&[
                "driver=file,node-name=disk,filename=/srv/disk.raw,cache.direct=on",
                "driver=file,node-name=meta,filename=/srv/meta.qcow2",
                "driver=qcow2,node-name=fmt,file=meta,data-file=disk",
            ]),
            &strings(&["type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path=/run/v.sock,writable=on,num-queues=2,iothread=io0"]),
            &strings(&["iothread,id=io0"]),
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        let [spec] = &spec[..] else {
            panic!("one export, one disk")
        };
        assert_eq!(spec.image, PathBuf::from("/srv/meta.qcow2"));
        assert_eq!(spec.format, Format::Qcow2);
        assert_eq!(spec.open.data_file, Some(PathBuf::from("/srv/disk.raw")));
        assert!(!spec.open.read_only);
        assert_eq!(spec.export.num_queues, 2);
        assert_eq!(spec.export.id, "e");
        assert_eq!(spec.export.socket, PathBuf::from("/run/v.sock"));
    }

    #[test]
    fn remote_protocol_nodes_become_json_names() {
        let spec = parse(
            &strings(&[
                "driver=rbd,node-name=meta,pool=vms,image=vm1-meta,conf=/etc/ceph/ceph.conf,user=vubd",
                "driver=nbd,node-name=data,server.type=unix,server.path=/run/d.sock,export=vm1,reconnect-delay=5",
                "driver=qcow2,node-name=fmt,file=meta,data-file=data",
            ]),
            &strings(&["type=vhost-user-blk,node-name=fmt,addr.path=s,writable=on"]),
            &[],
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        let spec = &spec[0];
        let name = |p: &PathBuf| {
            let text = p.to_str().unwrap();
            RemoteSpec::parse(text).unwrap().unwrap()
        };
        let RemoteSpec::Rbd(meta) = name(&spec.image) else {
            panic!("the image is the rbd node")
        };
        assert_eq!(
            (meta.pool.as_str(), meta.image.as_str()),
            ("vms", "vm1-meta")
        );
        assert_eq!(meta.user.as_deref(), Some("vubd"));
        let RemoteSpec::Nbd(data) = name(spec.open.data_file.as_ref().unwrap()) else {
            panic!("the data file is the nbd node")
        };
        assert_eq!(data.export, "vm1");
        assert_eq!(data.reconnect_delay, std::time::Duration::from_secs(5));
    }

    #[test]
    fn inline_children_json_and_null_backing() {
        let spec = parse(
            &strings(&[r#"{"driver": "qcow2", "node-name": "fmt", "backing": null, "file": {"driver": "file", "filename": "a,b.qcow2"}}"#]),
            &strings(&["type=vhost-user-blk,node-name=fmt,addr.path=s"]),
            &[],
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        let spec = &spec[0];
        assert_eq!(spec.image, PathBuf::from("a,b.qcow2"));
        assert!(matches!(spec.open.backing, BackingChoice::Disabled));
        assert!(
            spec.open.read_only,
            "qemu-storage-daemon exports are read-only by default"
        );

        let spec = parse(
            &strings(&["driver=raw,node-name=r,file.driver=file,file.filename=x,,y.img"]),
            &strings(&["type=vhost-user-blk,node-name=r,addr.path=s,writable=on"]),
            &[],
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        let spec = &spec[0];
        assert_eq!(spec.image, PathBuf::from("x,y.img"));
        assert_eq!(spec.format, Format::Raw);
    }

    #[test]
    fn unsupported_options_are_named() {
        let err = |b: &[&str], e: &[&str], o: &[&str]| {
            parse(&strings(b), &strings(e), &strings(o))
                .err()
                .map(|f| f.message)
                .unwrap_or_default()
        };
        let file = ["driver=file,node-name=f,filename=x"];
        let export = ["type=vhost-user-blk,node-name=f,addr.path=s"];
        assert!(err(&["driver=vvfat,node-name=n"], &export, &[]).contains("driver=vvfat"));
        assert!(err(
            &["driver=rbd,node-name=f,pool=p,image=i,key-secret=s"],
            &export,
            &[]
        )
        .contains("keyring"));
        assert!(err(
            &["driver=file,node-name=f,filename=x,bogus=1"],
            &export,
            &[]
        )
        .contains("'bogus'"));
        assert!(err(&file, &["type=nbd,node-name=f"], &[]).contains("type=nbd"));
        assert!(err(&file, &["type=vhost-user-blk,node-name=g,addr.path=s"], &[]).contains("'g'"));
        assert!(err(&file, &export, &["memory-backend-ram,id=m"]).contains("iothread"));
        assert!(err(
            &["driver=file,node-name=f,filename=x"],
            &["type=vhost-user-blk,node-name=f"],
            &[]
        )
        .contains("addr.path"));
    }

    #[test]
    fn each_export_is_a_disk_and_none_is_fine() {
        let blockdevs = strings(&[
            "driver=file,node-name=a,filename=a.raw",
            "driver=file,node-name=b,filename=b.raw",
        ]);
        let disks = parse(
            &blockdevs,
            &strings(&[
                "type=vhost-user-blk,id=ea,node-name=a,addr.path=a.sock,writable=on",
                "type=vhost-user-blk,id=eb,node-name=b,addr.path=b.sock,num-queues=4",
            ]),
            &[],
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].image, PathBuf::from("a.raw"));
        assert_eq!(disks[1].image, PathBuf::from("b.raw"));
        assert_eq!(
            (disks[0].export.id.as_str(), disks[1].export.id.as_str()),
            ("ea", "eb")
        );
        assert!(!disks[0].open.read_only && disks[1].open.read_only);
        assert_eq!(disks[1].export.num_queues, 4);
        // Nodes with no export yet: qemu-storage-daemon starts so, with a monitor.
        assert!(parse(&blockdevs, &[], &[]).is_ok_and(|d| d.is_empty()));
    }
}
