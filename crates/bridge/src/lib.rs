//! Quantisation bridge (being written).
