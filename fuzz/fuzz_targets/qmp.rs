//! The control socket's QMP input path: the framer that cuts the byte stream into messages
//! under the socket's limits, then JSON parsing and a QMP `Session` over a real export.
//!
//! The export is a qcow2 image over a raw data file (vubd's main graph), made once per process,
//! so that persistent bitmaps are stored for real. After each input every bitmap is removed,
//! so each input starts from the same state.
//!
//! Input: a first byte of options (bit 0: small framer limits taken from the next three bytes,
//! so that every limit is reachable within a short input; bit 1: negotiate capabilities
//! first), then the bytes a client sends.
//!
//! Checked: every frame gets exactly one reply, a JSON object with either `return` or an
//! `error` holding a string `class` and `desc`, carrying the request's `id` when it had one;
//! a message frame is never longer than the limit, and nothing panics.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vubd::bitmap::Action;
use vubd::block::io::EngineKind;
use vubd::block::qcow2::create::{create, CreateOptions};
use vubd::block::qcow2::Qcow2Node;
use vubd::block::{Locking, NodeNames, OpenOptions};
use vubd::control::Session;
use vubd::export::{Export, ExportOptions};
use vubd::fuzzing::{qmp_answer, Frame, Framer, Limits, QMP_LIMITS};
use vubd_fuzz::workdir;

fn device() -> &'static Arc<Export> {
    static EXPORT: OnceLock<Arc<Export>> = OnceLock::new();
    EXPORT.get_or_init(|| {
        let dir = workdir();
        let image = dir.join("qmp.qcow2");
        let data = dir.join("qmp.raw");
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(&data);
        create(
            &image,
            &CreateOptions {
                size: Some(1 << 20),
                cluster_size: 65536,
                data_file: Some(data),
            },
        )
        .expect("creating the QMP target's image");
        let node = Qcow2Node::open(
            &image,
            &OpenOptions {
                locking: Locking::Off,
                ..OpenOptions::default()
            },
        )
        .expect("opening the QMP target's image");
        let export = Export::new(
            Arc::new(node),
            ExportOptions {
                id: "disk".into(),
                read_only: false,
                writers: 1,
                engine: EngineKind::Sync,
                poll: vubd::vhost::poll::PollPolicy::OFF,
                node_names: NodeNames::derived("disk"),
                bitmaps: vubd::bitmap::Persistence::CrashConsistent,
            },
        )
        .expect("export");
        Arc::new(export)
    })
}

fn check_reply(request: Option<&Value>, reply: &Value) {
    let obj = reply.as_object().expect("a reply is a JSON object");
    match (obj.get("return"), obj.get("error")) {
        (Some(_), None) => {}
        (None, Some(err)) => {
            assert!(
                err["class"].is_string() && err["desc"].is_string(),
                "{reply}"
            );
        }
        _ => panic!("a reply has exactly one of return and error: {reply}"),
    }
    let id = request
        .and_then(|r| r.as_object())
        .and_then(|r| r.get("id"));
    assert_eq!(obj.get("id"), id, "the reply carries the request's id");
    for k in obj.keys() {
        assert!(matches!(k.as_str(), "return" | "error" | "id"), "{reply}");
    }
}

/// Whether a request would open a file or a socket the input names.
fn touches_the_host(request: &Value) -> bool {
    // (Backups need a node added first, so they never start either.)
    matches!(
        request.get("execute").and_then(Value::as_str),
        Some("blockdev-add" | "nbd-server-start" | "object-add")
    )
}

fuzz_target!(|input: &[u8]| {
    let Some((&opts, mut stream)) = input.split_first() else {
        return;
    };
    let export = device();
    let mut limits = QMP_LIMITS;
    if opts & 1 != 0 && stream.len() >= 3 {
        limits = Limits {
            max_bytes: usize::from(stream[0]) * 4,
            max_tokens: usize::from(stream[1]),
            max_depth: usize::from(stream[2] % 16),
        };
        stream = &stream[3..];
    }
    let graph = vubd::graph::Graph::new(vubd::graph::disk::ExportSettings {
        engine: EngineKind::Sync,
        poll: vubd::vhost::poll::PollPolicy::OFF,
        bitmaps: vubd::bitmap::Persistence::CrashConsistent,
        queue_size: 256,
        socket_mode: 0o600,
    });
    graph.add_export(export.clone()).expect("the disk");
    let mut session = Session::new(graph.clone());
    assert!(session.greeting().is_object());
    if opts & 2 != 0 {
        let reply = session.handle(&serde_json::json!({"execute": "qmp_capabilities"}));
        check_reply(None, &reply);
        assert!(session.negotiated());
    }
    let mut framer = Framer::new(limits);
    for &b in stream {
        let Some(frame) = framer.push(b) else {
            continue;
        };
        let request = match &frame {
            Frame::Message(m) => {
                assert!(
                    !m.is_empty() && m.len() <= limits.max_bytes.max(1),
                    "{} bytes",
                    m.len()
                );
                serde_json::from_slice::<Value>(m).ok()
            }
            Frame::Error(_) => None,
        };
        // Commands that open host files or listen on sockets the input names are not run:
        // a fuzzer must not create sockets or open files anywhere on the host.
        if request.as_ref().is_some_and(touches_the_host) {
            continue;
        }
        let reply = qmp_answer(&mut session, frame);
        check_reply(request.as_ref(), &reply);
        serde_json::to_vec(&reply).expect("a reply serialises");
    }
    // Back to no jobs, exports or bitmaps for the next input.
    graph.shutdown().expect("a graph of no served disk shuts down");
    let bitmaps = export.bitmaps();
    for b in bitmaps.infos() {
        bitmaps
            .apply(Action::Remove { name: b.name })
            .expect("removing a bitmap the session added");
    }
    assert!(bitmaps.infos().is_empty());
});
