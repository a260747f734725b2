//! TLS (feature `tls`): a rustls client session between a connection and its socket.
//!
//! The session is a byte transform: requests are encrypted on their way to the socket and
//! replies decrypted into the connection's read buffer, so nothing above the driver knows TLS
//! is on. The crypto provider is `ring` (it builds with a C compiler alone, no cmake or nasm).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore};

use crate::addr::ServerAddr;
use crate::error::{Error, Result, TlsFailure};

/// TLS settings for a client: the certificates it trusts, an optional client certificate
/// (mutual TLS) and the name to verify. Cheap to clone; the clients built with one share its
/// session cache, so reconnects resume their sessions where the server allows it.
///
/// Certificate verification is always on: there is no switch to accept any certificate.
///
/// ```no_run
/// use mcstore::{Client, TlsConfig};
/// let tls = TlsConfig::builder()
///     .ca_file("/etc/memcached/ca.pem")
///     .client_cert("/etc/memcached/client.pem", "/etc/memcached/client.key")
///     .build()?; // reads the files now: a missing one is an error naming it
/// let client = Client::builder().server("cache.internal:11211").tls(tls).build()?;
/// # Ok::<(), mcstore::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<ClientConfig>,
    /// The name every server's certificate must carry; by default each server's host.
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Starts a configuration: trusted roots, client certificate, server name.
    pub fn builder() -> TlsConfigBuilder {
        TlsConfigBuilder::default()
    }

    /// Uses a ready rustls configuration as it is (its roots, client certificate, crypto
    /// provider, resumption and ALPN settings).
    pub fn from_rustls(config: Arc<ClientConfig>) -> TlsConfig {
        TlsConfig {
            config,
            server_name: None,
        }
    }

    /// Verifies every server's certificate against `name` instead of the host in its address.
    ///
    /// # Errors
    /// [`Error::Config`] if `name` is neither a DNS name nor an IP address.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsConfig> {
        self.server_name = Some(parse_name(name)?);
        Ok(self)
    }

    /// The rustls configuration in use.
    pub fn rustls_config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name to verify for `addr`: the configured one, else the address's host (a DNS name
    /// or an IP address, checked against the certificate's IP SANs), or `localhost` for a
    /// Unix socket.
    pub(crate) fn server_name(&self, addr: &ServerAddr) -> Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        match addr {
            ServerAddr::Tcp { host, .. } => parse_name(host),
            // A socket path names no host; the server is on this machine.
            ServerAddr::Unix(_) => parse_name("localhost"),
        }
    }
}

fn parse_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|_| Error::Config(format!("TLS: {name:?} is not a valid server name")))
}

/// Builds a [`TlsConfig`]; see [`TlsConfig::builder`].
#[derive(Debug, Clone, Default)]
pub struct TlsConfigBuilder {
    ca_files: Vec<PathBuf>,
    system_roots: bool,
    client: Option<(PathBuf, PathBuf)>,
    server_name: Option<String>,
    no_resumption: bool,
}

impl TlsConfigBuilder {
    /// Trusts the certificates in this PEM file (may be given several times). Without any CA
    /// file, the system's roots are trusted.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_files.push(path.into());
        self
    }

    /// Trusts the system's root certificates too (the default when no CA file is given).
    pub fn system_roots(mut self) -> Self {
        self.system_roots = true;
        self
    }

    /// Presents this certificate chain and private key (PEM files) to servers that ask for
    /// one (mutual TLS).
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }

    /// The name to verify in every server's certificate (default: each server's host, and
    /// `localhost` for a Unix socket).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Whether reconnects may resume an earlier session (default on: a resumed handshake
    /// skips the certificate exchange and its signature checks).
    pub fn resumption(mut self, on: bool) -> Self {
        self.no_resumption = !on;
        self
    }

    /// Reads the files and builds the configuration.
    ///
    /// # Errors
    /// [`Error::Config`], naming the file, when a PEM file is missing, unreadable or holds no
    /// certificate or key; when no trusted root is found; or when the server name is invalid.
    pub fn build(self) -> Result<TlsConfig> {
        let mut roots = RootCertStore::empty();
        for path in &self.ca_files {
            let certs = read_certs(path, "CA")?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    Error::Config(format!(
                        "TLS: invalid CA certificate in {}: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        if self.ca_files.is_empty() || self.system_roots {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "TLS: no trusted root certificates in the system store{why}; \
                     give a CA file (TlsConfigBuilder::ca_file)"
                )));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert, "client")?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::Config(format!(
                        "TLS: cannot read the private key {}: {e}",
                        key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    Error::Config(format!(
                        "TLS: client certificate {} and key {} do not go together: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
        };
        if self.no_resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let tls = TlsConfig::from_rustls(Arc::new(config));
        match &self.server_name {
            Some(name) => tls.with_server_name(name),
            None => Ok(tls),
        }
    }
}

/// The certificates of a PEM file, at least one.
fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |e: &dyn fmt::Display| {
        Error::Config(format!(
            "TLS: cannot read the {what} certificate file {}: {e}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(certs)
}

/// Classifies a rustls error and says what to do about it.
pub(crate) fn describe(e: &rustls::Error) -> (TlsFailure, String) {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                TlsFailure::UntrustedCertificate,
                format!(
                    "the server's certificate is not trusted ({e}); \
                     give the CA that signed it (TlsConfigBuilder::ca_file)"
                ),
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                (
                    TlsFailure::WrongName,
                    format!(
                        "the server's certificate does not match the name verified ({e}); \
                     connect by a name it lists or set one (TlsConfigBuilder::server_name)"
                    ),
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => (
                TlsFailure::Expired,
                format!("the server's certificate is out of its validity period ({e})"),
            ),
            _ => (
                TlsFailure::Other,
                format!("the server's certificate was rejected: {e}"),
            ),
        },
        E::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA,
        ) => (
            TlsFailure::ClientCertRequired,
            format!(
                "the server refused the connection ({e}): it requires a client certificate \
                 it trusts (TlsConfigBuilder::client_cert)"
            ),
        ),
        E::InvalidMessage(_) => (
            TlsFailure::NotTls,
            format!("the server did not answer with TLS ({e}); is it a plain-text memcached?"),
        ),
        _ => (TlsFailure::Other, format!("TLS failed: {e}")),
    }
}

/// A rustls error carried through `io::Error` to the driver, which turns it into
/// [`Error::Tls`].
pub(crate) fn io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// How far a handshake step got.
pub(crate) enum Handshake {
    Done,
    /// Waiting for the server's bytes.
    WantRead,
    /// Waiting for room in the socket's send buffer.
    WantWrite,
}

/// Encrypted bytes are read from the socket this many at a time (rustls alone reads 4 KiB per
/// call: a 12 KiB multi-get reply would cost four reads).
const CIPHER_BUF: usize = 32 * 1024;

/// A client session on one connection. Buffers live in the rustls connection and here, and
/// are reused.
pub(crate) struct TlsSession {
    conn: ClientConnection,
    /// Encrypted bytes read from the socket and not yet handed to rustls: `cipher[start..end]`.
    cipher: Box<[u8]>,
    start: usize,
    end: usize,
    /// The socket blocks (with a timeout): a read does at most one socket read, so the
    /// driver's deadline is checked between reads.
    pub(crate) blocking: bool,
}

impl TlsSession {
    pub(crate) fn new(cfg: &TlsConfig, name: ServerName<'static>) -> io::Result<TlsSession> {
        let conn = ClientConnection::new(cfg.config.clone(), name).map_err(io_error)?;
        Ok(TlsSession {
            conn,
            cipher: vec![0; CIPHER_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            blocking: false,
        })
    }

    /// Whether the session resumed an earlier one (after its handshake).
    pub(crate) fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Encrypted bytes are waiting to be sent.
    pub(crate) fn has_backlog(&self) -> bool {
        self.conn.wants_write()
    }

    /// Moves the handshake on as far as the socket allows (a non-blocking socket).
    pub(crate) fn handshake<S: Read + Write>(&mut self, sock: &mut S) -> io::Result<Handshake> {
        loop {
            match self.flush(sock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Handshake::WantWrite),
                Err(e) => return Err(e),
            }
            if !self.conn.is_handshaking() {
                return Ok(Handshake::Done);
            }
            match self.conn.read_tls(sock) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection during the TLS handshake \
                         (is it a plain-text memcached?)",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Handshake::WantRead),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.conn.process_new_packets().map_err(io_error)?;
        }
    }

    /// Sends every encrypted byte rustls holds; `WouldBlock` if the socket is full.
    fn flush<S: Write>(&mut self, sock: &mut S) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Encrypts what it can of `bufs` and sends it. Earlier bytes go first: while any are
    /// still waiting, nothing new is taken (`WouldBlock`), so a full socket holds the caller
    /// back instead of rustls's buffer growing.
    pub(crate) fn write_vectored<S: Write>(
        &mut self,
        sock: &mut S,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        self.flush(sock)?;
        let n = self.conn.writer().write_vectored(bufs)?;
        match self.flush(sock) {
            Ok(()) => Ok(n),
            // Taken; the rest leaves on the next write or read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    /// Reads decrypted reply bytes into `buf`. `Ok(0)` at the end of the stream. A
    /// non-blocking socket is read until there is plaintext or `WouldBlock`; a blocking one
    /// at most once, then `Interrupted` if that brought only TLS records of its own (session
    /// tickets, a partial record), for the driver to check its deadline and read again.
    pub(crate) fn read<S: Read + Write>(
        &mut self,
        sock: &mut S,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let mut socket_reads = 0;
        loop {
            match self.flush(sock) {
                Ok(()) => {}
                // The rest leaves when the socket has room (the driver asks again then).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start < self.end {
                // Hand rustls what was read (a memory copy, up to its 4 KiB at a time).
                let mut pending = &self.cipher[self.start..self.end];
                let n = self.conn.read_tls(&mut pending)?;
                if n == 0 {
                    // Cannot happen while every record is processed as it arrives; never spin.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS: the session took no more bytes",
                    ));
                }
                self.start += n;
                self.conn.process_new_packets().map_err(io_error)?;
                continue;
            }
            if self.blocking && socket_reads > 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = sock.read(&mut self.cipher)?;
            socket_reads += 1;
            if n == 0 {
                // Unclean end (no close_notify): the driver reports the closed connection.
                return Ok(0);
            }
            self.start = 0;
            self.end = n;
        }
    }
}
