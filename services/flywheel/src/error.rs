//! The CLI library's error type.

/// Errors of the CLI's library part.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// From the local broker.
    #[error(transparent)]
    Broker(#[from] flywheel_devkit::DevkitError),
    /// From the lake.
    #[error(transparent)]
    Lake(#[from] flywheel_lake::LakeError),
    /// From an HTTP exchange.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// Bad input the user can fix.
    #[error("{0}")]
    Usage(String),
}

/// Result alias for the CLI.
pub type Result<T> = std::result::Result<T, CliError>;
