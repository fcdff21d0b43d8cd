//! The on-disk entry format: a fixed header, the key, a note and the payload, all under one SHA-256.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "GGCMLENT"
//!      8     4  entry format version (u32 LE) = ENTRY_FORMAT
//!     12     1  kind: 1 = blob, 2 = directory manifest
//!     13     3  reserved, zero
//!     16     4  key length (u32 LE)
//!     20     4  note length (u32 LE)
//!     24     8  payload length (u64 LE)
//!     32    32  SHA-256 of bytes [0, 32) ++ key ++ note ++ payload
//!     64     …  key (UTF-8), note (UTF-8), payload
//! ```
//!
//! The file length must be exactly 64 + key + note + payload: a truncated or extended file is rejected
//! before hashing. A directory entry is a directory holding `MANIFEST` (this format, kind 2, whose payload
//! lists every file of `data/` with its length and SHA-256) and the tree `data/`.

use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"GGCMLENT";
/// Version of this byte layout (not of the programs inside; that is the program format version in the key).
pub const ENTRY_FORMAT: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const MAX_KEY_LEN: usize = 4096;
pub const MAX_NOTE_LEN: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Blob,
    DirManifest,
}

impl EntryKind {
    fn byte(self) -> u8 {
        match self {
            EntryKind::Blob => 1,
            EntryKind::DirManifest => 2,
        }
    }
}

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("entry format {0} (this build reads {ENTRY_FORMAT})")]
    Version(u32),
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("key or note too long ({0} / {1} bytes)")]
    TooLong(usize, usize),
    #[error("length mismatch: header says {expected} bytes, file has {actual}")]
    Length { expected: u64, actual: u64 },
    #[error("checksum mismatch")]
    Checksum,
    #[error("key or note is not UTF-8")]
    Utf8,
    #[error("entry holds key {found:?}, expected {expected:?}")]
    KeyMismatch { expected: String, found: String },
    #[error("bad manifest: {0}")]
    Manifest(String),
}

/// A verified entry borrowing the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedEntry<'a> {
    pub kind: EntryKind,
    pub key: &'a str,
    pub note: &'a str,
    pub payload: &'a [u8],
}

/// Header fields; parsed without the payload (for listings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: EntryKind,
    pub key_len: usize,
    pub note_len: usize,
    pub payload_len: u64,
    pub checksum: [u8; 32],
}

impl Header {
    /// Length of the whole entry this header describes (`None` when it overflows: never a valid file).
    pub fn total_len(&self) -> Option<u64> {
        (HEADER_LEN as u64 + self.key_len as u64 + self.note_len as u64)
            .checked_add(self.payload_len)
    }
}

/// Parses and checks the fixed 64-byte header (no checksum verification: that needs the body).
pub fn parse_header(bytes: &[u8]) -> Result<Header, EntryError> {
    if bytes.len() < HEADER_LEN {
        return Err(EntryError::Short(bytes.len()));
    }
    if bytes[0..8] != MAGIC {
        return Err(EntryError::Magic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != ENTRY_FORMAT {
        return Err(EntryError::Version(version));
    }
    let kind = match bytes[12] {
        1 => EntryKind::Blob,
        2 => EntryKind::DirManifest,
        k => return Err(EntryError::Kind(k)),
    };
    if bytes[13..16] != [0, 0, 0] {
        return Err(EntryError::Reserved);
    }
    let key_len = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    let note_len = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes")) as usize;
    if key_len > MAX_KEY_LEN || note_len > MAX_NOTE_LEN {
        return Err(EntryError::TooLong(key_len, note_len));
    }
    let payload_len = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    let checksum: [u8; 32] = bytes[32..64].try_into().expect("32 bytes");
    Ok(Header {
        kind,
        key_len,
        note_len,
        payload_len,
        checksum,
    })
}

/// Parses a whole entry; accepted only if every length matches and the checksum verifies.
pub fn parse_entry(bytes: &[u8]) -> Result<ParsedEntry<'_>, EntryError> {
    let h = parse_header(bytes)?;
    if h.total_len() != Some(bytes.len() as u64) {
        let expected = h.total_len().unwrap_or(u64::MAX);
        return Err(EntryError::Length {
            expected,
            actual: bytes.len() as u64,
        });
    }
    let mut hasher = Sha256::new();
    hasher.update(&bytes[..32]);
    hasher.update(&bytes[HEADER_LEN..]);
    let sum: [u8; 32] = hasher.finalize().into();
    if sum != h.checksum {
        return Err(EntryError::Checksum);
    }
    let k_end = HEADER_LEN + h.key_len;
    let n_end = k_end + h.note_len;
    let key = std::str::from_utf8(&bytes[HEADER_LEN..k_end]).map_err(|_| EntryError::Utf8)?;
    let note = std::str::from_utf8(&bytes[k_end..n_end]).map_err(|_| EntryError::Utf8)?;
    Ok(ParsedEntry {
        kind: h.kind,
        key,
        note,
        payload: &bytes[n_end..],
    })
}

/// Parses an entry and checks it holds `expected_key`.
pub fn parse_entry_for<'a>(
    bytes: &'a [u8],
    expected_key: &str,
) -> Result<ParsedEntry<'a>, EntryError> {
    let e = parse_entry(bytes)?;
    if e.key != expected_key {
        return Err(EntryError::KeyMismatch {
            expected: expected_key.to_owned(),
            found: e.key.to_owned(),
        });
    }
    Ok(e)
}

/// Encodes an entry. Fails only when the key or note exceed their limits.
pub fn encode_entry(
    kind: EntryKind,
    key: &str,
    note: &str,
    payload: &[u8],
) -> Result<Vec<u8>, EntryError> {
    let mut out = entry_prefix(kind, key, note, payload)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// One line of a directory manifest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ManifestItem {
    /// A directory (relative path), kept so empty directories survive.
    Dir(String),
    /// A regular file: relative path, length, SHA-256.
    File {
        path: String,
        len: u64,
        sha256: [u8; 32],
    },
}

impl ManifestItem {
    pub fn path(&self) -> &str {
        match self {
            ManifestItem::Dir(p) => p,
            ManifestItem::File { path, .. } => path,
        }
    }
}

/// A relative path is safe when it is '/'-separated, not empty, has no `.`/`..`/empty components and no NUL.
pub fn is_safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && !p.contains('\\')
        && !p.contains('\n')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Manifest text: one item per line, sorted by path: `D <path>` or `F <sha256-hex> <len> <path>`.
pub fn encode_manifest(items: &[ManifestItem]) -> Vec<u8> {
    let mut items = items.to_vec();
    items.sort_by(|a, b| a.path().cmp(b.path()));
    let mut s = String::new();
    for it in &items {
        match it {
            ManifestItem::Dir(p) => s.push_str(&format!("D {p}\n")),
            ManifestItem::File { path, len, sha256 } => {
                s.push_str(&format!("F {} {len} {path}\n", hex(sha256)))
            }
        }
    }
    s.into_bytes()
}

pub fn parse_manifest(payload: &[u8]) -> Result<Vec<ManifestItem>, EntryError> {
    let bad = |m: &str| EntryError::Manifest(m.to_owned());
    let text = std::str::from_utf8(payload).map_err(|_| bad("not UTF-8"))?;
    let mut items = Vec::new();
    for line in text.lines() {
        let item = if let Some(p) = line.strip_prefix("D ") {
            ManifestItem::Dir(p.to_owned())
        } else if let Some(rest) = line.strip_prefix("F ") {
            let mut it = rest.splitn(3, ' ');
            let (Some(h), Some(l), Some(p)) = (it.next(), it.next(), it.next()) else {
                return Err(bad("short file line"));
            };
            let sha256 = unhex32(h).ok_or_else(|| bad("bad hash"))?;
            let len = l.parse::<u64>().map_err(|_| bad("bad length"))?;
            ManifestItem::File {
                path: p.to_owned(),
                len,
                sha256,
            }
        } else {
            return Err(bad("unknown line"));
        };
        if !is_safe_rel_path(item.path()) {
            return Err(bad("unsafe path"));
        }
        items.push(item);
    }
    // Sorted and unique, as written.
    if items.windows(2).any(|w| w[0].path() >= w[1].path()) {
        return Err(bad("paths not sorted or duplicated"));
    }
    Ok(items)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// An entry read from a stream, owning its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    pub kind: EntryKind,
    pub key: String,
    pub note: String,
    pub payload: Vec<u8>,
}

/// Why a stream did not yield a valid entry.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Invalid(#[from] EntryError),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one entry of `total_len` bytes from `r` with the same checks as [`parse_entry`], hashing as it
/// goes so the payload is copied once. The header is checked before anything is allocated.
pub fn read_entry<R: std::io::Read>(mut r: R, total_len: u64) -> Result<OwnedEntry, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    if total_len < HEADER_LEN as u64 {
        return Err(EntryError::Short(total_len as usize).into());
    }
    r.read_exact(&mut head)?;
    let h = parse_header(&head)?;
    if h.total_len() != Some(total_len) {
        let expected = h.total_len().unwrap_or(u64::MAX);
        return Err(EntryError::Length {
            expected,
            actual: total_len,
        }
        .into());
    }
    let mut hasher = Sha256::new();
    hasher.update(&head[..32]);
    let mut key = vec![0u8; h.key_len];
    r.read_exact(&mut key)?;
    let mut note = vec![0u8; h.note_len];
    r.read_exact(&mut note)?;
    // The length was checked against the real file length above, so this allocation is bounded by it.
    let payload_len = usize::try_from(h.payload_len).map_err(|_| EntryError::TooLong(0, 0))?;
    let mut payload = vec![0u8; payload_len];
    r.read_exact(&mut payload)?;
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        return Err(EntryError::Length {
            expected: total_len,
            actual: total_len + 1,
        }
        .into());
    }
    hasher.update(&key);
    hasher.update(&note);
    hasher.update(&payload);
    let sum: [u8; 32] = hasher.finalize().into();
    if sum != h.checksum {
        return Err(EntryError::Checksum.into());
    }
    let key = String::from_utf8(key).map_err(|_| EntryError::Utf8)?;
    let note = String::from_utf8(note).map_err(|_| EntryError::Utf8)?;
    Ok(OwnedEntry {
        kind: h.kind,
        key,
        note,
        payload,
    })
}

/// Header, key and checksum of an entry, for streaming writers: returns the 64 + key + note bytes to
/// write before the payload.
pub fn entry_prefix(
    kind: EntryKind,
    key: &str,
    note: &str,
    payload: &[u8],
) -> Result<Vec<u8>, EntryError> {
    if key.len() > MAX_KEY_LEN || note.len() > MAX_NOTE_LEN {
        return Err(EntryError::TooLong(key.len(), note.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + key.len() + note.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&ENTRY_FORMAT.to_le_bytes());
    out.extend_from_slice(&[kind.byte(), 0, 0, 0]);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(note.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 32]);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(note.as_bytes());
    let mut hasher = Sha256::new();
    hasher.update(&out[..32]);
    hasher.update(&out[HEADER_LEN..]);
    hasher.update(payload);
    let sum: [u8; 32] = hasher.finalize().into();
    out[32..64].copy_from_slice(&sum);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let e = encode_entry(EntryKind::Blob, "program/x", "ane", b"payload").unwrap();
        let p = parse_entry_for(&e, "program/x").unwrap();
        assert_eq!(
            (p.kind, p.key, p.note, p.payload),
            (EntryKind::Blob, "program/x", "ane", &b"payload"[..])
        );
        assert!(matches!(
            parse_entry_for(&e, "program/y"),
            Err(EntryError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_rejected() {
        let e = encode_entry(EntryKind::Blob, "k", "n", &[7u8; 40]).unwrap();
        for i in 0..e.len() * 8 {
            let mut f = e.clone();
            f[i / 8] ^= 1 << (i % 8);
            assert!(parse_entry(&f).is_err(), "flip of bit {i} accepted");
        }
        for l in 0..e.len() {
            assert!(parse_entry(&e[..l]).is_err(), "truncation to {l} accepted");
        }
        let mut longer = e.clone();
        longer.push(0);
        assert!(parse_entry(&longer).is_err());
        // A payload length that overflows the total (found by the fuzzer).
        let mut huge = e.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_entry(&huge).is_err());
        assert!(read_entry(std::io::Cursor::new(&huge), huge.len() as u64).is_err());
    }

    #[test]
    fn stream_reader_agrees() {
        let e = encode_entry(EntryKind::DirManifest, "key", "note", b"F x").unwrap();
        let r = read_entry(std::io::Cursor::new(&e), e.len() as u64).unwrap();
        assert_eq!(
            (r.kind, r.key.as_str(), r.note.as_str()),
            (EntryKind::DirManifest, "key", "note")
        );
        assert_eq!(r.payload, b"F x");
        let mut bad = e.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(read_entry(std::io::Cursor::new(&bad), bad.len() as u64).is_err());
        assert!(read_entry(std::io::Cursor::new(&e[..70]), e.len() as u64).is_err());
    }

    #[test]
    fn manifest_roundtrip_and_unsafe_paths() {
        let items = vec![
            ManifestItem::File {
                path: "b/c.bin".into(),
                len: 3,
                sha256: sha256(b"abc"),
            },
            ManifestItem::Dir("b".into()),
            ManifestItem::Dir("a".into()),
        ];
        let text = encode_manifest(&items);
        let back = parse_manifest(&text).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], ManifestItem::Dir("a".into()));
        for bad in [
            "D ../x\n",
            "D /abs\n",
            "D a//b\n",
            "D ./a\n",
            "X a\n",
            "D b\nD a\n",
        ] {
            assert!(parse_manifest(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
