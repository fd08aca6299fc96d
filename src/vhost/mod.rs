//! The vhost-user side: the device a frontend sees, the backend a connection talks to, the
//! per-queue threads, ring workers and request executors, in-flight tracking and dirty logging,
//! and the daemon loop that accepts connections.

pub mod backend;
mod chain;
pub mod daemon;
pub mod device;
mod dirty_log;
mod executor;
pub mod inflight;
mod memory;
mod queue;
pub mod ring;
mod shared_file;
mod slot;
