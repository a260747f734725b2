//! TLS test support: certificates made at test time (rcgen), memcached's TLS arguments, a
//! TLS probe for readiness, and the client configuration the suites use in TLS mode.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every certificate the TLS tests use, in one folder under cargo's test temp dir.
#[derive(Debug)]
pub struct Certs {
    pub dir: PathBuf,
    /// The test CA, trusted by the clients.
    pub ca: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`, signed by the CA.
    pub server: Pair,
    /// Server certificate for `localhost` only (no IP SAN).
    pub localhost_only: Pair,
    /// Server certificate that expired in 2021.
    pub expired: Pair,
    /// Server certificate signed by another CA nobody trusts.
    pub untrusted: Pair,
    /// Client certificate for mutual TLS, signed by the CA.
    pub client: Pair,
}

fn write_pair(dir: &Path, name: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Pair {
    let pair = Pair {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pair.cert, cert.pem()).unwrap();
    std::fs::write(&pair.key, key.serialize_pem()).unwrap();
    pair
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(
    names: &[&str],
    issuer: &(rcgen::Certificate, KeyPair),
    validity: Option<(i32, i32)>,
) -> (rcgen::Certificate, KeyPair) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    if let Some((from, to)) = validity {
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    (p.signed_by(&key, &issuer.0, &issuer.1).unwrap(), key)
}

/// The certificates, made once per test process.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        // Cargo's temp dir for tests (examples that share this module have none).
        let tmp = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = tmp.join(format!("tls-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_pair = ca("mcstore test CA");
        let other = ca("untrusted CA");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_pair.0.pem()).unwrap();
        let (c, k) = leaf(&["localhost", "127.0.0.1"], &ca_pair, None);
        let server = write_pair(&dir, "server", &c, &k);
        let (c, k) = leaf(&["localhost"], &ca_pair, None);
        let localhost_only = write_pair(&dir, "localhost-only", &c, &k);
        let (c, k) = leaf(&["localhost", "127.0.0.1"], &ca_pair, Some((2020, 2021)));
        let expired = write_pair(&dir, "expired", &c, &k);
        let (c, k) = leaf(&["localhost", "127.0.0.1"], &other, None);
        let untrusted = write_pair(&dir, "untrusted", &c, &k);
        let (c, k) = leaf(&["mcstore test client"], &ca_pair, None);
        let client = write_pair(&dir, "client", &c, &k);
        Certs {
            dir,
            ca: ca_path,
            server,
            localhost_only,
            expired,
            untrusted,
            client,
        }
    })
}

/// memcached's arguments to serve TLS with `pair`.
pub fn server_args(pair: &Pair) -> Vec<String> {
    vec![
        "-Z".into(),
        "-o".into(),
        format!(
            "ssl_chain_cert={},ssl_key={}",
            pair.cert.display(),
            pair.key.display()
        ),
    ]
}

/// Same, also requiring a client certificate signed by the test CA (mutual TLS).
pub fn mutual_server_args(pair: &Pair) -> Vec<String> {
    let mut a = server_args(pair);
    a[2] = format!(
        "{},ssl_ca_cert={},ssl_verify_mode=2",
        a[2],
        certs().ca.display()
    );
    a
}

/// The client side of the suites in TLS mode: trusts the test CA; with `mutual`, presents
/// the client certificate too.
pub fn client_config(mutual: bool) -> mcstore::TlsConfig {
    let c = certs();
    let mut b = mcstore::TlsConfig::builder().ca_file(&c.ca);
    if mutual {
        b = b.client_cert(&c.client.cert, &c.client.key);
    }
    b.build().unwrap()
}

/// Accepts any server certificate: for the readiness probe only (it must see servers with
/// expired or untrusted certificates come up). The library has no such switch.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn probe_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let c = &certs().client;
            let chain = CertificateDer::pem_file_iter(&c.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&c.key).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_client_auth_cert(chain, key)
                .unwrap();
            Arc::new(config)
        })
        .clone()
}

/// True if a TLS memcached at `addr` (host:port or a socket path) answers `version` now
/// (binary `version` for a SASL server, which answers nothing else before authentication).
pub fn answers(addr: &str, binary: bool) -> bool {
    fn ask<S: Read + Write>(sock: S, binary: bool) -> bool {
        let name = ServerName::try_from("localhost").unwrap();
        let Ok(conn) = rustls::ClientConnection::new(probe_config(), name) else {
            return false;
        };
        let mut s = rustls::StreamOwned::new(conn, sock);
        if binary {
            let mut req = [0u8; 24];
            req[0] = 0x80;
            req[1] = 0x0b;
            let mut resp = [0u8; 24];
            return s.write_all(&req).is_ok() && s.read_exact(&mut resp).is_ok() && resp[0] == 0x81;
        }
        if s.write_all(b"version\r\n").is_err() {
            return false;
        }
        let mut line = String::new();
        // A server with ASCII authentication (-Y) refuses it, but answers.
        BufReader::new(s).read_line(&mut line).is_ok()
            && (line.starts_with("VERSION ") || line.starts_with("CLIENT_ERROR unauthenticated"))
    }
    let timeout = Some(Duration::from_millis(500));
    if addr.starts_with('/') {
        std::os::unix::net::UnixStream::connect(addr)
            .and_then(|s| {
                s.set_read_timeout(timeout)?;
                Ok(s)
            })
            .map(|s| ask(s, binary))
            .unwrap_or(false)
    } else {
        TcpStream::connect(addr)
            .and_then(|s| {
                s.set_read_timeout(timeout)?;
                Ok(s)
            })
            .map(|s| ask(s, binary))
            .unwrap_or(false)
    }
}

/// A TLS server session over `sock` with the test server certificate (handshake on first use).
pub fn server_stream(sock: TcpStream) -> rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    let config = CONFIG
        .get_or_init(|| {
            let s = &certs().server;
            let chain = CertificateDer::pem_file_iter(&s.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&s.key).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            Arc::new(
                rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .unwrap(),
            )
        })
        .clone();
    rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), sock)
}
