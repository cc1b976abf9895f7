//! A circuit breaker per deployment: closed until `circuit_failures`
//! consecutive failures, then open for `circuit_cooldown`, then half-open:
//! one probe request goes through, and its outcome closes or reopens it.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::flags::LiveFlags;
use crate::config::RoutingSettings;

#[derive(Default)]
pub struct Circuit {
    state: Mutex<State>,
    /// Whether the state is other than closed (`LiveFlags::CIRCUIT`),
    /// kept outside the lock so that the router, which views every
    /// candidate's circuit on every request, takes none while it is
    /// closed, as it nearly always is.
    flags: LiveFlags,
}

/// The circuit's state, locked; whether it is closed is mirrored in the
/// flags when the lock is let go.
struct Locked<'a> {
    state: MutexGuard<'a, State>,
    flags: &'a LiveFlags,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let tripped = !matches!(*self.state, State::Closed { .. });
        self.flags.put(LiveFlags::CIRCUIT, tripped);
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, failures: u32 },
    HalfOpen { probing: bool },
}

impl Default for State {
    fn default() -> Self {
        Self::Closed { failures: 0 }
    }
}

/// What the router sees of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitView {
    Closed,
    /// Rejecting; a probe may go through after `probe_in`.
    Open {
        failures: u32,
        probe_in: Duration,
    },
    /// A probe may go through now (`probing: false`), or one is in flight.
    HalfOpen {
        probing: bool,
    },
}

impl CircuitView {
    pub const NAMES: [&'static str; 3] = ["closed", "half_open", "open"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }
}

impl Circuit {
    /// A closed circuit that keeps its flag in `flags`.
    pub fn new(flags: LiveFlags) -> Self {
        Self {
            state: Mutex::default(),
            flags,
        }
    }

    fn state(&self) -> Locked<'_> {
        Locked {
            state: self.state.lock().unwrap_or_else(PoisonError::into_inner),
            flags: &self.flags,
        }
    }

    pub fn view(&self, now: Instant) -> CircuitView {
        if !self.flags.is_set(LiveFlags::CIRCUIT) {
            return CircuitView::Closed;
        }
        match *self.state() {
            State::Closed { .. } => CircuitView::Closed,
            State::Open { until, .. } if now >= until => CircuitView::HalfOpen { probing: false },
            State::Open { until, failures } => CircuitView::Open {
                failures,
                probe_in: until - now,
            },
            State::HalfOpen { probing } => CircuitView::HalfOpen { probing },
        }
    }

    /// Lets a request through: `Some(false)` normally, `Some(true)` as the
    /// one probe of a half-open circuit, `None` when it must not be tried.
    pub fn admit(&self, now: Instant) -> Option<bool> {
        if !self.flags.is_set(LiveFlags::CIRCUIT) {
            return Some(false);
        }
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Some(false),
            State::Open { until, .. } if now >= until => {
                *state = State::HalfOpen { probing: true };
                Some(true)
            }
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Some(true)
            }
            State::Open { .. } | State::HalfOpen { probing: true } => None,
        }
    }

    pub fn on_success(&self) {
        *self.state() = State::Closed { failures: 0 };
    }

    pub fn on_failure(&self, probe: bool, now: Instant, settings: &RoutingSettings) {
        let mut state = self.state();
        let failures = match *state {
            State::Closed { failures } => failures + 1,
            State::Open { failures, .. } => failures,
            State::HalfOpen { .. } if probe => settings.circuit_failures,
            // A request admitted before the circuit opened failed too.
            State::HalfOpen { .. } => return,
        };
        *state = if failures >= settings.circuit_failures {
            State::Open {
                until: now + settings.circuit_cooldown,
                failures,
            }
        } else {
            State::Closed { failures }
        };
    }

    /// Another replica saw the deployment fail and opened its circuit: a
    /// closed one here opens until the same time.
    pub fn open_until(&self, until: Instant) {
        let mut state = self.state();
        if let State::Closed { failures } = *state {
            *state = State::Open { until, failures };
        }
    }

    /// The attempt ended without saying anything about health (the client
    /// left, or the upstream only rate limited): a probe slot is freed.
    pub fn on_abandon(&self, probe: bool) {
        let mut state = self.state();
        if probe && matches!(*state, State::HalfOpen { probing: true }) {
            *state = State::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RoutingSettings {
        RoutingSettings {
            max_attempts: 3,
            circuit_failures: 2,
            circuit_cooldown: Duration::from_secs(10),
            exploration: 0.0,
            default_output_tokens: 100,
            affinity_epsilon: 0.25,
            prefix_blocks: 16,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once_then_closes() {
        let (c, s, t0) = (Circuit::default(), settings(), Instant::now());
        c.on_failure(false, t0, &s);
        c.on_success();
        c.on_failure(false, t0, &s);
        assert_eq!(
            c.view(t0),
            CircuitView::Closed,
            "failures must be consecutive"
        );
        c.on_failure(false, t0, &s);
        assert_eq!(
            c.view(t0),
            CircuitView::Open {
                failures: 2,
                probe_in: Duration::from_secs(10)
            }
        );
        assert_eq!(c.admit(t0), None);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(c.view(later), CircuitView::HalfOpen { probing: false });
        assert_eq!(c.admit(later), Some(true), "one probe");
        assert_eq!(c.admit(later), None, "only one");
        c.on_abandon(true);
        assert_eq!(
            c.admit(later),
            Some(true),
            "an abandoned probe frees the slot"
        );
        c.on_failure(true, later, &s);
        assert!(
            matches!(c.view(later), CircuitView::Open { .. }),
            "a failed probe reopens"
        );
        let again = later + Duration::from_secs(10);
        assert_eq!(c.admit(again), Some(true));
        c.on_success();
        assert_eq!(c.view(again), CircuitView::Closed);
        assert_eq!(c.admit(again), Some(false));
    }
}
