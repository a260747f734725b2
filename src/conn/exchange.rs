//! One request and its replies on one connection, sans I/O: which bytes are still to be
//! written, what the bytes read so far amount to, and what a deadline or the end of the stream
//! means at this point. No socket, no clock (the caller passes `now`): the driver's blocking
//! and poll paths both run on it, and tests drive it in memory.
//!
//! Inputs: [`handle_written`](Exchange::handle_written) (bytes the socket took),
//! [`handle_input`](Exchange::handle_input) (the read buffer after bytes arrived),
//! [`handle_timeout`](Exchange::handle_timeout) and [`handle_eof`](Exchange::handle_eof).
//! Outputs: [`poll_transmit`](Exchange::poll_transmit) (what to write next),
//! [`poll_timeout`](Exchange::poll_timeout) (when to wake up at the latest), whether the
//! exchange [`is_done`](Exchange::is_done), and failures that leave the connection's framing
//! in doubt, after which the caller closes it (never resynchronised by guesswork).

use std::time::Instant;

use super::buf::ReadBuf;
use crate::error::During;
use crate::proto::{ParseError, Status};

/// Why an exchange failed; the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A reply did not parse, or cannot answer the request.
    Parse(ParseError),
    /// The last reply arrived before the request was fully written: out of step.
    OutOfStep,
    /// The server closed the connection before the reply was complete.
    Closed,
    /// The deadline passed while writing or reading.
    Timeout(During),
}

/// A request (the connection's write buffer, then a value and its trailer sent from the
/// caller's slices) and the progress of its replies.
#[derive(Debug)]
pub(crate) struct Exchange<'v> {
    value: &'v [u8],
    trailer: &'v [u8],
    written: usize,
    total: usize,
    done: bool,
    /// When the exchange fails if it is not done.
    deadline: Instant,
}

impl<'v> Exchange<'v> {
    /// A request of `head_len` buffered bytes, then `value` (value, trailer) if any, to be
    /// done by `deadline`.
    pub(crate) fn new(
        head_len: usize,
        value: Option<(&'v [u8], &'v [u8])>,
        deadline: Instant,
    ) -> Exchange<'v> {
        let (value, trailer) = value.unwrap_or((&[], &[]));
        Exchange {
            value,
            trailer,
            written: 0,
            total: head_len + value.len() + trailer.len(),
            done: false,
            deadline,
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called: the deadline, or
    /// `None` once done (nothing left to time out).
    #[inline]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        (!self.done).then_some(self.deadline)
    }

    /// Request bytes in total.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// True once the whole request has been written.
    pub(crate) fn is_written(&self) -> bool {
        self.written == self.total
    }

    /// True while nothing of the request has been written.
    pub(crate) fn is_unsent(&self) -> bool {
        self.written == 0
    }

    /// True once the last reply has been read.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Marks the exchange finished without replies (a request that expects none).
    pub(crate) fn finish(&mut self) {
        self.done = true;
    }

    /// What is still to be written, as up to three slices of (`head`, value, trailer), where
    /// `head` is the connection's write buffer; and how many of the slices are in use.
    #[inline]
    pub(crate) fn poll_transmit<'a>(&'a self, head: &'a [u8]) -> ([&'a [u8]; 3], usize) {
        let mut out: [&[u8]; 3] = [&[], &[], &[]];
        let mut n = 0;
        let mut skip = self.written;
        for part in [head, self.value, self.trailer] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            out[n] = &part[skip..];
            skip = 0;
            n += 1;
        }
        (out, n)
    }

    /// The socket took `n` more bytes of the request.
    #[inline]
    pub(crate) fn handle_written(&mut self, n: usize) {
        debug_assert!(self.written + n <= self.total);
        self.written += n;
    }

    /// Parses what the read buffer holds with `on_reply`, which reads one reply unit from the
    /// start of its input: `Complete((consumed, last))` or `Partial`. Consumed units leave the
    /// buffer. Returns whether any unit was complete.
    #[inline]
    pub(crate) fn handle_input<F>(
        &mut self,
        rbuf: &mut ReadBuf,
        on_reply: &mut F,
    ) -> Result<bool, Failure>
    where
        F: FnMut(&[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        let mut progressed = false;
        while !self.done {
            match on_reply(rbuf.data()) {
                Ok(Status::Complete((n, last))) => {
                    rbuf.consume(n);
                    progressed = true;
                    if last {
                        self.done = true;
                        if !self.is_written() {
                            return Err(Failure::OutOfStep);
                        }
                    }
                }
                Ok(Status::Partial) => break,
                Err(e) => return Err(Failure::Parse(e)),
            }
        }
        Ok(progressed)
    }

    /// The time is `now`: a failure if the deadline has passed before the exchange was done.
    #[inline]
    pub(crate) fn handle_timeout(&self, now: Instant) -> Result<(), Failure> {
        if self.done || now < self.deadline {
            return Ok(());
        }
        Err(Failure::Timeout(if self.is_written() {
            During::Read
        } else {
            During::Write
        }))
    }

    /// The server closed its side: always a failure before the exchange is done (even a
    /// reply that was complete could be followed by nothing we asked for).
    pub(crate) fn handle_eof(&self) -> Failure {
        Failure::Closed
    }
}

/// Whether a connection can carry the next request, or must be replaced by a fresh one first:
/// after a failure the framing is in doubt, and bytes still buffered were asked for by
/// nobody (say an error answering an earlier noreply command), so they would be read as the
/// next request's reply. Either way the connection is closed, never resynchronised.
pub(crate) fn reusable(rbuf: &ReadBuf, last: Result<(), Failure>) -> bool {
    last.is_ok() && rbuf.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::{Binary, Expect, Kind, Meta, Outcome, Text, Wire};
    use crate::proto::{binary, Key, Limits};
    use std::time::Duration;

    /// A reply reader for a single get, as the client folds one: the hit's data, then done at
    /// the end of the reply.
    fn get_reader<W: Wire>(
        seen: &mut Vec<Vec<u8>>,
        opaque: u32,
    ) -> impl FnMut(&[u8]) -> Result<Status<(usize, bool)>, ParseError> + '_ {
        let expect = Expect::single(Kind::Get, opaque);
        move |buf| {
            let (n, unit) = match W::decode(buf, &expect, &Limits::default())? {
                Status::Complete(c) => c,
                Status::Partial => return Ok(Status::Partial),
            };
            match unit.outcome {
                Outcome::Hit(h) => seen.push(h.data.to_vec()),
                Outcome::End | Outcome::Miss => {}
                _ => return Err(ParseError::Unexpected),
            }
            Ok(Status::Complete((n, unit.last)))
        }
    }

    fn request<W: Wire>(opaque: u32) -> Vec<u8> {
        let mut w = Vec::new();
        let cmd = crate::proto::wire::Cmd::Get(Key::new(b"k").unwrap(), Default::default());
        W::encode(&mut w, &cmd, opaque, false);
        w
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

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Feeds `reply` in two reads split at `at`, after writing the whole request.
    fn feed_split<W: Wire>(
        reply: &[u8],
        at: usize,
        opaque: u32,
    ) -> (Result<bool, Failure>, Vec<Vec<u8>>) {
        let head = request::<W>(opaque);
        let mut ex = Exchange::new(head.len(), None, far());
        let (parts, n) = ex.poll_transmit(&head);
        assert_eq!((n, parts[0]), (1, &head[..]));
        ex.handle_written(head.len());
        let mut rbuf = ReadBuf::new(16, 1 << 20);
        let mut seen = Vec::new();
        let mut reader = get_reader::<W>(&mut seen, opaque);
        let mut r = Ok(false);
        for (k, chunk) in [&reply[..at], &reply[at..]].into_iter().enumerate() {
            push(&mut rbuf, chunk);
            r = ex.handle_input(&mut rbuf, &mut reader);
            if k == 0 && at < reply.len() {
                assert!(!ex.is_done(), "done after {at} of {} bytes", reply.len());
            }
            if r.is_err() {
                break;
            }
        }
        drop(reader);
        if r.is_ok() {
            assert!(ex.is_done() && rbuf.is_empty());
        }
        (r, seen)
    }

    fn push(rbuf: &mut ReadBuf, bytes: &[u8]) {
        rbuf.push(bytes);
    }

    #[test]
    fn every_split_point_of_a_reply() {
        let text = b"VALUE k 0 10\r\nhello\r\nEND\r\nEND\r\n";
        let meta = b"VA 10 f0 O5\r\nhello\r\nEND\r\n";
        let bin = binary_hit(5, b"hello\r\nEND\r\n");
        for at in 0..=text.len() {
            let (r, seen) = feed_split::<Text>(text, at, 5);
            assert_eq!(r.map(|_| ()), Ok(()), "text split at {at}");
            assert_eq!(seen, [b"hello\r\nEND".to_vec()]);
        }
        for at in 0..=meta.len() {
            let (r, seen) = feed_split::<Meta>(meta, at, 5);
            assert_eq!(r.map(|_| ()), Ok(()), "meta split at {at}");
            assert_eq!(seen, [b"hello\r\nEND".to_vec()]);
        }
        for at in 0..=bin.len() {
            let (r, seen) = feed_split::<Binary>(&bin, at, 5);
            assert_eq!(r.map(|_| ()), Ok(()), "binary split at {at}");
            assert_eq!(seen, [b"hello\r\nEND\r\n".to_vec()]);
        }
    }

    #[test]
    fn a_reply_for_another_request_fails_the_exchange() {
        // Binary: another opaque. Text: another key. Meta: a batch end where none was asked.
        let bin = binary_hit(6, b"v");
        for at in [0, 10, bin.len()] {
            let (r, seen) = feed_split::<Binary>(&bin, at, 5);
            assert_eq!(r, Err(Failure::Parse(ParseError::Unexpected)));
            assert!(seen.is_empty(), "never handed to the caller");
        }
        let other = b"VALUE other 0 1\r\nv\r\nEND\r\n";
        let head = request::<Text>(0);
        let mut ex = Exchange::new(head.len(), None, far());
        ex.handle_written(head.len());
        let mut rbuf = ReadBuf::new(64, 1 << 20);
        push(&mut rbuf, other);
        let expect = Expect::single(Kind::Get, 0);
        let mut reader = |buf: &[u8]| match Text::decode(buf, &expect, &Limits::default())? {
            Status::Complete((_, u)) => match u.outcome {
                Outcome::Hit(h) if h.key != Some(b"k") => Err(ParseError::Unexpected),
                _ => Ok(Status::Partial),
            },
            Status::Partial => Ok(Status::Partial),
        };
        assert_eq!(
            ex.handle_input(&mut rbuf, &mut reader),
            Err(Failure::Parse(ParseError::Unexpected))
        );
        let (r, _) = feed_split::<Meta>(b"MN\r\n", 2, 0);
        assert_eq!(r, Err(Failure::Parse(ParseError::Unexpected)));
        // Meta: another opaque, or none (a quiet command's late reply carries its own).
        for reply in [
            &b"VA 1 f0 O6\r\nv\r\n"[..],
            b"VA 1 f0\r\nv\r\n",
            b"EN O4\r\n",
        ] {
            let (r, seen) = feed_split::<Meta>(reply, 3, 5);
            assert_eq!(r, Err(Failure::Parse(ParseError::Unexpected)), "{reply:?}");
            assert!(seen.is_empty(), "never handed to the caller");
        }
    }

    #[test]
    fn a_reply_before_the_request_is_written_is_out_of_step() {
        let value = vec![b'x'; 100];
        let mut ex = Exchange::new(10, Some((&value, b"\r\n")), far());
        assert_eq!(ex.total(), 112);
        let head = [b'h'; 10];
        ex.handle_written(50);
        let (parts, n) = ex.poll_transmit(&head);
        assert_eq!((n, parts[0].len(), parts[1]), (2, 60, &b"\r\n"[..]));
        let mut rbuf = ReadBuf::new(64, 1 << 20);
        push(&mut rbuf, b"STORED\r\n");
        let mut reader = |buf: &[u8]| Ok(Status::Complete((buf.len(), true)));
        assert_eq!(
            ex.handle_input(&mut rbuf, &mut reader),
            Err(Failure::OutOfStep)
        );
    }

    #[test]
    fn a_deadline_passing_mid_write_or_mid_reply() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(100);
        let head = request::<Text>(0);
        let mut ex = Exchange::new(head.len(), None, deadline);
        assert_eq!(ex.poll_timeout(), Some(deadline));
        ex.handle_written(2);
        assert_eq!(ex.handle_timeout(t0), Ok(()));
        assert_eq!(
            ex.handle_timeout(deadline),
            Err(Failure::Timeout(During::Write))
        );
        ex.handle_written(head.len() - 2);
        let mut rbuf = ReadBuf::new(64, 1 << 20);
        push(&mut rbuf, b"VALUE k 0 5\r\nhel");
        let mut seen = Vec::new();
        let mut reader = get_reader::<Text>(&mut seen, 0);
        assert_eq!(ex.handle_input(&mut rbuf, &mut reader), Ok(false));
        assert_eq!(
            ex.handle_timeout(deadline - Duration::from_millis(1)),
            Ok(())
        );
        assert_eq!(
            ex.handle_timeout(deadline + Duration::from_secs(1)),
            Err(Failure::Timeout(During::Read))
        );
        // Once done, a late clock is no failure, and there is no deadline left to wake for.
        push(&mut rbuf, b"lo\r\nEND\r\n");
        assert_eq!(ex.handle_input(&mut rbuf, &mut reader), Ok(true));
        assert_eq!(ex.handle_timeout(deadline + Duration::from_secs(1)), Ok(()));
        assert_eq!(ex.poll_timeout(), None);
    }

    #[test]
    fn a_server_closing_mid_value() {
        let head = request::<Meta>(0);
        let mut ex = Exchange::new(head.len(), None, far());
        ex.handle_written(head.len());
        let mut rbuf = ReadBuf::new(64, 1 << 20);
        push(&mut rbuf, b"VA 10 f0\r\nhalf");
        let mut seen = Vec::new();
        let mut reader = get_reader::<Meta>(&mut seen, 0);
        assert_eq!(ex.handle_input(&mut rbuf, &mut reader), Ok(false));
        assert!(!ex.is_done());
        assert_eq!(ex.handle_eof(), Failure::Closed);
        drop(reader);
        assert!(seen.is_empty(), "a partial value is never delivered");
    }

    #[test]
    fn reconnect_decisions() {
        let head = request::<Text>(0);
        let mut seen = Vec::new();
        let mut reader = get_reader::<Text>(&mut seen, 0);
        // A clean reply, consumed whole: the connection carries the next request.
        let mut ex = Exchange::new(head.len(), None, far());
        ex.handle_written(head.len());
        let mut rbuf = ReadBuf::new(64, 1 << 20);
        push(&mut rbuf, b"VALUE k 0 2\r\nhi\r\nEND\r\n");
        assert_eq!(ex.handle_input(&mut rbuf, &mut reader), Ok(true));
        assert!(reusable(&rbuf, Ok(())));
        // Bytes after the last reply (an earlier noreply command's error): a fresh one.
        let mut ex = Exchange::new(head.len(), None, far());
        ex.handle_written(head.len());
        push(&mut rbuf, b"END\r\nCLIENT_ERROR bad data chunk\r\n");
        assert_eq!(ex.handle_input(&mut rbuf, &mut reader), Ok(true));
        assert!(!reusable(&rbuf, Ok(())));
        // After any failure, even with nothing buffered: a fresh one.
        rbuf.clear();
        for f in [
            Failure::Closed,
            Failure::OutOfStep,
            Failure::Timeout(During::Read),
            Failure::Parse(ParseError::Unexpected),
        ] {
            assert!(!reusable(&rbuf, Err(f)));
        }
    }
}
