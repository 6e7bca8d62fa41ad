//! The appliance's Ed25519 signing key, and the public keys an exchange verifies with.
//!
//! Why Ed25519: small keys and signatures, deterministic signing (no per-signature randomness to
//! get wrong on an appliance with a weak entropy source at boot), no parameter choices, and
//! support in `ring`, the crate already used for TLS.
//!
//! On disk the private key is a PEM `PRIVATE KEY` (PKCS#8; ring writes v2 with the public key,
//! and v1 files from `openssl genpkey -algorithm ed25519` are accepted too). It is created with
//! mode 0600 atomically (`O_CREAT|O_EXCL`: an existing key is never overwritten, since that would
//! silently orphan every public key already handed out), and a key file that group or others can
//! access is refused, like `ssh` does.
//!
//! Next to it, `<key path>.pub.jwk` holds the public JWK (RFC 8037 `OKP`/`Ed25519`) to give to the
//! exchange. Its `kid` is the RFC 7638 JWK thumbprint, so it is derived from the key itself: the
//! exchange can recompute it and no registry of key names is needed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::{Value, json};

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// Why a key could not be created, loaded or parsed. Paths are included; key material never is.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `write_new` found a file already there.
    #[error(
        "refusing to overwrite existing key file {0}; exchanges trust its public key. Move it away \
         deliberately if a new key is really wanted"
    )]
    AlreadyExists(PathBuf),
    /// The private key file is accessible by group or others.
    #[error(
        "key file {path} is accessible by group or others (mode {mode:03o}); run `chmod 600` on it"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a usable PEM Ed25519 PKCS#8 private key.
    #[error("key file {path} is not usable: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// PKCS#8 bytes were rejected by ring.
    #[error("not a valid Ed25519 PKCS#8 private key: {0}")]
    InvalidKey(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed; cannot generate a key")]
    Rng,
    /// A public JWK is unusable.
    #[error("public JWK is not usable: {0}")]
    BadJwk(&'static str),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KeyError + use<'a> {
    move |source| KeyError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Best-effort wipe of secret bytes before they are freed.
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

/// RFC 7638 thumbprint of an Ed25519 OKP JWK with public key `x` (base64url): SHA-256 over
/// `{"crv":"Ed25519","kty":"OKP","x":"..."}` (required members, sorted, no whitespace),
/// base64url without padding.
pub fn jwk_thumbprint(x_b64url: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x_b64url}"}}"#);
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// Where the public JWK for the private key at `key_path` is written: `<key_path>.pub.jwk`.
pub fn public_jwk_path(key_path: &Path) -> PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(".pub.jwk");
    PathBuf::from(p)
}

fn jwk_for(public: &[u8], kid: &str) -> Value {
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(public),
        "kid": kid,
        "use": "sig",
        "alg": "EdDSA",
    })
}

/// The appliance's private signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_pair(pair: Ed25519KeyPair) -> SigningKey {
        let kid = jwk_thumbprint(&URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()));
        SigningKey { pair, kid }
    }

    /// A fresh key and its PKCS#8 v2 DER encoding (secret: the caller must protect or wipe it).
    pub fn generate() -> Result<(SigningKey, Vec<u8>), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Rng)?;
        let der = doc.as_ref().to_vec();
        let key = SigningKey::from_pkcs8(&der)?;
        Ok((key, der))
    }

    /// Parses PKCS#8 DER (v2, or v1 without the public key).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(SigningKey::from_pair)
            .map_err(|e| KeyError::InvalidKey(e.to_string()))
    }

    /// From a raw 32-byte seed (RFC 8032 private key); for test vectors.
    #[cfg(test)]
    pub(crate) fn from_seed(seed: &[u8]) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(SigningKey::from_pair)
            .map_err(|e| KeyError::InvalidKey(e.to_string()))
    }

    /// Generates a key, writes it to `path` as PEM PKCS#8 (mode 0600, created exclusively, fsynced)
    /// and writes `<path>.pub.jwk`. Fails with [`KeyError::AlreadyExists`] rather than overwrite.
    pub fn write_new(path: &Path) -> Result<SigningKey, KeyError> {
        let (key, mut der) = SigningKey::generate()?;
        let mut pem = to_pem(&der);
        wipe(&mut der);
        let written = create_secret_file(path, pem.as_bytes());
        // Wipe the PEM text too: take its bytes back out of the String.
        let mut pem_bytes = std::mem::take(&mut pem).into_bytes();
        wipe(&mut pem_bytes);
        written?;
        key.write_public_jwk(path)?;
        Ok(key)
    }

    /// Loads the PEM PKCS#8 key at `path`, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let mut file = File::open(path).map_err(io_err("open", path))?;
        let meta = file.metadata().map_err(io_err("inspect", path))?;
        if !meta.is_file() {
            return Err(KeyError::BadKeyFile {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        check_private_mode(path, &meta)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_err("read", path))?;
        let parsed = from_pem(&text);
        wipe(&mut text);
        let mut der = parsed.map_err(|reason| KeyError::BadKeyFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        })?;
        let key = SigningKey::from_pkcs8(&der).map_err(|e| KeyError::BadKeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        });
        wipe(&mut der);
        key
    }

    /// Loads the key at `path`, or creates it (and its `.pub.jwk`) if there is none; the flag is
    /// `true` when a key was generated. For an existing key, a missing or stale `.pub.jwk` is
    /// (re)written so the file to hand to the exchange always matches.
    pub fn load_or_generate(path: &Path) -> Result<(SigningKey, bool), KeyError> {
        match SigningKey::write_new(path) {
            Ok(key) => {
                tracing::info!(kid = %key.kid, path = %path.display(), "generated a new signing key");
                Ok((key, true))
            }
            Err(KeyError::AlreadyExists(_)) => {
                let key = SigningKey::load(path)?;
                key.ensure_public_jwk(path)?;
                Ok((key, false))
            }
            Err(e) => Err(e),
        }
    }

    /// The key id: RFC 7638 JWK thumbprint (SHA-256, base64url).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The public JWK: `{kty, crv, x, kid, use: "sig", alg: "EdDSA"}`.
    pub fn public_jwk(&self) -> Value {
        jwk_for(self.public_key_bytes(), &self.kid)
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        let mut public = [0u8; 32];
        public.copy_from_slice(self.public_key_bytes());
        VerifyingKey {
            public,
            kid: self.kid.clone(),
        }
    }

    /// Ed25519 signature (64 bytes) over `msg`.
    pub(crate) fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// Writes `<key_path>.pub.jwk` atomically (temp file, fsync, rename, fsync directory).
    pub fn write_public_jwk(&self, key_path: &Path) -> Result<PathBuf, KeyError> {
        let target = public_jwk_path(key_path);
        let mut text =
            serde_json::to_string_pretty(&self.public_jwk()).map_err(|e| KeyError::Io {
                op: "serialise",
                path: target.clone(),
                source: io::Error::other(e),
            })?;
        text.push('\n');
        let mut tmp = target.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let result = (|| {
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o644);
            let mut f = opts.open(&tmp).map_err(io_err("create", &tmp))?;
            f.write_all(text.as_bytes())
                .map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("fsync", &tmp))?;
            std::fs::rename(&tmp, &target).map_err(io_err("rename into place", &target))?;
            sync_parent(&target)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| target)
    }

    fn ensure_public_jwk(&self, key_path: &Path) -> Result<(), KeyError> {
        let target = public_jwk_path(key_path);
        let current = std::fs::read(&target)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| VerifyingKey::from_jwk(&v).ok());
        match current {
            Some(vk) if vk.kid == self.kid => Ok(()),
            found => {
                if found.is_some() {
                    tracing::warn!(path = %target.display(), "public JWK did not match the private key; rewriting it");
                }
                self.write_public_jwk(key_path).map(|_| ())
            }
        }
    }
}

/// A public key that signatures are accepted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    public: [u8; 32],
    kid: String,
}

impl VerifyingKey {
    /// From a public JWK: `kty` `OKP`, `crv` `Ed25519`, `x` (32 bytes, base64url). Optional `kid`
    /// must equal the RFC 7638 thumbprint (the id signatures carry); optional `alg`/`use` must be
    /// `EdDSA`/`sig`. A JWK with a private part (`d`) is refused: it should never have left the
    /// appliance.
    pub fn from_jwk(jwk: &Value) -> Result<VerifyingKey, KeyError> {
        let obj = jwk
            .as_object()
            .ok_or(KeyError::BadJwk("not a JSON object"))?;
        let field = |name: &str| obj.get(name).and_then(Value::as_str);
        if field("kty") != Some("OKP") {
            return Err(KeyError::BadJwk("kty must be \"OKP\""));
        }
        if field("crv") != Some("Ed25519") {
            return Err(KeyError::BadJwk("crv must be \"Ed25519\""));
        }
        if obj.contains_key("d") {
            return Err(KeyError::BadJwk(
                "contains a private key (\"d\"); distribute only the .pub.jwk file",
            ));
        }
        if obj.get("alg").is_some_and(|a| a.as_str() != Some("EdDSA")) {
            return Err(KeyError::BadJwk("alg, if present, must be \"EdDSA\""));
        }
        if obj.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            return Err(KeyError::BadJwk("use, if present, must be \"sig\""));
        }
        let x = field("x").ok_or(KeyError::BadJwk("x is missing"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| KeyError::BadJwk("x is not unpadded base64url"))?;
        let key = VerifyingKey::from_public_key_bytes(&bytes)?;
        if obj
            .get("kid")
            .is_some_and(|k| k.as_str() != Some(key.kid.as_str()))
        {
            return Err(KeyError::BadJwk(
                "kid is not the RFC 7638 thumbprint of x; remove it or correct it",
            ));
        }
        Ok(key)
    }

    /// From a raw 32-byte Ed25519 public key.
    pub fn from_public_key_bytes(bytes: &[u8]) -> Result<VerifyingKey, KeyError> {
        let public: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadJwk("x must be 32 bytes"))?;
        let kid = jwk_thumbprint(&URL_SAFE_NO_PAD.encode(public));
        Ok(VerifyingKey { public, kid })
    }

    /// Reads a public JWK file (e.g. a `.pub.jwk` written by [`SigningKey::write_new`]).
    pub fn load_jwk(path: &Path) -> Result<VerifyingKey, KeyError> {
        let bytes = std::fs::read(path).map_err(io_err("read", path))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|_| KeyError::BadJwk("file is not JSON"))?;
        VerifyingKey::from_jwk(&value)
    }

    /// The key id (RFC 7638 thumbprint).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK, as [`SigningKey::public_jwk`] gives it.
    pub fn public_jwk(&self) -> Value {
        jwk_for(&self.public, &self.kid)
    }

    /// `true` if `signature` is a valid Ed25519 signature of `msg` by this key.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(msg, signature)
            .is_ok()
    }
}

fn to_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() + 64);
    pem.push_str(PEM_BEGIN);
    pem.push('\n');
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(PEM_END);
    pem.push('\n');
    let mut b64 = b64.into_bytes();
    wipe(&mut b64);
    pem
}

fn from_pem(text: &[u8]) -> Result<Vec<u8>, &'static str> {
    let text = std::str::from_utf8(text).map_err(|_| "not text (expected PEM)")?;
    if text.contains("BEGIN ENCRYPTED PRIVATE KEY") {
        return Err("the PEM key is encrypted; an unattended appliance needs an unencrypted key");
    }
    let start = text
        .find(PEM_BEGIN)
        .ok_or("no \"-----BEGIN PRIVATE KEY-----\" line (expected PKCS#8 PEM)")?
        + PEM_BEGIN.len();
    let len = text[start..]
        .find(PEM_END)
        .ok_or("no \"-----END PRIVATE KEY-----\" line")?;
    let mut b64: Vec<u8> = text[start..start + len]
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let der = STANDARD
        .decode(&b64)
        .map_err(|_| "PEM body is not valid base64");
    wipe(&mut b64);
    der
}

fn create_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            KeyError::AlreadyExists(path.to_path_buf())
        } else {
            io_err("create", path)(e)
        }
    })?;
    let written = f
        .write_all(contents)
        .map_err(io_err("write", path))
        .and_then(|()| f.sync_all().map_err(io_err("fsync", path)));
    if let Err(e) = written {
        // Don't leave a truncated key behind for the next start to choke on.
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    sync_parent(path)
}

/// fsync the directory so the new name survives a power cut (an appliance can lose power at any
/// moment).
fn sync_parent(path: &Path) -> Result<(), KeyError> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory of", path))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(unix)]
fn check_private_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037 Appendix A.1 key (private `d`, public `x`).
    pub(crate) const RFC8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    pub(crate) const RFC8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn rfc8037_thumbprint_vector() {
        assert_eq!(
            jwk_thumbprint(RFC8037_X),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        let seed = URL_SAFE_NO_PAD.decode(RFC8037_D).unwrap();
        let key = SigningKey::from_seed(&seed).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(key.public_key_bytes()), RFC8037_X);
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn kid_is_independently_computed_thumbprint() {
        let (key, _) = SigningKey::generate().unwrap();
        // Independently: build the RFC 7638 input with serde_json + our JCS, then hash.
        let x = URL_SAFE_NO_PAD.encode(key.public_key_bytes());
        let members = json!({"x": x, "kty": "OKP", "crv": "Ed25519"});
        let canonical = crate::sign::jcs::canonicalize(&members).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, &canonical);
        assert_eq!(key.kid(), URL_SAFE_NO_PAD.encode(digest));
    }

    #[test]
    fn public_jwk_round_trips() {
        let (key, _) = SigningKey::generate().unwrap();
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "EdDSA");
        assert_eq!(jwk["kid"], key.kid());
        let vk = VerifyingKey::from_jwk(&jwk).unwrap();
        assert_eq!(vk, key.verifying_key());
        assert!(vk.verify(b"m", &key.sign(b"m")));
        assert!(!vk.verify(b"n", &key.sign(b"m")));
    }

    #[test]
    fn bad_jwks_are_refused() {
        let (key, _) = SigningKey::generate().unwrap();
        let good = key.public_jwk();
        let mutate = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut v = good.clone();
            f(v.as_object_mut().unwrap());
            VerifyingKey::from_jwk(&v)
        };
        assert!(
            mutate(&|m| {
                m.insert("kty".into(), json!("EC"));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.insert("crv".into(), json!("X25519"));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.insert("kid".into(), json!("someone-else"));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.insert("alg".into(), json!("none"));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.insert("d".into(), json!(RFC8037_D));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.insert("x".into(), json!("AAAA"));
            })
            .is_err()
        );
        assert!(
            mutate(&|m| {
                m.remove("kid");
            })
            .is_ok()
        );
        assert!(VerifyingKey::from_jwk(&json!([1])).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_0600_exclusive_and_reloads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sign.key");
        let key = SigningKey::write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));

        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.kid(), key.kid());
        let pub_jwk = VerifyingKey::load_jwk(&public_jwk_path(&path)).unwrap();
        assert_eq!(pub_jwk.kid(), key.kid());

        // Never overwritten.
        assert!(matches!(
            SigningKey::write_new(&path),
            Err(KeyError::AlreadyExists(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);

        // load_or_generate: existing key loaded, not replaced; missing .pub.jwk restored.
        std::fs::remove_file(public_jwk_path(&path)).unwrap();
        let (again, generated) = SigningKey::load_or_generate(&path).unwrap();
        assert!(!generated);
        assert_eq!(again.kid(), key.kid());
        assert!(public_jwk_path(&path).exists());

        // Group/other-readable key refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = SigningKey::load(&path).unwrap_err();
        assert!(matches!(
            err,
            KeyError::InsecurePermissions { mode: 0o640, .. }
        ));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn load_or_generate_creates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let (a, generated) = SigningKey::load_or_generate(&path).unwrap();
        assert!(generated);
        let (b, generated) = SigningKey::load_or_generate(&path).unwrap();
        assert!(!generated);
        assert_eq!(a.kid(), b.kid());
    }

    #[test]
    fn openssl_style_pkcs8_v1_is_accepted() {
        // PKCS#8 v1 of the RFC 8037 key, as `openssl genpkey -algorithm ed25519` writes it:
        // 302e020100300506032b657004220420 || seed.
        let seed = URL_SAFE_NO_PAD.decode(RFC8037_D).unwrap();
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.pem");
        create_secret_file(&path, to_pem(&der).as_bytes()).unwrap();
        let key = SigningKey::load(&path).unwrap();
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn corrupt_key_files_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [
            ("empty", ""),
            ("noise", "hello"),
            (
                "badb64",
                "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
            ),
            (
                "notkey",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
            (
                "enc",
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            ),
        ] {
            let path = dir.path().join(name);
            create_secret_file(&path, body.as_bytes()).unwrap();
            assert!(
                matches!(SigningKey::load(&path), Err(KeyError::BadKeyFile { .. })),
                "{name}"
            );
        }
        assert!(matches!(
            SigningKey::load(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }
}
