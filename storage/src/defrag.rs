//! Defragmentation: sled 0.34 reuses the space compaction frees but never gives it back to the
//! file system, so a store that once grew stays that large. Defragmenting copies every live
//! record into a fresh database and switches to it, as etcd's defrag copies its bolt file into a
//! new one and renames it into place.
//!
//! sled cannot be renamed under: it opens and deletes the files of pages over 128 KiB
//! (`blobs/<lsn>`) by path, for as long as any handle of the database lives. A database that
//! was moved while open reads (and deletes) whatever sits at its old path later, so here no
//! database directory is ever moved, or its name reused, while a process may have it open.
//! The store at `kv/` is therefore a directory of generations:
//!
//! - `kv/gen-<n>/` — a sled database; `kv/CURRENT` names the one in use.
//! - Defragmenting generation `n` writes `kv/gen-<n+1>/`, fsyncs every file of it and `kv/`,
//!   then replaces `CURRENT` atomically (write `CURRENT.tmp`, fsync, rename, fsync `kv/`) — the
//!   commit point — and removes `kv/gen-<n>/` once the old database is closed.
//!
//! A crash at any point leaves `CURRENT` naming one complete generation; [`recover`] removes
//! every other one before the store opens. Stores written before generations existed (sled's
//! files directly in `kv/`, and the `kv.defrag/` / `kv.old/` siblings of the rename-based
//! swap) are put in this shape by [`recover`] too. The copy holds the same consistent index as
//! the original, so the Raft layer sees the same applied state either way.

use std::path::Path;
use std::path::PathBuf;

use crate::key_tree;
use crate::key_tree::BlockWriter;
use crate::persister::Trees;
use crate::revision::Revision;
use crate::schema;
use crate::Result;
use crate::StorageError;

/// Records per sled batch while copying.
const COPY_BATCH: usize = 10_000;
/// Bytes per sled batch while copying: a batch is held in memory whole, and 10,000 blocks of
/// history (or of large values) would be tens of megabytes or more.
const COPY_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The file naming the generation in use.
const CURRENT: &str = "CURRENT";
const CURRENT_TMP: &str = "CURRENT.tmp";
const GENERATION_PREFIX: &str = "gen-";

/// How long removing an old generation waits for its database to be closed.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The directory of generation `n` of the store at `root`.
pub(crate) fn generation_dir(root: &Path, n: u64) -> PathBuf {
    root.join(format!("{GENERATION_PREFIX}{n}"))
}

fn parse_generation(name: &str) -> Option<u64> {
    name.strip_prefix(GENERATION_PREFIX)?.parse().ok()
}

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

/// Puts the store at `root` in order before it opens (see the module docs) and returns the
/// generation in use, which exists and is the only one left.
pub fn recover(root: &Path) -> Result<u64> {
    recover_renamed_swap(root)?;
    if !root.exists() {
        std::fs::create_dir_all(root)?;
        sync_parent(root)?;
    }
    let current = match read_current(root)? {
        Some(n) => n,
        None => adopt_flat_store(root)?,
    };
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let leftover = match parse_generation(&name) {
            Some(n) => n != current,
            None => name == CURRENT_TMP,
        };
        if leftover {
            tracing::warn!(path = %entry.path().display(), "removing a leftover of a defragmentation");
            if entry.file_type()?.is_dir() {
                remove_if_exists(&entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(current)
}

/// The rename-based swap of earlier versions left `kv.defrag/` (an unfinished copy) or
/// `kv.old/` (the original, alone if the crash fell between its two renames).
fn recover_renamed_swap(root: &Path) -> Result<()> {
    let fresh = sibling(root, "defrag");
    if fresh.exists() {
        tracing::warn!(dir = %fresh.display(), "removing an unfinished defragmentation copy");
        remove_if_exists(&fresh)?;
    }
    let old = sibling(root, "old");
    if old.exists() {
        if root.exists() {
            remove_if_exists(&old)?;
        } else {
            tracing::warn!(dir = %old.display(), "defragmentation interrupted between renames; restoring the original store");
            std::fs::rename(&old, root)?;
            sync_parent(root)?;
        }
    }
    Ok(())
}

fn read_current(root: &Path) -> Result<Option<u64>> {
    let text = match std::fs::read_to_string(root.join(CURRENT)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let n = parse_generation(text.trim())
        .ok_or_else(|| StorageError::Corrupt(format!("{CURRENT} names no generation: {text:?}")))?;
    if !generation_dir(root, n).is_dir() {
        return Err(StorageError::Corrupt(format!(
            "{CURRENT} names {}, which is missing",
            generation_dir(root, n).display()
        )));
    }
    Ok(Some(n))
}

/// Moves sled's files of a store without `CURRENT` (a new one, or one of an earlier version)
/// into generation 0. Finishes a move a crash interrupted: whatever is not a generation is
/// sled's.
fn adopt_flat_store(root: &Path) -> Result<u64> {
    let gen0 = generation_dir(root, 0);
    std::fs::create_dir_all(&gen0)?;
    let mut moved = 0;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let s = name.to_string_lossy();
        if parse_generation(&s).is_some() || s == CURRENT_TMP {
            continue;
        }
        std::fs::rename(entry.path(), gen0.join(&name))?;
        moved += 1;
    }
    if moved > 0 {
        tracing::info!(files = moved, dir = %gen0.display(), "moved the store into its first generation");
    }
    sync_tree(&gen0)?;
    switch_current(root, 0)?;
    Ok(0)
}

/// Makes generation `n` the one in use, atomically and durably.
fn switch_current(root: &Path, n: u64) -> std::io::Result<()> {
    let tmp = root.join(CURRENT_TMP);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{GENERATION_PREFIX}{n}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, root.join(CURRENT))?;
    std::fs::File::open(root)?.sync_all()
}

/// Opens the sled database at `path`. sled holds an exclusive file lock until the last handle of
/// a database is dropped, which can be a moment after a member in the same process (an embedding
/// program, a test) closed it; the open waits up to 10 s for it.
pub(crate) fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + CLOSE_WAIT;
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

/// Copies `trees` into generation `next` of the store at `root`, makes it durable and the one
/// in use, and returns it open. The caller holds the store's writer and has drained the
/// persister, so `trees` do not change meanwhile, and never passes the same `next` twice in a
/// process (a failed copy may still be closing).
pub(crate) fn rewrite(
    trees: &Trees,
    root: &Path,
    next: u64,
    cache_bytes: u64,
) -> Result<(sled::Db, Trees)> {
    let dir = generation_dir(root, next);
    remove_if_exists(&dir)?;
    let switched = (|| {
        let db = open_db(&dir, cache_bytes)?;
        let copy = Trees::open(&db)?;
        let records = copy_trees(trees, &copy)?;
        db.flush()?;
        // sled does not fsync its files itself: the copy must be durable before it is named.
        sync_tree(&dir)?;
        std::fs::File::open(root)?.sync_all()?;
        switch_current(root, next)?;
        Ok::<_, StorageError>((db, copy, records))
    })();
    match switched {
        Ok((db, copy, records)) => {
            tracing::info!(records, dir = %dir.display(), "defragmented: switched to a fresh copy");
            Ok((db, copy))
        }
        Err(e) => {
            // Still the old generation in use; the copy's handles are gone, its files go too
            // (or at the next open).
            remove_generation(&dir);
            Err(e)
        }
    }
}

fn copy_trees(from: &Trees, to: &Trees) -> Result<usize> {
    let mut records = 0usize;
    // `meta` last: a copy is only used once complete, but keep the marker after its data.
    for ((name, from), (_, to)) in from.named().into_iter().zip(to.named()) {
        let mut copy = TreeCopy::new(to);
        if name == schema::KEY_TREE {
            // Revision by revision into full blocks: what a compaction left of old blocks (and
            // single records written before blocks) is packed again.
            let mut blocks = BlockWriter::default();
            for item in key_tree::scan(from, Revision::default(), None) {
                let r = item?;
                blocks.push(r.rev, r.tombstone, &r.value)?;
                for (k, v) in blocks.take_sealed() {
                    copy.insert(k, v)?;
                }
            }
            for (k, v) in blocks.finish() {
                copy.insert(k, v)?;
            }
        } else {
            for item in from.iter() {
                let (k, v) = item?;
                copy.insert(k, v)?;
            }
        }
        records += copy.finish()?;
    }
    Ok(records)
}

/// Records bound for one tree of the copy, written in batches of bounded count and size.
struct TreeCopy<'a> {
    to: &'a sled::Tree,
    batch: sled::Batch,
    n: usize,
    bytes: usize,
    written: usize,
}

impl<'a> TreeCopy<'a> {
    fn new(to: &'a sled::Tree) -> Self {
        TreeCopy {
            to,
            batch: sled::Batch::default(),
            n: 0,
            bytes: 0,
            written: 0,
        }
    }

    fn insert(&mut self, k: sled::IVec, v: sled::IVec) -> Result<()> {
        self.bytes += k.len() + v.len();
        self.n += 1;
        self.batch.insert(k, v);
        if self.n >= COPY_BATCH || self.bytes >= COPY_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.n > 0 {
            self.to.apply_batch(std::mem::take(&mut self.batch))?;
            self.written += self.n;
            self.n = 0;
            self.bytes = 0;
        }
        Ok(())
    }

    /// Writes what is left; returns how many records were copied.
    fn finish(mut self) -> Result<usize> {
        self.flush()?;
        Ok(self.written)
    }
}

/// Removes a generation no longer in use, once its database has released sled's lock (every
/// thread that could still read or delete files by its path is gone then). A failure is only
/// logged: the next open removes it.
pub(crate) fn remove_generation(dir: &Path) {
    if !wait_unlocked(&dir.join("db"), CLOSE_WAIT) {
        tracing::warn!(dir = %dir.display(), "old database still open; removing its files anyway");
    }
    if let Err(e) = remove_if_exists(dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "could not remove an old generation of the store");
    }
}

/// Waits (up to `limit`) until no open handle, in this process or another, holds the exclusive
/// `flock` on `file` that sled (on its `db` file) and the Raft log (on its `LOCK` file) take for
/// as long as they are open. True once it is free or if `file` does not exist. A member stopped
/// inside a process releases its files only when the last task holding them ends, a moment
/// after its shutdown returned; this is how its restart, or the shutdown itself, waits for it.
pub fn wait_unlocked(file: &Path, limit: std::time::Duration) -> bool {
    let Ok(handle) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
    else {
        return true;
    };
    let deadline = std::time::Instant::now() + limit;
    loop {
        // Dropping `handle` releases the lock taken here.
        if fs2::FileExt::try_lock_exclusive(&handle).is_ok() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits (up to `limit`) until the generation `CURRENT` names under `root` is no longer open.
pub(crate) fn wait_store_closed(root: &Path, limit: std::time::Duration) -> bool {
    match read_current(root) {
        Ok(Some(n)) => wait_unlocked(&generation_dir(root, n).join("db"), limit),
        // Nothing was ever opened there, or nothing that can be opened.
        Ok(None) | Err(_) => true,
    }
}

/// fsyncs every file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            sync_tree(&path)?;
            continue;
        }
        match std::fs::File::open(&path) {
            Ok(f) => f.sync_all()?,
            // sled removes a blob its pages no longer point to in the background, also after a
            // flush: gone, it needs no sync (the directory's sync below records its removal).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
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
