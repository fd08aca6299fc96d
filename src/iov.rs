//! One cursor over lists of byte runs: host iovecs into guest memory, and guest address ranges
//! of a descriptor chain.
//!
//! A request's bytes are scattered over several buffers, and every layer cuts them differently:
//! the parser finds a 16-byte header and a status byte wherever the driver put them, the queue
//! worker cuts the data iovecs at extent boundaries, and format drivers copy parts of them. One
//! [`Cursor`] does all of it (as virtio-queue's `descriptor_utils` backs both its `Reader` and
//! its `Writer` with one consumer), generic over the kind of run ([`Span`]).

use vm_memory::GuestAddress;

/// A contiguous run of bytes that can be cut into smaller runs.
pub trait Span: Copy {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// The `len` bytes starting `at` bytes in. Callers keep `at + len <= self.len()`.
    fn cut(&self, at: u64, len: u64) -> Self;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Span for libc::iovec {
    #[inline]
    fn len(&self) -> u64 {
        self.iov_len as u64
    }

    #[inline]
    fn cut(&self, at: u64, len: u64) -> Self {
        libc::iovec {
            // In bounds of the same buffer (`at <= iov_len`); wrapping_add keeps this safe code,
            // and dereferencing stays with whoever owns the buffer.
            iov_base: self.iov_base.cast::<u8>().wrapping_add(at as usize).cast(),
            iov_len: len as usize,
        }
    }
}

/// A stretch of guest memory named by one descriptor. The parser refuses ranges whose end
/// overflows the address space, so cutting never wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u64,
}

impl Span for GuestRange {
    #[inline]
    fn len(&self) -> u64 {
        self.len
    }

    #[inline]
    fn cut(&self, at: u64, len: u64) -> Self {
        GuestRange {
            addr: GuestAddress(self.addr.0.wrapping_add(at)),
            len,
        }
    }
}

/// Total length of `spans`, saturating (a guest can describe more than 2^64 bytes).
pub fn total_len<S: Span>(spans: &[S]) -> u64 {
    spans.iter().fold(0u64, |n, s| n.saturating_add(s.len()))
}

/// A position in a list of spans that moves forward as bytes are skipped or taken.
#[derive(Clone, Debug)]
pub struct Cursor<'a, S> {
    spans: &'a [S],
    /// Index of the current span.
    index: usize,
    /// Bytes already consumed of the current span.
    offset: u64,
}

impl<'a, S: Span> Cursor<'a, S> {
    #[inline]
    pub fn new(spans: &'a [S]) -> Self {
        Cursor {
            spans,
            index: 0,
            offset: 0,
        }
    }

    /// The next run of at most `max` bytes, within one span; `None` at the end.
    #[inline]
    pub fn next_piece(&mut self, max: u64) -> Option<S> {
        while let Some(span) = self.spans.get(self.index) {
            let left = span.len() - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            if max == 0 {
                return None;
            }
            let n = left.min(max);
            let piece = span.cut(self.offset, n);
            self.offset += n;
            if self.offset == span.len() {
                self.index += 1;
                self.offset = 0;
            }
            return Some(piece);
        }
        None
    }

    /// Step over the next `len` bytes; returns how many there were.
    #[inline]
    pub fn skip(&mut self, len: u64) -> u64 {
        let mut done = 0;
        while let Some(span) = self.spans.get(self.index) {
            let left = span.len() - self.offset;
            if done + left > len {
                self.offset += len - done;
                return len;
            }
            // Whole spans are stepped over without being cut.
            done += left;
            self.index += 1;
            self.offset = 0;
        }
        done
    }

    /// Call `f` on the runs covering the next `len` bytes, in order; returns how many bytes
    /// they cover (less than `len` if the spans end first).
    #[inline]
    pub fn take(&mut self, len: u64, mut f: impl FnMut(S)) -> u64 {
        let mut done = 0;
        while done < len {
            let Some(piece) = self.next_piece(len - done) else {
                break;
            };
            done += piece.len();
            f(piece);
        }
        done
    }

    /// Like [`Cursor::take`], stopping at the first error `f` returns.
    #[inline]
    pub fn try_take<E>(
        &mut self,
        len: u64,
        mut f: impl FnMut(S) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut done = 0;
        while done < len {
            let Some(piece) = self.next_piece(len - done) else {
                break;
            };
            done += piece.len();
            f(piece)?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(lens: &[u64]) -> Vec<GuestRange> {
        let mut addr = 0x1000;
        lens.iter()
            .map(|&len| {
                let r = GuestRange {
                    addr: GuestAddress(addr),
                    len,
                };
                addr += 0x1_0000;
                r
            })
            .collect()
    }

    fn collect(cursor: &mut Cursor<GuestRange>, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        cursor.take(len, |r| out.push((r.addr.0, r.len)));
        out
    }

    #[test]
    fn take_cuts_across_spans_and_skips_empty_ones() {
        let spans = ranges(&[10, 0, 6, 20]);
        let mut c = Cursor::new(&spans);
        assert_eq!(collect(&mut c, 4), vec![(0x1000, 4)]);
        assert_eq!(
            collect(&mut c, 14),
            vec![(0x1004, 6), (0x2_1000, 6), (0x3_1000, 2)]
        );
        assert_eq!(c.skip(100), 18, "only what is left is skipped");
        assert_eq!(collect(&mut c, 1), vec![]);
        assert!(c.next_piece(1).is_none());
    }

    #[test]
    fn skip_then_take_lands_mid_span() {
        let spans = ranges(&[16, 16]);
        let mut c = Cursor::new(&spans);
        assert_eq!(c.skip(20), 20);
        assert_eq!(collect(&mut c, 8), vec![(0x1_1004, 8)]);
        assert_eq!(c.skip(0), 0);
        assert_eq!(collect(&mut c, 0), vec![]);
    }

    #[test]
    fn iovecs_are_cut_by_pointer() {
        let mut buf = [0u8; 32];
        let base = buf.as_mut_ptr();
        let iovs = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: base.wrapping_add(16).cast(),
                iov_len: 16,
            },
        ];
        let mut c = Cursor::new(&iovs[..]);
        c.skip(6);
        let mut out = Vec::new();
        assert_eq!(c.take(12, |iov| out.push(iov)), 12);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_base.cast::<u8>(), base.wrapping_add(6));
        assert_eq!(out[0].iov_len, 2);
        assert_eq!(out[1].iov_base.cast::<u8>(), base.wrapping_add(16));
        assert_eq!(out[1].iov_len, 10);
        assert_eq!(total_len(&iovs[..]), 24);
    }

    #[test]
    fn try_take_stops_at_the_first_error() {
        let spans = ranges(&[4, 4, 4]);
        let mut c = Cursor::new(&spans);
        let mut seen = 0;
        let r = c.try_take(12, |r| {
            seen += 1;
            if r.addr.0 == 0x1_1000 {
                Err("bad")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("bad"));
        assert_eq!(seen, 2);
    }

    #[test]
    fn total_len_saturates() {
        let spans = [
            GuestRange {
                addr: GuestAddress(0),
                len: u64::MAX,
            },
            GuestRange {
                addr: GuestAddress(0),
                len: 5,
            },
        ];
        assert_eq!(total_len(&spans), u64::MAX);
    }
}
