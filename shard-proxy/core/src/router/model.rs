//! The router's vocabulary: the rules it applies, what it learns about a statement
//! ([`Analysis`]) and what it decides per execution ([`Plan`], [`Target`], [`RouteError`]).
//!
//! Why a module of its own: every stage of the router (analysis, scatter planning, plan,
//! cache) speaks these types, and the `Router` facade uses those stages; keeping
//! the types in a leaf makes every dependency inside the router point one way.

use std::sync::Arc;

pub use crate::merge::MergeSpec;

/// Which tables are sharded and by which column (from `[sharding]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardingRules {
    /// The logical sharded database (`tasks`).
    pub database: String,
    /// Sharded tables, unqualified (`tasks`, `task_observers`, `outbox`).
    pub tables: Vec<String>,
    /// The shard key column (`performer_id`), a bigint in every sharded table.
    pub key_column: String,
}

/// What kind of statement this is (the first one, for a multi-statement string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// SELECT / VALUES / TABLE (and set operations of them).
    Select,
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT (also ROLLBACK TO SAVEPOINT).
    Rollback,
    /// SAVEPOINT / RELEASE SAVEPOINT.
    Savepoint,
    /// `SET taskflow.shard = 'name'` (`Some`), or `… TO DEFAULT` / `RESET taskflow.shard`
    /// (`None`).
    SetShard(Option<String>),
    /// Any other SET / RESET / DISCARD.
    Set,
    /// SHOW, and EXPLAIN (which also returns rows without changing anything).
    Show,
    /// COPY.
    Copy {
        /// `COPY … FROM STDIN` (rows come from the client).
        from_stdin: bool,
    },
    /// SQL-level PREPARE.
    Prepare,
    /// SQL-level EXECUTE.
    Execute,
    /// DEALLOCATE.
    Deallocate,
    /// DDL and other utility statements.
    Utility,
    /// Empty query string (only whitespace, comments or `;`).
    Empty,
    /// The parser could not read it; the message says why.
    Unparsed(String),
}

/// One shard-key value as written in the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue {
    /// A literal integer.
    Literal(i64),
    /// A bind parameter, 0-based (`$1` is `Param(0)`).
    Param(usize),
}

/// Where a statement's shard key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    /// No usable key.
    None,
    /// The rows touched have one of these keys (WHERE equality / IN / OR of equalities).
    Any(Vec<KeyValue>),
    /// INSERT VALUES: the key of each row, in row order.
    PerRow(Vec<KeyValue>),
}

/// Bind parameters of one execution (empty for simple queries).
#[derive(Debug, Clone, Copy, Default)]
pub struct Params<'a> {
    /// Values, `None` = NULL.
    pub values: &'a [Option<&'a [u8]>],
    /// Format codes as in Bind: empty = all text, one = applies to all, else per parameter.
    pub formats: &'a [i16],
    /// Parameter type OIDs from Parse (0 or missing = unspecified).
    pub types: &'a [u32],
}

/// Where a statement goes. Indexes are into [`Ring::shards`](crate::ring::Ring::shards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this shard.
    One(usize),
    /// These shards (sorted, distinct, at least two).
    Many(Vec<usize>),
    /// Every shard.
    All,
}

/// The routing decision for one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where to send it.
    pub target: Target,
    /// Only for a multi-row INSERT split across shards: for each shard, the SQL holding
    /// just that shard's rows, and the original (0-based) parameter indexes it uses, in the
    /// order of its new `$1, $2, …`.
    pub per_shard_sql: Option<Vec<(usize, String, Vec<usize>)>>,
    /// A read whose results from several shards must go through a
    /// [`crate::merge::Merger`] built from `merge`.
    pub scatter_read: bool,
    /// How to merge (`Some` exactly when `scatter_read`). Send `merge.shard_sql` to the
    /// shards instead of the client's SQL when it is `Some`. LIMIT/OFFSET parameters are
    /// already resolved here.
    pub merge: Option<MergeSpec>,
    /// `(shard, arc)`: keys of this execution that sit in a moving arc of a migration in
    /// progress ([`crate::placement`]); the statement must be guarded on each such shard.
    /// Empty when nothing moves.
    pub guards: Vec<(usize, u32)>,
}

/// Why a statement can't be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// INSERT into a sharded table without the shard key.
    #[error(
        "INSERT into sharded table \"{table}\" must set the shard key column \"{column}\" \
         in its column list, with an integer literal or a $n parameter in every row \
         (or route it explicitly with /* shard=<name> */)"
    )]
    InsertWithoutKey {
        /// The table.
        table: String,
        /// The key column.
        column: String,
    },
    /// A hint or `SET taskflow.shard` names a shard that doesn't exist.
    #[error("unknown shard \"{0}\" (see SHOW SHARDS in the admin console)")]
    UnknownShard(String),
    /// A `$n` shard key could not be decoded.
    #[error("shard key parameter ${} is unusable: {reason}", index + 1)]
    BadKeyParam {
        /// 0-based parameter index.
        index: usize,
        /// What was wrong.
        reason: String,
    },
    /// Something the proxy refuses rather than risk a wrong answer.
    #[error("not supported by the shard proxy: {0}")]
    Unsupported(String),
}

/// LIMIT/OFFSET value of a scatter read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Literal(u64),
    Param(usize),
}

/// A multi-row INSERT kept for splitting by shard: its text, re-parsed only when its rows
/// do land on several shards (keeping the AST in the cache would cost ~30× the text).
#[derive(Debug)]
pub(crate) struct InsertTemplate {
    pub(crate) sql: String,
}

/// What the router learned about one SQL text. Cached and shared; [`Analysis::plan`]
/// turns it into a routing decision per execution.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Statement kind (of the first statement).
    pub kind: StatementKind,
    /// Shard named by a `/* shard=name */` comment anywhere in the text.
    pub hint: Option<String>,
    /// Whether any statement reads or writes a sharded table.
    pub touches_sharded: bool,
    /// Where the shard key comes from.
    pub keys: KeyExpr,
    /// How to merge a read spanning several shards (LIMIT/OFFSET given as `$n` are left
    /// `None`/0 here; [`Plan::merge`] has them resolved).
    pub merge: Option<MergeSpec>,
    /// Whether it modifies data or schema (INSERT/UPDATE/DELETE, data-modifying WITH,
    /// DDL, COPY FROM).
    pub is_write: bool,
    /// Statements in the text (a simple query may hold several, `;`-separated).
    pub statement_count: usize,
    /// Session state the text leaves on a server connection that cannot be replayed
    /// ([`crate::sqltext::session_state`]). Found once per cached analysis: it depends only
    /// on the statement's words outside literals, which every statement of one shape shares.
    pub session_state: Option<&'static str>,
    pub(crate) detail: Detail,
}

/// Private routing details of an [`Analysis`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Detail {
    /// Returned by `plan` unless a hint or session shard routes the statement.
    pub(crate) refusal: Option<RouteError>,
    /// Why a read that spans several shards can't be merged (only matters then).
    pub(crate) scatter_refusal: Option<String>,
    pub(crate) limit: Option<Count>,
    pub(crate) offset: Option<Count>,
    /// UPDATE … SET key = v, and the error if v lands elsewhere.
    pub(crate) key_update: Option<(KeyValue, RouteError)>,
    /// Multi-row INSERT, for per-shard splitting.
    pub(crate) insert: Option<Arc<InsertTemplate>>,
    /// A read that goes to one shard when it has no key (EXPLAIN, SHOW).
    pub(crate) single_shard_read: bool,
    /// Several statements in one string.
    pub(crate) multi: bool,
    /// A statement of a multi-statement string needs every shard (SET, DDL, BEGIN, …).
    pub(crate) broadcast: bool,
}

impl Analysis {
    pub(crate) fn new(kind: StatementKind) -> Analysis {
        Analysis {
            kind,
            hint: None,
            touches_sharded: false,
            keys: KeyExpr::None,
            merge: None,
            is_write: false,
            statement_count: 1,
            session_state: None,
            detail: Detail::default(),
        }
    }

    /// The error `plan` returns when no hint or session shard routes the statement.
    pub fn refusal(&self) -> Option<&RouteError> {
        self.detail.refusal.as_ref()
    }
}
