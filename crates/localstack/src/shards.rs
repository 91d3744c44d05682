//! Convenience sets of clusters shaped like the TaskFlow storage tier.

use std::ops::{Deref, DerefMut};

use crate::error::{Error, Result};
use crate::pg::PgCluster;

/// Database on every shard.
pub const TASKS_DB: &str = "tasks";
/// Database on the auth cluster.
pub const AUTH_DB: &str = "auth";

/// `n` temporary PostgreSQL clusters, each with database `tasks`.
#[derive(Debug)]
pub struct Shards {
    clusters: Vec<PgCluster>,
}

impl Shards {
    /// Starts `n` clusters concurrently.
    pub async fn start(n: usize) -> Result<Self> {
        let handles: Vec<_> = (0..n)
            .map(|_| tokio::spawn(PgCluster::builder().database(TASKS_DB).start()))
            .collect();
        let mut clusters = Vec::with_capacity(n);
        let mut first_error = None;
        for handle in handles {
            match handle.await {
                Ok(Ok(c)) => clusters.push(c),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::io(
                        "joining a shard start task",
                        std::io::Error::other(e),
                    ));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(Self { clusters }),
        }
    }

    /// Adds one more shard (e.g. to test adding a shard online); returns its index.
    pub async fn add(&mut self) -> Result<usize> {
        let cluster = PgCluster::builder().database(TASKS_DB).start().await?;
        self.clusters.push(cluster);
        Ok(self.clusters.len() - 1)
    }

    /// Key=value connection strings (`taskflow`/`taskflow`, db `tasks`), one per shard.
    pub fn connection_strings(&self) -> Vec<String> {
        self.clusters
            .iter()
            .map(|c| c.connection_string(TASKS_DB))
            .collect()
    }

    /// `postgres://` URLs (db `tasks`), one per shard.
    pub fn urls(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.url(TASKS_DB)).collect()
    }

    /// Ports, one per shard.
    pub fn ports(&self) -> Vec<u16> {
        self.clusters.iter().map(PgCluster::port).collect()
    }
}

impl Deref for Shards {
    type Target = [PgCluster];
    fn deref(&self) -> &[PgCluster] {
        &self.clusters
    }
}

impl DerefMut for Shards {
    fn deref_mut(&mut self) -> &mut [PgCluster] {
        &mut self.clusters
    }
}

/// One temporary PostgreSQL cluster with database `auth`.
#[derive(Debug)]
pub struct AuthDb {
    cluster: PgCluster,
}

impl AuthDb {
    /// Starts the cluster.
    pub async fn start() -> Result<Self> {
        let cluster = PgCluster::builder().database(AUTH_DB).start().await?;
        Ok(Self { cluster })
    }

    /// Key=value connection string (`taskflow`/`taskflow`, db `auth`).
    pub fn connection_string(&self) -> String {
        self.cluster.connection_string(AUTH_DB)
    }

    /// `postgres://` URL (db `auth`).
    pub fn url(&self) -> String {
        self.cluster.url(AUTH_DB)
    }

    /// A client connected to db `auth` as `taskflow`.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        self.cluster.client(AUTH_DB).await
    }
}

impl Deref for AuthDb {
    type Target = PgCluster;
    fn deref(&self) -> &PgCluster {
        &self.cluster
    }
}

impl DerefMut for AuthDb {
    fn deref_mut(&mut self) -> &mut PgCluster {
        &mut self.cluster
    }
}
