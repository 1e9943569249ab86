//! The child process of a command experiment: started in a process group of its own
//! (or a session, with a pseudo-terminal), with a parent-death signal, and watched by
//! a tiny watchdog process that kills the whole group if the worker dies — so
//! `bash -c 'sleep 1000 & wait'` leaves nothing behind even after `kill -9` of the
//! worker.
//!
//! Everything here is Linux (process groups, `prctl`, pidfds); the calls made between
//! `fork` and `exec` are plain system calls, with no allocation and no locks.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use rustix::process::{Pid, Signal};

/// What to start.
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) cwd: PathBuf,
    /// Variables set on top of the worker's environment (minus Athanor's own).
    pub(crate) env: Vec<(String, String)>,
    pub(crate) pty: bool,
}

/// A running child and the ends of its pipes that the worker reads.
pub(crate) struct Child {
    child: std::process::Child,
    /// The child's process group (its pid): signals go to the whole group.
    pgid: Pid,
    /// Readable when the child has exited (not reaped yet); `None` on kernels
    /// without pidfds, where the exit is polled instead.
    pub(crate) pidfd: Option<OwnedFd>,
    /// stdout, or the pseudo-terminal's master (stdout and stderr together).
    pub(crate) stdout: OwnedFd,
    /// stderr; `None` with a pseudo-terminal.
    pub(crate) stderr: Option<OwnedFd>,
    /// The read end of the events pipe.
    pub(crate) events: OwnedFd,
    watchdog: Option<Watchdog>,
    reaped: bool,
}

/// Where the events pipe is in the child: its write end keeps its descriptor number.
pub(crate) struct EventsPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl EventsPipe {
    pub(crate) fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // Never 0-2 (a worker started with a standard stream closed): the child's
        // stdio is set up over those numbers before the pipe is kept open.
        let write = if write.as_raw_fd() < 3 {
            rustix::io::fcntl_dupfd_cloexec(&write, 3)?
        } else {
            write
        };
        Ok(EventsPipe { read, write })
    }

    /// The descriptor number the child finds the pipe at (`ATHANOR_EVENTS_FD`).
    pub(crate) fn child_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}

impl Child {
    /// Starts `launch` with the events pipe. Fails like `exec` does (not found, not
    /// executable) with the OS's reason.
    pub(crate) fn spawn(launch: &Launch, events: EventsPipe) -> io::Result<Child> {
        let mut command = Command::new(&launch.program);
        command.args(&launch.args).current_dir(&launch.cwd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ATHANOR_") {
                command.env_remove(&key);
            }
        }
        command.envs(
            launch
                .env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        let events_fd = events.write.as_raw_fd();
        let parent = rustix::process::getpid();
        let mut pty_master = None;
        if launch.pty {
            let (master, slave) = open_pty()?;
            command
                .stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            pty_master = Some(master);
        } else {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
        let pty = launch.pty;
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // system calls (no allocation, no locks).
        unsafe {
            command.pre_exec(move || {
                if pty {
                    // A session of its own, with the terminal as its controlling one.
                    rustix::process::setsid()?;
                    rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
                }
                // Dies with the thread that started it (the run's thread, which lives
                // until the child is reaped), and so with the worker.
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                if rustix::process::getppid() != Some(parent) {
                    // The worker died between fork and prctl.
                    libc::_exit(1);
                }
                // The events pipe survives exec, at the same number.
                if libc::fcntl(events_fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        // The parent's copies of the child's ends: closed now, or EOF never comes.
        drop(events.write);
        drop(command);
        let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
        let (stdout, stderr) = match pty_master {
            Some(master) => (master, None),
            None => (
                OwnedFd::from(child.stdout.take().expect("piped")),
                Some(OwnedFd::from(child.stderr.take().expect("piped"))),
            ),
        };
        for fd in std::iter::once(&stdout).chain(stderr.as_ref()) {
            // Fewer, larger reads when the child writes flat out; best effort.
            let _ = rustix::pipe::fcntl_setpipe_size(fd, 1 << 20);
        }
        let watchdog = match Watchdog::spawn(pid) {
            Ok(watchdog) => Some(watchdog),
            Err(error) => {
                tracing::warn!(%error, "no watchdog for the child's process group: if the worker is killed, its grandchildren may outlive it");
                None
            }
        };
        Ok(Child {
            pidfd: rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok(),
            child,
            pgid: pid,
            stdout,
            stderr,
            events: events.read,
            watchdog,
            reaped: false,
        })
    }

    /// Whether the child has exited; it stays a zombie (not reaped), so its process
    /// group id cannot be reused while the group is signalled.
    pub(crate) fn has_exited(&self) -> bool {
        use rustix::process::{waitid, WaitId, WaitIdOptions};
        matches!(
            waitid(
                WaitId::Pid(self.pgid),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
            ),
            Ok(Some(_))
        )
    }

    /// Sends `signal` to the child's whole process group.
    pub(crate) fn signal_group(&self, signal: Signal) {
        let _ = rustix::process::kill_process_group(self.pgid, signal);
    }

    /// A function that kills the whole group, for the worker to call when the run
    /// ignored cancellation past its grace. Harmless after the child is reaped: the
    /// run's thread disarms it first.
    pub(crate) fn killer(&self) -> impl Fn() + Send + Sync + 'static {
        let pgid = self.pgid;
        move || {
            let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
        }
    }

    /// Reaps the child (after it exited) and lets the watchdog go.
    pub(crate) fn reap(mut self) -> io::Result<ExitStatus> {
        self.reaped = true;
        // The watchdog goes first: until the child is reaped its group id stays taken,
        // so nothing can signal another process by that id.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.release();
        }
        self.child.wait()
    }

    /// How many bytes wait to be read from `fd` (a pipe or the terminal's master);
    /// as many as a pipe holds when the kernel does not say.
    pub(crate) fn unread(fd: &OwnedFd) -> usize {
        match rustix::io::ioctl_fionread(fd) {
            Ok(n) => n as usize,
            Err(_) => rustix::pipe::fcntl_getpipe_size(fd).unwrap_or(1 << 20),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Only when the run's thread leaves early (a panic before `reap`): nothing may
        // outlive the run.
        if !self.reaped {
            self.signal_group(Signal::KILL);
            let _ = self.child.wait();
            if let Some(watchdog) = self.watchdog.take() {
                watchdog.release();
            }
        }
    }
}

/// A process forked from the worker that waits on a pipe only the worker writes to.
/// When the worker exits for any reason, the pipe reads end-of-file and the watchdog
/// kills the child's process group; when the run ends normally, the worker writes
/// one byte first and the watchdog leaves quietly.
struct Watchdog {
    pid: libc::pid_t,
    /// The worker's end of the pipe.
    alive: OwnedFd,
}

impl Watchdog {
    fn spawn(pgid: Pid) -> io::Result<Watchdog> {
        let (read, alive) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let read_fd = read.as_raw_fd();
        let pgid = pgid.as_raw_nonzero().get();
        // SAFETY: the child branch makes only async-signal-safe system calls and ends
        // in `_exit`; it never returns into Rust code of the forked worker.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe { watchdog_main(read_fd, pgid) },
            pid => {
                drop(read);
                Ok(Watchdog { pid, alive })
            }
        }
    }

    fn release(self) {
        let _ = rustix::io::write(&self.alive, b"x");
        drop(self.alive);
        // SAFETY: waits for our own child; no memory is shared.
        unsafe {
            while libc::waitpid(self.pid, std::ptr::null_mut(), 0) == -1
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
        }
    }
}

/// The watchdog's whole life, in the forked child.
unsafe fn watchdog_main(read_fd: RawFd, pgid: libc::pid_t) -> ! {
    // Out of the worker's process group, so a ^C at the worker's terminal does not
    // take the watchdog down before the worker.
    libc::setpgid(0, 0);
    // Nothing of the worker's stays open here (the child's pipes above all, or their
    // readers would never see end-of-file).
    if read_fd != 0 {
        libc::dup2(read_fd, 0);
    }
    if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
        for fd in 1..65_536 {
            libc::close(fd);
        }
    }
    let mut byte = 0u8;
    let n = loop {
        let n = libc::read(0, (&mut byte as *mut u8).cast(), 1);
        if n == -1 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n != 1 {
        // End-of-file: the worker is gone.
        libc::kill(-pgid, libc::SIGKILL);
    }
    libc::_exit(0)
}

/// A pseudo-terminal: the master for the worker, the slave for the child.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    // A wide terminal, so progress bars are drawn at a useful width.
    let _ = rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: 50,
            ws_col: 160,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    );
    Ok((master, slave.into()))
}

/// How a child ended, in words: `exited with status 3`, `killed by signal 9 (SIGKILL)`.
pub(crate) fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.signal() {
        match signal_name(signal) {
            Some(name) => format!("killed by signal {signal} ({name})"),
            None => format!("killed by signal {signal}"),
        }
    } else {
        format!("ended: {status}")
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// Reads what is there from `fd` into `buf` (cleared first); `Ok(0)` at end-of-file.
/// A pseudo-terminal's master reports the end as `EIO`.
pub(crate) fn read_some(fd: impl AsFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let spare = buf.spare_capacity_mut();
    loop {
        match rustix::io::read(&fd, &mut *spare) {
            Ok((filled, _)) => {
                let n = filled.len();
                // SAFETY: `read` initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(n) };
                return Ok(n);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::IO) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}
