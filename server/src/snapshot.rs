//! Member snapshots for `Maintenance.Snapshot` and `fetcd snapshot restore`.
//!
//! A snapshot is the store's export (the same records a Raft snapshot carries: every key
//! revision, the leases, the compaction marks and alarms) minus the member's applied marker,
//! in a fetcd file format — not a bolt database, so `etcdctl snapshot restore/status` cannot
//! read it; `fetcd snapshot restore` can:
//!
//! ```text
//! "fetcd-snapshot-v1\n"
//! per record: u8 tree-name length (> 0), tree name, u32 BE key length, key, u32 BE value length,
//!             value
//! u8 0 (end of records), zero padding up to a multiple of 512 bytes
//! 32-byte trailer: u32 BE CRC-32C of everything before it, then TRAILER_TAG
//! ```
//!
//! `etcdctl snapshot save` (3.4) stores the streamed bytes and accepts them only if their length
//! is 32 more than a multiple of 512 — the shape of a bolt file (whole pages) followed by etcd's
//! SHA-256. The padding and the 32-byte trailer give fetcd's file that shape; the integrity
//! check inside the trailer is fetcd's CRC-32C, verified by `fetcd snapshot restore`.
//!
//! Restore writes a fresh data directory holding just the store: no Raft log, no membership.
//! When fetcd starts on it, it bootstraps a new cluster from its own flags (`--name`,
//! `--initial-advertise-peer-urls`, `--initial-cluster-token`) as it does for an empty directory,
//! and serves the restored keys, revision, leases and alarms.

use std::path::Path;
use std::path::PathBuf;

use fetcd_storage::hash::Crc32c;
use fetcd_storage::schema;
use fetcd_storage::KvStore;

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8] = b"fetcd-snapshot-v1\n";
/// The last 28 bytes of every snapshot file (after the checksum).
const TRAILER_TAG: &[u8; 28] = b"fetcd-snapshot-crc32c\0\0\0\0\0\0\0";
/// etcd's page-and-checksum shape: `len % PAGE == TRAILER_LEN`.
const PAGE: usize = 512;
const TRAILER_LEN: usize = 32;

/// Why a snapshot could not be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store failed while exporting or importing.
    #[error("store: {0}")]
    Storage(#[from] fetcd_storage::StorageError),
    /// Reading the file or writing the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a fetcd snapshot or is damaged.
    #[error("{0}")]
    Invalid(String),
    /// Restore never overwrites data.
    #[error("data-dir {0:?} exists")]
    DataDirExists(PathBuf),
}

/// One consistent copy of `store` in the snapshot format.
#[cfg(test)]
fn build(store: &KvStore) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::new();
    write(store, &mut out)?;
    Ok(out)
}

/// Writes one consistent copy of `store` in the snapshot format to `out` as it is exported (see
/// `KvStore::export`), so a large store is never held in memory; returns the bytes written.
pub fn write(store: &KvStore, out: &mut impl std::io::Write) -> Result<u64, SnapshotError> {
    let mut out = Summed {
        out,
        crc: Crc32c::new(),
        len: 0,
    };
    let io = |source| SnapshotError::Io {
        path: PathBuf::from("<snapshot stream>"),
        source,
    };
    out.put(MAGIC).map_err(io)?;
    let mut encode_err = None;
    store.export(&mut |tree, k, v| {
        if tree == schema::META_TREE && k == schema::CONSISTENT_INDEX.as_bytes() {
            return Ok(());
        }
        match (
            u8::try_from(tree.len()),
            u32::try_from(k.len()),
            u32::try_from(v.len()),
        ) {
            (Ok(t), Ok(kl), Ok(vl)) => {
                out.put(&[t])?;
                out.put(tree.as_bytes())?;
                out.put(&kl.to_be_bytes())?;
                out.put(k)?;
                out.put(&vl.to_be_bytes())?;
                out.put(v)?;
            }
            _ => encode_err = Some(format!("record too large in tree {tree}")),
        }
        Ok(())
    })?;
    if let Some(e) = encode_err {
        return Err(SnapshotError::Invalid(e));
    }
    out.put(&[0]).map_err(io)?;
    let pad = (out.len as usize).div_ceil(PAGE) * PAGE - out.len as usize;
    out.put(&vec![0; pad]).map_err(io)?;
    let sum = out.crc.sum();
    out.out.write_all(&sum.to_be_bytes()).map_err(io)?;
    out.out.write_all(TRAILER_TAG).map_err(io)?;
    Ok(out.len + TRAILER_LEN as u64)
}

/// A writer that keeps the running checksum and length of what went through it.
struct Summed<'a, W> {
    out: &'a mut W,
    crc: Crc32c,
    len: u64,
}

impl<W: std::io::Write> Summed<'_, W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.crc.update(b);
        self.len += b.len() as u64;
        Ok(())
    }
}

/// A record of a snapshot: (tree, key, value).
type Record = (String, Vec<u8>, Vec<u8>);

/// Checks the magic and checksum of `bytes` and decodes its records.
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, SnapshotError> {
    let bad = |why: &str| SnapshotError::Invalid(format!("not a fetcd snapshot: {why}"));
    if bytes.len() < MAGIC.len() + TRAILER_LEN || !bytes.starts_with(MAGIC) {
        return Err(bad("missing header"));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let (sum, tag) = trailer.split_at(4);
    if tag != TRAILER_TAG || body.len() % PAGE != 0 {
        return Err(bad("missing trailer (truncated file?)"));
    }
    let mut h = Crc32c::new();
    h.update(body);
    let want = u32::from_be_bytes([sum[0], sum[1], sum[2], sum[3]]);
    if h.sum() != want {
        return Err(bad("checksum mismatch (truncated or damaged file)"));
    }
    let mut rest = &body[MAGIC.len()..];
    let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
        if rest.len() < n {
            return Err(bad("truncated record"));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let mut out = Vec::new();
    loop {
        let t = take(1)?[0] as usize;
        if t == 0 {
            break;
        }
        let tree = String::from_utf8(take(t)?.to_vec()).map_err(|_| bad("tree name"))?;
        let kl = take(4)?;
        let kl = u32::from_be_bytes([kl[0], kl[1], kl[2], kl[3]]) as usize;
        let k = take(kl)?.to_vec();
        let vl = take(4)?;
        let vl = u32::from_be_bytes([vl[0], vl[1], vl[2], vl[3]]) as usize;
        let v = take(vl)?.to_vec();
        out.push((tree, k, v));
    }
    Ok(out)
}

/// What a restore produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The store's revision.
    pub revision: i64,
    /// Leases restored.
    pub leases: usize,
}

/// Restores `file` into a new `data_dir` (which must not exist), laid out as fetcd's own
/// (`member/kv`).
pub fn restore(file: &Path, data_dir: &Path) -> Result<Restored, SnapshotError> {
    if data_dir.exists() {
        return Err(SnapshotError::DataDirExists(data_dir.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    };
    let bytes = std::fs::read(file).map_err(io(file))?;
    let records = parse(&bytes)?;
    let kv_dir = data_dir.join("member").join("kv");
    std::fs::create_dir_all(&kv_dir).map_err(io(&kv_dir))?;
    let store = KvStore::open_path(&kv_dir)?;
    store.import(records.into_iter().map(Ok))?;
    store.flush()?;
    Ok(Restored {
        revision: store.current_revision(),
        leases: store.leases().len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open_path(&dir.path().join("kv")).unwrap();
        let snap = build(&store).unwrap();
        assert!(parse(&snap).is_ok());
        assert_eq!(snap.len() % PAGE, TRAILER_LEN, "etcdctl's size check");
        let mut bad = snap.clone();
        let last = bad.len() - 5;
        bad[last] ^= 1;
        assert!(parse(&bad).is_err());
        assert!(parse(&snap[..snap.len() - 1]).is_err());
        assert!(parse(b"SQLite format 3").is_err());
    }
}
