//! CoreML calls: compile, load, compute plan, prediction, device probe. With `io.rs` the only place
//! that talks to Objective-C.
//!
//! Asynchronous CoreML APIs report on a queue of CoreML's; each call here waits on a channel with a
//! timeout, so a stuck compiler (seen on beta OS releases) becomes an error, never a hang.

use std::cell::RefCell;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::Duration;

use block2::{RcBlock, StackBlock};
use half::f16;
use objc2::rc::{Retained, autoreleasepool};
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::{AnyThread, available};
use objc2_core_ml::{
    MLCPUComputeDevice, MLComputeDeviceProtocol, MLComputePlan, MLComputeUnits,
    MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLGPUComputeDevice, MLModel,
    MLModelConfiguration, MLMultiArray, MLMultiArrayDataType, MLNeuralEngineComputeDevice,
    MLPredictionOptions,
};
use objc2_foundation::{NSDictionary, NSError, NSString, NSURL};

use super::layout::{self, OutElem};
use super::placement::{Device, OpPlacement, PlanReport};

/// A loaded model.
pub(super) struct Model(Retained<MLModel>);

// SAFETY: MLModel is not bound to a thread, and its prediction methods may be called from several
// threads at once (CoreML supports concurrent predictions on one model since macOS 14 / iOS 17; we
// require 26). Nothing else mutates the model after load.
unsafe impl Send for Model {}
// SAFETY: as above: shared references only call the thread-safe prediction API.
unsafe impl Sync for Model {}

/// How a compile ended without a compiled model.
#[derive(Debug)]
pub(super) enum CompileError {
    /// CoreML answered with an error: deterministic for this program on this OS, worth remembering.
    Rejected(String),
    /// Trouble on our side: worth retrying another time.
    Transient(String),
    /// No answer in time: retried another time, and opens the compile circuit breaker.
    Timeout(String),
}

fn error_text(e: &NSError) -> String {
    format!("{} ({} {})", e.localizedDescription(), e.domain(), e.code())
}

fn file_url(p: &Path) -> Result<Retained<NSURL>, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", p.display()))?;
    Ok(NSURL::fileURLWithPath(&NSString::from_str(s)))
}

fn url_path(u: &NSURL) -> Result<PathBuf, String> {
    u.path()
        .map(|s| PathBuf::from(s.to_string()))
        .ok_or_else(|| "CoreML returned a URL without a path".into())
}

/// `CPUAndNeuralEngine`: no GPU (there is no Neural-Engine-only option).
pub(super) fn configuration() -> Retained<MLModelConfiguration> {
    configuration_for(MLComputeUnits::CPUAndNeuralEngine)
}

pub(super) fn configuration_for(units: MLComputeUnits) -> Retained<MLModelConfiguration> {
    // SAFETY: plain creation and a setter taking a valid enum value.
    unsafe {
        let c = MLModelConfiguration::new();
        c.setComputeUnits(units);
        c
    }
}

/// Which compute units a model is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Units {
    /// `CPUAndNeuralEngine`: how programs run.
    Ane,
    /// `CPUOnly`: the same compiled model as the yardstick of the speed check.
    CpuOnly,
}

impl Units {
    fn ml(self) -> MLComputeUnits {
        match self {
            Units::Ane => MLComputeUnits::CPUAndNeuralEngine,
            Units::CpuOnly => MLComputeUnits::CPUOnly,
        }
    }
}

/// Waits for a completion handler's message.
fn wait<T>(rx: &mpsc::Receiver<T>, timeout: Duration, what: &str) -> Result<T, String> {
    rx.recv_timeout(timeout).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => format!(
            "{what}: no answer from CoreML within {} s",
            timeout.as_secs()
        ),
        mpsc::RecvTimeoutError::Disconnected => {
            format!("{what}: CoreML dropped the completion handler")
        }
    })
}

/// Compiles a `.mlpackage` (or `.mlmodel`) into a `.mlmodelc` in a temporary directory of CoreML's; the
/// caller moves it where it belongs (and removes it on every failure path). A compile that answers after
/// its timeout removes its own output: nobody is waiting for it any more.
pub(super) fn compile(package: &Path, timeout: Duration) -> Result<PathBuf, CompileError> {
    autoreleasepool(|_| compile_inner(package, timeout))
}

fn compile_inner(package: &Path, timeout: Duration) -> Result<PathBuf, CompileError> {
    let url = file_url(package).map_err(CompileError::Transient)?;
    let (tx, rx) = mpsc::channel::<Result<PathBuf, CompileError>>();
    let handler = RcBlock::new(move |out: *mut NSURL, err: *mut NSError| {
        // SAFETY: CoreML passes a valid URL or a valid error (or null), alive during the handler.
        let (out, err) = unsafe { (out.as_ref(), err.as_ref()) };
        let r = match (out, err) {
            (Some(u), _) => url_path(u).map_err(CompileError::Transient),
            (None, Some(e)) => Err(CompileError::Rejected(error_text(e))),
            (None, None) => Err(CompileError::Rejected(
                "compile failed without an error".into(),
            )),
        };
        if let Err(std::sync::mpsc::SendError(Ok(late))) = tx.send(r) {
            // The caller timed out: the temporary .mlmodelc would be left behind.
            let _ = std::fs::remove_dir_all(late);
        }
    });
    // SAFETY: `url` is a file URL; the handler is a heap block CoreML retains until it has run; it only
    // sends on a channel (a closed channel after a timeout is fine) or removes its own output.
    unsafe { MLModel::compileModelAtURL_completionHandler(&url, &handler) };
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(CompileError::Timeout(format!(
            "compile: no answer from CoreML within {} s",
            timeout.as_secs()
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(CompileError::Transient(
            "compile: CoreML dropped the completion handler".into(),
        )),
    }
}

/// Loads a compiled model with the `CPUAndNeuralEngine` configuration. The first load of a program on
/// a machine includes the Neural Engine's own compile (E5RT), which CoreML caches per OS build.
pub(super) fn load(mlmodelc: &Path, timeout: Duration) -> Result<Model, String> {
    load_with(mlmodelc, Units::Ane, timeout)
}

/// [`load`] with the given compute units.
pub(super) fn load_with(mlmodelc: &Path, units: Units, timeout: Duration) -> Result<Model, String> {
    autoreleasepool(|_| load_inner(mlmodelc, units, timeout))
}

fn load_inner(mlmodelc: &Path, units: Units, timeout: Duration) -> Result<Model, String> {
    let url = file_url(mlmodelc)?;
    let config = configuration_for(units.ml());
    let (tx, rx) = mpsc::channel::<Result<Model, String>>();
    let handler = RcBlock::new(move |model: *mut MLModel, err: *mut NSError| {
        // SAFETY: CoreML passes a valid model or error (or null), alive during the handler; retaining
        // the model keeps it alive after.
        let r = match unsafe { (Retained::retain(model), err.as_ref()) } {
            (Some(m), _) => Ok(Model(m)),
            (None, Some(e)) => Err(error_text(e)),
            (None, None) => Err("load failed without an error".into()),
        };
        let _ = tx.send(r);
    });
    // SAFETY: valid URL and configuration; the handler is a heap block retained by CoreML until run.
    unsafe { MLModel::loadContentsOfURL_configuration_completionHandler(&url, &config, &handler) };
    wait(&rx, timeout, "load")?
}

/// The compute plan of a compiled model: the preferred device of each main-function operation.
pub(super) fn plan(mlmodelc: &Path, timeout: Duration) -> Result<PlanReport, String> {
    autoreleasepool(|_| plan_inner(mlmodelc, timeout))
}

fn plan_inner(mlmodelc: &Path, timeout: Duration) -> Result<PlanReport, String> {
    if !available!(macos = 14.4, ios = 17.4) {
        return Err("MLComputePlan needs macOS 14.4 / iOS 17.4".into());
    }
    let url = file_url(mlmodelc)?;
    let config = configuration();
    let (tx, rx) = mpsc::channel::<Result<PlanReport, String>>();
    let handler = RcBlock::new(move |plan: *mut MLComputePlan, err: *mut NSError| {
        // SAFETY: CoreML passes a valid plan or error (or null), alive during the handler; the plan is
        // walked right here, nothing of it escapes.
        let r = match unsafe { (plan.as_ref(), err.as_ref()) } {
            (Some(p), _) => walk_plan(p),
            (None, Some(e)) => Err(error_text(e)),
            (None, None) => Err("compute plan failed without an error".into()),
        };
        let _ = tx.send(r);
    });
    // SAFETY: valid URL and configuration; the handler is a heap block retained by CoreML until run.
    unsafe {
        MLComputePlan::loadContentsOfURL_configuration_completionHandler(&url, &config, &handler)
    };
    wait(&rx, timeout, "compute plan")?
}

fn walk_plan(plan: &MLComputePlan) -> Result<PlanReport, String> {
    // SAFETY: getters on a live plan and its structure objects; no arguments beyond live references.
    unsafe {
        let program = plan
            .modelStructure()
            .program()
            .ok_or("the compiled model is not an ML program")?;
        let main = program
            .functions()
            .objectForKey(&NSString::from_str("main"))
            .ok_or("the program has no main function")?;
        let mut report = PlanReport::default();
        for op in main.block().operations().iter() {
            let device = plan
                .computeDeviceUsageForMLProgramOperation(&op)
                .map_or(Device::None, |u| device_of(&u.preferredComputeDevice()));
            let cost = plan
                .estimatedCostOfMLProgramOperation(&op)
                .map(|c| c.weight());
            report.ops.push(OpPlacement {
                op: op.operatorName().to_string(),
                device,
                cost,
            });
        }
        Ok(report)
    }
}

fn device_of(d: &ProtocolObject<dyn MLComputeDeviceProtocol>) -> Device {
    let o: &AnyObject = d.as_ref();
    if o.downcast_ref::<MLNeuralEngineComputeDevice>().is_some() {
        Device::NeuralEngine
    } else if o.downcast_ref::<MLGPUComputeDevice>().is_some() {
        Device::Gpu
    } else if o.downcast_ref::<MLCPUComputeDevice>().is_some() {
        Device::Cpu
    } else {
        Device::Other
    }
}

/// Neural Engine presence from `MLModel.availableComputeDevices`: `Ok(Some(cores))` when present (cores
/// when reported), `Ok(None)` when absent, `Err` when the API is unavailable (macOS 14 / iOS 17).
pub fn neural_engine_cores() -> Result<Option<Option<u64>>, String> {
    if !available!(macos = 14.0, ios = 17.0) {
        return Err("MLModel.availableComputeDevices needs macOS 14 / iOS 17".into());
    }
    // SAFETY: a class getter without arguments.
    let devices = unsafe { MLModel::availableComputeDevices() };
    for d in devices.iter() {
        let o: &AnyObject = (*d).as_ref();
        if let Some(ne) = o.downcast_ref::<MLNeuralEngineComputeDevice>() {
            // SAFETY: a getter on a live device object.
            let cores = unsafe { ne.totalCoreCount() };
            return Ok(Some(u64::try_from(cores).ok().filter(|&c| c > 0)));
        }
    }
    Ok(None)
}

/// Where the output of a prediction ended up.
pub(super) enum Output {
    /// In the backing we passed (CoreML honoured `outputBackings`).
    Backed,
    /// In an array of CoreML's own.
    Returned(Retained<MLMultiArray>),
}

/// One synchronous prediction with named input arrays and an output backing.
pub(super) fn predict(
    model: &Model,
    inputs: &[(&str, Retained<MLMultiArray>)],
    output: &str,
    backing: &MLMultiArray,
) -> Result<Output, String> {
    let names: Vec<Retained<NSString>> =
        inputs.iter().map(|(n, _)| NSString::from_str(n)).collect();
    // SAFETY: wrapping live arrays in feature values.
    let values: Vec<Retained<MLFeatureValue>> = inputs
        .iter()
        .map(|(_, a)| unsafe { MLFeatureValue::featureValueWithMultiArray(a) })
        .collect();
    let keys: Vec<&NSString> = names.iter().map(|n| &**n).collect();
    let objects: Vec<&AnyObject> = values.iter().map(|v| -> &AnyObject { v }).collect();
    let dict = NSDictionary::<NSString, AnyObject>::from_slices(&keys, &objects);
    // SAFETY: the dictionary maps names to MLFeatureValues, what the initializer takes.
    let provider = unsafe {
        MLDictionaryFeatureProvider::initWithDictionary_error(
            MLDictionaryFeatureProvider::alloc(),
            &dict,
        )
    }
    .map_err(|e| format!("inputs: {}", error_text(&e)))?;
    let out_name = NSString::from_str(output);
    let backing_obj: &AnyObject = backing;
    let backings = NSDictionary::<NSString, AnyObject>::from_slices(&[&*out_name], &[backing_obj]);
    // SAFETY: options take a dictionary of output name to MLMultiArray; the backing is not locked.
    let options = unsafe {
        let o = MLPredictionOptions::new();
        o.setOutputBackings(&backings);
        o
    };
    // SAFETY: a live model, provider and options; the call is synchronous.
    let result = unsafe {
        model
            .0
            .predictionFromFeatures_options_error(ProtocolObject::from_ref(&*provider), &options)
    }
    .map_err(|e| format!("prediction: {}", error_text(&e)))?;
    // SAFETY: getters on the live result.
    let array = unsafe {
        result
            .featureValueForName(&out_name)
            .and_then(|v| v.multiArrayValue())
    }
    .ok_or_else(|| format!("prediction returned no array named {output}"))?;
    if std::ptr::eq::<MLMultiArray>(&*array, backing) {
        Ok(Output::Backed)
    } else {
        Ok(Output::Returned(array))
    }
}

/// Copies a `[.., rows, cols]` fp16/fp32 array of CoreML's into packed fp16 `out`.
pub(super) fn read_array(
    array: &MLMultiArray,
    rows: usize,
    cols: usize,
    out: &mut [f16],
) -> Result<(), String> {
    // SAFETY: getters on a live array.
    let (dtype, shape, strides) = unsafe { (array.dataType(), array.shape(), array.strides()) };
    let elem = match dtype {
        MLMultiArrayDataType::Float16 => OutElem::F16,
        MLMultiArrayDataType::Float32 => OutElem::F32,
        other => return Err(format!("output array has data type {:#x}", other.0)),
    };
    let shape: Vec<isize> = shape.iter().map(|n| n.as_isize()).collect();
    let strides: Vec<isize> = strides.iter().map(|n| n.as_isize()).collect();
    let dims = shape.len();
    if dims < 2 || strides.len() != dims || shape[..dims - 2].iter().any(|&d| d != 1) {
        return Err(format!("output array shape {shape:?} strides {strides:?}"));
    }
    let (r, c) = (shape[dims - 2], shape[dims - 1]);
    let (rs, cs) = (strides[dims - 2], strides[dims - 1]);
    if r != rows as isize || c != cols as isize || rs < 0 || cs < 0 {
        return Err(format!(
            "output array shape {shape:?} strides {strides:?}, want [.., {rows}, {cols}]"
        ));
    }
    let result = RefCell::new(Err("getBytesWithHandler did not call back".to_owned()));
    let out = RefCell::new(out);
    let handler = StackBlock::new(|bytes: NonNull<c_void>, size: isize| {
        // SAFETY: CoreML hands a readable buffer of `size` bytes, valid during the handler.
        let src = unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<u8>(), size.max(0) as usize)
        };
        let mut out = out.borrow_mut();
        *result.borrow_mut() =
            layout::gather_f16(src, elem, rows, cols, rs as usize, cs as usize, &mut out);
    });
    // SAFETY: the handler runs synchronously, before the call returns, while `out` is borrowed.
    unsafe { array.getBytesWithHandler(&handler) };
    result.into_inner()
}
