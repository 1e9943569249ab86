//! Command experiments: any program, in any language, declared in the worker's
//! configuration (`[[experiments]]`) — never a command line from a request.
//!
//! A run starts the program as a child in a process group of its own. Its config
//! arrives as JSON (`ATHANOR_CONFIG`, and the file named by `ATHANOR_CONFIG_FILE`);
//! stdout and stderr become log lines through the same buffer as `RunContext::log`
//! (the run's thread reads the pipes, and when the worker's output budget is full it
//! stops reading, so the child blocks rather than anything being dropped); results,
//! progress and levelled logs come as JSON lines on the pipe named by
//! `ATHANOR_EVENTS_FD`. The run ends with the child: exit 0 is `completed`, anything
//! else `failed` with the reason and the last stderr lines; a cancel sends SIGTERM to
//! the group, then SIGKILL after `worker.cancel_grace`.

mod events;
mod lines;
mod process;
mod spec;

use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use athanor_schemas::{ConfigSchema, Level};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::Signal;

pub use spec::{CommandSpec, DeclarationError, FieldSpec};

use crate::buffer::LINE_OVERHEAD;
use crate::config::WorkerConfig;
use crate::context::RunContext;
use crate::experiment::{Experiment, RunError};
use events::EventReader;
use lines::Lines;
use process::{Child, EventsPipe, Launch};

/// How long the run's thread sleeps in `poll` at most: how soon it notices a cancel.
const POLL_MAX: Duration = Duration::from_millis(50);
/// After the child exited and its group was killed, how long the pipes may stay open
/// with nothing to read (held by a process that left the group) before the run ends.
/// Time spent waiting on the output budget does not count, and a pipe is read after
/// the exit until end-of-file or for the bytes it held when the exit was seen — all
/// the child left in it — so what the child wrote is always read, and a process
/// outside the group that keeps writing cannot hold the run open.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// The most read from a pipe at once.
const READ_BYTES: usize = 256 << 10;
/// Stderr lines quoted in a failed run's error.
const STDERR_TAIL: usize = 10;
/// The most of each quoted stderr line.
const TAIL_LINE_CHARS: usize = 300;
/// Config JSON larger than this is passed in the file only (the kernel limits one
/// environment string to 128 KiB).
const MAX_CONFIG_ENV: usize = 64 << 10;

/// Builds the declared experiments, checking every declaration; `taken` holds the
/// names already in use (the built-ins).
pub fn declare(
    specs: &[CommandSpec],
    taken: &[&str],
    worker: &WorkerConfig,
) -> Result<Vec<Arc<dyn Experiment>>, DeclarationError> {
    Ok(spec::check_all(specs, taken)?
        .into_iter()
        .map(|checked| {
            Arc::new(CommandExperiment {
                checked,
                flush_interval: worker.flush_interval,
                cancel_grace: worker.cancel_grace,
                max_line_bytes: worker.max_line_bytes,
            }) as Arc<dyn Experiment>
        })
        .collect())
}

/// A program declared in the configuration, run as an experiment.
pub struct CommandExperiment {
    checked: spec::Checked,
    /// How often a progress line being redrawn is stored.
    flush_interval: Duration,
    /// How long after SIGTERM (timeout) the group gets SIGKILL.
    cancel_grace: Duration,
    max_line_bytes: usize,
}

impl Experiment for CommandExperiment {
    fn name(&self) -> &str {
        &self.checked.spec.name
    }

    fn description(&self) -> &str {
        &self.checked.spec.description
    }

    fn config_schema(&self) -> ConfigSchema {
        self.checked.schema.clone()
    }

    fn run(&self, ctx: &RunContext) -> Result<(), RunError> {
        let config = serde_json::to_string(ctx.config())?;
        let mut config_file = tempfile::Builder::new()
            .prefix("athanor-config-")
            .suffix(".json")
            .tempfile()
            .map_err(|e| format!("could not write the config file: {e}"))?;
        config_file.write_all(config.as_bytes())?;
        config_file.flush()?;
        let events = EventsPipe::new()?;
        let launch = self.launch(ctx, &config, config_file.path(), events.child_fd());
        let child = Child::spawn(&launch, events)
            .map_err(|e| format!("could not start {}: {e}", self.checked.program.display()))?;
        // If the run ignores cancellation past the grace (the thread blocked on a full
        // budget, say), the worker kills the group itself.
        ctx.on_stop(child.killer());
        let captured = self.capture(&child, ctx);
        // Before the reap: from then on the group id may be another's.
        ctx.clear_on_stop();
        let status = child.reap();
        drop(config_file);
        let status = status.map_err(|e| format!("could not collect the child's exit: {e}"))?;
        if captured.timed_out || status.success() {
            // A timeout failed the run already (declared when it struck).
            return Ok(());
        }
        let mut error = process::describe(status);
        if !captured.stderr_tail.is_empty() {
            error.push_str(if self.checked.spec.pty {
                "; last lines of output:\n"
            } else {
                "; last lines of stderr:\n"
            });
            error.push_str(&Vec::from(captured.stderr_tail).join("\n"));
        }
        Err(error.into())
    }
}

/// What the capture loop learned besides the output.
struct Captured {
    timed_out: bool,
    /// The last stderr lines (all output with a pseudo-terminal), SGR removed.
    stderr_tail: VecDeque<String>,
}

/// One output stream of the child.
struct Stream<'a> {
    fd: Option<&'a OwnedFd>,
    lines: Lines,
    level: Level,
    /// Its lines go into the error of a failed run.
    quoted: bool,
}

impl CommandExperiment {
    fn launch(
        &self,
        ctx: &RunContext,
        config: &str,
        config_file: &std::path::Path,
        events_fd: i32,
    ) -> Launch {
        let spec = &self.checked.spec;
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !spec.env.contains_key("PYTHONUNBUFFERED") {
            env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        }
        if spec.pty && !spec.env.contains_key("TERM") {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
        env.push(("ATHANOR_RUN_ID".into(), ctx.run_id().into()));
        env.push(("ATHANOR_EXPERIMENT".into(), ctx.experiment().into()));
        if config.len() <= MAX_CONFIG_ENV {
            env.push(("ATHANOR_CONFIG".into(), config.into()));
        }
        env.push((
            "ATHANOR_CONFIG_FILE".into(),
            config_file.to_string_lossy().into_owned(),
        ));
        env.push(("ATHANOR_EVENTS_FD".into(), events_fd.to_string()));
        Launch {
            program: self.checked.program.clone(),
            args: spec.command[1..].to_vec(),
            cwd: self.checked.cwd.clone(),
            env,
            pty: spec.pty,
        }
    }

    /// Reads the child's output until its pipes close after it exited, applying
    /// cancellation and the timeout on the way.
    fn capture(&self, child: &Child, ctx: &RunContext) -> Captured {
        let spec = &self.checked.spec;
        let mut streams = [
            Stream {
                fd: Some(&child.stdout),
                lines: Lines::new(self.max_line_bytes),
                level: spec.stdout_level,
                quoted: spec.pty,
            },
            Stream {
                fd: child.stderr.as_ref(),
                lines: Lines::new(self.max_line_bytes),
                level: spec.stderr_level,
                quoted: true,
            },
        ];
        let mut events_fd = Some(&child.events);
        let mut events = EventReader::new();
        let mut captured = Captured {
            timed_out: false,
            stderr_tail: VecDeque::new(),
        };
        let mut buf = Vec::with_capacity(READ_BYTES);
        let mut out = Vec::new();
        let started = Instant::now();
        let mut next_tick = started + self.flush_interval;
        // The child has exited (seen once; it is reaped after the loop).
        let mut exited = false;
        let mut term_at: Option<Instant> = None;
        let mut killed = false;
        // A process outside the child's group held its output open after it exited.
        let mut escaped = false;
        // When output was last read: the drain after the exit ends when it is quiet.
        let mut idle_since = Instant::now();
        // Bytes left to read from stdout, stderr and the events pipe once the exit
        // was seen: what they held then.
        let mut left = [usize::MAX; 3];
        loop {
            let open = streams.iter().any(|s| s.fd.is_some()) || events_fd.is_some();
            if exited && !open {
                break;
            }
            if exited && idle_since.elapsed() > DRAIN_LIMIT {
                escaped = true;
                break;
            }
            // Wait for output, the child's exit, or the next tick.
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(4);
            let mut which: Vec<usize> = Vec::with_capacity(4);
            for (i, stream) in streams.iter().enumerate() {
                if let Some(fd) = stream.fd {
                    fds.push(PollFd::new(fd, PollFlags::IN));
                    which.push(i);
                }
            }
            if let Some(fd) = events_fd {
                fds.push(PollFd::new(fd, PollFlags::IN));
                which.push(2);
            }
            if let (Some(pidfd), false) = (&child.pidfd, exited) {
                fds.push(PollFd::new(pidfd, PollFlags::IN));
                which.push(3);
            }
            let now = Instant::now();
            let wait = next_tick.saturating_duration_since(now).min(POLL_MAX);
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as i64,
            };
            let ready: Vec<usize> = match poll(&mut fds, Some(&timeout)) {
                Ok(_) => fds
                    .iter()
                    .zip(&which)
                    .filter(|(fd, _)| !fd.revents().is_empty())
                    .map(|(_, &w)| w)
                    .collect(),
                Err(rustix::io::Errno::INTR) => Vec::new(),
                Err(error) => {
                    if !exited {
                        // Nobody reads its pipes any more: it must not live on.
                        child.signal_group(Signal::KILL);
                    }
                    ctx.warn(format!(
                        "athanor: cannot wait on the child's output: {error}; the child was stopped"
                    ));
                    break;
                }
            };
            drop(fds);
            let read_any = ready.iter().any(|&w| w < 3);
            for w in ready {
                match w {
                    0 | 1 => {
                        let stream = &mut streams[w];
                        let fd = stream.fd.expect("polled only while open");
                        let (read, open) = read_child(fd, &mut buf, &mut left[w], &mut escaped);
                        stream.lines.push(read, &mut out);
                        if !open {
                            stream.fd = None;
                            stream.lines.finish(&mut out);
                        }
                        emit(ctx, stream, &mut out, &mut captured.stderr_tail);
                    }
                    2 => {
                        let fd = events_fd.expect("polled only while open");
                        let (read, open) = read_child(fd, &mut buf, &mut left[2], &mut escaped);
                        events.push(read, ctx);
                        if !open {
                            events_fd = None;
                            events.finish(ctx);
                        }
                    }
                    _ => {}
                }
            }
            if read_any {
                // After the reads: they may have waited on the budget for a while.
                idle_since = Instant::now();
            }
            if !exited && child.has_exited() {
                // The run is over: whatever the child left running in its group goes
                // too (the group id stays reserved until the child is reaped).
                child.signal_group(Signal::KILL);
                exited = true;
                idle_since = Instant::now();
                let fds = [
                    Some(&child.stdout),
                    child.stderr.as_ref(),
                    Some(&child.events),
                ];
                for (left, fd) in left.iter_mut().zip(fds) {
                    *left = fd.map_or(0, Child::unread);
                }
            }
            if !exited {
                if term_at.is_none() && ctx.cancelled() {
                    child.signal_group(Signal::TERM);
                    term_at = Some(Instant::now());
                }
                if let Some(limit) = spec
                    .timeout
                    .filter(|&t| term_at.is_none() && started.elapsed() >= t)
                {
                    ctx.fail(format!("timed out after {limit:?}"));
                    captured.timed_out = true;
                    child.signal_group(Signal::TERM);
                    term_at = Some(Instant::now());
                }
                if term_at.is_some_and(|at| !killed && at.elapsed() >= self.cancel_grace) {
                    child.signal_group(Signal::KILL);
                    killed = true;
                    ctx.warn(format!(
                        "athanor: the run ignored {} for {:?}; its processes were killed",
                        if captured.timed_out {
                            "the timeout's SIGTERM"
                        } else {
                            "cancellation"
                        },
                        self.cancel_grace
                    ));
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                for stream in &mut streams {
                    if let Some(line) = stream.lines.tick() {
                        out.push(line);
                        emit(ctx, stream, &mut out, &mut captured.stderr_tail);
                    }
                }
                next_tick = now + self.flush_interval;
            }
        }
        for stream in &mut streams {
            if stream.fd.take().is_some() {
                stream.lines.finish(&mut out);
                emit(ctx, stream, &mut out, &mut captured.stderr_tail);
            }
        }
        if events_fd.is_some() {
            events.finish(ctx);
        }
        if escaped {
            ctx.warn(
                "athanor: the child exited, but a process that left its process group still \
                 holds its output open; the run ended without reading it",
            );
        }
        captured
    }
}

/// Reads what `fd` holds: the bytes the child wrote, and whether the pipe stays open.
/// After the exit (`left` counts down what the pipe held then), bytes past `left`
/// come from a process outside the group: they are not taken, the pipe is given up
/// and `escaped` set.
fn read_child<'b>(
    fd: &OwnedFd,
    buf: &'b mut Vec<u8>,
    left: &mut usize,
    escaped: &mut bool,
) -> (&'b [u8], bool) {
    match process::read_some(fd.as_fd(), buf) {
        Ok(0) | Err(_) => (&[], false),
        Ok(n) => {
            let child_bytes = n.min(*left);
            *left -= child_bytes;
            if child_bytes < n {
                *escaped = true;
            }
            (&buf[..child_bytes], child_bytes == n)
        }
    }
}

/// Appends the stream's finished lines to the run's log in one go.
fn emit(ctx: &RunContext, stream: &Stream<'_>, out: &mut Vec<String>, tail: &mut VecDeque<String>) {
    if out.is_empty() {
        return;
    }
    if stream.quoted {
        for line in out.iter().rev().take(STDERR_TAIL).rev() {
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(plain(line));
        }
    }
    // In slices of at most a quarter of the worker's bound, so one read of short lines
    // never asks for more budget than the worker has.
    let level = stream.level;
    let slice_cost = (ctx.shared.buffer.budget().limit() / 4).max(1);
    let mut lines = out.drain(..).peekable();
    while lines.peek().is_some() {
        let mut cost = 0;
        let slice = std::iter::from_fn(|| {
            if cost >= slice_cost {
                return None;
            }
            let line = lines.next()?;
            cost += LINE_OVERHEAD + line.len();
            Some((level, line))
        });
        ctx.log_batch(slice);
    }
}

/// A line for an error message: SGR sequences removed, cut to a readable length.
fn plain(line: &str) -> String {
    let mut text = String::with_capacity(line.len().min(TAIL_LINE_CHARS));
    let mut rest = line;
    while let Some(start) = rest.find("\x1b[") {
        text.push_str(&rest[..start]);
        rest = &rest[start..];
        match rest.find('m') {
            Some(end) => rest = &rest[end + 1..],
            None => rest = "",
        }
    }
    text.push_str(rest);
    if text.chars().count() > TAIL_LINE_CHARS {
        text = text.chars().take(TAIL_LINE_CHARS).collect::<String>() + "…";
    }
    text
}
