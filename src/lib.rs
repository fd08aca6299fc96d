//! vubd: a vhost-user-blk backend daemon.
//!
//! A VMM connects to vubd's UNIX socket, shares guest memory, and vubd serves the guest's
//! virtio-blk requests from a block-driver graph. See `docs/architecture.md` for the request path.

pub mod bitmap;
pub mod block;
pub mod cli;
pub mod control;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod iov;
pub mod nbd;
pub mod ratelimit;
pub mod socket;
pub mod stats;
pub mod systemd;
pub mod thread;
pub mod vhost;
pub mod virtio_blk;
