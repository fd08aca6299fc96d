//! What a handshake learns about an export, and what a new connection must keep of it.

use crate::nbd::wire::{FLAG_READ_ONLY, FLAG_SEND_FLUSH};

/// Transmission flags proto.md defines ("Transmission flags") that `crate::nbd::wire` (the
/// wire constants of vubd's read-only server) lacks.
pub(super) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(super) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// The largest payload assumed when the server advertises none (proto.md, "Size
/// constraints": 2^25 is what every server takes), and the most this client sends in one
/// command whatever the server advertises.
pub(super) const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// What the handshake learnt about the export (proto.md, `NBD_INFO_EXPORT`,
/// `NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExportInfo {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// The server's maximum payload (`DEFAULT_MAX_PAYLOAD` if it said nothing).
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The most bytes one read or write carries: the server's maximum, at most 32 MiB,
    /// rounded down to its minimum block.
    pub fn max_transfer(&self) -> u32 {
        let max = self.max_block.min(DEFAULT_MAX_PAYLOAD);
        (max - max % self.min_block).max(self.min_block)
    }

    /// Whether a reconnection to an export with `new` serves what requests planned with
    /// `self` need: not smaller (QEMU refuses a shrunk export too), the same commands, no
    /// stricter block sizes, and writable if a writer (`writes`) uses it.
    pub fn compatible(&self, new: &ExportInfo, writes: bool) -> Result<(), String> {
        if new.size < self.size {
            return Err(format!(
                "the export shrank from {} to {} bytes",
                self.size, new.size
            ));
        }
        for (flag, what) in [
            (FLAG_SEND_FLUSH, "flush"),
            (FLAG_SEND_TRIM, "trim"),
            (FLAG_SEND_WRITE_ZEROES, "write-zeroes"),
        ] {
            if self.has(flag) && !new.has(flag) {
                return Err(format!("the server no longer offers {what}"));
            }
        }
        if writes && new.has(FLAG_READ_ONLY) && !self.has(FLAG_READ_ONLY) {
            return Err("the export became read-only".into());
        }
        if new.min_block > self.min_block || new.max_transfer() < self.max_transfer() {
            return Err("the export's block size constraints became stricter".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::FLAG_HAS_FLAGS;

    fn info(size: u64, flags: u16, min: u32, max: u32) -> ExportInfo {
        ExportInfo {
            size,
            flags: FLAG_HAS_FLAGS | flags,
            min_block: min,
            preferred_block: 4096,
            max_block: max,
            structured: true,
        }
    }

    #[test]
    fn transfers_stay_within_the_maximum_and_whole_minimum_blocks() {
        assert_eq!(info(1, 0, 1, u32::MAX).max_transfer(), 32 << 20);
        assert_eq!(info(1, 0, 4096, 65536).max_transfer(), 65536);
        assert_eq!(info(1, 0, 4096, 100_000).max_transfer(), 98304);
    }

    #[test]
    fn a_new_connection_must_serve_what_the_first_did() {
        let old = info(1 << 20, FLAG_SEND_FLUSH | FLAG_SEND_TRIM, 512, 1 << 20);
        assert_eq!(old.compatible(&old, true), Ok(()));
        let bigger = info(
            2 << 20,
            FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES,
            1,
            u32::MAX,
        );
        assert_eq!(old.compatible(&bigger, true), Ok(()));
        let smaller = info(1 << 19, FLAG_SEND_FLUSH | FLAG_SEND_TRIM, 512, 1 << 20);
        assert!(old
            .compatible(&smaller, true)
            .unwrap_err()
            .contains("shrank"));
        let no_trim = info(1 << 20, FLAG_SEND_FLUSH, 512, 1 << 20);
        assert!(old.compatible(&no_trim, true).unwrap_err().contains("trim"));
        let ro = info(
            1 << 20,
            FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_READ_ONLY,
            512,
            1 << 20,
        );
        assert!(old.compatible(&ro, true).is_err());
        assert_eq!(old.compatible(&ro, false), Ok(()));
        let strict = info(1 << 20, FLAG_SEND_FLUSH | FLAG_SEND_TRIM, 4096, 1 << 20);
        assert!(old.compatible(&strict, true).is_err());
    }
}
