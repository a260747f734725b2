//! The crate's error type.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::{KeyError, ParseError, Protocol};

/// A `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of error line (text) the server answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerErrorKind {
    /// `ERROR`: the server did not know the command.
    UnknownCommand,
    /// `CLIENT_ERROR <msg>`: the server rejected the request (e.g. incr on a non-number).
    Client,
    /// `SERVER_ERROR <msg>`: the server could not carry out the request (e.g. the value is
    /// larger than its item size limit, or it is out of memory).
    Server,
}

/// What a call was waiting for when its deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum During {
    /// Opening the connection.
    Connect,
    /// Writing the request.
    Write,
    /// Reading the reply.
    Read,
    /// Waiting for a free request slot of a [`SharedClient`](crate::SharedClient): too
    /// many requests in flight to that server.
    Slot,
}

impl std::fmt::Display for During {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            During::Connect => "connect",
            During::Write => "write",
            During::Read => "read",
            During::Slot => "a free request slot: too many requests in flight",
        })
    }
}

/// Everything that can go wrong in a call. Cheap to clone: an I/O error is shared.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket error, including a connection refused or closed by the server.
    #[error("I/O error talking to {server}: {source}")]
    Io {
        /// The server as configured.
        server: String,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The call did not complete within its deadline (connect or I/O timeout).
    #[error("timed out after {} waiting for {server} ({during})", millis(elapsed))]
    Timeout {
        /// The server as configured.
        server: String,
        /// What the client was waiting for: "connect", "write" or "read".
        during: During,
        /// How long the call had been running when it gave up.
        elapsed: Duration,
    },
    /// The server sent bytes that are not a valid reply to the request.
    #[error("malformed reply from {server}: {error}")]
    Parse {
        /// The server as configured.
        server: String,
        /// What was wrong with it.
        error: ParseError,
    },
    /// A key was rejected before anything was sent.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// A value is larger than the client's configured maximum; nothing was sent.
    #[error("value of {len} bytes exceeds the configured maximum of {max} bytes")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The server answered with an error line.
    #[error("server error ({kind:?}): {message}")]
    Server {
        /// The kind of error line.
        kind: ServerErrorKind,
        /// The server's message (empty for `ERROR`).
        message: String,
    },
    /// SASL authentication failed (binary protocol).
    #[error("authentication failed on {server}: {message}")]
    Auth {
        /// The server as configured.
        server: String,
        /// The server's message.
        message: String,
    },
    /// The client has no server to send the request to.
    #[error("no servers configured or available")]
    NoServers,
    /// The key's server was ejected after repeated failures and has not reached its retry
    /// time; nothing was sent.
    #[error("server {server} is marked down after repeated failures (retry in {retry_in:?})")]
    ServerDown {
        /// The server as configured.
        server: String,
        /// Time left before it is tried again.
        retry_in: Duration,
    },
    /// The call was routed to a server that a live server list has since removed (see
    /// [`ServerList`](crate::ServerList)); nothing was sent. Routing the call again sends
    /// it to the key's server in the new list.
    #[error("server {server} was removed from the server list")]
    ServerRemoved {
        /// The server as configured.
        server: String,
    },
    /// A multi-server call failed on several servers (listed); what the others returned was
    /// delivered.
    #[error("{} servers failed; first: {}", failed.len(), failed.first().map(|(s, e)| format!("{s}: {e}")).unwrap_or_default())]
    Partial {
        /// Each failed server with its error.
        failed: Vec<(String, Error)>,
    },
    /// A TLS session could not be set up or broke (feature `tls`): an untrusted or expired
    /// certificate, a wrong name, a server that does not speak TLS, a refused client
    /// certificate. The message says what to do.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[error("TLS with {server}: {message}")]
    Tls {
        /// The server as configured.
        server: String,
        /// What went wrong, to match on.
        failure: TlsFailure,
        /// What went wrong and what to do about it.
        message: String,
    },
    /// The configuration given to the builder is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No client could be checked out of a [`Pool`](crate::Pool) in time.
    #[error("no client free in the pool after {0:?}")]
    PoolTimeout(Duration),
    /// The client's protocol cannot express this operation (a meta-only call over text or
    /// binary, verbosity over binary). Nothing was sent.
    #[error("{operation} is not available over the {protocol:?} protocol")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// The protocol the client speaks.
        protocol: Protocol,
    },
    /// A value could not be encoded or decoded: its flags name a format or compression this
    /// build does not have, its bytes do not decode, or it would expand past the configured
    /// limit. Nothing partial is returned (see [`crate::codec`]).
    #[error("value codec: {0}")]
    Codec(String),
}

/// What kind of failure an [`Error`] is, to match on without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Io`].
    Io,
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::Parse`].
    Parse,
    /// [`Error::InvalidKey`].
    InvalidKey,
    /// [`Error::ValueTooLarge`].
    ValueTooLarge,
    /// [`Error::Server`].
    Server,
    /// [`Error::Auth`].
    Auth,
    /// [`Error::NoServers`].
    NoServers,
    /// [`Error::ServerDown`].
    ServerDown,
    /// [`Error::ServerRemoved`].
    ServerRemoved,
    /// [`Error::Partial`].
    Partial,
    /// [`Error::Config`].
    Config,
    /// `Error::Tls` (feature `tls`).
    Tls,
    /// [`Error::Unsupported`].
    Unsupported,
    /// [`Error::PoolTimeout`].
    PoolTimeout,
    /// [`Error::Codec`].
    Codec,
}

impl Error {
    /// The server the error came from, as configured, when one server did.
    pub fn server(&self) -> Option<&str> {
        match self {
            Error::Io { server, .. }
            | Error::Timeout { server, .. }
            | Error::Parse { server, .. }
            | Error::Auth { server, .. }
            | Error::ServerDown { server, .. }
            | Error::ServerRemoved { server } => Some(server),
            #[cfg(feature = "tls")]
            Error::Tls { server, .. } => Some(server),
            _ => None,
        }
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Parse { .. } => ErrorKind::Parse,
            Error::InvalidKey(_) => ErrorKind::InvalidKey,
            Error::ValueTooLarge { .. } => ErrorKind::ValueTooLarge,
            Error::Server { .. } => ErrorKind::Server,
            Error::Auth { .. } => ErrorKind::Auth,
            Error::NoServers => ErrorKind::NoServers,
            Error::ServerDown { .. } => ErrorKind::ServerDown,
            Error::ServerRemoved { .. } => ErrorKind::ServerRemoved,
            Error::Partial { .. } => ErrorKind::Partial,
            Error::Config(_) => ErrorKind::Config,
            #[cfg(feature = "tls")]
            Error::Tls { .. } => ErrorKind::Tls,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::PoolTimeout(_) => ErrorKind::PoolTimeout,
            Error::Codec(_) => ErrorKind::Codec,
        }
    }

    /// True for errors that say nothing about the request itself but about reaching the
    /// server (I/O, timeout, malformed reply): the kind a cache-through caller may treat as a miss.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Timeout { .. }
                | Error::Parse { .. }
                | Error::NoServers
                | Error::ServerDown { .. }
                | Error::ServerRemoved { .. }
                | Error::Partial { .. }
        ) || self.kind() == ErrorKind::Tls
    }
}

/// A duration as people read it in a message: whole milliseconds (`1001 ms`).
fn millis(d: &Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
/// What went wrong in a TLS session, to act on without parsing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate does not chain to a trusted root.
    UntrustedCertificate,
    /// The server's certificate is not valid for the name verified.
    WrongName,
    /// The server's certificate has expired (or is not valid yet).
    Expired,
    /// The server did not answer with TLS (a plain-text memcached?).
    NotTls,
    /// The server requires a client certificate and none (or one it does not trust) was given.
    ClientCertRequired,
    /// Any other TLS failure (the message says which).
    Other,
}
