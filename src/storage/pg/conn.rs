//! A connection to PostgreSQL: a `tokio_postgres` client on a runtime of its own, a deadline
//! on every exchange, and how calls failed.
//!
//! # Inside async services
//!
//! Each connection drives `tokio_postgres` with a small current-thread runtime of its own,
//! and blocking on it panics ("Cannot start a runtime from within a runtime") on a thread
//! inside a tokio runtime: an `async fn`, a `#[tokio::main]`, even `spawn_blocking`. So every
//! call that touches the client (connecting, each statement, closing) runs on the caller's
//! thread when it is outside any runtime, and otherwise on a short-lived thread of its own
//! (`off_runtime`), which costs a thread start (tens of microseconds) per statement there.
//! A `PgStorage` can be opened, used and dropped anywhere.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row, Statement};

use super::sql::{migrate, SCHEMA_VERSION};
use super::PgStorage;
use crate::storage::error::{Result, StorageError as Error};

/// Runs `f`, which blocks on a runtime of its own, where that can run: on this thread,
/// unless it is inside a tokio runtime (where `block_on` panics), and then on a scoped
/// thread of its own (see the module docs).
pub(super) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// How a call to PostgreSQL failed.
#[derive(Debug)]
pub(super) enum PgFail {
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
pub(super) fn pg_error(context: &str, e: PgFail) -> Error {
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
pub(super) struct Limits {
    pub(super) connect: Duration,
    pub(super) call: Duration,
}

/// When a call to this master last timed out, shared by its connections.
#[derive(Debug)]
pub(super) struct Health {
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
    pub(super) fn check(&self) -> std::result::Result<(), PgFail> {
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

/// A connection: a `tokio_postgres` client, its prepared statements (each SQL text is parsed
/// once per connection, so a statement costs one round trip), and what runs its exchanges. A
/// connection whose call timed out or whose session ended is marked broken and never reused.
pub(super) struct PgConn {
    client: Client,
    stmts: HashMap<String, Statement>,
    exchanges: Exchanges,
}

/// What runs a connection's exchanges: a single-threaded runtime of its own (which also
/// drives the connection's I/O while a call runs), a deadline on every exchange, and a
/// record of how they ended.
struct Exchanges {
    limits: Limits,
    health: Arc<Health>,
    broken: bool,
    /// `Some` until drop.
    rt: Option<tokio::runtime::Runtime>,
}

impl Exchanges {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("until drop")
    }

    /// Runs one exchange within the call timeout, and notes how it ended: a failure that
    /// leaves the connection unusable marks it broken, and a timeout marks the master
    /// unreachable for a while.
    fn run<T: Send>(
        &mut self,
        fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send,
    ) -> std::result::Result<T, PgFail> {
        let r = block(self.rt(), self.limits.call, fut);
        if let Err(e) = &r {
            if matches!(e, PgFail::TimedOut(_)) {
                self.health.note_timeout();
            }
            self.broken |= e.breaks();
        }
        r
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Drop for PgConn {
    fn drop(&mut self) {
        // Without waiting, and allowed anywhere, even inside another runtime.
        if let Some(rt) = self.exchanges.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `PgConn` methods running one prepared statement each, as the client call of the same name
/// does: one body, stamped per call. A helper taking the call as a closure cannot say, short
/// of boxing it, that the future the closure returns borrows the client and the statement
/// and is `Send`.
macro_rules! statements {
    ($($(#[$doc:meta])* $call:ident -> $t:ty;)*) => {$(
        $(#[$doc])*
        pub(super) fn $call(
            &mut self,
            sql: &str,
            p: Params<'_>,
        ) -> std::result::Result<$t, PgFail> {
            let st = self.stmt(sql)?;
            self.exchanges.run(self.client.$call(&st, p))
        }
    )*};
}

impl PgConn {
    /// Connects within `limits.connect` (the whole start-up, not only the TCP connect);
    /// notifications go to `notify` when given.
    pub(super) fn connect(
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
            exchanges: Exchanges {
                limits,
                health: health.clone(),
                broken: false,
                rt: Some(rt),
            },
        })
    }

    /// The connection's runtime, for waiting on its notifications.
    pub(super) fn rt(&self) -> &tokio::runtime::Runtime {
        self.exchanges.rt()
    }

    fn stmt(&mut self, sql: &str) -> std::result::Result<Statement, PgFail> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let st = self.exchanges.run(self.client.prepare(sql))?;
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    statements! {
        /// Runs a statement; the number of rows it changed.
        execute -> u64;
        /// Runs a query; its rows.
        query -> Vec<Row>;
        /// Runs a query that returns exactly one row.
        query_one -> Row;
        /// Runs a query that returns at most one row.
        query_opt -> Option<Row>;
    }

    pub(super) fn batch_execute(&mut self, sql: &str) -> std::result::Result<(), PgFail> {
        self.exchanges.run(self.client.batch_execute(sql))
    }

    /// Creates or checks the schema, under a transaction-scoped advisory lock so that
    /// processes opening the same database at once do not race.
    pub(super) fn migrate(&mut self) -> Result<()> {
        let found = self
            .exchanges
            .run(migrate(&mut self.client))
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

    /// Whether the connection cannot be used again (broken, or its session ended).
    pub(super) fn is_closed(&self) -> bool {
        self.exchanges.broken || self.client.is_closed()
    }
}
