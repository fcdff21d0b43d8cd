//! Measured timings per shape, smoothed, and their JSON form for the per-device disk cache.

use std::collections::HashMap;

use ggml_coreml_program::Variant;
use serde::{Deserialize, Serialize};

use crate::cost::padded_m;

/// Weight of a new sample in the running estimate.
pub const EWMA_ALPHA: f64 = 0.25;
/// A sample above this multiple of the estimate counts as this multiple (one hiccup cannot flip a
/// shape for long; a real slowdown still moves the estimate ×1.75 per sample).
pub const OUTLIER_CAP: f64 = 4.0;
/// Distinct shapes kept; later shapes are not recorded (bad input cannot grow memory without bound).
pub const MAX_ENTRIES: usize = 4096;
/// Version of the JSON document.
pub const FORMAT: u32 = 1;

/// A measurement key: the program-level shape. M is padded (the bucket, or the padded total above the
/// largest bucket) because every M in a bucket runs the same programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub variant: Variant,
    pub mp: usize,
    pub k: usize,
    pub n: usize,
}

impl Key {
    pub fn new(variant: Variant, m: usize, k: usize, n: usize) -> Key {
        Key {
            variant,
            mp: padded_m(m),
            k,
            n,
        }
    }
}

/// A smoothed timing. The first sample is a warm-up (it may include a compile or a cold cache) and is
/// not used for decisions; the second replaces it, later ones are averaged in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub ms: f64,
    pub samples: u32,
}

impl Estimate {
    /// Usable for decisions.
    pub fn usable(&self) -> Option<f64> {
        (self.samples >= 2).then_some(self.ms)
    }

    fn update(slot: &mut Option<Estimate>, sample: f64) {
        if !sample.is_finite() || sample <= 0.0 {
            return;
        }
        *slot = Some(match *slot {
            None => Estimate {
                ms: sample,
                samples: 1,
            },
            Some(e) if e.samples == 1 => Estimate {
                ms: sample,
                samples: 2,
            },
            Some(e) => {
                let s = sample.min(e.ms * OUTLIER_CAP);
                Estimate {
                    ms: e.ms + EWMA_ALPHA * (s - e.ms),
                    samples: e.samples.saturating_add(1),
                }
            }
        });
    }
}

/// What was measured for one key.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Entry {
    /// The whole ANE path of one MUL_MAT (host side included), ms.
    pub ane: Option<Estimate>,
    /// The host path, ms per token (host time scales with the real M, not the bucket).
    pub host_per_token: Option<Estimate>,
}

#[derive(Default)]
pub struct Measurements {
    map: HashMap<Key, Entry>,
}

impl Measurements {
    pub fn get(&self, key: &Key) -> Option<Entry> {
        self.map.get(key).copied()
    }

    fn slot(&mut self, key: Key) -> Option<&mut Entry> {
        if !self.map.contains_key(&key) && self.map.len() >= MAX_ENTRIES {
            return None;
        }
        Some(self.map.entry(key).or_default())
    }

    pub fn record_ane(&mut self, key: Key, ms: f64) {
        if let Some(e) = self.slot(key) {
            Estimate::update(&mut e.ane, ms);
        }
    }

    pub fn record_host(&mut self, key: Key, m: usize, ms: f64) {
        if m == 0 {
            return;
        }
        if let Some(e) = self.slot(key) {
            Estimate::update(&mut e.host_per_token, ms / m as f64);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn to_json(&self, device: &str) -> String {
        let mut keys: Vec<&Key> = self.map.keys().collect();
        keys.sort();
        let entries = keys
            .into_iter()
            .map(|k| {
                let e = self.map[k];
                EntryDoc {
                    variant: k.variant.name().to_string(),
                    mp: k.mp,
                    k: k.k,
                    n: k.n,
                    ane_ms: e.ane.map(|x| x.ms),
                    ane_samples: e.ane.map_or(0, |x| x.samples),
                    host_ms_per_token: e.host_per_token.map(|x| x.ms),
                    host_samples: e.host_per_token.map_or(0, |x| x.samples),
                }
            })
            .collect();
        let doc = Doc {
            format: FORMAT,
            device: device.to_string(),
            entries,
        };
        serde_json::to_string(&doc).unwrap_or_else(|_| "{}".to_string())
    }

    /// Parses a document and merges it (loaded entries replace in-memory ones). All or nothing: any bad
    /// entry rejects the document. Returns the number of entries loaded.
    pub fn load_json(&mut self, json: &str, device: &str) -> Result<usize, String> {
        let doc: Doc = serde_json::from_str(json)
            .map_err(|e| format!("measurements: not a valid document: {e}"))?;
        if doc.format != FORMAT {
            return Err(format!(
                "measurements: format {} (this build reads {FORMAT})",
                doc.format
            ));
        }
        if doc.device != device {
            return Err(format!(
                "measurements are for device {:?}, this is {device:?}",
                doc.device
            ));
        }
        let mut parsed = Vec::with_capacity(doc.entries.len());
        for (i, e) in doc.entries.iter().enumerate() {
            let bad = |why: &str| Err(format!("measurements: entry {i}: {why}"));
            let Some(variant) = Variant::parse(&e.variant) else {
                return bad(&format!("unknown variant {:?}", e.variant));
            };
            if e.mp == 0 || e.k == 0 || e.n == 0 {
                return bad("zero dimension");
            }
            let est = |v: Option<f64>, n: u32| -> Result<Option<Estimate>, String> {
                match v {
                    None => Ok(None),
                    Some(ms) if ms.is_finite() && ms > 0.0 && n > 0 => {
                        Ok(Some(Estimate { ms, samples: n }))
                    }
                    Some(ms) => Err(format!(
                        "measurements: entry {i}: bad timing {ms} ({n} samples)"
                    )),
                }
            };
            let entry = Entry {
                ane: est(e.ane_ms, e.ane_samples)?,
                host_per_token: est(e.host_ms_per_token, e.host_samples)?,
            };
            parsed.push((
                Key {
                    variant,
                    mp: e.mp,
                    k: e.k,
                    n: e.n,
                },
                entry,
            ));
        }
        let mut loaded = 0;
        for (k, e) in parsed {
            if let Some(slot) = self.slot(k) {
                *slot = e;
                loaded += 1;
            }
        }
        Ok(loaded)
    }
}

#[derive(Serialize, Deserialize)]
struct Doc {
    format: u32,
    device: String,
    #[serde(default)]
    entries: Vec<EntryDoc>,
}

#[derive(Serialize, Deserialize)]
struct EntryDoc {
    variant: String,
    mp: usize,
    k: usize,
    n: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ane_ms: Option<f64>,
    #[serde(default)]
    ane_samples: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_ms_per_token: Option<f64>,
    #[serde(default)]
    host_samples: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_ewma() {
        let mut e = None;
        Estimate::update(&mut e, 5000.0); // first call compiled the program
        assert_eq!(e.unwrap().usable(), None);
        Estimate::update(&mut e, 2.0);
        assert_eq!(e.unwrap().usable(), Some(2.0));
        Estimate::update(&mut e, 4.0);
        assert!((e.unwrap().ms - 2.5).abs() < 1e-12);
        Estimate::update(&mut e, 1e9); // capped at 4x
        assert!((e.unwrap().ms - (2.5 + 0.25 * 7.5)).abs() < 1e-9);
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let before = e;
            Estimate::update(&mut e, bad);
            assert_eq!(e, before);
        }
    }

    #[test]
    fn json_round_trip_and_rejections() {
        let mut m = Measurements::default();
        m.record_ane(Key::new(Variant::I8I8, 500, 4096, 4096), 3.0);
        m.record_ane(Key::new(Variant::I8I8, 500, 4096, 4096), 2.0);
        m.record_host(Key::new(Variant::I8I8, 500, 4096, 4096), 500, 5.0);
        m.record_host(Key::new(Variant::F16, 100, 1024, 1024), 100, 1.0);
        let j = m.to_json("mac M4");
        let mut back = Measurements::default();
        assert_eq!(back.load_json(&j, "mac M4"), Ok(2));
        assert_eq!(
            back.get(&Key::new(Variant::I8I8, 512, 4096, 4096)),
            m.get(&Key::new(Variant::I8I8, 500, 4096, 4096))
        );
        assert_eq!(back.to_json("mac M4"), j);

        assert!(back.load_json(&j, "mac M3").unwrap_err().contains("device"));
        assert!(back.load_json("nonsense", "mac M4").is_err());
        assert!(back.load_json("", "mac M4").is_err());
        let bad_variant =
            r#"{"format":1,"device":"mac M4","entries":[{"variant":"i4","mp":512,"k":1,"n":1}]}"#;
        assert!(
            back.load_json(bad_variant, "mac M4")
                .unwrap_err()
                .contains("variant")
        );
        let bad_ms = r#"{"format":1,"device":"mac M4","entries":[{"variant":"f16","mp":512,"k":1,"n":1,"ane_ms":-3,"ane_samples":2}]}"#;
        assert!(
            back.load_json(bad_ms, "mac M4")
                .unwrap_err()
                .contains("bad timing")
        );
        let zero =
            r#"{"format":1,"device":"mac M4","entries":[{"variant":"f16","mp":0,"k":1,"n":1}]}"#;
        assert!(back.load_json(zero, "mac M4").is_err());
        let future = r#"{"format":9,"device":"mac M4","entries":[]}"#;
        assert!(
            back.load_json(future, "mac M4")
                .unwrap_err()
                .contains("format")
        );
        assert_eq!(back.len(), 2, "rejected documents load nothing");
    }

    #[test]
    fn bounded() {
        let mut m = Measurements::default();
        for n in 1..=MAX_ENTRIES + 10 {
            m.record_ane(Key::new(Variant::F16, 512, 64, n), 1.0);
        }
        assert_eq!(m.len(), MAX_ENTRIES);
    }
}
