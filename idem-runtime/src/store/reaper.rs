//! The background reaper: purges expired records in bounded batches, from any
//! store (the SQL stores start it with `spawn_reaper`).

use std::sync::Arc;
use std::time::Duration;

use super::Store;
use crate::error::Error;

/// A background task that purges expired records in bounded batches.
///
/// [`Reaper::shutdown`] stops it gracefully (the batch in flight finishes) and
/// waits for it; dropping the handle stops it the same way without waiting.
#[derive(Debug)]
pub struct Reaper {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<u64>,
}

impl Reaper {
    /// The shortest interval a reaper sleeps between purges.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

    /// Starts purging up to `batch` records at a time, every `interval`, on the
    /// current Tokio runtime. A full batch is followed at once by another.
    ///
    /// `batch` is at least 1 and `interval` at least [`Reaper::MIN_INTERVAL`]:
    /// smaller values are raised to those (a batch of 0 would count as always
    /// full and spin against the database; an interval of 0 would poll it
    /// without pause).
    pub fn spawn(store: Arc<dyn Store>, interval: Duration, batch: usize) -> Self {
        let batch = batch.max(1);
        let interval = interval.max(Self::MIN_INTERVAL);
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                match store.purge_expired(batch).await {
                    Ok(n) => {
                        total += n;
                        if n > 0 {
                            tracing::debug!(purged = n, "reaper purged expired records");
                        }
                        if n as usize >= batch {
                            // More may be waiting; yield, then go again unless told to stop.
                            if !matches!(
                                stopped.try_recv(),
                                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                            ) {
                                break;
                            }
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "reaper could not purge; retrying"),
                }
                // Sleep for the interval, waking early to stop (or when the handle is dropped).
                if tokio::time::timeout(interval, &mut stopped).await.is_ok() {
                    break;
                }
            }
            total
        });
        Reaper {
            stop: Some(stop),
            task,
        }
    }

    /// Stops the reaper after the batch in flight; returns how many records it purged.
    pub async fn shutdown(mut self) -> Result<u64, Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| Error::store(format!("the reaper task failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Claim, ClaimRequest, FencingToken, Record};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory store that counts purges.
    #[derive(Clone, Default)]
    struct Counting {
        inner: MemoryStore,
        purges: Arc<AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn claim(&self, request: ClaimRequest<'_>) -> Result<Claim, Error> {
            self.inner.claim(request).await
        }
        async fn complete(
            &self,
            key: &str,
            token: FencingToken,
            outcome: &[u8],
            ttl: Duration,
        ) -> Result<(), Error> {
            self.inner.complete(key, token, outcome, ttl).await
        }
        async fn release(&self, key: &str, token: FencingToken) -> Result<(), Error> {
            self.inner.release(key, token).await
        }
        async fn renew(
            &self,
            key: &str,
            token: FencingToken,
            lease: Duration,
        ) -> Result<(), Error> {
            self.inner.renew(key, token, lease).await
        }
        async fn get(&self, key: &str) -> Result<Option<Record>, Error> {
            self.inner.get(key).await
        }
        async fn purge_expired(&self, batch: usize) -> Result<u64, Error> {
            self.purges.fetch_add(1, Ordering::SeqCst);
            self.inner.purge_expired(batch).await
        }
        fn handle(&self) -> Arc<dyn Store> {
            Arc::new(self.clone())
        }
    }

    /// A batch of 0 and an interval of 0 neither spin nor stop the reaper:
    /// they count as 1 record and [`Reaper::MIN_INTERVAL`], so expired records
    /// still go, at a bounded rate of queries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zero_batch_and_interval_are_clamped_not_spun() {
        let store = Counting::default();
        for i in 0..3 {
            let key = format!("reap:{i}");
            let request = ClaimRequest {
                key: &key,
                fingerprint: None,
                lease: Duration::from_secs(60),
            };
            let Claim::Acquired { token, .. } = store.claim(request).await.unwrap() else {
                panic!("fresh key");
            };
            store
                .complete(&key, token, b"1", Duration::from_millis(1))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let reaper = Reaper::spawn(store.handle(), Duration::ZERO, 0);
        let elapsed = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let purged = reaper.shutdown().await.unwrap();
        let elapsed = elapsed.elapsed();
        let calls = store.purges.load(Ordering::SeqCst);
        assert_eq!(purged, 3, "every expired record was purged");
        // One call per record (batch 1), one that finds none, then one per
        // MIN_INTERVAL at most: a spinning reaper makes thousands.
        let most = 4 + (elapsed.as_millis() / Reaper::MIN_INTERVAL.as_millis()) as usize + 1;
        assert!(
            calls <= most,
            "{calls} purges in {elapsed:?} (at most {most})"
        );
    }
}
