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
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};

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

    /// Connects, creates the schema if needed and checks its version.
    ///
    /// # Errors
    /// [`StorageError::Io`](Error::Io) if the database cannot be reached, the URL is
    /// invalid, or the schema is of a newer version.
    pub fn open(self) -> Result<PgStorage> {
        off_runtime(|| self.open_here())
    }

    fn open_here(self) -> Result<PgStorage> {
        let mut config: postgres::Config = self
            .url
            .parse()
            .map_err(|e| pg_error("parsing the PostgreSQL URL", e))?;
        config.connect_timeout(self.connect_timeout);
        config.options(&format!(
            "-c statement_timeout={}",
            self.statement_timeout.as_millis().max(1)
        ));
        let mut first = config
            .connect(NoTls)
            .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
        migrate(&mut first)?;
        // A session of its own holds this storage's writer lock for its lifetime: intents it
        // records are not replayed by others while it lives.
        let mut writer_session = config
            .connect(NoTls)
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
            let (config, mirror, stop) = (config.clone(), mirror.clone(), stop.clone());
            std::thread::Builder::new()
                .name("mcstore-pg-outbox".into())
                .spawn(move || listen(&config, &mirror, &stop))
                .map_err(|e| Error::io("starting the outbox listener", e))?
        };
        Ok(PgStorage {
            mirror,
            stop,
            listener: Mutex::new(Some(listener)),
            config,
            pool: Mutex::new(Pool {
                idle: vec![PgConn::new(first)],
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

/// Creates or checks the schema, under a transaction-scoped advisory lock so that processes
/// opening the same database at once do not race.
fn migrate(c: &mut Client) -> Result<()> {
    let mut tx = c
        .transaction()
        .map_err(|e| pg_error("creating the schema", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&i64::from(WRITER_LOCK_CLASS)],
    )
    .map_err(|e| pg_error("creating the schema", e))?;
    tx.batch_execute(SCHEMA)
        .map_err(|e| pg_error("creating the schema", e))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM mcstore_schema", &[])
        .map_err(|e| pg_error("reading the schema version", e))?
        .and_then(|r| r.get(0));
    match found {
        None => {
            tx.execute(
                "INSERT INTO mcstore_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .map_err(|e| pg_error("recording the schema version", e))?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(Error::io(
                "opening the PostgreSQL storage",
                io::Error::other(format!(
                    "the database's schema is version {v}, newer than this mcstore's \
                     {SCHEMA_VERSION}"
                )),
            ))
        }
        Some(_) => {}
    }
    tx.commit().map_err(|e| pg_error("creating the schema", e))
}

/// Runs `f`, which uses the `postgres` crate's blocking client, where that client can run:
/// on this thread, unless it is inside a tokio runtime (where the client's own `block_on`
/// panics), and then on a scoped thread of its own (see the module docs).
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

/// A PostgreSQL failure with its cause spelled out (the crate's own message is terse:
/// "error connecting to server" without the reason).
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
/// notification (other processes' records and intents) and at least every second. Its own
/// connection; reconnects after a failure (the mirror goes stale meanwhile, and `contains`
/// asks the database).
fn listen(config: &postgres::Config, mirror: &Mirror, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = config.connect(NoTls) else {
            std::thread::sleep(MIRROR_EVERY);
            continue;
        };
        if c.batch_execute("LISTEN mcstore_outbox").is_err() {
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
            let woke = c.notifications().timeout_iter(MIRROR_EVERY).next();
            if woke.is_err() {
                break;
            }
            // Take every notification already queued: one reload covers them.
            let mut n = c.notifications();
            let mut queued = n.iter();
            while let Ok(Some(_)) = queued.next() {}
        }
    }
}

fn pg_error(context: &str, e: postgres::Error) -> Error {
    use std::error::Error as _;
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
    Error::io(
        format!("PostgreSQL master, {context}"),
        io::Error::new(kind, msg),
    )
}

/// A connection with its prepared statements: each SQL text is parsed once per connection,
/// so a statement costs one round trip (the `postgres` crate alone prepares on every call).
struct PgConn {
    client: Client,
    stmts: HashMap<String, Statement>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgConn {
    fn new(client: Client) -> PgConn {
        PgConn {
            client,
            stmts: HashMap::new(),
        }
    }

    fn stmt(&mut self, sql: &str) -> std::result::Result<Statement, postgres::Error> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let client = &mut self.client;
        let st = off_runtime(|| client.prepare(sql))?;
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn execute(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<u64, postgres::Error> {
        let st = self.stmt(sql)?;
        let client = &mut self.client;
        off_runtime(|| client.execute(&st, p))
    }

    fn query(
        &mut self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<Vec<Row>, postgres::Error> {
        let st = self.stmt(sql)?;
        let client = &mut self.client;
        off_runtime(|| client.query(&st, p))
    }

    fn query_one(&mut self, sql: &str, p: Params<'_>) -> std::result::Result<Row, postgres::Error> {
        let st = self.stmt(sql)?;
        let client = &mut self.client;
        off_runtime(|| client.query_one(&st, p))
    }

    fn query_opt(
        &mut self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<Option<Row>, postgres::Error> {
        let st = self.stmt(sql)?;
        let client = &mut self.client;
        off_runtime(|| client.query_opt(&st, p))
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
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
    config: postgres::Config,
    pool: Mutex<Pool>,
    freed: Condvar,
    size: usize,
    checkout_timeout: Duration,
    /// This storage's writer id; its session holds the matching advisory lock.
    writer: i32,
    writer_session: Mutex<Option<Client>>,
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
        // Closing a client runs the crate's runtime too.
        if let Some(c) = broken {
            off_runtime(move || drop(c));
        }
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
        if !idle.is_empty() || session.is_some() {
            off_runtime(move || drop((idle, session)));
        }
    }

    /// A storage on the database at `url` (`postgres://user[:password]@host:port/db`).
    pub fn builder(url: impl Into<String>) -> PgStorageBuilder {
        PgStorageBuilder {
            url: url.into(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(5),
        }
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: an idle one, a new one while under the pool size, or the next one
    /// freed, waiting up to the checkout timeout.
    fn conn(&self) -> Result<Conn<'_>> {
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
                return match off_runtime(|| self.config.connect(NoTls)) {
                    Ok(c) => Ok(Conn {
                        storage: self,
                        client: Some(PgConn::new(c)),
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

fn fk_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
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

    /// The outbox is unreadable exactly when the master is down: cached reads go on.
    fn trust_when_unreadable(&self) -> bool {
        true
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
