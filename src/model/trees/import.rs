//! `beast import-trees MODEL --out DIR`: a saved XGBoost JSON / LightGBM
//! text model → a model version folder with its `model.toml` beside it.
//!
//! - `--out models/fraud/1`: DIR is the version folder (its name a version
//!   number); `model.toml` goes to `models/fraud/`.
//! - `--out models --name fraud [--version 1]`: DIR is the repository.
//!
//! The file is parsed and checked exactly as the server will load it, so a
//! model the server would refuse (categorical splits, DART, ranking...) is
//! refused here with the same message. The version folder is written under a
//! hidden temporary name and renamed into place, so a server starting
//! meanwhile sees all of it or none. An existing version is never
//! overwritten; an existing `model.toml` is kept if it is the same text and
//! refused otherwise (all versions of a model share it).

use super::manifest::{check, TreeTask, TreesManifest};
use super::{Forest, TreeFormat};
use crate::model::BatchLimits;
use std::fs;
use std::path::{Path, PathBuf};

/// What `beast import-trees` was asked (its command-line arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ImportArgs {
    /// The saved model file: .json (XGBoost) or .txt (LightGBM).
    pub model: PathBuf,
    /// The version folder (models/NAME/N), or with --name the repository.
    #[arg(long)]
    pub out: PathBuf,
    /// Model name: write into OUT/NAME/VERSION.
    #[arg(long)]
    pub name: Option<String>,
    /// Version number (default 1) when OUT is the repository.
    #[arg(long)]
    pub version: Option<u32>,
    /// Class names, comma-separated, one per output column.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
}

/// What was written.
#[derive(Debug)]
pub struct Imported {
    pub model_dir: PathBuf,
    pub version_dir: PathBuf,
    pub forest: Forest,
}

/// The format of a model file: by extension, else by its first byte.
pub fn detect_format(path: &Path, bytes: &[u8]) -> Result<TreeFormat, String> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => return Ok(TreeFormat::XgboostJson),
        Some("txt") => return Ok(TreeFormat::LightgbmText),
        _ => {}
    }
    let start = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if start == Some(&b'{') {
        Ok(TreeFormat::XgboostJson)
    } else if bytes.starts_with(b"tree\n") || bytes.starts_with(b"tree\r\n") {
        Ok(TreeFormat::LightgbmText)
    } else {
        Err("not an XGBoost JSON (.json) or LightGBM text (.txt) model (UBJSON and binary models: save as .json)".into())
    }
}

pub fn import(args: &ImportArgs, defaults: &BatchLimits) -> Result<Imported, String> {
    let file = args.model.display();
    let bytes = fs::read(&args.model).map_err(|e| format!("{file}: {e}"))?;
    let format = detect_format(&args.model, &bytes).map_err(|e| format!("{file}: {e}"))?;
    let forest = format.parse(&bytes).map_err(|e| format!("{file}: {e}"))?;
    let man = TreesManifest {
        format,
        input_width: forest.num_features,
        task: Some(TreeTask::of(forest.objective)),
        classes: args.classes.clone(),
        batch: *defaults,
    };
    check(&man, &forest).map_err(|e| format!("--classes: {e}"))?;

    let (model_dir, version) = if args.name.is_some() || args.version.is_some() {
        let name = match &args.name {
            Some(n) => n.clone(),
            None => args
                .model
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| format!("{file}: give --name (no usable file name)"))?
                .to_string(),
        };
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(format!("--name {name:?}: not a model folder name"));
        }
        (args.out.join(name), args.version.unwrap_or(1))
    } else {
        let last = args.out.file_name().and_then(|s| s.to_str()).unwrap_or("");
        let v = last
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= 1 && v.to_string() == last)
            .ok_or_else(|| {
                format!(
                    "--out {}: not a version folder (models/NAME/N, N a positive integer); or give --name to write into a repository",
                    args.out.display()
                )
            })?;
        let parent = args
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                format!(
                    "--out {}: needs a model folder above it",
                    args.out.display()
                )
            })?;
        (parent.to_path_buf(), v)
    };
    if version == 0 {
        return Err("--version: must be >= 1".into());
    }
    let version_dir = model_dir.join(version.to_string());
    if version_dir.exists() {
        return Err(format!(
            "{}: exists (a version is never overwritten; pick the next number)",
            version_dir.display()
        ));
    }
    fs::create_dir_all(&model_dir).map_err(|e| format!("{}: {e}", model_dir.display()))?;
    let toml_path = model_dir.join("model.toml");
    let text = man.to_toml();
    match fs::read_to_string(&toml_path) {
        Ok(old) if old == text => {}
        Ok(_) => {
            return Err(format!(
            "{}: exists and differs from what this model needs (all versions share it):\n{text}",
            toml_path.display()
        ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&toml_path, text.as_bytes())?;
        }
        Err(e) => return Err(format!("{}: {e}", toml_path.display())),
    }
    let tmp = model_dir.join(format!(".tmp-import-{version}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::write(tmp.join(format.file_name()), &bytes)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, &version_dir).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        format!("{}: {e}", version_dir.display())
    })?;
    Ok(Imported {
        model_dir,
        version_dir,
        forest,
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("toml.tmp-{}", std::process::id()));
    fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `beast import-trees`: import and print one line saying what was written.
pub fn run(args: &ImportArgs) -> Result<(), String> {
    let im = import(args, &BatchLimits::default())?;
    let f = &im.forest;
    eprintln!(
        "beast: imported {} ({} {}, {} trees, max depth {}, {} features → {} outputs, {:.1} node visits/row) into {} (model.toml in {})",
        args.model.display(),
        f.format.name(),
        f.objective_name,
        f.num_trees(),
        f.max_depth(),
        f.num_features,
        f.output_width(),
        f.node_visits_per_row,
        im.version_dir.display(),
        im.model_dir.display()
    );
    Ok(())
}
