//! Recipients' email addresses, from the users table of the auth database (reached through
//! the shard proxy's passthrough `auth` database).
//!
//! One connection per partition worker, re-opened when it breaks: a worker handles one
//! message at a time, so a pool would only add idle connections. The lookup is prepared
//! once per connection: it runs for every event, and an unprepared query costs a second
//! round trip (Parse/Describe) each time.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub id: i64,
    pub email: String,
    pub name: String,
}

pub struct Directory {
    config: tokio_postgres::Config,
    /// The open connection and the lookup prepared on it.
    client: Option<(tokio_postgres::Client, tokio_postgres::Statement)>,
}

const LOOKUP: &str = "SELECT id, email, name FROM users WHERE id = ANY($1) ORDER BY id";

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
        let (client, lookup) = match self.client.take() {
            Some((c, s)) if !c.is_closed() => (c, s),
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
                let lookup = client.prepare(LOOKUP).await.map_err(|e| e.to_string())?;
                (client, lookup)
            }
        };
        let rows = client
            .query(&lookup, &[&ids])
            .await
            .map_err(|e| e.to_string())?;
        self.client = Some((client, lookup));
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
