//! A throwaway PostgreSQL cluster on a free loopback port, its socket in a temp folder,
//! stopped (immediately) and removed on drop. As root, `initdb` and `pg_ctl` run as the
//! `postgres` user (initdb refuses root).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `PgStorage::LISTENER_NAME` (the outbox listener's `application_name`), here without the
/// library's `postgres` feature; the storage tests check the two agree.
pub const LISTENER_NAME: &str = "mcstore-outbox-listener";

/// A running cluster; `url()` reaches its `postgres` database as user `mcstore`.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    frozen: std::sync::atomic::AtomicBool,
}

/// The directory of `initdb` and `pg_ctl`: the newest /usr/lib/postgresql/*/bin, or PATH.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL not found under /usr/lib/postgresql: install it \
             (Debian: apt-get install -y postgresql; scripts/ensure-deps does)"
        )
    })
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let as_postgres = super::launcher::running_as_root();
        let dir = std::env::temp_dir().join(format!(
            "mcstore-pg-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown postgres {}", dir.display());
        }
        let mut pg = Postgres {
            port: 0,
            dir,
            bin,
            as_postgres,
            frozen: Default::default(),
        };
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "mcstore",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        for _ in 0..5 {
            pg.port = super::free_port();
            if pg.start_server() {
                pg.wait_ready();
                return pg;
            }
        }
        panic!("PostgreSQL did not start on any of 5 free ports");
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> bool {
        self.command(tool, args).status().is_ok_and(|s| s.success())
    }

    fn run(&self, tool: &str, args: &[&str]) {
        assert!(self.try_run(tool, args), "{tool} {args:?} failed");
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not answer"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://mcstore@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (as a crash would).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = self.try_run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        assert!(self.start_server(), "PostgreSQL did not restart");
        self.wait_ready();
    }

    /// `pg_ctl start` on this cluster's port; false if it failed (e.g. the port was taken).
    fn start_server(&self) -> bool {
        let data = self.dir.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.try_run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
                "start",
            ],
        )
    }
}

impl Postgres {
    /// The postmaster and every process it started (the backends, the checkpointer...).
    fn pids(&self) -> Vec<i32> {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        let Some(master) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![master];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised command name: state, then the parent's pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGSTOP to the whole cluster: connections stay open, nothing answers (a frozen master).
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the cluster's own files and /proc.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    }

    /// SIGCONT to the whole cluster.
    pub fn resume(&self) {
        for pid in self.pids() {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `sql` with psql as the test user; its output, one row a line.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "mcstore", "-d", "postgres", "-Atc", sql])
            .stderr(Stdio::inherit())
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ends every outbox listener's session (as a cut connection would); how many.
    pub fn cut_listeners(&self) -> usize {
        let out = self.sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}'",
            LISTENER_NAME
        ));
        out.lines().filter(|l| *l == "t").count()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            self.resume();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
