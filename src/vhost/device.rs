//! The vhost-user-blk device: an [`Export`] presented to the guest with fixed geometry (block
//! size, limits, serial, queues).
//!
//! One device lives for the whole daemon; each frontend connection gets its own vhost backend
//! on top of it, so data written through one connection reads back through the next.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::config_change::ConfigNotifier;
use crate::export::Export;
use crate::virtio_blk::{DeviceLimits, ID_BYTES};

/// Guest-visible properties the command line sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    pub num_queues: u16,
    /// Largest virtqueue the frontend may set up.
    pub queue_size: u16,
    /// Device ID returned by `VIRTIO_BLK_T_GET_ID` (at most 20 bytes).
    pub serial: Vec<u8>,
    pub logical_block_size: u32,
}

/// Why a device cannot be built on an export.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(
        "{path}: size {size} is not a multiple of the logical block size {block_size}; \
         resize the image or pass --logical-block-size 512"
    )]
    UnalignedSize {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("{path}: the image is empty")]
    Empty { path: PathBuf },
    #[error(
        "{path}: direct I/O on this file needs {align}-byte alignment, larger than the logical \
         block size {block_size}; pass --logical-block-size {align} or --cache writeback"
    )]
    DirectAlignment {
        path: PathBuf,
        align: u64,
        block_size: u32,
    },
    #[error(
        "{path}: the store takes I/O in multiples of {align} bytes, more than the logical \
         block size {block_size}; pass --logical-block-size {align}"
    )]
    RemoteBlockSize {
        path: PathBuf,
        align: u64,
        block_size: u32,
    },
}

/// The guest-visible disk.
#[derive(Debug)]
pub struct BlkDevice {
    export: Arc<Export>,
    /// Fixed at creation, but for the capacity, which is `capacity`.
    limits: DeviceLimits,
    /// The disk's size in bytes as the guest is shown it: raised by an online resize.
    capacity: AtomicU64,
    serial: [u8; ID_BYTES],
    options: DeviceOptions,
    /// The connections to tell when the configuration changes.
    notices: ConfigNotifier,
}

impl BlkDevice {
    pub fn new(export: Arc<Export>, options: DeviceOptions) -> Result<Self, DeviceError> {
        let path = export.path();
        let size = export.size();
        let block_size = options.logical_block_size;
        if size == 0 {
            return Err(DeviceError::Empty { path });
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(DeviceError::UnalignedSize {
                path,
                size,
                block_size,
            });
        }
        for file in export.disk().files() {
            if file.direct_align() > u64::from(block_size) && file.remote().is_some() {
                return Err(DeviceError::RemoteBlockSize {
                    path: file.path().to_path_buf(),
                    align: file.direct_align(),
                    block_size,
                });
            }
            if file.direct_align() > u64::from(block_size) {
                return Err(DeviceError::DirectAlignment {
                    path: file.path().to_path_buf(),
                    align: file.direct_align(),
                    block_size,
                });
            }
        }
        let limits = DeviceLimits::new(
            size,
            block_size,
            export.disk().discard_granularity(),
            options.queue_size,
            export.read_only(),
        );
        let mut serial = [0u8; ID_BYTES];
        let n = options.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&options.serial[..n]);
        Ok(BlkDevice {
            export,
            capacity: AtomicU64::new(limits.capacity_bytes),
            limits,
            serial,
            options,
            notices: ConfigNotifier::default(),
        })
    }

    /// What the device serves.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// The limits in force now (the capacity may have grown since the last look).
    #[inline]
    pub fn limits(&self) -> DeviceLimits {
        DeviceLimits {
            capacity_bytes: self.capacity.load(Ordering::Acquire),
            ..self.limits
        }
    }

    /// The connections told of configuration changes.
    pub fn notices(&self) -> &ConfigNotifier {
        &self.notices
    }

    /// Show the guest the export's size now, after it grew, and tell every frontend to
    /// read the configuration again; returns how many were told. The size must be a multiple
    /// of the logical block size (the caller checked).
    pub fn grew(&self) -> usize {
        self.capacity
            .fetch_max(self.export.size(), Ordering::AcqRel);
        self.notices.notify_all()
    }

    /// The device ID string, NUL-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    pub fn num_queues(&self) -> u16 {
        self.options.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.options.queue_size
    }
}
