//! The state a queue keeps for one request in flight, from the moment it is popped until it
//! is finished: the parsed request, its buffers, and the engine operations it pushed.

use std::sync::Arc;

use vm_memory::GuestAddress;

use crate::block::io::{Engine, InlinePolicy, Op};
use crate::block::remote::{RemoteOp, RemoteStore};
use crate::block::{IoTicket, ZeroOp};
use crate::stats::Stamp;
use crate::virtio_blk::request::{GuestMemory, Request, RequestBuffers, RequestKind};
use crate::virtio_blk::DeviceLimits;

/// State of one in-flight request.
pub(super) struct Slot {
    pub head: u16,
    pub status: GuestAddress,
    pub kind: RequestKind,
    /// Bytes written into the guest's buffers, status byte included, if the request succeeds.
    pub used_len: u32,
    /// The engine operations the request has pushed.
    pub io: SlotIo,
    /// A writethrough sync has been issued for this request.
    pub synced: bool,
    pub bufs: RequestBuffers,
    /// iovecs cut at extent boundaries, for requests that map to several extents.
    pub split_iov: Vec<libc::iovec>,
    /// Keeps the guest memory the iovecs point into mapped until the request completes.
    pub mem: Option<Arc<GuestMemory>>,
    /// Handed back to the block driver when the request's data I/O is over.
    pub ticket: IoTicket,
    /// The request passed the write gate and must leave it when it completes.
    pub gated: bool,
    /// When the request started, for its latency.
    pub started: Stamp,
}

/// The engine operations of one request and how they went.
#[derive(Default)]
pub(super) struct SlotIo {
    pub ops: Vec<SlotOp>,
    /// Operations not yet completed.
    pub pending: u32,
    pub failed: bool,
}

impl SlotIo {
    /// The next operation's tag: the slot and operation index.
    fn next_user_data(&self, slot_index: u32) -> u64 {
        (u64::from(slot_index) << 32) | self.ops.len() as u64
    }

    /// Push a host-file operation for slot `slot_index`.
    pub fn push(&mut self, engine: &mut Engine, slot_index: u32, op: LocalOp) {
        let user_data = self.next_user_data(slot_index);
        self.ops.push(SlotOp::Local(op));
        // SAFETY: the op's pointers are iovecs in the slot's `bufs` / `split_iov` (not modified
        // until the slot completes) naming guest memory that the slot's `mem` keeps mapped.
        let pushed = match op.op {
            // SAFETY: as above.
            Op::Readv { .. } | Op::Writev { .. } => unsafe {
                engine.push_transfer(op.op, user_data, op.inline)
            },
            // SAFETY: as above.
            _ => unsafe { engine.push(op.op, user_data, false) },
        };
        match pushed {
            Ok(()) => self.pending += 1,
            Err(e) => {
                log::warn!("cannot queue I/O: {e}");
                self.failed = true;
            }
        }
    }

    /// Start an operation on a remote store for slot `slot_index`.
    pub fn push_remote(
        &mut self,
        engine: &mut Engine,
        slot_index: u32,
        store: &dyn RemoteStore,
        op: RemoteOp,
    ) {
        let user_data = self.next_user_data(slot_index);
        self.ops.push(SlotOp::Remote);
        self.pending += 1;
        // SAFETY: as in `push`: the pointers stay valid until the slot completes, which is
        // after this operation's completion has been reaped.
        unsafe { engine.push_remote(store, op, user_data) };
    }
}

/// An operation a slot has pushed.
#[derive(Clone, Copy)]
pub(super) enum SlotOp {
    /// On a host file, through the engine's io_uring or synchronous runner.
    Local(LocalOp),
    /// On a remote store, which reports only success or an errno.
    Remote,
}

/// A host-file operation, kept to retry short transfers and fall back on refusals.
#[derive(Clone, Copy)]
pub(super) struct LocalOp {
    pub op: Op,
    /// For transfers: whether the engine may complete it inline.
    pub inline: InlinePolicy,
    /// Bytes a transfer moves.
    pub expected: u64,
    /// For fallocate operations: what it implements.
    pub zero: Option<(usize, ZeroOp)>,
}

// SAFETY: the raw pointers in a slot point into guest memory that `Slot::mem` keeps mapped, or
// into the slot's own vectors; a slot is only ever used by the thread that holds its executor.
unsafe impl Send for Slot {}

impl Slot {
    pub fn new(limits: &DeviceLimits) -> Self {
        Slot {
            head: 0,
            status: GuestAddress(0),
            kind: RequestKind::Flush,
            used_len: 0,
            io: SlotIo::default(),
            synced: false,
            bufs: RequestBuffers::with_limits(limits),
            split_iov: Vec::new(),
            mem: None,
            ticket: IoTicket::NONE,
            gated: false,
            started: Stamp::now(),
        }
    }

    /// Set up for a request just parsed.
    pub fn start(&mut self, head: u16, req: &Request, mem: &Arc<GuestMemory>) {
        self.head = head;
        self.started = Stamp::now();
        self.status = req.status;
        self.kind = req.kind;
        self.used_len = req.used_len;
        self.io.pending = 0;
        self.io.failed = false;
        self.synced = false;
        self.io.ops.clear();
        self.mem = Some(mem.clone());
    }
}
