//! A synchronous libblkio client for tests: one request at a time per queue, or batches.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A connected libblkio `virtio-blk-vhost-user` instance with one buffer per queue.
pub struct BlkioClient {
    pub queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    per_queue: usize,
}

// SAFETY: the memory region is plain shared memory owned by this client.
unsafe impl Send for BlkioClient {}

/// The `ret` of a failed request: a negated errno.
pub type Errno = i32;

impl BlkioClient {
    /// Maximum bytes per request (the per-queue buffer size).
    pub const BUF: usize = 4 << 20;

    pub fn connect(socket: &Path, queues: usize) -> Result<BlkioClient, blkio::Error> {
        Self::connect_with(socket, queues, false)
    }

    pub fn connect_with(
        socket: &Path,
        queues: usize,
        read_only: bool,
    ) -> Result<BlkioClient, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().expect("utf-8 path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", queues as i32)?;
        let outcome = blkio.start()?;
        let region = blkio.alloc_mem_region(Self::BUF * queues)?;
        blkio.map_mem_region(&region)?;
        Ok(BlkioClient {
            queues: outcome.queues,
            blkio,
            region,
            per_queue: Self::BUF,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio.get_u64(name).expect(name)
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio.get_i32(name).expect(name)
    }

    /// Queue `q`'s buffer.
    pub fn buf(&mut self, q: usize) -> &mut [u8] {
        // SAFETY: the region is mapped for the life of self; each queue owns its slice.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.region.addr + q * self.per_queue) as *mut u8,
                self.per_queue,
            )
        }
    }

    fn buf_ptr(&self, q: usize, offset: usize) -> *mut u8 {
        (self.region.addr + q * self.per_queue + offset) as *mut u8
    }

    /// Wait for `n` completions on queue `q`; returns their `ret` by `user_data`.
    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut done = Vec::new();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        while done.len() < n {
            let want = n - done.len();
            let got = self.queues[q]
                .do_io(&mut completions[..want], want, None, None)
                .expect("do_io");
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                done.push((c.user_data, c.ret));
            }
        }
        done
    }

    fn one(&mut self, q: usize) -> Result<(), Errno> {
        match self.wait(q, 1)[0].1 {
            0 => Ok(()),
            ret => Err(ret),
        }
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        assert!(len <= self.per_queue);
        let ptr = self.buf_ptr(q, 0);
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        self.one(q)?;
        Ok(self.buf(q)[..len].to_vec())
    }

    /// The first `len` bytes of the disk, read on queue `q` one buffer-sized request at a
    /// time: how tests compare a whole disk with its model.
    pub fn read_all(&mut self, q: usize, len: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = self.per_queue.min(len - out.len());
            out.extend_from_slice(&self.read(q, out.len() as u64, n)?);
        }
        Ok(out)
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> Result<(), Errno> {
        assert!(data.len() <= self.per_queue);
        self.buf(q)[..data.len()].copy_from_slice(data);
        let ptr = self.buf_ptr(q, 0);
        self.queues[q].write(offset, ptr, data.len(), 0, ReqFlags::empty());
        self.one(q)
    }

    /// Write several (offset, data) pieces concurrently on queue `q`.
    pub fn write_batch(&mut self, q: usize, pieces: &[(u64, Vec<u8>)]) -> Result<(), Errno> {
        let mut at = 0;
        let mut ptrs = Vec::new();
        for (_, data) in pieces {
            assert!(at + data.len() <= self.per_queue);
            self.buf(q)[at..at + data.len()].copy_from_slice(data);
            ptrs.push(self.buf_ptr(q, at));
            at += data.len();
        }
        for (i, ((offset, data), ptr)) in pieces.iter().zip(ptrs).enumerate() {
            self.queues[q].write(*offset, ptr, data.len(), i, ReqFlags::empty());
        }
        let results = self.wait(q, pieces.len());
        match results.iter().find(|(_, ret)| *ret != 0) {
            Some((_, ret)) => Err(*ret),
            None => Ok(()),
        }
    }

    pub fn flush(&mut self, q: usize) -> Result<(), Errno> {
        self.queues[q].flush(0, ReqFlags::empty());
        self.one(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> Result<(), Errno> {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.one(q)
    }

    pub fn write_zeroes(
        &mut self,
        q: usize,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Errno> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.one(q)
    }
}
