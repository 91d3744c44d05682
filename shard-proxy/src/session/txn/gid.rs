//! The names of the proxy's prepared transactions.
//!
//! A gid is `taskflow_<txn id>.<instance id>.<shard>`: the 32-hex transaction id names
//! the decision row in `taskflow_meta.decisions`, the instance id names the proxy that
//! owns it (so recovery knows whether the owner is alive), the shard name keeps the gids
//! of one transaction distinct. Gids of earlier versions (`taskflow_<id>_<shard>`) carry
//! no owner.

/// Prefix of every prepared-transaction id the proxy creates.
pub const GID_PREFIX: &str = "taskflow_";

/// The gid of transaction `id`, owned by `instance`, on shard `shard`.
pub fn gid(id: &str, instance: &str, shard: &str) -> String {
    format!("{GID_PREFIX}{id}.{instance}.{shard}")
}

/// What a gid says: the transaction id and its owner (none for gids of earlier versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub id: &'a str,
    pub owner: Option<&'a str>,
}

/// Reads one of our gids.
pub fn parse(gid: &str) -> Option<Parsed<'_>> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let id = rest.get(..32)?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match rest.as_bytes().get(32) {
        Some(b'_') => Some(Parsed { id, owner: None }),
        Some(b'.') => {
            let owner = rest.get(33..)?.split('.').next()?;
            (!owner.is_empty()).then_some(Parsed {
                id,
                owner: Some(owner),
            })
        }
        _ => None,
    }
}

/// The shard a gid names (either format).
pub fn shard_of(gid: &str) -> Option<&str> {
    let rest = gid.strip_prefix(GID_PREFIX)?.get(32..)?;
    match rest.as_bytes().first() {
        Some(b'_') => rest.get(1..),
        Some(b'.') => rest.rsplit('.').next(),
        _ => None,
    }
    .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_name_transaction_and_owner() {
        let id = "0123456789abcdef0123456789abcdef";
        let g = gid(id, "host-6432", "shard_1");
        assert_eq!(
            parse(&g),
            Some(Parsed {
                id,
                owner: Some("host-6432")
            })
        );
        assert_eq!(
            parse(&format!("taskflow_{id}_shard-1")),
            Some(Parsed { id, owner: None })
        );
        assert_eq!(parse("taskflow_short_shard-1"), None);
        assert_eq!(parse(&format!("other_{id}_x")), None);
        assert_eq!(parse(&format!("taskflow_{id}..shard-1")), None);
        assert_eq!(shard_of(&g), Some("shard_1"));
        assert_eq!(shard_of(&format!("taskflow_{id}_shard_1")), Some("shard_1"));
    }
}
