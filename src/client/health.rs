//! Server health: consecutive failures, ejection and rejoin (libmemcached's model), and
//! per-server counters.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ring::{Continuum, Distribution};

/// Per-server counters, readable with [`Client::server_counters`](crate::Client::server_counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Requests sent to the server (a multi-key call counts once per server it involves).
    pub requests: u64,
    /// Keys found by retrieval commands.
    pub hits: u64,
    /// Keys not found by retrieval commands.
    pub misses: u64,
    /// Failed requests: I/O, timeout, malformed reply, or an error line from the server.
    pub errors: u64,
    /// Of those, timeouts.
    pub timeouts: u64,
    /// Times the server was ejected after `server_failure_limit` consecutive failures.
    pub ejections: u64,
    /// Connections opened after the first one.
    pub reconnects: u64,
}

/// What to do about failing servers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailurePolicy {
    pub(crate) failure_limit: u32,
    pub(crate) retry_timeout: Duration,
    pub(crate) remove_failed: bool,
}

struct ServerHealth {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    counters: ServerCounters,
}

pub(crate) struct Health {
    servers: Vec<ServerHealth>,
    policy: FailurePolicy,
    /// The earliest time an ejected server may be retried.
    next_retry: Option<Instant>,
}

impl Health {
    pub(crate) fn new(n: usize, policy: FailurePolicy) -> Health {
        Health {
            servers: (0..n)
                .map(|_| ServerHealth {
                    consecutive_failures: 0,
                    ejected_until: None,
                    counters: ServerCounters::default(),
                })
                .collect(),
            policy,
            next_retry: None,
        }
    }

    /// Lets ejected servers whose retry time has come back in. A server that rejoins is on
    /// probation: one more failure ejects it again; one success clears it.
    pub(crate) fn maybe_rejoin(&mut self, ring: &mut Continuum) {
        let Some(at) = self.next_retry else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.next_retry = None;
        for (i, s) in self.servers.iter_mut().enumerate() {
            match s.ejected_until {
                Some(until) if until <= now => {
                    s.ejected_until = None;
                    s.consecutive_failures = self.policy.failure_limit.saturating_sub(1);
                    ring.set_live(i, true);
                }
                Some(until) => {
                    self.next_retry = Some(self.next_retry.map_or(until, |t| t.min(until)));
                }
                None => {}
            }
        }
    }

    /// `Err(retry_in)` if server `i` is ejected.
    pub(crate) fn check(&self, i: usize) -> std::result::Result<(), Duration> {
        match self.servers[i].ejected_until {
            Some(until) => Err(until.saturating_duration_since(Instant::now())),
            None => Ok(()),
        }
    }

    pub(crate) fn counters_mut(&mut self, i: usize) -> &mut ServerCounters {
        &mut self.servers[i].counters
    }

    /// Counts a retrieval's hit or miss.
    pub(crate) fn count_lookup(&mut self, i: usize, hit: bool) {
        let c = &mut self.servers[i].counters;
        if hit {
            c.hits += 1;
        } else {
            c.misses += 1;
        }
    }

    pub(crate) fn counters(&self, i: usize) -> ServerCounters {
        self.servers[i].counters
    }

    /// Records the outcome of one request to server `i`.
    pub(crate) fn record<T>(&mut self, i: usize, r: &Result<T>, ring: &mut Continuum) {
        self.servers[i].counters.requests += 1;
        match r {
            Ok(_) => self.servers[i].consecutive_failures = 0,
            Err(e) => self.record_error(i, e, ring),
        }
    }

    /// Records a failed request to server `i` (the request itself is counted by the caller).
    pub(crate) fn record_error(&mut self, i: usize, e: &Error, ring: &mut Continuum) {
        let s = &mut self.servers[i];
        match e {
            Error::Io { .. } | Error::Timeout { .. } | Error::Parse { .. } => {
                s.counters.errors += 1;
                if matches!(e, Error::Timeout { .. }) {
                    s.counters.timeouts += 1;
                }
                s.consecutive_failures += 1;
                if s.consecutive_failures >= self.policy.failure_limit && s.ejected_until.is_none()
                {
                    let until = Instant::now() + self.policy.retry_timeout;
                    s.ejected_until = Some(until);
                    s.counters.ejections += 1;
                    self.next_retry = Some(self.next_retry.map_or(until, |t| t.min(until)));
                    if self.policy.remove_failed && ring.distribution() != Distribution::Modula {
                        ring.set_live(i, false);
                    }
                }
            }
            // The server answered: it is healthy, the request was not.
            Error::Server { .. } => {
                s.counters.errors += 1;
                s.consecutive_failures = 0;
            }
            _ => {}
        }
    }
}
