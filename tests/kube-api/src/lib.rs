//! A small Kubernetes API test server for mailpipe's end-to-end tests.
//!
//! Real clients (kube-rs, kubectl) talk to it unchanged over plain HTTP on loopback. It keeps
//! objects in memory and implements the parts of the API mailpipe uses, checked against
//! exchanges recorded from a real kube-apiserver (`tests/kube-api/fixtures/`). It is test
//! support, never shipped. Modules: `auth` (ServiceAccount tokens, RBAC authorization),
//! `registry` (kinds, discovery), `store` (objects, resourceVersions, history, apply,
//! managedFields, garbage collection), `builtin` (what the real server does to built-in
//! kinds), `server` (HTTP, lists, watch, discovery), `views` (OpenAPI, Tables), `validation`
//! (schemas, CEL), `fields`, `selector`, `patch`, `errors`, and `runner`, which plays the
//! Deployment controller and kubelet.
#![forbid(unsafe_code)]

pub mod auth;
pub mod builtin;
pub mod errors;
pub mod fields;
pub mod patch;
pub mod registry;
pub mod runner;
pub mod selector;
pub mod server;
pub mod store;
pub mod validation;
pub mod views;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::store::Store;

/// A running server, stopped when dropped.
pub struct KubeApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    store: server::Shared,
    task: JoinHandle<()>,
}

impl KubeApiServer {
    /// Starts a server on a free loopback port.
    pub async fn start() -> std::io::Result<KubeApiServer> {
        KubeApiServer::start_on("127.0.0.1:0".parse().expect("valid address")).await
    }

    /// Starts a server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<KubeApiServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store: server::Shared = Arc::new(Mutex::new(Store::new()));
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(store.clone());
        let collector = store.clone();
        let task = tokio::spawn(async move {
            // The garbage collector of the controller manager, in-process.
            let gc = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    collector.lock().expect("store lock").collect_garbage();
                }
            });
            let _ = axum::serve(listener, app).await;
            gc.abort();
        });
        Ok(KubeApiServer { addr, store, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Direct access to the store (for test set-up and assertions).
    pub fn store(&self) -> &server::Shared {
        &self.store
    }

    /// A kube-rs client for this server (namespace `default`).
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("a valid URL"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("a client for a plain HTTP URL")
    }

    /// Writes a kubeconfig pointing at this server (namespace `default`).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, kubeconfig(&self.url()))
    }
}

/// A recorded exchange from `fixtures/` (e.g. `006-create-crd.json`), for tests.
pub fn fixture(file: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("fixture {file} is not JSON: {e}"))
}

/// The EmailPipeline CRD the real server was recorded with (printer columns, status, scale,
/// defaults, validation and CEL rules).
pub fn recorded_crd() -> serde_json::Value {
    fixture("006-create-crd.json")["request"]["body"].clone()
}

/// A kubeconfig for a server at `url`, with no credentials: the cluster admin (`auth`).
pub fn kubeconfig(url: &str) -> String {
    kubeconfig_with(url, "{}", "default")
}

/// A kubeconfig for a server at `url` that sends a ServiceAccount `token`, with
/// `namespace` as its default namespace (what a pod of that namespace gets).
pub fn token_kubeconfig(url: &str, token: &str, namespace: &str) -> String {
    kubeconfig_with(url, &format!("{{token: {token}}}"), namespace)
}

fn kubeconfig_with(url: &str, user: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: mailpipe-test\n  cluster:\n    server: {url}\n\
         users:\n- name: mailpipe-test\n  user: {user}\ncontexts:\n- name: mailpipe-test\n  context:\n    \
         cluster: mailpipe-test\n    user: mailpipe-test\n    namespace: {namespace}\n\
         current-context: mailpipe-test\n"
    )
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
