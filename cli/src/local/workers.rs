//! workers: how local mode starts a pipeline's workers. The environment is the one the
//! operator gives a worker pod (`build::worker_environment`), with each Secret key and
//! ConfigMap placed the local way: a Secret key found as a file is passed as that file's
//! path, one found in the environment as the worker's plain variable (`MAILPIPE_AMQP_URL`
//! for `MAILPIPE_AMQP_URL_FILE`), or, for the CA bundles that have no plain variable, as a
//! file of this run's own directory, readable by this user only.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use mailpipe_contract::env;
use mailpipe_operator::build::{worker_environment, WorkerVar};
use mailpipe_operator::crd::SecretKeyRef;
use mailpipe_operator::scaling::process_pool::WorkerCommand;

use crate::pipelines::Loaded;
use crate::secrets::{Found, LocalSecrets};

/// Where the worker processes of a run find what they need.
pub struct Places<'a> {
    pub secrets: &'a LocalSecrets,
    /// `DIR/<configmap>/` holds a ConfigMap's keys as files.
    pub config_maps: Option<&'a Path>,
    /// This run's private directory (CA bundles given as variables go there).
    pub run_dir: &'a Path,
    /// The pipeline's worker logs directory.
    pub logs: PathBuf,
}

/// The `*_FILE` variables the worker also reads without the suffix, as the value itself.
const WITH_PLAIN: &[&str] = &[
    env::AMQP_URL_FILE,
    env::SMTP_PASSWORD_FILE,
    env::REDIS_URL_FILE,
];

/// How to start `pipeline`'s workers with `program`.
pub fn command(
    pipeline: &Loaded,
    program: &Path,
    places: &Places<'_>,
) -> anyhow::Result<WorkerCommand> {
    let mut vars = Vec::new();
    for var in worker_environment(&pipeline.valid) {
        match var {
            // The pool gives each worker a loopback port of its own.
            WorkerVar::Value(name, _) if name == env::HTTP_ADDR => {}
            // A person reads these log files.
            WorkerVar::Value(name, _) if name == env::LOG_FORMAT => {
                vars.push((name, "text".to_string()));
            }
            WorkerVar::Value(name, value) => vars.push((name, value)),
            WorkerVar::SecretFile { name, secret, .. } => {
                vars.push(secret_file(&name, &secret, places)?);
            }
            WorkerVar::SecretValue { name, secret } => {
                vars.push((name, places.secrets.read(&secret)?));
            }
            WorkerVar::ConfigMapDir { name, config_map } => {
                let dir = places.config_maps.map(|d| d.join(&config_map));
                match dir {
                    Some(dir) if dir.is_dir() => {
                        vars.push((name, absolute(&dir)?.display().to_string()));
                    }
                    _ => bail!(
                        "spec.templates names the ConfigMap {config_map:?}: give --config-maps-dir DIR with its keys as files in DIR/{config_map}/"
                    ),
                }
            }
            WorkerVar::Extra(var) => {
                let from_secret = var
                    .value_from
                    .as_ref()
                    .and_then(|from| from.secret_key_ref.as_ref());
                match (&var.value, from_secret) {
                    (_, Some(selector)) => {
                        let key = SecretKeyRef {
                            name: selector.name.clone(),
                            key: selector.key.clone(),
                        };
                        vars.push((var.name.clone(), places.secrets.read(&key)?));
                    }
                    (Some(value), None) => vars.push((var.name.clone(), value.clone())),
                    (None, None) if var.value_from.is_none() => {
                        vars.push((var.name.clone(), String::new()));
                    }
                    (None, None) => bail!(
                        "spec.worker.env {}: only values and secretKeyRef work in local mode (there is no pod to read fields of)",
                        var.name
                    ),
                }
            }
        }
    }
    // A worker runs in a process group of its own: nothing but this tells it that a
    // killed `mailpipe local` is gone.
    vars.push((env::STOP_WITH_PARENT.to_string(), "true".to_string()));
    Ok(WorkerCommand {
        program: program.to_path_buf(),
        args: Vec::new(),
        env: vars,
        // The pod's grace period: the drain deadline and the margin the operator keeps.
        stop_within: Duration::from_secs(
            pipeline
                .valid
                .worker
                .termination_grace_period_seconds
                .max(1) as u64,
        ),
        logs: Some(places.logs.clone()),
    })
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// A Secret key the worker reads from the file `name` names.
fn secret_file(
    name: &str,
    secret: &SecretKeyRef,
    places: &Places<'_>,
) -> anyhow::Result<(String, String)> {
    match places.secrets.find(secret)? {
        Found::File(path) => Ok((name.to_string(), absolute(&path)?.display().to_string())),
        Found::Value(value) if WITH_PLAIN.contains(&name) => {
            let plain = name.strip_suffix("_FILE").expect("a _FILE variable");
            Ok((plain.to_string(), value))
        }
        Found::Value(value) => {
            let dir = places.run_dir.join("secrets").join(&secret.name);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join(&secret.key);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            std::io::Write::write_all(&mut file, value.as_bytes())?;
            Ok((name.to_string(), path.display().to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(extra: &str) -> Loaded {
        let text = format!(
            "apiVersion: mailpipe.dev/v1alpha1
kind: EmailPipeline
metadata: {{name: welcome}}
spec:
  source:
    rabbitmq:
      connectionSecret: {{name: amqp, key: url}}
      caSecret: {{name: amqp, key: ca.crt}}
      queue: welcome
  smtp:
    host: 127.0.0.1
    from: {{address: noreply@example.com}}
    credentialsSecret: {{name: smtp}}
{extra}"
        );
        crate::pipelines::parse("p.yaml", &text)
            .expect("valid")
            .remove(0)
    }

    fn get<'a>(command: &'a WorkerCommand, name: &str) -> Option<&'a str> {
        command
            .env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn secrets_are_placed_as_files_or_plain_variables() {
        let dir = tempfile::tempdir().expect("a directory");
        let secrets_dir = dir.path().join("secrets");
        std::fs::create_dir_all(secrets_dir.join("smtp")).unwrap();
        std::fs::write(secrets_dir.join("smtp/password"), "pw\n").unwrap();
        let secrets = LocalSecrets::with_env(Some(secrets_dir.clone()), |name| match name {
            "MAILPIPE_SECRET_AMQP_URL" => Some("amqp://u:p@127.0.0.1/%2f".into()),
            "MAILPIPE_SECRET_AMQP_CA_CRT" => Some("-----BEGIN CERTIFICATE-----".into()),
            "MAILPIPE_SECRET_SMTP_USERNAME" => Some("mailer".into()),
            _ => None,
        });
        let run = dir.path().join("run");
        let places = Places {
            secrets: &secrets,
            config_maps: None,
            run_dir: &run,
            logs: dir.path().join("logs"),
        };
        let command = command(&loaded(""), Path::new("/bin/worker"), &places).expect("a command");
        assert_eq!(
            get(&command, "MAILPIPE_AMQP_URL"),
            Some("amqp://u:p@127.0.0.1/%2f")
        );
        assert_eq!(get(&command, "MAILPIPE_AMQP_URL_FILE"), None);
        let ca = get(&command, "MAILPIPE_AMQP_CA_FILE").expect("a CA file");
        assert_eq!(
            std::fs::read_to_string(ca).unwrap(),
            "-----BEGIN CERTIFICATE-----"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            get(&command, "MAILPIPE_SMTP_PASSWORD_FILE"),
            Some(secrets_dir.join("smtp/password").to_str().unwrap())
        );
        assert_eq!(get(&command, "MAILPIPE_SMTP_USERNAME"), Some("mailer"));
        assert_eq!(get(&command, "MAILPIPE_HTTP_ADDR"), None);
        assert_eq!(get(&command, "MAILPIPE_LOG_FORMAT"), Some("text"));
        assert_eq!(get(&command, "MAILPIPE_TOPOLOGY"), Some("verify"));
        assert_eq!(command.stop_within, Duration::from_secs(60));
    }

    #[test]
    fn a_missing_secret_or_config_map_is_named() {
        let dir = tempfile::tempdir().expect("a directory");
        let secrets = LocalSecrets::with_env(None, |_| None);
        let places = Places {
            secrets: &secrets,
            config_maps: Some(dir.path()),
            run_dir: dir.path(),
            logs: dir.path().into(),
        };
        let error = command(&loaded(""), Path::new("w"), &places).unwrap_err();
        assert!(
            error.to_string().contains("MAILPIPE_SECRET_AMQP_URL"),
            "{error}"
        );
        let all = LocalSecrets::with_env(None, |_| Some("x".into()));
        let places = Places {
            secrets: &all,
            ..places
        };
        let error = command(
            &loaded("  templates: {configMap: mail-templates}\n"),
            Path::new("w"),
            &places,
        )
        .unwrap_err();
        assert!(error.to_string().contains("DIR/mail-templates/"), "{error}");
    }
}
