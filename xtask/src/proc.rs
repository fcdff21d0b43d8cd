//! Long-running children of the `serve` and `rpc` stages (llama-server, rpc-server): each in its own process
//! group, its output in a log file, killed with its whole group when the guard drops, so a failing stage
//! leaves nothing behind. Where `setpriv` exists the child also dies with xtask (`--pdeathsig KILL`), which
//! covers xtask itself being killed.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::log;

/// The running stage's deadline and name (`serve`, `rpc`): every wait of those stages (server start-up,
/// each HTTP read, each client run) ends by it, so a hung process fails the stage, whose guards then kill
/// every process, instead of hanging it.
static DEADLINE: Mutex<Option<(Instant, &'static str, Duration)>> = Mutex::new(None);

/// `d`, cut to what is left before the stage's deadline (if one is set); an error once it has passed.
pub fn bounded(d: Duration) -> Result<Duration> {
    let Some((t, what, limit)) = *DEADLINE.lock().unwrap_or_else(|p| p.into_inner()) else {
        return Ok(d);
    };
    let left = t.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(10) {
        bail!(
            "the {what} stage ran past its limit of {} s",
            limit.as_secs()
        );
    }
    Ok(d.min(left))
}

/// `e`, said to come from the stage's limit when the deadline has passed (a read that timed out then
/// reports only "Resource temporarily unavailable").
pub fn note_deadline(e: anyhow::Error) -> anyhow::Error {
    match *DEADLINE.lock().unwrap_or_else(|p| p.into_inner()) {
        Some((t, what, limit)) if Instant::now() + Duration::from_secs(1) >= t => {
            e.context(format!(
                "the {what} stage ran past its limit of {} s",
                limit.as_secs()
            ))
        }
        _ => e,
    }
}

/// Sets the stage's deadline while alive.
pub struct DeadlineGuard;

impl DeadlineGuard {
    /// `XTASK_STAGE_LIMIT_S` replaces `limit` (to see a stage fail at its limit).
    pub fn set(what: &'static str, limit: Duration) -> DeadlineGuard {
        let limit = std::env::var("XTASK_STAGE_LIMIT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(limit, Duration::from_secs);
        *DEADLINE.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + limit, what, limit));
        DeadlineGuard
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        *DEADLINE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A child process (and its process group) that is killed when dropped.
pub struct Spawned {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Spawned {
    /// Starts `program args…` with `envs` (on top of `base`'s environment) in a new process group; stdout and
    /// stderr go to `log`.
    pub fn start(base: &Command, name: &str, log_path: &Path) -> Result<Spawned> {
        let mut c = dying_with_xtask(base);
        if let Some(parent) = log_path.parent() {
            fs::create_dir_all(parent)?;
        }
        let out = File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let err = out.try_clone()?;
        log!(
            "start {name}: {}  (log: {})",
            crate::util::display_cmd(base),
            log_path.display()
        );
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", crate::util::display_cmd(base)))?;
        Ok(Spawned {
            child: Some(child),
            name: name.to_string(),
            log: log_path.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Resident set size in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> Option<u64> {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The last `n` lines of the log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; an error if it does not exit in time (the
    /// guard then kills the group).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.pid();
        signal("TERM", &pid.to_string());
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.child = None;
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} (pid {pid}) did not exit within {:.0} s of SIGTERM",
            self.name,
            timeout.as_secs_f64()
        )
    }

    /// Kills the whole process group now (SIGKILL) and reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The child leads its own group (process_group(0)): `kill -KILL -- -<pgid>` reaches all of it.
            signal("KILL", &format!("-{}", c.id()));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.child.is_some() {
            log!(
                "stopping {} (pid {}) and its process group",
                self.name,
                self.pid()
            );
        }
        self.kill();
    }
}

/// A copy of `base` (program, arguments, environment, directory) that, where `setpriv` exists, is
/// killed when xtask dies.
fn dying_with_xtask(base: &Command) -> Command {
    let mut c = if crate::util::which("setpriv").is_some() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"])
            .arg(base.get_program())
            .args(base.get_args());
        c
    } else {
        let mut c = Command::new(base.get_program());
        c.args(base.get_args());
        c
    };
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = base.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

/// Runs `base` to completion like `Command::output`, but in its own process group (and, where `setpriv`
/// exists, dying with xtask), killed with its whole group if it runs past `timeout`.
pub fn output_bounded(base: &Command, timeout: Duration) -> Result<std::process::Output> {
    let timeout = bounded(timeout)?;
    let mut c = dying_with_xtask(base);
    let line = crate::util::display_cmd(base);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {line}"))?;
    let pid = child.id();
    // Both pipes drained on their own threads (a full pipe would stall the child).
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() >= timeout {
            signal("KILL", &format!("-{pid}"));
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{line}` did not finish within {:.0} s: killed with its process group",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts connections on 127.0.0.1:`port` (or the child exits / time runs out).
pub fn wait_port(p: &mut Spawned, port: u16, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if !p.alive() {
            bail!("{} exited during start-up:\n{}", p.name, p.log_tail(30));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{} did not listen on port {port} within {:.0} s:\n{}",
        p.name,
        timeout.as_secs_f64(),
        p.log_tail(30)
    )
}

// ---------------------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request per connection (`Connection: close`), bodies with Content-Length,
// chunked transfer encoding, or up to EOF.

pub struct Response {
    pub status: u16,
    reader: io::BufReader<TcpStream>,
    body: BodyKind,
}

enum BodyKind {
    Chunked { done: bool },
    Length(usize),
    ToEof { done: bool },
}

/// Sends one request and reads the status line and headers.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: */*\r\n"
    );
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b.as_bytes())?;
    }
    let mut reader = io::BufReader::new(s);
    let status_line = read_line(&mut reader)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        let l = read_line(&mut reader)?;
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            }
        }
    }
    let body = if chunked {
        BodyKind::Chunked { done: false }
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        BodyKind::ToEof { done: false }
    };
    Ok(Response {
        status,
        reader,
        body,
    })
}

fn read_line(r: &mut impl io::BufRead) -> Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        bail!("connection closed in the middle of the headers");
    }
    Ok(l.trim_end_matches(['\r', '\n']).to_string())
}

impl Response {
    /// The next piece of the decoded body; None at its end.
    pub fn next_piece(&mut self) -> Result<Option<Vec<u8>>> {
        match &mut self.body {
            BodyKind::Chunked { done } => {
                if *done {
                    return Ok(None);
                }
                let size_line = read_line(&mut self.reader)?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("bad chunk size {size_line:?}"))?;
                if size == 0 {
                    // Trailers up to the empty line.
                    while !read_line(&mut self.reader)?.is_empty() {}
                    *done = true;
                    return Ok(None);
                }
                let mut buf = vec![0u8; size];
                self.reader.read_exact(&mut buf)?;
                let mut crlf = [0u8; 2];
                self.reader.read_exact(&mut crlf)?;
                Ok(Some(buf))
            }
            BodyKind::Length(left) => {
                if *left == 0 {
                    return Ok(None);
                }
                let mut buf = vec![0u8; (*left).min(1 << 16)];
                let n = self.reader.read(&mut buf)?;
                if n == 0 {
                    bail!("connection closed with {left} body bytes missing");
                }
                buf.truncate(n);
                *left -= n;
                Ok(Some(buf))
            }
            BodyKind::ToEof { done } => {
                if *done {
                    return Ok(None);
                }
                let mut buf = vec![0u8; 1 << 16];
                let n = self.reader.read(&mut buf)?;
                if n == 0 {
                    *done = true;
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }

    /// The whole decoded body.
    pub fn body(mut self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(p) = self.next_piece()? {
            all.extend_from_slice(&p);
        }
        Ok(all)
    }

    /// Server-sent events: calls `f` with the payload of each `data:` line until `f` returns false or the
    /// body ends. Returns whether `f` stopped the reading.
    pub fn sse(&mut self, mut f: impl FnMut(&str) -> Result<bool>) -> Result<bool> {
        let mut pending: Vec<u8> = Vec::new();
        while let Some(p) = self.next_piece()? {
            pending.extend_from_slice(&p);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                if let Some(data) = line.strip_prefix("data:")
                    && !f(data.trim_start())?
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// Serves one canned response to one connection (after reading the request head and body).
    fn serve_once(resp: Vec<u8>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            let mut s = s;
            s.write_all(&resp).unwrap();
        });
        port
    }

    #[test]
    fn chunked_server_sent_events() {
        let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in [
            "data: {\"a\":1}\r",
            "\n\n",
            "data: {\"a\":2}\n\ndata:",
            " [x",
        ] {
            resp.extend_from_slice(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes());
        }
        resp.extend_from_slice(b"0\r\n\r\n");
        let port = serve_once(resp);
        let mut r = request(port, "POST", "/x", Some("{}"), Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        let mut got = Vec::new();
        let stopped = r
            .sse(|d| {
                got.push(d.to_string());
                Ok(true)
            })
            .unwrap();
        assert!(!stopped);
        assert_eq!(got, vec!["{\"a\":1}", "{\"a\":2}"]);
    }

    #[test]
    fn content_length_body() {
        let port = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        );
        let r = request(port, "GET", "/health", None, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body().unwrap(), b"hello");
    }
}
