//! The `users` table (migrations/sql/auth): the only storage the auth daemon has.
//!
//! Statements go through a small deadpool pool with cached prepared statements; the proxy's
//! passthrough `auth` database supports the extended protocol, so the same code runs
//! directly against PostgreSQL or through the proxy.

use serde::Serialize;
use time::OffsetDateTime;

/// A user as the API shows it (never the hash).
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub role: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A user with the password hash, for login only.
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("email already registered")]
    DuplicateEmail,
}

const COLUMNS: &str = "id, email, name, role, created_at";

fn user_from(row: &tokio_postgres::Row) -> Result<User, tokio_postgres::Error> {
    Ok(User {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        name: row.try_get(2)?,
        role: row.try_get(3)?,
        created_at: row.try_get(4)?,
    })
}

#[derive(Clone)]
pub struct Users {
    pool: deadpool_postgres::Pool,
}

impl Users {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Users { pool }
    }

    /// `SELECT 1`: does the database answer?
    pub async fn ping(&self) -> Result<(), StoreError> {
        let c = self.pool.get().await?;
        c.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn insert(
        &self,
        email: &str,
        name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&format!(
                "INSERT INTO users (email, name, password_hash) \
                 SELECT $1, $2, $3 WHERE NOT EXISTS \
                 (SELECT 1 FROM users WHERE lower(email) = lower($1)) RETURNING {COLUMNS}"
            ))
            .await?;
        // The NOT EXISTS guard keeps a duplicate from consuming a sequence value (ids
        // stay dense); the unique index still decides races.
        match c.query_opt(&stmt, &[&email, &name, &password_hash]).await {
            Ok(Some(row)) => Ok(user_from(&row)?),
            Ok(None) => Err(StoreError::DuplicateEmail),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::DuplicateEmail)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn by_email(&self, email: &str) -> Result<Option<Credentials>, StoreError> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, password_hash FROM users WHERE lower(email) = lower($1)"
            ))
            .await?;
        let Some(row) = c.query_opt(&stmt, &[&email]).await? else {
            return Ok(None);
        };
        Ok(Some(Credentials {
            user: user_from(&row)?,
            password_hash: row.try_get(5)?,
        }))
    }

    pub async fn by_id(&self, id: i64) -> Result<Option<User>, StoreError> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
            .await?;
        match c.query_opt(&stmt, &[&id]).await? {
            Some(row) => Ok(Some(user_from(&row)?)),
            None => Ok(None),
        }
    }

    /// Changes a user's email and/or name; `None` when there is no such user.
    pub async fn update(
        &self,
        id: i64,
        email: Option<&str>,
        name: Option<&str>,
    ) -> Result<Option<User>, StoreError> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&format!(
                "UPDATE users SET email = COALESCE($2, email), name = COALESCE($3, name), \
                 updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
            ))
            .await?;
        match c.query_opt(&stmt, &[&id, &email, &name]).await {
            Ok(Some(row)) => Ok(Some(user_from(&row)?)),
            Ok(None) => Ok(None),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::DuplicateEmail)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Users with id > `after`, ascending, at most `limit`; optionally only `ids`.
    pub async fn list(
        &self,
        after: i64,
        limit: i64,
        ids: Option<&[i64]>,
    ) -> Result<Vec<User>, StoreError> {
        let c = self.pool.get().await?;
        let rows = match ids {
            Some(ids) => {
                let stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM users WHERE id > $1 AND id = ANY($3) ORDER BY id LIMIT $2"
                    ))
                    .await?;
                c.query(&stmt, &[&after, &limit, &ids]).await?
            }
            None => {
                let stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
                    ))
                    .await?;
                c.query(&stmt, &[&after, &limit]).await?
            }
        };
        rows.iter()
            .map(|r| user_from(r).map_err(StoreError::from))
            .collect()
    }
}
