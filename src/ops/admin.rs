//! The local admin socket: how `hl7-edge outbox ...` works on the store of a running daemon.
//!
//! redb lets one process open a database file (an exclusive lock), so a second process cannot
//! read the outbox of a running daemon, let alone change it. Instead the daemon listens on a
//! Unix socket in its state directory (`<state_dir>/admin.sock`, mode 0600 inside the 0700
//! state directory: only the service user can use it) and executes the command itself, through
//! the same store handle and the same single writer as ingest and the forwarder. So an operator's
//! `retry` or `purge` is one more operation in the group commit, never a competing writer.
//!
//! When no daemon answers on the socket, the command opens the database file directly (it is
//! then the only process holding it) and runs exactly the same code ([`execute`]). If the file
//! is locked and the socket does not answer, the command says so instead of guessing.
//!
//! The protocol is one JSON request line and one JSON response line per connection:
//! `{"cmd":"stats"}` -> `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`.
//! `show` can return the raw message and the Bundle (patient data): they go to the operator's
//! terminal, never into a log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc::UnboundedSender;

use crate::forward::ForwardStatus;
use crate::ops::shutdown::Shutdown;
use crate::outbox::{ListFilter, Outbox, RecordId, StateKind, StoreError, WriterHandle};

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// Largest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// One admin command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stats,
    List {
        #[serde(default)]
        state: Option<String>,
        #[serde(default)]
        feed: Option<String>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: usize,
    },
    Show {
        id: u64,
        /// Include the raw message and the Bundle (patient data).
        #[serde(default)]
        payload: bool,
    },
    Retry {
        id: u64,
    },
    PurgeDelivered,
}

/// Errors of the admin channel (the command's own errors travel inside the response).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: the daemon's answer is not valid: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("{0}")]
    Command(String),
}

/// What the executor works on.
#[derive(Clone)]
pub struct Context {
    pub outbox: Outbox,
    pub writer: WriterHandle,
    /// The running daemon's mapper (a retried quarantined record is mapped at once); `None`
    /// when the daemon is stopped (it is mapped at the next start).
    pub mapper: Option<UnboundedSender<RecordId>>,
    /// The running daemon's forwarder.
    pub forward: Option<Arc<ForwardStatus>>,
}

fn store_err(e: StoreError) -> String {
    e.to_string()
}

/// Runs one command. The same code serves the socket and the stopped-daemon path.
pub async fn execute(cx: &Context, req: Request) -> Result<Value, String> {
    match req {
        Request::Stats => {
            let s = cx.outbox.stats().map_err(store_err)?;
            let mut feeds = serde_json::Map::new();
            let counters = cx.outbox.feed_counters();
            let mut names: Vec<&String> = counters.keys().collect();
            names.sort();
            for name in names {
                let mut v = serde_json::to_value(&counters[name]).map_err(|e| e.to_string())?;
                if let Value::Object(m) = &mut v {
                    m.insert(
                        "pending".into(),
                        json!(cx.outbox.pending_count(name).map_err(store_err)?),
                    );
                }
                feeds.insert(name.clone(), v);
            }
            Ok(json!({
                "path": cx.outbox.path().display().to_string(),
                "daemon_running": cx.forward.is_some(),
                "received": s.received,
                "ready": s.ready,
                "quarantined": s.quarantined,
                "dead_lettered": s.dead_lettered,
                "delivered_total": s.delivered_total,
                "audit_rows": s.audit_rows,
                "bytes": s.bytes,
                "max_bytes": s.max_bytes,
                "max_records": s.max_records,
                "max_age_secs": s.max_age_ms / 1000,
                "oldest_pending_ms": s.oldest_pending_ms,
                "refusing_new_messages": s.refusing,
                "refused_since_start": s.refused_total,
                "next_id": s.next_id.0,
                "feeds_since_start": feeds,
                "forwarder": cx.forward.as_ref().map(|f| f.to_json()),
            }))
        }
        Request::List {
            state,
            feed,
            after,
            limit,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(StateKind::parse(s).ok_or_else(|| {
                    format!(
                        "unknown state {s:?}: use received, ready, delivered, quarantined or \
                         dead-lettered"
                    )
                })?),
            };
            let metas = cx
                .outbox
                .list(&ListFilter {
                    state,
                    feed,
                    after: after.map(RecordId),
                    limit,
                })
                .map_err(store_err)?;
            Ok(Value::Array(metas.iter().map(meta_json).collect()))
        }
        Request::Show { id, payload } => {
            let Some(r) = cx.outbox.get(RecordId(id)).map_err(store_err)? else {
                return Err(format!("outbox record #{id} does not exist"));
            };
            let mut v = meta_json(&r.meta);
            if payload && let Value::Object(m) = &mut v {
                if let Some(raw) = &r.raw {
                    // HL7 segments end in CR: show them one per line.
                    m.insert(
                        "raw".into(),
                        json!(String::from_utf8_lossy(raw).replace('\r', "\n")),
                    );
                }
                if let Some(b) = &r.bundle {
                    let bundle = serde_json::from_slice::<Value>(b)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(b)));
                    m.insert("bundle".into(), bundle);
                }
            }
            Ok(v)
        }
        Request::Retry { id } => {
            let to = cx.writer.retry(RecordId(id)).await.map_err(store_err)?;
            if to == StateKind::Received
                && let Some(tx) = &cx.mapper
            {
                let _ = tx.send(RecordId(id));
            }
            tracing::info!(record = id, state = %to, "outbox: record retried by an operator");
            Ok(json!({ "id": id, "state": to.to_string() }))
        }
        Request::PurgeDelivered => {
            let n = cx.writer.purge_delivered().await.map_err(store_err)?;
            tracing::info!(
                removed = n,
                "outbox: audit rows of delivered records purged by an operator"
            );
            Ok(json!({ "removed_audit_rows": n }))
        }
    }
}

fn meta_json(m: &crate::outbox::RecordMeta) -> Value {
    let (state, reason) = match &m.state {
        crate::outbox::RecordState::Quarantined { reason }
        | crate::outbox::RecordState::DeadLettered { reason } => {
            (m.state.kind().to_string(), Some(reason.clone()))
        }
        s => (s.kind().to_string(), None),
    };
    json!({
        "id": m.id.0,
        "feed": m.feed,
        "state": state,
        "reason": reason,
        "control_id": m.control_id,
        "message_type": m.message_type,
        "message_id": m.message_id,
        "key_id": m.key_id,
        "received_at_ms": m.received_at_ms,
        "delivered_at_ms": m.delivered_at_ms,
        "raw_sha256": m.raw_sha256,
        "raw_len": m.raw_len,
        "bundle_sha256": m.bundle_sha256,
        "bundle_len": m.bundle_len,
    })
}

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Binds the admin socket (replacing a stale file: the caller already holds the outbox lock,
/// so no other daemon can be using it).
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves admin requests until shutdown, then removes the socket file.
pub async fn serve(listener: UnixListener, path: PathBuf, cx: Context, mut shutdown: Shutdown) {
    tracing::info!(socket = %path.display(), "admin socket ready");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let cx = cx.clone();
                    conns.spawn(async move {
                        if let Err(e) = answer(stream, &cx).await {
                            tracing::debug!(error = %e, "admin connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    // Commands already running finish (each is one writer operation at most).
    while tokio::time::timeout(Duration::from_secs(5), conns.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
}

async fn answer(stream: tokio::net::UnixStream, cx: &Context) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST as u64);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => match execute(cx, req).await {
            Ok(result) => json!({ "ok": true, "result": result }),
            Err(error) => json!({ "ok": false, "error": error }),
        },
        Err(e) => json!({ "ok": false, "error": format!("invalid request: {e}") }),
    };
    let mut bytes = serde_json::to_vec(&resp).unwrap_or_default();
    bytes.push(b'\n');
    wr.write_all(&bytes).await?;
    wr.shutdown().await
}

/// Sends one request to a running daemon. `Ok(None)`: no daemon listens on `path` (no socket
/// file, or nobody accepting on it).
pub fn request(path: &Path, req: &Request) -> Result<Option<Value>, AdminError> {
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixStream;
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| AdminError::Protocol {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut resp = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut resp)
        .map_err(io)?;
    let v: Value = serde_json::from_str(resp.trim()).map_err(|e| AdminError::Protocol {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(Some(v.get("result").cloned().unwrap_or(Value::Null))),
        Some(false) => Err(AdminError::Command(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string(),
        )),
        None => Err(AdminError::Protocol {
            path: path.to_path_buf(),
            detail: "no \"ok\" member".into(),
        }),
    }
}
