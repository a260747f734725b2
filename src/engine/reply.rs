//! One command's reply, folded unit by unit (sans I/O), and the replies of earlier quiet
//! commands read and set aside before a call's own.

use super::health::Health;
use crate::conn::driver::{Driver, Late};
use crate::error::{Error, Result, ServerErrorKind};
use crate::proto::wire::{Expect, Kind, Outcome, Refusal, Wire};
use crate::proto::{Limits, ParseError, Status};

/// A delete's or touch's reply: whether the item existed.
pub(crate) fn existed(o: Outcome<'_>) -> Result<Option<bool>, ParseError> {
    match o {
        Outcome::Deleted(_) | Outcome::Touched(_) => Ok(Some(true)),
        Outcome::NotFound(_) | Outcome::Miss => Ok(Some(false)),
        _ => Err(ParseError::Unexpected),
    }
}

/// An incr's or decr's reply: the new value, `None` if the item does not exist.
pub(crate) fn arith_value(o: Outcome<'_>) -> Result<Option<Option<u64>>, ParseError> {
    match o {
        Outcome::Number(n, _) => Ok(Some(Some(n))),
        Outcome::NotFound(_) => Ok(Some(None)),
        _ => Err(ParseError::Unexpected),
    }
}

/// Folds the reply units of one command, sans I/O: `on` turns outcomes into the call's
/// result (`Some` ends the exchange, `None` asks for more); an error reply ends it with the
/// matching error, and says whether the connection must be closed.
pub(crate) struct SingleReader<'c, F, T> {
    pub(crate) expect: Expect,
    pub(crate) limits: Limits,
    pub(crate) label: &'c str,
    /// The command carried a data block.
    pub(crate) data_block: bool,
    pub(crate) on: F,
    pub(crate) out: Option<T>,
    /// An error reply: the error, and whether the connection is to be closed.
    pub(crate) refused: Option<(Error, bool)>,
}

impl<F, T> SingleReader<'_, F, T>
where
    F: FnMut(Outcome<'_>, bool) -> Result<Option<T>, ParseError>,
{
    /// Reads one reply unit from the start of `buf`: the bytes it took and whether it was
    /// the last, or `Partial`. An error is a reply that cannot answer this command.
    #[inline(always)]
    pub(crate) fn read<W: Wire>(
        &mut self,
        buf: &[u8],
    ) -> Result<Status<(usize, bool)>, ParseError> {
        let (n, unit) = match W::decode(buf, &self.expect, &self.limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        if let Outcome::Error {
            refusal,
            message,
            closes,
            ..
        } = unit.outcome
        {
            // After an error answering a data block, the block may be read as commands.
            let close = closes || self.data_block;
            self.refused = Some((refused(self.label, refusal, message), close));
            return Ok(Status::Complete((n, true)));
        }
        match (self.on)(unit.outcome, unit.last)? {
            Some(t) => {
                self.out = Some(t);
                Ok(Status::Complete((n, true)))
            }
            // Nothing more will come for this command.
            None if unit.last => Err(ParseError::Unexpected),
            None => Ok(Status::Complete((n, false))),
        }
    }
}

/// The replies of quiet commands that went out earlier without a sync (a fire-and-forget
/// pipeline, `store_noreply`), and the late reply of a read dropped by a hedge: the next call
/// to read replies on that connection reads the late reply first, then (after a sync it sends
/// before its own request) the quiet commands' replies, up to the sync's reply, with this.
#[derive(Default)]
pub(crate) struct Strays {
    /// The connection owed a sync, and one went ahead of this call's request.
    pub(crate) owed: bool,
    /// A late reply or the sync's reply has not been read yet.
    pub(crate) pending: bool,
    /// Sync replies still to read, the last being this call's own (earlier ones: syncs of
    /// fire-and-forget pipelines that nobody read).
    pub(crate) ends: u32,
    /// Reads' replies that nobody waits for (losing hedges), first on the wire.
    pub(crate) late: Option<Late>,
    /// A late reply was taken by this call (read or not).
    took_late: bool,
    /// Replies read before it (unmet conditions, error lines, a late reply).
    pub(crate) count: u64,
    /// One of them was an error line after which the server may close, or the stream be out
    /// of step: the connection is replaced once this call is done.
    pub(crate) doubt: bool,
}

impl Strays {
    /// For a call on server `i`: its connection's late reply, if any, to read first; owing
    /// if the connection owes a sync (the caller sends one ahead of its request), with every
    /// unread sync before it to skip too.
    #[inline]
    pub(crate) fn on(driver: &mut Driver, i: usize) -> Strays {
        if !Strays::any(driver, i) {
            return Strays::default();
        }
        Strays::taken(driver, i)
    }

    #[cold]
    #[inline(never)]
    fn taken(driver: &mut Driver, i: usize) -> Strays {
        let owed = driver.owes_sync(i);
        let late = driver.take_late(i);
        Strays {
            owed,
            pending: owed || late.is_some(),
            ends: if owed {
                1 + driver.take_unread_syncs(i)
            } else {
                0
            },
            late,
            took_late: late.is_some(),
            count: 0,
            doubt: false,
        }
    }

    /// Whether anything must be read before the call's own replies (a batch then uses
    /// [`Strays::on`]).
    #[inline]
    pub(crate) fn any(driver: &Driver, i: usize) -> bool {
        driver.owes_any(i)
    }

    /// Owing one sync (the stream fuzz body's batches).
    #[cfg(any(test, fuzzing))]
    pub(crate) fn owing() -> Strays {
        Strays {
            owed: true,
            pending: true,
            ends: 1,
            ..Strays::default()
        }
    }

    /// The call leaves without reading all of them: a late reply not read goes back to the
    /// connection (it is still first on the wire), and syncs still to be read go to its
    /// account, for its next reader.
    pub(crate) fn abandon(&mut self, driver: &mut Driver, i: usize) {
        if let Some(late) = self.late {
            driver.restore_late(i, late);
        }
        if self.pending && self.ends > 0 {
            driver.add_unread_syncs(i, self.ends);
        }
        *self = Strays::default();
    }

    /// After the call succeeded: server `i`'s connection owes nothing now, and the late
    /// replies are counted (a connection in doubt is replaced).
    #[inline]
    pub(crate) fn settle(&self, driver: &mut Driver, health: &mut Health, i: usize) {
        if self.owed || self.took_late {
            if self.owed {
                driver.set_owes_sync(i, false);
            }
            health.counters_mut(i).late_replies += self.count;
            if self.doubt {
                driver.disconnect(i);
            }
        }
    }

    /// Reads one unit at the start of `buf`: the late reply's, a stray reply, or the sync's
    /// reply, which ends them. They belong to no caller of this exchange: each is counted,
    /// and the call's own reply, after them, is matched as usual (never failed for someone
    /// else's error).
    #[cold]
    pub(crate) fn read<W: Wire>(
        &mut self,
        buf: &[u8],
        limits: &Limits,
    ) -> Result<Status<(usize, bool)>, ParseError> {
        if let Some(late) = &mut self.late {
            let opaque = late.next().expect("a late reply left");
            let expect = Expect::single(late.kind, opaque);
            let (n, unit) = match W::decode(buf, &expect, limits)? {
                Status::Complete(c) => c,
                Status::Partial => return Ok(Status::Partial),
            };
            if unit.last {
                late.advance();
                self.count += 1;
                if let Outcome::Error { closes, .. } = unit.outcome {
                    self.doubt |= closes;
                }
                if late.next().is_none() {
                    self.late = None;
                    self.pending = self.ends > 0;
                }
            }
            return Ok(Status::Complete((n, false)));
        }
        let (n, unit) = match W::decode(buf, &Expect::batch(Kind::Quiet), limits)? {
            Status::Complete(c) => c,
            Status::Partial => return Ok(Status::Partial),
        };
        match unit.outcome {
            Outcome::End => {
                self.ends -= 1;
                self.pending = self.ends > 0;
            }
            Outcome::Error { closes, .. } => {
                self.count += 1;
                self.doubt |= closes;
            }
            _ => self.count += 1,
        }
        Ok(Status::Complete((n, false)))
    }
}

/// The crate error for an error reply from server `server`.
pub(crate) fn refused(server: &str, refusal: Refusal, message: &[u8]) -> Error {
    let message = String::from_utf8_lossy(message).into_owned();
    let kind = match refusal {
        Refusal::Auth => {
            return Error::Auth {
                server: server.to_string(),
                message,
            }
        }
        // memcached -Y refuses every command of a connection that has not authenticated.
        Refusal::Client if message == "unauthenticated" => {
            return Error::Auth {
                server: server.to_string(),
                message: "the server requires ASCII authentication (memcached -Y), and no \
                          credentials are configured"
                    .into(),
            }
        }
        // memcached's `ERROR` says nothing more: say what it means.
        Refusal::UnknownCommand if message.is_empty() => {
            return Error::Server {
                kind: ServerErrorKind::UnknownCommand,
                message: "the server does not know this command (or its argument): it \
                          answered ERROR"
                    .into(),
            }
        }
        Refusal::UnknownCommand => ServerErrorKind::UnknownCommand,
        Refusal::Client => ServerErrorKind::Client,
        Refusal::Server => ServerErrorKind::Server,
    };
    Error::Server { kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::binary;
    use crate::proto::wire::{Binary, Meta, Text};

    /// What a get's reply unit is, read by `strays` first and then as the call's own.
    fn units<W: Wire>(strays: &mut Strays, stream: &[u8], own: u32) -> Vec<Vec<u8>> {
        let limits = Limits::default();
        let mut mine = Vec::new();
        let mut at = 0;
        loop {
            if strays.pending {
                match strays.read::<W>(&stream[at..], &limits).unwrap() {
                    Status::Complete((n, last)) => {
                        assert!(!last, "a stray never ends the call");
                        at += n;
                    }
                    Status::Partial => panic!("a complete stream"),
                }
                continue;
            }
            let expect = Expect::single(Kind::Get, own);
            let (n, unit) = match W::decode(&stream[at..], &expect, &limits).unwrap() {
                Status::Complete(c) => c,
                Status::Partial => panic!("a complete stream"),
            };
            at += n;
            if let Outcome::Hit(h) = unit.outcome {
                mine.push(h.data.to_vec());
            }
            if unit.last {
                assert_eq!(at, stream.len(), "bytes left after the call's reply");
                return mine;
            }
        }
    }

    fn late(opaque: u32) -> Strays {
        Strays {
            pending: true,
            late: Some(Late::new(Kind::Get, opaque, std::time::Instant::now())),
            took_late: true,
            ..Strays::default()
        }
    }

    fn binary_hit(opaque: u32, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        binary::Packet {
            opcode: binary::Opcode::GET,
            status: binary::STATUS_OK,
            opaque,
            cas: 7,
            extras: &0u32.to_be_bytes(),
            key: b"",
            value,
        }
        .encode(&mut out);
        out
    }

    /// A hedge's losing read left its reply on the connection: the next call reads it
    /// first and drops it (counted), then gets its own value, never the late one.
    #[test]
    fn a_late_reply_is_read_before_the_call_s_own() {
        let text = b"VALUE a 0 4\r\nlate\r\nEND\r\nVALUE b 0 4\r\nmine\r\nEND\r\n";
        let mut s = late(1);
        assert_eq!(units::<Text>(&mut s, text, 2), vec![b"mine".to_vec()]);
        assert_eq!((s.count, s.late.is_none(), s.pending), (1, true, false));

        // The late read missed; the call's own hit.
        let text = b"END\r\nVALUE b 0 4\r\nmine\r\nEND\r\n";
        let mut s = late(1);
        assert_eq!(units::<Text>(&mut s, text, 2), vec![b"mine".to_vec()]);

        let meta = b"VA 4 f0 O1\r\nlate\r\nVA 4 f0 O2\r\nmine\r\n";
        let mut s = late(1);
        assert_eq!(units::<Meta>(&mut s, meta, 2), vec![b"mine".to_vec()]);

        let binary = [binary_hit(1, b"late"), binary_hit(2, b"mine")].concat();
        let mut s = late(1);
        assert_eq!(units::<Binary>(&mut s, &binary, 2), vec![b"mine".to_vec()]);

        // Several, in order.
        let mut s = late(1);
        s.late.as_mut().unwrap().push(Kind::Get, 3);
        let binary = [
            binary_hit(1, b"l1"),
            binary_hit(3, b"l3"),
            binary_hit(2, b"mine"),
        ]
        .concat();
        assert_eq!(units::<Binary>(&mut s, &binary, 2), vec![b"mine".to_vec()]);
        assert_eq!(s.count, 2);
        let mut s = late(1);
        s.late.as_mut().unwrap().push(Kind::Get, 3);
        let text = b"END\r\nVALUE a 0 2\r\nl3\r\nEND\r\nVALUE b 0 4\r\nmine\r\nEND\r\n";
        assert_eq!(units::<Text>(&mut s, text, 2), vec![b"mine".to_vec()]);
    }

    /// Binary and meta late replies are matched by their opaque: another request's reply
    /// in its place is a framing error (the connection is then closed), never taken as the
    /// late one.
    #[test]
    fn a_late_reply_with_another_opaque_is_refused() {
        let binary = [binary_hit(9, b"what"), binary_hit(2, b"mine")].concat();
        let mut s = late(1);
        assert!(s.read::<Binary>(&binary, &Limits::default()).is_err());
        let mut s = late(1);
        let meta = b"VA 4 f0 O9\r\nwhat\r\n";
        assert!(s.read::<Meta>(meta, &Limits::default()).is_err());
    }

    /// A late reply, then the replies of quiet commands up to a sync: all read in wire
    /// order before the call's own.
    #[test]
    fn a_late_reply_then_owed_syncs() {
        // Text: the late get's reply, a noreply store's error line, the sync (`version`).
        let text = b"VALUE a 0 4\r\nlate\r\nEND\r\nSERVER_ERROR out of memory\r\nVERSION 1.6\r\nVALUE b 0 4\r\nmine\r\nEND\r\n";
        let mut s = Strays {
            owed: true,
            ends: 1,
            ..late(1)
        };
        assert_eq!(units::<Text>(&mut s, text, 2), vec![b"mine".to_vec()]);
        assert_eq!(s.count, 2);
        assert!(s.doubt, "a SERVER_ERROR leaves the connection in doubt");
    }
}
