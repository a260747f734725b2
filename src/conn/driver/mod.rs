//! The `mio` driver: one `Poll`, one connection per server, reused buffers, deadlines.
//!
//! Two paths:
//!
//! - **One server, a small request, wait for the reply** (every single-key call, and a
//!   multi-key call whose keys all live on one server): the socket is switched to blocking
//!   mode with `SO_RCVTIMEO`/`SO_SNDTIMEO` (once, then left so), the request written and the
//!   reply read with blocking calls. A get costs exactly two syscalls (send, recv) and the
//!   kernel wakes the thread straight from the socket, where the non-blocking pattern costs
//!   send, recv (`EAGAIN`), `epoll_wait`, recv whenever the reply is not there yet, which on
//!   loopback is most of the time (measured with perf's syscall tracepoints: 3.2 syscalls per
//!   get, as libmemcached's send/recv/poll/recv; strace slows the client so much that the
//!   reply is always there and hides this). The deadline still holds: each blocking read's
//!   timeout is kept within [`TIMEOUT_SLACK`] of the time left.
//! - **Everything else** (fan-out to several servers, pipelines, large requests that could
//!   fill both socket buffers): non-blocking sockets and one `mio::Poll`. Readiness is
//!   edge-triggered, so each connection remembers whether it may be readable or writable
//!   (`readable`/`writable`), set by any `poll` that reports it and cleared when a call would
//!   block. A short read also clears `readable`: the kernel queue was emptied, and any later
//!   arrival raises a new edge. With one server, the driver reads once right after the
//!   request is written, since the reply may be there already; with several, all requests go
//!   out first and one `epoll_wait` reports the replies that are in (a 3-server multi-get:
//!   7.0 syscalls, where reading each server early made 10.1 and libmemcached makes 7.7).

use std::io::{self, IoSlice};
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use super::buf::ReadBuf;
use super::exchange::{reusable, Exchange, Failure};
#[cfg(feature = "tls")]
use super::tls::{self, TlsConfig};
use super::ServerAddr;
use crate::error::{Error, Result};
use crate::proto::wire::Kind;
use crate::proto::{ParseError, Status};

mod connect;
mod stream;
use stream::{Plain, Stream};

/// Values up to this size are copied behind the command line (one contiguous write); larger
/// ones are written straight from the caller's slice with `write_vectored`.
pub(crate) const COPY_VALUE_MAX: usize = 4096;

/// Requests up to this size may take the blocking path: they fit in the socket's send
/// buffer, so writing them cannot wait on the server reading (which may wait on us).
const BLOCKING_MAX: usize = 16 * 1024;

/// How far a blocking read's timeout may run past its target.
const TIMEOUT_SLACK: Duration = Duration::from_millis(1);

/// The last stretch before a deadline is waited for with `epoll_wait`, which wakes up on
/// time: a socket timeout is rounded up to the kernel's tick and would overshoot by up to
/// ~20 ms (measured: a 300 ms I/O timeout failed after 320 ms).
const PRECISE_TAIL: Duration = Duration::from_millis(30);

const INITIAL_READ_BUF: usize = 16 * 1024;
const INITIAL_WRITE_BUF: usize = 16 * 1024;

/// Timeouts and buffer limits of a driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverConfig {
    pub(crate) connect_timeout: Duration,
    pub(crate) io_timeout: Duration,
    /// Largest reply unit the read buffer may have to hold.
    pub(crate) max_unit: usize,
}

/// One server's connection state.
struct Conn {
    addr: ServerAddr,
    /// As shown in errors.
    label: String,
    stream: Option<Stream>,
    rbuf: ReadBuf,
    wbuf: Vec<u8>,
    readable: bool,
    writable: bool,
    /// The peer closed its side (or the socket has an error): keep reading until EOF, since
    /// that edge was already reported and will not come again.
    closed: bool,
    /// Connections opened so far.
    connects: u64,
    /// Of those, TLS sessions that resumed an earlier one.
    resumed: u64,
    /// No reply has come on this connection yet (for a clearer error when a TLS-only server
    /// drops a plain-text connection).
    fresh: bool,
    /// Bytes read and written so far (for the `metrics` feature only).
    #[cfg(feature = "metrics")]
    bytes: (u64, u64),
    /// The socket is in blocking mode (the blocking path), with this read timeout.
    blocking: Option<Duration>,
    /// An exchange is under way. Still set when the next one begins, it was abandoned
    /// midway (a caller's callback panicked while replies were being read): what is left in
    /// the socket belongs to nobody, so the connection is replaced.
    busy: bool,
    /// Quiet commands were written whose replies nobody read yet (a fire-and-forget
    /// pipeline): the next call that reads replies first reads up to a sync of its own.
    owes_sync: bool,
    /// Syncs written ahead of such commands whose replies nobody read either (a
    /// fire-and-forget pipeline started on a connection that owed one): the next reader
    /// skips this many sync replies more than its own.
    unread_syncs: u32,
    /// Replies nobody waits for any more are on their way, ahead of anything else: the
    /// losing reads of hedges. The next call on this connection reads them first and drops
    /// them (see `Strays`).
    late: Option<Late>,
}

impl Conn {
    /// A server's state before its first connection.
    fn new(addr: &ServerAddr, cfg: &DriverConfig) -> Conn {
        Conn {
            label: addr.to_string(),
            addr: addr.clone(),
            stream: None,
            rbuf: ReadBuf::new(INITIAL_READ_BUF, cfg.max_unit),
            // Allocated on the first connection (see `ReadBuf`'s `initial`).
            wbuf: Vec::new(),
            readable: false,
            writable: false,
            closed: false,
            connects: 0,
            resumed: 0,
            fresh: true,
            #[cfg(feature = "metrics")]
            bytes: (0, 0),
            blocking: None,
            busy: false,
            owes_sync: false,
            unread_syncs: 0,
            late: None,
        }
    }
}

/// Late replies a connection may owe at once; a copy that leaves more reads unanswered is
/// disconnected (see `engine::hedge`).
pub(crate) const LATE_MAX: usize = 8;

/// Replies nobody waits for, first on a connection's wire, in order: the losing reads of
/// hedges (one kind of command; each reply matched by its opaque where the protocol has
/// one, by position in text).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Late {
    pub(crate) kind: Kind,
    opaques: [u32; LATE_MAX],
    n: u8,
    read: u8,
    /// When the oldest of them was sent.
    pub(crate) since: Instant,
}

impl Late {
    /// One late reply, to a request of `kind` with `opaque` sent at `since`.
    pub(crate) fn new(kind: Kind, opaque: u32, since: Instant) -> Late {
        let mut opaques = [0; LATE_MAX];
        opaques[0] = opaque;
        Late {
            kind,
            opaques,
            n: 1,
            read: 0,
            since,
        }
    }

    /// One more, after the others; `false` if there is no room (or another kind).
    pub(crate) fn push(&mut self, kind: Kind, opaque: u32) -> bool {
        if kind != self.kind {
            return false;
        }
        if usize::from(self.n) == LATE_MAX && self.read > 0 {
            // Those read make room.
            let (read, n) = (usize::from(self.read), usize::from(self.n));
            self.opaques.copy_within(read..n, 0);
            self.n -= self.read;
            self.read = 0;
        }
        if usize::from(self.n) == LATE_MAX {
            return false;
        }
        self.opaques[usize::from(self.n)] = opaque;
        self.n += 1;
        true
    }

    /// The opaque of the next reply to read, if one is left.
    pub(crate) fn next(&self) -> Option<u32> {
        (self.read < self.n).then(|| self.opaques[usize::from(self.read)])
    }

    /// The next reply was read.
    pub(crate) fn advance(&mut self) {
        self.read += 1;
    }

    /// Whether there is room for one more.
    pub(crate) fn has_room(&self) -> bool {
        usize::from(self.n - self.read) < LATE_MAX
    }
}

/// The token of the driver's waker (no server has it).
const WAKE: usize = usize::MAX;

/// A deadline for one operation, with the time it started (for error reports).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    start: Instant,
    deadline: Instant,
}

impl Op {
    /// When it fails if not done.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    fn new(timeout: Duration) -> Op {
        let start = Instant::now();
        Op {
            start,
            deadline: start + timeout,
        }
    }
}

/// When [`Driver::exchange`] may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// When the reply closure reports the last reply.
    Done,
    /// As soon as the request is written (replies that arrive meanwhile are still parsed).
    Written,
}

/// One server's part of an [`Driver::exchange_many`]: its request is the server's write
/// buffer followed by `value` (value, trailer), if any.
pub(crate) struct Batch<'v> {
    pub(crate) server: usize,
    value: Option<(&'v [u8], &'v [u8])>,
    /// The request's progress and its replies' (sans I/O).
    ex: Exchange<'v>,
    /// Set when this server failed; its connection has been closed.
    pub(crate) error: Option<Error>,
    /// Its operation (when it started, its deadline).
    op: Op,
}

impl<'v> Batch<'v> {
    /// True while nothing of its request has been written (and it has not failed).
    pub(crate) fn is_unsent(&self) -> bool {
        self.error.is_none() && self.ex.is_unsent()
    }

    /// Server `server`'s part of operation `op`.
    pub(crate) fn new(server: usize, value: Option<(&'v [u8], &'v [u8])>, op: &Op) -> Batch<'v> {
        Batch {
            server,
            value,
            ex: Exchange::new(0, value, op.deadline),
            error: None,
            op: *op,
        }
    }
}

/// Owns the sockets of one client.
pub(crate) struct Driver {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    cfg: DriverConfig,
    /// Wakes a [`read_until_woken`](Self::read_until_woken) from another thread (made on
    /// first use), and whether it fired since that last looked.
    waker: Option<std::sync::Arc<mio::Waker>>,
    woken: bool,
    /// TLS settings and the name to verify per server, when TLS is on.
    #[cfg(feature = "tls")]
    tls: Option<(TlsConfig, Vec<rustls::pki_types::ServerName<'static>>)>,
}

impl Driver {
    /// A driver for `servers`, speaking TLS to all of them when `tls` is given.
    pub(crate) fn new(
        servers: &[ServerAddr],
        cfg: DriverConfig,
        #[cfg(feature = "tls")] tls: Option<TlsConfig>,
    ) -> Result<Driver> {
        #[cfg(feature = "tls")]
        let tls = match tls {
            Some(t) => {
                let names = servers
                    .iter()
                    .map(|a| t.server_name(a))
                    .collect::<Result<Vec<_>>>()?;
                Some((t, names))
            }
            None => None,
        };
        let poll = Poll::new().map_err(|source| Error::Io {
            server: "(poll)".into(),
            source: source.into(),
        })?;
        let conns = servers.iter().map(|addr| Conn::new(addr, &cfg)).collect();
        Ok(Driver {
            poll,
            events: Events::with_capacity(64),
            conns,
            cfg,
            waker: None,
            woken: false,
            #[cfg(feature = "tls")]
            tls,
        })
    }

    /// What wakes this driver's [`read_until_woken`](Self::read_until_woken) from another
    /// thread.
    ///
    /// # Errors
    /// The waker could not be made (out of file descriptors).
    pub(crate) fn waker(&mut self) -> Result<std::sync::Arc<mio::Waker>> {
        if let Some(w) = &self.waker {
            return Ok(std::sync::Arc::clone(w));
        }
        let w = mio::Waker::new(self.poll.registry(), mio::Token(WAKE)).map_err(|source| {
            Error::Io {
                server: "(poll)".into(),
                source: source.into(),
            }
        })?;
        let w = std::sync::Arc::new(w);
        self.waker = Some(std::sync::Arc::clone(&w));
        Ok(w)
    }

    /// Reads the replies of a request written before (by [`send_all`](Self::send_all),
    /// perhaps with others written after it) with `on_reply` until its last: `Ok(true)`.
    /// `Ok(false)` when this driver's [`waker`](Self::waker) fired first, with the replies
    /// not all in: another call resumes where this one stopped (what was parsed is gone
    /// from the read buffer, the rest stays). Bounded by `op`'s deadline; a failure closes
    /// the connection. `last`: no other request is unread on the connection once this one
    /// is done.
    pub(crate) fn read_until_woken<F>(
        &mut self,
        i: usize,
        op: &Op,
        last: bool,
        on_reply: &mut F,
    ) -> Result<bool>
    where
        F: FnMut(&[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        if self.conns[i].stream.is_none() {
            return Err(self.io_error(i, io::ErrorKind::NotConnected.into()));
        }
        // The poll path: a blocking read could not be woken.
        if self.conns[i].blocking.is_some() {
            self.set_nonblocking(i)?;
        }
        let mut ex = Exchange::new(0, None, op.deadline);
        loop {
            let conn = &mut self.conns[i];
            match ex.handle_input(&mut conn.rbuf, on_reply) {
                Ok(_) if ex.is_done() => {
                    self.conns[i].busy = !last;
                    return Ok(true);
                }
                Ok(_) => {}
                Err(f) => {
                    if !last && matches!(f, Failure::Parse(_) | Failure::OutOfStep) {
                        self.drain_close(i, op.deadline);
                    }
                    return Err(self.failed(i, f, op));
                }
            }
            // Checked on every pass: a server that trickles bytes must not outlast it.
            ex.handle_timeout(Instant::now())
                .map_err(|f| self.failed(i, f, op))?;
            if self.conns[i].readable && self.read_some(i, &ex, op)? {
                continue;
            }
            if std::mem::take(&mut self.woken) {
                return Ok(false);
            }
            match self.poll_until(op.deadline) {
                Ok(_) => {}
                Err(e) => return Err(self.io_error(i, e)),
            }
        }
    }

    /// Takes the servers of a live list: `servers` extends the ones it has (an index keeps
    /// its server for the list's life). Nothing connects yet.
    ///
    /// # Errors
    /// A new server's TLS name is invalid (the list checked it before it was swapped in).
    pub(crate) fn grow(&mut self, servers: &[ServerAddr]) -> Result<()> {
        #[cfg(feature = "tls")]
        if let Some((t, names)) = &mut self.tls {
            for addr in servers.iter().skip(names.len()) {
                names.push(t.server_name(addr)?);
            }
        }
        for addr in servers.iter().skip(self.conns.len()) {
            self.conns.push(Conn::new(addr, &self.cfg));
        }
        Ok(())
    }

    /// Starts an operation on server `i`: connects if needed and returns the I/O deadline.
    /// The write buffer is cleared for the caller to encode into (see [`wbuf`](Self::wbuf)).
    pub(crate) fn begin(&mut self, i: usize) -> Result<Op> {
        let conn = &mut self.conns[i];
        // Failures closed their connection already; here, an exchange abandoned midway, or
        // bytes nobody asked for (unless they are the replies of quiet commands, which the
        // next exchange reads up to its sync).
        let owed = conn.owes_sync || conn.late.is_some();
        if conn.stream.is_some() && (conn.busy || !(owed || reusable(&conn.rbuf, Ok(())))) {
            self.disconnect(i);
        }
        if self.conns[i].stream.is_none() {
            self.connect(i)?;
        }
        self.conns[i].wbuf.clear();
        Ok(Op::new(self.cfg.io_timeout))
    }

    /// The I/O timeout of an operation.
    pub(crate) fn io_timeout(&self) -> Duration {
        self.cfg.io_timeout
    }

    /// A fresh I/O deadline, for an operation spanning several servers.
    pub(crate) fn new_op(&self) -> Op {
        Op::new(self.cfg.io_timeout)
    }

    /// The write buffer of server `i`, to encode a request into after [`begin`](Self::begin).
    pub(crate) fn wbuf(&mut self, i: usize) -> &mut Vec<u8> {
        &mut self.conns[i].wbuf
    }

    /// True if server `i` has an open connection.
    pub(crate) fn is_connected(&self, i: usize) -> bool {
        self.conns[i].stream.is_some()
    }

    /// Drops the connection to server `i`; the next operation reconnects.
    pub(crate) fn disconnect(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(stream.source());
        }
        conn.rbuf.clear();
        conn.wbuf.clear();
        conn.readable = false;
        conn.writable = false;
        conn.closed = false;
        conn.blocking = None;
        conn.busy = false;
        conn.owes_sync = false;
        conn.unread_syncs = 0;
        conn.late = None;
    }

    /// Whether server `i`'s connection carries quiet commands whose replies were not read
    /// (see [`set_owes_sync`](Self::set_owes_sync)).
    #[inline]
    pub(crate) fn owes_sync(&self, i: usize) -> bool {
        self.conns[i].owes_sync
    }

    /// Records that quiet commands went out on server `i`'s connection without a sync
    /// (`true`), or that a sync's reply was read after them (`false`). A new connection owes
    /// nothing.
    #[inline]
    pub(crate) fn set_owes_sync(&mut self, i: usize, owes: bool) {
        let conn = &mut self.conns[i];
        conn.owes_sync = owes && conn.stream.is_some();
        if !conn.owes_sync {
            conn.unread_syncs = 0;
        }
    }

    /// The sync replies still unread on server `i`'s connection besides the next reader's
    /// own, taken (the reader now skips them).
    pub(crate) fn take_unread_syncs(&mut self, i: usize) -> u32 {
        std::mem::take(&mut self.conns[i].unread_syncs)
    }

    /// Records `n` more syncs written on server `i`'s connection whose replies nobody read.
    pub(crate) fn add_unread_syncs(&mut self, i: usize, n: u32) {
        let conn = &mut self.conns[i];
        if conn.stream.is_some() {
            conn.unread_syncs += n;
            conn.owes_sync = true;
        }
    }

    /// The replies nobody waits for that server `i`'s connection carries ahead of anything
    /// else (see [`abandon`](Self::abandon)), taken: the caller now reads them first.
    pub(crate) fn take_late(&mut self, i: usize) -> Option<Late> {
        self.conns[i].late.take()
    }

    /// Whether server `i`'s connection owes a sync or late replies: its next reader reads
    /// them first (see `Strays`).
    #[inline]
    pub(crate) fn owes_any(&self, i: usize) -> bool {
        let conn = &self.conns[i];
        conn.owes_sync || conn.late.is_some()
    }

    /// Whether server `i`'s connection can be left one more late reply (see `Late`).
    pub(crate) fn late_has_room(&self, i: usize) -> bool {
        self.conns[i].late.is_none_or(|l| l.has_room())
    }

    /// Gives back late replies taken with [`take_late`](Self::take_late) that the taker
    /// did not read (they are still first on the wire).
    pub(crate) fn restore_late(&mut self, i: usize, late: Late) {
        let conn = &mut self.conns[i];
        if conn.stream.is_some() {
            conn.late = Some(late);
        }
    }

    /// Sends the write buffer of server `i`, then `value` and `trailer` if given, while parsing
    /// whatever arrives with `on_reply` (see [`exchange_many`](Self::exchange_many)).
    pub(crate) fn exchange<F>(
        &mut self,
        i: usize,
        op: &Op,
        value: Option<(&[u8], &[u8])>,
        until: Until,
        mut on_reply: F,
    ) -> Result<()>
    where
        F: FnMut(&[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        let mut b = Batch::new(i, value, op);
        self.exchange_many(std::slice::from_mut(&mut b), op, until, |_, buf| {
            on_reply(buf)
        });
        match b.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Drives several servers at once from one `poll`: writes each batch's request (its
    /// server's write buffer, then the batch's value and trailer), and parses each server's
    /// replies with `on_reply(server, bytes)` as they arrive. `on_reply` returns
    /// `Complete((consumed, last))` per reply unit, or `Partial`. Returns when every batch is
    /// done (`Until::Done`: its last reply parsed; `Until::Written`: its request written) or
    /// has failed; failures are left in [`Batch::error`], and a failed server's connection is
    /// closed. One deadline covers all servers, so a frozen server delays the others' results
    /// by at most one I/O timeout.
    ///
    /// Reading while writing is what keeps a long pipeline from deadlocking when both socket
    /// buffers fill up.
    pub(crate) fn exchange_many<F>(
        &mut self,
        batches: &mut [Batch<'_>],
        op: &Op,
        until: Until,
        mut on_reply: F,
    ) where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        for b in batches.iter_mut() {
            b.ex = Exchange::new(self.conns[b.server].wbuf.len(), b.value, op.deadline);
            if self.conns[b.server].stream.is_none() && b.error.is_none() {
                b.error = Some(self.io_error(b.server, io::ErrorKind::NotConnected.into()));
            }
            let conn = &mut self.conns[b.server];
            conn.busy = conn.stream.is_some();
        }
        // Not reached when `on_reply` panics: the connections stay marked busy, and the next
        // `begin` replaces them (their replies are half read).
        self.exchange_many_inner(batches, op, until, &mut on_reply);
        for b in batches.iter() {
            self.conns[b.server].busy = false;
        }
    }

    fn exchange_many_inner<F>(
        &mut self,
        batches: &mut [Batch<'_>],
        op: &Op,
        until: Until,
        mut on_reply: F,
    ) where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        if let [b] = batches {
            let blocking_ok = self.cfg.io_timeout > 2 * PRECISE_TAIL;
            if until == Until::Done
                && b.ex.total() <= BLOCKING_MAX
                && b.error.is_none()
                && blocking_ok
            {
                match self.exchange_blocking(b, op, &mut on_reply) {
                    Ok(true) => return,
                    // Near the deadline: the poll loop below waits out the rest precisely.
                    Ok(false) => {}
                    Err(e) => {
                        b.error = Some(e);
                        return;
                    }
                }
            }
        }
        for b in batches.iter_mut() {
            if b.error.is_none() && self.conns[b.server].blocking.is_some() {
                if let Err(e) = self.set_nonblocking(b.server) {
                    b.error = Some(e);
                }
            }
        }
        // One server: read right after writing (see `step`). Several: their requests go out
        // back to back and one `epoll_wait` then reports whichever replies are in, which
        // costs fewer calls than a read that finds nothing on each server.
        let read_early = batches.len() == 1;
        loop {
            let mut pending = 0;
            let mut progressed = false;
            for b in batches.iter_mut() {
                if b.ex.is_done() || b.error.is_some() {
                    continue;
                }
                match self.step(b, op, until, read_early, &mut on_reply) {
                    Ok(p) => progressed |= p,
                    Err(e) => b.error = Some(e),
                }
                if !b.ex.is_done() && b.error.is_none() {
                    pending += 1;
                }
            }
            if pending == 0 {
                return;
            }
            if progressed {
                continue;
            }
            // The earliest deadline of the exchanges still running (all share `op`'s today).
            let wake = batches
                .iter()
                .filter(|b| b.error.is_none())
                .filter_map(|b| b.ex.poll_timeout())
                .min()
                .unwrap_or(op.deadline);
            match self.poll_until(wake) {
                Ok(true) => {}
                Ok(false) => {
                    let now = Instant::now();
                    for b in batches.iter_mut() {
                        if b.error.is_none() {
                            if let Err(f) = b.ex.handle_timeout(now) {
                                b.error = Some(self.failed(b.server, f, op));
                            }
                        }
                    }
                    return;
                }
                Err(e) => {
                    for b in batches.iter_mut() {
                        if !b.ex.is_done() && b.error.is_none() {
                            b.error = Some(
                                self.io_error(b.server, io::Error::new(e.kind(), e.to_string())),
                            );
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Writes server `i`'s write buffer in full and reads nothing: a pipelined round, whose
    /// replies are read (by [`exchange`](Self::exchange) with an empty write buffer) after
    /// those of the rounds written before it. Bounded by `op`'s deadline; a failure closes
    /// the connection. The connection stays marked busy until an exchange reads on it: if
    /// nobody does (a panic), the next [`begin`](Self::begin) replaces it.
    pub(crate) fn send_all(&mut self, i: usize, op: &Op) -> Result<()> {
        if self.conns[i].stream.is_none() {
            return Err(self.io_error(i, io::ErrorKind::NotConnected.into()));
        }
        self.conns[i].busy = true;
        let mut ex = Exchange::new(self.conns[i].wbuf.len(), None, op.deadline);
        while !ex.is_written() {
            let conn = &self.conns[i];
            // A blocking socket's write waits (up to its write timeout) by itself.
            if conn.blocking.is_some() || conn.writable {
                let n = self.write_some(i, &ex)?;
                ex.handle_written(n);
                if n > 0 {
                    continue;
                }
            }
            ex.handle_timeout(Instant::now())
                .map_err(|f| self.failed(i, f, op))?;
            if self.conns[i].blocking.is_none() {
                if let Err(e) = self.poll_until(op.deadline) {
                    return Err(self.io_error(i, e));
                }
            }
        }
        Ok(())
    }

    /// Closes server `i`'s connection once the server has dealt with everything written on
    /// it: our side of the stream is shut down and whatever arrives is read and dropped
    /// until the server closes too (or `deadline`). Requests written behind a reply that
    /// left the stream in doubt then cannot run after later requests made on the next
    /// connection (memcached serves two connections in no particular order).
    pub(crate) fn drain_close(&mut self, i: usize, deadline: Instant) {
        let Some(stream) = self.conns[i].stream.as_ref() else {
            return;
        };
        let drained = stream.sock().shutdown(std::net::Shutdown::Write).is_ok()
            && (self.conns[i].blocking.is_none() || self.set_nonblocking(i).is_ok());
        if !drained {
            self.disconnect(i);
            return;
        }
        let mut scratch = [0u8; 4096];
        while let Some(stream) = self.conns[i].stream.as_mut() {
            match stream.read(&mut scratch) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !matches!(self.poll_until(deadline), Ok(true)) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        self.disconnect(i);
    }

    /// Server `i`'s socket, for another poll to watch (an idle I/O thread's, see the shared
    /// client's engine): `None` without a plain connection (under TLS, readiness of the
    /// socket is not readiness of replies).
    pub(crate) fn socket_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let stream = self.conns[i].stream.as_ref()?;
        if !stream.exact_readiness() {
            return None;
        }
        Some(match &stream.io {
            Plain::Tcp(s) => s.as_raw_fd(),
            Plain::Unix(s) => s.as_raw_fd(),
        })
    }

    /// Another poll saw server `i`'s socket readable: the next read tries it at once,
    /// without asking this driver's poll first (a read that finds nothing waits as usual).
    pub(crate) fn assume_readable(&mut self, i: usize) {
        self.conns[i].readable = true;
    }

    /// How many connections to server `i` were opened so far: a round written on one is read
    /// only on the same one.
    pub(crate) fn connection_id(&self, i: usize) -> Option<u64> {
        self.is_connected(i).then(|| self.connects(i))
    }

    /// Starts batch `b` of a race (see [`race`](Self::race)): its request is its
    /// server's write buffer, to be done by its operation's deadline.
    pub(crate) fn race_start(&mut self, b: &mut Batch<'_>) {
        b.ex = Exchange::new(self.conns[b.server].wbuf.len(), b.value, b.op.deadline);
        if self.conns[b.server].stream.is_none() {
            b.error = Some(self.io_error(b.server, io::ErrorKind::NotConnected.into()));
            return;
        }
        if self.conns[b.server].blocking.is_some() {
            if let Err(e) = self.set_nonblocking(b.server) {
                b.error = Some(e);
            }
        }
    }

    /// Drives the started batches of a race (a read sent to several servers, the first
    /// answer wins) from one `poll`, until one is done (its index), or `soft` has passed,
    /// or none is left running (`None` both; failures are in [`Batch::error`], each batch's
    /// own deadline failing it). Batches still running stay so: drive them again, or
    /// [`abandon`](Self::abandon) them.
    pub(crate) fn race<F>(
        &mut self,
        batches: &mut [Batch<'_>],
        soft: Instant,
        mut on_reply: F,
    ) -> Option<usize>
    where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        let running = |b: &Batch<'_>| !b.ex.is_done() && b.error.is_none();
        for b in batches.iter() {
            let conn = &mut self.conns[b.server];
            conn.busy = running(b);
        }
        // Not reached when `on_reply` panics: the connections stay marked busy, and the next
        // `begin` replaces them.
        let won = self.race_inner(batches, soft, &mut on_reply);
        for b in batches.iter() {
            self.conns[b.server].busy = false;
        }
        won
    }

    fn race_inner<F>(
        &mut self,
        batches: &mut [Batch<'_>],
        soft: Instant,
        on_reply: &mut F,
    ) -> Option<usize>
    where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        loop {
            let mut pending = 0;
            let mut progressed = false;
            for (k, b) in batches.iter_mut().enumerate() {
                if b.ex.is_done() || b.error.is_some() {
                    continue;
                }
                let op = b.op;
                match self.step(b, &op, Until::Done, true, on_reply) {
                    Ok(_) if b.ex.is_done() => return Some(k),
                    Ok(p) => progressed |= p,
                    Err(e) => b.error = Some(e),
                }
                if b.error.is_none() {
                    pending += 1;
                }
            }
            if pending == 0 {
                return None;
            }
            if progressed {
                continue;
            }
            let wake = batches
                .iter()
                .filter(|b| b.error.is_none() && !b.ex.is_done())
                .filter_map(|b| b.ex.poll_timeout())
                .fold(soft, Instant::min);
            match self.poll_until(wake) {
                Ok(true) => {}
                Ok(false) => {
                    let now = Instant::now();
                    for b in batches.iter_mut() {
                        if b.error.is_none() && !b.ex.is_done() {
                            if let Err(f) = b.ex.handle_timeout(now) {
                                let op = b.op;
                                b.error = Some(self.failed(b.server, f, &op));
                            }
                        }
                    }
                    if now >= soft {
                        return None;
                    }
                }
                Err(e) => {
                    for b in batches.iter_mut() {
                        if !b.ex.is_done() && b.error.is_none() {
                            b.error = Some(
                                self.io_error(b.server, io::Error::new(e.kind(), e.to_string())),
                            );
                        }
                    }
                    return None;
                }
            }
        }
    }

    /// Leaves race batch `b`, still running, to its connection: its reply, and any late
    /// ones before it (`late`: all the replies its connection now owes, in order), will be
    /// read and dropped by the next call there. A request not fully written, replies that
    /// cannot be described (`None`), or a connection that carries late replies already (the
    /// caller took them, and gives them back in `late`) is closed instead. A request not
    /// sent at all leaves the connection as it was (the caller gives back what it took).
    pub(crate) fn abandon(&mut self, b: &Batch<'_>, late: Option<Late>) {
        let conn = &mut self.conns[b.server];
        if b.error.is_some() || b.ex.is_done() {
            return;
        }
        if b.ex.is_unsent() {
            // Never sent (the race ended first): the connection owes only what it owed.
            conn.wbuf.clear();
            return;
        }
        match late {
            Some(l) if b.ex.is_written() && conn.late.is_none() && conn.stream.is_some() => {
                conn.late = Some(l);
            }
            _ => self.disconnect(b.server),
        }
    }

    /// Back to non-blocking mode for the poll path. Readiness edges may have been consumed
    /// by blocking calls meanwhile, so the next step tries both directions.
    fn set_nonblocking(&mut self, i: usize) -> Result<()> {
        let conn = &mut self.conns[i];
        let stream = conn.stream.as_mut().expect("connected");
        if let Err(e) = stream.set_blocking(None) {
            return Err(self.io_error(i, e));
        }
        conn.blocking = None;
        conn.readable = true;
        conn.writable = true;
        Ok(())
    }

    /// The blocking path: write the whole request, then read and parse until the last reply,
    /// each read bounded by a socket timeout that ends [`PRECISE_TAIL`] before the deadline.
    /// `Ok(true)` when done; `Ok(false)` when only the tail is left, for the poll loop.
    fn exchange_blocking<F>(&mut self, b: &mut Batch<'_>, op: &Op, on_reply: &mut F) -> Result<bool>
    where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        let i = b.server;
        let first = self.cfg.io_timeout - PRECISE_TAIL;
        if self.conns[i].blocking.is_none() {
            let stream = self.conns[i].stream.as_mut().expect("connected");
            if let Err(e) = stream.set_blocking(Some(first)) {
                return Err(self.io_error(i, e));
            }
            self.conns[i].blocking = Some(first);
        }
        while !b.ex.is_written() {
            let n = self.write_some(i, &b.ex)?;
            b.ex.handle_written(n);
            if n == 0 {
                b.ex.handle_timeout(Instant::now())
                    .map_err(|f| self.failed(i, f, op))?;
            }
        }
        // The first read needs no clock: its timeout (left as the previous call set it, at
        // most `io_timeout - PRECISE_TAIL`) ends before this operation's deadline, which was
        // taken microseconds ago by `begin`/`new_op`. An empty buffer needs no parse.
        let mut first_read = self.conns[i].rbuf.is_empty();
        let mut on_reply = |buf: &[u8]| on_reply(i, buf);
        loop {
            if !first_read {
                let conn = &mut self.conns[i];
                match b.ex.handle_input(&mut conn.rbuf, &mut on_reply) {
                    Ok(_) if b.ex.is_done() => return Ok(true),
                    Ok(_) => {}
                    // Cannot happen here (the request was written first); treated as in step.
                    Err(Failure::OutOfStep) => {
                        self.disconnect(i);
                        return Ok(true);
                    }
                    Err(f) => return Err(self.failed(i, f, op)),
                }
            }
            let conn = &mut self.conns[i];
            if !first_read || conn.blocking.is_some_and(|t| t > first) {
                let now = Instant::now();
                if let Err(f) = b.ex.handle_timeout(now) {
                    return Err(self.failed(i, f, op));
                }
                let target = (op.deadline - now).saturating_sub(PRECISE_TAIL);
                if target < TIMEOUT_SLACK {
                    return Ok(false);
                }
                let current = conn.blocking.expect("blocking");
                // Keep the read timeout within the slack of its target; grow it back after a
                // shrink so later calls do not wake up needlessly.
                if current > target + TIMEOUT_SLACK || current < target / 2 {
                    let stream = conn.stream.as_ref().expect("connected");
                    if let Err(e) = stream.set_read_timeout(target) {
                        return Err(self.io_error(i, e));
                    }
                    conn.blocking = Some(target);
                }
            }
            first_read = false;
            // WouldBlock here means the read timeout expired: the loop checks the deadline.
            self.read_some(i, &b.ex, op)?;
        }
    }

    /// Moves one batch forward without blocking: write, parse what is buffered, read.
    /// Returns whether anything happened.
    fn step<F>(
        &mut self,
        b: &mut Batch<'_>,
        op: &Op,
        until: Until,
        read_early: bool,
        on_reply: &mut F,
    ) -> Result<bool>
    where
        F: FnMut(usize, &[u8]) -> Result<Status<(usize, bool)>, ParseError>,
    {
        let i = b.server;
        let mut progressed = false;
        if !b.ex.is_written() && self.conns[i].writable {
            let n = self.write_some(i, &b.ex)?;
            b.ex.handle_written(n);
            progressed = n > 0;
            if b.ex.is_written() && until == Until::Done && read_early {
                // Read before waiting: on loopback and fast networks the reply is usually
                // there already, and a read that finds it saves the epoll_wait (a get then
                // costs two syscalls). If it is not, the read says so and we wait.
                self.conns[i].readable = true;
            }
        }
        if until == Until::Written && b.ex.is_written() {
            b.ex.finish();
            return Ok(true);
        }
        let conn = &mut self.conns[i];
        match b
            .ex
            .handle_input(&mut conn.rbuf, &mut |buf| on_reply(i, buf))
        {
            Ok(p) => progressed |= p,
            // The reply was read, but the stream is out of step: start over next time.
            Err(Failure::OutOfStep) => self.disconnect(i),
            Err(f) => return Err(self.failed(i, f, op)),
        }
        if b.ex.is_done() {
            return Ok(true);
        }
        let conn = &self.conns[i];
        // Under TLS, part of a request written may still wait in the session: a read sends
        // it first, so a writable socket is a reason to read too.
        let backlog = conn.writable && conn.stream.as_ref().is_some_and(Stream::has_backlog);
        if conn.readable || backlog {
            progressed |= self.read_some(i, &b.ex, op)?;
        }
        Ok(progressed)
    }

    /// One `write`/`writev` of what remains of the exchange's request.
    fn write_some(&mut self, i: usize, ex: &Exchange<'_>) -> Result<usize> {
        let conn = &mut self.conns[i];
        let (parts, n) = ex.poll_transmit(&conn.wbuf);
        let stream = conn.stream.as_mut().expect("connected by begin()");
        let result = if n == 1 {
            // The common case (the whole request is in the buffer): one plain write, cheaper
            // for the kernel than writev.
            stream.write(parts[0])
        } else {
            let slices = parts.map(IoSlice::new);
            stream.write_vectored(&slices[..n])
        };
        let want = parts[..n].iter().map(|p| p.len()).sum();
        self.wrote(i, result, want)
    }

    /// Accounts for one write of `want` bytes.
    fn wrote(&mut self, i: usize, result: io::Result<usize>, want: usize) -> Result<usize> {
        let conn = &mut self.conns[i];
        match result {
            Ok(0) => Err(self.io_error(i, io::ErrorKind::WriteZero.into())),
            Ok(w) => {
                #[cfg(feature = "metrics")]
                {
                    conn.bytes.1 += w as u64;
                }
                // A short write fills the socket, except under TLS, where rustls takes at
                // most its buffer's worth at a time: only `WouldBlock` says full there.
                if w < want && conn.stream.as_ref().is_some_and(Stream::exact_readiness) {
                    conn.writable = false;
                }
                Ok(w)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.writable = false;
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(self.io_error(i, e)),
        }
    }

    /// One `read` into the read buffer; `Ok(true)` if bytes arrived.
    fn read_some(&mut self, i: usize, ex: &Exchange<'_>, op: &Op) -> Result<bool> {
        let conn = &mut self.conns[i];
        let Some(spare) = conn.rbuf.spare() else {
            return Err(self.io_error(
                i,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply unit exceeds the read limit",
                ),
            ));
        };
        let room = spare.len();
        let stream = conn.stream.as_mut().expect("connected by begin()");
        let result = stream.read(spare);
        if !stream.exact_readiness() && !stream.has_backlog() {
            // A TLS read sends what the session held back first; if that emptied it, the
            // socket took bytes without a writable edge being reported: try writing again
            // (a write that finds it full clears this, and an edge then follows).
            conn.writable = true;
        }
        match result {
            Ok(0) => Err(self.failed(i, ex.handle_eof(), op)),
            Ok(n) => {
                #[cfg(feature = "metrics")]
                {
                    conn.bytes.0 += n as u64;
                }
                conn.rbuf.filled(n);
                conn.fresh = false;
                if n < room && !conn.closed && stream.exact_readiness() {
                    conn.readable = false;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.readable = false;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(self.io_error(i, e)),
        }
    }

    /// Waits for readiness on any connection until `deadline`, recording it per connection.
    /// `Ok(false)` if the deadline has passed.
    fn poll_until(&mut self, deadline: Instant) -> io::Result<bool> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        match self.poll.poll(&mut self.events, Some(deadline - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            if ev.token().0 == WAKE {
                self.woken = true;
            }
            if let Some(c) = self.conns.get_mut(ev.token().0) {
                if ev.is_read_closed() || ev.is_error() {
                    c.closed = true;
                }
                if ev.is_readable() || c.closed {
                    c.readable = true;
                }
                if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                    c.writable = true;
                }
            }
        }
        Ok(true)
    }

    /// Closes server `i`'s connection after a failed exchange and says why.
    fn failed(&mut self, i: usize, failure: Failure, op: &Op) -> Error {
        let server = self.conns[i].label.clone();
        let error = match failure {
            Failure::Parse(error) => Error::Parse { server, error },
            Failure::OutOfStep => Error::Parse {
                server,
                error: ParseError::Unexpected,
            },
            Failure::Closed => {
                let e =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection");
                return self.io_error(i, e);
            }
            Failure::Timeout(during) => Error::Timeout {
                server,
                during,
                elapsed: op.start.elapsed(),
            },
        };
        self.disconnect(i);
        error
    }

    fn io_error(&mut self, i: usize, source: io::Error) -> Error {
        #[cfg(feature = "tls")]
        let tls_on = self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        let tls_on = false;
        self.disconnect(i);
        let conn = &self.conns[i];
        let server = conn.label.clone();
        #[cfg(feature = "tls")]
        if let Some(e) = source
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            let (failure, message) = tls::describe(e);
            return Error::Tls {
                server,
                failure,
                message,
            };
        }
        let dropped = matches!(
            source.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
        );
        if dropped && conn.fresh && !tls_on && conn.connects > 0 {
            // A TLS-only memcached resets a connection that sends plain bytes (it leaves them
            // unread); a server or proxy that does not speak the protocol (twemproxy speaks
            // only text) reads the request and closes. Guess only what the evidence says.
            let guess = if source.kind() == io::ErrorKind::ConnectionReset {
                "does the server require TLS?"
            } else {
                "does the server speak this protocol? a proxy such as twemproxy speaks only text"
            };
            let hint = io::Error::new(
                source.kind(),
                format!("{source} before any reply ({guess})"),
            );
            return Error::Io {
                server,
                source: hint.into(),
            };
        }
        Error::Io {
            server,
            source: source.into(),
        }
    }

    /// How many TLS sessions to server `i` resumed an earlier one.
    pub(crate) fn resumed(&self, i: usize) -> u64 {
        self.conns[i].resumed
    }

    /// Bytes read from and written to server `i` so far; `(0, 0)` without the `metrics`
    /// feature (nothing is counted then).
    #[inline(always)]
    pub(crate) fn bytes(&self, i: usize) -> (u64, u64) {
        #[cfg(feature = "metrics")]
        return self.conns[i].bytes;
        #[cfg(not(feature = "metrics"))]
        {
            let _ = i;
            (0, 0)
        }
    }

    /// Whether connections speak TLS.
    #[inline(always)]
    pub(crate) fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// How many connections to server `i` have been opened.
    pub(crate) fn connects(&self, i: usize) -> u64 {
        self.conns[i].connects
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, Late, LATE_MAX};
    use std::time::Instant;

    /// Late replies are read in the order they were left; those read make room for more,
    /// and no more than `LATE_MAX` are ever owed at once.
    #[test]
    fn late_replies_keep_their_order_and_bound() {
        let mut l = Late::new(Kind::Get, 0, Instant::now());
        for o in 1..LATE_MAX as u32 {
            assert!(l.push(Kind::Get, o));
        }
        assert!(!l.has_room() && !l.push(Kind::Get, 99));
        assert!(!l.push(Kind::Store, 99), "one kind of command only");
        for o in 0..3 {
            assert_eq!(l.next(), Some(o));
            l.advance();
        }
        assert!(l.has_room());
        for o in 100..103 {
            assert!(l.push(Kind::Get, o));
        }
        assert!(!l.push(Kind::Get, 103));
        let rest: Vec<u32> = std::iter::from_fn(|| {
            let o = l.next()?;
            l.advance();
            Some(o)
        })
        .collect();
        assert_eq!(rest, [3, 4, 5, 6, 7, 100, 101, 102]);
    }
}
