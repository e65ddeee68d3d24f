//! Large files written and removed beside the Raft log without holding its writes up.
//!
//! A member writes whole copies of its store now and then: a Raft snapshot every
//! `--snapshot-count` entries, a copy for `etcdctl snapshot save`. Written through the page cache
//! and synced once at the end, such a file reached the disk in one burst, and the Raft log's next
//! durable write waited behind it; renamed over (or deleted) at once, its blocks were freed in
//! one go, which on ext4 mounted with `discard` took 10–29 ms, and the log's writes waited for
//! that too. One member under a paced single client, building a 65 MB snapshot every second:
//! log writes of 10–34 ms against 0.1–0.2 ms, and watch-latency's p99 from 1.3 to 25–66 ms
//! (docs/benchmarks.md). [`WriteBehind`] and [`remove_gradually`] do both a few megabytes at a
//! time.

use std::fs::File;
use std::io;
use std::io::Write;
use std::num::NonZeroU64;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes written between two syncs of a [`WriteBehind`] file: a log write that arrives during a
/// sync waits for this much at most (one such sync took about 1 ms on this project's machine).
pub const SYNC_EVERY: u64 = 1 << 20;

/// Bytes [`remove_gradually`] gives back to the file system at a time.
pub const RELEASE_STEP: u64 = 4 << 20;

/// A file synced every [`SYNC_EVERY`] bytes as it is written, each synced part dropped from the
/// page cache: a copy of the store has no business pushing the store's own pages out of it (and,
/// in a container, counting against its memory).
#[derive(Debug)]
pub struct WriteBehind {
    file: File,
    written: u64,
    synced: u64,
}

impl WriteBehind {
    /// Writes to `file` from its current position.
    pub fn new(file: File) -> Self {
        WriteBehind {
            file,
            written: 0,
            synced: 0,
        }
    }

    /// Syncs what is left and gives the file back.
    pub fn finish(mut self) -> io::Result<File> {
        self.sync()?;
        Ok(self.file)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        // Advice only: where it is ignored the pages stay cached, nothing else changes.
        let _ = rustix::fs::fadvise(
            &self.file,
            self.synced,
            NonZeroU64::new(self.written - self.synced),
            rustix::fs::Advice::DontNeed,
        );
        self.synced = self.written;
        Ok(())
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.synced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Removes the file at `path`, first shrinking it [`RELEASE_STEP`] bytes at a time, each step
/// synced, so that its blocks are freed (and trimmed) a few at a time. The data is left alone,
/// and the file only unlinked, where another may still read it: if `path` is another name of
/// `keep`'s file, or the file is open elsewhere in this process (a snapshot being sent to a
/// follower keeps reading the file it opened; the kernel frees it when that one closes). A
/// missing file is no error.
pub fn remove_gradually(path: &Path, keep: Option<&Path>) -> io::Result<()> {
    let file = match File::options().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let id = (meta.dev(), meta.ino());
    let shared = keep.is_some_and(|k| std::fs::metadata(k).is_ok_and(|k| (k.dev(), k.ino()) == id));
    // Our own handle is one of the opens.
    if !shared && open_handles(id) == Some(1) {
        let mut len = meta.len();
        while len > 0 {
            len = len.saturating_sub(RELEASE_STEP);
            file.set_len(len)?;
            file.sync_all()?;
        }
    }
    drop(file);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// How many of this process's file descriptors refer to the file `id` (device, inode); `None`
/// where `/proc/self/fd` cannot be read.
fn open_handles(id: (u64, u64)) -> Option<usize> {
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        fds.flatten()
            .filter(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == id))
            .count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn a_file_written_behind_holds_every_byte_across_its_syncs() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("copy");
        let mut w = WriteBehind::new(File::create(&path)?);
        let chunk: Vec<u8> = (0..=255u8).cycle().take(100_003).collect();
        let mut expected = Vec::new();
        // Enough to pass several syncs, in writes that straddle their boundaries.
        while (expected.len() as u64) < 3 * SYNC_EVERY + 12_345 {
            w.write_all(&chunk)?;
            expected.extend_from_slice(&chunk);
        }
        assert!(
            w.synced >= 2 * SYNC_EVERY,
            "it synced on the way: {}",
            w.synced
        );
        assert!(w.written - w.synced < SYNC_EVERY);
        let file = w.finish()?;
        drop(file);
        let mut got = Vec::new();
        File::open(&path)?.read_to_end(&mut got)?;
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the file holds what was written, in order");
        Ok(())
    }

    #[test]
    fn removing_gradually_takes_the_file_away_but_never_the_kept_one() -> TestResult {
        let dir = tempfile::tempdir()?;
        let old = dir.path().join("old");
        std::fs::write(&old, vec![7u8; (2 * RELEASE_STEP + 5) as usize])?;
        let keep = dir.path().join("keep");
        std::fs::write(&keep, b"current")?;
        remove_gradually(&old, Some(&keep))?;
        assert!(!old.exists());
        assert_eq!(std::fs::read(&keep)?, b"current");

        // A second name of the kept file: unlinked, the data untouched.
        let alias = dir.path().join("alias");
        std::fs::hard_link(&keep, &alias)?;
        remove_gradually(&alias, Some(&keep))?;
        assert!(!alias.exists());
        assert_eq!(std::fs::read(&keep)?, b"current");

        // Open elsewhere: unlinked, and the reader still reads all of it.
        let busy = dir.path().join("busy");
        let data: Vec<u8> = (0..=255u8)
            .cycle()
            .take((RELEASE_STEP + 99) as usize)
            .collect();
        std::fs::write(&busy, &data)?;
        let mut reader = File::open(&busy)?;
        remove_gradually(&busy, Some(&keep))?;
        assert!(!busy.exists());
        let mut got = Vec::new();
        reader.read_to_end(&mut got)?;
        assert!(got == data, "an open reader lost data: {} bytes", got.len());

        // Nothing there: nothing to do.
        remove_gradually(&dir.path().join("missing"), None)?;
        Ok(())
    }
}
