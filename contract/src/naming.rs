//! Names derived from a pipeline's work queue or topic, and the headers the worker writes.
//!
//! The work queue is the one users name (e.g. `smtp_send_email`); retry delay queues, the
//! dead-letter exchange and the dead-letter queue hang off it with fixed suffixes, so anyone
//! who knows the work queue can find them. On Kafka the same holds for the topic (e.g.
//! `email-events`): retry topics and the dead-letter topic (`email-events-dlq`, as the Kafka
//! email services this project grew from named it) hang off it.

use std::time::Duration;

/// The exchange of `work_queue` when none is named: `<work_queue>_exc`, so the usual
/// `smtp_send_email` queue gets the usual `smtp_send_email_exc`, and two pipelines that keep
/// the default never share a fanout exchange (each would get every job of the other).
pub fn default_exchange(work_queue: &str) -> String {
    format!("{work_queue}_exc")
}

/// The delay queue a job waits in for `delay` before going back to `work_queue`.
pub fn delay_queue(work_queue: &str, delay: Duration) -> String {
    format!("{work_queue}.retry.{}ms", delay.as_millis())
}

/// The dead-letter exchange (fanout) of `work_queue`.
pub fn dead_letter_exchange(work_queue: &str) -> String {
    format!("{work_queue}.dlx")
}

/// The dead-letter queue of `work_queue`, bound to its dead-letter exchange.
pub fn dead_letter_queue(work_queue: &str) -> String {
    format!("{work_queue}.dlq")
}

/// The queue holding one token per SMTP connection of the pipeline's budget, through which
/// its workers share `spec.smtp.poolSize` (see the worker's `mailer/budget.rs`).
pub fn smtp_budget_queue(work_queue: &str) -> String {
    format!("{work_queue}.smtp-budget")
}

/// The Kafka topic a job waits in for `delay` before it is consumed again:
/// `<topic>-retry-<ms>ms`, one per distinct delay, so every message of one retry topic
/// becomes due in the order it was written.
pub fn retry_topic(topic: &str, delay: Duration) -> String {
    format!("{topic}-retry-{}ms", delay.as_millis())
}

/// The Kafka dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dlq")
}

/// Headers the worker writes on retried and dead-lettered messages (AMQP headers on
/// RabbitMQ; on Kafka, record headers with the same names and UTF-8 text values).
pub mod headers {
    /// The attempt the message is on, counting from 1 (absent on a first delivery).
    pub const ATTEMPT: &str = "x-mailpipe-attempt";
    /// On a retry or dead-letter copy of a job that was delivered to some of its recipients:
    /// the envelope recipients still to serve (a JSON array). A worker sends such a copy only
    /// to those of the job's own recipients.
    pub const RECIPIENTS: &str = "x-mailpipe-recipients";
    /// Why the job was dead-lettered: a bounded label such as `smtp_5xx` or `expired`.
    pub const REASON: &str = "x-mailpipe-reason";
    /// A short human explanation (an SMTP reply code and text, a validation message);
    /// never recipients or content.
    pub const DETAIL: &str = "x-mailpipe-detail";
    /// The job id (given or derived).
    pub const JOB_ID: &str = "x-mailpipe-job-id";
    /// When the job was dead-lettered, RFC 3339.
    pub const DEAD_LETTERED_AT: &str = "x-mailpipe-dead-lettered-at";
    /// The exchange the job was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-mailpipe-original-exchange";
    /// The routing key the job was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-mailpipe-original-routing-key";
    /// Kafka: on a retry copy, when it may be sent again (milliseconds since the Unix epoch).
    pub const NOT_BEFORE: &str = "x-mailpipe-not-before";
    /// Kafka: the topic the job was first written to.
    pub const ORIGINAL_TOPIC: &str = "x-mailpipe-original-topic";
    /// Kafka: the partition and offset of the record this copy was made from
    /// (`<partition>:<offset>`).
    pub const ORIGINAL_POSITION: &str = "x-mailpipe-original-position";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hang_off_the_work_queue() {
        assert_eq!(
            delay_queue("smtp_send_email", Duration::from_secs(5)),
            "smtp_send_email.retry.5000ms"
        );
        assert_eq!(
            dead_letter_exchange("smtp_send_email"),
            "smtp_send_email.dlx"
        );
        assert_eq!(dead_letter_queue("smtp_send_email"), "smtp_send_email.dlq");
    }

    #[test]
    fn kafka_names_hang_off_the_topic() {
        assert_eq!(
            retry_topic("email-events", Duration::from_secs(5)),
            "email-events-retry-5000ms"
        );
        assert_eq!(dead_letter_topic("email-events"), "email-events-dlq");
    }
}
