//! Where state that replicas share lives. By default nowhere: each
//! process keeps its own budgets, limits and cooldowns (`[state] backend =
//! "memory"`). With `backend = "redis"`, [`Fleet`] keeps them in Redis:
//! admission is one script call (key or deployment limits, and a budget
//! reservation under a lease; admissions queued meanwhile share it), or
//! none for a busy owner's requests, drawn on the credit an earlier call
//! took for them (`credit`); and
//! everything after it — spend, tokens generated, lease renewals,
//! upstream pressure, the prompt blocks routed with prefix affinity —
//! travels in one batched exchange per replica every [`SYNC_EVERY`],
//! spend also 20 ms after a request ends.

mod credit;
mod fleet;
mod prefixes;
mod remembered;
mod sync;
mod users;

use std::time::Duration;

pub use fleet::{Admitted, Denied, Fleet};
pub use sync::{PressureSeen, SyncAsk, SyncReply};

/// How often a replica exchanges with the fleet: a 429, an upstream's
/// remaining count or an open circuit reaches every replica within two of
/// these.
pub const SYNC_EVERY: Duration = Duration::from_millis(250);
