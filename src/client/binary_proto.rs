//! The binary protocol behind the same API: each single-key call as one request/response,
//! matched by opaque; SASL PLAIN on every new connection.

use super::{Client, ItemInfo, Protocol, SetOptions, Step};
use crate::conn::driver::{Op, Until, COPY_VALUE_MAX};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::binary::{self, Opcode, Packet, StatusKind};
use crate::proto::text::{Response, Storage};
use crate::proto::{Key, ParseError, Status};

/// What a binary or meta storage call answered.
pub(super) enum StoreOutcome {
    Stored,
    NotStored,
    Exists,
    NotFound,
}

impl StoreOutcome {
    /// The text reply with the same meaning for `cmd` (what `store_raw` returns).
    pub(super) fn response(self, cmd: Storage) -> Response<'static> {
        match (self, cmd) {
            (StoreOutcome::Stored, _) => Response::Stored,
            (StoreOutcome::Exists, Storage::Cas(_)) => Response::Exists,
            (StoreOutcome::NotFound, Storage::Cas(_)) => Response::NotFound,
            _ => Response::NotStored,
        }
    }
}

impl Client {
    /// Starts an operation on server `i`: connects if needed and, on a new connection,
    /// authenticates first when SASL is configured.
    pub(super) fn start(&mut self, i: usize) -> Result<Op> {
        let op = self.driver.begin(i)?;
        if self.sasl.is_none() || self.authenticated[i] == self.driver.connects(i) {
            return Ok(op);
        }
        let (user, password) = self.sasl.clone().expect("checked");
        let mut plain = Vec::with_capacity(user.len() + password.len() + 2);
        plain.push(0);
        plain.extend_from_slice(user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(password.as_bytes());
        let opaque = self.next_opaque();
        binary::encode_raw(
            self.driver.wbuf(i),
            Opcode::SASL_AUTH,
            b"PLAIN",
            &plain,
            opaque,
        );
        let r = self.bin_exchange(i, &op, None, opaque, |p| Step::Done(p.status));
        match r {
            Ok(binary::STATUS_OK) => {
                self.authenticated[i] = self.driver.connects(i);
                // A fresh deadline for the command itself.
                self.driver.begin(i)
            }
            Ok(status) => {
                self.driver.disconnect(i);
                Err(Error::Auth {
                    server: self.labels[i].clone(),
                    message: format!("SASL PLAIN rejected (status 0x{status:04x})"),
                })
            }
            Err(Error::Io { source, .. }) if self.protocol == Protocol::Binary => {
                Err(Error::Auth {
                    server: self.labels[i].clone(),
                    message: format!("connection closed during SASL: {source}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn next_opaque(&mut self) -> u32 {
        self.opaque = self.opaque.wrapping_add(1) & 0x7fff_ffff;
        self.opaque
    }

    /// The error for a failed status; some statuses leave the connection closed (the server
    /// closes after them, or the stream may be out of step: reference, section 7).
    pub(super) fn status_error(&mut self, i: usize, status: u16, message: &[u8]) -> Error {
        if closes_connection(status) {
            self.driver.disconnect(i);
        }
        status_to_error(&self.labels[i], status, message)
    }
}

/// After these statuses the server closes the connection, or the stream may be out of step.
pub(super) fn closes_connection(status: u16) -> bool {
    matches!(
        StatusKind::from_code(status),
        StatusKind::InvalidArguments | StatusKind::UnknownCommand | StatusKind::AuthError
    )
}

/// The crate error for a failed binary status.
pub(super) fn status_to_error(server: &str, status: u16, message: &[u8]) -> Error {
    let message = String::from_utf8_lossy(message).into_owned();
    match StatusKind::from_code(status) {
        StatusKind::AuthError | StatusKind::AuthContinue => Error::Auth {
            server: server.to_string(),
            message,
        },
        StatusKind::UnknownCommand => Error::Server {
            kind: ServerErrorKind::UnknownCommand,
            message,
        },
        StatusKind::ValueTooLarge | StatusKind::OutOfMemory | StatusKind::Other(_) => {
            Error::Server {
                kind: ServerErrorKind::Server,
                message,
            }
        }
        _ => Error::Server {
            kind: ServerErrorKind::Client,
            message,
        },
    }
}

impl Client {
    /// Sends the request in server `i`'s write buffer (plus `value`) and feeds each response
    /// with our `opaque` to `on` until it returns `Done`. A response with another opaque is a
    /// framing error: the connection is dropped, the reply never handed to the wrong caller.
    pub(super) fn bin_exchange<T>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        opaque: u32,
        mut on: impl FnMut(Packet<'_>) -> Step<T>,
    ) -> Result<T> {
        let limits = self.limits;
        let mut out = None;
        self.driver
            .exchange(i, op, value.map(|v| (v, &[][..])), Until::Done, |buf| {
                let (n, p) = match binary::parse_response(buf, &limits)? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                };
                if p.opaque != opaque {
                    return Err(ParseError::Unexpected);
                }
                match on(p) {
                    Step::More => Ok(Status::Complete((n, false))),
                    Step::Done(t) => {
                        out = Some(t);
                        Ok(Status::Complete((n, true)))
                    }
                }
            })?;
        Ok(out.expect("exchange returns Ok only after the last reply"))
    }

    /// A single-packet exchange: hands a successful packet to `sink` and returns its status
    /// with the error message (copied only for statuses that are not success and not in
    /// `expected`, so expected outcomes such as a miss allocate nothing).
    fn bin_call(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<&[u8]>,
        opaque: u32,
        expected: &[u16],
        mut sink: impl FnMut(&Packet<'_>),
    ) -> Result<(u16, Vec<u8>)> {
        let r = self.bin_exchange(i, op, value, opaque, |p| {
            if p.status == binary::STATUS_OK {
                sink(&p);
                Step::Done((p.status, Vec::new()))
            } else if expected.contains(&p.status) {
                Step::Done((p.status, Vec::new()))
            } else {
                Step::Done((p.status, p.value.to_vec()))
            }
        })?;
        Ok(r)
    }

    pub(super) fn bin_retrieve(
        &mut self,
        i: usize,
        with_cas: bool,
        touch: Option<u32>,
        key: Key<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<ItemInfo>> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let w = self.driver.wbuf(i);
        match touch {
            Some(exp) => binary::encode_with_exptime(w, Opcode::GAT, Some(key), exp, opaque),
            None => binary::encode_simple(w, Opcode::GET, Some(key), &[], opaque, 0),
        }
        let mut info = None;
        let (status, msg) =
            self.bin_call(i, &op, None, opaque, &[binary::STATUS_NOT_FOUND], |p| {
                sink(p.value);
                info = Some(ItemInfo {
                    flags: p.flags().unwrap_or(0),
                    cas: with_cas.then_some(p.cas),
                });
            })?;
        match status {
            binary::STATUS_OK if info.is_some() => Ok(info),
            binary::STATUS_NOT_FOUND => Ok(None),
            s => Err(self.status_error(i, s, &msg)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bin_store(
        &mut self,
        i: usize,
        op_code: Opcode,
        key: Key<'_>,
        value: &[u8],
        opts: SetOptions,
        cas: u64,
    ) -> Result<StoreOutcome> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let w = self.driver.wbuf(i);
        binary::encode_store(
            w,
            op_code,
            key,
            opts.flags,
            opts.ttl,
            value.len(),
            opaque,
            cas,
        );
        let separate = if value.len() <= COPY_VALUE_MAX {
            w.extend_from_slice(value);
            None
        } else {
            Some(value)
        };
        let unmet = [
            binary::STATUS_NOT_STORED,
            binary::STATUS_EXISTS,
            binary::STATUS_NOT_FOUND,
        ];
        let (status, msg) = self.bin_call(i, &op, separate, opaque, &unmet, |_| {})?;
        Ok(match status {
            binary::STATUS_OK => StoreOutcome::Stored,
            binary::STATUS_NOT_STORED => StoreOutcome::NotStored,
            binary::STATUS_EXISTS => StoreOutcome::Exists,
            binary::STATUS_NOT_FOUND => StoreOutcome::NotFound,
            s => return Err(self.status_error(i, s, &msg)),
        })
    }

    /// Delete, Touch: `Ok(true)` on success, `Ok(false)` when the key is missing.
    pub(super) fn bin_keyed_bool(
        &mut self,
        i: usize,
        op_code: Opcode,
        key: Key<'_>,
        exptime: Option<u32>,
    ) -> Result<bool> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let w = self.driver.wbuf(i);
        match exptime {
            Some(e) => binary::encode_with_exptime(w, op_code, Some(key), e, opaque),
            None => binary::encode_simple(w, op_code, Some(key), &[], opaque, 0),
        }
        let (status, msg) =
            self.bin_call(i, &op, None, opaque, &[binary::STATUS_NOT_FOUND], |_| {})?;
        match status {
            binary::STATUS_OK => Ok(true),
            binary::STATUS_NOT_FOUND => Ok(false),
            s => Err(self.status_error(i, s, &msg)),
        }
    }

    pub(super) fn bin_arith(
        &mut self,
        i: usize,
        decr: bool,
        key: Key<'_>,
        delta: u64,
    ) -> Result<Option<u64>> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let code = if decr {
            Opcode::DECREMENT
        } else {
            Opcode::INCREMENT
        };
        // Expiration 0xffffffff: fail on a missing key instead of creating it (section 4.5),
        // which is what the text protocol does.
        binary::encode_arith(self.driver.wbuf(i), code, key, delta, 0, u32::MAX, opaque);
        let mut n = None;
        let (status, msg) =
            self.bin_call(i, &op, None, opaque, &[binary::STATUS_NOT_FOUND], |p| {
                n = p.counter()
            })?;
        match status {
            binary::STATUS_OK => n.map(Some).ok_or_else(|| self.unexpected(i)),
            binary::STATUS_NOT_FOUND => Ok(None),
            s => Err(self.status_error(i, s, &msg)),
        }
    }

    /// Flush (with an optional delay) on server `i`.
    pub(super) fn bin_flush(&mut self, i: usize, delay: Option<u32>) -> Result<()> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let w = self.driver.wbuf(i);
        match delay {
            Some(d) => binary::encode_with_exptime(w, Opcode::FLUSH, None, d, opaque),
            None => binary::encode_simple(w, Opcode::FLUSH, None, &[], opaque, 0),
        }
        let (status, msg) = self.bin_call(i, &op, None, opaque, &[], |_| {})?;
        match status {
            binary::STATUS_OK => Ok(()),
            s => Err(self.status_error(i, s, &msg)),
        }
    }

    pub(super) fn bin_version(&mut self, i: usize) -> Result<String> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        binary::encode_simple(self.driver.wbuf(i), Opcode::VERSION, None, &[], opaque, 0);
        let mut v = String::new();
        let (status, msg) = self.bin_call(i, &op, None, opaque, &[], |p| {
            v = String::from_utf8_lossy(p.value).into_owned();
        })?;
        match status {
            binary::STATUS_OK => Ok(v),
            s => Err(self.status_error(i, s, &msg)),
        }
    }

    /// Stat: one packet per statistic, closed by an empty packet (section 4.9).
    pub(super) fn bin_stats(
        &mut self,
        i: usize,
        group: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        let op = self.start(i)?;
        let opaque = self.next_opaque();
        let key = group.unwrap_or("").as_bytes();
        binary::encode_raw(self.driver.wbuf(i), Opcode::STAT, key, b"", opaque);
        let mut stats = Vec::new();
        let mut failed = None;
        self.bin_exchange(i, &op, None, opaque, |p| {
            if p.status != binary::STATUS_OK {
                failed = Some((p.status, p.value.to_vec()));
                return Step::Done(());
            }
            if p.key.is_empty() && p.value.is_empty() {
                return Step::Done(());
            }
            stats.push((
                String::from_utf8_lossy(p.key).into_owned(),
                String::from_utf8_lossy(p.value).into_owned(),
            ));
            Step::More
        })?;
        match failed {
            Some((s, msg)) => Err(self.status_error(i, s, &msg)),
            None => Ok(stats),
        }
    }
}
