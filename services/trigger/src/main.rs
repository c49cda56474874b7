//! `flywheel-trigger`: parse config, set up tracing, run until SIGTERM/SIGINT.

flywheel_core::service_main!(flywheel_trigger::Config, flywheel_trigger::run);
