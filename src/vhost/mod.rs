//! The vhost-user side: the device a frontend sees, the backend a connection talks to, the
//! per-queue threads, ring workers and request executors, in-flight tracking and dirty logging,
//! the exports (a socket each, accepting frontends) and the daemon around them.

pub mod backend;
mod chain;
pub mod config_change;
pub mod daemon;
pub mod device;
mod dirty_log;
mod executor;
pub mod export;
pub mod inflight;
mod memory;
pub mod poll;
mod queue;
pub mod ring;
mod shared_file;
mod slot;
