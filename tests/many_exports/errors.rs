//! Command lines vubd refuses when it serves several disks: one line on stderr naming what is
//! wrong, a non-zero exit, and no socket left behind — not even the socket of a disk that was
//! already being served when a later one failed.

use super::*;
use common::cli::one_line_error;

/// `vubd serve ARGS` in `dir` (relative names resolve there): it must fail; returns stderr.
fn refused(dir: &TempDir, args: &[&str]) -> String {
    let out = Command::new(vubd_bin())
        .current_dir(dir.path())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vubd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "vubd serve {args:?} should fail: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(
        sockets_in(dir.path()),
        Vec::<PathBuf>::new(),
        "vubd serve {args:?} left sockets behind"
    );
    stderr
}

const BLOCKDEV_B: &str = "driver=file,node-name=b,filename=b.raw";
const EXPORT_B: &str = "type=vhost-user-blk,id=e,node-name=b,addr.type=unix,addr.path=b.sock";

#[test]
fn bad_many_disk_command_lines_are_refused_in_one_line_leaving_nothing() {
    let dir = TempDir::new("many-errors");
    create_image(&dir.join("a.raw"), 1 << 20, 1);
    create_image(&dir.join("b.raw"), 1 << 20, 2);
    let disk_a = "image=a.raw,socket=a.sock";
    let disk_b = "image=b.raw,socket=b.sock";
    let mixed: [&[&str]; 3] = [
        &["--disk", disk_a, "--image", "b.raw", "--socket", "b.sock"],
        &[
            "--disk",
            disk_a,
            "--blockdev",
            BLOCKDEV_B,
            "--export",
            EXPORT_B,
        ],
        &[
            "--image",
            "a.raw",
            "--socket",
            "a.sock",
            "--blockdev",
            BLOCKDEV_B,
            "--export",
            EXPORT_B,
        ],
    ];
    for args in mixed {
        let line = one_line_error(&refused(&dir, args)).to_string();
        assert!(
            line.starts_with("vubd: error: use one form"),
            "{args:?}: {line}"
        );
        assert!(
            line.contains("--disk") && line.contains("--export"),
            "{line}"
        );
    }

    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--disk", disk_a, "--disk", "image=b.raw,socket=a.sock"],
            &["--disk socket", "a.sock", "given to two disks"],
        ),
        // The same socket spelled another way.
        (
            &["--disk", disk_a, "--disk", "image=b.raw,socket=./a.sock"],
            &["--disk socket", "./a.sock", "given to two disks"],
        ),
        (
            &[
                "--disk",
                "image=a.raw,socket=a.sock,node-name=n",
                "--disk",
                "image=b.raw,socket=b.sock,node-name=n",
            ],
            &["--disk", "node name 'n'", "two disks", "node-name="],
        ),
        (
            &[
                "--blockdev",
                "driver=file,node-name=a,filename=a.raw",
                "--blockdev",
                BLOCKDEV_B,
                "--export",
                "type=vhost-user-blk,id=d,node-name=a,addr.type=unix,addr.path=b.sock",
                "--export",
                EXPORT_B,
            ],
            &["--export addr.path", "b.sock", "given to two disks"],
        ),
        (
            &["--disk", disk_a, "--disk", disk_b, "--serial", "S1"],
            &["--serial", "serial="],
        ),
        // A --blockdev and no export, no control socket: nothing to serve.
        (
            &["--blockdev", BLOCKDEV_B],
            &["nothing to serve", "--control"],
        ),
        (
            &[
                "--disk",
                "image=a.raw,socket=a.sock,id=x",
                "--disk",
                "image=b.raw,socket=b.sock,id=x",
            ],
            &["--disk", "export id 'x'", "two disks", "id="],
        ),
    ];
    for (args, needles) in cases {
        let line = one_line_error(&refused(&dir, args)).to_string();
        assert!(line.starts_with("vubd: error: "), "{args:?}: {line}");
        for needle in needles {
            assert!(
                line.contains(needle),
                "{args:?}: {line:?} should name {needle:?}"
            );
        }
    }

    // No disk and no control socket at all: told what to give.
    let line = one_line_error(&refused(&dir, &[])).to_string();
    assert!(
        line.starts_with("vubd: error: ") && line.contains("--disk"),
        "{line}"
    );

    // The second disk cannot be opened: the first, already served (and the control socket
    // not yet made), leaves no socket behind.
    let line = one_line_error(&refused(
        &dir,
        &[
            "--disk",
            disk_a,
            "--disk",
            "image=missing.raw,socket=b.sock",
            "--control",
            "q.sock",
        ],
    ))
    .to_string();
    assert!(line.contains("missing.raw"), "{line}");
    // ... and its image is not left locked: a new vubd serves it.
    let mut vubd = Proc::vubd(
        &dir,
        &["--disk", disk_a, "--control", "q.sock"],
        &["a.sock", "q.sock"],
    );
    vubd.stop_ok();

    // A --disk key vubd does not know, a --disk without an image: named.
    let stderr = refused(&dir, &["--disk", "image=a.raw,socket=a.sock,bogus=1"]);
    assert!(one_line_error(&stderr).contains("'bogus'"), "{stderr}");
    let stderr = refused(&dir, &["--disk", "socket=a.sock"]);
    assert!(
        one_line_error(&stderr).contains("'image' is required"),
        "{stderr}"
    );
}
