//! `.mlpackage` directories: `Manifest.json`, `Data/com.apple.CoreML/model.mlmodel` and
//! `Data/com.apple.CoreML/weights/` (with `weight.bin` only when a const lives in blob storage).
//!
//! Byte-identical across runs: the manifest's item identifiers are derived from the package name,
//! and the protobuf is emitted with ordered maps. Written into a temporary directory next to the
//! target and renamed into place, so readers never see half a package.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::desc::{FORMAT_VERSION, ProgramDesc};
use crate::emit::build_program;
use crate::error::ProgramError;
use crate::mil::BuiltProgram;

pub const MODEL_PATH: &str = "Data/com.apple.CoreML/model.mlmodel";
pub const WEIGHTS_DIR: &str = "Data/com.apple.CoreML/weights";
pub const WEIGHT_BIN: &str = "Data/com.apple.CoreML/weights/weight.bin";

/// A UUID-formatted identifier derived from `name` and `item` (RFC 4122 version/variant bits set).
fn stable_uuid(name: &str, item: &str) -> String {
    let h = Sha256::digest(format!("ggml-coreml/{FORMAT_VERSION}/{name}/{item}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `Manifest.json` for a package named `name` (same layout coremltools writes).
pub fn manifest(name: &str) -> String {
    let model = stable_uuid(name, "model");
    let weights = stable_uuid(name, "weights");
    let entry = |id: &str, desc: &str, item: &str, path: &str| {
        format!(
            "        \"{id}\": {{\n            \"author\": \"com.apple.CoreML\",\n            \"description\": \"{desc}\",\n            \"name\": \"{item}\",\n            \"path\": \"{path}\"\n        }}"
        )
    };
    let mut entries = [
        (
            model.clone(),
            entry(
                &model,
                "CoreML Model Specification",
                "model.mlmodel",
                "com.apple.CoreML/model.mlmodel",
            ),
        ),
        (
            weights.clone(),
            entry(
                &weights,
                "CoreML Model Weights",
                "weights",
                "com.apple.CoreML/weights",
            ),
        ),
    ];
    entries.sort();
    let body: Vec<String> = entries.into_iter().map(|(_, e)| e).collect();
    format!(
        "{{\n    \"fileFormatVersion\": \"1.0.0\",\n    \"itemInfoEntries\": {{\n{}\n    }},\n    \"rootModelIdentifier\": \"{model}\"\n}}\n",
        body.join(",\n")
    )
}

/// Writes a built program as `<dir>/<name>.mlpackage`, replacing any package of that name.
pub fn write_package(
    built: &BuiltProgram,
    dir: &Path,
    name: &str,
) -> Result<PathBuf, ProgramError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(ProgramError::InvalidDesc(format!(
            "package name {name:?} is not a plain file name"
        )));
    }
    fs::create_dir_all(dir).map_err(|e| ProgramError::io(dir, e))?;
    let target = dir.join(format!("{name}.mlpackage"));
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let tmp = dir.join(format!(".{name}.mlpackage.tmp-{unique}"));
    let result = fill(built, &tmp, name).and_then(|()| replace(&tmp, &target, dir, name, &unique));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| target)
}

fn fill(built: &BuiltProgram, root: &Path, name: &str) -> Result<(), ProgramError> {
    let write = |rel: &str, bytes: &[u8]| {
        let p = root.join(rel);
        fs::write(&p, bytes).map_err(|e| ProgramError::io(&p, e))
    };
    let weights = root.join(WEIGHTS_DIR);
    // The weights directory exists even when empty, as in coremltools' packages.
    fs::create_dir_all(&weights).map_err(|e| ProgramError::io(&weights, e))?;
    write("Manifest.json", manifest(name).as_bytes())?;
    write(MODEL_PATH, &built.model.encode_to_vec())?;
    if let Some(w) = &built.weights {
        write(WEIGHT_BIN, w)?;
    }
    Ok(())
}

fn replace(
    tmp: &Path,
    target: &Path,
    dir: &Path,
    name: &str,
    unique: &str,
) -> Result<(), ProgramError> {
    let old = dir.join(format!(".{name}.mlpackage.old-{unique}"));
    let moved_old = target.exists() && fs::rename(target, &old).is_ok();
    let renamed = fs::rename(tmp, target);
    if moved_old {
        let _ = fs::remove_dir_all(&old);
    }
    match renamed {
        Ok(()) => Ok(()),
        // Another writer put the same deterministic package in place between our two renames.
        Err(_) if target.join(MODEL_PATH).is_file() => {
            let _ = fs::remove_dir_all(tmp);
            Ok(())
        }
        Err(e) => Err(ProgramError::io(target, e)),
    }
}

/// Writes the program for `desc` as `<dir>/<desc.key()>.mlpackage` and returns its path.
pub fn write_mlpackage(desc: &ProgramDesc, dir: &Path) -> Result<PathBuf, ProgramError> {
    let built = build_program(desc)?;
    write_package(&built, dir, &desc.key())
}

/// Reads a package back: the model bytes and, when present, `weight.bin`.
pub fn read_package(pkg: &Path) -> Result<(Vec<u8>, Option<Vec<u8>>), ProgramError> {
    let model = pkg.join(MODEL_PATH);
    let bytes = fs::read(&model).map_err(|e| ProgramError::io(&model, e))?;
    let wb = pkg.join(WEIGHT_BIN);
    let weights = match fs::read(&wb) {
        Ok(w) => Some(w),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ProgramError::io(&wb, e)),
    };
    Ok((bytes, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let a = stable_uuid("i8i8-m64-k256-n256", "model");
        assert_eq!(a, stable_uuid("i8i8-m64-k256-n256", "model"));
        assert_ne!(a, stable_uuid("i8i8-m64-k256-n256", "weights"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn manifest_names_both_items() {
        let m = manifest("x");
        assert!(m.contains("\"rootModelIdentifier\""));
        assert!(m.contains("com.apple.CoreML/model.mlmodel"));
        assert!(m.contains("com.apple.CoreML/weights"));
    }
}
