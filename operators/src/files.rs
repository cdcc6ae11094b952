//! Writing files so that readers never see half of one: the bytes go to a hidden temporary name
//! in the same folder (`.name.partial`) and are renamed into place.

use std::path::Path;

/// Writes `bytes` to `path` through `.{name}.partial` beside it and a rename; the temporary file
/// is removed when the rename fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}
