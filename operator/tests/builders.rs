//! The builders, compared as whole objects: what a pipeline's children look like.
#![recursion_limit = "256"]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use mailpipe_operator::build::{self, Inputs, CONFIG_HASH};
use mailpipe_operator::crd::EmailPipelineSpec;
use mailpipe_operator::validate::{validate, ValidatedPipeline};
use serde_json::{json, Value};

fn pipeline(spec: Value) -> ValidatedPipeline {
    let spec: EmailPipelineSpec = serde_json::from_value(spec).expect("a spec");
    validate("welcome", "mail", &spec).expect("valid")
}

fn full() -> Value {
    json!({
        "source": {"rabbitmq": {
            "connectionSecret": {"name": "amqp", "key": "url"},
            "caSecret": {"name": "amqp-ca", "key": "ca.crt"},
            "queue": "welcome", "exchange": "welcome_exc", "exchangeType": "direct",
            "routingKey": "welcome", "maxPriority": 5, "prefetch": 64}},
        "smtp": {"host": "smtp.example.com", "port": 465, "tls": "tls",
                 "caSecret": {"name": "smtp-ca", "key": "ca.crt"},
                 "credentialsSecret": {"name": "smtp"},
                 "from": {"address": "noreply@example.com", "name": "Example"},
                 "poolSize": 20, "rateLimit": 50},
        "templates": {"configMap": "welcome-templates"},
        "delivery": {"maxAttempts": 4, "backoff": {"initial": "2s", "multiplier": 3.0, "max": "1m"},
                     "idempotency": {"redisSecret": {"name": "redis", "key": "url"}, "ttl": "12h"}},
        "worker": {"image": "registry.example.com/mailpipe-worker:1.2.3", "concurrency": 8,
                   "env": [{"name": "TZ", "value": "UTC"}], "terminationGracePeriodSeconds": 30},
        "scaling": {"minReplicas": 0, "maxReplicas": 5},
    })
}

fn inputs(references: &str) -> Inputs {
    Inputs {
        owner: OwnerReference {
            api_version: "mailpipe.dev/v1alpha1".into(),
            kind: "EmailPipeline".into(),
            name: "welcome".into(),
            uid: "0b5c5d3e-0000-4000-8000-000000000001".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
        default_image: "ghcr.io/mailpipe/mailpipe-worker:0.1.0".into(),
        references: references.into(),
        starting_replicas: None,
    }
}

fn owner() -> Value {
    json!([{"apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline", "name": "welcome",
            "uid": "0b5c5d3e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}])
}

fn labels() -> Value {
    json!({"app.kubernetes.io/component": "worker", "app.kubernetes.io/instance": "welcome",
           "app.kubernetes.io/managed-by": "mailpipe-operator", "app.kubernetes.io/name": "mailpipe-worker",
           "app.kubernetes.io/part-of": "mailpipe"})
}

fn selector() -> Value {
    json!({"app.kubernetes.io/instance": "welcome", "app.kubernetes.io/name": "mailpipe-worker"})
}

fn secret_volume(name: &str, secret: &str, key: &str, path: &str) -> Value {
    json!({"name": name, "secret": {"defaultMode": 0o440, "items": [{"key": key, "path": path}], "secretName": secret}})
}

fn mount(name: &str) -> Value {
    json!({"mountPath": format!("/etc/mailpipe/{name}"), "name": name, "readOnly": true})
}

#[test]
fn the_worker_deployment_carries_the_spec_as_contract_env_and_secrets_as_files() {
    let deployment = build::worker_deployment(&pipeline(full()), &inputs("r1"));
    let mut actual = serde_json::to_value(&deployment).unwrap();
    let hash = actual["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH].take();
    assert_eq!(
        hash.as_str().map(str::len),
        Some(16),
        "a config hash: {hash}"
    );
    let expected = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "welcome-worker", "namespace": "mail", "labels": labels(), "ownerReferences": owner()},
        "spec": {
            "selector": {"matchLabels": selector()},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"annotations": {CONFIG_HASH: null}, "labels": labels()},
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "worker",
                        "image": "registry.example.com/mailpipe-worker:1.2.3",
                        "imagePullPolicy": "IfNotPresent",
                        "env": [
                            {"name": "MAILPIPE_AMQP_URL_FILE", "value": "/etc/mailpipe/amqp/url"},
                            {"name": "MAILPIPE_AMQP_CA_FILE", "value": "/etc/mailpipe/amqp-ca/ca.crt"},
                            {"name": "MAILPIPE_TOPOLOGY", "value": "verify"},
                            {"name": "MAILPIPE_EXCHANGE", "value": "welcome_exc"},
                            {"name": "MAILPIPE_EXCHANGE_TYPE", "value": "direct"},
                            {"name": "MAILPIPE_QUEUE", "value": "welcome"},
                            {"name": "MAILPIPE_QUEUE_TYPE", "value": "classic"},
                            {"name": "MAILPIPE_ROUTING_KEY", "value": "welcome"},
                            {"name": "MAILPIPE_MAX_PRIORITY", "value": "5"},
                            {"name": "MAILPIPE_PREFETCH", "value": "64"},
                            {"name": "MAILPIPE_SMTP_BUDGET_QUEUE", "value": "welcome.smtp-budget"},
                            {"name": "MAILPIPE_CONCURRENCY", "value": "8"},
                            {"name": "MAILPIPE_SMTP_HOST", "value": "smtp.example.com"},
                            {"name": "MAILPIPE_SMTP_PORT", "value": "465"},
                            {"name": "MAILPIPE_SMTP_TLS", "value": "tls"},
                            {"name": "MAILPIPE_SMTP_CA_FILE", "value": "/etc/mailpipe/smtp-ca/ca.crt"},
                            {"name": "MAILPIPE_SMTP_USERNAME", "valueFrom": {"secretKeyRef": {"key": "username", "name": "smtp"}}},
                            {"name": "MAILPIPE_SMTP_PASSWORD_FILE", "value": "/etc/mailpipe/smtp-credentials/password"},
                            // 20 connections shared at run time through the budget queue;
                            // 50 messages/s split among at most 5 replicas.
                            {"name": "MAILPIPE_SMTP_POOL_SIZE", "value": "20"},
                            {"name": "MAILPIPE_SMTP_RATE_LIMIT", "value": "10"},
                            {"name": "MAILPIPE_FROM_ADDRESS", "value": "noreply@example.com"},
                            {"name": "MAILPIPE_FROM_NAME", "value": "Example"},
                            {"name": "MAILPIPE_TEMPLATES_DIR", "value": "/etc/mailpipe/templates"},
                            {"name": "MAILPIPE_MAX_ATTEMPTS", "value": "4"},
                            {"name": "MAILPIPE_BACKOFF_INITIAL", "value": "2000ms"},
                            {"name": "MAILPIPE_BACKOFF_MULTIPLIER", "value": "3"},
                            {"name": "MAILPIPE_BACKOFF_MAX", "value": "60000ms"},
                            {"name": "MAILPIPE_DEAD_LETTER", "value": "true"},
                            {"name": "MAILPIPE_REDIS_URL_FILE", "value": "/etc/mailpipe/redis/url"},
                            {"name": "MAILPIPE_IDEMPOTENCY_TTL", "value": "43200000ms"},
                            {"name": "MAILPIPE_IDEMPOTENCY_PREFIX", "value": "mailpipe:mail:welcome"},
                            {"name": "MAILPIPE_ON_REDIS_UNAVAILABLE", "value": "pause"},
                            {"name": "MAILPIPE_HTTP_ADDR", "value": "0.0.0.0:9090"},
                            {"name": "MAILPIPE_LOG_FORMAT", "value": "json"},
                            // The grace period less 5 s.
                            {"name": "MAILPIPE_SHUTDOWN_TIMEOUT", "value": "25000ms"},
                            {"name": "TZ", "value": "UTC"},
                        ],
                        "ports": [{"containerPort": 9090, "name": "http", "protocol": "TCP"}],
                        "readinessProbe": {"failureThreshold": 3, "httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                        "livenessProbe": {"failureThreshold": 3, "httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                        "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": true, "runAsNonRoot": true},
                        "volumeMounts": [mount("amqp"), mount("amqp-ca"), mount("smtp-ca"), mount("smtp-credentials"),
                                         mount("templates"), mount("redis")],
                    }],
                    "securityContext": {"fsGroup": 65532, "runAsGroup": 65532, "runAsNonRoot": true, "runAsUser": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 30,
                    "volumes": [
                        secret_volume("amqp", "amqp", "url", "url"),
                        secret_volume("amqp-ca", "amqp-ca", "ca.crt", "ca.crt"),
                        secret_volume("smtp-ca", "smtp-ca", "ca.crt", "ca.crt"),
                        secret_volume("smtp-credentials", "smtp", "password", "password"),
                        {"configMap": {"name": "welcome-templates"}, "name": "templates"},
                        secret_volume("redis", "redis", "url", "url"),
                    ],
                },
            },
        },
    });
    assert_eq!(
        actual,
        expected,
        "{}",
        serde_json::to_string_pretty(&actual).unwrap()
    );
    // No replicas on an existing Deployment: the scaler owns them.
    assert!(deployment.spec.unwrap().replicas.is_none());
    // A new one starts at the count it is given, zero included.
    for n in [0, 3] {
        let created = build::worker_deployment(
            &pipeline(full()),
            &Inputs {
                starting_replicas: Some(n),
                ..inputs("r1")
            },
        );
        assert_eq!(created.spec.unwrap().replicas, Some(n as i32));
    }
}

#[test]
fn a_minimal_pipeline_runs_the_default_image_with_no_optional_secrets() {
    let minimal = json!({
        "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "welcome"}},
        "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
    });
    let deployment = build::worker_deployment(&pipeline(minimal), &inputs("r1"));
    let value = serde_json::to_value(&deployment).unwrap();
    let pod = &value["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/mailpipe/mailpipe-worker:0.1.0"
    );
    assert_eq!(
        pod["volumes"],
        json!([secret_volume("amqp", "amqp", "url", "url")])
    );
    let names: Vec<&str> = pod["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for absent in [
        "MAILPIPE_SMTP_USERNAME",
        "MAILPIPE_REDIS_URL_FILE",
        "MAILPIPE_TEMPLATES_DIR",
        "MAILPIPE_SMTP_RATE_LIMIT",
    ] {
        assert!(!names.contains(&absent), "{absent} is not set");
    }
    // Nothing secret is ever a value.
    let text = serde_json::to_string(&value).unwrap();
    assert!(!text.contains("amqp://"));
}

#[test]
fn the_config_hash_moves_with_the_spec_and_the_referenced_secrets_only() {
    let hash = |spec: Value, references: &str| {
        let d = build::worker_deployment(&pipeline(spec), &inputs(references));
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[CONFIG_HASH]
            .clone()
    };
    let base = hash(full(), "r1");
    assert_eq!(hash(full(), "r1"), base, "stable");
    assert_ne!(hash(full(), "r2"), base, "a referenced Secret changed");
    let mut changed = full();
    changed["worker"]["concurrency"] = json!(9);
    assert_ne!(hash(changed, "r1"), base, "the spec changed");
    let mut scaled = full();
    scaled["scaling"]["minReplicas"] = json!(1);
    assert_eq!(
        hash(scaled, "r1"),
        base,
        "scaling bounds do not roll the pods"
    );
}

#[test]
fn references_digest_ignores_order_and_sees_every_byte() {
    let a = build::references_digest([
        ("secret/amqp:url".to_string(), b"x".as_slice()),
        ("cm/t:a".to_string(), b"y".as_slice()),
    ]);
    let b = build::references_digest([
        ("cm/t:a".to_string(), b"y".as_slice()),
        ("secret/amqp:url".to_string(), b"x".as_slice()),
    ]);
    let c = build::references_digest([
        ("cm/t:a".to_string(), b"y".as_slice()),
        ("secret/amqp:url".to_string(), b"z".as_slice()),
    ]);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn the_metrics_service_and_the_disruption_budget_select_the_workers() {
    let p = pipeline(full());
    let service = serde_json::to_value(build::metrics_service(&p, &inputs("r1"))).unwrap();
    assert_eq!(
        service,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "welcome-worker", "namespace": "mail", "labels": labels(), "ownerReferences": owner()},
            "spec": {"selector": selector(),
                     "ports": [{"name": "http", "port": 9090, "targetPort": "http", "protocol": "TCP"}]},
        })
    );
    let budget = serde_json::to_value(build::disruption_budget(&p, &inputs("r1"))).unwrap();
    assert_eq!(
        budget,
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "welcome-worker", "namespace": "mail", "labels": labels(), "ownerReferences": owner()},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector()},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"},
        })
    );
    let monitor = build::service_monitor(&p, &inputs("r1"));
    assert_eq!(
        monitor,
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "welcome-worker", "namespace": "mail", "labels": labels(), "ownerReferences": owner()},
            "spec": {"selector": {"matchLabels": selector()},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s",
                                    "relabelings": [{"action": "replace",
                                                     "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                                                     "targetLabel": "pipeline"}]}]},
        })
    );
}
