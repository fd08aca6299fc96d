//! End-to-end tests of `vubd serve` on raw images, driven through libblkio.

mod common;

use std::fs;
use std::mem::MaybeUninit;

use blkio::{Completion, ReqFlags};
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::{create_image, pattern, TempDir, Vubd};

const MIB: usize = 1 << 20;

/// Apply a write to the model of the disk.
fn apply(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn round_trip(engine: &str) {
    round_trip_in(&std::env::temp_dir(), engine, &[]);
}

fn round_trip_in(base: &std::path::Path, engine: &str, extra: &[&str]) {
    let dir = TempDir::new_in(base, &format!("round-trip-{engine}"));
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, 8 * MIB, 1);
    let mut args = vec!["--image", image.to_str().unwrap(), "--io-engine", engine];
    args.extend_from_slice(extra);
    let mut vubd = Vubd::start(&dir.join("vubd.sock"), &args);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.capacity(), 8 * MIB as u64);

    // Reads see the image as it is.
    assert_same(
        &client.read(0, 0, MIB).unwrap(),
        &model[..MIB],
        "initial read",
    );

    // Writes of several sizes and alignments, including one spanning many pages.
    let writes: [(u64, usize); 5] = [
        (0, 4096),
        (512 * 7, 512),
        (MIB as u64 - 4096, 3 * MIB),
        (8 * MIB as u64 - 512, 512),
        (5 * MIB as u64 + 512, 64 * 1024),
    ];
    for (i, (offset, len)) in writes.iter().enumerate() {
        let data = pattern(*len, 100 + i as u64);
        client.write(0, *offset, &data).unwrap();
        apply(&mut model, *offset, &data);
    }
    client.flush(0).unwrap();
    for (offset, len) in writes {
        let got = client.read(0, offset, len).unwrap();
        assert_same(
            &got,
            &model[offset as usize..offset as usize + len],
            "read back",
        );
    }
    drop(client);
    vubd.stop();
    // Nothing outside the written ranges changed.
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn read_write_flush_round_trip_io_uring() {
    round_trip("io-uring");
}

#[test]
fn read_write_flush_round_trip_sync_engine() {
    round_trip("sync");
}

#[test]
fn read_write_flush_round_trip_auto_engine_on_tmpfs() {
    // Memory-backed files take the inline path of the default engine.
    round_trip_in(&memory_backed_dir(), "auto", &[]);
}

#[test]
fn read_write_flush_round_trip_busy_polling() {
    round_trip_in(&memory_backed_dir(), "auto", &["--poll-us", "100"]);
    round_trip_in(&std::env::temp_dir(), "io-uring", &["--poll-us", "100"]);
}

#[test]
fn read_write_flush_round_trip_submission_polling() {
    // O_DIRECT first, so that every transfer goes through the ring the kernel thread polls.
    round_trip_in(
        &std::env::temp_dir(),
        "io-uring",
        &["--cache", "none", "--io-sqpoll", "0"],
    );
    round_trip_in(&std::env::temp_dir(), "auto", &["--io-sqpoll", "0"]);

    // The kernel's polling thread is there while a frontend is connected.
    let dir = TempDir::new("sqpoll-thread");
    let image = dir.join("disk.raw");
    create_image(&image, MIB, 1);
    let vubd = Vubd::start(
        &dir.join("vubd.sock"),
        &["--image", image.to_str().unwrap(), "--io-sqpoll", "0"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.read(0, 0, 4096).unwrap();
    let threads: Vec<String> = fs::read_dir(format!("/proc/{}/task", vubd.pid()))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        threads.iter().any(|c| c.starts_with("iou-sqp-")),
        "no submission-polling thread among {threads:?}"
    );
}

fn memory_backed_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[test]
fn requests_beyond_the_disk_fail() {
    let dir = TempDir::new("beyond");
    let image = dir.join("disk.raw");
    let model = create_image(&image, MIB, 2);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert!(client.read(0, MIB as u64 - 512, 1024).is_err());
    assert!(client.write(0, MIB as u64, &[0u8; 512]).is_err());
    // The device keeps working afterwards.
    assert_same(
        &client.read(0, 0, 4096).unwrap(),
        &model[..4096],
        "read after errors",
    );
    drop(client);
    vubd.stop();
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn discard_and_write_zeroes() {
    let dir = TempDir::new("zeroes");
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, 4 * MIB, 3);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();

    // Write zeroes, allowed to unmap and not, read back as zeroes.
    client.write_zeroes(0, 64 * 1024, 128 * 1024, true).unwrap();
    apply(&mut model, 64 * 1024, &vec![0u8; 128 * 1024]);
    client
        .write_zeroes(0, MIB as u64 + 512, 3 * 512, false)
        .unwrap();
    apply(&mut model, MIB as u64 + 512, &[0u8; 3 * 512]);
    assert_same(
        &client.read(0, 0, 2 * MIB).unwrap(),
        &model[..2 * MIB],
        "zeroed ranges",
    );

    // Discard succeeds; its range has unspecified contents, everything else is untouched.
    let (d_off, d_len) = (2 * MIB as u64, MIB as u64);
    client.discard(0, d_off, d_len).unwrap();
    client.flush(0).unwrap();
    drop(client);
    vubd.stop();
    let mut file = fs::read(&image).unwrap();
    let discarded = d_off as usize..(d_off + d_len) as usize;
    file[discarded.clone()].fill(0);
    model[discarded].fill(0);
    assert_same(&file, &model, "image file outside the discarded range");
}

#[test]
fn concurrent_random_writes_over_two_queues_then_verify() {
    concurrent_random_writes(&[]);
}

#[test]
fn concurrent_random_writes_over_two_busy_polling_queues() {
    concurrent_random_writes(&["--poll-us", "200"]);
}

fn concurrent_random_writes(extra: &[&str]) {
    const CHUNK: u64 = 64 * 1024;
    const DISK: usize = 32 * MIB;
    let dir = TempDir::new("concurrent");
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, DISK, 4);
    let mut args = vec!["--image", image.to_str().unwrap(), "--num-queues", "2"];
    args.extend_from_slice(extra);
    let mut vubd = Vubd::start(&dir.join("s"), &args);
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    let chunks = DISK as u64 / CHUNK;

    // Queue t owns the chunks with index % 2 == t, so the final content is deterministic
    // whatever order the queues run in. Each queue keeps 16 writes in flight.
    let base = client.buf(0).as_mut_ptr() as usize;
    let per_queue = BlkioClient::BUF;
    let results: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(t, q)| {
                s.spawn(move || {
                    let mut rng = pattern(4096, 50 + t as u64).into_iter().cycle();
                    let mut done = Vec::new();
                    for round in 0..40u64 {
                        // Distinct chunks within a batch: writes in flight together never
                        // overlap, so the model is exact.
                        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
                        let mut used = std::collections::HashSet::new();
                        for i in 0..16u64 {
                            let chunk = loop {
                                let pick = u64::from(rng.next().unwrap()) << 8
                                    | u64::from(rng.next().unwrap());
                                let chunk = (pick % (chunks / 2)) * 2 + t as u64;
                                if used.insert(chunk) {
                                    break chunk;
                                }
                            };
                            let sectors = 1 + u64::from(rng.next().unwrap()) % 128;
                            let within =
                                (u64::from(rng.next().unwrap()) % (128 - sectors + 1)) * 512;
                            let offset = chunk * CHUNK + within;
                            let data =
                                pattern(sectors as usize * 512, round * 1000 + i + 7 * t as u64);
                            batch.push((offset, data));
                        }
                        for (i, (offset, data)) in batch.iter().enumerate() {
                            let ptr = (base + t * per_queue + i * CHUNK as usize) as *mut u8;
                            // SAFETY: each in-flight write has its own 64 KiB piece of this
                            // queue's buffer.
                            unsafe {
                                std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len())
                            };
                            q.write(*offset, ptr, data.len(), i, ReqFlags::empty());
                        }
                        let mut completions: Vec<MaybeUninit<Completion>> =
                            (0..16).map(|_| MaybeUninit::uninit()).collect();
                        let mut got = 0;
                        while got < 16 {
                            let n = q
                                .do_io(&mut completions[got..], 16 - got, None, None)
                                .unwrap();
                            for c in &completions[got..got + n] {
                                // SAFETY: initialised by do_io.
                                assert_eq!(unsafe { c.assume_init_ref() }.ret, 0);
                            }
                            got += n;
                        }
                        done.extend(batch);
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for writes in &results {
        for (offset, data) in writes {
            apply(&mut model, *offset, data);
        }
    }
    client.flush(1).unwrap();
    for q in 0..2 {
        let got = client.read_all(q, model.len()).unwrap();
        assert_same(&got, &model, "read back through each queue");
    }
    drop(client);
    vubd.stop();
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn a_second_connection_reads_what_the_first_wrote() {
    let dir = TempDir::new("reconnect");
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, 4 * MIB, 5);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);

    let data = pattern(256 * 1024, 77);
    {
        let mut first = BlkioClient::connect(&vubd.socket, 1).unwrap();
        first.write(0, 512 * 1024, &data).unwrap();
        apply(&mut model, 512 * 1024, &data);
    }
    // The first frontend is gone; the same daemon accepts the next one.
    for round in 0..3 {
        let mut next = BlkioClient::connect(&vubd.socket, 1).unwrap();
        assert_same(
            &next.read(0, 0, 4 * MIB).unwrap(),
            &model,
            &format!("connection {}", round + 2),
        );
    }
    vubd.stop();
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn read_only_device_is_offered_read_only() {
    let dir = TempDir::new("readonly");
    let image = dir.join("disk.raw");
    let model = create_image(&image, MIB, 6);
    let mut vubd = Vubd::start(
        &dir.join("s"),
        &["--image", image.to_str().unwrap(), "--readonly"],
    );
    // A read-write frontend is refused because the device offers VIRTIO_BLK_F_RO.
    let err = BlkioClient::connect_with(&vubd.socket, 1, false).err();
    assert!(err.is_some(), "read-write open of a read-only device");
    let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
    assert_same(&client.read(0, 0, MIB).unwrap(), &model, "read-only read");
    drop(client);
    vubd.stop();
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn sigterm_with_a_connected_frontend_drains_flushes_and_exits() {
    let dir = TempDir::new("sigterm");
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, 4 * MIB, 8);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let pieces: Vec<(u64, Vec<u8>)> = (0..32)
        .map(|i| (i * 128 * 1024, pattern(64 * 1024, 900 + i)))
        .collect();
    client.write_batch(0, &pieces).unwrap();
    for (offset, data) in &pieces {
        apply(&mut model, *offset, data);
    }
    // The frontend is still connected when the signal arrives.
    let stderr = vubd.stop();
    assert!(stderr.contains("shutting down"), "{stderr}");
    drop(client);
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn sigint_without_a_frontend_exits_cleanly() {
    let dir = TempDir::new("sigint");
    let image = dir.join("disk.raw");
    create_image(&image, MIB, 9);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let (status, stderr) = vubd.stop_with(libc::SIGINT);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!dir.join("s").exists());
}

#[test]
fn direct_io_with_cache_none() {
    let dir = TempDir::new("direct");
    let image = dir.join("disk.raw");
    let mut model = create_image(&image, 4 * MIB, 10);
    let mut vubd = Vubd::start(
        &dir.join("s"),
        &["--image", image.to_str().unwrap(), "--cache", "none"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let data = pattern(MIB, 11);
    client.write(0, 4096, &data).unwrap();
    apply(&mut model, 4096, &data);
    assert_same(&client.read(0, 0, 4 * MIB).unwrap(), &model, "direct read");
    drop(client);
    vubd.stop();
    assert_same(&fs::read(&image).unwrap(), &model, "image file");
}
