//! The QMP control socket holds up against hostile or careless clients: malformed JSON,
//! huge and deep requests, unknown commands, more clients than it serves, and clients that
//! connect and never speak. Limits are those documented in docs/usage.md.

mod common;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bitmaps::serve_meta;
use common::qmp::Qmp;
use common::{raw_with_metadata, TempDir, Vubd};
use serde_json::{json, Value};

/// docs/usage.md: clients served at once, and the time to negotiate capabilities.
const MAX_CLIENTS: usize = 16;
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

fn serve(dir: &TempDir) -> (Vubd, PathBuf) {
    raw_with_metadata(dir, 8 << 20, 1);
    let control = dir.join("qmp.sock");
    let vubd = serve_meta(dir, &["--control", control.to_str().unwrap()]);
    (vubd, control)
}

/// A field of /proc/PID/status, as a number (kB for memory).
fn proc_status(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Wait up to `limit` for `cond`, checking every few milliseconds; false if it never held.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A client that writes raw bytes and reads replies line by line.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    /// Connect; the first line (the greeting, or a refusal) is left unread.
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    /// Connect, check the greeting and negotiate.
    fn negotiated(path: &Path) -> Raw {
        let mut raw = Raw::connect(path);
        assert!(raw.line().unwrap()["QMP"].is_object());
        raw.write(br#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(raw.line().unwrap(), json!({"return": {}}));
        raw
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write control socket");
    }

    /// The next line, or None at end of file.
    fn line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(line.trim()).expect("QMP reply is JSON")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read control socket: {e}"),
        }
    }

    fn reply(&mut self) -> Value {
        self.line().expect("connection closed instead of a reply")
    }

    /// Send `bytes` and expect one error with `desc` (or a desc starting with it).
    fn expect_error(&mut self, bytes: &[u8], desc: &str) {
        self.write(bytes);
        let r = self.reply();
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        let got = r["error"]["desc"].as_str().unwrap();
        assert!(
            got.starts_with(desc),
            "{} -> {r}",
            String::from_utf8_lossy(bytes)
        );
        assert!(r.get("id").is_none(), "{r}");
    }

    /// query-version answers, with the id given: the session is alive and in step.
    fn check_alive(&mut self, id: u64) {
        self.write(format!(r#"{{"execute": "query-version", "id": {id}}}"#).as_bytes());
        let r = self.reply();
        assert_eq!(r["id"], id, "{r}");
        assert!(r["return"]["package"].is_string(), "{r}");
    }

    /// Read until the server closes the connection, checking that it says nothing more.
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}

#[test]
fn malformed_input_is_answered_and_the_session_goes_on() {
    let dir = TempDir::new("ctl-malformed");
    let (mut vubd, control) = serve(&dir);
    let mut c = Raw::negotiated(&control);
    let cases: [(&[u8], &str); 12] = [
        (b"{\"execute\": }\n", "JSON parse error, "),
        (b"{\"execute\" \"query-version\"}", "JSON parse error, "),
        (b"{\"execute\": \"query-version\",}", "JSON parse error, "),
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b"\"hello\"\n", "QMP input must be a JSON object"),
        (b"null ", "QMP input must be a JSON object"),
        (b"nonsense\n", "JSON parse error, "),
        (b"}\n", "JSON parse error, "),
        (b"{\"execute\": \"\xff\"}", "JSON parse error, "),
        // An unterminated string ends at the line break; the object still has to be closed.
        (
            b"{\"execute\": \"query-version\", \"id\": \"a\n}\n",
            "JSON parse error, stray '\"a\n'",
        ),
        (
            &[b"[".repeat(100), b"]".repeat(100)].concat(),
            "JSON nesting depth limit exceeded",
        ),
    ];
    for (i, (bytes, desc)) in cases.iter().enumerate() {
        c.expect_error(bytes, desc);
        c.check_alive(i as u64);
    }
    // A JSON stream, not lines: requests back to back, and one split over several writes.
    c.write(br#"{"execute":"query-version","id":100}{"execute":"query-version","id":101}"#);
    assert_eq!(c.reply()["id"], 100);
    assert_eq!(c.reply()["id"], 101);
    c.write(b"{\"execute\":\n");
    c.write(b"  \"query-version\", \"id\": 102\n");
    c.write(b"}");
    assert_eq!(c.reply()["id"], 102);
    drop(c);
    vubd.stop();
}

#[test]
fn unknown_commands_and_bad_arguments_get_qemus_errors() {
    let dir = TempDir::new("ctl-errors");
    let (mut vubd, control) = serve(&dir);
    let mut qmp = Qmp::connect_raw(&control);
    assert_eq!(
        qmp.execute("query-version", json!({})),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
    );
    qmp.ok("qmp_capabilities", json!({}));
    assert_eq!(
        qmp.send(&json!({"execute": "foo", "id": "x1"})),
        json!({"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"},
            "id": "x1"})
    );
    let cases = [
        (
            json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": 5}}),
            "Invalid parameter type for 'name', expected: string",
        ),
        (
            json!({"execute": "block-dirty-bitmap-add",
                "arguments": {"node": "disk", "name": "b", "persistent": "yes"}}),
            "Invalid parameter type for 'persistent', expected: boolean",
        ),
        (
            json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk"}}),
            "Parameter 'name' is missing",
        ),
        (
            json!({"execute": "block-dirty-bitmap-clear",
                "arguments": {"node": "disk", "name": "b", "bogus": 1}}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            json!({"execute": "query-version", "arguments": []}),
            "QMP input member 'arguments' must be an object",
        ),
        (
            json!({"execute": 5}),
            "QMP input member 'execute' must be a string",
        ),
        (json!({"arguments": {}}), "QMP input lacks member 'execute'"),
        (
            json!({"execute": "query-version", "foo": 1}),
            "QMP input member 'foo' is unexpected",
        ),
        (
            json!({"execute": "transaction", "arguments": {"actions": {}}}),
            "Invalid parameter type for 'actions', expected: array",
        ),
    ];
    for (request, desc) in cases {
        let r = qmp.send(&request);
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError", "desc": desc}}),
            "{request}"
        );
    }
    // Nothing was added by the failed commands.
    assert!(qmp.bitmaps("disk").is_empty());
    drop(qmp);
    vubd.stop();
}

#[test]
fn an_oversized_request_is_refused_without_being_buffered() {
    let dir = TempDir::new("ctl-huge");
    let (mut vubd, control) = serve(&dir);
    let pid = vubd.pid();
    let mut flooder = Raw::negotiated(&control);
    let mut other = Qmp::connect(&control);
    other.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    // Peak memory from here on: writing 5 to clear_refs resets VmHWM to the current VmRSS.
    let hwm_reset = fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let rss_before = proc_status(pid, "VmRSS");

    // A 10 MiB request on one line, written by a thread while another client works.
    let mut request = br#"{"execute": "query-version", "id": ""#.to_vec();
    request.resize(request.len() + 10 * MIB as usize, b'x');
    request.extend_from_slice(b"\"}\n");
    let mut writer = flooder.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || writer.write_all(&request));
    for i in 0..20 {
        let r = other.send(&json!({"execute": "query-version", "id": i}));
        assert_eq!(r["id"], i, "{r}");
    }
    flood.join().unwrap().expect("vubd reads the whole request");
    // Refused once, as soon as it was too long; the rest was skipped, and the session goes on.
    assert_eq!(
        flooder.reply(),
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    flooder.check_alive(1);
    // The same for a value that is not an object, and for a string of its own.
    let mut junk = vec![b'7'; 3 * MIB as usize];
    junk.push(b'\n');
    flooder.expect_error(&junk, "JSON token size limit exceeded");
    flooder.check_alive(2);

    let rss_after = proc_status(pid, "VmRSS");
    let grown = rss_after.saturating_sub(rss_before);
    assert!(grown < 5 * 1024, "VmRSS grew by {grown} kB");
    if hwm_reset {
        let peak = proc_status(pid, "VmHWM").saturating_sub(rss_before);
        assert!(peak < 5 * 1024, "VmHWM rose {peak} kB above VmRSS");
    } else {
        eprintln!("/proc/{pid}/clear_refs not writable: peak memory not checked");
    }
    // Bitmap commands still work for both.
    other.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "b0"}),
    );
    assert!(other.bitmaps("disk").is_empty());
    drop((flooder, other));
    vubd.stop();
}

#[test]
fn clients_beyond_the_bound_are_refused_and_threads_stay_bounded() {
    let dir = TempDir::new("ctl-many");
    let (mut vubd, control) = serve(&dir);
    let pid = vubd.pid();
    let mut main = Qmp::connect(&control);
    let threads_before = proc_status(pid, "Threads");

    // 64 clients at once: all connected before any is read from.
    let crowd: Vec<Raw> = (0..64).map(|_| Raw::connect(&control)).collect();
    let mut greeted = Vec::new();
    let mut refused = 0;
    for mut c in crowd {
        let first = c.reply();
        if first["QMP"].is_object() {
            greeted.push(c);
            continue;
        }
        assert_eq!(first["error"]["class"], "GenericError", "{first}");
        let desc = first["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("Too many QMP clients"), "{first}");
        c.expect_closed();
        refused += 1;
    }
    assert_eq!(
        (greeted.len(), refused),
        (MAX_CLIENTS - 1, 64 - MAX_CLIENTS + 1)
    );
    let threads = proc_status(pid, "Threads");
    assert!(
        threads < threads_before + MAX_CLIENTS as u64,
        "{threads} threads with {MAX_CLIENTS} clients, {threads_before} with one"
    );

    // The client that was there first is served throughout, bitmaps included, and so are
    // the others that were let in.
    main.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "crowded", "granularity": 65536}),
    );
    assert_eq!(main.bitmaps("disk")[0]["name"], "crowded");
    for c in greeted.iter_mut() {
        c.write(br#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(c.reply(), json!({"return": {}}));
        c.check_alive(3);
    }

    // Places are given back when clients leave.
    drop(greeted);
    assert!(
        wait_for(Duration::from_secs(10), || proc_status(pid, "Threads")
            <= threads_before),
        "client threads did not end"
    );
    let again: Vec<Raw> = (1..MAX_CLIENTS)
        .map(|_| Raw::negotiated(&control))
        .collect();
    main.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "crowded"}),
    );
    drop(again);
    drop(main);
    vubd.stop();
}

#[test]
fn idle_and_stuck_clients_do_not_hold_up_shutdown() {
    let dir = TempDir::new("ctl-shutdown");
    let (mut vubd, control) = serve(&dir);
    // As many clients as are served: negotiated and idle; greeted and silent; halfway through
    // a request; and one that vubd cannot write to.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Raw::negotiated(&control));
    }
    for _ in 0..5 {
        let mut c = Raw::connect(&control);
        c.reply();
        clients.push(c);
    }
    for _ in 0..5 {
        let mut c = Raw::negotiated(&control);
        c.write(br#"{"execute": "query-"#);
        clients.push(c);
    }
    // One that sends requests and never reads the replies, until vubd blocks writing to it.
    let mut deaf = Raw::negotiated(&control);
    deaf.stream.set_nonblocking(true).unwrap();
    let request = br#"{"execute": "query-version"}"#;
    let mut sent = 0;
    while sent < 64 * MIB {
        match deaf.stream.write(request) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(
        sent < 64 * MIB,
        "vubd kept reading without its replies being read"
    );
    clients.push(deaf);

    let start = Instant::now();
    vubd.stop();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    assert!(!control.exists(), "the control socket was left behind");
    // Every connection has ended: what vubd had sent, then end of file — or, for a client
    // whose requests vubd had not read yet, a reset (closing a UNIX socket with unread data
    // resets the peer). A connection still open would block: the read timeout catches that.
    for c in clients.iter_mut() {
        c.stream.set_nonblocking(false).unwrap();
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        match c.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the connection did not end: {e}"),
        }
    }
}

#[test]
fn a_client_that_does_not_negotiate_is_closed_after_the_timeout() {
    let dir = TempDir::new("ctl-idle");
    let (mut vubd, control) = serve(&dir);
    let mut silent = Raw::connect(&control);
    let mut trickle = Raw::connect(&control);
    let mut negotiated = Qmp::connect(&control);
    let start = Instant::now();
    assert!(silent.reply()["QMP"].is_object());
    assert!(trickle.reply()["QMP"].is_object());
    let expected = json!({"error": {"class": "GenericError",
        "desc": format!("No capabilities negotiation within {} seconds; closing",
            NEGOTIATION_TIMEOUT.as_secs())}});

    // The deadline is for the whole negotiation, not for each read: a client that sends a
    // byte every half second is closed as well.
    trickle
        .stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let closing = loop {
        assert!(
            start.elapsed() < 2 * NEGOTIATION_TIMEOUT,
            "trickling client kept"
        );
        // Once vubd has closed, the write fails and the read finds what it said last.
        let _ = trickle.stream.write_all(b" ");
        let mut line = String::new();
        match trickle.reader.read_line(&mut line) {
            Ok(0) => break None,
            Ok(_) => break Some(serde_json::from_str::<Value>(line.trim()).unwrap()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!("read: {e}"),
        }
    };
    assert_eq!(closing, Some(expected.clone()));

    assert_eq!(silent.reply(), expected);
    silent.expect_closed();
    let took = start.elapsed();
    assert!(
        took >= NEGOTIATION_TIMEOUT - Duration::from_millis(500),
        "closed after {took:?}"
    );
    // The negotiated client has no deadline.
    let r = negotiated.send(&json!({"execute": "query-version", "id": 7}));
    assert_eq!(r["id"], 7);
    drop(negotiated);
    vubd.stop();
}
