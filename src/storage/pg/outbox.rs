//! The outbox, [`PgStorage`]'s cache invalidation log: its rows, and the in-memory mirror of
//! their keys that a listener thread keeps (readers check it instead of the database).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Config;

use super::conn::{off_runtime, pg_error, Health, Limits, PgConn};
use super::sql::{outbox_cte, WRITER_LOCK_CLASS};
use super::PgStorage;
use crate::storage::{InvalidationLog, LogEntry, Result};

/// The outbox mirror is reloaded at least this often (and at once on a notification).
const MIRROR_EVERY: Duration = Duration::from_millis(400);

/// A mirror whose last load started this long ago is not trusted: `contains` asks the
/// database. A failure record's writer waits this long (see `InvalidationLog::record`).
const MIRROR_STALE: Duration = Duration::from_millis(1000);

/// How long a failure record's writer waits after its commit: the mirror's trust bound, and
/// a margin for clocks that run at slightly different rates on different hosts.
const RECORD_WAIT: Duration = Duration::from_millis(1000 + 50 + 10);

/// The keys in the outbox as of `loaded`, plus those this process added since.
#[derive(Default)]
pub(super) struct Mirror {
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

    /// Distrusts `key` in this process from now on (until a reload that no longer finds it).
    pub(super) fn insert(&self, key: &str) {
        self.lock().keys.insert(key.to_string());
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
pub(super) fn listen(
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

impl PgStorage {
    fn insert_record(&self, key: &str, writer: Option<i32>) -> Result<String> {
        // This process's readers distrust the key from now on; other processes' once their
        // listener hears the notification (delivered at commit, with the row).
        self.mirror.insert(key);
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
