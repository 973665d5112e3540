//! Process helpers: detached spawning, liveness checks that make sure a PID
//! still belongs to our binary, and bounded TERM-then-KILL.

use anyhow::{Context, Result};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::state::Component;

/// Starts `binary <name> <args>` in its own process group (so it outlives
/// `cargo xtask` and a terminal's Ctrl-C), stdin from /dev/null, stdout and
/// stderr appended to `log`.
pub fn spawn_detached(
    binary: &Path,
    name: &str,
    args: &[String],
    log: &Path,
    envs: &[(&str, String)],
) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    cmd.arg(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {name} ({})", binary.display()))
}

/// Reads `/proc/<pid>/stat`'s state letter (`None` if there is no such process).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Whether `pid` is a live (not zombie) process running our multicall binary
/// as component `name`.
pub fn is_ours(pid: u32, name: &str) -> bool {
    if pid == 0 {
        return false;
    }
    match proc_state(pid) {
        None | Some('Z') | Some('X') => return false,
        Some(_) => {}
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let argv0 = args.next().unwrap_or_default();
    let argv1 = args.next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    base == b"kuwa-localcluster" && argv1 == name.as_bytes()
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Stops the given components: SIGTERM to each one that is still ours, wait
/// up to `grace`, then SIGKILL and wait a little more. Returns the names of
/// any that still run (should be none).
pub fn stop(components: &[&Component], grace: Duration) -> Vec<String> {
    let live: Vec<&Component> = components
        .iter()
        .copied()
        .filter(|c| is_ours(c.pid, &c.name))
        .collect();
    for c in &live {
        signal(c.pid, rustix::process::Signal::TERM);
    }
    if wait_gone(&live, grace) {
        return Vec::new();
    }
    for c in &live {
        if is_ours(c.pid, &c.name) {
            eprintln!(
                "  {} (pid {}) did not stop after {:?}; killing it",
                c.name, c.pid, grace
            );
            signal(c.pid, rustix::process::Signal::KILL);
        }
    }
    wait_gone(&live, Duration::from_secs(5));
    live.iter()
        .filter(|c| is_ours(c.pid, &c.name))
        .map(|c| c.name.clone())
        .collect()
}

fn wait_gone(live: &[&Component], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if live.iter().all(|c| !is_ours(c.pid, &c.name)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The executables of all running processes we can see (`/proc/<pid>/exe`).
pub fn executables_in_use() -> std::collections::HashSet<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .collect()
}

/// A free loopback TCP port (bound, then released for the component to take).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("binding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

/// Whether 127.0.0.1:`port` can be bound right now.
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
