//! Where the lake's bytes live: a local directory (the default) or any
//! object store of the `object_store` crate (S3, GCS, Azure, memory). Data
//! files and the publisher's progress go through [`Storage`]:
//!
//! - `put`: an object appears whole or not at all (a partial file is never
//!   visible under its final name);
//! - `put_new`: the same, but fails with [`LakeError::Exists`] when the name is
//!   taken;
//! - `get`, `list`, `delete`.
//!
//! The Delta log goes through the same store's `object_store` view
//! ([`Storage::object_store`]): commits are conditional creates
//! (`If-None-Match: *` on S3), so two writers can never both take a version.
//!
//! The local store writes under `<root>/_flywheel_tmp`, fsyncs, then renames
//! (or hard-links, for `put_new`) into place and fsyncs the directory, so a
//! file is durable before a commit names it. Object stores make puts atomic
//! themselves.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};

use crate::LakeError;

/// Directory of temporary files of the local store.
pub const TMP_DIR: &str = "_flywheel_tmp";

/// A lake's storage. Paths are relative to the lake root and `/`-separated.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The root as a URL (`file:///...`, `s3://bucket/prefix`, `memory:///`), for manifests.
    fn url(&self) -> String;
    /// Writes `bytes` at `path`, replacing what is there; all or nothing.
    fn put(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError>;
    /// Writes `bytes` at `path` only if nothing is there ([`LakeError::Exists`] otherwise).
    fn put_new(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError>;
    /// Reads `path`; `None` when absent.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, LakeError>;
    /// Every object under `prefix` (recursively), relative paths.
    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError>;
    /// Deletes `path`; absent is fine. Returns whether something was deleted.
    fn delete(&self, path: &str) -> Result<bool, LakeError>;
    /// Removes temporary files whose name starts with `prefix`: leftovers of
    /// a writer killed mid-put. Object stores have none.
    fn discard_temp(&self, prefix: &str) -> Result<(), LakeError>;
    /// The same bytes as an `object_store` rooted at the store's root (the
    /// file system's `/`, a bucket), and the URL of the lake root in it: what
    /// the Delta library opens the table with.
    fn object_store(&self) -> Result<(Arc<dyn ObjectStore>, url::Url), LakeError>;
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LakeError {
    let context = context.into();
    move |e| LakeError::Io { context, detail: e.to_string() }
}

/// A lake in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalStore {
    /// Opens (creating) the directory; removes temporary files older than an
    /// hour (no put takes that long, so their writer is gone).
    pub fn open(root: &Path) -> Result<LocalStore, LakeError> {
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let root = root.canonicalize().map_err(io(format!("resolving {}", root.display())))?;
        for e in std::fs::read_dir(root.join(TMP_DIR)).map_err(io("listing temp files"))?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(LocalStore { root, counter: AtomicU64::new(0) })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &str) -> Result<PathBuf, LakeError> {
        // Paths are built from validated parts; this guards the invariant.
        if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") || path.contains('\\') {
            return Err(LakeError::Config(format!("refusing lake path '{path}'")));
        }
        Ok(self.root.join(path))
    }

    /// Writes `bytes` to a fresh temp file and fsyncs it.
    fn stage(&self, path: &str, bytes: &[u8]) -> Result<PathBuf, LakeError> {
        let name = path.rsplit('/').next().unwrap_or(path);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(TMP_DIR).join(format!("{name}.{}-{n}.tmp", std::process::id()));
        let mut file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(format!("writing {}", tmp.display())))?;
        Ok(tmp)
    }

    fn place(&self, path: &str, bytes: &[u8], exclusive: bool) -> Result<(), LakeError> {
        let target = self.full(path)?;
        let dir = target.parent().expect("lake paths have a parent");
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = self.stage(path, bytes)?;
        let moved = if exclusive {
            // A hard link fails when the name exists, atomically.
            std::fs::hard_link(&tmp, &target).and_then(|()| std::fs::remove_file(&tmp))
        } else {
            std::fs::rename(&tmp, &target)
        };
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&tmp);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                LakeError::Exists(path.to_string())
            } else {
                LakeError::Io { context: format!("moving into {}", target.display()), detail: e.to_string() }
            });
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))
    }
}

impl Storage for LocalStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError> {
        self.place(path, bytes, false)
    }

    fn put_new(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError> {
        self.place(path, bytes, true)
    }

    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, LakeError> {
        match std::fs::read(self.full(path)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LakeError::Io { context: format!("reading {path}"), detail: e.to_string() }),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let mut out = Vec::new();
        let start = self.full(prefix)?;
        if !start.exists() {
            return Ok(out);
        }
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&self.root) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, path: &str) -> Result<bool, LakeError> {
        match std::fs::remove_file(self.full(path)?) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(LakeError::Io { context: format!("deleting {path}"), detail: e.to_string() }),
        }
    }

    fn object_store(&self) -> Result<(Arc<dyn ObjectStore>, url::Url), LakeError> {
        let url = url::Url::from_directory_path(&self.root)
            .map_err(|()| LakeError::Config(format!("{} is not an absolute path", self.root.display())))?;
        Ok((Arc::new(object_store::local::LocalFileSystem::new()), url))
    }

    fn discard_temp(&self, prefix: &str) -> Result<(), LakeError> {
        for e in std::fs::read_dir(self.root.join(TMP_DIR)).map_err(io("listing temp files"))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                std::fs::remove_file(e.path()).map_err(io(format!("removing {}", e.path().display())))?;
            }
        }
        Ok(())
    }
}

/// A lake in an object store (S3, GCS, Azure, or the in-memory store).
/// Calls block on `runtime`; use it from blocking threads.
#[derive(Debug)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    runtime: tokio::runtime::Handle,
}

fn object_err(context: String) -> impl FnOnce(object_store::Error) -> LakeError {
    move |e| LakeError::Io { context, detail: e.to_string() }
}

impl ObjectStorage {
    /// Wraps `store`, keeping the lake under `prefix`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: impl Into<String>,
        runtime: tokio::runtime::Handle,
    ) -> ObjectStorage {
        ObjectStorage { store, prefix: ObjectPath::from(prefix), url: url.into(), runtime }
    }

    fn at(&self, path: &str) -> ObjectPath {
        ObjectPath::from_iter(self.prefix.parts().chain(ObjectPath::from(path).parts()))
    }

    fn put_with(&self, path: &str, bytes: &[u8], mode: PutMode) -> Result<(), LakeError> {
        let opts = PutOptions { mode, ..Default::default() };
        let payload = PutPayload::from(bytes.to_vec());
        match self.runtime.block_on(self.store.put_opts(&self.at(path), payload, opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(LakeError::Exists(path.to_string())),
            Err(e) => Err(LakeError::Io { context: format!("writing {path}"), detail: e.to_string() }),
        }
    }
}

impl Storage for ObjectStorage {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn put(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError> {
        self.put_with(path, bytes, PutMode::Overwrite)
    }

    fn put_new(&self, path: &str, bytes: &[u8]) -> Result<(), LakeError> {
        self.put_with(path, bytes, PutMode::Create)
    }

    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, LakeError> {
        let at = self.at(path);
        self.runtime.block_on(async {
            match self.store.get(&at).await {
                Ok(r) => Ok(Some(r.bytes().await.map_err(object_err(format!("reading {path}")))?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(LakeError::Io { context: format!("reading {path}"), detail: e.to_string() }),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        use futures::TryStreamExt as _;
        let at = self.at(prefix);
        let skip = self.prefix.parts().count();
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&at)).try_collect())
            .map_err(object_err(format!("listing {prefix}")))?;
        let mut out: Vec<String> = metas
            .into_iter()
            .map(|m| m.location.parts().skip(skip).map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, path: &str) -> Result<bool, LakeError> {
        // Stores answer a delete of nothing with success: ask first.
        let at = self.at(path);
        match self.runtime.block_on(self.store.head(&at)) {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(LakeError::Io { context: format!("checking {path}"), detail: e.to_string() }),
        }
        match self.runtime.block_on(self.store.delete(&at)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(LakeError::Io { context: format!("deleting {path}"), detail: e.to_string() }),
        }
    }

    fn discard_temp(&self, _prefix: &str) -> Result<(), LakeError> {
        Ok(())
    }

    fn object_store(&self) -> Result<(Arc<dyn ObjectStore>, url::Url), LakeError> {
        let mut root =
            url::Url::parse(&self.url).map_err(|e| LakeError::Config(format!("lake root '{}': {e}", self.url)))?;
        root.set_path(&format!("/{}/", self.prefix.as_ref().trim_matches('/')).replace("//", "/"));
        Ok((self.store.clone(), root))
    }
}

/// Opens the storage a `--lake-root` names: a directory path or `file://`
/// URL (local store with fsync), `memory://` (in-process object store, for
/// tests and trials), or `s3://`, `gs://`, `az://` (credentials, endpoint and
/// options from the usual environment variables: `AWS_ACCESS_KEY_ID`,
/// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...).
pub fn open_storage(root: &str, runtime: tokio::runtime::Handle) -> Result<Arc<dyn Storage>, LakeError> {
    open_storage_with(root, &[], runtime)
}

/// [`open_storage`] with object-store options (`aws_endpoint`, ...) that
/// take precedence over the environment's.
pub fn open_storage_with(
    root: &str,
    options: &[(String, String)],
    runtime: tokio::runtime::Handle,
) -> Result<Arc<dyn Storage>, LakeError> {
    let Some((scheme, _)) = root.split_once("://") else {
        return Ok(Arc::new(LocalStore::open(Path::new(root))?));
    };
    if scheme == "file" {
        let url = url::Url::parse(root).map_err(|e| LakeError::Config(format!("lake root '{root}': {e}")))?;
        let path = url.to_file_path().map_err(|()| LakeError::Config(format!("lake root '{root}' is not a path")))?;
        return Ok(Arc::new(LocalStore::open(&path)?));
    }
    if scheme == "memory" {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        return Ok(Arc::new(ObjectStorage::new(store, "", root, runtime)));
    }
    let url = url::Url::parse(root).map_err(|e| LakeError::Config(format!("lake root '{root}': {e}")))?;
    // Later entries win: the environment first, then the explicit options.
    let mut opts: Vec<(String, String)> = std::env::vars().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    opts.extend(options.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    match object_store::parse_url_opts(&url, opts) {
        Ok((store, prefix)) => Ok(Arc::new(ObjectStorage::new(Arc::from(store), prefix.as_ref(), root, runtime))),
        Err(e) => Err(LakeError::Config(format!("lake root '{root}': {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Storage) {
        store.put("a/b/one.json", b"1").unwrap();
        store.put("a/b/one.json", b"11").unwrap();
        assert_eq!(store.get("a/b/one.json").unwrap().as_deref(), Some(&b"11"[..]));
        store.put_new("a/two.json", b"2").unwrap();
        assert!(matches!(store.put_new("a/two.json", b"x"), Err(LakeError::Exists(_))));
        assert_eq!(store.get("a/two.json").unwrap().as_deref(), Some(&b"2"[..]), "put_new never overwrites");
        assert_eq!(store.list("a").unwrap(), vec!["a/b/one.json".to_string(), "a/two.json".to_string()]);
        assert!(store.list("nothing").unwrap().is_empty());
        assert!(store.delete("a/two.json").unwrap());
        assert!(!store.delete("a/two.json").unwrap());
        assert_eq!(store.get("a/two.json").unwrap(), None);
    }

    #[test]
    fn local_and_object_stores_behave_alike() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path()).unwrap();
        exercise(&local);
        assert!(local.put("../escape", b"x").is_err(), "no path leaves the root");
        assert_eq!(std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0, "no temp file left");
        exercise(open_storage("memory://", runtime.handle().clone()).unwrap().as_ref());
        let fs: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        exercise(&ObjectStorage::new(fs, "via-object-store", "file:///x", runtime.handle().clone()));
        assert!(dir.path().join("via-object-store/a/b/one.json").exists());
    }
}
