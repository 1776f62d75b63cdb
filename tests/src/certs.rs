//! Test certificates made with openssl: a CA and a server certificate it signed, valid for
//! `localhost` and `127.0.0.1`, plus a second, unrelated CA (to prove verification refuses).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files of a test PKI.
pub struct TestPki {
    /// The CA that signed the server certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// A CA that signed nothing we serve.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    crate::process::run(
        Command::new("openssl").args(args).current_dir(dir),
        &format!("openssl {args:?} (apt-get install openssl)"),
    );
}

/// Creates the PKI in `dir`.
pub fn make(dir: &Path) -> TestPki {
    let subj_ca = "/CN=mailpipe test CA";
    for (key, cert) in [("ca.key", "ca.pem"), ("other-ca.key", "other-ca.pem")] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "2",
                "-subj",
                subj_ca,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    TestPki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}
