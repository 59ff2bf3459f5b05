//! A small persistent thread pool: `threads - 1` parked workers plus the
//! calling thread. Workers sleep on a condvar between jobs (after an optional
//! short spin), so two pools never burn each other's cores.
//!
//! `run(n, f)` calls `f(0..n)` across the threads and returns when all calls
//! are done, so `f` may borrow from the caller's stack. If the pool is busy
//! (another thread is inside `run`, or `run` is called from within a task) the
//! job runs inline on the caller instead of waiting or deadlocking.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type TaskFn = dyn Fn(usize) + Sync;

#[derive(Clone, Copy)]
struct Job {
    // Lifetime erased: only dereferenced after claiming a task of this job's
    // generation, and `run` does not return before every claimed task is done.
    f: *const TaskFn,
    n: usize,
}
unsafe impl Send for Job {}

struct State {
    generation: u32,
    job: Option<Job>,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    /// (generation << 32) | next task index.
    claim: AtomicU64,
    done: AtomicUsize,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    panicked: AtomicBool,
    spin: Duration,
}

/// See the module docs.
pub struct ThreadPool {
    inner: Arc<Inner>,
    run_lock: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
    threads: usize,
}

/// Default spin before a worker parks (and before the caller parks waiting
/// for workers): enough to catch the next layer's matmul without a futex
/// wake-up, short enough not to matter to whoever else needs the core.
/// Time-based: a `pause` costs ~10 to ~140 cycles depending on the CPU.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(30);

/// Spins until `done()` or `limit` elapsed; returns `done()`.
fn spin_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    if limit.is_zero() {
        return done();
    }
    let start = Instant::now();
    loop {
        for _ in 0..32 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return done();
        }
    }
}

impl ThreadPool {
    /// A pool using `threads` threads in total (the caller plus `threads - 1`
    /// workers). `threads` is clamped to at least 1.
    pub fn new(threads: usize) -> Self {
        Self::with_spin(threads, DEFAULT_SPIN)
    }

    /// Like [`ThreadPool::new`] with an explicit spin time (zero = park at once).
    pub fn with_spin(threads: usize, spin: Duration) -> Self {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            done_lock: Mutex::new(()),
            done_cv: Condvar::new(),
            panicked: AtomicBool::new(false),
            spin,
        });
        let handles = (1..threads)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("qmodel-kernel-{i}"))
                    .spawn(move || worker(&inner))
                    .expect("spawn kernel worker")
            })
            .collect();
        ThreadPool {
            inner,
            run_lock: Mutex::new(()),
            handles,
            threads,
        }
    }

    /// The process-wide pool: `QMODEL_THREADS` if set, else
    /// `std::thread::available_parallelism()`.
    pub fn global() -> &'static ThreadPool {
        static POOL: OnceLock<ThreadPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = std::env::var("QMODEL_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            ThreadPool::new(n)
        })
    }

    /// Total threads, caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i in 0..n_tasks`, returning when all are done.
    /// Panics (after all tasks finished) if a task panicked.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        let guard = if self.threads > 1 && n_tasks > 1 {
            self.run_lock.try_lock().ok()
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..n_tasks).for_each(f);
            return;
        };
        let inner = &*self.inner;
        // SAFETY: lifetime erasure; see `Job`.
        let job = Job {
            f: unsafe {
                std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const TaskFn>(f)
            },
            n: n_tasks,
        };
        assert!(n_tasks < u32::MAX as usize);
        let generation = {
            let mut st = inner.state.lock().unwrap();
            st.generation = st.generation.wrapping_add(1);
            st.job = Some(job);
            inner.done.store(0, Ordering::Relaxed);
            inner.panicked.store(false, Ordering::Relaxed);
            inner
                .claim
                .store((st.generation as u64) << 32, Ordering::Release);
            inner.wake.notify_all();
            st.generation
        };
        work(inner, generation, job);
        // Wait for tasks claimed by workers.
        if !spin_until(inner.spin, || inner.done.load(Ordering::Acquire) >= n_tasks) {
            let mut g = inner.done_lock.lock().unwrap();
            while inner.done.load(Ordering::Acquire) < n_tasks {
                g = inner.done_cv.wait(g).unwrap();
            }
        }
        inner.state.lock().unwrap().job = None;
        if inner.panicked.load(Ordering::Acquire) {
            panic!("a qmodel-kernels pool task panicked");
        }
    }
}

fn work(inner: &Inner, generation: u32, job: Job) {
    loop {
        let v = inner.claim.load(Ordering::Acquire);
        if (v >> 32) as u32 != generation || (v as u32) as usize >= job.n {
            return;
        }
        if inner
            .claim
            .compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        let i = (v as u32) as usize;
        // SAFETY: task `i` of this generation is claimed, so `run` is still
        // waiting for it and the closure is alive.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.f)(i) }));
        if r.is_err() {
            inner.panicked.store(true, Ordering::Release);
        }
        if inner.done.fetch_add(1, Ordering::AcqRel) + 1 == job.n {
            let _g = inner.done_lock.lock().unwrap();
            inner.done_cv.notify_all();
        }
    }
}

fn worker(inner: &Inner) {
    let mut seen = 0u32;
    loop {
        spin_until(inner.spin, || {
            (inner.claim.load(Ordering::Acquire) >> 32) as u32 != seen
        });
        let job = {
            let mut st = inner.state.lock().unwrap();
            while st.generation == seen && !st.shutdown {
                st = inner.wake.wait(st).unwrap();
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        if let Some(job) = job {
            work(inner, seen, job);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.inner.state.lock().unwrap().shutdown = true;
        self.inner.wake.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads)
            .finish()
    }
}
