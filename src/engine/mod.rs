//! The engine under every front: what a call works with ([`Core`]: the connections, their
//! health, the key distribution and the settings), and how a call runs: a key validated and
//! routed to its server, the server's session opened (connect, authenticate), one request
//! encoded, sent and its replies folded, the outcome recorded in the server's health.
//!
//! [`Client`](crate::Client) is its facade for one caller; [`SharedClient`](crate::SharedClient)
//! runs one engine per server for many callers; the storage layer borrows either. They use
//! the crate-internal API below (`Core`'s `pub(crate)` methods), never its fields.
//!
//! - [`batch`]: multi-key calls: keys grouped by server, every server's batch written first,
//!   replies matched to their items as they arrive.
//! - [`reply`]: folding one command's reply units, and the replies of earlier quiet commands
//!   (strays) read and set aside before a call's own.
//! - [`session`]: opening a server's session (SASL or ASCII authentication).
//! - [`health`]: failures, ejection and rejoin (libmemcached's model), per-server counters.

use std::sync::Arc;

pub(crate) mod batch;
pub(crate) mod fan_out;
pub(crate) mod health;
pub(crate) mod hedge;
pub(crate) mod pipeline;
pub(crate) mod reply;
mod session;
pub(crate) mod slots;

use crate::conn::driver::{Driver, Op, Until, COPY_VALUE_MAX};
use crate::error::{Error, Result};
use crate::fleet::live::{ServerList, Topology};
use crate::fleet::plan::{Servers, Standing};
use crate::fleet::{FleetPolicy, FleetShared};
use crate::observe::CallOp;
use crate::proto::meta::{self, MAX_BINARY_KEY_LEN};
use crate::proto::wire::{with_wire, Capability, Cmd, Expect, Outcome, Wire};
use crate::proto::{Key, KeyError, Limits, ParseError, Protocol, Status, MAX_KEY_LEN};
use crate::ring::handover::Handover;
use crate::ring::Continuum;
use health::{Health, ServerCounters, SharedHealth};
use reply::{SingleReader, Strays};

/// One server process: its index in the client's list, its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerInstance {
    server: usize,
    pid: u64,
    started: u64,
}

impl ServerInstance {
    /// Its index in the client's server list.
    pub(crate) fn server(&self) -> usize {
        self.server
    }
}

/// Where a key goes: `server` now, `home` with every server up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) server: usize,
    pub(crate) home: usize,
}

impl Route {
    /// Whether the key goes to its own server (no ejection moved it).
    pub(crate) fn is_home(&self) -> bool {
        self.server == self.home
    }
}

/// The servers the storage reads or invalidates a key on (see `storage::memcache`): with one
/// copy per key, where the key goes now (its own server, or a stand-in while that one is
/// ejected); with copies, the key's copies (ejections never move them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyServers {
    Route(Route),
    /// An invalidation by a storage that follows a changing list: the key's route, and
    /// where else older entries of it may be (`also`: its next server; just after a change,
    /// its server before). `reader`: the server reads use instead of the route just after a
    /// change (see `Core::storage_spread`).
    Spread {
        route: Route,
        also: Servers,
        reader: Option<u32>,
    },
    /// In read order for a read (copies waiting for a repair of the key left out), in
    /// placement order, all of them, for an invalidation.
    Copies(Servers),
}

impl KeyServers {
    /// The servers to use, in order (allocation-free).
    #[inline]
    pub(crate) fn servers(&self) -> Servers {
        match self {
            KeyServers::Route(r) => Servers::from_slice(&[r.server as u32]),
            KeyServers::Spread { route, also, .. } => {
                let mut s = Servers::from_slice(&[route.server as u32]);
                for i in also.iter() {
                    s.push(i as u32);
                }
                s
            }
            KeyServers::Copies(s) => *s,
        }
    }

    /// The key's own server while its calls go to a stand-in (one copy, that server
    /// ejected): it may still hold an old entry nobody invalidates.
    #[inline]
    pub(crate) fn moved_from(&self) -> Option<usize> {
        match self {
            KeyServers::Route(r) | KeyServers::Spread { route: r, .. } if !r.is_home() => {
                Some(r.home)
            }
            _ => None,
        }
    }

    /// Whether `server` is where the key's entry lives: its own server, routed to now, or
    /// one of its copies.
    #[inline]
    pub(crate) fn holds(&self, server: usize) -> bool {
        match self {
            KeyServers::Route(r) => r.is_home() && r.server == server,
            KeyServers::Spread { route, reader, .. } => match reader {
                Some(b) => *b as usize == server,
                None => route.is_home() && route.server == server,
            },
            KeyServers::Copies(s) => s.iter().any(|i| i == server),
        }
    }
}

/// What a call works with: the connections and their health, the key distribution, and the
/// settings the client was built with. Calls that borrow [`Scratch`] (a namespaced key, a
/// multi-key plan) hand the core to their callbacks, so nothing is taken out and put back.
pub(crate) struct Core {
    driver: Driver,
    /// The error that closed a connection with pipelined rounds still unread on it (the
    /// connection's number, see `Core::chain_recv`): those rounds fail with it too.
    pipeline_lost: Option<(u64, Error)>,
    limits: Limits,
    ring: Continuum,
    /// Shared, so a multi-key call can hold them while it runs without copying the strings.
    labels: std::sync::Arc<[String]>,
    health: Health,
    /// Shared, like the labels: a multi-key call holds it while the caller's callback runs.
    namespace: std::sync::Arc<[u8]>,
    hash_with_namespace: bool,
    protocol: Protocol,
    sasl: Option<(String, String)>,
    /// ASCII authentication (text and meta), as `user password`.
    ascii_auth: Option<(String, String)>,
    /// Per server: the connection count at which SASL last succeeded.
    authenticated: Vec<u64>,
    /// Per server: which process the connection (by count) reaches, once asked.
    instances: Vec<Option<(u64, ServerInstance)>>,
    /// Set by [`Client::pinned`]: every keyed call goes to this server.
    pinned: Option<usize>,
    /// Keys have copies and no call pinned this client: kept with `pinned` (the hot path
    /// tests one flag).
    spread_now: bool,
    /// Next binary opaque.
    opaque: u32,
    /// Copies per key and how they are used.
    fleet: FleetPolicy,
    /// The list this core follows: its servers change when the list does.
    list: ServerList,
    /// A pipeline is under way: the list is taken after it.
    list_held: bool,
    /// Where keys moved by list changes may have older entries (empty until one moved a
    /// key): a write deletes its key there too.
    handover: Arc<Handover>,
    /// The labels of the list's servers now, in list order.
    member_labels: Arc<[String]>,
    /// With a storage following the list: the list before the last change, while its
    /// windows last (see [`Prior`](crate::fleet::live::Prior)).
    prior: Option<Arc<crate::fleet::live::Prior>>,
}

/// Per-call working space, reused by the next call so that a warm call allocates nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    /// A namespaced (or base64) wire key.
    keybuf: Vec<u8>,
    /// The last multi-key call's plan and batch list.
    plan: batch::Plan,
    /// The plans of a chain's parts (see `Core::chain`).
    chain: Vec<batch::Plan>,
    batches: Vec<crate::conn::driver::Batch<'static>>,
    /// A batch's keys that a list change moved, and the previous owner each goes to.
    handover: (Vec<u32>, Vec<u32>),
}

impl Scratch {
    /// The buffer a call builds its wire key in.
    pub(crate) fn keybuf(&mut self) -> &mut Vec<u8> {
        &mut self.keybuf
    }

    /// Working space with room for the longest key.
    pub(crate) fn new() -> Scratch {
        Scratch {
            keybuf: Vec::with_capacity(MAX_KEY_LEN),
            ..Scratch::default()
        }
    }
}

/// What a [`Core`] is built from: the builder's settings, resolved.
pub(crate) struct CoreSettings {
    pub(crate) driver: Driver,
    pub(crate) ring: Continuum,
    pub(crate) health: Health,
    pub(crate) labels: Vec<String>,
    pub(crate) max_value: usize,
    pub(crate) namespace: Vec<u8>,
    pub(crate) hash_with_namespace: bool,
    pub(crate) protocol: Protocol,
    pub(crate) sasl: Option<(String, String)>,
    pub(crate) ascii_auth: Option<(String, String)>,
    pub(crate) fleet: FleetPolicy,
    pub(crate) list: ServerList,
    /// The list's generation the core starts with.
    pub(crate) topology: Arc<Topology>,
}

/// Opaques stay below 2^31.
const OPAQUE_MASK: u32 = 0x7fff_ffff;

/// The wire form of a user key: `namespace + key`, validated for the protocol, and the raw
/// namespaced bytes (what is hashed with `hash_with_namespace`). With `binary_keys` (meta), a
/// key that is not a valid text key is sent base64-encoded with the `b` flag (notes §6), so it
/// may hold any bytes, up to 186 of them with the namespace.
#[inline]
fn wire_key<'b>(
    namespace: &[u8],
    user: &'b [u8],
    binary_keys: bool,
    buf: &'b mut Vec<u8>,
) -> Result<(Key<'b>, &'b [u8])> {
    // One validation of the user key: the namespace was validated when the client was built,
    // so only the combined length is left to check.
    let binary = match Key::new(user) {
        Ok(k) if namespace.is_empty() => return Ok((k, user)),
        Ok(_) => false,
        Err(KeyError::BadByte { .. }) if binary_keys => true,
        Err(e) => return Err(e.into()),
    };
    let len = namespace.len() + user.len();
    if binary && len > MAX_BINARY_KEY_LEN {
        return Err(KeyError::BinaryTooLong(len).into());
    }
    if len > MAX_KEY_LEN {
        return Err(KeyError::TooLong(len).into());
    }
    buf.clear();
    buf.extend_from_slice(namespace);
    buf.extend_from_slice(user);
    if !binary {
        return Ok((Key::trusted(buf), buf));
    }
    let raw_len = buf.len();
    let mut tmp = [0u8; MAX_BINARY_KEY_LEN];
    tmp[..raw_len].copy_from_slice(buf);
    meta::encode_base64(buf, &tmp[..raw_len]);
    let (raw, token) = buf.split_at(raw_len);
    Ok((Key::base64_token(token), raw))
}

/// Validates `key` as a call would (namespace, length, binary keys over meta), without
/// keeping its wire form: for keys checked before they are queued.
pub(crate) fn check_key(namespace: &[u8], key: &[u8], binary_keys: bool) -> Result<()> {
    wire_key(namespace, key, binary_keys, &mut Vec::new()).map(drop)
}

impl Core {
    /// A core with no connection open yet.
    pub(crate) fn new(s: CoreSettings) -> Core {
        let n = s.labels.len();
        Core {
            driver: s.driver,
            limits: Limits {
                max_value: s.max_value,
            },
            ring: s.ring,
            labels: s.labels.into(),
            health: s.health,
            namespace: s.namespace.into(),
            hash_with_namespace: s.hash_with_namespace,
            protocol: s.protocol,
            sasl: s.sasl,
            ascii_auth: s.ascii_auth,
            authenticated: vec![0; n],
            instances: vec![None; n],
            pinned: None,
            spread_now: s.fleet.replicated(),
            opaque: 0,
            fleet: s.fleet,
            list: s.list,
            list_held: false,
            pipeline_lost: None,
            handover: Arc::clone(&s.topology.handover),
            member_labels: Arc::clone(&s.topology.member_labels),
            prior: s.topology.prior.clone(),
        }
    }

    /// How long one exchange may wait for a server.
    pub(crate) fn io_timeout(&self) -> std::time::Duration {
        self.driver.io_timeout()
    }

    /// Whether it has a connection open to server `i`.
    pub(crate) fn is_connected(&self, i: usize) -> bool {
        i < self.labels.len() && self.driver.is_connected(i)
    }

    /// The server list this core follows.
    pub(crate) fn server_list(&self) -> &ServerList {
        &self.list
    }

    /// Brings the core up to date: ejected servers whose retry time came back in, and the
    /// list's new generation if it moved (one atomic load when nothing changed).
    #[inline]
    fn sync(&mut self) {
        while self.health.maybe_rejoin(&mut self.ring) && !self.list_held {
            self.adopt_list();
        }
    }

    /// Holds the list this core has until [`release_list`](Self::release_list): for a call
    /// that routes several times with connections left mid-exchange (a pipeline).
    pub(crate) fn hold_list(&mut self) {
        self.sync();
        self.list_held = true;
    }

    pub(crate) fn release_list(&mut self) {
        self.list_held = false;
    }

    /// Takes the list's current generation: new servers get their state (unconnected), the
    /// connections of servers that left are closed (no call of this core is under way:
    /// this runs as a call starts), kept ones stay open.
    #[cold]
    #[inline(never)]
    fn adopt_list(&mut self) {
        let topology = Arc::clone(&self.list.topology());
        self.adopt(&topology);
    }

    /// Takes list generation `topology` (see [`adopt_list`](Self::adopt_list)); also for a
    /// client made for a list about to be published.
    pub(crate) fn adopt(&mut self, topology: &Topology) {
        let n = topology.labels.len();
        // The list checked every new server's TLS name before it was swapped in.
        if let Err(_e) = self.driver.grow(&topology.addrs) {
            debug_assert!(false, "a new server's TLS name was refused: {_e}");
        }
        // Connections to servers that left, or that left and came back in generations this
        // core skipped (a server comes back empty, maybe restarted: a new connection).
        let seen = self.health.list_seen();
        for i in 0..self.labels.len() {
            let left = !topology.ring.is_member(i) || topology.joined[i] > seen;
            if left && self.driver.is_connected(i) {
                self.driver.disconnect(i);
            }
        }
        self.labels = Arc::clone(&topology.labels);
        self.member_labels = Arc::clone(&topology.member_labels);
        self.authenticated.resize(n, 0);
        self.instances.resize(n, None);
        self.ring = topology.ring.clone();
        self.handover = Arc::clone(&topology.handover);
        self.prior = topology.prior.clone();
        self.health.adopt(topology.generation, &topology.labels);
    }

    /// Where older entries of user key `user` may be, if a list change moved it: the map of
    /// previous owners and the key's hash (its wire form built in `kb`). `None` until a
    /// change moved a key (one length test).
    #[inline]
    pub(crate) fn previous_owners(
        &self,
        user: &[u8],
        kb: &mut Vec<u8>,
    ) -> Result<Option<(Arc<Handover>, u32)>> {
        if self.handover.is_empty() {
            return Ok(None);
        }
        let h = self.ring.key_hash().hash(self.hashed(user, kb)?);
        Ok(Some((Arc::clone(&self.handover), h)))
    }

    /// `Err(ServerRemoved)` if server `i` is no longer in the list (a server a storage's
    /// invalidations still reach after a change, [`Prior::lingering`], is still served).
    ///
    /// [`Prior::lingering`]: crate::fleet::live::Prior::lingering
    #[inline]
    fn check_member(&self, i: usize) -> Result<()> {
        if self.ring.is_member(i) || self.lingers(i) {
            return Ok(());
        }
        Err(Error::ServerRemoved {
            server: self.labels[i].clone(),
        })
    }

    /// Whether server `i` left the list in a change whose storage windows are still open.
    #[cold]
    fn lingers(&self, i: usize) -> bool {
        self.prior
            .as_ref()
            .is_some_and(|p| p.ring.is_member(i) && p.lingering())
    }

    // The door: what the fronts read and ask of a core (its fields stay private here).

    /// The server labels by index (every server the list ever named), shared.
    #[inline]
    pub(crate) fn labels(&self) -> &Arc<[String]> {
        &self.labels
    }

    /// The labels of the list's servers now, in list order.
    pub(crate) fn member_labels(&self) -> &Arc<[String]> {
        &self.member_labels
    }

    /// The wire protocol.
    #[inline]
    pub(crate) fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The namespace (key prefix), shared.
    #[inline]
    pub(crate) fn namespace(&self) -> &Arc<[u8]> {
        &self.namespace
    }

    /// The size limits replies and values are checked against.
    #[inline]
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The key distribution.
    pub(crate) fn ring(&self) -> &Continuum {
        &self.ring
    }

    /// Whether the connections are TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.driver.is_tls()
    }

    /// The record of ejections shared with other cores.
    pub(crate) fn shared_health(&self) -> &Arc<SharedHealth> {
        self.health.shared()
    }

    /// Each server's counters, in configuration order.
    pub(crate) fn server_counters(&self) -> Vec<(String, ServerCounters)> {
        (self.ring.members().iter().map(|&i| i as usize))
            .map(|i| {
                let mut c = self.health.counters(i);
                c.reconnects = self.driver.connects(i).saturating_sub(1);
                c.tls_resumptions = self.driver.resumed(i);
                (self.labels[i].clone(), c)
            })
            .collect()
    }

    /// The index of the server labelled `server` (as configured).
    pub(crate) fn server_index(&self, server: &str) -> Result<usize> {
        self.labels
            .iter()
            .position(|l| l == server)
            .ok_or_else(|| Error::Config(format!("no server {server:?} in this client")))
    }

    /// Where `key` goes now, and its own server (where it goes with every server up), for
    /// a call about to be made there: a server being probed is given to this call (which
    /// must then be made, pinned, and report) or refused if another call probes it.
    pub(crate) fn route_key(&mut self, scratch: &mut Scratch, key: &[u8]) -> Result<Route> {
        let hashed = self.hashed(key, &mut scratch.keybuf)?;
        let server = self.route(hashed)?;
        let home = self.ring.pick_home(hashed).ok_or(Error::NoServers)?;
        Ok(Route { server, home })
    }

    /// [`route_key`](Self::route_key) without taking a probe: for a caller that asks where
    /// a key goes and then pins its calls there (the storage), or only asks.
    pub(crate) fn route_key_peek(&mut self, scratch: &mut Scratch, key: &[u8]) -> Result<Route> {
        let server = self.server_now(scratch, key)?;
        let hashed = self.hashed(key, &mut scratch.keybuf)?;
        let home = self.ring.pick_home(hashed).ok_or(Error::NoServers)?;
        Ok(Route { server, home })
    }

    /// The servers the storage uses for `key` ([`KeyServers`]): without copies its route
    /// ([`route_key_peek`](Self::route_key_peek)); with copies, for a read its
    /// [`read_order`](Self::read_order), for an invalidation every copy. Takes no probe:
    /// the storage pins its calls.
    pub(crate) fn storage_servers(
        &mut self,
        scratch: &mut Scratch,
        key: &[u8],
        read: bool,
    ) -> Result<KeyServers> {
        if !self.fleet.replicated() {
            let route = self.route_key_peek(scratch, key);
            if self.list.storage_skew().is_none() {
                return route.map(KeyServers::Route);
            }
            let route = match route {
                // The key's server is down: an invalidation still deletes where else the key
                // may be (its delete there fails, and is remembered).
                Err(Error::ServerDown { .. }) if !read => {
                    let home = self.home_of_key(scratch, key)?;
                    Route { server: home, home }
                }
                r => r?,
            };
            return self.storage_spread(scratch, key, route, read);
        }
        if read {
            return self.read_order(scratch, key, true).map(KeyServers::Copies);
        }
        let copies = self.copies_of(scratch, key)?;
        Ok(KeyServers::Copies(Servers::from_slice(copies.as_slice())))
    }

    /// [`storage_servers`](Self::storage_servers) for a storage that follows a changing list
    /// (see `storage::memcache`). Reads: the key's route, but just after a change (within
    /// the skew) the server that owned it before if it is still in the list (not a stand-in
    /// if that one is ejected: the read goes to the master). Invalidations: the route, the
    /// key's next server (where it goes if its own leaves), and while the change's windows
    /// last, the server that owned it before (even if it left).
    fn storage_spread(
        &mut self,
        scratch: &mut Scratch,
        key: &[u8],
        route: Route,
        read: bool,
    ) -> Result<KeyServers> {
        let hashed = self.hashed(key, &mut scratch.keybuf)?;
        let h = self.ring.key_hash().hash(hashed);
        let before = (self.prior.as_ref())
            .filter(|p| if read { p.reading() } else { p.lingering() })
            .and_then(|p| p.ring.pick_home(hashed))
            .filter(|&b| b != route.home);
        let reader = match before {
            Some(b) if self.ring.is_member(b) => Some(b),
            _ => None,
        };
        if read {
            return Ok(KeyServers::Route(match reader {
                Some(b) if self.health.check_routed(b).is_ok() => Route { server: b, home: b },
                // Not read from its stand-in: the read goes to the master.
                Some(b) => Route {
                    server: route.server,
                    home: b,
                },
                None => route,
            }));
        }
        let mut also = Servers::from_slice(&[]);
        for s in [self.ring.next_home_hash(h), before].into_iter().flatten() {
            if s != route.server && !also.iter().any(|x| x == s) {
                also.push(s as u32);
            }
        }
        let reader = self
            .prior
            .as_ref()
            .filter(|p| p.reading())
            .and(reader)
            .map(|b| b as u32);
        Ok(KeyServers::Spread {
            route,
            also,
            reader,
        })
    }

    /// Where `key` goes now (an error if that server is ejected), for a caller that asks
    /// without making a call: a server being probed counts as up, and its probe stays
    /// for a call to take.
    pub(crate) fn server_now(&mut self, scratch: &mut Scratch, key: &[u8]) -> Result<usize> {
        let hashed = self.hashed(key, &mut scratch.keybuf)?;
        self.sync();
        let i = self
            .pinned
            .or_else(|| self.ring.pick(hashed))
            .ok_or(Error::NoServers)?;
        self.health
            .check_routed(i)
            .map_err(|retry_in| Error::ServerDown {
                server: self.labels[i].clone(),
                retry_in,
            })?;
        Ok(i)
    }

    /// `key`'s own server, with every server up.
    pub(crate) fn home_of_key(&mut self, scratch: &mut Scratch, key: &[u8]) -> Result<usize> {
        self.sync();
        let hashed = self.hashed(key, &mut scratch.keybuf)?;
        self.ring.pick_home(hashed).ok_or(Error::NoServers)
    }

    /// Whether keyed calls go through the fleet layer: keys have copies and no call pinned
    /// this client to one server.
    #[inline]
    pub(crate) fn replicated(&self) -> bool {
        self.spread_now
    }

    /// How keys are copied and read.
    #[inline]
    pub(crate) fn fleet(&self) -> &FleetPolicy {
        &self.fleet
    }

    /// The fleet state shared with the clients of this pool or shared client.
    pub(crate) fn fleet_shared(&self) -> &FleetShared {
        &self.health.shared().fleet
    }

    /// `key`'s copies (validating it), its own server first.
    pub(crate) fn copies_of(
        &mut self,
        scratch: &mut Scratch,
        key: &[u8],
    ) -> Result<crate::ring::Replicas> {
        self.copies_for(key, &mut scratch.keybuf)
    }

    /// [`copies_of`](Self::copies_of), with the wire key built in `keybuf`.
    pub(crate) fn copies_for(
        &mut self,
        key: &[u8],
        keybuf: &mut Vec<u8>,
    ) -> Result<crate::ring::Replicas> {
        self.sync();
        let hashed = self.hashed(key, keybuf)?;
        let (n, placement) = (self.fleet.replicas, self.fleet.placement);
        let r = match &self.health.shared().fleet.zones {
            Some(zones) => zones.copies(hashed, n, placement),
            None => self.ring.replicas(hashed, n, placement),
        };
        if r.as_slice().is_empty() {
            return Err(Error::NoServers);
        }
        Ok(r)
    }

    /// How copy `i` stands for a call on `key`: marked down, waiting for a repair of the
    /// key, or up.
    /// Takes nothing: a copy being probed is [`Standing::Probe`] (see [`take_probe`]).
    /// A copy waiting for a repair of the key is `Blocked` even if it is also down: a pinned
    /// call could reach it once its breaker half-opens.
    ///
    /// [`take_probe`]: Self::take_probe
    pub(crate) fn standing(&mut self, i: usize, key: &[u8]) -> Standing {
        self.sync();
        if self.fleet_shared().repairs.blocks(i, key) {
            Standing::Blocked
        } else if self.health.retry_in(i) > std::time::Duration::ZERO {
            Standing::Down
        } else if self.health.is_probed(i) {
            Standing::Probe
        } else {
            Standing::Up
        }
    }

    /// [`standing`](Self::standing) for a call about to be made on copy `i` (a write, a
    /// meta call): a copy being probed becomes `Up` if this call takes its probe (it then
    /// reports as any call does), `Down` if another call holds it.
    pub(crate) fn standing_to_call(&mut self, i: usize, key: &[u8]) -> Standing {
        match self.standing(i, key) {
            Standing::Probe if self.health.check(i).is_ok() => Standing::Up,
            Standing::Probe => Standing::Down,
            s => s,
        }
    }

    /// The order a read of `key` tries its copies in; with zones, `prefer` puts the
    /// preferred zone's first (see [`readable`](Self::readable)).
    pub(crate) fn read_order(
        &mut self,
        scratch: &mut Scratch,
        key: &[u8],
        prefer: bool,
    ) -> Result<Servers> {
        let copies = self.copies_of(scratch, key)?;
        let copies = self.readable(copies.as_slice(), prefer);
        let mut st = [Standing::Up; crate::ring::MAX_REPLICAS];
        for (k, i) in copies.iter().enumerate() {
            st[k] = self.standing(i, key);
        }
        let slice = copies.as_slice();
        let fleet = self.fleet_shared();
        Ok(crate::fleet::plan::read_order(
            slice,
            |i| st[slice.iter().position(|&s| s as usize == i).unwrap_or(0)],
            |i| fleet.latency[i].median(),
        ))
    }

    /// The copies a read may use, in the order it prefers them: with zones, without those
    /// of write-only zones, and with `prefer` the preferred zone's first (a plain read; a
    /// `gets` keeps the order every client agrees on, where its `cas` goes).
    pub(crate) fn readable(&self, copies: &[u32], prefer: bool) -> Servers {
        match &self.fleet_shared().zones {
            Some(zones) => zones.readable(copies, prefer),
            None => Servers::from_slice(copies),
        }
    }

    /// Sends every keyed call to `server` from now on (`None`: the continuum decides again);
    /// returns the pin it replaces.
    pub(crate) fn pin(&mut self, server: Option<usize>) -> Option<usize> {
        self.spread_now = self.fleet.replicated() && server.is_none();
        std::mem::replace(&mut self.pinned, server)
    }

    /// Whether server `i`'s connection may take part in a hedged read, which it may lose:
    /// it carries no quiet writes unconfirmed by a sync, and has room for one more late
    /// reply (see [`hedge`]).
    pub(crate) fn may_race(&self, i: usize) -> bool {
        !self.driver.owes_sync(i) && self.driver.late_has_room(i)
    }

    /// Brings ejected servers whose retry time has come back into the continuum, and the
    /// server list up to date.
    pub(crate) fn maybe_rejoin(&mut self) {
        self.sync();
    }

    /// Counts a lookup's hit or miss on server `i`.
    #[inline]
    pub(crate) fn count_lookup(&mut self, i: usize, hit: bool) {
        self.health.count_lookup(i, hit);
    }

    /// Asks each connected server to close the connection (`quit`) and closes it; the first
    /// server whose `quit` could not be written is the error.
    pub(crate) fn quit(&mut self) -> Result<()> {
        let mut first_error = None;
        for i in 0..self.labels.len() {
            if !self.driver.is_connected(i) {
                continue;
            }
            let protocol = self.protocol;
            let sent = self.driver.begin(i).and_then(|op| {
                protocol.encode(self.driver.wbuf(i), &Cmd::Quit, 0, false);
                self.driver
                    .exchange(i, &op, None, Until::Written, |_| Ok(Status::Partial))
            });
            self.driver.disconnect(i);
            if let Err(e) = sent {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The bytes the ring hashes for a user key: the key, or the namespaced key when the
    /// namespace is hashed with it. Validates the key.
    #[inline]
    fn hashed<'k>(&self, key: &'k [u8], keybuf: &'k mut Vec<u8>) -> Result<&'k [u8]> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (_, raw) = wire_key(&self.namespace, key, binary_keys, keybuf)?;
        Ok(if self.hash_with_namespace { raw } else { key })
    }

    /// The server for a key: `Err` if there is none or it is ejected.
    #[inline]
    pub(crate) fn route(&mut self, hashed: &[u8]) -> Result<usize> {
        self.sync();
        // A pinned call was routed by its caller, who took the probe if there is one.
        let checked = match self.pinned {
            Some(i) => {
                self.check_member(i)?;
                Some((i, self.health.check_routed(i)))
            }
            None => self.ring.pick(hashed).map(|i| (i, self.health.check(i))),
        };
        match checked {
            Some((i, up)) => match up {
                Ok(()) => Ok(i),
                Err(retry_in) => Err(Error::ServerDown {
                    server: self.labels[i].clone(),
                    retry_in,
                }),
            },
            None => Err(Error::NoServers),
        }
    }

    /// The error of a call that did not go to server `i` because it is marked down (without
    /// taking its probe, as [`check_up`](Self::check_up) may).
    pub(crate) fn down_error(&self, i: usize) -> Error {
        Error::ServerDown {
            server: self.labels[i].clone(),
            retry_in: self.health.retry_in(i),
        }
    }

    #[inline]
    pub(crate) fn check_up(&self, i: usize) -> Result<()> {
        self.check_member(i)?;
        // A client pinned to `i` was routed there by its caller, who took the probe.
        let up = match self.pinned {
            Some(p) if p == i => self.health.check_routed(i),
            _ => self.health.check(i),
        };
        up.map_err(|retry_in| Error::ServerDown {
            server: self.labels[i].clone(),
            retry_in,
        })
    }

    /// Whether server `i` may be asked by a call its caller routed there (a probe of a
    /// half-open server is the caller's, taken when it routed).
    pub(crate) fn check_routed_up(&self, i: usize) -> Result<()> {
        self.check_member(i)?;
        self.health
            .check_routed(i)
            .map_err(|retry_in| Error::ServerDown {
                server: self.labels[i].clone(),
                retry_in,
            })
    }

    /// `Err(Unsupported)` unless this client's protocol can express `cap`.
    pub(crate) fn require(&self, cap: Capability, operation: &'static str) -> Result<()> {
        if self.protocol.supports(cap) {
            return Ok(());
        }
        Err(Error::Unsupported {
            operation,
            protocol: self.protocol,
        })
    }

    /// [`keyed`](Self::keyed) for a command that changes the key: after a list change
    /// moved the key, it is also deleted where it was (see [`previous_owners`]). The
    /// write's own error comes first, then a failed delete's (the old entry may remain).
    ///
    /// [`previous_owners`]: Self::previous_owners
    #[inline(always)]
    pub(crate) fn keyed_write<T>(
        &mut self,
        user: &[u8],
        kb: &mut Vec<u8>,
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        let r = self.keyed(user, kb, f);
        if self.handover.is_empty() {
            return r;
        }
        let handed = self.hand_over(user, kb);
        let v = r?;
        handed.map(|()| v)
    }

    /// Deletes `user` on its previous owners, one round trip each.
    #[cold]
    #[inline(never)]
    pub(crate) fn hand_over(&mut self, user: &[u8], kb: &mut Vec<u8>) -> Result<()> {
        let Some((handover, h)) = self.previous_owners(user, kb)? else {
            return Ok(());
        };
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (wire, raw) = wire_key(&self.namespace, user, binary_keys, kb)?;
        let hashed = if self.hash_with_namespace { raw } else { user };
        let now = self.ring.pick(hashed).ok_or(Error::NoServers)?;
        let mut first_error = None;
        for j in handover.owners(h).iter().map(|&j| j as usize) {
            if j == now {
                continue;
            }
            let r = self
                .check_up(j)
                .and_then(|()| self.call(j, &Cmd::delete(wire), None, |o, _| reply::existed(o)));
            if !matches!(r, Err(Error::ServerDown { .. })) {
                self.health.record(j, &r, &mut self.ring);
            }
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    #[inline(always)]
    pub(crate) fn keyed<T>(
        &mut self,
        user: &[u8],
        kb: &mut Vec<u8>,
        f: impl FnOnce(&mut Core, usize, Key<'_>) -> Result<T>,
    ) -> Result<T> {
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (wire, raw) = wire_key(&self.namespace, user, binary_keys, kb)?;
        let hashed = if self.hash_with_namespace { raw } else { user };
        let i = self.route(hashed)?;
        let r = f(self, i, wire);
        self.health.record(i, &r, &mut self.ring);
        r
    }

    /// Which process server `i` is (connecting if needed; asked with `stats` once per
    /// connection): see [`Client::instance`](crate::Client::instance). A failure counts in
    /// the server's health.
    pub(crate) fn instance(&mut self, i: usize) -> Result<ServerInstance> {
        self.check_up(i)?;
        let r = self.ask_instance(i);
        self.health.record(i, &r, &mut self.ring);
        r
    }

    fn ask_instance(&mut self, i: usize) -> Result<ServerInstance> {
        self.start(i)?; // connected (and authenticated) now, if it was not
        let conn = self.driver.connects(i);
        if let Some((at, id)) = self.instances[i] {
            if at == conn {
                return Ok(id);
            }
        }
        let (mut pid, mut time, mut uptime) = (None, None, None);
        self.call(i, &Cmd::Stats(None), None, |o, _| match o {
            Outcome::Stat(name, value) => {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                match name {
                    b"pid" => pid = v,
                    b"time" => time = v,
                    b"uptime" => uptime = v,
                    _ => {}
                }
                Ok(None)
            }
            Outcome::End | Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        })?;
        let id = ServerInstance {
            server: i,
            // memcached's `time - uptime` is its start time, constant for the process. A
            // server that reports neither is one instance as far as we can tell.
            pid: pid.unwrap_or(0),
            started: time.zip(uptime).map_or(0, |(t, u)| t.saturating_sub(u)),
        };
        self.instances[i] = Some((conn, id));
        Ok(id)
    }

    #[inline]
    pub(crate) fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.limits.max_value {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max: self.limits.max_value,
            });
        }
        Ok(())
    }

    /// Runs one command on server `i`: connect (and authenticate) if needed, encode, send
    /// (with `value` after the command), and fold the reply units with `on` until it returns
    /// the result. See [`exchange`](Self::exchange).
    pub(crate) fn call<T>(
        &mut self,
        i: usize,
        cmd: &Cmd<'_>,
        value: Option<&[u8]>,
        on: impl FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let started = self.health.observe.start();
        let span = self.health.observe.span(CallOp {
            kind: cmd.kind(),
            server: Some(i),
            servers: 1,
            protocol: self.protocol,
            keys: usize::from(cmd.key().is_some()),
            value_bytes: value.map_or(0, <[u8]>::len),
        });
        let r = span.run(|| {
            let op = self.start(i)?;
            with_wire!(self.protocol, W => self.exchange::<W, T>(i, &op, cmd, value, on))
        });
        self.health.observe.call(i, cmd.kind(), false, started);
        self.health.observe.bytes(i, self.driver.bytes(i));
        r
    }

    /// Encodes `cmd` for server `i` (already started), sends it and folds each reply unit
    /// with `on`: `Some(result)` ends the exchange, `None` asks for more, and `Err` (a reply
    /// that cannot answer this command) drops the connection. An error reply ends it with
    /// the matching error; after a `SERVER_ERROR`, a status the server closes after, or an
    /// error answering a command with a data block, the connection is closed.
    pub(crate) fn exchange<W: Wire, T>(
        &mut self,
        i: usize,
        op: &Op,
        cmd: &Cmd<'_>,
        value: Option<&[u8]>,
        on: impl FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let opaque = self.next_opaque();
        let mut strays = Strays::on(&mut self.driver, i);
        let w = self.driver.wbuf(i);
        if strays.owed {
            // Quiet commands went out before without a sync: a sync of our own goes first,
            // and whatever they answered is read up to its reply, never as ours.
            W::encode(w, &Cmd::Sync, 0, false);
        }
        W::encode(w, cmd, opaque, false);
        let separate = match value {
            // Large values go out straight from the caller's slice, without a copy.
            Some(v) if v.len() > COPY_VALUE_MAX => Some((v, W::TRAILER)),
            Some(v) => {
                w.extend_from_slice(v);
                w.extend_from_slice(W::TRAILER);
                None
            }
            None => None,
        };
        let mut reader = SingleReader {
            expect: Expect::single(cmd.kind(), opaque),
            limits: self.limits,
            label: &self.labels[i],
            data_block: value.is_some(),
            on,
            out: None,
            refused: None,
        };
        self.driver.exchange(i, op, separate, Until::Done, |buf| {
            if strays.pending {
                return strays.read::<W>(buf, &reader.limits);
            }
            reader.read::<W>(buf)
        })?;
        strays.settle(&mut self.driver, &mut self.health, i);
        if let Some((error, close)) = reader.refused {
            if close {
                self.driver.disconnect(i);
            }
            return Err(error);
        }
        Ok(reader
            .out
            .expect("exchange returns Ok only after the last reply"))
    }

    /// The next opaque: unique on every connection of this client among the requests that
    /// may still be answered (31 bits: binary's sync uses `u32::MAX`).
    #[inline]
    pub(crate) fn next_opaque(&mut self) -> u32 {
        self.opaque = self.opaque.wrapping_add(1) & OPAQUE_MASK;
        self.opaque
    }

    /// `n` consecutive opaques for a batch's items: the first is returned, item `j` has
    /// `first + j`.
    pub(crate) fn reserve_opaques(&mut self, n: usize) -> u32 {
        let n = u32::try_from(n).unwrap_or(OPAQUE_MASK).min(OPAQUE_MASK / 2);
        if self.opaque > OPAQUE_MASK - n {
            self.opaque = 0;
        }
        let first = self.opaque + 1;
        self.opaque += n;
        first
    }

    /// Runs `cmd` on every server in turn (skipping ejected ones, which count as failed),
    /// folding replies with `on` and recording health. Returns each server's result.
    pub(crate) fn each_server<T>(
        &mut self,
        cmd: &Cmd<'_>,
        mut on: impl FnMut(Outcome<'_>) -> Result<Option<T>, ParseError>,
    ) -> Vec<(usize, Result<T>)> {
        self.sync();
        let members = self.ring.members().to_vec();
        (members.into_iter())
            .map(|i| (i as usize, self.on_server(i as usize, cmd, &mut on)))
            .collect()
    }

    /// Runs `cmd` on server `i` unless it is ejected, and records the outcome in its health.
    pub(crate) fn on_server<T>(
        &mut self,
        i: usize,
        cmd: &Cmd<'_>,
        on: &mut impl FnMut(Outcome<'_>) -> Result<Option<T>, ParseError>,
    ) -> Result<T> {
        let r = self
            .check_up(i)
            .and_then(|()| self.call(i, cmd, None, |o, _| on(o)));
        if !matches!(r, Err(Error::ServerDown { .. })) {
            self.health.record(i, &r, &mut self.ring);
        }
        r
    }

    /// Combines per-server results: all values if every server succeeded, otherwise the one
    /// error, or [`Error::Partial`] listing each failed server.
    pub(crate) fn all_or_errors<T>(
        &self,
        results: Vec<(usize, Result<T>)>,
    ) -> Result<Vec<(usize, T)>> {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in results {
            match r {
                Ok(t) => ok.push((i, t)),
                Err(e) => failed.push((self.labels[i].clone(), e)),
            }
        }
        combine(failed).map(|()| ok)
    }

    /// Runs a command with an `OK` reply on every server.
    pub(crate) fn on_all_ok(&mut self, cmd: &Cmd<'_>) -> Result<()> {
        let results = self.each_server(cmd, |o| match o {
            Outcome::Ok => Ok(Some(())),
            _ => Err(ParseError::Unexpected),
        });
        self.all_or_errors(results).map(drop)
    }
}

/// The result of work spread over servers: `Ok` if none failed, else the one failed server's
/// error, or [`Error::Partial`] listing each.
fn combine(mut failed: Vec<(String, Error)>) -> Result<()> {
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.pop().expect("one").1),
        _ => Err(Error::Partial { failed }),
    }
}
