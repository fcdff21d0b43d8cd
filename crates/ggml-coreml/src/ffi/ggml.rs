//! The ggml-base function table, resolved once at `ggml_backend_init` — never linked.
//!
//! One binary serves every host: upstream llama.cpp (symbols global), QVAC's Bare runtime (addons are
//! loaded RTLD_LOCAL, so we bind to the already-loaded runtime image by its soname) and static hosts.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use super::abi::*;

/// The host's backend struct layout, detected by probing ggml-base symbols (the API version number
/// alone is not a fingerprint: ggml 0.9 and 0.10 are both "2" with different vtables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// ggml >= 0.10, `GGML_BACKEND_API_VERSION` 2 (llama-cpp-python 0.3.36's tree, QVAC fabric).
    V2,
    /// ggml 0.26, version 3: buffer type interface with `alloc_buffer_n` / `get_alloc_size_n`.
    V3,
    /// version 6: buffer type interface with `get_alloc_interface`.
    V6,
}

impl Layout {
    pub fn api_version(self) -> c_int {
        match self {
            Layout::V2 => 2,
            Layout::V3 => 3,
            Layout::V6 => 6,
        }
    }
}

type FnBufferInit =
    unsafe extern "C" fn(BuftPtr, GgmlBackendBufferI, *mut c_void, usize) -> *mut GgmlBackendBuffer;
type FnLog = unsafe extern "C" fn(c_int, *const c_char, ...);

/// Functions of ggml-base we call. All resolved or none: a host missing one is not supported.
pub struct GgmlApi {
    pub layout: Layout,
    /// Where the symbols came from, for the log.
    pub source: String,
    pub buffer_init: FnBufferInit,
    pub nbytes: unsafe extern "C" fn(*const GgmlTensor) -> usize,
    pub log_internal: FnLog,
    pub graph_n_nodes: unsafe extern "C" fn(*mut GgmlCgraph) -> c_int,
    pub graph_node: unsafe extern "C" fn(*mut GgmlCgraph, c_int) -> *mut GgmlTensor,
    pub op_name: unsafe extern "C" fn(c_int) -> *const c_char,
    pub type_name: unsafe extern "C" fn(c_int) -> *const c_char,
    pub dev_by_type: unsafe extern "C" fn(c_int) -> *mut Dev,
    pub dev_by_name: unsafe extern "C" fn(*const c_char) -> *mut Dev,
    pub dev_init: unsafe extern "C" fn(*mut Dev, *const c_char) -> *mut GgmlBackend,
    pub dev_supports_op: unsafe extern "C" fn(*mut Dev, *const GgmlTensor) -> bool,
    pub dev_backend_reg: unsafe extern "C" fn(*mut Dev) -> *mut Reg,
    pub dev_name: unsafe extern "C" fn(*mut Dev) -> *const c_char,
    pub reg_get_proc_address: unsafe extern "C" fn(*mut Reg, *const c_char) -> *mut c_void,
    pub backend_free: unsafe extern "C" fn(*mut GgmlBackend),
    pub backend_graph_compute: unsafe extern "C" fn(*mut GgmlBackend, *mut GgmlCgraph) -> c_int,
    pub init: unsafe extern "C" fn(GgmlInitParams) -> *mut GgmlContext,
    pub free: unsafe extern "C" fn(*mut GgmlContext),
    pub new_graph_custom: unsafe extern "C" fn(*mut GgmlContext, usize, bool) -> *mut GgmlCgraph,
    pub graph_clear: unsafe extern "C" fn(*mut GgmlCgraph),
    pub graph_add_node: unsafe extern "C" fn(*mut GgmlCgraph, *mut GgmlTensor),
    pub graph_overhead_custom: unsafe extern "C" fn(usize, bool) -> usize,
    pub buffer_is_host: unsafe extern "C" fn(*mut GgmlBackendBuffer) -> bool,
    pub tensor_get: unsafe extern "C" fn(*const GgmlTensor, *mut c_void, usize, usize),
    pub tensor_set: unsafe extern "C" fn(*mut GgmlTensor, *const c_void, usize, usize),
    pub synchronize: unsafe extern "C" fn(*mut GgmlBackend),
    pub dev_memory: unsafe extern "C" fn(*mut Dev, *mut usize, *mut usize),
    pub dev_get_props: unsafe extern "C" fn(*mut Dev, *mut GgmlBackendDevProps),
    pub dev_description: unsafe extern "C" fn(*mut Dev) -> *const c_char,
    pub dev_buffer_type: unsafe extern "C" fn(*mut Dev) -> BuftPtr,
    pub dev_host_buffer_type: unsafe extern "C" fn(*mut Dev) -> BuftPtr,
    pub dev_supports_buft: unsafe extern "C" fn(*mut Dev, BuftPtr) -> bool,
    pub dev_offload_op: unsafe extern "C" fn(*mut Dev, *const GgmlTensor) -> bool,
    pub reg_by_name: unsafe extern "C" fn(*const c_char) -> *mut Reg,
    pub reg_dev_count: unsafe extern "C" fn(*mut Reg) -> usize,
    pub reg_dev_get: unsafe extern "C" fn(*mut Reg, usize) -> *mut Dev,
    pub device_register: unsafe extern "C" fn(*mut Dev),
    // Buffer types and asynchronous entry points, for the hybrid face's wrappers of its inner device.
    pub buft_name: unsafe extern "C" fn(BuftPtr) -> *const c_char,
    pub buft_alloc_buffer: unsafe extern "C" fn(BuftPtr, usize) -> *mut GgmlBackendBuffer,
    pub buft_get_alignment: unsafe extern "C" fn(BuftPtr) -> usize,
    pub buft_get_max_size: unsafe extern "C" fn(BuftPtr) -> usize,
    pub buft_get_alloc_size: unsafe extern "C" fn(BuftPtr, *const GgmlTensor) -> usize,
    pub buft_is_host: unsafe extern "C" fn(BuftPtr) -> bool,
    pub graph_compute_async: unsafe extern "C" fn(*mut GgmlBackend, *mut GgmlCgraph) -> c_int,
    pub event_new: unsafe extern "C" fn(*mut Dev) -> *mut GgmlBackendEvent,
    pub event_free: unsafe extern "C" fn(*mut GgmlBackendEvent),
    pub event_synchronize: unsafe extern "C" fn(*mut GgmlBackendEvent),
    // The split mode's small graph on the inner device (`router::run_split`).
    pub view_2d: unsafe extern "C" fn(
        *mut GgmlContext,
        *mut GgmlTensor,
        i64,
        i64,
        usize,
        usize,
    ) -> *mut GgmlTensor,
    pub mul_mat:
        unsafe extern "C" fn(*mut GgmlContext, *mut GgmlTensor, *mut GgmlTensor) -> *mut GgmlTensor,
    pub cpy:
        unsafe extern "C" fn(*mut GgmlContext, *mut GgmlTensor, *mut GgmlTensor) -> *mut GgmlTensor,
    pub view_init: unsafe extern "C" fn(*mut GgmlTensor) -> c_int,
    pub tensor_alloc:
        unsafe extern "C" fn(*mut GgmlBackendBuffer, *mut GgmlTensor, *mut c_void) -> c_int,
    pub buffer_get_base: unsafe extern "C" fn(*mut GgmlBackendBuffer) -> *mut c_void,
    pub buffer_free: unsafe extern "C" fn(*mut GgmlBackendBuffer),
    pub tensor_set_2d:
        unsafe extern "C" fn(*mut GgmlTensor, *const c_void, usize, usize, usize, usize, usize),
    pub dev_buffer_from_host_ptr:
        unsafe extern "C" fn(*mut Dev, *mut c_void, usize, usize) -> *mut GgmlBackendBuffer,
    /// `ggml_custom_4d` (ggml >= 0.0.2100 or so): lets the executor's GEMM run on the CPU backend's
    /// own worker threads (see `host::GgmlPool`). None on hosts without it.
    pub custom_4d: Option<FnCustom4d>,
    /// The host's values of the ops we look at (see [`OpIds`]).
    pub ops: OpIds,
}

/// `ggml_custom_op_t`: `fun(dst, ith, nth, userdata)`, called once per worker thread.
pub type FnCustomOp = unsafe extern "C" fn(*mut GgmlTensor, c_int, c_int, *mut c_void);

/// `ggml_custom_4d(ctx, type, ne0, ne1, ne2, ne3, args, n_args, fun, n_tasks, userdata)`.
pub type FnCustom4d = unsafe extern "C" fn(
    *mut GgmlContext,
    c_int,
    i64,
    i64,
    i64,
    i64,
    *mut *mut GgmlTensor,
    c_int,
    FnCustomOp,
    c_int,
    *mut c_void,
) -> *mut GgmlTensor;

/// Host values of the ops the backend inspects, found by name at init. Trees disagree on
/// `enum ggml_op`: QVAC's fabric (0.15) adds five ops before MUL_MAT (MUL_MAT = 34, upstream 29)
/// and two after it, so comparing raw values against upstream's constants misses every matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpIds {
    pub none: c_int,
    pub mul_mat: c_int,
    pub reshape: c_int,
    pub view: c_int,
    pub permute: c_int,
    pub transpose: c_int,
}

/// Value for host ops that have no upstream constant we use (never equal to one of them).
pub const OP_OTHER: c_int = -1;

impl OpIds {
    /// Upstream's numbering (ggml 0.21, 0.25.3, 0.26.0): the identity mapping.
    pub const UPSTREAM: OpIds = OpIds {
        none: GGML_OP_NONE,
        mul_mat: GGML_OP_MUL_MAT,
        reshape: GGML_OP_RESHAPE,
        view: GGML_OP_VIEW,
        permute: GGML_OP_PERMUTE,
        transpose: GGML_OP_TRANSPOSE,
    };

    /// Scans `ggml_op_name(0..)` until every op we need is found. The scan stops at the last of
    /// them (TRANSPOSE), well before GGML_OP_COUNT in every tree, so it never reads past the
    /// host's name table.
    fn find(op_name: unsafe extern "C" fn(c_int) -> *const c_char) -> Result<OpIds, String> {
        const WANTED: [&str; 6] = ["NONE", "MUL_MAT", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE"];
        let mut found: [Option<c_int>; 6] = [None; 6];
        let mut op: c_int = 0;
        while found.iter().any(Option::is_none) && op < 512 {
            // SAFETY: `op` is below the index of a wanted op not yet found, so inside the table.
            let p = unsafe { op_name(op) };
            if p.is_null() {
                break;
            }
            // SAFETY: ggml_op_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(p) }.to_bytes();
            if let Some(i) = WANTED.iter().position(|w| w.as_bytes() == name) {
                found[i].get_or_insert(op);
            }
            op += 1;
        }
        match found {
            [
                Some(none),
                Some(mul_mat),
                Some(reshape),
                Some(view),
                Some(permute),
                Some(transpose),
            ] => Ok(OpIds {
                none,
                mul_mat,
                reshape,
                view,
                permute,
                transpose,
            }),
            _ => Err(
                "ggml_op_name does not name NONE, MUL_MAT, RESHAPE, VIEW, PERMUTE and TRANSPOSE"
                    .into(),
            ),
        }
    }

    /// The upstream constant for a host op value, or [`OP_OTHER`].
    pub fn canonical(&self, raw: c_int) -> c_int {
        match raw {
            r if r == self.none => GGML_OP_NONE,
            r if r == self.mul_mat => GGML_OP_MUL_MAT,
            r if r == self.reshape => GGML_OP_RESHAPE,
            r if r == self.view => GGML_OP_VIEW,
            r if r == self.permute => GGML_OP_PERMUTE,
            r if r == self.transpose => GGML_OP_TRANSPOSE,
            _ => OP_OTHER,
        }
    }
}

/// A host op value as the upstream constant the rest of the crate compares against. Before
/// resolution (unit tests build tensors with upstream values) the value is taken as is.
pub fn canonical_op(raw: c_int) -> c_int {
    match api() {
        Some(a) if a.ops != OpIds::UPSTREAM => a.ops.canonical(raw),
        _ => raw,
    }
}

static API: OnceLock<Result<GgmlApi, String>> = OnceLock::new();

/// The table, if resolution succeeded. `None` before `ggml_backend_init` or on an unsupported host.
pub fn api() -> Option<&'static GgmlApi> {
    API.get().and_then(|r| r.as_ref().ok())
}

/// Resolves the table once; later calls return the first outcome.
pub fn resolve() -> Result<&'static GgmlApi, String> {
    API.get_or_init(resolve_uncached)
        .as_ref()
        .map_err(Clone::clone)
}

/// Images that may hold ggml-base when it is not in the global scope (matched by soname / install name).
const PRIVATE_IMAGES: &[&str] = &[
    "qvac__fabric@0.bare",
    "libggml-base.so.0",
    "libggml-base.so",
    "@rpath/qvac__fabric@0.bare",
    "@rpath/libggml-base.0.dylib",
    "@rpath/libggml-base.dylib",
    "libggml-base.0.dylib",
    "libggml-base.dylib",
];

struct Lookup {
    handle: *mut c_void,
    source: String,
}

impl Lookup {
    fn sym(&self, name: &str) -> *mut c_void {
        let c = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: `handle` is RTLD_DEFAULT or a live handle from dlopen; `c` is a valid C string.
        unsafe { libc::dlsym(self.handle, c.as_ptr()) }
    }
}

fn find_ggml_base() -> Option<Lookup> {
    let probe = "ggml_backend_buffer_init";
    let global = Lookup {
        handle: libc::RTLD_DEFAULT,
        source: "global scope".into(),
    };
    if !global.sym(probe).is_null() {
        return Some(global);
    }
    for name in PRIVATE_IMAGES {
        let c = CString::new(*name).expect("no NUL");
        // SAFETY: RTLD_NOLOAD only returns an image that is already loaded; it never runs initialisers.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_NOW) };
        if !h.is_null() {
            let l = Lookup {
                handle: h,
                source: (*name).to_string(),
            };
            if !l.sym(probe).is_null() {
                return Some(l);
            }
        }
    }
    None
}

// The field each symbol is assigned to names its type; spelling every signature twice adds nothing.
#[allow(clippy::missing_transmute_annotations)]
fn resolve_uncached() -> Result<GgmlApi, String> {
    let l = find_ggml_base().ok_or_else(|| {
        "ggml-base symbols not found in the global scope nor in a loaded ggml runtime".to_string()
    })?;
    let has = |n: &str| !l.sym(n).is_null();
    let detected = if has("ggml_backend_buft_get_alloc_interface") {
        Some(Layout::V6)
    } else if has("ggml_backend_buft_alloc_buffer_n") {
        Some(Layout::V3)
    } else if has("ggml_backend_tensor_set_2d") {
        Some(Layout::V2)
    } else {
        None
    };
    let layout = match std::env::var("GGML_COREML_GGML_API_VERSION")
        .ok()
        .as_deref()
    {
        Some("2") => Some(Layout::V2),
        Some("3") => Some(Layout::V3),
        Some("6") => Some(Layout::V6),
        Some(other) => {
            return Err(format!(
                "GGML_COREML_GGML_API_VERSION={other} is not a layout this build has (2 = ggml >= 0.10, 3, 6)"
            ));
        }
        None => detected,
    };
    let layout = layout.ok_or_else(|| {
        "host ggml is older than 0.10 (API version 2 with the old 9-slot buffer interface); \
         this build supports ggml >= 0.10 with backend API versions 2, 3 and 6"
            .to_string()
    })?;

    macro_rules! get {
        ($name:literal) => {{
            let p = l.sym($name);
            if p.is_null() {
                return Err(format!("ggml-base lacks {}", $name));
            }
            // SAFETY: the symbol has the C signature of the field it is assigned to (ggml.h,
            // ggml-backend.h, ggml-backend-impl.h of every supported tree).
            unsafe { std::mem::transmute::<*mut c_void, _>(p) }
        }};
    }

    let op_name: unsafe extern "C" fn(c_int) -> *const c_char = get!("ggml_op_name");
    let ops = OpIds::find(op_name)?;

    Ok(GgmlApi {
        layout,
        source: l.source.clone(),
        buffer_init: get!("ggml_backend_buffer_init"),
        nbytes: get!("ggml_nbytes"),
        log_internal: get!("ggml_log_internal"),
        graph_n_nodes: get!("ggml_graph_n_nodes"),
        graph_node: get!("ggml_graph_node"),
        op_name: get!("ggml_op_name"),
        type_name: get!("ggml_type_name"),
        dev_by_type: get!("ggml_backend_dev_by_type"),
        dev_by_name: get!("ggml_backend_dev_by_name"),
        dev_init: get!("ggml_backend_dev_init"),
        dev_supports_op: get!("ggml_backend_dev_supports_op"),
        dev_backend_reg: get!("ggml_backend_dev_backend_reg"),
        dev_name: get!("ggml_backend_dev_name"),
        reg_get_proc_address: get!("ggml_backend_reg_get_proc_address"),
        backend_free: get!("ggml_backend_free"),
        backend_graph_compute: get!("ggml_backend_graph_compute"),
        init: get!("ggml_init"),
        free: get!("ggml_free"),
        new_graph_custom: get!("ggml_new_graph_custom"),
        graph_clear: get!("ggml_graph_clear"),
        graph_add_node: get!("ggml_graph_add_node"),
        graph_overhead_custom: get!("ggml_graph_overhead_custom"),
        buffer_is_host: get!("ggml_backend_buffer_is_host"),
        tensor_get: get!("ggml_backend_tensor_get"),
        tensor_set: get!("ggml_backend_tensor_set"),
        synchronize: get!("ggml_backend_synchronize"),
        dev_memory: get!("ggml_backend_dev_memory"),
        dev_get_props: get!("ggml_backend_dev_get_props"),
        dev_description: get!("ggml_backend_dev_description"),
        dev_buffer_type: get!("ggml_backend_dev_buffer_type"),
        dev_host_buffer_type: get!("ggml_backend_dev_host_buffer_type"),
        dev_supports_buft: get!("ggml_backend_dev_supports_buft"),
        dev_offload_op: get!("ggml_backend_dev_offload_op"),
        reg_by_name: get!("ggml_backend_reg_by_name"),
        reg_dev_count: get!("ggml_backend_reg_dev_count"),
        reg_dev_get: get!("ggml_backend_reg_dev_get"),
        device_register: get!("ggml_backend_device_register"),
        buft_name: get!("ggml_backend_buft_name"),
        buft_alloc_buffer: get!("ggml_backend_buft_alloc_buffer"),
        buft_get_alignment: get!("ggml_backend_buft_get_alignment"),
        buft_get_max_size: get!("ggml_backend_buft_get_max_size"),
        buft_get_alloc_size: get!("ggml_backend_buft_get_alloc_size"),
        buft_is_host: get!("ggml_backend_buft_is_host"),
        graph_compute_async: get!("ggml_backend_graph_compute_async"),
        event_new: get!("ggml_backend_event_new"),
        event_free: get!("ggml_backend_event_free"),
        event_synchronize: get!("ggml_backend_event_synchronize"),
        dev_buffer_from_host_ptr: get!("ggml_backend_dev_buffer_from_host_ptr"),
        view_2d: get!("ggml_view_2d"),
        mul_mat: get!("ggml_mul_mat"),
        cpy: get!("ggml_cpy"),
        view_init: get!("ggml_backend_view_init"),
        tensor_alloc: get!("ggml_backend_tensor_alloc"),
        buffer_get_base: get!("ggml_backend_buffer_get_base"),
        buffer_free: get!("ggml_backend_buffer_free"),
        tensor_set_2d: get!("ggml_backend_tensor_set_2d"),
        custom_4d: {
            let p = l.sym("ggml_custom_4d");
            // SAFETY: when present, the symbol has ggml.h's `ggml_custom_4d` signature.
            (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, FnCustom4d>(p) })
        },
        ops,
    })
}

impl GgmlApi {
    pub fn op_name(&self, op: c_int) -> String {
        // SAFETY: ggml_op_name returns a static string for every op value it knows (and "?"-ish otherwise).
        unsafe { cstr_or(((self.op_name)(op)).cast(), "?") }
    }

    pub fn type_name(&self, t: c_int) -> String {
        // SAFETY: as above, a static string.
        unsafe { cstr_or(((self.type_name)(t)).cast(), "?") }
    }
}

/// Copies a C string, tolerating NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
pub unsafe fn cstr_or(p: *const c_char, default: &str) -> String {
    if p.is_null() {
        default.to_string()
    } else {
        // SAFETY: non-NULL and NUL-terminated per the caller's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
