//! A Linux guest under QEMU (TCG) for the tests that act on a running VM around vubd:
//! restarting vubd under it (`tests/vmm_restart.rs`) and live-migrating it
//! (`tests/live_migration.rs`). The console is a socket the test both reads and types into, so
//! that the guest can wait for the host (the guest has no other way to learn that a migration
//! is over); QMP is a second socket. The guest's load is rounds of fio with verification
//! ([`FioLoad`]).
//!
//! Every wait has a deadline and returns the console and QEMU's own output when it expires: a
//! stuck guest or QEMU fails the test, never hangs it.

// Each test file is its own crate and uses a part of this.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::qmp::Qmp;
use crate::kit::{find_kit, GuestKit};

/// Guest RAM: the ~90 MB initramfs (fio brings its libraries) is held twice while the kernel
/// unpacks it, which 256 MiB cannot fit. A live migration under TCG still copies this in
/// seconds: most of it is zero pages.
pub const GUEST_MEMORY_MIB: u32 = 512;

/// A fio round takes 2-3 s under TCG here; one stuck this long fails the test.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// Printed by the guest once its first fio round starts.
pub const FIO_RUNNING: &str = "VUBD-FIO-RUNNING";
/// Printed by the guest when a fio round failed (followed by fio's output before it).
pub const FIO_FAILED: &str = "VUBD-FIO-FAILED";
/// Printed by the guest after each clean fio round, with its number and fio's I/O counts.
pub const ROUND_MARKER: &str = "VUBD-FIO-ROUND ";
/// Printed by the guest when the host's `stop` ended the rounds, all clean.
pub const FIO_DONE: &str = "VUBD-FIO-DONE";
/// Printed by the guest at the very end if fio and the kernel log were clean.
pub const GUEST_OK: &str = "VUBD-GUEST-OK";
/// Printed by the guest's /init after the script, with its exit status.
pub const GUEST_END: &str = "VUBD-GUEST-END status=";

/// The guest kit, or `None` (the test then passes, saying so) when a piece is missing, unless
/// VUBD_REQUIRE_GUEST=1 (as `make test` sets), where a missing piece fails the test. The
/// same rule as `tests/qemu_guest.rs`.
pub fn kit_or_skip(test: &str) -> Option<GuestKit> {
    match find_kit() {
        Ok(kit) => Some(kit),
        Err(why) if std::env::var("VUBD_REQUIRE_GUEST").as_deref() != Ok("1") => {
            eprintln!("skipping {test}: {why}");
            None
        }
        Err(why) => panic!("{test} required but cannot run: {why}"),
    }
}

/// How to start one QEMU.
pub struct VmSpec<'a> {
    /// Names the VM in file names and messages ("source", "destination").
    pub name: &'a str,
    pub dir: &'a Path,
    pub initrd: &'a Path,
    pub vhost_socket: &'a Path,
    pub num_queues: u32,
    /// `reconnect-ms` of the vhost-user chardev: QEMU reconnects to a backend that went away.
    pub reconnect_ms: Option<u32>,
    /// `-incoming` for the destination of a live migration.
    pub incoming: Option<&'a str>,
}

/// A running QEMU with its console and QMP sockets.
pub struct Vm {
    pub name: String,
    child: Child,
    console: Arc<Mutex<Vec<u8>>>,
    /// Where the test types (the reader thread has a clone of the same socket).
    console_in: Option<UnixStream>,
    qmp_socket: PathBuf,
    log: PathBuf,
}

impl Vm {
    pub fn start(kit: &GuestKit, spec: &VmSpec) -> Vm {
        let console_socket = spec.dir.join(format!("{}-console.sock", spec.name));
        let qmp_socket = spec.dir.join(format!("{}-qmp.sock", spec.name));
        let log = spec.dir.join(format!("{}-qemu.log", spec.name));
        let log_file = fs::File::create(&log).expect("QEMU log file");
        let mut vhost = format!("socket,id=vub,path={}", spec.vhost_socket.display());
        if let Some(ms) = spec.reconnect_ms {
            let _ = write!(vhost, ",reconnect-ms={ms}");
        }
        let mut command = Command::new(&kit.qemu);
        command
            .args(["-accel", "tcg", "-smp", "2", "-no-reboot", "-nodefaults"])
            .args(["-display", "none", "-m", &format!("{GUEST_MEMORY_MIB}M")])
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(spec.initrd)
            // init_on_alloc=0 (Debian turns it on): a page the guest allocates for a device to
            // fill stays untouched by its vCPUs, so that only the device's write changes it,
            // a write QEMU's own dirty tracking never sees. The migration test needs that.
            .args(["-append", "console=ttyS0 quiet panic=-1 init_on_alloc=0"])
            // vubd maps guest RAM: it must be shared memory.
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={GUEST_MEMORY_MIB}M,share=on"),
                "-machine",
                "memory-backend=mem",
            ])
            // wait=on: QEMU starts the guest only once the test reads the console, so no
            // output is lost (a socket chardev with no client drops what the guest writes).
            .arg("-chardev")
            .arg(format!(
                "socket,id=con,path={},server=on,wait=on",
                console_socket.display()
            ))
            .args(["-serial", "chardev:con"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            .arg("-chardev")
            .arg(vhost)
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=vub,num-queues={}",
                spec.num_queues
            ));
        if let Some(incoming) = spec.incoming {
            command.args(["-incoming", incoming]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("QEMU log file"))
            .stderr(log_file)
            .spawn()
            .expect("start qemu-system-x86_64");
        let mut vm = Vm {
            name: spec.name.to_string(),
            child,
            console: Arc::default(),
            console_in: None,
            qmp_socket,
            log,
        };
        // On failure `vm` is dropped with the panic, which kills QEMU.
        let stream = vm
            .connect_console(&console_socket)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut reader = stream.try_clone().expect("console socket");
        let console = vm.console.clone();
        // The reader thread ends when QEMU closes the console (it exits or is killed).
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => console.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        vm.console_in = Some(stream);
        vm
    }

    fn connect_console(&mut self, path: &Path) -> Result<UnixStream, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = UnixStream::connect(path) {
                return Ok(stream);
            }
            if let Some(status) = self.child.try_wait().expect("wait QEMU") {
                return Err(format!(
                    "{} QEMU exited with {status}:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} QEMU never opened its console socket:\n{}",
                    self.name,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the guest wrote on its console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).replace('\r', "")
    }

    /// QEMU's own stdout and stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The console's last lines and QEMU's output, for failure messages.
    pub fn describe(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(100)..].join("\n");
        format!(
            "--- {name} console (tail) ---\n{tail}\n--- {name} QEMU output ---\n{}",
            self.log(),
            name = self.name
        )
    }

    /// Type `line` on the guest's console.
    pub fn send_line(&mut self, line: &str) {
        self.console_in
            .as_mut()
            .expect("console connected")
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("typing on the {} console: {e}", self.name));
    }

    /// Wait until `done` holds of the console (`what` names it for the message). `Err` if QEMU
    /// exits or `timeout` passes before.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.console()) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().expect("wait QEMU") {
                // Let the reader thread take the last output before judging it.
                std::thread::sleep(Duration::from_millis(200));
                if done(&self.console()) {
                    return Ok(());
                }
                return Err(format!(
                    "{} QEMU exited with {status} before {what}\n{}",
                    self.name,
                    self.describe()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} console: no {what} within {timeout:?}\n{}",
                    self.name,
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until one of `markers` is on the console; returns the index of the one that came
    /// first. `Err` if QEMU exits or `timeout` passes before.
    pub fn wait_for(&mut self, markers: &[&str], timeout: Duration) -> Result<usize, String> {
        let first = |console: &str| {
            markers
                .iter()
                .enumerate()
                .filter_map(|(i, m)| console.find(m).map(|at| (at, i)))
                .min()
                .map(|(_, i)| i)
        };
        self.wait_until(&format!("{markers:?}"), timeout, |c| first(c).is_some())?;
        Ok(first(&self.console()).expect("a marker was seen"))
    }

    /// Wait for the guest's next fio round ([`FioLoad`]) to end, clean (`after` names the
    /// moment for the message). `Err` if a round fails, the script ends, or no round ends
    /// within [`ROUND_TIMEOUT`].
    pub fn wait_round_end(&mut self, after: &str) -> Result<(), String> {
        let done = FioLoad::rounds_done(&self.console());
        self.wait_until(
            &format!("fio round end after {after}"),
            ROUND_TIMEOUT,
            |c| c.contains(FIO_FAILED) || c.contains(GUEST_END) || FioLoad::rounds_done(c) > done,
        )?;
        let console = self.console();
        if console.contains(FIO_FAILED) || console.contains(GUEST_END) {
            return Err(format!(
                "no clean round after {after}:\n{}",
                self.describe()
            ));
        }
        Ok(())
    }

    /// Let the guest run for `time`; `Err` if QEMU exits or one of `failures` shows on the
    /// console meanwhile.
    pub fn run_for(&mut self, time: Duration, failures: &[&str]) -> Result<(), String> {
        match self.wait_for(failures, time) {
            Ok(i) => Err(format!(
                "{} console shows {}\n{}",
                self.name,
                failures[i],
                self.describe()
            )),
            Err(_) if self.running() => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Wait for QEMU to exit (the guest powers off at the end of its script).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait QEMU") {
                // Let the reader thread take the last output.
                std::thread::sleep(Duration::from_millis(200));
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} QEMU still running after {timeout:?}\n{}",
                    self.name,
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// QMP, negotiated within `timeout`.
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp, String> {
        Qmp::connect_within(&self.qmp_socket, timeout)
            .map_err(|e| format!("{} QMP: {e}\n{}", self.name, self.describe()))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's load: rounds of fio writing and verifying (crc32c) 4 KiB random blocks over two
/// adjacent regions of `job_size` bytes from `offset`, one job per region pinned to one vCPU,
/// so that both virtqueues carry I/O (blk-mq maps a queue per CPU). Each job owns its region:
/// jobs sharing blocks would overwrite each other's verify headers. A round writes every block
/// of both regions once and reads each back (`verify_backlog`, so the check runs alongside
/// the writes); rounds go on until the host types `stop` on the console, so that the load
/// lasts as long as the host needs, whatever the speed of the machine. Any other word `W`
/// typed runs the shell function `cmd_W`, which the script defines before the load, between
/// two rounds. fio leaves the page cache alone (`invalidate=0`): by default it flushes the
/// whole block device's cache as each round starts, which would empty the cache the migration
/// test fills and reads back.
pub struct FioLoad {
    pub offset: u64,
    pub job_size: u64,
}

const BLOCK: u64 = 4096;

impl FioLoad {
    /// The bytes fio writes, every round.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + 2 * self.job_size
    }

    /// The guest script's load part: prints [`FIO_RUNNING`], then [`FIO_DONE`] or, with fio's
    /// output, [`FIO_FAILED`] (and exits 1). The console does not echo what the host types,
    /// which could land in the middle of a line the test parses.
    pub fn script(&self) -> String {
        let mib = |b: u64| format!("{}M", b >> 20);
        format!(
            "busybox stty -echo\n\
             echo {FIO_RUNNING}\n\
             round=0\n\
             while :; do\n\
             \x20   round=$((round + 1))\n\
             \x20   fio --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
                 --iodepth=8 --size={size} --verify=crc32c --do_verify=1 --verify_backlog=256 \
                 --verify_fatal=1 --verify_state_save=0 --invalidate=0 --group_reporting \
                 --name=q0 --offset={first} --cpus_allowed=0 \
                 --name=q1 --offset={second} --cpus_allowed=1 </dev/null >/tmp/fio.out 2>&1\n\
             \x20   rc=$?\n\
             \x20   if [ $rc -ne 0 ] || grep -qiE 'err= *[1-9]|fio: |error|verify|bad magic' /tmp/fio.out; then\n\
             \x20       cat /tmp/fio.out\n\
             \x20       echo \"{FIO_FAILED} round=$round rc=$rc\"\n\
             \x20       exit 1\n\
             \x20   fi\n\
             \x20   echo \"{ROUND_MARKER}$round $(grep -o 'issued rwts: total=[0-9]*,[0-9]*' /tmp/fio.out)\"\n\
             \x20   if read -t 0.2 line; then\n\
             \x20       [ \"$line\" = stop ] && break\n\
             \x20       [ -n \"$line\" ] && cmd_$line\n\
             \x20   fi\n\
             done\n\
             echo \"{FIO_DONE} rounds=$round\"\n",
            size = mib(self.job_size),
            first = mib(self.offset),
            second = mib(self.offset + self.job_size),
        )
    }

    /// How many rounds have ended (clean) on `console`.
    pub fn rounds_done(console: &str) -> usize {
        console
            .lines()
            .filter(|l| l.starts_with(ROUND_MARKER))
            .count()
    }

    /// Check every round's counts on `console`: each wrote every block of both regions and
    /// read as many back to verify them. Returns how many rounds ran.
    pub fn check_rounds(&self, console: &str) -> Result<usize, String> {
        let blocks = 2 * self.job_size / BLOCK;
        let mut rounds = 0;
        for line in console.lines().filter(|l| l.starts_with(ROUND_MARKER)) {
            let counts = line
                .split_once("total=")
                .map(|(_, c)| c.trim())
                .ok_or_else(|| format!("no fio counts in {line:?}"))?;
            let expected = format!("{blocks},{blocks}");
            if counts != expected {
                return Err(format!(
                    "fio round {line:?}: reads,writes {counts}, expected {expected}"
                ));
            }
            rounds += 1;
        }
        Ok(rounds)
    }
}

/// The end of every guest script: prints the interrupt counts of the disk's queues (see
/// [`queue_interrupts`]), fails if the kernel logged a block I/O error (the guest must never
/// see one, whatever happens to the backend), else prints [`GUEST_OK`].
pub const GUEST_CHECKS: &str = "\
grep -E 'virtio[0-9]+-req' /proc/interrupts\n\
if busybox dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|Buffer I/O|virtio_blk.*(err|fail)'; then\n\
    echo VUBD-KERNEL-IO-ERRORS\n\
    exit 1\n\
fi\n\
echo VUBD-GUEST-OK\n";

/// Completions per virtqueue of the disk, from the guest's /proc/interrupts as [`GUEST_CHECKS`]
/// prints it (virtio-blk has a vector per queue): every queue carried I/O if none is zero.
pub fn queue_interrupts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("-req."))
        .map(|l| {
            // "IRQ:  count-cpu0  count-cpu1  PCI-MSIX-...  virtio1-req.0"
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
        .collect()
}

/// Console lines that mean the guest saw an I/O error.
pub const IO_ERROR_SIGNS: [&str; 4] = [
    "I/O error",
    "blk_update_request",
    "print_req_error",
    "VUBD-KERNEL-IO-ERRORS",
];

/// Assert that `console` shows a clean end: [`GUEST_OK`], exit status 0, no I/O error.
pub fn assert_guest_clean(console: &str, context: &str) {
    for sign in IO_ERROR_SIGNS {
        assert!(
            !console.contains(sign),
            "the guest saw an I/O error ({sign:?}):\n{context}"
        );
    }
    assert!(
        !console.contains(FIO_FAILED),
        "fio failed in the guest:\n{context}"
    );
    assert!(
        console.contains(GUEST_OK) && console.contains(&format!("{GUEST_END}0")),
        "the guest script did not end clean:\n{context}"
    );
}
