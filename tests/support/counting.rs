//! A counting (and failure-injecting) wrapper around a real backend, installed through the
//! server's backend layer: the tests count what actually reaches the backend, independently of
//! keybroker's own counters. It forwards every method of the trait, as the `KeyBackend`
//! contract asks of a wrapper (so a wrapped AWS key still re-wraps inside KMS).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keybroker::backend::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Wrapped,
};
use keybroker::envelope::{FormatError, WrappedCopy};
use keybroker::registry::BackendLayer;
use keybroker::secret::SecretKey;

#[derive(Default)]
pub struct Counters {
    pub generate: AtomicU64,
    pub wrap: AtomicU64,
    pub unwrap: AtomicU64,
    /// Re-wraps the inner backend did itself (`rewrap_from`, e.g. KMS ReEncrypt).
    pub rewrap: AtomicU64,
    /// While set, every call fails with Unavailable.
    pub fail: AtomicBool,
    /// Added latency per call (lets concurrent requests overlap a miss).
    pub delay_ms: AtomicU64,
}

impl Counters {
    pub fn generate(&self) -> u64 {
        self.generate.load(Ordering::SeqCst)
    }
    pub fn wrap(&self) -> u64 {
        self.wrap.load(Ordering::SeqCst)
    }
    pub fn unwrap(&self) -> u64 {
        self.unwrap.load(Ordering::SeqCst)
    }
    pub fn rewrap(&self) -> u64 {
        self.rewrap.load(Ordering::SeqCst)
    }
    /// Every call that reached the backend.
    pub fn total(&self) -> u64 {
        self.generate() + self.wrap() + self.unwrap() + self.rewrap()
    }
    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

pub struct Counting {
    inner: Arc<dyn KeyBackend>,
    counters: Arc<Counters>,
}

impl Counting {
    async fn before(&self, counter: &AtomicU64) -> Result<(), BackendError> {
        counter.fetch_add(1, Ordering::SeqCst);
        let delay = self.counters.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.counters.fail.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                self.inner.kind(),
                BackendErrorKind::Unavailable,
                "injected outage",
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl KeyBackend for Counting {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    fn hint(&self) -> KeyHint {
        self.inner.hint()
    }
    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
        self.inner.check_canonical(copy)
    }
    async fn generate_data_key(
        &self,
        len: usize,
        ctx: &BackendContext<'_>,
    ) -> Result<(SecretKey, Wrapped), BackendError> {
        self.before(&self.counters.generate).await?;
        // Delegate to the inner backend's own one-call path (not its wrap), so a count of 1
        // means one backend call.
        self.inner.generate_data_key(len, ctx).await
    }
    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError> {
        self.before(&self.counters.wrap).await?;
        self.inner.wrap(key, ctx).await
    }
    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError> {
        self.before(&self.counters.unwrap).await?;
        self.inner.unwrap(copy, ctx).await
    }
    async fn rewrap_from(
        &self,
        source: &dyn KeyBackend,
        copy: &WrappedCopy<'_>,
        source_ctx: &BackendContext<'_>,
        ctx: &BackendContext<'_>,
    ) -> Option<Result<Wrapped, BackendError>> {
        // While failing, decline: the broker then falls back to `wrap`, which fails like every
        // other call, and nothing reaches the inner backend.
        if self.counters.fail.load(Ordering::SeqCst) {
            return None;
        }
        let rewrapped = self.inner.rewrap_from(source, copy, source_ctx, ctx).await;
        if rewrapped.is_some() {
            self.counters.rewrap.fetch_add(1, Ordering::SeqCst);
        }
        rewrapped
    }
    async fn describe(&self) -> Result<KeyDescription, BackendError> {
        self.inner.describe().await
    }
    /// The wrapped backend's, so that it is still recognised as a peer by `rewrap_from`.
    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }
}

/// A backend layer that wraps every key's backend and hands out its counters by key name.
#[derive(Clone, Default)]
pub struct CountingLayer {
    by_key: Arc<Mutex<HashMap<String, Arc<Counters>>>>,
}

impl CountingLayer {
    pub fn layer(&self) -> BackendLayer {
        let by_key = Arc::clone(&self.by_key);
        Arc::new(move |name: &str, inner: Arc<dyn KeyBackend>| {
            let counters = Arc::clone(by_key.lock().unwrap().entry(name.to_owned()).or_default());
            Arc::new(Counting { inner, counters }) as Arc<dyn KeyBackend>
        })
    }

    pub fn key(&self, name: &str) -> Arc<Counters> {
        Arc::clone(self.by_key.lock().unwrap().get(name).expect("no such key"))
    }
}
