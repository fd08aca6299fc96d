//! One connection in transmission: sending commands, and the table of commands in flight
//! that its reader thread ([`super::reply`]) completes.
//!
//! Ownership of a command's buffers, which is what keeps guest memory safe:
//!
//! * a command enters the table before its request is sent (the reply may come before the
//!   sender returns) and is marked `sending`;
//! * the sender reads a write's buffers only while holding the send lock and only if the
//!   connection is not broken;
//! * the reader writes a read's buffers only while the command is in the table, and it alone
//!   removes commands, so none completes under it;
//! * a command whose reply comes while it is still `sending` (only a broken or hostile server
//!   replies before it has the whole request) is completed by its sender once the send is
//!   over, never while the sender may still read its buffers;
//! * when the connection breaks, [`Conn::drain`] shuts the socket down (any send under way
//!   fails at once), closes the table to new commands, waits out the send lock, and only then
//!   hands the commands left in the table back for re-sending or failing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::cmd::Cmd;
use super::info::ExportInfo;
use super::transport::Wire;
use crate::nbd::wire::{Request, CMD_DISC, CMD_WRITE, REQUEST_MAGIC};

pub(super) struct Conn {
    pub wire: Wire,
    pub info: ExportInfo,
    /// Serialises senders; guards scratch room for TLS records.
    send: Mutex<Vec<u8>>,
    table: Mutex<Table>,
    /// Set once the connection is known to be unusable; senders check it under the send lock.
    broken: AtomicBool,
}

#[derive(Default)]
struct Table {
    /// No more commands may enter (the connection broke).
    closed: bool,
    entries: HashMap<u64, Entry>,
}

/// A command in flight.
pub(super) struct Entry {
    pub cmd: Cmd,
    /// Its sender may still be reading its buffers.
    sending: bool,
    /// Read data bytes received so far (structured replies).
    pub got: u64,
    /// The first error its reply carried (errno; 0: none).
    pub error: i32,
    /// Its reply is complete with this errno, the sender is to finish it.
    pub finished: Option<i32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    pub fn new(wire: Wire, info: ExportInfo) -> Conn {
        Conn {
            wire,
            info,
            send: Mutex::new(Vec::new()),
            table: Mutex::new(Table::default()),
            broken: AtomicBool::new(false),
        }
    }

    /// Send `cmd` as request `cookie`. `Err(cmd)`: the connection is closed to new commands
    /// (it broke); the caller routes the command elsewhere. A send that fails breaks the
    /// connection and leaves the command to [`Conn::drain`].
    pub fn start(&self, cookie: u64, cmd: Cmd) -> Result<(), Cmd> {
        let header = cmd.header(cookie);
        {
            let mut table = lock(&self.table);
            if table.closed {
                return Err(cmd);
            }
            let entry = Entry {
                cmd: cmd.clone(),
                sending: true,
                got: 0,
                error: 0,
                finished: None,
            };
            table.entries.insert(cookie, entry);
        }
        let sent = {
            let mut scratch = lock(&self.send);
            if self.broken.load(Ordering::Acquire) {
                Err(std::io::ErrorKind::NotConnected.into())
            } else {
                let mut pieces = Vec::new();
                if cmd.kind == CMD_WRITE {
                    // SAFETY: the command is in the table marked `sending`, so nothing
                    // finishes it before this send is over; we are its sender.
                    unsafe {
                        cmd.parent
                            .pieces(cmd.at, cmd.len.into(), |p| pieces.push(p))
                    };
                }
                // SAFETY: the pieces are valid for reading (above) until the send returns.
                unsafe { self.wire.send(&mut scratch, &header, &pieces) }
            }
        };
        match sent {
            Ok(()) => {
                let mut table = lock(&self.table);
                if let Some(entry) = table.entries.get_mut(&cookie) {
                    entry.sending = false;
                    if let Some(errno) = entry.finished {
                        table.entries.remove(&cookie);
                        drop(table);
                        cmd.finish(errno);
                    }
                }
            }
            Err(e) => {
                if !self.broken.load(Ordering::Acquire) {
                    log::debug!("NBD send failed: {e}");
                }
                self.fail();
            }
        }
        Ok(())
    }

    /// The command of request `cookie`, if it is in flight.
    pub fn lookup(&self, cookie: u64) -> Option<Cmd> {
        lock(&self.table)
            .entries
            .get(&cookie)
            .map(|e| e.cmd.clone())
    }

    /// Change the entry of `cookie` (if it is in flight) under the table lock.
    pub fn with_entry<R>(&self, cookie: u64, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        lock(&self.table).entries.get_mut(&cookie).map(f)
    }

    /// The reply to `cookie` is complete: finish its command with `errno`, or have its sender
    /// do so once the send is over.
    pub fn settle(&self, cookie: u64, errno: i32) {
        let mut table = lock(&self.table);
        let Some(entry) = table.entries.get_mut(&cookie) else {
            return;
        };
        if entry.sending {
            entry.finished = Some(errno);
            return;
        }
        if let Some(entry) = table.entries.remove(&cookie) {
            drop(table);
            entry.cmd.finish(errno);
        }
    }

    /// Mark the connection unusable and shut its socket down: the reader wakes up and
    /// handles the loss.
    pub fn fail(&self) {
        self.broken.store(true, Ordering::Release);
        self.wire.socket().shutdown();
    }

    /// Take every command still in flight once nothing can touch their buffers any more.
    pub fn drain(&self) -> Vec<Entry> {
        self.fail();
        lock(&self.table).closed = true;
        // A send under way fails at once on the shut-down socket; later ones see `broken`.
        drop(lock(&self.send));
        std::mem::take(&mut lock(&self.table).entries)
            .into_values()
            .collect()
    }

    /// Leave politely when we can (proto.md, "Terminating the transmission phase"):
    /// `NBD_CMD_DISC`, then close the TLS session, then shut the socket down. The courtesy
    /// is skipped if a sender holds the connection (it may be blocked on a full socket).
    pub fn disconnect(&self) {
        if let Ok(mut scratch) = self.send.try_lock() {
            if !self.broken.load(Ordering::Acquire) {
                let disc = Request {
                    magic: REQUEST_MAGIC,
                    flags: 0,
                    kind: CMD_DISC,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                let _ = self
                    .wire
                    .socket()
                    .set_write_timeout(Some(Duration::from_secs(1)));
                // SAFETY: no pieces.
                if unsafe { self.wire.send(&mut scratch, &disc.encode(), &[]) }.is_ok() {
                    self.wire.close_notify(&mut scratch);
                }
            }
        }
        self.fail();
    }
}
