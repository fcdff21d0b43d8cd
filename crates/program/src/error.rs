//! Errors of the emitter, the package writer and the interpreter.

use std::path::PathBuf;

/// Everything that can go wrong while building, writing or interpreting a program.
/// Bad input never panics: it ends up here with a message that names the culprit.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("invalid program description: {0}")]
    InvalidDesc(String),
    #[error("cannot decode the model protobuf: {0}")]
    Decode(String),
    #[error("malformed program: {0}")]
    Malformed(String),
    #[error("unsupported by the interpreter: {0}")]
    Unsupported(String),
    #[error("type or shape mismatch: {0}")]
    Mismatch(String),
    #[error("bad inputs: {0}")]
    BadInputs(String),
    #[error("weight blob storage: {0}")]
    Blob(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ProgramError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProgramError::Io {
            path: path.into(),
            source,
        }
    }
}
