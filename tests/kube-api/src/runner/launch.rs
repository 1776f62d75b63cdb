//! Starting a replica the way the kubelet would: the image's local program, the pod
//! template's arguments and environment (Secrets and ConfigMaps resolved, `$(VAR)`
//! expanded), its volumes written under the pod's directory with the paths that name them
//! rewritten.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, PodSpec, PodTemplateSpec, Secret, ServiceAccount,
};
use kube::api::Api;
use tokio::process::{Child, Command};

use super::pod::{Key, Pod, State};
use super::Kubelet;

impl Kubelet {
    /// Starts the pod's process, or leaves it waiting with the reason (a missing Secret, say)
    /// and tries again a second later, as the kubelet does.
    pub(super) async fn launch(&self, key: &Key, template: &PodTemplateSpec, pod: &mut Pod) {
        match self.spawn(key, template, pod).await {
            Ok(child) => pod.state = State::Running(child),
            Err(e) => {
                tracing::warn!(pod = %pod.name, "runner: cannot start: {e:#}");
                pod.state = State::Waiting {
                    reason: format!("{e:#}"),
                    retry_at: Instant::now() + Duration::from_secs(1),
                }
            }
        }
    }

    async fn spawn(
        &self,
        key: &Key,
        template: &PodTemplateSpec,
        pod: &Pod,
    ) -> anyhow::Result<Child> {
        let spec = template.spec.clone().unwrap_or_default();
        let [container] = spec.containers.as_slice() else {
            return Err(anyhow!("the runner runs pods of exactly one container"));
        };
        let image = container.image.clone().unwrap_or_default();
        let program = self
            .config
            .programs
            .get(image_name(&image))
            .ok_or_else(|| anyhow!("no local program for image {image:?}"))?;
        let mounts = self
            .mount_volumes(&key.0, &spec, container, &pod.dir)
            .await?;
        let mut env = self.environment(&key.0, &pod.name, container).await?;
        for value in env.values_mut() {
            *value = remap(value, &mounts);
        }
        if let Some(kubeconfig) = self.credentials(&key.0, &spec, &pod.dir).await? {
            env.insert("KUBECONFIG".to_string(), kubeconfig.display().to_string());
        }
        env.insert(
            self.config.port_env.clone(),
            format!("127.0.0.1:{}", pod.port),
        );
        let lookup: BTreeMap<String, String> = env.clone().into_iter().collect();
        let args: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(container.args.iter().flatten())
            .map(|a| remap(&expand(a, &lookup), &mounts))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pod.dir.join("container.log"))?;
        let mut command = Command::new(program);
        command
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOSTNAME", &pod.name)
            .envs(&env)
            .current_dir(&pod.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// The pod's API credentials, as the kubelet projects its ServiceAccount's token: a
    /// token from the TokenRequest API for `serviceAccountName` (`default` when it names
    /// none), unless the pod or its ServiceAccount sets `automountServiceAccountToken:
    /// false`. They are handed over as a kubeconfig in the pod's directory (for
    /// `KUBECONFIG`), not as the in-cluster files under /var/run/secrets, which a process
    /// here cannot be given. A missing ServiceAccount keeps the pod waiting, as the real
    /// API server refuses its pods.
    async fn credentials(
        &self,
        namespace: &str,
        spec: &PodSpec,
        dir: &Path,
    ) -> anyhow::Result<Option<PathBuf>> {
        if spec.automount_service_account_token == Some(false) {
            return Ok(None);
        }
        let name = spec
            .service_account_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let account = accounts.get_opt(&name).await?.ok_or_else(|| {
            anyhow!(
                "error looking up service account {namespace}/{name}: serviceaccount \"{name}\" not found"
            )
        })?;
        if spec.automount_service_account_token.is_none()
            && account.automount_service_account_token == Some(false)
        {
            return Ok(None);
        }
        let server = self.config.api_server.as_deref().ok_or_else(|| {
            anyhow!("the pod needs API credentials and the runner knows no API server address")
        })?;
        let token = crate::auth::token_for(&self.client, namespace, &name, 3600).await?;
        let path = dir.join("kubeconfig");
        std::fs::write(&path, crate::token_kubeconfig(server, &token, namespace))?;
        Ok(Some(path))
    }

    /// Writes the container's Secret, ConfigMap and emptyDir mounts under the pod's
    /// directory; returns (mount path, local path), longest mount first.
    async fn mount_volumes(
        &self,
        namespace: &str,
        spec: &PodSpec,
        container: &Container,
        dir: &Path,
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| anyhow!("volume {:?} is not defined", mount.name))?;
            let local = dir.join("mounts").join(mount.name.as_str());
            std::fs::create_dir_all(&local)?;
            let (files, items) = if let Some(secret) = &volume.secret {
                let name = secret.secret_name.clone().unwrap_or_default();
                let files = match self.secret(namespace, &name).await? {
                    Some(files) => files,
                    None if secret.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("secret \"{name}\" not found")),
                };
                (files, secret.items.clone())
            } else if let Some(map) = &volume.config_map {
                let files = match self.config_map(namespace, &map.name).await? {
                    Some(files) => files,
                    None if map.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("configmap \"{}\" not found", map.name)),
                };
                (files, map.items.clone())
            } else if volume.empty_dir.is_some() {
                (BTreeMap::new(), None)
            } else {
                return Err(anyhow!(
                    "volume {:?}: the runner mounts secret, configMap and emptyDir volumes",
                    mount.name
                ));
            };
            let files: Vec<(String, Vec<u8>)> = match items {
                None => files.into_iter().collect(),
                Some(items) => items
                    .iter()
                    .map(|item| {
                        files
                            .get(&item.key)
                            .map(|bytes| (item.path.clone(), bytes.clone()))
                            .ok_or_else(|| anyhow!("key {:?} is missing", item.key))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            for (path, bytes) in files {
                let file = local.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&file, bytes)?;
            }
            let target = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => local.join(sub),
                _ => local,
            };
            mounts.push((mount.mount_path.trim_end_matches('/').to_string(), target));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(mounts)
    }

    /// The container's environment, resolved as the kubelet resolves it: `envFrom` first,
    /// then `env` in order, each value expanding `$(VAR)` of the variables before it.
    async fn environment(
        &self,
        namespace: &str,
        pod: &str,
        container: &Container,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.clone().unwrap_or_default();
            let values = if let Some(secret) = &source.secret_ref {
                match self.secret(namespace, &secret.name).await? {
                    Some(values) => values,
                    None if secret.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("secret \"{}\" not found", secret.name)),
                }
            } else if let Some(map) = &source.config_map_ref {
                match self.config_map(namespace, &map.name).await? {
                    Some(values) => values,
                    None if map.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("configmap \"{}\" not found", map.name)),
                }
            } else {
                BTreeMap::new()
            };
            for (name, bytes) in values {
                env.insert(format!("{prefix}{name}"), text(bytes));
            }
        }
        for var in container.env.iter().flatten() {
            if let Some(value) = self.env_value(namespace, pod, var, &env).await? {
                env.insert(var.name.clone(), value);
            }
        }
        Ok(env)
    }

    async fn env_value(
        &self,
        namespace: &str,
        pod: &str,
        var: &EnvVar,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Option<String>> {
        let Some(from) = &var.value_from else {
            return Ok(Some(expand(var.value.as_deref().unwrap_or(""), env)));
        };
        if let Some(r) = &from.secret_key_ref {
            let values = self.secret(namespace, &r.name).await?;
            return pick(values, &r.key, r.optional, "secret", &r.name);
        }
        if let Some(r) = &from.config_map_key_ref {
            let values = self.config_map(namespace, &r.name).await?;
            return pick(values, &r.key, r.optional, "configmap", &r.name);
        }
        if let Some(r) = &from.field_ref {
            let value = match r.field_path.as_str() {
                "metadata.name" => pod.to_string(),
                "metadata.namespace" => namespace.to_string(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
                "spec.nodeName" => "local".to_string(),
                other => return Err(anyhow!("fieldRef {other:?} is not supported")),
            };
            return Ok(Some(value));
        }
        Err(anyhow!("env {:?}: unsupported valueFrom", var.name))
    }

    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    async fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(|m| {
            let text = m
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()));
            let binary = m
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0));
            text.chain(binary).collect()
        }))
    }
}

fn pick(
    values: Option<BTreeMap<String, Vec<u8>>>,
    key: &str,
    optional: Option<bool>,
    kind: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let optional = optional == Some(true);
    match values {
        None if optional => Ok(None),
        None => Err(anyhow!("{kind} \"{name}\" not found")),
        Some(values) => match values.get(key) {
            Some(bytes) => Ok(Some(text(bytes.clone()))),
            None if optional => Ok(None),
            None => Err(anyhow!("couldn't find key {key} in {kind} {name}")),
        },
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The image's name: last path segment, without tag or digest.
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last)
}

/// `$(VAR)` expanded from `env` as Kubernetes does: unknown references stay as written and
/// `$$` is a literal `$`.
pub fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(name_end) = after.strip_prefix('(').and_then(|s| s.find(')')) {
            let name = &after[1..=name_end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[at..at + name_end + 3]),
            }
            rest = &after[name_end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A value naming a path under a mount (the whole value, or after `--flag=`), rewritten to
/// where the runner mounted it. `mounts` is longest first.
pub fn remap(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (head, path) = match value.split_once('=') {
        Some((flag, path)) if flag.starts_with('-') => (format!("{flag}="), path),
        _ => (String::new(), value),
    };
    for (mount, local) in mounts {
        if let Some(rest) = path.strip_prefix(mount.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{head}{}{rest}", local.display());
            }
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_drop_registry_tag_and_digest() {
        assert_eq!(
            image_name("ghcr.io/mailpipe/mailpipe-worker:0.1.0"),
            "mailpipe-worker"
        );
        assert_eq!(image_name("mailpipe-worker"), "mailpipe-worker");
        assert_eq!(image_name("registry:5000/w@sha256:abc"), "w");
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$5", &env), "x-$(B)-$(A)-$5");
        assert_eq!(expand("tail $(", &env), "tail $(");
    }

    #[test]
    fn paths_under_mounts_are_rewritten_whole_or_after_a_flag() {
        let mounts = vec![
            (
                "/etc/mailpipe/smtp".to_string(),
                PathBuf::from("/pods/p/smtp"),
            ),
            ("/etc/mailpipe".to_string(), PathBuf::from("/pods/p/cfg")),
        ];
        assert_eq!(
            remap("/etc/mailpipe/smtp/password", &mounts),
            "/pods/p/smtp/password"
        );
        assert_eq!(
            remap("--templates=/etc/mailpipe/t", &mounts),
            "--templates=/pods/p/cfg/t"
        );
        assert_eq!(remap("/etc/mailpipeX", &mounts), "/etc/mailpipeX");
        assert_eq!(remap("a=/etc/mailpipe", &mounts), "a=/etc/mailpipe");
    }
}
