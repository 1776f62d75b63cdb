//! dereference (client required): the Secrets and ConfigMaps a pipeline refers to. Their
//! content never leaves this step except as what the topology needs (the AMQP URL and CA,
//! in memory) and a digest that rolls the pods when any of it changes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::build::references_digest;
use crate::crd::{EmailPipelineSpec, SecretKeyRef};
use crate::error::Error;

/// What the referenced objects hold, as far as the operator needs it.
#[derive(Default)]
pub struct Referenced {
    /// The AMQP URL (RabbitMQ sources). Secret: never logged.
    pub amqp_url: Option<String>,
    /// A PEM CA bundle for amqps.
    pub amqp_ca: Option<String>,
    /// The RabbitMQ management API URL with credentials. Secret: never logged.
    pub management_url: Option<String>,
    /// A PEM CA bundle for the Kafka brokers.
    pub kafka_ca: Option<String>,
    /// The Kafka SASL user name and password. Secret: never logged.
    pub kafka_sasl: Option<(String, String)>,
    /// A digest of every referenced key's content.
    pub digest: String,
}

impl std::fmt::Debug for Referenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Referenced")
            .field("amqp_url", &self.amqp_url.as_ref().map(|_| "***"))
            .field("kafka_sasl", &self.kafka_sasl.as_ref().map(|_| "***"))
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// The Secret keys holding a Kafka SASL login.
fn sasl_keys(spec: &EmailPipelineSpec) -> Option<(SecretKeyRef, SecretKeyRef)> {
    let sasl = spec.source.kafka.as_ref()?.sasl.as_ref()?;
    let key = |key: &str| SecretKeyRef {
        name: sasl.secret.clone(),
        key: key.to_string(),
    };
    Some((key("username"), key("password")))
}

/// The Secret keys a spec refers to.
pub fn secret_keys(spec: &EmailPipelineSpec) -> Vec<SecretKeyRef> {
    let mut keys = Vec::new();
    if let Some(rabbit) = &spec.source.rabbitmq {
        keys.push(rabbit.connection_secret.clone());
        keys.extend(rabbit.ca_secret.clone());
        keys.extend(rabbit.management_secret.clone());
    }
    if let Some(kafka) = &spec.source.kafka {
        keys.extend(kafka.ca_secret.clone());
    }
    if let Some((username, password)) = sasl_keys(spec) {
        keys.extend([username, password]);
    }
    keys.extend(spec.smtp.ca_secret.clone());
    if let Some(credentials) = &spec.smtp.credentials_secret {
        for key in [&credentials.username_key, &credentials.password_key] {
            keys.push(SecretKeyRef {
                name: credentials.name.clone(),
                key: key.clone(),
            });
        }
    }
    if let Some(idempotency) = &spec.delivery.idempotency {
        keys.push(idempotency.redis_secret.clone());
    }
    keys
}

/// Whether the spec refers to Secret `name` or ConfigMap `name` (for the watches).
pub fn refers_to_secret(spec: &EmailPipelineSpec, name: &str) -> bool {
    secret_keys(spec).iter().any(|k| k.name == name)
        || spec
            .source
            .kafka
            .as_ref()
            .and_then(|k| k.sasl.as_ref())
            .is_some_and(|s| s.secret == name)
}

/// Whether the spec refers to ConfigMap `name`.
pub fn refers_to_config_map(spec: &EmailPipelineSpec, name: &str) -> bool {
    spec.templates
        .as_ref()
        .is_some_and(|t| t.config_map == name)
}

/// Reads everything the spec refers to in `namespace`.
pub async fn dereference(
    client: &Client,
    namespace: &str,
    spec: &EmailPipelineSpec,
) -> Result<Referenced, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut cache: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut values: Vec<(String, Vec<u8>)> = Vec::new();
    for key in secret_keys(spec) {
        if !cache.contains_key(&key.name) {
            let secret = secrets.get_opt(&key.name).await?.ok_or_else(|| {
                Error::MissingReference(format!(
                    "Secret {:?} not found in namespace {namespace}",
                    key.name
                ))
            })?;
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            cache.insert(key.name.clone(), data);
        }
        let bytes = cache[&key.name].get(&key.key).cloned().ok_or_else(|| {
            Error::MissingReference(format!("Secret {:?} has no key {:?}", key.name, key.key))
        })?;
        values.push((format!("secret/{}:{}", key.name, key.key), bytes));
    }
    if let Some(templates) = &spec.templates {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let map = maps.get_opt(&templates.config_map).await?.ok_or_else(|| {
            Error::MissingReference(format!(
                "ConfigMap {:?} not found in namespace {namespace}",
                templates.config_map
            ))
        })?;
        for (key, text) in map.data.unwrap_or_default() {
            values.push((
                format!("configmap/{}:{key}", templates.config_map),
                text.into_bytes(),
            ));
        }
        for (key, bytes) in map.binary_data.unwrap_or_default() {
            values.push((format!("configmap/{}:{key}", templates.config_map), bytes.0));
        }
    }
    let text = |key: &Option<SecretKeyRef>| {
        key.as_ref()
            .and_then(|k| cache.get(&k.name)?.get(&k.key))
            .map(|b| String::from_utf8_lossy(b).trim().to_string())
    };
    let rabbit = spec.source.rabbitmq.as_ref();
    let sasl = sasl_keys(spec);
    Ok(Referenced {
        amqp_url: text(&rabbit.map(|r| r.connection_secret.clone())),
        amqp_ca: text(&rabbit.and_then(|r| r.ca_secret.clone())),
        management_url: text(&rabbit.and_then(|r| r.management_secret.clone())),
        kafka_ca: text(&spec.source.kafka.as_ref().and_then(|k| k.ca_secret.clone())),
        kafka_sasl: sasl.and_then(|(user, password)| text(&Some(user)).zip(text(&Some(password)))),
        digest: references_digest(values.iter().map(|(k, v)| (k.clone(), v.as_slice()))),
    })
}

/// The broker connection alone, for cleanup: each value the pipeline's Secrets still hold,
/// `None` for one whose Secret or key is gone (a namespace being deleted loses its Secrets
/// first; see `keep`). No digest.
pub async fn broker_connection(
    client: &Client,
    namespace: &str,
    spec: &EmailPipelineSpec,
) -> Result<Referenced, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |key: Option<SecretKeyRef>| {
        let secrets = secrets.clone();
        async move {
            let Some(key) = key else { return Ok(None) };
            let secret = secrets.get_opt(&key.name).await?;
            Ok::<_, kube::Error>(secret.and_then(|s| {
                s.data?
                    .get(&key.key)
                    .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            }))
        }
    };
    let rabbit = spec.source.rabbitmq.as_ref();
    let sasl = match sasl_keys(spec) {
        Some((user, password)) => read(Some(user)).await?.zip(read(Some(password)).await?),
        None => None,
    };
    Ok(Referenced {
        amqp_url: read(rabbit.map(|r| r.connection_secret.clone())).await?,
        amqp_ca: read(rabbit.and_then(|r| r.ca_secret.clone())).await?,
        management_url: read(rabbit.and_then(|r| r.management_secret.clone())).await?,
        kafka_ca: read(spec.source.kafka.as_ref().and_then(|k| k.ca_secret.clone())).await?,
        kafka_sasl: sasl,
        digest: String::new(),
    })
}
