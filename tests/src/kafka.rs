//! A real Kafka-compatible broker for the tests: Tansu (`tansu broker`, Apache-2.0, written
//! in Rust) with its SQLite storage engine, one broker per test on its own loopback port and
//! data file, and the rdkafka client (the crate's bundled librdkafka, the worker's own) to
//! create topics, produce jobs and read what the consumers committed.
//!
//! `scripts/test-servers.sh` installs Tansu once per machine (`cargo install tansu`, into
//! `~/.cargo/bin`); `MAILPIPE_TANSU_BIN` points at another binary. Tansu 0.6 deletes every
//! topic when one is deleted and cannot describe groups, so each test has a broker of its
//! own and reads a group's progress with OffsetFetch (`committed_offsets`) and the
//! partitions' watermarks, never DescribeGroups.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::eventually;
use crate::process::Proc;
use crate::worker::Worker;

/// How long a client call may take before the test gives up on the broker.
const CALL: Duration = Duration::from_secs(10);

/// The Tansu binary: `MAILPIPE_TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on PATH.
fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MAILPIPE_TANSU_BIN") {
        return path.into();
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin/tansu"));
    match cargo_bin {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("tansu"),
    }
}

/// A private Tansu broker, killed when dropped.
pub struct KafkaBroker {
    proc: Option<Proc>,
    /// Its port (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
    /// With `--authentication`: the SCRAM-SHA-256 login the test's own clients use.
    login: Option<(String, String)>,
    /// A TLS front every client goes through (Tansu 0.6 does not serve TLS itself).
    tls: Option<TlsFront>,
}

/// socat terminating TLS with the test PKI's server certificate in front of the broker,
/// which advertises the front's address, so every connection (bootstrap and the brokers
/// from metadata) is TLS.
struct TlsFront {
    port: u16,
    pki: crate::certs::TestPki,
    proc: Option<Proc>,
}

impl KafkaBroker {
    /// Starts one on a free port with an empty SQLite store.
    pub async fn start() -> KafkaBroker {
        let mut broker = KafkaBroker {
            proc: None,
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            login: None,
            tls: None,
        };
        broker.launch().await;
        broker
    }

    /// Starts one that clients reach only over TLS, through a socat front with a
    /// certificate for `localhost` signed by the test CA (`ca()`).
    pub async fn start_behind_tls() -> KafkaBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = crate::certs::make(dir.path());
        let mut broker = KafkaBroker {
            proc: None,
            port: crate::free_port(),
            dir,
            login: None,
            tls: Some(TlsFront {
                port: crate::free_port(),
                pki,
                proc: None,
            }),
        };
        broker.launch().await;
        broker
    }

    /// The CA that signed the TLS front's certificate, and one that signed nothing served.
    pub fn ca(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        self.tls
            .as_ref()
            .map(|t| (t.pki.ca.as_path(), t.pki.other_ca.as_path()))
    }

    /// Starts one that requires SASL, with the SCRAM-SHA-256 user `user`: created with
    /// `tansu user create` on a broker without authentication, which then restarts with
    /// it on the same store. The test's own clients log in as that user.
    pub async fn start_with_user(user: &str, password: &str) -> KafkaBroker {
        let mut broker = KafkaBroker::start().await;
        crate::process::run(
            Command::new(tansu_bin())
                .current_dir(broker.dir.path())
                .args(["user", "create", user, password, "--mechanism", "scram256"])
                .args(["--broker", &format!("tcp://127.0.0.1:{}", broker.port)]),
            "tansu user create",
        );
        broker.stop();
        broker.login = Some((user.to_string(), password.to_string()));
        broker.launch().await;
        broker
    }

    async fn launch(&mut self) {
        let bin = tansu_bin();
        let found = Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            panic!(
                "no Tansu broker at {}: scripts/test-servers.sh installs it (cargo install tansu --version 0.6.0 --locked --features libsql,dynostore), or set MAILPIPE_TANSU_BIN",
                bin.display()
            );
        }
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.tls {
            Some(front) => format!("tcp://localhost:{}", front.port),
            None => listener.clone(),
        };
        // Tansu reads the path of a sqlite:// URL relative to its working directory.
        let mut command = Command::new(&bin);
        command
            .current_dir(self.dir.path())
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://tansu.db"]);
        if self.login.is_some() {
            command.arg("--authentication");
        }
        let proc = Proc::spawn("tansu", command, &self.dir.path().join("tansu.log"));
        let port = self.port;
        eventually(Duration::from_secs(20), "tansu to listen", || async move {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        })
        .await;
        self.proc = Some(proc);
        if let Some(front) = &mut self.tls {
            if front.proc.is_none() {
                let mut socat = Command::new("socat");
                socat
                    .arg(format!(
                        "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                        front.port,
                        front.pki.cert.display(),
                        front.pki.key.display()
                    ))
                    .arg(format!("TCP:127.0.0.1:{port}"));
                front.proc = Some(Proc::spawn(
                    "socat",
                    socat,
                    &self.dir.path().join("socat.log"),
                ));
                let front_port = front.port;
                eventually(
                    Duration::from_secs(20),
                    "the TLS front to listen",
                    || async move {
                        std::net::TcpStream::connect(("127.0.0.1", front_port))
                            .ok()
                            .map(drop)
                    },
                )
                .await;
            }
        }
    }

    /// What the broker printed (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// The broker process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `127.0.0.1:PORT` (`localhost:PORT` of the TLS front), for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        if let Some(front) = &self.tls {
            return format!("localhost:{}", front.port);
        }
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it; its data stays for [`KafkaBroker::restart`].
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.launch().await;
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4");
        if let Some(front) = &self.tls {
            config
                .set("security.protocol", "ssl")
                .set("ssl.ca.location", front.pki.ca.display().to_string());
        }
        if let Some((user, password)) = &self.login {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanism", "SCRAM-SHA-256")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        config
    }

    /// The value of configuration `key` of `topic`, as the broker describes it.
    pub async fn topic_config(&self, topic: &str, key: &str) -> Option<String> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let described = admin
            .describe_configs(
                &[rdkafka::admin::ResourceSpecifier::Topic(topic)],
                &AdminOptions::new().request_timeout(Some(CALL)),
            )
            .await
            .expect("DescribeConfigs");
        let resource = described
            .into_iter()
            .next()?
            .expect("the topic's configuration");
        resource.get(key).and_then(|entry| entry.value.clone())
    }

    /// The partitions `topic` has.
    pub fn partitions(&self, topic: &str) -> usize {
        let consumer: BaseConsumer = self.client_config().create().expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), CALL)
            .expect("metadata");
        metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len())
    }

    /// Creates `topic` with `partitions` partitions (replication 1).
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(CALL)),
            )
            .await
            .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(name, e)| panic!("creating topic {name}: {e}"));
        }
    }

    /// Produces `payloads` to `topic`, round-robin over its `partitions`, waiting for each
    /// to be acknowledged.
    pub async fn produce(
        &self,
        topic: &str,
        partitions: i32,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) {
        let producer: FutureProducer = self
            .client_config()
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let mut pending = Vec::new();
        for (n, payload) in payloads.into_iter().enumerate() {
            let partition = (n as i32) % partitions;
            let producer = producer.clone();
            let topic = topic.to_string();
            pending.push(async move {
                producer
                    .send(
                        FutureRecord::<(), _>::to(&topic)
                            .payload(&payload)
                            .partition(partition),
                        CALL,
                    )
                    .await
                    .map(drop)
                    .map_err(|(e, _)| e)
            });
        }
        for result in futures::future::join_all(pending).await {
            result.expect("the broker acknowledged the job");
        }
    }

    /// The offsets `group` committed on `topic`'s partitions (`None` where it never did).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(list, CALL).expect("OffsetFetch");
        (0..partitions)
            .map(|partition| {
                match committed
                    .find_partition(topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(offset)) => Some(offset),
                    _ => None,
                }
            })
            .collect()
    }

    /// The high watermark (the next offset to be written) of each of `topic`'s partitions.
    pub fn high_watermarks(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self.client_config().create().expect("consumer");
        (0..partitions)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, CALL)
                    .expect("list offsets")
                    .1
            })
            .collect()
    }

    /// The lag of `group` on `topic`: high watermark minus committed offset, summed over
    /// partitions (a partition never committed counts from its start).
    pub fn lag(&self, group: &str, topic: &str, partitions: i32) -> i64 {
        let committed = self.committed(group, topic, partitions);
        self.high_watermarks(topic, partitions)
            .into_iter()
            .zip(committed)
            .map(|(high, committed)| high - committed.unwrap_or(0))
            .sum()
    }

    /// The topics the broker lists.
    pub fn topics(&self) -> Vec<String> {
        let consumer: BaseConsumer = self.client_config().create().expect("consumer");
        let metadata = consumer.fetch_metadata(None, CALL).expect("metadata");
        metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_string())
            .collect()
    }

    /// Every record of `topic` now, in partition and offset order.
    pub fn records(&self, topic: &str, partitions: i32) -> Vec<Record> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", crate::unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let highs = self.high_watermarks(topic, partitions);
        let mut records = Vec::new();
        for (partition, high) in (0..partitions).zip(highs) {
            if high == 0 {
                continue;
            }
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(topic, partition, Offset::Beginning)
                .expect("offset");
            consumer.assign(&list).expect("assign");
            let deadline = std::time::Instant::now() + CALL;
            loop {
                let message = match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => panic!("reading {topic}/{partition}: {error}"),
                    None if std::time::Instant::now() < deadline => continue,
                    None => {
                        panic!("{topic}/{partition}: records below {high} not read within {CALL:?}")
                    }
                };
                records.push(Record {
                    partition,
                    offset: message.offset(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers: message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                });
                if message.offset() + 1 >= high {
                    break;
                }
            }
        }
        records
    }

    /// Waits until `group` committed everything of `topics` (name, partitions) and no worker
    /// has a job in flight, several checks in a row: then no copy of any job is anywhere but
    /// in the dead-letter topic.
    pub async fn wait_consumed(
        &self,
        group: &str,
        topics: &[(String, i32)],
        workers: &[&Worker],
        timeout: Duration,
    ) {
        let mut calm = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while calm < 3 {
            let mut lag = 0;
            for (topic, partitions) in topics {
                lag += self.lag(group, topic, *partitions);
            }
            let mut in_flight = 0.0;
            for worker in workers {
                in_flight += worker.metric("mailpipe_jobs_in_flight").await;
            }
            calm = if lag == 0 && in_flight == 0.0 {
                calm + 1
            } else {
                0
            };
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "group {group} not done within {timeout:?}: lag {lag}, {in_flight} in flight"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One record as read back.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The value.
    pub payload: Vec<u8>,
    /// Headers, values as text.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}
