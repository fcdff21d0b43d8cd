//! A read-only view of a `ggml_tensor` for the safe layers above.

use std::ffi::{CStr, c_int, c_void};

use super::abi::*;

/// `GGML_BACKEND_BUFFER_USAGE_ANY`.
const BUFFER_USAGE_ANY: c_int = 0;
/// `GGML_TENSOR_FLAG_INPUT`.
const TENSOR_FLAG_INPUT: i32 = 1;

/// Borrowed view of a live ggml tensor.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    t: &'a GgmlTensor,
}

impl<'a> TensorRef<'a> {
    /// # Safety
    /// `p` is NULL or points to a `ggml_tensor` that stays alive and unmoved for `'a`.
    pub unsafe fn from_ptr(p: *const GgmlTensor) -> Option<TensorRef<'a>> {
        // SAFETY: per the caller's contract.
        unsafe { p.as_ref() }.map(|t| TensorRef { t })
    }

    pub fn ptr(&self) -> *const GgmlTensor {
        self.t
    }
    pub fn type_id(&self) -> c_int {
        self.t.type_
    }
    /// The op as upstream's constant (`GGML_OP_*` in abi.rs), whatever the host's enum numbering.
    pub fn op(&self) -> c_int {
        super::ggml::canonical_op(self.t.op)
    }
    pub fn op_param(&self, i: usize) -> i32 {
        self.t.op_params[i]
    }
    pub fn flags(&self) -> i32 {
        self.t.flags
    }
    pub fn ne(&self) -> [i64; 4] {
        self.t.ne
    }
    pub fn nb(&self) -> [usize; 4] {
        self.t.nb
    }
    pub fn data(&self) -> *mut c_void {
        self.t.data
    }
    pub fn buffer(&self) -> *mut GgmlBackendBuffer {
        self.t.buffer
    }
    /// The buffer type of the tensor's buffer (NULL when unallocated).
    pub fn buft(&self) -> BuftPtr {
        // SAFETY: a non-NULL tensor->buffer points to a live ggml_backend_buffer (ggml-base invariant).
        match unsafe { self.t.buffer.as_ref() } {
            Some(b) => b.buft,
            None => std::ptr::null_mut(),
        }
    }
    /// Size of the tensor's buffer (0 for the zero-size probe buffer llama.cpp uses at weight placement).
    pub fn buffer_size(&self) -> Option<usize> {
        // SAFETY: as above.
        unsafe { self.t.buffer.as_ref() }.map(|b| b.size)
    }
    /// Usage of the tensor's buffer (`WEIGHTS` = 1 for model weights), if allocated.
    pub fn buffer_usage(&self) -> Option<c_int> {
        // SAFETY: a non-NULL tensor->buffer points to a live ggml_backend_buffer.
        unsafe { self.t.buffer.as_ref() }.map(|b| b.usage)
    }
    /// Whether this is a model weight, whose prepared form may be kept by address (hybrid face).
    ///
    /// A weight sits in a buffer marked `WEIGHTS`. llama.cpp's rpc-server cannot mark any: the RPC protocol
    /// carries no buffer usage, so every buffer it allocates for a client is `ANY`, weights and KV cache
    /// alike. There a weight is recognised by what llama.cpp's loader makes of it: a leaf (no op), not a
    /// view (KV-cache operands of MUL_MAT are views of the cache), not a graph input, named `*.weight`.
    pub fn is_model_weight(&self) -> bool {
        match self.buffer_usage() {
            Some(BUFFER_USAGE_WEIGHTS) => true,
            Some(BUFFER_USAGE_ANY) => {
                self.op() == GGML_OP_NONE
                    && self.t.view_src.is_null()
                    && self.t.flags & TENSOR_FLAG_INPUT == 0
                    && self.name().ends_with(".weight")
            }
            _ => false,
        }
    }
    pub fn src(&self, i: usize) -> Option<TensorRef<'a>> {
        // SAFETY: sources of a live tensor are live tensors or NULL.
        unsafe { TensorRef::from_ptr(self.t.src[i]) }
    }
    pub fn name(&self) -> String {
        // SAFETY: `name` is a fixed array that ggml keeps NUL-terminated; fall back to lossy if not.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(self.t.name.as_ptr().cast(), GGML_MAX_NAME) };
        match CStr::from_bytes_until_nul(bytes) {
            Ok(c) => c.to_string_lossy().into_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
    /// Number of elements.
    pub fn nelements(&self) -> i64 {
        self.t.ne.iter().product()
    }
}

impl TensorRef<'_> {
    /// A copy of a contiguous tensor's bytes (`ne` product × element size), or None if not contiguous.
    ///
    /// # Safety
    /// The tensor is allocated in host-visible memory.
    pub unsafe fn host_bytes(&self) -> Option<Vec<u8>> {
        let len = self.contiguous_len()?;
        // SAFETY: per the contract, `len` bytes at data are readable.
        Some(unsafe { std::slice::from_raw_parts(self.t.data.cast::<u8>(), len) }.to_vec())
    }

    /// Writes back bytes taken with [`Self::host_bytes`].
    ///
    /// # Safety
    /// As for `host_bytes`, and nobody else accesses the tensor meanwhile.
    pub unsafe fn write_host_bytes(&self, bytes: &[u8]) {
        if self.contiguous_len() == Some(bytes.len()) {
            // SAFETY: same region `host_bytes` read.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.t.data.cast::<u8>(), bytes.len())
            };
        }
    }

    /// Byte length of an F32 tensor whose strides are the packed ones.
    fn contiguous_len(&self) -> Option<usize> {
        if self.t.type_ != GGML_TYPE_F32 || self.t.data.is_null() {
            return None;
        }
        let mut expect = 4usize;
        for d in 0..4 {
            if self.t.nb[d] != expect {
                return None;
            }
            expect = expect.checked_mul(usize::try_from(self.t.ne[d]).ok()?)?;
        }
        Some(expect)
    }
}

/// f32 rows of one 2-D batch of a tensor: borrowed in place when rows are plain f32 runs, else gathered.
pub enum RowsF32<'a> {
    Borrowed { x: &'a [f32], stride: usize },
    Gathered { x: Vec<f32>, stride: usize },
}

impl RowsF32<'_> {
    pub fn as_slice(&self) -> (&[f32], usize) {
        match self {
            RowsF32::Borrowed { x, stride } => (x, *stride),
            RowsF32::Gathered { x, stride } => (x, *stride),
        }
    }
}

impl<'a> TensorRef<'a> {
    /// Address of the first row of the 2-D slice `(i2, i3)` and the row stride in bytes.
    ///
    /// # Safety
    /// The tensor's data is allocated, and `(i2, i3)` is within `ne[2]`, `ne[3]`.
    pub unsafe fn slice2d_addr(&self, i2: usize, i3: usize) -> (usize, usize) {
        let off = i2 * self.t.nb[2] + i3 * self.t.nb[3];
        (self.t.data as usize + off, self.t.nb[1])
    }

    /// Bytes of the 2-D slice `(i2, i3)` whose rows are runs of `row_bytes` at stride `nb[1]`:
    /// borrowed when the rows are adjacent, gathered otherwise.
    ///
    /// # Safety
    /// The tensor's data is allocated, `(i2, i3)` is within `ne[2]`, `ne[3]`, and `nb[1] >= row_bytes`.
    pub unsafe fn slice2d_rows(
        &self,
        i2: usize,
        i3: usize,
        row_bytes: usize,
    ) -> std::borrow::Cow<'a, [u8]> {
        // SAFETY: per the contract, all `ne[1]` rows.
        unsafe { self.slice2d_row_range(i2, i3, row_bytes, 0, self.t.ne[1] as usize) }
    }

    /// [`TensorRef::slice2d_rows`] of rows `r0 .. r0 + rows` only (clamped to `ne[1]`).
    ///
    /// # Safety
    /// As [`TensorRef::slice2d_rows`].
    pub unsafe fn slice2d_row_range(
        &self,
        i2: usize,
        i3: usize,
        row_bytes: usize,
        r0: usize,
        rows: usize,
    ) -> std::borrow::Cow<'a, [u8]> {
        let all = self.t.ne[1] as usize;
        let r0 = r0.min(all);
        let rows = rows.min(all - r0);
        let stride = self.t.nb[1];
        // SAFETY: caller contract: the slice's rows lie in the tensor's allocation.
        let base = unsafe {
            self.t
                .data
                .cast::<u8>()
                .add(i2 * self.t.nb[2] + i3 * self.t.nb[3] + r0 * stride)
        };
        if stride == row_bytes {
            // SAFETY: ggml allocated adjacent rows of row_bytes here.
            return std::borrow::Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(base, rows * row_bytes)
            });
        }
        let mut v = Vec::with_capacity(rows * row_bytes);
        for r in 0..rows {
            // SAFETY: row r starts at base + r * stride and holds row_bytes bytes.
            v.extend_from_slice(unsafe {
                std::slice::from_raw_parts(base.add(r * stride), row_bytes)
            });
        }
        std::borrow::Cow::Owned(v)
    }

    /// The f32 rows (`ne[1]` rows of `ne[0]`) of batch `(i2, i3)`, honouring arbitrary strides.
    ///
    /// # Safety
    /// The tensor is F32, allocated, and `(i2, i3)` is in range.
    pub unsafe fn f32_rows(&self, i2: usize, i3: usize) -> RowsF32<'a> {
        let (k, m) = (self.t.ne[0] as usize, self.t.ne[1] as usize);
        let nb = self.t.nb;
        // SAFETY: offsets computed from ggml's strides stay inside the tensor's allocation.
        let base = unsafe { self.t.data.cast::<u8>().add(i2 * nb[2] + i3 * nb[3]) };
        if m == 0 || k == 0 {
            return RowsF32::Gathered {
                x: Vec::new(),
                stride: k,
            };
        }
        if nb[0] == 4 && nb[1].is_multiple_of(4) && (base as usize).is_multiple_of(4) {
            let stride = nb[1] / 4;
            // SAFETY: m rows of k f32 at `stride` elements apart lie in the tensor (rows may overlap
            // for views, which is fine for a shared borrow).
            let x = unsafe { std::slice::from_raw_parts(base.cast::<f32>(), (m - 1) * stride + k) };
            return RowsF32::Borrowed { x, stride };
        }
        let mut x = Vec::with_capacity(m * k);
        for r in 0..m {
            for c in 0..k {
                // SAFETY: element (c, r) of this batch, by ggml's strides; unaligned read tolerated.
                x.push(unsafe {
                    base.add(r * nb[1] + c * nb[0])
                        .cast::<f32>()
                        .read_unaligned()
                });
            }
        }
        RowsF32::Gathered { x, stride: k }
    }

    /// Batch `(i2, i3)` of this F32 tensor as one mutable slice of `ne[1]` rows `stride` f32 apart,
    /// when its rows are contiguous, aligned and do not overlap; None otherwise.
    ///
    /// # Safety
    /// The tensor is F32, allocated in host memory, `(i2, i3)` in range, and nothing else reads or
    /// writes that memory while the slice lives.
    pub unsafe fn f32_rows_mut(&self, i2: usize, i3: usize) -> Option<(&'a mut [f32], usize)> {
        let (n, m) = (self.t.ne[0] as usize, self.t.ne[1] as usize);
        let nb = self.t.nb;
        // SAFETY: offsets computed from ggml's strides stay inside the tensor's allocation.
        let base = unsafe { self.t.data.cast::<u8>().add(i2 * nb[2] + i3 * nb[3]) };
        if m == 0
            || n == 0
            || nb[0] != 4
            || !nb[1].is_multiple_of(4)
            || nb[1] / 4 < n
            || !(base as usize).is_multiple_of(4)
        {
            return None;
        }
        let stride = nb[1] / 4;
        // SAFETY: m rows of n f32, `stride` >= n apart (no overlap), inside the allocation; exclusive
        // per the caller's contract.
        let out =
            unsafe { std::slice::from_raw_parts_mut(base.cast::<f32>(), (m - 1) * stride + n) };
        Some((out, stride))
    }

    /// Writes `m` rows of `n` f32 (row stride `stride`) into batch `(i2, i3)` of this F32 tensor.
    ///
    /// # Safety
    /// The tensor is F32 `[n, m, ..]`, allocated, `(i2, i3)` in range, and no one else reads or writes
    /// this batch concurrently.
    pub unsafe fn write_f32_rows(&self, i2: usize, i3: usize, src: &[f32], stride: usize) {
        let (n, m) = (self.t.ne[0] as usize, self.t.ne[1] as usize);
        let nb = self.t.nb;
        // SAFETY: see the function contract.
        let base = unsafe { self.t.data.cast::<u8>().add(i2 * nb[2] + i3 * nb[3]) };
        for r in 0..m {
            let row = &src[r * stride..r * stride + n];
            if nb[0] == 4 {
                // SAFETY: row r holds n contiguous f32 in the destination.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr().cast::<u8>(),
                        base.add(r * nb[1]),
                        n * 4,
                    )
                };
            } else {
                for (c, v) in row.iter().enumerate() {
                    // SAFETY: element (c, r) of the batch.
                    unsafe {
                        base.add(r * nb[1] + c * nb[0])
                            .cast::<f32>()
                            .write_unaligned(*v)
                    };
                }
            }
        }
    }
}
