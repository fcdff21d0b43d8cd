//! `#[repr(C)]` mirrors of ggml's backend structs (ggml-backend-impl.h, ggml.h).
//!
//! Layouts are those of ggml >= 0.10 ("late v2"), v3 and v6. They are identical except for the buffer
//! type interface, which has one struct per layout. Sizes and offsets are checked at compile time against
//! the numbers measured on the pinned host trees (docs/architecture.md, ABI section).

use std::ffi::{c_char, c_int, c_void};

pub const GGML_MAX_DIMS: usize = 4;
pub const GGML_MAX_OP_PARAMS: usize = 64;
pub const GGML_MAX_SRC: usize = 10;
pub const GGML_MAX_NAME: usize = 64;

// enum ggml_op (values identical in ggml 0.21, 0.25.3 and 0.26.0)
pub const GGML_OP_NONE: c_int = 0;
pub const GGML_OP_MUL_MAT: c_int = 29;
pub const GGML_OP_RESHAPE: c_int = 36;
pub const GGML_OP_VIEW: c_int = 37;
pub const GGML_OP_PERMUTE: c_int = 38;
pub const GGML_OP_TRANSPOSE: c_int = 39;

// enum ggml_type
pub const GGML_TYPE_F32: c_int = 0;

// tensor flags
pub const GGML_TENSOR_FLAG_COMPUTE: c_int = 16;

// enum ggml_backend_dev_type
pub const DEV_TYPE_CPU: c_int = 0;
pub const DEV_TYPE_GPU: c_int = 1;
pub const DEV_TYPE_ACCEL: c_int = 3;

// enum ggml_status
pub const GGML_STATUS_SUCCESS: c_int = 0;
pub const GGML_STATUS_FAILED: c_int = -1;
pub const GGML_STATUS_ALLOC_FAILED: c_int = -2;

// enum ggml_log_level
pub const GGML_LOG_LEVEL_DEBUG: c_int = 1;
pub const GGML_LOG_LEVEL_INFO: c_int = 2;
pub const GGML_LOG_LEVEL_WARN: c_int = 3;
pub const GGML_LOG_LEVEL_ERROR: c_int = 4;

// enum ggml_backend_buffer_usage
pub const BUFFER_USAGE_WEIGHTS: c_int = 1;

pub type Reg = GgmlBackendReg;
pub type Dev = GgmlBackendDevice;

/// `struct ggml_tensor` (336 bytes in every supported tree).
#[repr(C)]
pub struct GgmlTensor {
    pub type_: c_int,
    pub buffer: *mut GgmlBackendBuffer,
    pub ne: [i64; GGML_MAX_DIMS],
    pub nb: [usize; GGML_MAX_DIMS],
    pub op: c_int,
    pub op_params: [i32; GGML_MAX_OP_PARAMS / 4],
    pub flags: i32,
    pub src: [*mut GgmlTensor; GGML_MAX_SRC],
    pub view_src: *mut GgmlTensor,
    pub view_offs: usize,
    pub data: *mut c_void,
    pub name: [c_char; GGML_MAX_NAME],
    pub extra: *mut c_void,
    pub padding: [c_char; 8],
}

/// Opaque ggml types we only pass around.
pub enum GgmlCgraph {}
pub enum GgmlContext {}
pub enum GgmlBackendEvent {}
pub type GgmlGuid = *const [u8; 16];

/// Opaque buffer type: its interface differs per layout, so it is only ever compared by address or
/// read through [`crate::ffi::buft`].
pub enum GgmlBackendBufferType {}

#[repr(C)]
pub struct GgmlBackendRegI {
    pub get_name: Option<unsafe extern "C" fn(*mut Reg) -> *const c_char>,
    pub get_device_count: Option<unsafe extern "C" fn(*mut Reg) -> usize>,
    pub get_device: Option<unsafe extern "C" fn(*mut Reg, usize) -> *mut Dev>,
    pub get_proc_address: Option<unsafe extern "C" fn(*mut Reg, *const c_char) -> *mut c_void>,
}

#[repr(C)]
pub struct GgmlBackendReg {
    pub api_version: c_int,
    pub iface: GgmlBackendRegI,
    pub context: *mut c_void,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct GgmlBackendDevCaps {
    pub async_: bool,
    pub host_buffer: bool,
    pub buffer_from_host_ptr: bool,
    pub events: bool,
    pub mmap_support: bool,
}

#[repr(C)]
pub struct GgmlBackendDevProps {
    pub name: *const c_char,
    pub description: *const c_char,
    pub memory_free: usize,
    pub memory_total: usize,
    pub type_: c_int,
    pub device_id: *const c_char,
    pub caps: GgmlBackendDevCaps,
}

pub type BuftPtr = *mut GgmlBackendBufferType;

#[repr(C)]
pub struct GgmlBackendDeviceI {
    pub get_name: Option<unsafe extern "C" fn(*mut Dev) -> *const c_char>,
    pub get_description: Option<unsafe extern "C" fn(*mut Dev) -> *const c_char>,
    pub get_memory: Option<unsafe extern "C" fn(*mut Dev, *mut usize, *mut usize)>,
    pub get_type: Option<unsafe extern "C" fn(*mut Dev) -> c_int>,
    pub get_props: Option<unsafe extern "C" fn(*mut Dev, *mut GgmlBackendDevProps)>,
    pub init_backend: Option<unsafe extern "C" fn(*mut Dev, *const c_char) -> *mut GgmlBackend>,
    pub get_buffer_type: Option<unsafe extern "C" fn(*mut Dev) -> BuftPtr>,
    pub get_host_buffer_type: Option<unsafe extern "C" fn(*mut Dev) -> BuftPtr>,
    pub buffer_from_host_ptr:
        Option<unsafe extern "C" fn(*mut Dev, *mut c_void, usize, usize) -> *mut GgmlBackendBuffer>,
    pub supports_op: Option<unsafe extern "C" fn(*mut Dev, *const GgmlTensor) -> bool>,
    pub supports_buft: Option<unsafe extern "C" fn(*mut Dev, BuftPtr) -> bool>,
    pub offload_op: Option<unsafe extern "C" fn(*mut Dev, *const GgmlTensor) -> bool>,
    pub event_new: Option<unsafe extern "C" fn(*mut Dev) -> *mut GgmlBackendEvent>,
    pub event_free: Option<unsafe extern "C" fn(*mut Dev, *mut GgmlBackendEvent)>,
    pub event_synchronize: Option<unsafe extern "C" fn(*mut Dev, *mut GgmlBackendEvent)>,
}

#[repr(C)]
pub struct GgmlBackendDevice {
    pub iface: GgmlBackendDeviceI,
    pub reg: *mut Reg,
    pub context: *mut c_void,
}

type TensorSet2d = unsafe extern "C" fn(
    *mut GgmlBackendBuffer,
    *mut GgmlTensor,
    *const c_void,
    usize,
    usize,
    usize,
    usize,
    usize,
);
type TensorGet2d = unsafe extern "C" fn(
    *mut GgmlBackendBuffer,
    *const GgmlTensor,
    *mut c_void,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// `struct ggml_backend_buffer_i` (11 slots, ggml >= 0.10; unchanged in v3 and v6).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GgmlBackendBufferI {
    pub free_buffer: Option<unsafe extern "C" fn(*mut GgmlBackendBuffer)>,
    pub get_base: Option<unsafe extern "C" fn(*mut GgmlBackendBuffer) -> *mut c_void>,
    pub init_tensor: Option<unsafe extern "C" fn(*mut GgmlBackendBuffer, *mut GgmlTensor) -> c_int>,
    pub memset_tensor:
        Option<unsafe extern "C" fn(*mut GgmlBackendBuffer, *mut GgmlTensor, u8, usize, usize)>,
    pub set_tensor: Option<
        unsafe extern "C" fn(*mut GgmlBackendBuffer, *mut GgmlTensor, *const c_void, usize, usize),
    >,
    pub get_tensor: Option<
        unsafe extern "C" fn(*mut GgmlBackendBuffer, *const GgmlTensor, *mut c_void, usize, usize),
    >,
    pub set_tensor_2d: Option<TensorSet2d>,
    pub get_tensor_2d: Option<TensorGet2d>,
    pub cpy_tensor: Option<
        unsafe extern "C" fn(*mut GgmlBackendBuffer, *const GgmlTensor, *mut GgmlTensor) -> bool,
    >,
    pub clear: Option<unsafe extern "C" fn(*mut GgmlBackendBuffer, u8)>,
    pub reset: Option<unsafe extern "C" fn(*mut GgmlBackendBuffer)>,
}

/// `struct ggml_backend_buffer` — allocated by ggml-base (`ggml_backend_buffer_init`), never by us.
#[repr(C)]
pub struct GgmlBackendBuffer {
    pub iface: GgmlBackendBufferI,
    pub buft: BuftPtr,
    pub context: *mut c_void,
    pub size: usize,
    pub usage: c_int,
}

#[repr(C)]
pub struct GgmlBackendI {
    pub get_name: Option<unsafe extern "C" fn(*mut GgmlBackend) -> *const c_char>,
    pub free: Option<unsafe extern "C" fn(*mut GgmlBackend)>,
    pub set_tensor_async: Option<SetTensorAsync>,
    pub get_tensor_async: Option<GetTensorAsync>,
    pub set_tensor_2d_async: Option<SetTensor2dAsync>,
    pub get_tensor_2d_async: Option<GetTensor2dAsync>,
    pub cpy_tensor_async: Option<CpyTensorAsync>,
    pub synchronize: Option<unsafe extern "C" fn(*mut GgmlBackend)>,
    pub graph_plan_create: Option<unsafe extern "C" fn()>,
    pub graph_plan_free: Option<unsafe extern "C" fn()>,
    pub graph_plan_update: Option<unsafe extern "C" fn()>,
    pub graph_plan_compute: Option<unsafe extern "C" fn()>,
    pub graph_compute: Option<unsafe extern "C" fn(*mut GgmlBackend, *mut GgmlCgraph) -> c_int>,
    pub event_record: Option<EventFn>,
    pub event_wait: Option<EventFn>,
    pub graph_optimize: Option<unsafe extern "C" fn()>,
}

pub type SetTensorAsync =
    unsafe extern "C" fn(*mut GgmlBackend, *mut GgmlTensor, *const c_void, usize, usize);
pub type GetTensorAsync =
    unsafe extern "C" fn(*mut GgmlBackend, *const GgmlTensor, *mut c_void, usize, usize);
pub type SetTensor2dAsync = unsafe extern "C" fn(
    *mut GgmlBackend,
    *mut GgmlTensor,
    *const c_void,
    usize,
    usize,
    usize,
    usize,
    usize,
);
pub type GetTensor2dAsync = unsafe extern "C" fn(
    *mut GgmlBackend,
    *const GgmlTensor,
    *mut c_void,
    usize,
    usize,
    usize,
    usize,
    usize,
);
pub type CpyTensorAsync = unsafe extern "C" fn(
    *mut GgmlBackend,
    *mut GgmlBackend,
    *const GgmlTensor,
    *mut GgmlTensor,
) -> bool;
pub type EventFn = unsafe extern "C" fn(*mut GgmlBackend, *mut GgmlBackendEvent);

#[repr(C)]
pub struct GgmlBackend {
    pub guid: GgmlGuid,
    pub iface: GgmlBackendI,
    pub device: *mut Dev,
    pub context: *mut c_void,
}

/// `struct ggml_init_params`, passed by value to `ggml_init`.
#[repr(C)]
pub struct GgmlInitParams {
    pub mem_size: usize,
    pub mem_buffer: *mut c_void,
    pub no_alloc: bool,
}

/// `struct ggml_backend_feature`, a NULL-terminated array returned by `ggml_backend_get_features`.
#[repr(C)]
pub struct GgmlBackendFeature {
    pub name: *const c_char,
    pub value: *const c_char,
}

// Buffer type interfaces, one per layout.

pub type BuftGetName = unsafe extern "C" fn(BuftPtr) -> *const c_char;
pub type BuftAlloc = unsafe extern "C" fn(BuftPtr, usize) -> *mut GgmlBackendBuffer;
pub type BuftAllocN =
    unsafe extern "C" fn(BuftPtr, *mut *mut GgmlTensor, c_int) -> *mut GgmlBackendBuffer;
pub type BuftSize = unsafe extern "C" fn(BuftPtr) -> usize;
pub type BuftAllocSize = unsafe extern "C" fn(BuftPtr, *const GgmlTensor) -> usize;
pub type BuftAllocSizeN = unsafe extern "C" fn(BuftPtr, *mut *mut GgmlTensor, c_int) -> usize;
pub type BuftIsHost = unsafe extern "C" fn(BuftPtr) -> bool;

/// late v2 (ggml >= 0.10, API version 2): 6 slots.
#[repr(C)]
pub struct BuftIfaceV2 {
    pub get_name: Option<BuftGetName>,
    pub alloc_buffer: Option<BuftAlloc>,
    pub get_alignment: Option<BuftSize>,
    pub get_max_size: Option<BuftSize>,
    pub get_alloc_size: Option<BuftAllocSize>,
    pub is_host: Option<BuftIsHost>,
}

/// v3 (ggml 0.26): 8 slots.
#[repr(C)]
pub struct BuftIfaceV3 {
    pub get_name: Option<BuftGetName>,
    pub alloc_buffer: Option<BuftAlloc>,
    pub alloc_buffer_n: Option<BuftAllocN>,
    pub get_alignment: Option<BuftSize>,
    pub get_max_size: Option<BuftSize>,
    pub get_alloc_size: Option<BuftAllocSize>,
    pub get_alloc_size_n: Option<BuftAllocSizeN>,
    pub is_host: Option<BuftIsHost>,
}

/// v6: 7 slots (the v2 six plus `get_alloc_interface`, left NULL).
#[repr(C)]
pub struct BuftIfaceV6 {
    pub get_name: Option<BuftGetName>,
    pub alloc_buffer: Option<BuftAlloc>,
    pub get_alignment: Option<BuftSize>,
    pub get_max_size: Option<BuftSize>,
    pub get_alloc_size: Option<BuftAllocSize>,
    pub is_host: Option<BuftIsHost>,
    pub get_alloc_interface: Option<unsafe extern "C" fn(BuftPtr) -> *const c_void>,
}

#[repr(C)]
pub struct Buft<I> {
    pub iface: I,
    pub device: *mut Dev,
    pub context: *mut c_void,
}

// Compile-time layout checks against the pinned trees (ggml-backend-abi.md §3.3).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<GgmlTensor>() == 336);
    assert!(offset_of!(GgmlTensor, ne) == 16);
    assert!(offset_of!(GgmlTensor, nb) == 48);
    assert!(offset_of!(GgmlTensor, op) == 80);
    assert!(offset_of!(GgmlTensor, op_params) == 84);
    assert!(offset_of!(GgmlTensor, flags) == 148);
    assert!(offset_of!(GgmlTensor, src) == 152);
    assert!(offset_of!(GgmlTensor, view_src) == 232);
    assert!(offset_of!(GgmlTensor, view_offs) == 240);
    assert!(offset_of!(GgmlTensor, data) == 248);
    assert!(offset_of!(GgmlTensor, name) == 256);
    assert!(offset_of!(GgmlTensor, extra) == 320);
    assert!(size_of::<GgmlBackendRegI>() == 32);
    assert!(size_of::<GgmlBackendReg>() == 48);
    assert!(size_of::<GgmlBackendDeviceI>() == 120);
    assert!(size_of::<GgmlBackendDevice>() == 136);
    assert!(size_of::<GgmlBackendI>() == 128);
    assert!(size_of::<GgmlBackend>() == 152);
    assert!(size_of::<GgmlBackendBufferI>() == 88);
    assert!(offset_of!(GgmlBackendBuffer, buft) == 88);
    assert!(offset_of!(GgmlBackendBuffer, context) == 96);
    assert!(offset_of!(GgmlBackendBuffer, size) == 104);
    assert!(offset_of!(GgmlBackendBuffer, usage) == 112);
    assert!(size_of::<GgmlBackendBuffer>() == 120);
    assert!(size_of::<BuftIfaceV2>() == 48);
    assert!(size_of::<BuftIfaceV3>() == 64);
    assert!(size_of::<BuftIfaceV6>() == 56);
    assert!(size_of::<Buft<BuftIfaceV2>>() == 64);
    assert!(size_of::<Buft<BuftIfaceV3>>() == 80);
    assert!(size_of::<GgmlBackendDevProps>() == 56);
    assert!(offset_of!(GgmlBackendDevProps, type_) == 32);
    assert!(offset_of!(GgmlBackendDevProps, device_id) == 40);
    assert!(offset_of!(GgmlBackendDevProps, caps) == 48);
};
