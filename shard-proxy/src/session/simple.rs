//! One statement of the simple query protocol: what the proxy answers itself (SQL-level
//! `PREPARE`/`EXECUTE`/`DEALLOCATE`, transaction control, `SET taskflow.shard`) and where
//! the rest runs.
//!
//! Why SQL-level prepared statements are kept here: backends are shared between clients,
//! so a `PREPARE` on one would be missing on the next; the proxy keeps the text and runs
//! `EXECUTE` as the substituted statement.

use bytes::Bytes;
use proxy_core::router::StatementKind;
use proxy_core::sqltext;
use proxy_core::wire::{self, sqlstate};

use super::{ExecError, Session};

impl Session {
    /// Handles one simple-protocol query string (without writing ReadyForQuery).
    pub(super) async fn simple_query_inner(
        &mut self,
        raw: Option<Bytes>,
        sql: &str,
    ) -> Result<(), ExecError> {
        let kw = sqltext::first_word(sql);
        if let Some(done) = self.sql_level_statement(kw, sql).await {
            return done;
        }
        if self.passthrough {
            let set = if kw.eq_ignore_ascii_case("SET") || kw.eq_ignore_ascii_case("RESET") {
                sqltext::parse_set(sql)
            } else {
                None
            };
            let state = sqltext::session_state(sql);
            self.run_single(0, raw, (sql, state), false, set).await?;
            return Ok(());
        }
        let analysis = self.topo.router.analyze(sql);
        if analysis.statement_count > 1 {
            return self.run_routed_simple(raw, sql, &analysis).await;
        }
        match &analysis.kind {
            StatementKind::Empty => {
                wire::empty_query(&mut self.client.out);
                Ok(())
            }
            StatementKind::Begin => self.begin(sql),
            StatementKind::Commit => self.commit().await,
            StatementKind::Rollback => self.rollback_cmd(sql).await,
            StatementKind::Savepoint => self.savepoint(raw, sql).await,
            StatementKind::SetShard(name) => self.set_shard(name.clone()),
            StatementKind::Set => {
                let set = sqltext::parse_set(sql);
                let shard = self.default_shard();
                self.run_single(shard, raw, (sql, analysis.session_state), false, set)
                    .await
                    .map(drop)
            }
            StatementKind::Show if is_show_shards(sql) => {
                self.show_shards();
                Ok(())
            }
            StatementKind::Show => {
                let shard = self.default_shard();
                self.run_single(shard, raw, (sql, analysis.session_state), false, None)
                    .await
                    .map(drop)
            }
            StatementKind::Unparsed(reason) => {
                let (shard, hinted) = self.route_unparsed_sql(
                    analysis.hint.as_deref(),
                    analysis.touches_sharded,
                    reason,
                )?;
                self.run_single(shard, raw, (sql, analysis.session_state), hinted, None)
                    .await
                    .map(drop)
            }
            _ => self.run_routed_simple(raw, sql, &analysis).await,
        }
    }

    /// `SHOW taskflow.shards`: the shards of this session's topology (both rings' during an
    /// online migration), one per row — how a client that must visit every shard (the
    /// gateway's outbox relay, with `/* shard=… */` hints) learns a shard added at run time.
    fn show_shards(&mut self) {
        let cols = [wire::ColumnDesc::text("taskflow.shards")];
        wire::row_description(&mut self.client.out, &cols);
        let names = self.topo.placement.shards().to_vec();
        for name in &names {
            wire::data_row(&mut self.client.out, [Some(name.as_bytes())].into_iter());
        }
        wire::command_complete(&mut self.client.out, "SHOW");
    }

    /// Where a statement the router could not parse runs: the shard a hint names (`true`:
    /// hinted), else any shard — unless one of its words names a sharded table
    /// (`touches_sharded`), which would silently read only one shard's rows.
    pub(super) fn route_unparsed_sql(
        &self,
        hint: Option<&str>,
        touches_sharded: bool,
        reason: &str,
    ) -> Result<(usize, bool), ExecError> {
        if let Some(hint) = hint.or(self.shard_hint.as_deref()) {
            let shard = proxy_core::placement::Locate::index_of(&self.topo.placement, hint)
                .ok_or_else(|| {
                    ExecError::sql(
                        sqlstate::INVALID_CATALOG_NAME,
                        format!("unknown shard \"{hint}\""),
                    )
                })?;
            return Ok((shard, true));
        }
        if touches_sharded {
            return Err(ExecError::sql(
                sqlstate::SYNTAX_ERROR,
                format!("the shard proxy cannot route this statement ({reason}); add /* shard=<name> */ or SET taskflow.shard"),
            ));
        }
        // Catalog queries and the like: any shard answers the same.
        Ok((self.default_shard(), false))
    }

    /// `SET taskflow.shard = name` (or `DEFAULT`): the session's shard hint.
    fn set_shard(&mut self, name: Option<String>) -> Result<(), ExecError> {
        if let Some(n) = &name {
            if proxy_core::placement::Locate::index_of(&self.topo.placement, n).is_none() {
                return Err(ExecError::sql(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("unknown shard \"{n}\""),
                ));
            }
        }
        self.shard_hint = name;
        wire::command_complete(&mut self.client.out, "SET");
        Ok(())
    }

    /// The empty statement and SQL-level `PREPARE`/`EXECUTE`/`DEALLOCATE`, which the proxy
    /// answers itself in every database; `None` for anything else. `kw` is the statement's
    /// first word as written.
    async fn sql_level_statement(&mut self, kw: &str, sql: &str) -> Option<Result<(), ExecError>> {
        if kw.is_empty() {
            wire::empty_query(&mut self.client.out);
            Some(Ok(()))
        } else if kw.eq_ignore_ascii_case("PREPARE") {
            sqltext::parse_prepare(sql).map(|p| self.sql_prepare(p))
        } else if kw.eq_ignore_ascii_case("EXECUTE") {
            match sqltext::parse_execute(sql) {
                Some((name, args)) => Some(self.sql_execute(&name, &args).await),
                None => None,
            }
        } else if kw.eq_ignore_ascii_case("DEALLOCATE") {
            sqltext::parse_deallocate(sql).map(|t| self.sql_deallocate(t))
        } else {
            None
        }
    }

    fn sql_prepare(&mut self, p: sqltext::SqlPrepare) -> Result<(), ExecError> {
        if self.sql_prepared.contains_key(&p.name) {
            return Err(ExecError::sql(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{}\" already exists", p.name),
            ));
        }
        self.sql_prepared.insert(p.name.clone(), p);
        wire::command_complete(&mut self.client.out, "PREPARE");
        Ok(())
    }

    async fn sql_execute(&mut self, name: &str, args: &[String]) -> Result<(), ExecError> {
        let p = self.sql_prepared.get(name).ok_or_else(|| {
            ExecError::sql(
                sqlstate::UNDEFINED_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" does not exist"),
            )
        })?;
        let body = sqltext::substitute(&p.body, args, &p.types).ok_or_else(|| {
            ExecError::sql(
                sqlstate::SYNTAX_ERROR,
                format!("wrong number of parameters for prepared statement \"{name}\""),
            )
        })?;
        // Boxed: EXECUTE runs a statement, which may itself be an EXECUTE.
        Box::pin(self.simple_query(None, &body))
            .await
            .map_err(ExecError::Client)
    }

    fn sql_deallocate(&mut self, target: Option<String>) -> Result<(), ExecError> {
        match target {
            None => {
                self.sql_prepared.clear();
                wire::command_complete(&mut self.client.out, "DEALLOCATE ALL");
            }
            Some(name) => {
                if self.sql_prepared.remove(&name).is_none() {
                    return Err(ExecError::sql(
                        sqlstate::UNDEFINED_PREPARED_STATEMENT,
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                wire::command_complete(&mut self.client.out, "DEALLOCATE");
            }
        }
        Ok(())
    }
}

/// `SHOW taskflow.shards` (any case and spacing, an optional `;`).
fn is_show_shards(sql: &str) -> bool {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    words == ["show", "taskflow.shards"]
}

#[cfg(test)]
mod tests {
    #[test]
    fn show_shards_is_recognised_exactly() {
        assert!(super::is_show_shards("SHOW taskflow.shards"));
        assert!(super::is_show_shards("  show   TASKFLOW.SHARDS ; "));
        assert!(!super::is_show_shards("SHOW taskflow.shard"));
        assert!(!super::is_show_shards("SHOW search_path"));
    }
}
