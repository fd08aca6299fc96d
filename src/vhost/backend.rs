//! The vhost-user backend of one frontend connection: vubd's answer to each message of the
//! protocol (vhost-user.rst), over the `vhost` crate's message layer.
//!
//! vubd answers the messages itself rather than through vhost-user-backend's daemon, which
//! has no hooks for in-flight tracking (`GET/SET_INFLIGHT_FD`), ignores `LOG_ALL` and the
//! rings' log addresses, and serves one connection per daemon. Each queue has its own worker
//! and thread ([`Queue`]); the connection's thread changes a queue only under its worker's
//! lock.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use super::device::BlkDevice;
use super::dirty_log::DirtyLog;
use super::inflight::InflightMemory;
use super::memory::MemoryTable;
use super::queue::Queue;
use super::ring::{QueueWorker, Vring};
use crate::virtio_blk::config::{VirtioBlkConfig, WRITEBACK_OFFSET};
use crate::virtio_blk::device_features;
use crate::virtio_blk::request::GuestMemory;

/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (QEMU's and libvhost-user's limit).
const MAX_MEM_SLOTS: u64 = 509;

/// The backend for one connection.
pub struct BlkBackend {
    device: Arc<BlkDevice>,
    queues: Vec<Arc<Queue>>,
    threads: Vec<JoinHandle<()>>,
    /// The guest memory the queues use: only maps that passed [`MemoryTable`]'s checks.
    mem: GuestMemoryAtomic<GuestMemory>,
    table: MemoryTable,
    /// The guest's `writeback` choice, shared with every queue.
    writeback: Arc<AtomicBool>,
    dirty_log: Arc<DirtyLog>,
    acked_features: u64,
    acked_protocol: u64,
    /// `SET_OWNER` was received (once per connection).
    owned: bool,
    /// The frontend's channel for backend-initiated messages, kept for config-change
    /// notifications.
    backend_channel: Option<Backend>,
}

impl BlkBackend {
    /// Writeback caching is on until the driver turns it off, as on QEMU's devices.
    const DEFAULT_WRITEBACK: bool = true;

    /// A backend for a new connection, with its queue threads running.
    pub fn new(device: Arc<BlkDevice>) -> io::Result<Self> {
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let writeback = Arc::new(AtomicBool::new(Self::DEFAULT_WRITEBACK));
        let dirty_log = Arc::new(DirtyLog::default());
        let mut backend = BlkBackend {
            device: device.clone(),
            queues: Vec::new(),
            threads: Vec::new(),
            mem: mem.clone(),
            table: MemoryTable::default(),
            writeback: writeback.clone(),
            dirty_log: dirty_log.clone(),
            acked_features: 0,
            acked_protocol: 0,
            owned: false,
            backend_channel: None,
        };
        for index in 0..usize::from(device.num_queues()) {
            let vring = Vring::new(mem.clone(), device.queue_size())
                .map_err(|e| io::Error::other(format!("queue {index}: {e:?}")))?;
            let worker = QueueWorker::new(
                index,
                device.clone(),
                mem.clone(),
                writeback.clone(),
                vring.clone(),
                dirty_log.clone(),
            )?;
            // Dropping `backend` on an error stops the threads started so far.
            let (queue, thread) = Queue::start(index, vring, worker)?;
            backend.queues.push(queue);
            backend.threads.push(thread);
        }
        Ok(backend)
    }

    /// Complete every request in flight on every queue.
    pub fn drain(&self) {
        for queue in &self.queues {
            queue.worker().drain();
        }
    }

    /// Whether the frontend takes configuration-change notices on its backend channel: it
    /// acked `CONFIG` and `BACKEND_REQ` (see `config_change`).
    pub fn takes_config_notices(&self) -> bool {
        let needed = VhostUserProtocolFeatures::CONFIG.bits()
            | VhostUserProtocolFeatures::BACKEND_REQ.bits();
        self.acked_protocol & needed == needed
    }

    fn queue(&self, index: u32) -> Result<&Arc<Queue>> {
        self.queues
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn config(&self) -> VirtioBlkConfig {
        VirtioBlkConfig::new(
            &self.device.limits(),
            self.device.num_queues(),
            self.writeback.load(Ordering::Relaxed),
        )
    }

    fn features(&self) -> u64 {
        device_features(self.device.limits().read_only) | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// Hand the queues a new memory map (they see it at their next look).
    fn use_memory(&mut self, table: MemoryTable, mem: GuestMemory) {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.table = table;
    }

    /// A ring started (its kick arrived) or was enabled or disabled: once it runs (started
    /// and enabled), resubmit what a previous backend left in flight, watch its kicks, and
    /// look at its available ring.
    fn ring_changed(&self, index: usize) -> Result<()> {
        let queue = &self.queues[index];
        let running = {
            let state = queue.vring().get_ref();
            state.get_queue().ready() && state.is_enabled()
        };
        if running {
            queue.worker().ring_running();
        }
        queue
            .update_kick()
            .map_err(VhostUserError::ReqHandlerError)?;
        queue.worker().wake_for_ring();
        Ok(())
    }
}

fn refused(e: io::Error) -> VhostUserError {
    log::warn!("frontend request refused: {e}");
    VhostUserError::ReqHandlerError(e)
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.owned, true) {
            return Err(VhostUserError::InvalidOperation("SET_OWNER sent twice"));
        }
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> Result<()> {
        self.drain();
        self.acked_features = 0;
        self.dirty_log.set_logging(false);
        self.writeback
            .store(Self::DEFAULT_WRITEBACK, Ordering::Relaxed);
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        self.dirty_log
            .set_logging(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without protocol features, rings are enabled from the start (vhost-user.rst, "Ring
        // states").
        let enable_all = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for index in 0..self.queues.len() {
            let queue = &self.queues[index];
            {
                let _worker = queue.worker();
                queue.vring().set_queue_event_idx(event_idx);
                if enable_all {
                    queue.vring().set_enabled(true);
                }
            }
            if enable_all {
                self.ring_changed(index)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation(
                "postcopy is not supported",
            ));
        }
        let (table, mem) = MemoryTable::new(regions, files).map_err(refused)?;
        self.use_memory(table, mem);
        Ok(None)
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let queue = self.queue(index)?;
        let size = u16::try_from(num)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= self.device.queue_size())
            .ok_or(VhostUserError::InvalidParam)?;
        let _worker = queue.worker();
        queue.vring().set_queue_size(size);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> Result<()> {
        let queue = self.queue(index)?;
        let gpa = |va: u64| {
            self.table
                .guest_address(va)
                .map(|a| a.0)
                .ok_or(VhostUserError::InvalidParam)
        };
        let (desc, avail, used) = (gpa(descriptor)?, gpa(available)?, gpa(used)?);
        let mut worker = queue.worker();
        let vring = queue.vring();
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // The used index is the guest's, as the ring holds it now (vhost-user.rst: the used
        // ring is the driver's record; after a restart it says what completed).
        let used_idx = vring
            .queue_used_idx()
            .map_err(|_| VhostUserError::InvalidParam)?;
        vring.set_queue_next_used(used_idx);
        let log_used = flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG);
        worker.set_used_log_addr(log_used.then_some(log));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let queue = self.queue(index)?;
        let _worker = queue.worker();
        queue.vring().set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        // Stop the ring: every request popped must be on the used ring before the frontend
        // learns the ring position, or it would be lost.
        let queue = self.queue(index)?.clone();
        queue.unwatch_kick();
        let mut worker = queue.worker();
        worker.drain();
        worker.ring_stopped();
        let vring = queue.vring();
        vring.set_queue_ready(false);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let queue = self.queue(u32::from(index))?.clone();
        // Out of the epoll set before the old descriptor closes.
        queue.unwatch_kick();
        {
            let _worker = queue.worker();
            let vring = queue.vring();
            let has_kick = fd.is_some();
            vring.set_kick(fd);
            if has_kick && !vring.get_ref().get_queue().ready() {
                vring.set_queue_ready(true);
            }
        }
        self.ring_changed(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let queue = self.queue(u32::from(index))?;
        let mut worker = queue.worker();
        let vring = queue.vring();
        let has_call = fd.is_some();
        vring.set_call(fd);
        // QEMU sends the call descriptor after the kick: requests that completed in between
        // are on the used ring with nobody told, and a guest waiting for them would wait
        // forever. Give it the notification it is owed.
        if has_call && worker.take_missed_signal() {
            if let Err(e) = vring.signal_used_queue() {
                log::warn!("queue {index}: notifying the guest: {e}");
            }
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let queue = self.queue(u32::from(index))?;
        let _worker = queue.worker();
        queue.vring().set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        let queue = self.queue(index)?.clone();
        {
            let mut worker = queue.worker();
            if !enable {
                // A disabled ring must not pass data any more; what it started finishes now,
                // so that a frontend pausing for migration sees (and logs) all of it.
                worker.drain();
            }
            queue.vring().set_enabled(enable);
        }
        self.ring_changed(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Ok(self.config().window(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // Only `writeback` is writable; writes to the other fields are ignored, as a device
        // ignores writes to read-only registers.
        let Some(index) = WRITEBACK_OFFSET.checked_sub(offset) else {
            return Ok(());
        };
        if let Some(&value) = buf.get(index as usize) {
            self.writeback.store(value != 0, Ordering::Relaxed);
            log::info!(
                "guest switched the write cache to {}",
                if value != 0 {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
        }
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            backend.set_reply_ack_flag(true);
        }
        self.backend_channel = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(VhostUserError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if num_queues == 0
            || usize::from(num_queues) > self.queues.len()
            || queue_size == 0
            || queue_size > self.device.queue_size()
        {
            return Err(VhostUserError::InvalidParam);
        }
        let (file, size) = InflightMemory::create(num_queues, queue_size).map_err(refused)?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let (size, offset, num_queues, queue_size) = (
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        );
        if usize::from(num_queues) > self.queues.len() || queue_size > self.device.queue_size() {
            return Err(VhostUserError::InvalidParam);
        }
        // The region is read when a ring starts: swapping it under a running ring would lose
        // what the old one recorded.
        if self
            .queues
            .iter()
            .any(|q| q.vring().get_ref().get_queue().ready())
        {
            return Err(VhostUserError::InvalidOperation(
                "SET_INFLIGHT_FD after a ring started",
            ));
        }
        let memory =
            InflightMemory::map(&file, offset, size, num_queues, queue_size).map_err(refused)?;
        for (index, queue) in self.queues.iter().enumerate() {
            queue.worker().set_inflight(memory.queue(index));
        }
        log::info!("in-flight region of the frontend: {num_queues} queues of {queue_size}");
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation(
                "postcopy is not supported",
            ));
        }
        if self.table.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VhostUserError::InvalidParam);
        }
        let (table, mem) = self.table.with(region, fd).map_err(refused)?;
        self.use_memory(table, mem);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (addr, size) = (region.guest_phys_addr, region.memory_size);
        let (table, mem) = self.table.without(addr, size).map_err(refused)?;
        self.use_memory(table, mem);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        // Not offered: a virtio-blk device has no state beyond its rings, which the frontend
        // migrates itself.
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        self.dirty_log
            .set_base(&file, offset, size)
            .map_err(refused)
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // Stop the queue threads, then wait for the I/O they started.
        for queue in &self.queues {
            queue.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.drain();
    }
}
