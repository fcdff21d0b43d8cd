//! MIL blob storage v2 (`weights/weight.bin`): the file CoreML reads `BlobFileValue` consts from.
//!
//! Layout (little-endian, every record 64-byte aligned):
//! - storage header, 64 B: `u32 count, u32 version = 2, u64 reserved[7] = 0`;
//! - per blob: metadata, 64 B: `u32 sentinel = 0xDEADBEEF, u32 mil_dtype, u64 size_in_bytes,
//!   u64 data_offset (absolute), u64 padding_size_in_bits, u64 reserved[4] = 0`, then the data,
//!   then zero padding to the next multiple of 64.
//!
//! A `BlobFileValue.offset` points at the blob's metadata record, not at its data.

use crate::error::ProgramError;

const ALIGN: usize = 64;
const HEADER: usize = 64;
const METADATA: usize = 64;
const VERSION: u32 = 2;
const SENTINEL: u32 = 0xDEAD_BEEF;

/// Element types of blob storage (`BlobDataType` numbering of the MIL blob format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BlobDType {
    Float16 = 1,
    Float32 = 2,
    UInt8 = 3,
    Int8 = 4,
    BFloat16 = 5,
    Int16 = 6,
    UInt16 = 7,
    Int32 = 14,
    UInt32 = 15,
}

impl BlobDType {
    pub fn from_code(code: u32) -> Option<BlobDType> {
        Some(match code {
            1 => BlobDType::Float16,
            2 => BlobDType::Float32,
            3 => BlobDType::UInt8,
            4 => BlobDType::Int8,
            5 => BlobDType::BFloat16,
            6 => BlobDType::Int16,
            7 => BlobDType::UInt16,
            14 => BlobDType::Int32,
            15 => BlobDType::UInt32,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            BlobDType::UInt8 | BlobDType::Int8 => 1,
            BlobDType::Float16 | BlobDType::BFloat16 | BlobDType::Int16 | BlobDType::UInt16 => 2,
            BlobDType::Float32 | BlobDType::Int32 | BlobDType::UInt32 => 4,
        }
    }

    /// Name used by the validation sidecar (`tools/validate_mlpackage.py`).
    pub fn name(self) -> &'static str {
        match self {
            BlobDType::Float16 => "fp16",
            BlobDType::Float32 => "fp32",
            BlobDType::UInt8 => "uint8",
            BlobDType::Int8 => "int8",
            BlobDType::BFloat16 => "bf16",
            BlobDType::Int16 => "int16",
            BlobDType::UInt16 => "uint16",
            BlobDType::Int32 => "int32",
            BlobDType::UInt32 => "uint32",
        }
    }
}

/// Where one blob landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    /// Offset of the metadata record: the value a `BlobFileValue.offset` carries.
    pub offset: u64,
    pub dtype: BlobDType,
    /// Offset of the data itself.
    pub data_offset: u64,
    pub size: u64,
}

/// Builds a `weight.bin` in memory.
#[derive(Clone, Debug)]
pub struct BlobWriter {
    buf: Vec<u8>,
    entries: Vec<BlobEntry>,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    pub fn new() -> BlobWriter {
        let mut buf = vec![0u8; HEADER];
        buf[4..8].copy_from_slice(&VERSION.to_le_bytes());
        BlobWriter {
            buf,
            entries: Vec::new(),
        }
    }

    /// Appends one blob of raw little-endian element bytes; returns its metadata offset.
    pub fn add(&mut self, dtype: BlobDType, data: &[u8]) -> Result<u64, ProgramError> {
        if !data.len().is_multiple_of(dtype.size()) {
            return Err(ProgramError::Blob(format!(
                "{} bytes is not a whole number of {} elements",
                data.len(),
                dtype.name()
            )));
        }
        let offset = self.buf.len();
        debug_assert_eq!(offset % ALIGN, 0);
        let data_offset = offset + METADATA;
        let mut meta = [0u8; METADATA];
        meta[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        meta[4..8].copy_from_slice(&(dtype as u32).to_le_bytes());
        meta[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        meta[16..24].copy_from_slice(&(data_offset as u64).to_le_bytes());
        // padding_size_in_bits (sub-byte types only) and reserved stay zero.
        self.buf.extend_from_slice(&meta);
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().next_multiple_of(ALIGN), 0);
        let entry = BlobEntry {
            offset: offset as u64,
            dtype,
            data_offset: data_offset as u64,
            size: data.len() as u64,
        };
        self.entries.push(entry);
        let count = u32::try_from(self.entries.len())
            .map_err(|_| ProgramError::Blob("too many blobs".into()))?;
        self.buf[0..4].copy_from_slice(&count.to_le_bytes());
        Ok(entry.offset)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[BlobEntry] {
        &self.entries
    }

    /// The finished file.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads blobs back from a `weight.bin`, with the same checks CoreML's reader makes.
#[derive(Clone, Copy, Debug)]
pub struct BlobReader<'a> {
    bytes: &'a [u8],
    count: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<'a> BlobReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<BlobReader<'a>, ProgramError> {
        if bytes.len() < HEADER {
            return Err(ProgramError::Blob(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        let version = u32_at(bytes, 4);
        if version != VERSION {
            return Err(ProgramError::Blob(format!(
                "storage version {version}, want {VERSION}"
            )));
        }
        Ok(BlobReader {
            bytes,
            count: u32_at(bytes, 0),
        })
    }

    /// Number of blobs the header declares.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The blob whose metadata record is at `offset`.
    pub fn read(&self, offset: u64) -> Result<(BlobDType, &'a [u8]), ProgramError> {
        let bad = |why: String| {
            Err(ProgramError::Blob(format!(
                "blob at offset {offset}: {why}"
            )))
        };
        let Ok(at) = usize::try_from(offset) else {
            return bad("offset out of range".into());
        };
        if at < HEADER || at % ALIGN != 0 {
            return bad("offset is not a 64-byte aligned record position".into());
        }
        if at
            .checked_add(METADATA)
            .is_none_or(|end| end > self.bytes.len())
        {
            return bad("metadata runs past the end of the file".into());
        }
        if u32_at(self.bytes, at) != SENTINEL {
            return bad("invalid sentinel in blob metadata".into());
        }
        let code = u32_at(self.bytes, at + 4);
        let Some(dtype) = BlobDType::from_code(code) else {
            return bad(format!("unknown data type {code}"));
        };
        let size = u64_at(self.bytes, at + 8);
        let data = u64_at(self.bytes, at + 16);
        let (Ok(size), Ok(data)) = (usize::try_from(size), usize::try_from(data)) else {
            return bad("size or data offset out of range".into());
        };
        if data % ALIGN != 0 || data < at + METADATA {
            return bad(format!("data offset {data} is misplaced"));
        }
        if data
            .checked_add(size)
            .is_none_or(|end| end > self.bytes.len())
        {
            return bad(format!("{size} data bytes run past the end of the file"));
        }
        if size % dtype.size() != 0 {
            return bad(format!(
                "{size} bytes is not a whole number of {} elements",
                dtype.name()
            ));
        }
        Ok((dtype, &self.bytes[data..data + size]))
    }

    /// Every blob in file order, following the records from the header.
    pub fn entries(&self) -> Result<Vec<BlobEntry>, ProgramError> {
        let mut out = Vec::with_capacity(self.count as usize);
        let mut at = HEADER as u64;
        for _ in 0..self.count {
            let (dtype, data) = self.read(at)?;
            let data_offset = u64_at(self.bytes, at as usize + 16);
            out.push(BlobEntry {
                offset: at,
                dtype,
                data_offset,
                size: data.len() as u64,
            });
            at = (data_offset + data.len() as u64).next_multiple_of(ALIGN as u64);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_format() {
        let mut w = BlobWriter::new();
        let a: Vec<u8> = (0..100u8).collect();
        let off_a = w.add(BlobDType::Int8, &a).unwrap();
        let b: Vec<u8> = half::f16::from_f32(0.5).to_le_bytes().repeat(3).to_vec();
        let off_b = w.add(BlobDType::Float16, &b).unwrap();
        let file = w.finish();
        assert_eq!(off_a, 64);
        // 64 header + 64 metadata + 100 data padded to 128 -> next record at 256.
        assert_eq!(off_b, 256);
        assert_eq!(file.len() % 64, 0);
        assert_eq!(&file[0..8], &[2, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&file[64..68], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(u32_at(&file, 68), 4);
        assert_eq!(u64_at(&file, 72), 100);
        assert_eq!(u64_at(&file, 80), 128);
        assert!(
            file[88..128].iter().all(|&x| x == 0),
            "padding bits and reserved are zero"
        );

        let r = BlobReader::new(&file).unwrap();
        assert_eq!(r.count(), 2);
        assert_eq!(r.read(off_a).unwrap(), (BlobDType::Int8, &a[..]));
        assert_eq!(r.read(off_b).unwrap(), (BlobDType::Float16, &b[..]));
        let e = r.entries().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].offset, off_b);
        assert_eq!(e[1].size, 6);
    }

    #[test]
    fn reader_rejects_bad_files() {
        assert!(BlobReader::new(&[0u8; 10]).is_err());
        let mut w = BlobWriter::new();
        w.add(BlobDType::Int8, &[1, 2, 3]).unwrap();
        let mut file = w.finish();
        let r = BlobReader::new(&file).unwrap();
        assert!(r.read(0).is_err());
        assert!(r.read(65).is_err());
        assert!(r.read(1 << 40).is_err());
        assert!(r.read(u64::MAX).is_err());
        file[64] = 0;
        assert!(
            BlobReader::new(&file).unwrap().read(64).is_err(),
            "sentinel"
        );
        file[4] = 1;
        assert!(BlobReader::new(&file).is_err(), "version");
        let mut w = BlobWriter::new();
        assert!(
            w.add(BlobDType::Float16, &[1, 2, 3]).is_err(),
            "odd fp16 byte count"
        );
        let mut w = BlobWriter::new();
        w.add(BlobDType::Int8, &[1; 8]).unwrap();
        let mut file = w.finish();
        file[72] = 200; // size beyond the file
        assert!(BlobReader::new(&file).unwrap().read(64).is_err());
    }

    #[test]
    fn empty_storage_is_a_header() {
        let file = BlobWriter::new().finish();
        assert_eq!(file.len(), 64);
        assert_eq!(BlobReader::new(&file).unwrap().entries().unwrap(), vec![]);
    }
}
