//! The trainer's progress, read from its ops server's `/metrics`: a running
//! job's step, loss and throughput are on no topic, so the console scrapes
//! the `trainer_busy` and `trainer_job_*` gauges every few seconds.
//!
//! - [`parse`]: Prometheus/OpenMetrics text → [`Progress`] (pure);
//! - [`scrape`]: one HTTP/1.1 GET with a time limit;
//! - [`poll`]: scrapes every target into the [`View`] until shutdown.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use tokio_util::sync::CancellationToken;

use crate::ConsoleError;
use crate::view::View;

/// The gauges the trainer registers (`services/trainer/src/service.rs`); none has labels.
pub(crate) const BUSY: &str = "trainer_busy";
/// Steps done in the running (or last) job.
pub(crate) const STEP: &str = "trainer_job_step";
/// Steps in the running (or last) job.
pub(crate) const STEPS: &str = "trainer_job_steps";
/// Loss of the last training step.
pub(crate) const LOSS: &str = "trainer_job_loss";
/// Training throughput of the running job.
pub(crate) const TOKENS_PER_SECOND: &str = "trainer_job_tokens_per_second";
/// Estimated seconds left in the running job.
pub(crate) const ETA_SECONDS: &str = "trainer_job_eta_seconds";

/// A scrape answer larger than this is refused (the trainer's is ~2 KiB).
const MAX_BODY: usize = 1 << 20;

/// What one scrape said. A gauge missing from the answer, or not finite
/// (NaN before a first step), is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Progress {
    /// A job is running.
    pub busy: bool,
    /// Steps done in the running (or last) job.
    pub step: Option<f64>,
    /// Steps in the running (or last) job.
    pub steps: Option<f64>,
    /// Loss of the last step.
    pub loss: Option<f64>,
    /// Tokens per second of the running job.
    pub tokens_per_second: Option<f64>,
    /// Seconds left in the running job.
    pub eta_seconds: Option<f64>,
}

/// Reads the trainer's gauges from Prometheus or OpenMetrics text. Comment
/// lines (`# HELP`, `# TYPE`, `# EOF`) and other metrics are skipped; a
/// series with labels counts under its name (the first one wins). An answer
/// without `trainer_busy` is not a trainer's and is an error.
pub(crate) fn parse(text: &str) -> Result<Progress, String> {
    let mut busy = None;
    let mut p = Progress::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((name, value)) = sample(line) else { continue };
        let slot = match name {
            BUSY => {
                busy.get_or_insert(value);
                continue;
            }
            STEP => &mut p.step,
            STEPS => &mut p.steps,
            LOSS => &mut p.loss,
            TOKENS_PER_SECOND => &mut p.tokens_per_second,
            ETA_SECONDS => &mut p.eta_seconds,
            _ => continue,
        };
        if slot.is_none() && value.is_finite() {
            *slot = Some(value);
        }
    }
    let busy = busy.ok_or_else(|| format!("the answer has no {BUSY} metric (not a trainer's /metrics?)"))?;
    p.busy = busy.is_finite() && busy != 0.0;
    Ok(p)
}

/// `name{labels} value [timestamp]` → (name, value); `None` when the line
/// is not a sample.
fn sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        // Label values are quoted and may hold `}` and escaped quotes.
        let (mut quoted, mut escaped, mut close) = (false, false, None);
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, value))
}

/// A scrape target, `http://host[:port][/path]` (plain HTTP: the ops port
/// is cluster-internal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// `host:port` to connect to (port 80 when absent).
    authority: String,
    /// The request path (`/` when absent).
    path: String,
}

impl Target {
    /// Parses a `--trainer-metrics-url` value.
    pub fn parse(s: &str) -> Result<Target, String> {
        let url = s.trim();
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("expected http://host:port/path, got '{url}' (only plain HTTP is read)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("expected http://host:port/path, got '{url}'"));
        }
        // A bracketed IPv6 literal has colons of its own.
        let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        let authority = if has_port { authority.to_string() } else { format!("{authority}:80") };
        Ok(Target { url: url.to_string(), authority, path: path.to_string() })
    }
}

/// Aborts the connection task when the scrape ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// GETs the target and parses its answer; gives up after `limit`.
pub(crate) async fn scrape(target: &Target, limit: Duration) -> Result<Progress, ConsoleError> {
    let failed = |why: String| ConsoleError::Scrape(why);
    let exchange = async {
        let addr = tokio::net::lookup_host(&target.authority)
            .await
            .map_err(|e| failed(format!("resolving {}: {e}", target.authority)))?
            .next()
            .ok_or_else(|| failed(format!("{} has no address", target.authority)))?;
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| failed(format!("connecting to {addr}: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("{addr}: {e}")))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let request = hyper::Request::get(target.path.as_str())
            .header(hyper::header::HOST, target.authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| failed(format!("{addr}: {e}")))?;
        if !response.status().is_success() {
            return Err(failed(format!("{} answered HTTP {}", target.url, response.status())));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        let text = std::str::from_utf8(&body).map_err(|_| failed("the answer is not UTF-8".into()))?;
        parse(text).map_err(failed)
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| failed(format!("no answer from {} within {} ms", target.url, limit.as_millis())))?
}

/// Scrapes every target every `every` into `view` until `stop`; a failed
/// scrape is shown, never fatal.
pub(crate) async fn poll(targets: Vec<Target>, view: Arc<RwLock<View>>, every: Duration, stop: CancellationToken) {
    let limit = every.clamp(Duration::from_millis(500), Duration::from_secs(3));
    loop {
        for (i, target) in targets.iter().enumerate() {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = scrape(target, limit) => r.map_err(|e| e.to_string()),
            };
            if let Err(e) = &result {
                tracing::debug!(url = %target.url, error = %e, "trainer metrics scrape failed");
            }
            view.write().unwrap_or_else(|p| p.into_inner()).trainer_scraped(i, flywheel_core::now_millis(), result);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trainer's `/metrics` mid-job, as its ops server encodes it
    /// (prometheus-client, OpenMetrics text), with the group watch's
    /// gauges, another service's labelled series and an unfinished loss.
    const SCRAPE: &str = "\
# HELP trainer_candidates Model candidates published.
# TYPE trainer_candidates counter
trainer_candidates_total 2
# HELP trainer_busy 1 while a job runs.
# TYPE trainer_busy gauge
trainer_busy 1
# HELP trainer_job_step Steps done in the running (or last) job.
# TYPE trainer_job_step gauge
trainer_job_step 12
# HELP trainer_job_steps Steps in the running (or last) job.
# TYPE trainer_job_steps gauge
trainer_job_steps 40
# HELP trainer_job_loss Loss of the last training step.
# TYPE trainer_job_loss gauge
trainer_job_loss 0.8125
# HELP trainer_job_tokens_per_second Training throughput of the running job.
# TYPE trainer_job_tokens_per_second gauge
trainer_job_tokens_per_second 1534.25
# HELP trainer_job_eta_seconds Estimated time left in the running job.
# TYPE trainer_job_eta_seconds gauge
trainer_job_eta_seconds 73.5
# HELP trainer_assigned_partitions Partitions of the input topic this member holds.
# TYPE trainer_assigned_partitions gauge
trainer_assigned_partitions 1
# HELP console_records Records read per topic.
# TYPE console_records counter
console_records_total{topic=\"a}\\\" trainer_busy 0\"} 7
# EOF
";

    #[test]
    fn reads_the_trainers_gauges_and_skips_comments_and_other_series() {
        let p = parse(SCRAPE).unwrap();
        assert_eq!(
            p,
            Progress {
                busy: true,
                step: Some(12.0),
                steps: Some(40.0),
                loss: Some(0.8125),
                tokens_per_second: Some(1534.25),
                eta_seconds: Some(73.5),
            }
        );
    }

    #[test]
    fn nan_and_missing_gauges_are_absent_and_a_non_trainer_answer_is_an_error() {
        let idle = "trainer_busy 0\ntrainer_job_loss NaN\ntrainer_job_steps{job=\"x\"} 5 1700000000000\n# EOF\n";
        let p = parse(idle).unwrap();
        assert!(!p.busy);
        assert_eq!((p.loss, p.steps, p.step, p.eta_seconds), (None, Some(5.0), None, None));
        let err = parse("# HELP up x\nup 1\n").unwrap_err();
        assert!(err.contains("no trainer_busy"), "{err}");
        assert!(parse("").is_err());
        assert_eq!(sample("trainer_busy"), None);
        assert_eq!(sample("trainer_busy{a=\"unclosed 1"), None);
        assert_eq!(sample("trainer_job_loss +Inf"), Some(("trainer_job_loss", f64::INFINITY)));
    }

    #[test]
    fn targets_are_plain_http_urls() {
        let t = Target::parse("http://127.0.0.1:9100/metrics").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("127.0.0.1:9100", "/metrics"));
        let t = Target::parse("http://trainer.flywheel.svc").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("trainer.flywheel.svc:80", "/"));
        assert_eq!(Target::parse("http://[::1]/metrics").unwrap().authority, "[::1]:80");
        assert_eq!(Target::parse("http://[::1]:9/metrics").unwrap().authority, "[::1]:9");
        assert!(Target::parse("https://t:1/metrics").is_err());
        assert!(Target::parse("http:///metrics").is_err());
        assert!(Target::parse("t:1/metrics").is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_within_the_limit() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t = Target::parse(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
        let e = scrape(&t, Duration::from_secs(2)).await.unwrap_err().to_string();
        assert!(e.contains("connecting to 127.0.0.1"), "{e}");
    }
}
