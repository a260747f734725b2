//! The bounded pool of connections a [`PgStorage`] checks out for each call.

use std::io;
use std::time::Instant;

use super::conn::{pg_error, PgConn};
use super::PgStorage;
use crate::storage::error::{Result, StorageError as Error};

/// The pool's state: its idle connections, and how many are open.
pub(super) struct Pool {
    pub(super) idle: Vec<PgConn>,
    /// Connections open, idle or checked out.
    pub(super) open: usize,
}

/// A checked-out connection, returned to the pool on drop (or dropped if it broke).
pub(super) struct Conn<'a> {
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

impl PgStorage {
    pub(super) fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: an idle one, a new one while under the pool size, or the next one
    /// freed, waiting up to the checkout timeout.
    pub(super) fn conn(&self) -> Result<Conn<'_>> {
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
