//! Defragmentation: sled 0.34 reuses the space compaction frees but never gives it back to the
//! file system, so a store that once grew stays that large. Defragmenting copies every live
//! record into a fresh database next to the store and swaps the directories, as etcd's defrag
//! copies its bolt file into a new one and renames it into place.
//!
//! On disk, for a store at `kv/`:
//! 1. the copy is written to `kv.defrag/`, closed, and every file and the directory fsynced;
//! 2. `kv/` is renamed to `kv.old/`, then `kv.defrag/` to `kv/`, and the parent fsynced;
//! 3. `kv.old/` is removed once the old database is closed.
//!
//! A crash at any point leaves one complete store, which [`recover`] puts back at `kv/` before
//! the store opens: a leftover `kv.defrag/` is an unfinished copy (the original is intact) and is
//! removed; `kv.old/` without `kv/` means the crash fell between the two renames, so the original
//! goes back; `kv.old/` beside `kv/` is the finished swap's leftover. The copy holds the same
//! consistent index as the original, so the Raft layer sees the same applied state either way.

use std::path::Path;
use std::path::PathBuf;

use crate::persister::Trees;
use crate::Result;

/// Records per sled batch while copying.
const COPY_BATCH: usize = 10_000;

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

fn remove_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Puts a store interrupted mid-defragmentation back in order (see the module docs).
pub fn recover(path: &Path) -> Result<()> {
    let fresh = sibling(path, "defrag");
    if fresh.exists() {
        tracing::warn!(dir = %fresh.display(), "removing an unfinished defragmentation copy");
        remove_if_exists(&fresh)?;
    }
    let old = sibling(path, "old");
    if old.exists() {
        if path.exists() {
            remove_if_exists(&old)?;
        } else {
            tracing::warn!(dir = %old.display(), "defragmentation interrupted between renames; restoring the original store");
            std::fs::rename(&old, path)?;
            sync_parent(path)?;
        }
    }
    Ok(())
}

/// Opens the sled database at `path`. sled holds an exclusive file lock until the last handle of
/// a database is dropped, which can be a moment after a member in the same process (an embedding
/// program, a test, a defragmentation) closed it; the open waits up to 10 s for it.
pub(crate) fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            // sled reports it as ErrorKind::Other with this text only.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "sled database still locked; waiting");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Copies `trees` into a fresh database, makes it durable, swaps it in at `path` and returns it
/// open. The caller holds the store's writer and has drained the persister, so `trees` do not
/// change meanwhile.
pub(crate) fn rewrite(trees: &Trees, path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let fresh = sibling(path, "defrag");
    remove_if_exists(&fresh)?;
    let records = {
        let db = open_db(&fresh, cache_bytes)?;
        let copy = Trees::open(&db)?;
        let mut records = 0usize;
        // `meta` last: a copy is only used once complete, but keep the marker after its data.
        for ((_, from), (_, to)) in trees.named().into_iter().zip(copy.named()) {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in from.iter() {
                let (k, v) = item?;
                batch.insert(k, v);
                n += 1;
                if n == COPY_BATCH {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    records += n;
                    n = 0;
                }
            }
            to.apply_batch(batch)?;
            records += n;
        }
        db.flush()?;
        records
    };
    // sled does not fsync its files itself: the copy must be durable before it replaces the
    // original.
    sync_tree(&fresh)?;
    let old = sibling(path, "old");
    remove_if_exists(&old)?;
    std::fs::rename(path, &old)?;
    let swapped = std::fs::rename(&fresh, path)
        .and_then(|()| sync_parent(path))
        .map_err(crate::StorageError::from)
        .and_then(|()| open_db(path, cache_bytes));
    match swapped {
        Ok(db) => {
            tracing::info!(records, dir = %path.display(), "defragmented: swapped in a fresh copy");
            Ok(db)
        }
        Err(e) => {
            // The store keeps running on the original: put it back where it belongs, so that
            // nothing (a later defragmentation, the next open) takes it for a leftover.
            undo_swap(path, &fresh, &old);
            Err(e)
        }
    }
}

/// Moves the original back from `old` to `path` after a failed swap (the copy, if it got to
/// `path`, is discarded). Failures are logged: [`recover`] sorts the directories out on the next
/// open.
fn undo_swap(path: &Path, fresh: &Path, old: &Path) {
    let res = (|| {
        if path.exists() {
            std::fs::rename(path, fresh)?;
        }
        std::fs::rename(old, path)?;
        sync_parent(path)?;
        remove_if_exists(fresh)
    })();
    if let Err(e) = res {
        tracing::error!(error = %e, dir = %path.display(), "could not undo a failed defragmentation swap");
    }
}

/// Removes the original left at `kv.old/` by [`rewrite`]; a failure is only logged (the next
/// open removes it).
pub(crate) fn remove_old(path: &Path) {
    let old = sibling(path, "old");
    if let Err(e) = remove_if_exists(&old) {
        tracing::warn!(error = %e, dir = %old.display(), "could not remove the pre-defragmentation store");
    }
}

/// fsyncs every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::File::open(p)?.sync_all(),
        _ => Ok(()),
    }
}
