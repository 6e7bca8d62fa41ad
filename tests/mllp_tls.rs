//! MLLP over TLS and mutual TLS against the real binary: certificates made by the openssl CLI,
//! a rustls client and `openssl s_client` as clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const NO_BROKER: &str = "mqtt://127.0.0.1:9";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed by scripts/test-deps.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and leaf certificates signed by it (EC P-256, PKCS#8 keys).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let pki = Pki { dir };
        pki.ca("ca");
        pki
    }

    fn ca(&self, name: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
            ],
        );
    }

    /// A leaf `name` with subject CN `cn`, for `usage` (serverAuth or clientAuth), signed by `ca`.
    fn leaf(&self, ca: &str, name: &str, cn: &str, usage: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "subjectAltName=DNS:{cn},IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .expect("ext");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

fn client_config(pki: &Pki, client: Option<&str>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).expect("ca"))
        .expect("root");
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(name) => b
            .with_client_auth_cert(
                vec![
                    CertificateDer::from_pem_file(pki.path(&format!("{name}.pem"))).expect("cert"),
                ],
                PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    })
}

/// Sends one MLLP frame over TLS; returns the ACK text and the server's certificate, or the
/// error that ended the exchange.
fn tls_send(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    msg: &[u8],
) -> Result<(String, Vec<u8>), String> {
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name"))
        .map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut framed = vec![0x0b];
    framed.extend_from_slice(msg);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    tls.write_all(&framed).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(&[0x1c, 0x0d]) {
        match tls.read(&mut chunk) {
            Ok(0) => return Err(format!("closed after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let server_cert = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok((
        String::from_utf8_lossy(&buf[1..buf.len() - 2]).into_owned(),
        server_cert,
    ))
}

fn adt(ctrl: &str) -> Vec<u8> {
    format!("MSH|^~\\&|PAS|RRV|HL7EDGE|RRV|2026||ADT^A01^ADT_A01|{ctrl}|P|2.4\rPID|1||1^^^RRV^MR||DOE^JANE\r")
        .into_bytes()
}

#[test]
fn mutual_tls_identity_allow_list_versions_and_reload() {
    let scratch = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(scratch.path());
    pki.leaf("ca", "server", "localhost", "serverAuth");
    pki.leaf("ca", "pas", "pas.uclh.nhs.uk", "clientAuth");
    pki.leaf("ca", "lab", "lab.example", "clientAuth");
    pki.ca("rogue-ca");
    pki.leaf("rogue-ca", "rogue", "pas.uclh.nhs.uk", "clientAuth");
    // The daemon reads copies, so the test can rotate them.
    let live_cert = scratch.path().join("live.pem");
    let live_key = scratch.path().join("live.key");
    std::fs::copy(pki.path("server.pem"), &live_cert).expect("copy");
    std::fs::copy(pki.path("server.key"), &live_key).expect("copy");
    let d = Daemon::start_feed(
        NO_BROKER,
        "",
        "",
        &format!(
            "frame_timeout_secs = 5\n[transport.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nallowed_clients = [\"pas.uclh.nhs.uk\"]\n",
            live_cert.display().to_string(),
            live_key.display().to_string(),
            pki.path("ca.pem")
        ),
    );

    // The allowed, verified client: AA, and its identity is logged.
    let (ack, cert1) = tls_send(d.mllp_port, client_config(&pki, Some("pas")), &adt("TLS-1"))
        .expect("mTLS exchange");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "TLS-1");
    wait_for("identity in the log", Duration::from_secs(10), || {
        d.log_text()
            .lines()
            .any(|l| l.contains("stored") && l.contains("pas.uclh.nhs.uk"))
            .then_some(())
    });

    // Verified but not in allowed_clients: AR "not allowed".
    let (ack, _) = tls_send(d.mllp_port, client_config(&pki, Some("lab")), &adt("TLS-2"))
        .expect("TLS exchange");
    assert_eq!(field(&ack, "MSA", 1), "AR", "{ack}");
    assert!(ack.contains("lab.example is not allowed"), "{ack}");

    // No client certificate, or one from another CA (same CN!): no TLS session, no ACK.
    assert!(tls_send(d.mllp_port, client_config(&pki, None), &adt("TLS-3")).is_err());
    assert!(
        tls_send(
            d.mllp_port,
            client_config(&pki, Some("rogue")),
            &adt("TLS-4")
        )
        .is_err()
    );

    // Plain TCP to a TLS port: the handshake fails, nothing is answered or stored.
    let mut plain = TcpStream::connect(d.addr()).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut framed = vec![0x0b];
    framed.extend_from_slice(&adt("PLAIN-1"));
    framed.extend_from_slice(&[0x1c, 0x0d]);
    let _ = plain.write_all(&framed); // the server may already have closed
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.windows(4).any(|w| w == b"MSA|"),
        "no ACK over plain TCP"
    );

    // openssl s_client: TLS 1.2 with the client certificate works; TLS 1.1 is refused.
    let ack = s_client(&pki, d.mllp_port, "-tls1_2", &adt("TLS-5"));
    assert!(ack.contains("MSA|AA|TLS-5"), "{ack}");
    let old = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", d.mllp_port),
            "-tls1_1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("s_client");
    assert!(!old.status.success(), "TLS 1.1 must be refused");

    // SIGHUP: a renewed server certificate is used for new connections, without a restart.
    pki.leaf("ca", "server2", "localhost", "serverAuth");
    std::fs::copy(pki.path("server2.pem"), &live_cert).expect("copy");
    std::fs::copy(pki.path("server2.key"), &live_key).expect("copy");
    let pid = d.pid().expect("running");
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        d.log_text()
            .contains("TLS certificates reloaded")
            .then_some(())
    });
    let (ack, cert2) = tls_send(d.mllp_port, client_config(&pki, Some("pas")), &adt("TLS-6"))
        .expect("after reload");
    assert_eq!(field(&ack, "MSA", 1), "AA");
    assert_ne!(cert1, cert2, "the new certificate is served");
    let new_der = CertificateDer::from_pem_file(pki.path("server2.pem")).expect("pem");
    assert_eq!(cert2, new_der.to_vec());

    let mut d = d;
    assert!(d.stop());
    assert_eq!(d.stored_control_ids(), vec!["TLS-1", "TLS-5", "TLS-6"]);
}

/// `openssl s_client` as an MLLP client: sends one frame, returns what came back once the ACK
/// is complete.
fn s_client(pki: &Pki, port: u16, version: &str, msg: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version,
            "-cert",
            &pki.path("pas.pem"),
            "-key",
            &pki.path("pas.key"),
            "-CAfile",
            &pki.path("ca.pem"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut framed = vec![0x0b];
    framed.extend_from_slice(msg);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    stdin.write_all(&framed).expect("write");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.ends_with(&[0x1c, 0x0d]) {
            match out.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(buf);
    });
    let start = Instant::now();
    let got = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "s_client got no ACK"
    );
    String::from_utf8_lossy(&got).into_owned()
}
