//! Matmul driver (being written).
