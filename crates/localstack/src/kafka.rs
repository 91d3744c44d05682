//! A real Kafka-API broker: `tansu` with in-memory storage, on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::error::{Error, IoContext, Result};
use crate::process::{ManagedChild, StopPolicy};
use crate::util::{cache_dir, free_port, is_executable, reserve_port, tcp_connectable, which};

/// Version of tansu that `scripts/ensure-tansu.sh` installs.
pub const TANSU_VERSION: &str = "0.6.0";

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds the `tansu` binary: `$TASKFLOW_TANSU_BIN`, else
/// `${TASKFLOW_CACHE:-/var/cache/taskflow}/tansu-0.6.0/bin/tansu`, else `$PATH`.
pub fn tansu_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TASKFLOW_TANSU_BIN") {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(Error::BinaryNotFound(format!(
                "TASKFLOW_TANSU_BIN={} is not an executable file",
                p.display()
            )))
        };
    }
    let cached = cache_dir()
        .join(format!("tansu-{TANSU_VERSION}"))
        .join("bin")
        .join("tansu");
    if is_executable(&cached) {
        return Ok(cached);
    }
    which("tansu").ok_or_else(|| {
        Error::BinaryNotFound(format!(
            "the Kafka-API broker `tansu` was not found (looked at $TASKFLOW_TANSU_BIN, {}, $PATH): \
             run scripts/ensure-tansu.sh",
            cached.display()
        ))
    })
}

/// Options for a [`KafkaBroker`]; defaults: free port, temporary directory for the log.
#[derive(Debug, Clone)]
pub struct KafkaBrokerBuilder {
    port: Option<u16>,
    log_file: Option<PathBuf>,
    cluster_id: String,
    startup_timeout: Duration,
}

impl KafkaBrokerBuilder {
    /// Listen (and advertise) on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Where the broker's output goes. Default: a file in a temporary directory.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Kafka cluster id (default `taskflow`).
    pub fn cluster_id(mut self, id: impl Into<String>) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// How long to wait for the broker to answer a metadata request (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts tansu and waits until it serves Kafka metadata.
    pub async fn start(self) -> Result<KafkaBroker> {
        let bin = tansu_binary()?;
        let port = match self.port {
            Some(p) => {
                reserve_port(p);
                p
            }
            None => free_port()?,
        };
        let temp = tempfile::Builder::new()
            .prefix("taskflow-kafka-")
            .tempdir()
            .ctx(|| "creating a temporary directory for the broker".to_owned())?;
        let log_path = self
            .log_file
            .unwrap_or_else(|| temp.path().join("tansu.log"));
        let mut broker = KafkaBroker {
            bin,
            port,
            log_path,
            cluster_id: self.cluster_id,
            startup_timeout: self.startup_timeout,
            topics: Vec::new(),
            child: None,
            temp,
        };
        broker.start().await?;
        Ok(broker)
    }
}

/// A running (or stopped) tansu broker listening on and advertising `127.0.0.1:<port>`.
///
/// Storage is in memory (`memory://tansu/`): a [`Self::stop`]/[`Self::start`] cycle
/// loses topics and messages. Topics created through [`Self::create_topic`] are created
/// again on restart so producers can resume after a simulated outage.
#[derive(Debug)]
pub struct KafkaBroker {
    bin: PathBuf,
    port: u16,
    log_path: PathBuf,
    cluster_id: String,
    startup_timeout: Duration,
    topics: Vec<(String, i32)>,
    child: Option<ManagedChild>,
    temp: tempfile::TempDir,
}

impl KafkaBroker {
    /// Options with test defaults.
    pub fn builder() -> KafkaBrokerBuilder {
        KafkaBrokerBuilder {
            port: None,
            log_file: None,
            cluster_id: "taskflow".to_owned(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }

    /// A broker on a free port (same as `KafkaBroker::builder().start()`).
    pub async fn temp() -> Result<Self> {
        Self::builder().start().await
    }

    /// The command-line arguments given to `tansu`.
    pub fn args(&self) -> Vec<String> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        vec![
            "broker".to_owned(),
            "--cluster-id".to_owned(),
            self.cluster_id.clone(),
            "--listener-url".to_owned(),
            url.clone(),
            "--advertised-listener-url".to_owned(),
            url,
            "--storage-engine".to_owned(),
            "memory://tansu/".to_owned(),
        ]
    }

    /// Starts the broker again after [`Self::stop`] (no-op when running) and re-creates
    /// the topics made with [`Self::create_topic`].
    pub async fn start(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.ensure_running().is_ok() {
                return Ok(());
            }
            self.child = None;
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.args())
            .current_dir(self.temp.path())
            // clap reads these too; make sure only our flags count.
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("CLUSTER_ID");
        let policy = StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(5),
        };
        self.child = Some(ManagedChild::spawn(
            "tansu",
            &mut cmd,
            &self.log_path,
            policy,
        )?);
        self.wait_ready().await?;
        for (name, partitions) in self.topics.clone() {
            self.create_topic_inner(&name, partitions).await?;
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        loop {
            let last_error = if tcp_connectable(self.port).await {
                match self.metadata_broker_count(Duration::from_secs(2)).await {
                    Ok(n) if n > 0 => return Ok(()),
                    Ok(_) => "metadata lists no brokers".to_owned(),
                    Err(e) => e.to_string(),
                }
            } else {
                "connection refused".to_owned()
            };
            if let Some(child) = self.child.as_mut() {
                child.ensure_running()?;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("tansu broker on 127.0.0.1:{}", self.port),
                    after: self.startup_timeout,
                    last_error: Some(last_error),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metadata_broker_count(&self, timeout: Duration) -> Result<usize> {
        let config = self.client_config();
        tokio::task::spawn_blocking(move || -> Result<usize> {
            let consumer: BaseConsumer = config.create()?;
            let md = consumer.fetch_metadata(None, timeout)?;
            Ok(md.brokers().len())
        })
        .await
        .map_err(|e| Error::io("joining metadata probe", std::io::Error::other(e)))?
    }

    /// Partition count of `topic` per broker metadata, `None` if unknown to the broker.
    pub async fn topic_partitions(&self, topic: &str) -> Result<Option<usize>> {
        let config = self.client_config();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> Result<Option<usize>> {
            let consumer: BaseConsumer = config.create()?;
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .filter(|n| *n > 0))
        })
        .await
        .map_err(|e| Error::io("joining metadata probe", std::io::Error::other(e)))?
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// An rdkafka config with `bootstrap.servers` set to this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4");
        config
    }

    /// Creates `name` with `partitions` partitions (replication 1) unless it exists, and
    /// waits until the broker's metadata lists it. Remembered for restarts.
    pub async fn create_topic(&mut self, name: &str, partitions: i32) -> Result<()> {
        self.create_topic_inner(name, partitions).await?;
        if !self.topics.iter().any(|(t, _)| t == name) {
            self.topics.push((name.to_owned(), partitions));
        }
        Ok(())
    }

    async fn create_topic_inner(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics([&topic], &opts).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(Error::Kafka(KafkaError::AdminOp(code))),
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.topic_partitions(name).await?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("topic {name} to appear in broker metadata"),
                    after: Duration::from_secs(30),
                    last_error: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pid of the broker while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ManagedChild::pid)
    }

    /// Whether the broker process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.ensure_running().is_ok())
    }

    /// Stops the broker (simulated outage); [`Self::start`] brings it back, empty but for
    /// the remembered topics.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop().await;
        }
        Ok(())
    }

    /// Leaves the broker running after this value is dropped; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.as_mut().and_then(ManagedChild::detach)
    }
}
