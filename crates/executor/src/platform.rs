//! Facts about this machine that decide whether the Neural Engine can be used, and the choice of
//! executor.
//!
//! Portable: off Apple every probe answers "n/a" (`None`), and [`best_executor`] is the reference
//! executor. On Apple: OS version (`NSProcessInfo.operatingSystemVersion`), OS build (`kern.osversion`,
//! for cache keys), chip (`machdep.cpu.brand_string` on macOS, `hw.machine` on iOS — passed up as text,
//! the policy crate parses it), Neural Engine presence (`MLModel.availableComputeDevices`), thermal state,
//! Low Power Mode, and whether the app is in the background (iOS; observed through
//! `NSNotificationCenter` by notification name, without linking UIKit).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Executor;
use crate::background::BackgroundExecutor;
use crate::reference::ReferenceExecutor;

/// A memory budget in bytes: `var` in MiB when set, else the platform's default: on iOS, a quarter of
/// what `os_proc_available_memory` says the app may still allocate; unbounded (`u64::MAX`) elsewhere.
/// The resident-weight and executor-surface budgets both use it.
pub fn memory_budget(var: &str) -> u64 {
    if let Some(mb) = std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return mb.saturating_mul(1 << 20);
    }
    #[cfg(target_os = "ios")]
    {
        unsafe extern "C" {
            fn os_proc_available_memory() -> usize;
        }
        // SAFETY: a libSystem query without arguments (iOS 13+).
        let avail = unsafe { os_proc_available_memory() } as u64;
        if avail > 0 {
            return avail / 4;
        }
    }
    u64::MAX
}

/// The first OS major version whose CoreML takes int8 model inputs (every program uses spec 10).
pub const INT8_IO_MAJOR: u64 = 26;

/// An OS version as the OS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OsVersion {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl fmt::Display for OsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl OsVersion {
    /// The marketing major version. A binary linked against an SDK older than 26 is told macOS "16" /
    /// iOS "19" on a 26 system (Apple's compatibility numbering); both mean 26.
    pub fn marketing_major(&self, os: &str) -> u64 {
        match (os, self.major) {
            ("macos", 16) | ("ios", 19) => 26,
            (_, m) => m,
        }
    }
}

/// `NSProcessInfoThermalState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Thermal {
    Nominal,
    Fair,
    Serious,
    Critical,
}

impl Thermal {
    pub fn name(self) -> &'static str {
        match self {
            Thermal::Nominal => "nominal",
            Thermal::Fair => "fair",
            Thermal::Serious => "serious",
            Thermal::Critical => "critical",
        }
    }
}

impl fmt::Display for Thermal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is known about the Neural Engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeuralEngine {
    /// `MLModel.availableComputeDevices` lists one (core count when reported).
    Present {
        cores: Option<u64>,
    },
    Absent,
    /// The probe is unavailable (OS too old for the API) or not an Apple platform.
    Unknown(String),
}

impl NeuralEngine {
    pub fn present(&self) -> bool {
        matches!(self, NeuralEngine::Present { .. })
    }
}

impl fmt::Display for NeuralEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NeuralEngine::Present { cores: Some(c) } => write!(f, "Neural Engine ({c} cores)"),
            NeuralEngine::Present { cores: None } => f.write_str("Neural Engine"),
            NeuralEngine::Absent => f.write_str("no Neural Engine"),
            NeuralEngine::Unknown(why) => write!(f, "Neural Engine n/a ({why})"),
        }
    }
}

/// Static facts, probed once per call of [`facts`] (cheap: a few sysctls and one CoreML query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformFacts {
    /// `std::env::consts::OS`: `macos`, `ios`, `linux`, …
    pub os: String,
    pub os_version: Option<OsVersion>,
    /// e.g. `25A354` (`kern.osversion`); the cache key's OS part on Apple.
    pub os_build: Option<String>,
    /// Chip text: `Apple M4 Pro` (macOS brand string) or `iPhone17,1` (iOS `hw.machine`).
    pub chip: Option<String>,
    /// Hardware model, e.g. `Mac16,1` (macOS `hw.model`); None elsewhere.
    pub model: Option<String>,
    pub neural_engine: NeuralEngine,
}

impl PlatformFacts {
    /// Why the CoreML executor cannot run programs here, or `None` when it can.
    pub fn unusable_reason(&self) -> Option<String> {
        if !cfg!(target_vendor = "apple") {
            return Some(format!("{} is not an Apple platform", self.os));
        }
        let Some(v) = self.os_version else {
            return Some("OS version unknown".into());
        };
        let major = v.marketing_major(&self.os);
        if major < INT8_IO_MAJOR {
            return Some(format!(
                "{} {v} is older than {INT8_IO_MAJOR}: CoreML takes int8 model inputs from {INT8_IO_MAJOR} on",
                self.os
            ));
        }
        if !self.neural_engine.present() {
            return Some(format!("{}", self.neural_engine));
        }
        None
    }

    /// One line for logs and `ggml_backend_get_features`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} (build {}), chip {}{}, {}",
            self.os,
            na(&self.os_version),
            na(&self.os_build),
            na(&self.chip),
            self.model
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default(),
            self.neural_engine
        )
    }
}

/// `n/a` for a missing fact.
pub fn na<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

/// Probes the static facts.
pub fn facts() -> PlatformFacts {
    #[cfg(target_vendor = "apple")]
    {
        apple::facts()
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        PlatformFacts {
            os: std::env::consts::OS.to_owned(),
            os_version: None,
            os_build: None,
            chip: None,
            model: None,
            neural_engine: NeuralEngine::Unknown("not an Apple platform".into()),
        }
    }
}

/// Thermal state now; `None` ("n/a") off Apple.
pub fn thermal_state() -> Option<Thermal> {
    #[cfg(target_vendor = "apple")]
    {
        apple::thermal_state()
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        None
    }
}

/// Low Power Mode now; `None` ("n/a") off Apple.
pub fn low_power_mode() -> Option<bool> {
    #[cfg(target_vendor = "apple")]
    {
        Some(apple::low_power_mode())
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        None
    }
}

static BACKGROUND: AtomicBool = AtomicBool::new(false);

/// Set while an iOS app is in the background (after `UIApplicationDidEnterBackgroundNotification`,
/// until `UIApplicationWillEnterForegroundNotification`). The policy reads it: iOS does not let a
/// background app use the Neural Engine freely. Always false until [`watch_app_lifecycle`] ran, and
/// always false off Apple. Compiled programs stay cached either way.
pub fn background() -> &'static AtomicBool {
    &BACKGROUND
}

pub fn in_background() -> bool {
    BACKGROUND.load(Ordering::Relaxed)
}

/// Starts observing the app lifecycle notifications (once per process; later calls do nothing).
/// Returns whether observers are installed (false off Apple).
pub fn watch_app_lifecycle() -> bool {
    #[cfg(target_vendor = "apple")]
    {
        apple::watch_app_lifecycle()
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        false
    }
}

/// Everything in one line: static facts plus thermal, power and lifecycle state.
pub fn describe() -> String {
    let f = facts();
    format!(
        "{}; thermal {}; low power {}; background {}",
        f.describe(),
        na(&thermal_state()),
        na(&low_power_mode()),
        in_background()
    )
}

/// The executor the backend should use, and why: the CoreML executor on an Apple device that can run
/// the programs, the reference executor elsewhere. `GGML_COREML_EXECUTOR=reference` forces the
/// reference executor.
///
/// The CoreML executor prepares programs on a background worker ([`BackgroundExecutor`]) unless
/// `GGML_COREML_COMPILE=sync`; the reference executor does only with `GGML_COREML_COMPILE=background`
/// (tests of the not-ready path, with `GGML_COREML_REFERENCE_COMPILE_MS` as a slow compiler).
pub fn best_executor() -> (Arc<dyn Executor>, String) {
    let reference = || -> Arc<dyn Executor> {
        let r: Arc<dyn Executor> = Arc::new(ReferenceExecutor::from_env());
        if std::env::var("GGML_COREML_COMPILE")
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("background"))
        {
            Arc::new(BackgroundExecutor::new(r, compile_watchdog()))
        } else {
            r
        }
    };
    if std::env::var("GGML_COREML_EXECUTOR").is_ok_and(|v| v.eq_ignore_ascii_case("reference")) {
        return (
            reference(),
            "reference executor (GGML_COREML_EXECUTOR=reference)".into(),
        );
    }
    #[cfg(target_vendor = "apple")]
    {
        match crate::coreml::try_new() {
            Ok(e) => {
                let caps = e.capabilities();
                if caps.accelerated {
                    let e: Arc<dyn Executor> = Arc::new(e);
                    if crate::background::background_enabled() {
                        return (
                            Arc::new(BackgroundExecutor::new(e, compile_watchdog())),
                            format!("{} (programs prepared in the background)", caps.description),
                        );
                    }
                    // GGML_COREML_COMPILE=sync: the startup probe runs here, on the calling thread.
                    if let Err(why) = e.probe() {
                        return (
                            reference(),
                            format!("reference executor: CoreML startup probe failed: {why}"),
                        );
                    }
                    return (e, caps.description);
                }
                (
                    reference(),
                    format!("reference executor: {}", caps.description),
                )
            }
            Err(why) => (
                reference(),
                format!("reference executor: CoreML executor unavailable: {why}"),
            ),
        }
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        (
            reference(),
            format!(
                "reference executor: {} is not an Apple platform",
                std::env::consts::OS
            ),
        )
    }
}

/// How long a program may be in preparation before the compile circuit breaker opens: three times
/// `GGML_COREML_COMPILE_TIMEOUT_S` (compile, compute plan and load each have that limit; default 300 s).
pub fn compile_watchdog() -> std::time::Duration {
    let s = std::env::var("GGML_COREML_COMPILE_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(300);
    std::time::Duration::from_secs(s.saturating_mul(3))
}

#[cfg(target_vendor = "apple")]
mod apple {
    use std::ffi::CStr;
    use std::ptr::NonNull;
    use std::sync::Once;
    use std::sync::atomic::Ordering;

    use block2::RcBlock;
    use objc2::msg_send;
    use objc2::rc::Retained;
    use objc2::runtime::{AnyClass, AnyObject};
    use objc2_foundation::{
        NSNotification, NSNotificationCenter, NSOperationQueue, NSProcessInfo,
        NSProcessInfoThermalState, NSString, NSThread,
    };

    use super::{BACKGROUND, NeuralEngine, OsVersion, PlatformFacts, Thermal};

    /// A string sysctl, or None when the name does not exist here.
    fn sysctl_string(name: &CStr) -> Option<String> {
        let mut len: libc::size_t = 0;
        // SAFETY: a size query: null output buffer, `len` receives the size; `name` is NUL-terminated.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                std::ptr::null_mut(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 || len == 0 {
            return None;
        }
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` has `len` writable bytes and `len` tells sysctl so; it writes at most that many.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            return None;
        }
        buf.truncate(len);
        while buf.last() == Some(&0) {
            buf.pop();
        }
        let s = String::from_utf8_lossy(&buf).trim().to_owned();
        (!s.is_empty()).then_some(s)
    }

    pub(super) fn facts() -> PlatformFacts {
        let info = NSProcessInfo::processInfo();
        let v = info.operatingSystemVersion();
        let os_version = Some(OsVersion {
            major: v.majorVersion.max(0) as u64,
            minor: v.minorVersion.max(0) as u64,
            patch: v.patchVersion.max(0) as u64,
        });
        let (chip, model) = if cfg!(target_os = "macos") {
            (
                sysctl_string(c"machdep.cpu.brand_string"),
                sysctl_string(c"hw.model"),
            )
        } else {
            (sysctl_string(c"hw.machine"), None)
        };
        let neural_engine = match crate::coreml::neural_engine_cores() {
            Ok(Some(cores)) => NeuralEngine::Present { cores },
            Ok(None) => NeuralEngine::Absent,
            Err(why) => NeuralEngine::Unknown(why),
        };
        PlatformFacts {
            os: std::env::consts::OS.to_owned(),
            os_version,
            os_build: sysctl_string(c"kern.osversion"),
            chip,
            model,
            neural_engine,
        }
    }

    pub(super) fn thermal_state() -> Option<Thermal> {
        let t = NSProcessInfo::processInfo().thermalState();
        Some(match t {
            NSProcessInfoThermalState::Nominal => Thermal::Nominal,
            NSProcessInfoThermalState::Fair => Thermal::Fair,
            NSProcessInfoThermalState::Serious => Thermal::Serious,
            NSProcessInfoThermalState::Critical => Thermal::Critical,
            _ => return None,
        })
    }

    pub(super) fn low_power_mode() -> bool {
        NSProcessInfo::processInfo().isLowPowerModeEnabled()
    }

    static WATCH: Once = Once::new();

    pub(super) fn watch_app_lifecycle() -> bool {
        WATCH.call_once(|| {
            observe("UIApplicationDidEnterBackgroundNotification", true);
            observe("UIApplicationWillEnterForegroundNotification", false);
            read_state_at_start();
        });
        true
    }

    /// `UIApplicationStateBackground`.
    const STATE_BACKGROUND: isize = 2;

    /// The notifications only report changes: a process started in the background (background fetch,
    /// a BGTask) or a library loaded late would think it is in the foreground. Read
    /// `UIApplication.sharedApplication.applicationState` once, by class name (UIKit stays unlinked; no
    /// UIApplication class on macOS). UIKit wants it read on the main thread: directly when we are on it,
    /// else on the main queue (no waiting: a blocked main thread must not block us).
    fn read_state_at_start() {
        if AnyClass::get(c"UIApplication").is_none() {
            return;
        }
        if NSThread::isMainThread_class() {
            read_application_state();
        } else {
            let block = RcBlock::new(read_application_state);
            // SAFETY: the block only reads UIKit state on the main thread and stores to an atomic.
            unsafe { NSOperationQueue::mainQueue().addOperationWithBlock(&block) };
        }
    }

    fn read_application_state() {
        let Some(cls) = AnyClass::get(c"UIApplication") else {
            return;
        };
        // SAFETY: `+[UIApplication sharedApplication]` takes no arguments and returns the app object
        // (nil in an app extension); `-applicationState` returns an NSInteger. Run on the main thread.
        let state: Option<isize> = unsafe {
            let app: Option<Retained<AnyObject>> = msg_send![cls, sharedApplication];
            app.map(|a| msg_send![&*a, applicationState])
        };
        if let Some(st) = state {
            BACKGROUND.store(st == STATE_BACKGROUND, Ordering::Relaxed);
        }
    }

    /// Sets [`BACKGROUND`] to `value` whenever the notification `name` is posted. The names are
    /// UIKit's string constants; matching them by value keeps UIKit unlinked (on macOS they never fire).
    fn observe(name: &str, value: bool) {
        let center = NSNotificationCenter::defaultCenter();
        let name = NSString::from_str(name);
        let block = RcBlock::new(move |_note: NonNull<NSNotification>| {
            BACKGROUND.store(value, Ordering::Relaxed);
        });
        // SAFETY: no object filter (`None` is allowed); `queue: None` runs the block on the posting
        // thread; the block only stores to a static atomic, so it is sendable and outlives nothing.
        let token = unsafe {
            center.addObserverForName_object_queue_usingBlock(Some(&name), None, None, &block)
        };
        // The observer lives as long as the process; the center keeps only a weak reference to the
        // token, so keep ours.
        std::mem::forget(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_versions_count_as_26() {
        let v = |major| OsVersion {
            major,
            minor: 0,
            patch: 0,
        };
        assert_eq!(v(16).marketing_major("macos"), 26);
        assert_eq!(v(19).marketing_major("ios"), 26);
        assert_eq!(v(15).marketing_major("macos"), 15);
        assert_eq!(v(16).marketing_major("ios"), 16);
        assert_eq!(v(27).marketing_major("macos"), 27);
    }

    #[test]
    fn unusable_reasons() {
        let mut f = PlatformFacts {
            os: "macos".into(),
            os_version: Some(OsVersion {
                major: 15,
                minor: 5,
                patch: 0,
            }),
            os_build: Some("24F74".into()),
            chip: Some("Apple M3".into()),
            model: None,
            neural_engine: NeuralEngine::Present { cores: Some(16) },
        };
        let why = f.unusable_reason().expect("refused");
        if cfg!(target_vendor = "apple") {
            assert!(why.contains("older than 26"), "{why}");
            f.os_version = Some(OsVersion {
                major: 16,
                minor: 0,
                patch: 0,
            });
            assert_eq!(f.unusable_reason(), None);
            f.neural_engine = NeuralEngine::Absent;
            assert!(f.unusable_reason().unwrap().contains("no Neural Engine"));
        } else {
            assert!(why.contains("not an Apple platform"), "{why}");
        }
        assert!(f.describe().contains("Apple M3"));
    }

    #[test]
    fn off_apple_everything_is_na() {
        if cfg!(target_vendor = "apple") {
            return;
        }
        let f = facts();
        assert_eq!(f.os_version, None);
        assert_eq!(f.chip, None);
        assert!(f.unusable_reason().is_some());
        assert_eq!(thermal_state(), None);
        assert_eq!(low_power_mode(), None);
        assert!(!watch_app_lifecycle());
        assert!(!in_background());
        let d = describe();
        assert!(
            d.contains("thermal n/a") && d.contains("low power n/a"),
            "{d}"
        );
    }

    #[test]
    fn best_executor_off_apple_is_the_reference() {
        if cfg!(target_vendor = "apple") {
            return;
        }
        let (e, why) = best_executor();
        assert_eq!(e.name(), "reference");
        assert!(!e.capabilities().accelerated);
        assert!(why.contains("reference"), "{why}");
    }
}
