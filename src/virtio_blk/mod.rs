//! The virtio-blk device model: feature bits, configuration space and request parsing.
//!
//! Everything here follows the VIRTIO 1.2 specification, section 5.2 "Block Device". Nothing in
//! this module does I/O: [`request`] turns a guest descriptor chain into a validated
//! [`request::Request`], and the vhost layer executes it against the block graph.

pub mod config;
pub mod request;

use virtio_bindings::virtio_blk as bindings;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk addresses the disk in 512-byte sectors, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Size of a virtio-blk sector in bytes.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the device ID string returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = bindings::VIRTIO_BLK_ID_BYTES as usize;

/// Request status byte values (5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = bindings::VIRTIO_BLK_S_OK as u8,
    IoErr = bindings::VIRTIO_BLK_S_IOERR as u8,
    Unsupp = bindings::VIRTIO_BLK_S_UNSUPP as u8,
}

/// Request types this device implements (5.2.6).
pub mod request_type {
    use super::bindings;
    pub const IN: u32 = bindings::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = bindings::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = bindings::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = bindings::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = bindings::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = bindings::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// `unmap` bit of a discard / write-zeroes segment's flags.
pub const SEGMENT_FLAG_UNMAP: u32 = bindings::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// The vhost-user "protocol features" feature bit, offered alongside the virtio bits.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Virtio feature bits the device offers.
///
/// Every bit is implemented: `RO` only when the device is read-only, and `DISCARD` /
/// `WRITE_ZEROES` only when it is writable (a read-only device could only fail them).
pub fn device_features(read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VHOST_USER_F_PROTOCOL_FEATURES,
        bindings::VIRTIO_BLK_F_SEG_MAX,
        bindings::VIRTIO_BLK_F_BLK_SIZE,
        bindings::VIRTIO_BLK_F_TOPOLOGY,
        bindings::VIRTIO_BLK_F_FLUSH,
        bindings::VIRTIO_BLK_F_CONFIG_WCE,
        bindings::VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1u64 << bit));
    if read_only {
        bits |= 1 << bindings::VIRTIO_BLK_F_RO;
    } else {
        bits |= (1 << bindings::VIRTIO_BLK_F_DISCARD) | (1 << bindings::VIRTIO_BLK_F_WRITE_ZEROES);
    }
    bits
}

/// Limits the device advertises in its configuration space and enforces on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Disk size in bytes (a multiple of `logical_block_size`).
    pub capacity_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub logical_block_size: u32,
    /// Most data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Most sectors in one discard / write-zeroes segment.
    pub max_discard_sectors: u32,
    /// Most segments in one discard / write-zeroes request.
    pub max_discard_seg: u32,
    /// Discard alignment the guest should use, in sectors.
    pub discard_sector_alignment: u32,
    /// Whether the device refuses writes.
    pub read_only: bool,
}

impl DeviceLimits {
    /// Most sectors one discard or write-zeroes segment may cover (1 GiB).
    pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
    /// Most segments in one discard or write-zeroes request.
    pub const MAX_DISCARD_SEG: u32 = 32;

    /// The limits of a disk of `capacity_bytes` (a non-zero multiple of `logical_block_size`)
    /// served on virtqueues of up to `queue_size` entries, whose graph frees space in units of
    /// `discard_granularity` bytes.
    pub fn new(
        capacity_bytes: u64,
        logical_block_size: u32,
        discard_granularity: u64,
        queue_size: u16,
        read_only: bool,
    ) -> Self {
        let discard_align = discard_granularity.max(u64::from(logical_block_size));
        DeviceLimits {
            capacity_bytes,
            logical_block_size,
            // The header and status take two descriptors of a queue-sized chain. Half the iovec
            // budget leaves room for segments that cross guest memory regions.
            seg_max: u32::from(queue_size)
                .saturating_sub(2)
                .clamp(1, Self::MAX_IOVECS as u32 / 2 - 2),
            max_discard_sectors: Self::MAX_DISCARD_SECTORS,
            max_discard_seg: Self::MAX_DISCARD_SEG,
            discard_sector_alignment: u32::try_from(discard_align / SECTOR_SIZE)
                .unwrap_or(u32::MAX),
            read_only,
        }
    }

    /// Most descriptors, after splitting at guest memory region boundaries, that one request
    /// may use. Bounded so that per-request state is bounded whatever the guest sends; the
    /// value is the kernel's `IOV_MAX`, the most a single `preadv`/`pwritev` accepts.
    pub const MAX_IOVECS: usize = 1024;
}
