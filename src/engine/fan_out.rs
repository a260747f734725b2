//! One keyed command per server, to several servers at once (a `Client`'s touch with copies:
//! each copy gets its touch, or a delete if it waits for a repair of the key): every
//! request is written first, then one `poll` reads the replies as they come, so the call
//! takes one round trip, not one per copy.

use super::reply::{existed, SingleReader, Strays};
use super::{wire_key, Core};
use crate::conn::driver::{Batch, Until};
use crate::error::Result;
use crate::proto::wire::{with_wire, Capability, Cmd, Expect, Outcome, Wire};
use crate::proto::{Key, ParseError};
use crate::ring::MAX_REPLICAS;

/// What one server is sent: a touch or a delete of the key (both answer whether the item
/// existed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FanCmd {
    Touch(u32),
    Delete,
}

/// A reader of one server's reply: whether the item existed.
type Existed = fn(Outcome<'_>, bool) -> Result<Option<bool>, ParseError>;

fn existed_reply(o: Outcome<'_>, _last: bool) -> Result<Option<bool>, ParseError> {
    existed(o)
}

impl Core {
    /// Sends `cmds[k].1` about `user_key` to server `cmds[k].0` (distinct servers; the
    /// caller checked each is up, taking its probe if half-open), all at once; returns each
    /// server's answer, in the same order, each counted in its health. `Err` only for an
    /// invalid key.
    pub(crate) fn fan_out(
        &mut self,
        user_key: &[u8],
        kb: &mut Vec<u8>,
        cmds: &[(usize, FanCmd)],
    ) -> Result<[Option<Result<bool>>; MAX_REPLICAS]> {
        debug_assert!(cmds.len() <= MAX_REPLICAS);
        let binary_keys = self.protocol.supports(Capability::BinaryKeys);
        let (wire, _) = wire_key(&self.namespace, user_key, binary_keys, kb)?;
        Ok(with_wire!(self.protocol, W => self.fan_out_w::<W>(wire, cmds)))
    }

    fn fan_out_w<W: Wire>(
        &mut self,
        key: Key<'_>,
        cmds: &[(usize, FanCmd)],
    ) -> [Option<Result<bool>>; MAX_REPLICAS] {
        let mut results: [Option<Result<bool>>; MAX_REPLICAS] = Default::default();
        let labels = self.labels.clone();
        let observed = self.health.observe.start();
        let cmd_of = |c: FanCmd| match c {
            FanCmd::Touch(ttl) => Cmd::Touch(key, ttl),
            FanCmd::Delete => Cmd::delete(key),
        };
        let mut strays: [Strays; MAX_REPLICAS] = Default::default();
        let mut readers: [Option<SingleReader<'_, Existed, bool>>; MAX_REPLICAS] =
            Default::default();
        // Each server's request, in its own buffer; one that cannot start fails alone.
        for (k, &(i, c)) in cmds.iter().enumerate() {
            if let Err(e) = self.start(i) {
                self.health.record_error(i, &e, &mut self.ring);
                results[k] = Some(Err(e));
                continue;
            }
            strays[k] = Strays::on(&mut self.driver, i);
            let opaque = self.next_opaque();
            let cmd = cmd_of(c);
            let w = self.driver.wbuf(i);
            if strays[k].owed {
                W::encode(w, &Cmd::Sync, 0, false);
            }
            W::encode(w, &cmd, opaque, false);
            readers[k] = Some(SingleReader {
                expect: Expect::single(cmd.kind(), opaque),
                limits: self.limits,
                label: &labels[i],
                data_block: false,
                on: existed_reply as Existed,
                out: None,
                refused: None,
            });
        }
        let op = self.driver.new_op();
        // The servers that started, in order: `started[j]` is the command of `live[j]`.
        let mut live: [Batch<'_>; MAX_REPLICAS] =
            std::array::from_fn(|_| Batch::new(usize::MAX, None, &op));
        let mut started = [usize::MAX; MAX_REPLICAS];
        let mut n = 0;
        for (k, &(i, _)) in cmds.iter().enumerate() {
            if readers[k].is_some() {
                live[n] = Batch::new(i, None, &op);
                started[n] = k;
                n += 1;
            }
        }
        let live = &mut live[..n];
        let limits = self.limits;
        let server_at = |i: usize| {
            cmds.iter()
                .position(|&(s, _)| s == i)
                .expect("a server asked")
        };
        self.driver.exchange_many(live, &op, Until::Done, |i, buf| {
            let k = server_at(i);
            if strays[k].pending {
                return strays[k].read::<W>(buf, &limits);
            }
            readers[k]
                .as_mut()
                .expect("a started server")
                .read::<W>(buf)
        });
        for (j, b) in live.iter_mut().enumerate() {
            let k = started[j];
            let i = b.server;
            let reader = readers[k].as_mut().expect("a started server");
            let r = match b.error.take() {
                Some(e) => Err(e),
                None => {
                    strays[k].settle(&mut self.driver, &mut self.health, i);
                    match reader.refused.take() {
                        Some((e, close)) => {
                            if close {
                                self.driver.disconnect(i);
                            }
                            Err(e)
                        }
                        None => Ok(reader.out.take().expect("a done exchange has its reply")),
                    }
                }
            };
            self.health.record(i, &r, &mut self.ring);
            self.health
                .observe
                .call(i, cmd_of(cmds[k].1).kind(), false, observed);
            self.health.observe.bytes(i, self.driver.bytes(i));
            results[k] = Some(r);
        }
        results
    }
}
