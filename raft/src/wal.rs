//! The write-ahead log's files: pre-zeroed segments of checksummed records, written in place and
//! made durable with one `fdatasync` per write.
//!
//! This module knows records only as bytes; [`crate::log_store`] gives them their meaning.
//!
//! # Why our own segment files
//!
//! Two costs of an append-only file showed up on every Raft log write (docs/benchmarks.md):
//! - an `fdatasync` after a write that grows a file also writes the inode (on ext4 here, a
//!   4 KiB append + sync took about 0.06 ms longer than an overwrite of blocks already
//!   written), so segments are zero-filled before use, as etcd's WAL preallocates its own;
//! - handing each write to a flush thread and back costs two thread wake-ups, while openraft
//!   0.9's core awaits the sync of each append anyway, so the write is synced by the caller.
//!
//! A write that must be durable when it returns goes around the page cache: the active segment
//! is opened a second time with `O_DIRECT | O_DSYNC`, and the write covers whole pages from the
//! one the new records start in (the records already in that page are written again, as the
//! page cache's writeback writes that page again too). One `pwrite` then replaces a copy into
//! the page cache, its writeback and an `fdatasync`. On this project's machine the sync itself
//! took as long either way at one client's pace; the put's server CPU fell by 7 % and its p50
//! by 5 % (docs/benchmarks.md). Writes that are synced later by
//! another thread (a leader's, see [`crate::durable`]) stay buffered, and a direct write is
//! used only while no buffered write waits for its sync, since `O_DSYNC` makes durable only
//! what it writes. A file system that refuses `O_DIRECT` (tmpfs) gets `fdatasync` throughout.
//! Readers keep using the buffered handle: the kernel drops the cached pages a direct write
//! covers, and records that recent are served from the log store's payload cache anyway.
//!
//! # Layout
//!
//! `<dir>/<seq as 16 hex digits>.wal`, each created `segment_size` bytes long and zero-filled
//! (by a background thread, one segment ahead, as `<seq>.wal.tmp`, renamed when it is needed).
//! A purged segment is renamed `<seq>.wal.dead` and removed by a background thread; either
//! suffix left by a stop is removed at the next open.
//! A record is `[u32 LE body length][u32 LE checksum][body]`, the body never empty. The
//! checksum is CRC32 over the body, seeded with the previous record's checksum (the first
//! record of a segment with a seed derived from the segment's number): a stale record left
//! behind a shorter one written over a torn tail can never pass for a live one. A zero length
//! is the end of the written part.
//!
//! # Recovery
//!
//! Segments are replayed in order. Every segment but the last was synced before the next one
//! was started, so a bad record there is corruption and the open fails. In the last segment, a
//! record that fails its checksum or runs past the file is a write torn by a crash if part of
//! it is still zeros (a 512-byte sector never written), and the log ends before it; the rest of
//! the segment is zero-filled again so the next recovery reads the same. A failed record that
//! has no such zero sector is corruption, and the open fails rather than drop data that was
//! acknowledged.

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::RwLock;
use std::thread::JoinHandle;
use std::time::Instant;

/// Bytes before a record's body.
const HEADER: usize = 8;
/// The unit a torn write is detected by: a disk persists whole sectors.
const SECTOR: usize = 512;
/// Zeros are written in blocks of this size when a segment is prepared.
const ZERO_BLOCK: usize = 1 << 20;
/// Direct writes cover whole pages of this size, aligned in the file and in memory: what
/// `O_DIRECT` requires (a multiple of the logical block size) and what writeback would write.
const PAGE: usize = 4096;

/// Where a record is, to read it back from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The segment's number.
    pub seq: u64,
    /// Offset of the record's header in the segment.
    pub off: u64,
    /// Length of the body.
    pub len: u32,
    /// The checksum seed (the previous record's checksum).
    pub seed: u32,
}

/// The segment files by number, shared with readers that `pread` records outside the writer's
/// lock.
pub(crate) type Files = Arc<RwLock<BTreeMap<u64, Arc<File>>>>;

/// The writer of the log's segments. One per directory (an exclusive lock on `LOCK` keeps
/// another process out).
pub(crate) struct Wal {
    dir: PathBuf,
    segment_size: u64,
    files: Files,
    /// The segment written to.
    active: u64,
    active_file: Arc<File>,
    /// Where the next record of `active` goes (after what `pending` holds).
    offset: u64,
    /// The last record's checksum.
    chain: u32,
    /// Records encoded but not yet written: the last `pending.len()` bytes before `offset`.
    pending: Vec<u8>,
    /// The zero-filling of segment `active + 1`.
    next: Option<JoinHandle<io::Result<()>>>,
    /// `active` opened with `O_DIRECT | O_DSYNC` (see the module documentation), unless direct
    /// writes are off or the file system refused them.
    direct: Option<File>,
    /// Whether to open the next segments for direct writes too.
    direct_wanted: bool,
    /// What the active segment holds from the start of the page the written end is in, up to
    /// that end: a direct write starts there.
    tail: Vec<u8>,
    /// Offset of `tail` in the active segment (a multiple of [`PAGE`]).
    tail_start: u64,
    /// Some records were written to the page cache and are not known to be synced: the next
    /// durable write must `fdatasync` the file.
    dirty: bool,
    /// Memory for direct writes, with room to align them.
    scratch: Vec<u8>,
    /// Direct writes made, for tests.
    direct_writes: u64,
    /// A write or sync failed: nothing more may be written (a failed fsync is not retried).
    failed: bool,
    _lock: File,
}

/// The file `Wal` holds an exclusive `flock` on while it is open.
pub(crate) const LOCK_FILE: &str = "LOCK";

impl Wal {
    /// Opens the log in `dir` (creating it), calling `replay` with every record's location and
    /// body in log order. A new log has one empty segment ([`active_is_empty`](Self::active_is_empty)).
    ///
    /// With `direct`, writes that must be durable at once bypass the page cache where the file
    /// system allows it (see the module documentation).
    pub(crate) fn open(
        dir: &Path,
        segment_size: u64,
        direct: bool,
        mut replay: impl FnMut(Loc, &[u8]) -> io::Result<()>,
    ) -> io::Result<Self> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            sync_dir(parent)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        fs2::FileExt::try_lock_exclusive(&lock)?;

        let mut seqs = Vec::new();
        for f in std::fs::read_dir(dir)? {
            let f = f?;
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".wal.tmp") || name.ends_with(".wal.dead") {
                // A segment being prepared, or one purged and being removed, when the process
                // stopped (or, reopened in the same process, its remover may finish first).
                match std::fs::remove_file(f.path()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            } else if let Some(seq) = name.strip_suffix(".wal") {
                if let Ok(seq) = u64::from_str_radix(seq, 16) {
                    seqs.push(seq);
                }
            }
        }
        seqs.sort_unstable();
        // Segments are only ever removed oldest first, so a gap in the numbers is a removal a
        // crash interrupted (or a file system that kept some unlinks and lost others): what is
        // before it was meant to be gone. It is removed rather than replayed; replaying it
        // would end in the same state (the purge record that removed it comes later) but walk
        // through entries with a hole in them on the way.
        if let Some(gap) = seqs.windows(2).rposition(|w| w[1] != w[0] + 1) {
            for &old in &seqs[..=gap] {
                tracing::info!(
                    segment = format!("{old:016x}"),
                    "removing a wal segment left behind an interrupted purge"
                );
                std::fs::remove_file(segment_path(dir, old))?;
            }
            sync_dir(dir)?;
            seqs.drain(..=gap);
        }

        let mut files = BTreeMap::new();
        let mut end = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            let file = open_segment(dir, seq)?;
            let (offset, chain) = scan(&file, seq, last, &mut replay)?;
            files.insert(seq, Arc::new(file));
            if last {
                end = Some((seq, offset, chain));
            }
        }

        let (active, offset, chain) = match end {
            Some(e) => e,
            None => {
                prepare_segment(dir, 0, segment_size)?;
                activate_segment(dir, 0)?;
                files.insert(0, Arc::new(open_segment(dir, 0)?));
                (0, 0, chain_seed(0))
            }
        };
        let active_file = files
            .get(&active)
            .cloned()
            .ok_or_else(|| io::Error::other("active wal segment is not open"))?;
        let direct_file = if direct {
            open_direct(dir, active)
        } else {
            None
        };
        let tail_start = offset / PAGE as u64 * PAGE as u64;
        let mut tail = Vec::new();
        if direct_file.is_some() {
            tail.resize((offset - tail_start) as usize, 0);
            active_file.read_exact_at(&mut tail, tail_start)?;
        }

        let mut wal = Self {
            dir: dir.to_path_buf(),
            segment_size,
            files: Arc::new(RwLock::new(files)),
            active,
            active_file,
            offset,
            chain,
            pending: Vec::new(),
            next: None,
            direct_wanted: direct_file.is_some(),
            direct: direct_file,
            tail,
            tail_start,
            dirty: false,
            scratch: Vec::new(),
            direct_writes: 0,
            failed: false,
            _lock: lock,
        };
        wal.prepare_next();
        Ok(wal)
    }

    /// The segment files, for readers.
    pub(crate) fn files(&self) -> Files {
        self.files.clone()
    }

    /// The segment records are written to.
    pub(crate) fn active(&self) -> u64 {
        self.active
    }

    /// The segment being written, for a sync on another thread.
    pub(crate) fn active_file(&self) -> Arc<File> {
        self.active_file.clone()
    }

    /// True if the active segment holds nothing yet.
    pub(crate) fn active_is_empty(&self) -> bool {
        self.offset == 0
    }

    /// True if a record with a body of `len` bytes does not fit in the active segment, which
    /// already holds records: the caller then [`rotate`](Self::rotate)s first.
    pub(crate) fn needs_rotation(&self, len: usize) -> bool {
        self.offset > 0 && self.offset + (HEADER + len) as u64 > self.segment_size
    }

    /// Adds a record after the ones before it; it reaches the file with the next
    /// [`flush`](Self::flush).
    pub(crate) fn push(&mut self, body: &[u8]) -> io::Result<Loc> {
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("wal record of {} bytes", body.len()),
                )
            })?;
        let crc = checksum(self.chain, body);
        let loc = Loc {
            seq: self.active,
            off: self.offset,
            len,
            seed: self.chain,
        };
        self.pending.extend_from_slice(&len.to_le_bytes());
        self.pending.extend_from_slice(&crc.to_le_bytes());
        self.pending.extend_from_slice(body);
        self.offset += (HEADER + body.len()) as u64;
        self.chain = crc;
        Ok(loc)
    }

    /// Writes the pushed records, and with `sync` makes them (and everything before) durable.
    pub(crate) fn flush(&mut self, sync: bool) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write-ahead log write failed; the log is closed for writes",
            ));
        }
        let res = self.write_pending(sync);
        if res.is_err() {
            self.failed = true;
        }
        res
    }

    fn write_pending(&mut self, sync: bool) -> io::Result<()> {
        if sync && !self.dirty && !self.pending.is_empty() {
            if let Some(file) = &self.direct {
                let started = Instant::now();
                match write_direct(
                    file,
                    &mut self.scratch,
                    self.tail_start,
                    &self.tail,
                    &self.pending,
                ) {
                    Ok(()) => {
                        // The write was the sync: it returned once the disk had the data.
                        crate::metrics::WAL_FSYNC.observe(started.elapsed());
                        crate::metrics::WAL_WRITE_BYTES
                            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
                        self.keep_tail();
                        self.direct_writes += 1;
                        return Ok(());
                    }
                    // Refused before anything was written (alignment, or a file system that
                    // accepted the flag at open but not the write): sync the usual way.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                        tracing::warn!(error = %e, "direct wal write refused; using fdatasync");
                        self.direct = None;
                        self.direct_wanted = false;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if !self.pending.is_empty() {
            let len = self.pending.len();
            // Written with zeros up to the end of the page the records end in, as the segment
            // holds there: a write that ends inside a page the page cache does not hold makes
            // the kernel read that page from disk first, and segments are zero-filled around
            // the cache. (A leader's appends then read no page; they read one per page before.)
            let page = PAGE as u64;
            let end = (self.offset.div_ceil(page) * page).min(self.segment_size.max(self.offset));
            self.pending.resize(len + (end - self.offset) as usize, 0);
            let written = self
                .active_file
                .write_all_at(&self.pending, self.offset - len as u64);
            self.pending.truncate(len);
            written?;
            crate::metrics::WAL_WRITE_BYTES.fetch_add(len as u64, Ordering::Relaxed);
            self.dirty = true;
            self.keep_tail();
        }
        if sync {
            let started = Instant::now();
            self.active_file.sync_data()?;
            crate::metrics::WAL_FSYNC.observe(started.elapsed());
            self.dirty = false;
        }
        Ok(())
    }

    /// Moves the pending records into `tail` (keeping only the written end's page) and clears
    /// them, once they are written. Without a direct handle for the active segment there is no
    /// tail to keep (a new one starts empty with the next segment).
    fn keep_tail(&mut self) {
        if self.direct.is_none() {
            self.pending.clear();
            return;
        }
        let page = PAGE as u64;
        let start = self.offset / page * page;
        let keep = (self.offset - start) as usize;
        if self.pending.len() >= keep {
            self.tail.clear();
            self.tail
                .extend_from_slice(&self.pending[self.pending.len() - keep..]);
        } else {
            // The records end in the page the tail is in.
            debug_assert_eq!(start, self.tail_start);
            self.tail.extend_from_slice(&self.pending);
        }
        self.tail_start = start;
        self.pending.clear();
    }

    /// Syncs the active segment and moves to the next one (zero-filled in the background).
    pub(crate) fn rotate(&mut self) -> io::Result<()> {
        self.flush(true)?;
        let seq = self.active + 1;
        let prepared = match self.next.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("wal segment preparation panicked"))),
            None => Err(io::Error::other("no segment prepared")),
        };
        if let Err(e) = prepared {
            tracing::warn!(error = %e, "preparing the next wal segment failed; retrying inline");
            prepare_segment(&self.dir, seq, self.segment_size)?;
        }
        activate_segment(&self.dir, seq)?;
        let file = Arc::new(open_segment(&self.dir, seq)?);
        write_lock(&self.files).insert(seq, file.clone());
        self.direct = if self.direct_wanted {
            open_direct(&self.dir, seq)
        } else {
            None
        };
        self.active = seq;
        self.active_file = file;
        self.offset = 0;
        self.chain = chain_seed(seq);
        self.tail.clear();
        self.tail_start = 0;
        self.prepare_next();
        Ok(())
    }

    fn prepare_next(&mut self) {
        let (dir, seq, size) = (self.dir.clone(), self.active + 1, self.segment_size);
        let spawned = std::thread::Builder::new()
            .name("fetcd-wal-prep".into())
            .spawn(move || prepare_segment(&dir, seq, size));
        match spawned {
            Ok(h) => self.next = Some(h),
            Err(e) => tracing::warn!(error = %e, "cannot start the wal segment preparer"),
        }
    }

    /// Removes the segments numbered below `seq` (never the active one) from the log: renamed
    /// to `<seq>.wal.dead`, oldest first, and the directory synced. The caller has made durable
    /// a record that makes them unneeded.
    ///
    /// Their blocks are given back afterwards by a thread of their own, a few megabytes at a
    /// time (see `fetcd_storage::write_behind`): unlinked here, each 16 MiB segment was freed
    /// and trimmed at once on the caller's thread, which is openraft's core on the runtime's
    /// worker, with the log's writes waiting for it. The rename comes first and is durable
    /// first: a segment cut short under its own name would read as corruption at the next open.
    pub(crate) fn remove_before(&mut self, seq: u64) -> io::Result<()> {
        let seq = seq.min(self.active);
        let old: Vec<u64> = read_lock(&self.files)
            .range(..seq)
            .map(|(s, _)| *s)
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        for s in &old {
            std::fs::rename(segment_path(&self.dir, *s), dead_path(&self.dir, *s))?;
            write_lock(&self.files).remove(s);
        }
        sync_dir(&self.dir)?;
        let dir = self.dir.clone();
        let release = move || {
            for s in old {
                let path = dead_path(&dir, s);
                if let Err(e) = fetcd_storage::write_behind::remove_gradually(&path, None) {
                    tracing::warn!(error = %e, path = %path.display(), "removing a purged wal segment");
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("fetcd-wal-release".into())
            .spawn(release)
        {
            // Left for the next open to remove.
            tracing::warn!(error = %e, "cannot start the purged wal segments' remover");
        }
        Ok(())
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if !self.failed {
            if let Err(e) = self.write_pending(true) {
                tracing::warn!(error = %e, "syncing the write-ahead log on close");
            }
        }
        if let Some(h) = self.next.take() {
            let _ = h.join();
        }
    }
}

/// Reads the body of the record at `loc` from `file`, checking its length and checksum.
pub(crate) fn read_record(file: &File, loc: Loc) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER + loc.len as usize];
    file.read_exact_at(&mut buf, loc.off)?;
    let (len, crc) = header(&buf);
    let body = &buf[HEADER..];
    if len != loc.len || checksum(loc.seed, body) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "wal record at segment {:x} offset {} fails its checksum",
                loc.seq, loc.off
            ),
        ));
    }
    buf.drain(..HEADER);
    Ok(buf)
}

fn header(b: &[u8]) -> (u32, u32) {
    let mut len = [0u8; 4];
    let mut crc = [0u8; 4];
    len.copy_from_slice(&b[..4]);
    crc.copy_from_slice(&b[4..8]);
    (u32::from_le_bytes(len), u32::from_le_bytes(crc))
}

fn checksum(seed: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(body);
    h.finalize()
}

fn chain_seed(seq: u64) -> u32 {
    checksum(0x6665_7463, &seq.to_le_bytes())
}

/// Replays one segment; returns where its records end and the last checksum.
fn scan(
    file: &File,
    seq: u64,
    last: bool,
    replay: &mut impl FnMut(Loc, &[u8]) -> io::Result<()>,
) -> io::Result<(u64, u32)> {
    let size = file.metadata()?.len();
    let mut data = vec![0u8; usize::try_from(size).map_err(io::Error::other)?];
    file.read_exact_at(&mut data, 0)?;
    let mut off = 0usize;
    let mut chain = chain_seed(seq);
    loop {
        let rest = &data[off..];
        let (len, crc) = if rest.len() < HEADER {
            (0, 0)
        } else {
            header(rest)
        };
        if len == 0 {
            // The end of what was written, if nothing but zeros follows.
            if rest.iter().all(|&b| b == 0) {
                break;
            }
            let claimed_end = if rest.len() < HEADER {
                usize::MAX
            } else {
                data.len()
            };
            return torn(file, seq, last, &data, off, claimed_end, chain);
        }
        let end = off + HEADER + len as usize;
        if end > data.len() || checksum(chain, &data[off + HEADER..end]) != crc {
            return torn(file, seq, last, &data, off, end, chain);
        }
        let loc = Loc {
            seq,
            off: off as u64,
            len,
            seed: chain,
        };
        replay(loc, &data[off + HEADER..end])?;
        chain = crc;
        off = end;
    }
    Ok((off as u64, chain))
}

/// A record at `off`, claiming to end at `end`, that does not read back: the torn tail of the
/// last segment, or corruption. A torn tail is zero-filled again, so that the next recovery
/// stops at the same place whatever is written there next.
fn torn(
    file: &File,
    seq: u64,
    last: bool,
    data: &[u8],
    off: usize,
    end: usize,
    chain: u32,
) -> io::Result<(u64, u32)> {
    if !last || !is_torn(data, off, end) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt wal record in segment {seq:016x} at offset {off}"),
        ));
    }
    tracing::warn!(
        segment = format!("{seq:016x}"),
        offset = off,
        "wal ends with a record torn by a crash; truncating it"
    );
    write_zeros(file, off as u64, data.len() as u64)?;
    file.sync_data()?;
    Ok((off as u64, chain))
}

/// Whether a record at `off` claiming to end at `end` that fails its checks is one a crash cut
/// short: the file ends inside it, or a sector that starts inside it is still all zeros (never
/// written; segments are zero-filled before use). A disk persists a sector whole, so a record
/// within one sector is written whole or not at all.
fn is_torn(data: &[u8], off: usize, end: usize) -> bool {
    if end > data.len() {
        return true;
    }
    let first = (off / SECTOR + 1) * SECTOR;
    (first..end).step_by(SECTOR).any(|s| {
        data[s..(s + SECTOR).min(data.len())]
            .iter()
            .all(|&b| b == 0)
    })
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn dead_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal.dead"))
}

fn tmp_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal.tmp"))
}

/// Writes `<seq>.wal.tmp`: `size` bytes of zeros, synced.
fn prepare_segment(dir: &Path, seq: u64, size: u64) -> io::Result<()> {
    let path = tmp_path(dir, seq);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let zeroed = write_zeros_direct(&path, size);
    write_zeros(&file, zeroed, size)?;
    file.sync_all()
}

/// Writes zeros over the whole pages of `[0, size)` of the file at `path` around the page
/// cache, where its file system allows; returns how far it got (the caller writes the rest
/// through the cache). A buffered zero-fill copied each segment into the page cache and had
/// writeback write it out: 1.8 % of three members' CPU under the kube mix, and 16 MiB of page
/// cache per segment that other files could use (docs/benchmarks.md). Here the kernel sends
/// one zeroed buffer to the disk again and again.
fn write_zeros_direct(path: &Path, size: u64) -> u64 {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    else {
        return 0;
    };
    let mut mem = vec![0u8; ZERO_BLOCK + PAGE];
    let start = mem.as_ptr().align_offset(PAGE);
    let Some(zeros) = mem.get_mut(start..start + ZERO_BLOCK) else {
        return 0;
    };
    let end = size - size % PAGE as u64;
    let mut at = 0;
    while at < end {
        let n = (end - at).min(ZERO_BLOCK as u64) as usize;
        if file.write_all_at(&zeros[..n], at).is_err() {
            // Refused (alignment, a file system that takes O_DIRECT only at open): the page
            // cache takes it from here.
            return at;
        }
        at += n as u64;
    }
    at
}

/// Writes zeros over `[from, to)` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_BLOCK];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZERO_BLOCK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Opens segment `seq` for durable writes around the page cache; `None` where the file system
/// refuses `O_DIRECT` (the log then syncs with `fdatasync`).
fn open_direct(dir: &Path, seq: u64) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(segment_path(dir, seq))
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(error = %e, "the wal's file system refuses O_DIRECT; using fdatasync");
            None
        }
    }
}

/// Writes `tail` then `pending` at `at` (a multiple of [`PAGE`]) through `file`, opened with
/// `O_DIRECT | O_DSYNC`, padded with zeros to whole pages (the segment holds zeros after its
/// written end). Returns once the data is durable.
fn write_direct(
    file: &File,
    scratch: &mut Vec<u8>,
    at: u64,
    tail: &[u8],
    pending: &[u8],
) -> io::Result<()> {
    let used = tail.len() + pending.len();
    let len = used.div_ceil(PAGE) * PAGE;
    if scratch.len() < len + PAGE {
        scratch.resize(len + PAGE, 0);
    }
    let start = scratch.as_ptr().align_offset(PAGE);
    let buf = scratch
        .get_mut(start..start + len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cannot align a wal write"))?;
    buf[..tail.len()].copy_from_slice(tail);
    buf[tail.len()..used].copy_from_slice(pending);
    buf[used..].fill(0);
    file.write_all_at(buf, at)
}

fn open_segment(dir: &Path, seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(dir, seq))
}

/// Renames the prepared `<seq>.wal.tmp` to `<seq>.wal` durably.
fn activate_segment(dir: &Path, seq: u64) -> io::Result<()> {
    std::fs::rename(tmp_path(dir, seq), segment_path(dir, seq))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn read_lock(f: &Files) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<File>>> {
    f.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock(f: &Files) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<File>>> {
    f.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Whether `dir`'s file system takes `O_DIRECT` at all (tmpfs does not).
    fn takes_direct(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .is_ok()
    }

    fn reopen(dir: &Path, size: u64) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let mut bodies = Vec::new();
        let wal = Wal::open(dir, size, true, |_, b| {
            bodies.push(b.to_vec());
            Ok(())
        })?;
        Ok((wal, bodies))
    }

    /// A new segment is all zeros over its whole size, whatever file was left at its path, and
    /// its whole pages are written with `O_DIRECT` where the file system takes it.
    #[test]
    fn a_prepared_segment_is_zeros_to_its_size_written_around_the_cache_where_allowed() -> TestResult
    {
        let tmp = tempfile::TempDir::new()?;
        // Not a whole number of pages, nor of zero blocks.
        let size = (ZERO_BLOCK + ZERO_BLOCK / 2 + 100) as u64;
        // A leftover from an earlier attempt is replaced, not reused.
        std::fs::write(tmp_path(tmp.path(), 7), vec![0xffu8; 3 * ZERO_BLOCK])?;
        prepare_segment(tmp.path(), 7, size)?;
        let bytes = std::fs::read(tmp_path(tmp.path(), 7))?;
        assert_eq!(bytes.len() as u64, size);
        assert!(
            bytes.iter().all(|b| *b == 0),
            "a prepared segment holds zeros only"
        );
        let direct = write_zeros_direct(&tmp_path(tmp.path(), 7), size);
        if takes_direct(tmp.path()) {
            assert_eq!(
                direct,
                size - size % PAGE as u64,
                "whole pages go around the cache"
            );
        } else {
            assert_eq!(direct, 0);
        }
        Ok(())
    }

    /// Bytes this thread had read from the storage layer.
    fn thread_read_bytes() -> io::Result<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io")?;
        io.lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no read_bytes in /proc/thread-self/io"))
    }

    /// A buffered append writes through to the end of its last page, so that a page the page
    /// cache does not hold (a new segment is zero-filled around it) is not read from disk first.
    #[test]
    fn buffered_appends_to_a_new_segment_read_nothing_from_disk() -> TestResult {
        let tmp = tempfile::TempDir::new()?;
        let dir = tmp.path().join("wal");
        let (mut wal, _) = reopen(&dir, 1 << 20)?;
        // The new segment was zero-filled around the page cache: none of its pages is cached.
        let before = thread_read_bytes()?;
        // Records of 300 bytes: many end inside a page no write touched yet.
        for i in 0..64u8 {
            wal.push(&[i.max(1); 300])?;
            wal.flush(false)?;
        }
        wal.flush(true)?;
        assert_eq!(
            thread_read_bytes()? - before,
            0,
            "an append read a page from disk"
        );
        drop(wal);
        let (_, bodies) = reopen(&dir, 1 << 20)?;
        assert_eq!(bodies.len(), 64);
        assert!(bodies
            .iter()
            .enumerate()
            .all(|(i, b)| b == &[(i as u8).max(1); 300]));
        Ok(())
    }

    /// Records of every size, across page and segment boundaries, durable through direct
    /// writes, buffered ones and a mix, read back after each reopen. A durable write after a
    /// buffered one that no sync has covered yet must `fdatasync`, or the buffered records could
    /// be lost to a power cut although reported durable.
    #[test]
    fn direct_and_buffered_writes_read_back_and_a_buffered_write_is_synced_before_direct_ones(
    ) -> TestResult {
        let tmp = tempfile::TempDir::new()?;
        let dir = tmp.path().join("wal");
        let size = 64 * 1024;
        let direct = takes_direct(tmp.path());
        let mut rng = fastrand::Rng::with_seed(7);
        let mut want: Vec<Vec<u8>> = Vec::new();
        for round in 0..4 {
            let (mut wal, got) = reopen(&dir, size)?;
            assert_eq!(got, want, "round {round}: records after reopening");
            assert_eq!(
                wal.direct.is_some(),
                direct,
                "direct writes where the fs takes them"
            );
            for i in 0..60 {
                let len = match rng.usize(..4) {
                    0 => rng.usize(1..16),
                    1 => rng.usize(16..600),
                    2 => rng.usize(600..5000),
                    _ => PAGE - HEADER,
                };
                let body: Vec<u8> = (0..len).map(|_| rng.u8(1..)).collect();
                if wal.needs_rotation(body.len()) {
                    wal.rotate()?;
                }
                wal.push(&body)?;
                want.push(body);
                let before = wal.direct_writes;
                match (round + i) % 3 {
                    0 => {
                        wal.flush(false)?;
                        assert!(wal.dirty, "a buffered write waits for a sync");
                    }
                    _ => {
                        let was_dirty = wal.dirty;
                        wal.flush(true)?;
                        assert!(!wal.dirty);
                        let expect = u64::from(direct && !was_dirty);
                        assert_eq!(
                            wal.direct_writes - before,
                            expect,
                            "round {round} write {i}"
                        );
                    }
                }
            }
            wal.flush(true)?;
        }
        let (_, got) = reopen(&dir, size)?;
        assert_eq!(got, want);
        Ok(())
    }
}
