//! tally: the workers' own counters, read from each worker's `/metrics` twice a second
//! and summed per pipeline over every worker the run started (a worker that has exited
//! keeps the counts last read from it).

use std::collections::HashMap;
use std::time::Duration;

use mailpipe_operator::scaling::actuator::Workload;
use mailpipe_operator::scaling::process_pool::ProcessPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::board::{Board, Totals};

/// How often the workers are read.
pub const EVERY: Duration = Duration::from_millis(500);

/// The window the send rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Reads `workloads`' workers (row `i` of `board` for `workloads[i]`) until `stop`.
pub async fn run(
    pool: std::sync::Arc<ProcessPool>,
    workloads: Vec<Workload>,
    board: Board,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client");
    // Per pipeline: the last counts of each worker (by pid), and recent (time, sent).
    let mut seen: Vec<HashMap<u32, Totals>> = vec![HashMap::new(); workloads.len()];
    let mut sent_at: Vec<Vec<(Instant, u64)>> = vec![Vec::new(); workloads.len()];
    loop {
        for (index, workload) in workloads.iter().enumerate() {
            let workers = pool.workers(workload);
            let mut running = Vec::new();
            for worker in &workers {
                let url = format!("http://127.0.0.1:{}/metrics", worker.port);
                let Ok(response) = http.get(&url).send().await else {
                    continue;
                };
                let Ok(text) = response.text().await else {
                    continue;
                };
                seen[index].insert(worker.pid, parse(&text));
                running.push(worker.pid);
            }
            let mut totals = Totals::default();
            for (pid, counts) in &seen[index] {
                totals.consumed += counts.consumed;
                totals.sent += counts.sent;
                totals.retried += counts.retried;
                for (reason, n) in &counts.failed {
                    *totals.failed.entry(reason.clone()).or_default() += n;
                }
                for (reason, n) in &counts.dead_lettered {
                    *totals.dead_lettered.entry(reason.clone()).or_default() += n;
                }
                // Jobs held: only by workers still there.
                if workers.iter().any(|w| w.pid == *pid) {
                    totals.in_flight += counts.in_flight;
                }
            }
            let now = Instant::now();
            let history = &mut sent_at[index];
            history.push((now, totals.sent));
            history.retain(|(at, _)| now.duration_since(*at) <= RATE_WINDOW);
            let rate = match (history.first(), history.last()) {
                (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                    n1.saturating_sub(*n0) as f64 / t1.duration_since(*t0).as_secs_f64()
                }
                _ => 0.0,
            };
            let status = pool.status(workload).unwrap_or_default();
            board.update(index, |row| {
                row.totals = totals;
                row.sent_rate = rate;
                row.pool = status;
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// The counters of one worker's metrics page (Prometheus' text format).
pub fn parse(text: &str) -> Totals {
    let mut totals = Totals::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value.max(0.0) as u64;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let reason = || {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix("reason=\""))
                .map(|r| r.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        match name {
            "mailpipe_jobs_consumed_total" => totals.consumed += value,
            "mailpipe_jobs_sent_total" => totals.sent += value,
            "mailpipe_jobs_in_flight" => totals.in_flight += value,
            "mailpipe_jobs_retried_total" => totals.retried += value,
            "mailpipe_jobs_failed_total" if value > 0 => {
                *totals.failed.entry(reason()).or_default() += value;
            }
            "mailpipe_jobs_dead_lettered_total" if value > 0 => {
                *totals.dead_lettered.entry(reason()).or_default() += value;
            }
            _ => {}
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_page_gives_the_counters() {
        let page = "\
# HELP mailpipe_jobs_sent_total Jobs accepted by the SMTP server.
# TYPE mailpipe_jobs_sent_total counter
mailpipe_jobs_sent_total 41
mailpipe_jobs_consumed_total 45
mailpipe_jobs_in_flight 3
mailpipe_jobs_retried_total{reason=\"smtp_transient\"} 2
mailpipe_jobs_failed_total{reason=\"smtp_transient\"} 2
mailpipe_jobs_failed_total{reason=\"smtp_permanent\"} 0
mailpipe_jobs_dead_lettered_total{reason=\"invalid_job\"} 1
";
        let totals = parse(page);
        assert_eq!(
            (
                totals.sent,
                totals.consumed,
                totals.in_flight,
                totals.retried
            ),
            (41, 45, 3, 2)
        );
        assert_eq!(totals.failed.get("smtp_transient"), Some(&2));
        assert_eq!(totals.failed.get("smtp_permanent"), None);
        assert_eq!(totals.dead_lettered_total(), 1);
    }
}
