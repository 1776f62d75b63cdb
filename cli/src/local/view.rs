//! view: what a person watching a local run sees. On a terminal, a live table (ratatui)
//! of every pipeline: backlog, retry and dead-letter depth, replicas desired, running and
//! ready, jobs sent and the send rate, failures by reason, and the last scale decisions
//! with their reasons; keys publish a burst and stop the run. Elsewhere (a pipe, a log,
//! CI), the same figures as plain lines every few seconds and one line per scale decision.
//! The summary at the end is plain text either way.

use std::fmt::Write as _;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row as TableRow, Table};
use ratatui::DefaultTerminal;

use super::board::{Row, Scaled};

/// `12.3s` style, for times since the run started.
fn clock(at: Duration) -> String {
    let s = at.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

fn reasons(counts: &std::collections::BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn queues(row: &Row) -> (String, String, String) {
    match (&row.backlog, &row.unreadable) {
        (_, Some(_)) | (None, _) => ("?".into(), "?".into(), "?".into()),
        (Some(b), None) => (
            b.ready.to_string(),
            b.delayed.to_string(),
            b.dead_letter.map_or("-".into(), |d| d.to_string()),
        ),
    }
}

/// One status line of a pipeline.
pub fn line(row: &Row, at: Duration) -> String {
    let (ready, delayed, dead) = queues(row);
    let mut text = format!(
        "{} {}: backlog {ready}, retrying {delayed}, dead letters {dead} | replicas {} desired, {} running, {} ready",
        clock(at),
        row.name,
        row.pool.desired,
        row.pool.running,
        row.pool.ready
    );
    if row.pool.stopping > 0 {
        let _ = write!(text, ", {} stopping", row.pool.stopping);
    }
    let _ = write!(
        text,
        " | sent {} ({:.0}/s), published {} | failures: {}",
        row.totals.sent,
        row.sent_rate,
        row.published,
        reasons(&row.totals.failed)
    );
    if let Some(why) = &row.unreadable {
        let _ = write!(text, " | backlog unreadable: {why}");
    }
    text
}

/// The line of one scale decision.
pub fn decision(row: &Row, scaled: &Scaled) -> String {
    format!(
        "{} {}: scaled {} -> {} ({}; {} jobs)",
        clock(scaled.at),
        row.name,
        scaled.from,
        scaled.to,
        scaled.reason,
        scaled.work
    )
}

/// The summary printed when a run ends.
pub fn summary(rows: &[Row], ran: Duration, inbox: Option<&str>) -> String {
    let mut out = format!("== summary: ran {}\n", clock(ran));
    for row in rows {
        let t = &row.totals;
        let _ = writeln!(
            out,
            "   {}: published {}, sent {}, dead-lettered {} ({}), failed attempts {}, retried {}; peak replicas {}, worker restarts {}",
            row.name,
            row.published,
            t.sent,
            t.dead_lettered_total(),
            reasons(&t.dead_lettered),
            t.failed.values().sum::<u64>(),
            t.retried,
            row.peak_replicas,
            row.pool.restarts
        );
        if let Some(b) = &row.backlog {
            if b.ready + b.delayed > 0 {
                let _ = writeln!(
                    out,
                    "   {}: {} jobs left in the queue, {} waiting out a retry delay (they stay in RabbitMQ for the next run)",
                    row.name, b.ready, b.delayed
                );
            }
        }
    }
    if let Some(inbox) = inbox {
        let _ = writeln!(out, "   the delivered mail: {inbox}");
    }
    out
}

/// What a key asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Publish a burst into the first pipeline.
    Burst,
    /// Drain the workers and stop (a second time: kill them).
    Stop,
}

/// The live table.
pub struct Tui {
    terminal: DefaultTerminal,
}

impl Tui {
    /// Takes over the terminal (restored on drop and on a panic).
    pub fn start() -> std::io::Result<Tui> {
        Ok(Tui {
            terminal: ratatui::try_init()?,
        })
    }

    /// Keys pressed since the last look (never waits).
    pub fn keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        while event::poll(Duration::ZERO).unwrap_or(false) {
            let Ok(Event::Key(key)) = event::read() else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            match key.code {
                KeyCode::Char('b') => keys.push(Key::Burst),
                KeyCode::Char('q') | KeyCode::Esc => keys.push(Key::Stop),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    keys.push(Key::Stop)
                }
                _ => {}
            }
        }
        keys
    }

    /// Draws `rows` with `footer` (what the keys do, or what the run is doing).
    pub fn draw(&mut self, rows: &[Row], at: Duration, footer: &str) -> std::io::Result<()> {
        let header = TableRow::new(
            [
                "pipeline",
                "backlog",
                "retrying",
                "dead",
                "desired",
                "running (+stopping)",
                "ready",
                "sent",
                "sent/s",
                "failures",
            ]
            .map(Cell::from),
        )
        .style(Style::default().add_modifier(Modifier::BOLD));
        let table_rows: Vec<TableRow> = rows
            .iter()
            .map(|row| {
                let (ready, delayed, dead) = queues(row);
                let running = if row.pool.stopping > 0 {
                    format!("{} (+{})", row.pool.running, row.pool.stopping)
                } else {
                    row.pool.running.to_string()
                };
                TableRow::new(vec![
                    Cell::from(row.name.clone()),
                    Cell::from(ready),
                    Cell::from(delayed),
                    Cell::from(dead),
                    Cell::from(row.pool.desired.to_string()),
                    Cell::from(running),
                    Cell::from(row.pool.ready.to_string()),
                    Cell::from(row.totals.sent.to_string()),
                    Cell::from(format!("{:.0}", row.sent_rate)),
                    Cell::from(reasons(&row.totals.failed)),
                ])
            })
            .collect();
        let widths = [
            Constraint::Min(18),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(20),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Min(12),
        ];
        let mut log: Vec<Line> = Vec::new();
        for row in rows {
            log.push(Line::from(format!(
                "{} ({} -> {}): published {}{}, dead-lettered {}, worker restarts {}, last decision {}",
                row.name,
                row.exchange,
                row.queue,
                row.published,
                if row.publishing { " (publishing)" } else { "" },
                reasons(&row.totals.dead_lettered),
                row.pool.restarts,
                if row.reason.is_empty() { "-" } else { row.reason },
            )));
            for scaled in row.decisions.iter().rev() {
                log.push(Line::from(format!("  {}", decision(row, scaled))));
            }
        }
        let title = format!(" mailpipe local  {} ", clock(at));
        self.terminal.draw(|frame| {
            let [top, middle, bottom] = Layout::vertical([
                Constraint::Length(rows.len() as u16 + 3),
                Constraint::Min(3),
                Constraint::Length(1),
            ])
            .areas(frame.area());
            frame.render_widget(
                Table::new(table_rows, widths)
                    .header(header)
                    .block(Block::bordered().title(title)),
                top,
            );
            frame.render_widget(
                Paragraph::new(log).block(Block::bordered().title(" scale decisions ")),
                middle,
            );
            frame.render_widget(Paragraph::new(footer.to_string()), bottom);
        })?;
        Ok(())
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        ratatui::restore();
    }
}
