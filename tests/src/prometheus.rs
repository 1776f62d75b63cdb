//! A real Prometheus (Debian's 2.42, `scripts/test-servers.sh`) of a test's own: it scrapes
//! every second the targets the test lists in file-based service discovery, one file per
//! job, with the labels a ServiceMonitor would give them, and answers PromQL over its HTTP
//! API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::Proc;
use crate::{eventually, free_port};

pub struct Prometheus {
    pub port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    _proc: Proc,
}

/// One scrape target: `127.0.0.1:PORT` and its labels.
pub type Target = (u16, BTreeMap<String, String>);

impl Prometheus {
    /// Starts Prometheus with the scrape jobs `jobs` (name, honor_labels), each reading its
    /// targets from a file that [`Prometheus::set_targets`] writes.
    pub async fn start(jobs: &[(&str, bool)]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, honor_labels) in jobs {
            let file = dir.path().join(format!("{job}.json"));
            std::fs::write(&file, "[]").expect("targets file");
            config.push_str(&format!(
                "  - job_name: {job}\n    honor_labels: {honor_labels}\n    file_sd_configs:\n      - files: [{}]\n        refresh_interval: 1s\n",
                file.display()
            ));
        }
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("config");
        let port = free_port();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", command, &dir.path().join("prometheus.log"));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        let prometheus = Prometheus {
            port,
            dir,
            http,
            _proc: proc,
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        eventually(Duration::from_secs(30), "Prometheus ready", || async {
            let answer = prometheus.http.get(&ready).send().await.ok()?;
            answer.status().is_success().then_some(())
        })
        .await;
        prometheus
    }

    /// Replaces job `job`'s targets.
    pub fn set_targets(&self, job: &str, targets: &[Target]) {
        let groups: Vec<Value> = targets
            .iter()
            .map(|(port, labels)| json!({"targets": [format!("127.0.0.1:{port}")], "labels": labels}))
            .collect();
        let file: PathBuf = self.dir.path().join(format!("{job}.json"));
        let staging = self.dir.path().join(format!("{job}.json.new"));
        std::fs::write(&staging, serde_json::to_vec(&groups).expect("JSON")).expect("write");
        // A rename, so Prometheus never reads half a file.
        std::fs::rename(&staging, &file).expect("rename");
    }

    /// Waits until `targets` targets of job `job` have been scraped (`up` is 1).
    pub async fn wait_scraped(&self, job: &str, targets: usize) {
        let expr = format!("up{{job=\"{job}\"}} == 1");
        eventually(
            Duration::from_secs(30),
            &format!("{job} scraped"),
            || async {
                let start = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("time")
                    .as_secs_f64()
                    - 1.0;
                (self
                    .query_range(&expr, start, Duration::from_secs(1))
                    .await
                    .len()
                    >= targets)
                    .then_some(())
            },
        )
        .await;
    }

    /// `expr` evaluated every `step` from `start` (Unix seconds) to now: each series' labels
    /// and values. Panics with Prometheus's message when the query is refused.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        step: Duration,
    ) -> Vec<(BTreeMap<String, String>, Vec<f64>)> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs_f64();
        let answer: Value = self
            .http
            .get(format!("http://127.0.0.1:{}/api/v1/query_range", self.port))
            .query(&[
                ("query", expr.to_string()),
                ("start", format!("{start:.3}")),
                ("end", format!("{end:.3}")),
                ("step", format!("{}", step.as_secs_f64())),
            ])
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("JSON");
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"]
            .as_array()
            .expect("a matrix")
            .iter()
            .map(|series| {
                let labels = serde_json::from_value(series["metric"].clone()).expect("labels");
                let values = series["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|pair| {
                        pair[1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                (labels, values)
            })
            .collect()
    }
}
