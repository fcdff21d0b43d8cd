//! The ggml ABI: struct mirrors, the ggml-base function table and the panic guard. The only place
//! that touches ggml's structs through raw pointers is this module and `faces`.

pub mod abi;
pub mod ggml;
pub mod guard;
pub mod os;
pub mod tensor;
