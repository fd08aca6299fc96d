//! Decompression of compressed clusters: raw deflate (`compression_type` 0, as QEMU writes it:
//! no zlib header, 4 KiB window) and zstd frames (`compression_type` 1).
//!
//! The stored data may be followed by unrelated bytes up to the end of its last sector;
//! decompression stops once a whole cluster has been produced.

use std::io::Read;

use super::header::CompressionType;

/// Decompress `input` into exactly `out.len()` bytes. Returns `None` if the data is corrupt or
/// too short.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Option<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Option<()> {
    let mut inflater = flate2::Decompress::new(false);
    let status = inflater
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .ok()?;
    let done = inflater.total_out() as usize == out.len();
    match status {
        flate2::Status::StreamEnd | flate2::Status::Ok | flate2::Status::BufError if done => {
            Some(())
        }
        _ => None,
    }
}

fn zstd(input: &[u8], out: &mut [u8]) -> Option<()> {
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(input).ok()?;
    decoder.read_exact(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn inflates_raw_deflate_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 97) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; data.len()];
        assert_eq!(
            decompress(CompressionType::Zlib, &compressed, &mut out),
            Some(())
        );
        assert_eq!(out, data);
        assert_eq!(
            decompress(CompressionType::Zlib, &compressed[..10], &mut out),
            None
        );
        assert_eq!(
            decompress(CompressionType::Zstd, &[1, 2, 3, 4], &mut out),
            None
        );
    }
}
