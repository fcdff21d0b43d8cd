//! Logging through ggml's logger (so llama.cpp's log callback sees our lines), with our own level
//! filter: `GGML_COREML_LOG=error|warn|info|debug` (default `warn`).

use std::ffi::{CString, c_int};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::ffi::abi::{
    GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN,
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);
static INIT: OnceLock<()> = OnceLock::new();

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" | "0" | "1" => Some(Level::Error),
            "warn" | "warning" | "2" => Some(Level::Warn),
            "info" | "3" => Some(Level::Info),
            "debug" | "4" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
}

pub fn level() -> Level {
    INIT.get_or_init(|| {
        let l = std::env::var("GGML_COREML_LOG")
            .ok()
            .and_then(|v| Level::parse(&v))
            .unwrap_or(Level::Warn);
        LEVEL.store(l as u8, Ordering::Relaxed);
    });
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Error,
        2 => Level::Warn,
        3 => Level::Info,
        _ => Level::Debug,
    }
}

pub fn enabled(l: Level) -> bool {
    l <= level()
}

pub fn emit(l: Level, msg: &str) {
    if !enabled(l) {
        return;
    }
    let line = format!("ggml-coreml: {msg}\n");
    match crate::ffi::ggml::api() {
        Some(api) => {
            let glevel: c_int = match l {
                Level::Error => GGML_LOG_LEVEL_ERROR,
                Level::Warn => GGML_LOG_LEVEL_WARN,
                Level::Info => GGML_LOG_LEVEL_INFO,
                Level::Debug => GGML_LOG_LEVEL_DEBUG,
            };
            let c = CString::new(line.replace('\0', " ")).expect("NULs replaced");
            // SAFETY: ggml_log_internal is printf-like; we pass a constant "%s" format and one C string.
            unsafe { (api.log_internal)(glevel, c"%s".as_ptr(), c.as_ptr()) };
        }
        None => eprint!("{line}"),
    }
}

pub fn error(msg: &str) {
    emit(Level::Error, msg)
}
pub fn warn(msg: &str) {
    emit(Level::Warn, msg)
}
pub fn info(msg: &str) {
    emit(Level::Info, msg)
}
pub fn debug(msg: &str) {
    emit(Level::Debug, msg)
}
