//! QEMU's option syntax: `key=value` lists (`,,` escapes a comma) or JSON objects flattened
//! into dotted keys, and a checklist that names any option left unused.

use std::collections::BTreeMap;

use super::Failure;

/// Options by dotted key.
pub type Opts = BTreeMap<String, String>;

/// Split `key=value,key=value` (QEMU's keyval syntax, `,,` escaping a comma) or flatten a JSON
/// object into dotted keys. A first item without `=` is taken as the value of `implied`.
pub fn parse_options(option: &str, text: &str, implied: Option<&str>) -> Result<Opts, Failure> {
    let text = text.trim();
    if text.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Failure::msg(format!("{option}: invalid JSON: {e}")))?;
        let mut out = Opts::new();
        flatten_json("", &value, &mut out);
        return Ok(out);
    }
    let mut out = Opts::new();
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    for (i, item) in items.into_iter().enumerate() {
        match item.split_once('=') {
            Some((k, v)) => {
                if out.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(Failure::msg(format!("{option}: option '{k}' given twice")));
                }
            }
            None if i == 0 && implied.is_some() => {
                out.insert(implied.unwrap_or_default().to_string(), item);
            }
            None => return Err(Failure::msg(format!("{option}: '{item}' is not key=value"))),
        }
    }
    Ok(out)
}

/// Flatten a JSON value into dotted keys, lists as `key.0`, `key.1`, ... (QEMU's keyval form of
/// the same options), booleans as `on`/`off`.
pub fn flatten_json(prefix: &str, value: &serde_json::Value, out: &mut Opts) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_json(&key, v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten_json(&format!("{prefix}.{i}"), v, out);
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        serde_json::Value::Bool(b) => {
            out.insert(
                prefix.to_string(),
                if *b { "on" } else { "off" }.to_string(),
            );
        }
        serde_json::Value::Null => {
            out.insert(prefix.to_string(), "null".to_string());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

pub fn parse_bool(option: &str, key: &str, v: &str) -> Result<bool, Failure> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Failure::msg(format!(
            "{option}: {key}={v}: expected on or off"
        ))),
    }
}

/// A node's options with the ones vubd understands checked off; whatever is left is an error.
pub struct Taker {
    pub what: String,
    pub opts: Opts,
}

impl Taker {
    pub fn new(what: String, opts: Opts) -> Self {
        Taker { what, opts }
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.opts.remove(key)
    }

    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, Failure> {
        self.take(key)
            .map(|v| parse_bool(&self.what, key, &v))
            .transpose()
    }

    /// Options under `prefix.` (an inline child), removed.
    pub fn take_prefixed(&mut self, prefix: &str) -> Opts {
        let dotted = format!("{prefix}.");
        let keys: Vec<String> = self
            .opts
            .keys()
            .filter(|k| k.starts_with(&dotted))
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let v = self.opts.remove(&k)?;
                Some((k[dotted.len()..].to_string(), v))
            })
            .collect()
    }

    /// Accept and ignore options that only tune QEMU's own machinery.
    pub fn ignore(&mut self, keys: &[&str]) {
        for k in keys {
            self.opts.remove(*k);
        }
    }

    pub fn finish(self) -> Result<(), Failure> {
        match self.opts.keys().next() {
            None => Ok(()),
            Some(k) => Err(Failure::msg(format!(
                "{}: option '{k}' is not supported by vubd",
                self.what
            ))),
        }
    }
}
