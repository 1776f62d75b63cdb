//! The worker configuration's validation: defaults, secrets, clear errors.

use super::*;
use std::collections::HashMap;

fn config(flags: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut argv = vec!["mailpipe-worker"];
    argv.extend_from_slice(flags);
    let args = Args::try_parse_from(argv).expect("flags parse");
    Config::from_args(args, &|k| env.get(k).cloned())
}

fn rabbit(cfg: &Config) -> &AmqpConfig {
    match &cfg.source {
        SourceConfig::Rabbit(amqp) => amqp,
        SourceConfig::Kafka(_) => panic!("a RabbitMQ source"),
    }
}

const URL: (&str, &str) = ("MAILPIPE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");

#[test]
fn defaults_follow_the_usual_hand_written_consumer() {
    let cfg = config(&["--from-address", "noreply@example.com"], &[URL]).unwrap();
    assert_eq!(rabbit(&cfg).settings.exchange, "smtp_send_email_exc");
    let own = config(
        &["--from-address", "a@example.com", "--queue", "welcome"],
        &[URL],
    )
    .unwrap();
    assert_eq!(
        rabbit(&own).settings.exchange,
        "welcome_exc",
        "another queue never shares the default exchange"
    );
    assert_eq!(rabbit(&cfg).settings.queue, "smtp_send_email");
    assert_eq!(cfg.smtp.tls, TlsMode::Starttls);
    assert_eq!(cfg.smtp.port, 587);
    assert_eq!(rabbit(&cfg).prefetch, 16);
    assert!(cfg.idempotency.is_none());
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    let cfg = config(
        &["--from-address", "a@example.com", "--smtp-username", "u"],
        &[URL, ("MAILPIPE_SMTP_PASSWORD", "hunter2")],
    )
    .unwrap();
    let printed = format!("{cfg:?}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(!printed.contains("guest:guest"), "{printed}");
}

#[test]
fn secrets_come_from_files_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("url");
    std::fs::write(&path, "amqp://u:p@host/%2f\n").unwrap();
    let cfg = config(
        &["--from-address", "a@example.com"],
        &[("MAILPIPE_AMQP_URL_FILE", path.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(rabbit(&cfg).url.expose(), "amqp://u:p@host/%2f");
}

#[test]
fn missing_or_contradictory_settings_are_clear_errors() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--from-address", "a@example.com"], &[], "no broker URL"),
        (&[], &[URL], "From address"),
        (
            &[
                "--from-address",
                "a@example.com",
                "--queue-type",
                "quorum",
                "--max-priority",
                "5",
            ],
            &[URL],
            "classic-queue feature",
        ),
        (
            &[
                "--from-address",
                "a@example.com",
                "--smtp-username",
                "u",
                "--smtp-tls",
                "none",
            ],
            &[URL, ("MAILPIPE_SMTP_PASSWORD", "p")],
            "unencrypted",
        ),
        (
            &["--from-address", "a@example.com"],
            &[URL, ("MAILPIPE_AMQP_URL_FILE", "/x")],
            "not both",
        ),
        (
            &[
                "--from-address",
                "a@example.com",
                "--concurrency",
                "64",
                "--prefetch",
                "32",
            ],
            &[URL],
            "prefetch 32 is below concurrency 64",
        ),
        (
            &["--from-address", "a@example.com"],
            &[(
                "MAILPIPE_AMQP_URL",
                "amqp://guest:s3cret@127.0.0.1:99999/%2f",
            )],
            "the port is not a number from 1 to 65535",
        ),
    ];
    for (flags, env, expected) in cases {
        let err = config(flags, env).unwrap_err().to_string();
        assert!(err.contains(expected), "{flags:?}: {err}");
        assert!(!err.contains("s3cret"), "no secret in the message: {err}");
    }
}

fn kafka(cfg: &Config) -> &KafkaConfig {
    match &cfg.source {
        SourceConfig::Kafka(kafka) => kafka,
        SourceConfig::Rabbit(_) => panic!("a Kafka source"),
    }
}

const KAFKA: [&str; 6] = [
    "--from-address",
    "a@example.com",
    "--source",
    "kafka",
    "--kafka-bootstrap-servers",
    "k1:9092,k2:9093",
];

#[test]
fn a_kafka_source_needs_no_amqp_url_and_takes_the_seeds_names() {
    let cfg = config(&KAFKA, &[]).unwrap();
    let k = kafka(&cfg);
    assert_eq!(k.settings.topic, "email-events");
    assert_eq!(k.group, "mailpipe");
    assert_eq!(k.connection.bootstrap, "k1:9092,k2:9093");
    assert!(!k.connection.tls);
    assert_eq!(k.fetch_kbytes, 4096, "far below librdkafka's 64 MiB");
    let plan = k.settings.plan(&cfg.retry);
    assert_eq!(plan.topics.last().unwrap().name, "email-events-dlq");
}

#[test]
fn the_kafka_sasl_password_comes_from_a_file_and_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("password");
    std::fs::write(&path, "s3cret\n").unwrap();
    let mut flags = KAFKA.to_vec();
    flags.extend(["--kafka-sasl-username", "mailer", "--kafka-tls", "true"]);
    let cfg = config(
        &flags,
        &[("MAILPIPE_KAFKA_SASL_PASSWORD_FILE", path.to_str().unwrap())],
    )
    .unwrap();
    let sasl = kafka(&cfg).connection.sasl.as_ref().unwrap();
    assert_eq!(sasl.password, "s3cret");
    assert_eq!(sasl.mechanism.as_str(), "SCRAM-SHA-256");
    assert!(!format!("{cfg:?}").contains("s3cret"));
}

#[test]
fn bad_kafka_settings_are_clear_errors() {
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a str);
    let with = |extra: &[&'static str]| {
        let mut flags = KAFKA.to_vec();
        flags.extend_from_slice(extra);
        flags
    };
    let cases: Vec<Case> = vec![
        (
            vec!["--from-address", "a@example.com", "--source", "kafka"],
            &[],
            "no Kafka brokers",
        ),
        (
            vec![
                "--from-address",
                "a@example.com",
                "--source",
                "kafka",
                "--kafka-bootstrap-servers",
                "k1",
            ],
            &[],
            "is not host:port",
        ),
        (
            with(&["--kafka-topic", "a b"]),
            &[],
            "not a Kafka topic name",
        ),
        (
            with(&["--kafka-sasl-username", "u"]),
            &[],
            "needs MAILPIPE_KAFKA_SASL_PASSWORD",
        ),
        (
            with(&[
                "--kafka-sasl-username",
                "u",
                "--kafka-sasl-mechanism",
                "PLAIN",
            ]),
            &[("MAILPIPE_KAFKA_SASL_PASSWORD", "s3cret")],
            "refused without TLS",
        ),
        (with(&["--kafka-fetch-kbytes", "64"]), &[], "at least 1024"),
        (
            with(&["--smtp-budget-queue", "q"]),
            &[],
            "shares connections through RabbitMQ",
        ),
    ];
    for (flags, env, expected) in cases {
        let err = config(&flags, env).unwrap_err().to_string();
        assert!(err.contains(expected), "{flags:?}: {err}");
        assert!(!err.contains("s3cret"), "no secret in the message: {err}");
    }
}
