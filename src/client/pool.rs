//! A fixed set of clients shared by many threads.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Client, ClientBuilder};
use crate::error::{Error, Result};
use crate::fleet::live::{ListFollower, Topology};

/// A pool of [`Client`]s for many threads. `Clone` is cheap (shared).
///
/// A checked-out client is returned on drop. One dropped while its thread panics, or
/// [`discard`](PooledClient::discard)ed, is replaced by a freshly built client rather than
/// returned, since its state is unknown. Each client keeps its own connections; server health
/// is shared: a server one client ejects is ejected for all, so two clients of one pool do not
/// route a key to two servers.
///
/// ```no_run
/// use mcstore::{Client, Pool, SetOptions};
/// # fn main() -> mcstore::Result<()> {
/// let pool = Pool::new(Client::builder().server("127.0.0.1:11211"), 8)?;
/// std::thread::scope(|s| {
///     for t in 0..16 {
///         let pool = pool.clone();
///         s.spawn(move || {
///             let mut c = pool.get().unwrap();   // waits for a free client, bounded
///             c.set(format!("k{t}").as_bytes(), b"v", SetOptions::default()).unwrap();
///         });
///     }
/// });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    builder: Option<ClientBuilder>,
    /// The list every client follows.
    list: crate::ServerList,
    idle: Mutex<Vec<Client>>,
    freed: Condvar,
    size: usize,
    checkout_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.inner.idle.lock().map_or(0, |v| v.len());
        f.debug_struct("Pool")
            .field("size", &self.inner.size)
            .field("idle", &idle)
            .field("checkout_timeout", &self.inner.checkout_timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool told of its list's changes: an idle client takes a new list at once, so its
    /// connections to servers that left close now, not at its next checkout.
    fn following(inner: Inner) -> Pool {
        let inner = Arc::new(inner);
        let follower: std::sync::Weak<dyn ListFollower> = Arc::downgrade(&inner) as _;
        inner.list.add_follower(follower);
        Pool { inner }
    }

    /// The server list every client of the pool follows:
    /// [`ServerList::set`](crate::ServerList::set) changes the pool's servers while it
    /// serves. Clients checked out take the new list on their next call.
    pub fn server_list(&self) -> &crate::ServerList {
        &self.inner.list
    }

    /// A pool of `size` clients built from `builder` (none connects until used). Checkouts
    /// wait up to 5 s for a free client.
    ///
    /// # Errors
    /// The builder's configuration errors ([`ClientBuilder::build`]).
    pub fn new(builder: ClientBuilder, size: usize) -> Result<Pool> {
        Pool::with_checkout_timeout(builder, size, Duration::from_secs(5))
    }

    /// Like [`new`](Self::new), with the time a checkout may wait for a free client. Errors
    /// as [`new`](Self::new).
    pub fn with_checkout_timeout(
        builder: ClientBuilder,
        size: usize,
        checkout_timeout: Duration,
    ) -> Result<Pool> {
        let size = size.max(1);
        // The first client's health is every client's: one view of who is ejected.
        let first = builder.clone().build()?;
        let builder = builder.follow(first.server_list());
        let mut clients = vec![first];
        for _ in 1..size {
            clients.push(builder.clone().build()?);
        }
        Ok(Pool::following(Inner {
            list: clients[0].server_list().clone(),
            builder: Some(builder),
            idle: Mutex::new(clients),
            freed: Condvar::new(),
            size,
            checkout_timeout,
        }))
    }

    /// The namespace (key prefix) its clients were built with.
    pub(crate) fn namespace(&self) -> std::sync::Arc<[u8]> {
        if let Some(b) = &self.inner.builder {
            return b.namespace.clone().into();
        }
        let idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.first()
            .map_or_else(|| Vec::new().into(), |c| c.namespace_arc().clone())
    }

    /// How many clients the pool holds.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// Checks a client out, waiting up to the checkout timeout for one to be free.
    ///
    /// # Errors
    /// [`Error::PoolTimeout`] if none was free in time.
    pub fn get(&self) -> Result<PooledClient<'_>> {
        let deadline = Instant::now() + self.inner.checkout_timeout;
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = idle.pop() {
                return Ok(PooledClient {
                    client: Some(c),
                    pool: self,
                    discard: false,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PoolTimeout(self.inner.checkout_timeout));
            }
            idle = self
                .inner
                .freed
                .wait_timeout(idle, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn put_back(&self, client: Client) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.push(client);
        drop(idle);
        self.inner.freed.notify_one();
    }
}

impl ListFollower for Inner {
    fn prepare(&self, _next: &Topology) -> Result<()> {
        Ok(())
    }

    fn published(&self, _next: &Topology, removed: &[usize]) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for c in idle.iter_mut() {
            c.leave_removed(removed);
        }
    }
}

impl From<Client> for Pool {
    /// A pool of one client (calls from several threads take turns).
    fn from(client: Client) -> Pool {
        Pool::following(Inner {
            list: client.server_list().clone(),
            builder: None,
            idle: Mutex::new(vec![client]),
            freed: Condvar::new(),
            size: 1,
            checkout_timeout: Duration::from_secs(5),
        })
    }
}

/// A client checked out of a [`Pool`]; dereferences to [`Client`], goes back on drop.
pub struct PooledClient<'p> {
    client: Option<Client>,
    pool: &'p Pool,
    discard: bool,
}

impl std::fmt::Debug for PooledClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledClient")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl PooledClient<'_> {
    /// Drops this client instead of returning it; the pool builds a fresh one.
    pub fn discard(mut self) {
        self.discard = true;
    }
}

impl Deref for PooledClient<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledClient<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for PooledClient<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.discard && !std::thread::panicking() {
            self.pool.put_back(client);
            return;
        }
        // Replace it; a builder that built once builds again (it validated then). A pool made
        // from one client has no builder: keep that client, which reconnects on its own.
        let fresh = match &self.pool.inner.builder {
            Some(b) => b.clone().build().unwrap_or(client),
            None => client,
        };
        self.pool.put_back(fresh);
    }
}
