//! Request execution for one queue: from a popped descriptor chain to a finished request whose
//! status is written and whose used-ring entry waits to be published.
//!
//! A request occupies a [`Slot`] from the moment it is popped until it finishes; the slot keeps
//! the guest memory mapping, the iovecs the kernel reads or writes, and the count of engine
//! operations still in flight. The executor knows nothing of the ring: finished requests are
//! queued as `(head, used length)` pairs that the ring part ([`super::ring`]) puts on the used
//! ring and notifies in batches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::device::BlkDevice;
use super::dirty_log::DirtyLog;
use super::slot::{LocalOp, Slot, SlotOp};
use crate::bitmap::{BitmapCursor, PendingMarks};
use crate::block::file::IoTarget;
use crate::block::io::transfer::Transfer;
use crate::block::io::transfer::{bounce_transfer, fill_zero, finish_short_transfer, is_aligned};
use crate::block::io::{Engine, InlinePolicy, Op};
use crate::block::remote::RemoteOp;
use crate::block::{BlockError, Extent, GuestIo, HostZeroOp, Mapping, ZeroOp};
use crate::error::Chain;
use crate::export::RootCursor;
use crate::iov::Cursor;
use crate::ratelimit::RateLimitedLog;
use crate::stats::{OpKind, QueueStats};
use crate::virtio_blk::request::{self, GuestMemory, Request, RequestKind};
use crate::virtio_blk::{request_type, Status};

/// Whether a request changes the disk (and so passes the write gate and marks bitmaps).
fn modifies(kind: RequestKind) -> bool {
    matches!(
        kind,
        RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes
    )
}

/// What the statistics call a request of `kind` (GET_ID is not counted).
fn op_kind(kind: RequestKind) -> Option<OpKind> {
    match kind {
        RequestKind::Read { .. } => Some(OpKind::Read),
        RequestKind::Write { .. } => Some(OpKind::Write),
        RequestKind::Flush => Some(OpKind::Flush),
        RequestKind::Discard => Some(OpKind::Discard),
        RequestKind::WriteZeroes => Some(OpKind::WriteZeroes),
        RequestKind::GetId => None,
    }
}

/// What the statistics call a request whose header says `request_type`.
fn op_kind_of_type(request_type: u32) -> Option<OpKind> {
    match request_type {
        request_type::IN => Some(OpKind::Read),
        request_type::OUT => Some(OpKind::Write),
        request_type::FLUSH => Some(OpKind::Flush),
        request_type::DISCARD => Some(OpKind::Discard),
        request_type::WRITE_ZEROES => Some(OpKind::WriteZeroes),
        _ => None,
    }
}

/// Executes one queue's requests.
pub struct Executor {
    index: usize,
    device: Arc<BlkDevice>,
    /// Whether the guest enabled the volatile write cache (`writeback` in config space).
    writeback: Arc<AtomicBool>,
    engine: Engine,
    /// Writes held back while the write gate is closed.
    deferred: VecDeque<(u32, Request)>,
    /// Writes waiting for the group commit (epoch) that makes their bitmap marks durable.
    committing: VecDeque<(u32, Request, PendingMarks)>,
    bitmap_cursor: BitmapCursor,
    root: RootCursor,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Finished requests, `(head, used length)`, not yet on the used ring.
    done: Vec<(u16, u32)>,
    extents: Vec<Extent>,
    zero_ops: Vec<HostZeroOp>,
    completions: Vec<(u64, i32)>,
    log: RateLimitedLog,
    /// Live migration's log of the guest memory vubd writes.
    dirty_log: Arc<DirtyLog>,
    /// This queue's statistics; this executor is their only writer.
    stats: Arc<QueueStats>,
}

impl Executor {
    /// An executor for queue `index` whose engine signals `completion_fd` on completions.
    pub fn new(
        index: usize,
        device: Arc<BlkDevice>,
        writeback: Arc<AtomicBool>,
        completion_fd: std::os::fd::RawFd,
        dirty_log: Arc<DirtyLog>,
    ) -> std::io::Result<Self> {
        let export = device.export();
        let bitmap_cursor = export.bitmaps().cursor();
        let root = export.root_cursor();
        let depth = u32::from(device.queue_size());
        let engine = Engine::new(export.engine(), depth * 2, completion_fd)?;
        let stats = export.stats().register(index);
        let slots = (0..depth).map(|_| Slot::new(&device.limits())).collect();
        Ok(Executor {
            index,
            device,
            writeback,
            engine,
            deferred: VecDeque::new(),
            committing: VecDeque::new(),
            bitmap_cursor,
            root,
            slots,
            free: (0..depth).rev().collect(),
            done: Vec::with_capacity(depth as usize),
            extents: Vec::new(),
            zero_ops: Vec::new(),
            completions: Vec::new(),
            log: RateLimitedLog::new(),
            dirty_log,
            stats,
        })
    }

    /// Requests started and not finished.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request can be started.
    pub fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// Writes are held back until the write gate reopens.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Engine operations pushed and not yet reaped.
    pub fn ops_in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Bytes moved inline and not yet reaped (see [`Engine::done_inline_bytes`]).
    pub fn done_inline_bytes(&self) -> u64 {
        self.engine.done_inline_bytes()
    }

    /// Hand every pushed operation to the kernel.
    pub fn submit(&mut self) {
        if let Err(e) = self.engine.submit() {
            log::error!("queue {}: submitting I/O: {e}", self.index);
        }
    }

    /// Block until an operation completes, if any is in flight.
    pub fn wait(&mut self) -> std::io::Result<()> {
        self.engine.wait()
    }

    /// The finished requests not yet taken, in the order they finished.
    pub fn done(&self) -> &[(u16, u32)] {
        &self.done
    }

    /// Take the finished requests, in the order they finished.
    pub fn take_done(&mut self) -> std::vec::Drain<'_, (u16, u32)> {
        self.done.drain(..)
    }

    /// Parse a chain and start its I/O, or answer it at once. The caller checks
    /// [`Executor::has_free_slot`] first.
    pub fn start(
        &mut self,
        head: u16,
        mut chain: impl Iterator<Item = Descriptor>,
        mem: &Arc<GuestMemory>,
    ) {
        let Some(slot_index) = self.free.pop() else {
            return;
        };
        let slot = &mut self.slots[slot_index as usize];
        match request::parse(&mut chain, mem, &self.device.limits(), &mut slot.bufs) {
            Ok(req) => {
                slot.start(head, &req, mem);
                self.stats.start();
                self.begin(slot_index, req);
            }
            Err(err) => {
                self.free.push(slot_index);
                let refused = request::request_type(mem, &slot.bufs).and_then(op_kind_of_type);
                self.stats.invalid(refused);
                match err.status {
                    Some(status) => {
                        self.log.warn(
                            self.index,
                            format_args!("request {head} refused ({:?}): {err}", err.code),
                        );
                        write_status(mem, status, err.code);
                        self.dirty_log.mark(status.0, 1);
                        self.done.push((head, 1));
                    }
                    None => {
                        self.log
                            .warn(self.index, format_args!("request {head} dropped: {err}"));
                        // Return the descriptors so the guest is not left waiting.
                        self.done.push((head, 0));
                    }
                }
            }
        }
    }

    /// Start a validated request: writes pass the write gate and are marked in the dirty
    /// bitmaps first (failed writes stay marked: their data may have partly landed); a write
    /// whose marks are not on disk yet waits for the group commit that puts them there.
    fn begin(&mut self, slot_index: u32, req: Request) {
        if modifies(req.kind) {
            if !self.device.export().bitmaps().gate().try_enter(self.index) {
                // A bitmap operation is draining writes: hold this one until it is done.
                self.deferred.push_back((slot_index, req));
                return;
            }
            self.slots[slot_index as usize].gated = true;
            if let Some(pending) = self.mark(slot_index, req) {
                self.committing.push_back((slot_index, req, pending));
                return;
            }
        }
        self.proceed(slot_index, req);
    }

    /// Execute a request that may go ahead, finishing it at once if it pushed no I/O.
    fn proceed(&mut self, slot_index: u32, req: Request) {
        self.execute(slot_index, req);
        if self.slots[slot_index as usize].io.pending == 0 {
            self.finish(slot_index);
        }
    }

    /// Start the requests held back while the write gate was closed, and those whose group
    /// commit completed. Returns whether the gate is open (nothing is held back by it any more).
    pub fn run_deferred(&mut self) -> bool {
        let mut started = false;
        while let Some(&(slot_index, req, pending)) = self.committing.front() {
            if !self.device.export().bitmaps().committed(pending.epoch) {
                break;
            }
            self.committing.pop_front();
            started = true;
            if !self.confirm(slot_index, req, pending) {
                // The commit ran but the marks are still not on disk: it failed. The write
                // must not reach the disk unrecorded.
                self.log.warn(
                    self.index,
                    format_args!(
                        "{:?} failed: its dirty bitmap marks could not be stored",
                        req.kind
                    ),
                );
                self.slots[slot_index as usize].io.failed = true;
                self.finish(slot_index);
                continue;
            }
            self.proceed(slot_index, req);
        }
        while !self.device.export().bitmaps().gate().is_closed() {
            let Some((slot_index, req)) = self.deferred.pop_front() else {
                break;
            };
            self.begin(slot_index, req);
            started = true;
        }
        if started {
            self.submit();
        }
        self.deferred.is_empty()
    }

    /// Writes wait for a group commit of their dirty bitmap marks.
    pub fn has_committing(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Start the I/O of a validated request.
    fn execute(&mut self, slot_index: u32, req: Request) {
        let driver = self.device.export().current_root(&mut self.root).clone();
        let result = match req.kind {
            RequestKind::Read { offset, len } | RequestKind::Write { offset, len } => {
                let write = matches!(req.kind, RequestKind::Write { .. });
                self.extents.clear();
                let slot = &self.slots[slot_index as usize];
                // SAFETY: the iovecs were validated against guest memory that `slot.mem`
                // keeps mapped, and the request owns them until it completes.
                let guest = unsafe { GuestIo::new(&slot.bufs.iovecs) };
                let mapped = if write {
                    driver.map_write(offset, len, guest, &mut self.extents)
                } else {
                    driver.map_read(offset, len, guest, &mut self.extents)
                };
                mapped.map(|ticket| {
                    self.slots[slot_index as usize].ticket = ticket;
                    self.start_transfer(slot_index, write)
                })
            }
            RequestKind::Flush => driver
                .flush_metadata()
                .map(|()| self.start_sync(slot_index)),
            RequestKind::GetId => {
                let slot = &self.slots[slot_index as usize];
                // SAFETY: as above; the parser bounded the buffers to the ID's 20 bytes.
                let guest = unsafe { GuestIo::new(&slot.bufs.iovecs) };
                let serial = self.device.serial();
                guest.write(0, &serial[..(slot.used_len as usize - 1).min(serial.len())]);
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                self.start_zeroes(slot_index, req.kind)
            }
        };
        if let Err(e) = result {
            self.log.warn(
                self.index,
                format_args!("{:?} failed: {}", req.kind, Chain(&e)),
            );
            self.slots[slot_index as usize].io.failed = true;
        }
    }

    /// Push the data transfers of a read or write whose extents are in `self.extents`.
    fn start_transfer(&mut self, slot_index: u32, write: bool) {
        let files = self.device.export().disk().files();
        let Slot {
            bufs,
            split_iov,
            io,
            ..
        } = &mut self.slots[slot_index as usize];
        // One extent covering the request uses the request's iovecs directly; otherwise cut
        // them at extent boundaries into `split_iov`, reserved up front so that the pointers
        // handed to the kernel stay put.
        let single = self.extents.len() == 1;
        if !single {
            split_iov.clear();
            split_iov.reserve(bufs.iovecs.len() + self.extents.len());
        }
        let mut cursor = Cursor::new(&bufs.iovecs[..]);
        for extent in &self.extents {
            let iov_start = split_iov.len();
            let iov: &[libc::iovec] = if single {
                &bufs.iovecs
            } else {
                cursor.take(extent.len, |iov| split_iov.push(iov));
                &split_iov[iov_start..]
            };
            match extent.mapping {
                // SAFETY: validated guest memory, kept mapped by the slot.
                Mapping::Zero if !write => unsafe { fill_zero(iov) },
                Mapping::Zero => io.failed = true,
                Mapping::Filled => {}
                Mapping::Data { file, offset } => {
                    let Some(node) = files.get(file) else {
                        io.failed = true;
                        continue;
                    };
                    let fd = match node.io_target() {
                        IoTarget::Fd(fd) => fd,
                        IoTarget::Remote(store) => {
                            let op = RemoteOp::transfer(write, offset, iov);
                            io.push_remote(&mut self.engine, slot_index, &**store, op);
                            continue;
                        }
                    };
                    let transfer = Transfer { fd, offset, write };
                    let align = node.direct_align();
                    if align > 1 && !is_aligned(iov, align) {
                        // SAFETY: validated guest memory, kept mapped and owned by the slot.
                        if let Err(e) = unsafe { bounce_transfer(transfer, iov, extent.len, align) }
                        {
                            self.log
                                .warn(self.index, format_args!("unaligned direct I/O: {e}"));
                            io.failed = true;
                        }
                        continue;
                    }
                    let slot_op = LocalOp {
                        op: transfer.op(iov),
                        inline: node.inline_policy(),
                        expected: extent.len,
                        zero: None,
                    };
                    io.push(&mut self.engine, slot_index, slot_op);
                }
            }
        }
    }

    /// Push an fdatasync of every writable file.
    fn start_sync(&mut self, slot_index: u32) {
        let slot = &mut self.slots[slot_index as usize];
        slot.synced = true;
        for file in self.device.export().disk().files() {
            if file.read_only() {
                continue;
            }
            let fd = match file.io_target() {
                IoTarget::Fd(fd) => fd,
                IoTarget::Remote(store) => {
                    let op = RemoteOp::Flush;
                    slot.io
                        .push_remote(&mut self.engine, slot_index, &**store, op);
                    continue;
                }
            };
            let op = LocalOp {
                op: Op::Fdatasync { fd },
                inline: InlinePolicy::Never,
                expected: 0,
                zero: None,
            };
            slot.io.push(&mut self.engine, slot_index, op);
        }
    }

    /// Map a discard or write-zeroes and push its fallocate operations.
    fn start_zeroes(&mut self, slot_index: u32, kind: RequestKind) -> Result<(), BlockError> {
        let driver = self.device.export().current_root(&mut self.root).clone();
        self.zero_ops.clear();
        let slot = &mut self.slots[slot_index as usize];
        for seg in &slot.bufs.segments {
            let op = match kind {
                RequestKind::Discard => ZeroOp::Discard,
                _ => ZeroOp::WriteZeroes { unmap: seg.unmap },
            };
            driver.map_zeroes(seg.offset, seg.len, op, &mut self.zero_ops)?;
        }
        for zop in &self.zero_ops {
            let Some(file) = driver.files().get(zop.file) else {
                slot.io.failed = true;
                continue;
            };
            let fd = match file.io_target() {
                IoTarget::Fd(fd) => fd,
                IoTarget::Remote(store) => {
                    let op = RemoteOp::Zeroes {
                        offset: zop.offset,
                        len: zop.len,
                        op: zop.op,
                    };
                    slot.io
                        .push_remote(&mut self.engine, slot_index, &**store, op);
                    continue;
                }
            };
            let mode = match zop.op {
                ZeroOp::Discard => file.discard_mode(),
                ZeroOp::WriteZeroes { unmap } => file.zero_mode(unmap),
            };
            match mode {
                Some(mode) => {
                    let op = LocalOp {
                        inline: InlinePolicy::Never,
                        op: Op::Fallocate {
                            fd,
                            mode,
                            offset: zop.offset,
                            len: zop.len,
                        },
                        expected: 0,
                        zero: Some((zop.file, zop.op)),
                    };
                    slot.io.push(&mut self.engine, slot_index, op);
                }
                // Discarding is advisory: a file that cannot deallocate keeps its data.
                None if zop.op == ZeroOp::Discard => {}
                None => {
                    let unmap = matches!(zop.op, ZeroOp::WriteZeroes { unmap: true });
                    if let Err(e) = file.write_zeroes_fallback(zop.offset, zop.len, unmap) {
                        self.log.warn(self.index, format_args!("write zeroes: {e}"));
                        slot.io.failed = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Finish every operation the engine has ready (follow-up operations are pushed, not
    /// submitted). Returns whether there was any.
    pub fn complete_ready(&mut self) -> bool {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        self.engine
            .reap(|user_data, result| completions.push((user_data, result)));
        for &(user_data, result) in &completions {
            self.complete_op(user_data, result);
        }
        let any = !completions.is_empty();
        self.completions = completions;
        any
    }

    /// Account for one finished engine operation.
    fn complete_op(&mut self, user_data: u64, result: i32) {
        let slot_index = (user_data >> 32) as u32;
        let op_index = user_data as u32 as usize;
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        let Some(op) = slot.io.ops.get(op_index).copied() else {
            return;
        };
        if let Err(e) = self.finish_op(op, result) {
            self.log.warn(self.index, format_args!("I/O error: {e}"));
            self.slots[slot_index as usize].io.failed = true;
        }
        let slot = &mut self.slots[slot_index as usize];
        slot.io.pending -= 1;
        if slot.io.pending > 0 {
            return;
        }
        if modifies(slot.kind)
            && !slot.io.failed
            && !slot.synced
            && !self.writeback.load(Ordering::Relaxed)
        {
            // Writethrough: the write is complete only once it is stable.
            self.start_sync(slot_index);
            if self.slots[slot_index as usize].io.pending > 0 {
                return;
            }
        }
        self.finish(slot_index);
    }

    /// Interpret an operation's result, completing short transfers and refused fallocates
    /// synchronously.
    fn finish_op(&self, op: SlotOp, result: i32) -> std::io::Result<()> {
        let errno = |e: i32| std::io::Error::from_raw_os_error(e);
        let op = match op {
            SlotOp::Local(local) => local,
            SlotOp::Remote if result < 0 => return Err(errno(-result)),
            SlotOp::Remote => return Ok(()),
        };
        match op.op {
            Op::Readv { .. } | Op::Writev { .. } if result >= 0 => {
                let done = result as u64;
                if done < op.expected {
                    // SAFETY: the op's iovecs belong to the slot, still in flight.
                    unsafe { finish_short_transfer(op.op, done, op.expected)? };
                }
                Ok(())
            }
            Op::Fallocate {
                mode, offset, len, ..
            } if result < 0 => {
                let Some((file, zero)) = op.zero else {
                    return Err(errno(-result));
                };
                let node = &self.device.export().disk().files()[file];
                if !node.note_fallocate_refusal(mode, -result) {
                    return Err(errno(-result));
                }
                match zero {
                    ZeroOp::Discard => Ok(()),
                    ZeroOp::WriteZeroes { unmap } => node.write_zeroes_fallback(offset, len, unmap),
                }
            }
            _ if result < 0 => Err(errno(-result)),
            _ => Ok(()),
        }
    }

    /// Write the status, free the slot and queue the request for the used ring.
    fn finish(&mut self, slot_index: u32) {
        let slot = &mut self.slots[slot_index as usize];
        let (status, used_len) = if slot.io.failed {
            (Status::IoErr, 1)
        } else {
            (Status::Ok, slot.used_len)
        };
        let head = slot.head;
        if let Some(kind) = op_kind(slot.kind) {
            let bytes = match slot.kind {
                RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => len,
                _ => slot.bufs.segments.iter().map(|s| s.len).sum(),
            };
            self.stats
                .finish(kind, bytes, slot.io.failed, slot.started.elapsed());
            // QEMU's `wr_highest_offset`: the end of the furthest successful write, write-zeroes
            // included.
            if !slot.io.failed {
                match slot.kind {
                    RequestKind::Write { offset, len } => self.stats.wrote_up_to(offset + len),
                    RequestKind::WriteZeroes => {
                        let end = slot.bufs.segments.iter().map(|s| s.offset + s.len).max();
                        self.stats.wrote_up_to(end.unwrap_or(0));
                    }
                    _ => {}
                }
            }
        }
        let export = self.device.export();
        if std::mem::take(&mut slot.gated) {
            export.bitmaps().gate().exit(self.index);
        }
        let ticket = std::mem::take(&mut slot.ticket);
        export
            .current_root(&mut self.root)
            .release(ticket, !slot.io.failed);
        if let Some(mem) = slot.mem.take() {
            write_status(&mem, slot.status, status);
            // Everything the request may have written: its data (even if it failed part way)
            // and its status.
            self.dirty_log.mark_ranges(slot.bufs.writable(), u64::MAX);
        }
        self.free.push(slot_index);
        self.done.push((head, used_len));
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // What this queue counted stays with the export after the connection ends (the drain
        // before the drop finished every request).
        self.device.export().stats().retire(self.index, &self.stats);
        // The kernel may still be writing into guest memory that the slots keep mapped: wait.
        while self.engine.in_flight() > 0 {
            if self.engine.wait().is_err() {
                break;
            }
            self.engine.reap(|_, _| {});
        }
    }
}

fn write_status(mem: &GuestMemory, addr: GuestAddress, status: Status) {
    // The parser checked the address; a guest that removed the memory since only loses its
    // own status byte.
    let _ = mem.write_obj(status as u8, addr);
}

mod marks;
#[cfg(test)]
mod tests;
