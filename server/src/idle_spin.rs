//! `--idle-spin`: keep this process's CPUs awake for a moment after each request.
//!
//! A request's path has short idle gaps: the member waits for its log write (a disk trip or
//! two) and then for the client's next request. Where a virtual CPU with nothing to run halts at
//! once (hypervisors without guest halt polling, e.g. Firecracker with
//! `haltpoll.guest_halt_poll_ns=0`), each gap ends in a wake-up of the halted vCPU, tens of
//! microseconds each. Go's scheduler spins a little before it sleeps, so etcd pays less of
//! that; with this flag fetcd keeps one lowest-priority thread per CPU busy for the given time
//! after each request starts and ends, so the gaps end on a running vCPU. The threads run in
//! `SCHED_IDLE`: the scheduler preempts them as soon as anything else wants the CPU.
//!
//! They spin only while at most [`SPIN_MAX_IN_FLIGHT`] requests are being served: with more,
//! the CPUs have work between requests anyway, and spinners taking every short idle moment cost
//! the busy threads. Spinning regardless raised one member's CPU time per operation from 17 to
//! 31 µs under put-64 and from 121 to 202 µs under the kube mix; with the limit (and no wake-up
//! calls while the limit holds them off) it was 18 and 131 µs, against 18 and 136 µs off.
//!
//! They spin only for a client that sends its next request within the window of the last
//! answer (back to back, as one waiting on each answer does): a paced client's next request
//! comes after the window has run out, so spinning for it only burns CPU. Spinning regardless,
//! one member under a single client at 1000 puts/s had its p99 go from 0.41 to 0.88 ms and its
//! CPU time per put from 160 to 1000 µs, for the same p50 (docs/benchmarks.md).
//!
//! It costs CPU time the machine would otherwise leave idle (and, in a container with a CPU
//! limit, quota), which is why it is off by default. The threads are the process's (one set,
//! however many servers a process embeds); with no requests they sleep.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::task::Context;
use std::task::Poll;
use std::thread::Thread;
use std::time::Duration;
use std::time::Instant;

use futures::future::Either;

/// The spinners, once started (by the first server with `--idle-spin` above zero).
static SPINNER: OnceLock<Spinner> = OnceLock::new();

/// The most requests in flight at which the spinners spin (a client waiting on each answer).
pub const SPIN_MAX_IN_FLIGHT: usize = 1;

/// Short gaps in a row that make a client back to back: a paced client's gap is short now and
/// then (a late request), and one such gap must not start the spinners.
const BACK_TO_BACK: usize = 4;

/// How long a spinner kept off by the requests in flight waits before it looks again.
const BUSY_RECHECK: Duration = Duration::from_millis(5);

/// How long a sleeping spinner waits before looking at the deadline again if a wake-up was
/// missed (cannot happen with the protocol below; a bound, not a tick).
const SLEEP_BOUND: Duration = Duration::from_secs(1);

struct Spinner {
    start: Instant,
    window_us: u64,
    /// Spin until this many microseconds after `start`.
    deadline: AtomicU64,
    /// Spinners asleep or about to be (they look at the deadline again after saying so).
    sleeping: AtomicUsize,
    /// Requests being served (counted by [`IdleSpin`]).
    in_flight: AtomicUsize,
    /// Spinners spinning now.
    spinning: AtomicUsize,
    /// When the last request in flight was answered (microseconds after `start`).
    last_answer: AtomicU64,
    /// Requests in a row that found none in flight and arrived within the window of the
    /// answer before them (at most [`BACK_TO_BACK`]).
    short_gaps: AtomicUsize,
    threads: OnceLock<Vec<Thread>>,
}

impl Spinner {
    /// Whether requests come back to back: the last [`BACK_TO_BACK`] requests to find none in
    /// flight each arrived within the window of the answer before it. Only then do requests
    /// touch the spinners.
    fn back_to_back(&self) -> bool {
        self.short_gaps.load(Ordering::SeqCst) >= BACK_TO_BACK
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        let now = self.now_us();
        let until = now.saturating_add(self.window_us);
        let old = self.deadline.load(Ordering::SeqCst);
        // Moving the deadline by less than a tenth of the window is not worth a shared write.
        if until <= old.saturating_add(self.window_us / 10) {
            return;
        }
        let old = self.deadline.fetch_max(until, Ordering::SeqCst);
        // Only spinners idle since the deadline passed are woken: a wake-up is a system call
        // on the request's path, so one per quiet period, not one per request.
        if old < now && self.sleeping.load(Ordering::SeqCst) > 0 {
            for t in self.threads.get().into_iter().flatten() {
                t.unpark();
            }
        }
    }

    fn run(&self) {
        loop {
            let now = self.now_us();
            if now >= self.deadline.load(Ordering::SeqCst) {
                self.sleeping.fetch_add(1, Ordering::SeqCst);
                // A touch that saw no sleeper moved the deadline before this load.
                if self.now_us() >= self.deadline.load(Ordering::SeqCst) {
                    std::thread::park_timeout(SLEEP_BOUND);
                }
                self.sleeping.fetch_sub(1, Ordering::SeqCst);
            } else if self.in_flight.load(Ordering::SeqCst) > SPIN_MAX_IN_FLIGHT {
                // Busy: look again later rather than be woken as the count changes.
                std::thread::park_timeout(BUSY_RECHECK);
            } else {
                self.spinning.fetch_add(1, Ordering::SeqCst);
                while self.now_us() < self.deadline.load(Ordering::SeqCst)
                    && self.in_flight.load(Ordering::SeqCst) <= SPIN_MAX_IN_FLIGHT
                {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                }
                self.spinning.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Starts the spinners with `window` (nothing if zero, or if they already run: the first
/// window stays). One thread per CPU this process may run on, each pinned to its CPU.
pub fn start(window: Duration) {
    if window.is_zero() {
        return;
    }
    let mut started = false;
    let spinner = SPINNER.get_or_init(|| {
        started = true;
        Spinner {
            start: Instant::now(),
            window_us: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            deadline: AtomicU64::new(0),
            sleeping: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            spinning: AtomicUsize::new(0),
            last_answer: AtomicU64::new(0),
            short_gaps: AtomicUsize::new(0),
            threads: OnceLock::new(),
        }
    });
    if !started {
        return;
    }
    let cpus: Vec<usize> = match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "idle spin: cannot read this process's CPUs; not spinning");
            return;
        }
    };
    let mut threads = Vec::new();
    for cpu in cpus {
        let spawned = std::thread::Builder::new()
            .name(format!("fetcd-spin-{cpu}"))
            .spawn(move || {
                let mut set = rustix::thread::CpuSet::new();
                set.set(cpu);
                if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                    tracing::debug!(error = %e, cpu, "idle spin: pinning");
                }
                if let Err(e) = lowest_priority() {
                    // At normal priority it would compete with the server's own threads.
                    tracing::warn!(error = %e, "idle spin: cannot lower this thread's priority");
                    return;
                }
                if let Some(s) = SPINNER.get() {
                    s.run();
                }
            });
        match spawned {
            Ok(h) => threads.push(h.thread().clone()),
            Err(e) => tracing::warn!(error = %e, "idle spin: cannot start a thread"),
        }
    }
    tracing::info!(
        threads = threads.len(),
        window_us = spinner.window_us,
        "idle spin on"
    );
    let _ = spinner.threads.set(threads);
}

/// Puts the calling thread in `SCHED_IDLE`, which any other thread preempts when it wakes; nice
/// 19 where that policy is refused. At nice 19 the spinners stood in the way of woken threads
/// more: one member's watch-latency p99 was 2.02 ms with them against 1.33 ms without; in
/// `SCHED_IDLE`, 1.49 against 1.27 ms (medians of 5 rounds, each pair in one run).
fn lowest_priority() -> std::io::Result<()> {
    use thread_priority::NormalThreadSchedulePolicy;
    use thread_priority::ThreadPriority;
    use thread_priority::ThreadSchedulePolicy;
    let idle = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    if let Err(e) = idle {
        tracing::debug!(error = ?e, "idle spin: SCHED_IDLE refused; nice 19");
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19)?;
    }
    Ok(())
}

/// One request in flight, from its arrival until its answer is ready or it is dropped (a
/// client that went away must not keep the count up).
struct InFlight(&'static Spinner);

impl InFlight {
    fn arrive(s: &'static Spinner) -> Self {
        if s.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            let gap = s
                .now_us()
                .saturating_sub(s.last_answer.load(Ordering::SeqCst));
            // Only the request that found none in flight gets here: a load and a store suffice.
            let short = if gap < s.window_us {
                (s.short_gaps.load(Ordering::SeqCst) + 1).min(BACK_TO_BACK)
            } else {
                0
            };
            s.short_gaps.store(short, Ordering::SeqCst);
        }
        if s.back_to_back() {
            s.touch();
        }
        InFlight(s)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = self.0;
        if s.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            s.last_answer.store(s.now_us(), Ordering::SeqCst);
        }
        if s.back_to_back() {
            s.touch();
        }
    }
}

/// Counts requests in flight and touches the spinners when one arrives and when its answer is
/// ready (for a stream, when its response starts).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdleSpinLayer;

impl<S> tower::Layer<S> for IdleSpinLayer {
    type Service = IdleSpin<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleSpin { inner }
    }
}

/// See [`IdleSpinLayer`].
#[derive(Clone, Debug)]
pub struct IdleSpin<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, R> tower::Service<R> for IdleSpin<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    /// The inner future as it is when the spinners are off (no allocation then).
    type Future = Either<S::Future, BoxFuture<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let Some(spinner) = SPINNER.get() else {
            return Either::Left(self.inner.call(req));
        };
        let in_flight = InFlight::arrive(spinner);
        let answer = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let r = answer.await;
            drop(in_flight);
            r
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to 20 s for `f`: the spinners run in `SCHED_IDLE`, and with two busy threads
    /// on a two-CPU machine this whole test took up to 2.7 s.
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn spinners_spin_after_activity_for_back_to_back_requests_with_few_in_flight() {
        start(Duration::from_millis(100));
        let s = SPINNER.get().expect("started");
        let threads = s.threads.get().map_or(0, Vec::len);
        assert!(threads >= 1, "no spinner thread started");
        let spinning = || s.spinning.load(Ordering::SeqCst);
        eventually("idle spinners sleep", || {
            s.sleeping.load(Ordering::SeqCst) == threads
        });
        assert_eq!(spinning(), 0);
        // A touch wakes them: they spin until the window has passed, then sleep again.
        // (Touched again while waiting: a spinner may get its CPU only after the window.)
        eventually("a touch makes them spin", || {
            s.touch();
            spinning() > 0
        });
        eventually("they stop after the window", || {
            s.sleeping.load(Ordering::SeqCst) == threads
        });
        assert_eq!(spinning(), 0);

        // A paced client: each request comes after the window of the last answer has run out.
        // Its requests move no deadline, so nobody spins for it.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(110));
            let before = s.deadline.load(Ordering::SeqCst);
            let request = InFlight::arrive(s);
            drop(request);
            assert_eq!(
                s.deadline.load(Ordering::SeqCst),
                before,
                "a paced request touched"
            );
            assert!(!s.back_to_back());
        }
        assert_eq!(spinning(), 0);

        // Back to back: the next requests come at once; once BACK_TO_BACK have, requests touch.
        for _ in 1..BACK_TO_BACK {
            let before = s.deadline.load(Ordering::SeqCst);
            drop(InFlight::arrive(s));
            assert_eq!(
                s.deadline.load(Ordering::SeqCst),
                before,
                "touched too early"
            );
        }
        let next = InFlight::arrive(s);
        assert!(s.back_to_back());
        assert!(
            s.deadline.load(Ordering::SeqCst) > s.now_us(),
            "no window after a touch"
        );
        eventually("back-to-back requests make them spin", || {
            s.touch();
            spinning() > 0
        });

        // Two requests in flight: nobody spins; once one is answered, they do.
        let second = InFlight::arrive(s);
        eventually("two in flight stop them", || spinning() == 0);
        for _ in 0..10 {
            s.touch();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(spinning(), 0, "spinning with two requests in flight");
        }
        drop(second);
        eventually("one answered makes them spin", || {
            s.touch();
            spinning() > 0
        });
        drop(next);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 0);
    }
}
