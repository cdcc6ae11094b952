//! Dataset snapshots through a real server: taken on demand and by training, holding their
//! images (so models outlive their media), shared image bytes, download and re-import, deletion
//! rules; and the store's migration chain upgrading a schema version 1 store.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::server::{Server, call, client, inspectflow, upload_form};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// A generated dataset: its normal training images, anomalous images and their masks.
fn dataset(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>) {
    let out = dir.join("synth");
    if !out.exists() {
        inspectflow::synth::write_dataset(
            &out,
            &inspectflow::synth::SynthOptions {
                texture: inspectflow::synth::Texture::Carpet,
                size: 64,
                train_normal: 6,
                test_normal: 1,
                test_anomalous: 2,
                seed: 5,
                photo: None,
            },
        )
        .expect("dataset");
    }
    let files = |folder: &str| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(out.join(folder))
            .expect("folder")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        files
    };
    let anomalous = files("test/anomalous")
        .into_iter()
        .map(|image| {
            let mask = out.join("masks").join(image.file_name().expect("name"));
            (image, mask)
        })
        .collect();
    (files("train/normal"), anomalous)
}

/// A project holding the generated dataset; returns its id.
fn project_with_media(http: &Client, server: &Server, dir: &Path) -> String {
    let (status, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "line"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{project}");
    let project = project["id"].as_str().expect("id").to_string();
    let (normal, anomalous) = dataset(dir);
    let upload = |form| {
        let (status, body) = call(
            http.post(server.url(&format!("/api/projects/{project}/media")))
                .multipart(form),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    };
    for image in &normal {
        upload(upload_form(
            std::fs::read(image).expect("image"),
            Some("normal"),
            None,
        ));
    }
    for (image, mask) in &anomalous {
        upload(upload_form(
            std::fs::read(image).expect("image"),
            Some("anomalous"),
            Some(std::fs::read(mask).expect("mask")),
        ));
    }
    project
}

/// Total bytes of the files under `blobs/`.
fn blob_bytes(data_dir: &Path) -> u64 {
    let mut total = 0;
    for folder in std::fs::read_dir(data_dir.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for file in std::fs::read_dir(folder.path())
            .expect("blob folder")
            .flatten()
        {
            total += file.metadata().expect("metadata").len();
        }
    }
    total
}

/// (sha256, label, mask bytes) of every row of a downloaded snapshot file.
fn rows_of(file: &[u8]) -> BTreeSet<(String, String, Option<Vec<u8>>)> {
    use polars::prelude::*;
    let frame = ParquetReader::new(std::io::Cursor::new(file))
        .finish()
        .expect("a Parquet file");
    let images = frame
        .column("image")
        .expect("image")
        .binary()
        .expect("bytes")
        .clone();
    let labels = frame
        .column("label")
        .expect("label")
        .str()
        .expect("text")
        .clone();
    let flags = frame
        .column("is_anomalous")
        .expect("is_anomalous")
        .bool()
        .expect("booleans")
        .clone();
    let masks = frame
        .column("mask")
        .expect("mask")
        .binary()
        .expect("bytes")
        .clone();
    (0..frame.height())
        .map(|row| {
            let image = images.get(row).expect("image bytes");
            let label = labels.get(row).expect("label").to_string();
            assert_eq!(flags.get(row), Some(label == "anomalous"));
            let sha = inspectflow::server::blobs::sha256_hex(image);
            (sha, label, masks.get(row).map(<[u8]>::to_vec))
        })
        .collect()
}

fn download(http: &Client, server: &Server, id: &str) -> Vec<u8> {
    let response = http
        .get(server.url(&format!("/api/snapshots/{id}/download")))
        .send()
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().expect("body").to_vec()
}

/// Trains a PaDiM model (on `snapshot` when given) and waits for it; returns the job.
fn train(http: &Client, server: &Server, project: &str, snapshot: Option<&str>) -> Value {
    let mut body = json!({"model_name": "padim", "input_size": 64});
    if let Some(snapshot) = snapshot {
        body["dataset_snapshot_id"] = json!(snapshot);
    }
    let (status, job) = call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&body),
    );
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let url = server.url(&format!("/api/jobs/{}", job["id"].as_str().expect("id")));
    for _ in 0..1200 {
        let (_, job) = call(http.get(&url));
        match job["status"].as_str() {
            Some("completed") => return job,
            Some("failed" | "canceled") => panic!("training ended: {job}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    panic!("training did not end in 120 s");
}

fn predict(http: &Client, server: &Server, project: &str, model: &str, image: &Path) {
    let form = reqwest::blocking::multipart::Form::new().part(
        "file",
        reqwest::blocking::multipart::Part::bytes(std::fs::read(image).expect("image"))
            .file_name("part.png"),
    );
    let (status, answer) = call(
        http.post(server.url(&format!("/api/projects/{project}/models/{model}:predict")))
            .multipart(form),
    );
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["score"].is_number(), "{answer}");
}

#[test]
fn snapshots_keep_their_images_share_bytes_round_trip_and_outlive_the_media() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start(&data, None);
    let http = client();
    let project = project_with_media(&http, &server, dir.path());

    // On demand: every image, label and mask.
    let snapshots_url = server.url(&format!("/api/projects/{project}/snapshots"));
    let (status, first) = call(http.post(&snapshots_url));
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (&first["count"], &first["anomalous"], &first["masks"]),
        (&json!(8), &json!(2), &json!(2)),
        "{first}"
    );
    assert_eq!(first["origin"], "on_demand");
    let held = blob_bytes(&data);
    assert!(held > 0 && held == first["size_bytes"].as_u64().expect("size"));

    // A second snapshot of the unchanged dataset adds no image bytes.
    let (status, second) = call(http.post(&snapshots_url));
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_ne!(first["id"], second["id"]);
    assert_eq!(second["added_bytes"], 0, "{second}");
    assert_eq!(second["content_key"], first["content_key"]);
    assert_eq!(blob_bytes(&data), held);

    // Training without a snapshot reuses the newest one of the same content.
    let job = train(&http, &server, &project, None);
    let reused = job["payload"]["dataset_snapshot_id"].clone();
    // The newest of the two; both have the same content, and may carry the same millisecond.
    assert!(reused == second["id"] || reused == first["id"], "{job}");
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    let model = models["models"][0].clone();
    assert_eq!(model["dataset_snapshot_id"], reused, "{model}");
    let model_id = model["id"].as_str().expect("model id").to_string();

    // Delete every media item: snapshots and the model stay usable.
    let file = download(&http, &server, first["id"].as_str().expect("id"));
    let (_, media) =
        call(http.get(server.url(&format!("/api/projects/{project}/media?limit=100"))));
    for item in media["media"].as_array().expect("media") {
        let id = item["id"].as_str().expect("id");
        let (status, body) =
            call(http.delete(server.url(&format!("/api/projects/{project}/media/{id}"))));
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    assert!(
        !data
            .join("projects")
            .join(&project)
            .join("media")
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "the media files are gone"
    );
    let (normal, _) = dataset(dir.path());
    predict(&http, &server, &project, &model_id, &normal[0]);
    assert_eq!(
        download(&http, &server, first["id"].as_str().expect("id")),
        file,
        "the snapshot downloads as before"
    );
    for bad in [json!("no-such-snapshot"), json!(42), json!("x".repeat(101))] {
        let (status, body) = call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&json!({"model_name": "padim", "dataset_snapshot_id": bad})),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(detail.starts_with("dataset_snapshot_id"), "{detail}");
    }
    let retrained = train(
        &http,
        &server,
        &project,
        Some(first["id"].as_str().expect("id")),
    );
    assert_eq!(retrained["payload"]["dataset_snapshot_id"], first["id"]);
    let (status, body) = call(http.post(&snapshots_url));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("no media")
    );

    // Download and re-import into another project: the same rows, no new bytes.
    let (_, other) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "copy"})),
    );
    let other = other["id"].as_str().expect("id").to_string();
    let response = http
        .post(server.url(&format!("/api/projects/{other}/snapshots:import")))
        .header("content-type", "application/vnd.apache.parquet")
        .body(file.clone())
        .send()
        .expect("import");
    assert_eq!(response.status(), StatusCode::CREATED);
    let imported: Value = response.json().expect("JSON");
    assert_eq!(imported["origin"], "import");
    assert_eq!(imported["added_bytes"], 0, "{imported}");
    assert_eq!(imported["content_key"], first["content_key"]);
    assert_eq!(blob_bytes(&data), held);
    let copy = download(&http, &server, imported["id"].as_str().expect("id"));
    assert_eq!(rows_of(&copy), rows_of(&file));
    assert_eq!(rows_of(&file).len(), 8);

    // A snapshot a model names stays; others go, and with the last one the images.
    let url = |id: &Value| server.url(&format!("/api/snapshots/{}", id.as_str().expect("id")));
    let (status, body) = call(http.delete(url(&reused)));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["detail"].as_str().expect("detail").contains(&model_id));
    let (status, _) = call(http.delete(url(&imported["id"])));
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(blob_bytes(&data), held, "still held by the others");
    let (status, listed) =
        call(http.get(server.url(&format!("/api/snapshots?project_id={project}"))));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["pagination"]["total"], 2, "{listed}");

    // Deleting the project takes its snapshots and their images.
    let (status, _) = call(http.delete(server.url(&format!("/api/projects/{project}"))));
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, listed) = call(http.get(server.url("/api/snapshots")));
    assert_eq!(listed["pagination"]["total"], 0, "{listed}");
    assert_eq!(blob_bytes(&data), 0);
    drop(server);
    let (ok, out) = inspectflow(&["check-db"], &data);
    assert!(ok, "{out}");
}

#[test]
fn hostile_snapshot_files_are_refused_naming_the_row_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "line"})),
    );
    let project = project["id"].as_str().expect("id");
    let import = |body: Vec<u8>| {
        call(
            http.post(server.url(&format!("/api/projects/{project}/snapshots:import")))
                .body(body),
        )
    };
    let parquet = |frame: &mut polars::prelude::DataFrame| {
        let mut bytes = Vec::new();
        polars::prelude::ParquetWriter::new(&mut bytes)
            .finish(frame)
            .expect("parquet");
        bytes
    };
    let image = common::server::png(8, 8, 40);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not parquet at all".to_vec(), "not a readable Parquet file"),
        (
            parquet(&mut polars::df!("filename" => ["a.png"]).expect("frame")),
            "no column image",
        ),
        (
            parquet(
                &mut polars::df!("image" => [image.clone()], "label" => ["broken"]).expect("frame"),
            ),
            "row 0: label",
        ),
        (
            parquet(
                &mut polars::df!("image" => [image.clone(), b"GIF89a".to_vec()], "is_anomalous" => [false, false])
                    .expect("frame"),
            ),
            "row 1: image: not a PNG or JPEG",
        ),
        (
            parquet(
                &mut polars::df!("image" => [image.clone()], "label" => ["normal"], "sha256" => ["00"])
                    .expect("frame"),
            ),
            "row 0: sha256",
        ),
        (
            parquet(
                &mut polars::df!("image" => [image.clone()], "label" => ["normal"], "mask" => [image.clone()])
                    .expect("frame"),
            ),
            "row 0: mask: only anomalous",
        ),
        (
            parquet(
                &mut polars::df!("image" => [image.clone()], "label" => ["anomalous"], "mask" => [common::server::png(4, 8, 255)])
                    .expect("frame"),
            ),
            "row 0: mask: 4x8 does not match the image's 8x8",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = import(body);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        let detail = answer["detail"].as_str().expect("detail");
        assert!(detail.contains(expected), "{detail} lacks {expected:?}");
    }
    // A Geti Inspect file (image, is_anomalous, filename) is accepted.
    let (status, answer) = import(parquet(
        &mut polars::df!("image" => [image], "is_anomalous" => [false], "filename" => ["a.png"])
            .expect("frame"),
    ));
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["count"], 1);
    assert!(
        !dir.path()
            .join("snapshots")
            .read_dir()
            .expect("folder")
            .any(|f| {
                f.expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
    );
}

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Every table of a redb store as (table, key, JSON) rows, plus its schema version.
fn dump(data_dir: &Path) -> (u64, BTreeSet<(String, String, String)>) {
    let db = redb::Database::open(data_dir.join("inspectflow.redb")).expect("store opens");
    let read = db.begin_read().expect("read");
    let version = read
        .open_table(META)
        .expect("meta")
        .get("schema_version")
        .expect("get")
        .expect("version")
        .value();
    let mut rows = BTreeSet::new();
    for name in [
        "projects",
        "media",
        "jobs",
        "models",
        "sources",
        "sinks",
        "pipelines",
        "snapshots",
    ] {
        let table: TableDefinition<&str, &[u8]> = TableDefinition::new(name);
        let Ok(opened) = read.open_table(table) else {
            continue;
        };
        for entry in opened.iter().expect("iterate") {
            let (key, value) = entry.expect("entry");
            rows.insert((
                name.to_string(),
                key.value().to_string(),
                String::from_utf8_lossy(value.value()).into_owned(),
            ));
        }
    }
    (version, rows)
}

/// Turns the store in `data_dir` into what schema version 1 wrote: no `snapshots` table, media
/// without `sha256`, and the model's snapshot a Parquet file of image paths under
/// `snapshots/<id>.parquet` (written by this build's `inspectflow train` code, which version 1
/// used), the id the model names.
fn make_version_1(data_dir: &Path, dataset: &Path) {
    let db = redb::Database::open(data_dir.join("inspectflow.redb")).expect("store opens");
    let write = db.begin_write().expect("write");
    let media: TableDefinition<&str, &[u8]> = TableDefinition::new("media");
    let models: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
    let legacy = inspectflow::train::dataset::snapshot(
        &inspectflow::train::dataset::Sources {
            normal: &dataset.join("train/normal"),
            anomalous: Some(&dataset.join("test/anomalous")),
            masks: Some(&dataset.join("masks")),
        },
        7,
        &data_dir.join("snapshots"),
    )
    .expect("a version 1 snapshot");
    {
        let rewrite = |table: TableDefinition<&str, &[u8]>, change: &dyn Fn(&mut Value)| {
            let mut opened = write.open_table(table).expect("table");
            let records: Vec<(String, Value)> = opened
                .iter()
                .expect("iterate")
                .map(|e| {
                    let (k, v) = e.expect("entry");
                    (
                        k.value().to_string(),
                        serde_json::from_slice(v.value()).expect("JSON"),
                    )
                })
                .collect();
            for (key, mut record) in records {
                change(&mut record);
                let bytes = serde_json::to_vec(&record).expect("JSON");
                opened
                    .insert(key.as_str(), bytes.as_slice())
                    .expect("insert");
            }
        };
        rewrite(media, &|record| {
            record.as_object_mut().expect("object").remove("sha256");
        });
        rewrite(models, &|record| {
            record["dataset_snapshot_id"] = json!(legacy.id);
        });
        write
            .open_table(META)
            .expect("meta")
            .insert("schema_version", 1)
            .expect("version");
    }
    let snapshots: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
    write.delete_table(snapshots).expect("drop snapshots");
    write.commit().expect("commit");
    drop(db);
    for entry in std::fs::read_dir(data_dir.join("snapshots"))
        .expect("folder")
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".manifest.parquet")
        {
            std::fs::remove_file(entry.path()).expect("remove");
        }
    }
    std::fs::remove_dir_all(data_dir.join("blobs")).expect("no blobs in version 1");
    // Version 1's paths led into the dataset folder, long gone.
    std::fs::remove_dir_all(dataset).expect("remove the dataset");
}

#[test]
fn a_version_1_store_with_data_in_every_table_migrates_and_a_failed_migration_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let http = client();
    let files = dir.path().join("files");
    let root = ["--path-root", files.to_str().expect("utf-8")];
    {
        let server = Server::start_with(&data, &root);
        let project = project_with_media(&http, &server, dir.path());
        let job = train(&http, &server, &project, None);
        let folder = files.join("line");
        std::fs::create_dir_all(&folder).expect("folder");
        let mut ids = Vec::new();
        for (path, body) in [
            (
                "/api/sources",
                json!({"name": "cam", "type": "images_folder", "config": {"path": folder}}),
            ),
            (
                "/api/sinks",
                json!({"name": "out", "type": "folder", "config": {"path": folder}}),
            ),
        ] {
            let (status, body) = call(http.post(server.url(path)).json(&body));
            assert_eq!(status, StatusCode::CREATED, "{path}: {body}");
            ids.push(body["id"].as_str().expect("id").to_string());
        }
        let (status, body) = call(
            http.post(server.url(&format!("/api/projects/{project}/pipelines"))).json(&json!({
                "name": "p", "source_id": ids[0], "model_id": job["model_id"], "sink_ids": [ids[1]]
            })),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    make_version_1(&data, &dir.path().join("synth"));
    let (version, before) = dump(&data);
    assert_eq!(version, 1);
    for table in [
        "projects",
        "media",
        "jobs",
        "models",
        "sources",
        "sinks",
        "pipelines",
    ] {
        assert!(
            before.iter().any(|(t, _, _)| t == table),
            "no {table} record"
        );
    }

    // A migration that fails midway (a damaged media record after good ones) changes nothing.
    let damaged = dir.path().join("damaged");
    copy_dir(&data, &damaged);
    let victim = {
        let db = redb::Database::open(damaged.join("inspectflow.redb")).expect("opens");
        let write = db.begin_write().expect("write");
        let table: TableDefinition<&str, &[u8]> = TableDefinition::new("media");
        let victim = {
            let mut opened = write.open_table(table).expect("media");
            let keys: Vec<String> = opened
                .iter()
                .expect("iterate")
                .map(|e| e.expect("entry").0.value().to_string())
                .collect();
            let victim = keys.last().expect("media").clone();
            opened
                .insert(victim.as_str(), b"{\"id\": 3".as_slice())
                .expect("damage");
            victim
        };
        write.commit().expect("commit");
        victim
    };
    let (_, damaged_before) = dump(&damaged);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["migrate", "--data-dir"])
        .arg(&damaged)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("schema version 2")
            && error.contains(&victim)
            && error.contains("unchanged"),
        "{error}"
    );
    assert_eq!(
        dump(&damaged),
        (1, damaged_before),
        "the old store is as it was"
    );
    assert!(damaged.join("inspectflow.redb.v1.backup").is_file());
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["migrate", "--data-dir"])
        .arg(&damaged)
        .output()
        .expect("runs");
    assert!(!again.status.success());
    assert!(
        damaged.join("inspectflow.redb.v1.backup.1").is_file(),
        "a second attempt keeps the first backup and writes another"
    );

    // The real one migrates; every record is there, and the model's snapshot holds its images
    // again, found by content among the project's media.
    let (ok, out) = inspectflow(&["migrate"], &data);
    assert!(
        ok && out.contains("upgraded from schema version 1 to 2"),
        "{out}"
    );
    assert!(data.join("inspectflow.redb.v1.backup").is_file());
    let (version, after) = dump(&data);
    assert_eq!(version, 2);
    let keys = |rows: &BTreeSet<(String, String, String)>| -> BTreeSet<(String, String)> {
        rows.iter()
            .map(|(t, k, _)| (t.clone(), k.clone()))
            .collect()
    };
    assert!(keys(&after).is_superset(&keys(&before)));
    let (ok, out) = inspectflow(&["migrate"], &data);
    assert!(ok && out.contains("schema version 2"), "idempotent: {out}");
    let server = Server::start_with(&data, &root);
    for (table, id, _) in &before {
        let path = match table.as_str() {
            "projects" => format!("/api/projects/{id}"),
            "jobs" => format!("/api/jobs/{id}"),
            "sources" => format!("/api/sources/{id}"),
            "sinks" => format!("/api/sinks/{id}"),
            "pipelines" => format!("/api/projects/{}/pipelines/{id}", project_of(&before, id)),
            _ => continue,
        };
        let (status, body) = call(http.get(server.url(&path)));
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (_, snapshots) = call(http.get(server.url("/api/snapshots")));
    let snapshot = &snapshots["snapshots"][0];
    assert_eq!(snapshot["origin"], "migrated", "{snapshots}");
    assert_eq!(snapshot["count"], 8, "{snapshot}");
    assert_eq!(snapshot["masks"], 2, "{snapshot}");
    let file = download(&http, &server, snapshot["id"].as_str().expect("id"));
    assert_eq!(rows_of(&file).len(), 8);
    drop(server);
    let (ok, out) = inspectflow(&["check-db"], &data);
    assert!(ok, "{out}");
}

/// The project of the pipeline record `id` in a [`dump`].
fn project_of(rows: &BTreeSet<(String, String, String)>, id: &str) -> String {
    let (_, _, json) = rows
        .iter()
        .find(|(table, key, _)| table == "pipelines" && key == id)
        .expect("the pipeline");
    let record: Value = serde_json::from_str(json).expect("JSON");
    record["project_id"].as_str().expect("project").to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
