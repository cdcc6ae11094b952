//! The server's metadata store: one redb database (`inspectflow.redb` in the data directory)
//! holding a table per resource, each record a JSON document under its UUID, plus a `meta` table
//! with the schema version. Files (media, models, snapshots) live beside it in the data
//! directory; records point to them.
//!
//! Every change is one redb transaction, committed durably before the API answers, so a crash
//! never leaves half a record.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The schema version this build writes; `inspectflow migrate` brings older stores up to it.
pub const SCHEMA_VERSION: u64 = 1;

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

/// Every resource table.
pub const COLLECTIONS: [Collection; 7] = [PROJECTS, MEDIA, JOBS, MODELS, SOURCES, SINKS, PIPELINES];

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
    /// version on first use.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| db_error(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("inspectflow.redb");
        let db = Database::create(&path)
            .map_err(|e| db_error(format!("cannot open {}: {e}", path.display())))?;
        let store = Self { db };
        let found = store.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found });
        }
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
        Ok(store)
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
