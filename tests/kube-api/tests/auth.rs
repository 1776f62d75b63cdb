//! ServiceAccount identities against the test server: tokens from the TokenRequest API,
//! RBAC over stored roles and bindings, refusals worded as the real server words them, and
//! the ledger of grants a component used.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use mailpipe_kube_api::auth::Grant;
use mailpipe_kube_api::KubeApiServer;
use serde_json::json;

const USER: &str = "system:serviceaccount:ops:op";

async fn create(client: &Client, manifest: serde_json::Value) {
    let api_resource = match manifest["kind"].as_str().unwrap() {
        "Namespace" => ("", "namespaces", false),
        "ServiceAccount" => ("", "serviceaccounts", true),
        "ConfigMap" => ("", "configmaps", true),
        "ClusterRole" => ("rbac.authorization.k8s.io", "clusterroles", false),
        "ClusterRoleBinding" => ("rbac.authorization.k8s.io", "clusterrolebindings", false),
        "Role" => ("rbac.authorization.k8s.io", "roles", true),
        "RoleBinding" => ("rbac.authorization.k8s.io", "rolebindings", true),
        other => panic!("no kind {other}"),
    };
    let (group, plural, namespaced) = api_resource;
    let gvk = kube::api::GroupVersionKind::gvk(group, "v1", manifest["kind"].as_str().unwrap());
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
    let object: kube::api::DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
    let api: Api<kube::api::DynamicObject> =
        match (namespaced, manifest["metadata"]["namespace"].as_str()) {
            (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            _ => Api::all_with(client.clone(), &resource),
        };
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create {manifest}: {e}"));
}

async fn token(admin: &Client, expiration: Option<i64>) -> Result<String, kube::Error> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "ops");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": expiration},
    }))
    .unwrap();
    let issued = accounts
        .create_token_request("op", &PostParams::default(), &request)
        .await?;
    Ok(issued.status.unwrap().token.expect("a token"))
}

async fn client_with(server: &KubeApiServer, token: &str) -> Client {
    let text = mailpipe_kube_api::token_kubeconfig(&server.url(), token, "ops");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn status(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.message),
        other => panic!("not an API error: {other}"),
    }
}

fn config_map(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})
}

#[tokio::test]
async fn a_service_account_may_do_what_its_roles_grant_and_nothing_more() {
    let server = KubeApiServer::start().await.unwrap();
    let admin = server.client();
    for manifest in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ops"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "op", "namespace": "ops"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "reader"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "reader"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "writer", "namespace": "shop"},
               "rules": [
                   {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]},
                   {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"], "resourceNames": ["applied"]},
                   {"apiGroups": ["apps"], "resources": ["deployments/status"], "verbs": ["patch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "writer", "namespace": "shop"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "writer"},
               "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}),
    ] {
        create(&admin, manifest).await;
    }
    let token = token(&admin, None).await.expect("a token");
    let op = client_with(&server, &token).await;

    // Discovery and version are every authenticated user's.
    op.apiserver_version().await.expect("/version");
    op.list_api_groups().await.expect("/apis");

    // The ClusterRole reads everywhere; nothing deletes.
    let everywhere: Api<ConfigMap> = Api::all(op.clone());
    everywhere.list(&ListParams::default()).await.expect("list");
    let in_shop: Api<ConfigMap> = Api::namespaced(op.clone(), "shop");
    let (code, message) = status(
        in_shop
            .delete("x", &DeleteParams::default())
            .await
            .expect_err("no delete"),
    );
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "configmaps \"x\" is forbidden: User \"system:serviceaccount:ops:op\" cannot delete resource \"configmaps\" in API group \"\" in the namespace \"shop\""
    );

    // An apply that creates needs `create` of that name too; once it exists, `patch` alone.
    let apply = PatchParams::apply("op");
    in_shop
        .patch("applied", &apply, &Patch::Apply(config_map("applied")))
        .await
        .expect("patch and create of `applied` are granted");
    let (code, message) = status(
        in_shop
            .patch("other", &apply, &Patch::Apply(config_map("other")))
            .await
            .expect_err("creating `other` is not granted"),
    );
    assert_eq!(
        (
            code,
            message.contains("cannot create resource \"configmaps\"")
        ),
        (403, true),
        "{message}"
    );
    let as_admin: Api<ConfigMap> = Api::namespaced(admin.clone(), "shop");
    as_admin
        .create(
            &PostParams::default(),
            &serde_json::from_value(config_map("other")).unwrap(),
        )
        .await
        .unwrap();
    in_shop
        .patch("other", &apply, &Patch::Apply(config_map("other")))
        .await
        .expect("patching an existing object needs patch only");
    // A subresource never creates: an apply to the status of a missing object is a 404,
    // whatever the account may create (the real status stores never ask).
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(op.clone(), "shop");
    let (code, _) = status(
        deployments
            .patch_status(
                "missing",
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "missing"}, "status": {"replicas": 1},
                })),
            )
            .await
            .expect_err("no such Deployment"),
    );
    assert_eq!(code, 404);
    // The Role is the shop's only.
    let in_ops: Api<ConfigMap> = Api::namespaced(op.clone(), "ops");
    let (code, _) = status(
        in_ops
            .patch("applied", &apply, &Patch::Apply(config_map("applied")))
            .await
            .expect_err("no Role in ops"),
    );
    assert_eq!(code, 403);

    // The ledger: which rules allowed what, and what was refused.
    let used = server.store().lock().unwrap().grants_used(USER);
    let grant = |role: &str, verb: &str, name: Option<&str>| Grant {
        role: role.to_string(),
        bound_in: None,
        group: String::new(),
        resource: "configmaps".into(),
        verb: verb.into(),
        name: name.map(str::to_string),
    };
    assert_eq!(
        used,
        vec![
            grant("ClusterRole/reader", "list", None),
            grant("Role/shop/writer", "create", Some("applied")),
            grant("Role/shop/writer", "patch", None),
            Grant {
                group: "apps".into(),
                resource: "deployments/status".into(),
                ..grant("Role/shop/writer", "patch", None)
            },
        ]
    );
    let refused = server.store().lock().unwrap().refusals(USER);
    assert_eq!(
        refused,
        vec![
            "delete configmaps in shop x",
            "create configmaps in shop other",
            "patch configmaps in ops applied",
        ],
    );
}

#[tokio::test]
async fn tokens_are_refused_when_unknown_too_short_or_their_account_is_gone() {
    let server = KubeApiServer::start().await.unwrap();
    let admin = server.client();
    create(
        &admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ops"}}),
    )
    .await;

    // No account, no token.
    let (code, _) = status(token(&admin, None).await.expect_err("no account"));
    assert_eq!(code, 404);
    create(&admin, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "op", "namespace": "ops"}})).await;
    let (code, message) = status(
        token(&admin, Some(60))
            .await
            .expect_err("under ten minutes"),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("may not specify a duration less than 10 minutes"),
        "{message}"
    );

    let made_up = client_with(&server, "made-up").await;
    let (code, message) = status(
        made_up
            .apiserver_version()
            .await
            .expect_err("unknown token"),
    );
    assert_eq!((code, message.as_str()), (401, "Unauthorized"));

    let token = token(&admin, None).await.unwrap();
    let op = client_with(&server, &token).await;
    op.apiserver_version().await.expect("a good token");
    // Without a role it may see discovery, and nothing else.
    let (code, message) = status(
        Api::<ConfigMap>::all(op.clone())
            .list(&ListParams::default())
            .await
            .expect_err("no role"),
    );
    assert_eq!(code, 403);
    assert!(message.ends_with("at the cluster scope"), "{message}");

    // The account deleted, then made again: the old token is bound to the old one.
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "ops");
    accounts
        .delete("op", &DeleteParams::default())
        .await
        .unwrap();
    let (code, _) = status(op.apiserver_version().await.expect_err("account gone"));
    assert_eq!(code, 401);
    create(&admin, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "op", "namespace": "ops"}})).await;
    let (code, _) = status(op.apiserver_version().await.expect_err("another account"));
    assert_eq!(code, 401);
}

#[tokio::test]
async fn roles_and_bindings_are_validated_as_the_real_server_does() {
    let server = KubeApiServer::start().await.unwrap();
    let admin = server.client();
    let roles = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "ClusterRole"),
        "clusterroles",
    );
    let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &roles);
    let bad: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "bad"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"]}, {"verbs": ["get"]}],
    }))
    .unwrap();
    let (code, message) = status(
        api.create(&PostParams::default(), &bad)
            .await
            .expect_err("invalid"),
    );
    assert_eq!(code, 422);
    for field in ["rules[0].verbs", "rules[1].apiGroups", "rules[1].resources"] {
        assert!(message.contains(field), "{field} in {message}");
    }

    let bindings = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
        "clusterrolebindings",
    );
    let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &bindings);
    let binding = |role_kind: &str, role: &str, namespace: Option<&str>| {
        let mut subject = json!({"kind": "ServiceAccount", "name": "op"});
        if let Some(ns) = namespace {
            subject["namespace"] = json!(ns);
        }
        serde_json::from_value::<kube::api::DynamicObject>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "b"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [subject],
        }))
        .unwrap()
    };
    let (code, message) = status(
        api.create(&PostParams::default(), &binding("Role", "r", None))
            .await
            .expect_err("a Role in a cluster binding, and a subject without namespace"),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("roleRef.kind") && message.contains("subjects[0].namespace"),
        "{message}"
    );
    api.create(
        &PostParams::default(),
        &binding("ClusterRole", "r", Some("ops")),
    )
    .await
    .unwrap();
    let (code, message) = status(
        api.replace(
            "b",
            &PostParams::default(),
            &binding("ClusterRole", "other", Some("ops")),
        )
        .await
        .expect_err("roleRef is immutable"),
    );
    assert_eq!(code, 422);
    assert!(message.contains("cannot change roleRef"), "{message}");
}
