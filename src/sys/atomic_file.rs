//! The crate's one atomic file writer: files replaced atomically, written to a temporary
//! file in the same directory, fsync'ed, renamed over the target, and the directory
//! fsync'ed. A reader (node_exporter's textfile collector, an operator's tools, a program
//! configured by the desired-state file handler) sees the old file or the new one, never a
//! part of one, and a crash leaves at most a stray temporary file (named `.NAME.tmp-…`, so
//! collectors that read `*.prom` ignore it).
//!
//! The directory may be writable by others (a textfile collector's directory often is), so
//! the temporary file is created new-only under a random name: `O_CREAT|O_EXCL` never
//! follows a planted symlink and never opens a file somebody else made, and the mode is set
//! on the descriptor we created. The rename replaces the target's directory entry, never
//! what a symlink there points to.
//!
//! # Guarantees
//! - **Whole or nothing**: at every moment, also after a crash or a power cut, `path` holds
//!   the old content or the new one (or is missing if it was), never a mix or a prefix.
//! - **Durable on success**: when [`AtomicFile::commit`] (or [`write`],
//!   [`write_with_mode`], [`write_keeping_mode`]) returns `Ok`, the content was fsync'ed
//!   before the rename and the directory after it: the new file survives a power cut.
//! - **Errors**: a failure before the rename (create, write, fsync, rename) leaves the
//!   target untouched and removes the temporary file; the error is the OS's, unchanged. A
//!   failure of the directory fsync after the rename is returned too: the new content is
//!   in place, but the rename may not survive a power cut.
//! - **Mode**: exactly the mode asked for (0644 by default), whatever the umask; the
//!   temporary file is never readable by others before that ([`write_keeping_mode`] keeps
//!   the permission bits of an existing regular file instead). Ownership is the writer's;
//!   ACLs and extended attributes of a replaced file are not carried over.
//! - **Not created**: the parent directory must exist; nothing here creates directories.
//! - **No lock**: concurrent writers of one path each write their own temporary file; the
//!   last rename wins, whole.
//! - **Abandoned**: an [`AtomicFile`] dropped before `commit` removes its temporary file
//!   and leaves the target alone.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a file nobody else needs to read.
#[cfg(test)]
pub const PRIVATE: u32 = 0o600;
/// Mode of a file that a collector running as another user reads.
pub const PUBLIC: u32 = 0o644;
/// Names tried before giving up when each one already exists (planted or left by a crash).
const NAME_TRIES: u32 = 16;

/// A file being written; becomes `path` on [`AtomicFile::commit`], vanishes when dropped
/// before that.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (mode 0644, so that a collector running as another user can
    /// read it, whatever the umask).
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        Self::create_with_mode(path, PUBLIC)
    }

    /// Starts writing `path`, which gets exactly `mode` whatever the umask.
    pub fn create_with_mode(path: &Path, mode: u32) -> io::Result<AtomicFile> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not name a file", path.display()),
            )
        })?;
        let mut tries = 0;
        let (tmp, file) = loop {
            let tmp = dir_of(path).join(format!(
                ".{}.tmp-{}-{:016x}",
                name.to_string_lossy(),
                std::process::id(),
                random()
            ));
            // create_new is O_CREAT|O_EXCL: fails on any existing entry, symlinks included.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o600)
                .open(&tmp)
            {
                Ok(file) => break (tmp, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < NAME_TRIES => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let out = AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
        };
        if let Some(w) = &out.out {
            // fchmod on our own descriptor: exact mode, whatever the umask.
            w.get_ref()
                .set_permissions(fs::Permissions::from_mode(mode))?;
        }
        Ok(out)
    }

    /// Flushes, fsyncs, renames over the target and fsyncs the directory.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(w) = self.out.take() else {
            return Err(io::Error::other("already committed"));
        };
        let renamed = w
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .and_then(|file| file.sync_all())
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = renamed {
            // Not renamed: the temporary is ours to remove.
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_dir(dir_of(&self.path))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Replaces `path` with `contents` atomically (mode 0644).
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_with_mode(path, contents, PUBLIC)
}

/// Replaces `path` with `contents` atomically, with exactly `mode`.
pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut f = AtomicFile::create_with_mode(path, mode)?;
    f.write_all(contents)?;
    f.commit()
}

/// Replaces `path` with `contents` atomically; an existing regular file (or one a symlink
/// there points to) keeps its permission bits, a new one gets exactly `new_mode`.
pub fn write_keeping_mode(path: &Path, contents: &[u8], new_mode: u32) -> io::Result<()> {
    let mode = match fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta.permissions().mode() & 0o7777,
        _ => new_mode,
    };
    write_with_mode(path, contents, mode)
}

/// Fsyncs the directory `dir`, so that a rename or removal of an entry in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// 64 unpredictable bits: std seeds each `RandomState` from the OS's random source.
fn random() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        write(&path, b"one\n").unwrap();
        write(&path, b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two\n");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["m.prom"]);
    }

    #[test]
    fn an_abandoned_file_leaves_the_old_one_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ndjson");
        write(&path, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write(&dir.path().join("missing/x"), b"x").is_err());
    }

    #[test]
    fn a_planted_symlink_is_never_followed_and_names_are_not_predictable() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"secret").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("m.prom");
        // The name the old code used, and a link at the target itself.
        let old = dir
            .path()
            .join(format!(".m.prom.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old).unwrap();
        write(&path, b"one\n").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A symlink at the target is replaced, not written through.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_with_mode(&path, b"two\n", PRIVATE).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_ne!(random(), random());
    }
}
