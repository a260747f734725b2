//! Pipelines of noreply commands: buffered per server, written in large chunks, one wait at
//! the end.

use super::reply::{refused, Strays};
use super::{combine, wire_key, Core};
use crate::client::{store_opts, SetOptions, StoreMode};
use crate::conn::batch::TLS_BATCH_BYTES;
use crate::conn::driver::{Batch, Until};
use crate::error::{Error, Result};
use crate::proto::wire::{with_wire, Capability, Cmd, Expect, Kind, Outcome, Wire};
use crate::proto::{Key, Limits, ParseError, Protocol, SetOutcome, Status};

/// Flush a server's buffer once it holds this much.
const PIPELINE_FLUSH: usize = 64 * 1024;

/// Over TLS, flush at this much, and wait for each flush to be processed: memcached 1.6
/// (with OpenSSL) leaves the commands of a TLS record it has decrypted but not parsed
/// waiting until more bytes reach the socket, so the last part of a long pipeline (and its
/// closing sync) would sit there until the call times out (reproduced with 500 to 2,000
/// noreply sets; see also `Client::tls_chunk`). A chunk of at most one record, closed by a
/// sync whose reply is read, is always processed. A record ([`TLS_BATCH_BYTES`]) less room
/// for the command that passes the mark and the closing sync.
const TLS_PIPELINE_FLUSH: usize = TLS_BATCH_BYTES - 1024;

/// What a [`Pipeline`] reports when finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineReport {
    /// Commands sent.
    pub commands: usize,
    /// Error lines the servers sent for them (noreply suppresses only success replies).
    pub errors: usize,
    /// Commands whose condition was not met: an add of an existing key, a replace, append,
    /// prepend or CAS that did not store, a delete, incr, decr or touch of a missing key.
    /// Binary and meta quiet commands report these; the text protocol's noreply does not,
    /// so over text this stays 0.
    pub unmet: usize,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// A batch of noreply commands, written in large chunks, with one wait at the end.
///
/// ```no_run
/// # fn main() -> mcstore::Result<()> {
/// # let mut client = mcstore::Client::builder().server("127.0.0.1:11211").build()?;
/// let mut p = client.pipeline();
/// for i in 0..10_000u32 {
///     p.set(format!("k{i}").as_bytes(), b"v", Default::default())?;
/// }
/// let report = p.finish()?;          // one round trip per server
/// assert_eq!(report.errors, 0);
/// # Ok(()) }
/// ```
pub struct Pipeline<'c> {
    client: &'c mut Core,
    /// The client's key buffer, for namespaced keys.
    keybuf: &'c mut Vec<u8>,
    /// Per server: started (connected, buffer cleared) in this pipeline.
    started: Vec<bool>,
    /// Per server: the connection owed a sync when this pipeline started on it (quiet
    /// commands of an earlier fire-and-forget call); one went first, and the replies up to
    /// it are not this pipeline's.
    strays: Vec<Strays>,
    /// Per server: the error that stopped it, if any.
    failed: Vec<Option<Error>>,
    /// With copies, per server: the keys written there and not yet confirmed. A server
    /// that fails (or answers an error line) may have missed any of them: each is then
    /// remembered for repair. Empty without copies.
    copy_keys: Vec<Vec<Box<[u8]>>>,
    commands: usize,
    errors: usize,
    unmet: usize,
    first_error: Option<String>,
}

impl std::fmt::Debug for Pipeline<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("servers", &self.client.labels)
            .field("commands", &self.commands)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl<'c> Pipeline<'c> {
    /// A pipeline on `core`'s connections ([`Client::pipeline`](crate::Client::pipeline)),
    /// namespaced keys built in `keybuf`.
    pub(crate) fn new(core: &'c mut Core, keybuf: &'c mut Vec<u8>) -> Pipeline<'c> {
        // Its connections stay mid-exchange between calls: a new list waits for its end.
        core.hold_list();
        let n = core.labels.len();
        Pipeline {
            client: core,
            keybuf,
            started: vec![false; n],
            strays: (0..n).map(|_| Strays::default()).collect(),
            failed: (0..n).map(|_| None).collect(),
            copy_keys: Vec::new(),
            commands: 0,
            errors: 0,
            unmet: 0,
            first_error: None,
        }
    }
}

/// A pipeline that wrote a sync ahead of its commands and did not read its reply (sent and
/// forgotten, or dropped) leaves that sync to the connection's next reader.
impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        for (i, strays) in self.strays.iter_mut().enumerate() {
            strays.abandon(&mut self.client.driver, i);
        }
        self.client.release_list();
    }
}

impl Pipeline<'_> {
    /// Routes `key` (or sends it to server `to`) and appends its command (encoded by
    /// `cmd`) to its server's buffer.
    #[inline]
    fn queue(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        to: Option<usize>,
        cmd: impl FnOnce(Key<'_>) -> Cmd<'_>,
    ) -> Result<usize> {
        let c = &mut *self.client;
        let binary_keys = c.protocol.supports(Capability::BinaryKeys);
        // Unique on the connection (shared with single calls and batches): a late reply
        // of this command can never be taken for another's.
        let opaque = c.next_opaque();
        let r = (|| {
            let (wire, raw) = wire_key(&c.namespace, key, binary_keys, self.keybuf)?;
            let hashed = if c.hash_with_namespace { raw } else { key };
            let i = match to {
                Some(i) => i,
                None => c.route(hashed)?,
            };
            if let Some(e) = &self.failed[i] {
                return Err(e.clone());
            }
            if !self.started[i] {
                c.start(i).inspect_err(|e| {
                    c.health.record_error(i, e, &mut c.ring);
                })?;
                self.started[i] = true;
                self.strays[i] = Strays::on(&mut c.driver, i);
                if self.strays[i].owed {
                    c.protocol.encode(c.driver.wbuf(i), &Cmd::Sync, 0, false);
                }
            }
            let w = c.driver.wbuf(i);
            let cmd = cmd(wire);
            with_wire!(c.protocol, W => {
                W::encode(w, &cmd, opaque, true);
                if let Some(v) = value {
                    w.extend_from_slice(v);
                    w.extend_from_slice(W::TRAILER);
                }
            });
            Ok(i)
        })();
        let i = r?;
        c.health.observe.queued(i);
        self.commands += 1;
        Ok(i)
    }

    /// Queues a command for `key` and writes its server's buffer if it is full (`large`: a
    /// value sent straight from the caller's slice after the command). With copies, the
    /// command goes to every copy that is up (a copy marked down or failing is remembered
    /// for repair), or with `first_only` (incr, decr: a counter means something on one
    /// copy) to the first copy up, the others getting a delete.
    #[inline]
    fn put(
        &mut self,
        key: &[u8],
        inline: Option<&[u8]>,
        large: Option<&[u8]>,
        first_only: bool,
        cmd: impl Fn(Key<'_>) -> Cmd<'_>,
    ) -> Result<()> {
        if !self.client.replicated() {
            let i = self.queue(key, inline, None, cmd)?;
            self.flush_after(i, large)?;
            // A key a list change moved is deleted where it was, in the same pipeline.
            if let Some((handover, h)) = self.client.previous_owners(key, self.keybuf)? {
                for j in handover.owners(h).iter().map(|&j| j as usize) {
                    if j != i {
                        let j = self.queue(key, None, Some(j), Cmd::delete)?;
                        self.maybe_flush(j)?;
                    }
                }
            }
            return Ok(());
        }
        self.send_copies(key, inline, large, first_only, cmd)
    }

    #[cold]
    #[inline(never)]
    fn send_copies(
        &mut self,
        key: &[u8],
        inline: Option<&[u8]>,
        large: Option<&[u8]>,
        first_only: bool,
        cmd: impl Fn(Key<'_>) -> Cmd<'_>,
    ) -> Result<()> {
        let copies = self.client.copies_for(key, self.keybuf)?;
        let (mut sent, mut commanded, mut first_error) = (0, false, None);
        for &i in copies.as_slice() {
            let i = i as usize;
            // A copy waiting for a repair of the key gets a delete (which repairs it).
            let blocked = self.client.fleet_shared().repairs.blocks(i, key);
            let delete = (first_only && commanded) || blocked;
            let r = self.client.check_up(i).and_then(|()| {
                let i = match delete {
                    true => self.queue(key, None, Some(i), Cmd::delete)?,
                    false => self.queue(key, inline, Some(i), &cmd)?,
                };
                self.flush_after(i, large.filter(|_| !delete))
            });
            match r {
                Ok(()) => {
                    sent += 1;
                    commanded |= !delete;
                    let n = self.started.len();
                    self.copy_keys.resize_with(n, Vec::new);
                    self.copy_keys[i].push(key.into());
                }
                Err(e) => {
                    self.client.fleet_shared().repairs.record(i, key);
                    self.missed(i);
                    first_error.get_or_insert(e);
                }
            }
        }
        match (sent, first_error) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Server `i` failed: every key written there in this pipeline may be missing (its
    /// connection was dropped with them): each is remembered for repair.
    fn missed(&mut self, i: usize) {
        if let Some(keys) = self.copy_keys.get_mut(i) {
            let repairs = &self.client.fleet_shared().repairs;
            for k in keys.drain(..) {
                repairs.record(i, &k);
            }
        }
    }

    /// After a command for server `i` was queued: its value if it is sent apart, or its
    /// buffer if it is full.
    #[inline]
    fn flush_after(&mut self, i: usize, large: Option<&[u8]>) -> Result<()> {
        match large {
            Some(v) => self.flush(i, Some(v)),
            None => self.maybe_flush(i),
        }
    }

    fn maybe_flush(&mut self, i: usize) -> Result<()> {
        let at = if self.client.driver.is_tls() {
            TLS_PIPELINE_FLUSH
        } else {
            PIPELINE_FLUSH
        };
        if self.client.driver.wbuf(i).len() >= at {
            self.flush(i, None)?;
        }
        Ok(())
    }

    /// Queues a noreply storage command.
    ///
    /// # Errors
    /// An invalid key or a value above the maximum; the key's server down, unreachable or
    /// failed earlier in this pipeline, or failing while a full buffer is flushed.
    pub fn store(
        &mut self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<&mut Self> {
        self.client.check_value(value)?;
        let large = value.len() > PIPELINE_FLUSH;
        let opts = store_opts(mode, opts);
        let inline = (!large).then_some(value);
        // Large values go out straight from the caller's slice, without a copy.
        let apart = large.then_some(value);
        // With copies, a conditional store (add, replace, append, prepend) goes to the
        // first copy only and the others are deleted: a copy holds the latest value or
        // nothing, and a noreply command's outcome is not known to reconcile them.
        let first_only = mode != StoreMode::Set;
        self.put(key, inline, apart, first_only, |k| {
            Cmd::Store(k, opts, value.len())
        })?;
        Ok(self)
    }

    /// Queues a noreply `set`. Errors as [`store`](Self::store).
    pub fn set(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<&mut Self> {
        self.store(StoreMode::Set, key, value, opts)
    }

    /// Queues a noreply `delete`. Errors as [`store`](Self::store).
    pub fn delete(&mut self, key: &[u8]) -> Result<&mut Self> {
        self.put(key, None, None, false, Cmd::delete)?;
        Ok(self)
    }

    /// Queues a noreply `incr` (or `decr`). Errors as [`store`](Self::store).
    pub fn incr(&mut self, key: &[u8], delta: u64, decr: bool) -> Result<&mut Self> {
        self.put(key, None, None, true, |key| Cmd::Arith { key, decr, delta })?;
        Ok(self)
    }

    /// Queues a noreply `touch`. Errors as [`store`](Self::store).
    pub fn touch(&mut self, key: &[u8], ttl: u32) -> Result<&mut Self> {
        self.put(key, None, None, false, |key| Cmd::Touch(key, ttl))?;
        Ok(self)
    }

    /// Writes server `i`'s buffer (then `value` and the data trailer), counting error lines
    /// that arrive meanwhile. A failure is remembered for that server and returned.
    fn flush(&mut self, i: usize, value: Option<&[u8]>) -> Result<()> {
        let c = &mut *self.client;
        let op = c.driver.new_op();
        let (limits, protocol) = (c.limits, c.protocol);
        // Over TLS, each flush is closed by a sync and waits for it (`TLS_PIPELINE_FLUSH`).
        let synced = c.driver.is_tls() && value.is_none();
        if synced {
            protocol.encode(c.driver.wbuf(i), &Cmd::Sync, 0, false);
        }
        let until = if synced { Until::Done } else { Until::Written };
        let mut counts = Counts {
            errors: &mut self.errors,
            unmet: &mut self.unmet,
            first: &mut self.first_error,
        };
        let strays = &mut self.strays[i];
        let r = c.driver.exchange(
            i,
            &op,
            value.map(|v| (v, protocol.trailer())),
            until,
            |buf| counts.read_after(strays, buf, &limits, synced, protocol),
        );
        // Their replies (failures only) are read by `finish`, or by the next call that
        // reads replies on this connection.
        if synced && r.is_ok() {
            strays.settle(&mut c.driver, &mut c.health, i);
            *strays = Strays::default();
        }
        c.driver.set_owes_sync(i, !synced);
        c.driver.wbuf(i).clear();
        c.health.observe.bytes(i, c.driver.bytes(i));
        if let Err(e) = r {
            c.health.record_error(i, &e, &mut c.ring);
            self.failed[i] = Some(e.clone());
            self.missed(i);
            return Err(e);
        }
        Ok(())
    }

    /// Writes what is buffered without waiting for the servers.
    ///
    /// # Errors
    /// The first server whose buffer could not be written.
    pub fn send(mut self) -> Result<()> {
        for i in 0..self.started.len() {
            if self.started[i] && self.failed[i].is_none() {
                self.flush(i, None)?;
            }
        }
        Ok(())
    }

    /// Sends everything, then waits until every server has processed it all (one round trip
    /// at the end, all servers at once), and reports the error lines they sent.
    ///
    /// # Errors
    /// A server could not be reached (what went to the others was still sent): its error,
    /// or [`Error::Partial`] naming each.
    pub fn finish(mut self) -> Result<PipelineReport> {
        let c = &mut *self.client;
        let mut batches = Vec::new();
        let protocol = c.protocol;
        let op = c.driver.new_op();
        for i in 0..self.started.len() {
            if self.started[i] && self.failed[i].is_none() {
                protocol.encode(c.driver.wbuf(i), &Cmd::Sync, 0, false);
                batches.push(Batch::new(i, None, &op));
            }
        }
        let limits = c.limits;
        let mut counts = Counts {
            errors: &mut self.errors,
            unmet: &mut self.unmet,
            first: &mut self.first_error,
        };
        let strays = &mut self.strays;
        c.driver
            .exchange_many(&mut batches, &op, Until::Done, |i, buf| {
                counts.read_after(&mut strays[i], buf, &limits, true, protocol)
            });
        let mut failed = Vec::new();
        // With copies: an error line (a copy that did not store) cannot be told apart from
        // the others: every copy's keys are then remembered for repair.
        let any_error_line = self.errors > 0;
        let mut missed = Vec::new();
        for b in batches {
            if b.error.is_some() || any_error_line {
                missed.push(b.server);
            }
            if b.error.is_none() {
                c.driver.set_owes_sync(b.server, false);
                self.strays[b.server].settle(&mut c.driver, &mut c.health, b.server);
            }
            let r = b.error.map_or(Ok(()), Err);
            c.health.record(b.server, &r, &mut c.ring);
            c.health.observe.bytes(b.server, c.driver.bytes(b.server));
            if let Err(e) = r {
                failed.push((c.labels[b.server].clone(), e));
            }
        }
        for (i, e) in self.failed.iter_mut().enumerate() {
            if let Some(e) = e.take() {
                failed.push((c.labels[i].clone(), e));
            }
        }
        for i in missed {
            self.missed(i);
        }
        combine(failed)?;
        Ok(PipelineReport {
            commands: self.commands,
            errors: self.errors,
            unmet: self.unmet,
            first_error: self.first_error.take(),
        })
    }
}

/// What a pipeline's replies add up to.
struct Counts<'p> {
    errors: &'p mut usize,
    unmet: &'p mut usize,
    first: &'p mut Option<String>,
}

impl Counts<'_> {
    /// [`read`](Self::read), after the replies `strays` still has to set aside.
    fn read_after(
        &mut self,
        strays: &mut Strays,
        buf: &[u8],
        limits: &Limits,
        until_end: bool,
        protocol: Protocol,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        if strays.pending {
            return with_wire!(protocol, W => strays.read::<W>(buf, limits));
        }
        self.read(buf, limits, until_end, protocol)
    }

    /// Reply handler for noreply traffic: error replies and unmet conditions are counted,
    /// the reply to [`Cmd::Sync`] ends the pipeline (when `until_end`; before, it means the
    /// stream is out of step). Quiet binary and meta commands still report unmet conditions
    /// (not found, not stored, exists; and a meta touch's hit), which text noreply
    /// suppresses; the protocol's decoder refuses anything a quiet stream cannot carry.
    fn read(
        &mut self,
        buf: &[u8],
        limits: &Limits,
        until_end: bool,
        protocol: Protocol,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let (n, unit) = match protocol.decode(buf, &Expect::batch(Kind::Quiet), limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        match unit.outcome {
            Outcome::End if until_end => return Ok(Status::Complete((n, true))),
            Outcome::End => return Err(ParseError::Unexpected),
            Outcome::Error {
                refusal, message, ..
            } => {
                *self.errors += 1;
                self.first
                    .get_or_insert_with(|| refused("", refusal, message).to_string());
            }
            Outcome::Store(
                SetOutcome::NotStored | SetOutcome::Exists | SetOutcome::NotFound,
                ..,
            )
            | Outcome::NotFound(_) => *self.unmet += 1,
            _ => {}
        }
        Ok(Status::Complete((n, false)))
    }
}

/// The pipeline's reply reading, for the stream fuzz body.
#[cfg(any(test, fuzzing))]
pub(crate) mod for_fuzzing {
    use super::*;

    /// Reads one reply unit of a pipeline closed by a sync, as [`Pipeline::finish`] does:
    /// `Complete((n, true))` at the sync's reply; errors and unmet conditions are counted.
    pub(crate) fn read_quiet(
        buf: &[u8],
        limits: &Limits,
        protocol: Protocol,
        errors: &mut usize,
        unmet: &mut usize,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let mut first = None;
        let mut counts = Counts {
            errors,
            unmet,
            first: &mut first,
        };
        counts.read(buf, limits, true, protocol)
    }
}
