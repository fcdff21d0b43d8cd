//! Arbitrary bytes into the cache entry reader: accepted only when every length matches and the
//! SHA-256 verifies; never a panic. Plus: a valid entry built from the input with one bit flipped is
//! always rejected.
#![no_main]

use ggml_coreml_cache::entry::{
    EntryKind, HEADER_LEN, encode_entry, parse_entry, parse_manifest, read_entry, sha256,
};
use libfuzzer_sys::fuzz_target;

/// Independent statement of validity: declared lengths add up and the checksum matches.
fn checksum_matches(b: &[u8]) -> bool {
    if b.len() < HEADER_LEN {
        return false;
    }
    let key = u32::from_le_bytes(b[16..20].try_into().unwrap()) as u64;
    let note = u32::from_le_bytes(b[20..24].try_into().unwrap()) as u64;
    let payload = u64::from_le_bytes(b[24..32].try_into().unwrap());
    let total = (HEADER_LEN as u64).checked_add(key).and_then(|t| t.checked_add(note)).and_then(|t| t.checked_add(payload));
    if total != Some(b.len() as u64) {
        return false;
    }
    let mut body = b[..32].to_vec();
    body.extend_from_slice(&b[HEADER_LEN..]);
    sha256(&body) == b[32..64]
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_entry(data);
    let streamed = read_entry(std::io::Cursor::new(data), data.len() as u64);
    assert_eq!(parsed.is_ok(), streamed.is_ok(), "the two readers disagree");
    if let Ok(e) = parsed {
        assert!(checksum_matches(data), "accepted without a matching checksum");
        let s = streamed.unwrap();
        assert_eq!((s.kind, s.key.as_str(), s.note.as_str(), &s.payload[..]), (e.kind, e.key, e.note, e.payload));
        if e.kind == EntryKind::DirManifest {
            let _ = parse_manifest(e.payload);
        }
    }

    // A valid entry from the input, then one bit flipped: rejected.
    if data.len() >= 4 {
        let (ctl, rest) = data.split_at(4);
        let split = (ctl[0] as usize).min(rest.len());
        let (key, rest) = rest.split_at(split);
        let key = String::from_utf8_lossy(key);
        let note = String::from_utf8_lossy(&rest[..(ctl[1] as usize).min(rest.len())]);
        let kind = if ctl[2] & 1 == 0 { EntryKind::Blob } else { EntryKind::DirManifest };
        let Ok(good) = encode_entry(kind, &key, &note, rest) else { return };
        let e = parse_entry(&good).expect("an encoded entry parses");
        assert_eq!((e.key, e.note, e.payload), (&*key, &*note, rest));
        let bit = (u16::from_le_bytes([ctl[3], ctl[2]]) as usize) % (good.len() * 8);
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(parse_entry(&bad).is_err(), "a flipped bit {bit} was accepted");
        let cut = bit / 8;
        assert!(parse_entry(&good[..cut]).is_err(), "truncation to {cut} accepted");
    }
});
