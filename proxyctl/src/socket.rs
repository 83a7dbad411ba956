//! One request/answer exchange over an HAProxy CLI socket (runtime API or master CLI), in
//! HAProxy's non-interactive mode: send one line, read until HAProxy closes the connection.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::Error;

/// How the exchange should treat the connection being closed or reset before an answer: the
/// master closes the connection without answering when it re-executes for `reload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// An answer is expected; a reset is an error.
    Required,
    /// The peer may drop the connection without answering.
    Optional,
}

/// Sends `line` (one command, no newline) to `socket` and returns everything HAProxy answered.
pub(crate) async fn exchange(
    socket: &Path,
    line: &str,
    timeout: Duration,
    answer: Answer,
) -> Result<String, Error> {
    debug_assert!(
        !line.contains('\n'),
        "commands are validated by the callers"
    );
    let work = async {
        let mut stream = connect(socket).await?;
        let io_err = |source: io::Error| Error::SocketIo {
            socket: socket.to_path_buf(),
            source,
        };
        let mut request = String::with_capacity(line.len() + 1);
        request.push_str(line);
        request.push('\n');
        // The master CLI keeps the connection open until the client half-closes it, so always
        // signal the end of the request.
        let sent = match stream.write_all(request.as_bytes()).await {
            Ok(()) => stream.shutdown().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return match (answer, e.kind()) {
                (
                    Answer::Optional,
                    io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::NotConnected,
                ) => Ok(String::new()),
                _ => Err(io_err(e)),
            };
        }
        let mut buf = Vec::new();
        match stream.read_to_end(&mut buf).await {
            Ok(_) => {}
            Err(e)
                if answer == Answer::Optional
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) => {}
            Err(e) => return Err(io_err(e)),
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::SocketTimeout {
            socket: socket.to_path_buf(),
            timeout,
        }),
    }
}

async fn connect(socket: &Path) -> Result<UnixStream, Error> {
    let path = socket.to_path_buf();
    match UnixStream::connect(socket).await {
        Ok(s) => Ok(s),
        Err(e) => Err(match e.kind() {
            io::ErrorKind::NotFound => Error::SocketMissing { socket: path },
            io::ErrorKind::PermissionDenied => Error::SocketPermission { socket: path },
            io::ErrorKind::ConnectionRefused => {
                // Connecting to a regular file also yields ECONNREFUSED on Linux; tell the two
                // apart, since the fixes differ (wrong path vs. HAProxy not running).
                match std::fs::metadata(socket) {
                    Ok(meta) if !meta.file_type().is_socket() => Error::NotASocket { socket: path },
                    _ => Error::SocketRefused { socket: path },
                }
            }
            _ => match std::fs::metadata(socket) {
                Ok(meta) if !meta.file_type().is_socket() => Error::NotASocket { socket: path },
                _ => Error::SocketIo {
                    socket: path,
                    source: e,
                },
            },
        }),
    }
}

/// Rejects a command argument that could end the command line or start another command
/// (HAProxy's CLI splits commands on `;` and lines on `\n`).
pub(crate) fn validate_word(what: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        Some("only letters, digits and `_ - . :` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Rejects a `server` line token (address, keyword or value) that could end the command line
/// or start another command: letters, digits and `_ . : / @ = + , % [ ] -` only.
pub(crate) fn validate_token(value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 512
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'.'
                        | b':'
                        | b'/'
                        | b'@'
                        | b'='
                        | b'+'
                        | b','
                        | b'%'
                        | b'['
                        | b']'
                        | b'-'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: "server line token",
            value: value.to_string(),
            reason: "only letters, digits and `_ . : / @ = + , % [ ] -` are allowed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_that_could_inject_commands_are_rejected() {
        for bad in ["", "a b", "a;show info", "a\nb", "a/b", "a#", "ä"] {
            assert!(
                matches!(validate_word("server", bad), Err(Error::InvalidName { .. })),
                "{bad:?} was accepted"
            );
        }
        for bad in ["", "a b", "check;show", "x\ny", "#", "a\"b", "$x"] {
            assert!(validate_token(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["[::1]:8080", "127.0.0.1:80", "inter", "2s", "weight", "10"] {
            assert!(validate_token(good).is_ok(), "{good:?} was rejected");
        }
        for good in [
            "web",
            "web-1",
            "node1-0123456789ab-8080",
            "app.v2",
            "x:y",
            "A_b",
        ] {
            assert!(
                validate_word("server", good).is_ok(),
                "{good:?} was rejected"
            );
        }
    }

    #[tokio::test]
    async fn connect_errors_name_the_socket_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let err = exchange(
            &missing,
            "show info",
            Duration::from_secs(1),
            Answer::Required,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::SocketMissing { ref socket } if socket == &missing));

        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let err = exchange(&file, "show info", Duration::from_secs(1), Answer::Required)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotASocket { .. }), "{err:?}");

        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let err = exchange(
            &stale,
            "show info",
            Duration::from_secs(1),
            Answer::Required,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::SocketRefused { .. }), "{err:?}");
        assert!(err.to_string().contains(&stale.display().to_string()));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_with_the_socket_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accept = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(conn);
        });
        let err = exchange(
            &path,
            "show info",
            Duration::from_millis(200),
            Answer::Required,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::SocketTimeout { .. }), "{err:?}");
        accept.abort();
    }
}
