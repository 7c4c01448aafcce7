#![no_main]
// The body lives in fuzz/src/lib.rs, which tests/fuzz_corpus.rs replays on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| beast_fuzz::onnx(data));
