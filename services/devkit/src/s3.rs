//! A real S3-compatible server for the lake's object-store path: SeaweedFS
//! (`weed mini`, from `make setup`'s `.venv`) started by
//! `tests/readers/s3_server.py` on free local ports.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DevkitError, workspace_root};

/// A running S3 server with its own data directory; stopped on drop.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket it serves.
    pub bucket: String,
    access_key: String,
    secret_key: String,
    region: String,
    /// The server process (dropping this value ends it).
    pub pid: u32,
    dir: PathBuf,
    // Removed after the server is stopped (fields drop after `Drop::drop`).
    _temp: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts a server in a fresh temporary directory; panics (failing the
    /// test) with the reason if it is not up within 60 s.
    pub fn start() -> S3Server {
        let started = tempfile::tempdir()
            .map_err(|e| DevkitError::S3NotStarted(format!("creating its directory: {e}")))
            .and_then(|temp| {
                let mut server = S3Server::start_in(temp.path())?;
                server._temp = Some(temp);
                Ok(server)
            });
        started.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server with its data and log (`weed.log`) in `dir`, which
    /// is kept; a restart in the same directory reuses its ports and data.
    pub fn start_in(dir: &Path) -> Result<S3Server, DevkitError> {
        let python = python();
        if !python.exists() {
            return Err(DevkitError::S3NotInstalled(python));
        }
        let out = Command::new(&python)
            .arg(launcher())
            .args(["start", "--dir", &dir.display().to_string(), "--timeout", "60"])
            .output()
            .map_err(|e| DevkitError::S3NotStarted(format!("running {}: {e}", python.display())))?;
        if !out.status.success() {
            return Err(DevkitError::S3NotStarted(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        let bad = |what: String| DevkitError::S3NotStarted(format!("its launcher answered {what}"));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| bad(format!("no JSON ({e})")))?;
        let field = |k: &str| v[k].as_str().map(String::from).ok_or_else(|| bad(format!("without {k}: {v}")));
        Ok(S3Server {
            endpoint: field("endpoint")?,
            bucket: field("bucket")?,
            access_key: field("access_key")?,
            secret_key: field("secret_key")?,
            region: field("region")?,
            pid: v["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| bad(format!("without pid: {v}")))?,
            dir: dir.to_path_buf(),
            _temp: None,
        })
    }

    /// The variables a client of this server needs (credentials, endpoint,
    /// plain HTTP), as the lake services and the Python readers read them;
    /// the lake's `open_storage_with` takes them as options too.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_REGION", self.region.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into()
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The server's own account, for a test that failed talking to it.
            let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- S3 server log (last 40 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ =
            Command::new(python()).arg(launcher()).args(["stop", "--dir", &self.dir.display().to_string()]).status();
    }
}

fn python() -> PathBuf {
    workspace_root().join(".venv/bin/python")
}

fn launcher() -> PathBuf {
    workspace_root().join("tests/readers/s3_server.py")
}
