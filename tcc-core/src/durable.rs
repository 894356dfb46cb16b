//! A sled database whose flush reaches stable storage.
//!
//! sled 0.34.7's `Db::flush()` writes its log buffers and ends in `sync_file_range`, not in `fsync`
//! or `fdatasync` (measured with `strace`: in one second of group commits, 590 `sync_file_range`
//! calls against 4 real fsyncs from sled's own background thread). `sync_file_range` starts and
//! waits for the write-back of the pages, but neither flushes the disk's volatile write cache nor
//! the file's metadata (its size, when the log grew). A killed process loses nothing after it, since
//! the page cache outlives the process; a power cut or a host crash can lose writes tcc has already
//! acknowledged. sled also writes values too large for its log as separate blob files with no sync
//! at all, and never syncs its directories.
//!
//! [`DurableDb::flush`] therefore does what sled leaves out, after sled's own flush and through
//! sled's files only (its public API has nothing more):
//! 1. every blob file sled wrote since the last flush gets `fdatasync`, then the `blobs` directory
//!    an `fsync` (so the new names survive too); blobs come first because log records point at them;
//! 2. the log file (`db`) gets `fdatasync`, which also makes its new length durable.
//!
//! When the directory is opened, its configuration file, the log file and the directory entries are
//! synced once as well. Callers flush once per group of writes (see
//! [`GroupCommit`](crate::store::group_commit::GroupCommit)), so many acknowledgements share one
//! `fdatasync` of the log.
//!
//! Every sled database tcc writes to goes through a [`DurableDb`]: the [`SledStore`](crate::SledStore)
//! of the coordinator and the [`SledBarrier`](crate::SledBarrier) of a participant (with the
//! participant's business trees, which live in the same database).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Watches the syncs a [`DurableDb`] makes, for tests: called with the synced path after each
/// successful `fdatasync`/`fsync`, in the order they happen.
#[doc(hidden)]
pub type SyncObserver = Arc<dyn Fn(&Path) + Send + Sync>;

/// A sled database opened so that [`flush`](DurableDb::flush) means "on stable storage".
///
/// It dereferences to [`sled::Db`], so trees are opened and used as on a plain database. Cloning is
/// cheap and shares the database.
///
/// ```
/// use tcc_core::DurableDb;
///
/// let dir = tempfile::tempdir()?;
/// let db = DurableDb::open(dir.path().join("flights"))?;
/// let seats = db.open_tree("seats")?;
/// seats.insert("12A", "held")?;
/// db.flush()?; // sled's flush, then fdatasync of what it wrote
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct DurableDb {
    db: sled::Db,
    /// `None` for a temporary database, whose files die with the process anyway.
    files: Option<Arc<Files>>,
}

struct Files {
    dir: PathBuf,
    log: File,
    /// Names of the blob files already synced, so each is synced once.
    synced_blobs: Mutex<HashSet<OsString>>,
    observer: Option<SyncObserver>,
}

impl fmt::Debug for DurableDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableDb")
            .field("dir", &self.files.as_ref().map(|files| &files.dir))
            .finish_non_exhaustive()
    }
}

impl Deref for DurableDb {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

impl DurableDb {
    /// Opens (or creates) the database in directory `path` with sled's default configuration.
    pub fn open(path: impl AsRef<Path>) -> io::Result<DurableDb> {
        DurableDb::open_with(path, sled::Config::new())
    }

    /// Opens (or creates) the database in directory `path` with `config` (its cache size, say); the
    /// path is set here, and `config` must not be temporary.
    pub fn open_with(path: impl AsRef<Path>, config: sled::Config) -> io::Result<DurableDb> {
        DurableDb::open_observed(path, config, None)
    }

    /// [`open_with`](Self::open_with), calling `observer` after each sync (for tests).
    #[doc(hidden)]
    pub fn open_observed(
        path: impl AsRef<Path>,
        config: sled::Config,
        observer: Option<SyncObserver>,
    ) -> io::Result<DurableDb> {
        let dir = path.as_ref().to_path_buf();
        let db = config.path(&dir).open().map_err(io::Error::other)?;
        let log = File::open(dir.join("db"))?;
        let files = Files { dir, log, synced_blobs: Mutex::default(), observer };
        files.sync_at_open()?;
        Ok(DurableDb { db, files: Some(Arc::new(files)) })
    }

    /// A temporary database, deleted when the last handle is dropped: for tests and examples. Its
    /// [`flush`](Self::flush) is sled's alone, since nothing of it survives the process.
    pub fn temporary() -> io::Result<DurableDb> {
        let db = sled::Config::new().temporary(true).open().map_err(io::Error::other)?;
        Ok(DurableDb { db, files: None })
    }

    /// The sled database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write made before this call durable: sled's flush, then `fdatasync` of the files
    /// it wrote (see the [module docs](self)). Blocking: call it from a thread that may block.
    pub fn flush(&self) -> io::Result<()> {
        self.db.flush().map_err(io::Error::other)?;
        match &self.files {
            Some(files) => files.sync_written(),
            None => Ok(()),
        }
    }
}

impl Files {
    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()?;
        if let Some(observer) = &self.observer {
            observer(path);
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        // On Linux a directory opened read-only can be fsynced; that makes its entries durable.
        let dir = File::open(path)?;
        dir.sync_all()?;
        if let Some(observer) = &self.observer {
            observer(path);
        }
        Ok(())
    }

    /// Once at open: sled writes its configuration and creates its directories without a sync.
    fn sync_at_open(&self) -> io::Result<()> {
        let conf = self.dir.join("conf");
        if let Ok(file) = File::open(&conf) {
            self.sync(&conf, &file)?;
        }
        self.sync_written()?;
        self.sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.sync_dir(parent)?;
        }
        Ok(())
    }

    /// Blobs not synced yet, their directory if it gained any, then the log.
    fn sync_written(&self) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        let mut synced = self.synced_blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = HashSet::with_capacity(synced.len());
        let mut new = false;
        match std::fs::read_dir(&blobs) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name();
                    if !synced.contains(&name) {
                        let path = blobs.join(&name);
                        match File::open(&path) {
                            Ok(file) => self.sync(&path, &file)?,
                            // sled removed it in the meantime (garbage collection): nothing to keep.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e),
                        }
                        new = true;
                    }
                    present.insert(name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if new {
            self.sync_dir(&blobs)?;
        }
        // Only names still on disk are remembered, so the set stays as small as the directory.
        *synced = present;
        drop(synced);
        self.sync(&self.dir.join("db"), &self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(dir: &Path) -> (DurableDb, Arc<Mutex<Vec<PathBuf>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer: SyncObserver = Arc::new(move |p: &Path| log.lock().unwrap().push(p.to_path_buf()));
        let db = DurableDb::open_observed(dir, sled::Config::new(), Some(observer)).unwrap();
        (db, seen)
    }

    #[test]
    fn a_flush_syncs_the_log_file_after_sled_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let (db, seen) = observed(&dir.path().join("d"));
        seen.lock().unwrap().clear();
        db.insert("k", "v").unwrap();
        db.flush().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![dir.path().join("d").join("db")]);
    }

    /// The sync must come after sled wrote its buffers: a sync before sled's flush would leave the
    /// last writes in the page cache only.
    #[test]
    fn the_log_is_synced_after_sled_wrote_the_flushed_values_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let marker = b"a-value-that-only-this-write-contains-0123456789".to_vec();
        let (log, wanted) = (path.join("db"), marker.clone());
        let found = Arc::new(Mutex::new(Vec::new()));
        let seen = found.clone();
        let observer: SyncObserver = Arc::new(move |p: &Path| {
            if p == log {
                let bytes = std::fs::read(p).unwrap();
                seen.lock().unwrap().push(bytes.windows(wanted.len()).any(|w| w == wanted.as_slice()));
            }
        });
        let db = DurableDb::open_observed(&path, sled::Config::new(), Some(observer)).unwrap();
        found.lock().unwrap().clear();
        db.insert("k", marker).unwrap();
        db.flush().unwrap();
        assert_eq!(*found.lock().unwrap(), vec![true], "the synced log holds the value");
    }

    #[test]
    fn opening_syncs_the_configuration_the_log_and_the_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let (_db, seen) = observed(&path);
        let seen = seen.lock().unwrap();
        for want in [path.join("conf"), path.join("db"), path.clone(), dir.path().to_path_buf()] {
            assert!(seen.contains(&want), "{want:?} not synced at open: {seen:?}");
        }
    }

    #[test]
    fn a_value_stored_as_a_blob_is_synced_once_before_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let (db, seen) = observed(&path);
        seen.lock().unwrap().clear();
        // Far larger than a log segment allows inline: sled writes it to a blob file.
        db.insert("big", vec![7u8; 2 << 20]).unwrap();
        db.flush().unwrap();
        let first = seen.lock().unwrap().clone();
        let blobs: Vec<_> = first.iter().filter(|p| p.parent() == Some(&path.join("blobs"))).collect();
        assert_eq!(blobs.len(), 1, "one blob synced: {first:?}");
        let at = |want: &Path| first.iter().position(|p| p == want);
        let (blob, blob_dir, log) = (at(blobs[0]), at(&path.join("blobs")), at(&path.join("db")));
        assert!(blob < blob_dir && blob_dir < log, "blob, its directory, then the log: {first:?}");

        seen.lock().unwrap().clear();
        db.insert("small", "v").unwrap();
        db.flush().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![path.join("db")], "a synced blob is not synced again");
    }

    /// What sled left in `blobs/` decides: a name that vanished before its sync (sled's garbage
    /// collection) is skipped, anything else that cannot be synced fails the flush, so nothing is
    /// acknowledged on a sync that did not happen.
    #[test]
    fn a_blob_gone_before_its_sync_is_skipped_and_one_that_cannot_be_opened_fails_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let (db, _) = observed(&path);
        let blobs = path.join("blobs");
        std::os::unix::fs::symlink(blobs.join("nowhere"), blobs.join("1")).unwrap();
        db.flush().unwrap();
        std::fs::remove_file(blobs.join("1")).unwrap();
        std::os::unix::fs::symlink(blobs.join("2"), blobs.join("2")).unwrap(); // a loop: ELOOP
        assert!(db.flush().is_err(), "a blob that cannot be synced was skipped");
    }

    #[test]
    fn a_missing_blobs_directory_has_nothing_to_sync_and_an_unreadable_one_fails_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let (db, _) = observed(&path);
        std::fs::remove_dir(path.join("blobs")).unwrap();
        db.flush().unwrap();
        std::fs::write(path.join("blobs"), b"not a directory").unwrap();
        assert!(db.flush().is_err(), "a blobs directory that cannot be read was ignored");
    }

    #[test]
    fn a_temporary_database_flushes_without_files() {
        let db = DurableDb::temporary().unwrap();
        db.insert("k", "v").unwrap();
        db.flush().unwrap();
        assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
