//! What ggml sees: the registry `CoreML`, the ACCEL device `CoreML` with its own buffer type
//! (weights placed in it are ours to run), and (opt-in) the hybrid device wrapping another device.
//! Thin: every call is translated into router / engine calls.

pub mod accel;
pub mod buffer;
pub mod hybrid;
pub mod reg;
