//! Run files under `<data>/runs/<run_id>/`: plan.json, run.json and per-stage directories
//! `stages/<NN>-<key>/{input.json, output.json, artifacts/<path>, manifest.json}`, and
//! `attempts/<n>.json` for each failed attempt (a completed one is recorded by its output.json and
//! manifest.json, which hold its number, status and times).
//! No file is seen half-written: a stage's files go into a new directory renamed into place whole
//! (file by file through temporary siblings where the directory exists), other files through a
//! temporary sibling and a rename; the manifest is written last.

use super::{StageContext, StageError, StageOutput};
use crate::domain::events::ArtifactMeta;
use crate::domain::run::{RunState, StageStatus};
use crate::domain::time;
use crate::error::AppError;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    /// Held while run.json is compared and replaced: writes from the runtime and from API
    /// commands happen after their commits, in tasks of their own, and may finish out of order.
    run_json: std::sync::Arc<std::sync::Mutex<Written>>,
}

/// The run.json versions this process wrote, of runs that have not ended, when it is the only
/// process writing the data directory ([`ArtifactStore::sole_writer`]): a later write compares
/// with them instead of reading the file back (an `openat`, a read and a parse per write; five
/// writes per run). A run not listed (written before a restart, or by another process when
/// several share the directory) is compared with its file.
#[derive(Debug, Default)]
struct Written {
    sole_writer: bool,
    versions: std::collections::HashMap<String, i64>,
}

impl Written {
    /// `run`'s state is in run.json now: remembered by a sole writer until the run ends.
    fn wrote(&mut self, run: &crate::domain::run::Run) {
        if run.status.is_terminal() {
            // A late write of an earlier state finds the file, and the final version in it.
            self.versions.remove(&run.id);
        } else if self.sole_writer {
            self.versions.insert(run.id.clone(), run.version);
        }
    }
}

/// Whether `path` holds no run.json of `version` or later (missing or unreadable: none).
fn older_than(path: &Path, version: i64) -> bool {
    let on_disk = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_i64());
    on_disk.is_none_or(|v| v < version)
}

/// A relative artifact path with no way out of its directory.
pub fn is_safe_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && !path.contains('\\')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A new name beside `path` for a file that is renamed to `path` once written.
fn temporary_sibling(path: &Path) -> PathBuf {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{file_name}.{}.tmp",
        crate::domain::ids::generate("")
    ))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary_sibling(path);
    // Directories are made on the first miss only: most writes go to one that exists.
    if let Err(e) = std::fs::write(&tmp, bytes) {
        match path.parent() {
            Some(dir) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                std::fs::write(&tmp, bytes)?;
            }
            _ => return Err(e),
        }
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Write `bytes` to `path` through a temporary sibling, unless `path` exists: then nothing is
/// written and the answer is `false`.
fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let tmp = temporary_sibling(path);
    std::fs::write(&tmp, bytes)?;
    let renamed = rename_no_replace(&tmp, path);
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    match renamed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rename `from` to `to` unless `to` exists (`AlreadyExists`): in one step on Linux; elsewhere,
/// and on a file system without the flag, a look and then a rename, which another process
/// writing the same data directory could come between.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Err(rustix::io::Errno::INVAL) => {}
            done => return done.map_err(Into::into),
        }
    }
    if to.try_exists()? {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).unwrap_or_default();
    text.push(b'\n');
    text
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    write_atomic(path, &json_bytes(value))
}

/// The spare file `run.json` is exchanged with (see [`replace_run_json`]).
const RUN_JSON_SPARE: &str = ".run.json.spare";

/// Replace `run.json` (at `path`) with `bytes`, atomically: a reader sees the old file or the
/// new one, whole.
///
/// A replacing rename frees the old file, and on a disk mounted with `discard` its blocks are
/// discarded there and then: the four replacements of a run's run.json were ~0.7 ms of the
/// server's CPU per run (BENCHMARKS.md, "run.json by exchange"). So while the run may change
/// again, the new state is written into a spare file that is then exchanged with run.json
/// (`renameat2` with `RENAME_EXCHANGE`): the old run.json becomes the next spare, nothing is
/// freed. The last write (`last`: the run has ended) renames the spare over run.json and leaves
/// no spare behind. Where the exchange is not supported, or there is no run.json yet (the first
/// write), a plain rename.
fn replace_run_json(path: &Path, bytes: &[u8], last: bool) -> std::io::Result<()> {
    use std::io::Write;
    let spare = path.with_file_name(RUN_JSON_SPARE);
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&spare);
    let mut file = match opened {
        Ok(file) => file,
        // No run directory yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return write_atomic(path, bytes),
        Err(e) => return Err(e),
    };
    // Written over in place, then cut to length: within its one block, nothing is freed.
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)?;
    drop(file);
    if !last && exchange(&spare, path).is_ok() {
        return Ok(());
    }
    std::fs::rename(&spare, path)
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    Ok(renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE)?)
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// A stage's files (relative paths in its directory, the manifest last) and its artifacts'
/// metadata.
struct StageFiles {
    list: Vec<(String, Vec<u8>)>,
    metas: Vec<ArtifactMeta>,
}

fn stage_files(
    ctx: &StageContext,
    output: &StageOutput,
    started_at: &str,
    finished_at: &str,
) -> std::io::Result<StageFiles> {
    let mut list = Vec::with_capacity(output.artifacts.len() + 3);
    list.push((
        "input.json".to_string(),
        json_bytes(&json!({
            "requestText": ctx.request_text,
            "mode": ctx.effective_mode,
            "skills": ctx.skills,
            "attempt": ctx.attempt,
        })),
    ));
    list.push((
        "output.json".to_string(),
        json_bytes(&json!({
            "stageKey": ctx.stage_key,
            "pipelineStatus": output.pipeline_status,
            "summary": output.summary,
            "skills": ctx.skills,
            "mode": ctx.effective_mode,
            "attempt": ctx.attempt,
            "isolationKey": ctx.isolation_key(),
            "startedAt": started_at,
            "finishedAt": finished_at,
        })),
    ));
    let mut metas = Vec::with_capacity(output.artifacts.len());
    for (path, content) in &output.artifacts {
        if !is_safe_relative(path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("artifact path `{path}` is not a safe relative path"),
            ));
        }
        list.push((format!("artifacts/{path}"), content.as_bytes().to_vec()));
        metas.push(ArtifactMeta {
            path: path.clone(),
            kind: kind_of(path),
            sha256: hex::encode(Sha256::digest(content.as_bytes())),
            size: content.len() as i64,
        });
    }
    list.push((
        "manifest.json".to_string(),
        json_bytes(&json!({
            "runId": ctx.run_id,
            "threadId": ctx.thread_id,
            "stageKey": ctx.stage_key,
            "stagePosition": ctx.position,
            "attempt": ctx.attempt,
            "status": "completed",
            "startedAt": started_at,
            "finishedAt": finished_at,
            "artifacts": metas.iter().map(|m| json!({
                "path": format!("artifacts/{}", m.path),
                "kind": m.kind,
                "sha256": m.sha256,
                "size": m.size,
            })).collect::<Vec<_>>(),
        })),
    ));
    Ok(StageFiles { list, metas })
}

/// Make the directory `dir`, which must not exist, and write `files` (relative paths) in it,
/// in order: each subdirectory made once, from the top, with no lookups.
fn fill_new_dir(dir: &Path, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    if let Err(e) = std::fs::create_dir(dir) {
        let parent = dir
            .parent()
            .filter(|_| e.kind() == std::io::ErrorKind::NotFound);
        std::fs::create_dir_all(parent.ok_or(e)?)?;
        std::fs::create_dir(dir)?;
    }
    let mut made: Vec<&Path> = Vec::new();
    for (path, bytes) in files {
        let relative = Path::new(path);
        let mut parents: Vec<&Path> = relative
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        parents.reverse();
        for parent in parents {
            if !made.contains(&parent) {
                std::fs::create_dir(dir.join(parent))?;
                made.push(parent);
            }
        }
        std::fs::write(dir.join(relative), bytes)?;
    }
    Ok(())
}

fn kind_of(path: &str) -> String {
    Path::new(path)
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "file".into())
}

impl ArtifactStore {
    pub fn new(data_dir: &Path) -> Self {
        ArtifactStore {
            root: data_dir.join("runs"),
            run_json: Default::default(),
        }
    }

    /// Whether this process is the only one writing the data directory (a SQLite store: its
    /// database has one writing process too): if so, run.json versions it wrote are
    /// remembered, not read back.
    pub fn sole_writer(self, sole: bool) -> Self {
        crate::sync::lock(&self.run_json).sole_writer = sole;
        self
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.root.join(run_id)
    }

    pub fn stage_dir_name(position: i32, key: &str) -> String {
        format!("{position:02}-{key}")
    }

    fn stage_dir(&self, run_id: &str, position: i32, key: &str) -> PathBuf {
        self.run_dir(run_id)
            .join("stages")
            .join(Self::stage_dir_name(position, key))
    }

    /// `plan.json`, the immutable snapshot, and the first run.json: written when the run is
    /// queued, in a directory made here for it. Nothing else knows the run before its queueing
    /// commits, so nothing is looked up first; only a later state's run.json, written by the
    /// runtime once the run was handed on, may be there already, and is then left as it is.
    pub fn write_plan(&self, state: &RunState) -> Result<(), AppError> {
        let run = &state.run;
        let dir = self.run_dir(&run.id);
        std::fs::create_dir_all(&dir)?;
        let plan = json!({
            "runId": run.id,
            "threadId": run.thread_id,
            "projectId": run.project_id,
            "brandId": run.brand_id,
            "requestText": run.request_text,
            "requestedMode": run.plan.requested_mode,
            "effectiveMode": run.plan.effective_mode,
            "fallbackApplied": run.plan.fallback_applied,
            "profileVersion": run.plan.profile_version,
            "profileDigest": run.plan.profile_digest,
            "description": run.plan.description,
            "skillOverrides": run.plan.skill_overrides,
            "stages": run.plan.stages,
            "createdAt": run.created_at,
        });
        write_json(&dir.join("plan.json"), &plan)?;
        let bytes = json_bytes(&self.run_json_doc(state));
        let mut written = crate::sync::lock(&self.run_json);
        if create_new(&dir.join("run.json"), &bytes)? {
            written.wrote(run);
        }
        Ok(())
    }

    /// `run.json`: status and the manifests written so far. A state older than the one on disk
    /// (a write that lost the race with a later one) is not written.
    pub fn write_run_json(&self, state: &RunState) -> Result<(), AppError> {
        let run = &state.run;
        let path = self.run_dir(&run.id).join("run.json");
        let mut written = crate::sync::lock(&self.run_json);
        let newer = match written.versions.get(&run.id) {
            Some(&version) => version < run.version,
            None => older_than(&path, run.version),
        };
        if !newer {
            return Ok(());
        }
        let doc = self.run_json_doc(state);
        replace_run_json(&path, &json_bytes(&doc), run.status.is_terminal())?;
        written.wrote(run);
        Ok(())
    }

    /// What run.json holds for `state`.
    fn run_json_doc(&self, state: &RunState) -> serde_json::Value {
        let run = &state.run;
        // A stage's manifest is written before its completion commits: only a completed stage
        // can have one.
        let mut manifests: Vec<String> = state
            .stages
            .iter()
            .filter(|s| {
                s.status == StageStatus::Completed
                    && self
                        .stage_dir(&run.id, s.position, &s.key)
                        .join("manifest.json")
                        .exists()
            })
            .map(|s| {
                format!(
                    "stages/{}/manifest.json",
                    Self::stage_dir_name(s.position, &s.key)
                )
            })
            .collect();
        manifests.sort();
        json!({
            "runId": run.id,
            "threadId": run.thread_id,
            "mode": run.plan.effective_mode,
            "status": run.status.as_str(),
            "version": run.version,
            "updatedAt": run.updated_at,
            "manifestPaths": manifests,
        })
    }

    /// Write a successful attempt's files; the manifest last. Returns the artifact metadata.
    pub fn write_stage(
        &self,
        ctx: &StageContext,
        output: &StageOutput,
        started_at: &str,
    ) -> Result<Vec<ArtifactMeta>, StageError> {
        self.write_stage_files(ctx, output, started_at)
            .map_err(|e| StageError {
                code: super::ARTIFACT_WRITE_ERROR.into(),
                message: format!(
                    "could not write the artifacts of stage {}: {e}",
                    ctx.stage_key
                ),
                retryable: true,
            })
    }

    /// A stage's first attempt to finish (the usual case: its directory does not exist yet)
    /// fills a directory under a temporary name and renames it into place whole, so its files
    /// need no renames of their own: a reader sees no stage directory, or all of it. Where the
    /// directory exists (failed attempts recorded in it, or files of an attempt whose commit
    /// did not happen), each file replaces its namesake through a temporary file, as always.
    fn write_stage_files(
        &self,
        ctx: &StageContext,
        output: &StageOutput,
        started_at: &str,
    ) -> std::io::Result<Vec<ArtifactMeta>> {
        let dir = self.stage_dir(&ctx.run_id, ctx.position, &ctx.stage_key);
        let finished_at = time::now();
        let files = stage_files(ctx, output, started_at, &finished_at)?;
        let tmp = temporary_sibling(&dir);
        let whole = fill_new_dir(&tmp, &files.list).and_then(|()| std::fs::rename(&tmp, &dir));
        if whole.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            for (path, bytes) in &files.list {
                write_atomic(&dir.join(path), bytes)?;
            }
        }
        Ok(files.metas)
    }

    /// Record a failed attempt under `attempts/<n>.json`.
    pub fn write_attempt(
        &self,
        ctx: &StageContext,
        status: &str,
        error: Option<&StageError>,
        started_at: &str,
    ) -> std::io::Result<()> {
        let dir = self.stage_dir(&ctx.run_id, ctx.position, &ctx.stage_key);
        write_json(
            &dir.join("attempts")
                .join(format!("{:03}.json", ctx.attempt)),
            &json!({
                "attempt": ctx.attempt,
                "status": status,
                "errorCode": error.map(|e| e.code.clone()),
                "errorMessage": error.map(|e| e.message.clone()),
                "retryable": error.map(|e| e.retryable),
                "startedAt": started_at,
                "finishedAt": time::now(),
            }),
        )
    }

    /// Read an artifact. The caller has checked `path` against the stored manifest metadata;
    /// the path is still checked here so nothing from a client reaches the file system unchecked.
    pub async fn read(
        &self,
        run_id: &str,
        position: i32,
        key: &str,
        path: &str,
    ) -> Result<String, AppError> {
        if !is_safe_relative(path) || crate::domain::ids::parse_client_id("runId", run_id).is_err()
        {
            return Err(AppError::validation("invalid artifact path"));
        }
        let file = self
            .stage_dir(run_id, position, key)
            .join("artifacts")
            .join(path);
        tokio::fs::read_to_string(&file)
            .await
            .map_err(AppError::internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_paths() {
        assert!(is_safe_relative("research/research-report.md"));
        for bad in ["", "../x", "/etc/hostname", "a/../../b", "a\\b", "./a"] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn run_json_is_replaced_only_by_a_later_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("run.json");
        assert!(older_than(&p, 1), "no file yet");
        write_atomic(&p, b"{\"version\": 5}").expect("write");
        assert!(!older_than(&p, 4), "an earlier state");
        assert!(!older_than(&p, 5), "the same state");
        assert!(older_than(&p, 6), "a later state");
        write_atomic(&p, b"{\"vers").expect("write");
        assert!(older_than(&p, 1), "unreadable: replaced");
    }

    /// run.json and its spare trade places while the run may change (no file freed, no new one
    /// made: the same two inodes); every version reads back whole, a longer old one cut to the
    /// new length; the last write leaves run.json alone in the directory.
    #[test]
    fn run_json_is_exchanged_with_a_spare_then_left_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("run.json");
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let names = || {
            let mut n: Vec<_> = std::fs::read_dir(dir.path())
                .expect("dir")
                .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        replace_run_json(&p, b"{\"version\": 1}", false).expect("first");
        assert_eq!(names(), ["run.json"]);
        let first = ino(&p);
        replace_run_json(
            &p,
            b"{\"version\": 2, \"padding\": \"longer than the rest\"}",
            false,
        )
        .expect("second");
        replace_run_json(&p, b"{\"version\": 3}", false).expect("third");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"version\": 3}"
        );
        if cfg!(target_os = "linux") {
            assert_eq!(names(), [RUN_JSON_SPARE, "run.json"]);
            assert_eq!(
                ino(&p),
                first,
                "the first file is back in place, nothing new made"
            );
            assert!(std::fs::read_to_string(dir.path().join(RUN_JSON_SPARE))
                .expect("spare")
                .contains("padding"));
        }
        replace_run_json(&p, b"{\"version\": 4}", true).expect("last");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"version\": 4}"
        );
        assert_eq!(names(), ["run.json"]);
    }

    /// A queued run "run-1" whose version is set to `version` and status to `status`.
    fn run_state(version: i64, status: crate::domain::run::RunStatus) -> RunState {
        let queued = crate::domain::run::tests::queued(false, "x");
        let mut state = RunState::from_queued(&queued).expect("queued");
        state.run.version = version;
        state.run.status = status;
        state
    }

    fn version_on_disk(store: &ArtifactStore) -> Option<i64> {
        let bytes = std::fs::read(store.run_dir("run-1").join("run.json")).ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["version"].as_i64()
    }

    /// A sole writer remembers the versions it wrote until the run ends, and compares a later
    /// write with them, not with the file (here removed behind its back, which a writer that
    /// reads the file back takes for "no run.json yet"). Once the run has ended, an earlier
    /// state is compared with the file again, and nothing is remembered.
    #[test]
    fn a_sole_writer_compares_run_json_versions_in_memory() {
        use crate::domain::run::RunStatus;
        let dir = tempfile::tempdir().expect("tmp");
        // Each store with what an earlier state finds once run.json is gone.
        let stores = [
            (ArtifactStore::new(dir.path()), Some(4)),
            (
                ArtifactStore::new(&dir.path().join("sole")).sole_writer(true),
                None,
            ),
        ];
        for (store, expected) in &stores {
            let waiting = run_state(5, RunStatus::WaitingApproval);
            store.write_run_json(&waiting).expect("write");
            assert_eq!(version_on_disk(store), Some(5));
            std::fs::remove_file(store.run_dir("run-1").join("run.json")).expect("remove");
            store
                .write_run_json(&run_state(4, RunStatus::Queued))
                .expect("an earlier state");
            assert_eq!(version_on_disk(store), *expected);
            store
                .write_run_json(&run_state(9, RunStatus::Completed))
                .expect("the last state");
            store
                .write_run_json(&run_state(7, RunStatus::WaitingApproval))
                .expect("a late earlier state");
            assert_eq!(version_on_disk(store), Some(9));
            assert!(crate::sync::lock(&store.run_json).versions.is_empty());
        }
    }

    /// The queueing write makes the run's directory, plan.json and the first run.json; when a
    /// later state's run.json is there first (the runtime stepped the handed-on run, even to its
    /// end, before the queueing write ran), it is left as it is, and no temporary file is left.
    #[test]
    fn the_plan_write_never_replaces_a_later_run_json() {
        use crate::domain::run::RunStatus;
        let dir = tempfile::tempdir().expect("tmp");
        for sole in [false, true] {
            let store = ArtifactStore::new(&dir.path().join(sole.to_string())).sole_writer(sole);
            let names = || {
                let mut n: Vec<_> = std::fs::read_dir(store.run_dir("run-1"))
                    .expect("dir")
                    .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                    .collect();
                n.sort();
                n
            };
            let queued = run_state(1, RunStatus::Queued);
            store.write_plan(&queued).expect("plan");
            assert_eq!(names(), ["plan.json", "run.json"]);
            assert_eq!(version_on_disk(&store), Some(1));
            let plan: serde_json::Value = serde_json::from_slice(
                &std::fs::read(store.run_dir("run-1").join("plan.json")).expect("plan.json"),
            )
            .expect("json");
            assert_eq!(plan["runId"], "run-1");
            // A sole writer knows the version it wrote: an equal one is not written again.
            assert_eq!(
                crate::sync::lock(&store.run_json).versions.get("run-1"),
                sole.then_some(&1)
            );

            for later in [
                run_state(5, RunStatus::WaitingApproval),
                run_state(9, RunStatus::Completed),
            ] {
                std::fs::remove_dir_all(store.run_dir("run-1")).expect("clean");
                crate::sync::lock(&store.run_json).versions.clear();
                store.write_run_json(&later).expect("the runtime's write");
                store.write_plan(&queued).expect("the late queueing write");
                assert_eq!(version_on_disk(&store), Some(later.run.version));
                assert_eq!(names(), ["plan.json", "run.json"]);
            }
        }
    }

    /// Every file under `dir`, relative, sorted.
    fn files_under(dir: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).expect("dir") {
                let path = e.expect("entry").path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).expect("under");
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    /// A stage's files arrive as one directory, and the same files go into a directory that
    /// is there already (a failed attempt recorded in it, then a rerun), replacing their
    /// namesakes and keeping the rest; no temporary file or directory is left either way.
    #[test]
    fn a_stage_directory_is_written_whole_or_file_by_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ArtifactStore::new(dir.path());
        let mut ctx = crate::runner::tests::context("run-1", "keywords");
        ctx.position = 4;
        let output = |text: &str| StageOutput {
            summary: "s".into(),
            pipeline_status: "completed".into(),
            artifacts: vec![
                ("strategy/keyword-map.md".into(), format!("map {text}")),
                ("final/foundation-brief.md".into(), format!("brief {text}")),
            ],
        };
        let stages = store.run_dir("run-1").join("stages");
        let stage = stages.join("04-keywords");
        let expected = [
            "artifacts/final/foundation-brief.md",
            "artifacts/strategy/keyword-map.md",
            "input.json",
            "manifest.json",
            "output.json",
        ];

        let metas = store
            .write_stage(&ctx, &output("one"), "t0")
            .expect("whole");
        assert_eq!(files_under(&stage), expected);
        assert_eq!(files_under(&stages).len(), expected.len(), "nothing else");
        assert_eq!(metas.len(), 2);
        assert_eq!(metas[0].size, "map one".len() as i64);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(stage.join("manifest.json")).expect("read"))
                .expect("json");
        assert_eq!(
            manifest["artifacts"][1]["path"],
            "artifacts/final/foundation-brief.md"
        );

        // Another stage with a failed attempt first: its directory exists.
        ctx.stage_key = "research".into();
        ctx.position = 1;
        store
            .write_attempt(&ctx, "failed", None, "t0")
            .expect("attempt");
        ctx.attempt = 2;
        store
            .write_stage(&ctx, &output("two"), "t1")
            .expect("file by file");
        let research = stages.join("01-research");
        let mut with_attempt = vec!["attempts/001.json".to_string()];
        with_attempt.extend(expected.iter().map(|s| s.to_string()));
        with_attempt.sort();
        assert_eq!(files_under(&research), with_attempt);
        assert_eq!(
            std::fs::read_to_string(research.join("artifacts/strategy/keyword-map.md"))
                .expect("read"),
            "map two"
        );

        // The first stage again (its commit did not happen): replaced in place.
        ctx.stage_key = "keywords".into();
        ctx.position = 4;
        store
            .write_stage(&ctx, &output("three"), "t2")
            .expect("again");
        assert_eq!(files_under(&stage), expected);
        assert_eq!(
            std::fs::read_to_string(stage.join("artifacts/final/foundation-brief.md"))
                .expect("read"),
            "brief three"
        );
        let names: Vec<_> = std::fs::read_dir(&stages)
            .expect("stages")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary directory left: {names:?}");
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a/b.json");
        write_atomic(&p, b"{}").expect("write");
        write_atomic(&p, b"{\"x\":1}").expect("overwrite");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "{\"x\":1}");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["b.json"]);
    }
}
