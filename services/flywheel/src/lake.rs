//! `flywheel lake`: list, compact, vacuum and checkpoint the reward lake.

use std::io::Write;
use std::time::Duration;

use crate::cli::{FilesFormat, LakeCommand};
use crate::{CliError, Result};

/// Runs a lake command on a blocking thread (the lake blocks on the runtime).
pub(crate) async fn lake(command: LakeCommand) -> Result<()> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || lake_command(command, runtime))
        .await
        .map_err(|e| CliError::Usage(format!("lake command failed: {e}")))?
}

fn lake_command(command: LakeCommand, runtime: tokio::runtime::Handle) -> Result<()> {
    match command {
        LakeCommand::Files { root, format } => {
            let lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let stdout = std::io::stdout();
            print_files(&lake, format, &mut stdout.lock())
        }
        LakeCommand::Compact { root, target_bytes, older_than_hours } => {
            let mut lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let opts = flywheel_lake::compact::CompactOptions {
                target_bytes,
                closed_before_ms: flywheel_core::now_millis() - older_than_hours as i64 * 3_600_000,
                settings: Default::default(),
                writer: format!("flywheel lake compact/{}", std::process::id()),
                vacuum_retention: None,
                max_merges: None,
            };
            let report = flywheel_lake::compact::compact(&mut lake, &opts)?;
            println!(
                "merged {} files into {} ({} rows); table version {}",
                report.files_in,
                report.files_out,
                report.rows,
                lake.version().map_or("-".into(), |v| v.to_string())
            );
            Ok(())
        }
        LakeCommand::Vacuum { root, retention_hours } => {
            if retention_hours == 0 {
                // A writer's file exists for a moment before the commit naming it.
                return Err(CliError::Usage(
                    "--retention-hours must be at least 1: less could delete a running writer's file before its commit"
                        .into(),
                ));
            }
            let mut lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let retention = Duration::from_secs(retention_hours.saturating_mul(3600));
            let report = lake.vacuum(retention)?;
            println!("deleted {} files unreferenced for over {retention_hours} h", report.deleted);
            Ok(())
        }
        LakeCommand::Checkpoint { root } => {
            let lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            lake.checkpoint()?;
            println!("checkpoint written at version {}", lake.version().map_or("-".into(), |v| v.to_string()));
            Ok(())
        }
    }
}

/// Writes the committed files of `lake` in `format`.
fn print_files(lake: &flywheel_lake::table::Lake, format: FilesFormat, out: &mut impl Write) -> Result<()> {
    let files = lake.files()?;
    let base = lake.storage().url();
    let full = |path: &str| match base.strip_prefix("file://") {
        Some(dir) => format!("{dir}/{path}"),
        None => format!("{}/{path}", base.trim_end_matches('/')),
    };
    let io = |e: std::io::Error| CliError::Usage(format!("writing output: {e}"));
    match format {
        FilesFormat::Table => {
            writeln!(out, "{:>10} {:>12} path", "rows", "bytes").map_err(io)?;
            for f in &files {
                writeln!(out, "{:>10} {:>12} {}", f.rows, f.bytes, f.path).map_err(io)?;
            }
            let rows: u64 = files.iter().map(|f| f.rows).sum();
            let version = lake.version().map_or("-".into(), |v| v.to_string());
            writeln!(out, "{} files, {rows} rows, table version {version}", files.len()).map_err(io)?;
        }
        FilesFormat::Json => {
            for f in &files {
                let line = serde_json::json!({
                    "path": f.path, "uri": full(&f.path), "rows": f.rows, "bytes": f.bytes,
                });
                writeln!(out, "{line}").map_err(io)?;
            }
        }
        FilesFormat::Paths => {
            for f in &files {
                writeln!(out, "{}", full(&f.path)).map_err(io)?;
            }
        }
    }
    Ok(())
}
