//! The exit events of a connection's queue threads, and the descriptors vhost-user-backend
//! leaks with them.
//!
//! vhost-user-backend 0.24 (`VringEpollHandler::new`) adds the consumer half of each queue
//! thread's exit event to its epoll set with `into_raw_fd()` and never closes it: one
//! descriptor per queue for every frontend connection, including the ones that only connect
//! and leave. A frontend that reconnects in a loop used to exhaust vubd's descriptors within
//! seconds, after which vubd could not set up the next connection and exited. [`ExitEvents`]
//! remembers each consumer and closes it when the connection's backend is dropped, which is
//! after the library's queue threads and epoll sets are gone (they hold the backend).
//!
//! Closing a descriptor by number is only right if it is still the one handed over. A
//! duplicate kept here pins the eventfd (so its kernel id cannot be reused), and the
//! descriptor is closed only if it still names the same eventfd: should a later
//! vhost-user-backend close it itself, vubd leaves alone whatever took its number.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// A consumer descriptor handed to vhost-user-backend, and a duplicate of it.
struct Handed {
    fd: RawFd,
    pinned: OwnedFd,
}

/// The exit events created for one connection.
#[derive(Default)]
pub(super) struct ExitEvents {
    handed: Mutex<Vec<Handed>>,
}

impl ExitEvents {
    /// A new exit event for a queue thread; its consumer is closed when `self` is dropped.
    pub fn create(&self) -> io::Result<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let fd = consumer.as_raw_fd();
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own; the result is a new
        // descriptor owned by nobody else, or -1.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just returned by fcntl and is owned by nobody else.
        let pinned = unsafe { OwnedFd::from_raw_fd(dup) };
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Handed { fd, pinned });
        Ok((consumer, notifier))
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let handed = self.handed.get_mut().unwrap_or_else(|p| p.into_inner());
        for Handed { fd, pinned } in handed.drain(..) {
            let ours = eventfd_id(pinned.as_raw_fd());
            if ours.is_some() && eventfd_id(fd) == ours {
                // SAFETY: `fd` is the consumer descriptor vhost-user-backend took and never
                // closes (checked above: it still names the eventfd `pinned` keeps alive), and
                // nothing else uses it once the connection's queue threads are gone.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// The kernel's id of the eventfd behind `fd` (`eventfd-id` in fdinfo), if it is one.
fn eventfd_id(fd: RawFd) -> Option<u64> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("eventfd-id:"))
        .and_then(|id| id.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn consumers_given_away_are_closed_with_the_connection() {
        let events = ExitEvents::default();
        let (consumer, notifier) = events.create().unwrap();
        // What vhost-user-backend does with it.
        let fd = consumer.into_raw_fd();
        assert!(is_open(fd));
        drop(events);
        assert!(!is_open(fd), "the leaked consumer is closed");
        drop(notifier);
    }

    #[test]
    fn a_number_reused_by_another_eventfd_is_left_alone() {
        let events = ExitEvents::default();
        let (consumer, notifier) = events.create().unwrap();
        let fd = consumer.into_raw_fd();
        // A library that closes the consumer itself, and the number taken by another eventfd
        // (dup2 closes and reuses it in one step, so the test does not race other threads).
        let (other, _other_notifier) = new_event_consumer_and_notifier(EventFlag::empty()).unwrap();
        // SAFETY: dup2 onto a descriptor this test owns.
        assert_eq!(unsafe { libc::dup2(other.as_raw_fd(), fd) }, fd);
        drop(events);
        assert!(is_open(fd), "someone else's descriptor stays open");
        // SAFETY: `fd` is this test's duplicate of `other`.
        unsafe { libc::close(fd) };
        drop(notifier);
    }
}
