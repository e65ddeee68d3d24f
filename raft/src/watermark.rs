//! A position in the log that tasks wait to see pass: how far it is durable, how far applied.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

/// One past the highest log index something reached, and the tasks waiting for it to pass an
/// index. Cheaper to wait on than openraft's metrics, which a waiter clones on every change of
/// any metric.
#[derive(Debug, Default)]
pub struct Watermark {
    end: AtomicU64,
    closed: AtomicBool,
    changed: tokio::sync::Notify,
}

/// The watermark will not move again (its log failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl Watermark {
    /// A watermark at `end`.
    pub fn new(end: u64) -> Self {
        Self {
            end: AtomicU64::new(end),
            ..Default::default()
        }
    }

    /// One past the highest index reached.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Moves the watermark to `end` (down as well: a truncated log) and wakes the waiters.
    pub fn set(&self, end: u64) {
        self.end.store(end, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Fails the waiters, now and later.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once `index` is below the watermark.
    pub async fn wait_past(&self, index: u64) -> Result<(), Closed> {
        // The usual case, on every apply and AppendEntries: already past, and no waiter needs
        // registering (that takes the `Notify`'s lock).
        if self.end() > index && !self.is_closed() {
            return Ok(());
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_closed() {
                return Err(Closed);
            }
            if self.end() > index {
                return Ok(());
            }
            changed.await;
        }
    }
}
