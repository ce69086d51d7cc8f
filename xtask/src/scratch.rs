//! The tests' scratch directories: the brokers' SQLite files, the instances' stores, workerd's
//! and wrangler's state, and every log, under `target/` where a developer looks for them.
//!
//! Where the machine has a tmpfs with room (`/dev/shm`), they live there and `target/<name>`
//! links to them. A test broker commits every produce request to SQLite and an instance makes
//! durable commits: on a disk each waits for its fsync, which made the suite slow, and its
//! timings erratic on a disk shared with other work (a scale-out scenario streaming 30,000
//! events: 48 s with its files on disk, 31 s on tmpfs, same machine). A SIGKILLed process
//! loses nothing tmpfs holds (only a machine crash would), so the tests' kills mean what they
//! mean on disk.

use std::path::{Path, PathBuf};

/// The scratch directories under `target/`: origin-sync's integration tests', the end-to-end
/// tests'.
const DIRS: [&str; 2] = ["origin-sync-tests", "e2e"];

const TMPFS: &str = "/dev/shm";

/// Free tmpfs the scratch is put there with: a full run's peak is about 1 GB (measured), and
/// tmpfs is memory.
const TMPFS_ROOM: u64 = 4_000_000_000;

/// Removes what an earlier run left, then makes each scratch directory, on tmpfs when the
/// machine has one with room. Returns where they live.
pub fn prepare(root: &Path) -> anyhow::Result<PathBuf> {
    remove(root);
    // absent when cargo builds elsewhere (`CARGO_TARGET_DIR`)
    std::fs::create_dir_all(root.join("target"))?;
    let tmpfs = Path::new(TMPFS);
    let on_tmpfs = tmpfs.is_dir()
        && crate::util::free_bytes(tmpfs).is_some_and(|free| free >= TMPFS_ROOM)
        && std::fs::create_dir_all(per_clone(root)).is_ok();
    for name in DIRS {
        let link = root.join("target").join(name);
        if on_tmpfs {
            let dir = per_clone(root).join(name);
            std::fs::create_dir_all(&dir)?;
            std::os::unix::fs::symlink(&dir, &link)?;
        } else {
            std::fs::create_dir_all(&link)?;
        }
    }
    Ok(if on_tmpfs {
        per_clone(root)
    } else {
        root.join("target")
    })
}

/// Removes the scratch directories, and what they link to.
pub fn remove(root: &Path) {
    for name in DIRS {
        let link = root.join("target").join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(dir) = std::fs::read_link(&link) {
                    let _ = std::fs::remove_dir_all(dir);
                }
                let _ = std::fs::remove_file(&link);
            }
            Ok(_) => {
                let _ = std::fs::remove_dir_all(&link);
            }
            Err(_) => {}
        }
    }
    let _ = std::fs::remove_dir(per_clone(root));
}

/// This clone's directory on tmpfs: clones side by side (a CI run beside a developer's tree)
/// keep apart.
fn per_clone(root: &Path) -> PathBuf {
    // FNV-1a: stable across runs and toolchains, unlike std's hasher
    let hash = root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    Path::new(TMPFS).join(format!("edgewise-tests-{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_clone_has_its_own_tmpfs_directory() {
        assert_eq!(
            per_clone(Path::new("/a/main")),
            per_clone(Path::new("/a/main"))
        );
        assert_ne!(
            per_clone(Path::new("/a/main")),
            per_clone(Path::new("/b/main"))
        );
    }
}
