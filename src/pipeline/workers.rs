//! The threads that map, validate and sign: CPU-bound work kept apart from the ACK path.
//!
//! A sender waits for its ACK, and the ACK waits only for the durable commit, never for mapping.
//! But on a 2-core appliance, mapping a backlog at full speed takes CPU from the connection tasks
//! and the outbox writer, and every sender's ACK latency grows with the backlog. So mapping runs
//! on its own threads at a lower scheduling priority (nice [`MAPPER_NICE`] on Linux): when the
//! cores are busy the kernel runs ingest first, and mapping uses whatever is left, which is all
//! of it when no messages are arriving. The backlog waits in the durable outbox, which is what it
//! is for. (tokio's blocking pool is not used: its threads also run other blocking work, which
//! must not inherit the lower priority.)

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::debug;

/// How many nice steps below the process mapping threads run (19 is the lowest priority). 10
/// gives ingest about nine tenths of a contended core under Linux's scheduler.
pub const MAPPER_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the job panicked (a defect; see the appliance log)")]
    Panicked,
    #[error("the worker threads have stopped")]
    Stopped,
}

/// A fixed set of low-priority threads running jobs in submission order.
pub struct CpuPool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl CpuPool {
    /// Starts `threads` threads (at least one), `nice` steps below the process's priority. The
    /// threads end when the pool is dropped and the queue is empty.
    pub fn new(threads: usize, nice: i32) -> std::io::Result<CpuPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mapper-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(p) => p.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                })?;
        }
        Ok(CpuPool { tx: Mutex::new(tx) })
    }

    /// Runs `f` on a pool thread and waits (asynchronously) for its result. A panic in `f` is
    /// caught and reported as [`PoolError::Panicked`]; the thread goes on with the next job.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        let sent = match self.tx.lock() {
            Ok(s) => s.send(job),
            Err(p) => p.into_inner().send(job),
        };
        if sent.is_err() {
            return Err(PoolError::Stopped);
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Stopped),
        }
    }
}

/// Lowers the calling thread's scheduling priority by `inc` nice steps (capped at 19), relative
/// to the process's (so a unit file's `Nice=` still applies). On Linux the nice value is per
/// thread, and `PRIO_PROCESS` with id 0 means the calling thread. Elsewhere this does nothing.
fn lower_priority(inc: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpriority/setpriority only read their integer arguments. A -1 from
        // getpriority is either the nice value -1 or an error; both give a sensible base.
        let rc = unsafe {
            let own = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, (own + inc).min(19))
        };
        if rc != 0 {
            debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower the mapping thread's priority; it runs at normal priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = inc;
        debug!("thread priorities are only lowered on Linux");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_a_panic() {
        let pool = CpuPool::new(2, MAPPER_NICE).expect("pool");
        assert_eq!(pool.run(|| 2 + 2).await.expect("result"), 4);
        let panicked = pool.run(|| -> u32 { panic!("defect") }).await;
        assert!(matches!(panicked, Err(PoolError::Panicked)));
        // The threads go on after a panic.
        for i in 0..8u32 {
            assert_eq!(pool.run(move || i * i).await.expect("result"), i * i);
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn pool_threads_run_at_the_lower_priority() {
        let pool = CpuPool::new(1, MAPPER_NICE).expect("pool");
        // SAFETY: getpriority reads integers only. errno is irrelevant: the value is not -1.
        let nice = pool
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
            .await
            .expect("result");
        // SAFETY: as above, for this (test) thread.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice, (own + MAPPER_NICE).min(19));
    }
}
