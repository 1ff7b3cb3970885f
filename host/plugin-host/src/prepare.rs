//! Where constraint instances are prepared on a request's path (when no warm one is
//! left): threads of their own at a low priority, apart from the pool that runs every
//! request's plugin calls. A structured request with `n` = 16 used to prepare 16
//! instances on that pool (0.3 s each on SmolLM2, 2 s on gemma), and every other
//! stream's next token waited behind them. Here they wait for these threads instead,
//! one request's instances one after another, and the CPU they take is what the
//! forward pass and the shared pool leave (nice 10).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::PluginError;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that prepare constraint instances.
pub struct Preparer {
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// The niceness of the preparing threads: below the scheduler and the plugin pool, not
/// idle (under full load an idle thread would never run, and the request would wait
/// for its deadline).
const NICE: libc::c_int = 10;

impl Preparer {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("lynx-prepare-{i}"))
                .spawn(move || {
                    // SAFETY: setpriority takes plain values; a thread id names this
                    // thread alone on Linux.
                    unsafe {
                        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, tid, NICE);
                    }
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` on a preparing thread; a panic in `f` is this call's error.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PluginError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(out);
        });
        self.jobs
            .lock()
            .map_err(|_| PluginError::Engine("the preparing threads are gone".into()))?
            .send(job)
            .map_err(|_| PluginError::Engine("the preparing threads are gone".into()))?;
        match rx.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(_)) => Err(PluginError::Engine(
                "preparing a constraint panicked".into(),
            )),
            Err(_) => Err(PluginError::Engine("the preparing threads are gone".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_a_panic_is_the_job_s_error() {
        let p = Preparer::new(1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.run(|| 2 + 2).await.ok(), Some(4));
        assert!(p.run(|| panic!("boom")).await.is_err());
        assert_eq!(
            p.run(|| 7).await.ok(),
            Some(7),
            "still serving after a panic"
        );
    }
}
