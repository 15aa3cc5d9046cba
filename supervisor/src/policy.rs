//! The supervisor's decisions as a pure state machine (sans-IO).
//!
//! [`Machine::handle`] takes an [`Input`] (the agent exited, a signal arrived, a deadline
//! may have passed, no child is left) and the current time, and returns the
//! [`Action`]s for the driver in [`crate::supervisor`] to carry out. It never touches a
//! process, so restart, backoff and exit-code decisions are unit-tested without any.
//!
//! Phases: the agent is `Running`; after a crash the machine sits in `RestartWait` for
//! the backoff delay; SIGTERM moves it to `StoppingAgent` (the agent got SIGTERM and
//! has until the deadline); once the agent is gone, `Draining` sends SIGTERM to whatever
//! is left and waits for it until the same deadline; then everything left is SIGKILLed
//! and the machine is `Done`.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

/// The agent's exit status to treat as "configuration error: do not restart"
/// (`EX_CONFIG` from sysexits.h).
pub const EX_CONFIG: i32 = 78;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {}", sig.as_str()),
                Err(_) => write!(f, "signal {s}"),
            },
        }
    }
}

/// Why the supervisor stops, and so its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Orderly end: the agent exited 0 by itself, or after SIGTERM it ended within the
    /// deadline. Exit status 0.
    Finished,
    /// The agent exited with 78 (`EX_CONFIG`): it is not restarted. Exit status 78.
    AgentConfigError,
    /// The agent command could not be started. Exit status 1.
    SpawnFailed,
    /// The agent crashed more than `--max-restarts` times within the window. Exit
    /// status 1.
    GaveUp,
    /// The shutdown deadline passed with the agent still running; it was SIGKILLed.
    /// Exit status 137 (128 + SIGKILL).
    AgentKilled,
}

impl Outcome {
    /// The supervisor's exit status for this outcome.
    pub fn code(self) -> u8 {
        match self {
            Self::Finished => 0,
            Self::AgentConfigError => 78,
            Self::SpawnFailed | Self::GaveUp => 1,
            Self::AgentKilled => 137,
        }
    }
}

/// Exponential backoff: `initial`, doubled after every crash, capped at `max`; each
/// delay is drawn uniformly from the upper half `[base/2, base]` (jitter).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The delay before jitter for the next restart.
    pub fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, with `unit` in `[0, 1)` choosing the jitter; counts one failure.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(0.5 + 0.5 * unit)
    }

    /// Back to `initial` (the agent ran long enough to count as healthy).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Give up after `max` restarts within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartCap {
    /// Restarts allowed within the window.
    pub max: u32,
    /// The sliding window.
    pub window: Duration,
}

/// The policy's parameters.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long an orderly shutdown may take before everything is SIGKILLed.
    pub shutdown_deadline: Duration,
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// An agent that ran at least this long resets the backoff.
    pub backoff_reset_after: Duration,
    /// Optional cap on restarts.
    pub restart_cap: Option<RestartCap>,
    /// Whether SIGINT starts an orderly shutdown like SIGTERM (true when PID 1);
    /// otherwise it is only forwarded to the agent.
    pub interrupt_stops: bool,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The supervisor is ready: start the agent.
    Start,
    /// The agent command could not be spawned.
    SpawnFailed,
    /// The agent was reaped.
    AgentExited(ProcessExit),
    /// A signal other than SIGCHLD arrived.
    Signal(Signal),
    /// The supervisor has no child left (so no descendant either).
    ChildrenGone,
    /// Time passed: check the deadlines.
    Tick,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the agent command (attempt 1 is the first start).
    Spawn {
        /// 1-based start count.
        attempt: u32,
    },
    /// Send this signal to the agent, if it runs.
    SignalAgent(Signal),
    /// Send this signal to every remaining descendant.
    SignalDescendants(Signal),
    /// SIGKILL every remaining descendant and reap them (bounded).
    KillDescendants,
    /// Detach the `--unmount` paths and exit with this outcome.
    Exit(Outcome),
}

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet.
    Idle,
    /// The agent runs, since this instant.
    Running {
        /// When it was started.
        since: Instant,
    },
    /// The agent crashed; it is restarted at this instant.
    RestartWait {
        /// When to restart.
        at: Instant,
    },
    /// SIGTERM was sent to the agent, which has until the deadline.
    StoppingAgent {
        /// When everything is SIGKILLed.
        deadline: Instant,
    },
    /// The agent is gone; the remaining descendants got SIGTERM and have until the
    /// deadline.
    Draining {
        /// When everything is SIGKILLed.
        deadline: Instant,
        /// The exit outcome once everything is gone.
        outcome: Outcome,
    },
    /// Finished.
    Done(Outcome),
}

/// The supervisor's state machine.
pub struct Machine {
    policy: Policy,
    phase: Phase,
    attempts: u32,
    backoff: Backoff,
    restarts: VecDeque<Instant>,
    jitter: Box<dyn FnMut() -> f64>,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("policy", &self.policy)
            .field("phase", &self.phase)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine with this policy; `jitter` returns values in `[0, 1)`.
    pub fn new(policy: Policy, jitter: Box<dyn FnMut() -> f64>) -> Self {
        let backoff = Backoff::new(policy.backoff_initial, policy.backoff_max);
        Self {
            policy,
            phase: Phase::Idle,
            attempts: 0,
            backoff,
            restarts: VecDeque::new(),
            jitter,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How many times the agent was started.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next instant at which [`Input::Tick`] can change something.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::RestartWait { at } => Some(at),
            Phase::StoppingAgent { deadline } | Phase::Draining { deadline, .. } => Some(deadline),
            Phase::Idle | Phase::Running { .. } | Phase::Done(_) => None,
        }
    }

    /// Feeds one input; returns the actions to carry out, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match (input, self.phase) {
            (_, Phase::Done(_)) => Vec::new(),
            (Input::Start, Phase::Idle) => vec![self.spawn(now)],
            (Input::Start, _) => Vec::new(),
            (Input::SpawnFailed, _) => self.drain(Outcome::SpawnFailed, now),
            (Input::AgentExited(exit), Phase::Running { since }) => {
                self.agent_exited(exit, now.saturating_duration_since(since), now)
            }
            (Input::AgentExited(exit), Phase::StoppingAgent { deadline }) => {
                info!(status = %exit, "agent stopped; stopping the remaining processes");
                self.phase = Phase::Draining {
                    deadline,
                    outcome: Outcome::Finished,
                };
                vec![Action::SignalDescendants(Signal::SIGTERM)]
            }
            (Input::AgentExited(_), _) => Vec::new(),
            (Input::Signal(sig), phase) => self.signal(sig, phase, now),
            (Input::ChildrenGone, Phase::Draining { outcome, .. }) => {
                info!("no process left");
                self.phase = Phase::Done(outcome);
                vec![Action::Exit(outcome)]
            }
            (Input::ChildrenGone, _) => Vec::new(),
            (Input::Tick, Phase::RestartWait { at }) if now >= at => vec![self.spawn(now)],
            (Input::Tick, Phase::StoppingAgent { deadline }) if now >= deadline => {
                warn!(
                    deadline_secs = self.policy.shutdown_deadline.as_secs_f64(),
                    "shutdown deadline passed with the agent still running; killing everything"
                );
                self.phase = Phase::Done(Outcome::AgentKilled);
                vec![Action::KillDescendants, Action::Exit(Outcome::AgentKilled)]
            }
            (Input::Tick, Phase::Draining { deadline, outcome }) if now >= deadline => {
                warn!("shutdown deadline passed; killing the remaining processes");
                self.phase = Phase::Done(outcome);
                vec![Action::KillDescendants, Action::Exit(outcome)]
            }
            (Input::Tick, _) => Vec::new(),
        }
    }

    fn spawn(&mut self, now: Instant) -> Action {
        self.attempts = self.attempts.saturating_add(1);
        self.phase = Phase::Running { since: now };
        Action::Spawn {
            attempt: self.attempts,
        }
    }

    fn drain(&mut self, outcome: Outcome, now: Instant) -> Vec<Action> {
        info!(
            ?outcome,
            deadline_secs = self.policy.shutdown_deadline.as_secs_f64(),
            "stopping the remaining processes"
        );
        self.phase = Phase::Draining {
            deadline: now + self.policy.shutdown_deadline,
            outcome,
        };
        vec![Action::SignalDescendants(Signal::SIGTERM)]
    }

    fn agent_exited(&mut self, exit: ProcessExit, uptime: Duration, now: Instant) -> Vec<Action> {
        let uptime_secs = uptime.as_secs_f64();
        match exit {
            ProcessExit::Code(0) => {
                info!(
                    status = %exit,
                    uptime_secs,
                    "agent exited 0: it finished on purpose, shutting down"
                );
                return self.drain(Outcome::Finished, now);
            }
            ProcessExit::Code(EX_CONFIG) => {
                warn!(
                    status = %exit,
                    uptime_secs,
                    "agent exited with 78 (EX_CONFIG): configuration error, not restarting"
                );
                return self.drain(Outcome::AgentConfigError, now);
            }
            _ => {}
        }
        warn!(status = %exit, uptime_secs, attempt = self.attempts, "agent exited");
        if uptime >= self.policy.backoff_reset_after {
            self.backoff.reset();
        }
        if let Some(cap) = self.policy.restart_cap {
            while self
                .restarts
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= cap.window)
            {
                self.restarts.pop_front();
            }
            if self.restarts.len() >= cap.max as usize {
                warn!(
                    max_restarts = cap.max,
                    window_secs = cap.window.as_secs_f64(),
                    "too many restarts within the window; giving up"
                );
                return self.drain(Outcome::GaveUp, now);
            }
            self.restarts.push_back(now);
        }
        let delay = self.backoff.next_delay((self.jitter)());
        info!(
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            next_attempt = self.attempts.saturating_add(1),
            "restart scheduled"
        );
        self.phase = Phase::RestartWait { at: now + delay };
        Vec::new()
    }

    fn signal(&mut self, sig: Signal, phase: Phase, now: Instant) -> Vec<Action> {
        let stops =
            sig == Signal::SIGTERM || (sig == Signal::SIGINT && self.policy.interrupt_stops);
        match phase {
            Phase::Running { .. } if stops => {
                info!(
                    signal = sig.as_str(),
                    deadline_secs = self.policy.shutdown_deadline.as_secs_f64(),
                    "orderly shutdown: SIGTERM to the agent"
                );
                self.phase = Phase::StoppingAgent {
                    deadline: now + self.policy.shutdown_deadline,
                };
                vec![Action::SignalAgent(Signal::SIGTERM)]
            }
            Phase::Running { .. } | Phase::StoppingAgent { .. } if !stops => {
                info!(signal = sig.as_str(), "forwarding signal to the agent");
                vec![Action::SignalAgent(sig)]
            }
            Phase::RestartWait { .. } | Phase::Idle if stops => {
                info!(
                    signal = sig.as_str(),
                    "orderly shutdown while the agent is down"
                );
                self.drain(Outcome::Finished, now)
            }
            _ => {
                info!(signal = sig.as_str(), phase = ?phase, "signal ignored");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> Policy {
        Policy {
            shutdown_deadline: Duration::from_secs(20),
            backoff_initial: 200 * MS,
            backoff_max: Duration::from_secs(30),
            backoff_reset_after: Duration::from_secs(60),
            restart_cap: None,
            interrupt_stops: false,
        }
    }

    /// Jitter 1.0 (top of the range) so delays equal the base.
    fn machine(policy: Policy) -> Machine {
        Machine::new(policy, Box::new(|| 1.0))
    }

    fn running(m: &mut Machine, t0: Instant) {
        assert_eq!(
            m.handle(Input::Start, t0),
            vec![Action::Spawn { attempt: 1 }]
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut b = Backoff::new(200 * MS, 1000 * MS);
        let got: Vec<_> = (0..6).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            got,
            [
                200 * MS,
                400 * MS,
                800 * MS,
                1000 * MS,
                1000 * MS,
                1000 * MS
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(1.0), 200 * MS);
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(200 * MS, Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next_delay(1.0) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(400 * MS, Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), 200 * MS);
        b.reset();
        assert_eq!(b.next_delay(0.5), 300 * MS);
        for unit in [-1.0, 2.0, f64::NAN, 0.999] {
            b.reset();
            let d = b.next_delay(unit);
            assert!((200 * MS..=400 * MS).contains(&d), "{unit}: {d:?}");
        }
    }

    #[test]
    fn exit_zero_drains_and_exits_zero() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        let a = m.handle(Input::AgentExited(ProcessExit::Code(0)), t0 + MS);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        assert_eq!(m.deadline(), Some(t0 + MS + Duration::from_secs(20)));
        assert_eq!(m.handle(Input::Tick, t0 + 2 * MS), vec![]);
        let a = m.handle(Input::ChildrenGone, t0 + 3 * MS);
        assert_eq!(a, vec![Action::Exit(Outcome::Finished)]);
        assert_eq!(Outcome::Finished.code(), 0);
        assert_eq!(m.attempts(), 1);
    }

    #[test]
    fn exit_config_error_is_not_restarted() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        let a = m.handle(Input::AgentExited(ProcessExit::Code(78)), t0);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        // Leftovers that ignore SIGTERM are killed at the deadline.
        let late = t0 + Duration::from_secs(21);
        let a = m.handle(Input::Tick, late);
        assert_eq!(
            a,
            vec![
                Action::KillDescendants,
                Action::Exit(Outcome::AgentConfigError)
            ]
        );
        assert_eq!(Outcome::AgentConfigError.code(), 78);
        assert_eq!(m.handle(Input::Tick, late), vec![]);
    }

    #[test]
    fn crash_restarts_after_backoff() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        for (i, exit) in [ProcessExit::Code(1), ProcessExit::Signal(9)]
            .into_iter()
            .enumerate()
        {
            let now = Instant::now();
            assert_eq!(m.handle(Input::AgentExited(exit), now), vec![]);
            let delay = (200 * MS) * (1 << i);
            assert_eq!(m.phase(), Phase::RestartWait { at: now + delay });
            assert_eq!(m.handle(Input::Tick, now + delay - MS), vec![]);
            // Children of the dead agent (the kernel) are left alone.
            assert_eq!(m.handle(Input::ChildrenGone, now + MS), vec![]);
            let a = m.handle(Input::Tick, now + delay);
            assert_eq!(
                a,
                vec![Action::Spawn {
                    attempt: i as u32 + 2
                }]
            );
        }
    }

    #[test]
    fn long_run_resets_backoff() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        let t1 = t0 + MS;
        m.handle(Input::AgentExited(ProcessExit::Code(1)), t1);
        m.handle(Input::Tick, t1 + 200 * MS);
        let t2 = t1 + 300 * MS;
        m.handle(Input::AgentExited(ProcessExit::Code(1)), t2);
        assert_eq!(m.phase(), Phase::RestartWait { at: t2 + 400 * MS });
        m.handle(Input::Tick, t2 + 400 * MS);
        let t3 = t2 + 400 * MS + Duration::from_secs(61);
        m.handle(Input::AgentExited(ProcessExit::Code(1)), t3);
        assert_eq!(m.phase(), Phase::RestartWait { at: t3 + 200 * MS });
    }

    #[test]
    fn sigterm_stops_the_agent_then_the_rest() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        let a = m.handle(Input::Signal(Signal::SIGTERM), t0);
        assert_eq!(a, vec![Action::SignalAgent(Signal::SIGTERM)]);
        // A second SIGTERM changes nothing; other signals are still forwarded.
        assert_eq!(m.handle(Input::Signal(Signal::SIGTERM), t0), vec![]);
        assert_eq!(
            m.handle(Input::Signal(Signal::SIGUSR1), t0),
            vec![Action::SignalAgent(Signal::SIGUSR1)]
        );
        // The agent dies (even by a crash status): no restart during shutdown.
        let a = m.handle(Input::AgentExited(ProcessExit::Code(1)), t0 + MS);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        // Same deadline as the agent had.
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(20)));
        let a = m.handle(Input::ChildrenGone, t0 + 2 * MS);
        assert_eq!(a, vec![Action::Exit(Outcome::Finished)]);
    }

    #[test]
    fn agent_ignoring_sigterm_is_killed_at_the_deadline() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        m.handle(Input::Signal(Signal::SIGTERM), t0);
        let a = m.handle(Input::Tick, t0 + Duration::from_secs(20));
        assert_eq!(
            a,
            vec![Action::KillDescendants, Action::Exit(Outcome::AgentKilled)]
        );
        assert_eq!(Outcome::AgentKilled.code(), 137);
        // The agent reaped during the kill does not restart anything.
        assert_eq!(
            m.handle(Input::AgentExited(ProcessExit::Signal(9)), t0),
            vec![]
        );
    }

    #[test]
    fn sigterm_during_backoff_shuts_down_without_restart() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        m.handle(Input::AgentExited(ProcessExit::Code(2)), t0);
        let a = m.handle(Input::Signal(Signal::SIGTERM), t0 + MS);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        assert_eq!(m.handle(Input::Tick, t0 + Duration::from_secs(1)), vec![]);
        assert_eq!(
            m.handle(Input::ChildrenGone, t0 + Duration::from_secs(1)),
            vec![Action::Exit(Outcome::Finished)]
        );
    }

    #[test]
    fn other_signals_are_forwarded() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        for sig in [
            Signal::SIGHUP,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            assert_eq!(
                m.handle(Input::Signal(sig), t0),
                vec![Action::SignalAgent(sig)]
            );
        }
        assert!(matches!(m.phase(), Phase::Running { .. }));
        // While the agent is down there is nobody to forward to.
        m.handle(Input::AgentExited(ProcessExit::Code(1)), t0);
        assert_eq!(m.handle(Input::Signal(Signal::SIGHUP), t0), vec![]);
    }

    #[test]
    fn sigint_stops_when_pid1() {
        let t0 = Instant::now();
        let mut m = machine(Policy {
            interrupt_stops: true,
            ..policy()
        });
        running(&mut m, t0);
        let a = m.handle(Input::Signal(Signal::SIGINT), t0);
        assert_eq!(a, vec![Action::SignalAgent(Signal::SIGTERM)]);
        assert!(matches!(m.phase(), Phase::StoppingAgent { .. }));
    }

    #[test]
    fn restart_cap_gives_up() {
        let t0 = Instant::now();
        let mut m = machine(Policy {
            restart_cap: Some(RestartCap {
                max: 2,
                window: Duration::from_secs(10),
            }),
            ..policy()
        });
        running(&mut m, t0);
        let mut now = t0;
        for _ in 0..2 {
            assert_eq!(m.handle(Input::AgentExited(ProcessExit::Code(1)), now), []);
            now += Duration::from_secs(1);
            assert!(matches!(
                m.handle(Input::Tick, now)[..],
                [Action::Spawn { .. }]
            ));
        }
        let a = m.handle(Input::AgentExited(ProcessExit::Code(1)), now);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        assert_eq!(
            m.handle(Input::ChildrenGone, now),
            vec![Action::Exit(Outcome::GaveUp)]
        );
        assert_eq!(Outcome::GaveUp.code(), 1);
    }

    #[test]
    fn restart_cap_window_slides() {
        let t0 = Instant::now();
        let mut m = machine(Policy {
            restart_cap: Some(RestartCap {
                max: 1,
                window: Duration::from_secs(10),
            }),
            ..policy()
        });
        running(&mut m, t0);
        let mut now = t0;
        for _ in 0..3 {
            assert_eq!(m.handle(Input::AgentExited(ProcessExit::Code(1)), now), []);
            now += Duration::from_secs(11);
            assert!(matches!(
                m.handle(Input::Tick, now)[..],
                [Action::Spawn { .. }]
            ));
        }
    }

    #[test]
    fn spawn_failure_exits_one() {
        let t0 = Instant::now();
        let mut m = machine(policy());
        running(&mut m, t0);
        let a = m.handle(Input::SpawnFailed, t0);
        assert_eq!(a, vec![Action::SignalDescendants(Signal::SIGTERM)]);
        assert_eq!(
            m.handle(Input::ChildrenGone, t0),
            vec![Action::Exit(Outcome::SpawnFailed)]
        );
        assert_eq!(Outcome::SpawnFailed.code(), 1);
    }

    #[test]
    fn exit_status_display() {
        assert_eq!(ProcessExit::Code(3).to_string(), "exit code 3");
        assert_eq!(ProcessExit::Signal(9).to_string(), "signal SIGKILL");
    }
}
