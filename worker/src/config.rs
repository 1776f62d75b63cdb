//! Worker configuration: flags and environment (clap), secrets from environment or files.
//!
//! `Args` is what clap parses; [`Config::from_args`] validates it into a `Config` the rest of
//! the worker uses. Secrets (AMQP URL, SMTP password, Redis URL) are never flags: they come
//! from `NAME` or the file named by `NAME_FILE` (a mounted Kubernetes Secret), and their
//! `Debug` form is redacted so they cannot reach a log line.

mod kafka;

pub use kafka::{KafkaArgs, KafkaConfig};
pub use mailpipe_contract::choices::{OnRedisUnavailable, TlsMode};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mailpipe_contract::env;
use mailpipe_contract::topology::{ExchangeKind, QueueType, RabbitSettings};
use mailpipe_contract::{Limits, RetryPolicy};

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Whether the worker creates the topology or only checks that it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopologyMode {
    /// Declare exchanges, queues and bindings (creating what is missing).
    Declare,
    /// Passively check that they exist (when the operator owns the topology).
    Verify,
}

/// Where jobs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A RabbitMQ queue.
    Rabbitmq,
    /// A Kafka topic, consumed as one consumer group.
    Kafka,
}

/// What the worker does with a rendered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Send it over SMTP.
    Send,
    /// Log it instead of sending (content only at debug level); for trying things out.
    Log,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

const SECRETS_HELP: &str = "\
Secrets are read from the environment or from files, never from flags:
  MAILPIPE_AMQP_URL      or MAILPIPE_AMQP_URL_FILE      amqp[s]://user:pass@host:port/vhost (RabbitMQ)
  MAILPIPE_KAFKA_SASL_PASSWORD or ..._FILE               Kafka SASL password (with --kafka-sasl-username)
  MAILPIPE_SMTP_PASSWORD or MAILPIPE_SMTP_PASSWORD_FILE SMTP password (with --smtp-username)
  MAILPIPE_REDIS_URL     or MAILPIPE_REDIS_URL_FILE     redis://host:port/db; turns deduplication on";

/// mailpipe worker: consumes email jobs from RabbitMQ or Kafka and sends them over SMTP.
#[derive(Debug, Parser)]
#[command(name = "mailpipe-worker", version, after_help = SECRETS_HELP)]
pub struct Args {
    /// Where jobs come from.
    #[arg(long, env = env::SOURCE, value_enum, default_value = "rabbitmq")]
    pub source: SourceKind,
    /// Kafka settings (with --source kafka).
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// PEM CA bundle used to verify an amqps server.
    #[arg(long, env = env::AMQP_CA_FILE)]
    pub amqp_ca_file: Option<PathBuf>,
    /// Exchange producers publish to (default: the queue's name and `_exc`).
    #[arg(long, env = env::EXCHANGE)]
    pub exchange: Option<String>,
    /// Exchange type: fanout, direct or topic.
    #[arg(long, env = env::EXCHANGE_TYPE, default_value = "fanout")]
    pub exchange_type: ExchangeKind,
    /// Work queue to consume.
    #[arg(long, env = env::QUEUE, default_value = "smtp_send_email")]
    pub queue: String,
    /// Queue type: classic or quorum.
    #[arg(long, env = env::QUEUE_TYPE, default_value = "classic")]
    pub queue_type: QueueType,
    /// Binding key between exchange and queue (ignored by fanout exchanges).
    #[arg(long, env = env::ROUTING_KEY, default_value = "")]
    pub routing_key: String,
    /// x-max-priority of the work queue (classic queues only).
    #[arg(long, env = env::MAX_PRIORITY)]
    pub max_priority: Option<u8>,
    /// Declare the topology (queues or topics), or only verify it exists (when the operator
    /// owns it).
    #[arg(long, env = env::TOPOLOGY, value_enum, default_value = "declare")]
    pub topology: TopologyMode,
    /// Jobs processed at once.
    #[arg(long, env = env::CONCURRENCY, default_value_t = 16)]
    pub concurrency: u16,
    /// Unacknowledged deliveries the broker hands this worker, at least the concurrency
    /// (default: the concurrency).
    #[arg(long, env = env::PREFETCH)]
    pub prefetch: Option<u16>,

    /// SMTP server host.
    #[arg(long, env = env::SMTP_HOST, default_value = "localhost")]
    pub smtp_host: String,
    /// SMTP server port (default: 587 for starttls, 465 for tls, 25 for none).
    #[arg(long, env = env::SMTP_PORT)]
    pub smtp_port: Option<u16>,
    /// Transport security.
    #[arg(long, env = env::SMTP_TLS, value_enum, default_value = "starttls")]
    pub smtp_tls: TlsMode,
    /// PEM CA bundle used instead of the system roots to verify the SMTP server.
    #[arg(long, env = env::SMTP_CA_FILE)]
    pub smtp_ca_file: Option<PathBuf>,
    /// Accept any certificate. Dangerous: anyone on the path can read the mail.
    #[arg(long, env = env::SMTP_INSECURE_SKIP_VERIFY, default_value_t = false)]
    pub smtp_insecure_skip_verify: bool,
    /// SMTP user name (the password comes from MAILPIPE_SMTP_PASSWORD[_FILE]).
    #[arg(long, env = env::SMTP_USERNAME)]
    pub smtp_username: Option<String>,
    /// Most SMTP connections this worker opens (providers limit them per account); with
    /// --smtp-budget-queue, the connections all workers of the pipeline open together.
    #[arg(long, env = env::SMTP_POOL_SIZE, default_value_t = 16)]
    pub smtp_pool_size: u32,
    /// Share --smtp-pool-size with the pipeline's other workers through this queue of
    /// tokens, one per connection (the operator declares and fills it).
    #[arg(long, env = env::SMTP_BUDGET_QUEUE)]
    pub smtp_budget_queue: Option<String>,
    /// Messages per second this worker sends at most (unlimited when unset).
    #[arg(long, env = env::SMTP_RATE_LIMIT)]
    pub smtp_rate_limit: Option<u32>,
    /// Timeout of each SMTP command: connect, TLS, greeting, EHLO, AUTH, MAIL, RCPT, DATA
    /// (capped at RFC 5321's 5 minutes, 2 for DATA).
    #[arg(long, env = env::SMTP_TIMEOUT, default_value = "30s", value_parser = humantime::parse_duration)]
    pub smtp_timeout: Duration,
    /// Timeout of the server's reply to the end of a message. A server may store the
    /// message and reply late (RFC 5321 allows 10 minutes, the cap); giving up earlier
    /// leaves the outcome unknown and the job is retried.
    #[arg(long, env = env::SMTP_DATA_TIMEOUT, default_value = "10m", value_parser = humantime::parse_duration)]
    pub smtp_data_timeout: Duration,
    /// Default From address, for jobs without one.
    #[arg(long, env = env::FROM_ADDRESS)]
    pub from_address: Option<String>,
    /// Default From display name.
    #[arg(long, env = env::FROM_NAME)]
    pub from_name: Option<String>,
    /// Directory of templates: NAME.html and/or NAME.txt, optional NAME.subject.
    #[arg(long, env = env::TEMPLATES_DIR)]
    pub templates_dir: Option<PathBuf>,

    /// Total attempts per job, the first included.
    #[arg(long, env = env::MAX_ATTEMPTS, default_value_t = 5)]
    pub max_attempts: u32,
    /// Delay after the first failed attempt.
    #[arg(long, env = env::BACKOFF_INITIAL, default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    /// Growth factor of the delay per attempt.
    #[arg(long, env = env::BACKOFF_MULTIPLIER, default_value_t = 2.0)]
    pub backoff_multiplier: f64,
    /// Largest delay between attempts.
    #[arg(long, env = env::BACKOFF_MAX, default_value = "5m", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Dead-letter jobs that can never be sent (else they are dropped and counted).
    #[arg(long, env = env::DEAD_LETTER, default_value_t = true, action = clap::ArgAction::Set)]
    pub dead_letter: bool,

    /// How long a recorded send is remembered for deduplication.
    #[arg(long, env = env::IDEMPOTENCY_TTL, default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,
    /// Redis key prefix (one per pipeline).
    #[arg(long, env = env::IDEMPOTENCY_PREFIX, default_value = "mailpipe")]
    pub idempotency_prefix: String,
    /// What to do while Redis is unreachable.
    #[arg(long, env = env::ON_REDIS_UNAVAILABLE, value_enum, default_value = "pause")]
    pub on_redis_unavailable: OnRedisUnavailable,

    /// Send mail, or only render and log it.
    #[arg(long, env = env::MODE, value_enum, default_value = "send")]
    pub mode: Mode,
    /// Address of the HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = env::HTTP_ADDR, default_value = "127.0.0.1:9090")]
    pub http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter (recipients and content appear only at debug level).
    #[arg(long, env = env::LOG, default_value = "info")]
    pub log: String,
    /// Drain and exit once the process that started this worker is gone, as on SIGTERM.
    #[arg(long, env = env::STOP_WITH_PARENT, default_value_t = false)]
    pub stop_with_parent: bool,
    /// After SIGTERM, how long in-flight sends may take before the worker exits anyway.
    #[arg(long, env = env::SHUTDOWN_TIMEOUT, default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Largest job accepted, in bytes.
    #[arg(long, env = env::MAX_JOB_BYTES, default_value_t = 1024 * 1024)]
    pub max_job_bytes: usize,
}

/// SMTP settings, validated.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub credentials: Option<(String, Secret)>,
    pub pool_size: u32,
    /// The token queue of a budget shared with other workers.
    pub budget_queue: Option<String>,
    pub rate_limit: Option<u32>,
    pub timeout: Duration,
    pub data_timeout: Duration,
}

/// RabbitMQ settings, validated.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub url: Secret,
    pub ca_file: Option<PathBuf>,
    pub settings: RabbitSettings,
    pub topology: TopologyMode,
    pub prefetch: u16,
}

/// Deduplication settings; present only when a Redis URL is configured.
#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    pub url: Secret,
    pub ttl: Duration,
    pub prefix: String,
    pub on_unavailable: OnRedisUnavailable,
}

/// Where jobs come from, validated.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A RabbitMQ queue.
    Rabbit(AmqpConfig),
    /// A Kafka topic.
    Kafka(KafkaConfig),
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub smtp: SmtpConfig,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub templates_dir: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub idempotency: Option<IdempotencyConfig>,
    pub mode: Mode,
    pub concurrency: usize,
    pub http_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
}

/// A configuration the worker cannot start with; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Reads a secret from `var` or from the file named by `file_var`; both set is an error.
pub fn read_secret(
    get: &dyn Fn(&str) -> Option<String>,
    var: &str,
    file_var: &str,
) -> Result<Option<Secret>, ConfigError> {
    match (get(var), get(file_var)) {
        (Some(_), Some(_)) => Err(ConfigError(format!("set {var} or {file_var}, not both"))),
        (Some(value), None) => Ok(Some(Secret::new(value))),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("cannot read {file_var} ({path}): {e}")))?;
            Ok(Some(Secret::new(text.trim_end_matches(['\r', '\n']))))
        }
        (None, None) => Ok(None),
    }
}

impl Config {
    /// Validates parsed flags and reads secrets through `get` (the process environment in
    /// production, a map in tests).
    pub fn from_args(
        args: Args,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let retry = RetryPolicy {
            max_attempts: args.max_attempts,
            initial: args.backoff_initial,
            multiplier: args.backoff_multiplier,
            max: args.backoff_max,
        };
        retry.validate().map_err(|e| ConfigError(e.to_string()))?;
        if args.concurrency == 0 {
            return bad("concurrency must be at least 1".into());
        }
        if args.smtp_pool_size == 0 {
            return bad("SMTP pool size must be at least 1".into());
        }
        if args.smtp_rate_limit == Some(0) {
            return bad("SMTP rate limit must be at least 1 message per second".into());
        }
        if args.shutdown_timeout.is_zero() {
            return bad("shutdown timeout must be positive".into());
        }
        if args.smtp_timeout.is_zero() || args.smtp_data_timeout.is_zero() {
            return bad("SMTP timeouts must be positive".into());
        }
        let source = match args.source {
            SourceKind::Rabbitmq => SourceConfig::Rabbit(rabbit_config(&args, get)?),
            SourceKind::Kafka => {
                if args
                    .smtp_budget_queue
                    .as_deref()
                    .is_some_and(|q| !q.is_empty())
                {
                    return bad(
                        "--smtp-budget-queue shares connections through RabbitMQ; a Kafka pipeline sets --smtp-pool-size per worker".into(),
                    );
                }
                SourceConfig::Kafka(args.kafka.validate(
                    &retry,
                    args.topology,
                    args.dead_letter,
                    get,
                )?)
            }
        };
        let password = read_secret(get, env::SMTP_PASSWORD, env::SMTP_PASSWORD_FILE)?;
        let credentials = match (args.smtp_username, password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            (Some(_), None) => {
                return bad("an SMTP user name needs MAILPIPE_SMTP_PASSWORD[_FILE]".into())
            }
            (None, Some(_)) => return bad("an SMTP password needs --smtp-username".into()),
        };
        if credentials.is_some() && args.smtp_tls == TlsMode::None {
            return bad(
                "SMTP credentials over an unencrypted connection are refused; use starttls or tls"
                    .into(),
            );
        }
        if args.smtp_insecure_skip_verify && args.smtp_ca_file.is_some() {
            return bad("choose a CA file or skipping verification, not both".into());
        }
        if args.mode == Mode::Send && args.from_address.is_none() {
            return bad(
                "no default From address: set --from-address (MAILPIPE_FROM_ADDRESS)".into(),
            );
        }
        let idempotency =
            read_secret(get, env::REDIS_URL, env::REDIS_URL_FILE)?.map(|url| IdempotencyConfig {
                url,
                ttl: args.idempotency_ttl,
                prefix: args.idempotency_prefix,
                on_unavailable: args.on_redis_unavailable,
            });
        if idempotency
            .as_ref()
            .is_some_and(|i| i.ttl < Duration::from_secs(1))
        {
            return bad("idempotency TTL must be at least 1s".into());
        }
        let port = args.smtp_port.unwrap_or(match args.smtp_tls {
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        });
        Ok(Config {
            source,
            smtp: SmtpConfig {
                host: args.smtp_host,
                port,
                tls: args.smtp_tls,
                ca_file: args.smtp_ca_file,
                insecure_skip_verify: args.smtp_insecure_skip_verify,
                credentials,
                pool_size: args.smtp_pool_size,
                budget_queue: args.smtp_budget_queue.filter(|q| !q.is_empty()),
                rate_limit: args.smtp_rate_limit,
                timeout: args.smtp_timeout,
                data_timeout: args.smtp_data_timeout,
            },
            from_address: args.from_address,
            from_name: args.from_name,
            templates_dir: args.templates_dir,
            retry,
            idempotency,
            mode: args.mode,
            concurrency: args.concurrency.into(),
            http_addr: args.http_addr,
            shutdown_timeout: args.shutdown_timeout,
            limits: mailpipe_contract::Limits {
                max_job_bytes: args.max_job_bytes,
                ..Default::default()
            },
        })
    }
}

/// The RabbitMQ settings of `args`, validated, with the broker URL read through `get`.
fn rabbit_config(
    args: &Args,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<AmqpConfig, ConfigError> {
    let bad = |m: String| Err(ConfigError(m));
    let settings = RabbitSettings {
        exchange: args
            .exchange
            .clone()
            .unwrap_or_else(|| mailpipe_contract::naming::default_exchange(&args.queue)),
        exchange_kind: args.exchange_type,
        queue: args.queue.clone(),
        queue_type: args.queue_type,
        routing_key: args.routing_key.clone(),
        max_priority: args.max_priority,
        dead_letter: args.dead_letter,
    };
    settings
        .validate()
        .map_err(|e| ConfigError(e.to_string()))?;
    if let Some(prefetch) = args.prefetch {
        if prefetch < args.concurrency {
            return bad(format!(
                "prefetch {prefetch} is below concurrency {}: the broker would hand over at most {prefetch} jobs at once; raise the prefetch or lower the concurrency",
                args.concurrency
            ));
        }
    }
    let url = read_secret(get, env::AMQP_URL, env::AMQP_URL_FILE)?.ok_or_else(|| {
        ConfigError(format!(
            "no broker URL: set {} or {}",
            env::AMQP_URL,
            env::AMQP_URL_FILE
        ))
    })?;
    let scheme_ok = url.expose().starts_with("amqp://") || url.expose().starts_with("amqps://");
    if !scheme_ok {
        return bad(format!(
            "{} must start with amqp:// or amqps://",
            env::AMQP_URL
        ));
    }
    // The parser's message may quote the URL, password included: say only what is wrong.
    if let Err(error) = url.expose().parse::<lapin::uri::AMQPUri>() {
        let hint = if error.contains("port") || error.contains("invalid digit") {
            "the port is not a number from 1 to 65535"
        } else {
            "it does not parse as amqp[s]://user:password@host:port/vhost"
        };
        return bad(format!("{} is not a usable URL: {hint}", env::AMQP_URL));
    }
    if args.amqp_ca_file.is_some() && !url.expose().starts_with("amqps://") {
        return bad("an AMQP CA file needs an amqps:// URL".into());
    }
    Ok(AmqpConfig {
        url,
        ca_file: args.amqp_ca_file.clone(),
        settings,
        topology: args.topology,
        prefetch: args.prefetch.unwrap_or(args.concurrency),
    })
}

#[cfg(test)]
mod tests;
