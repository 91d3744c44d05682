//! The admin console's command language: a handful of fixed phrases, matched word by word,
//! case-insensitively.
//!
//! Why not the SQL parser: none of these is SQL, and a fixed list of phrases needs no
//! grammar — only a clear error naming what exists.

use proxy_core::wire::sqlstate;

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowShards,
    ShowRing,
    ShowPools,
    ShowClients,
    ShowStats,
    /// `SHOW PROXIES`: the proxies registered in `taskflow_meta.proxies`.
    ShowProxies,
    /// `SHOW SHARD FOR <key>`: which shard owns a `performer_id`.
    ShowShardFor(i64),
    Pause,
    Resume,
    Reload,
    /// `ADD SHARD <name> '<url>'`.
    AddShard {
        name: String,
        url: String,
    },
    /// `REMOVE SHARD <name>`.
    RemoveShard(String),
    /// `SHOW MIGRATIONS`: every online migration, newest first.
    ShowMigrations,
    /// `PAUSE MIGRATION` / `RESUME MIGRATION`.
    PauseMigration,
    ResumeMigration,
    /// `SET MIGRATION THROTTLE <rows per second>` (0: none).
    SetThrottle(u32),
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("invalid key {0}: expected a bigint")]
    BadKey(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("unknown admin command \"{0}\"; try SHOW SHARDS | RING | POOLS | CLIENTS | STATS | PROXIES, SHOW SHARD FOR <key>, PAUSE, RESUME, RELOAD, ADD SHARD, REMOVE SHARD, SHOW MIGRATIONS, PAUSE MIGRATION, RESUME MIGRATION, SET MIGRATION THROTTLE <n>")]
    Unknown(String),
}

impl CommandError {
    /// The SQLSTATE the client receives.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::BadKey(_) | CommandError::Unknown(_) | CommandError::Usage(_) => {
                sqlstate::SYNTAX_ERROR
            }
        }
    }
}

impl Command {
    /// Reads one statement (without its `;`).
    pub fn parse(stmt: &str) -> Result<Command, CommandError> {
        let words: Vec<String> = stmt
            .split_whitespace()
            .map(|w| w.to_ascii_uppercase())
            .collect();
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        Ok(match w.as_slice() {
            ["SHOW", "SHARDS"] => Command::ShowShards,
            ["SHOW", "RING"] => Command::ShowRing,
            ["SHOW", "POOLS"] => Command::ShowPools,
            ["SHOW", "CLIENTS"] => Command::ShowClients,
            ["SHOW", "STATS"] => Command::ShowStats,
            ["SHOW", "PROXIES"] => Command::ShowProxies,
            ["SHOW", "SHARD", "FOR", key] => key
                .trim_matches('\'')
                .parse::<i64>()
                .map(Command::ShowShardFor)
                .map_err(|_| CommandError::BadKey((*key).to_owned()))?,
            ["PAUSE"] => Command::Pause,
            ["RESUME"] => Command::Resume,
            ["RELOAD"] => Command::Reload,
            ["SHOW", "MIGRATIONS"] => Command::ShowMigrations,
            ["PAUSE", "MIGRATION"] => Command::PauseMigration,
            ["RESUME", "MIGRATION"] => Command::ResumeMigration,
            ["SET", "MIGRATION", "THROTTLE", n] => {
                n.parse::<u32>().map(Command::SetThrottle).map_err(|_| {
                    CommandError::Usage("SET MIGRATION THROTTLE <rows per second, 0 = none>")
                })?
            }
            ["ADD", "SHARD", ..] | ["REMOVE", "SHARD", ..] => return shard_change(stmt),
            _ => return Err(CommandError::Unknown(stmt.to_owned())),
        })
    }
}

/// `ADD SHARD <name> '<url>'` or `REMOVE SHARD <name>`, keeping the name's and URL's case.
fn shard_change(stmt: &str) -> Result<Command, CommandError> {
    let raw: Vec<&str> = stmt.split_whitespace().collect();
    let usage = || CommandError::Usage("ADD SHARD <name> '<postgres://…>' | REMOVE SHARD <name>");
    let name = raw.get(2).map(|n| n.trim_matches('"')).ok_or_else(usage)?;
    let valid = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(usage());
    }
    let adding = raw.first().is_some_and(|w| w.eq_ignore_ascii_case("ADD"));
    match (adding, raw.get(3), raw.len()) {
        (true, Some(url), 4) if url.len() > 2 && url.starts_with('\'') && url.ends_with('\'') => {
            Ok(Command::AddShard {
                name: name.to_owned(),
                url: url[1..url.len() - 1].to_owned(),
            })
        }
        (false, None, 3) => Ok(Command::RemoveShard(name.to_owned())),
        _ => Err(usage()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command_in_any_case() {
        assert_eq!(Command::parse("show shards"), Ok(Command::ShowShards));
        assert_eq!(Command::parse("  SHOW   Ring "), Ok(Command::ShowRing));
        assert_eq!(
            Command::parse("show shard for '42'"),
            Ok(Command::ShowShardFor(42))
        );
        assert_eq!(Command::parse("pause"), Ok(Command::Pause));
        assert_eq!(Command::parse("show proxies"), Ok(Command::ShowProxies));
        assert_eq!(
            Command::parse("add shard Shard-4 'postgres://TaskFlow@h:5437/tasks'"),
            Ok(Command::AddShard {
                name: "Shard-4".into(),
                url: "postgres://TaskFlow@h:5437/tasks".into()
            })
        );
        assert_eq!(
            Command::parse("REMOVE SHARD shard-4"),
            Ok(Command::RemoveShard("shard-4".into()))
        );
        assert!(Command::parse("ADD SHARD shard-4").is_err());
        assert!(Command::parse("ADD SHARD 'x y' 'u'").is_err());
    }

    #[test]
    fn refuses_clearly() {
        assert_eq!(
            Command::parse("SHOW SHARD FOR x"),
            Err(CommandError::BadKey("X".into()))
        );
        let e = Command::parse("DROP TABLE tasks").expect_err("unknown");
        assert!(e.to_string().contains("try SHOW SHARDS"), "{e}");
        assert_eq!(e.code(), sqlstate::SYNTAX_ERROR);
    }
}
