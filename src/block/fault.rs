//! Fault injection for crash tests, in the spirit of QEMU's `blkdebug`: a [`FaultInjector`]
//! attached to protocol nodes (the image file, the data file) sees every write, sync and named
//! metadata step they perform, and at a chosen point fails a write or simulates a power loss.
//!
//! A power loss keeps what was synced and loses what was written since, or only a chosen part
//! of it: every write since its file's last sync is journaled with the bytes it replaced, and at
//! the cut the lost ones are undone in the file. From then on the injector is *dead*: writes and
//! syncs fail and change nothing, as if the machine had stopped; the test then drops the graph
//! and opens the files again, as the next boot would.
//!
//! Transfers the I/O engine makes straight to a file's descriptor (guest data) are not
//! journaled: they count as having reached the disk, which is the harder case for metadata
//! (bitmap marks, L2 entries) that must not lag behind the data they describe.
//!
//! Test-facing: nothing in the daemon attaches an injector.

use std::io;
use std::sync::{Arc, Mutex};

/// When a rule fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// At the `n`th write (counting from 1) to any file the injector watches, before it.
    Write(u64),
    /// At the `n`th sync, before it.
    Sync(u64),
    /// At the `n`th occurrence of a named metadata step. qcow2 names its steps as QEMU's
    /// blkdebug does where there is one — `cluster_alloc`, `cluster_free`, `cow_write`,
    /// `l1_update`, `l2_alloc_write`, `l2_update`, `refblock_alloc`,
    /// `refblock_alloc_switch_table`, `refblock_update` — and its bitmap steps
    /// `bitmap_data`, `bitmap_table`, `bitmap_directory`, `bitmap_switch` (the header
    /// write that switches to a new bitmap directory), `bitmap_free` (the old structures) and
    /// `bitmap_commit` (a group commit writing marks in place).
    Event(&'static str, u64),
}

/// What is kept of the writes since the last sync when power is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: every unsynced write is lost.
    None,
    /// Every unsynced write reached the disk.
    All,
    /// The writes with these indices (0-based, in the order they were made since the sync).
    Only(Vec<usize>),
}

/// What happens when the rule fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The write (or sync) fails with `EIO`; everything else goes on.
    Fail,
    /// Power is lost just before the write (or sync): `Keep` says which unsynced writes
    /// survive.
    PowerLoss(Keep),
}

/// One rule: when and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub trigger: Trigger,
    pub action: Action,
}

/// A journaled write: which file, where, what it replaced, what it wrote.
struct Journaled {
    file: usize,
    offset: u64,
    old: Vec<u8>,
    new: Vec<u8>,
    /// The file's size before the write (a write past the end grows it).
    old_size: u64,
}

#[derive(Default)]
struct State {
    rule: Option<Rule>,
    writes: u64,
    syncs: u64,
    events: Vec<(&'static str, u64)>,
    journal: Vec<Journaled>,
    dead: bool,
    fired: bool,
    /// Files seen, by the descriptor they were registered with.
    files: Vec<std::os::fd::RawFd>,
}

/// Watches the files of a graph; see the module documentation.
#[derive(Default)]
pub struct FaultInjector {
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("FaultInjector")
            .field("rule", &s.rule)
            .field("writes", &s.writes)
            .field("syncs", &s.syncs)
            .field("dead", &s.dead)
            .finish()
    }
}

/// Counts of what an injector has seen, for a test to find its cut points.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub writes: u64,
    pub syncs: u64,
    pub events: Vec<(&'static str, u64)>,
}

fn dead() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "power lost (fault injection)")
}

impl FaultInjector {
    /// An injector that only counts.
    pub fn counting() -> Arc<Self> {
        Arc::new(FaultInjector::default())
    }

    /// An injector that applies `rule`.
    pub fn new(rule: Rule) -> Arc<Self> {
        let injector = FaultInjector::default();
        injector.lock().rule = Some(rule);
        Arc::new(injector)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was seen so far.
    pub fn counts(&self) -> Counts {
        let s = self.lock();
        Counts {
            writes: s.writes,
            syncs: s.syncs,
            events: s.events.clone(),
        }
    }

    /// Whether the rule fired.
    pub fn fired(&self) -> bool {
        self.lock().fired
    }

    /// Whether power was lost.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    fn file_index(state: &mut State, fd: std::os::fd::RawFd) -> usize {
        match state.files.iter().position(|f| *f == fd) {
            Some(i) => i,
            None => {
                state.files.push(fd);
                state.files.len() - 1
            }
        }
    }

    /// A file node writes `buf` at `offset` of `fd`: journal it, or apply the rule. An error
    /// means the write must not happen (it fails, or power is lost).
    pub(crate) fn before_write(
        &self,
        fd: std::os::fd::RawFd,
        offset: u64,
        buf: &[u8],
    ) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        s.writes += 1;
        let n = s.writes;
        let fires = matches!(&s.rule, Some(Rule { trigger: Trigger::Write(at), .. }) if *at == n);
        if fires && self.fire(&mut s)? {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = Self::file_index(&mut s, fd);
        let old_size = file_size(fd)?;
        let mut old = vec![0u8; buf.len()];
        // What the write replaces (zeroes past the end of the file).
        // SAFETY: pread into a buffer of its length on a descriptor the caller holds open.
        let got = unsafe { libc::pread(fd, old.as_mut_ptr().cast(), old.len(), offset as i64) };
        if got < 0 {
            old.clear();
        } else {
            old.truncate(got as usize);
        }
        s.journal.push(Journaled {
            file,
            offset,
            old,
            new: buf.to_vec(),
            old_size,
        });
        Ok(())
    }

    /// A file node syncs `fd`: its journaled writes are durable from now on.
    pub(crate) fn before_sync(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        s.syncs += 1;
        let n = s.syncs;
        let fires = matches!(&s.rule, Some(Rule { trigger: Trigger::Sync(at), .. }) if *at == n);
        if fires && self.fire(&mut s)? {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = Self::file_index(&mut s, fd);
        s.journal.retain(|j| j.file != file);
        Ok(())
    }

    /// A named metadata step is about to happen.
    pub(crate) fn event(&self, name: &'static str) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(dead());
        }
        let n = match s.events.iter_mut().find(|(e, _)| *e == name) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                s.events.push((name, 1));
                1
            }
        };
        let fires = matches!(&s.rule, Some(Rule { trigger: Trigger::Event(e, at), .. }) if *e == name && *at == n);
        if fires && self.fire(&mut s)? {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Apply the rule now. Returns whether the operation at hand must fail (and not happen).
    fn fire(&self, s: &mut State) -> io::Result<bool> {
        s.fired = true;
        match s.rule.as_ref().map(|r| r.action.clone()) {
            None => Ok(false),
            Some(Action::Fail) => Ok(true),
            Some(Action::PowerLoss(keep)) => {
                self.lose_power(s, &keep)?;
                Err(dead())
            }
        }
    }

    /// Undo the unsynced writes `keep` does not keep, and stop.
    fn lose_power(&self, s: &mut State, keep: &Keep) -> io::Result<()> {
        let kept = |i: usize| match keep {
            Keep::None => false,
            Keep::All => true,
            Keep::Only(list) => list.contains(&i),
        };
        // Back to the synced state (newest first), then forward with what is kept.
        for j in s.journal.iter().rev() {
            let fd = s.files[j.file];
            pwrite_all(fd, &j.old, j.offset)?;
            if file_size(fd)? > j.old_size {
                // SAFETY: ftruncate on a descriptor the journal's file node holds open.
                if unsafe { libc::ftruncate(fd, j.old_size as i64) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        for (i, j) in s.journal.iter().enumerate() {
            if kept(i) {
                pwrite_all(s.files[j.file], &j.new, j.offset)?;
            }
        }
        s.journal.clear();
        s.dead = true;
        Ok(())
    }
}

fn file_size(fd: std::os::fd::RawFd) -> io::Result<u64> {
    // SAFETY: fstat into a zeroed stat on a descriptor the caller holds open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

fn pwrite_all(fd: std::os::fd::RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        // SAFETY: pwrite from a live buffer on a descriptor the journal's file node holds.
        let n = unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as i64,
            )
        };
        if n <= 0 {
            return Err(io::Error::last_os_error());
        }
        done += n as usize;
    }
    Ok(())
}
