//! Email jobs as producers write them, numbered so a test can tell exactly which arrived.

use serde_json::json;

/// Job `n` of a run: id `{run}-{n}`, recipient `user{n}@example.com`, subject
/// `Job {n} of {run}`, a text and an HTML body that both name `n`.
pub fn numbered(run: &str, n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": format!("{run}-{n}"),
        "to": [format!("user{n}@example.com")],
        "subject": format!("Job {n} of {run}"),
        "text": format!("Hello user {n}, this is job {n}."),
        "html": format!("<p>Hello user <b>{n}</b>, this is job {n}.</p>"),
    }))
    .expect("serializable job")
}

/// The job number in a received subject `Job {n} of {run}`, if it is one of `run`'s.
pub fn number_in_subject(subject: &str, run: &str) -> Option<usize> {
    let rest = subject.strip_prefix("Job ")?;
    let (n, tail) = rest.split_once(' ')?;
    (tail == format!("of {run}")).then(|| n.parse().ok())?
}

/// The job number in a raw received message (from its Subject header).
pub fn number_in_message(data: &str, run: &str) -> Option<usize> {
    data.lines()
        .find_map(|line| line.strip_prefix("Subject: "))
        .and_then(|subject| number_in_subject(subject.trim(), run))
}

/// Counts per job number 0..n: how many times each arrived.
pub fn tally(numbers: impl IntoIterator<Item = usize>, n: usize) -> Tally {
    let mut counts = vec![0usize; n];
    let mut foreign = 0;
    for number in numbers {
        match counts.get_mut(number) {
            Some(count) => *count += 1,
            None => foreign += 1,
        }
    }
    Tally {
        lost: counts.iter().filter(|c| **c == 0).count(),
        duplicated: counts.iter().map(|c| c.saturating_sub(1)).sum(),
        foreign,
    }
}

/// What arrived compared to what was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Jobs that never arrived.
    pub lost: usize,
    /// Extra copies beyond the first.
    pub duplicated: usize,
    /// Messages that are not jobs of this run.
    pub foreign: usize,
}

impl Tally {
    /// Every job exactly once, nothing else.
    pub const EXACT: Tally = Tally {
        lost: 0,
        duplicated: 0,
        foreign: 0,
    };
}
