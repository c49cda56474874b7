//! `flywheel-rewarder`: parse config, set up tracing, run until SIGTERM/SIGINT, checkpoint.

flywheel_core::service_main!(flywheel_rewarder::Config, flywheel_rewarder::run);
