//! A cluster for end-to-end tests of the operator: the Kubernetes API test server, the
//! generated CRD applied with kubectl, the runner playing kubelet for worker Deployments
//! (real worker processes), and operator replicas as processes that authenticate as the
//! ServiceAccount of `deploy/rbac.yaml` (applied in `default`), so the server refuses what
//! the shipped rules do not grant.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use mailpipe_kube_api::runner::{Runner, RunnerConfig};
use mailpipe_kube_api::KubeApiServer;

use crate::process::Proc;
use crate::{built_binary, free_port, repo_root, worker};

/// A prometheus-operator CRD (group monitoring.coreos.com, v1) reduced to what the tests
/// need: its names, and a spec of any shape.
pub fn monitoring_crd(kind: &str, plural: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {{kind: {kind}, listKind: {kind}List, plural: {plural}, singular: {singular}}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
",
        singular = kind.to_ascii_lowercase()
    )
}

/// An operator replica: its process and the port of its /metrics.
pub struct Operator {
    pub proc: Proc,
    pub port: u16,
}

impl Operator {
    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .and_then(|r| r.error_for_status())
            .expect("the operator serves /metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

/// A test's own cluster; everything stops when it is dropped.
pub struct Cluster {
    pub server: KubeApiServer,
    pub client: kube::Client,
    pub runner: Runner,
    /// The admin's kubeconfig (kubectl in tests).
    pub kubeconfig: PathBuf,
    /// The operator ServiceAccount's token, which operator replicas authenticate with.
    operator_token: String,
    dir: tempfile::TempDir,
}

/// The operator's ServiceAccount: `deploy/rbac.yaml`'s, in `default` instead of
/// mailpipe-system.
pub const OPERATOR_USER: &str = "system:serviceaccount:default:mailpipe-operator";

impl Cluster {
    /// Starts the server, applies `crds/` with kubectl and starts the runner.
    pub async fn start() -> Cluster {
        let server = KubeApiServer::start()
            .await
            .expect("the test server starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let runner = Runner::start(
            server.client(),
            RunnerConfig::new(
                mailpipe_contract::labels::WORKER_SELECTOR,
                &dir.path().join("pods"),
            )
            .api_server(&server.url())
            .program(mailpipe_contract::labels::WORKER_NAME, &worker::binary()),
        );
        let mut cluster = Cluster {
            client: server.client(),
            server,
            runner,
            kubeconfig,
            operator_token: String::new(),
            dir,
        };
        let crd = repo_root().join("crds/emailpipelines.mailpipe.dev.yaml");
        let applied = cluster
            .kubectl(&["apply", "-f", crd.to_str().expect("UTF-8 path")])
            .await;
        let stderr = String::from_utf8_lossy(&applied.stderr);
        assert!(
            applied.status.success(),
            "kubectl apply of the CRD: {stderr}"
        );
        // A real API server warns about every schema format it does not know.
        assert!(
            !stderr.contains("Warning"),
            "installing the CRD printed warnings: {stderr}"
        );
        // The operator's ServiceAccount and RBAC as shipped: operator replicas run as it, so
        // the server refuses whatever deploy/rbac.yaml does not grant.
        let rbac = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml"))
            .expect("deploy/rbac.yaml")
            .replace("mailpipe-system", "default");
        let applied = cluster.apply(&rbac).await;
        assert!(applied.status.success(), "deploy/rbac.yaml: {applied:?}");
        cluster.operator_token = mailpipe_kube_api::auth::token_for(
            &cluster.client,
            "default",
            "mailpipe-operator",
            36000,
        )
        .await
        .expect("a token for the operator");
        cluster
    }

    /// Runs kubectl against this cluster.
    pub async fn kubectl(&self, args: &[&str]) -> Output {
        let kubeconfig = self.kubeconfig.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new("kubectl")
                .env("KUBECONFIG", kubeconfig)
                .args(&args)
                .output()
                .expect("kubectl is installed (scripts/test-servers.sh)")
        })
        .await
        .expect("kubectl ran")
    }

    /// Runs kubectl and returns its output, failing the test when it fails.
    pub async fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args).await;
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `kubectl apply` of a manifest given as text.
    pub async fn apply(&self, manifest: &str) -> Output {
        let path = self
            .dir
            .path()
            .join(format!("{}.yaml", crate::unique("manifest")));
        std::fs::write(&path, manifest).expect("manifest written");
        self.kubectl(&["apply", "-f", path.to_str().expect("UTF-8 path")])
            .await
    }

    /// Starts an operator replica named `identity`, with a short Lease (3 s, renewed
    /// within 2 s, retried every 0.5 s) so hand-overs take seconds in tests.
    pub fn operator(&self, identity: &str) -> Operator {
        self.operator_with(
            identity,
            &[
                "--lease-duration",
                "3s",
                "--renew-deadline",
                "2s",
                "--retry-period",
                "500ms",
            ],
            None,
        )
    }

    /// Starts an operator replica named `identity` with `args` added (the Lease timing is
    /// the defaults unless they say otherwise); with `api_port`, it reaches the API server
    /// through that port (a fault proxy in front of it).
    pub fn operator_with(&self, identity: &str, args: &[&str], api_port: Option<u16>) -> Operator {
        let port = free_port();
        let url = match api_port {
            None => self.server.url(),
            Some(api_port) => format!("http://127.0.0.1:{api_port}"),
        };
        let kubeconfig = self.dir.path().join(format!("kubeconfig-{identity}"));
        std::fs::write(
            &kubeconfig,
            mailpipe_kube_api::token_kubeconfig(&url, &self.operator_token, "default"),
        )
        .expect("kubeconfig");
        let mut command = Command::new(built_binary("mailpipe-operator", "MAILPIPE_OPERATOR_BIN"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "MAILPIPE_OPERATOR_LOG",
                "info,mailpipe_operator=debug,kube=warn",
            )
            .args(["run", "--identity", identity, "--log-format", "text"])
            .args(args)
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--worker-image", "ghcr.io/mailpipe/mailpipe-worker:test"]);
        let proc = Proc::spawn(
            &format!("operator {identity}"),
            command,
            &self.dir.path().join(format!("operator-{identity}.log")),
        );
        Operator { proc, port }
    }

    /// Fails the test when the server refused a request of the operator (its replicas run
    /// as its ServiceAccount, with `deploy/rbac.yaml`'s rules); returns how many of those
    /// rules' permissions it used.
    pub fn check_operator_rbac(&self) -> usize {
        let store = self.server.store().lock().expect("store lock");
        let refused = store.refusals(OPERATOR_USER);
        assert!(
            refused.is_empty(),
            "deploy/rbac.yaml does not allow what the operator asked:\n{}",
            refused.join("\n")
        );
        store.grants_used(OPERATOR_USER).len()
    }

    /// Who holds the operator's Lease (`mailpipe-operator` in `default`) now; empty when
    /// nobody does yet.
    pub async fn lease_holder(&self) -> String {
        let out = self
            .kubectl(&[
                "get",
                "lease",
                "mailpipe-operator",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How long a test waits for the operator and the runner to converge.
    pub const SETTLE: Duration = Duration::from_secs(60);
}
