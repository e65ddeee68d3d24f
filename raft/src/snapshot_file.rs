//! The on-disk format of a Raft snapshot, written and read as a stream.
//!
//! A snapshot is a copy of every record of the MVCC store. Holding it in memory would cost a
//! member several times its database size at every snapshot (a 100 MB store raised the peak RSS
//! by ~240 MB), and again whenever a follower is sent one; so records go straight from the
//! store's export to a file, and from a file into the store on install. The same file is what a
//! leader streams to a follower in chunks, so a received file is installed as it is.
//!
//! Layout: the magic `FETCDSN1`; the records, each a bincode `Some((tree, key, value))`, ended by
//! a bincode `None`; the bincode [`SnapshotMeta`](openraft::SnapshotMeta); and the meta's byte
//! offset as a little-endian `u64`. The meta comes last because it is known only once the export
//! has passed the store's applied marker; readers of the meta alone seek to the trailer.

use std::fs::File;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Seek;
use std::io::SeekFrom;
use std::io::Write;

use fetcd_storage::write_behind::WriteBehind;

use crate::NodeId;

/// The snapshot's description, as openraft keeps it.
pub(crate) type Meta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;

/// One exported store record: (tree, key, value).
pub(crate) type Record = (String, Vec<u8>, Vec<u8>);

const MAGIC: &[u8; 8] = b"FETCDSN1";

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {what}"))
}

/// Writes one snapshot file; [`SnapshotWriter::finish`] makes it complete.
pub(crate) struct SnapshotWriter {
    out: BufWriter<WriteBehind>,
    written: u64,
}

impl SnapshotWriter {
    /// Starts a snapshot in `file` (created empty by the caller).
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, WriteBehind::new(file));
        out.write_all(MAGIC)?;
        Ok(SnapshotWriter {
            out,
            written: MAGIC.len() as u64,
        })
    }

    /// Appends one store record.
    pub(crate) fn record(&mut self, tree: &str, key: &[u8], value: &[u8]) -> io::Result<()> {
        let rec: Option<(&str, &[u8], &[u8])> = Some((tree, key, value));
        self.put(&rec)
    }

    fn put<T: serde::Serialize>(&mut self, v: &T) -> io::Result<()> {
        let n = bincode::serialized_size(v).map_err(io::Error::other)?;
        bincode::serialize_into(&mut self.out, v).map_err(io::Error::other)?;
        self.written += n;
        Ok(())
    }

    /// Ends the records, writes the meta and the trailer, and syncs the file to disk.
    pub(crate) fn finish(mut self, meta: &Meta) -> io::Result<File> {
        self.put(&None::<Record>)?;
        let meta_at = self.written;
        self.put(meta)?;
        self.out.write_all(&meta_at.to_le_bytes())?;
        // `finish` syncs the rest: data and size, all a reader of the file needs.
        self.out.into_inner().map_err(|e| e.into_error())?.finish()
    }
}

/// Reads the meta of the snapshot in `file` (from its trailer); leaves the position unspecified.
pub(crate) fn read_meta(file: &mut File) -> io::Result<Meta> {
    let len = file.seek(SeekFrom::End(0))?;
    if len < (MAGIC.len() + 8) as u64 {
        return Err(corrupt(format!("{len} bytes is too short")));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt("not a fetcd snapshot"));
    }
    file.seek(SeekFrom::End(-8))?;
    let mut at = [0u8; 8];
    file.read_exact(&mut at)?;
    let meta_at = u64::from_le_bytes(at);
    if meta_at < MAGIC.len() as u64 || meta_at > len - 8 {
        return Err(corrupt(format!(
            "meta offset {meta_at} outside {len} bytes"
        )));
    }
    file.seek(SeekFrom::Start(meta_at))?;
    let mut r = BufReader::new(file.take(len - 8 - meta_at));
    bincode::deserialize_from(&mut r).map_err(corrupt)
}

/// The records of the snapshot in `file`, read one at a time from its start. A file that ends
/// before the records' end marker yields an error, never a silently shorter snapshot.
pub(crate) fn read_records(mut file: File) -> io::Result<Records> {
    file.seek(SeekFrom::Start(0))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt("not a fetcd snapshot"));
    }
    Ok(Records { r, done: false })
}

/// Iterator over a snapshot file's records (see [`read_records`]).
pub(crate) struct Records {
    r: BufReader<File>,
    done: bool,
}

impl Iterator for Records {
    type Item = io::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match bincode::deserialize_from::<_, Option<Record>>(&mut self.r) {
            Ok(Some(rec)) => Some(Ok(rec)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(corrupt(e)))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(index: u64) -> Meta {
        Meta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(3, 1),
                index,
            )),
            last_membership: Default::default(),
            snapshot_id: format!("3-1-{index}-0"),
        }
    }

    fn write(dir: &std::path::Path, records: &[Record], m: &Meta) -> std::path::PathBuf {
        let path = dir.join("s.snap");
        let mut w = SnapshotWriter::new(File::create(&path).unwrap()).unwrap();
        for (t, k, v) in records {
            w.record(t, k, v).unwrap();
        }
        w.finish(m).unwrap();
        path
    }

    #[test]
    fn records_and_meta_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Record> = (0..1000u32)
            .map(|i| {
                (
                    "key".to_string(),
                    i.to_be_bytes().to_vec(),
                    vec![i as u8; i as usize],
                )
            })
            .chain(std::iter::once((
                "meta".to_string(),
                b"ci".to_vec(),
                vec![],
            )))
            .collect();
        let path = write(dir.path(), &records, &meta(42));
        assert_eq!(
            read_meta(&mut File::open(&path).unwrap()).unwrap(),
            meta(42)
        );
        let back: Vec<Record> = read_records(File::open(&path).unwrap())
            .unwrap()
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(back, records);
    }

    #[test]
    fn an_empty_store_is_a_valid_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[], &meta(1));
        assert_eq!(read_meta(&mut File::open(&path).unwrap()).unwrap(), meta(1));
        assert_eq!(read_records(File::open(&path).unwrap()).unwrap().count(), 0);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Record> = (0..100u32)
            .map(|i| ("key".to_string(), i.to_be_bytes().to_vec(), vec![7; 300]))
            .collect();
        let path = write(dir.path(), &records, &meta(9));
        let full = std::fs::read(&path).unwrap();

        // Cut anywhere inside the records: the meta cannot be read, and the records end in an
        // error rather than a shorter list.
        for cut in [9, 500, full.len() / 2] {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert!(
                read_meta(&mut File::open(&path).unwrap()).is_err(),
                "cut at {cut}"
            );
            let recs: Vec<_> = read_records(File::open(&path).unwrap()).unwrap().collect();
            assert!(recs.last().unwrap().is_err(), "cut at {cut}");
        }
        // Not a snapshot at all.
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(read_meta(&mut File::open(&path).unwrap()).is_err());
        assert!(read_records(File::open(&path).unwrap()).is_err());
    }
}
