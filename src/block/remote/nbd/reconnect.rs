//! Where commands go, and what happens when a connection breaks: QEMU's `reconnect-delay`
//! semantics (qapi/block-core.json, `BlockdevOptionsNbd`).
//!
//! When a connection breaks (EOF, reset, a protocol error, `NBD_ESHUTDOWN`), its reader
//! thread moves the client out of [`Phase::Connected`] *before* it drains the commands in
//! flight, so a submitter that finds the connection closed always finds the phase changed:
//!
//! * with a `reconnect-delay`, the phase is [`Phase::Waiting`] until the delay passes: the
//!   commands in flight and new ones wait in a list, and are re-sent on the next connection
//!   (reads, writes, flushes, trims and write-zeroes are all safe to send twice). The old
//!   reader stays as the delay's timer: when the delay passes without a connection, the
//!   waiting commands fail with EIO and the phase becomes [`Phase::Failing`];
//! * without one (QEMU's default 0), the phase is [`Phase::Failing`] at once: commands in
//!   flight fail with EIO, never silently lost, and so do new ones until a reconnection.
//!
//! Meanwhile the supervisor thread reconnects, once a second, with the same handshake. A new
//! connection must serve what the old one did ([`ExportInfo::compatible`]: in particular the
//! export must not shrink); if it does not, the client gives up for good ([`Phase::Dead`]).
//!
//! Known limit, as in QEMU: writes a server acknowledged but held in a volatile cache are lost
//! if the server process dies, and a flush on the new connection cannot bring them back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cmd::Cmd;
use super::conn::Conn;
use super::error::NbdClientError;
use super::handshake::{establish, Attempt, Config};
use super::info::ExportInfo;
use super::reply::Break;
use super::transport::Receiver;
use crate::thread::spawn_quiet;

/// How often a lost connection is retried (QEMU starts at 1 s and backs off to 16 s; a
/// handshake a second costs a server nothing, and requests waiting on `reconnect-delay` are
/// not kept waiting longer than needed).
pub(super) const RETRY_INTERVAL: Duration = Duration::from_secs(1);

pub(super) enum Phase {
    Connected(Arc<Conn>),
    /// The connection broke `epoch`'s time; commands wait until `until`.
    Waiting {
        until: Instant,
        epoch: u64,
    },
    /// The connection is lost and the delay passed: commands fail at once.
    Failing,
    /// A reconnection found an incompatible export; nothing will be sent again.
    Dead,
    /// The client is being dropped.
    Closing,
}

pub(super) struct State {
    pub phase: Phase,
    /// Commands waiting for a connection.
    pub waiting: Vec<Cmd>,
    /// How many times a connection broke.
    epoch: u64,
}

/// What the client's threads and its submitters share.
pub(super) struct Shared {
    pub cfg: Config,
    /// The export as first opened: requests are checked and split by it.
    pub info: ExportInfo,
    pub read_only: bool,
    state: Mutex<State>,
    cond: Condvar,
    cookies: AtomicU64,
    pub attempt: Attempt,
}

impl Shared {
    pub fn new(cfg: Config, info: ExportInfo, read_only: bool, conn: Arc<Conn>) -> Shared {
        Shared {
            cfg,
            info,
            read_only,
            state: Mutex::new(State {
                phase: Phase::Connected(conn),
                waiting: Vec::new(),
                epoch: 0,
            }),
            cond: Condvar::new(),
            cookies: AtomicU64::new(1),
            attempt: Attempt::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn notify(&self) {
        self.cond.notify_all();
    }

    fn wait_for<'a>(&self, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.cond
            .wait_timeout(st, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Send `cmd` on the connection, or queue it while the client waits for one, or fail it.
    pub fn dispatch(&self, mut cmd: Cmd) {
        loop {
            let conn = {
                let mut st = self.lock();
                match &st.phase {
                    Phase::Connected(c) => c.clone(),
                    Phase::Waiting { .. } => {
                        st.waiting.push(cmd);
                        return;
                    }
                    Phase::Failing | Phase::Dead | Phase::Closing => {
                        drop(st);
                        cmd.finish(libc::EIO);
                        return;
                    }
                }
            };
            let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
            match conn.start(cookie, cmd) {
                Ok(()) => return,
                // The connection closed after we looked: the phase has changed since (it
                // changes before a connection closes), look again.
                Err(back) => cmd = back,
            }
        }
    }

    /// Start the reader thread of `conn`.
    pub fn spawn_reader(
        self: &Arc<Self>,
        conn: Arc<Conn>,
    ) -> Result<JoinHandle<()>, NbdClientError> {
        let shared = self.clone();
        let reader = conn.clone();
        spawn_quiet("nbd-reader", move || {
            let why = {
                let mut rx = Receiver::new(&reader.wire);
                reader.receive(&mut rx)
            };
            shared.connection_lost(&reader, why);
        })
        .map_err(|source| {
            conn.fail();
            NbdClientError::Thread {
                server: self.cfg.name.clone(),
                what: "reader",
                source,
            }
        })
    }

    /// The reader of `conn` stopped: leave [`Phase::Connected`], hand its commands on, and
    /// serve as the reconnect delay's timer.
    fn connection_lost(&self, conn: &Arc<Conn>, why: Break) {
        let delay = self.cfg.spec.reconnect_delay;
        let mut epoch = None;
        {
            let mut st = self.lock();
            if matches!(&st.phase, Phase::Connected(c) if Arc::ptr_eq(c, conn)) {
                st.epoch += 1;
                epoch = Some(st.epoch);
                st.phase = if delay.is_zero() {
                    Phase::Failing
                } else {
                    Phase::Waiting {
                        until: Instant::now() + delay,
                        epoch: st.epoch,
                    }
                };
                self.notify();
            }
        }
        if epoch.is_some() {
            if delay.is_zero() {
                log::warn!(
                    "{}: connection lost ({why}); requests fail until it is back \
                     (reconnect-delay=0), reconnecting",
                    self.cfg.name
                );
            } else {
                log::warn!(
                    "{}: connection lost ({why}); requests wait up to reconnect-delay={} s, \
                     reconnecting",
                    self.cfg.name,
                    delay.as_secs()
                );
            }
        }
        if matches!(why, Break::Shutdown) {
            conn.disconnect();
        }
        for entry in conn.drain() {
            match entry.finished {
                Some(errno) => entry.cmd.finish(errno),
                None => self.dispatch(entry.cmd),
            }
        }
        if let (Some(epoch), false) = (epoch, delay.is_zero()) {
            self.expire_waiting(epoch);
        }
    }

    /// Wait for the delay of loss `epoch` to pass; if the client is still waiting for a
    /// connection then, fail what waits and every new command until one is back.
    fn expire_waiting(&self, epoch: u64) {
        let mut st = self.lock();
        loop {
            let Phase::Waiting { until, epoch: e } = st.phase else {
                return;
            };
            if e != epoch {
                return;
            }
            let now = Instant::now();
            if now >= until {
                st.phase = Phase::Failing;
                let waiting = std::mem::take(&mut st.waiting);
                drop(st);
                log::warn!(
                    "{}: not reconnected within reconnect-delay={} s: {} waiting requests \
                     fail with EIO, and new ones until the server is back",
                    self.cfg.name,
                    self.cfg.spec.reconnect_delay.as_secs(),
                    waiting.len()
                );
                for cmd in waiting {
                    cmd.finish(libc::EIO);
                }
                return;
            }
            st = self.wait_for(st, until - now);
        }
    }

    /// Stop for good: every command waiting, and every later one, fails.
    fn give_up(&self, why: &str) {
        let waiting = {
            let mut st = self.lock();
            if matches!(st.phase, Phase::Closing) {
                return;
            }
            st.phase = Phase::Dead;
            self.notify();
            std::mem::take(&mut st.waiting)
        };
        log::error!(
            "{}: reconnected, but {why}: giving up on the export, every request fails from now \
             on; reopen it to serve it again",
            self.cfg.name
        );
        for cmd in waiting {
            cmd.finish(libc::EIO);
        }
    }

    /// The supervisor thread: reconnect whenever the connection is lost, until the client is
    /// dropped. It owns the reader threads and joins them before it returns.
    pub fn supervise(self: &Arc<Self>, first_reader: JoinHandle<()>) {
        let mut readers = vec![first_reader];
        'lost: loop {
            {
                let mut st = self.lock();
                loop {
                    match st.phase {
                        Phase::Connected(_) => {
                            st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner)
                        }
                        Phase::Waiting { .. } | Phase::Failing => break,
                        Phase::Dead | Phase::Closing => break 'lost,
                    }
                }
            }
            let (done, running): (Vec<_>, Vec<_>) =
                readers.into_iter().partition(|h| h.is_finished());
            readers = running;
            for h in done {
                let _ = h.join();
            }
            let mut failures = 0u64;
            loop {
                if self.attempt.closing() {
                    break 'lost;
                }
                match self.reconnect(&mut readers) {
                    Ok(true) => continue 'lost,
                    Ok(false) => break 'lost,
                    Err(e) => {
                        failures += 1;
                        // The first failure and then one a minute: a server down for hours
                        // must not flood the log.
                        if failures == 1 || failures.is_multiple_of(60) {
                            log::warn!("{e} (reconnection attempt {failures})");
                        } else {
                            log::debug!("{e} (reconnection attempt {failures})");
                        }
                    }
                }
                let retry_at = Instant::now() + RETRY_INTERVAL;
                let mut st = self.lock();
                while let Some(left) = retry_at.checked_duration_since(Instant::now()) {
                    if matches!(st.phase, Phase::Closing) || left.is_zero() {
                        break;
                    }
                    st = self.wait_for(st, left);
                }
            }
        }
        // Dead: stay until the client is dropped, so its readers are joined here.
        {
            let mut st = self.lock();
            while !matches!(st.phase, Phase::Closing) {
                st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        }
        for h in readers {
            let _ = h.join();
        }
    }

    /// One reconnection attempt. `Ok(true)`: connected, commands re-sent; `Ok(false)`: the
    /// client stopped (dropped, or gave up on an incompatible export).
    fn reconnect(
        self: &Arc<Self>,
        readers: &mut Vec<JoinHandle<()>>,
    ) -> Result<bool, NbdClientError> {
        let (wire, info) = establish(&self.cfg, &self.attempt)?;
        if let Err(why) = self.info.compatible(&info, !self.read_only) {
            wire.socket().shutdown();
            self.give_up(&why);
            return Ok(false);
        }
        let conn = Arc::new(Conn::new(wire, info));
        readers.push(self.spawn_reader(conn.clone())?);
        let waiting = {
            let mut st = self.lock();
            if matches!(st.phase, Phase::Closing) {
                drop(st);
                conn.fail();
                return Ok(false);
            }
            st.phase = Phase::Connected(conn);
            self.notify();
            std::mem::take(&mut st.waiting)
        };
        log::info!(
            "{}: reconnected; re-sending {} waiting requests",
            self.cfg.name,
            waiting.len()
        );
        for cmd in waiting {
            self.dispatch(cmd);
        }
        Ok(true)
    }
}
