//! A PostgreSQL master (feature `postgres`): collections and resources in tables, a bounded
//! connection pool, and the cache invalidation log as an outbox table.
//!
//! Every statement takes parameters; no SQL is ever built from a name. Names are validated
//! as [`FsStorage`](super::FsStorage) validates them.
//!
//! # Inside async services
//!
//! The `postgres` crate's blocking client drives each call with a runtime of its own, which
//! panics ("Cannot start a runtime from within a runtime") on a thread inside a tokio
//! runtime: an `async fn`, a `#[tokio::main]`, even `spawn_blocking`. So every call that
//! touches the client (connecting, each statement, closing) runs on the caller's thread
//! when it is outside any runtime, and otherwise on a short-lived thread of its own
//! (`off_runtime`), which costs a thread start (tens of microseconds) per statement there.
//! A `PgStorage` can be opened, used and dropped anywhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row, Statement};

use super::error::{Result, StorageError as Error};
use super::memory::not_found;
use super::{
    check_paths, ext_matches, named_info, named_listing, validate_name, Content, InvalidationLog,
    LogEntry, MasterWrite, Part, ResourceInfo, ResourceIter, Storage,
};

/// The outbox mirror is reloaded at least this often (and at once on a notification).
const MIRROR_EVERY: Duration = Duration::from_millis(400);

/// A mirror whose last load started this long ago is not trusted: `contains` asks the
/// database. A failure record's writer waits this long (see `InvalidationLog::record`).
const MIRROR_STALE: Duration = Duration::from_millis(1000);

/// How long a failure record's writer waits after its commit: the mirror's trust bound, and
/// a margin for clocks that run at slightly different rates on different hosts.
const RECORD_WAIT: Duration = Duration::from_millis(1000 + 50 + 10);

/// The schema version this code creates and understands.
const SCHEMA_VERSION: i32 = 1;

/// The advisory-lock class of writer sessions (see [`PgStorage`]'s outbox), an arbitrary
/// constant ("mc").
const WRITER_LOCK_CLASS: i32 = 0x6d63;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mcstore_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS mcstore_collections (name text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS mcstore_resources (
    collection text NOT NULL REFERENCES mcstore_collections (name),
    name text NOT NULL,
    content bytea,
    meta bytea,
    PRIMARY KEY (collection, name)
);
CREATE TABLE IF NOT EXISTS mcstore_outbox (
    id bigserial PRIMARY KEY,
    key text NOT NULL,
    -- NULL: a failed invalidation, replayable now. Else the writer session whose write is in
    -- flight: replayable once that session is gone (its advisory lock released).
    writer integer,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mcstore_outbox_key ON mcstore_outbox (key);
CREATE SEQUENCE IF NOT EXISTS mcstore_writer_seq;
";

/// Builds a [`PgStorage`].
#[derive(Debug, Clone)]
pub struct PgStorageBuilder {
    url: String,
    pool_size: usize,
    connect_timeout: Duration,
    statement_timeout: Duration,
    checkout_timeout: Duration,
    call_timeout: Duration,
}

impl PgStorageBuilder {
    /// At most this many connections (default 8).
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// How long opening a connection may take (default 5 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long one statement may run before the server cancels it (default 5 s).
    pub fn statement_timeout(mut self, t: Duration) -> Self {
        self.statement_timeout = t;
        self
    }

    /// How long a call waits for a free connection (default 5 s).
    pub fn checkout_timeout(mut self, t: Duration) -> Self {
        self.checkout_timeout = t;
        self
    }

    /// The client's own deadline for each exchange with PostgreSQL: a statement, a
    /// connection's start-up, the outbox listener's reload (default 5 s). Past it the call
    /// fails with [`io::ErrorKind::TimedOut`], the connection is dropped, and for
    /// [`RETRY_AFTER`](PgStorage::RETRY_AFTER) (1 s) calls fail at once instead of
    /// waiting again. Unlike [`statement_timeout`](Self::statement_timeout), which the server
    /// enforces, it holds when the server or the link is frozen.
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t.max(Duration::from_millis(1));
        self
    }

    /// Connects, creates the schema if needed and checks its version.
    ///
    /// # Errors
    /// [`StorageError::Io`](Error::Io) if the database cannot be reached, the URL is
    /// invalid, or the schema is of a newer version.
    pub fn open(self) -> Result<PgStorage> {
        let mut config: Config = self
            .url
            .parse()
            .map_err(|e| pg_error("parsing the PostgreSQL URL", PgFail::Pg(e)))?;
        config.connect_timeout(self.connect_timeout);
        config.options(format!(
            "-c statement_timeout={}",
            self.statement_timeout.as_millis().max(1)
        ));
        let limits = Limits {
            connect: self.connect_timeout,
            call: self.call_timeout,
        };
        let health = Arc::new(Health::default());
        let mut first = PgConn::connect(&config, limits, &health, None)
            .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
        first.migrate()?;
        // A session of its own holds this storage's writer lock for its lifetime: intents it
        // records are not replayed by others while it lives.
        let mut writer_session = PgConn::connect(&config, limits, &health, None)
            .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
        let writer: i64 = writer_session
            .query_one("SELECT nextval('mcstore_writer_seq')", &[])
            .map_err(|e| pg_error("taking a writer id", e))?
            .get(0);
        let writer = (writer % i64::from(i32::MAX)) as i32;
        writer_session
            .execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&WRITER_LOCK_CLASS, &writer],
            )
            .map_err(|e| pg_error("taking the writer lock", e))?;
        let mirror = Arc::new(Mirror::default());
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let mut config = config.clone();
            // Named, so that an operator (or a test) can find the listener's session.
            config.application_name(PgStorage::LISTENER_NAME);
            // Its own record of timeouts: a slow reconnect of the listener (a cut session, a
            // slow link) only leaves the mirror untrusted; it must not make callers' calls
            // fail at once.
            let (mirror, stop, health) =
                (mirror.clone(), stop.clone(), Arc::new(Health::default()));
            std::thread::Builder::new()
                .name("mcstore-pg-outbox".into())
                .spawn(move || listen(&config, limits, &health, &mirror, &stop))
                .map_err(|e| Error::io("starting the outbox listener", e))?
        };
        Ok(PgStorage {
            mirror,
            stop,
            listener: Mutex::new(Some(listener)),
            config,
            limits,
            health,
            pool: Mutex::new(Pool {
                idle: vec![first],
                open: 1,
            }),
            freed: Condvar::new(),
            size: self.pool_size,
            checkout_timeout: self.checkout_timeout,
            writer,
            writer_session: Mutex::new(Some(writer_session)),
        })
    }
}

/// Runs `f`, which blocks on a runtime of its own, where that can run: on this thread,
/// unless it is inside a tokio runtime (where `block_on` panics), and then on a scoped
/// thread of its own (see the module docs).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The keys in the outbox as of `loaded`, plus those this process added since.
#[derive(Default)]
struct Mirror {
    state: Mutex<MirrorState>,
}

#[derive(Default)]
struct MirrorState {
    keys: HashSet<String>,
    loaded: Option<Instant>,
}

impl Mirror {
    fn lock(&self) -> std::sync::MutexGuard<'_, MirrorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(empty)` while the mirror is fresh.
    fn is_empty(&self) -> Option<bool> {
        let st = self.lock();
        let fresh = st.loaded.is_some_and(|t| t.elapsed() < MIRROR_STALE);
        fresh.then(|| st.keys.is_empty())
    }

    /// `Some(answer)` while the mirror is fresh.
    fn contains(&self, key: &str) -> Option<bool> {
        let st = self.lock();
        let fresh = st.loaded.is_some_and(|t| t.elapsed() < MIRROR_STALE);
        fresh.then(|| st.keys.contains(key))
    }
}

/// The listener thread: `LISTEN mcstore_outbox`, and reload the outbox's keys on every
/// notification (other processes' records and intents) and at least every `MIRROR_EVERY`.
/// Its own connection, every exchange bounded by the call timeout; reconnects after a
/// failure (the mirror goes untrusted meanwhile, and `contains` asks the database).
fn listen(
    config: &Config,
    limits: Limits,
    health: &Arc<Health>,
    mirror: &Mirror,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
        let Ok(mut c) = PgConn::connect(config, limits, health, Some(tx)) else {
            std::thread::sleep(MIRROR_EVERY);
            continue;
        };
        if c.batch_execute("LISTEN mcstore_outbox").is_err() {
            // Paced like a failed connect: never a tight loop against a failing server.
            std::thread::sleep(MIRROR_EVERY);
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            // Load after LISTEN: a record committed in between is either in the load or
            // notified.
            let started = Instant::now();
            let Ok(rows) = c.query("SELECT DISTINCT key FROM mcstore_outbox", &[]) else {
                break;
            };
            {
                let mut st = mirror.lock();
                st.keys = rows.iter().map(|r| r.get(0)).collect();
                st.loaded = Some(started);
            }
            // A notification, or the period; `None`: the connection ended.
            let rt = c.rt();
            let wait = async { tokio::time::timeout(MIRROR_EVERY, notified.recv()).await };
            let woke = off_runtime(|| rt.block_on(wait));
            if woke == Ok(None) {
                break;
            }
            // Take every notification already queued: one reload covers them.
            while notified.try_recv().is_ok() {}
        }
    }
}

/// How a call to PostgreSQL failed.
#[derive(Debug)]
enum PgFail {
    /// The server or the driver said so.
    Pg(tokio_postgres::Error),
    /// No answer within the call timeout (a frozen server or link).
    TimedOut(Duration),
    /// Not tried: a call timed out this long ago (see [`PgStorage::RETRY_AFTER`]).
    Down(Duration),
    /// A connection's runtime could not start.
    Io(io::Error),
}

impl PgFail {
    /// Whether the connection cannot be used again.
    fn breaks(&self) -> bool {
        match self {
            PgFail::Pg(e) => e.is_closed(),
            _ => true,
        }
    }
}

/// A PostgreSQL failure with its cause spelled out (the crate's own message is terse:
/// "error connecting to server" without the reason).
fn pg_error(context: &str, e: PgFail) -> Error {
    use std::error::Error as _;
    let (kind, msg) = match e {
        PgFail::Pg(e) => {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            let kind = if e.is_closed() || msg.contains("connect") {
                io::ErrorKind::ConnectionRefused
            } else {
                io::ErrorKind::Other
            };
            (kind, msg)
        }
        PgFail::TimedOut(t) => (
            io::ErrorKind::TimedOut,
            format!("no answer within the call timeout ({} ms)", t.as_millis()),
        ),
        PgFail::Down(ago) => (
            io::ErrorKind::TimedOut,
            format!(
                "not tried: a call timed out {} ms ago (the master is taken as unreachable \
                 for {} ms after a timeout)",
                ago.as_millis(),
                PgStorage::RETRY_AFTER.as_millis()
            ),
        ),
        PgFail::Io(e) => (e.kind(), e.to_string()),
    };
    Error::io(
        format!("PostgreSQL master, {context}"),
        io::Error::new(kind, msg),
    )
}

/// The client-side deadlines.
#[derive(Debug, Clone, Copy)]
struct Limits {
    connect: Duration,
    call: Duration,
}

/// When a call to this master last timed out, shared by its connections.
#[derive(Debug)]
struct Health {
    base: Instant,
    /// Nanoseconds from `base` to the last timeout, plus one; 0: none yet.
    timed_out: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            base: Instant::now(),
            timed_out: AtomicU64::new(0),
        }
    }
}

impl Health {
    fn note_timeout(&self) {
        let at = self.base.elapsed().as_nanos() as u64;
        self.timed_out.store(at + 1, Ordering::Relaxed);
    }

    /// `Err(Down)` within [`PgStorage::RETRY_AFTER`] of the last timeout.
    fn check(&self) -> std::result::Result<(), PgFail> {
        let at = self.timed_out.load(Ordering::Relaxed);
        if at == 0 {
            return Ok(());
        }
        let ago = self
            .base
            .elapsed()
            .saturating_sub(Duration::from_nanos(at - 1));
        if ago < PgStorage::RETRY_AFTER {
            return Err(PgFail::Down(ago));
        }
        Ok(())
    }
}

/// Runs `fut` on `rt` (off any caller's runtime), for at most `limit`.
fn block<T: Send>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send,
) -> std::result::Result<T, PgFail> {
    // The timer is made inside the runtime, whose clock it needs.
    off_runtime(|| rt.block_on(async { tokio::time::timeout(limit, fut).await }))
        .map_err(|_| PgFail::TimedOut(limit))?
        .map_err(PgFail::Pg)
}

/// A connection: a `tokio_postgres` client on a single-threaded runtime of its own (which
/// also drives the connection's I/O while a call runs), its prepared statements (each SQL
/// text is parsed once per connection, so a statement costs one round trip), and a deadline
/// on every exchange. A connection whose call timed out or whose session ended is marked
/// broken and never reused.
struct PgConn {
    client: Client,
    stmts: HashMap<String, Statement>,
    limits: Limits,
    health: Arc<Health>,
    broken: bool,
    /// `Some` until drop.
    rt: Option<tokio::runtime::Runtime>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Drop for PgConn {
    fn drop(&mut self) {
        // Without waiting, and allowed anywhere, even inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl PgConn {
    /// Connects within `limits.connect` (the whole start-up, not only the TCP connect);
    /// notifications go to `notify` when given.
    fn connect(
        config: &Config,
        limits: Limits,
        health: &Arc<Health>,
        notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    ) -> std::result::Result<PgConn, PgFail> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PgFail::Io)?;
        let (client, mut connection) = match block(&rt, limits.connect, config.connect(NoTls)) {
            Ok(c) => c,
            Err(e) => {
                if matches!(e, PgFail::TimedOut(_)) {
                    health.note_timeout();
                }
                rt.shutdown_background();
                return Err(e);
            }
        };
        rt.spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if let (AsyncMessage::Notification(_), Some(tx)) = (m, &notify) {
                    let _ = tx.send(());
                }
            }
        });
        Ok(PgConn {
            client,
            stmts: HashMap::new(),
            limits,
            health: health.clone(),
            broken: false,
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("until drop")
    }

    /// Notes how an exchange ended: a failure that leaves the connection unusable marks it
    /// broken, and a timeout marks the master unreachable for a while.
    fn note<T>(&mut self, r: std::result::Result<T, PgFail>) -> std::result::Result<T, PgFail> {
        if let Err(e) = &r {
            if matches!(e, PgFail::TimedOut(_)) {
                self.health.note_timeout();
            }
            self.broken |= e.breaks();
        }
        r
    }

    fn stmt(&mut self, sql: &str) -> std::result::Result<Statement, PgFail> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let r = block(self.rt(), self.limits.call, self.client.prepare(sql));
        let st = self.note(r)?;
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn execute(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<u64, PgFail> {
        let st = self.stmt(sql)?;
        let r = block(self.rt(), self.limits.call, self.client.execute(&st, p));
        self.note(r)
    }

    fn query(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<Vec<Row>, PgFail> {
        let st = self.stmt(sql)?;
        let r = block(self.rt(), self.limits.call, self.client.query(&st, p));
        self.note(r)
    }

    fn query_one(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<Row, PgFail> {
        let st = self.stmt(sql)?;
        let r = block(self.rt(), self.limits.call, self.client.query_one(&st, p));
        self.note(r)
    }

    fn query_opt(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<Option<Row>, PgFail> {
        let st = self.stmt(sql)?;
        let r = block(self.rt(), self.limits.call, self.client.query_opt(&st, p));
        self.note(r)
    }

    fn batch_execute(&mut self, sql: &str) -> std::result::Result<(), PgFail> {
        let r = block(self.rt(), self.limits.call, self.client.batch_execute(sql));
        self.note(r)
    }

    /// Creates or checks the schema, under a transaction-scoped advisory lock so that
    /// processes opening the same database at once do not race.
    fn migrate(&mut self) -> Result<()> {
        let rt = self.rt.as_ref().expect("until drop");
        let r = block(rt, self.limits.call, migrate(&mut self.client));
        let found = self
            .note(r)
            .map_err(|e| pg_error("creating the schema", e))?;
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(Error::io(
                "opening the PostgreSQL storage",
                io::Error::other(format!(
                    "the database's schema is version {v}, newer than this mcstore's \
                     {SCHEMA_VERSION}"
                )),
            )),
            _ => Ok(()),
        }
    }

    fn is_closed(&self) -> bool {
        self.broken || self.client.is_closed()
    }
}

/// The schema, created or checked in one transaction; returns the version found.
async fn migrate(c: &mut Client) -> std::result::Result<Option<i32>, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&i64::from(WRITER_LOCK_CLASS)],
    )
    .await?;
    tx.batch_execute(SCHEMA).await?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM mcstore_schema", &[])
        .await?
        .and_then(|r| r.get(0));
    if found.is_none() {
        tx.execute(
            "INSERT INTO mcstore_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await?;
    }
    // A newer schema: rolled back on drop, nothing touched.
    if found.is_none_or(|v| v <= SCHEMA_VERSION) {
        tx.commit().await?;
    }
    Ok(found)
}

struct Pool {
    idle: Vec<PgConn>,
    /// Connections open, idle or checked out.
    open: usize,
}

/// Collections and resources in PostgreSQL: `mcstore_collections`, `mcstore_resources`
/// (content and metadata as `bytea`), and `mcstore_outbox`, the cache invalidation log that
/// any process sharing the database replays. The schema is created and versioned on open.
///
/// ```no_run
/// use mcstore::storage::{PgStorage, Storage};
/// let s = PgStorage::builder("postgres://app@127.0.0.1:5432/app").open()?;
/// s.create_container("posts")?;
/// let info = s.info("posts", Some("hello.txt"))?;
/// s.put_content(&info, "hi".into())?;
/// # Ok::<(), mcstore::storage::StorageError>(())
/// ```
pub struct PgStorage {
    /// The outbox's keys, kept by the listener thread: readers check it instead of the
    /// database on every cache hit.
    mirror: Arc<Mirror>,
    stop: Arc<AtomicBool>,
    listener: Mutex<Option<std::thread::JoinHandle<()>>>,
    config: Config,
    limits: Limits,
    health: Arc<Health>,
    pool: Mutex<Pool>,
    freed: Condvar,
    size: usize,
    checkout_timeout: Duration,
    /// This storage's writer id; its session holds the matching advisory lock.
    writer: i32,
    writer_session: Mutex<Option<PgConn>>,
}

impl std::fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStorage")
            .field("pool_size", &self.size)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// A checked-out connection, returned to the pool on drop (or dropped if it broke).
struct Conn<'a> {
    storage: &'a PgStorage,
    client: Option<PgConn>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        self.client.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut PgConn {
        self.client.as_mut().expect("held until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        let mut pool = self.storage.lock_pool();
        let broken = if c.is_closed() {
            pool.open -= 1;
            Some(c)
        } else {
            pool.idle.push(c);
            None
        };
        drop(pool);
        self.storage.freed.notify_one();
        drop(broken);
    }
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        // The listener ends within a reload period (not waited for here).
        self.stop.store(true, Ordering::Relaxed);
        self.close_clients();
    }
}

impl PgStorage {
    /// Closes the idle connections and the writer session (which releases the writer lock:
    /// this storage's intents become replayable by others), off any runtime.
    fn close_clients(&self) {
        let idle = {
            let mut pool = self.lock_pool();
            pool.open -= pool.idle.len();
            std::mem::take(&mut pool.idle)
        };
        let session = self
            .writer_session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop((idle, session));
    }

    /// A storage on the database at `url` (`postgres://user[:password]@host:port/db`).
    pub fn builder(url: impl Into<String>) -> PgStorageBuilder {
        PgStorageBuilder {
            url: url.into(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
        }
    }

    /// How long calls fail at once after one timed out (see
    /// [`PgStorageBuilder::call_timeout`]): a frozen master costs each caller one timeout
    /// at most, not one per statement, and is tried again after this.
    pub const RETRY_AFTER: Duration = Duration::from_secs(1);

    /// The `application_name` of the outbox listener's session (see `pg_stat_activity`).
    pub const LISTENER_NAME: &'static str = "mcstore-outbox-listener";

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: an idle one, a new one while under the pool size, or the next one
    /// freed, waiting up to the checkout timeout.
    fn conn(&self) -> Result<Conn<'_>> {
        self.health
            .check()
            .map_err(|e| pg_error("checking out a connection", e))?;
        let deadline = Instant::now() + self.checkout_timeout;
        let mut pool = self.lock_pool();
        loop {
            while let Some(c) = pool.idle.pop() {
                if c.is_closed() {
                    pool.open -= 1;
                    continue;
                }
                return Ok(Conn {
                    storage: self,
                    client: Some(c),
                });
            }
            if pool.open < self.size {
                pool.open += 1;
                drop(pool);
                return match PgConn::connect(&self.config, self.limits, &self.health, None) {
                    Ok(c) => Ok(Conn {
                        storage: self,
                        client: Some(c),
                    }),
                    Err(e) => {
                        self.lock_pool().open -= 1;
                        self.freed.notify_one();
                        Err(pg_error("connecting to PostgreSQL", e))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::io(
                    "waiting for a PostgreSQL connection",
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("all {} connections busy", self.size),
                    ),
                ));
            }
            pool = self
                .freed
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Upserts `part` of a resource ($1 collection, $2 name, $3 bytes).
fn put_sql(part: Part) -> String {
    // The column name comes from the fixed `Part`, never from input.
    let col = column(part);
    format!(
        "INSERT INTO mcstore_resources (collection, name, {col}) VALUES ($1, $2, $3) \
         ON CONFLICT (collection, name) DO UPDATE SET {col} = EXCLUDED.{col} RETURNING 1"
    )
}

/// CTEs `d` and `u` removing `part` of a resource ($1 collection, $2 name), and the row
/// when the other part is absent too: the row is either deleted (no other part) or updated
/// (another part), never both, so one statement does it.
fn remove_ctes(part: Part) -> String {
    let (col, other) = (column(part), column(part.other()));
    format!(
        "d AS (DELETE FROM mcstore_resources WHERE collection = $1 AND name = $2 \
             AND {col} IS NOT NULL AND {other} IS NULL RETURNING 1), \
         u AS (UPDATE mcstore_resources SET {col} = NULL WHERE collection = $1 AND name = $2 \
             AND {col} IS NOT NULL AND {other} IS NOT NULL RETURNING 1)"
    )
}

/// Removes `part`; one row returned when something was removed.
fn remove_sql(part: Part) -> String {
    format!(
        "WITH {} SELECT 1 FROM d UNION ALL SELECT 1 FROM u",
        remove_ctes(part)
    )
}

/// The outbox row for key `$k`, writer `$w` (parameter numbers given), inserted when the
/// write `changed` (an SQL condition), notified at commit; the statement returns its id.
fn outbox_cte(k: u8, w: u8, changed: &str) -> String {
    format!(
        "o AS (INSERT INTO mcstore_outbox (key, writer) SELECT ${k}, ${w} WHERE {changed} \
         RETURNING id) SELECT id, pg_notify('mcstore_outbox', '') FROM o"
    )
}

/// A put and its outbox row in one statement ($1 collection, $2 name, $3 bytes, $4 key,
/// $5 writer).
fn put_intending_sql(part: Part) -> String {
    format!(
        "WITH w AS ({}), {}",
        put_sql(part),
        outbox_cte(4, 5, "EXISTS (SELECT 1 FROM w)")
    )
}

/// A removal and its outbox row in one statement ($1 collection, $2 name, $3 key,
/// $4 writer).
fn remove_intending_sql(part: Part) -> String {
    format!(
        "WITH {}, {}",
        remove_ctes(part),
        outbox_cte(3, 4, "EXISTS (SELECT 1 FROM d UNION ALL SELECT 1 FROM u)")
    )
}

fn fk_violation(e: &PgFail) -> bool {
    matches!(e, PgFail::Pg(e)
        if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION))
}

fn column(part: Part) -> &'static str {
    match part {
        Part::Content => "content",
        Part::Meta => "meta",
    }
}

impl Storage for PgStorage {
    fn create_container(&self, collection: &str) -> Result<()> {
        validate_name(collection)?;
        self.conn()?
            .execute(
                "INSERT INTO mcstore_collections (name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&collection],
            )
            .map_err(|e| pg_error("creating a collection", e))?;
        Ok(())
    }

    fn info(&self, collection: &str, resource: Option<&str>) -> Result<ResourceInfo> {
        named_info(collection, resource)
    }

    fn get(&self, info: &ResourceInfo, part: Part) -> Result<Bytes> {
        let name = info.resource_name()?;
        // The column name comes from the fixed `Part`, never from input.
        let sql = format!(
            "SELECT r.{} FROM mcstore_collections c LEFT JOIN mcstore_resources r \
             ON r.collection = c.name AND r.name = $2 WHERE c.name = $1",
            column(part)
        );
        let row = self
            .conn()?
            .query_opt(&sql, &[&info.collection, &name])
            .map_err(|e| pg_error("reading a resource", e))?
            .ok_or_else(|| not_found(&info.collection, None))?;
        let value: Option<Vec<u8>> = row.get(0);
        value
            .map(Bytes::from)
            .ok_or_else(|| not_found(&info.collection, Some(name)))
    }

    fn put(&self, info: &ResourceInfo, part: Part, data: Content<'_>) -> Result<()> {
        let name = info.resource_name()?;
        let data = data.into_bytes()?;
        match self
            .conn()?
            .execute(&put_sql(part), &[&info.collection, &name, &&data[..]])
        {
            Ok(_) => Ok(()),
            Err(e) if fk_violation(&e) => Err(not_found(&info.collection, None)),
            Err(e) => Err(pg_error("writing a resource", e)),
        }
    }

    fn remove(&self, info: &ResourceInfo, part: Part) -> Result<()> {
        let name = info.resource_name()?;
        let removed = self
            .conn()?
            .query(&remove_sql(part), &[&info.collection, &name])
            .map_err(|e| pg_error("removing a resource", e))?;
        if removed.is_empty() {
            return Err(not_found(&info.collection, Some(name)));
        }
        Ok(())
    }

    fn writes_intents_atomically(&self) -> bool {
        true
    }

    /// The write and its outbox row in one statement (one transaction, one round trip):
    /// both commit, or neither.
    fn write_intending(
        &self,
        info: &ResourceInfo,
        part: Part,
        write: MasterWrite<'_>,
        key: &str,
    ) -> Result<String> {
        let name = info.resource_name()?;
        // Distrusted here before the new content can be seen (a failed write only costs
        // this key the cache until the mirror reloads).
        self.mirror.lock().keys.insert(key.to_string());
        let mut c = self.conn()?;
        let rows = match write {
            MasterWrite::Put(d) => {
                let data = d.into_bytes()?;
                c.query(
                    &put_intending_sql(part),
                    &[&info.collection, &name, &&data[..], &key, &self.writer],
                )
            }
            MasterWrite::Remove => c.query(
                &remove_intending_sql(part),
                &[&info.collection, &name, &key, &self.writer],
            ),
        };
        match rows {
            Ok(rows) => match rows.first() {
                Some(r) => Ok(r.get::<_, i64>(0).to_string()),
                None => Err(not_found(&info.collection, Some(name))),
            },
            Err(e) if fk_violation(&e) => Err(not_found(&info.collection, None)),
            Err(e) => Err(pg_error("writing a resource", e)),
        }
    }

    fn exists(&self, info: &ResourceInfo) -> Result<bool> {
        let mut c = self.conn()?;
        let row = match &info.resource {
            None => c.query_opt(
                "SELECT 1 FROM mcstore_collections WHERE name = $1",
                &[&info.collection],
            ),
            Some(r) => c.query_opt(
                "SELECT 1 FROM mcstore_resources WHERE collection = $1 AND name = $2",
                &[&info.collection, r],
            ),
        };
        Ok(row
            .map_err(|e| pg_error("checking a resource", e))?
            .is_some())
    }

    fn ls(&self, collection: &str, ext: Option<&str>) -> Result<BTreeMap<String, ResourceInfo>> {
        self.ils(collection, ext)?.collect()
    }

    fn ils(&self, collection: &str, ext: Option<&str>) -> Result<ResourceIter<'_>> {
        validate_name(collection)?;
        let mut c = self.conn()?;
        let rows = c
            .query(
                "SELECT r.name FROM mcstore_collections c LEFT JOIN mcstore_resources r \
                 ON r.collection = c.name WHERE c.name = $1 ORDER BY r.name",
                &[&collection],
            )
            .map_err(|e| pg_error("listing a collection", e))?;
        if rows.is_empty() {
            return Err(not_found(collection, None));
        }
        let names: Vec<String> = rows
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .filter(|n| ext_matches(n, ext))
            .collect();
        Ok(named_listing(collection, names))
    }

    fn persist(&self, paths: &[&str]) -> Result<()> {
        // Every statement commits durably (the server's fsync settings decide).
        check_paths(paths)
    }

    fn shutdown(&self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        self.close_clients();
        Ok(())
    }

    fn invalidation_log(&self) -> Option<&dyn InvalidationLog> {
        Some(self)
    }
}

impl PgStorage {
    fn insert_record(&self, key: &str, writer: Option<i32>) -> Result<String> {
        // This process's readers distrust the key from now on; other processes' once their
        // listener hears the notification (delivered at commit, with the row).
        self.mirror.lock().keys.insert(key.to_string());
        let id: i64 = self
            .conn()?
            .query_one(
                &format!("WITH {}", outbox_cte(1, 2, "true")),
                &[&key, &writer],
            )
            .map_err(|e| pg_error("recording an invalidation", e))?
            .get(0);
        Ok(id.to_string())
    }
}

/// The outbox: failed invalidations (`writer` NULL) and intents of writes in flight
/// (`writer` = the writing storage's id, whose session holds an advisory lock while it
/// lives; once that session is gone, its intents are replayable).
impl InvalidationLog for PgStorage {
    /// Returns once every process's outbox mirror must include the record: a mirror is
    /// trusted only until `MIRROR_STALE` (1 s) after its last load *started*, so any mirror that
    /// started loading before this commit is distrusted by the time this returns, and one
    /// that started after includes the row. Notifications only make mirrors catch up sooner;
    /// a lost or late one (a cut LISTEN connection, a slow link) cannot make a read that
    /// starts after the write returned see the old entry. The cost is this wait on the
    /// failure path only (a write whose cache delete failed), about a second.
    fn record(&self, key: &str) -> Result<String> {
        let id = self.insert_record(key, None)?;
        std::thread::sleep(RECORD_WAIT);
        Ok(id)
    }

    fn intend(&self, key: &str) -> Result<String> {
        self.insert_record(key, Some(self.writer))
    }

    fn contains(&self, key: &str) -> Result<bool> {
        if let Some(answer) = self.mirror.contains(key) {
            return Ok(answer);
        }
        let row = self
            .conn()?
            .query_opt(
                "SELECT 1 FROM mcstore_outbox WHERE key = $1 LIMIT 1",
                &[&key],
            )
            .map_err(|e| pg_error("reading the invalidation log", e))?;
        Ok(row.is_some())
    }

    fn pending(&self, limit: usize) -> Result<Vec<LogEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .conn()?
            .query(
                "SELECT key, array_agg(id ORDER BY id) FROM mcstore_outbox o \
                 WHERE writer IS NULL OR NOT EXISTS ( \
                     SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' \
                     AND l.classid = $1::integer::oid AND l.objid = o.writer::oid \
                     AND l.objsubid = 2 AND l.granted) \
                 GROUP BY key ORDER BY min(id) LIMIT $2",
                &[&WRITER_LOCK_CLASS, &limit],
            )
            .map_err(|e| pg_error("reading the invalidation log", e))?;
        Ok(rows
            .iter()
            .map(|r| LogEntry {
                key: r.get(0),
                records: r
                    .get::<_, Vec<i64>>(1)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
            .collect())
    }

    /// Skips the query while the mirror is fresh and empty (the listener reloads it on every
    /// notification, so a new row is seen within one notification's delivery).
    fn may_have_pending(&self) -> bool {
        self.mirror.is_empty() != Some(true)
    }

    fn replayed(&self, entry: &LogEntry) -> Result<()> {
        let ids: Vec<i64> = entry
            .records
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect();
        // Every mirror reloads (this key may have newer records: the reload says).
        self.conn()?
            .execute(
                "WITH d AS (DELETE FROM mcstore_outbox WHERE id = ANY($1) RETURNING 1) \
                 SELECT pg_notify('mcstore_outbox', '') WHERE EXISTS (SELECT 1 FROM d)",
                &[&ids],
            )
            .map_err(|e| pg_error("clearing the invalidation log", e))?;
        Ok(())
    }
}
