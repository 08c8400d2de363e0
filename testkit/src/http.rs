//! A plain HTTP/1.1 GET over a std `TcpStream`: enough for readiness
//! probes (`/readyz`, etcd's `/health`) and for reading an operations
//! endpoint, without an HTTP client or an async runtime.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response's status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// GET `path` on `address`, each step bounded by `timeout`.
///
/// `Connection: close` makes the server end the response by closing, so it
/// is read to the end without parsing lengths; the servers asked answer
/// with a `Content-Length`, so the body is never chunked.
pub fn http_get(address: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let failed = |detail: String| Error::Http {
        address: address.to_string(),
        path: path.to_string(),
        detail,
    };
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|error| failed(format!("connect: {error}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| failed(format!("timeouts: {error}")))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|error| failed(format!("send: {error}")))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .map_err(|error| failed(format!("read: {error}")))?;
    let response = String::from_utf8_lossy(&bytes);
    let status = response
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| failed(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_the_status_and_body_of_a_closing_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // All of it, or closing with unread bytes would reset the
            // connection under the response.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno")
                .unwrap();
            request
        });
        let response = http_get(address, "/readyz", Duration::from_secs(5)).unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "no");
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /readyz HTTP/1.1\r\n"));
    }

    #[test]
    fn nothing_listening_is_an_error_naming_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let error = http_get(address, "/health", Duration::from_secs(1)).unwrap_err();
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }
}
