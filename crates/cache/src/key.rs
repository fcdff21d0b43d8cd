//! Cache keys: what an entry depends on, and where it lives on disk.

use std::fmt;
use std::path::PathBuf;

use ggml_coreml_program::{FORMAT_VERSION, ProgramDesc};

use crate::entry::{hex, sha256};

/// The machine facts every entry depends on, supplied by the executor that owns the programs.
/// A change of any field (an OS update, another chip, a new backend build) makes every entry a miss.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EnvKey {
    /// OS build, e.g. `24A335` on Apple; on Linux the kernel release (`linux-6.1.0`).
    pub os_build: String,
    /// Chip generation, e.g. `M3`/`A17`; `reference` for the portable executor.
    pub chip: String,
    /// Backend version (crate version of the build that wrote the entry).
    pub backend_version: String,
}

impl EnvKey {
    /// An env key with this crate's version as the backend version.
    pub fn new(os_build: impl Into<String>, chip: impl Into<String>) -> EnvKey {
        EnvKey {
            os_build: os_build.into(),
            chip: chip.into(),
            backend_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// The key of the portable reference executor on this host: the OS and kernel release + `reference`.
    pub fn reference() -> EnvKey {
        EnvKey::new(host_os_build(), "reference")
    }

    /// Exact identity, as stored in every entry header.
    pub fn full(&self) -> String {
        format!(
            "fmt={};os={};chip={};backend={}",
            FORMAT_VERSION,
            self.os_build.replace(';', "_"),
            self.chip.replace(';', "_"),
            self.backend_version.replace(';', "_")
        )
    }

    /// Directory name: readable parts plus a short hash of [`EnvKey::full`], so distinct keys never share a
    /// directory even when sanitising makes their readable parts equal.
    pub fn dir_name(&self) -> String {
        format!(
            "f{}-{}-{}-{}-{}",
            FORMAT_VERSION,
            sanitize(&self.os_build, 24),
            sanitize(&self.chip, 16),
            sanitize(&self.backend_version, 16),
            &hex(&sha256(self.full().as_bytes()))[..8]
        )
    }
}

impl fmt::Display for EnvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "format {} / os {} / chip {} / backend {}",
            FORMAT_VERSION, self.os_build, self.chip, self.backend_version
        )
    }
}

/// `<os>-<release>` of this host, best effort (`uname -r` equivalent).
pub fn host_os_build() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{}-{release}", std::env::consts::OS)
}

/// What is stored. Every key is combined with the cache's [`EnvKey`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryKey {
    /// A program for one shape: the emitted `.mlpackage` (Linux) or compiled `.mlmodelc` + placement
    /// verdict (Apple). Shared by every model with that shape.
    Program(ProgramDesc),
    /// A per-model artifact (pre-repacked weights, profitability table). `model_id` is opaque (e.g. a hash
    /// of the GGUF tensor table); `quant` the ggml type name; `name` what it is (e.g. a tensor name).
    Artifact {
        model_id: String,
        quant: String,
        name: String,
    },
    /// Small per-device records (e.g. measured ms per shape per executor), JSON.
    Measurement(String),
}

/// Entry classes, in on-disk order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Program,
    Artifact,
    Measurement,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Program, Class::Artifact, Class::Measurement];

    /// Top-level directory of this class.
    pub fn dir(self) -> &'static str {
        match self {
            Class::Program => "programs",
            Class::Artifact => "artifacts",
            Class::Measurement => "measurements",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Program => "program",
            Class::Artifact => "artifact",
            Class::Measurement => "measurement",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl EntryKey {
    pub fn program(desc: &ProgramDesc) -> EntryKey {
        EntryKey::Program(*desc)
    }

    pub fn artifact(
        model_id: impl Into<String>,
        quant: impl Into<String>,
        name: impl Into<String>,
    ) -> EntryKey {
        EntryKey::Artifact {
            model_id: model_id.into(),
            quant: quant.into(),
            name: name.into(),
        }
    }

    pub fn measurement(name: impl Into<String>) -> EntryKey {
        EntryKey::Measurement(name.into())
    }

    pub fn class(&self) -> Class {
        match self {
            EntryKey::Program(_) => Class::Program,
            EntryKey::Artifact { .. } => Class::Artifact,
            EntryKey::Measurement(_) => Class::Measurement,
        }
    }

    /// The exact key stored in the entry header and compared on every read.
    pub fn full(&self, env: &EnvKey) -> String {
        let e = env.full();
        match self {
            EntryKey::Program(d) => format!("program|{e}|{}", d.key()),
            EntryKey::Artifact {
                model_id,
                quant,
                name,
            } => {
                format!(
                    "artifact|{e}|model={}|quant={}|{}",
                    esc(model_id),
                    esc(quant),
                    esc(name)
                )
            }
            EntryKey::Measurement(n) => format!("measurement|{e}|{}", esc(n)),
        }
    }

    /// Path relative to the cache root, without the `.entry` / `.d` suffix.
    pub fn rel_stem(&self, env: &EnvKey) -> PathBuf {
        let mut p = PathBuf::from(self.class().dir());
        p.push(env.dir_name());
        match self {
            EntryKey::Program(d) => p.push(stem(&d.key())),
            EntryKey::Artifact {
                model_id,
                quant,
                name,
            } => {
                p.push(stem(model_id));
                p.push(stem(quant));
                p.push(stem(name));
            }
            EntryKey::Measurement(n) => p.push(stem(n)),
        }
        p
    }
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Program(d) => write!(f, "program {d}"),
            EntryKey::Artifact {
                model_id,
                quant,
                name,
            } => write!(f, "artifact {model_id}/{quant}/{name}"),
            EntryKey::Measurement(n) => write!(f, "measurement {n}"),
        }
    }
}

/// Escapes the separator so distinct fields never produce the same full key.
fn esc(s: &str) -> String {
    s.replace('%', "%25").replace('|', "%7C")
}

/// File-name-safe form: `[A-Za-z0-9._-]`, no leading dot, at most `max` characters.
pub(crate) fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    if out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    out
}

/// A path component for `name`: the name itself when already safe and short, else its sanitised prefix
/// plus a hash of the original (so two names never collide after sanitising).
fn stem(name: &str) -> String {
    let clean = sanitize(name, 64);
    if clean == name && !name.contains("--h") {
        clean
    } else {
        format!(
            "{}--h{}",
            sanitize(name, 48),
            &hex(&sha256(name.as_bytes()))[..12]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_coreml_program::Variant;

    #[test]
    fn program_stem_is_the_desc_key() {
        let env = EnvKey::new("24A335", "M3");
        let d = ProgramDesc {
            variant: Variant::I8I8,
            m: 512,
            k: 4096,
            n: 4096,
            group: 0,
            offsets: false,
        };
        let p = EntryKey::program(&d).rel_stem(&env);
        assert!(p.starts_with("programs"));
        assert!(p.ends_with("i8i8-m512-k4096-n4096"));
        assert!(
            EntryKey::program(&d)
                .full(&env)
                .contains("os=24A335;chip=M3")
        );
    }

    #[test]
    fn unsafe_names_are_hashed() {
        let env = EnvKey::new("a/b", "..");
        assert!(!env.dir_name().contains('/'));
        let k = EntryKey::artifact("../../etc", "Q4_K", "blk.0.attn_q.weight/rowwise");
        let p = k.rel_stem(&env);
        assert!(
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        );
        let a = EntryKey::artifact("m", "q", "a/b").rel_stem(&env);
        let b = EntryKey::artifact("m", "q", "a_b").rel_stem(&env);
        assert_ne!(a, b);
        let full_a = EntryKey::artifact("m|x", "q", "n").full(&env);
        let full_b = EntryKey::artifact("m", "x|q", "n").full(&env);
        assert_ne!(full_a, full_b);
    }
}
