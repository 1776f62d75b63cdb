//! From the outcome of an attempt to the settlement the source applies, with the metrics
//! and the log line that go with it: ack, retry (for the whole job, or for the recipients a
//! partial delivery left), dead-letter, or requeue.

use super::{Outcome, Pipeline};
use crate::disposition::{decide, Disposition, Failure, SendClass};
use crate::mailer::{Delivered, Mailer, Refused};
use crate::source::Settlement;

impl<M: Mailer> Pipeline<M> {
    /// Turns an outcome into a settlement, with the metrics and the log line that go with it.
    pub(super) fn settlement(&self, outcome: Outcome, attempt: u32, job_id: String) -> Settlement {
        match outcome {
            Outcome::Sent(delivered) if delivered.refused.is_empty() => {
                self.metrics.sent.inc();
                tracing::info!("sent");
                Settlement::Ack
            }
            Outcome::Sent(delivered) => self.partly_sent(delivered, attempt, job_id),
            Outcome::Duplicate => {
                self.metrics.duplicates_skipped.inc();
                tracing::info!("already sent; skipped");
                Settlement::Ack
            }
            Outcome::NotStarted => {
                self.metrics.given_back.inc();
                tracing::info!("not sent before the stop; given back to the queue");
                Settlement::Requeue
            }
            Outcome::Failed(failure) => {
                let reason = failure.reason();
                self.metrics.failed_for(reason).inc();
                if failure == Failure::Expired {
                    self.metrics.expired.inc();
                }
                let code = match &failure {
                    Failure::Send(e) => e.code,
                    _ => None,
                };
                tracing::debug!(detail = %failure.detail(), "failure detail");
                match decide(&failure, attempt, &self.retry) {
                    Disposition::Retry {
                        next_attempt,
                        after,
                    } => {
                        self.metrics.retried_for(reason).inc();
                        tracing::warn!(reason, ?code, next_attempt, retry_in = ?after, "attempt failed; will retry");
                        Settlement::Retry {
                            next_attempt,
                            after,
                            recipients: None,
                        }
                    }
                    Disposition::DeadLetter {
                        reason: final_reason,
                    } => {
                        self.metrics.dead_lettered_for(final_reason).inc();
                        tracing::warn!(
                            reason = final_reason,
                            cause = reason,
                            ?code,
                            "dead-lettered"
                        );
                        let detail = if final_reason == reason {
                            failure.detail()
                        } else {
                            format!("{reason}: {}", failure.detail())
                        };
                        Settlement::DeadLetter {
                            reason: final_reason,
                            detail,
                            attempts: attempt,
                            job_id,
                            recipients: None,
                        }
                    }
                }
            }
        }
    }

    /// The server took the message for some recipients and refused others: those refused
    /// for now get a retry copy addressed to them alone (or, out of attempts, a dead-letter
    /// copy); those refused for good, when nothing is left to retry, a dead-letter copy
    /// naming them (`recipient_refused`). Either way the job counts as sent.
    fn partly_sent(&self, delivered: Delivered, attempt: u32, job_id: String) -> Settlement {
        self.metrics.sent.inc();
        let (transient, permanent): (Vec<_>, Vec<_>) = delivered
            .refused
            .into_iter()
            .partition(|r| r.error.class == SendClass::Transient);
        for (class, list) in [("transient", &transient), ("permanent", &permanent)] {
            self.metrics
                .recipients_refused
                .with_label_values(&[class])
                .inc_by(list.len() as u64);
        }
        let codes: Vec<Option<u16>> = transient
            .iter()
            .chain(&permanent)
            .map(|r| r.error.code)
            .collect();
        tracing::warn!(
            refused_for_now = transient.len(),
            refused_for_good = permanent.len(),
            ?codes,
            "sent, but the server refused some recipients"
        );
        let addresses = |list: &[Refused]| -> Vec<String> {
            list.iter().map(|r| r.recipient.to_string()).collect()
        };
        if let Some(first) = transient.first() {
            let failure = Failure::Send(first.error.clone());
            return match decide(&failure, attempt, &self.retry) {
                Disposition::Retry {
                    next_attempt,
                    after,
                } => {
                    self.metrics.retried_for("recipient_4xx").inc();
                    Settlement::Retry {
                        next_attempt,
                        after,
                        recipients: Some(addresses(&transient)),
                    }
                }
                Disposition::DeadLetter { reason } => {
                    self.metrics.dead_lettered_for(reason).inc();
                    Settlement::DeadLetter {
                        reason,
                        detail: format!("recipients refused: {}", first.error.detail),
                        attempts: attempt,
                        job_id,
                        recipients: Some(addresses(&transient)),
                    }
                }
            };
        }
        self.metrics.dead_lettered_for("recipient_refused").inc();
        Settlement::DeadLetter {
            reason: "recipient_refused",
            detail: format!(
                "{} of the job's recipients refused: {}",
                permanent.len(),
                permanent[0].error.detail
            ),
            attempts: attempt,
            job_id,
            recipients: Some(addresses(&permanent)),
        }
    }
}
