//! [`Client`]'s multi-key calls: the keys validated, planned and run as one batch per server
//! by the engine ([`crate::engine::batch`]), results handed to the caller as they arrive.

use super::{store_opts, Client, ItemRef, SetOptions, StoreMode};
use crate::command::Reply;
use crate::engine::batch::{delete_unmet, store_unmet, ItemKeys};
use crate::error::Result;
use crate::proto::wire::{Cmd, Kind};

impl Client {
    /// Gets many keys in one pipelined request per server, calling `found(key, item)` for each
    /// hit as it arrives (borrowing from the read buffer: no copy per item). Misses are not
    /// reported. All keys are validated before anything is sent.
    ///
    /// Keys are grouped by server; every server's request is written before any reply is read,
    /// and replies are parsed as they arrive from any server. If servers fail, the hits of the
    /// others are still delivered.
    ///
    /// # Errors
    /// An invalid key (before anything is sent); the failed server's error, or
    /// [`Error::Partial`](crate::Error::Partial) listing each failed server.
    pub fn get_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(false, keys, found)
    }

    /// [`get_multi`](Self::get_multi) with CAS uniques. Errors as [`get_multi`](Self::get_multi).
    pub fn gets_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(true, keys, found)
    }

    fn retrieve_multi<K: AsRef<[u8]>>(
        &mut self,
        with_cas: bool,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        if self.core.replicated() {
            return self.retrieve_copies(with_cas, keys, found);
        }
        let (core, scratch) = self.engine();
        core.get_batch(scratch, with_cas, keys, |j, mut item| {
            item.cas = item.cas.filter(|_| with_cas);
            found(keys[j].as_ref(), item);
        })
    }

    /// Stores many items with one pipelined request per server; returns how many were stored.
    ///
    /// # Errors
    /// An invalid key or a value above the maximum (before anything is sent); then as
    /// [`get_multi`](Self::get_multi): items on healthy servers are stored even when another
    /// server fails.
    pub fn set_multi<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        items: &[(K, V)],
        opts: SetOptions,
    ) -> Result<usize> {
        for (_, v) in items {
            self.core.check_value(v.as_ref())?;
        }
        if items.is_empty() {
            return Ok(0);
        }
        if self.core.replicated() {
            let store = store_opts(StoreMode::Set, opts);
            return self.write_copies_multi(
                Kind::Store,
                &ItemKeys(items),
                |j| Some(items[j].1.as_ref()),
                |j, k| Cmd::Store(k, store, items[j].1.as_ref().len()),
                |r| *r == Reply::Store(crate::proto::SetOutcome::Stored),
            );
        }
        if let Some(n) = self.tls_chunk(items.len(), |j| {
            items[j].0.as_ref().len() + items[j].1.as_ref().len()
        }) {
            return self.in_chunks(items, n, |c, part| c.set_multi(part, opts));
        }
        if let [(k, v)] = items {
            if self
                .core
                .multi_key_policy()
                .is_some_and(|p| p.item_bytes(k.as_ref().len(), v.as_ref().len()) > p.max_bytes)
            {
                // Over TLS, a value longer than a record goes as a command of its own that
                // replies: memcached stalls on a quiet store whose last record also holds the
                // closing no-op (it waits on the socket for bytes it already decrypted).
                self.set(k.as_ref(), v.as_ref(), opts)?;
                return Ok(1);
            }
        }
        let store = store_opts(StoreMode::Set, opts);
        let value = |j: usize| Some(items[j].1.as_ref());
        let len = |j: usize| items[j].1.as_ref().len();
        let keys = ItemKeys(items);
        let (core, scratch) = self.engine();
        core.count_batch(
            scratch,
            Kind::Store,
            &keys,
            value,
            |j, k| Cmd::Store(k, store, len(j)),
            store_unmet,
        )
    }

    /// Over TLS, the length of the first chunk of a multi-store or multi-delete whose request
    /// would pass one TLS record (`None`: send it whole; see [`BatchPolicy`] for why). In
    /// chunks of at most one record, each answered before the next is sent, every record is
    /// read.
    fn tls_chunk(&self, n: usize, item_bytes: impl Fn(usize) -> usize) -> Option<usize> {
        self.core.multi_key_policy()?.first_chunk(n, item_bytes)
    }

    /// Runs `call` on `items[..first]`, then on the rest (chunked again as it needs),
    /// summing what they did. A failed chunk does not stop the others (healthy servers
    /// still get their items); the first error is returned at the end.
    fn in_chunks<T>(
        &mut self,
        items: &[T],
        first: usize,
        mut call: impl FnMut(&mut Self, &[T]) -> Result<usize>,
    ) -> Result<usize> {
        let (head, tail) = items.split_at(first);
        let a = call(self, head);
        let b = call(self, tail);
        match (a, b) {
            (Ok(x), Ok(y)) => Ok(x + y),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Deletes many keys with one pipelined request per server; returns how many existed.
    /// Errors as [`get_multi`](Self::get_multi).
    pub fn delete_multi<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        if self.core.replicated() {
            return self.write_copies_multi(
                Kind::Delete,
                keys,
                |_| None,
                |_, k| Cmd::delete(k),
                |r| *r == Reply::Existed(true),
            );
        }
        if let Some(n) = self.tls_chunk(keys.len(), |j| keys[j].as_ref().len()) {
            return self.in_chunks(keys, n, |c, part| c.delete_multi(part));
        }
        let (core, scratch) = self.engine();
        core.count_batch(
            scratch,
            Kind::Delete,
            keys,
            |_| None,
            |_, k| Cmd::delete(k),
            delete_unmet,
        )
    }
}
