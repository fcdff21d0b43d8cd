//! The host's libggml-base, opened with dlopen: `ggml_get_type_traits` (its `to_float` and
//! `from_float_ref`) and `ggml_quantize_chunk`. Shared by the ggml comparison test and the
//! error-table example (`#[path]`-included there).
//!
//! Environment rule: without `GGML_COREML_HOST_BIN` the caller skips (prints `skipped: <why>`),
//! unless `GGML_COREML_REQUIRE_EXTERNAL=1`, which turns the skip into a failure.

#![allow(dead_code)]

use std::ffi::{CStr, c_char, c_void};
use std::path::PathBuf;

use ggml_coreml_bridge::WeightType;
use libloading::Library;

type ToFloat = unsafe extern "C" fn(x: *const c_void, y: *mut f32, k: i64);
type FromFloat = unsafe extern "C" fn(x: *const f32, y: *mut c_void, k: i64);
type GetTraits = unsafe extern "C" fn(t: u32) -> *const TypeTraits;
type QuantizeChunk = unsafe extern "C" fn(
    t: u32,
    src: *const f32,
    dst: *mut c_void,
    start: i64,
    nrows: i64,
    n_per_row: i64,
    imatrix: *const f32,
) -> usize;

/// `struct ggml_type_traits` of `ggml/include/ggml.h` (ggml 0.25.3 / 0.26.0):
/// `const char *type_name; int64_t blck_size; int64_t blck_size_interleave; size_t type_size;
/// bool is_quantized; ggml_to_float_t to_float; ggml_from_float_t from_float_ref;`
#[repr(C)]
struct TypeTraits {
    type_name: *const c_char,
    blck_size: i64,
    blck_size_interleave: i64,
    type_size: usize,
    is_quantized: bool,
    to_float: Option<ToFloat>,
    from_float_ref: Option<FromFloat>,
}

/// ggml type id of Q8_0 (the activation format ggml-cpu uses for Q4_0/Q8_0 weights).
pub const GGML_Q8_0: u32 = 8;

pub struct GgmlBase {
    _lib: Library,
    get_traits: GetTraits,
    quantize_chunk: QuantizeChunk,
    pub path: PathBuf,
}

impl GgmlBase {
    /// Opens `$GGML_COREML_HOST_BIN/libggml-base.so`; `Ok(None)` means "skip" (variable unset and
    /// not required), `Err` means the library is required or present but unusable.
    pub fn open() -> Result<Option<GgmlBase>, String> {
        let require = std::env::var("GGML_COREML_REQUIRE_EXTERNAL").as_deref() == Ok("1");
        let Some(dir) = std::env::var_os("GGML_COREML_HOST_BIN") else {
            let why = "GGML_COREML_HOST_BIN is not set (dir of the host's libggml-base.so)";
            return if require { Err(why.into()) } else { Ok(None) };
        };
        let path = PathBuf::from(dir).join(if cfg!(target_os = "macos") {
            "libggml-base.dylib"
        } else {
            "libggml-base.so"
        });
        // SAFETY: loading ggml-base runs only its static initialisers, which have no preconditions.
        let lib = unsafe { Library::new(&path) }
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: the symbol types are the C prototypes of ggml.h.
        let (get_traits, quantize_chunk) = unsafe {
            let g = *lib
                .get::<GetTraits>(b"ggml_get_type_traits\0")
                .map_err(|e| e.to_string())?;
            let q = *lib
                .get::<QuantizeChunk>(b"ggml_quantize_chunk\0")
                .map_err(|e| e.to_string())?;
            (g, q)
        };
        let base = GgmlBase {
            _lib: lib,
            get_traits,
            quantize_chunk,
            path,
        };
        for t in WeightType::ALL {
            base.check_traits(t)?;
        }
        Ok(Some(base))
    }

    fn traits(&self, type_id: u32) -> &TypeTraits {
        // SAFETY: ggml returns a pointer into its static, never-freed `type_traits` table for
        // every id below GGML_TYPE_COUNT; we only ask for supported ids.
        unsafe { &*(self.get_traits)(type_id) }
    }

    /// Confirms the struct layout by reading fields we know the values of.
    fn check_traits(&self, t: WeightType) -> Result<(), String> {
        let tr = self.traits(t.ggml_id());
        // SAFETY: `type_name` is a static NUL-terminated C string in ggml's table.
        let name = unsafe { CStr::from_ptr(tr.type_name) }.to_string_lossy();
        let ok = name == t.name()
            && tr.blck_size == t.block_len() as i64
            && tr.type_size == t.block_bytes()
            && tr.is_quantized == (t != WeightType::F16)
            && tr.to_float.is_some();
        if ok {
            Ok(())
        } else {
            Err(format!(
                "ggml_type_traits layout mismatch for {t}: name {name:?}, blck {}, size {}",
                tr.blck_size, tr.type_size
            ))
        }
    }

    /// ggml's `to_float` over whole blocks: `out.len()` elements from `bytes`.
    pub fn to_float(&self, t: WeightType, bytes: &[u8], out: &mut [f32]) {
        let k = out.len();
        assert_eq!(bytes.len(), t.row_bytes(k).unwrap());
        let f = self.traits(t.ggml_id()).to_float.expect("to_float");
        // SAFETY: `bytes` holds exactly k/blck blocks and `out` k floats, as `to_float` reads/writes.
        unsafe { f(bytes.as_ptr().cast(), out.as_mut_ptr(), k as i64) }
    }

    /// ggml's `from_float_ref` for `type_id` (e.g. Q8_0 activations): `src.len()` elements.
    pub fn quantize_ref(
        &self,
        type_id: u32,
        block_len: usize,
        block_bytes: usize,
        src: &[f32],
    ) -> Vec<u8> {
        assert_eq!(src.len() % block_len, 0);
        let mut out = vec![0u8; src.len() / block_len * block_bytes];
        let f = self.traits(type_id).from_float_ref.expect("from_float_ref");
        // SAFETY: `out` has room for all blocks of `src`.
        unsafe { f(src.as_ptr(), out.as_mut_ptr().cast(), src.len() as i64) }
        out
    }

    /// `to_float` for any ggml type id, given its block geometry.
    pub fn to_float_id(
        &self,
        type_id: u32,
        block_len: usize,
        block_bytes: usize,
        bytes: &[u8],
    ) -> Vec<f32> {
        let n = bytes.len() / block_bytes * block_len;
        let mut out = vec![0f32; n];
        let f = self.traits(type_id).to_float.expect("to_float");
        // SAFETY: whole blocks in, n floats out.
        unsafe { f(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) }
        out
    }

    /// ggml's reference quantiser (`ggml_quantize_chunk`, no imatrix) of `n` rows of `k` floats.
    pub fn quantize(&self, t: WeightType, src: &[f32], n: usize, k: usize) -> Vec<u8> {
        assert_eq!(src.len(), n * k);
        let mut out = vec![0u8; t.tensor_bytes(n, k).unwrap()];
        // SAFETY: src holds n*k floats, out n rows of row_bytes(k); ggml writes exactly that.
        let written = unsafe {
            (self.quantize_chunk)(
                t.ggml_id(),
                src.as_ptr(),
                out.as_mut_ptr().cast(),
                0,
                n as i64,
                k as i64,
                std::ptr::null(),
            )
        };
        assert_eq!(written, out.len());
        out
    }
}
