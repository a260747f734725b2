//! A PostgreSQL master (feature `postgres`): collections and resources in tables, a bounded
//! connection pool, and the cache invalidation log as an outbox table.
//!
//! Every statement takes parameters; no SQL is ever built from a name. Names are validated
//! as [`FsStorage`](super::FsStorage) validates them.
//!
//! # Layout
//!
//! `conn`: one connection, with its runtime and call timeout, and how calls fail (also why a
//! `PgStorage` works inside async services); `pool`: the bounded pool calls check connections
//! out of; `sql`: the schema and the statements; `outbox`: the invalidation log, and the
//! mirror of it that a listener thread keeps.

mod conn;
mod outbox;
mod pool;
mod sql;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Config;

use super::error::{Result, StorageError as Error};
use super::memory::not_found;
use super::{
    check_paths, ext_matches, named_info, named_listing, validate_name, Content, InvalidationLog,
    MasterWrite, Part, ResourceInfo, ResourceIter, Storage,
};
use conn::{pg_error, Health, Limits, PgConn, PgFail};
use outbox::{listen, Mirror};
use pool::Pool;
use sql::{
    column, put_intending_sql, put_sql, remove_intending_sql, remove_sql, WRITER_LOCK_CLASS,
};

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
    /// fails with [`io::ErrorKind::TimedOut`](std::io::ErrorKind::TimedOut), the connection
    /// is dropped, and for [`RETRY_AFTER`](PgStorage::RETRY_AFTER) (1 s) calls fail at once
    /// instead of waiting again. Unlike [`statement_timeout`](Self::statement_timeout), which
    /// the server enforces, it holds when the server or the link is frozen.
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
}

fn fk_violation(e: &PgFail) -> bool {
    matches!(e, PgFail::Pg(e)
        if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION))
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
        self.mirror.insert(key);
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
