//! Child processes that never outlive their owner: each runs under a small
//! watchdog shell that forwards SIGTERM and stops the child within half a
//! second if the owner dies without stopping it (`kill -9`, a test exiting).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the command given as "$@" and stops it when the owning process ($1)
/// or the watchdog itself is gone or terminated.
const WATCHDOG: &str = r#"owner=$1; shift
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM INT
while kill -0 "$owner" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
kill -TERM $child 2>/dev/null
wait $child"#;

/// A supervised child process with its output in a log file.
#[derive(Debug)]
pub(crate) struct Supervised {
    child: Child,
}

impl Supervised {
    /// Starts `binary args` in `dir` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        dir: &Path,
        log: &Path,
    ) -> std::io::Result<Supervised> {
        // The child runs in `dir`: a relative binary path means the caller's.
        let binary = std::path::absolute(binary)?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        // Its own process group (the watchdog shell and the service), so a
        // SIGKILL after the grace period reaches the service too, not only
        // the shell (a trainer mid-job outlived `flywheel up` that way).
        let child = Command::new("sh")
            .process_group(0)
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("{name}-watchdog"))
            .arg(std::process::id().to_string())
            .arg(&binary)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Supervised { child })
    }

    /// The exit status if it has exited.
    pub(crate) fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (a `kill` name such as `STOP`) to the watchdog and the
    /// child together: they share a process group.
    pub(crate) fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill").arg(format!("-{signal}")).arg("--").arg(format!("-{}", self.child.id())).status();
    }

    /// SIGTERM (a graceful drain), then SIGKILL to the whole group after `grace`.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill").args(["-KILL", "--"]).arg(format!("-{}", self.child.id())).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// When a supervised service that exited is started again, and when the
/// supervisor stops trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Wait before the first restart; doubles with each fast failure in a row.
    pub(crate) initial_backoff: Duration,
    /// Longest wait before a restart.
    pub(crate) max_backoff: Duration,
    /// A run shorter than this is a fast failure; a longer one resets the count.
    pub(crate) fast_run: Duration,
    /// Give up after this many fast failures in a row.
    pub(crate) max_fast_failures: u32,
}

impl Default for RestartPolicy {
    /// 1 s, 2 s, 4 s ... at most 30 s between attempts; giving up after six
    /// runs in a row that each lasted under 10 s (about half a minute of a
    /// service that cannot start). A broker outage makes services fail more
    /// slowly than that (their Kafka requests wait seconds before failing),
    /// so they keep being restarted until the broker is back.
    fn default() -> Self {
        RestartPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            fast_run: Duration::from_secs(10),
            max_fast_failures: 6,
        }
    }
}

impl RestartPolicy {
    /// The wait before the restart that follows `fast_failures` fast failures in a row.
    pub(crate) fn backoff(&self, fast_failures: u32) -> Duration {
        let doubled = self.initial_backoff.saturating_mul(2u32.saturating_pow(fast_failures.saturating_sub(1)));
        doubled.min(self.max_backoff)
    }
}

/// What [`Restarting::poll`] saw happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartEvent {
    /// The service exited and will be started again after `restart_in`.
    Exited {
        /// How it ended.
        status: String,
        /// When it will be started again.
        restart_in: Duration,
    },
    /// The service was started again (`restarts` times so far).
    Restarted {
        /// Restarts so far.
        restarts: u32,
    },
    /// The service failed fast too many times in a row: it stays down.
    GaveUp {
        /// How it ended the last time.
        status: String,
        /// Fast failures in a row.
        failures: u32,
    },
}

/// A [`Supervised`] service that is started again, with backoff, when it
/// exits on its own: a broker blip makes services exit (a rewarder whose
/// outputs are not acknowledged stops by design so it resumes from its
/// checkpoint), and the rest of the flywheel should not stop with them.
#[derive(Debug)]
pub struct Restarting {
    /// What it is (for messages).
    pub name: String,
    binary: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    log: PathBuf,
    policy: RestartPolicy,
    child: Option<Supervised>,
    started: Instant,
    fast_failures: u32,
    restart_at: Option<Instant>,
    restarts: u32,
    last_exit: Option<String>,
    gave_up: bool,
}

impl Restarting {
    /// Starts `binary args` like [`Supervised::spawn`], to be kept running under `policy`.
    pub fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        dir: &Path,
        log: &Path,
        policy: RestartPolicy,
    ) -> std::io::Result<Restarting> {
        let child = Supervised::spawn(name, binary, args, dir, log)?;
        Ok(Restarting {
            name: name.to_string(),
            binary: binary.to_path_buf(),
            args: args.to_vec(),
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
            policy,
            child: Some(child),
            started: Instant::now(),
            fast_failures: 0,
            restart_at: None,
            restarts: 0,
            last_exit: None,
            gave_up: false,
        })
    }

    /// The log file (restarts append to it).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Times it was started again.
    pub(crate) fn restarts(&self) -> u32 {
        self.restarts
    }

    /// How it ended the last time it exited.
    pub(crate) fn last_exit(&self) -> Option<&str> {
        self.last_exit.as_deref()
    }

    /// Notices an exit and restarts when the backoff has passed; call it
    /// often (it never blocks). Returns what happened, if anything.
    pub fn poll(&mut self) -> Option<RestartEvent> {
        if self.gave_up {
            return None;
        }
        if let Some(child) = self.child.as_mut() {
            let status = child.exit_status()?;
            self.child = None;
            let status = status.to_string();
            self.last_exit = Some(status.clone());
            if self.started.elapsed() < self.policy.fast_run {
                self.fast_failures += 1;
            } else {
                self.fast_failures = 0;
            }
            if self.fast_failures >= self.policy.max_fast_failures {
                self.gave_up = true;
                return Some(RestartEvent::GaveUp { status, failures: self.fast_failures });
            }
            let restart_in = self.policy.backoff(self.fast_failures);
            self.restart_at = Some(Instant::now() + restart_in);
            return Some(RestartEvent::Exited { status, restart_in });
        }
        if self.restart_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        self.restart_at = None;
        self.started = Instant::now();
        match Supervised::spawn(&self.name, &self.binary, &self.args, &self.dir, &self.log) {
            Ok(child) => {
                self.child = Some(child);
                self.restarts += 1;
                Some(RestartEvent::Restarted { restarts: self.restarts })
            }
            Err(e) => {
                // Counts as a fast failure; the next poll schedules the retry.
                let status = format!("could not start: {e}");
                self.last_exit = Some(status.clone());
                self.fast_failures += 1;
                if self.fast_failures >= self.policy.max_fast_failures {
                    self.gave_up = true;
                    return Some(RestartEvent::GaveUp { status, failures: self.fast_failures });
                }
                let restart_in = self.policy.backoff(self.fast_failures);
                self.restart_at = Some(Instant::now() + restart_in);
                Some(RestartEvent::Exited { status, restart_in })
            }
        }
    }

    /// Stops it for good (SIGTERM, then SIGKILL after `grace`); no restart follows.
    pub fn stop(&mut self, grace: Duration) {
        self.gave_up = true;
        self.restart_at = None;
        if let Some(child) = self.child.as_mut() {
            child.stop(grace);
        }
    }
}

/// One line for the live summary naming every service that was restarted,
/// e.g. `restarts: flywheel-rewarder 2 (last exit: exit status: 1)`; `None`
/// while nothing was.
pub fn restart_summary(services: &[Restarting]) -> Option<String> {
    let parts: Vec<String> = services
        .iter()
        .filter(|s| s.restarts() > 0 || s.last_exit().is_some())
        .map(|s| format!("{} {} (last exit: {})", s.name, s.restarts(), s.last_exit().unwrap_or("-")))
        .collect();
    (!parts.is_empty()).then(|| format!("restarts: {}", parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RestartPolicy::default();
        let waits: Vec<u64> = (1..=7).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            fast_run: Duration::from_secs(5),
            max_fast_failures: 3,
        }
    }

    /// Polls until `want` matches an event, or fails after `secs`.
    fn wait_for(r: &mut Restarting, secs: u64, want: impl Fn(&RestartEvent) -> bool) -> RestartEvent {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(e) = r.poll()
                && want(&e)
            {
                return e;
            }
            assert!(Instant::now() < deadline, "no matching event from {} in {secs} s", r.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_crashing_service_is_restarted_then_given_up_after_repeated_fast_failures() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("crash.log");
        let args = ["-c".to_string(), "echo run; exit 3".to_string()];
        let mut r = Restarting::spawn("crasher", Path::new("/bin/sh"), &args, dir.path(), &log, policy()).unwrap();
        let e = wait_for(&mut r, 10, |e| matches!(e, RestartEvent::Exited { .. }));
        assert!(matches!(&e, RestartEvent::Exited { status, .. } if status.contains('3')), "{e:?}");
        wait_for(&mut r, 10, |e| *e == RestartEvent::Restarted { restarts: 1 });
        wait_for(&mut r, 10, |e| *e == RestartEvent::Restarted { restarts: 2 });
        let e = wait_for(&mut r, 10, |e| matches!(e, RestartEvent::GaveUp { .. }));
        assert!(matches!(e, RestartEvent::GaveUp { failures: 3, .. }), "{e:?}");
        // Stays down: nothing more happens.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(r.poll(), None);
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().filter(|l| *l == "run").count(), 3);
        let line = restart_summary(std::slice::from_ref(&r)).unwrap();
        assert!(line.starts_with("restarts: crasher 2 (last exit: exit status: 3"), "{line}");
    }

    #[test]
    fn a_service_stopped_on_purpose_is_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let args = ["-c".to_string(), "sleep 30".to_string()];
        let log = dir.path().join("sleep.log");
        let mut r = Restarting::spawn("sleeper", Path::new("/bin/sh"), &args, dir.path(), &log, policy()).unwrap();
        assert_eq!(r.poll(), None);
        r.stop(Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(r.poll(), None);
        assert_eq!(restart_summary(std::slice::from_ref(&r)), None);
    }

    #[test]
    fn a_service_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // Like a trainer mid-job: it does not stop on SIGTERM.
        let script = format!("trap '' TERM; echo $$ > {}; while :; do sleep 0.1; done", pid_file.display());
        let args = ["-c".to_string(), script];
        let mut s =
            Supervised::spawn("stubborn", Path::new("/bin/sh"), &args, dir.path(), &dir.path().join("log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the service never started");
            std::thread::sleep(Duration::from_millis(20));
        };
        s.stop(Duration::from_millis(300));
        // Gone, or a zombie waiting for init to reap it (no longer running).
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(Instant::now() < deadline, "the service (pid {pid}) outlived its supervisor's stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
