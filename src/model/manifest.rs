//! `model.toml` and `ensembles.toml`: the serde shapes and their validation.
