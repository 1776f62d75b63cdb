//! One SMTP client connection: a socket (plain or TLS) with a read buffer and a write buffer.
//!
//! lettre builds the messages and supplies the protocol's pieces (the commands, reply and
//! EHLO parsing, the AUTH responses); this connection owns the socket so that a transaction
//! costs as few system calls, wake-ups and round trips as the server allows:
//! - commands are queued in one reused buffer and written together when the caller flushes:
//!   with PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one write and the message
//!   and its final dot in another, two round trips a message instead of four or more (see
//!   `transaction.rs`);
//! - replies are read into one reused buffer and parsed further only when they are
//!   negative (their text goes into the error) or carry something (EHLO, AUTH challenges);
//! - QUIT waits for the server to close its end, so a connection that is gone for the
//!   worker is gone at the server too (the budget passes its token on only then).
//!
//! Every method may be cancelled (the callers bound each step with a timeout); a connection
//! whose step failed or was cancelled is dropped, never reused.

use std::fmt::{self, Display};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::commands::{Auth, Ehlo, Noop, Quit, Starttls};
use lettre::transport::smtp::extension::{ClientId, Extension, ServerInfo};
use lettre::transport::smtp::response::Response;
use tokio::io::ReadBuf;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::tls::TlsClient;

/// The longest reply line accepted (Postfix's `line_length_limit` is 2048; lettre takes
/// 1000 bytes).
const MAX_LINE: usize = 2048;
/// The longest reply accepted, all lines together.
const MAX_REPLY: usize = 100_000;
/// How long a connection given up may take to say goodbye (QUIT, its 221 and the close).
const QUIT_WITHIN: Duration = Duration::from_secs(2);
/// How many AUTH challenges are answered before giving up.
const MAX_CHALLENGES: usize = 10;

/// The socket under a connection.
pub enum Transport {
    /// Plain TCP (before STARTTLS, or with TLS off).
    Plain(TcpStream),
    /// TLS over TCP (implicit TLS, or after STARTTLS).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What went wrong on a connection.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with a negative reply (4xx or 5xx).
    Reply { code: u16, text: String },
    /// No (complete) reply: the socket failed or the server closed it.
    Io(io::Error),
    /// The server's answer is not SMTP, or not what the step allows.
    Protocol(String),
    /// The server offers none of the AUTH mechanisms the worker speaks.
    NoMechanism,
}

impl Failure {
    /// The reply code, when the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Failure::Reply { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Reply { code, text } => write!(f, "{code} {text}"),
            Failure::Io(error) => write!(f, "{error}"),
            Failure::Protocol(what) => f.write_str(what),
            Failure::NoMechanism => f.write_str("no AUTH mechanism in common"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Io(error) => Some(error),
            _ => None,
        }
    }
}

fn closed() -> Failure {
    Failure::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    ))
}

/// An open SMTP session, greeted and past EHLO.
pub struct Connection {
    stream: BufReader<Transport>,
    /// Commands (and the message) queued for the next flush.
    out: Vec<u8>,
    /// The last reply read, every line.
    reply: String,
    info: ServerInfo,
    pipelining: bool,
    broken: bool,
}

impl Connection {
    /// Reads the server's greeting and says EHLO.
    pub async fn greet(transport: Transport, hello: &ClientId) -> Result<Connection, Failure> {
        let mut connection = Connection {
            stream: BufReader::new(transport),
            out: Vec::with_capacity(4096),
            reply: String::with_capacity(256),
            info: ServerInfo::default(),
            pipelining: false,
            broken: false,
        };
        connection.reply().await?;
        connection.ehlo(hello).await?;
        Ok(connection)
    }

    async fn ehlo(&mut self, hello: &ClientId) -> Result<(), Failure> {
        self.queue(Ehlo::new(hello.clone()));
        self.flush().await?;
        self.reply().await?;
        let response = self.parsed()?;
        self.info =
            ServerInfo::from_response(&response).map_err(|e| Failure::Protocol(e.to_string()))?;
        self.pipelining = response.message().any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
        });
        Ok(())
    }

    /// What the server offered at EHLO.
    pub fn server_info(&self) -> &ServerInfo {
        &self.info
    }

    /// Whether the server offered PIPELINING (RFC 2920).
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// Whether the server offered STARTTLS on this (plain) connection.
    pub fn can_starttls(&self) -> bool {
        matches!(self.stream.get_ref(), Transport::Plain(_))
            && self.info.supports_feature(Extension::StartTls)
    }

    /// Whether a step failed part-way: the session's state is unknown.
    pub fn has_broken(&self) -> bool {
        self.broken
    }

    /// STARTTLS (RFC 3207): the TLS handshake on this socket, then EHLO again.
    pub async fn starttls(mut self, tls: &TlsClient, hello: &ClientId) -> Result<Self, Failure> {
        self.queue(Starttls);
        self.flush().await?;
        self.reply().await?;
        // Anything the server sent after its 220 would be read as if it came over TLS.
        if !self.stream.buffer().is_empty() {
            return Err(Failure::Protocol(
                "the server sent data after its reply to STARTTLS".into(),
            ));
        }
        let Transport::Plain(tcp) = self.stream.into_inner() else {
            return Err(Failure::Protocol(
                "the connection is already encrypted".into(),
            ));
        };
        let encrypted = tls.wrap(tcp).await.map_err(Failure::Io)?;
        self.stream = BufReader::new(Transport::Tls(Box::new(encrypted)));
        self.ehlo(hello).await?;
        Ok(self)
    }

    /// AUTH with the first of `mechanisms` the server offers, answering its challenges.
    pub async fn auth(
        &mut self,
        mechanisms: &[Mechanism],
        credentials: &Credentials,
    ) -> Result<(), Failure> {
        let mechanism = self
            .info
            .get_auth_mechanism(mechanisms)
            .ok_or(Failure::NoMechanism)?;
        let protocol = |e: lettre::transport::smtp::Error| Failure::Protocol(e.to_string());
        let mut command = Auth::new(mechanism, credentials.clone(), None).map_err(protocol)?;
        for _ in 0..MAX_CHALLENGES {
            self.queue(command);
            self.flush().await?;
            if self.reply().await? != 334 {
                return Ok(());
            }
            let challenge = self.parsed()?;
            command = Auth::new_from_response(mechanism, credentials.clone(), &challenge)
                .map_err(protocol)?;
        }
        Err(Failure::Protocol("too many AUTH challenges".into()))
    }

    /// NOOP: whether the server still answers.
    pub async fn noop(&mut self) -> bool {
        self.queue(Noop);
        self.flush().await.is_ok() && self.reply().await.is_ok()
    }

    /// QUIT, then waits until the server has closed its end (RFC 5321 4.1.1.10: it closes
    /// after its 221), for at most `QUIT_WITHIN`. The caller drops the connection afterwards.
    pub async fn quit(&mut self) {
        let goodbye = async {
            self.queue(Quit);
            if self.flush().await.is_err() || self.reply().await.is_err() {
                return;
            }
            let mut rest = [0u8; 256];
            while matches!(self.stream.read(&mut rest).await, Ok(n) if n > 0) {}
        };
        let _ = tokio::time::timeout(QUIT_WITHIN, goodbye).await;
    }

    /// Queues a command for the next flush.
    pub fn queue(&mut self, command: impl Display) {
        write!(self.out, "{command}").expect("writing to a Vec cannot fail");
    }

    /// Queues a message (RFC 5322 bytes, CRLF line ends) as DATA content: a dot at the start
    /// of a line doubled, then the final `CRLF.CRLF`, the same bytes as lettre sends.
    pub fn queue_message(&mut self, message: &[u8]) {
        dot_stuff(&mut self.out, message);
    }

    /// Writes everything queued, in one write where the socket takes it.
    pub async fn flush(&mut self) -> Result<(), Failure> {
        let result = async {
            let stream = self.stream.get_mut();
            stream.write_all(&self.out).await?;
            stream.flush().await
        }
        .await;
        self.out.clear();
        result.map_err(|e| {
            self.broken = true;
            Failure::Io(e)
        })
    }

    /// Reads one reply (every line of it); its code when positive, the reply as a failure
    /// when negative.
    pub async fn reply(&mut self) -> Result<u16, Failure> {
        self.broken = true;
        self.reply.clear();
        let code = loop {
            let start = self.reply.len();
            // At most one byte past the longest line: a server that never ends its line
            // cannot make the worker buffer without bound.
            let read = (&mut self.stream)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut self.reply)
                .await
                .map_err(Failure::Io)?;
            if read == 0 {
                return Err(closed());
            }
            let line = &self.reply.as_bytes()[start..];
            if line.len() > MAX_LINE || self.reply.len() > MAX_REPLY {
                return Err(Failure::Protocol("the server's reply is too long".into()));
            }
            let code = match line {
                [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', ..] => {
                    u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
                }
                _ => {
                    return Err(Failure::Protocol(format!(
                        "not an SMTP reply: {:?}",
                        self.reply[start..].trim_end()
                    )))
                }
            };
            if line.get(3) != Some(&b'-') {
                break code;
            }
        };
        self.broken = false;
        if code >= 400 {
            return Err(Failure::Reply {
                code,
                text: self.reply_text(),
            });
        }
        Ok(code)
    }

    /// The last reply's text without its codes, lines joined.
    fn reply_text(&self) -> String {
        self.reply
            .lines()
            .map(|line| line.get(4..).unwrap_or("").trim_end())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The last reply parsed by lettre.
    fn parsed(&self) -> Result<Response, Failure> {
        Response::from_str(&self.reply).map_err(|e| Failure::Protocol(e.to_string()))
    }
}

/// Appends `message` with every dot that starts a line doubled (RFC 5321 4.5.2) and the
/// final `CRLF.CRLF`: lettre's transparency codec (a line starts at the message's start or
/// after CRLF), byte for byte, copied in runs between the dots.
fn dot_stuff(out: &mut Vec<u8>, message: &[u8]) {
    out.reserve(message.len() + message.len() / 64 + 5);
    let mut start = 0;
    for dot in memchr::memchr_iter(b'.', message) {
        if dot == 0 || message[..dot].ends_with(b"\r\n") {
            out.extend_from_slice(&message[start..=dot]);
            out.push(b'.');
            start = dot + 1;
        }
    }
    out.extend_from_slice(&message[start..]);
    out.extend_from_slice(b"\r\n.\r\n");
}

/// A scripted SMTP server for the tests of this module and of `transaction.rs`.
#[cfg(test)]
pub mod testing {
    use lettre::transport::smtp::extension::ClientId;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::{TcpListener, TcpStream};

    use super::{Connection, Transport};

    pub async fn line(read: &mut BufReader<OwnedReadHalf>) -> String {
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        line
    }

    /// A scripted server: greets, answers EHLO with `ehlo`, then runs `script` on the
    /// session; the client's connection is returned beside the script's handle.
    pub async fn scripted<F, Fut, T>(
        ehlo: &'static str,
        script: F,
    ) -> (Connection, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(BufReader<OwnedReadHalf>, tokio::net::tcp::OwnedWriteHalf) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = T> + Send,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (read, mut write) = socket.into_split();
            let mut read = BufReader::new(read);
            write.write_all(b"220 scripted\r\n").await.unwrap();
            assert!(line(&mut read).await.starts_with("EHLO "));
            write.write_all(ehlo.as_bytes()).await.unwrap();
            script(read, write).await
        });
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let connection = Connection::greet(Transport::Plain(tcp), &ClientId::Domain("t".into()))
            .await
            .unwrap();
        (connection, server)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::AsyncWriteExt;

    use super::testing::{line, scripted};
    use super::*;

    #[tokio::test]
    async fn quit_returns_once_the_server_has_closed_its_end() {
        let (mut connection, server) =
            scripted("250 scripted\r\n", |mut read, mut write| async move {
                assert_eq!(line(&mut read).await, "QUIT\r\n");
                write.write_all(b"221 bye\r\n").await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop((read, write));
                Instant::now()
            })
            .await;
        connection.quit().await;
        let returned = Instant::now();
        let closed = server.await.unwrap();
        assert!(
            returned >= closed,
            "QUIT returned {:?} before the server closed",
            closed - returned
        );
    }

    #[tokio::test]
    async fn quit_gives_up_on_a_server_that_never_closes() {
        let (mut connection, server) =
            scripted("250 scripted\r\n", |mut read, mut write| async move {
                assert_eq!(line(&mut read).await, "QUIT\r\n");
                write.write_all(b"221 bye\r\n").await.unwrap();
                // Holds its end open until the client has gone.
                line(&mut read).await
            })
            .await;
        let started = Instant::now();
        connection.quit().await;
        let took = started.elapsed();
        assert!(
            took >= QUIT_WITHIN && took < QUIT_WITHIN + Duration::from_secs(1),
            "{took:?}"
        );
        drop(connection);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_multiline_negative_reply_keeps_its_code_and_text() {
        let (mut connection, server) = scripted(
            "250-scripted\r\n250 8BITMIME\r\n",
            |mut read, mut write| async move {
                line(&mut read).await;
                write
                    .write_all(b"550-5.7.1 first line\r\n550 5.7.1 second line\r\n")
                    .await
                    .unwrap();
                line(&mut read).await
            },
        )
        .await;
        connection.queue("MAIL FROM:<a@example.com>\r\n");
        connection.flush().await.unwrap();
        match connection.reply().await {
            Err(Failure::Reply { code, text }) => {
                assert_eq!(code, 550);
                assert_eq!(text, "5.7.1 first line 5.7.1 second line");
            }
            other => panic!("{other:?}"),
        }
        drop(connection);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_reply_line_without_end_is_refused_not_buffered() {
        let (mut connection, server) =
            scripted("250 scripted\r\n", |mut read, mut write| async move {
                line(&mut read).await;
                let endless = vec![b'5'; 64 * 1024];
                let _ = write.write_all(&endless).await;
            })
            .await;
        connection.queue(Noop);
        connection.flush().await.unwrap();
        match connection.reply().await {
            Err(Failure::Protocol(what)) => assert!(what.contains("too long"), "{what}"),
            other => panic!("{other:?}"),
        }
        assert!(
            connection.reply.len() <= MAX_LINE + 1,
            "{} bytes buffered",
            connection.reply.len()
        );
        drop(connection);
        server.await.unwrap();
    }

    #[test]
    fn dots_at_line_starts_are_doubled_as_lettre_does() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
            (
                b".a\r\n.b\r\nc.d\r\n..\r\n.",
                b"..a\r\n..b\r\nc.d\r\n...\r\n..\r\n.\r\n",
            ),
            (b".", b"..\r\n.\r\n"),
            (b"x\n.y\r.z", b"x\n.y\r.z\r\n.\r\n"),
            (b"x\r\r\n.y", b"x\r\r\n..y\r\n.\r\n"),
            (b"", b"\r\n.\r\n"),
        ];
        for (message, wire) in cases {
            let mut out = Vec::new();
            dot_stuff(&mut out, message);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(wire),
                "for {:?}",
                String::from_utf8_lossy(message)
            );
        }
    }
}
