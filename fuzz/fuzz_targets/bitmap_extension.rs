//! The qcow2 bitmaps extension, directory and tables, and the bitmap manager on top of them.
//!
//! A template image with three persistent bitmaps (one with data in two clusters, one disabled
//! and empty, one all ones) is made once per process with vubd's own `create` and bitmap
//! manager. Each input patches it where it counts — the header, the extension, the directory,
//! a bitmap table, a data cluster, or anywhere in the file, with bytes or big-endian fields, or
//! cuts the file short — then:
//!
//! 1. opens it read-only: loads the bitmaps (`load_bitmaps`, and through `Export::new`),
//!    checks it;
//! 2. opens it read-write (which marks the bitmaps in use on disk), runs bitmap operations and
//!    transactions and marks writes, closes the export (storing every bitmap, rewriting the
//!    directory), and checks with repair.
//!
//! Nothing may panic. And what a clean close stored must read back: reopened, the image has
//! the same persistent bitmaps (names, granularity, recording, consistency, dirty count).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vubd::bitmap::{Action, BitmapInfo};
use vubd::block::io::EngineKind;
use vubd::block::qcow2::check::check;
use vubd::block::qcow2::create::{create, CreateOptions};
use vubd::block::qcow2::Qcow2Node;
use vubd::block::{BlockDriver, Locking, NodeNames, OpenOptions};
use vubd::export::{Export, ExportOptions};
use vubd_fuzz::{workdir, write_file};

const DISK: u64 = 4 << 20;
/// 512-byte clusters cannot hold the header, its feature names and the bitmaps extension.
const CLUSTER: u64 = 4096;
const BITMAPS_MAGIC: u32 = 0x2385_2875;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const NAMES: [&str; 5] = ["b0", "b1", "b2", "new", "x"];

/// Where things are in the template: (offset, length).
struct Template {
    bytes: Vec<u8>,
    header: (u64, u64),
    extension: (u64, u64),
    directory: (u64, u64),
    tables: Vec<(u64, u64)>,
    data: Vec<(u64, u64)>,
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn options(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        repair: !read_only,
        locking: Locking::Off,
        ..OpenOptions::default()
    }
}

fn export(node: Arc<Qcow2Node>, read_only: bool) -> Result<Export, vubd::export::ExportError> {
    Export::new(
        node,
        ExportOptions {
            id: "disk".into(),
            read_only,
            writers: 1,
            engine: EngineKind::Sync,
            poll: vubd::vhost::poll::PollPolicy::OFF,
            node_names: NodeNames::derived("disk"),
            // vubd's default: bitmaps stored crash-consistently (group commits, atomic
            // directory switches).
            bitmaps: vubd::bitmap::Persistence::CrashConsistent,
        },
    )
}

fn add(name: &str, granularity: u64, disabled: bool) -> Action {
    Action::Add {
        name: name.into(),
        granularity: Some(granularity),
        persistent: true,
        disabled,
    }
}

fn make_template(path: &Path) -> Template {
    let _ = std::fs::remove_file(path);
    create(
        path,
        &CreateOptions {
            size: Some(DISK),
            cluster_size: CLUSTER,
            data_file: None,
        },
    )
    .expect("creating the template");
    {
        let node = Arc::new(Qcow2Node::open(path, &options(false)).expect("opening the template"));
        let export = export(node, false).expect("export of the template");
        let b = export.bitmaps();
        b.apply(add("b0", 512, false)).unwrap();
        b.apply(add("b1", 65536, true)).unwrap();
        b.apply(add("b2", 4096, true)).unwrap();
        let mut cursor = b.cursor();
        for (off, len) in [(0, 4096), (300_000, 70_000), (DISK - 512, 512)] {
            b.mark(&mut cursor, off, len);
        }
        b.apply(Action::Disable { name: "b0".into() }).unwrap();
        b.apply(Action::Enable { name: "b2".into() }).unwrap();
        b.mark(&mut cursor, 0, DISK);
        b.apply(Action::Enable { name: "b0".into() }).unwrap();
        export.close().expect("storing the template's bitmaps");
    }
    let bytes = std::fs::read(path).unwrap();
    // Find the bitmaps extension after the v3 header.
    let header_len = u64::from(be32(&bytes, 100));
    let mut at = header_len;
    let extension = loop {
        let (magic, len) = (be32(&bytes, at), u64::from(be32(&bytes, at + 4)));
        assert_ne!(magic, 0, "template has no bitmaps extension");
        if magic == BITMAPS_MAGIC {
            break (at, 8 + len);
        }
        at += 8 + len.next_multiple_of(8);
    };
    let ext = extension.0 + 8;
    let count = be32(&bytes, ext);
    let directory = (be64(&bytes, ext + 16), be64(&bytes, ext + 8));
    let mut tables = Vec::new();
    let mut data = Vec::new();
    let mut entry = directory.0;
    for _ in 0..count {
        let table = (be64(&bytes, entry), u64::from(be32(&bytes, entry + 8)) * 8);
        for i in 0..table.1 / 8 {
            let off = be64(&bytes, table.0 + 8 * i) & OFFSET_MASK;
            if off != 0 {
                data.push((off, CLUSTER));
            }
        }
        tables.push(table);
        let name_size = u64::from(u16::from_be_bytes(
            bytes[entry as usize + 18..entry as usize + 20]
                .try_into()
                .unwrap(),
        ));
        let extra = u64::from(be32(&bytes, entry + 20));
        entry += (24 + extra + name_size).next_multiple_of(8);
    }
    assert_eq!(tables.len(), 3);
    assert!(!data.is_empty(), "template bitmaps have data clusters");
    Template {
        bytes,
        header: (0, header_len),
        extension,
        directory,
        tables,
        data,
    }
}

struct State {
    template: Template,
    path: PathBuf,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = workdir();
        State {
            template: make_template(&dir.join("template.qcow2")),
            path: dir.join("bitmaps.qcow2"),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Region {
    Header,
    Extension,
    Directory,
    Table(u8),
    Data(u8),
    File,
}

#[derive(Arbitrary, Debug)]
enum Value {
    Bytes(Vec<u8>),
    Be16(u16),
    Be32(u32),
    Be64(u64),
    /// Cut the file at the patch's offset.
    Truncate,
}

#[derive(Arbitrary, Debug)]
struct Patch {
    region: Region,
    at: u32,
    value: Value,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Fixed(u8),
    /// The name of the i-th bitmap the manager has (names read from the image may be odd).
    Loaded(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Granularity {
    Default,
    Bits(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add {
        name: Name,
        granularity: Granularity,
        persistent: bool,
        disabled: bool,
    },
    Remove(Name),
    Clear(Name),
    Enable(Name),
    Disable(Name),
    Merge(Name, Vec<Name>),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Apply(Op),
    Transaction(Vec<Op>),
    Mark(u32, u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    patches: Vec<Patch>,
    steps: Vec<Step>,
}

fn patched(t: &Template, patches: &[Patch]) -> Vec<u8> {
    let mut img = t.bytes.clone();
    for p in patches.iter().take(16) {
        let pick = |v: &[(u64, u64)], i: u8| v[usize::from(i) % v.len()];
        let (start, len) = match p.region {
            Region::Header => t.header,
            Region::Extension => t.extension,
            Region::Directory => t.directory,
            Region::Table(i) => pick(&t.tables, i),
            Region::Data(i) => pick(&t.data, i),
            Region::File => (0, img.len() as u64),
        };
        let at = (start + u64::from(p.at) % len.max(1)) as usize;
        let bytes = match &p.value {
            Value::Bytes(b) => b.iter().copied().take(256).collect(),
            Value::Be16(v) => v.to_be_bytes().to_vec(),
            Value::Be32(v) => v.to_be_bytes().to_vec(),
            Value::Be64(v) => v.to_be_bytes().to_vec(),
            Value::Truncate => {
                img.truncate(at);
                continue;
            }
        };
        if img.len() < at + bytes.len() {
            img.resize(at + bytes.len(), 0);
        }
        img[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    img
}

fn name(n: &Name, infos: &[BitmapInfo]) -> String {
    match n {
        Name::Fixed(i) => NAMES[usize::from(*i) % NAMES.len()].to_string(),
        Name::Loaded(i) if !infos.is_empty() => infos[usize::from(*i) % infos.len()].name.clone(),
        Name::Loaded(_) => "b0".to_string(),
        Name::Raw(s) => s.chars().take(1100).collect(),
    }
}

fn action(op: &Op, infos: &[BitmapInfo]) -> Action {
    match op {
        Op::Add {
            name: n,
            granularity,
            persistent,
            disabled,
        } => Action::Add {
            name: name(n, infos),
            granularity: match granularity {
                Granularity::Default => None,
                Granularity::Bits(b) => Some(1u64 << (b % 64)),
                Granularity::Raw(g) => Some(*g),
            },
            persistent: *persistent,
            disabled: *disabled,
        },
        Op::Remove(n) => Action::Remove {
            name: name(n, infos),
        },
        Op::Clear(n) => Action::Clear {
            name: name(n, infos),
        },
        Op::Enable(n) => Action::Enable {
            name: name(n, infos),
        },
        Op::Disable(n) => Action::Disable {
            name: name(n, infos),
        },
        Op::Merge(t, sources) => Action::Merge {
            target: name(t, infos),
            sources: sources.iter().take(8).map(|s| name(s, infos)).collect(),
        },
    }
}

/// The persistent bitmaps, in name order.
fn persistent(export: &Export) -> Vec<BitmapInfo> {
    let mut v: Vec<BitmapInfo> = export
        .bitmaps()
        .infos()
        .into_iter()
        .filter(|b| b.persistent)
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn read_only_pass(path: &Path) {
    let Ok(node) = Qcow2Node::open(path, &options(true)) else {
        return;
    };
    let node = Arc::new(node);
    if let Some(store) = node.clone().bitmap_store() {
        let _ = store.load_bitmaps();
    }
    if let Ok(export) = export(node.clone(), true) {
        let _ = export.bitmaps().infos();
    }
    let _ = check(&node, false);
}

fn read_write_pass(path: &Path, steps: &[Step]) {
    let Ok(node) = Qcow2Node::open(path, &options(false)) else {
        return;
    };
    let node = Arc::new(node);
    let Ok(export) = export(node.clone(), false) else {
        let _ = check(&node, true);
        return;
    };
    let bitmaps = export.bitmaps();
    let mut cursor = bitmaps.cursor();
    for step in steps.iter().take(16) {
        let infos = bitmaps.infos();
        match step {
            Step::Apply(op) => {
                let _ = bitmaps.apply(action(op, &infos));
            }
            Step::Transaction(ops) => {
                let actions: Vec<Action> = ops.iter().take(8).map(|o| action(o, &infos)).collect();
                let _ = bitmaps.transaction(&actions);
            }
            Step::Mark(off, len) => {
                bitmaps.mark(&mut cursor, u64::from(*off) * 64, u64::from(*len));
            }
        }
    }
    let stored = persistent(&export);
    let closed = export.close();
    drop(export);
    if closed.is_ok() && !BlockDriver::read_only(&*node) {
        // What a clean close stored reads back the same.
        let reopened =
            Qcow2Node::open(path, &options(true)).expect("reopening after a clean close");
        let again =
            self::export(Arc::new(reopened), true).expect("bitmaps load after a clean close");
        assert_eq!(
            persistent(&again),
            stored,
            "bitmaps read back differ from those stored"
        );
    }
    let _ = check(&node, true);
}

fuzz_target!(|input: Input| {
    let s = state();
    let img = patched(&s.template, &input.patches);
    write_file(&s.path, &img);
    read_only_pass(&s.path);
    read_write_pass(&s.path, &input.steps);
});
