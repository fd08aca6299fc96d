//! qemu-storage-daemon as the reference backend: the command line of a vhost-user-blk export
//! of a qcow2 image, and a guard for a process running it. vubd accepts the same command line,
//! so the guard runs either program; tests that compare the two hand both exactly the same
//! arguments by building them once here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::qmp::Qmp;
use super::{read_stderr, signal_and_wait, vubd_bin};

/// A writable vhost-user-blk export of qcow2 node `fmt` over file node `meta`, with file node
/// `data` as its external data file when there is one.
#[derive(Clone, Debug)]
pub struct Export {
    /// The protocol node options of the image (`driver=file,filename=...`), node name aside.
    meta: String,
    data: Option<String>,
    socket: PathBuf,
    monitor: Option<PathBuf>,
    discard_unmap: bool,
    iothread: bool,
    queues: Option<usize>,
}

impl Export {
    pub fn new(meta: &Path, data: Option<&Path>, socket: &Path) -> Export {
        let file = |p: &Path| format!("driver=file,filename={}", p.display());
        Self::with_protocols(&file(meta), data.map(file).as_deref(), socket)
    }

    /// An export whose image and data file are the protocol nodes `meta` and `data`, given as
    /// `--blockdev` options without `node-name` (`driver=rbd,pool=...`, say).
    pub fn with_protocols(meta: &str, data: Option<&str>, socket: &Path) -> Export {
        Export {
            meta: meta.to_string(),
            data: data.map(str::to_string),
            socket: socket.to_path_buf(),
            monitor: None,
            discard_unmap: false,
            iothread: false,
            queues: None,
        }
    }

    /// Add a QMP monitor on the UNIX socket `path`.
    pub fn monitor(mut self, path: &Path) -> Export {
        self.monitor = Some(path.to_path_buf());
        self
    }

    /// `discard=unmap` on the qcow2 node, so that guest discards reach the image instead of
    /// being dropped by QEMU's default `discard=ignore`.
    pub fn discard_unmap(mut self) -> Export {
        self.discard_unmap = true;
        self
    }

    /// Run the export on its own iothread with one queue, the way qemu-storage-daemon is
    /// deployed.
    pub fn iothread(mut self) -> Export {
        self.iothread = true;
        self
    }

    /// Serve `n` virtqueues (`num-queues`).
    pub fn queues(mut self, n: usize) -> Export {
        self.queues = Some(n);
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The command line, for qemu-storage-daemon or vubd alike.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(monitor) = &self.monitor {
            args.push("--chardev".into());
            args.push(format!(
                "socket,id=mon,path={},server=on,wait=off",
                monitor.display()
            ));
            args.push("--monitor".into());
            args.push("chardev=mon".into());
        }
        args.push("--blockdev".into());
        args.push(format!("{},node-name=meta", self.meta));
        let mut fmt = "driver=qcow2,node-name=fmt,file=meta".to_string();
        if let Some(data) = &self.data {
            args.push("--blockdev".into());
            args.push(format!("{data},node-name=data"));
            fmt.push_str(",data-file=data");
        }
        if self.discard_unmap {
            fmt.push_str(",discard=unmap");
        }
        args.push("--blockdev".into());
        args.push(fmt);
        let mut export = format!(
            "type=vhost-user-blk,id=exp,node-name=fmt,addr.type=unix,addr.path={},writable=on",
            self.socket.display()
        );
        if self.iothread {
            args.push("--object".into());
            args.push("iothread,id=io0".into());
            export.push_str(",num-queues=1,iothread=io0");
        } else if let Some(n) = self.queues {
            export.push_str(&format!(",num-queues={n}"));
        }
        args.push("--export".into());
        args.push(export);
        args
    }
}

/// A running qemu-storage-daemon, or vubd started with qemu-storage-daemon's command line.
/// Dropping it stops it with SIGTERM, so that it releases its image locks and leaves the image
/// clean for whatever runs next.
pub struct Daemon {
    child: Option<Child>,
    name: &'static str,
    socket: PathBuf,
    monitor: Option<PathBuf>,
}

impl Daemon {
    /// Start qemu-storage-daemon in `dir` (where QEMU resolves relative file names).
    pub fn qsd(dir: &Path, export: &Export) -> Daemon {
        Self::start(
            "qemu-storage-daemon",
            "qemu-storage-daemon",
            dir,
            export,
            &[],
        )
    }

    /// Start vubd with the same command line qemu-storage-daemon would get.
    pub fn vubd(dir: &Path, export: &Export) -> Daemon {
        Self::vubd_with(dir, export, &[])
    }

    /// [`Daemon::vubd`] with vubd's own options after qemu-storage-daemon's (`--metrics
    /// unix:PATH`, say).
    pub fn vubd_with(dir: &Path, export: &Export, extra: &[&str]) -> Daemon {
        Self::start("vubd (qsd syntax)", vubd_bin(), dir, export, extra)
    }

    fn start(
        name: &'static str,
        program: &str,
        dir: &Path,
        export: &Export,
        extra: &[&str],
    ) -> Daemon {
        let child = Command::new(program)
            .current_dir(dir)
            .args(export.args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut daemon = Daemon {
            child: Some(child),
            name,
            socket: export.socket.clone(),
            monitor: export.monitor.clone(),
        };
        daemon.wait_for_socket();
        daemon
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self.child_mut().try_wait().expect("wait daemon") {
                let stderr = self.take_stderr();
                panic!("{} exited early with {status}: {stderr}", self.name);
            }
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket file appears at bind(), a moment before the server listens.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// The vhost-user-blk socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connect to the QMP monitor and negotiate capabilities.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(
            self.monitor
                .as_ref()
                .expect("the export has no QMP monitor"),
        )
    }

    /// SIGTERM and wait for the exit; returns its status and stderr.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.finish(libc::SIGTERM)
    }

    /// SIGKILL: the daemon dies the way a crash leaves the image, with nothing cleaned up.
    pub fn kill(mut self) {
        self.finish(libc::SIGKILL);
    }

    fn finish(&mut self, signal: i32) -> (ExitStatus, String) {
        let child = self.child.take().expect("daemon already stopped");
        let stopped = signal_and_wait(child, signal, self.name);
        let _ = fs::remove_file(&self.socket);
        stopped
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already stopped")
    }

    fn take_stderr(&mut self) -> String {
        self.child.as_mut().map(read_stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.finish(libc::SIGTERM);
        } else if let Some(mut child) = self.child.take() {
            // Unwinding from a failed assertion: no second panic, no waiting on a stuck daemon.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
