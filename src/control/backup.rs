//! QMP commands of the runtime graph — nodes, backup jobs, NBD server and exports, TLS
//! objects — the commands of QEMU's pull-mode backup flow, with QEMU's argument shapes
//! (parsed by `graph::options`, shared with the command line).

use serde_json::{json, Value};

use super::qmp::{Args, QmpError, Session};
use crate::graph::options::{
    BackupSpec, NbdExportSpec, NbdServerSpec, NodeSpec, TlsCredsSpec, VhostExportSpec,
};

/// A QMP event object, stamped now.
fn event(name: &str, data: Value) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({"event": name, "data": data,
           "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}})
}

impl Session {
    /// Run a graph command; `None` if `command` is not one.
    pub(super) fn graph_command(
        &mut self,
        command: &str,
        mut args: Args,
    ) -> Result<Option<Value>, QmpError> {
        let graph = self.graph.clone();
        match command {
            "blockdev-add" => graph.add_node(NodeSpec::parse(args.into_opts())?)?,
            "blockdev-del" => {
                let name = args.string("node-name")?;
                args.finish()?;
                graph.delete_node(&name)?
            }
            "blockdev-backup" => {
                graph.transaction(&[], vec![BackupSpec::parse(args.into_opts())?])?
            }
            "block-job-cancel" => {
                let id = args.string("device")?;
                args.opt_bool("force")?;
                args.finish()?;
                let job = graph.jobs().into_iter().find(|j| j.id == id);
                graph.cancel_job(&id)?;
                if let Some(j) = job {
                    self.events.push(event(
                        "BLOCK_JOB_CANCELLED",
                        json!({"type": "backup", "device": j.id, "len": j.len,
                               "offset": j.offset, "speed": 0}),
                    ));
                }
            }
            "query-block-jobs" => {
                args.finish()?;
                return Ok(Some(Value::Array(
                    graph
                        .jobs()
                        .into_iter()
                        .map(|j| {
                            json!({
                                "type": "backup", "device": j.id, "len": j.len,
                                "offset": j.offset, "busy": false, "paused": false,
                                "speed": 0, "io-status": "ok", "ready": false,
                                "status": "running", "auto-finalize": true,
                                "auto-dismiss": true,
                            })
                        })
                        .collect(),
                )));
            }
            "nbd-server-start" => graph
                .start_nbd_server(NbdServerSpec::parse("nbd-server-start", args.into_opts())?)?,
            "block_resize" => {
                // vubd's disks have no separate device name: either names the node.
                let node = match args.take("node-name").or_else(|| args.take("device")) {
                    Some(Value::String(n)) => n,
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'node-name', expected: string",
                        ))
                    }
                    None => {
                        return Err(QmpError::generic(
                            "Need exactly one of 'device' and 'node-name'",
                        ))
                    }
                };
                let size = match args.take("size") {
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .ok_or_else(|| QmpError::generic("Parameter 'size' expects a >0 size"))?,
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'size', expected: integer",
                        ))
                    }
                    None => return Err(QmpError::generic("Parameter 'size' is missing")),
                };
                args.finish()?;
                graph.resize_disk(&node, size)?
            }
            "nbd-server-stop" => {
                args.finish()?;
                graph.stop_nbd_server()?
            }
            "block-export-add" => {
                let mut opts = args.into_opts();
                opts.remove("iothread");
                match opts.remove("type").as_deref() {
                    Some("nbd") => {
                        opts.insert("type".into(), "nbd".into());
                        graph.add_nbd_export(NbdExportSpec::parse("block-export-add", opts)?)?
                    }
                    Some("vhost-user-blk") => graph.add_vhost_export(&VhostExportSpec::parse(
                        "block-export-add",
                        opts,
                        true,
                    )?)?,
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                        "block-export-add: type '{other}' is not supported (nbd, vhost-user-blk)"
                    )))
                    }
                    None => return Err(QmpError::generic("Parameter 'type' is missing")),
                }
            }
            "block-export-del" => {
                let id = args.string("id")?;
                let hard = match args.take("mode") {
                    None => false,
                    Some(Value::String(m)) if m == "safe" => false,
                    Some(Value::String(m)) if m == "hard" => true,
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Parameter 'mode' does not accept this value (safe, hard)",
                        ))
                    }
                };
                args.finish()?;
                if !graph.delete_vhost_export(&id, hard)? {
                    graph.delete_nbd_export(&id, hard)?;
                }
                self.events
                    .push(event("BLOCK_EXPORT_DELETED", json!({"id": id})));
            }
            "query-block-exports" => {
                args.finish()?;
                let vhost = graph.vhost_exports().into_iter().map(|e| {
                    json!({"type": "vhost-user-blk", "id": e.id, "node-name": e.node,
                           "shutting-down": false})
                });
                let nbd = graph.nbd_exports().into_iter().map(|e| {
                    json!({"type": "nbd", "id": e.id, "node-name": e.node,
                           "shutting-down": false})
                });
                return Ok(Some(Value::Array(vhost.chain(nbd).collect())));
            }
            "object-add" => {
                let mut opts = args.into_opts();
                match opts.remove("qom-type").as_deref() {
                    Some("tls-creds-x509") => {}
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "object-add: qom-type '{other}' is not supported (tls-creds-x509)"
                        )))
                    }
                    None => return Err(QmpError::generic("Parameter 'qom-type' is missing")),
                }
                graph.add_tls_creds(TlsCredsSpec::parse("object-add", opts)?)?
            }
            "object-del" => {
                let id = args.string("id")?;
                args.finish()?;
                graph.delete_object(&id)?
            }
            _ => return Ok(None),
        }
        Ok(Some(json!({})))
    }

    /// `query-named-block-nodes` entries of the nodes added at runtime.
    pub(super) fn added_node_infos(&self) -> Vec<Value> {
        self.graph
            .added_nodes()
            .into_iter()
            .map(|n| {
                let path = n.filename.display().to_string();
                let mut info = json!({
                    "node-name": n.name, "drv": n.driver, "file": path, "ro": n.read_only,
                    "encrypted": false, "detect_zeroes": "off",
                    "backing_file_depth": u32::from(n.backing.is_some()),
                    "write_threshold": 0,
                    "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                    "cache": {"writeback": true, "direct": false, "no-flush": false},
                    "image": {"filename": path, "format": n.driver, "virtual-size": n.size,
                              "dirty-flag": false},
                });
                if let Some(b) = n.backing {
                    info["backing_file"] = json!(b);
                }
                info
            })
            .collect()
    }
}
