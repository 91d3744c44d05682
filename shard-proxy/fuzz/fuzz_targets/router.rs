//! Fuzzes the router (the proxy's SQL trust boundary): for any SQL text and any Bind
//! parameters, analysing and planning must never panic, and every plan must be
//! well-formed (shard indexes in range, per-shard SQL only for a split INSERT, a merge
//! spec exactly for scatter reads). Scatter plans are then fed arbitrary rows through the
//! merger, which must answer or fail with a typed error.
//!
//! Input layout: SQL text, then an optional 0xFF byte followed by parameter material:
//! one byte of format codes, then values separated by 0xFE (a lone 0xFD is NULL).
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use taskflow_proxy_core::merge::{Column, Merger};
use taskflow_proxy_core::ring::Ring;
use taskflow_proxy_core::router::{Params, Router, ShardingRules, Target};

fn state() -> &'static (Router, Ring) {
    static STATE: OnceLock<(Router, Ring)> = OnceLock::new();
    STATE.get_or_init(|| {
        let rules = ShardingRules {
            database: "tasks".into(),
            tables: vec!["tasks".into(), "task_observers".into(), "outbox".into()],
            key_column: "performer_id".into(),
        };
        // No cache: every input is analysed from scratch, so runs are reproducible.
        let router = Router::with_cache_capacity(rules, 0);
        let ring = Ring::new(["shard-1", "shard-2", "shard-3"], 16).expect("static ring");
        (router, ring)
    })
}

fuzz_target!(|data: &[u8]| {
    let (router, ring) = state();
    let (sql, rest) = match data.iter().position(|b| *b == 0xFF) {
        Some(p) => (&data[..p], &data[p + 1..]),
        None => (data, &[][..]),
    };
    let Ok(sql) = std::str::from_utf8(sql) else {
        return;
    };
    let analysis = router.analyze(sql);

    let (fmt, values) = rest.split_first().map_or((0u8, &[][..]), |(f, v)| (*f, v));
    let values: Vec<Option<&[u8]>> = if values.is_empty() {
        Vec::new()
    } else {
        values
            .split(|b| *b == 0xFE)
            .take(16)
            .map(|v| if v == [0xFD] { None } else { Some(v) })
            .collect()
    };
    let formats: Vec<i16> = match fmt % 3 {
        0 => Vec::new(),
        1 => vec![i16::from(fmt >> 7)],
        _ => (0..values.len())
            .map(|i| i16::from((fmt >> (i % 7)) & 1))
            .collect(),
    };
    let types: Vec<u32> = (0..values.len())
        .map(|i| [0u32, 20, 21, 23, 25, 1700][(usize::from(fmt) + i) % 6])
        .collect();
    let params = Params {
        values: &values,
        formats: &formats,
        types: &types,
    };
    let session = if fmt & 0x40 != 0 {
        Some("shard-2")
    } else {
        None
    };

    let Ok(plan) = analysis.plan(ring, &params, session) else {
        return;
    };
    let n = ring.shards().len();
    match &plan.target {
        Target::One(i) => assert!(*i < n),
        Target::Many(v) => {
            assert!(v.len() >= 2 && v.iter().all(|i| *i < n));
            assert!(v.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        }
        Target::All => {}
    }
    if let Some(per) = &plan.per_shard_sql {
        assert!(matches!(plan.target, Target::Many(_)));
        for (shard, text, kept) in per {
            assert!(*shard < n && !text.is_empty());
            assert!(
                kept.windows(2).all(|w| w[0] < w[1]),
                "kept params ascending"
            );
        }
    }
    assert_eq!(plan.scatter_read, plan.merge.is_some());

    if let Some(spec) = &plan.merge {
        // Columns and rows from the parameter bytes: the merger must not panic.
        let width = spec.aggregates.len().max(1 + spec.hidden_columns);
        let oids = [20u32, 23, 25, 700, 701, 1700, 1114, 1184, 1082, 16, 2950];
        let columns: Vec<Column> = (0..width)
            .map(|i| Column {
                type_oid: oids[(usize::from(fmt) + i) % oids.len()],
                format: i16::from((fmt >> (i % 5)) & 1),
            })
            .collect();
        let mut merger = Merger::new(spec, columns);
        for chunk in rest.chunks(width.max(1) * 3).take(32) {
            let row = (0..width)
                .map(|i| {
                    let lo = (i * 3).min(chunk.len());
                    let hi = (lo + 3).min(chunk.len());
                    let cell = &chunk[lo..hi];
                    (cell != [0xFD]).then(|| Bytes::copy_from_slice(cell))
                })
                .collect();
            if merger.push(row).is_err() {
                return;
            }
        }
        let _ = merger.finish();
    }
});
