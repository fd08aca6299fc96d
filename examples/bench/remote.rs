//! The distributed-storage table of `make bench`: the bench's graph (qcow2 metadata over a raw
//! data file, one persistent bitmap) with its protocol nodes remote, served by vubd and by
//! qemu-storage-daemon from one and the same command line:
//!
//! - **RBD**: both images on a single-host Ceph cluster (`scripts/ceph-test-cluster.sh`: one
//!   monitor, one memstore OSD);
//! - **NBD**: the data file behind `qemu-nbd` (a raw file in memory, on a UNIX socket), the
//!   metadata a local file.
//!
//! The cluster and the NBD server share the machine's two CPUs with the backend and the load
//! generator, so the absolute figures say little: the table reports vubd against
//! qemu-storage-daemon on the same store, run after run, backends alternating.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::host::pinned;
use crate::report::{median_sample, ratio};
use crate::runner::{fill_once, run_loadgen, spawn_backend, vubd_offline, Running, Sample};
use crate::workloads::{workload, Workload};
use crate::Options;

pub const HEADING: &str = "## Distributed storage: RBD and NBD";

/// Size of the bench's disk on the remote stores (the memstore OSD keeps it in memory).
const SIZE_MIB: u64 = 256;

const REMOTE_WORKLOADS: [Workload; 5] = [
    workload("4k randread qd1", "randread", "4k", 1, &[]),
    workload("4k randwrite qd1", "randwrite", "4k", 1, &[]),
    workload("4k randread qd32", "randread", "4k", 32, &[]),
    workload("4k randwrite qd32", "randwrite", "4k", 32, &[]),
    workload("64k write qd8", "write", "64k", 8, &[]),
];

/// One remote store with the graph on it: its `--blockdev` options (nodes `meta`, `data`,
/// `fmt`) and what keeps the store running.
struct Store {
    label: &'static str,
    blockdevs: Vec<String>,
    _server: Server,
}

/// The store's server, stopped on drop.
enum Server {
    Ceph(PathBuf),
    Nbd(Child),
}

impl Drop for Server {
    fn drop(&mut self) {
        match self {
            Server::Ceph(dir) => {
                let _ = Command::new("scripts/ceph-test-cluster.sh")
                    .arg("stop")
                    .arg(dir)
                    .output();
            }
            Server::Nbd(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn run_ok(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn utf8(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{}: not UTF-8", p.display()))
}

/// A Ceph cluster in `work` with the bench's graph on it.
fn rbd_store(work: &Path) -> Result<Store, String> {
    let dir = work.join("ceph");
    run_ok("scripts/ceph-test-cluster.sh", &["start", utf8(&dir)?])?;
    let server = Server::Ceph(dir.clone());
    let conf = dir.join("ceph.conf");
    let conf = utf8(&conf)?;
    let name = |image: &str| format!("rbd:rbd/{image}:conf={conf}");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", name("data")),
            &name("meta"),
            &format!("{SIZE_MIB}M"),
        ],
    )?;
    let node = |node: &str, image: &str| {
        format!("driver=rbd,node-name={node},pool=rbd,image={image},conf={conf}")
    };
    let blockdevs = vec![node("meta", "meta"), node("data", "data")];
    let opts = format!(
        "driver=qcow2,file.driver=rbd,file.pool=rbd,file.image=meta,file.conf={conf},\
         data-file.driver=rbd,data-file.pool=rbd,data-file.image=data,data-file.conf={conf}"
    );
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "--image-opts", &opts, "backup"],
    )?;
    Ok(Store {
        label: "RBD",
        blockdevs,
        _server: server,
    })
}

/// qemu-nbd serving a raw data file in `work`, with the graph's metadata a local file.
fn nbd_store(work: &Path) -> Result<Store, String> {
    let data = work.join("nbd-data.raw");
    let meta = work.join("nbd-meta.qcow2");
    let sock = work.join("nbd.sock");
    run_ok(
        "dd",
        &[
            "if=/dev/urandom",
            "bs=1M",
            "status=none",
            &format!("count={SIZE_MIB}"),
            &format!("of={}", utf8(&data)?),
        ],
    )?;
    vubd_offline(&["create", utf8(&meta)?, "--data-file", utf8(&data)?])?;
    vubd_offline(&["bitmap", utf8(&meta)?, "add", "backup"])?;
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--persistent",
            "--cache=writeback",
            "--aio=io_uring",
        ])
        .args(["-x", "data", "-k", utf8(&sock)?, utf8(&data)?])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-nbd: {e}"))?;
    let server = Server::Nbd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err("qemu-nbd did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Store {
        label: "NBD",
        blockdevs: vec![
            format!("driver=file,node-name=meta,filename={}", utf8(&meta)?),
            format!(
                "driver=nbd,node-name=data,server.type=unix,server.path={},export=data",
                utf8(&sock)?
            ),
        ],
        _server: server,
    })
}

/// The command line both backends run: qemu-storage-daemon's, with the store's nodes.
fn command_line(store: &Store, sock: &Path, queues: u32) -> Vec<String> {
    let mut args = Vec::new();
    for b in &store.blockdevs {
        args.push("--blockdev".to_string());
        args.push(b.clone());
    }
    args.extend([
        "--blockdev".to_string(),
        "driver=qcow2,node-name=fmt,file=meta,data-file=data".to_string(),
        "--object".to_string(),
        "iothread,id=io0".to_string(),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path={},writable=on,\
             num-queues={queues},iothread=io0",
            sock.display()
        ),
    ]);
    args
}

fn start(program: &str, name: &str, store: &Store, work: &Path) -> Result<Running, String> {
    let sock = work.join("bench.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = pinned(1, program);
    cmd.args(command_line(store, &sock, 1));
    spawn_backend(&mut cmd, name, &sock)
}

const BACKENDS: [(&str, &str); 2] = [
    ("vubd", "target/release/vubd"),
    ("qemu-storage-daemon", "qemu-storage-daemon"),
];

/// Write the whole disk once through vubd, so that reads find data and the bitmap is dirty.
fn fill(o: &Options, store: &Store, work: &Path) -> Result<(), String> {
    let running = start(BACKENDS[0].1, "vubd", store, work)?;
    fill_once(o, work, &running, SIZE_MIB)
}

/// Median figures by (workload, backend) on one store.
fn measure(
    o: &Options,
    store: &Store,
    work: &Path,
) -> Result<BTreeMap<(usize, usize), Sample>, String> {
    fill(o, store, work)?;
    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    for (i, w) in REMOTE_WORKLOADS.iter().enumerate() {
        for rep in 0..o.reps {
            let mut order = [0usize, 1];
            if rep % 2 == 1 {
                order.reverse();
            }
            for b in order {
                let (name, program) = BACKENDS[b];
                let running = start(program, name, store, work)?;
                let s = run_loadgen(o, work, w, &running, &[])?;
                drop(running);
                eprintln!(
                    "bench: {:<4} {:<18} {:<20} run {}: {:>8.0} IOPS  p50 {:>8.1} us  CPU {:>6.2} us/IO",
                    store.label,
                    w.label,
                    name,
                    rep + 1,
                    s.iops,
                    s.p50,
                    s.cpu_us
                );
                samples.entry((i, b)).or_default().push(s);
            }
        }
    }
    Ok(samples
        .iter()
        .map(|(k, v)| (*k, median_sample(v)))
        .collect())
}

/// Measure both stores and return the report's section.
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "The bench's graph (qcow2 metadata over a raw data file of {SIZE_MIB} MiB, one \
         persistent bitmap, the disk written once first) with remote protocol nodes, served by \
         vubd and by qemu-storage-daemon from the same `--blockdev`/`--export` command line, one \
         queue, on CPU 1. **RBD**: metadata and data images on a single-host Ceph cluster \
         (`scripts/ceph-test-cluster.sh`: one monitor, one memstore OSD, librbd's default \
         writeback cache). **NBD**: the data file behind `qemu-nbd --cache=writeback \
         --aio=io_uring` on a UNIX socket, the metadata a local file. The cluster and the NBD \
         server share the two CPUs with the backend and the load generator, so the absolute \
         figures are low and noisy: compare the ratios. Medians of {} runs of {} s, backends \
         alternating.\n",
        o.reps, o.runtime
    );
    let _ = writeln!(
        md,
        "| store | workload | vubd IOPS | qsd IOPS | vubd / qsd | vubd p50 µs | qsd p50 µs | vubd CPU µs/IO | qsd CPU µs/IO |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for make in [rbd_store as fn(&Path) -> Result<Store, String>, nbd_store] {
        let store = make(work)?;
        let results = measure(o, &store, work)?;
        for (i, w) in REMOTE_WORKLOADS.iter().enumerate() {
            let get = |b| results.get(&(i, b)).copied().unwrap_or_default();
            let (v, q) = (get(0), get(1));
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
                store.label,
                w.label,
                v.iops,
                q.iops,
                ratio(v.iops, q.iops),
                v.p50,
                q.p50,
                v.cpu_us,
                q.cpu_us
            );
        }
    }
    md.push('\n');
    Ok(md)
}
