//! Multi-key calls: each key is queued as a call of its own, so that the keys of concurrent
//! callers share batches; blocking, or as a future whose calls are all queued before it
//! first waits.

use super::{spec, SharedClient};
use crate::client::{ItemRef, SetOptions};
use crate::command::{store_op, CallSpec, Op, Reply};
use crate::error::{Error, Result};
use crate::proto::{SetOutcome, StoreMode};

/// What a multi-key call makes of each key's result (`value`: a hit's).
trait Fold {
    type Output;
    fn on(&mut self, j: usize, r: Result<Reply>, value: &[u8]);
    /// The call's result: the first failed key's error, if any.
    fn end(self) -> Result<Self::Output>;
}

/// A multi-get's: each hit to `found(key, item)`.
struct Hits<'k, K, F> {
    keys: &'k [K],
    found: F,
    first_error: Option<Error>,
}

impl<K: AsRef<[u8]>, F: FnMut(&[u8], ItemRef<'_>)> Fold for Hits<'_, K, F> {
    type Output = ();
    fn on(&mut self, j: usize, r: Result<Reply>, value: &[u8]) {
        match r {
            Ok(Reply::Hit(info)) => {
                let item = ItemRef {
                    value,
                    flags: info.flags,
                    cas: info.cas,
                };
                (self.found)(self.keys[j].as_ref(), item);
            }
            Ok(_) => {}
            Err(e) => {
                self.first_error.get_or_insert(e);
            }
        }
    }
    fn end(self) -> Result<()> {
        self.first_error.map_or(Ok(()), Err)
    }
}

/// A multi-store's or multi-delete's: how many did what was asked (`counts`).
struct Count {
    done: usize,
    counts: fn(&Reply) -> bool,
    first_error: Option<Error>,
}

impl Fold for Count {
    type Output = usize;
    fn on(&mut self, _: usize, r: Result<Reply>, _: &[u8]) {
        match r {
            Ok(reply) => self.done += usize::from((self.counts)(&reply)),
            Err(e) => {
                self.first_error.get_or_insert(e);
            }
        }
    }
    fn end(self) -> Result<usize> {
        self.first_error.map_or(Ok(self.done), Err)
    }
}

fn hits<K, F>(keys: &[K], found: F) -> Hits<'_, K, F> {
    Hits {
        keys,
        found,
        first_error: None,
    }
}

fn count(counts: fn(&Reply) -> bool) -> Count {
    Count {
        done: 0,
        counts,
        first_error: None,
    }
}

fn stored(r: &Reply) -> bool {
    matches!(r, Reply::Store(SetOutcome::Stored))
}

fn existed(r: &Reply) -> bool {
    matches!(r, Reply::Existed(true))
}

fn gets<'k, K: AsRef<[u8]>>(cas: bool, keys: &'k [K]) -> impl Fn(usize) -> CallSpec<'k> {
    move |j| spec(Op::Get { cas }, keys[j].as_ref())
}

fn sets<'k, K: AsRef<[u8]>, V: AsRef<[u8]>>(
    items: &'k [(K, V)],
    opts: SetOptions,
) -> impl Fn(usize) -> CallSpec<'k> {
    let op = store_op(StoreMode::Set, opts, None);
    move |j| CallSpec {
        op,
        key: items[j].0.as_ref(),
        value: items[j].1.as_ref(),
    }
}

fn deletes<'k, K: AsRef<[u8]>>(keys: &'k [K]) -> impl Fn(usize) -> CallSpec<'k> {
    move |j| spec(Op::Delete, keys[j].as_ref())
}

/// Multi-key calls, blocking and async.
impl SharedClient {
    /// Gets many keys, calling `found(key, item)` for each hit; each key is queued as a get
    /// of its own, so the keys of concurrent callers share multi-gets. Errors: the first
    /// failed key's error (the hits of the others are still delivered).
    pub fn get_multi<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(false, keys, found)
    }

    /// [`get_multi`](Self::get_multi) with CAS uniques.
    pub fn gets_multi<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(true, keys, found)
    }

    /// Stores many items (each queued as a set of its own: concurrent callers' sets share
    /// batches); returns how many were stored. Errors: the first failed item's error (the
    /// others are still stored).
    pub fn set_multi<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
        opts: SetOptions,
    ) -> Result<usize> {
        self.multi(items.len(), sets(items, opts), count(stored))
    }

    /// Deletes many keys; returns how many existed. Errors as [`set_multi`](Self::set_multi).
    pub fn delete_multi<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<usize> {
        self.multi(keys.len(), deletes(keys), count(existed))
    }

    /// [`get_multi`](Self::get_multi), as a future: each chunk of keys is queued at once
    /// (so they share rounds), then awaited together; hits are delivered a chunk at a time.
    pub async fn get_multi_async<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi_async(false, keys, found).await
    }

    /// [`gets_multi`](Self::gets_multi), as a future (see
    /// [`get_multi_async`](Self::get_multi_async)).
    pub async fn gets_multi_async<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi_async(true, keys, found).await
    }

    /// [`set_multi`](Self::set_multi), as a future (see
    /// [`get_multi_async`](Self::get_multi_async)).
    pub async fn set_multi_async<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
        opts: SetOptions,
    ) -> Result<usize> {
        self.multi_async(items.len(), sets(items, opts), count(stored))
            .await
    }

    /// [`delete_multi`](Self::delete_multi), as a future (see
    /// [`get_multi_async`](Self::get_multi_async)).
    pub async fn delete_multi_async<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<usize> {
        self.multi_async(keys.len(), deletes(keys), count(existed))
            .await
    }

    fn retrieve_multi<K: AsRef<[u8]>>(
        &self,
        cas: bool,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.multi(keys.len(), gets(cas, keys), hits(keys, found))
    }

    async fn retrieve_multi_async<K: AsRef<[u8]>>(
        &self,
        cas: bool,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        let fold = hits(keys, found);
        self.multi_async(keys.len(), gets(cas, keys), fold).await
    }

    fn multi<'k, F: Fold>(
        &self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        mut fold: F,
    ) -> Result<F::Output> {
        if self.replicated() {
            // Each key as its single-key call (the fleet's rules apply per key), many at
            // once.
            let many = self.copies_many(n, call, |j, r, value| fold.on(j, r, value));
            super::copies::block_on(std::pin::pin!(many), self.inner.timeout);
            return fold.end();
        }
        self.each_queued(n, call, |j, r, value| fold.on(j, r, value));
        fold.end()
    }

    async fn multi_async<'k, F: Fold>(
        &self,
        n: usize,
        call: impl Fn(usize) -> CallSpec<'k>,
        mut fold: F,
    ) -> Result<F::Output> {
        if self.replicated() {
            self.copies_many(n, call, |j, r, value| fold.on(j, r, value))
                .await;
            return fold.end();
        }
        self.each_async(n, call, |j, r, value| fold.on(j, r, value))
            .await;
        fold.end()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use crate::{SetOptions, SharedClient};

    /// What `tokio::spawn` asks of a future.
    fn spawnable<F: Future + Send + 'static>(_: F) {}

    #[test]
    fn async_calls_can_be_spawned() {
        let client = crate::Client::builder()
            .server("127.0.0.1:1")
            .shared()
            .build()
            .expect("builds without connecting");
        let c = client.clone();
        spawnable(async move {
            let keys = vec![b"a".to_vec(), b"b".to_vec()];
            let _ = c.get_multi_async(&keys, |_, _| {}).await;
            let _ = c.gets_multi_async(&keys, |_, _| {}).await;
            let items = [(b"a".to_vec(), b"1".to_vec())];
            let _ = c.set_multi_async(&items, SetOptions::default()).await;
            let _ = c.delete_multi_async(&keys).await;
        });
        let c: SharedClient = client;
        spawnable(async move {
            let mut buf = Vec::new();
            let _ = c.gets_async(b"a").await;
            let _ = c.gat_async(b"a", 1).await;
            let _ = c.gets_into_async(b"a", &mut buf).await;
            let _ = c.add_async(b"a", b"v", SetOptions::default()).await;
            let _ = c.append_async(b"a", b"v").await;
        });
    }
}
