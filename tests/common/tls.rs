//! Test certificates for NBD over TLS, made with openssl at run time in QEMU's and libnbd's
//! directory layouts.

use std::path::Path;
use std::process::Command;

/// Make a CA, a server certificate and a client certificate in `dir`: `server/` (ca-cert.pem,
/// server-cert.pem, server-key.pem: QEMU's `tls-creds-x509` layout), `client/` (ca-cert.pem,
/// client-cert.pem, client-key.pem: libnbd's `tls-certificates`), and `other/` (a client of
/// another CA).
pub fn make_certs(dir: &Path) {
    let script = r#"
set -e
mkca() { # dir
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=test CA $1" \
    -keyout $1/ca-key.pem -out $1/ca-cert.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
sign() { # ca-dir name cn ext
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$3" -keyout $2-key.pem -out $2.csr 2>/dev/null
  printf '%s\n' "$4" > $2.ext
  openssl x509 -req -in $2.csr -CA $1/ca-cert.pem -CAkey $1/ca-key.pem -CAcreateserial \
    -days 2 -out $2-cert.pem -extfile $2.ext 2>/dev/null
}
mkdir -p ca otherca server client other
mkca ca; mkca otherca
sign ca srv localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment"
sign ca cli client "extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment"
sign otherca oth intruder "extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment"
cp ca/ca-cert.pem server/; cp srv-cert.pem server/server-cert.pem; cp srv-key.pem server/server-key.pem
cp ca/ca-cert.pem client/; cp cli-cert.pem client/client-cert.pem; cp cli-key.pem client/client-key.pem
cp otherca/ca-cert.pem other/; cp oth-cert.pem other/client-cert.pem; cp oth-key.pem other/client-key.pem
"#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh (openssl is installed by `make deps`)");
    assert!(
        out.status.success(),
        "making test certificates with openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
