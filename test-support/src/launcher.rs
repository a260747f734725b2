//! Starting a local memcached on a free loopback port, killed on drop: the one launcher shared
//! by the CLI demo (`cli/`), the tests and the benchmarks, through this crate.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a memcached may take to start accepting connections.
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// The memcached binary: `MEMCACHED_BIN`, or `memcached` on `PATH`.
pub fn memcached_bin() -> String {
    std::env::var("MEMCACHED_BIN").unwrap_or_else(|_| "memcached".into())
}

/// True when running as root, where memcached needs `-u root`.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A free loopback TCP port (bound, then released for the server to take).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A memcached command listening as `listen` says (`-l ... -p ...` or `-s PATH`), with
/// `memory_mb` of memory, UDP off, `-u root` when needed, and no output.
pub fn memcached_command(listen: &[&str], memory_mb: u32) -> Command {
    let mut cmd = Command::new(memcached_bin());
    cmd.args(listen)
        .args(["-U", "0", "-m", &memory_mb.to_string()]);
    if running_as_root() {
        cmd.args(["-u", "root"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A memcached child process, killed on drop.
pub struct Local(pub Child);

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a memcached on a free loopback port and waits until it accepts connections (or has
/// exited, or [`READY_WITHIN`] passed). Returns it and its `host:port`.
pub fn start_tcp(memory_mb: u32) -> io::Result<(Local, String)> {
    let port = free_port()?;
    let child = memcached_command(&["-l", "127.0.0.1", "-p", &port.to_string()], memory_mb)
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start {:?} ({e}); install memcached or set MEMCACHED_BIN",
                    memcached_bin()
                ),
            )
        })?;
    let mut local = Local(child);
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        if let Some(status) = local.0.try_wait()? {
            return Err(io::Error::other(format!(
                "memcached exited early: {status}"
            )));
        }
        if start.elapsed() > READY_WITHIN {
            return Err(io::Error::other(
                "memcached did not start listening in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((local, addr))
}
