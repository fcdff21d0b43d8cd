//! Program arrays in pixel-buffer memory.
//!
//! A program tensor `[1, 1, rows, cols]` lives in a one-component pixel buffer of `width = cols` and
//! `height = rows` (CoreML's rule for `MLMultiArray(pixelBuffer:shape:)`: the last dimension is the
//! width, the product of the others the height). CoreVideo may pad each row (`bytesPerRow` ≥
//! `width × element size`), so every copy goes row by row with the buffer's pitch.

use half::f16;

/// `(height, width)` of the pixel buffer that holds an array of `shape`.
pub fn pixel_plane(shape: &[usize]) -> Result<(usize, usize), String> {
    let (&width, lead) = shape
        .split_last()
        .ok_or("an array needs at least one dimension")?;
    let height = lead
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if width == 0 || height == 0 {
        return Err(format!("shape {shape:?} is empty"));
    }
    Ok((height, width))
}

/// Copies `rows` packed rows of `row_bytes` from `src` into `dst`, whose rows start every `pitch` bytes.
pub fn pack_rows(
    src: &[u8],
    rows: usize,
    row_bytes: usize,
    dst: &mut [u8],
    pitch: usize,
) -> Result<(), String> {
    check_pitched(rows, row_bytes, dst.len(), pitch)?;
    if src.len() != rows * row_bytes {
        return Err(format!(
            "{} source bytes for {rows} rows of {row_bytes}",
            src.len()
        ));
    }
    if pitch == row_bytes {
        dst[..src.len()].copy_from_slice(src);
        return Ok(());
    }
    for (r, row) in src.chunks_exact(row_bytes).enumerate() {
        dst[r * pitch..r * pitch + row_bytes].copy_from_slice(row);
    }
    Ok(())
}

/// Copies `rows` rows of `row_bytes` from `src` (rows every `pitch` bytes) into packed `dst`.
pub fn unpack_rows(
    src: &[u8],
    pitch: usize,
    rows: usize,
    row_bytes: usize,
    dst: &mut [u8],
) -> Result<(), String> {
    check_pitched(rows, row_bytes, src.len(), pitch)?;
    if dst.len() != rows * row_bytes {
        return Err(format!(
            "{} destination bytes for {rows} rows of {row_bytes}",
            dst.len()
        ));
    }
    if pitch == row_bytes {
        dst.copy_from_slice(&src[..dst.len()]);
        return Ok(());
    }
    for (r, row) in dst.chunks_exact_mut(row_bytes).enumerate() {
        row.copy_from_slice(&src[r * pitch..r * pitch + row_bytes]);
    }
    Ok(())
}

fn check_pitched(rows: usize, row_bytes: usize, len: usize, pitch: usize) -> Result<(), String> {
    if pitch < row_bytes {
        return Err(format!("row pitch {pitch} below the row size {row_bytes}"));
    }
    // The last row needs only its own bytes, not a whole pitch.
    let need = match rows {
        0 => Some(0),
        r => (r - 1)
            .checked_mul(pitch)
            .and_then(|v| v.checked_add(row_bytes)),
    }
    .ok_or("pitched size overflows")?;
    if len < need {
        return Err(format!(
            "buffer of {len} bytes holds fewer than {rows} rows at pitch {pitch}"
        ));
    }
    Ok(())
}

/// Element type of an array CoreML hands back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutElem {
    F16,
    F32,
}

impl OutElem {
    pub fn size(self) -> usize {
        match self {
            OutElem::F16 => 2,
            OutElem::F32 => 4,
        }
    }
}

/// Reads a `[rows, cols]` view of a strided array (strides in elements, native byte order) into packed
/// fp16 — for outputs CoreML returned in its own array instead of our backing.
pub fn gather_f16(
    src: &[u8],
    elem: OutElem,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    dst: &mut [f16],
) -> Result<(), String> {
    if dst.len() != rows * cols {
        return Err(format!(
            "{} destination elements for {rows}×{cols}",
            dst.len()
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|a| {
            (cols - 1)
                .checked_mul(col_stride)
                .and_then(|b| a.checked_add(b))
        })
        .ok_or("strides overflow")?;
    let size = elem.size();
    if (last + 1)
        .checked_mul(size)
        .is_none_or(|need| need > src.len())
    {
        return Err(format!(
            "array of {} bytes is smaller than {rows}×{cols} at strides ({row_stride}, {col_stride})",
            src.len()
        ));
    }
    for r in 0..rows {
        for c in 0..cols {
            let at = (r * row_stride + c * col_stride) * size;
            let b = &src[at..at + size];
            dst[r * cols + c] = match elem {
                OutElem::F16 => f16::from_bits(u16::from_ne_bytes([b[0], b[1]])),
                OutElem::F32 => f16::from_f32(f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plane_of_program_shapes() {
        assert_eq!(pixel_plane(&[1, 1, 96, 256]), Ok((96, 256)));
        assert_eq!(pixel_plane(&[4096]), Ok((1, 4096)));
        assert!(pixel_plane(&[]).is_err());
        assert!(pixel_plane(&[1, 0, 4]).is_err());
        assert!(pixel_plane(&[usize::MAX, 2, 1]).is_err());
    }

    #[test]
    fn pitched_round_trip() {
        let (rows, row_bytes, pitch) = (5, 6, 16);
        let src: Vec<u8> = (0..(rows * row_bytes) as u8).collect();
        // The last row needs no padding after it.
        let mut buf = vec![0xAAu8; (rows - 1) * pitch + row_bytes];
        pack_rows(&src, rows, row_bytes, &mut buf, pitch).unwrap();
        assert_eq!(
            &buf[pitch..pitch + row_bytes],
            &src[row_bytes..2 * row_bytes]
        );
        assert_eq!(buf[row_bytes], 0xAA, "padding untouched");
        let mut back = vec![0u8; rows * row_bytes];
        unpack_rows(&buf, pitch, rows, row_bytes, &mut back).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn tight_rows_are_one_copy() {
        let src = [1u8, 2, 3, 4, 5, 6];
        let mut buf = [0u8; 6];
        pack_rows(&src, 3, 2, &mut buf, 2).unwrap();
        assert_eq!(buf, src);
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let mut buf = [0u8; 10];
        assert!(
            pack_rows(&[0; 8], 2, 4, &mut buf, 3).is_err(),
            "pitch below row"
        );
        assert!(
            pack_rows(&[0; 8], 2, 4, &mut buf, 8).is_err(),
            "buffer too small"
        );
        assert!(
            pack_rows(&[0; 7], 2, 4, &mut buf, 4).is_err(),
            "source length"
        );
        let mut out = [0u8; 8];
        assert!(unpack_rows(&buf, 8, 2, 4, &mut out).is_err());
        assert!(unpack_rows(&buf, 4, 2, 4, &mut out[..7]).is_err());
    }

    #[test]
    fn gather_strided_f16_and_f32() {
        // A 2×3 fp16 array with rows padded to 4 elements.
        let vals = [1.0f32, 2.0, 3.0, 9.0, 4.0, 5.0, 6.0, 9.0];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_ne_bytes())
            .collect();
        let mut out = [f16::ZERO; 6];
        gather_f16(&bytes, OutElem::F16, 2, 3, 4, 1, &mut out).unwrap();
        assert_eq!(out.map(f16::to_f32), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let bytes32: Vec<u8> = vals.iter().flat_map(|v| v.to_ne_bytes()).collect();
        gather_f16(&bytes32, OutElem::F32, 2, 3, 4, 1, &mut out).unwrap();
        assert_eq!(out.map(f16::to_f32), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Transposed view (column-major strides).
        let mut t = [f16::ZERO; 6];
        gather_f16(&bytes, OutElem::F16, 3, 2, 1, 4, &mut t).unwrap();
        assert_eq!(t.map(f16::to_f32), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert!(gather_f16(&bytes[..12], OutElem::F16, 2, 3, 4, 1, &mut out).is_err());
        assert!(gather_f16(&bytes, OutElem::F16, 2, 3, usize::MAX, 1, &mut out).is_err());
    }
}
