//! Just enough HTTP/1.1 for the admin port: parse a request head read
//! within bounds, write a response within a deadline, and a minimal client
//! (`get`, `request`) for the tools and tests. Knows nothing of the server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest request head (request line + headers) read.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;

/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

/// Parse the head of an HTTP/1.x request; `None` when malformed.
pub(super) fn parse_head(head: &str) -> Option<Request<'_>> {
    // A line ends at "\n", with or without "\r" (read_head accepts both).
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || method.is_empty()
        || !target.starts_with('/')
        || line.bytes().any(|b| b.is_ascii_control())
    {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method,
        path,
        query,
    })
}

/// Fuzzing entry point (fuzz/ and tests/fuzz_corpus.rs), not an API: what
/// `handle` makes of a received head — at most [`REQUEST_BYTES_MAX`] bytes,
/// UTF-8, parsed — as (method, path, query, the query's value of `key`).
#[doc(hidden)]
pub fn fuzz_request_head<'a>(
    head: &'a [u8],
    key: &str,
) -> Option<(&'a str, &'a str, &'a str, Option<&'a str>)> {
    let head = std::str::from_utf8(&head[..head.len().min(REQUEST_BYTES_MAX)]).ok()?;
    let r = parse_head(head)?;
    Some((r.method, r.path, r.query, query_param(r.query, key)))
}

pub(super) fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Read the request head (until an empty line), bounded in size and time.
pub(super) fn read_head(stream: &mut TcpStream) -> Option<String> {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut n = 0;
    while n < buf.len() {
        // Each read waits only for what is left of the whole request's
        // time, so a trickling or idle client holds a handler at most
        // READ_TIMEOUT in all.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                    || buf[..n].windows(2).any(|w| w == b"\n\n")
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8(buf[..n].to_vec()).ok()
}

pub(super) fn write_response(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    // One deadline for the whole response: a client that reads a few bytes
    // at a time cannot hold a handler longer than WRITE_TIMEOUT.
    let deadline = Instant::now() + WRITE_TIMEOUT;
    for part in [head.as_bytes(), body] {
        let mut rest = part;
        while !rest.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            stream.set_write_timeout(Some(left))?;
            match stream.write(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    stream.flush()
}

/// Longest time one response may take to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the client waits for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The one HTTP client of the crate and its tools (`beast cache purge`,
/// `beast trace`, beast-top, beast-bench `--admin`, the tests): a GET,
/// returning (status code, body). Every error names `addr` and `path`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    request("GET", addr, path, timeout)
}

/// A request without a body (GET, POST) over HTTP/1.1 with
/// `Connection: close`: connects within [`CONNECT_TIMEOUT`], then each
/// write and read has `timeout`. Returns (status code, body); errors read
/// `ADDR/PATH: what went wrong`.
pub fn request(
    method: &str,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{addr}{path}: {what}{e}");
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| err("", &e))?
        .next()
        .ok_or_else(|| err("", &"no address"))?;
    let mut s =
        TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT).map_err(|e| err("connect: ", &e))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| err("", &e))?;
    // One write: a server that answers after its first read and closes
    // would otherwise reset the connection on the unread rest.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| err("send: ", &e))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| err("read: ", &e))?;
    let text = String::from_utf8(raw).map_err(|_| err("", &"response is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("", &"response has no header end"))?;
    let line = head.lines().next().unwrap_or("");
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err("bad status line: ", &line))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn parses_request_lines() {
        let r = parse_head("GET /debug/trace?seconds=2 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            (r.method, r.path, r.query),
            ("GET", "/debug/trace", "seconds=2")
        );
        assert_eq!(query_param(r.query, "seconds"), Some("2"));
        assert!(parse_head("garbage").is_none());
        assert!(parse_head("GET metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head("GET / HTTP/2 extra\r\n\r\n").is_none());
        assert!(parse_head("").is_none());
    }

    #[test]
    pub(super) fn parses_heads_with_bare_newlines_and_refuses_control_characters() {
        // read_head ends a head at "\n\n" as well as "\r\n\r\n"; the parser
        // took only "\r\n" as a line end, so such a head with any header
        // was one long "request line" and got 400 (found by fuzz/admin_head).
        let r = parse_head("GET /metrics HTTP/1.1\nHost: x\n\n").unwrap();
        assert_eq!((r.method, r.path, r.query), ("GET", "/metrics", ""));
        // Control characters in the target, and versions that are not
        // HTTP/1.x, are malformed.
        assert!(parse_head("GET /vc\rs HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head("GET /a HTTP/1.\x07x\n\n").is_none());
        assert!(parse_head("GET /a HTTP/1.1x\r\n\r\n").is_none());
        assert!(parse_head("GET /a HTTP/1.0\r\n\r\n").is_some());
    }

    /// A one-connection HTTP server answering with `reply` once it has the
    /// whole request head (which it returns through the join handle).
    fn answer_once(reply: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(reply).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, h)
    }

    #[test]
    fn client_returns_status_and_body() {
        let (addr, h) = answer_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno");
        let got = request(
            "POST",
            &addr,
            "/v1/cache/purge?target=a",
            Duration::from_secs(5),
        );
        assert_eq!(got, Ok((404, "no".to_string())));
        let req = h.join().unwrap();
        assert!(
            req.starts_with("POST /v1/cache/purge?target=a HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
    }

    #[test]
    fn client_errors_name_the_address() {
        // Every failure says which server (and path) it was about.
        for reply in [
            &b"not http at all"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n\xff\xfe",
        ] {
            let (addr, h) = answer_once(reply);
            let e = get(&addr, "/metrics", Duration::from_secs(5)).unwrap_err();
            assert!(e.starts_with(&format!("{addr}/metrics: ")), "{e}");
            h.join().unwrap();
        }
        // Nothing listening: the connect error names the address.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = get(&addr, "/metrics", Duration::from_secs(5)).unwrap_err();
        assert!(e.starts_with(&format!("{addr}/metrics: connect: ")), "{e}");
        let e = get("no-such-host.invalid:1", "/x", Duration::from_secs(5)).unwrap_err();
        assert!(e.starts_with("no-such-host.invalid:1/x: "), "{e}");
    }
}
