//! Dynamic batching. Knows nothing of HTTP or tensors: it takes tokenized inputs, each with the
//! kind of work asked of it (`K`: pooled vectors, token vectors, logits), groups them into
//! batches of one kind and runs a batch function on one worker thread, off the async runtime.
//!
//! Admission is bounded: a request first takes an [`Admission`] (one of
//! `max_concurrent_requests`); when none is left the caller answers "overloaded" at once instead
//! of letting the queue grow. Each input of an admitted request is a queue entry. The worker
//! takes everything waiting, sorts it by token count, cuts batches of equal-length inputs (no
//! padding, see [`plan_batches`]) within a token budget and a size cap, skips entries whose
//! requester is gone, runs the batches and sends each result back on its request's channel.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::backend::{Encoding, error_line};
use crate::metrics::Metrics;

/// Runs one batch of one kind of work; returns one output per input, in order. Called only on
/// the worker thread.
pub type RunBatch<K, O> = Box<dyn Fn(K, &[Encoding]) -> anyhow::Result<Vec<O>> + Send>;

#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Budget of padded tokens (longest input x inputs) per batch.
    pub max_batch_tokens: usize,
    /// Most inputs per batch.
    pub max_batch_requests: usize,
    /// Most requests admitted at once (queued or computing).
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("model is overloaded: {0} requests in flight")]
    Overloaded(usize),
    #[error("server is shutting down")]
    Closed,
    #[error("inference failed: {0}")]
    Backend(String),
}

/// The right to submit one request; held until its results are delivered or it is dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

type Reply<O> = mpsc::UnboundedSender<(usize, Result<O, QueueError>)>;

struct Entry<K, O> {
    /// Position of this input in its request.
    index: usize,
    kind: K,
    encoding: Encoding,
    enqueued: Instant,
    reply: Reply<O>,
}

impl<K, O> Entry<K, O> {
    /// The requester dropped its [`Ticket`]: client gone, timed out, or another input failed.
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

struct State<K, O> {
    pending: Vec<Entry<K, O>>,
    closed: bool,
}

struct Shared<K, O> {
    state: Mutex<State<K, O>>,
    wakeup: Condvar,
}

pub struct Queue<K, O> {
    shared: Arc<Shared<K, O>>,
    admissions: Arc<Semaphore>,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// The pending results of one submitted request.
pub struct Ticket<O> {
    results: mpsc::UnboundedReceiver<(usize, Result<O, QueueError>)>,
    count: usize,
    _admission: Admission,
}

impl<O> Ticket<O> {
    /// Waits for every input's output, in input order; the first failure wins. Dropping the
    /// ticket (or this future) cancels the inputs that have not been computed yet.
    pub async fn results(mut self) -> Result<Vec<O>, QueueError> {
        let mut outputs: Vec<Option<O>> = (0..self.count).map(|_| None).collect();
        for _ in 0..self.count {
            // `None`: the worker is gone with entries of ours, which only a crash can do.
            let (index, output) = self.results.recv().await.ok_or(QueueError::Closed)?;
            outputs[index] = Some(output?);
        }
        Ok(outputs
            .into_iter()
            .map(|o| o.expect("each index is answered once"))
            .collect())
    }
}

impl<K: Copy + Ord + Send + 'static, O: Send + 'static> Queue<K, O> {
    pub fn start(run: RunBatch<K, O>, limits: QueueLimits, metrics: Arc<Metrics>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                closed: false,
            }),
            wakeup: Condvar::new(),
        });
        let worker = {
            let shared = shared.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("qmodel-batcher".into())
                .spawn(move || work(&shared, &run, limits, &metrics))
                .expect("spawning the batching thread")
        };
        Self {
            shared,
            admissions: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            limits,
            metrics,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Takes one admission, or says at once that there is none left.
    pub fn try_admit(&self) -> Result<Admission, QueueError> {
        self.admissions
            .clone()
            .try_acquire_owned()
            .map(|permit| Admission { _permit: permit })
            .map_err(|_| QueueError::Overloaded(self.limits.max_concurrent_requests))
    }

    /// Queues the inputs of one admitted request, all for the same kind of work.
    pub fn submit(
        &self,
        admission: Admission,
        kind: K,
        encodings: Vec<Encoding>,
    ) -> Result<Ticket<O>, QueueError> {
        let (reply, results) = mpsc::unbounded_channel();
        let count = encodings.len();
        let enqueued = Instant::now();
        {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(QueueError::Closed);
            }
            state
                .pending
                .extend(
                    encodings
                        .into_iter()
                        .enumerate()
                        .map(|(index, encoding)| Entry {
                            index,
                            kind,
                            encoding,
                            enqueued,
                            reply: reply.clone(),
                        }),
                );
        }
        self.metrics.queue_depth.add(count as i64);
        self.shared.wakeup.notify_one();
        Ok(Ticket {
            results,
            count,
            _admission: admission,
        })
    }

    /// Whether the worker thread is alive (it only stops after [`Queue::shutdown`]).
    pub fn is_running(&self) -> bool {
        lock(&self.worker)
            .as_ref()
            .is_some_and(|worker| !worker.is_finished())
    }

    /// Refuses new work, lets the worker finish everything already queued, and joins it.
    pub fn shutdown(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.wakeup.notify_one();
        if let Some(worker) = lock(&self.worker).take() {
            // The worker catches backend panics, so joining only fails on a bug of ours.
            if worker.join().is_err() {
                tracing::error!("the batching thread panicked");
            }
        }
    }
}

impl<K, O> Drop for Queue<K, O> {
    fn drop(&mut self) {
        // Without this the worker would wait on the condvar forever.
        lock(&self.shared.state).closed = true;
        self.shared.wakeup.notify_one();
    }
}

/// A poisoned lock only means another thread panicked while holding it; the queue's state is
/// a plain list that stays consistent, so keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn work<K: Copy + Ord, O>(
    shared: &Shared<K, O>,
    run: &RunBatch<K, O>,
    limits: QueueLimits,
    metrics: &Metrics,
) {
    loop {
        let mut round = {
            let mut state = lock(&shared.state);
            while state.pending.is_empty() && !state.closed {
                state = shared
                    .wakeup
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.pending.is_empty() {
                return; // closed and drained
            }
            std::mem::take(&mut state.pending)
        };
        // Stable: equal kinds and lengths keep arrival order.
        round.sort_by_key(|entry| (entry.kind, entry.encoding.len()));
        let sizes = plan_batches(
            round.iter().map(|entry| (entry.kind, entry.encoding.len())),
            limits.max_batch_tokens,
            limits.max_batch_requests,
        );
        let mut entries = round.into_iter();
        for size in sizes {
            // Checked per batch, not per round: a round can take a while.
            let (live, gone): (Vec<_>, Vec<_>) =
                entries.by_ref().take(size).partition(|e| !e.abandoned());
            metrics.queue_depth.sub((live.len() + gone.len()) as i64);
            metrics.cancelled_inputs.inc_by(gone.len() as u64);
            if !live.is_empty() {
                run_batch(live, run, metrics);
            }
        }
    }
}

fn run_batch<K: Copy, O>(batch: Vec<Entry<K, O>>, run: &RunBatch<K, O>, metrics: &Metrics) {
    let kind = batch[0].kind;
    let started = Instant::now();
    for entry in &batch {
        metrics
            .queue_duration
            .observe((started - entry.enqueued).as_secs_f64());
    }
    let longest = batch.iter().map(|e| e.encoding.len()).max().unwrap_or(0);
    metrics.batch_size.observe(batch.len() as f64);
    metrics.batch_tokens.observe((longest * batch.len()) as f64);

    let (meta, encodings): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|e| ((e.index, e.reply), e.encoding))
        .unzip();
    // A panicking backend fails its batch, not the server.
    let outcome = match catch_unwind(AssertUnwindSafe(|| run(kind, &encodings))) {
        Ok(Ok(outputs)) if outputs.len() == encodings.len() => Ok(outputs),
        Ok(Ok(outputs)) => Err(format!(
            "backend returned {} outputs for {} inputs",
            outputs.len(),
            encodings.len()
        )),
        Ok(Err(e)) => Err(error_line(&e)),
        Err(_) => Err("backend panicked".to_owned()),
    };
    metrics
        .inference_duration
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(outputs) => {
            for ((index, reply), output) in meta.into_iter().zip(outputs) {
                // A send fails only when the requester is gone; nothing to do then.
                let _ = reply.send((index, Ok(output)));
            }
        }
        Err(message) => {
            tracing::error!(%message, inputs = encodings.len(), "batch failed");
            for (index, reply) in meta {
                let _ = reply.send((index, Err(QueueError::Backend(message.clone()))));
            }
        }
    }
}

/// Cuts inputs, already sorted by kind and ascending length, into consecutive batches of inputs
/// of one kind and one length: each holds at most `max_requests` inputs and at most
/// `max_tokens` tokens, and at least one input even if that one alone is over budget.
///
/// Equal lengths mean no padding at all, which is what makes results batch-invariant bit for
/// bit: padding changes the float reduction order over the sequence axis (~1e-7 in f32), and
/// int8 activation quantization turns such differences into rounding flips (~2e-3).
fn plan_batches<K: PartialEq>(
    sorted: impl IntoIterator<Item = (K, usize)>,
    max_tokens: usize,
    max_requests: usize,
) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut current = 0;
    let mut current_key = None;
    for (kind, len) in sorted {
        let full = current + 1 > max_requests || (current + 1) * len > max_tokens;
        let key = Some((kind, len));
        if current > 0 && (key != current_key || full) {
            sizes.push(current);
            current = 0;
        }
        current += 1;
        current_key = key;
    }
    if current > 0 {
        sizes.push(current);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use super::*;

    fn encoding(len: usize, tag: u32) -> Encoding {
        Encoding {
            ids: vec![tag; len],
            type_ids: vec![0; len],
        }
    }

    /// (tag, length) of each input of each batch the model ran.
    type Batches = Arc<Mutex<Vec<Vec<(u32, usize)>>>>;

    /// A deterministic stand-in for a model: output = (tag, length); records every batch.
    fn recording(batches: Batches) -> RunBatch<(), (u32, usize)> {
        Box::new(move |(), batch: &[Encoding]| {
            let outputs: Vec<_> = batch.iter().map(|e| (e.ids[0], e.len())).collect();
            batches.lock().unwrap().push(outputs.clone());
            Ok(outputs)
        })
    }

    /// A recording queue whose worker is held inside a first batch (tag 0, returned as the
    /// ticket) until the sender is used, so that what is submitted meanwhile forms one round.
    fn held_queue(limits: QueueLimits, metrics: Arc<Metrics>) -> Held {
        let batches = Batches::default();
        let (release, gate) = std_mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let record = recording(batches.clone());
        let run: RunBatch<(), (u32, usize)> = Box::new(move |(), batch| {
            if batch[0].ids[0] == 0 {
                gate.lock().unwrap().recv().unwrap();
            }
            record((), batch)
        });
        let queue = Queue::start(run, limits, metrics);
        let first = submit(&queue, vec![encoding(1, 0)]);
        while !lock(&queue.shared.state).pending.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Held {
            queue,
            batches,
            first,
            release,
        }
    }

    struct Held {
        queue: Queue<(), (u32, usize)>,
        batches: Batches,
        first: Ticket<(u32, usize)>,
        release: std_mpsc::Sender<()>,
    }

    fn limits(max_batch_tokens: usize, max_batch_requests: usize) -> QueueLimits {
        QueueLimits {
            max_batch_tokens,
            max_batch_requests,
            max_concurrent_requests: 64,
        }
    }

    fn submit<O: Send + 'static>(queue: &Queue<(), O>, encodings: Vec<Encoding>) -> Ticket<O> {
        queue
            .submit(queue.try_admit().unwrap(), (), encodings)
            .unwrap()
    }

    fn plan<const N: usize>(
        lens: [usize; N],
        max_tokens: usize,
        max_requests: usize,
    ) -> Vec<usize> {
        plan_batches(lens.map(|len| ((), len)), max_tokens, max_requests)
    }

    #[test]
    fn plans_batches_by_padded_tokens_and_count() {
        assert_eq!(plan([3, 3, 3, 3, 3], 100, 2), vec![2, 2, 1]);
        // Lengths never mix; 3 x 10 = 30 fits the budget, a fourth 10 would not.
        assert_eq!(plan([5, 10, 10, 10, 10, 30], 30, 100), vec![1, 3, 1, 1]);
        assert_eq!(plan([1, 2, 3], 100, 100), vec![1, 1, 1]);
        // One input over budget still runs, alone.
        assert_eq!(plan([50], 30, 100), vec![1]);
        assert_eq!(plan([], 30, 100), Vec::<usize>::new());
        // Kinds never mix either, even at equal lengths.
        assert_eq!(plan_batches([(0, 4), (0, 4), (1, 4)], 100, 100), vec![2, 1]);
    }

    #[tokio::test]
    async fn answers_each_request_in_input_order_from_length_sorted_batches() {
        let Held {
            queue,
            batches,
            first,
            release,
        } = held_queue(limits(40, 2), Arc::new(Metrics::new()));
        let a = submit(&queue, vec![encoding(9, 1), encoding(2, 1), encoding(5, 1)]);
        let b = submit(&queue, vec![encoding(2, 2), encoding(9, 2), encoding(2, 2)]);
        release.send(()).unwrap();

        assert_eq!(first.results().await.unwrap(), vec![(0, 1)]);
        assert_eq!(a.results().await.unwrap(), vec![(1, 9), (1, 2), (1, 5)]);
        assert_eq!(b.results().await.unwrap(), vec![(2, 2), (2, 9), (2, 2)]);
        // Round two, sorted by length (arrival order among equals), one length per batch,
        // at most 2 per batch.
        assert_eq!(
            *batches.lock().unwrap(),
            vec![
                vec![(0, 1)],
                vec![(1, 2), (2, 2)],
                vec![(2, 2)],
                vec![(1, 5)],
                vec![(1, 9), (2, 9)],
            ]
        );
        queue.shutdown();
    }

    #[tokio::test]
    async fn refuses_admission_beyond_the_bound() {
        let queue = Queue::start(
            recording(Default::default()),
            QueueLimits {
                max_concurrent_requests: 2,
                ..limits(100, 10)
            },
            Arc::new(Metrics::new()),
        );
        let a = queue.try_admit().unwrap();
        let _b = queue.try_admit().unwrap();
        assert_eq!(queue.try_admit().err(), Some(QueueError::Overloaded(2)));
        // The admission lives as long as the ticket; finishing it frees the slot.
        let ticket = queue.submit(a, (), vec![encoding(2, 7)]).unwrap();
        assert!(queue.try_admit().is_err());
        ticket.results().await.unwrap();
        assert!(queue.try_admit().is_ok());
        queue.shutdown();
    }

    #[tokio::test]
    async fn skips_inputs_of_requests_that_went_away() {
        let metrics = Arc::new(Metrics::new());
        let Held {
            queue,
            batches,
            first,
            release,
        } = held_queue(limits(100, 10), metrics.clone());
        let gone = submit(&queue, vec![encoding(4, 1), encoding(4, 1)]);
        let kept = submit(&queue, vec![encoding(4, 2)]);
        drop(gone);
        release.send(()).unwrap();
        first.results().await.unwrap();
        assert_eq!(kept.results().await.unwrap(), vec![(2, 4)]);
        let tags: Vec<u32> = batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|t| t.0)
            .collect();
        assert_eq!(tags, vec![0, 2]);
        assert_eq!(metrics.cancelled_inputs.get(), 2);
        assert_eq!(metrics.queue_depth.get(), 0);
        queue.shutdown();
    }

    #[tokio::test]
    async fn a_failing_or_panicking_backend_fails_its_batch_and_the_worker_lives_on() {
        let run: RunBatch<(), u32> = Box::new(|(), batch: &[Encoding]| match batch[0].ids[0] {
            1 => anyhow::bail!("out of memory"),
            2 => panic!("kernel bug"),
            3 => Ok(vec![]),
            _ => Ok(batch.iter().map(|e| e.ids[0]).collect()),
        });
        let queue = Queue::start(run, limits(100, 10), Arc::new(Metrics::new()));
        let failed = submit(&queue, vec![encoding(1, 1)]).results().await;
        assert_eq!(failed, Err(QueueError::Backend("out of memory".into())));
        let panicked = submit(&queue, vec![encoding(2, 2)]).results().await;
        assert_eq!(
            panicked,
            Err(QueueError::Backend("backend panicked".into()))
        );
        let short = submit(&queue, vec![encoding(3, 3)]).results().await;
        assert!(matches!(short, Err(QueueError::Backend(m)) if m.contains("0 outputs for 1")));
        assert!(queue.is_running());
        assert_eq!(
            submit(&queue, vec![encoding(4, 9)]).results().await,
            Ok(vec![9])
        );
        queue.shutdown();
    }

    #[tokio::test]
    async fn shutdown_finishes_what_was_queued_then_refuses() {
        let run: RunBatch<(), u32> = Box::new(|(), batch: &[Encoding]| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(batch.iter().map(|e| e.ids[0]).collect())
        });
        let queue = Queue::start(run, limits(4, 1), Arc::new(Metrics::new()));
        let tickets: Vec<_> = (0..5)
            .map(|tag| submit(&queue, vec![encoding(2, tag)]))
            .collect();
        queue.shutdown();
        assert!(!queue.is_running());
        for (tag, ticket) in tickets.into_iter().enumerate() {
            assert_eq!(ticket.results().await, Ok(vec![tag as u32]));
        }
        let admission = queue.try_admit().unwrap();
        assert_eq!(
            queue.submit(admission, (), vec![encoding(1, 0)]).err(),
            Some(QueueError::Closed)
        );
    }
}
