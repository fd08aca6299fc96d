//! Running the measurements: preparing the image, starting a backend, and one run of the load
//! generator or of fio, each giving one [`Sample`].

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{cpu_ticks, pinned, ticks_per_second};
use crate::workloads::{Backend, Workload};
use crate::Options;

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub iops: f64,
    pub bw: f64,
    pub p50: f64,
    pub p99: f64,
    /// Backend CPU time (user + system) per I/O, in microseconds.
    pub cpu_us: f64,
}

/// A running backend.
pub struct Running {
    child: Child,
    pid: u32,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-storage-daemon serving `work`'s image as the bench's graph (qcow2 metadata over the raw
/// data file), on its own iothread, pinned to the backend's CPU.
pub fn qsd_command(work: &Path, sock: &Path, direct: bool, queues: u32) -> Command {
    let direct = if direct { "on" } else { "off" };
    let mut c = pinned(1, "qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=data,filename={},aio=io_uring,cache.direct={direct}",
            work.join("disk.raw").display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=meta,filename={}",
            work.join("meta.qcow2").display()
        ))
        .args([
            "--blockdev",
            "driver=qcow2,node-name=fmt,file=meta,data-file=data",
        ])
        .args(["--object", "iothread,id=io0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path={},writable=on,\
             num-queues={queues},iothread=io0",
            sock.display()
        ));
    c
}

/// Start `backend` serving the prepared image for workload `w`, and wait until its socket is up.
pub fn start_backend(
    backend: Backend,
    o: &Options,
    work: &Path,
    w: &Workload,
) -> Result<Running, String> {
    let queues = w.queues;
    let sock = work.join("bench.sock");
    let _ = fs::remove_file(&sock);
    let mut cmd = match backend {
        Backend::Vubd | Backend::VubdWithout(_) => {
            let binary = match backend {
                Backend::VubdWithout(baseline) => format!("{}/release/vubd", baseline.target_dir()),
                _ => "target/release/vubd".to_string(),
            };
            let mut c = pinned(1, &binary);
            c.args(["serve", "--socket"])
                .arg(&sock)
                .arg("--image")
                .arg(work.join("meta.qcow2"))
                .args(["--format", "qcow2", "--num-queues", &queues.to_string()])
                .args(["--cache", if o.direct { "none" } else { "writeback" }])
                .args(&o.vubd_args)
                .args(w.vubd_args);
            c
        }
        Backend::Qsd => qsd_command(work, &sock, o.direct, queues),
        Backend::FioUring | Backend::FioSync => return Err("fio is not a backend".into()),
    };
    spawn_backend(&mut cmd, backend.name(), &sock)
}

/// Start `cmd`, a backend serving `sock`, and wait until the socket is up.
pub fn spawn_backend(cmd: &mut Command, name: &str, sock: &Path) -> Result<Running, String> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))?;
    let pid = child.id();
    let running = Running { child, pid };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(format!("{name} did not start"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(running)
}

/// One run of workload `w` against a running backend, with the backend's CPU time per I/O;
/// `extra` goes to the load generator.
pub fn run_loadgen(
    o: &Options,
    work: &Path,
    w: &Workload,
    backend: &Running,
    extra: &[String],
) -> Result<Sample, String> {
    let before = cpu_ticks(backend.pid);
    let out = pinned(0, "target/release/examples/loadgen")
        .arg("--socket")
        .arg(work.join("bench.sock"))
        .args(["--rw", w.rw, "--bs", w.bs])
        .args([
            "--iodepth",
            &w.iodepth.to_string(),
            "--queues",
            &w.queues.to_string(),
        ])
        .args(["--runtime", &o.runtime.to_string(), "--json"])
        .args(extra)
        .output()
        .map_err(|e| format!("loadgen: {e}"))?;
    let after = cpu_ticks(backend.pid);
    if !out.status.success() {
        return Err(format!("loadgen: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("loadgen JSON: {e}"))?;
    let ios = v["ios"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(Sample {
        iops: v["iops"].as_f64().unwrap_or(0.0),
        bw: v["bw_bytes"].as_f64().unwrap_or(0.0),
        p50: v["lat_us"]["p50"].as_f64().unwrap_or(0.0),
        p99: v["lat_us"]["p99"].as_f64().unwrap_or(0.0),
        cpu_us: (after - before) as f64 / ticks_per_second() * 1e6 / ios,
    })
}

/// Write the whole disk of `size_mib` MiB once, 1 MiB at a time (depth 8), through `backend`:
/// reads then find data, and every granule of the bitmap is dirty.
pub fn fill_once(o: &Options, work: &Path, backend: &Running, size_mib: u64) -> Result<(), String> {
    let w = crate::workloads::workload("fill", "write", "1M", 8, &[]);
    let fill = Options {
        runtime: 600,
        ..o.clone()
    };
    run_loadgen(
        &fill,
        work,
        &w,
        backend,
        &["--ios".into(), size_mib.to_string()],
    )?;
    Ok(())
}

/// One run of workload `w` with fio straight on the data file: the limit. fio stands for a
/// backend with no virtio in between, so it runs on the backend's CPU.
pub fn run_fio(o: &Options, work: &Path, w: &Workload, engine: Backend) -> Result<Sample, String> {
    let engine = if engine == Backend::FioSync {
        "psync"
    } else {
        "io_uring"
    };
    let out = pinned(1, "fio")
        .args(["--name=limit", "--time_based"])
        .arg(format!("--ioengine={engine}"))
        .args(["--group_reporting"])
        .arg(format!("--filename={}", work.join("disk.raw").display()))
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        // A synchronous engine has one I/O in flight per job whatever the depth (fio says so on
        // stdout, ahead of the JSON, if asked for more).
        .arg(format!(
            "--iodepth={}",
            if engine == "psync" { 1 } else { w.iodepth }
        ))
        .arg(format!("--numjobs={}", w.queues))
        .arg(format!("--runtime={}", o.runtime))
        .arg(format!("--direct={}", u8::from(o.direct)))
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio: {}", String::from_utf8_lossy(&out.stderr)));
    }
    // fio may print notes before the JSON document.
    let json = out
        .stdout
        .iter()
        .position(|&b| b == b'{')
        .map_or(&[][..], |at| &out.stdout[at..]);
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    let side = if w.rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Sample {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bw: side["bw_bytes"].as_f64().unwrap_or(0.0),
        p50: pct("50.000000"),
        p99: pct("99.000000"),
        cpu_us: 0.0,
    })
}

/// Run an offline `vubd` command (`create`, `bitmap`).
pub fn vubd_offline(args: &[&str]) -> Result<(), String> {
    let out = Command::new("target/release/vubd")
        .args(args)
        .output()
        .map_err(|e| format!("vubd: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "vubd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Create `disk.raw` in `work` (`size_mib` MiB of random data, not holes; or a sparse file
/// with `sparse`) and the qcow2 metadata `meta.qcow2` beside it.
pub fn prepare_image(work: &Path, size_mib: u64, sparse: bool) -> Result<(), String> {
    fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let disk = work.join("disk.raw");
    if sparse {
        fs::File::create(&disk)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(|e| format!("{}: {e}", disk.display()))?;
    } else {
        let status = Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("of={}", disk.display()))
            .arg(format!("count={size_mib}"))
            .status()
            .map_err(|e| format!("dd: {e}"))?;
        if !status.success() {
            return Err("dd failed".into());
        }
    }
    let meta = work.join("meta.qcow2");
    vubd_offline(&[
        "create",
        meta.to_str().ok_or("non-UTF-8 path")?,
        "--data-file",
        disk.to_str().ok_or("non-UTF-8 path")?,
    ])
}

/// The bench's image, with one enabled persistent bitmap.
pub fn prepare(o: &Options, work: &Path) -> Result<(), String> {
    prepare_image(work, o.size_mib, false)?;
    let meta = work.join("meta.qcow2");
    vubd_offline(&[
        "bitmap",
        meta.to_str().ok_or("non-UTF-8 path")?,
        "add",
        "backup",
    ])
}
