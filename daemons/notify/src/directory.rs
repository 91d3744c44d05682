//! Recipients' email addresses, from the users table of the auth database (reached through
//! the shard proxy's passthrough `auth` database).
//!
//! One connection per partition worker, re-opened when it breaks: a worker handles one
//! message at a time, so a pool would only add idle connections.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub id: i64,
    pub email: String,
    pub name: String,
}

pub struct Directory {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
}

impl Directory {
    pub fn new(config: tokio_postgres::Config) -> Self {
        Directory {
            config,
            client: None,
        }
    }

    /// Another directory on the same database, with its own connection.
    pub fn fork(&self) -> Directory {
        Directory::new(self.config.clone())
    }

    /// The users among `ids` that exist, ascending by id.
    pub async fn lookup(&mut self, ids: &[i64]) -> Result<Vec<Recipient>, String> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "auth database connection ended");
                    }
                });
                client
            }
        };
        let rows = client
            .query(
                "SELECT id, email, name FROM users WHERE id = ANY($1) ORDER BY id",
                &[&ids],
            )
            .await
            .map_err(|e| e.to_string())?;
        self.client = Some(client);
        Ok(rows
            .iter()
            .map(|r| Recipient {
                id: r.get(0),
                email: r.get(1),
                name: r.get(2),
            })
            .collect())
    }
}
