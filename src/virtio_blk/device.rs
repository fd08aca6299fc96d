//! The virtio-blk device: a block graph presented to the guest with fixed properties.
//!
//! One [`BlockDevice`] lives for the whole daemon; each frontend connection gets its own vhost
//! backend on top of it, so data written through one connection reads back through the next.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::bitmap::{BitmapError, BitmapManager, WriteGate};
use crate::block::io::EngineKind;
use crate::block::{BlockDriver, BlockError, NodeNames};

use super::{DeviceLimits, ID_BYTES, SECTOR_SIZE};

/// Properties of the device that the command line sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    pub num_queues: u16,
    /// Largest virtqueue the frontend may set up.
    pub queue_size: u16,
    /// Device ID returned by `VIRTIO_BLK_T_GET_ID` (at most 20 bytes).
    pub serial: Vec<u8>,
    pub logical_block_size: u32,
    /// Refuse writes (`--readonly`).
    pub read_only: bool,
    pub engine: EngineKind,
    /// How long a queue thread keeps busy-polling its ring and I/O completions after the last
    /// work it found, instead of sleeping until the next notification (`--poll-us`).
    pub poll: Option<Duration>,
    /// Node names for the control socket.
    pub node_names: NodeNames,
}

/// Why a device cannot be built on an image.
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
    #[error("{path}: flushing: {source}")]
    Flush { path: PathBuf, source: BlockError },
    #[error("{path}: dirty bitmaps: {source}")]
    Bitmaps { path: PathBuf, source: BitmapError },
    #[error(
        "{path}: direct I/O on this file needs {align}-byte alignment, larger than the logical \
         block size {block_size}; pass --logical-block-size {align} or --cache writeback"
    )]
    DirectAlignment {
        path: PathBuf,
        align: u64,
        block_size: u32,
    },
}

/// The guest-visible disk.
#[derive(Debug)]
pub struct BlockDevice {
    driver: Arc<dyn BlockDriver>,
    limits: DeviceLimits,
    serial: [u8; ID_BYTES],
    options: DeviceOptions,
    bitmaps: BitmapManager,
}

impl BlockDevice {
    /// Most sectors one discard or write-zeroes segment may cover (1 GiB).
    const MAX_DISCARD_SECTORS: u32 = 1 << 21;
    /// Most segments in one discard or write-zeroes request.
    const MAX_DISCARD_SEG: u32 = 32;

    pub fn new(driver: Arc<dyn BlockDriver>, options: DeviceOptions) -> Result<Self, DeviceError> {
        let path = driver
            .files()
            .first()
            .map(|f| f.path().to_path_buf())
            .unwrap_or_default();
        let size = driver.size();
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
        for file in driver.files() {
            if file.direct_align() > u64::from(block_size) {
                return Err(DeviceError::DirectAlignment {
                    path: file.path().to_path_buf(),
                    align: file.direct_align(),
                    block_size,
                });
            }
        }
        let discard_align = driver.discard_granularity().max(u64::from(block_size));
        let limits = DeviceLimits {
            capacity_bytes: size,
            logical_block_size: block_size,
            // The header and status take two descriptors of a queue-sized chain. Half the iovec
            // budget leaves room for segments that cross guest memory regions.
            seg_max: u32::from(options.queue_size)
                .saturating_sub(2)
                .clamp(1, DeviceLimits::MAX_IOVECS as u32 / 2 - 2),
            max_discard_sectors: Self::MAX_DISCARD_SECTORS,
            max_discard_seg: Self::MAX_DISCARD_SEG,
            discard_sector_alignment: (discard_align / SECTOR_SIZE) as u32,
            read_only: options.read_only || driver.read_only(),
        };
        let mut serial = [0u8; ID_BYTES];
        let n = options.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&options.serial[..n]);
        let gate = Arc::new(WriteGate::new(usize::from(options.num_queues)));
        let bitmaps = BitmapManager::open(
            &options.node_names.format,
            size,
            driver.clone().bitmap_store(),
            limits.read_only,
            gate,
        )
        .map_err(|source| DeviceError::Bitmaps {
            path: path.clone(),
            source,
        })?;
        Ok(BlockDevice {
            driver,
            limits,
            serial,
            options,
            bitmaps,
        })
    }

    pub fn driver(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }

    /// The exported node's dirty bitmaps.
    pub fn bitmaps(&self) -> &BitmapManager {
        &self.bitmaps
    }

    pub fn node_names(&self) -> &NodeNames {
        &self.options.node_names
    }

    /// Store the bitmaps and make everything durable: the clean-shutdown path.
    pub fn close(&self) -> Result<(), DeviceError> {
        let path = self
            .driver
            .files()
            .first()
            .map(|f| f.path().to_path_buf())
            .unwrap_or_default();
        self.flush().map_err(|source| DeviceError::Flush {
            path: path.clone(),
            source,
        })?;
        self.bitmaps
            .close()
            .map_err(|source| DeviceError::Bitmaps {
                path: path.clone(),
                source,
            })?;
        self.flush()
            .map_err(|source| DeviceError::Flush { path, source })
    }

    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
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

    pub fn engine(&self) -> EngineKind {
        self.options.engine
    }

    pub fn poll_window(&self) -> Option<Duration> {
        self.options.poll
    }

    /// Make everything written so far durable: metadata, then every file.
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.limits.read_only {
            return Ok(());
        }
        self.driver.flush_metadata()?;
        for file in self.driver.files() {
            if !file.read_only() {
                file.sync_data()?;
            }
        }
        Ok(())
    }
}
