//! A minimal QMP client, for vubd's control socket and qemu-storage-daemon's monitor alike.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    pub greeting: Value,
    /// Events received so far, in order (they arrive between replies).
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect (retrying while the server starts) and read the greeting, without negotiating.
    pub fn connect_raw(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut qmp = Qmp {
            writer: stream,
            reader,
            greeting: Value::Null,
            events: Vec::new(),
        };
        qmp.greeting = qmp.read();
        qmp
    }

    /// Connect and negotiate capabilities within `timeout`, for a server that may be stuck
    /// before its main loop runs: QEMU answers the greeting from its monitor thread but the
    /// negotiation only from the main loop, which waits for device setup (a vhost-user backend
    /// that does not answer, say). `Err` says which step got no answer.
    pub fn connect_within(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("connect {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream.set_read_timeout(Some(left)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut qmp = Qmp {
            writer: stream,
            reader,
            greeting: Value::Null,
            events: Vec::new(),
        };
        qmp.greeting = qmp
            .try_read()
            .ok_or_else(|| format!("no QMP greeting on {} within {timeout:?}", path.display()))?;
        match qmp.try_execute("qmp_capabilities", json!({})) {
            Some(r) if r == json!({"return": {}}) => {}
            Some(r) => return Err(format!("capabilities negotiation: {r}")),
            None => {
                return Err(format!(
                    "no answer to qmp_capabilities on {} within {timeout:?}",
                    path.display()
                ))
            }
        }
        qmp.writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Ok(qmp)
    }

    /// Connect and negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let mut qmp = Qmp::connect_raw(path);
        let r = qmp.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}), "capabilities negotiation");
        qmp
    }

    fn read(&mut self) -> Value {
        self.try_read().expect("QMP connection closed")
    }

    /// The next reply, or `None` if the connection ended.
    fn try_read(&mut self) -> Option<Value> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let v: Value = serde_json::from_str(line.trim()).expect("QMP JSON");
            // Asynchronous events are not replies.
            if v.get("event").is_none() {
                return Some(v);
            }
            self.events.push(v);
        }
    }

    /// Execute, for a server that may die meanwhile: `None` if no reply came.
    pub fn try_execute(&mut self, command: &str, args: Value) -> Option<Value> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": args})).ok()?;
        line.push(b'\n');
        self.writer.write_all(&line).ok()?;
        self.try_read()
    }

    /// Send a raw request and return the reply.
    pub fn send(&mut self, request: &Value) -> Value {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).expect("write QMP");
        self.read()
    }

    /// `{"execute": command, "arguments": args}`; returns the whole reply.
    pub fn execute(&mut self, command: &str, args: Value) -> Value {
        self.send(&json!({"execute": command, "arguments": args}))
    }

    /// Execute and expect success; returns `return`.
    pub fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.execute(command, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{command} {args}: {r}"),
        }
    }

    /// The `dirty-bitmaps` of node `node`, from query-named-block-nodes.
    pub fn bitmaps(&mut self, node: &str) -> Vec<Value> {
        let nodes = self.ok("query-named-block-nodes", json!({}));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap_or_else(|| panic!("no node {node} in {nodes}"))
            .get("dirty-bitmaps")
            .and_then(|b| b.as_array().cloned())
            .unwrap_or_default()
    }
}
