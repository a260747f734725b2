//! The async twins of the calls rounds do not carry: meta calls (made on the key's lent
//! connection) and calls to every server (made on the admin client). Each runs its blocking
//! call on a thread of its own and completes when it returns, so an executor's thread never
//! waits on I/O; the price is a thread start per call (tens of microseconds), fine off the
//! hot path. Dropped before it completes, the call still runs to its end on its thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use super::engine::lock;
use super::SharedClient;
use crate::client::{MetaGetOptions, MetaItemInfo, MetaSetOptions, MetaSetResult, ServerStats};
use crate::error::Result;

/// A blocking call's result, as a future.
struct OffThread<T> {
    slot: Arc<Mutex<(Option<T>, Option<Waker>)>>,
}

/// Runs `f` on a new thread (or here, if no thread can be started: slow, never lost).
fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> OffThread<T> {
    let slot = Arc::new(Mutex::new((None::<T>, None::<Waker>)));
    let theirs = Arc::clone(&slot);
    let run = move || {
        let r = f();
        let waker = {
            let mut s = lock(&theirs);
            s.0 = Some(r);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    };
    let run = Arc::new(Mutex::new(Some(run)));
    let spawned = {
        let run = Arc::clone(&run);
        std::thread::Builder::new()
            .name("mcstore-call".into())
            .spawn(move || lock(&run).take().map(|f| f()))
    };
    if spawned.is_err() {
        if let Some(f) = lock(&run).take() {
            f();
        }
    }
    OffThread { slot }
}

impl<T> Future for OffThread<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = lock(&self.slot);
        match s.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Async twins of the meta and every-server calls (see the module docs).
impl SharedClient {
    /// [`meta_get`](Self::meta_get), as a future (on a thread of its own; `buf` is left
    /// empty if the future is dropped before it completes).
    pub async fn meta_get_async(
        &self,
        key: &[u8],
        opts: MetaGetOptions,
        buf: &mut Vec<u8>,
    ) -> Result<Option<MetaItemInfo>> {
        let (c, key, mut value) = (self.clone(), key.to_vec(), std::mem::take(buf));
        let (r, value) = off_thread(move || (c.meta_get(&key, opts, &mut value), value)).await;
        *buf = value;
        r
    }

    /// [`invalidate`](Self::invalidate), as a future (on a thread of its own).
    pub async fn invalidate_async(&self, key: &[u8], stale_ttl: Option<u32>) -> Result<bool> {
        let (c, key) = (self.clone(), key.to_vec());
        off_thread(move || c.invalidate(&key, stale_ttl)).await
    }

    /// [`meta_set`](Self::meta_set), as a future (on a thread of its own).
    pub async fn meta_set_async(
        &self,
        key: &[u8],
        value: &[u8],
        opts: MetaSetOptions,
    ) -> Result<MetaSetResult> {
        let (c, key, value) = (self.clone(), key.to_vec(), value.to_vec());
        off_thread(move || c.meta_set(&key, &value, opts)).await
    }

    /// [`meta_debug`](Self::meta_debug), as a future (on a thread of its own).
    pub async fn meta_debug_async(&self, key: &[u8]) -> Result<Option<String>> {
        let (c, key) = (self.clone(), key.to_vec());
        off_thread(move || c.meta_debug(&key)).await
    }

    /// [`flush_all`](Self::flush_all), as a future (on a thread of its own).
    pub async fn flush_all_async(&self, delay: Option<u32>) -> Result<()> {
        let c = self.clone();
        off_thread(move || c.flush_all(delay)).await
    }

    /// [`flush_server`](Self::flush_server), as a future (on a thread of its own).
    pub async fn flush_server_async(&self, server: &str, delay: Option<u32>) -> Result<()> {
        let (c, server) = (self.clone(), server.to_string());
        off_thread(move || c.flush_server(&server, delay)).await
    }

    /// [`verbosity`](Self::verbosity), as a future (on a thread of its own).
    pub async fn verbosity_async(&self, level: u32) -> Result<()> {
        let c = self.clone();
        off_thread(move || c.verbosity(level)).await
    }

    /// [`version`](Self::version), as a future (on a thread of its own).
    pub async fn version_async(&self) -> Result<Vec<(String, String)>> {
        let c = self.clone();
        off_thread(move || c.version()).await
    }

    /// [`stats`](Self::stats), as a future (on a thread of its own).
    pub async fn stats_async(&self, arg: Option<&str>) -> Result<Vec<ServerStats>> {
        let (c, arg) = (self.clone(), arg.map(str::to_string));
        off_thread(move || c.stats(arg.as_deref())).await
    }
}
