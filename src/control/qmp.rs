//! QMP commands, with the request and reply shapes of QEMU's QAPI schema.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::bitmap::{Action, BitmapError};
use crate::export::Export;
use crate::graph::options::BackupSpec;
use crate::graph::{Graph, GraphError};

/// Commands this server implements.
const COMMANDS: [&str; 26] = [
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-named-block-nodes",
    "query-block",
    "query-blockstats",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "transaction",
    "blockdev-add",
    "blockdev-del",
    "blockdev-backup",
    "query-block-jobs",
    "block-job-cancel",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "block_resize",
    "object-add",
    "object-del",
];

/// A transaction's bitmap actions, each with its disk's node name, and its backups.
type TransactionActions = (Vec<(String, Action)>, Vec<BackupSpec>);

/// An error reply's class and description.
pub(super) struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub(super) fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<BitmapError> for QmpError {
    fn from(e: BitmapError) -> Self {
        QmpError::generic(e.to_string())
    }
}

impl From<GraphError> for QmpError {
    fn from(e: GraphError) -> Self {
        QmpError {
            class: e.class(),
            desc: e.to_string(),
        }
    }
}

impl From<crate::cli::Failure> for QmpError {
    fn from(f: crate::cli::Failure) -> Self {
        QmpError::generic(f.message)
    }
}

/// An error reply.
pub fn error(class: &str, desc: &str, id: Option<&Value>) -> Value {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// One client's session.
pub struct Session {
    pub(super) graph: Arc<Graph>,
    negotiated: bool,
    /// Events the last command caused, sent after its reply.
    pub(super) events: Vec<Value>,
}

/// Command arguments, checked as they are taken; leftovers are errors.
pub(super) struct Args {
    map: Map<String, Value>,
}

impl Args {
    pub(super) fn new(value: Option<&Value>) -> Result<Args, QmpError> {
        match value {
            None => Ok(Args { map: Map::new() }),
            Some(Value::Object(map)) => Ok(Args { map: map.clone() }),
            Some(_) => Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            )),
        }
    }

    pub(super) fn string(&mut self, key: &str) -> Result<String, QmpError> {
        match self.map.remove(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: string"
            ))),
            None => Err(QmpError::generic(format!("Parameter '{key}' is missing"))),
        }
    }

    pub(super) fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.remove(key) {
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            ))),
            None => Ok(None),
        }
    }

    fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map.remove(key) {
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| QmpError::generic(format!("Parameter '{key}' expects uint64"))),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: integer"
            ))),
            None => Ok(None),
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// The remaining arguments as QEMU's dotted option keys (see `graph::options`).
    pub(super) fn into_opts(self) -> crate::cli::keyval::Opts {
        let mut opts = crate::cli::keyval::Opts::new();
        crate::cli::keyval::flatten_json("", &Value::Object(self.map), &mut opts);
        opts
    }

    pub(super) fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

impl Session {
    pub fn new(graph: Arc<Graph>) -> Self {
        Session {
            graph,
            negotiated: false,
            events: Vec::new(),
        }
    }

    /// The events the last command caused (QEMU's `BLOCK_JOB_CANCELLED` after
    /// `block-job-cancel`, `BLOCK_EXPORT_DELETED` after `block-export-del`), to send after its
    /// reply. They go to the client that caused them.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Whether `qmp_capabilities` has succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    fn version() -> Value {
        let v: Vec<u64> = env!("CARGO_PKG_VERSION")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        json!({
            "qemu": {"major": v.first().copied().unwrap_or(0), "minor": v.get(1).copied().unwrap_or(0), "micro": v.get(2).copied().unwrap_or(0)},
            "package": format!("vubd {}", env!("CARGO_PKG_VERSION")),
        })
    }

    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": Self::version(), "capabilities": []}})
    }

    /// Answer one request.
    pub fn handle(&mut self, request: &Value) -> Value {
        let Some(obj) = request.as_object() else {
            return error("GenericError", "QMP input must be a JSON object", None);
        };
        let id = obj.get("id");
        let reply = self.dispatch(obj);
        match reply {
            Ok(ret) => {
                let mut v = json!({"return": ret});
                if let Some(id) = id {
                    v["id"] = id.clone();
                }
                v
            }
            Err(e) => error(e.class, &e.desc, id),
        }
    }

    fn dispatch(&mut self, obj: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        let command = match obj.get("execute") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let mut args = Args::new(obj.get("arguments"))?;
        if !self.negotiated && command != "qmp_capabilities" {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        let result = match command {
            "qmp_capabilities" => {
                if self.negotiated {
                    return Err(QmpError {
                        class: "CommandNotFound",
                        desc: "Capabilities negotiation is already complete, command ignored"
                            .into(),
                    });
                }
                args.take("enable");
                self.negotiated = true;
                json!({})
            }
            "query-version" => Self::version(),
            "query-commands" => Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect()),
            "query-named-block-nodes" => {
                args.opt_bool("flat")?;
                let mut nodes = self.named_block_nodes();
                nodes.extend(self.added_node_infos());
                Value::Array(nodes)
            }
            "query-blockstats" => {
                args.opt_bool("query-nodes")?;
                super::blockstats::query(&self.graph.exports())
            }
            "query-block" => Value::Array(
                self.graph
                    .exports()
                    .iter()
                    .map(|export| {
                        json!({
                            "device": "",
                                    "locked": false,
                            "removable": false,
                            "type": "unknown",
                            "inserted": self.format_node_info(export),
                        })
                    })
                    .collect(),
            ),
            "transaction" => {
                let (actions, backups) = self.transaction_actions(&mut args)?;
                args.take("properties");
                args.finish()?;
                self.graph.transaction(&actions, backups)?;
                return Ok(json!({}));
            }
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-merge" => {
                let (export, action) = self.bitmap_action(command, &mut args)?;
                args.finish()?;
                export.bitmaps().apply(action)?;
                return Ok(json!({}));
            }
            other => {
                return match self.graph_command(other, args)? {
                    Some(v) => Ok(v),
                    None => Err(QmpError {
                        class: "CommandNotFound",
                        desc: format!("The command {other} has not been found"),
                    }),
                }
            }
        };
        args.finish()?;
        Ok(result)
    }

    /// Parse a bitmap command's arguments into an action on the disk it names.
    fn bitmap_action(
        &self,
        command: &str,
        args: &mut Args,
    ) -> Result<(Arc<Export>, Action), QmpError> {
        let node = args.string("node")?;
        let export = self.graph.disk(&node)?;
        if command == "block-dirty-bitmap-merge" {
            let target = args.string("target")?;
            let sources = match args.take("bitmaps") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| self.merge_source(&node, item))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'bitmaps', expected: array",
                    ))
                }
                None => return Err(QmpError::generic("Parameter 'bitmaps' is missing")),
            };
            return Ok((export, Action::Merge { target, sources }));
        }
        let name = args.string("name")?;
        let action = match command {
            "block-dirty-bitmap-add" => Action::Add {
                name,
                granularity: args.opt_u64("granularity")?,
                persistent: args.opt_bool("persistent")?.unwrap_or(false),
                disabled: args.opt_bool("disabled")?.unwrap_or(false),
            },
            "block-dirty-bitmap-remove" => Action::Remove { name },
            "block-dirty-bitmap-clear" => Action::Clear { name },
            "block-dirty-bitmap-enable" => Action::Enable { name },
            _ => Action::Disable { name },
        };
        Ok((export, action))
    }

    /// A merge source: a bitmap name on the target's node, or `{"node": ..., "name": ...}`.
    fn merge_source(&self, target_node: &str, item: &Value) -> Result<String, QmpError> {
        match item {
            Value::String(name) => Ok(name.clone()),
            Value::Object(_) => {
                let mut a = Args::new(Some(item))?;
                let node = a.string("node")?;
                self.graph.disk(&node)?;
                if node != target_node {
                    return Err(QmpError::generic(format!(
                        "vubd merges bitmaps of one node: '{node}' is not the target's node \
                         '{target_node}'"
                    )));
                }
                let name = a.string("name")?;
                a.finish()?;
                Ok(name)
            }
            _ => Err(QmpError::generic(
                "Invalid parameter type for 'bitmaps' element",
            )),
        }
    }

    /// A transaction's actions: bitmap actions, and backups to start at the same point.
    fn transaction_actions(&self, args: &mut Args) -> Result<TransactionActions, QmpError> {
        let items = match args.take("actions") {
            Some(Value::Array(items)) => items,
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'actions', expected: array",
                ))
            }
            None => return Err(QmpError::generic("Parameter 'actions' is missing")),
        };
        let (mut actions, mut backups) = (Vec::new(), Vec::new());
        for item in &items {
            let mut a = Args::new(Some(item))?;
            let kind = a.string("type")?;
            let data = a.take("data");
            a.finish()?;
            if kind == "blockdev-backup" {
                backups.push(BackupSpec::parse(Args::new(data.as_ref())?.into_opts())?);
                continue;
            }
            if !kind.starts_with("block-dirty-bitmap-") || !COMMANDS.contains(&kind.as_str()) {
                return Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{kind}'"
                )));
            }
            let mut data = Args::new(data.as_ref())?;
            let (export, action) = self.bitmap_action(&kind, &mut data)?;
            actions.push((export.node_names().format.clone(), action));
            data.finish()?;
        }
        Ok((actions, backups))
    }

    fn bitmap_infos(export: &Export) -> Value {
        Value::Array(
            export
                .bitmaps()
                .infos()
                .into_iter()
                .map(|b| {
                    json!({
                        "name": b.name,
                        "count": b.count,
                        "granularity": b.granularity,
                        "recording": b.recording,
                        "busy": b.busy,
                        "persistent": b.persistent,
                        "inconsistent": b.inconsistent,
                    })
                })
                .collect(),
        )
    }

    pub(super) fn node_info(
        export: &Export,
        name: &str,
        drv: &str,
        path: &str,
        size: u64,
        direct: bool,
    ) -> Value {
        json!({
            "node-name": name,
            "drv": drv,
            "file": path,
            "ro": export.read_only(),
            "encrypted": false,
            "detect_zeroes": "off",
            "backing_file_depth": 0,
            "write_threshold": 0,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "cache": {"writeback": true, "direct": direct, "no-flush": false},
            "image": {"filename": path, "format": drv, "virtual-size": size, "dirty-flag": false},
        })
    }

    fn format_node_info(&self, export: &Export) -> Value {
        let driver = export.disk();
        let files = driver.files();
        let path = files
            .first()
            .map(|f| f.path().display().to_string())
            .unwrap_or_default();
        let direct = files.last().is_some_and(|f| f.is_direct());
        let mut info = Self::node_info(
            export,
            &export.node_names().format,
            driver.format(),
            &path,
            driver.size(),
            direct,
        );
        info["dirty-bitmaps"] = Self::bitmap_infos(export);
        info
    }

    /// Every disk's nodes: format, `file`, `data-file`.
    fn named_block_nodes(&self) -> Vec<Value> {
        let mut nodes = Vec::new();
        for export in self.graph.exports() {
            let names = export.node_names();
            let driver = export.disk();
            let files = driver.files();
            nodes.push(self.format_node_info(&export));
            if let Some(file) = files.first() {
                nodes.push(Self::node_info(
                    &export,
                    &names.file,
                    "file",
                    &file.path().display().to_string(),
                    file.size(),
                    file.is_direct(),
                ));
            }
            if let (Some(data), Some(name)) = (driver.data_file(), &names.data_file) {
                nodes.push(Self::node_info(
                    &export,
                    name,
                    "file",
                    &data.path().display().to_string(),
                    data.size(),
                    data.is_direct(),
                ));
            }
        }
        nodes
    }
}
