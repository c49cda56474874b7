//! `flywheel-collector`: parse config, set up tracing, run until SIGTERM/SIGINT, drain.

flywheel_core::service_main!(flywheel_collector::Config, flywheel_collector::run);
