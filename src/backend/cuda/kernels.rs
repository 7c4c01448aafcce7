//! The NVRTC-compiled kernels (`kernels/mlp.cu`) and the codes they take.

use crate::model::{Activation, OutputTransform};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels' source, compiled at start-up by NVRTC.
const MLP_SRC: &str = include_str!("../../../kernels/mlp.cu");

/// The loaded kernels of one context.
pub(super) struct Kernels {
    pub to_f16: CudaFunction,
    pub epilogue: CudaFunction,
}

impl Kernels {
    /// Compiles (once per process and architecture) and loads the kernels.
    pub fn load(ctx: &Arc<CudaContext>, major: i32, minor: i32) -> Result<Kernels, String> {
        let ptx = ptx_for(&format!("compute_{major}{minor}"))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the kernels: {e}"))?;
        let to_f16 = module
            .load_function("to_f16")
            .map_err(|e| format!("kernel to_f16: {e}"))?;
        let epilogue = module
            .load_function("epilogue")
            .map_err(|e| format!("kernel epilogue: {e}"))?;
        Ok(Kernels { to_f16, epilogue })
    }
}

/// PTX per target architecture, compiled once per process and shared by the
/// backends of all shards.
fn ptx_for(arch: &str) -> Result<String, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(arch).cloned()) {
        return Ok(p);
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("mlp.cu".to_string()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(MLP_SRC, opts)
        .map_err(|e| format!("NVRTC failed to compile kernels/mlp.cu for {arch}: {e}"))?
        .to_src();
    if let Ok(mut c) = cache.lock() {
        c.insert(arch.to_string(), ptx.clone());
    }
    Ok(ptx)
}

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

pub(super) fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Identity => 0,
        Activation::Relu => 1,
        Activation::Gelu => 2,
        Activation::Tanh => 3,
        Activation::Sigmoid => 4,
    }
}

pub(super) fn transform_code(t: OutputTransform) -> i32 {
    match t {
        OutputTransform::Identity => 0,
        OutputTransform::Softmax => 1,
        OutputTransform::Sigmoid => 2,
    }
}
