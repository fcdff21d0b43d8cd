//! The registry `CoreML`: built once at `ggml_backend_init` for the host's detected layout, returned as
//! the same pointer on every call, plus the backend-specific functions reached through
//! `ggml_backend_reg_get_proc_address` (declared in include/ggml-coreml.h).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use ggml_coreml_policy::Mode;

use crate::engine::engine;
use crate::faces::{accel, buffer, hybrid};
use crate::ffi::abi::*;
use crate::ffi::ggml::{self, Layout};
use crate::ffi::guard::guard;
use crate::log;

/// Pointers handed to ggml. Leaked: ggml never unloads a backend library.
pub struct Globals {
    pub reg: *mut Reg,
    pub accel_dev: *mut Dev,
    pub buft: BuftPtr,
    pub layout: Layout,
    pub description: CString,
    pub devices: Vec<*mut Dev>,
    features: Vec<GgmlBackendFeature>,
    _feature_strings: Vec<CString>,
}

// SAFETY: the pointed-to structs are immutable after init and ggml reads them from any thread.
unsafe impl Send for Globals {}
// SAFETY: as above.
unsafe impl Sync for Globals {}

static GLOBALS: OnceLock<Option<Globals>> = OnceLock::new();

pub fn globals() -> Option<&'static Globals> {
    GLOBALS.get().and_then(Option::as_ref)
}

/// The registry, or NULL (with one log line) when this host cannot be served.
pub fn registry() -> *mut Reg {
    GLOBALS
        .get_or_init(init)
        .as_ref()
        .map_or(ptr::null_mut(), |g| g.reg)
}

fn init() -> Option<Globals> {
    let api = match ggml::resolve() {
        Ok(a) => a,
        Err(e) => {
            // ggml's logger is not reachable: this goes to stderr.
            log::error(&format!("not registering: {e}"));
            return None;
        }
    };
    let eng = engine();
    let caps = eng.executor.capabilities();
    let description = CString::new(format!(
        "Apple Neural Engine via CoreML ({})",
        caps.description
    ))
    .unwrap_or_else(|_| c"Apple Neural Engine via CoreML".to_owned());

    let reg = Box::into_raw(Box::new(GgmlBackendReg {
        api_version: api.layout.api_version(),
        iface: GgmlBackendRegI {
            get_name: Some(reg_get_name),
            get_device_count: Some(reg_get_device_count),
            get_device: Some(reg_get_device),
            get_proc_address: Some(reg_get_proc_address),
        },
        context: ptr::null_mut(),
    }));
    let accel_dev = Box::into_raw(Box::new(GgmlBackendDevice {
        iface: accel::DEVICE_IFACE,
        reg,
        context: ptr::null_mut(),
    }));
    let buft = buffer::new_buft(api.layout, accel_dev);
    let mut devices = Vec::new();
    if std::env::var("GGML_COREML_DISABLE").is_ok_and(|v| v == "1") {
        log::warn("GGML_COREML_DISABLE=1: registering no devices");
    } else {
        devices.push(accel_dev);
        if let Ok(inner) = std::env::var("GGML_COREML_HYBRID")
            && !inner.trim().is_empty()
        {
            match hybrid::create(inner.trim(), reg) {
                Ok(d) => devices.push(d),
                Err(e) => log::warn(&format!(
                    "GGML_COREML_HYBRID={inner}: {e}; no hybrid device"
                )),
            }
        }
    }

    let strings: Vec<CString> = [
        ("COREML_POLICY", eng.policy.mode().name().to_string()),
        ("COREML_EXECUTOR", eng.executor.name().to_string()),
        ("COREML_LAYOUT", format!("{:?}", api.layout)),
        ("COREML_VERSION", env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| {
        [
            CString::new(k).expect("no NUL"),
            CString::new(v).unwrap_or_default(),
        ]
    })
    .collect();
    let mut features: Vec<GgmlBackendFeature> = strings
        .chunks(2)
        .map(|kv| GgmlBackendFeature {
            name: kv[0].as_ptr(),
            value: kv[1].as_ptr(),
        })
        .collect();
    features.push(GgmlBackendFeature {
        name: ptr::null(),
        value: ptr::null(),
    });

    log::info(&format!(
        "registered (ggml layout {:?}, API version {}, symbols from {}); {}",
        api.layout,
        api.layout.api_version(),
        api.source,
        caps.description
    ));
    Some(Globals {
        reg,
        accel_dev,
        buft,
        layout: api.layout,
        description,
        devices,
        features,
        _feature_strings: strings,
    })
}

unsafe extern "C" fn reg_get_name(_reg: *mut Reg) -> *const c_char {
    accel::NAME.as_ptr()
}

unsafe extern "C" fn reg_get_device_count(_reg: *mut Reg) -> usize {
    globals().map_or(0, |g| g.devices.len())
}

unsafe extern "C" fn reg_get_device(_reg: *mut Reg, i: usize) -> *mut Dev {
    globals()
        .and_then(|g| g.devices.get(i).copied())
        .unwrap_or(ptr::null_mut())
}

unsafe extern "C" fn reg_get_proc_address(_reg: *mut Reg, name: *const c_char) -> *mut c_void {
    guard("get_proc_address", ptr::null_mut(), || {
        if name.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: ggml passes a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let f: *const () = match name {
            b"ggml_backend_set_n_threads" => set_n_threads as *const (),
            b"ggml_backend_get_features" => get_features as *const (),
            b"ggml_backend_coreml_set_policy" => crate::ggml_backend_coreml_set_policy as *const (),
            b"ggml_backend_coreml_get_policy" => crate::ggml_backend_coreml_get_policy as *const (),
            b"ggml_backend_coreml_get_stats" => crate::ggml_backend_coreml_get_stats as *const (),
            b"ggml_backend_coreml_reset_stats" => {
                crate::ggml_backend_coreml_reset_stats as *const ()
            }
            b"ggml_backend_coreml_version" => crate::ggml_backend_coreml_version as *const (),
            b"ggml_backend_coreml_set_weight_budget" => {
                crate::ggml_backend_coreml_set_weight_budget as *const ()
            }
            b"ggml_backend_coreml_enable_hybrid" => {
                crate::ggml_backend_coreml_enable_hybrid as *const ()
            }
            _ => ptr::null(),
        };
        f as *mut c_void
    })
}

unsafe extern "C" fn set_n_threads(b: *mut GgmlBackend, n: c_int) {
    guard("set_n_threads", (), || {
        // SAFETY: ggml passes one of the backends it created from our devices.
        unsafe {
            crate::faces::set_threads(b, n);
        }
    })
}

unsafe extern "C" fn get_features(_reg: *mut Reg) -> *const GgmlBackendFeature {
    globals().map_or(ptr::null(), |g| g.features.as_ptr())
}

/// Opts in to the hybrid face after load: creates `CoreML-<inner>` and registers it with ggml.
pub fn enable_hybrid(inner: &str) -> Result<(), String> {
    let g = globals().ok_or("the backend is not registered")?;
    if hybrid::is_known(inner) {
        return Ok(());
    }
    let dev = hybrid::create(inner, g.reg)?;
    // SAFETY: `dev` was just made by hybrid::create.
    unsafe { hybrid::register_now(dev) };
    Ok(())
}

/// Sets the policy mode from its name; false for an unknown name.
pub fn set_policy(name: &str) -> bool {
    match Mode::parse(name) {
        Some(m) => {
            engine().policy.set_mode(m);
            log::info(&format!("policy set to {}", m.name()));
            true
        }
        None => {
            log::warn(&format!(
                "unknown policy {name:?} (latency, energy, off, always); unchanged"
            ));
            false
        }
    }
}
