fn main() {
    large_allocations_from_the_kernel();
    std::process::exit(vubd::cli::main());
}

/// Have glibc serve every allocation of 1 MiB or more with its own mapping, and give it back on
/// free. By default the threshold rises to the largest block freed so far: after the first big
/// table read at open is freed, each bitmap's megabytes come from the heap, and calloc must
/// clear them, so every page is touched even where the bitmap is clean. A 1 TiB disk with 8
/// bitmaps then opened in 22-26 ms with 22.5 MiB resident; with the fixed threshold, 16-19 ms
/// with 5.2 MiB (fresh mappings read as zero without being touched). Buffers reused on the
/// request paths (NBD, copy-before-write) are kept or smaller, and do not churn mappings.
fn large_allocations_from_the_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; nothing has been allocated with the
    // old setting that the new one could mishandle.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
