//! Test support for mcstore's tests, benchmarks and demo: real memcached processes on free
//! loopback ports (stopped on drop), a throwaway PostgreSQL cluster, a latency proxy, a hostile
//! fake server, and (feature `tls`) certificates made at test time.
//!
//! Not published: a dev-dependency of `mcstore` and a dependency of `mcstore-cli` (its `demo`
//! starts memcached and PostgreSQL with [`launcher`] and [`postgres`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mcstore::{Client, ClientBuilder};

#[cfg(feature = "tls")]
pub mod tls;

pub mod postgres;

pub mod proxy;

pub mod launcher;
use launcher::{memcached_command, READY_WITHIN};

/// Checks once that memcached can be run, with a clear message if not.
fn check_memcached() {
    let bin = launcher::memcached_bin();
    match Command::new(&bin).arg("-V").output() {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "memcached not found (tried {bin:?}). Install it (Debian: `apt-get install -y memcached`) \
             or point MEMCACHED_BIN at a memcached 1.6 binary."
        ),
    }
}

/// A free loopback TCP port (bound then released; memcached retries are handled by `start`).
pub fn free_port() -> u16 {
    launcher::free_port().unwrap()
}

/// Where a test server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

/// A real memcached child process; killed on drop.
pub struct Memcached {
    child: Option<Child>,
    pub listen: Listen,
    extra: Vec<String>,
    _dir: Option<TempDir>,
    /// SASL config folder (memcached -S): the server then answers only binary requests.
    sasl_conf: Option<PathBuf>,
}

impl Memcached {
    /// A memcached on a free loopback port with 64 MiB of memory.
    pub fn start() -> Memcached {
        Self::with_args(&[])
    }

    /// Same, with extra command-line arguments (e.g. `["-I", "2m"]`).
    pub fn with_args(extra: &[&str]) -> Memcached {
        for _ in 0..5 {
            let mut m = Memcached {
                child: None,
                listen: Listen::Tcp(free_port()),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                _dir: None,
                sasl_conf: None,
            };
            if m.spawn() {
                return m;
            }
        }
        panic!("memcached did not start on any of 5 free ports");
    }

    /// A memcached listening on a Unix socket in a fresh temporary directory.
    pub fn start_unix() -> Memcached {
        let dir = TempDir::new("mcsock");
        let path = dir.path.join("memcached.sock");
        let mut m = Memcached {
            child: None,
            listen: Listen::Unix(path),
            extra: Vec::new(),
            _dir: Some(dir),
            sasl_conf: None,
        };
        assert!(m.spawn(), "memcached did not start on a Unix socket");
        m
    }

    /// A memcached with SASL on (`-S`), knowing one user: `user`/`password` in a fresh sasldb.
    /// Needs `saslpasswd2` (Debian: sasl2-bin).
    pub fn start_sasl(user: &str, password: &str) -> Memcached {
        let dir = TempDir::new("mcsasl");
        let db = dir.path.join("sasldb2");
        let mut child = Command::new("saslpasswd2")
            .args(["-a", "memcached", "-c", "-p", "-f"])
            .arg(&db)
            .arg(user)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("saslpasswd2 not found ({e}): apt-get install -y sasl2-bin")
            });
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "saslpasswd2 failed");
        std::fs::write(
            dir.path.join("memcached.conf"),
            format!("mech_list: plain\nsasldb_path: {}\n", db.display()),
        )
        .unwrap();
        let mut m = Memcached {
            child: None,
            listen: Listen::Tcp(free_port()),
            extra: vec!["-S".into()],
            sasl_conf: Some(dir.path.clone()),
            _dir: Some(dir),
        };
        assert!(m.spawn(), "memcached -S did not start");
        m
    }

    /// A memcached with ASCII authentication (`-Y`), knowing one user.
    pub fn start_ascii_auth(user: &str, password: &str) -> Memcached {
        let dir = TempDir::new("mcauth");
        let file = dir.path.join("authfile");
        std::fs::write(&file, format!("{user}:{password}\n")).unwrap();
        let mut m = Memcached {
            child: None,
            listen: Listen::Tcp(free_port()),
            extra: vec!["-Y".into(), file.to_str().unwrap().into()],
            sasl_conf: None,
            _dir: Some(dir),
        };
        assert!(m.spawn(), "memcached -Y did not start");
        m
    }

    /// The address to give the client.
    pub fn addr(&self) -> String {
        match &self.listen {
            Listen::Tcp(p) => format!("127.0.0.1:{p}"),
            Listen::Unix(p) => p.display().to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A client for this server with test-friendly timeouts.
    pub fn client(&self) -> Client {
        self.client_with(mcstore::Protocol::Text)
    }

    /// The client connections memcached has open now, other than the one asking: 0 for a
    /// server nobody uses. Not `curr_connections` minus a baseline read at start: a busy
    /// host may still count a connection that closed (the start's readiness probe), which
    /// made such baselines one too high (a wait for "every client connected" then never
    /// ended, and a wait for "every client left" ended one connection early).
    pub fn clients(&self) -> u64 {
        let mut c = self.client();
        let conns = c.stats(Some("conns")).expect("stats conns");
        let open = (conns[0].stats.iter())
            .filter(|(k, v)| k.ends_with(":state") && *v != "conn_listening")
            .count() as u64;
        // The asker's own connection is one of them.
        open.saturating_sub(1)
    }

    /// Same, speaking protocol `p`.
    pub fn client_with(&self, p: mcstore::Protocol) -> Client {
        // memcached serves TLS on TCP only: its Unix sockets stay plain text under -Z.
        let b = match self.listen {
            Listen::Tcp(_) => client_builder(),
            Listen::Unix(_) => Client::builder(),
        };
        b.protocol(p)
            .server(self.addr())
            .io_timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    fn spawn(&mut self) -> bool {
        check_memcached();
        let port;
        let listen: [&str; 4];
        let listen: &[&str] = match &self.listen {
            Listen::Tcp(p) => {
                port = p.to_string();
                listen = ["-l", "127.0.0.1", "-p", &port];
                &listen
            }
            Listen::Unix(path) => &["-s", path.to_str().expect("a UTF-8 temp path")],
        };
        let mut cmd = memcached_command(listen, 64);
        cmd.args(["-t", "2"]);
        cmd.args(&self.extra);
        #[cfg(feature = "tls")]
        if tls_mode()
            && matches!(self.listen, Listen::Tcp(_))
            && !self.extra.iter().any(|a| a == "-Z")
        {
            cmd.args(tls::server_args(&tls::certs().server));
        }
        if let Some(conf) = &self.sasl_conf {
            cmd.env("SASL_CONF_PATH", conf);
        }
        let child = cmd.spawn().expect("spawn memcached");
        self.child = Some(child);
        let ready = self.wait_ready();
        if ready && tls_mode() && matches!(self.listen, Listen::Tcp(_)) {
            // The suites must really run over TLS: the server refuses plain text.
            assert!(
                !self.answers_plain(),
                "a TLS-mode memcached answered plain text"
            );
        }
        ready
    }

    /// Polls until the server answers `version`, or it exits (port taken), or time runs out.
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < READY_WITHIN {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("memcached exited early: {status}");
                self.child = None;
                return false;
            }
            if self.answers() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("memcached did not answer within {READY_WITHIN:?}");
    }

    /// True if the server answers a `version` request right now.
    pub fn answers(&self) -> bool {
        #[cfg(feature = "tls")]
        if matches!(self.listen, Listen::Tcp(_))
            && (tls_mode() || self.extra.iter().any(|a| a == "-Z"))
        {
            return tls::answers(&self.addr(), self.sasl_conf.is_some());
        }
        self.answers_plain()
    }

    /// True if the server answers a plain-text (or plain binary) `version` right now.
    pub fn answers_plain(&self) -> bool {
        if self.sasl_conf.is_some() {
            // Text gets no reply with -S; binary Version is allowed before authentication.
            let Listen::Tcp(p) = self.listen else {
                return false;
            };
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", p)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut req = [0u8; 24];
            req[0] = 0x80;
            req[1] = 0x0b;
            let mut resp = [0u8; 24];
            return s.write_all(&req).is_ok() && s.read_exact(&mut resp).is_ok() && resp[0] == 0x81;
        }
        fn ask<S: Read + Write>(mut s: S) -> bool {
            if s.write_all(b"version\r\n").is_err() {
                return false;
            }
            let mut line = String::new();
            // A server with ASCII authentication (-Y) refuses it, but answers.
            BufReader::new(s).read_line(&mut line).is_ok()
                && (line.starts_with("VERSION ")
                    || line.starts_with("CLIENT_ERROR unauthenticated"))
        }
        match &self.listen {
            Listen::Tcp(p) => TcpStream::connect(("127.0.0.1", *p))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(500)))?;
                    Ok(s)
                })
                .map(ask)
                .unwrap_or(false),
            Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p)
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(500)))?;
                    Ok(s)
                })
                .map(ask)
                .unwrap_or(false),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    fn proc_state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // The state is the first field after the parenthesised command name.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// SIGSTOP: the process keeps its sockets but stops answering. Returns once it is stopped.
    pub fn freeze(&self) {
        self.signal("-STOP");
        wait_for("memcached to stop", || self.proc_state() == Some('T'));
    }

    /// SIGCONT, then waits until it answers again.
    pub fn resume(&self) {
        self.signal("-CONT");
        wait_for("memcached to answer after SIGCONT", || self.answers());
    }

    /// Kills the process and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port or socket, with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let start = Instant::now();
        while !self.spawn() {
            assert!(start.elapsed() < READY_WITHIN, "memcached did not restart");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A frozen process must be woken to die promptly on some kernels; SIGKILL works
            // regardless, but continue it anyway so nothing lingers stopped.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.kill();
    }
}

/// Whether this run speaks TLS to every test server (`MCSTORE_TEST_TLS=1`, feature `tls`):
/// servers start with `-Z` and [`client_builder`] adds the test CA, so the same suites run
/// over TLS.
pub fn tls_mode() -> bool {
    cfg!(feature = "tls") && std::env::var_os("MCSTORE_TEST_TLS").is_some_and(|v| v == "1")
}

/// `Client::builder()`, speaking TLS (trusting the test CA) in [`tls_mode`].
pub fn client_builder() -> ClientBuilder {
    let b = Client::builder();
    #[cfg(feature = "tls")]
    if tls_mode() {
        return b.tls(tls::client_config(false));
    }
    b
}

/// Two copies of each key over `ms` (ketama, text) that fail fast: a server is marked down
/// after one failure for 300 ms, with 300 ms timeouts (the fleet fault tests).
pub fn fast_failing_copies(ms: &[Memcached]) -> ClientBuilder {
    client_builder()
        .protocol(mcstore::Protocol::Text)
        .servers(ms.iter().map(Memcached::addr).collect::<Vec<_>>())
        .distribution(mcstore::ring::Distribution::Ketama)
        .replicas(2)
        .server_failure_limit(1)
        .retry_timeout(Duration::from_millis(300))
        .io_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
}

/// A key (`tag-N`) whose two copies are servers `a` then `b`, in placement order.
pub fn key_on(ring: &mcstore::ring::Continuum, a: usize, b: usize, tag: &str) -> String {
    (0..100_000)
        .map(|n| format!("{tag}-{n}"))
        .find(|k| {
            let r = ring.replicas(k.as_bytes(), 2, mcstore::ring::ReplicaPlacement::Natural);
            r.as_slice() == [a as u32, b as u32]
        })
        .expect("a key")
}

/// Builds a C helper that links the system libmemcached (`cc -O2 SRC -lmemcached`) into
/// `dir/name`: the compatibility tests ask the real libmemcached where it puts keys. Panics
/// with what to install if it cannot.
pub fn libmemcached_helper(dir: &std::path::Path, name: &str, src: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(src)
        .arg("-lmemcached")
        .status()
        .expect("run cc: install a C compiler (apt-get install -y gcc)");
    assert!(
        status.success(),
        "building the libmemcached helper failed: install libmemcached \
         (Debian: apt-get install -y libmemcached-dev)"
    );
    out
}

/// Polls `cond` every 5 ms for up to 20 s; panics naming `what` if it never holds.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < READY_WITHIN,
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A deliberately hostile fake server: for each connection it reads one request line and
/// calls `respond` with the socket, which may send anything (malformed, truncated, endless
/// bytes) or nothing. Stops accepting on drop.
pub struct Hostile {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    pub connections: Arc<AtomicUsize>,
}

impl Hostile {
    pub fn start<F>(respond: F) -> Hostile
    where
        F: Fn(&[u8], &mut HostileConn) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let respond = Arc::new(respond);
        let (stop2, conns2) = (stop.clone(), connections.clone());
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                conns2.fetch_add(1, Ordering::SeqCst);
                let respond = respond.clone();
                let stop3 = stop2.clone();
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = BufReader::new(HostileConn::new(conn));
                    loop {
                        let mut line = Vec::new();
                        match reader.read_until(b'\n', &mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if stop3.load(Ordering::SeqCst) {
                            return;
                        }
                        respond(&line, reader.get_mut());
                    }
                });
            }
        });
        Hostile {
            port,
            stop,
            thread: Some(thread),
            connections,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A fake server's side of one connection: plain TCP, or a TLS session over it in
/// [`tls_mode`] (the same malformed bytes, inside valid TLS records).
pub enum HostileConn {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl HostileConn {
    pub fn new(s: TcpStream) -> HostileConn {
        #[cfg(feature = "tls")]
        if tls_mode() {
            return HostileConn::Tls(Box::new(tls::server_stream(s)));
        }
        HostileConn::Plain(s)
    }

    /// Closes the TCP connection (under TLS without a close_notify: an abrupt end).
    pub fn shutdown(&mut self, how: std::net::Shutdown) -> std::io::Result<()> {
        match self {
            HostileConn::Plain(s) => s.shutdown(how),
            #[cfg(feature = "tls")]
            HostileConn::Tls(t) => {
                let _ = t.flush();
                t.sock.shutdown(how)
            }
        }
    }
}

impl Read for HostileConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostileConn::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            HostileConn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for HostileConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostileConn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            HostileConn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            HostileConn::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            HostileConn::Tls(t) => t.flush(),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Generates `mod text` and `mod binary` with one `#[test]` per listed function, each calling
/// `f(Protocol)`: one suite, both protocols.
#[macro_export]
macro_rules! for_each_protocol {
    ($($t:ident),* $(,)?) => {
        mod text {
            $( #[test] fn $t() { super::$t(mcstore::Protocol::Text) } )*
        }
        mod binary {
            $( #[test] fn $t() { super::$t(mcstore::Protocol::Binary) } )*
        }
        mod meta {
            $( #[test] fn $t() { super::$t(mcstore::Protocol::Meta) } )*
        }
    };
}

/// A small deterministic generator (xorshift; no dependency for test randomness).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What [`panicking_callback`] panics with.
pub const CALLBACK_PANIC: &str = "callback panics";

/// Panics in a caller's callback on purpose, without the default hook's message for each
/// (other panics are reported as usual).
pub fn panicking_callback() -> ! {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&CALLBACK_PANIC) {
                default(info);
            }
        }));
    });
    std::panic::panic_any(CALLBACK_PANIC)
}
