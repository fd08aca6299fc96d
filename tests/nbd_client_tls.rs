//! The NBD client over TLS against qemu-nbd with `tls-creds-x509` credentials made by openssl
//! at run time (tests/common/tls.rs): with and without client certificates, over a UNIX
//! socket (which needs tls-hostname) and TCP, concurrent large transfers through the shared
//! session, a reconnection, and every misconfiguration failing with what is wrong.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use vubd::block::remote::location::NbdSpec;
use vubd::block::remote::nbd::{NbdClient, NbdClientError, TlsClientCreds};

#[path = "common/nbd_servers.rs"]
mod servers;
#[path = "common/tls.rs"]
mod tls;
use servers::*;

const MIB: usize = 1 << 20;

/// qemu-nbd with TLS from `certs/server`; `verify_peer` asks clients for certificates.
fn tls_server(spec: &NbdSpec, file: &Path, certs: &Path, verify_peer: bool) -> Server {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={}",
        certs.join("server").display(),
        if verify_peer { "on" } else { "off" }
    );
    qemu_nbd(spec, file, &["--object", &object, "--tls-creds", "tls0"])
}

fn creds(certs: &Path, which: &str) -> TlsClientCreds {
    TlsClientCreds::load(&certs.join(which)).unwrap()
}

fn with_tls(spec: NbdSpec, hostname: Option<&str>) -> NbdSpec {
    NbdSpec {
        tls_creds: Some("tls0".into()),
        tls_hostname: hostname.map(String::from),
        ..spec
    }
}

/// Threads writing and reading large multi-iovec buffers at once through one TLS session.
fn exercise(c: &NbdClient, file: &Path) {
    let len = 3 * MIB + 4096;
    thread::scope(|s| {
        for t in 0..3 {
            s.spawn(move || {
                let off = t * 4 * MIB;
                let data = pattern(off, len, 0x3c);
                assert_eq!(write_async(c, off as u64, &data, 7).wait().0, len as i32);
                let (r, back) = read_async(c, off as u64, len, 5).wait();
                assert_eq!(r, len as i32);
                assert!(back == data, "thread {t} read back its data");
            });
        }
    });
    store(c).flush().unwrap();
    let disk = fs::read(file).unwrap();
    for t in 0..3 {
        let off = t * 4 * MIB;
        assert!(disk[off..off + len] == pattern(off, len, 0x3c)[..]);
    }
}

#[test]
fn tls_with_a_client_certificate_over_unix_and_tcp() {
    let dir = TempDir::new("tls");
    tls::make_certs(&dir.0);
    let file = dir.join("disk.raw");
    patterned_file(&file, 16 * MIB, 1);
    let unix = with_tls(unix_spec(&dir.join("nbd.sock"), "disk"), Some("localhost"));
    let _s1 = tls_server(&unix, &file, &dir.0, true);
    let c = NbdClient::connect(&unix, false, Some(creds(&dir.0, "client"))).unwrap();
    exercise(&c, &file);
    drop(c);
    // TCP to 127.0.0.1: the certificate carries that address, no tls-hostname needed.
    let tcp = with_tls(tcp_spec(free_port(), "disk"), None);
    let _s2 = tls_server(&tcp, &file, &dir.0, true);
    let c = NbdClient::connect(&tcp, false, Some(creds(&dir.0, "client"))).unwrap();
    exercise(&c, &file);
}

#[test]
fn tls_without_a_client_certificate_when_the_server_asks_for_none() {
    let dir = TempDir::new("tls-noverify");
    tls::make_certs(&dir.0);
    let ca_only = dir.join("ca-only");
    fs::create_dir(&ca_only).unwrap();
    fs::copy(dir.join("client/ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let file = dir.join("disk.raw");
    let data = patterned_file(&file, MIB, 2);
    let spec = with_tls(unix_spec(&dir.join("nbd.sock"), "disk"), Some("localhost"));
    let _server = tls_server(&spec, &file, &dir.0, false);
    let c = NbdClient::connect(&spec, false, Some(creds(&dir.0, "ca-only"))).unwrap();
    let mut buf = vec![0u8; 65536];
    store(&c).read_at(&mut buf, 4096).unwrap();
    assert!(buf[..] == data[4096..4096 + 65536]);
}

#[test]
fn tls_misconfigurations_fail_with_what_is_wrong() {
    let dir = TempDir::new("tls-bad");
    tls::make_certs(&dir.0);
    let file = dir.join("disk.raw");
    patterned_file(&file, MIB, 3);
    let plain = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = tls_server(&plain, &file, &dir.0, true);
    let client = || Some(creds(&dir.0, "client"));
    let msg = |r: Result<NbdClient, NbdClientError>| r.unwrap_err().to_string();

    let m = msg(NbdClient::connect(&plain, false, None));
    assert!(m.contains("requires TLS") && m.contains("tls-creds"), "{m}");
    let m = msg(NbdClient::connect(
        &with_tls(plain.clone(), None),
        false,
        client(),
    ));
    assert!(m.contains("needs tls-hostname"), "{m}");
    let m = msg(NbdClient::connect(
        &with_tls(plain.clone(), Some("example.com")),
        false,
        client(),
    ));
    assert!(
        m.contains("TLS handshake failed") && m.contains("certificate"),
        "{m}"
    );
    // Credentials of another CA: the server's certificate is not trusted.
    let m = msg(NbdClient::connect(
        &with_tls(plain.clone(), Some("localhost")),
        false,
        Some(creds(&dir.0, "other")),
    ));
    assert!(
        m.contains("TLS handshake failed") && m.contains("UnknownIssuer"),
        "{m}"
    );
    // No client certificate for a server that verifies its clients.
    let ca_only = dir.join("ca-only");
    fs::create_dir(&ca_only).unwrap();
    fs::copy(dir.join("client/ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let m = msg(NbdClient::connect(
        &with_tls(plain.clone(), Some("localhost")),
        false,
        Some(creds(&dir.0, "ca-only")),
    ));
    assert!(
        m.starts_with("nbd+unix:///disk?socket=") && m.contains("client-cert.pem"),
        "{m}"
    );
    // The spec names credentials nobody loaded: never silently without TLS.
    let m = msg(NbdClient::connect(
        &with_tls(plain.clone(), Some("localhost")),
        false,
        None,
    ));
    assert!(
        m.contains("tls-creds=tls0: no tls-creds-x509 object 'tls0' with endpoint=client"),
        "{m}"
    );
    // Credential files.
    let m = TlsClientCreds::load(&dir.join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("nowhere/ca-cert.pem: missing"), "{m}");
    fs::remove_file(dir.join("client/client-key.pem")).unwrap();
    let m = TlsClientCreds::load(&dir.join("client"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("client-key.pem: missing"), "{m}");
}

/// Copy `certs/client` to `certs/NAME` with a `ca-crl.pem` from the test CA, revoking the
/// server's certificate if `revoke`.
fn client_with_crl(certs: &Path, name: &str, revoke: bool) -> TlsClientCreds {
    let script = r#"
set -e
d=crl-$1; mkdir -p $d; : > $d/index.txt; echo 01 > $d/crlnumber
printf '[ca]\ndefault_ca=d\n[d]\ndatabase=%s/index.txt\ncrlnumber=%s/crlnumber\ndefault_md=sha256\ndefault_crl_days=2\n' $d $d > $d/ca.cnf
if [ "$2" = revoke ]; then
  openssl ca -config $d/ca.cnf -keyfile ca/ca-key.pem -cert ca/ca-cert.pem -revoke srv-cert.pem 2>/dev/null
fi
openssl ca -config $d/ca.cnf -keyfile ca/ca-key.pem -cert ca/ca-cert.pem -gencrl -out $d/ca-crl.pem 2>/dev/null
mkdir -p $1; cp client/* $1/; cp $d/ca-crl.pem $1/
"#;
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            script,
            "sh",
            name,
            if revoke { "revoke" } else { "keep" },
        ])
        .current_dir(certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    creds(certs, name)
}

#[test]
fn a_revocation_list_refuses_a_revoked_server_certificate() {
    let dir = TempDir::new("tls-crl");
    tls::make_certs(&dir.0);
    let file = dir.join("disk.raw");
    patterned_file(&file, MIB, 6);
    let spec = with_tls(unix_spec(&dir.join("nbd.sock"), "disk"), Some("localhost"));
    let _server = tls_server(&spec, &file, &dir.0, true);
    let fine = client_with_crl(&dir.0, "crl-none", false);
    let c = NbdClient::connect(&spec, false, Some(fine)).unwrap();
    store(&c).read_at(&mut [0u8; 512], 0).unwrap();
    drop(c);
    let revoked = client_with_crl(&dir.0, "crl-server", true);
    let m = NbdClient::connect(&spec, false, Some(revoked))
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("TLS handshake failed") && m.contains("Revoked"),
        "{m}"
    );
}

#[test]
fn a_tls_client_to_a_server_without_tls_stops() {
    let dir = TempDir::new("tls-none");
    tls::make_certs(&dir.0);
    let file = dir.join("disk.raw");
    patterned_file(&file, MIB, 4);
    let spec = unix_spec(&dir.join("nbd.sock"), "disk");
    let _server = qemu_nbd(&spec, &file, &[]);
    let m = NbdClient::connect(
        &with_tls(spec, Some("localhost")),
        false,
        Some(creds(&dir.0, "client")),
    )
    .unwrap_err()
    .to_string();
    assert!(m.contains("does not offer TLS"), "{m}");
}

#[test]
fn tls_requests_in_flight_are_sent_again_on_a_new_session() {
    let dir = TempDir::new("tls-reconnect");
    tls::make_certs(&dir.0);
    let file = dir.join("disk.raw");
    let mut expect = patterned_file(&file, 4 * MIB, 5);
    let spec = NbdSpec {
        reconnect_delay: Duration::from_secs(60),
        ..with_tls(unix_spec(&dir.join("nbd.sock"), "disk"), Some("localhost"))
    };
    let mut server = tls_server(&spec, &file, &dir.0, true);
    let c = NbdClient::connect(&spec, false, Some(creds(&dir.0, "client"))).unwrap();
    server.stop();
    let data = pattern(MIB, 8192, 0x77);
    let w = write_async(&c, MIB as u64, &data, 2);
    let r = read_async(&c, 0, 8192, 2);
    server.kill();
    let _server = tls_server(&spec, &file, &dir.0, true);
    assert_eq!(w.wait().0, 8192);
    let (res, back) = r.wait();
    assert_eq!(res, 8192);
    assert!(back[..] == expect[..8192]);
    store(&c).flush().unwrap();
    expect[MIB..MIB + 8192].copy_from_slice(&data);
    assert!(fs::read(&file).unwrap() == expect);
}
