//! PostgreSQL type OIDs the proxy itself interprets (from `pg_type.dat`), in one table:
//! the merger decodes and encodes cells by them, the router decodes binary shard-key
//! parameters by them, and the wire builders describe the proxy's own result columns.

/// `bool`.
pub const BOOL: u32 = 16;
/// `bytea`.
pub const BYTEA: u32 = 17;
/// `"char"` (one byte).
pub const CHAR: u32 = 18;
/// `name`.
pub const NAME: u32 = 19;
/// `int8` / `bigint`.
pub const INT8: u32 = 20;
/// `int2` / `smallint`.
pub const INT2: u32 = 21;
/// `int4` / `integer`.
pub const INT4: u32 = 23;
/// `text`.
pub const TEXT: u32 = 25;
/// `oid`.
pub const OID: u32 = 26;
/// `float4` / `real`.
pub const FLOAT4: u32 = 700;
/// `float8` / `double precision`.
pub const FLOAT8: u32 = 701;
/// `unknown` (an untyped literal or parameter).
pub const UNKNOWN: u32 = 705;
/// `bpchar` / `char(n)`.
pub const BPCHAR: u32 = 1042;
/// `varchar`.
pub const VARCHAR: u32 = 1043;
/// `date`.
pub const DATE: u32 = 1082;
/// `time`.
pub const TIME: u32 = 1083;
/// `timestamp`.
pub const TIMESTAMP: u32 = 1114;
/// `timestamptz`.
pub const TIMESTAMPTZ: u32 = 1184;
/// `numeric`.
pub const NUMERIC: u32 = 1700;
/// `uuid`.
pub const UUID: u32 = 2950;
