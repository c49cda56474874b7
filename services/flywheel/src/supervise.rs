//! Child processes that never outlive their owner: each runs under a small
//! watchdog shell that forwards SIGTERM and stops the child within half a
//! second if the owner dies without stopping it (`kill -9`, a test exiting).

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
pub struct Supervised {
    /// What it is (for messages).
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Supervised {
    /// Starts `binary args` in `dir` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, binary: &Path, args: &[String], dir: &Path, log: &Path) -> std::io::Result<Supervised> {
        // The child runs in `dir`: a relative binary path means the caller's.
        let binary = std::path::absolute(binary)?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = Command::new("sh")
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
        Ok(Supervised { name: name.to_string(), child, log: log.to_path_buf() })
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM (a graceful drain), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
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
