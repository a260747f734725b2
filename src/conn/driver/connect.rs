//! Opening a connection: a non-blocking connect bounded by the connect timeout, then the TLS
//! handshake when configured.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Token};

#[cfg(feature = "tls")]
use super::super::tls::{Handshake, TlsSession};
use super::super::ServerAddr;
use super::{Driver, Op, Plain, Stream};
use crate::error::{During, Error, Result};

impl Driver {
    /// Opens a non-blocking connection to server `i`, bounded by the connect timeout.
    pub(super) fn connect(&mut self, i: usize) -> Result<()> {
        let op = Op::new(self.cfg.connect_timeout);
        match self.conns[i].addr.clone() {
            ServerAddr::Unix(path) => {
                let stream = UnixStream::connect(&path).map_err(|e| self.io_error(i, e))?;
                self.finish_connect(i, Stream::new(Plain::Unix(stream)), &op)
            }
            ServerAddr::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| self.io_error(i, e))?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                let mut last_error = None;
                for sa in addrs {
                    match TcpStream::connect(sa) {
                        // The next address is tried only after an I/O error.
                        Ok(s) => match self.finish_connect(i, Stream::new(Plain::Tcp(s)), &op) {
                            Err(e @ Error::Io { .. }) => last_error = Some(e),
                            r => return r,
                        },
                        Err(e) => last = e,
                    }
                }
                Err(match last_error {
                    Some(e) => e,
                    None => self.io_error(i, last),
                })
            }
        }
    }

    fn finish_connect(&mut self, i: usize, mut stream: Stream, op: &Op) -> Result<()> {
        self.poll
            .registry()
            .register(
                stream.source(),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| self.io_error(i, e))?;
        let conn = &mut self.conns[i];
        conn.stream = Some(stream);
        conn.readable = false;
        conn.writable = false;
        conn.closed = false;
        loop {
            let conn = &mut self.conns[i];
            if conn.writable {
                let stream = conn.stream.as_ref().expect("just set");
                if let Some(e) = stream.take_error().ok().flatten() {
                    return Err(self.io_error(i, e));
                }
                match stream.is_connected() {
                    Ok(true) => break,
                    Ok(false) => conn.writable = false,
                    Err(e) => return Err(self.io_error(i, e)),
                }
            }
            self.wait_connecting(i, op)?;
        }
        if let Some(Stream {
            io: Plain::Tcp(s), ..
        }) = &self.conns[i].stream
        {
            // Connected to itself: nothing listens on the server's port, which lies in the
            // ephemeral range, and the kernel gave this socket that very port (a TCP
            // simultaneous open). It would read its own requests as replies, and hold the
            // port the server needs to listen on again: refused, and closed at once.
            if connected_to_itself(s) {
                let e = io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "connected to itself: no server listens on that port",
                );
                return Err(self.io_error(i, e));
            }
            // Requests are small and latency-bound: never let Nagle hold one back.
            if let Err(e) = s.set_nodelay(true) {
                return Err(self.io_error(i, e));
            }
        }
        #[cfg(feature = "tls")]
        self.handshake(i, op)?;
        let conn = &mut self.conns[i];
        conn.rbuf.clear();
        conn.rbuf.ready();
        if conn.wbuf.capacity() == 0 {
            conn.wbuf.reserve(super::INITIAL_WRITE_BUF);
        }
        conn.connects += 1;
        conn.fresh = true;
        conn.busy = false;
        conn.owes_sync = false;
        conn.unread_syncs = 0;
        conn.late = None;
        Ok(())
    }

    /// Waits for readiness while server `i` connects (or handshakes); a timeout past the
    /// connect deadline closes the connection.
    fn wait_connecting(&mut self, i: usize, op: &Op) -> Result<()> {
        match self.poll_until(op.deadline) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.disconnect(i);
                Err(Error::Timeout {
                    server: self.conns[i].label.clone(),
                    during: During::Connect,
                    elapsed: op.start.elapsed(),
                })
            }
            Err(e) => Err(self.io_error(i, e)),
        }
    }

    /// The TLS handshake, when TLS is on: part of connecting, bounded by its deadline.
    #[cfg(feature = "tls")]
    fn handshake(&mut self, i: usize, op: &Op) -> Result<()> {
        let Some((cfg, names)) = &self.tls else {
            return Ok(());
        };
        let session = TlsSession::new(cfg, names[i].clone()).map_err(|e| self.io_error(i, e))?;
        let conn = &mut self.conns[i];
        let stream = conn.stream.as_mut().expect("just connected");
        stream.tls = Some(Box::new(session));
        loop {
            let conn = &mut self.conns[i];
            let stream = conn.stream.as_mut().expect("just connected");
            let tls = stream.tls.as_mut().expect("just set");
            match tls.handshake(&mut stream.io) {
                Ok(Handshake::Done) => {
                    conn.resumed += u64::from(tls.resumed());
                    #[cfg(feature = "tracing")]
                    tracing::debug!(server = %conn.label, resumed = tls.resumed(), "TLS session established");
                    return Ok(());
                }
                Ok(Handshake::WantRead) => conn.readable = false,
                Ok(Handshake::WantWrite) => conn.writable = false,
                Err(e) => return Err(self.io_error(i, e)),
            }
            self.wait_connecting(i, op)?;
        }
    }
}

/// Whether `s` is connected to itself (its local and peer addresses are the same).
fn connected_to_itself(s: &mio::net::TcpStream) -> bool {
    s.local_addr()
        .is_ok_and(|l| s.peer_addr().is_ok_and(|p| p == l))
}

#[cfg(test)]
mod tests {
    use super::connected_to_itself;
    use std::os::fd::FromRawFd;

    /// A socket bound to a port and connected to that same port connects to itself (a
    /// TCP simultaneous open), as a client's can when the kernel picks the server's port:
    /// recognised. An ordinary connection is not.
    #[test]
    fn a_self_connection_is_recognised() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // SAFETY: a plain socket(2) call; the descriptor is owned by the TcpStream below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = std::ptr::addr_of!(addr).cast::<libc::sockaddr>();
        // SAFETY: `sa` points to a valid sockaddr_in of `len` bytes for both calls.
        let (b, c) = unsafe { (libc::bind(fd, sa, len), libc::connect(fd, sa, len)) };
        // SAFETY: `fd` is an open socket nobody else owns.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        assert_eq!((b, c), (0, 0), "{}", std::io::Error::last_os_error());
        assert!(connected_to_itself(&mio::net::TcpStream::from_std(std)));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!connected_to_itself(&mio::net::TcpStream::from_std(other)));
    }
}
