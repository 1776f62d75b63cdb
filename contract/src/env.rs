//! The environment variables the worker reads, which the operator renders into the worker
//! Deployment. Each `*_FILE` variable names a file holding a secret (a mounted Secret); the
//! plain variable of the same name may carry it instead (a `secretKeyRef` env), never a
//! literal from a spec.

/// Where jobs come from: `rabbitmq` (default) or `kafka`.
pub const SOURCE: &str = "MAILPIPE_SOURCE";

/// AMQP URL (`amqp://` or `amqps://`, vhost percent-encoded in the path). Secret.
pub const AMQP_URL: &str = "MAILPIPE_AMQP_URL";
/// File holding the AMQP URL.
pub const AMQP_URL_FILE: &str = "MAILPIPE_AMQP_URL_FILE";
/// PEM CA bundle to verify an amqps server with.
pub const AMQP_CA_FILE: &str = "MAILPIPE_AMQP_CA_FILE";
/// Entry exchange name.
pub const EXCHANGE: &str = "MAILPIPE_EXCHANGE";
/// Entry exchange type: fanout, direct or topic.
pub const EXCHANGE_TYPE: &str = "MAILPIPE_EXCHANGE_TYPE";
/// Work queue name.
pub const QUEUE: &str = "MAILPIPE_QUEUE";
/// Queue type: classic or quorum.
pub const QUEUE_TYPE: &str = "MAILPIPE_QUEUE_TYPE";
/// Binding key between exchange and work queue.
pub const ROUTING_KEY: &str = "MAILPIPE_ROUTING_KEY";
/// `x-max-priority` of the work queue (classic only).
pub const MAX_PRIORITY: &str = "MAILPIPE_MAX_PRIORITY";
/// `declare` (create what is missing) or `verify` (passive; the operator owns topology).
pub const TOPOLOGY: &str = "MAILPIPE_TOPOLOGY";
/// Unacknowledged deliveries the broker may hand this worker.
pub const PREFETCH: &str = "MAILPIPE_PREFETCH";
/// Jobs processed at once.
pub const CONCURRENCY: &str = "MAILPIPE_CONCURRENCY";

/// Kafka bootstrap brokers, `host:port`, comma-separated.
pub const KAFKA_BOOTSTRAP_SERVERS: &str = "MAILPIPE_KAFKA_BOOTSTRAP_SERVERS";
/// The Kafka topic producers write jobs to.
pub const KAFKA_TOPIC: &str = "MAILPIPE_KAFKA_TOPIC";
/// The workers' consumer group.
pub const KAFKA_GROUP: &str = "MAILPIPE_KAFKA_GROUP";
/// Partitions of the topics a worker creates (topology `declare`).
pub const KAFKA_PARTITIONS: &str = "MAILPIPE_KAFKA_PARTITIONS";
/// Replication factor of the topics a worker creates.
pub const KAFKA_REPLICATION_FACTOR: &str = "MAILPIPE_KAFKA_REPLICATION_FACTOR";
/// `true`: connect to the brokers with TLS (implied by a CA file).
pub const KAFKA_TLS: &str = "MAILPIPE_KAFKA_TLS";
/// PEM CA bundle to verify the Kafka brokers with.
pub const KAFKA_CA_FILE: &str = "MAILPIPE_KAFKA_CA_FILE";
/// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
pub const KAFKA_SASL_MECHANISM: &str = "MAILPIPE_KAFKA_SASL_MECHANISM";
/// SASL user name.
pub const KAFKA_SASL_USERNAME: &str = "MAILPIPE_KAFKA_SASL_USERNAME";
/// SASL password. Secret.
pub const KAFKA_SASL_PASSWORD: &str = "MAILPIPE_KAFKA_SASL_PASSWORD";
/// File holding the SASL password.
pub const KAFKA_SASL_PASSWORD_FILE: &str = "MAILPIPE_KAFKA_SASL_PASSWORD_FILE";
/// KiB of records fetched ahead of the jobs in flight, over all partitions.
pub const KAFKA_FETCH_KBYTES: &str = "MAILPIPE_KAFKA_FETCH_KBYTES";

/// SMTP server host.
pub const SMTP_HOST: &str = "MAILPIPE_SMTP_HOST";
/// SMTP server port.
pub const SMTP_PORT: &str = "MAILPIPE_SMTP_PORT";
/// `starttls` (default), `tls` (implicit) or `none`.
pub const SMTP_TLS: &str = "MAILPIPE_SMTP_TLS";
/// PEM CA bundle to verify the SMTP server with (instead of the system roots).
pub const SMTP_CA_FILE: &str = "MAILPIPE_SMTP_CA_FILE";
/// Skip certificate verification (explicit, loudly logged opt-in).
pub const SMTP_INSECURE_SKIP_VERIFY: &str = "MAILPIPE_SMTP_INSECURE_SKIP_VERIFY";
/// SMTP user name.
pub const SMTP_USERNAME: &str = "MAILPIPE_SMTP_USERNAME";
/// SMTP password. Secret.
pub const SMTP_PASSWORD: &str = "MAILPIPE_SMTP_PASSWORD";
/// File holding the SMTP password.
pub const SMTP_PASSWORD_FILE: &str = "MAILPIPE_SMTP_PASSWORD_FILE";
/// Most SMTP connections this worker keeps open; with a budget queue, the connections of
/// all the pipeline's workers together.
pub const SMTP_POOL_SIZE: &str = "MAILPIPE_SMTP_POOL_SIZE";
/// The queue of tokens through which the pipeline's workers share its SMTP connections.
pub const SMTP_BUDGET_QUEUE: &str = "MAILPIPE_SMTP_BUDGET_QUEUE";
/// Messages per second this worker sends at most.
pub const SMTP_RATE_LIMIT: &str = "MAILPIPE_SMTP_RATE_LIMIT";
/// Timeout of one SMTP command (capped by RFC 5321's value for each).
pub const SMTP_TIMEOUT: &str = "MAILPIPE_SMTP_TIMEOUT";
/// Timeout of the server's reply to the end of a message (RFC 5321 allows 10 minutes).
pub const SMTP_DATA_TIMEOUT: &str = "MAILPIPE_SMTP_DATA_TIMEOUT";
/// Default From address.
pub const FROM_ADDRESS: &str = "MAILPIPE_FROM_ADDRESS";
/// Default From display name.
pub const FROM_NAME: &str = "MAILPIPE_FROM_NAME";
/// Directory of templates (`NAME.html`, `NAME.txt`, `NAME.subject`).
pub const TEMPLATES_DIR: &str = "MAILPIPE_TEMPLATES_DIR";

/// Total attempts per job.
pub const MAX_ATTEMPTS: &str = "MAILPIPE_MAX_ATTEMPTS";
/// First retry delay.
pub const BACKOFF_INITIAL: &str = "MAILPIPE_BACKOFF_INITIAL";
/// Retry delay growth factor.
pub const BACKOFF_MULTIPLIER: &str = "MAILPIPE_BACKOFF_MULTIPLIER";
/// Largest retry delay.
pub const BACKOFF_MAX: &str = "MAILPIPE_BACKOFF_MAX";
/// Whether jobs that can never be sent go to the dead-letter queue.
pub const DEAD_LETTER: &str = "MAILPIPE_DEAD_LETTER";

/// Redis URL for idempotency; unset turns deduplication off. Secret.
pub const REDIS_URL: &str = "MAILPIPE_REDIS_URL";
/// File holding the Redis URL.
pub const REDIS_URL_FILE: &str = "MAILPIPE_REDIS_URL_FILE";
/// How long a recorded send is remembered.
pub const IDEMPOTENCY_TTL: &str = "MAILPIPE_IDEMPOTENCY_TTL";
/// Key prefix in Redis (one per pipeline).
pub const IDEMPOTENCY_PREFIX: &str = "MAILPIPE_IDEMPOTENCY_PREFIX";
/// `pause` (default) or `send` while Redis is unreachable.
pub const ON_REDIS_UNAVAILABLE: &str = "MAILPIPE_ON_REDIS_UNAVAILABLE";

/// `send` (default) or `log` (render and log instead of sending).
pub const MODE: &str = "MAILPIPE_MODE";
/// Address of the HTTP server (metrics, health).
pub const HTTP_ADDR: &str = "MAILPIPE_HTTP_ADDR";
/// `text` or `json`.
pub const LOG_FORMAT: &str = "MAILPIPE_LOG_FORMAT";
/// Log filter, e.g. `info` or `mailpipe_worker=debug`.
pub const LOG: &str = "MAILPIPE_LOG";
/// `true`: the worker drains and exits once the process that started it is gone (local
/// mode's workers, so none outlives a `mailpipe local` that was killed).
pub const STOP_WITH_PARENT: &str = "MAILPIPE_STOP_WITH_PARENT";
/// Deadline for in-flight sends after SIGTERM.
pub const SHUTDOWN_TIMEOUT: &str = "MAILPIPE_SHUTDOWN_TIMEOUT";
/// Largest job accepted, in bytes.
pub const MAX_JOB_BYTES: &str = "MAILPIPE_MAX_JOB_BYTES";
