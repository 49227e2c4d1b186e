//! Trees written by `tree_export` and applied by `tree_import` on a real filesystem.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use super::*;
use crate::os::tree_export::{Stopped, export};
use crate::tree_stream as ts;

const MIB: u64 = 1 << 20;

fn open_dir(path: &Path) -> File {
    File::open(path).unwrap()
}

/// A tree with what a volume holds: nested and read-only directories, sparse and empty
/// files, other owners, symlinks pointing anywhere, and a FIFO (left out).
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/b/c/deep"), b"deep data").unwrap();
    let sparse = File::create(root.join("a/sparse")).unwrap();
    sparse.set_len(16 * MIB).unwrap();
    sparse.write_all_at(&vec![7u8; 300_000], 0).unwrap();
    sparse.write_all_at(&vec![9u8; 70_000], 9 * MIB).unwrap();
    File::create(root.join("empty")).unwrap();
    fs::write(root.join("owned"), b"theirs").unwrap();
    std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(root.join("owned"), fs::Permissions::from_mode(0o4750)).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("../../outside", root.join("a/rel-link")).unwrap();
    fs::create_dir(root.join("ro")).unwrap();
    fs::write(root.join("ro/inside"), b"x").unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let fifo = CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: fifo is NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fs::set_permissions(root, fs::Permissions::from_mode(0o751)).unwrap();
}

/// A temporary directory holding [`sample_tree`] in `src`.
fn sample_source() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    sample_tree(&src);
    (t, src)
}

fn stream_of(root: &Path, from: u64, chunk: usize) -> (Vec<u8>, u64) {
    let mut all = vec![];
    let mut next = from;
    let sent = export(&open_dir(root), from, chunk, &mut |c| {
        assert_eq!(c.offset, next, "chunks are contiguous");
        assert!(c.bytes.len() <= chunk.max(64));
        next += c.bytes.len() as u64;
        all.extend_from_slice(c.bytes);
        true
    })
    .unwrap();
    assert_eq!(sent.bytes, all.len() as u64);
    (all, sent.chunks)
}

/// Every entry under `root`: its path, kind, mode, owner, time, and contents or target.
fn listing(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if m.is_file() {
                let data = fs::read(&path).unwrap();
                format!("file {} crc {:08x}", data.len(), crc32fast::hash(&data))
            } else {
                "special".to_owned()
            };
            let mode = if m.file_type().is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            out.push(format!(
                "{rel} {what} {mode:o} {}:{} {}.{}",
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            ));
        }
    }
    out.sort();
    out
}

fn import_into(
    stream: &[u8],
    piece: usize,
    dst: &Path,
    limit: u64,
) -> Result<TreeImport, ImportError> {
    fs::create_dir(dst).unwrap();
    let mut import = TreeImport::new(open_dir(dst), limit);
    for part in stream.chunks(piece) {
        import.feed(part)?;
    }
    Ok(import)
}

#[test]
fn a_tree_travels_whole_sparse_and_with_its_attributes() {
    let (t, src) = sample_source();
    let dst = t.path().join("dst");
    let (stream, chunks) = stream_of(&src, 0, 64 * 1024);
    assert!(chunks > 1);
    let import = import_into(&stream, 10_000, &dst, u64::MAX).unwrap();
    assert!(import.finished());
    // Whole blocks travel: what was written, rounded up to the filesystem's blocks.
    let written = 300_000 + 70_000 + 9 + 6 + 1;
    assert!((written..written + 4 * 65536).contains(&import.data_bytes()));
    import.sync().unwrap();

    let mut expected = listing(&src);
    expected.retain(|l| !l.starts_with("fifo "));
    assert_eq!(listing(&dst), expected);
    let root = (fs::metadata(&src).unwrap(), fs::metadata(&dst).unwrap());
    assert_eq!(root.0.mode() & 0o7777, root.1.mode() & 0o7777);
    // Holes stay holes: 16 MiB with about 370 KB of data.
    let sparse = fs::metadata(dst.join("a/sparse")).unwrap();
    assert_eq!(sparse.len(), 16 * MIB);
    assert!(
        sparse.blocks() * 512 < 2 * MIB,
        "{} blocks",
        sparse.blocks()
    );
    assert!(!dst.join("fifo").exists());
}

#[test]
fn a_resumed_walk_sends_exactly_the_rest_of_the_stream() {
    let (_t, src) = sample_source();
    let (whole, _) = stream_of(&src, 0, 4096);
    for from in [
        1,
        5,
        37,
        4096,
        100_000,
        300_050,
        whole.len() as u64 - 1,
        whole.len() as u64,
    ] {
        let (rest, _) = stream_of(&src, from, 4096);
        assert_eq!(rest, whole[from as usize..], "from {from}");
    }
    // A receiver gone stops the walk.
    let mut calls = 0;
    let stopped = export(&open_dir(&src), 0, 4096, &mut |_| {
        calls += 1;
        calls < 3
    });
    assert!(matches!(stopped, Err(Stopped::Receiver)));
}

#[test]
fn more_data_than_the_volume_holds_is_refused() {
    let (t, src) = sample_source();
    let dst = t.path().join("dst");
    let (stream, _) = stream_of(&src, 0, 1 << 20);
    let err = import_into(&stream, 1 << 20, &dst, 100_000).err().unwrap();
    assert!(
        matches!(err, ImportError::TooLarge { limit: 100_000 }),
        "{err:?}"
    );
}

#[test]
fn names_in_a_stream_never_reach_through_its_symlinks() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let attrs = ts::Attrs {
        mode: 0o755,
        ..Default::default()
    };
    // A link to a directory outside, then a directory, a file and a link by the same name.
    for (i, second) in [ts::dir as fn(&mut Vec<u8>, &ts::Attrs, &[u8]), |s, a, n| {
        ts::file(s, a, n, 3)
    }]
    .into_iter()
    .enumerate()
    {
        let mut s = vec![];
        ts::start(&mut s, &attrs);
        ts::symlink(&mut s, &attrs, b"l", outside.as_os_str().as_encoded_bytes());
        second(&mut s, &attrs, b"l");
        let dst = t.path().join(format!("dst{i}"));
        let err = import_into(&s, s.len(), &dst, u64::MAX).err().unwrap();
        assert!(
            matches!(&err, ImportError::Io(_, e) if e.raw_os_error() == Some(libc::EEXIST)),
            "{err:?}"
        );
    }
    let mut s = vec![];
    ts::start(&mut s, &attrs);
    ts::symlink(&mut s, &attrs, b"l", outside.as_os_str().as_encoded_bytes());
    ts::symlink(&mut s, &attrs, b"l", b"/");
    let err = import_into(&s, 5, &t.path().join("dst9"), u64::MAX)
        .err()
        .unwrap();
    assert!(
        matches!(&err, ImportError::Io(_, e) if e.raw_os_error() == Some(libc::EEXIST)),
        "{err:?}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    // Malformed names are the decoder's: refused before anything is made.
    let mut s = vec![];
    ts::start(&mut s, &attrs);
    s.push(1);
    s.extend_from_slice(&[0u8; 24]);
    s.push(2);
    s.extend_from_slice(b"..");
    let dst = t.path().join("dst-dots");
    let err = import_into(&s, 3, &dst, u64::MAX).err().unwrap();
    assert!(matches!(err, ImportError::Malformed(_)), "{err:?}");
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
}

#[test]
fn endless_empty_entries_are_refused_like_data() {
    let t = tempfile::tempdir().unwrap();
    let attrs = ts::Attrs {
        mode: 0o644,
        ..Default::default()
    };
    let mut s = vec![];
    ts::start(&mut s, &attrs);
    for i in 0..100 {
        ts::file(&mut s, &attrs, format!("f{i:03}").as_bytes(), 0);
        ts::end_file(&mut s);
    }
    // Each entry counts ENTRY_BYTES and its name: 50 fit, not 100.
    let limit = 50 * (ENTRY_BYTES + 4);
    let dst = t.path().join("dst");
    let err = import_into(&s, 4096, &dst, limit).err().unwrap();
    assert!(
        matches!(err, ImportError::TooLarge { limit: l } if l == limit),
        "{err:?}"
    );
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 50);
    // The same tree within a limit that holds it arrives whole.
    let dst = t.path().join("dst-whole");
    import_into(&s, 4096, &dst, 100 * (ENTRY_BYTES + 4))
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 100);
}
