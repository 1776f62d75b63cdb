//! The generated EmailPipeline CRD in the Kubernetes API test server: accepted, defaults
//! filled in, and bad specs refused by the schema and the CEL rules with clear messages.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use mailpipe_kube_api::KubeApiServer;
use mailpipe_operator::crd::EmailPipeline;
use serde_json::{json, Value};

fn pipeline(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn minimal() -> Value {
    json!({
        "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "welcome"}},
        "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
    })
}

/// The message of a refused create.
async fn refused(api: &Api<DynamicObject>, name: &str, spec: Value) -> String {
    match api
        .create(&PostParams::default(), &pipeline(name, spec))
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            e.message
        }
        other => panic!("{name} was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn the_crd_is_accepted_defaults_apply_and_bad_specs_are_refused_clearly() {
    let server = KubeApiServer::start().await.unwrap();
    let client = server.client();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.create(&PostParams::default(), &mailpipe_operator::crd())
        .await
        .expect("the generated CRD is accepted");
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mailpipe.dev", "v1alpha1", "EmailPipeline"),
        "emailpipelines",
    );
    let api: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &resource);

    let created = api
        .create(&PostParams::default(), &pipeline("welcome", minimal()))
        .await
        .unwrap();
    let spec = &created.data["spec"];
    assert!(
        spec["source"]["rabbitmq"]["exchange"].is_null(),
        "no shared default exchange: the operator derives one per queue"
    );
    assert_eq!(spec["source"]["rabbitmq"]["queueType"], "classic");
    assert_eq!(spec["smtp"]["port"], 587);
    assert_eq!(spec["smtp"]["tls"], "starttls");
    assert_eq!(spec["delivery"]["maxAttempts"], 5);
    assert_eq!(spec["delivery"]["backoff"]["initial"], "5s");
    assert_eq!(spec["scaling"]["minReplicas"], 1);
    assert_eq!(spec["scaling"]["maxReplicas"], 5);
    assert_eq!(spec["deletionPolicy"], "Retain");
    // The typed resource reads what the server stored.
    let typed: Api<EmailPipeline> = Api::default_namespaced(client.clone());
    let read = typed.get("welcome").await.unwrap();
    assert_eq!(read.spec.delivery.max_attempts, 5);

    // Names that would make invalid children are refused at admission (a real server
    // refused the Service `mail.v2-worker` and a 64-byte label value).
    for name in ["mail.v2", &"a".repeat(57)] {
        let message = refused(&api, name, minimal()).await;
        assert!(
            message.contains("metadata.name must have no dots and at most 56 characters"),
            "{name}: {message}"
        );
    }
    api.create(
        &PostParams::default(),
        &pipeline(&"a".repeat(56), minimal()),
    )
    .await
    .expect("a 56-character name is fine");
    // Label values over 63 bytes are refused on custom resources too, as on any object.
    let mut labelled = pipeline("labelled", minimal());
    labelled.metadata.labels = Some([("team".to_string(), "x".repeat(64))].into());
    match api.create(&PostParams::default(), &labelled).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message.contains("must be no more than 63 bytes"),
                "{}",
                e.message
            );
        }
        other => panic!("a 64-byte label value was accepted: {other:?}"),
    }

    let mut both = minimal();
    both["source"]["kafka"] = json!({"bootstrapServers": ["kafka:9092"], "topic": "welcome"});
    assert!(refused(&api, "both", both)
        .await
        .contains("exactly one of spec.source.rabbitmq or spec.source.kafka must be set"));

    let mut neither = minimal();
    neither["source"] = json!({});
    assert!(refused(&api, "neither", neither)
        .await
        .contains("exactly one of spec.source.rabbitmq or spec.source.kafka must be set"));

    let mut priority = minimal();
    priority["source"]["rabbitmq"]["queueType"] = json!("quorum");
    priority["source"]["rabbitmq"]["maxPriority"] = json!(5);
    assert!(refused(&api, "priority", priority)
        .await
        .contains("maxPriority needs queueType classic"));

    let mut bounds = minimal();
    bounds["scaling"] = json!({"minReplicas": 5, "maxReplicas": 2});
    assert!(refused(&api, "bounds", bounds)
        .await
        .contains("spec.scaling.minReplicas must be <= spec.scaling.maxReplicas"));

    let mut tls = minimal();
    tls["smtp"]["tls"] = json!("ssl");
    let message = refused(&api, "tls", tls).await;
    assert!(
        message.contains("spec.smtp.tls: Unsupported value: \"ssl\""),
        "{message}"
    );

    let mut queue = minimal();
    queue["source"]["rabbitmq"]["queue"] = json!("bad name!");
    let message = refused(&api, "queue", queue).await;
    assert!(message.contains("spec.source.rabbitmq.queue"), "{message}");

    // Queue names are immutable: renaming one would strand the jobs in it.
    let rename = json!({"spec": {"source": {"rabbitmq": {"queue": "welcome-2"}}}});
    match api
        .patch("welcome", &PatchParams::default(), &Patch::Merge(rename))
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert!(
                e.message
                    .contains("spec.source.rabbitmq.queue is immutable"),
                "{}",
                e.message
            );
        }
        other => panic!("the rename was not refused: {other:?}"),
    }
    // So are the exchange type, the priority and dead-lettering: the broker would refuse
    // the declaration.
    for (patch, field) in [
        (
            json!({"spec": {"source": {"rabbitmq": {"exchangeType": "topic"}}}}),
            "source.rabbitmq.exchangeType",
        ),
        (
            json!({"spec": {"source": {"rabbitmq": {"maxPriority": 5}}}}),
            "source.rabbitmq.maxPriority",
        ),
        (
            json!({"spec": {"delivery": {"deadLetter": false}}}),
            "delivery.deadLetter",
        ),
    ] {
        match api
            .patch("welcome", &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422);
                assert!(
                    e.message.contains(&format!("spec.{field} is immutable")),
                    "{}",
                    e.message
                );
            }
            other => panic!("the {field} change was not refused: {other:?}"),
        }
    }
    // Other fields can change.
    let more = json!({"spec": {"scaling": {"maxReplicas": 20}}});
    api.patch("welcome", &PatchParams::default(), &Patch::Merge(more))
        .await
        .unwrap();
}

/// What of `written` the server kept in `stored` (defaults it added left out).
fn kept(written: &Value, stored: &Value) -> Value {
    match (written, stored) {
        (Value::Object(w), Value::Object(s)) => Value::Object(
            w.iter()
                .filter_map(|(k, v)| s.get(k).map(|sv| (k.clone(), kept(v, sv))))
                .collect(),
        ),
        (Value::Array(w), Value::Array(s)) if w.len() == s.len() => {
            Value::Array(w.iter().zip(s).map(|(a, b)| kept(a, b)).collect())
        }
        (_, s) => s.clone(),
    }
}

#[tokio::test]
async fn every_example_pipeline_is_accepted_and_valid() {
    let server = KubeApiServer::start().await.unwrap();
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(server.client());
    crds.create(&PostParams::default(), &mailpipe_operator::crd())
        .await
        .unwrap();
    let api: Api<DynamicObject> = Api::default_namespaced_with(
        server.client(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("mailpipe.dev", "v1alpha1", "EmailPipeline"),
            "emailpipelines",
        ),
    );
    let examples = mailpipe_tests::repo_root().join("deploy/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let object: DynamicObject = serde_yaml_ng::from_str(&text).unwrap();
        let name = object.metadata.name.clone().unwrap();
        // Admitted by the schema and the CEL rules, nothing pruned.
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let written = serde_json::to_value(&object).unwrap()["spec"].clone();
        let stored = serde_json::to_value(&created).unwrap()["spec"].clone();
        assert_eq!(
            kept(&written, &stored),
            written,
            "{}: fields dropped",
            path.display()
        );
        // And what the operator makes of it: no invalid spec.
        let pipeline: EmailPipeline =
            serde_json::from_value(serde_json::to_value(&created).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        mailpipe_operator::validate::validate(&name, "default", &pipeline.spec)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "emailpipeline.yaml",
            "kafka-emailpipeline.yaml",
            "scaled-emailpipeline.yaml",
            "transactional-emailpipeline.yaml"
        ]
    );
}
