//! The memcached clients a [`MemcacheStorage`](super::MemcacheStorage) calls through, and
//! the client one of its calls holds for a few cache calls in a row.

use crate::client::{Client, Pool, PooledClient, SharedClient};

use super::Shared;

/// The memcached clients a [`MemcacheStorage`](super::MemcacheStorage) calls through: a
/// [`Pool`] (each call checks a client out), or a [`SharedClient`] (warm reads of concurrent
/// callers share multi-gets; a miss's fill protocol borrows the key's server connection for
/// its few calls). Built with `.into()` from either, or from a single [`Client`].
#[derive(Debug, Clone)]
pub enum CacheClients {
    /// Clients checked out per call.
    Pool(Pool),
    /// One shared, batching client.
    Shared(SharedClient),
}

impl From<Pool> for CacheClients {
    fn from(p: Pool) -> CacheClients {
        CacheClients::Pool(p)
    }
}

impl From<Client> for CacheClients {
    fn from(c: Client) -> CacheClients {
        CacheClients::Pool(c.into())
    }
}

impl From<SharedClient> for CacheClients {
    fn from(c: SharedClient) -> CacheClients {
        CacheClients::Shared(c)
    }
}

/// A client for a few calls in a row: checked out of the pool, or lent by the shared client.
// Lives on the stack for one storage call; boxing the pooled client would allocate per call.
#[allow(clippy::large_enum_variant)]
pub(super) enum Checkout<'a> {
    Pooled(PooledClient<'a>),
    Lent(crate::shared::Lent<'a>),
}

impl std::ops::Deref for Checkout<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c) => c,
        }
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c) => c,
        }
    }
}

impl Shared {
    /// A client for calls about `key` (the shared client lends that key's server
    /// connection), or for maintenance over every server (`None`).
    pub(super) fn checkout(&self, key: Option<&str>) -> Option<Checkout<'_>> {
        let r = match (&self.settings.cache, key) {
            (CacheClients::Pool(p), _) => p.get().map(Checkout::Pooled),
            // A key that cannot be routed: the caller's own routing reports why (the admin
            // client routes as the engines do).
            (CacheClients::Shared(s), Some(k)) => {
                Ok(Checkout::Lent(match s.route_of_key(k.as_bytes()) {
                    Ok(r) => s.lend_for(r.server),
                    Err(_) => s.lend_admin(),
                }))
            }
            (CacheClients::Shared(s), None) => Ok(Checkout::Lent(s.lend_admin())),
        };
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                self.cache_failed(&e);
                None
            }
        }
    }
}
