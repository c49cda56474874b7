//! `flywheel-trainer`: parse config, set up tracing, run until SIGTERM/SIGINT.

flywheel_core::service_main!(flywheel_trainer::Config, flywheel_trainer::run);
