//! IOSurface-backed program arrays: one-component pixel buffers (`OneComponent8` for int8, OS 26+;
//! `OneComponent16Half` for fp16) wrapped as `MLMultiArray`s, so CoreML and the Neural Engine read and
//! write our memory without copies of their own.

use std::ptr::NonNull;

use objc2::AnyThread;
use objc2::rc::Retained;
use objc2_core_foundation::{CFDictionary, CFRetained, CFString, CFType};
use objc2_core_ml::{MLMultiArray, MLMultiArrayDataType};
use objc2_core_video::{
    CVPixelBuffer, CVPixelBufferCreate, CVPixelBufferGetBaseAddress, CVPixelBufferGetBytesPerRow,
    CVPixelBufferGetDataSize, CVPixelBufferGetHeight, CVPixelBufferGetIOSurface,
    CVPixelBufferGetPixelFormatType, CVPixelBufferGetWidth, CVPixelBufferLockBaseAddress,
    CVPixelBufferLockFlags, CVPixelBufferUnlockBaseAddress, kCVPixelBufferIOSurfacePropertiesKey,
    kCVPixelFormatType_OneComponent8, kCVPixelFormatType_OneComponent16Half, kCVReturnSuccess,
};
use objc2_foundation::{NSArray, NSNumber};

use ggml_coreml_program::{DType, TensorSpec};

use super::layout;

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
        // SAFETY: reading an immutable CFString constant exported by CoreVideo.
        let key: &CFString = unsafe { kCVPixelBufferIOSurfacePropertiesKey };
        // An empty IOSurface properties dictionary asks for an IOSurface-backed buffer.
        let props = CFDictionary::<CFString, CFType>::empty();
        let attrs = CFDictionary::<CFString, CFType>::from_slices(&[key], &[props.as_ref()]);
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
        let size = CVPixelBufferGetDataSize(&self.buf);
        let r = if base.is_null()
            || pitch < self.row_bytes()
            || size < pitch * (self.height - 1) + self.row_bytes()
        {
            Err(format!(
                "{}: locked buffer base {base:?}, pitch {pitch}, size {size}",
                self.spec.name
            ))
        } else {
            // SAFETY: the buffer is locked, so `base..base+size` is mapped for the CPU; this Surface is
            // used by one thread at a time and CoreML does not touch it outside a prediction, so the
            // slice is not aliased. A read-only lock is only used with `f`s that read.
            let bytes = unsafe { std::slice::from_raw_parts_mut(base, size) };
            Ok(f(bytes, pitch))
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
        // SAFETY: the initializer raises when the shape does not fit the buffer; here the last dimension
        // is the width, the product of the others the height, and the one-component format matches the
        // element type (checked in `new`), which are its documented preconditions.
        let a = unsafe {
            MLMultiArray::initWithPixelBuffer_shape(MLMultiArray::alloc(), &self.buf, &shape)
        };
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
