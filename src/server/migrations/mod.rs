//! The store's migration chain: numbered revisions, each bringing a store from the version
//! before it to its own. Version 1 is the first released schema; [`LATEST`] is what this build
//! writes. [`super::store::Store::migrate`] runs the revisions a store lacks in one transaction.
//!
//! A revision works on the records as JSON values and on the files as they were laid out at its
//! version, never on today's types, so that it keeps upgrading old stores after those types
//! change. `inspectflow create-db-revision --name NAME` writes the next revision's skeleton and
//! registers it here (at the two marker comments).

use std::path::{Path, PathBuf};

use super::store::Transaction;

mod r0002_snapshots;
// create-db-revision: modules above this line

/// One step of the chain.
pub struct Revision {
    /// The schema version the store has after this revision.
    pub version: u64,
    /// A short name (the file's, without its number).
    pub name: &'static str,
    /// Upgrades a store of version `version - 1`, inside the migration's transaction; an error
    /// rolls the whole migration back.
    pub upgrade: fn(&Transaction, &Path) -> Result<(), String>,
}

/// Every revision after version 1, in order.
pub const REVISIONS: &[Revision] = &[
    r0002_snapshots::REVISION,
    // create-db-revision: revisions above this line
];

/// The schema version this build writes.
pub const LATEST: u64 = 1 + REVISIONS.len() as u64;

/// The revisions a store of `version` lacks.
pub fn after(version: u64) -> impl Iterator<Item = &'static Revision> {
    REVISIONS.iter().filter(move |r| r.version > version)
}

const MODULE_MARKER: &str = "// create-db-revision: modules above this line";
const REVISION_MARKER: &str = "    // create-db-revision: revisions above this line";

/// Writes the skeleton of the next revision, `r<NNNN>_<name>.rs`, into `dir` (the folder of this
/// module's source) and registers it in its `mod.rs`. Returns the new file.
pub fn create_revision(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let valid = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(format!(
            "--name {name:?}: use 1 to 40 lower-case letters, digits and underscores"
        ));
    }
    let module_file = dir.join("mod.rs");
    let module = std::fs::read_to_string(&module_file)
        .map_err(|e| format!("cannot read {}: {e}", module_file.display()))?;
    if !module.contains(MODULE_MARKER) || !module.contains(REVISION_MARKER) {
        return Err(format!(
            "{} lacks the create-db-revision marker comments",
            module_file.display()
        ));
    }
    let newest = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            file.strip_prefix('r')?.get(..4)?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(1);
    let version = newest + 1;
    let stem = format!("r{version:04}_{name}");
    let file = dir.join(format!("{stem}.rs"));
    let skeleton = format!(
        r#"//! Schema version {version}: (say what this revision changes and why).

use std::path::Path;

use super::Revision;
use crate::server::store::Transaction;

/// The revision.
pub const REVISION: Revision = Revision {{
    version: {version},
    name: "{name}",
    upgrade,
}};

/// Brings a version {newest} store to version {version}: read records as JSON values
/// (`tx.all::<serde_json::Value>(TABLE)`), change them, `tx.put` them back.
fn upgrade(_tx: &Transaction, _data_dir: &Path) -> Result<(), String> {{
    Ok(())
}}
"#
    );
    let module = module
        .replacen(MODULE_MARKER, &format!("mod {stem};\n{MODULE_MARKER}"), 1)
        .replacen(
            REVISION_MARKER,
            &format!("    {stem}::REVISION,\n{REVISION_MARKER}"),
            1,
        );
    inspectflow_operators::files::write_atomically(&file, skeleton.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    inspectflow_operators::files::write_atomically(&module_file, module.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", module_file.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_numbered_one_after_another_from_two() {
        for (index, revision) in REVISIONS.iter().enumerate() {
            assert_eq!(revision.version, index as u64 + 2, "{}", revision.name);
        }
        assert_eq!(LATEST, REVISIONS.len() as u64 + 1);
    }

    #[test]
    fn create_revision_writes_the_next_skeleton_and_registers_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/migrations");
        for entry in std::fs::read_dir(&source)
            .expect("migrations folder")
            .flatten()
        {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        let file = create_revision(dir.path(), "add_widgets").expect("created");
        let next = LATEST + 1;
        assert_eq!(
            file.file_name().and_then(|n| n.to_str()),
            Some(format!("r{next:04}_add_widgets.rs").as_str())
        );
        let skeleton = std::fs::read_to_string(&file).expect("skeleton");
        assert!(
            skeleton.contains(&format!("version: {next},")),
            "{skeleton}"
        );
        let module = std::fs::read_to_string(dir.path().join("mod.rs")).expect("mod.rs");
        assert!(module.contains(&format!("mod r{next:04}_add_widgets;\n{MODULE_MARKER}")));
        assert!(module.contains(&format!(
            "    r{next:04}_add_widgets::REVISION,\n{REVISION_MARKER}"
        )));
        let error = create_revision(dir.path(), "Bad Name").expect_err("refused");
        assert!(error.contains("--name"), "{error}");
    }
}
