//! The vhost-user backend of one frontend connection.
//!
//! vhost-user-backend's `Mutex`/`RwLock` wrappers would put every queue behind one lock, so this
//! backend implements the `&self` trait directly: each queue's worker has its own mutex, taken
//! only by that queue's thread (and by the control path when it stops or resets the queue).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::device::BlkDevice;
use super::exit_event::ExitEvents;
use super::memory::check_backing;
use super::ring::{QueueWorker, Vring};
use crate::virtio_blk::config::{VirtioBlkConfig, WRITEBACK_OFFSET};
use crate::virtio_blk::device_features;
use crate::virtio_blk::request::GuestMemory;

/// The backend for one connection.
pub struct BlkBackend {
    device: Arc<BlkDevice>,
    workers: Vec<Mutex<QueueWorker>>,
    /// The guest's `writeback` choice, shared with every queue.
    writeback: Arc<AtomicBool>,
    acked_features: AtomicU64,
    /// The queue threads' exit events; dropped (and their leaked consumers closed) with the
    /// backend, after the library's queue threads.
    exit_events: ExitEvents,
    /// The guest memory the queues use. Not the library's own `GuestMemoryAtomic`, which
    /// holds whatever map the frontend described as soon as it is mapped: the queues only see
    /// a map once `update_memory` has checked it.
    mem: GuestMemoryAtomic<GuestMemory>,
}

impl BlkBackend {
    /// Writeback caching is on until the driver turns it off, as on QEMU's devices.
    const DEFAULT_WRITEBACK: bool = true;

    pub fn new(device: Arc<BlkDevice>) -> io::Result<Self> {
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let writeback = Arc::new(AtomicBool::new(Self::DEFAULT_WRITEBACK));
        let workers = (0..usize::from(device.num_queues()))
            .map(|index| {
                QueueWorker::new(index, device.clone(), mem.clone(), writeback.clone())
                    .map(Mutex::new)
            })
            .collect::<io::Result<_>>()?;
        Ok(BlkBackend {
            device,
            workers,
            writeback,
            acked_features: AtomicU64::new(0),
            exit_events: ExitEvents::default(),
            mem,
        })
    }

    /// The epoll event id of a queue thread's wake eventfd: ids up to `num_queues` are the
    /// library's (queue kicks and its exit event).
    pub fn wake_event_id(&self) -> u64 {
        self.workers.len() as u64 + 1
    }

    /// Queue `index`'s worker.
    pub fn worker(&self, index: usize) -> MutexGuard<'_, QueueWorker> {
        // A worker panicking would have taken the daemon down; a poisoned lock still holds a
        // consistent worker, since every step leaves it consistent.
        self.workers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// Complete every request in flight on every queue.
    pub fn drain(&self) {
        for index in 0..self.workers.len() {
            self.worker(index).drain();
        }
    }

    fn config(&self) -> VirtioBlkConfig {
        VirtioBlkConfig::new(
            self.device.limits(),
            self.device.num_queues(),
            self.writeback.load(Ordering::Relaxed),
        )
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        device_features(self.device.limits().read_only)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.drain();
        self.writeback
            .store(Self::DEFAULT_WRITEBACK, Ordering::Relaxed);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on each vring's queue; the workers read it from there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().window(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable; writes to the other fields are ignored, as a device
        // ignores writes to read-only registers (an error here would drop the connection).
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

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG: the library has mapped the new map. Hand it
        // to the queues only if touching it cannot kill vubd (see `memory`); a refusal ends
        // the connection, and the queues keep the map they had.
        let map = mem.memory().into_inner();
        check_backing(&map)?;
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(GuestMemory::clone(&map));
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue, so queues run truly in parallel.
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Through `ExitEvents`, which closes the consumer the library leaks.
        self.exit_events.create().ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: every request popped must be on the used ring before the frontend
        // learns the ring position, or it would be lost.
        if let Some(worker) = self.workers.get(queue_index as usize) {
            worker
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .drain();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(vring), true) = (vrings.first(), thread_id < self.workers.len()) else {
            return Ok(());
        };
        let kick = device_event == 0;
        if kick || u64::from(device_event) == self.wake_event_id() {
            self.worker(thread_id).handle_event(vring, kick);
        }
        Ok(())
    }
}
