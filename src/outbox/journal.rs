//! The intake journal: what makes an ACK durable without a full redb commit per batch.
//!
//! # Why
//!
//! A durable redb commit rewrites, copy-on-write, every B-tree page the batch touched in each
//! table, plus redb's own allocator state, and then fsyncs. An insert touches seven tables, so
//! one commit of eight messages wrote about 270 KB (33 KB per message, measured with
//! `/proc/PID/io`) and took 1.1-1.4 ms: at eight MLLP connections, each waiting for its ACK,
//! that capped ingest near 7,000 messages/s however fast the rest was.
//!
//! # How
//!
//! The writer commits most batches to redb *non-durably* (`Durability::None`: visible to every
//! reader at once, held in memory) and appends the batch's newly stored messages to this
//! journal with one `fdatasync`. Only then does ingest send `AA`. The journal is a fixed-size,
//! preallocated file written from the start, so an append flushes only its own data blocks
//! (no file-size or extent change for the filesystem to journal).
//!
//! Every so often (see `CHECKPOINT_INTERVAL` in `store.rs`), when the journal is full, for an
//! operator's command and at shutdown, the writer makes a *durable* redb commit (a
//! checkpoint) that also advances the journal's epoch; the journal then starts again at
//! offset 0. Each record carries the database's instance id and the epoch, so records left
//! over from before a checkpoint, or from a database that was deleted and created again, are
//! never replayed.
//!
//! # Recovery
//!
//! After a crash redb reopens at its last durable commit. [`super::Outbox::open`] re-applies
//! every journal record of the current epoch, in order, then checkpoints. Only inserts (what
//! an ACK promised) are journaled: the other operations of a non-durable commit (a Bundle
//! stored, a delivery recorded) are redone by the pipeline from the records' states: a message
//! is mapped again, and one whose PUBACK was not yet checkpointed is published again
//! (at-least-once; the exchange drops repeats by `Bundle.identifier`).
//!
//! # Record format
//!
//! ```text
//! magic "HEJ1" | instance u64 | epoch u64 | payload length u32 | payload | SHA-256[..16]
//! ```
//! (integers little-endian). The digest covers everything before it; a torn or stale record
//! ends the scan.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::store::{NewRecord, RecordId};

const MAGIC: &[u8; 4] = b"HEJ1";
const HEADER: usize = 4 + 8 + 8 + 4;
const DIGEST: usize = 16;
/// Payload format version (first byte of every payload).
const PAYLOAD_VERSION: u8 = 1;

/// Size of the journal file. Between two checkpoints it holds the raw messages accepted since
/// the last one (a few MB at 10,000 messages/s with the default interval); a batch that does
/// not fit makes the writer checkpoint instead.
pub(super) const DEFAULT_CAPACITY: u64 = 16 * 1024 * 1024;

/// An open journal file.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    capacity: u64,
    offset: u64,
    instance: u64,
    epoch: u64,
}

impl Journal {
    /// Opens the journal at `path`, creating and preallocating it (zeros, fsynced, directory
    /// fsynced) when missing or of another size.
    pub(super) fn open(path: &Path, capacity: u64) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() != capacity {
            preallocate(&file, capacity)?;
            if let Some(dir) = path.parent() {
                File::open(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                })?
                .sync_all()?;
            }
        }
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            capacity,
            offset: 0,
            instance: 0,
            epoch: 0,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The payloads of every intact record of `instance`/`epoch`, from the start, in order.
    pub(super) fn scan(&self, instance: u64, epoch: u64) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut header = [0u8; HEADER];
        while offset + (HEADER + DIGEST) as u64 <= self.capacity {
            self.file.read_exact_at(&mut header, offset)?;
            let (magic, rest) = header.split_at(4);
            let (inst, rest) = rest.split_at(8);
            let (ep, len) = rest.split_at(8);
            if magic != MAGIC || le_u64(inst) != instance || le_u64(ep) != epoch {
                break;
            }
            let len = u64::from(le_u32(len));
            let end = offset + HEADER as u64 + len + DIGEST as u64;
            if end > self.capacity {
                break;
            }
            let Ok(body_len) = usize::try_from(len + DIGEST as u64) else {
                break;
            };
            let mut body = vec![0u8; body_len];
            self.file.read_exact_at(&mut body, offset + HEADER as u64)?;
            let digest_at = body.len() - DIGEST;
            if digest(&header, &body[..digest_at]) != body[digest_at..] {
                break;
            }
            body.truncate(digest_at);
            out.push(body);
            offset = end;
        }
        Ok(out)
    }

    /// Starts writing records of `instance`/`epoch` at the beginning of the file (after a
    /// checkpoint made everything before durable in redb).
    pub(super) fn restart(&mut self, instance: u64, epoch: u64) {
        self.instance = instance;
        self.epoch = epoch;
        self.offset = 0;
    }

    /// Whether a record with a payload of `len` bytes fits before the end of the file.
    pub(super) fn fits(&self, len: usize) -> bool {
        self.offset + (HEADER + DIGEST) as u64 + len as u64 <= self.capacity
    }

    /// Appends one record and waits until it is on disk (`fdatasync`).
    pub(super) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if !self.fits(payload.len()) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "journal record does not fit",
            ));
        }
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal record too large"))?;
        let mut record = Vec::with_capacity(HEADER + payload.len() + DIGEST);
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&self.instance.to_le_bytes());
        record.extend_from_slice(&self.epoch.to_le_bytes());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(payload);
        let d = digest(&record[..HEADER], payload);
        record.extend_from_slice(&d);
        self.file.write_all_at(&record, self.offset)?;
        self.file.sync_data()?;
        self.offset += record.len() as u64;
        Ok(())
    }
}

fn preallocate(file: &File, capacity: u64) -> io::Result<()> {
    file.set_len(0)?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < capacity {
        let n = usize::try_from((capacity - at).min(chunk.len() as u64)).unwrap_or(chunk.len());
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

fn digest(header: &[u8], payload: &[u8]) -> [u8; DIGEST] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(header);
    ctx.update(payload);
    let mut out = [0u8; DIGEST];
    out.copy_from_slice(&ctx.finish().as_ref()[..DIGEST]);
    out
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// One stored message, as journaled: enough to store it again with the same id, and to put
/// it back in the duplicates window as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub id: RecordId,
    /// The writer's clock when the batch was applied (duplicates-window times).
    pub now_ms: u64,
    pub record: NewRecord,
    pub dedup: Option<DedupPart>,
}

/// The duplicates-window part of an [`Entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DedupPart {
    pub key: String,
    pub content_sha256: [u8; 32],
    pub window_ms: u64,
}

/// The journal payload of one batch, built while the batch is applied (no copies of the
/// messages are kept besides this buffer).
pub(super) struct Batch {
    buf: Vec<u8>,
    count: u32,
}

impl Batch {
    pub(super) fn new() -> Batch {
        let mut buf = Vec::new();
        buf.push(PAYLOAD_VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        Batch { buf, count: 0 }
    }

    /// Adds one stored message; `dedup` is its duplicates-window key and window length.
    pub(super) fn push(
        &mut self,
        id: RecordId,
        now_ms: u64,
        record: &NewRecord,
        dedup: Option<(&str, &[u8; 32], u64)>,
    ) {
        let out = &mut self.buf;
        out.extend_from_slice(&id.0.to_le_bytes());
        out.extend_from_slice(&now_ms.to_le_bytes());
        put_bytes(out, record.feed.as_bytes());
        put_bytes(out, record.control_id.as_bytes());
        put_bytes(out, record.message_type.as_bytes());
        put_bytes(out, &record.raw);
        out.extend_from_slice(&record.received_at_ms.to_le_bytes());
        match dedup {
            None => out.push(0),
            Some((key, hash, window_ms)) => {
                out.push(1);
                put_bytes(out, key.as_bytes());
                out.extend_from_slice(hash);
                out.extend_from_slice(&window_ms.to_le_bytes());
            }
        }
        self.count += 1;
        self.buf[1..5].copy_from_slice(&self.count.to_le_bytes());
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn payload(&self) -> &[u8] {
        &self.buf
    }
}

/// Decodes a payload built by [`Batch`]; `Err` says what is wrong (a record that passed
/// its digest but does not decode was written by an incompatible version).
pub(super) fn decode(payload: &[u8]) -> Result<Vec<Entry>, String> {
    let mut r = Reader(payload);
    let version = r.u8()?;
    if version != PAYLOAD_VERSION {
        return Err(format!(
            "journal payload version {version}, this build reads {PAYLOAD_VERSION}"
        ));
    }
    let n = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let id = RecordId(r.u64()?);
        let now_ms = r.u64()?;
        let feed = r.string()?;
        let control_id = r.string()?;
        let message_type = r.string()?;
        let raw = r.bytes()?.to_vec();
        let received_at_ms = r.u64()?;
        let dedup = match r.u8()? {
            0 => None,
            1 => {
                let key = r.string()?;
                let mut content_sha256 = [0u8; 32];
                content_sha256.copy_from_slice(r.take(32)?);
                let window_ms = r.u64()?;
                Some(DedupPart {
                    key,
                    content_sha256,
                    window_ms,
                })
            }
            other => return Err(format!("journal entry: unknown dedup flag {other}")),
        };
        out.push(Entry {
            id,
            now_ms,
            record: NewRecord {
                feed,
                control_id,
                message_type,
                raw,
                received_at_ms,
            },
            dedup,
        });
    }
    if !r.0.is_empty() {
        return Err(format!("journal payload: {} trailing bytes", r.0.len()));
    }
    Ok(out)
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "journal payload truncated: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(le_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(le_u64(self.take(8)?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| "journal payload: a text field is not UTF-8".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, dedup: bool) -> Entry {
        Entry {
            id: RecordId(id),
            now_ms: 1_700_000_000_000 + id,
            record: NewRecord {
                feed: "pas".into(),
                control_id: format!("C{id}"),
                message_type: "ADT_A01".into(),
                raw: format!("MSH|^~\\&|A|B|C|D|||ADT^A01|C{id}|P|2.4\r").into_bytes(),
                received_at_ms: 1_700_000_000_000,
            },
            dedup: dedup.then(|| DedupPart {
                key: format!("pas\u{1f}A\u{1f}B\u{1f}C{id}"),
                content_sha256: [id as u8; 32],
                window_ms: 86_400_000,
            }),
        }
    }

    #[test]
    fn entries_round_trip() {
        let entries = vec![entry(1, false), entry(2, true)];
        let mut batch = Batch::new();
        for e in &entries {
            let dedup = e
                .dedup
                .as_ref()
                .map(|d| (d.key.as_str(), &d.content_sha256, d.window_ms));
            batch.push(e.id, e.now_ms, &e.record, dedup);
        }
        let payload = batch.payload().to_vec();
        assert_eq!(decode(&payload).unwrap(), entries);
        // Every truncation is an error, never a panic.
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn scan_returns_current_epoch_records_and_stops_at_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path, 64 * 1024).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
        j.restart(7, 1);
        j.append(b"one").unwrap();
        j.append(b"two").unwrap();
        assert_eq!(
            j.scan(7, 1).unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        // Another epoch or another database instance sees nothing.
        assert!(j.scan(7, 2).unwrap().is_empty());
        assert!(j.scan(8, 1).unwrap().is_empty());

        // After a checkpoint, old records beyond the new ones are not replayed.
        j.restart(7, 2);
        j.append(b"three").unwrap();
        assert_eq!(j.scan(7, 2).unwrap(), vec![b"three".to_vec()]);

        // A flipped byte in the second record ends the scan after the first.
        j.append(b"four").unwrap();
        let reopened = Journal::open(&path, 64 * 1024).unwrap();
        let first_len = (HEADER + 5 + DIGEST) as u64;
        reopened
            .file
            .write_all_at(b"X", first_len + HEADER as u64)
            .unwrap();
        assert_eq!(reopened.scan(7, 2).unwrap(), vec![b"three".to_vec()]);
    }

    #[test]
    fn full_journal_refuses_instead_of_wrapping() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j"), 256).unwrap();
        j.restart(1, 1);
        let big = vec![b'x'; 200];
        assert!(j.fits(big.len()));
        j.append(&big).unwrap();
        assert!(!j.fits(big.len()));
        assert!(j.append(&big).is_err());
        assert_eq!(j.scan(1, 1).unwrap(), vec![big]);
    }
}
