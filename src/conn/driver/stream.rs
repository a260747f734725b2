//! The socket under a connection: TCP or Unix, plain or wrapped in a TLS session, in
//! blocking or non-blocking mode.

use std::io::{self, IoSlice, Read, Write};
use std::time::Duration;

use mio::net::{TcpStream, UnixStream};

#[cfg(feature = "tls")]
use super::super::tls::TlsSession;

/// The socket under a connection.
pub(super) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Plain {
    #[inline(always)]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.read(buf),
            Plain::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Plain {
    #[inline(always)]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write(buf),
            Plain::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write_vectored(bufs),
            Plain::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection's byte stream: the socket, and the TLS session over it when TLS is on.
pub(super) struct Stream {
    pub(super) io: Plain,
    #[cfg(feature = "tls")]
    pub(super) tls: Option<Box<TlsSession>>,
}

impl Stream {
    pub(super) fn new(io: Plain) -> Stream {
        Stream {
            io,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    pub(super) fn source(&mut self) -> &mut dyn mio::event::Source {
        match &mut self.io {
            Plain::Tcp(s) => s,
            Plain::Unix(s) => s,
        }
    }

    /// Whether readiness is exact: a short read means the socket is drained. Not under TLS,
    /// where rustls may hold decrypted bytes, or have read only part of what is queued.
    #[inline(always)]
    pub(super) fn exact_readiness(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_none();
        #[cfg(not(feature = "tls"))]
        true
    }

    /// Encrypted bytes wait in the TLS session for room in the socket.
    #[inline(always)]
    pub(super) fn has_backlog(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.as_ref().is_some_and(|t| t.has_backlog());
        #[cfg(not(feature = "tls"))]
        false
    }

    #[inline(always)]
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            return tls.read(&mut self.io, buf);
        }
        self.io.read(buf)
    }

    #[inline(always)]
    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            return tls.write_vectored(&mut self.io, &[IoSlice::new(buf)]);
        }
        self.io.write(buf)
    }

    pub(super) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            return tls.write_vectored(&mut self.io, bufs);
        }
        self.io.write_vectored(bufs)
    }

    /// A borrowed view of the socket, for the options mio does not expose.
    pub(super) fn sock(&self) -> socket2::SockRef<'_> {
        match &self.io {
            Plain::Tcp(s) => socket2::SockRef::from(s),
            Plain::Unix(s) => socket2::SockRef::from(s),
        }
    }

    /// Switches between blocking mode (with `timeout` on reads and writes) and non-blocking.
    pub(super) fn set_blocking(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let sock = self.sock();
        sock.set_nonblocking(timeout.is_none())?;
        if timeout.is_some() {
            sock.set_read_timeout(timeout)?;
            sock.set_write_timeout(timeout)?;
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            tls.blocking = timeout.is_some();
        }
        Ok(())
    }

    pub(super) fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.sock().set_read_timeout(Some(timeout))
    }

    pub(super) fn take_error(&self) -> io::Result<Option<io::Error>> {
        match &self.io {
            Plain::Tcp(s) => s.take_error(),
            Plain::Unix(s) => s.take_error(),
        }
    }

    /// `Ok(true)` once a non-blocking connect has completed.
    pub(super) fn is_connected(&self) -> io::Result<bool> {
        let r = match &self.io {
            Plain::Tcp(s) => s.peer_addr().map(drop),
            Plain::Unix(s) => s.peer_addr().map(drop),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            // mio documents that `peer_addr` may report this while a connect is in flight.
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
