//! The labels the operator puts on what it creates for a pipeline, so tools (the chart's
//! dashboards, the tests' runner, `kubectl get -l`) find a pipeline's parts without guessing.

/// `app.kubernetes.io/name`: what the object runs (`mailpipe-worker` for workers).
pub const NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the EmailPipeline's name.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component`: `worker` for the worker Deployment and its Service.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/part-of`: always `mailpipe`.
pub const PART_OF: &str = "app.kubernetes.io/part-of";
/// `app.kubernetes.io/managed-by`: the operator.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Value of [`NAME`] on worker objects.
pub const WORKER_NAME: &str = "mailpipe-worker";
/// Value of [`COMPONENT`] on worker objects.
pub const WORKER_COMPONENT: &str = "worker";
/// Value of [`PART_OF`].
pub const PROJECT: &str = "mailpipe";
/// Value of [`MANAGED_BY`].
pub const OPERATOR: &str = "mailpipe-operator";

/// Selects every mailpipe worker Deployment.
pub const WORKER_SELECTOR: &str =
    "app.kubernetes.io/part-of=mailpipe,app.kubernetes.io/component=worker";
