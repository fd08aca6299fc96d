//! A throwaway single-host Ceph cluster (`scripts/ceph-test-cluster.sh`) for the RBD tests,
//! stopped and removed when the guard drops, and the `rbd`/`qemu-img` calls the tests make on
//! it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster in its own directory.
pub struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-test-cluster.sh")
}

impl Cluster {
    /// Start a cluster in a fresh directory named after `name` (a monitor, a memstore OSD,
    /// pool `rbd`); panics with the script's message if it cannot.
    pub fn start(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("vubd-ceph-{name}-{}", std::process::id()));
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/ceph-test-cluster.sh");
        assert!(
            out.status.success(),
            "starting a Ceph test cluster failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.join("ceph.conf");
        Cluster { dir, conf }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// QEMU's legacy name of `pool/image` on this cluster (`rbd:pool/image:conf=...`).
    pub fn name(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf.display())
    }

    /// The `--blockdev` options of an rbd node for `image` (node name aside).
    pub fn blockdev(&self, image: &str) -> String {
        format!(
            "driver=rbd,pool=rbd,image={image},conf={}",
            self.conf.display()
        )
    }

    /// QEMU's `--image-opts` of a qcow2 image on `meta` with its data file on `data`, both
    /// on this cluster (QEMU does not follow the data file name a qcow2 image on RBD stores).
    pub fn qcow2_opts(&self, meta: &str, data: &str) -> String {
        let conf = self.conf.display();
        format!(
            "driver=qcow2,file.driver=rbd,file.pool=rbd,file.image={meta},file.conf={conf},\
             data-file.driver=rbd,data-file.pool=rbd,data-file.image={data},data-file.conf={conf}"
        )
    }

    /// Send `signal` to the OSD (SIGSTOP stalls the cluster's only data server, SIGCONT
    /// resumes it).
    pub fn signal_osd(&self, signal: i32) {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("the OSD's pid");
        let pid: i32 = pid.trim().parse().expect("a pid");
        // SAFETY: kill(2) on the test cluster's own OSD.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal the OSD");
    }

    /// Run `rbd -c CONF ARGS...`; its stdout, or a panic with its stderr.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Create `rbd/image` of `size` (as `rbd create --size` takes it) with the default
    /// features (exclusive-lock included).
    pub fn create(&self, image: &str, size: &str) {
        self.rbd(&["create", "--size", size, &format!("rbd/{image}")]);
    }

    /// The whole of `rbd/image`, read by qemu-img (QEMU's rbd driver, the oracle).
    pub fn read_image(&self, image: &str, scratch: &Path) -> Vec<u8> {
        let out = scratch.join(format!("{image}.export.raw"));
        super::qemu::qemu_img(
            scratch,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &self.name(image),
                out.to_str().expect("utf-8 path"),
            ],
        );
        let data = std::fs::read(&out).expect("read the exported image");
        let _ = std::fs::remove_file(&out);
        data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}
