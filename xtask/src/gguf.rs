//! Minimal GGUF header reader: architecture, tensor types and a truncation check, so the
//! models manifest can say what each file holds without Python.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

pub struct GgufInfo {
    pub arch: Option<String>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
    pub file_size: u64,
}

// Bounds that no real model reaches; they turn a corrupt header into an error, not an OOM.
const MAX_STRING: u64 = 1 << 24;
const MAX_COUNT: u64 = 1 << 32;

struct Reader<R> {
    inner: R,
}

impl<R: Read + Seek> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .context("unexpected end of GGUF header")?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        ensure!(
            len <= MAX_STRING,
            "GGUF string of {len} bytes is implausible"
        );
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .context("unexpected end of GGUF string")?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        let n = i64::try_from(n).context("GGUF skip too large")?;
        self.inner.seek_relative(n)?;
        Ok(())
    }
    /// Skips one value of GGUF type `ty` (arrays recursively).
    fn skip_value(&mut self, ty: u32) -> Result<()> {
        match ty {
            8 => {
                let len = self.u64()?;
                ensure!(
                    len <= MAX_STRING,
                    "GGUF string of {len} bytes is implausible"
                );
                self.skip(len)
            }
            9 => {
                let elem = self.u32()?;
                let count = self.u64()?;
                ensure!(
                    count <= MAX_COUNT,
                    "GGUF array of {count} items is implausible"
                );
                match scalar_size(elem) {
                    Some(size) => self.skip(size * count),
                    None => (0..count).try_for_each(|_| self.skip_value(elem)),
                }
            }
            _ => match scalar_size(ty) {
                Some(size) => self.skip(size),
                None => bail!("unknown GGUF value type {ty}"),
            },
        }
    }
}

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Reads the header and tensor table of a GGUF file.
pub fn read_info(path: &Path) -> Result<GgufInfo> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_size = file.metadata()?.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 16, file),
    };
    let inner = || format!("{}: not a valid GGUF file", path.display());
    let magic: [u8; 4] = r.bytes().with_context(inner)?;
    ensure!(&magic == b"GGUF", "{}: bad magic {magic:?}", path.display());
    let version = r.u32().with_context(inner)?;
    ensure!(
        (2..=3).contains(&version),
        "{}: unsupported GGUF version {version}",
        path.display()
    );
    let n_tensors = r.u64().with_context(inner)?;
    let n_kv = r.u64().with_context(inner)?;
    ensure!(
        n_tensors <= 1 << 20 && n_kv <= 1 << 20,
        "{}: implausible counts",
        path.display()
    );
    let mut arch = None;
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string().with_context(inner)?;
        let ty = r.u32().with_context(inner)?;
        match (key.as_str(), ty) {
            ("general.architecture", 8) => arch = Some(r.string().with_context(inner)?),
            ("general.alignment", 4) => alignment = u64::from(r.u32().with_context(inner)?),
            _ => r
                .skip_value(ty)
                .with_context(|| format!("{}: key {key}", inner()))?,
        }
    }
    ensure!(
        alignment > 0 && alignment.is_power_of_two(),
        "{}: bad alignment {alignment}",
        path.display()
    );
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string().with_context(inner)?;
        let n_dims = r.u32().with_context(inner)?;
        ensure!(
            n_dims <= 4,
            "{}: tensor {name} has {n_dims} dims",
            path.display()
        );
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let ggml_type = r.u32().with_context(inner)?;
        let offset = r.u64().with_context(inner)?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let pos = r.inner.stream_position()?;
    let data_offset = pos.div_ceil(alignment) * alignment;
    let info = GgufInfo {
        arch,
        tensors,
        data_offset,
        file_size,
    };
    info.check_extent()
        .with_context(|| path.display().to_string())?;
    Ok(info)
}

impl GgufInfo {
    /// Tensor count per ggml type name, e.g. `{"F32": 61, "Q8_0": 211}`.
    pub fn type_histogram(&self) -> BTreeMap<String, usize> {
        let mut hist = BTreeMap::new();
        for t in &self.tensors {
            *hist.entry(type_name(t.ggml_type)).or_insert(0) += 1;
        }
        hist
    }

    /// Fails if a tensor of a known type would extend past the end of the file (truncated copy).
    fn check_extent(&self) -> Result<()> {
        for t in &self.tensors {
            let Some((block, bytes)) = type_layout(t.ggml_type) else {
                continue;
            };
            let elems = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .context("tensor size overflows")?;
            let end = self
                .data_offset
                .checked_add(t.offset)
                .and_then(|o| o.checked_add(elems.div_ceil(block) * bytes))
                .context("tensor offset overflows")?;
            ensure!(
                end <= self.file_size,
                "tensor {} ends at byte {end} but the file has {} bytes (truncated?)",
                t.name,
                self.file_size
            );
        }
        Ok(())
    }
}

/// ggml type name by id (ggml.h `enum ggml_type`).
pub fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("type{t}"),
    };
    name.to_string()
}

/// (elements per block, bytes per block) for the common types.
fn type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        24 => (1, 1),
        25 => (1, 2),
        26 => (1, 4),
        27 | 28 => (1, 8),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn push_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    /// A hand-built GGUF: one string key, one string array, one Q8_0 tensor of 64 values.
    fn tiny_gguf(truncate: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        push_str(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        push_str(&mut b, "qwen3");
        push_str(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        push_str(&mut b, "a");
        push_str(&mut b, "bc");
        push_str(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, 2 * 34 - truncate));
        b
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn reads_types_and_arch() {
        let f = write(&tiny_gguf(0));
        let info = read_info(f.path()).unwrap();
        assert_eq!(info.arch.as_deref(), Some("qwen3"));
        assert_eq!(info.type_histogram().get("Q8_0"), Some(&1));
        assert_eq!(info.tensors[0].dims, vec![32, 2]);
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let f = write(&tiny_gguf(1));
        assert!(read_info(f.path()).is_err());
        let g = write(b"GGUF\x03\x00\x00\x00garbage");
        assert!(read_info(g.path()).is_err());
        let h = write(b"not a gguf at all");
        assert!(read_info(h.path()).is_err());
    }
}
