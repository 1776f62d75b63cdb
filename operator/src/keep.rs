//! keep (client required): what a `deletionPolicy: Delete` pipeline's cleanup needs from its
//! Secrets, kept by the operator in its own namespace.
//!
//! Deleting a namespace deletes its Secrets before it marks the pipelines in it (the
//! namespace controller empties built-in kinds first), so a cleanup that read the broker
//! connection only from the pipeline's own Secrets could never reach the broker and would
//! hold the namespace in Terminating. While a Delete pipeline has a topology, the operator
//! keeps a copy of the broker connection (the AMQP URL, its CA, the management URL) in the
//! Secret `mailpipe-broker-<pipeline uid>` of the operator's namespace; cleanup uses the
//! pipeline's own Secrets while they exist (a rotated password wins) and this copy when they
//! are gone, and deletes the copy once the pipeline lets go. Nothing else is copied (no SMTP
//! credentials), and the copy never leaves the operator's namespace.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use crate::crd::EmailPipeline;
use crate::dereference::Referenced;
use crate::MANAGER;

const AMQP_URL: &str = "amqp-url";
const AMQP_CA: &str = "amqp-ca";
const MANAGEMENT_URL: &str = "management-url";
const KAFKA_CA: &str = "kafka-ca";
const KAFKA_SASL_USERNAME: &str = "kafka-sasl-username";
const KAFKA_SASL_PASSWORD: &str = "kafka-sasl-password";

/// What a kept copy holds: each key with its value, where there is one.
fn kept_values(referenced: &Referenced) -> [(&'static str, Option<&String>); 6] {
    let sasl = referenced.kafka_sasl.as_ref();
    [
        (AMQP_URL, referenced.amqp_url.as_ref()),
        (AMQP_CA, referenced.amqp_ca.as_ref()),
        (MANAGEMENT_URL, referenced.management_url.as_ref()),
        (KAFKA_CA, referenced.kafka_ca.as_ref()),
        (KAFKA_SASL_USERNAME, sasl.map(|(user, _)| user)),
        (KAFKA_SASL_PASSWORD, sasl.map(|(_, password)| password)),
    ]
}

/// The kept copies this process wrote, by pipeline uid: their digest, so an unchanged
/// connection is not written again on every reconcile.
#[derive(Default)]
pub struct Kept(Mutex<HashMap<String, String>>);

/// Where the copies live.
pub struct Keeper<'a> {
    pub client: &'a Client,
    /// The operator's own namespace.
    pub namespace: &'a str,
    pub kept: &'a Kept,
}

/// The kept Secret's name for a pipeline.
pub fn secret_name(pipeline: &EmailPipeline) -> String {
    format!("mailpipe-broker-{}", pipeline.uid().unwrap_or_default())
}

fn digest(referenced: &Referenced) -> String {
    crate::build::references_digest(
        kept_values(referenced)
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.as_bytes()))),
    )
}

impl Keeper<'_> {
    fn api(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), self.namespace)
    }

    /// Keeps (or refreshes) the copy of `pipeline`'s broker connection.
    pub async fn remember(
        &self,
        pipeline: &EmailPipeline,
        referenced: &Referenced,
    ) -> Result<(), kube::Error> {
        let uid = pipeline.uid().unwrap_or_default();
        let digest = digest(referenced);
        if self.kept.0.lock().expect("kept lock").get(&uid) == Some(&digest) {
            return Ok(());
        }
        let mut data = BTreeMap::new();
        for (key, value) in kept_values(referenced) {
            if let Some(value) = value {
                data.insert(key, ByteString(value.clone().into_bytes()));
            }
        }
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": secret_name(pipeline),
                "labels": {
                    "app.kubernetes.io/managed-by": MANAGER,
                    "mailpipe.dev/pipeline-namespace": pipeline.namespace().unwrap_or_default(),
                    "mailpipe.dev/pipeline": pipeline.name_any(),
                },
            },
            "type": "Opaque",
            "data": data,
        });
        self.api()
            .patch(
                &secret_name(pipeline),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        self.kept.0.lock().expect("kept lock").insert(uid, digest);
        Ok(())
    }

    /// Fills what the pipeline's own Secrets no longer hold from the kept copy. `false`
    /// when there is no copy.
    pub async fn recall(
        &self,
        pipeline: &EmailPipeline,
        referenced: &mut Referenced,
    ) -> Result<bool, kube::Error> {
        let Some(secret) = self.api().get_opt(&secret_name(pipeline)).await? else {
            return Ok(false);
        };
        let data = secret.data.unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        };
        referenced.amqp_url = referenced.amqp_url.take().or_else(|| text(AMQP_URL));
        referenced.amqp_ca = referenced.amqp_ca.take().or_else(|| text(AMQP_CA));
        referenced.management_url = referenced
            .management_url
            .take()
            .or_else(|| text(MANAGEMENT_URL));
        referenced.kafka_ca = referenced.kafka_ca.take().or_else(|| text(KAFKA_CA));
        referenced.kafka_sasl = referenced
            .kafka_sasl
            .take()
            .or_else(|| text(KAFKA_SASL_USERNAME).zip(text(KAFKA_SASL_PASSWORD)));
        Ok(true)
    }

    /// Deletes the copy if this process kept one (the policy changed to Retain); no call
    /// otherwise.
    pub async fn forget_if_kept(&self, pipeline: &EmailPipeline) -> Result<(), kube::Error> {
        let uid = pipeline.uid().unwrap_or_default();
        if self.kept.0.lock().expect("kept lock").contains_key(&uid) {
            self.forget(pipeline).await?;
        }
        Ok(())
    }

    /// Deletes the copy (the pipeline let go of its topology, or keeps it on deletion).
    pub async fn forget(&self, pipeline: &EmailPipeline) -> Result<(), kube::Error> {
        self.kept
            .0
            .lock()
            .expect("kept lock")
            .remove(&pipeline.uid().unwrap_or_default());
        match self
            .api()
            .delete(&secret_name(pipeline), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
