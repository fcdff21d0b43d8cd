//! IOSurface-backed program arrays: one-component pixel buffers (`OneComponent8` for int8, OS 26+;
//! `OneComponent16Half` for fp16) wrapped as `MLMultiArray`s, so CoreML and the Neural Engine read and
//! write our memory without copies of their own.

use std::ptr::NonNull;

use objc2::rc::Retained;
use objc2::{AnyThread, msg_send};
use objc2_core_foundation::{CFDictionary, CFNumber, CFRetained, CFString, CFType};
use objc2_core_ml::{MLMultiArray, MLMultiArrayDataType};
use objc2_core_video::{
    CVPixelBuffer, CVPixelBufferCreate, CVPixelBufferGetBaseAddress, CVPixelBufferGetBytesPerRow,
    CVPixelBufferGetHeight, CVPixelBufferGetIOSurface, CVPixelBufferGetPixelFormatType,
    CVPixelBufferGetWidth, CVPixelBufferLockBaseAddress, CVPixelBufferLockFlags,
    CVPixelBufferUnlockBaseAddress, kCVPixelBufferBytesPerRowAlignmentKey,
    kCVPixelBufferIOSurfacePropertiesKey, kCVPixelFormatType_OneComponent8,
    kCVPixelFormatType_OneComponent16Half, kCVReturnSuccess,
};
use objc2_foundation::{NSArray, NSNumber};

use ggml_coreml_program::{DType, TensorSpec};

use super::layout;

/// Row alignment asked of every pixel buffer (`kCVPixelBufferBytesPerRowAlignmentKey`): 64 bytes, what
/// the Neural Engine's DMA wants for strided inputs (CoreML copies a buffer whose rows are not aligned).
pub(super) const ROW_ALIGNMENT: i32 = 64;

/// One program tensor in a pixel buffer.
pub(super) struct Surface {
    buf: CFRetained<CVPixelBuffer>,
    pub spec: TensorSpec,
    height: usize,
    width: usize,
}

// SAFETY: a pixel buffer is a reference-counted CoreVideo object with no thread affinity; a Surface is
// used by one thread at a time (it lives in an I/O set taken from a pool under a mutex).
unsafe impl Send for Surface {}

impl Surface {
    /// A zeroed, IOSurface-backed buffer for `spec` (`width` = last dimension, `height` = the rest).
    pub fn new(spec: &TensorSpec) -> Result<Surface, String> {
        let (height, width) = layout::pixel_plane(&spec.shape)?;
        let format = match spec.dtype {
            DType::Int8 => kCVPixelFormatType_OneComponent8,
            DType::Float16 => kCVPixelFormatType_OneComponent16Half,
            other => return Err(format!("{}: no pixel format for {other}", spec.name)),
        };
        // SAFETY: reading immutable CFString constants exported by CoreVideo.
        let (key, align_key): (&CFString, &CFString) = unsafe {
            (
                kCVPixelBufferIOSurfacePropertiesKey,
                kCVPixelBufferBytesPerRowAlignmentKey,
            )
        };
        // An empty IOSurface properties dictionary asks for an IOSurface-backed buffer.
        let props = CFDictionary::<CFString, CFType>::empty();
        let align = CFNumber::new_i32(ROW_ALIGNMENT);
        let attrs = CFDictionary::<CFString, CFType>::from_slices(
            &[key, align_key],
            &[props.as_ref(), align.as_ref()],
        );
        let mut raw: *mut CVPixelBuffer = std::ptr::null_mut();
        // SAFETY: default allocator, valid attributes dictionary, `raw` receives a +1 buffer.
        let rc = unsafe {
            CVPixelBufferCreate(
                None,
                width,
                height,
                format,
                Some(attrs.as_opaque()),
                NonNull::from(&mut raw),
            )
        };
        let Some(raw) = NonNull::new(raw).filter(|_| rc == kCVReturnSuccess) else {
            return Err(format!(
                "{}: CVPixelBufferCreate({width}×{height}) failed: {rc}",
                spec.name
            ));
        };
        // SAFETY: CVPixelBufferCreate follows the Create rule: we own this reference.
        let buf = unsafe { CFRetained::from_raw(raw) };
        if CVPixelBufferGetIOSurface(Some(&buf)).is_none() {
            return Err(format!(
                "{}: pixel buffer is not IOSurface-backed",
                spec.name
            ));
        }
        if CVPixelBufferGetWidth(&buf) != width
            || CVPixelBufferGetHeight(&buf) != height
            || CVPixelBufferGetPixelFormatType(&buf) != format
        {
            return Err(format!(
                "{}: pixel buffer geometry differs from {width}×{height}",
                spec.name
            ));
        }
        let s = Surface {
            buf,
            spec: spec.clone(),
            height,
            width,
        };
        s.with_bytes(false, |bytes, _| bytes.fill(0))?;
        Ok(s)
    }

    /// Bytes of the buffer's plane (row pitch × rows), for the surface budget.
    pub fn bytes(&self) -> u64 {
        (CVPixelBufferGetBytesPerRow(&self.buf) * self.height) as u64
    }

    /// Bytes of one packed row.
    fn row_bytes(&self) -> usize {
        self.width * self.spec.dtype.size()
    }

    /// Runs `f` on the locked buffer memory and its row pitch.
    fn with_bytes<R>(
        &self,
        read_only: bool,
        f: impl FnOnce(&mut [u8], usize) -> R,
    ) -> Result<R, String> {
        let flags = if read_only {
            CVPixelBufferLockFlags::ReadOnly
        } else {
            CVPixelBufferLockFlags::empty()
        };
        // SAFETY: a live buffer; unlocked below with the same flags.
        let rc = unsafe { CVPixelBufferLockBaseAddress(&self.buf, flags) };
        if rc != kCVReturnSuccess {
            return Err(format!("{}: lock failed: {rc}", self.spec.name));
        }
        let base = CVPixelBufferGetBaseAddress(&self.buf).cast::<u8>();
        let pitch = CVPixelBufferGetBytesPerRow(&self.buf);
        // The plane is `bytesPerRow × height` bytes from the base address; CVPixelBufferGetDataSize
        // may count more (planes, extended pixels) or, for some formats, less than that.
        let size = pitch.checked_mul(self.height);
        let r = match size {
            Some(size) if !base.is_null() && pitch >= self.row_bytes() => {
                // SAFETY: the buffer is locked, so the plane `base..base + bytesPerRow × height` is
                // mapped for the CPU; this Surface is used by one thread at a time and CoreML does not
                // touch it outside a prediction, so the slice is not aliased. A read-only lock is only
                // used with `f`s that read.
                let bytes = unsafe { std::slice::from_raw_parts_mut(base, size) };
                Ok(f(bytes, pitch))
            }
            _ => Err(format!(
                "{}: locked buffer base {base:?}, pitch {pitch} (row {} bytes), height {}",
                self.spec.name,
                self.row_bytes(),
                self.height
            )),
        };
        // SAFETY: matches the lock above.
        unsafe { CVPixelBufferUnlockBaseAddress(&self.buf, flags) };
        r
    }

    /// Copies packed row-major data (`rows × cols` elements as bytes) in.
    pub fn write(&self, src: &[u8]) -> Result<(), String> {
        let (rows, row_bytes) = (self.height, self.row_bytes());
        self.with_bytes(false, |bytes, pitch| {
            layout::pack_rows(src, rows, row_bytes, bytes, pitch)
        })?
        .map_err(|e| format!("{}: {e}", self.spec.name))
    }

    /// Copies the contents out as packed row-major bytes.
    pub fn read(&self, dst: &mut [u8]) -> Result<(), String> {
        let (rows, row_bytes) = (self.height, self.row_bytes());
        self.with_bytes(true, |bytes, pitch| {
            layout::unpack_rows(bytes, pitch, rows, row_bytes, dst)
        })?
        .map_err(|e| format!("{}: {e}", self.spec.name))
    }

    /// The `MLMultiArray` view of this buffer with the program's shape.
    pub fn array(&self) -> Result<Retained<MLMultiArray>, String> {
        let dims: Vec<Retained<NSNumber>> = self
            .spec
            .shape
            .iter()
            .map(|&d| NSNumber::new_usize(d))
            .collect();
        let shape = NSArray::from_retained_slice(&dims);
        // Bound through `msg_send!` with an optional result: the generated binding declares a
        // non-null return, but the initializer answers nil when it refuses the buffer (format, shape),
        // and a nil in a non-null `Retained` would be undefined behaviour. Nil becomes an error here.
        // SAFETY: `initWithPixelBuffer:shape:` takes a CVPixelBufferRef and an NSArray<NSNumber*>; it
        // raises when the shape does not fit the buffer — here the last dimension is the width, the
        // product of the others the height, and the one-component format matches the element type
        // (checked in `new`), its documented preconditions.
        let a: Option<Retained<MLMultiArray>> = unsafe {
            msg_send![MLMultiArray::alloc(), initWithPixelBuffer: &*self.buf, shape: &*shape]
        };
        let a = a.ok_or_else(|| {
            format!(
                "{}: MLMultiArray initWithPixelBuffer:shape: returned nil ({}×{} {})",
                self.spec.name, self.height, self.width, self.spec.dtype
            )
        })?;
        let want = match self.spec.dtype {
            DType::Int8 => MLMultiArrayDataType::Int8,
            _ => MLMultiArrayDataType::Float16,
        };
        // SAFETY: a getter on a live array.
        let got = unsafe { a.dataType() };
        if got != want {
            return Err(format!(
                "{}: pixel-buffer array has data type {:#x}, want {:#x}",
                self.spec.name, got.0, want.0
            ));
        }
        Ok(a)
    }
}

/// Views typed slices as bytes for the copies (int8 and fp16 have no padding and no invalid bytes).
pub(super) fn i8_bytes(v: &[i8]) -> &[u8] {
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) }
}

pub(super) fn f16_bytes(v: &[half::f16]) -> &[u8] {
    // SAFETY: f16 is a transparent u16: two initialised bytes each, no padding; u8 needs no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(super) fn f16_bytes_mut(v: &mut [half::f16]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f16, so any bytes written leave valid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}
