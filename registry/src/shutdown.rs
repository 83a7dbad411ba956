//! Signals, one way for every daemon: SIGTERM and SIGINT ask for a clean shutdown (the first
//! drains: presence revokes its lease, confgen finishes the apply it is in), a second one
//! forces the exit; SIGHUP is a stream of "re-read now" requests. Handlers are installed before
//! the daemon starts work, so a signal that arrives early is never lost to the default action
//! (which would kill the process without its cleanup).

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

/// Termination signals (SIGTERM, SIGINT), in the order they arrive.
pub struct Shutdown {
    rx: mpsc::UnboundedReceiver<&'static str>,
}

impl Shutdown {
    /// Installs the SIGTERM and SIGINT handlers. Fails only if the process cannot install
    /// signal handlers at all.
    pub fn install() -> io::Result<Shutdown> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if tx.send(name).is_err() {
                    return;
                }
            }
        });
        Ok(Shutdown { rx })
    }

    /// The next termination signal's name. Cancel-safe (usable in `select!`): a signal is
    /// taken by the call that returns it.
    pub async fn next(&mut self) -> &'static str {
        // The sender lives as long as the runtime; if it is gone nothing more can arrive.
        match self.rx.recv().await {
            Some(name) => name,
            None => std::future::pending().await,
        }
    }

    /// Watches for termination signals on a task of its own, so that a daemon busy in a long
    /// step (a reload command under its timeout) still sees them: the first is logged and
    /// resolves the returned future (the drain: the daemon finishes what it is doing and
    /// cleans up); a second ends the process at once with exit code `code`, saying so on
    /// stderr.
    pub fn drain_then_force(
        mut self,
        daemon: &'static str,
        code: i32,
    ) -> impl std::future::Future<Output = &'static str> + Send {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let first = self.next().await;
            tracing::info!(
                signal = first,
                "termination signal received; shutting down (a second one exits at once)"
            );
            let _ = tx.send(first);
            let second = self.next().await;
            eprintln!("{daemon}: second signal ({second}); exiting now");
            std::process::exit(code);
        });
        async move {
            match rx.await {
                Ok(name) => name,
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// SIGHUP requests.
pub struct Hangups {
    sig: Signal,
}

impl Hangups {
    /// Installs the SIGHUP handler.
    pub fn install() -> io::Result<Hangups> {
        Ok(Hangups {
            sig: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next SIGHUP (several that arrive before this is called count once).
    /// Cancel-safe.
    pub async fn next(&mut self) {
        if self.sig.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn signals_arrive_in_order_and_hangups_as_a_stream() {
        let mut down = Shutdown::install().unwrap();
        let mut hup = Hangups::install().unwrap();
        let me = nix::unistd::Pid::this();
        nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGHUP).unwrap();
        tokio::time::timeout(Duration::from_secs(10), hup.next())
            .await
            .expect("SIGHUP seen");
        nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGINT).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), down.next())
            .await
            .expect("SIGINT seen");
        assert_eq!(first, "SIGINT");
        nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGTERM).unwrap();
        let second = tokio::time::timeout(Duration::from_secs(10), down.next())
            .await
            .expect("SIGTERM seen");
        assert_eq!(second, "SIGTERM");
        nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGHUP).unwrap();
        tokio::time::timeout(Duration::from_secs(10), hup.next())
            .await
            .expect("a second SIGHUP seen");
    }
}
