//! The vhost-user side: the backend a frontend connection talks to, the per-queue workers that
//! execute requests, and the daemon loop that accepts connections.

pub mod backend;
pub mod daemon;
pub mod queue;
