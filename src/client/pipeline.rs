//! Pipelines of noreply commands: buffered per server, written in large chunks, one wait at
//! the end.

use super::binary_proto::status_to_error;
use super::meta_proto::meta_error;
use super::{server_error, wire_key, Client, Protocol, SetOptions, StoreMode};
use crate::conn::driver::{Batch, Until};
use crate::error::{Error, Result};
use crate::proto::binary::{self, Opcode};
use crate::proto::meta::{self, Code, Reply};
use crate::proto::text::{self, Response, DATA_TRAILER};
use crate::proto::{Key, Limits, ParseError, Status};

/// Flush a server's buffer once it holds this much.
const PIPELINE_FLUSH: usize = 64 * 1024;

/// What a [`Pipeline`] reports when finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineReport {
    /// Commands sent.
    pub commands: usize,
    /// Error lines the servers sent for them (noreply suppresses only success replies).
    pub errors: usize,
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
    client: &'c mut Client,
    /// Per server: started (connected, buffer cleared) in this pipeline.
    started: Vec<bool>,
    /// Per server: the error that stopped it, if any.
    failed: Vec<Option<Error>>,
    commands: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Client {
    /// Starts a pipeline of noreply writes: they are buffered per server and sent in large
    /// writes without waiting for replies, and [`Pipeline::finish`] waits once for every server
    /// to have processed them all.
    pub fn pipeline(&mut self) -> Pipeline<'_> {
        let n = self.labels.len();
        Pipeline {
            client: self,
            started: vec![false; n],
            failed: (0..n).map(|_| None).collect(),
            commands: 0,
            errors: 0,
            first_error: None,
        }
    }
}

impl Pipeline<'_> {
    /// Routes `key` and appends its command (encoded by `encode`) to its server's buffer.
    fn queue(&mut self, key: &[u8], encode: impl FnOnce(&mut Vec<u8>, Key<'_>)) -> Result<usize> {
        let c = &mut *self.client;
        let mut kb = std::mem::take(&mut c.keybuf);
        let meta = c.protocol == Protocol::Meta;
        let r = (|| {
            let (wire, raw) = wire_key(&c.namespace, key, meta, &mut kb)?;
            let hashed = if c.hash_with_namespace { raw } else { key };
            let i = c.route(hashed)?;
            if let Some(e) = &self.failed[i] {
                return Err(Error::Config(format!(
                    "pipeline to {} already failed: {e}",
                    c.labels[i]
                )));
            }
            if !self.started[i] {
                c.start(i).inspect_err(|e| {
                    c.health.record_error(i, e, &mut c.ring);
                })?;
                self.started[i] = true;
            }
            encode(c.driver.wbuf(i), wire);
            Ok(i)
        })();
        c.keybuf = kb;
        let i = r?;
        self.commands += 1;
        Ok(i)
    }

    fn protocol(&self) -> Protocol {
        self.client.protocol
    }

    fn maybe_flush(&mut self, i: usize) -> Result<()> {
        if self.client.driver.wbuf(i).len() >= PIPELINE_FLUSH {
            self.flush(i, None)?;
        }
        Ok(())
    }

    /// Queues a noreply storage command.
    pub fn store(
        &mut self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<&mut Self> {
        self.client.check_value(value)?;
        let large = value.len() > PIPELINE_FLUSH;
        let protocol = self.protocol();
        let opaque = self.commands as u32;
        let i = self.queue(key, |w, k| {
            if protocol == Protocol::Meta {
                let f = meta::SetFlags {
                    mode: mode.meta(),
                    ttl: opts.ttl,
                    client_flags: opts.flags,
                    quiet: true,
                    ..meta::SetFlags::default()
                };
                meta::encode_set(w, k, value.len(), &f);
                if !large {
                    w.extend_from_slice(value);
                    w.extend_from_slice(DATA_TRAILER);
                }
            } else if protocol == Protocol::Binary {
                let op = match mode {
                    StoreMode::Set => Opcode::SETQ,
                    StoreMode::Add => Opcode::ADDQ,
                    StoreMode::Replace => Opcode::REPLACEQ,
                    StoreMode::Append => Opcode::APPENDQ,
                    StoreMode::Prepend => Opcode::PREPENDQ,
                };
                binary::encode_store(w, op, k, opts.flags, opts.ttl, value.len(), opaque, 0);
                if !large {
                    w.extend_from_slice(value);
                }
            } else {
                text::encode_storage(w, mode.wire(), k, opts.flags, opts.ttl, value.len(), true);
                if !large {
                    w.extend_from_slice(value);
                    w.extend_from_slice(DATA_TRAILER);
                }
            }
        })?;
        if large {
            // Large values go out straight from the caller's slice, without a copy.
            self.flush(i, Some(value))?;
        } else {
            self.maybe_flush(i)?;
        }
        Ok(self)
    }

    /// Queues a noreply `set`.
    pub fn set(&mut self, key: &[u8], value: &[u8], opts: SetOptions) -> Result<&mut Self> {
        self.store(StoreMode::Set, key, value, opts)
    }

    /// Queues a noreply `delete`.
    pub fn delete(&mut self, key: &[u8]) -> Result<&mut Self> {
        let (protocol, opaque) = (self.protocol(), self.commands as u32);
        let i = self.queue(key, |w, k| {
            if protocol == Protocol::Meta {
                let f = meta::DeleteFlags {
                    quiet: true,
                    ..meta::DeleteFlags::default()
                };
                meta::encode_delete(w, k, &f);
            } else if protocol == Protocol::Binary {
                binary::encode_simple(w, Opcode::DELETEQ, Some(k), &[], opaque, 0);
            } else {
                text::encode_delete(w, k, true);
            }
        })?;
        self.maybe_flush(i)?;
        Ok(self)
    }

    /// Queues a noreply `incr` (or `decr`).
    pub fn incr(&mut self, key: &[u8], delta: u64, decr: bool) -> Result<&mut Self> {
        let (protocol, opaque) = (self.protocol(), self.commands as u32);
        let i = self.queue(key, |w, k| {
            if protocol == Protocol::Meta {
                let f = meta::ArithFlags {
                    decr,
                    delta,
                    quiet: true,
                    ..meta::ArithFlags::default()
                };
                meta::encode_arith(w, k, &f);
            } else if protocol == Protocol::Binary {
                let op = if decr {
                    Opcode::DECREMENTQ
                } else {
                    Opcode::INCREMENTQ
                };
                binary::encode_arith(w, op, k, delta, 0, u32::MAX, opaque);
            } else {
                text::encode_arith(w, decr, k, delta, true);
            }
        })?;
        self.maybe_flush(i)?;
        Ok(self)
    }

    /// Queues a noreply `touch`.
    pub fn touch(&mut self, key: &[u8], ttl: u32) -> Result<&mut Self> {
        let (protocol, opaque) = (self.protocol(), self.commands as u32);
        let i = self.queue(key, |w, k| {
            if protocol == Protocol::Meta {
                // A hit answers HD even with q (notes §5); count_errors skips it.
                let f = meta::GetFlags {
                    touch: Some(ttl),
                    quiet: true,
                    ..meta::GetFlags::default()
                };
                meta::encode_get(w, k, &f);
            } else if protocol == Protocol::Binary {
                // Touch has no quiet form: its success reply is read and ignored.
                binary::encode_with_exptime(w, Opcode::TOUCH, Some(k), ttl, opaque);
            } else {
                text::encode_touch(w, k, ttl, true);
            }
        })?;
        self.maybe_flush(i)?;
        Ok(self)
    }

    /// Writes server `i`'s buffer (then `value` and the data trailer), counting error lines
    /// that arrive meanwhile. A failure is remembered for that server and returned.
    fn flush(&mut self, i: usize, value: Option<&[u8]>) -> Result<()> {
        let c = &mut *self.client;
        let op = c.driver.new_op();
        let limits = c.limits;
        let (errors, first) = (&mut self.errors, &mut self.first_error);
        let protocol = c.protocol;
        let trailer = if protocol == Protocol::Binary {
            &b""[..]
        } else {
            DATA_TRAILER
        };
        let r = c
            .driver
            .exchange(i, &op, value.map(|v| (v, trailer)), Until::Written, |buf| {
                count_errors(buf, &limits, errors, first, false, protocol)
            });
        c.driver.wbuf(i).clear();
        if let Err(e) = r {
            c.health.record_error(i, &e, &mut c.ring);
            self.failed[i] = Some(clone_error(&e));
            return Err(e);
        }
        Ok(())
    }

    /// Writes what is buffered without waiting for the servers.
    pub fn send(mut self) -> Result<()> {
        for i in 0..self.started.len() {
            if self.started[i] && self.failed[i].is_none() {
                self.flush(i, None)?;
            }
        }
        Ok(())
    }

    /// Sends everything, then waits until every server has processed it all (one `version`
    /// round trip at the end, all servers at once), and reports the error lines they sent.
    /// Fails if a server could not be reached; what went to the others was still sent.
    pub fn finish(mut self) -> Result<PipelineReport> {
        let c = &mut *self.client;
        let mut batches = Vec::new();
        let protocol = c.protocol;
        for i in 0..self.started.len() {
            if self.started[i] && self.failed[i].is_none() {
                let w = c.driver.wbuf(i);
                match protocol {
                    Protocol::Binary => {
                        binary::encode_simple(w, Opcode::NOOP, None, &[], u32::MAX, 0)
                    }
                    Protocol::Meta => meta::encode_noop(w),
                    Protocol::Text => text::encode_version(w),
                }
                batches.push(Batch::new(i, None));
            }
        }
        let op = c.driver.new_op();
        let limits = c.limits;
        let (errors, first) = (&mut self.errors, &mut self.first_error);
        c.driver
            .exchange_many(&mut batches, &op, Until::Done, |_, buf| {
                count_errors(buf, &limits, errors, first, true, protocol)
            });
        let mut failed = Vec::new();
        for b in batches {
            let r = b.error.map_or(Ok(()), Err);
            c.health.record(b.server, &r, &mut c.ring);
            if let Err(e) = r {
                failed.push((c.labels[b.server].clone(), e));
            }
        }
        for (i, e) in self.failed.iter_mut().enumerate() {
            if let Some(e) = e.take() {
                failed.push((c.labels[i].clone(), e));
            }
        }
        match failed.len() {
            0 => Ok(PipelineReport {
                commands: self.commands,
                errors: self.errors,
                first_error: self.first_error,
            }),
            1 => Err(failed.pop().expect("one").1),
            _ => Err(Error::Partial { failed }),
        }
    }
}

/// A copy of a transport error for the pipeline's records (`io::Error` is not `Clone`).
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Io { server, source } => Error::Io {
            server: server.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Timeout {
            server,
            during,
            elapsed,
        } => Error::Timeout {
            server: server.clone(),
            during,
            elapsed: *elapsed,
        },
        Error::Parse { server, error } => Error::Parse {
            server: server.clone(),
            error: *error,
        },
        other => Error::Config(other.to_string()),
    }
}

/// Reply handler for noreply traffic: error lines are counted, `VERSION` (binary: the No-op,
/// meta: `MN`) ends the pipeline (when `until_end`), anything else means the stream is out of
/// step. In binary and meta, quiet commands report unmet conditions (not found, not stored,
/// exists; and a meta touch's hit), which text noreply suppresses: those are not counted as
/// errors either.
fn count_errors(
    buf: &[u8],
    limits: &Limits,
    errors: &mut usize,
    first: &mut Option<String>,
    until_end: bool,
    protocol: Protocol,
) -> Result<Status<(usize, bool)>, ParseError> {
    if protocol == Protocol::Meta {
        return match meta::parse_reply(buf, limits)? {
            Status::Partial => Ok(Status::Partial),
            Status::Complete((n, Reply::Meta(m))) if m.code == Code::Noop => {
                if until_end {
                    Ok(Status::Complete((n, true)))
                } else {
                    Err(ParseError::Unexpected)
                }
            }
            Status::Complete((n, Reply::Meta(_))) => Ok(Status::Complete((n, false))),
            Status::Complete((n, r)) => match meta_error(&r) {
                Some(e) => {
                    *errors += 1;
                    first.get_or_insert_with(|| e.to_string());
                    Ok(Status::Complete((n, false)))
                }
                None => Err(ParseError::Unexpected),
            },
        };
    }
    if protocol == Protocol::Binary {
        return match binary::parse_response(buf, limits)? {
            Status::Partial => Ok(Status::Partial),
            Status::Complete((n, p)) if p.opcode == Opcode::NOOP && until_end => {
                Ok(Status::Complete((n, true)))
            }
            Status::Complete((n, p)) => {
                let unmet = [
                    binary::STATUS_OK,
                    binary::STATUS_NOT_FOUND,
                    binary::STATUS_NOT_STORED,
                    binary::STATUS_EXISTS,
                ];
                if !unmet.contains(&p.status) {
                    *errors += 1;
                    first.get_or_insert_with(|| status_to_error("", p.status, p.value).to_string());
                }
                Ok(Status::Complete((n, false)))
            }
        };
    }
    let until_version = until_end;
    match text::parse_reply(buf, limits)? {
        Status::Partial => Ok(Status::Partial),
        Status::Complete((n, Response::Version(_))) if until_version => {
            Ok(Status::Complete((n, true)))
        }
        Status::Complete((n, r)) => match server_error(&r) {
            Some(e) => {
                *errors += 1;
                first.get_or_insert_with(|| e.to_string());
                Ok(Status::Complete((n, false)))
            }
            None => Err(ParseError::Unexpected),
        },
    }
}
