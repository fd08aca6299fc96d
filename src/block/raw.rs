//! The `raw` format node: guest byte N is byte N of the file.

use std::sync::Arc;

use super::file::FileNode;
use super::{
    Allocation, BlockDriver, BlockError, Extent, GuestIo, HostZeroOp, IoTicket, Mapping, ZeroOp,
};

/// A raw image: an identity mapping onto one file.
#[derive(Debug)]
pub struct RawNode {
    files: [Arc<FileNode>; 1],
}

impl RawNode {
    pub fn new(file: Arc<FileNode>) -> Self {
        RawNode { files: [file] }
    }

    fn identity(offset: u64, len: u64, out: &mut Vec<Extent>) {
        out.push(Extent {
            len,
            mapping: Mapping::Data { file: 0, offset },
        });
    }
}

impl BlockDriver for RawNode {
    fn format(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.files[0].size()
    }

    fn read_only(&self) -> bool {
        self.files[0].read_only()
    }

    fn files(&self) -> &[Arc<FileNode>] {
        &self.files
    }

    fn grow(&self, size: u64) -> Result<(), BlockError> {
        let file = &self.files[0];
        if size < file.size() {
            return Err(BlockError::new(
                super::ErrorKind::Refused,
                format!(
                    "cannot shrink the disk from {} to {size} bytes: vubd only grows disks",
                    file.size()
                ),
            )
            .with_path(file.path()));
        }
        file.grow_to(size)
            .map_err(|e| BlockError::new(super::ErrorKind::Io, e).with_path(file.path()))
    }

    fn map_read(
        &self,
        offset: u64,
        len: u64,
        _guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        Self::identity(offset, len, out);
        Ok(IoTicket::NONE)
    }

    fn map_write(
        &self,
        offset: u64,
        len: u64,
        _guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        Self::identity(offset, len, out);
        Ok(IoTicket::NONE)
    }

    fn map_zeroes(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), BlockError> {
        out.push(HostZeroOp {
            file: 0,
            offset,
            len,
            op,
        });
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, Allocation), BlockError> {
        let file = &self.files[0];
        let (n, data) = file.allocation(offset, len).map_err(|e| {
            BlockError::from(e)
                .with_path(file.path())
                .with_offset(offset)
        })?;
        Ok((
            n,
            if data {
                Allocation::Data
            } else {
                Allocation::Hole
            },
        ))
    }

    fn discard_granularity(&self) -> u64 {
        // Hole punching works in file-system blocks; 4 KiB is the common block size.
        4096
    }
}
