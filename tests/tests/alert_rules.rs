//! The alerting rules (`deploy/prometheus/alerts.yaml`) with the real promtool: they load,
//! and their unit tests (`alerts.test.yaml`: every alert firing on the series meant to fire
//! it, not before its `for`, and quiet on those beside it) pass.

use std::process::Command;

use mailpipe_tests::repo_root;

fn promtool(args: &[&str]) -> String {
    let dir = repo_root().join("deploy/prometheus");
    let output = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool cannot run ({e}): scripts/test-servers.sh installs it (apt-get install prometheus)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alerting_rules_load() {
    let text = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
}

#[test]
fn every_alert_fires_when_it_should_and_only_then() {
    let text = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    // Each alert has a unit test.
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yaml"))
        .expect("alerts.yaml");
    let tests = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.test.yaml"))
        .expect("alerts.test.yaml");
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "{name} has no unit test"
            );
        }
    }
}
