//! Server processes of a benchmark and their CPU time.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// User + system CPU time of process `pid` (all its threads, live and
/// exited), from `/proc/PID/stat` (`utime` + `stime`, in clock ticks).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // fields are counted after the last ')'. utime and stime are fields
    // 14 and 15, i.e. the 12th and 13th after the ')'.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Busy CPU time of the whole machine (all CPUs: user, nice, system, irq,
/// softirq, steal), in clock ticks, from `/proc/stat`.
pub fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    Ok([0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// A process the benchmark measures, by name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

/// CPU ticks of every watched process, of this process and of the whole
/// machine at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    pub procs: Vec<u64>,
    pub own: u64,
    pub machine: u64,
}

impl CpuSample {
    pub fn take(procs: &[Watched]) -> Result<CpuSample> {
        Ok(CpuSample {
            procs: procs
                .iter()
                .map(|p| cpu_ticks(p.pid).with_context(|| format!("CPU time of {}", p.name)))
                .collect::<Result<Vec<_>>>()?,
            own: cpu_ticks(std::process::id())?,
            machine: machine_busy_ticks()?,
        })
    }

    /// Seconds of CPU used on the machine between `self` and `later` by
    /// anything other than the watched processes and this one (other
    /// work disturbing the measurement).
    pub fn others_until(&self, later: &CpuSample) -> f64 {
        let hz = clock_ticks_per_s() as f64;
        let total = later.machine.saturating_sub(self.machine) as f64;
        let watched: u64 = self
            .procs
            .iter()
            .zip(&later.procs)
            .map(|(a, b)| b.saturating_sub(*a))
            .sum();
        let own = later.own.saturating_sub(self.own);
        (total - watched as f64 - own as f64).max(0.0) / hz
    }

    /// Seconds of CPU per process between `self` (earlier) and `later`.
    pub fn seconds_until(&self, later: &CpuSample) -> Vec<f64> {
        let hz = clock_ticks_per_s() as f64;
        self.procs
            .iter()
            .zip(&later.procs)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / hz)
            .collect()
    }
}

/// A child process, killed (SIGKILL) and reaped on drop; its stdout and
/// stderr go to a log file.
pub struct Server {
    pub name: String,
    pub log: PathBuf,
    /// The command line, for the report.
    pub command: String,
    child: Option<Child>,
}

/// Shell-style quoting of one argument, for printing command lines.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a server is ready for.
pub enum Ready<'a> {
    /// A unix socket exists at this path.
    Socket(&'a Path),
    /// A TCP port accepts connections.
    Tcp(SocketAddr),
    /// A unix socket exists at this path and is not the file `old` (the
    /// socket a killed predecessor left behind; see [`file_id`]).
    NewSocket(&'a Path, Option<FileId>),
}

/// Which file a path names: inode and change time (an inode number alone
/// may be reused by the next file created).
pub type FileId = (u64, i64, i64);

/// The identity of the file at `path`, if any (see [`Ready::NewSocket`]).
pub fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Sends `signal` to process `pid`; false if it does not exist (any more).
pub fn send_signal(pid: u32, signal: libc::c_int) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: kill(2) has no memory arguments; `pid` is a positive pid of a
    // child this program started (never 0 or -1, which address groups).
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

impl Server {
    /// Starts `program args…` with its output in `log` and waits until it
    /// is `ready` (15 s at most).
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[String],
        log: &Path,
        ready: Ready<'_>,
    ) -> Result<Server> {
        Self::start(name, program, args, log, false, ready)
    }

    /// Like [`Server::spawn`] for a server that is killed and started again:
    /// its log is appended to (a restarted server keeps its earlier
    /// output), and it gets SIGKILL when the thread that started it exits
    /// (`PR_SET_PDEATHSIG`: a run killed midway leaves no server behind), so
    /// start it from a thread that outlives it.
    pub fn spawn_restartable(
        name: &str,
        program: &str,
        args: &[String],
        log: &Path,
        ready: Ready<'_>,
    ) -> Result<Server> {
        Self::start(name, program, args, log, true, ready)
    }

    fn start(
        name: &str,
        program: &str,
        args: &[String],
        log: &Path,
        restartable: bool,
        ready: Ready<'_>,
    ) -> Result<Server> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(restartable)
            .truncate(!restartable)
            .open(log)
            .with_context(|| format!("{}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if restartable {
            // SAFETY: the closure runs in the child between fork and exec
            // and only calls prctl(2), which is async-signal-safe and takes
            // no pointers.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {program}"))?;
        let command = std::iter::once(program.to_string())
            .chain(args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut s = Server {
            name: name.to_string(),
            log: log.to_path_buf(),
            command,
            child: Some(child),
        };
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = match &ready {
                Ready::Socket(p) => std::fs::metadata(p)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false),
                Ready::NewSocket(p, old) => std::fs::metadata(p)
                    .map(|m| m.file_type().is_socket() && file_id(p) != *old)
                    .unwrap_or(false),
                Ready::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_millis(100)).is_ok(),
            };
            if ok {
                return Ok(s);
            }
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "{name} exited ({status}): {}\n{}",
                        s.command,
                        s.log_tail(30)
                    );
                }
            }
            if Instant::now() > until {
                bail!("{name} did not become ready: {}", s.command);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn watched(&self) -> Watched {
        Watched {
            name: self.name.clone(),
            pid: self.pid(),
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its exit status if it exited (it is then reaped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM, …) to it.
    pub fn signal(&mut self, signal: libc::c_int) -> bool {
        if self.exited().is_some() {
            return false;
        }
        send_signal(self.pid(), signal)
    }

    /// Waits up to `timeout` for it to exit; its status, or `None` if it is
    /// still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9` and reap it; its status.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates `path` as a `size`-byte file with every block allocated
/// (`fallocate`, mode 0).
pub fn preallocated_file(path: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: fallocate on a file descriptor we own, no memory arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("fallocate {} bytes for {}", size, path.display()));
    }
    f.sync_all()?;
    Ok(())
}
