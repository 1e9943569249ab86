//! Supervising an embedded `nats-server` child process, for `athanor up` and tests.
//!
//! Starting and restarting block the calling thread until the server listens (at most
//! 20 s): async code calls them through `tokio::task::spawn_blocking`.
//!
//! The server dies with us however we end: it gets a parent-death signal (SIGKILL),
//! tied to a thread of ours that lives as long as the server handle (the signal
//! follows the thread that started the child, and a blocking-pool thread comes and
//! goes). Its pid is kept in `nats-server.pid` in the store folder, so a start finds
//! and stops a server an earlier process left on the same store before spawning.

use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The oldest nats-server this project runs against.
pub const MIN_SERVER_VERSION: (u32, u32) = (2, 11);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("nats-server exited with {status}; see {log}")]
    Exited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("nats-server did not listen on port {port} within 20 s")]
    NotListening { port: u16 },
    #[error("{store} is in use by another running athanor (pid {pid}); stop it first, or give this one another data directory")]
    InUse { store: PathBuf, pid: i32 },
    #[error("no nats-server >= {}.{} found for {name:?} ({seen}); run `scripts/setup` (installs it under .tools/) or set nats.server_bin", MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1)]
    NotFound { name: String, seen: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A `nats-server` child process with JetStream, on a loopback port, with its store
/// in a directory of ours. Killed (SIGKILL) when dropped.
pub struct EmbeddedServer {
    bin: PathBuf,
    store_dir: PathBuf,
    port: u16,
    sync_always: bool,
    /// JetStream's file store limit (`max_file_store`); unset: the server's default,
    /// 75 % of the disk space free when it starts.
    max_store: Option<u64>,
    /// Appended to the generated server configuration (e.g. an `authorization` block).
    extra_config: String,
    child: Option<Child>,
    /// Ends the thread the child's parent-death signal is tied to, once dropped.
    keeper: Option<mpsc::Sender<()>>,
}

impl EmbeddedServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start(server_bin: &str, store_dir: &Path) -> Result<Self, ServerError> {
        Self::start_with(server_bin, store_dir, false)
    }

    /// As [`start`](Self::start); with `sync_always`, JetStream fsyncs every write.
    pub fn start_with(
        server_bin: &str,
        store_dir: &Path,
        sync_always: bool,
    ) -> Result<Self, ServerError> {
        Self::start_configured(server_bin, store_dir, sync_always, "")
    }

    /// As [`start_with`](Self::start_with), with JetStream's file store limited to
    /// `max_store` bytes (what `athanor up` asks: a limit that does not depend on the
    /// disk space free at each start).
    pub fn start_bounded(
        server_bin: &str,
        store_dir: &Path,
        sync_always: bool,
        max_store: u64,
    ) -> Result<Self, ServerError> {
        Self::start_inner(server_bin, store_dir, sync_always, Some(max_store), "")
    }

    /// As [`start_with`](Self::start_with), with `extra_config` appended to the server's
    /// configuration file.
    pub fn start_configured(
        server_bin: &str,
        store_dir: &Path,
        sync_always: bool,
        extra_config: &str,
    ) -> Result<Self, ServerError> {
        Self::start_inner(server_bin, store_dir, sync_always, None, extra_config)
    }

    fn start_inner(
        server_bin: &str,
        store_dir: &Path,
        sync_always: bool,
        max_store: Option<u64>,
        extra_config: &str,
    ) -> Result<Self, ServerError> {
        let bin = find_server(server_bin)?;
        std::fs::create_dir_all(store_dir)
            .map_err(io(format!("cannot create {}", store_dir.display())))?;
        let port = free_port()?;
        let mut server = EmbeddedServer {
            bin,
            store_dir: store_dir.to_path_buf(),
            port,
            sync_always,
            max_store,
            extra_config: extra_config.to_string(),
            child: None,
            keeper: None,
        };
        server.stop_stale()?;
        server.spawn()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.store_dir.join("nats-server.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server as an operator would: SIGTERM, so that it writes out its state
    /// (the consumers' acknowledgements among it) before it exits; SIGKILL if it has
    /// not within 10 s. How `athanor up` stops it (dropping the server kills it).
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let Some(pid) = pid {
                let running = || matches!(child.try_wait(), Ok(None));
                if terminate(pid, Duration::from_secs(10), running) {
                    tracing::warn!("nats-server did not stop within 10 s of SIGTERM: killed it");
                }
            }
            // Gone by now (`terminate` waits for the exit); SIGKILL is for a pid that
            // could not be signalled.
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(self.pid_path());
        }
        self.keeper.take();
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(self.pid_path());
        }
        self.keeper.take();
    }

    fn pid_path(&self) -> PathBuf {
        self.store_dir.join("nats-server.pid")
    }

    /// Stops a server that an earlier process started on this store and left running
    /// (it was killed before it could stop it): the pid in `nats-server.pid`, if that
    /// process still runs this store's configuration. SIGTERM, then SIGKILL after 5 s.
    /// A server whose parent is a live `athanor` (this same program) is not stale: the
    /// store is in use, and starting is refused.
    fn stop_stale(&self) -> Result<(), ServerError> {
        let Some(pid) = std::fs::read_to_string(self.pid_path())
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            return Ok(());
        };
        let conf = self.store_dir.join("nats-server.conf");
        let ours = |pid: i32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == conf)
            })
        };
        let Some(process) = rustix::process::Pid::from_raw(pid).filter(|_| ours(pid)) else {
            return Ok(());
        };
        if let Some(parent) = live_owner(pid) {
            return Err(ServerError::InUse {
                store: self.store_dir.clone(),
                pid: parent,
            });
        }
        tracing::warn!(pid, store = %self.store_dir.display(), "a nats-server left running on this store by an earlier start: stopping it");
        terminate(process, Duration::from_secs(5), || ours(pid));
        Ok(())
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let conf = self.store_dir.join("nats-server.conf");
        let store = self.store_dir.join("jetstream");
        let sync = if self.sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let limit = self
            .max_store
            .map_or_else(String::new, |bytes| format!("\n  max_file_store: {bytes}"));
        let text = format!(
            "listen: \"127.0.0.1:{}\"\nserver_name: athanor_{}\njetstream {{\n  store_dir: {:?}{sync}{limit}\n}}\n{}\n",
            self.port,
            self.port,
            store.display().to_string(),
            self.extra_config
        );
        std::fs::write(&conf, text).map_err(io(format!("cannot write {}", conf.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("cannot open the server log"))?;
        let mut command = Command::new(&self.bin);
        command
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let (child, keeper) =
            spawn_kept(command).map_err(io(format!("cannot start {}", self.bin.display())))?;
        std::fs::write(self.pid_path(), child.id().to_string())
            .map_err(io("cannot write the server's pid file"))?;
        self.child = Some(child);
        self.keeper = Some(keeper);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(ServerError::Exited {
                    status,
                    log: self.log_path(),
                });
            }
            if Instant::now() > deadline {
                return Err(ServerError::NotListening { port: self.port });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM to `pid`, and SIGKILL if `running` still says so after `grace`; then waits
/// (5 s at most) until it does not. True when SIGKILL was needed.
fn terminate(
    pid: rustix::process::Pid,
    grace: Duration,
    mut running: impl FnMut() -> bool,
) -> bool {
    use rustix::process::{kill_process, Signal};
    let wait_until = |deadline: Instant, running: &mut dyn FnMut() -> bool| {
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let _ = kill_process(pid, Signal::TERM);
    wait_until(Instant::now() + grace, &mut running);
    if !running() {
        return false;
    }
    let _ = kill_process(pid, Signal::KILL);
    wait_until(Instant::now() + Duration::from_secs(5), &mut running);
    true
}

/// The parent of process `pid` when that parent is a live instance of this program
/// (an `athanor` that owns the server), from `/proc`.
fn live_owner(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: i32 = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let exe = std::fs::read_link(format!("/proc/{ppid}/exe")).ok()?;
    (ppid > 1 && std::env::current_exe().ok()? == exe).then_some(ppid)
}

/// Starts `command` from a thread of its own that stays until the returned sender is
/// dropped, with SIGKILL as the child's parent-death signal: the child dies when that
/// thread ends, and so when this process dies, however it dies.
fn spawn_kept(mut command: Command) -> std::io::Result<(Child, mpsc::Sender<()>)> {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // system calls (no allocation, no locks).
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                // The parent died between fork and prctl.
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (keep_tx, keep_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("nats-server-parent".into())
        .spawn(move || {
            let spawned = command.spawn();
            let ok = spawned.is_ok();
            let _ = started_tx.send(spawned);
            if ok {
                // Until the sender is dropped (recv then fails).
                let _ = keep_rx.recv();
            }
        })?;
    let child = started_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawning thread ended early"))??;
    Ok((child, keep_tx))
}

fn free_port() -> Result<u16, ServerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("no free port"))?;
    Ok(listener.local_addr().map_err(io("no free port"))?.port())
}

/// Finds a `nats-server` of at least [`MIN_SERVER_VERSION`]: `name` itself when it is a
/// path, else the first such binary on `PATH`.
pub fn find_server(name: &str) -> Result<PathBuf, ServerError> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|dir| dir.join(name))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut seen = Vec::new();
    for path in candidates {
        match server_version(&path) {
            Some(v) if v >= MIN_SERVER_VERSION => return Ok(path),
            Some((major, minor)) => seen.push(format!("{} is {major}.{minor}", path.display())),
            None => seen.push(format!("{} does not run", path.display())),
        }
    }
    Err(ServerError::NotFound {
        name: name.into(),
        seen: if seen.is_empty() {
            "none on PATH".to_string()
        } else {
            seen.join("; ")
        },
    })
}

fn server_version(path: &Path) -> Option<(u32, u32)> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.12.8"
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
