//! The vhost-user side: the device a frontend sees, the backend a connection talks to, the
//! per-queue ring workers and request executors, and the daemon loop that accepts connections.

pub mod backend;
pub mod daemon;
pub mod device;
mod executor;
mod exit_event;
pub mod inflight;
mod memory;
pub mod ring;
mod slot;
