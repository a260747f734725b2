//! The memcached clients a [`MemcacheStorage`](super::MemcacheStorage) calls through, and
//! the client one of its calls holds for a few cache calls in a row.

use crate::client::{Client, Pool, PooledClient, SharedClient};
use crate::engine::KeyServers;

use super::Shared;

/// The memcached clients a [`MemcacheStorage`](super::MemcacheStorage) calls through: a
/// [`Pool`] (each call checks a client out), or a [`SharedClient`] (warm reads of concurrent
/// callers share multi-gets; a miss's fill protocol borrows the connection of the server
/// it uses, the key's own or, with copies, the copy it read, for its few calls). Built with `.into()` from either, or from a single [`Client`].
#[derive(Debug, Clone)]
pub enum CacheClients {
    /// Clients checked out per call.
    Pool(Pool),
    /// One shared, batching client.
    Shared(SharedClient),
}

impl CacheClients {
    /// The server list the clients follow.
    pub(super) fn server_list(&self) -> crate::ServerList {
        match self {
            CacheClients::Pool(p) => p.server_list().clone(),
            CacheClients::Shared(s) => s.server_list(),
        }
    }
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

/// A client for a few calls in a row: checked out of the pool, or lent by the shared client
/// (an engine's, with the server it serves; or the admin client, `None`).
// Lives on the stack for one storage call; boxing the pooled client would allocate per call.
#[allow(clippy::large_enum_variant)]
pub(super) enum Checkout<'a> {
    Pooled(PooledClient<'a>),
    Lent(crate::shared::Lent<'a>, Option<usize>),
}

impl std::ops::Deref for Checkout<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c, _) => c,
        }
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        match self {
            Checkout::Pooled(c) => c,
            Checkout::Lent(c, _) => c,
        }
    }
}

impl Shared {
    /// The servers the storage reads (`read`) or invalidates `key` on ([`KeyServers`]: its
    /// route with one copy per key, its copies with several), and for a pool the client
    /// that was asked (kept for the calls: see [`client_on`](Self::client_on)). A shared
    /// client asks its router, which has the fleet's policy. `None`: no client (counted).
    pub(super) fn key_servers(
        &self,
        key: &str,
        read: bool,
    ) -> Option<(Option<Checkout<'_>>, crate::Result<KeyServers>)> {
        match &self.settings.cache {
            CacheClients::Pool(p) => match p.get() {
                Ok(mut c) => {
                    let servers = c.storage_servers(key.as_bytes(), read);
                    Some((Some(Checkout::Pooled(c)), servers))
                }
                Err(e) => {
                    self.cache_failed(&e);
                    None
                }
            },
            CacheClients::Shared(s) => Some((None, s.storage_servers(key.as_bytes(), read))),
        }
    }

    /// [`key_servers`](Self::key_servers) asked while holding `c` (a pool's client asks
    /// itself; a shared client's lent clients serve one server each, so its router is asked).
    pub(super) fn key_servers_with(
        &self,
        c: &mut Client,
        key: &[u8],
        read: bool,
    ) -> crate::Result<KeyServers> {
        match &self.settings.cache {
            CacheClients::Pool(_) => c.storage_servers(key, read),
            CacheClients::Shared(s) => s.storage_servers(key, read),
        }
    }

    /// A client for calls pinned to `server`: `held` if it can make them (a pool's client;
    /// the shared client's engine of that server), otherwise `held` is let go (first: one
    /// engine is held at a time) and replaced by one that can. `None`: no client (counted).
    pub(super) fn client_on<'a, 'h>(
        &'a self,
        held: &'h mut Option<Checkout<'a>>,
        server: usize,
    ) -> Option<&'h mut Checkout<'a>> {
        match held {
            Some(Checkout::Pooled(_)) => {}
            Some(Checkout::Lent(_, Some(s))) if *s == server => {}
            _ => {
                *held = None;
                *held = match &self.settings.cache {
                    CacheClients::Pool(p) => match p.get() {
                        Ok(c) => Some(Checkout::Pooled(c)),
                        Err(e) => {
                            self.cache_failed(&e);
                            None
                        }
                    },
                    CacheClients::Shared(s) => {
                        Some(Checkout::Lent(s.lend_for(server), Some(server)))
                    }
                };
            }
        }
        held.as_mut()
    }

    /// A client for maintenance over every server (replays, flushes).
    pub(super) fn checkout_admin(&self) -> Option<Checkout<'_>> {
        match &self.settings.cache {
            CacheClients::Pool(p) => match p.get() {
                Ok(c) => Some(Checkout::Pooled(c)),
                Err(e) => {
                    self.cache_failed(&e);
                    None
                }
            },
            CacheClients::Shared(s) => Some(Checkout::Lent(s.lend_admin(), None)),
        }
    }
}
