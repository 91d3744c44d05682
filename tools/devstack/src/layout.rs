//! Where the stack keeps its state, and which ports it uses.
//!
//! Defaults are the seed's ports; every one can be moved with `DEVSTACK_<NAME>_PORT`
//! (e.g. `DEVSTACK_GATEWAY_PORT=3100`) so two projects need not collide. The state
//! directory is `$DEVSTACK_STATE_DIR`, else `.state/` in the current directory.
//! The spare shard's cluster (`pg-shard-4`, `make add-shard`) moves the same way
//! (`DEVSTACK_PG_SHARD_4_PORT`).

use std::path::PathBuf;

/// A service the stack runs, with its default port.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    pub name: &'static str,
    pub port: u16,
    pub what: &'static str,
}

pub const SERVICES: &[Service] = &[
    Service {
        name: "pg-auth",
        port: 5435,
        what: "PostgreSQL auth DB",
    },
    Service {
        name: "pg-shard-1",
        port: 5432,
        what: "PostgreSQL shard-1",
    },
    Service {
        name: "pg-shard-2",
        port: 5433,
        what: "PostgreSQL shard-2",
    },
    Service {
        name: "pg-shard-3",
        port: 5434,
        what: "PostgreSQL shard-3",
    },
    Service {
        name: "redis",
        port: 6379,
        what: "Redis",
    },
    Service {
        name: "kafka",
        port: 9092,
        what: "Kafka API (tansu, in memory)",
    },
    Service {
        name: "smtp",
        port: 1025,
        what: "SMTP sink (maildev, or mailpit under Nix)",
    },
    Service {
        name: "smtp-ui",
        port: 8050,
        what: "SMTP sink web UI",
    },
    Service {
        name: "shard-proxy",
        port: 6432,
        what: "taskflow-shard-proxy (PG wire)",
    },
    Service {
        name: "proxy-metrics",
        port: 9930,
        what: "shard proxy metrics",
    },
    Service {
        name: "auth",
        port: 8081,
        what: "taskflow-auth",
    },
    Service {
        name: "auth-ops",
        port: 9933,
        what: "taskflow-auth /metrics, /readyz",
    },
    Service {
        name: "gateway",
        port: 3000,
        what: "taskflow-gateway",
    },
    Service {
        name: "gateway-ops",
        port: 9932,
        what: "taskflow-gateway /metrics, /readyz",
    },
    Service {
        name: "notify-metrics",
        port: 9931,
        what: "taskflow-notify metrics",
    },
];

/// Services the stack runs only once `make add-shard` asked for them (see `crate::shards`).
pub const SPARE_SERVICES: &[Service] = &[Service {
    name: "pg-shard-4",
    port: 5437,
    what: "PostgreSQL shard-4 (make add-shard)",
}];

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn from_env() -> Self {
        let root = std::env::var_os("DEVSTACK_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".state"));
        let root = std::path::absolute(&root).unwrap_or(root);
        Layout { root }
    }

    pub fn port(&self, name: &str) -> u16 {
        let default = SERVICES
            .iter()
            .chain(SPARE_SERVICES)
            .find(|s| s.name == name)
            .map(|s| s.port)
            .unwrap_or(0);
        let var = format!(
            "DEVSTACK_{}_PORT",
            name.to_ascii_uppercase().replace('-', "_")
        );
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    pub fn pg_dir(&self, name: &str) -> PathBuf {
        self.root.join("pg").join(name)
    }
    pub fn redis_dir(&self) -> PathBuf {
        self.root.join("redis")
    }
    pub fn mail_dir(&self) -> PathBuf {
        self.root.join("mail")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log(&self, service: &str) -> PathBuf {
        self.logs().join(format!("{service}.log"))
    }
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("stack.lock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("stack.pid")
    }
    pub fn ready_file(&self) -> PathBuf {
        self.root.join("stack.ready")
    }
    pub fn status_dir(&self) -> PathBuf {
        self.root.join("status")
    }
    /// The shards `make add-shard` added, one name a line (`crate::shards`).
    pub fn added_shards_file(&self) -> PathBuf {
        self.root.join("added-shards")
    }
    /// Where a running supervisor takes requests (`crate::channel`).
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    pub fn ensure_dirs(&self) -> std::io::Result<()> {
        for d in [
            self.root.clone(),
            self.logs(),
            self.config_dir(),
            self.secrets(),
            self.status_dir(),
            self.root.join("pg"),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        Ok(())
    }
}

/// Is something accepting TCP connections on 127.0.0.1:`port`?
pub async fn answers(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}
