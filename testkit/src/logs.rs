//! The servers' log files: one per start, read whole for a test's failure
//! report or by their last bytes for an error message.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of a log an error message carries: enough for the cause,
/// short enough to read in a terminal.
pub(crate) const TAIL_BYTES: u64 = 8 * 1024;

/// `<dir>/<stem>.<start>.log`: each start writes its own file, so a
/// restart's log does not overwrite the run that went wrong.
pub(crate) fn numbered(dir: &Path, stem: &str, start: u32) -> PathBuf {
    dir.join(format!("{stem}.{start}.log"))
}

/// The whole file, or nothing if it cannot be read (a log is evidence, not
/// a reason to fail).
pub(crate) fn read(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// The last `max_bytes` of the file (lossy at a cut UTF-8 character).
pub(crate) fn tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(length.saturating_sub(max_bytes)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Every start's log, oldest first.
pub(crate) fn read_all(dir: &Path, stem: &str, starts: u32) -> String {
    (1..=starts)
        .map(|start| read(&numbered(dir, stem, start)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_and_read_all_joins_the_starts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(numbered(dir.path(), "x", 1), "first\n").unwrap();
        std::fs::write(numbered(dir.path(), "x", 2), "second\n").unwrap();
        assert_eq!(read_all(dir.path(), "x", 2), "first\nsecond\n");
        assert_eq!(tail(&numbered(dir.path(), "x", 2), 4), "ond\n");
        assert_eq!(tail(&dir.path().join("missing"), 4), "");
    }
}
