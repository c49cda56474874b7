//! `flywheel-lake-writer`: parse config, set up tracing, run until SIGTERM/SIGINT, commit buffers.

flywheel_core::service_main!(flywheel_lake_writer::Config, flywheel_lake_writer::run);
