//! Helper threads that leave signals to the daemon's signal thread.

use std::io;
use std::thread::JoinHandle;

/// Spawn a thread named `name` running `f` with every signal blocked: it may start before the
/// daemon blocks them, and a SIGTERM delivered to it would kill the process without a clean
/// shutdown.
pub fn spawn_quiet<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // SAFETY: sigfillset initialises the set; pthread_sigmask changes only this thread's
            // mask.
            unsafe {
                let mut set = std::mem::zeroed::<libc::sigset_t>();
                libc::sigfillset(&mut set);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            f()
        })
}
