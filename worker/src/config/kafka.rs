//! The Kafka source's flags (`--kafka-*`, with `--source kafka`) and their validation into a
//! [`KafkaConfig`]: brokers, topic and group, the topics a declaring worker creates, TLS and
//! SASL (the password only from the environment or a file), and how much librdkafka may fetch
//! ahead.

use std::path::PathBuf;

use mailpipe_contract::choices::SaslMechanism;
use mailpipe_contract::env;
use mailpipe_contract::kafka::{Connection, SaslLogin};
use mailpipe_contract::topics::KafkaSettings;
use mailpipe_contract::RetryPolicy;

use super::{read_secret, ConfigError, TopologyMode};

/// The `--kafka-*` flags.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers, host:port, comma-separated (required with --source kafka).
    #[arg(long, env = env::KAFKA_BOOTSTRAP_SERVERS)]
    pub kafka_bootstrap_servers: Option<String>,
    /// Topic producers write jobs to; retry topics (`<topic>-retry-<ms>ms`) and the
    /// dead-letter topic (`<topic>-dlq`) hang off it.
    #[arg(long, env = env::KAFKA_TOPIC, default_value = "email-events")]
    pub kafka_topic: String,
    /// Consumer group the workers of a pipeline share.
    #[arg(long, env = env::KAFKA_GROUP, default_value = "mailpipe")]
    pub kafka_group: String,
    /// Partitions of the topics the worker creates (with --topology declare).
    #[arg(long, env = env::KAFKA_PARTITIONS, default_value_t = 3)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics the worker creates.
    #[arg(long, env = env::KAFKA_REPLICATION_FACTOR, default_value_t = 1)]
    pub kafka_replication_factor: i16,
    /// Connect to the brokers with TLS (implied by --kafka-ca-file).
    #[arg(long, env = env::KAFKA_TLS, default_value_t = false, action = clap::ArgAction::Set)]
    pub kafka_tls: bool,
    /// PEM CA bundle used to verify the brokers (default: the system roots).
    #[arg(long, env = env::KAFKA_CA_FILE)]
    pub kafka_ca_file: Option<PathBuf>,
    /// SASL mechanism (with --kafka-sasl-username).
    #[arg(long, env = env::KAFKA_SASL_MECHANISM, default_value = "SCRAM-SHA-256")]
    pub kafka_sasl_mechanism: SaslMechanism,
    /// SASL user name (the password comes from MAILPIPE_KAFKA_SASL_PASSWORD[_FILE]).
    #[arg(long, env = env::KAFKA_SASL_USERNAME)]
    pub kafka_sasl_username: Option<String>,
    /// KiB of records fetched ahead of the jobs in flight, over all partitions (librdkafka's
    /// `queued.max.messages.kbytes`, 64 MiB by default there).
    #[arg(long, env = env::KAFKA_FETCH_KBYTES, default_value_t = 4096)]
    pub kafka_fetch_kbytes: u32,
}

/// The Kafka source's settings, validated.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// The brokers and how to reach them (the SASL password inside is redacted in `Debug`).
    pub connection: Connection,
    /// The topics.
    pub settings: KafkaSettings,
    /// The consumer group.
    pub group: String,
    /// Create missing topics, or only check that they exist.
    pub topology: TopologyMode,
    /// `queued.max.messages.kbytes`.
    pub fetch_kbytes: u32,
}

/// Smallest fetch-ahead: librdkafka needs room for one fetch of a full-sized record (1 MB).
const MIN_FETCH_KBYTES: u32 = 1024;

impl KafkaArgs {
    /// Validates the flags, reading the SASL password through `get`.
    pub(super) fn validate(
        &self,
        retry: &RetryPolicy,
        topology: TopologyMode,
        dead_letter: bool,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<KafkaConfig, ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let Some(bootstrap) = self
            .kafka_bootstrap_servers
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return bad(format!(
                "no Kafka brokers: set --kafka-bootstrap-servers ({})",
                env::KAFKA_BOOTSTRAP_SERVERS
            ));
        };
        for server in bootstrap.split(',').map(str::trim) {
            let port_ok = server.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                return bad(format!(
                    "Kafka bootstrap server {server:?} is not host:port"
                ));
            }
        }
        let settings = KafkaSettings {
            topic: self.kafka_topic.clone(),
            partitions: self.kafka_partitions,
            replication: self.kafka_replication_factor,
            dead_letter,
            config: Default::default(),
        };
        settings
            .validate(retry)
            .map_err(|e| ConfigError(e.to_string()))?;
        if self.kafka_group.trim().is_empty() {
            return bad("the Kafka consumer group must not be empty".into());
        }
        if self.kafka_fetch_kbytes < MIN_FETCH_KBYTES {
            return bad(format!(
                "--kafka-fetch-kbytes must be at least {MIN_FETCH_KBYTES}: one fetch may carry a 1 MB record"
            ));
        }
        let password = read_secret(get, env::KAFKA_SASL_PASSWORD, env::KAFKA_SASL_PASSWORD_FILE)?;
        let sasl = match (&self.kafka_sasl_username, password) {
            (Some(username), Some(password)) => Some(SaslLogin {
                mechanism: self.kafka_sasl_mechanism,
                username: username.clone(),
                password: password.expose().to_string(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return bad(
                    "a Kafka SASL user name needs MAILPIPE_KAFKA_SASL_PASSWORD[_FILE]".into(),
                )
            }
            (None, Some(_)) => {
                return bad("a Kafka SASL password needs --kafka-sasl-username".into())
            }
        };
        let tls = self.kafka_tls || self.kafka_ca_file.is_some();
        if sasl
            .as_ref()
            .is_some_and(|s| s.mechanism == SaslMechanism::Plain)
            && !tls
        {
            return bad(
                "SASL PLAIN sends the password as it is; it is refused without TLS (--kafka-tls or --kafka-ca-file)"
                    .into(),
            );
        }
        Ok(KafkaConfig {
            connection: Connection {
                bootstrap: bootstrap.to_string(),
                ca_file: self.kafka_ca_file.clone(),
                ca_pem: None,
                tls,
                sasl,
            },
            settings,
            group: self.kafka_group.clone(),
            topology,
            fetch_kbytes: self.kafka_fetch_kbytes,
        })
    }
}
