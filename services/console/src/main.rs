//! `flywheel-console`: parse config, set up tracing, serve until SIGTERM/SIGINT.

flywheel_core::service_main!(flywheel_console::Config, flywheel_console::run);
