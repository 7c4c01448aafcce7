//! Importers: model formats other than beast's own repository layout,
//! converted once, offline, into a model folder the server loads.
//!
//! Owns: `beast import-onnx` ([`onnx`]). Nothing here runs in the server.

pub mod onnx;
