//! What the policy knows about the machine: the device class and chip (static), the OS version, and
//! the device state the platform layer keeps current (thermal, Low Power Mode, app in background).

use std::fmt;

/// Apple chips the cost model has numbers for. Pro/Max/Ultra appear where the host (GPU) numbers
/// differ materially; the Neural Engine is the same 16-core block within a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChipGen {
    M1,
    M1Pro,
    M1Max,
    M1Ultra,
    M2,
    M2Pro,
    M2Max,
    M2Ultra,
    M3,
    M3Pro,
    M3Max,
    M3Ultra,
    M4,
    M4Pro,
    M4Max,
    M5,
    M5Pro,
    M5Max,
    A14,
    A15,
    A16,
    A17Pro,
    A18,
    A18Pro,
    A19,
    A19Pro,
}

impl ChipGen {
    pub const ALL: [ChipGen; 26] = [
        ChipGen::M1,
        ChipGen::M1Pro,
        ChipGen::M1Max,
        ChipGen::M1Ultra,
        ChipGen::M2,
        ChipGen::M2Pro,
        ChipGen::M2Max,
        ChipGen::M2Ultra,
        ChipGen::M3,
        ChipGen::M3Pro,
        ChipGen::M3Max,
        ChipGen::M3Ultra,
        ChipGen::M4,
        ChipGen::M4Pro,
        ChipGen::M4Max,
        ChipGen::M5,
        ChipGen::M5Pro,
        ChipGen::M5Max,
        ChipGen::A14,
        ChipGen::A15,
        ChipGen::A16,
        ChipGen::A17Pro,
        ChipGen::A18,
        ChipGen::A18Pro,
        ChipGen::A19,
        ChipGen::A19Pro,
    ];

    /// Newest known chips, used for an Apple chip the tables do not know (see [`ChipGen::from_brand`]).
    pub const NEWEST_MAC: ChipGen = ChipGen::M5;
    pub const NEWEST_MOBILE: ChipGen = ChipGen::A19Pro;

    pub fn name(self) -> &'static str {
        match self {
            ChipGen::M1 => "M1",
            ChipGen::M1Pro => "M1 Pro",
            ChipGen::M1Max => "M1 Max",
            ChipGen::M1Ultra => "M1 Ultra",
            ChipGen::M2 => "M2",
            ChipGen::M2Pro => "M2 Pro",
            ChipGen::M2Max => "M2 Max",
            ChipGen::M2Ultra => "M2 Ultra",
            ChipGen::M3 => "M3",
            ChipGen::M3Pro => "M3 Pro",
            ChipGen::M3Max => "M3 Max",
            ChipGen::M3Ultra => "M3 Ultra",
            ChipGen::M4 => "M4",
            ChipGen::M4Pro => "M4 Pro",
            ChipGen::M4Max => "M4 Max",
            ChipGen::M5 => "M5",
            ChipGen::M5Pro => "M5 Pro",
            ChipGen::M5Max => "M5 Max",
            ChipGen::A14 => "A14",
            ChipGen::A15 => "A15",
            ChipGen::A16 => "A16",
            ChipGen::A17Pro => "A17 Pro",
            ChipGen::A18 => "A18",
            ChipGen::A18Pro => "A18 Pro",
            ChipGen::A19 => "A19",
            ChipGen::A19Pro => "A19 Pro",
        }
    }

    /// True for the A series (phones, some iPads).
    pub fn is_a_series(self) -> bool {
        matches!(
            self,
            ChipGen::A14
                | ChipGen::A15
                | ChipGen::A16
                | ChipGen::A17Pro
                | ChipGen::A18
                | ChipGen::A18Pro
                | ChipGen::A19
                | ChipGen::A19Pro
        )
    }

    /// Generations the ANE path targets: M3 and newer, A17 Pro and newer. M1/M2/A14–A16 have the older
    /// ANE and weaker int8 support; the backend is a graceful no-op there (`Reason::OldChip`).
    pub fn supported(self) -> bool {
        !matches!(
            self,
            ChipGen::M1
                | ChipGen::M1Pro
                | ChipGen::M1Max
                | ChipGen::M1Ultra
                | ChipGen::M2
                | ChipGen::M2Pro
                | ChipGen::M2Max
                | ChipGen::M2Ultra
                | ChipGen::A14
                | ChipGen::A15
                | ChipGen::A16
        )
    }

    /// Parses a chip from any text the platform may give: a brand string (`Apple M4 Pro`), a chip
    /// name (`M4 Pro`, `A17 Pro`, `a18pro`) or a machine identifier (`iPhone16,1`, `iPad16,3`).
    pub fn parse(s: &str) -> Option<ChipGen> {
        ChipGen::from_brand(s).or_else(|| ChipGen::from_machine(s))
    }

    /// From `machdep.cpu.brand_string` (`Apple M4 Pro`) or a bare chip name (`M3 Max`, `A18 Pro`).
    ///
    /// A generation newer than the tables (`Apple M7 Max`) maps to the newest known chip of the same
    /// tier (`M5 Max`); an Ultra beyond M3 maps to `M5 Max`. Conservative on purpose: recent
    /// generations strengthened the GPU more than the ANE (M5's Neural Accelerators), so the newest
    /// numbers under-predict rather than over-predict the ANE's gain, and measurements take over once
    /// shapes have run. A series older than A14 maps to A14 (an unsupported chip either way).
    pub fn from_brand(s: &str) -> Option<ChipGen> {
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_prefix("apple").unwrap_or(&t).trim_start();
        let mut chars = t.chars();
        let family = chars.next()?;
        if family != 'm' && family != 'a' {
            return None;
        }
        let rest = chars.as_str();
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() || digits.len() > 3 {
            return None;
        }
        let gen_num: u32 = digits.parse().ok()?;
        let tail = rest[digits.len()..].trim().replace([' ', '-', '_'], "");
        // "A15 Bionic", "A17 Pro", "M4 Max (16-core CPU)" … keep the tier word only.
        let tier = if tail.starts_with("pro") {
            Tier::Pro
        } else if tail.starts_with("max") {
            Tier::Max
        } else if tail.starts_with("ultra") {
            Tier::Ultra
        } else if tail.is_empty() || tail.starts_with("bionic") || tail.starts_with('(') {
            Tier::Base
        } else {
            return None;
        };
        if family == 'm' {
            m_chip(gen_num, tier)
        } else {
            a_chip(gen_num, tier)
        }
    }

    /// From an iOS/iPadOS `hw.machine` identifier (`iPhone17,1`, `iPad16,3`). Identifiers newer than
    /// the table map to the newest known chip of the product line (as in [`ChipGen::from_brand`]);
    /// older ones to the oldest known (unsupported) chip. Macs report `arm64` here and are read from
    /// the brand string instead (`None`).
    pub fn from_machine(s: &str) -> Option<ChipGen> {
        let t = s.trim();
        let (line, nums) = if let Some(r) = t.strip_prefix("iPhone") {
            ("iphone", r)
        } else if let Some(r) = t.strip_prefix("iPad") {
            ("ipad", r)
        } else {
            return None;
        };
        let (major, minor) = nums.split_once(',')?;
        let major: u32 = major.trim().parse().ok()?;
        let minor: u32 = minor.trim().parse().ok()?;
        use ChipGen::*;
        let chip = match (line, major, minor) {
            ("iphone", 0..=13, _) => A14,
            ("iphone", 14, _) => A15,
            ("iphone", 15, _) => A16,
            ("iphone", 16, _) => A17Pro,
            ("iphone", 17, 1 | 2) => A18Pro,
            ("iphone", 17, _) => A18,
            // iPhone 17 Pro / Pro Max (18,1 / 18,2), iPhone Air (18,4): A19 Pro; iPhone 17 (18,3): A19.
            ("iphone", 18, 3) | ("iphone", 18, 5) => A19,
            ("iphone", 18, _) => A19Pro,
            ("iphone", _, _) => ChipGen::NEWEST_MOBILE,
            ("ipad", 0..=12, _) => A14,
            ("ipad", 13, 4..=11) | ("ipad", 13, 16 | 17) => M1,
            ("ipad", 13, _) => A14,
            ("ipad", 14, 1 | 2) => A15,
            ("ipad", 14, _) => M2,
            ("ipad", 15, 7 | 8) => A16,
            ("ipad", 15, _) => M3,
            ("ipad", 16, 1 | 2) => A17Pro,
            ("ipad", 16, _) => M4,
            ("ipad", _, _) => ChipGen::NEWEST_MAC,
            _ => return None,
        };
        Some(chip)
    }
}

impl fmt::Display for ChipGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tier {
    Base,
    Pro,
    Max,
    Ultra,
}

fn m_chip(gen_num: u32, tier: Tier) -> Option<ChipGen> {
    use ChipGen::*;
    use Tier::*;
    Some(match (gen_num, tier) {
        (0, _) => return None,
        (1, Base) => M1,
        (1, Pro) => M1Pro,
        (1, Max) => M1Max,
        (1, Ultra) => M1Ultra,
        (2, Base) => M2,
        (2, Pro) => M2Pro,
        (2, Max) => M2Max,
        (2, Ultra) => M2Ultra,
        (3, Base) => M3,
        (3, Pro) => M3Pro,
        (3, Max) => M3Max,
        (3, Ultra) => M3Ultra,
        (4, Base) => M4,
        (4, Pro) => M4Pro,
        (4, Max) => M4Max,
        (_, Ultra) => M5Max,
        (5, Base) => M5,
        (5, Pro) => M5Pro,
        (5, Max) => M5Max,
        (_, Base) => M5,
        (_, Pro) => M5Pro,
        (_, Max) => M5Max,
    })
}

fn a_chip(gen_num: u32, tier: Tier) -> Option<ChipGen> {
    use ChipGen::*;
    Some(match (gen_num, tier) {
        (0..=3, _) => return None,
        (_, Tier::Max | Tier::Ultra) => return None,
        (4..=14, _) => A14,
        (15, _) => A15,
        (16, _) => A16,
        (17, _) => A17Pro,
        (18, Tier::Pro) => A18Pro,
        (18, _) => A18,
        (19, Tier::Base) => A19,
        (19, _) => A19Pro,
        (_, Tier::Base) => A19,
        (_, _) => A19Pro,
    })
}

/// Where programs run and which numbers the cost model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceClass {
    /// Linux or any non-Apple machine: the reference executor, never predicted profitable.
    Reference,
    /// macOS on Apple silicon.
    AppleMac { chip: ChipGen },
    /// iOS / iPadOS (A series, or an M chip in an iPad).
    AppleMobile { chip: ChipGen },
}

impl DeviceClass {
    /// The usual class for a chip: A series → mobile, M series → Mac.
    pub fn for_chip(chip: ChipGen) -> DeviceClass {
        if chip.is_a_series() {
            DeviceClass::AppleMobile { chip }
        } else {
            DeviceClass::AppleMac { chip }
        }
    }

    pub fn chip(self) -> Option<ChipGen> {
        match self {
            DeviceClass::Reference => None,
            DeviceClass::AppleMac { chip } | DeviceClass::AppleMobile { chip } => Some(chip),
        }
    }

    pub fn is_mobile(self) -> bool {
        matches!(self, DeviceClass::AppleMobile { .. })
    }

    /// Stable text: `reference`, `mac M4 Pro`, `mobile A18` (also the identity of measurement documents).
    pub fn name(self) -> String {
        match self {
            DeviceClass::Reference => "reference".into(),
            DeviceClass::AppleMac { chip } => format!("mac {chip}"),
            DeviceClass::AppleMobile { chip } => format!("mobile {chip}"),
        }
    }
}

impl fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A marketing OS version (macOS 26.1 / iOS 26.0): compatibility numbers are normalised on entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OsVersion {
    pub major: u32,
    pub minor: u32,
}

impl OsVersion {
    pub const fn new(major: u32, minor: u32) -> OsVersion {
        OsVersion { major, minor }
    }

    /// Parses `26`, `26.1`, `14.4.1`.
    pub fn parse(s: &str) -> Option<OsVersion> {
        let mut it = s.trim().split('.');
        let major = it.next()?.trim().parse().ok()?;
        let minor = match it.next() {
            Some(m) => m.trim().parse().ok()?,
            None => 0,
        };
        Some(OsVersion { major, minor })
    }
}

impl fmt::Display for OsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// CoreML takes int8 model inputs from macOS / iOS 26 (spec 10); every program we emit uses spec 10.
pub const MIN_OS_INT8_IO: OsVersion = OsVersion::new(26, 0);
/// MLComputePlan (placement checks) needs macOS 14.4 …
pub const MIN_MACOS_COMPUTE_PLAN: OsVersion = OsVersion::new(14, 4);
/// … and iOS 17.4.
pub const MIN_IOS_COMPUTE_PLAN: OsVersion = OsVersion::new(17, 4);

/// Static facts, set once by the platform layer (or defaulted from the executor's `accelerated`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    pub class: DeviceClass,
    /// Marketing OS version; `None` when unknown (then the executor is trusted to have checked it).
    pub os: Option<OsVersion>,
    /// A Neural Engine is present (`MLModel.availableComputeDevices`).
    pub ane: bool,
    /// The chip was not recognised and the newest known one is assumed.
    pub chip_guessed: bool,
}

impl DeviceFacts {
    /// Linux / non-Apple: the reference executor.
    pub fn reference() -> DeviceFacts {
        DeviceFacts {
            class: DeviceClass::Reference,
            os: None,
            ane: false,
            chip_guessed: false,
        }
    }

    /// A known chip with a new enough OS and an ANE (tests, projections).
    pub fn for_chip(chip: ChipGen) -> DeviceFacts {
        DeviceFacts {
            class: DeviceClass::for_chip(chip),
            os: Some(MIN_OS_INT8_IO),
            ane: true,
            chip_guessed: false,
        }
    }

    /// From the platform layer's raw facts: `os` is `std::env::consts::OS` (`macos`, `ios`, …),
    /// `version` the OS version (compatibility numbers macOS 16 / iOS 19 mean 26), `chip` the brand
    /// string (macOS) or `hw.machine` (iOS), `ane` whether a Neural Engine is listed. A non-Apple OS
    /// gives [`DeviceFacts::reference`].
    pub fn apple(
        os: &str,
        version: Option<OsVersion>,
        chip: Option<&str>,
        ane: bool,
    ) -> DeviceFacts {
        let mobile = match os {
            "macos" => false,
            "ios" | "tvos" | "visionos" | "watchos" => true,
            _ => return DeviceFacts::reference(),
        };
        let version = version.map(|v| match (mobile, v.major) {
            (false, 16) | (true, 19) => OsVersion::new(26, v.minor),
            _ => v,
        });
        let parsed = chip.and_then(ChipGen::parse);
        let chip_guessed = parsed.is_none();
        let chip = parsed.unwrap_or(if mobile {
            ChipGen::NEWEST_MOBILE
        } else {
            ChipGen::NEWEST_MAC
        });
        let class = if mobile {
            DeviceClass::AppleMobile { chip }
        } else {
            DeviceClass::AppleMac { chip }
        };
        DeviceFacts {
            class,
            os: version,
            ane,
            chip_guessed,
        }
    }

    /// An accelerated executor on an Apple platform with nothing else known (before the platform
    /// layer reports): the newest known chip of this platform, OS and ANE vouched for by the executor.
    pub fn apple_unknown() -> DeviceFacts {
        DeviceFacts::apple(std::env::consts::OS, None, None, true).or_mac()
    }

    /// A non-Apple OS given to [`DeviceFacts::apple`] while an accelerated executor exists is a test
    /// or a porting setup: keep the Mac numbers rather than declaring the executor a reference one.
    fn or_mac(self) -> DeviceFacts {
        if self.class == DeviceClass::Reference {
            DeviceFacts {
                class: DeviceClass::AppleMac {
                    chip: ChipGen::NEWEST_MAC,
                },
                os: None,
                ane: true,
                chip_guessed: true,
            }
        } else {
            self
        }
    }

    /// `None` when the OS is new enough (or unknown), else why not.
    pub fn os_too_old(&self) -> Option<String> {
        let v = self.os?;
        let plan = if self.class.is_mobile() {
            MIN_IOS_COMPUTE_PLAN
        } else {
            MIN_MACOS_COMPUTE_PLAN
        };
        if v < plan {
            return Some(format!("OS {v} < {plan}: no MLComputePlan placement check"));
        }
        if v < MIN_OS_INT8_IO {
            Some(format!(
                "OS {v} < {MIN_OS_INT8_IO}: no int8 program inputs (CoreML spec 10)"
            ))
        } else {
            None
        }
    }
}

/// `NSProcessInfo.thermalState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Thermal {
    #[default]
    Nominal,
    Fair,
    Serious,
    Critical,
}

impl Thermal {
    pub const ALL: [Thermal; 4] = [
        Thermal::Nominal,
        Thermal::Fair,
        Thermal::Serious,
        Thermal::Critical,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Thermal::Nominal => "nominal",
            Thermal::Fair => "fair",
            Thermal::Serious => "serious",
            Thermal::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Thermal> {
        Thermal::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
    }

    fn to_bits(self) -> u8 {
        match self {
            Thermal::Nominal => 0,
            Thermal::Fair => 1,
            Thermal::Serious => 2,
            Thermal::Critical => 3,
        }
    }

    fn from_bits(b: u8) -> Thermal {
        match b & 3 {
            0 => Thermal::Nominal,
            1 => Thermal::Fair,
            2 => Thermal::Serious,
            _ => Thermal::Critical,
        }
    }
}

/// What changes while the process runs; set by the platform layer through `Policy::set_device_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeviceState {
    pub thermal: Thermal,
    pub low_power: bool,
    /// iOS app in the background.
    pub background: bool,
}

impl DeviceState {
    pub(crate) fn to_bits(self) -> u8 {
        self.thermal.to_bits() | (u8::from(self.low_power) << 2) | (u8::from(self.background) << 3)
    }

    pub(crate) fn from_bits(b: u8) -> DeviceState {
        DeviceState {
            thermal: Thermal::from_bits(b),
            low_power: b & 4 != 0,
            background: b & 8 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brand_strings() {
        let cases = [
            ("Apple M1", Some(ChipGen::M1)),
            ("Apple M2 Max", Some(ChipGen::M2Max)),
            ("Apple M3", Some(ChipGen::M3)),
            ("Apple M3 Ultra", Some(ChipGen::M3Ultra)),
            ("Apple M4 Pro", Some(ChipGen::M4Pro)),
            ("  apple m4 max ", Some(ChipGen::M4Max)),
            ("Apple M5", Some(ChipGen::M5)),
            ("M5 Pro", Some(ChipGen::M5Pro)),
            ("Apple M7 Max", Some(ChipGen::M5Max)),
            ("Apple M6", Some(ChipGen::M5)),
            ("Apple M4 Ultra", Some(ChipGen::M5Max)),
            ("A17 Pro", Some(ChipGen::A17Pro)),
            ("a17pro", Some(ChipGen::A17Pro)),
            ("A18", Some(ChipGen::A18)),
            ("A18 Pro", Some(ChipGen::A18Pro)),
            ("A15 Bionic", Some(ChipGen::A15)),
            ("A12 Bionic", Some(ChipGen::A14)),
            ("A21 Pro", Some(ChipGen::A19Pro)),
            ("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", None),
            ("Apple", None),
            ("", None),
            ("M", None),
            ("M0", None),
            ("Apple M4 Turbo", None),
            ("A3", None),
            ("M99999999999", None),
        ];
        for (s, want) in cases {
            assert_eq!(ChipGen::from_brand(s), want, "{s:?}");
        }
    }

    #[test]
    fn machine_identifiers() {
        let cases = [
            ("iPhone13,2", Some(ChipGen::A14)),
            ("iPhone14,5", Some(ChipGen::A15)),
            ("iPhone15,2", Some(ChipGen::A16)),
            ("iPhone16,1", Some(ChipGen::A17Pro)),
            ("iPhone16,2", Some(ChipGen::A17Pro)),
            ("iPhone17,1", Some(ChipGen::A18Pro)),
            ("iPhone17,3", Some(ChipGen::A18)),
            ("iPhone17,5", Some(ChipGen::A18)),
            ("iPhone18,1", Some(ChipGen::A19Pro)),
            ("iPhone18,3", Some(ChipGen::A19)),
            ("iPhone30,1", Some(ChipGen::A19Pro)),
            ("iPhone9,1", Some(ChipGen::A14)),
            ("iPad16,3", Some(ChipGen::M4)),
            ("iPad16,1", Some(ChipGen::A17Pro)),
            ("iPad13,8", Some(ChipGen::M1)),
            ("iPad15,3", Some(ChipGen::M3)),
            ("iPad40,1", Some(ChipGen::M5)),
            ("arm64", None),
            ("iPhone", None),
            ("iPhone16", None),
            ("iPhonex,1", None),
            ("Mac16,1", None),
        ];
        for (s, want) in cases {
            assert_eq!(ChipGen::from_machine(s), want, "{s:?}");
        }
        assert_eq!(ChipGen::parse("iPhone16,1"), Some(ChipGen::A17Pro));
        assert_eq!(ChipGen::parse("Apple M4"), Some(ChipGen::M4));
    }

    #[test]
    fn names_round_trip() {
        for c in ChipGen::ALL {
            assert_eq!(ChipGen::from_brand(c.name()), Some(c), "{c}");
            assert_eq!(ChipGen::from_brand(&format!("Apple {c}")), Some(c), "{c}");
        }
    }

    #[test]
    fn facts_from_platform() {
        let f = DeviceFacts::apple(
            "macos",
            Some(OsVersion::new(16, 1)),
            Some("Apple M4 Pro"),
            true,
        );
        assert_eq!(
            f.class,
            DeviceClass::AppleMac {
                chip: ChipGen::M4Pro
            }
        );
        assert_eq!(f.os, Some(OsVersion::new(26, 1)));
        assert!(!f.chip_guessed);
        assert_eq!(f.os_too_old(), None);

        let f = DeviceFacts::apple("ios", Some(OsVersion::new(19, 0)), Some("iPhone17,1"), true);
        assert_eq!(
            f.class,
            DeviceClass::AppleMobile {
                chip: ChipGen::A18Pro
            }
        );
        assert_eq!(f.os, Some(OsVersion::new(26, 0)));

        let f = DeviceFacts::apple("ios", Some(OsVersion::new(17, 2)), Some("iPad16,3"), true);
        assert_eq!(f.class, DeviceClass::AppleMobile { chip: ChipGen::M4 });
        assert!(f.os_too_old().unwrap().contains("MLComputePlan"));

        let f = DeviceFacts::apple(
            "macos",
            Some(OsVersion::new(15, 5)),
            Some("Apple Silicon Deluxe"),
            true,
        );
        assert_eq!(
            f.class,
            DeviceClass::AppleMac {
                chip: ChipGen::NEWEST_MAC
            }
        );
        assert!(f.chip_guessed);
        assert!(f.os_too_old().unwrap().contains("int8"));

        assert_eq!(
            DeviceFacts::apple("linux", None, Some("Apple M4"), true),
            DeviceFacts::reference()
        );
        assert_eq!(
            DeviceFacts::apple_unknown()
                .class
                .chip()
                .map(|c| c.supported()),
            Some(true)
        );
    }

    #[test]
    fn state_bits_round_trip() {
        for thermal in Thermal::ALL {
            for low_power in [false, true] {
                for background in [false, true] {
                    let s = DeviceState {
                        thermal,
                        low_power,
                        background,
                    };
                    assert_eq!(DeviceState::from_bits(s.to_bits()), s);
                }
            }
        }
        assert_eq!(Thermal::parse(" Serious "), Some(Thermal::Serious));
        assert_eq!(Thermal::parse("hot"), None);
        assert_eq!(OsVersion::parse("14.4.1"), Some(OsVersion::new(14, 4)));
        assert_eq!(OsVersion::parse("26"), Some(OsVersion::new(26, 0)));
        assert_eq!(OsVersion::parse("x"), None);
    }
}
