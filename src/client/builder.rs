//! [`ClientBuilder`]: servers, distribution, timeouts, failure policy, namespace.

use std::sync::Arc;
use std::time::Duration;

use super::{Client, Protocol};
use crate::addr::ServerSpec;
use crate::conn::driver::{Driver, DriverConfig};
use crate::engine::health::{FailurePolicy, Health, SharedHealth};
use crate::engine::{Core, CoreSettings, Scratch};
use crate::error::{Error, Result};
use crate::fleet::live::{ring_server, Churn, ListSettings, ServerList};
use crate::fleet::zones::Zones;
use crate::fleet::{FleetPolicy, Hedge, WritePolicy};
use crate::proto::text::MAX_LINE;
use crate::proto::wire::Capability;
use crate::proto::{Key, MAX_KEY_LEN};
use crate::ring::{Continuum, Distribution, HashFn, ReplicaPlacement, RingServer, MAX_REPLICAS};

/// Builds a [`Client`].
///
/// Defaults follow libmemcached: modula distribution with the one-at-a-time hash, a server
/// ejected after 5 consecutive failures and retried after 2 s, failed servers' keys not
/// redistributed.
///
/// ```
/// use std::time::Duration;
/// use mcstore::{Client, ring::Distribution};
/// let client = Client::builder()
///     .servers(["127.0.0.1:11211", "127.0.0.1:11212:2"])  // host:port[:weight]
///     .distribution(Distribution::Ketama)
///     .connect_timeout(Duration::from_millis(200))
///     .io_timeout(Duration::from_millis(100))
///     .server_failure_limit(2)
///     .retry_timeout(Duration::from_secs(1))
///     .remove_failed_servers(true)
///     .namespace("app1:")
///     .build()
///     .unwrap(); // connects lazily, on the first call
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    servers: Vec<std::result::Result<ServerSpec, String>>,
    connect_timeout: Duration,
    pub(super) io_timeout: Duration,
    max_value_size: usize,
    distribution: Distribution,
    hash: Option<HashFn>,
    failure_limit: u32,
    retry_timeout: Duration,
    remove_failed: bool,
    max_removed: Option<usize>,
    pub(crate) namespace: Vec<u8>,
    hash_with_namespace: bool,
    protocol: Protocol,
    sasl: Option<(String, String)>,
    ascii_auth: Option<(String, String)>,
    #[cfg(feature = "tls")]
    tls: Option<crate::TlsConfig>,
    /// The list to follow (a pool's clients follow the first one's): they share it, and
    /// who is ejected.
    list: Option<ServerList>,
    churn: Churn,
    fleet: FleetPolicy,
    /// Zones: a name and its servers (a range of `servers`).
    zones: Vec<(String, std::ops::Range<usize>)>,
    prefer_zone: Option<String>,
    write_only_zones: Vec<String>,
    /// Built by [`one_copy`](Self::one_copy): zones ignored.
    single_copy: bool,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            servers: Vec::new(),
            connect_timeout: Duration::from_millis(1000),
            io_timeout: Duration::from_millis(1000),
            max_value_size: 1024 * 1024,
            distribution: Distribution::Modula,
            hash: None,
            failure_limit: 5,
            retry_timeout: Duration::from_secs(2),
            remove_failed: false,
            max_removed: None,
            namespace: Vec::new(),
            hash_with_namespace: false,
            protocol: Protocol::Text,
            sasl: None,
            ascii_auth: None,
            #[cfg(feature = "tls")]
            tls: None,
            list: None,
            churn: Churn::default(),
            fleet: FleetPolicy::default(),
            zones: Vec::new(),
            prefer_zone: None,
            write_only_zones: Vec::new(),
            single_copy: false,
        }
    }
}

impl ClientBuilder {
    /// Adds a server: `host:port[:weight]`, `host` (port 11211), `[v6]:port[:weight]`, or a
    /// Unix socket path (`/path` or `unix:/path`). The order matters: it is the server order
    /// libmemcached uses for distribution.
    pub fn server(mut self, spec: impl AsRef<str>) -> Self {
        let s = spec.as_ref();
        self.servers.push(s.parse().map_err(|_| s.to_string()));
        self
    }

    /// Adds several servers (see [`server`](Self::server)).
    pub fn servers<I, S>(mut self, specs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for s in specs {
            self = self.server(s);
        }
        self
    }

    /// Adds a server in typed form.
    pub fn add_server(mut self, spec: ServerSpec) -> Self {
        self.servers.push(Ok(spec));
        self
    }

    setters! {
        /// How keys are spread over servers (default: modula, as libmemcached).
        distribution(d: Distribution) => distribution;
    }

    /// The key hash (default: one-at-a-time; MD5 for [`Distribution::KetamaWeighted`]).
    pub fn hash(mut self, h: HashFn) -> Self {
        self.hash = Some(h);
        self
    }

    setters! {
        /// How long opening a connection may take (default 1 s).
        connect_timeout(t: Duration) => connect_timeout;

        /// How long one call may wait for the network once connected (default 1 s). A call that
        /// runs out fails with [`Error::Timeout`], never with a silent miss.
        io_timeout(t: Duration) => io_timeout;

        /// The largest value the client will send or accept (default 1 MiB, memcached's default
        /// item size). A reply claiming more is rejected before anything is buffered.
        max_value_size(bytes: usize) => max_value_size;
    }

    /// Consecutive failures (I/O errors, timeouts, malformed replies) after which a server is
    /// ejected for [`retry_timeout`](Self::retry_timeout) (default 5). While ejected, calls
    /// for its keys fail at once with [`Error::ServerDown`], or go to the other servers if
    /// [`remove_failed_servers`](Self::remove_failed_servers) is on.
    pub fn server_failure_limit(mut self, n: u32) -> Self {
        self.failure_limit = n.max(1);
        self
    }

    setters! {
        /// How long an ejected server stays out before it is tried again (default 2 s). On its
        /// first call back it rejoins if that call succeeds, and is ejected again if it fails.
        retry_timeout(t: Duration) => retry_timeout;

        /// Whether an ejected server's keys move to the rest of the continuum while it is out
        /// (default off: they fail fast). Only consistent distributions move keys; under modula
        /// they always fail fast, as in libmemcached.
        remove_failed_servers(on: bool) => remove_failed;
    }

    /// With [`remove_failed_servers`](Self::remove_failed_servers): at most `n` servers are
    /// off the continuum at once (default: a third of the servers, at least one). Beyond
    /// that, an ejected server's keys fail fast instead of moving, so a burst of failures
    /// (or of false alarms) cannot send most keys at once to servers that do not hold them,
    /// and the database behind them a wave of misses (Slack's outage of 2022-02-22).
    /// Servers out longest are the ones removed.
    pub fn max_removed_servers(mut self, n: usize) -> Self {
        self.max_removed = Some(n);
        self
    }

    /// Keeps every key on `n` servers (default 1, at most 4 and at most the server count):
    /// its own server and the next ones as [`replica_placement`](Self::replica_placement)
    /// says. Writes go to every copy ([`write_policy`](Self::write_policy) says what they
    /// wait for); a read asks one copy and fails over to the next within the same call when
    /// that one fails, times out or is marked down (and, with [`hedge`](Self::hedge), asks a
    /// second copy when the first is slow). A copy that missed a write never serves that key
    /// again before it is repaired (the key deleted there). What each command does with
    /// copies, `cas` and `incr`/`decr` included, is in the crate's fleet documentation
    /// ([`Client::fleet_counters`](crate::Client::fleet_counters) counts it):
    ///
    /// - `set`, `delete`, `touch`: every copy. `add`, `replace`, `append`, `prepend`: every
    ///   copy; the first copy in placement order decides the result, and a copy that
    ///   disagrees (stored where the first did not, or the reverse) is deleted.
    /// - `cas`, `incr`, `decr`: the first copy that answers, in placement order (a CAS
    ///   unique, or a counter, only means something on one server); when they change the
    ///   item, the other copies are deleted. A `gets` answered by another copy after a
    ///   failover returns that copy's unique: a `cas` with it then fails with `Exists`
    ///   (safe) unless that copy is the first one up. A counter lives on one copy: a read
    ///   that fails over from it misses.
    /// - `gat`/`gats` are reads: they move the expiry of the copy that answered only.
    /// - Reads keep placement order unless a copy is down, stuck or much slower; a key only
    ///   one copy holds (after `cas`, `incr`, `decr`, or a repair that deleted it on a
    ///   copy) reads as a miss when the read goes to another copy.
    /// - A write reaches every copy in one round trip; multi-key calls send their keys'
    ///   copies in one batch per server (a multi-get asks each key's first copy, then the
    ///   keys whose copy failed, or missed with
    ///   [`read_miss_failover`](Self::read_miss_failover), of their next one).
    ///
    /// Meta calls (`meta_get`, `meta_set`, `invalidate`, `meta_debug`, leases) go to the
    /// first copy up (leases and CAS uniques live on one server); `meta_set` and `invalidate`
    /// that change the item delete the other copies. Server-wide commands go to every server
    /// as before. Pipelined (noreply) writes go to every copy up, conditional ones (add,
    /// replace, append, prepend, incr, decr) to the first and a delete to the others. With
    /// one copy nothing of this runs.
    pub fn replicas(mut self, n: usize) -> Self {
        self.fleet.replicas = n.clamp(1, MAX_REPLICAS);
        self
    }

    /// Where a key's further copies live (default [`ReplicaPlacement::Natural`]: the next
    /// servers on the continuum, or in the list under modula; [`ReplicaPlacement::List`] is
    /// libmemcached's placement, for a cluster shared with libmemcached clients).
    pub fn replica_placement(mut self, p: ReplicaPlacement) -> Self {
        self.fleet.placement = p;
        self
    }

    /// What a write waits for with [`replicas`](Self::replicas) (default
    /// [`WritePolicy::All`]).
    pub fn write_policy(mut self, p: WritePolicy) -> Self {
        self.fleet.write = p;
        self
    }

    /// Hedged reads with [`replicas`](Self::replicas): a read not answered after `hedge`'s
    /// delay is sent to the next copy too, and the first answer wins (the late one is read
    /// and dropped, the connection's framing intact). Hedges are limited by a budget (5% of
    /// reads by default). A [`SharedClient`](crate::SharedClient)'s I/O thread reads
    /// the late reply; a [`Client`]'s next call on that connection reads it first, before
    /// its own (a copy that leaves a second read unanswered is disconnected and counts as
    /// timed out).
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.fleet.hedge = Some(hedge);
        self
    }

    /// Adds a zone: a pool of servers with its own continuum (as libmemcached would build
    /// it for those servers alone), holding a copy of every key ([`replicas`](Self::replicas)
    /// copies, one by default). With zones, every server belongs to one: servers are given
    /// here, not with [`server`](Self::server). EVCache's model:
    ///
    /// - Writes go to every zone, as to every copy (see [`replicas`](Self::replicas) for
    ///   what each command does, and [`write_policy`](Self::write_policy)).
    /// - A read (`get`, `gat`) asks the [preferred zone](Self::prefer_zone) first and another
    ///   zone when that copy fails, is down or (with [`hedge`](Self::hedge)) slow. `gets`,
    ///   `gats`, `cas`, `incr`, `decr` and meta calls use the zones in the order they were
    ///   added, the same for every client whatever is write-only, so a `gets`' unique is
    ///   the one `cas` checks and a counter lives where every client looks for it.
    /// - A [write-only](Self::write_only_zone) zone gets every write and serves no read
    ///   (meta reads included), while it warms up;
    ///   [`Client::set_zone_write_only`](crate::Client::set_zone_write_only) changes that at
    ///   run time. Add a zone that warms up last: while the first zone is write-only, `cas`
    ///   and counters still run there (a `gets` unique from another zone then fails safely
    ///   with `Exists`, and reads of a counter miss).
    ///
    /// At most 4 copies in all (zones times replicas).
    pub fn zone<I, S>(mut self, name: impl Into<String>, servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let start = self.servers.len();
        self = self.servers(servers);
        self.zones.push((name.into(), start..self.servers.len()));
        self
    }

    /// The zone reads go to first (default: the first zone added).
    pub fn prefer_zone(mut self, name: impl Into<String>) -> Self {
        self.prefer_zone = Some(name.into());
        self
    }

    /// Marks zone `name` write-only from the start: written to, never read from (a zone
    /// warming up). A pool or shared client built from here starts so; change it at run time
    /// with `set_zone_write_only`.
    pub fn write_only_zone(mut self, name: impl Into<String>) -> Self {
        self.write_only_zones.push(name.into());
        self
    }

    /// With [`replicas`](Self::replicas) or zones: a read that misses on a copy asks the
    /// next copy too, within the same call (mcrouter's `MissFailoverRoute`), for a copy that
    /// is warming up (a server just added or restarted, a zone being filled). Off by
    /// default: a miss then costs one more request per copy left. The value found is not
    /// written back to the copy that missed.
    pub fn read_miss_failover(mut self, on: bool) -> Self {
        self.fleet.miss_failover = on;
        self
    }

    /// A prefix sent in front of every key (libmemcached's `MEMCACHED_CALLBACK_PREFIX_KEY`).
    /// Keys passed to and returned by the client are without it.
    pub fn namespace(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.namespace = prefix.into();
        self
    }

    setters! {
        /// Whether the namespace is hashed with the key (`MEMCACHED_BEHAVIOR_HASH_WITH_PREFIX_KEY`,
        /// default off: only the bare key is hashed, so namespaces do not change placement).
        hash_with_namespace(on: bool) => hash_with_namespace;

        /// The wire protocol (default [`Protocol::Text`]).
        protocol(p: Protocol) => protocol;
    }

    /// SASL PLAIN credentials, sent on every new connection before its first command
    /// (binary protocol only: memcached speaks SASL nowhere else).
    pub fn sasl(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.sasl = Some((user.into(), password.into()));
        self
    }

    /// ASCII authentication (memcached 1.6's `-Y authfile`; text and meta protocols): on every
    /// new connection, before its first command, the client checks that the server asks for
    /// authentication and sends `user password` (as memcached expects, a `set` whose value is
    /// those two words). A wrong password and a server that does not use `-Y` are both
    /// [`Error::Auth`](crate::Error::Auth), saying which. Neither may contain a space or a
    /// line break.
    pub fn ascii_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.ascii_auth = Some((user.into(), password.into()));
        self
    }

    /// Speaks TLS to every server (feature `tls`), as configured by `tls`; the handshake is
    /// part of connecting and bounded by the connect timeout. SASL, when set, runs inside the
    /// TLS session.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// One copy per key and no zones, whatever was configured (the shared client's
    /// engines: each serves one server; the copies are the shared client's business).
    pub(crate) fn one_copy(mut self) -> Self {
        self.fleet.replicas = 1;
        self.single_copy = true;
        self
    }

    /// Clients built from here on follow `list` (another client's
    /// [`server_list`](crate::Client::server_list)) instead of the servers given here: they
    /// route with its servers, share who is ejected, and take its changes. The other
    /// settings should match the ones the list's first client was built with (its
    /// distribution, hash and TLS settings are the list's).
    pub fn follow(mut self, list: &ServerList) -> Self {
        self.list = Some(list.clone());
        self
    }

    /// Clients built from here on follow `client`'s list and share its view of which
    /// servers are ejected (the shared client's engines and router).
    pub(crate) fn sharing_health_of(self, client: &Client) -> Self {
        let list = client.server_list().clone();
        self.follow(&list)
    }

    /// How long a server removed from a live list stays in it, its keys unmoved: one that
    /// comes back within the window moves no key (a flapping discovery source, a restart).
    /// Default: none. See [`ServerList`].
    pub fn list_damping(mut self, window: Duration) -> Self {
        self.churn.damping = window;
        self
    }

    /// The shortest time between two changes of a live list: one that comes sooner is
    /// held, and applied by a later [`ServerList::set`] or [`ServerList::refresh`].
    /// Default: none.
    pub fn list_min_interval(mut self, interval: Duration) -> Self {
        self.churn.min_interval = interval;
        self
    }

    /// The I/O timeout it was given (the shared client's per-call deadline).
    pub(crate) fn configured_io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// Validates the configuration and builds the client. Nothing is connected yet.
    ///
    /// # Errors
    /// [`Error::NoServers`] without servers; [`Error::Config`] for an invalid server, a zero
    /// timeout, an invalid namespace, or SASL without the binary protocol.
    pub fn build(self) -> Result<Client> {
        let specs = self
            .servers
            .into_iter()
            .map(|s| {
                s.map_err(|bad| {
                    Error::Config(format!(
                        "invalid server {bad:?}: expected host[:port[:weight]] (port 11211 by default), \
                         [ipv6]:port[:weight], or a Unix socket path"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if specs.is_empty() && self.list.is_none() {
            return Err(Error::NoServers);
        }
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return Err(Error::Config("timeouts must be above zero".into()));
        }
        if !self.namespace.is_empty() {
            Key::new(&self.namespace)
                .map_err(|e| Error::Config(format!("invalid namespace: {e}")))?;
            if self.namespace.len() >= MAX_KEY_LEN {
                return Err(Error::Config("namespace leaves no room for keys".into()));
            }
        }
        if self.sasl.is_some() && !self.protocol.supports(Capability::Sasl) {
            return Err(Error::Config(
                "SASL needs the binary protocol (.protocol(Protocol::Binary))".into(),
            ));
        }
        if let Some((user, password)) = &self.ascii_auth {
            if self.protocol == Protocol::Binary {
                return Err(Error::Config(
                    "ASCII authentication is for the text and meta protocols; the binary \
                     protocol authenticates with SASL (.sasl(user, password))"
                        .into(),
                ));
            }
            let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b.is_ascii_whitespace());
            if bad(user) || bad(password) {
                return Err(Error::Config(
                    "ASCII authentication needs a user and a password without spaces or line \
                     breaks (memcached's authfile holds `user:password` lines)"
                        .into(),
                ));
            }
        }
        let max_value = self.max_value_size.min(isize::MAX as usize / 2);
        let hash = self.hash.unwrap_or(match self.distribution {
            Distribution::KetamaWeighted => HashFn::Md5,
            _ => HashFn::OneAtATime,
        });
        let mut fleet = self.fleet;
        let zones = if self.zones.is_empty() || self.single_copy {
            None
        } else {
            fleet.zoned = true;
            let ring_servers: Vec<RingServer> = specs.iter().map(ring_server).collect();
            Some(zones(
                &self.zones,
                self.prefer_zone.as_deref(),
                &self.write_only_zones,
                specs.len(),
                fleet.replicas,
                |range| Continuum::new(self.distribution, hash, &ring_servers[range]),
            )?)
        };
        if self.zones.is_empty()
            && (self.prefer_zone.is_some() || !self.write_only_zones.is_empty())
        {
            return Err(Error::Config(
                "prefer_zone and write_only_zone name zones, and no zone was added".into(),
            ));
        }
        fleet.spread = fleet.replicas > 1 || fleet.zoned;
        let list = match self.list {
            Some(list) => {
                // Copies and zones do not follow changes yet: a list they follow stays.
                if fleet.replicas > 1 || fleet.zoned {
                    if list.generation() > 0 {
                        return Err(Error::Config(
                            "a client with copies or zones cannot follow a list that has \
                             changed"
                                .into(),
                        ));
                    }
                    list.freeze("a client with copies or zones follows this list");
                }
                list
            }
            None => {
                let labels: Vec<String> = specs.iter().map(|s| s.addr.to_string()).collect();
                let zoned = zones.is_some();
                ServerList::new(ListSettings {
                    health: SharedHealth::new(&labels, zones),
                    specs,
                    dist: self.distribution,
                    hash,
                    #[cfg(feature = "tls")]
                    tls: self.tls.clone(),
                    churn: self.churn,
                    zoned,
                    replicated: fleet.replicas > 1,
                })
            }
        };
        let topology = list.topology();
        let labels: Vec<String> = topology.labels.to_vec();
        let driver = Driver::new(
            &topology.addrs,
            DriverConfig {
                connect_timeout: self.connect_timeout,
                io_timeout: self.io_timeout,
                max_unit: max_value + MAX_LINE + 4,
            },
            #[cfg(feature = "tls")]
            self.tls,
        )?;
        let policy = FailurePolicy {
            failure_limit: self.failure_limit,
            retry_timeout: self.retry_timeout,
            remove_failed: self.remove_failed,
            max_removed: self.max_removed,
        };
        let mut health = Health::new(Arc::clone(list.health()), policy, &labels);
        health.adopt(topology.generation, &labels);
        let ring = topology.ring.clone();
        let topology = Arc::clone(&topology);
        Ok(Client {
            core: Core::new(CoreSettings {
                health,
                labels,
                list,
                topology,
                driver,
                max_value,
                ring,
                namespace: self.namespace,
                hash_with_namespace: self.hash_with_namespace,
                protocol: self.protocol,
                sasl: self.sasl,
                ascii_auth: self.ascii_auth,
                fleet,
            }),
            scratch: Scratch::new(),
            copy_scratch: Default::default(),
            item_size: None,
        })
    }
}

/// The zones of a builder, checked: every server in one zone, names unique, the preferred
/// and write-only zones among them, at most [`MAX_REPLICAS`] copies in all. The preferred
/// zone (the first by default) is read first.
fn zones(
    zones: &[(String, std::ops::Range<usize>)],
    prefer: Option<&str>,
    write_only: &[String],
    servers: usize,
    replicas: usize,
    ring: impl Fn(std::ops::Range<usize>) -> Continuum,
) -> Result<Zones> {
    let bad = |why: String| Err(Error::Config(why));
    let zoned: usize = zones.iter().map(|(_, r)| r.len()).sum();
    if zoned != servers {
        return bad(format!(
            "{} servers outside any zone: with zones, every server is given in a zone",
            servers - zoned
        ));
    }
    for (k, (name, range)) in zones.iter().enumerate() {
        if name.is_empty() || range.is_empty() {
            return bad(format!(
                "zone {name:?} needs a name and at least one server"
            ));
        }
        if zones[..k].iter().any(|(n, _)| n == name) {
            return bad(format!("zone {name:?} is added twice"));
        }
    }
    if zones.len() * replicas > MAX_REPLICAS {
        return bad(format!(
            "{} zones of {replicas} copies: at most {MAX_REPLICAS} copies of a key in all",
            zones.len()
        ));
    }
    let index = |name: &str| {
        zones
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::Config(format!("no zone named {name:?}")))
    };
    let preferred = match prefer {
        Some(p) => index(p)?,
        None => 0,
    };
    for w in write_only {
        index(w)?;
    }
    Ok(Zones::new(
        zones
            .iter()
            .map(|(name, range)| {
                (
                    name.clone(),
                    range.clone(),
                    ring(range.clone()),
                    write_only.contains(name),
                )
            })
            .collect(),
        Some(preferred),
    ))
}
