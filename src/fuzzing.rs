//! Entry points for the fuzz targets in `fuzz/` (see docs/usage.md, "Fuzzing"): internals the
//! targets drive exactly as the daemon does, without a socket or a thread. Not a stable API,
//! hidden from the documentation.

use serde_json::Value;

pub use crate::control::framer::{Frame, FrameError, Framer, Limits, LIMITS as QMP_LIMITS};
use crate::control::Session;

/// The reply the control socket sends for one frame: a message is parsed as JSON and handled
/// by the session, a refused one is answered with its error (what `serve_client` does).
pub fn qmp_answer(session: &mut Session, frame: Frame) -> Value {
    crate::control::answer(session, frame)
}
