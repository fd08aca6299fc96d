//! The virtio-blk configuration space (VIRTIO 1.2, 5.2.4).

use std::mem::{offset_of, size_of};

use vm_memory::ByteValued;

use super::{DeviceLimits, SECTOR_SHIFT};

/// `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` and its padding:
/// every field the offered features give meaning to. Fields are little-endian on the wire.
///
/// Byte offsets: capacity 0, size_max 8, seg_max 12, geometry 16, blk_size 20,
/// physical_block_exp 24, alignment_offset 25, min_io_size 26, opt_io_size 28, writeback 32,
/// num_queues 34, max_discard_sectors 36, max_discard_seg 40, discard_sector_alignment 44,
/// max_write_zeroes_sectors 48, max_write_zeroes_seg 52, write_zeroes_may_unmap 56.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct VirtioBlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry_cylinders: u16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

const _: () = assert!(size_of::<VirtioBlkConfig>() == 60);
const _: () = assert!(offset_of!(VirtioBlkConfig, writeback) == 32);
const _: () = assert!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap) == 56);

// SAFETY: `VirtioBlkConfig` is `repr(C, packed)` and made only of integers, so it has no padding
// and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Offset of the only field a driver may write (`writeback`, with `VIRTIO_BLK_F_CONFIG_WCE`).
pub const WRITEBACK_OFFSET: u32 = offset_of!(VirtioBlkConfig, writeback) as u32;

impl VirtioBlkConfig {
    /// The configuration a device with these limits presents.
    pub fn new(limits: &DeviceLimits, num_queues: u16, writeback: bool) -> Self {
        let lbs = limits.logical_block_size;
        VirtioBlkConfig {
            capacity: (limits.capacity_bytes >> SECTOR_SHIFT).to_le(),
            seg_max: limits.seg_max.to_le(),
            blk_size: lbs.to_le(),
            // One logical block is both the minimum and the natural I/O unit.
            min_io_size: 1u16.to_le(),
            writeback: u8::from(writeback),
            num_queues: num_queues.to_le(),
            max_discard_sectors: limits.max_discard_sectors.to_le(),
            max_discard_seg: limits.max_discard_seg.to_le(),
            discard_sector_alignment: limits.discard_sector_alignment.to_le(),
            max_write_zeroes_sectors: limits.max_discard_sectors.to_le(),
            max_write_zeroes_seg: limits.max_discard_seg.to_le(),
            write_zeroes_may_unmap: u8::from(!limits.read_only),
            ..Default::default()
        }
    }

    /// The bytes of the window `[offset, offset + size)` of the configuration space, exactly
    /// `size` bytes long. Bytes past the end of the structure read as zero, as they do on
    /// devices whose configuration space is larger than the fields in use.
    pub fn window(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DeviceLimits {
        DeviceLimits {
            capacity_bytes: 1 << 30,
            logical_block_size: 4096,
            seg_max: 254,
            max_discard_sectors: 1 << 21,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            read_only: false,
        }
    }

    #[test]
    fn fields_land_at_spec_offsets() {
        let cfg = VirtioBlkConfig::new(&limits(), 4, true);
        let b = cfg.as_slice();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) >> 9
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn window_is_exactly_the_requested_size() {
        let cfg = VirtioBlkConfig::new(&limits(), 1, true);
        assert_eq!(cfg.window(0, 60).len(), 60);
        assert_eq!(cfg.window(0, 60), cfg.as_slice());
        let tail = cfg.window(32, 100);
        assert_eq!(tail.len(), 100);
        assert_eq!(tail[0], 1);
        assert!(tail[28..].iter().all(|b| *b == 0));
        assert_eq!(cfg.window(200, 56), vec![0; 56]);
        assert_eq!(cfg.window(u32::MAX, 8), vec![0; 8]);
    }
}
