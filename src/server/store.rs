//! The server's metadata store: one redb database (`inspectflow.redb` in the data directory)
//! holding a table per resource, each record a JSON document under its UUID, plus a `meta` table
//! with the schema version. Files (media, models, snapshots) live beside it in the data
//! directory; records point to them.
//!
//! Every change is one redb transaction, committed durably before the API answers, so a crash
//! never leaves half a record. A store written by an older build is brought up to this one's
//! schema by [`Store::migrate`] (the revision chain in [`super::migrations`]).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The schema version this build writes; `inspectflow migrate` brings older stores up to it.
pub const SCHEMA_VERSION: u64 = super::migrations::LATEST;

/// The store's file in a data directory.
pub const FILE_NAME: &str = "inspectflow.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A resource table: UUID text to JSON document.
pub type Collection = TableDefinition<'static, &'static str, &'static [u8]>;

/// Projects.
pub const PROJECTS: Collection = TableDefinition::new("projects");
/// Media (uploaded images).
pub const MEDIA: Collection = TableDefinition::new("media");
/// Jobs (training runs).
pub const JOBS: Collection = TableDefinition::new("jobs");
/// Models (trained packages under `models/`).
pub const MODELS: Collection = TableDefinition::new("models");
/// Sources (stored source operator configurations).
pub const SOURCES: Collection = TableDefinition::new("sources");
/// Sinks (stored sink operator configurations).
pub const SINKS: Collection = TableDefinition::new("sinks");
/// Pipelines (graphs, or a project's source, model and sinks).
pub const PIPELINES: Collection = TableDefinition::new("pipelines");
/// Dataset snapshots (their images are content-addressed files under `blobs/`).
pub const SNAPSHOTS: Collection = TableDefinition::new("snapshots");

/// Every resource table.
pub const COLLECTIONS: [Collection; 8] = [
    PROJECTS, MEDIA, JOBS, MODELS, SOURCES, SINKS, PIPELINES, SNAPSHOTS,
];

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption).
    #[error("database: {0}")]
    Database(String),
    /// A record does not parse (written by another version, or damaged).
    #[error("record {id} in {table}: {message}")]
    Record {
        /// The table.
        table: String,
        /// The record's id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The store was written by a newer inspectflow.
    #[error(
        "the store has schema version {found}, newer than this build's {SCHEMA_VERSION}: upgrade inspectflow"
    )]
    TooNew {
        /// The version found.
        found: u64,
    },
    /// The store was written by an older inspectflow and must be migrated first.
    #[error(
        "the store has schema version {found}, older than this build's {SCHEMA_VERSION}: run `inspectflow migrate`"
    )]
    TooOld {
        /// The version found.
        found: u64,
    },
    /// A revision of the migration chain failed; the store was left as it was.
    #[error(
        "migration to schema version {version} ({name}) failed, the store is unchanged: {message}"
    )]
    Migration {
        /// The revision's version.
        version: u64,
        /// The revision's name.
        name: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// What [`Store::migrate`] did.
#[derive(Debug)]
pub struct Migrated {
    /// The schema version found (0: a new store).
    pub from: u64,
    /// The schema version now.
    pub to: u64,
    /// The copy of the store taken before upgrading (none when nothing was upgraded).
    pub backup: Option<std::path::PathBuf>,
}

fn db_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

/// The open store.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store in `data_dir`, creating its tables and recording the schema
    /// version on first use. A store of an older schema is refused ([`StoreError::TooOld`]):
    /// [`Store::migrate`] upgrades it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let store = Self::open_any_version(data_dir)?;
        let found = store.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found });
        }
        if found != 0 && found < SCHEMA_VERSION {
            return Err(StoreError::TooOld { found });
        }
        store.create_tables(found)?;
        Ok(store)
    }

    fn open_any_version(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| db_error(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| db_error(format!("cannot open {}: {e}", path.display())))?;
        Ok(Self { db })
    }

    /// Brings the store in `data_dir` up to this build's schema: a copy of the store is kept as
    /// `inspectflow.redb.v<old>.backup` ([`back_up`]), then every revision after the store's version runs in
    /// ONE write transaction, which commits with the new version or, when a revision fails,
    /// rolls back and leaves the store exactly as it was. A new store is simply created.
    pub fn migrate(data_dir: &Path) -> Result<Migrated, StoreError> {
        let found = Self::open_any_version(data_dir)?.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found });
        }
        if found == 0 || found == SCHEMA_VERSION {
            Self::open(data_dir)?;
            return Ok(Migrated {
                from: found,
                to: SCHEMA_VERSION,
                backup: None,
            });
        }
        // The database is closed here, so the copy is of committed state only.
        let backup = back_up(data_dir, found)?;
        let store = Self::open_any_version(data_dir)?;
        store.write(|tx| {
            for revision in super::migrations::after(found) {
                (revision.upgrade)(tx, data_dir).map_err(|message| StoreError::Migration {
                    version: revision.version,
                    name: revision.name,
                    message,
                })?;
                tx.set_schema_version(revision.version)?;
            }
            Ok(())
        })?;
        store.create_tables(SCHEMA_VERSION)?;
        Ok(Migrated {
            from: found,
            to: SCHEMA_VERSION,
            backup: Some(backup),
        })
    }

    /// Creates every table (and records the schema version when `found` is 0, a new store).
    fn create_tables(&self, found: u64) -> Result<(), StoreError> {
        let store = self;
        let write = store.db.begin_write().map_err(db_error)?;
        {
            let mut meta = write.open_table(META).map_err(db_error)?;
            if found == 0 {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(db_error)?;
            }
            for table in COLLECTIONS {
                write.open_table(table).map_err(db_error)?;
            }
        }
        write.commit().map_err(db_error)?;
        Ok(())
    }

    /// The schema version recorded in the store (0 for a new one).
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        let meta = match read.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(error) => return Err(db_error(error)),
        };
        Ok(meta
            .get("schema_version")
            .map_err(db_error)?
            .map_or(0, |v| v.value()))
    }

    /// Runs `change` in one write transaction: committed when it returns `Ok`, rolled back when
    /// it fails. Write transactions run one at a time, so what `change` reads stays true until
    /// the commit (a check and the change it guards cannot be split by another request).
    pub fn write<T>(
        &self,
        change: impl FnOnce(&Transaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let write = self.db.begin_write().map_err(db_error)?;
        match change(&Transaction { write: &write }) {
            Ok(value) => {
                write.commit().map_err(db_error)?;
                Ok(value)
            }
            Err(error) => {
                let _ = write.abort();
                Err(error)
            }
        }
    }

    /// Writes `record` under `id` (insert or replace).
    pub fn put<T: Serialize>(
        &self,
        table: Collection,
        id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        self.write(|tx| tx.put(table, id, record))
    }

    /// The record under `id`, if any.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Collection,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        get_from(&read.open_table(table).map_err(db_error)?, table, id)
    }

    /// Every record of `table`.
    pub fn all<T: DeserializeOwned>(&self, table: Collection) -> Result<Vec<T>, StoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        all_from(&read.open_table(table).map_err(db_error)?, table)
    }

    /// Removes the record under `id`; false when there was none.
    pub fn remove(&self, table: Collection, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| tx.remove(table, id))
    }
}

/// Copies the (closed) store to `inspectflow.redb.v<version>.backup` (or `.backup.<n>` when that
/// exists: an earlier backup is never overwritten), through a temporary file that is synced
/// before it is renamed into place.
fn back_up(data_dir: &Path, version: u64) -> Result<std::path::PathBuf, StoreError> {
    let mut backup = data_dir.join(format!("{FILE_NAME}.v{version}.backup"));
    let mut number = 1;
    while backup.exists() {
        backup = data_dir.join(format!("{FILE_NAME}.v{version}.backup.{number}"));
        number += 1;
    }
    let temporary = data_dir.join(format!(".{FILE_NAME}.backup.partial"));
    let copied = std::fs::copy(data_dir.join(FILE_NAME), &temporary)
        .and_then(|_| std::fs::File::open(&temporary)?.sync_all())
        .and_then(|()| std::fs::rename(&temporary, &backup));
    if let Err(error) = copied {
        let _ = std::fs::remove_file(&temporary);
        return Err(db_error(format!(
            "cannot back the store up to {}: {error}",
            backup.display()
        )));
    }
    Ok(backup)
}

/// The reads and writes of one [`Store::write`] transaction.
pub struct Transaction<'a> {
    write: &'a redb::WriteTransaction,
}

impl Transaction<'_> {
    /// The record under `id`, if any (as this transaction sees it).
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Collection,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        get_from(&self.write.open_table(table).map_err(db_error)?, table, id)
    }

    /// Every record of `table`.
    pub fn all<T: DeserializeOwned>(&self, table: Collection) -> Result<Vec<T>, StoreError> {
        all_from(&self.write.open_table(table).map_err(db_error)?, table)
    }

    /// Whether a record is stored under `id` (without reading it).
    pub fn contains(&self, table: Collection, id: &str) -> Result<bool, StoreError> {
        let opened = self.write.open_table(table).map_err(db_error)?;
        Ok(opened.get(id).map_err(db_error)?.is_some())
    }

    /// Writes `record` under `id` (insert or replace).
    pub fn put<T: Serialize>(
        &self,
        table: Collection,
        id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Record {
            table: table.to_string(),
            id: id.to_string(),
            message: e.to_string(),
        })?;
        self.write
            .open_table(table)
            .map_err(db_error)?
            .insert(id, bytes.as_slice())
            .map_err(db_error)?;
        Ok(())
    }

    /// Records `version` as the store's schema version (the migration chain's last step).
    fn set_schema_version(&self, version: u64) -> Result<(), StoreError> {
        self.write
            .open_table(META)
            .map_err(db_error)?
            .insert("schema_version", version)
            .map_err(db_error)?;
        Ok(())
    }

    /// Removes the record under `id`; false when there was none.
    pub fn remove(&self, table: Collection, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .write
            .open_table(table)
            .map_err(db_error)?
            .remove(id)
            .map_err(db_error)?
            .is_some())
    }
}

/// The record under `id` in an open table (of a read or a write transaction).
fn get_from<T: DeserializeOwned>(
    opened: &impl ReadableTable<&'static str, &'static [u8]>,
    table: Collection,
    id: &str,
) -> Result<Option<T>, StoreError> {
    let Some(bytes) = opened.get(id).map_err(db_error)? else {
        return Ok(None);
    };
    parse(table, id, bytes.value()).map(Some)
}

/// Every record of an open table.
fn all_from<T: DeserializeOwned>(
    opened: &impl ReadableTable<&'static str, &'static [u8]>,
    table: Collection,
) -> Result<Vec<T>, StoreError> {
    let mut records = Vec::new();
    for entry in opened.iter().map_err(db_error)? {
        let (id, bytes) = entry.map_err(db_error)?;
        records.push(parse(table, id.value(), bytes.value())?);
    }
    Ok(records)
}

fn parse<T: DeserializeOwned>(table: Collection, id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Record {
        table: table.to_string(),
        id: id.to_string(),
        message: e.to_string(),
    })
}
