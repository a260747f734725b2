//! The storage's lending door: an engine's client held exclusively for calls that must
//! follow each other on one connection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::engine::{lock, Engine, Op, State};
use super::{spec, SharedClient};
use crate::client::{Client, ItemInfo};
use crate::command::as_item;
use crate::engine::{KeyServers, Route};
use crate::error::Result;
use crate::proto::wire::Capability;

/// A client lent for calls that must follow each other on one connection (the storage's
/// fill protocol: a CAS unique is only good on the connection's server process); see
/// [`SharedClient::lend_for`]. Batched calls for that server wait meanwhile (on the other
/// lanes, if it has more than one), then resume.
pub(crate) struct Lent<'a>(LentClient<'a>);

enum LentClient<'a> {
    Engine(Option<MutexGuard<'a, State>>, &'a Arc<Engine>),
    Admin(MutexGuard<'a, Client>),
}

impl std::ops::Deref for Lent<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        match &self.0 {
            LentClient::Engine(g, _) => &g.as_ref().expect("held until dropped").client,
            LentClient::Admin(g) => g,
        }
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        match &mut self.0 {
            LentClient::Engine(g, _) => &mut g.as_mut().expect("held until dropped").client,
            LentClient::Admin(g) => g,
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let LentClient::Engine(g, engine) = &mut self.0 {
            drop(g.take());
            // What queued while it was lent is served now.
            engine.hand_off();
        }
    }
}

/// What the storage layer needs beyond the public calls.
impl SharedClient {
    /// Whether the protocol has leases (meta).
    pub(crate) fn has_leases(&self) -> bool {
        self.inner.protocol.supports(Capability::Meta)
    }

    /// Where `key` goes now, and its own server (see `Client::route_of_key`).
    pub(crate) fn route_of_key(&self, key: &[u8]) -> Result<Route> {
        lock(&self.inner.router).route_of_key(key)
    }

    /// The servers the storage reads (`read`) or invalidates `key` on, from the router,
    /// which has the fleet's policy (the engines and the admin client serve one server
    /// each): see `Client::storage_servers`.
    pub(crate) fn storage_servers(&self, key: &[u8], read: bool) -> Result<KeyServers> {
        lock(&self.inner.router).storage_servers(key, read)
    }

    /// Server `server`'s engine client, for calls that must share its connection: a
    /// connection batched calls use (a free lane's, else lane 0's once its round ends), held
    /// exclusively until the lent client is dropped.
    pub(crate) fn lend_for(&self, server: usize) -> Lent<'_> {
        let engine = &self.inner.engines[server];
        let lane = engine.try_state().unwrap_or_else(|| {
            // Counted while waiting: lane 0's I/O thread lets go of it for us.
            engine.lenders.fetch_add(1, Ordering::SeqCst);
            let lane = engine.lock_lane(0);
            engine.lenders.fetch_sub(1, Ordering::SeqCst);
            lane
        });
        Lent(LentClient::Engine(Some(lane), engine))
    }

    /// The client for server-wide and multi-server maintenance (replays, flushes).
    pub(crate) fn lend_admin(&self) -> Lent<'_> {
        Lent(LentClient::Admin(lock(&self.inner.admin)))
    }

    /// A get on server `server` (wherever the ring would send `key` now), batched with
    /// concurrent calls: the storage's warm reads, kept on the server its route checks
    /// approved.
    pub(crate) fn get_on(
        &self,
        server: usize,
        key: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<Option<ItemInfo>> {
        buf.clear();
        let eng = &self.inner.engines[server];
        as_item(self.exec_on(eng, spec(Op::Get { cas: false }, key), true, buf)?)
    }
}
