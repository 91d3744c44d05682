//! The control socket of a running stack (`control.sock` in the state directory): how
//! `add-shard`/`remove-shard` ask the supervisor to start, keep or stop a shard's cluster.
//!
//! Why the supervisor and not the command itself: the supervisor owns every process of
//! the stack, so a cluster it starts is stopped by `make down` like the others, and it
//! rewrites the configurations a daemon restart reads. Why a socket: the command needs
//! an answer (the port the cluster listens on, or why it could not start), which a
//! signal cannot carry.
//!
//! The protocol is one line each way per connection: `attach shard-4` → `ok 5437`, or
//! `error <why>`.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::layout::Layout;

/// What the supervisor is asked to do with a spare shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start its cluster (with database `tasks`) unless it runs; answers the port.
    Attach(String),
    /// The proxy's ring has it now: remember it and rewrite the configurations.
    Join(String),
    /// Not in the ring (any more): forget it, stop its cluster, delete its data.
    Release(String),
}

impl Request {
    fn line(&self) -> String {
        match self {
            Request::Attach(s) => format!("attach {s}\n"),
            Request::Join(s) => format!("join {s}\n"),
            Request::Release(s) => format!("release {s}\n"),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let (verb, shard) = line.trim().split_once(' ')?;
        let shard = shard.trim().to_owned();
        match verb {
            "attach" => Some(Request::Attach(shard)),
            "join" => Some(Request::Join(shard)),
            "release" => Some(Request::Release(shard)),
            _ => None,
        }
    }
}

/// Sends `request` to the supervisor of the stack in `layout` and returns its answer.
pub async fn ask(layout: &Layout, request: &Request) -> anyhow::Result<String> {
    let path = layout.control_socket();
    let mut stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the stack's supervisor at {} (a stack started before add-shard \
             existed has none: `make restart`)",
            path.display()
        )
    })?;
    stream.write_all(request.line().as_bytes()).await?;
    let mut answer = String::new();
    // Starting a cluster takes a few seconds (initdb the first time); the supervisor
    // gives PostgreSQL 60 s.
    tokio::time::timeout(
        Duration::from_secs(120),
        BufReader::new(stream).read_line(&mut answer),
    )
    .await
    .context("the supervisor did not answer within 120 s")??;
    match answer.trim_end().split_once(' ') {
        Some(("ok", detail)) => Ok(detail.to_owned()),
        Some(("error", why)) => bail!("{why}"),
        _ if answer.trim_end() == "ok" => Ok(String::new()),
        _ => bail!("the supervisor answered {answer:?}"),
    }
}

/// The supervisor's end.
pub struct Control {
    listener: UnixListener,
}

/// Answers one request.
pub struct Reply(UnixStream);

impl Control {
    /// Listens on the control socket (a stale one from a crashed stack is replaced: the
    /// caller holds the stack lock).
    pub fn bind(layout: &Layout) -> anyhow::Result<Self> {
        let path = layout.control_socket();
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        Ok(Control { listener })
    }

    /// The next well-formed request; a client that sends nothing within 5 s or garbage is
    /// answered (if it listens) and skipped.
    pub async fn next(&self) -> (Request, Reply) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            let mut reply = Reply(reader.into_inner());
            match (read, Request::parse(&line)) {
                (Ok(Ok(_)), Some(request)) => return (request, reply),
                _ => reply.send(Err(format!("bad request {line:?}"))).await,
            }
        }
    }
}

impl Reply {
    pub async fn send(&mut self, answer: Result<String, String>) {
        let line = match answer {
            Ok(detail) => format!("ok {detail}\n"),
            // One line: the error's own newlines would end the answer early.
            Err(why) => format!("error {}\n", why.replace('\n', " ")),
        };
        let _ = self.0.write_all(line.as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_the_wire() {
        for r in [
            Request::Attach("shard-4".into()),
            Request::Join("shard-4".into()),
            Request::Release("shard-4".into()),
        ] {
            assert_eq!(Request::parse(&r.line()), Some(r));
        }
        assert_eq!(Request::parse("detach shard-4\n"), None);
        assert_eq!(Request::parse("attach\n"), None);
    }

    #[tokio::test]
    async fn a_request_gets_its_answer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        let control = Control::bind(&layout).expect("bind");
        let server = tokio::spawn(async move {
            for answer in [Ok("5437".to_owned()), Err("no\nway".to_owned())] {
                let (request, mut reply) = control.next().await;
                assert_eq!(request, Request::Attach("shard-4".into()));
                reply.send(answer).await;
            }
        });
        let attach = Request::Attach("shard-4".into());
        assert_eq!(ask(&layout, &attach).await.expect("ok"), "5437");
        let err = ask(&layout, &attach).await.expect_err("error");
        assert_eq!(err.to_string(), "no way");
        server.await.expect("server");
    }
}
