//! Multi-key calls: keys grouped by server, every server's batch written first, all sockets
//! served from one poll.

use super::binary_proto::{closes_connection, status_to_error};
use super::meta_proto::meta_error;
use super::{server_error, wire_key, Client, ItemRef, Protocol, SetOptions};
use crate::conn::driver::{Batch, Until};
use crate::error::{Error, Result};
use crate::proto::binary::{self, Opcode};
use crate::proto::meta::{self, Code, Reply};
use crate::proto::text::{self, Response, Retrieval, Storage, DATA_TRAILER};
use crate::proto::{short_eq, Key, ParseError, Status, MAX_KEY_LEN};

/// memcached reads a command line into a bounded buffer; long multi-gets are split into lines
/// of this many keys, all written before any reply is read.
const KEYS_PER_LINE: usize = 100;

/// Marks a key whose server is ejected (or that has no server).
const NO_SERVER: u32 = u32::MAX;

/// One server's share of a multi-key call.
#[derive(Default)]
struct Share {
    /// Keys routed to this server.
    keys: usize,
    /// Keys in the get line being built.
    in_line: usize,
    /// Replies (lines, for gets) expected and seen.
    expected: usize,
    seen: usize,
    /// Position in the caller's key list of the next key a reply may be for.
    cursor: usize,
    /// Hits (gets) or successes (stores, deletes).
    hits: usize,
    /// Set when the server failed.
    error: Option<Error>,
}

/// A multi-key call being planned: each key's server and each server's share.
#[derive(Default)]
struct Plan {
    server_of: Vec<u32>,
    shares: Vec<Share>,
    /// A retrieval: count each healthy server's hits and misses.
    retrieval: bool,
    /// No namespace and every key a valid text key: each goes on the wire as given.
    plain: bool,
}

/// What one multi-key call leaves for the next, so that a warm call allocates nothing.
#[derive(Default)]
pub(super) struct Spare {
    plan: Plan,
    batches: Vec<Batch<'static>>,
}

impl Client {
    /// Validates every key and picks its server. Ejected servers fail their share at once.
    fn plan<'k>(&mut self, n: usize, key_at: impl Fn(usize) -> &'k [u8]) -> Result<Plan> {
        let mut kb = std::mem::take(&mut self.keybuf);
        let r = self.plan_in(n, key_at, &mut kb);
        self.keybuf = kb;
        r
    }

    fn plan_in<'k>(
        &mut self,
        n: usize,
        key_at: impl Fn(usize) -> &'k [u8],
        kb: &mut Vec<u8>,
    ) -> Result<Plan> {
        let meta = self.protocol == Protocol::Meta;
        self.health.maybe_rejoin(&mut self.ring);
        let mut plan = std::mem::take(&mut self.spare.plan);
        plan.server_of.clear();
        plan.server_of.reserve(n);
        plan.shares.clear();
        plan.shares.resize_with(self.labels.len(), Share::default);
        plan.retrieval = false;
        plan.plain = self.namespace.is_empty();
        // One pass: validate each key and pick its server. No connection is touched until
        // every key has passed.
        let mut no_servers = false;
        for j in 0..n {
            let user = key_at(j);
            // The common case without building the wire key; the rest (namespace too long,
            // binary keys over meta, errors) as every call does.
            if Key::new(user).is_err() || self.namespace.len() + user.len() > MAX_KEY_LEN {
                if let Err(e) = wire_key(&self.namespace, user, meta, kb) {
                    self.spare.plan = plan;
                    return Err(e);
                }
                plan.plain = false; // a binary key over meta: base64 on the wire
            }
            let hashed: &[u8] = if self.hash_with_namespace && !self.namespace.is_empty() {
                kb.clear();
                kb.extend_from_slice(&self.namespace);
                kb.extend_from_slice(user);
                kb
            } else {
                user
            };
            match self.ring.pick(hashed) {
                Some(i) => {
                    plan.shares[i].keys += 1;
                    plan.server_of.push(i as u32);
                }
                // Keep validating: a bad key is reported before a missing server.
                None => no_servers = true,
            }
        }
        if no_servers {
            self.spare.plan = plan;
            return Err(Error::NoServers);
        }
        // Each server with keys: is it up? Then connect and start its request.
        let mut failed = false;
        for i in 0..plan.shares.len() {
            if plan.shares[i].keys > 0 {
                if let Err(e) = self.check_up(i).and_then(|()| self.start(i).map(drop)) {
                    plan.shares[i].error = Some(e);
                    failed = true;
                }
            }
        }
        if failed {
            for s in plan.server_of.iter_mut() {
                if plan.shares[*s as usize].error.is_some() {
                    *s = NO_SERVER;
                }
            }
        }
        Ok(plan)
    }

    /// Runs the planned request on every server that has one, then records health and
    /// combines errors: the one failed server's error, or [`Error::Partial`].
    fn run_plan(
        &mut self,
        plan: &mut Plan,
        mut on_reply: impl FnMut(&mut Plan, usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    ) -> Result<()> {
        let mut batches = std::mem::take(&mut self.spare.batches);
        batches.extend(
            plan.shares
                .iter()
                .enumerate()
                .filter(|(_, s)| s.keys > 0 && s.error.is_none())
                .map(|(i, _)| Batch::new(i, None)),
        );
        let op = self.driver.new_op();
        self.driver
            .exchange_many(&mut batches, &op, Until::Done, |i, buf| {
                on_reply(plan, i, buf)
            });
        for b in batches.drain(..) {
            let share = &mut plan.shares[b.server];
            if let Some(e) = b.error {
                share.error = Some(e);
            }
        }
        self.spare.batches = batches;
        let mut failed = Vec::new();
        for (i, share) in plan.shares.iter_mut().enumerate() {
            if share.keys == 0 {
                continue;
            }
            match share.error.take() {
                Some(e @ Error::ServerDown { .. }) => failed.push((self.labels[i].clone(), e)),
                Some(e) => {
                    self.health.counters_mut(i).requests += 1;
                    self.health.record_error(i, &e, &mut self.ring);
                    failed.push((self.labels[i].clone(), e));
                }
                None => {
                    self.health.record(i, &Ok(()), &mut self.ring);
                    if plan.retrieval {
                        let c = self.health.counters_mut(i);
                        c.hits += share.hits as u64;
                        c.misses += (share.keys - share.hits) as u64;
                    }
                }
            }
        }
        match failed.len() {
            0 => Ok(()),
            1 => Err(failed.pop().expect("one").1),
            _ => Err(Error::Partial { failed }),
        }
    }

    /// Gets many keys in one pipelined request per server, calling `found(key, item)` for each
    /// hit as it arrives (borrowing from the read buffer: no copy per item). Misses are not
    /// reported. All keys are validated before anything is sent.
    ///
    /// Keys are grouped by server; every server's request is written before any reply is read,
    /// and replies are parsed as they arrive from any server. If servers fail, the hits of the
    /// others are still delivered, and the error is the failed server's (or
    /// [`Error::Partial`] listing each failed server).
    pub fn get_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(Retrieval::Get, keys, found)
    }

    /// [`get_multi`](Self::get_multi) with CAS uniques.
    pub fn gets_multi<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
        found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        self.retrieve_multi(Retrieval::Gets, keys, found)
    }

    fn retrieve_multi<K: AsRef<[u8]>>(
        &mut self,
        cmd: Retrieval,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        if self.protocol == Protocol::Binary {
            return self.bin_retrieve_multi(cmd == Retrieval::Gets, keys, found);
        }
        if self.protocol == Protocol::Meta {
            return self.meta_retrieve_multi(cmd == Retrieval::Gets, keys, found);
        }
        let mut plan = self.plan(keys.len(), |j| keys[j].as_ref())?;
        plan.retrieval = true;
        // Encode: each server's keys in lines of KEYS_PER_LINE.
        for (j, k) in keys.iter().enumerate() {
            let i = plan.server_of[j];
            if i == NO_SERVER {
                continue;
            }
            let (i, share) = (i as usize, &mut plan.shares[i as usize]);
            let wbuf = self.driver.wbuf(i);
            if share.in_line == 0 {
                text::begin_retrieval(wbuf, cmd);
            }
            // Validated by plan().
            text::push_prefixed_key(wbuf, &self.namespace, Key::trusted(k.as_ref()));
            share.in_line += 1;
            if share.in_line == KEYS_PER_LINE {
                text::finish_line(wbuf);
                share.in_line = 0;
                share.expected += 1;
            }
        }
        for (i, share) in plan.shares.iter_mut().enumerate() {
            if share.in_line > 0 {
                text::finish_line(self.driver.wbuf(i));
                share.expected += 1;
            }
        }
        let limits = self.limits;
        let ns = std::mem::take(&mut self.namespace);
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let share = &mut plan.shares[i];
            // Most often the reply is the hit of this server's next key: checked against it
            // directly (see `parse_value_of`).
            let mut next = share.cursor;
            while next < keys.len() && plan.server_of[next] != i as u32 {
                next += 1;
            }
            if let Some(key) = keys.get(next) {
                let key = key.as_ref();
                if let Some(r) = text::parse_value_of(buf, &ns, key, &limits) {
                    let (n, resp) = match r? {
                        Status::Complete(c) => c,
                        Status::Partial => return Ok(Status::Partial),
                    };
                    let Response::Value {
                        flags, cas, data, ..
                    } = resp
                    else {
                        return Err(ParseError::Unexpected); // parse_value_of returns values only
                    };
                    share.cursor = next + 1;
                    share.hits += 1;
                    found(
                        key,
                        ItemRef {
                            value: data,
                            flags,
                            cas,
                        },
                    );
                    return Ok(Status::Complete((n, false)));
                }
            }
            let (n, resp) = match text::parse_reply(buf, &limits)? {
                Status::Complete(c) => c,
                Status::Partial => return Ok(Status::Partial),
            };
            match resp {
                Response::Value {
                    key,
                    flags,
                    cas,
                    data,
                } => {
                    let user = key.strip_prefix(&ns[..]).ok_or(ParseError::Unexpected)?;
                    // Replies come in request order: the key must be a later key of ours.
                    loop {
                        let j = share.cursor;
                        if j >= keys.len() {
                            return Err(ParseError::Unexpected);
                        }
                        share.cursor += 1;
                        if plan.server_of[j] == i as u32 && short_eq(keys[j].as_ref(), user) {
                            break;
                        }
                    }
                    share.hits += 1;
                    found(
                        user,
                        ItemRef {
                            value: data,
                            flags,
                            cas,
                        },
                    );
                    Ok(Status::Complete((n, false)))
                }
                Response::End => {
                    share.seen += 1;
                    Ok(Status::Complete((n, share.seen == share.expected)))
                }
                ref r if r.is_error() => {
                    // The rest of this server's reply is in doubt.
                    share.error = server_error(r);
                    closed.push(i);
                    Ok(Status::Complete((n, true)))
                }
                _ => Err(ParseError::Unexpected),
            }
        });
        self.namespace = ns;
        self.disconnect_all(closed);
        self.recycle(plan);
        result
    }

    /// Keeps a finished call's vectors for the next call.
    fn recycle(&mut self, plan: Plan) {
        self.spare.plan = plan;
    }

    /// Closes the connections of servers whose batch answer went out of step.
    fn disconnect_all(&mut self, servers: Vec<usize>) {
        for i in servers {
            self.driver.disconnect(i);
        }
    }

    /// Runs one storage or delete command per key, pipelined per server, counting the replies
    /// `success` accepts.
    fn multi_simple(
        &mut self,
        mut plan: Plan,
        success: impl Fn(&Response<'_>) -> Option<bool>,
    ) -> Result<usize> {
        for share in plan.shares.iter_mut() {
            share.expected = share.keys;
        }
        let limits = self.limits;
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let (n, resp) = match text::parse_reply(buf, &limits)? {
                Status::Complete(c) => c,
                Status::Partial => return Ok(Status::Partial),
            };
            let share = &mut plan.shares[i];
            if let Some(e) = server_error(&resp) {
                // The rest of this server's batch is in doubt.
                share.error = Some(e);
                closed.push(i);
                return Ok(Status::Complete((n, true)));
            }
            match success(&resp) {
                Some(ok) => {
                    share.hits += usize::from(ok);
                    share.seen += 1;
                    Ok(Status::Complete((n, share.seen == share.expected)))
                }
                None => Err(ParseError::Unexpected),
            }
        });
        self.disconnect_all(closed);
        let stored = plan.shares.iter().map(|s| s.hits).sum();
        self.recycle(plan);
        result.map(|()| stored)
    }

    /// Stores many items with one pipelined request per server; returns how many were stored.
    /// Errors as in [`get_multi`](Self::get_multi): items on healthy servers are stored even
    /// when another server fails.
    pub fn set_multi<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        items: &[(K, V)],
        opts: SetOptions,
    ) -> Result<usize> {
        for (_, v) in items {
            self.check_value(v.as_ref())?;
        }
        if items.is_empty() {
            return Ok(0);
        }
        let plan = self.plan(items.len(), |j| items[j].0.as_ref())?;
        if self.protocol == Protocol::Binary {
            for (j, (k, v)) in items.iter().enumerate() {
                let i = plan.server_of[j];
                if i != NO_SERVER {
                    let v = v.as_ref();
                    self.encode_keyed(plan.plain, i as usize, k.as_ref(), |w, key| {
                        binary::encode_store(
                            w,
                            Opcode::SETQ,
                            key,
                            opts.flags,
                            opts.ttl,
                            v.len(),
                            j as u32,
                            0,
                        );
                        w.extend_from_slice(v);
                    });
                }
            }
            return self.bin_multi_quiet(plan, &[binary::STATUS_NOT_STORED, binary::STATUS_EXISTS]);
        }
        if self.protocol == Protocol::Meta {
            for (j, (k, v)) in items.iter().enumerate() {
                let i = plan.server_of[j];
                if i != NO_SERVER {
                    let v = v.as_ref();
                    let f = meta::SetFlags {
                        ttl: opts.ttl,
                        client_flags: opts.flags,
                        quiet: true,
                        opaque: Some(j as u32),
                        ..meta::SetFlags::default()
                    };
                    self.encode_keyed(plan.plain, i as usize, k.as_ref(), |w, key| {
                        meta::encode_set(w, key, v.len(), &f);
                        w.extend_from_slice(v);
                        w.extend_from_slice(DATA_TRAILER);
                    });
                }
            }
            return self.meta_multi_quiet(plan, &[Code::NotStored, Code::Exists]);
        }
        let mut kb = std::mem::take(&mut self.keybuf);
        for (j, (k, v)) in items.iter().enumerate() {
            let i = plan.server_of[j];
            if i == NO_SERVER {
                continue;
            }
            let wbuf = self.driver.wbuf(i as usize);
            let (key, _) = wire_key(&self.namespace, k.as_ref(), false, &mut kb)?;
            let v = v.as_ref();
            text::encode_storage(
                wbuf,
                Storage::Set,
                key,
                opts.flags,
                opts.ttl,
                v.len(),
                false,
            );
            wbuf.extend_from_slice(v);
            wbuf.extend_from_slice(DATA_TRAILER);
        }
        self.keybuf = kb;
        self.multi_simple(plan, |r| match r {
            Response::Stored => Some(true),
            Response::NotStored => Some(false),
            _ => None,
        })
    }

    /// Deletes many keys with one pipelined request per server; returns how many existed.
    pub fn delete_multi<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let plan = self.plan(keys.len(), |j| keys[j].as_ref())?;
        if self.protocol == Protocol::Binary {
            for (j, k) in keys.iter().enumerate() {
                let i = plan.server_of[j];
                if i != NO_SERVER {
                    self.encode_keyed(plan.plain, i as usize, k.as_ref(), |w, key| {
                        binary::encode_simple(w, Opcode::DELETEQ, Some(key), &[], j as u32, 0);
                    });
                }
            }
            return self.bin_multi_quiet(plan, &[binary::STATUS_NOT_FOUND]);
        }
        if self.protocol == Protocol::Meta {
            for (j, k) in keys.iter().enumerate() {
                let i = plan.server_of[j];
                if i != NO_SERVER {
                    let f = meta::DeleteFlags {
                        quiet: true,
                        opaque: Some(j as u32),
                        ..meta::DeleteFlags::default()
                    };
                    self.encode_keyed(plan.plain, i as usize, k.as_ref(), |w, key| {
                        meta::encode_delete(w, key, &f);
                    });
                }
            }
            return self.meta_multi_quiet(plan, &[Code::NotFound]);
        }
        let mut kb = std::mem::take(&mut self.keybuf);
        for (j, k) in keys.iter().enumerate() {
            let i = plan.server_of[j];
            if i == NO_SERVER {
                continue;
            }
            let (key, _) = wire_key(&self.namespace, k.as_ref(), false, &mut kb)?;
            text::encode_delete(self.driver.wbuf(i as usize), key, false);
        }
        self.keybuf = kb;
        self.multi_simple(plan, |r| match r {
            Response::Deleted => Some(true),
            Response::NotFound => Some(false),
            _ => None,
        })
    }
}

/// Opaque of the No-op that closes a binary batch (key indexes never reach it).
const NOOP_OPAQUE: u32 = u32::MAX;

/// One packet of a binary batch read from server `i`.
enum BatchPacket<'a> {
    /// More bytes are needed.
    Partial,
    /// The batch's closing No-op, of this many bytes.
    End(usize),
    /// (bytes, item index from the opaque, packet) for an item that was sent to server `i`.
    Item(usize, usize, crate::proto::binary::Packet<'a>),
}

/// Parses the next packet of a batch and checks that its opaque names an item sent to this
/// server: a reply for anything else is a framing error, never handed to a caller.
fn batch_packet<'a>(
    buf: &'a [u8],
    limits: &crate::proto::Limits,
    server_of: &[u32],
    i: usize,
) -> Result<BatchPacket<'a>, ParseError> {
    let (n, p) = match binary::parse_response(buf, limits)? {
        Status::Complete(c) => c,
        Status::Partial => return Ok(BatchPacket::Partial),
    };
    if p.opcode == Opcode::NOOP && p.opaque == NOOP_OPAQUE {
        return Ok(BatchPacket::End(n));
    }
    let j = p.opaque as usize;
    if j >= server_of.len() || server_of[j] != i as u32 {
        return Err(ParseError::Unexpected);
    }
    Ok(BatchPacket::Item(n, j, p))
}

impl Client {
    /// Encodes one keyed request (binary or meta) for the (validated) user key `k` with the
    /// namespace.
    fn encode_keyed(
        &mut self,
        plain: bool,
        i: usize,
        k: &[u8],
        encode: impl FnOnce(&mut Vec<u8>, Key<'_>),
    ) {
        if plain {
            // No namespace, and plan() found every key a valid text key.
            encode(self.driver.wbuf(i), Key::trusted(k));
            return;
        }
        let mut kb = std::mem::take(&mut self.keybuf);
        let meta = self.protocol == Protocol::Meta;
        let (key, _) = wire_key(&self.namespace, k, meta, &mut kb).expect("validated by plan()");
        encode(self.driver.wbuf(i), key);
        self.keybuf = kb;
    }

    /// Ends every server's batch with a No-op.
    fn bin_close_batches(&mut self, plan: &Plan) {
        for (i, share) in plan.shares.iter().enumerate() {
            if share.keys > 0 && share.error.is_none() {
                binary::encode_simple(self.driver.wbuf(i), Opcode::NOOP, None, &[], NOOP_OPAQUE, 0);
            }
        }
    }

    /// Binary multi-get: GetKQ per key (opaque = the key's index), one No-op per server;
    /// misses send nothing; hits are matched by opaque and key (reference, section 6).
    fn bin_retrieve_multi<K: AsRef<[u8]>>(
        &mut self,
        with_cas: bool,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        let mut plan = self.plan(keys.len(), |j| keys[j].as_ref())?;
        plan.retrieval = true;
        for (j, k) in keys.iter().enumerate() {
            let i = plan.server_of[j];
            if i != NO_SERVER {
                let w = self.driver.wbuf(i as usize);
                binary::encode_prefixed(
                    w,
                    Opcode::GETKQ,
                    &self.namespace,
                    Key::trusted(k.as_ref()),
                    &[],
                    j as u32,
                );
            }
        }
        self.bin_close_batches(&plan);
        let limits = self.limits;
        let ns = std::mem::take(&mut self.namespace);
        let labels = std::sync::Arc::clone(&self.labels);
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let (n, j, p) = match batch_packet(buf, &limits, &plan.server_of, i)? {
                BatchPacket::Partial => return Ok(Status::Partial),
                BatchPacket::End(n) => return Ok(Status::Complete((n, true))),
                BatchPacket::Item(n, j, p) => (n, j, p),
            };
            let share = &mut plan.shares[i];
            if p.status != binary::STATUS_OK {
                if closes_connection(p.status) {
                    closed.push(i);
                }
                share.error = Some(status_to_error(&labels[i], p.status, p.value));
                return Ok(Status::Complete((n, false)));
            }
            let user = p.key.strip_prefix(&ns[..]).ok_or(ParseError::Unexpected)?;
            if !short_eq(user, keys[j].as_ref()) {
                return Err(ParseError::Unexpected);
            }
            share.hits += 1;
            found(
                user,
                ItemRef {
                    value: p.value,
                    flags: p.flags().unwrap_or(0),
                    cas: with_cas.then_some(p.cas),
                },
            );
            Ok(Status::Complete((n, false)))
        });
        self.namespace = ns;
        self.disconnect_all(closed);
        self.recycle(plan);
        result
    }

    /// Runs quiet binary writes (opaque = item index) closed by a No-op per server: only
    /// failures come back. Statuses in `misses` count as "not done" (not stored, not found);
    /// any other failure is an error for that server. Returns how many succeeded.
    fn bin_multi_quiet(&mut self, mut plan: Plan, misses: &[u16]) -> Result<usize> {
        self.bin_close_batches(&plan);
        let limits = self.limits;
        let labels = std::sync::Arc::clone(&self.labels);
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let (n, _item, p) = match batch_packet(buf, &limits, &plan.server_of, i)? {
                BatchPacket::Partial => return Ok(Status::Partial),
                BatchPacket::End(n) => return Ok(Status::Complete((n, true))),
                BatchPacket::Item(n, j, p) => (n, j, p),
            };
            let share = &mut plan.shares[i];
            if misses.contains(&p.status) {
                share.seen += 1;
            } else if p.status != binary::STATUS_OK {
                if closes_connection(p.status) {
                    closed.push(i);
                }
                share.error = Some(status_to_error(&labels[i], p.status, p.value));
            }
            Ok(Status::Complete((n, false)))
        });
        self.disconnect_all(closed);
        let done = plan.shares.iter().map(|s| s.keys - s.seen).sum();
        self.recycle(plan);
        result.map(|()| done)
    }
}

/// The item a reply of a meta batch from server `i` answers, from its opaque: it must name a
/// request sent to this server, after the one the previous reply answered (the server answers
/// in order). Anything else is a framing error.
fn meta_item(
    opaque: Option<u32>,
    server_of: &[u32],
    share: &mut Share,
    i: usize,
) -> Result<usize, ParseError> {
    let j = opaque.ok_or(ParseError::Unexpected)? as usize;
    if j >= server_of.len() || server_of[j] != i as u32 || j < share.cursor {
        return Err(ParseError::Unexpected);
    }
    share.cursor = j + 1;
    Ok(j)
}

/// One reply unit of a meta batch from server `i`, after the parts every batch handles alike.
enum MetaBatch<'a> {
    /// What to tell the driver: more bytes needed, the closing `MN`, or an error line (the
    /// share's error is set and the connection marked for closing).
    Step(Status<(usize, bool)>),
    /// A status reply of this many bytes, for the caller to match to its request.
    Reply(usize, crate::proto::meta::Meta<'a>),
}

fn meta_batch_reply<'a>(
    buf: &'a [u8],
    limits: &crate::proto::Limits,
    share: &mut Share,
    closed: &mut Vec<usize>,
    i: usize,
) -> Result<MetaBatch<'a>, ParseError> {
    let (n, r) = match meta::parse_reply(buf, limits)? {
        Status::Complete(c) => c,
        Status::Partial => return Ok(MetaBatch::Step(Status::Partial)),
    };
    match r {
        Reply::Meta(m) if m.code == Code::Noop => Ok(MetaBatch::Step(Status::Complete((n, true)))),
        Reply::Meta(m) => Ok(MetaBatch::Reply(n, m)),
        r if r.is_error() => {
            // The rest of this server's batch is in doubt.
            share.error = meta_error(&r);
            closed.push(i);
            Ok(MetaBatch::Step(Status::Complete((n, true))))
        }
        _ => Err(ParseError::Unexpected),
    }
}

impl Client {
    /// Ends every server's meta batch with `mn`.
    fn meta_close_batches(&mut self, plan: &Plan) {
        for (i, share) in plan.shares.iter().enumerate() {
            if share.keys > 0 && share.error.is_none() {
                meta::encode_noop(self.driver.wbuf(i));
            }
        }
    }

    /// Meta multi-get: `mg <key> v f [c] q O<index>` per key, `mn` per server; misses send
    /// nothing (notes §5, "Batch pattern"); hits are matched by opaque.
    fn meta_retrieve_multi<K: AsRef<[u8]>>(
        &mut self,
        with_cas: bool,
        keys: &[K],
        mut found: impl FnMut(&[u8], ItemRef<'_>),
    ) -> Result<()> {
        let mut plan = self.plan(keys.len(), |j| keys[j].as_ref())?;
        plan.retrieval = true;
        for (j, k) in keys.iter().enumerate() {
            let i = plan.server_of[j];
            if i != NO_SERVER {
                let f = meta::GetFlags {
                    value: true,
                    client_flags: true,
                    cas: with_cas,
                    quiet: true,
                    opaque: Some(j as u32),
                    ..meta::GetFlags::default()
                };
                self.encode_keyed(plan.plain, i as usize, k.as_ref(), |w, key| {
                    meta::encode_get(w, key, &f)
                });
            }
        }
        self.meta_close_batches(&plan);
        let limits = self.limits;
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let share = &mut plan.shares[i];
            // Most replies are plain hits: read without the general parser's flag table.
            let (n, hit) = match meta::parse_hit(buf, &limits) {
                Some(r) => match r? {
                    Status::Complete(c) => c,
                    Status::Partial => return Ok(Status::Partial),
                },
                None => {
                    let (n, m) = match meta_batch_reply(buf, &limits, share, &mut closed, i)? {
                        MetaBatch::Step(s) => return Ok(s),
                        MetaBatch::Reply(n, m) => (n, m),
                    };
                    (n, m.hit().ok_or(ParseError::Unexpected)?)
                }
            };
            let j = meta_item(hit.opaque, &plan.server_of, share, i)?;
            share.hits += 1;
            found(
                keys[j].as_ref(),
                ItemRef {
                    value: hit.data,
                    flags: hit.client_flags.unwrap_or(0),
                    cas: if with_cas { hit.cas } else { None },
                },
            );
            Ok(Status::Complete((n, false)))
        });
        self.disconnect_all(closed);
        self.recycle(plan);
        result
    }

    /// Runs quiet meta writes (`q O<index>`) closed by `mn` per server: only failures come
    /// back. Codes in `misses` count as "not done"; an error line is an error for that
    /// server (and the rest of its batch is in doubt). Returns how many succeeded.
    fn meta_multi_quiet(&mut self, mut plan: Plan, misses: &[Code]) -> Result<usize> {
        self.meta_close_batches(&plan);
        let limits = self.limits;
        let mut closed = Vec::new();
        let result = self.run_plan(&mut plan, |plan, i, buf| {
            let share = &mut plan.shares[i];
            let (n, m) = match meta_batch_reply(buf, &limits, share, &mut closed, i)? {
                MetaBatch::Step(s) => return Ok(s),
                MetaBatch::Reply(n, m) => (n, m),
            };
            if !misses.contains(&m.code) {
                return Err(ParseError::Unexpected);
            }
            meta_item(m.flags.opaque_u32(), &plan.server_of, share, i)?;
            share.seen += 1;
            Ok(Status::Complete((n, false)))
        });
        self.disconnect_all(closed);
        let done = plan.shares.iter().map(|s| s.keys - s.seen).sum();
        self.recycle(plan);
        result.map(|()| done)
    }
}
