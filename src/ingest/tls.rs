//! TLS and mutual TLS for MLLP feeds, with rustls (ring provider only).
//!
//! ```toml
//! [transport.tls]
//! cert = "/etc/hl7-edge/tls/mllp.crt"        # PEM: server certificate, then intermediates
//! key = "/etc/hl7-edge/tls/mllp.key"         # PEM: PKCS#8, PKCS#1 or SEC1 private key
//! client_ca = "/etc/hl7-edge/tls/senders.pem" # optional: require and verify client certificates
//! allowed_clients = ["pas.uclh.nhs.uk"]      # optional: which verified identities may send
//! min_version = "1.2"                        # or "1.3"
//! ```
//!
//! * TLS 1.2 and 1.3 only (rustls has no older versions), with rustls' default cipher suites.
//! * With `client_ca`, a client must present a certificate chaining to one of those CAs
//!   (mutual TLS). Its **identity** is the certificate's subject CN, else its first DNS
//!   subject-alternative name, else `sha256:<fingerprint prefix>`; it is logged with every stored
//!   message (`sender=`) and checked against `allowed_clients` (matched, case-insensitively,
//!   against the CN and every DNS SAN). A verified but unlisted client is answered `AR`
//!   ("sender not allowed") and disconnected, exactly like an address outside `allow`.
//! * Certificates are read at start (errors stop the daemon with the file name) and again on
//!   **SIGHUP**: a renewed certificate is used for new connections without a restart; if the new
//!   files are broken, the listener keeps the previous ones and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

/// `[transport.tls]` of an MLLP feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the server certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key of `cert`.
    pub key: PathBuf,
    /// PEM file of CA certificates; when set, clients must present a certificate issued by one
    /// of them (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Verified client identities allowed to send (CN or DNS SAN); empty: any verified client.
    /// Needs `client_ca`.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Lowest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// Lowest accepted TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// Why the TLS settings of a feed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("TLS settings (cert {cert}, key {key}): {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("allowed_clients needs client_ca: without client certificates there is no identity")]
    AllowedWithoutCa,
}

/// The TLS side of one listener: the current acceptor, replaced on reload.
pub struct TlsServer {
    config: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads the certificate, key and client CA files and builds the server configuration.
    pub fn load(config: TlsConfig) -> Result<TlsServer, TlsError> {
        let acceptor = build(&config)?;
        Ok(TlsServer {
            config,
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Re-reads the files; on error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.config)?;
        match self.acceptor.write() {
            Ok(mut a) => *a = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        match self.acceptor.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// Whether a verified client may send; `None` (no client certificate) passes only when
    /// no `allowed_clients` are configured.
    pub fn client_allowed(&self, id: Option<&ClientIdentity>) -> bool {
        if self.config.allowed_clients.is_empty() {
            return true;
        }
        let Some(id) = id else { return false };
        self.config.allowed_clients.iter().any(|a| {
            id.common_name
                .as_deref()
                .is_some_and(|cn| cn.eq_ignore_ascii_case(a))
                || id.dns_names.iter().any(|d| d.eq_ignore_ascii_case(a))
        })
    }
}

fn pem_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, path, "no PEM CERTIFICATE section found"));
    }
    Ok(certs)
}

fn build(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("certificate", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| pem_err("private key", &config.key, e))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let cfg_err = |source| TlsError::Config {
        cert: config.cert.clone(),
        key: config.key.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(cfg_err)?;
    let builder = match &config.client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
        None => {
            if !config.allowed_clients.is_empty() {
                return Err(TlsError::AllowedWithoutCa);
            }
            builder.with_no_client_auth()
        }
    };
    let server = builder.with_single_cert(certs, key).map_err(cfg_err)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("client CA", path)? {
        roots.add(cert).map_err(|e| TlsError::ClientCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Who a client is, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject CN, when present and a UTF-8/printable/IA5 string.
    pub common_name: Option<String>,
    /// DNS names from the subject alternative names.
    pub dns_names: Vec<String>,
    /// Lowercase hex SHA-256 of the certificate (DER).
    pub fingerprint: String,
}

impl ClientIdentity {
    /// Reads the end-entity certificate (already verified by rustls); `None` if it cannot be
    /// parsed (then only its fingerprint would identify it, see [`Self::name`]).
    pub fn from_der(der: &CertificateDer<'_>) -> ClientIdentity {
        let fingerprint = crate::outbox::sha256_hex(der.as_ref());
        match webpki::EndEntityCert::try_from(der) {
            Ok(ee) => ClientIdentity {
                common_name: common_name(ee.subject()),
                dns_names: ee.valid_dns_names().map(str::to_owned).collect(),
                fingerprint,
            },
            Err(_) => ClientIdentity {
                common_name: None,
                dns_names: Vec::new(),
                fingerprint,
            },
        }
    }

    /// The connection's sender identity for logs and access rules.
    pub fn name(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
            .unwrap_or_else(|| format!("sha256:{}", self.fingerprint.get(..16).unwrap_or_default()))
    }

    /// The identity of the client of an established server connection, if it sent a
    /// certificate.
    pub fn of(conn: &rustls::ServerConnection) -> Option<ClientIdentity> {
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(ClientIdentity::from_der)
    }
}

/// One DER TLV: (tag, contents, rest). `None` on truncated or over-long input.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// The first commonName (OID 2.5.4.3) in a DER Name's contents (RDNSequence without its outer
/// SEQUENCE header, as webpki returns it).
fn common_name(mut name: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, mut rdn, rest) = der_next(name)?;
        name = rest;
        if tag != SET {
            continue;
        }
        while !rdn.is_empty() {
            let (tag, atv, rest) = der_next(rdn)?;
            rdn = rest;
            if tag != SEQUENCE {
                continue;
            }
            let (otag, oid, value) = der_next(atv)?;
            if otag != OID || oid != CN {
                continue;
            }
            let (vtag, v, _) = der_next(value)?;
            // UTF8String, PrintableString, IA5String
            if matches!(vtag, 0x0c | 0x13 | 0x16) {
                return std::str::from_utf8(v).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walker_never_panics_on_truncation() {
        // SET { SEQUENCE { OID 2.5.4.3, UTF8String "pas" } }
        let name = [
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b'p', b'a', b's',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("pas"));
        for cut in 0..name.len() {
            let _ = common_name(&name[..cut]);
        }
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[]), None);
    }

    #[test]
    fn missing_files_name_the_file() {
        let err = TlsServer::load(TlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            allowed_clients: vec![],
            min_version: TlsVersion::Tls12,
        })
        .expect_err("must fail");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
