//! `flywheel-gate`: parse config, set up tracing, run until SIGTERM/SIGINT.

flywheel_core::service_main!(flywheel_gate::Config, flywheel_gate::run);
