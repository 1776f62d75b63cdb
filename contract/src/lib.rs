//! The mailpipe contract: what producers publish and what the operator tells the worker.
//!
//! This crate is plain data and pure functions (serde, no I/O), so producers can depend on it
//! to build valid jobs, and so the worker and the operator agree on names without knowing each
//! other:
//! - [`job`]: the email job, version 1, and its validation;
//! - [`retry`]: the retry policy (attempts, capped exponential backoff);
//! - [`naming`]: the names of retry, dead-letter queues and the headers the worker writes;
//! - [`topology`]: the RabbitMQ topology a pipeline needs, as data both sides declare;
//! - [`topics`]: the Kafka topics a pipeline needs, as data both sides create;
//! - [`env`]: the environment variables the operator renders for the worker;
//! - [`choices`]: the fixed-value settings (TLS mode, Redis policy) CRD, environment and
//!   worker flags share (with the exchange and queue types in [`topology`]);
//! - [`labels`]: the labels on what the operator creates;
//! - `amqp` (feature `amqp`): the topology plan declared over AMQP with lapin;
//! - `kafka` (feature `kafka`): the Kafka client settings and the topic plan created or
//!   checked with rdkafka's admin client.
#![forbid(unsafe_code)]

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod choices;
pub mod env;
pub mod job;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod labels;
pub mod naming;
pub mod retry;
pub mod topics;
pub mod topology;

pub use job::{EmailJob, InvalidJob, Limits, Priority};
pub use retry::RetryPolicy;
