//! scaling: how many worker replicas each pipeline runs. `policy` is the pure decision
//! (observation and history in, replica count and reason out), `rate` the pure measure of
//! what one replica sends; the backlog readers, the
//! actuator seam (the Deployment's `/scale`, a local process pool) and the scaler's own
//! loop build on it.

pub mod actuator;
pub mod engine;
pub mod observe;
pub mod policy;
pub mod process_pool;
pub mod rate;
pub mod scaler;
