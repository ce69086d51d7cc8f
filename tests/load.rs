//! A closed-loop HTTP/1.1 load generator for the benchmarks: `connections` kept-alive
//! connections, each sending its next request as soon as the last answer is read, every
//! request timed on the monotonic clock from its first byte written to its last byte read.
//!
//! Why not wrk: against workerd, wrk's latency histogram reports more time than the run
//! lasted (with one connection, a mean of 4.6 ms at 3,500 requests/s), so its tail
//! percentiles are not answers' latencies; a plain client timing each request reads the same
//! server's p99 as 0.5 ms. Every run here checks itself the same way (Little's law: the mean
//! latency times the request rate is the number of connections, less the client's own time).
//!
//! The client is deliberately small (blocking sockets, one thread per connection, requests
//! built once up front) so its own cost per request is the same for every route measured.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadRun {
    /// Answers read in full.
    pub answers: u64,
    /// Answers whose status was not 2xx.
    pub non_2xx: u64,
    /// Connections that failed (reset, timeout, malformed answer); each is reopened.
    pub transport_errors: u64,
    /// Every answer's latency in milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
}

impl LoadRun {
    fn empty(elapsed: Duration) -> LoadRun {
        LoadRun {
            answers: 0,
            non_2xx: 0,
            transport_errors: 0,
            latencies_ms: Vec::new(),
            elapsed,
        }
    }

    /// Adds `other`'s answers, errors and latencies (unsorted), not its time.
    fn add(&mut self, other: LoadRun) {
        self.answers += other.answers;
        self.non_2xx += other.non_2xx;
        self.transport_errors += other.transport_errors;
        self.latencies_ms.extend(other.latencies_ms);
    }

    pub fn rps(&self) -> f64 {
        self.answers as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[i]
    }

    pub fn mean_ms(&self) -> f64 {
        self.latencies_ms.iter().sum::<f64>() / self.latencies_ms.len().max(1) as f64
    }

    /// Little's law: the connections busy on average (mean latency × rate). At most the
    /// number of connections; the rest of each connection's time is the client's own work.
    pub fn busy_connections(&self) -> f64 {
        self.mean_ms() / 1000.0 * self.rps()
    }
}

/// A GET request's bytes, with `headers` (name, value) after `Host`.
pub fn get_request(port: u16, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        r += &format!("{k}: {v}\r\n");
    }
    r += "\r\n";
    r.into_bytes()
}

/// Runs `connections` connections against `port` for `duration`, each sending `requests` in
/// turn (connection `c` starts at request `c`, so they interleave), and returns the figures.
pub fn closed_loop(
    port: u16,
    connections: usize,
    duration: Duration,
    requests: &[Vec<u8>],
) -> io::Result<LoadRun> {
    if requests.is_empty() || connections == 0 {
        return Err(io::Error::other(
            "a load run needs requests and connections",
        ));
    }
    run_connections(port, connections, duration, requests, None).map(|(run, _)| run)
}

/// `connections` connections for `duration`, back to back or each on its share of a schedule
/// of one request every `interval` / `connections`; returns the merged run and the requests
/// sent late.
fn run_connections(
    port: u16,
    connections: usize,
    duration: Duration,
    requests: &[Vec<u8>],
    interval: Option<Duration>,
) -> io::Result<(LoadRun, u64)> {
    let started = Instant::now();
    let deadline = started + duration;
    let per_connection: Vec<io::Result<(LoadRun, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                // connection c's requests fall between the others', evenly
                let schedule = interval.map(|interval| Schedule {
                    first_due: started + interval.mul_f64(c as f64 / connections as f64),
                    interval,
                });
                s.spawn(move || {
                    let mut late = 0;
                    let run = connection_loop(
                        port,
                        deadline,
                        requests,
                        c,
                        connections,
                        schedule.map(|schedule| (schedule, &mut late)),
                    )?;
                    Ok((run, late))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a load connection panicked")))
            })
            .collect()
    });
    let mut run = LoadRun::empty(started.elapsed());
    let mut late = 0;
    for r in per_connection {
        let (r, l) = r?;
        run.add(r);
        late += l;
    }
    run.latencies_ms.sort_by(f64::total_cmp);
    Ok((run, late))
}

/// Runs several request sets ("routes") against `port` in turns of `slice` each, `rounds`
/// times over, and returns one merged run per route. Taking turns spreads whatever else the
/// machine does over every route alike, so their ratios hold on a noisy machine where runs
/// one after the other would each catch different interference.
pub fn interleaved(
    port: u16,
    connections: usize,
    slice: Duration,
    rounds: u32,
    routes: &[Vec<Vec<u8>>],
) -> io::Result<Vec<LoadRun>> {
    let merged = take_turns(rounds, routes, |route| {
        closed_loop(port, connections, slice, route).map(|run| PacedRun { run, late: 0 })
    })?;
    Ok(merged.into_iter().map(|p| p.run).collect())
}

/// `rounds` turns over `routes`, each run by `run`; one merged run per route.
fn take_turns(
    rounds: u32,
    routes: &[Vec<Vec<u8>>],
    mut run: impl FnMut(&[Vec<u8>]) -> io::Result<PacedRun>,
) -> io::Result<Vec<PacedRun>> {
    let mut merged: Vec<PacedRun> = routes
        .iter()
        .map(|_| PacedRun {
            run: LoadRun::empty(Duration::ZERO),
            late: 0,
        })
        .collect();
    for _ in 0..rounds {
        for (route, total) in routes.iter().zip(merged.iter_mut()) {
            let p = run(route)?;
            total.run.elapsed += p.run.elapsed;
            total.run.add(p.run);
            total.late += p.late;
        }
    }
    for p in &mut merged {
        p.run.latencies_ms.sort_by(f64::total_cmp);
    }
    Ok(merged)
}

/// An open-loop run: `connections` kept-alive connections send `requests` at `rate` requests
/// per second in all, each connection on a fixed schedule of its own (its share of the rate,
/// offset from the others'), whatever the answers take. A closed loop at full speed keeps the
/// server saturated, so its latencies are queueing, and comparing two routes' compares their
/// throughputs; at a rate the server carries, a latency is what an answer takes under load.
/// Latencies are timed from each request's first byte written, as in [`closed_loop`], so they
/// leave out how late a request left: one sent more than half its connection's interval after
/// its due time (the connection still waited for an answer, or the client's thread woke late)
/// is counted in [`PacedRun::late`].
pub fn paced(
    port: u16,
    connections: usize,
    rate: f64,
    duration: Duration,
    requests: &[Vec<u8>],
) -> io::Result<PacedRun> {
    if requests.is_empty() || connections == 0 || !(rate.is_finite() && rate > 0.0) {
        return Err(io::Error::other(
            "a paced run needs requests, connections and a rate",
        ));
    }
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    run_connections(port, connections, duration, requests, Some(interval))
        .map(|(run, late)| PacedRun { run, late })
}

/// What a [`paced`] run measured.
#[derive(Debug, Clone)]
pub struct PacedRun {
    pub run: LoadRun,
    /// Requests sent more than half an interval after their due time (their connection still
    /// waited for an answer, or the client's thread woke late).
    pub late: u64,
}

/// [`interleaved`] for [`paced`] runs: the routes take turns of `slice`, `rounds` times.
pub fn interleaved_paced(
    port: u16,
    connections: usize,
    rate: f64,
    slice: Duration,
    rounds: u32,
    routes: &[Vec<Vec<u8>>],
) -> io::Result<Vec<PacedRun>> {
    take_turns(rounds, routes, |route| {
        paced(port, connections, rate, slice, route)
    })
}

/// When a paced connection's requests are due.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    first_due: Instant,
    interval: Duration,
}

/// Connections failing in a row before the run gives up (the server is gone).
const MAX_CONSECUTIVE_FAILURES: u32 = 20;

/// One connection's requests until `deadline`: back to back, or on `paced`'s schedule
/// (counting the requests sent late).
fn connection_loop(
    port: u16,
    deadline: Instant,
    requests: &[Vec<u8>],
    first: usize,
    step: usize,
    mut paced: Option<(Schedule, &mut u64)>,
) -> io::Result<LoadRun> {
    let mut run = LoadRun::empty(Duration::ZERO);
    run.latencies_ms.reserve(64 * 1024);
    let mut next = first % requests.len();
    let mut conn: Option<Conn> = None;
    let mut failures = 0;
    let mut sent_count: u32 = 0;
    while Instant::now() < deadline {
        if let Some((schedule, late)) = paced.as_mut() {
            let due = schedule.first_due + schedule.interval * sent_count;
            if due >= deadline {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > schedule.interval / 2 {
                **late += 1;
            }
            sent_count += 1;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(Conn::open(port)?),
        };
        let sent = Instant::now();
        match c.exchange(&requests[next]) {
            Ok(answer) => {
                run.latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                run.answers += 1;
                if !(200..300).contains(&answer.status) {
                    run.non_2xx += 1;
                }
                if answer.close {
                    conn = None;
                }
                failures = 0;
            }
            Err(_) => {
                run.transport_errors += 1;
                conn = None;
                failures += 1;
                if failures >= MAX_CONSECUTIVE_FAILURES {
                    return Err(io::Error::other(format!(
                        "{failures} connections to port {port} failed in a row"
                    )));
                }
            }
        }
        next = (next + step) % requests.len();
    }
    Ok(run)
}

#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    /// The server will close the connection after this answer.
    pub close: bool,
}

/// One kept-alive connection and the bytes read past the last answer.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(port: u16) -> io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Writes one request and reads its whole answer.
    pub fn exchange(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.stream.write_all(request)?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| io::Error::other("an answer's head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("no status line"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
        self.buf.drain(..head_end);
        if chunked {
            self.skip_chunked()?;
        } else if let Some(n) = length {
            while self.buf.len() < n {
                self.fill()?;
            }
            self.buf.drain(..n);
        } else {
            // neither: the body runs to the end of the connection
            while self.fill().is_ok() {}
            self.buf.clear();
            close = true;
        }
        Ok(Answer { status, close })
    }

    fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                self.fill()?;
            };
            let size_text = std::str::from_utf8(&self.buf[..line_end])
                .map_err(|_| io::Error::other("a chunk size is not text"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::other("a chunk size is not hex"))?;
            // the size line, the chunk and its CRLF; the last chunk ends with an empty line
            let need = line_end + 2 + size + 2;
            while self.buf.len() < need {
                self.fill()?;
            }
            self.buf.drain(..need);
            if size == 0 {
                return Ok(());
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server answering three ways in turn: with a length, chunked, and 404 then closing.
    fn serve(listener: TcpListener) {
        let answers: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ];
        let mut n = 0;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            // else Nagle holds each answer's second part for the client's delayed ACK
            let _ = s.set_nodelay(true);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            'connection: loop {
                while let Some(i) = find(&buf, b"\r\n\r\n") {
                    buf.drain(..i + 4);
                    let a = answers[n % 3];
                    n += 1;
                    // written in two parts, as servers write head and body
                    let _ = s.write_all(&a[..a.len() / 2]);
                    let _ = s.write_all(&a[a.len() / 2..]);
                    if n % 3 == 0 {
                        break 'connection;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
        }
    }

    #[test]
    fn reads_length_chunked_and_closing_answers_and_reopens() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || serve(listener));
        let reqs = vec![get_request(port, "/", &[("authorization", "Bearer x")])];
        let run = closed_loop(port, 1, Duration::from_millis(300), &reqs).expect("run");
        assert!(run.answers >= 30, "{run:?}");
        assert_eq!(run.transport_errors, 0, "{run:?}");
        // every third answer is the 404
        let third = run.answers / 3;
        assert!(run.non_2xx >= third && run.non_2xx <= third + 1, "{run:?}");
        assert!(run.busy_connections() <= 1.0 + 1e-9, "{run:?}");
    }
}
