//! Errors of the block layer, shaped like cloud-hypervisor's `block` crate: a small kind that
//! callers match on, the file (and offset) the error concerns, and the format-specific cause.
//!
//! Each piece is said once. `Display` gives the context (the file, or the kind when there is
//! none); the cause is [`std::error::Error::source`], and [`crate::error::Chain`] prints the
//! whole chain on one line: `meta.qcow2: corrupt image: invalid L2 entry 0x3 for guest
//! cluster 7`.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, for control flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O operation on a file failed.
    Io,
    /// The image's metadata is invalid.
    Corrupt,
    /// The image uses a feature vubd does not implement.
    Unsupported,
    /// The operation does not fit the node or the options (a write to a read-only node, a name
    /// the stored-name policy refuses, a file that is not a regular file or block device).
    Refused,
    /// Another process uses the file.
    Locked,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Refused => "refused",
            ErrorKind::Locked => "locked",
        })
    }
}

type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// An error of a block node.
#[derive(Debug)]
pub struct BlockError {
    kind: ErrorKind,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Cause,
}

impl BlockError {
    pub fn new(kind: ErrorKind, source: impl Into<Cause>) -> Self {
        BlockError {
            kind,
            path: None,
            offset: None,
            source: source.into(),
        }
    }

    /// Name the file the error concerns, unless a file nearer the cause is named already.
    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Name the byte offset in that file.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The cause, if it is a `T`.
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        self.source.downcast_ref::<T>()
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.offset) {
            (Some(path), Some(offset)) => write!(f, "{} (offset {offset:#x})", path.display())?,
            (Some(path), None) => write!(f, "{}", path.display())?,
            (None, _) => return write!(f, "{}", self.kind),
        }
        // Corruption is worth saying in so many words; other kinds speak through their cause.
        if self.kind == ErrorKind::Corrupt {
            write!(f, ": {}", self.kind)?;
        }
        Ok(())
    }
}

impl StdError for BlockError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

impl From<io::Error> for BlockError {
    fn from(e: io::Error) -> Self {
        BlockError::new(ErrorKind::Io, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn the_chain_names_the_file_once_and_the_cause_once() {
        let e = BlockError::new(ErrorKind::Corrupt, "invalid L2 entry 0x3")
            .with_path(Path::new("meta.qcow2"))
            .with_path(Path::new("outer.qcow2"));
        assert_eq!(
            Chain(&e).to_string(),
            "meta.qcow2: corrupt image: invalid L2 entry 0x3"
        );
        let e = BlockError::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(Chain(&e)
            .to_string()
            .starts_with("I/O error: No space left"));
        let e = e.with_path(Path::new("d.raw")).with_offset(4096);
        assert!(Chain(&e)
            .to_string()
            .starts_with("d.raw (offset 0x1000): No space left"));
    }
}
