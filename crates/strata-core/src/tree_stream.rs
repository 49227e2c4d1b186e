//! The byte format in which a directory tree (a btrfs or dir volume or snapshot) travels
//! between nodes: records written depth first, each file's data as the ranges it holds
//! (holes stay holes). This module only encodes and decodes; the walk that writes a stream
//! and the filesystem work that applies one are in `os::tree_export` and `os::tree_import`.
//!
//! The decoder takes bytes from another node: every length is bounded, names are single path
//! components, and the structure (a file's data inside its file, depth, one root) is checked
//! before anything is handed on. It is fed in pieces of any size and keeps at most one record
//! header (a few KiB) between them; file data passes through as slices of the input.
//!
//! ```text
//! stream  = MAGIC VERSION root entry* END_DIR      (the root's END_DIR ends it)
//! root    = ROOT attrs
//! entry   = DIR attrs name entry* END_DIR
//!         | FILE attrs name size:u64 (DATA offset:u64 len:u32 bytes)* END_FILE
//!         | SYMLINK attrs name target_len:u16 target
//! attrs   = mode:u32 uid:u32 gid:u32 mtime_seconds:i64 mtime_nanoseconds:u32
//! name    = len:u8 bytes                            (all integers little-endian)
//! ```

use std::fmt;

/// What every stream starts with.
pub const MAGIC: &[u8; 4] = b"STRT";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;

const ROOT: u8 = 0;
const DIR: u8 = 1;
const END_DIR: u8 = 2;
const FILE: u8 = 3;
const DATA: u8 = 4;
const END_FILE: u8 = 5;
const SYMLINK: u8 = 6;

/// Directories nested deeper are refused (each level holds a descriptor open).
pub const MAX_DEPTH: usize = 256;
/// The largest piece of file data in one record.
pub const MAX_DATA: u32 = 1 << 20;
/// The longest symlink target (PATH_MAX less its NUL).
pub const MAX_TARGET: usize = 4095;

const ATTRS_LEN: usize = 4 + 4 + 4 + 8 + 4;
/// The longest record header: a symlink with the longest name and target.
const MAX_HEADER: usize = 1 + ATTRS_LEN + 1 + 255 + 2 + MAX_TARGET;

/// Mode, owner and modification time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Permission bits (`0o7777` at most; the type is the record's).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_seconds: i64,
    pub mtime_nanoseconds: u32,
}

/// One thing the decoder found, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The tree's root directory (its attributes apply at its `EndDir`).
    Root(Attrs),
    /// A directory inside the current one; entries that follow are inside it.
    Dir { attrs: Attrs, name: &'a [u8] },
    /// The current directory is complete: apply its attributes and leave it. After the
    /// root's, the stream is complete.
    EndDir,
    /// A regular file of `size` bytes (all holes until data arrives).
    File {
        attrs: Attrs,
        name: &'a [u8],
        size: u64,
    },
    /// Bytes of the current file at `offset` (one record may arrive as several pieces).
    Data { offset: u64, bytes: &'a [u8] },
    /// The current file is complete.
    EndFile,
    /// A symbolic link, stored as it is (never followed).
    Symlink {
        attrs: Attrs,
        name: &'a [u8],
        target: &'a [u8],
    },
}

/// A stream that is not one this build writes. Says what was wrong, never the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(what.into()))
}

/// Whether `name` is one path component a directory may hold.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

fn put_attrs(out: &mut Vec<u8>, a: &Attrs) {
    out.extend_from_slice(&a.mode.to_le_bytes());
    out.extend_from_slice(&a.uid.to_le_bytes());
    out.extend_from_slice(&a.gid.to_le_bytes());
    out.extend_from_slice(&a.mtime_seconds.to_le_bytes());
    out.extend_from_slice(&a.mtime_nanoseconds.to_le_bytes());
}

fn put_name(out: &mut Vec<u8>, name: &[u8]) {
    debug_assert!(valid_name(name));
    out.push(name.len() as u8);
    out.extend_from_slice(name);
}

/// The stream's first bytes and its root record.
pub fn start(out: &mut Vec<u8>, root: &Attrs) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(ROOT);
    put_attrs(out, root);
}

/// A directory record (the caller checked the name with [`valid_name`]).
pub fn dir(out: &mut Vec<u8>, attrs: &Attrs, name: &[u8]) {
    out.push(DIR);
    put_attrs(out, attrs);
    put_name(out, name);
}

pub fn end_dir(out: &mut Vec<u8>) {
    out.push(END_DIR);
}

pub fn file(out: &mut Vec<u8>, attrs: &Attrs, name: &[u8], size: u64) {
    out.push(FILE);
    put_attrs(out, attrs);
    put_name(out, name);
    out.extend_from_slice(&size.to_le_bytes());
}

/// The header of a data record; `len` (at most [`MAX_DATA`]) bytes of data follow it.
pub fn data_header(out: &mut Vec<u8>, offset: u64, len: u32) {
    debug_assert!(len <= MAX_DATA);
    out.push(DATA);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

pub fn end_file(out: &mut Vec<u8>) {
    out.push(END_FILE);
}

/// A symlink record (`target` at most [`MAX_TARGET`] bytes, no NUL).
pub fn symlink(out: &mut Vec<u8>, attrs: &Attrs, name: &[u8], target: &[u8]) {
    out.push(SYMLINK);
    put_attrs(out, attrs);
    put_name(out, name);
    out.extend_from_slice(&(target.len() as u16).to_le_bytes());
    out.extend_from_slice(target);
}

/// Where the decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the magic and version.
    Start,
    /// Between records.
    Record,
    /// Inside a data record: `left` bytes of it still to come, the next at `offset`.
    Data { offset: u64, left: u32 },
    /// After the root's end: nothing more may come.
    Done,
}

/// Reads a stream fed in pieces; see the module's text for what it checks.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// A record header begun in an earlier piece.
    pending: Vec<u8>,
    /// Open directories, the root first.
    depth: usize,
    /// The size of the file being written, if one is.
    file: Option<u64>,
    /// Bytes taken so far.
    taken: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// A header parsed from the front of a buffer.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The next `n` bytes, or `None` when the buffer ends first (more must arrive).
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let got = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(got)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn attrs(&mut self) -> Option<Attrs> {
        Some(Attrs {
            mode: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
            mtime_seconds: self.u64()? as i64,
            mtime_nanoseconds: self.u32()?,
        })
    }
    fn name(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()? as usize;
        self.take(len)
    }
}

/// A header and how many bytes it took, or `None` when it is not complete yet.
type Parsed<'a> = Result<Option<(Event<'a>, usize)>, Malformed>;

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            state: State::Start,
            pending: Vec::new(),
            depth: 0,
            file: None,
            taken: 0,
        }
    }

    /// Whether the whole tree has arrived.
    pub fn finished(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes taken so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Takes the next piece of the stream and hands what it completes to `apply`, in order.
    /// An error from `apply` stops the decoding and is returned as it is.
    pub fn feed<E: From<Malformed>>(
        &mut self,
        mut input: &[u8],
        apply: &mut dyn FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.state {
                State::Done => {
                    return Err(Malformed(format!(
                        "bytes follow the end of the tree at {}",
                        self.taken
                    ))
                    .into());
                }
                State::Data { offset, left } => {
                    let n = input.len().min(left as usize);
                    let (bytes, rest) = input.split_at(n);
                    self.state = match left as usize - n {
                        0 => State::Record,
                        more => State::Data {
                            offset: offset + n as u64,
                            left: more as u32,
                        },
                    };
                    self.taken += n as u64;
                    input = rest;
                    apply(Event::Data { offset, bytes })?;
                }
                State::Start | State::Record => {
                    // A header: from the input alone when nothing is pending, else from the
                    // pending bytes topped up, one byte at most past what it needs.
                    if self.pending.is_empty() {
                        match self.header(input, self.taken)? {
                            Some((event, used)) => {
                                self.taken += used as u64;
                                input = &input[used..];
                                if !matches!(event, Event::Data { .. }) {
                                    apply(event)?;
                                }
                                continue;
                            }
                            None => {
                                self.pending.extend_from_slice(input);
                                self.taken += input.len() as u64;
                                return Ok(());
                            }
                        }
                    }
                    let before = self.pending.len();
                    let room = MAX_HEADER - before;
                    let add = input.len().min(room);
                    self.pending.extend_from_slice(&input[..add]);
                    let pending = std::mem::take(&mut self.pending);
                    let parsed = self.header(&pending, self.taken - before as u64);
                    match parsed {
                        Ok(Some((event, used))) => {
                            // Only what this header used of the input is taken from it.
                            let from_input = used - before;
                            self.taken += from_input as u64;
                            input = &input[from_input..];
                            if !matches!(event, Event::Data { .. }) {
                                apply(event)?;
                            }
                        }
                        Ok(None) if add == input.len() => {
                            self.taken += add as u64;
                            self.pending = pending;
                            return Ok(());
                        }
                        Ok(None) => {
                            return Err(Malformed(format!(
                                "a record at {} is longer than any this format has",
                                self.taken - before as u64
                            ))
                            .into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses one header from the front of `buf` (at stream offset `at`) and moves the state
    /// on. `None`: the header is not complete in `buf`.
    fn header<'a>(&mut self, buf: &'a [u8], at: u64) -> Parsed<'a> {
        let mut c = Cursor { buf, at: 0 };
        if self.state == State::Start {
            let Some(magic) = c.take(MAGIC.len()) else {
                return Ok(None);
            };
            if magic != MAGIC {
                return malformed("the stream does not start as a tree stream");
            }
            let Some(version) = c.u8() else {
                return Ok(None);
            };
            if version != VERSION {
                return malformed(format!(
                    "tree stream version {version}; this build reads version {VERSION}"
                ));
            }
            let Some(tag) = c.u8() else {
                return Ok(None);
            };
            if tag != ROOT {
                return malformed("the stream does not begin with its root");
            }
            let Some(attrs) = c.attrs() else {
                return Ok(None);
            };
            check_mode(&attrs, at)?;
            self.state = State::Record;
            self.depth = 1;
            return Ok(Some((Event::Root(attrs), c.at)));
        }
        let Some(tag) = c.u8() else {
            return Ok(None);
        };
        let in_file = self.file.is_some();
        let event = match tag {
            DIR | FILE | SYMLINK if in_file => {
                return malformed(format!("an entry inside a file's data at {at}"));
            }
            DIR => {
                let (Some(attrs), Some(name)) = (c.attrs(), c.name()) else {
                    return Ok(None);
                };
                check_entry(&attrs, name, at)?;
                if self.depth >= MAX_DEPTH {
                    return malformed(format!("the tree is deeper than {MAX_DEPTH} directories"));
                }
                self.depth += 1;
                Event::Dir { attrs, name }
            }
            FILE => {
                let (Some(attrs), Some(name), Some(size)) = (c.attrs(), c.name(), c.u64()) else {
                    return Ok(None);
                };
                check_entry(&attrs, name, at)?;
                if size > i64::MAX as u64 {
                    return malformed(format!("a file of {size} bytes at {at}"));
                }
                self.file = Some(size);
                Event::File { attrs, name, size }
            }
            SYMLINK => {
                let (Some(attrs), Some(name), Some(len)) = (c.attrs(), c.name(), c.u16()) else {
                    return Ok(None);
                };
                check_entry(&attrs, name, at)?;
                if len == 0 || len as usize > MAX_TARGET {
                    return malformed(format!("a symlink target of {len} bytes at {at}"));
                }
                let Some(target) = c.take(len as usize) else {
                    return Ok(None);
                };
                if target.contains(&0) {
                    return malformed(format!("a symlink target holding NUL at {at}"));
                }
                Event::Symlink {
                    attrs,
                    name,
                    target,
                }
            }
            DATA => {
                let Some(size) = self.file else {
                    return malformed(format!("file data outside a file at {at}"));
                };
                let (Some(offset), Some(len)) = (c.u64(), c.u32()) else {
                    return Ok(None);
                };
                if len == 0 || len > MAX_DATA {
                    return malformed(format!("a data record of {len} bytes at {at}"));
                }
                if offset
                    .checked_add(u64::from(len))
                    .is_none_or(|end| end > size)
                {
                    return malformed(format!(
                        "data at {offset} for {len} bytes, past the file's {size} bytes"
                    ));
                }
                self.state = State::Data { offset, left: len };
                Event::Data { offset, bytes: &[] }
            }
            END_FILE => {
                if self.file.take().is_none() {
                    return malformed(format!("a file's end outside a file at {at}"));
                }
                Event::EndFile
            }
            END_DIR => {
                if in_file {
                    return malformed(format!("a directory's end inside a file at {at}"));
                }
                self.depth -= 1;
                if self.depth == 0 {
                    self.state = State::Done;
                }
                Event::EndDir
            }
            other => return malformed(format!("unknown record {other} at {at}")),
        };
        Ok(Some((event, c.at)))
    }
}

fn check_mode(attrs: &Attrs, at: u64) -> Result<(), Malformed> {
    if attrs.mode & !0o7777 != 0 {
        return malformed(format!(
            "mode {:o} at {at} is not permission bits",
            attrs.mode
        ));
    }
    if attrs.mtime_nanoseconds >= 1_000_000_000 {
        return malformed(format!("a modification time out of range at {at}"));
    }
    Ok(())
}

fn check_entry(attrs: &Attrs, name: &[u8], at: u64) -> Result<(), Malformed> {
    check_mode(attrs, at)?;
    if !valid_name(name) {
        return malformed(format!(
            "an entry at {at} is not named by one path component"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Root(Attrs),
        Dir(Attrs, Vec<u8>),
        EndDir,
        File(Attrs, Vec<u8>, u64),
        Data(u64, Vec<u8>),
        EndFile,
        Symlink(Attrs, Vec<u8>, Vec<u8>),
    }

    /// Decodes `stream` fed in pieces of `piece` bytes; data pieces joined per record.
    fn decode(stream: &[u8], piece: usize) -> Result<(Vec<Owned>, bool), Malformed> {
        let mut d = Decoder::new();
        let mut out: Vec<Owned> = vec![];
        for part in stream.chunks(piece.max(1)) {
            d.feed(part, &mut |e: Event<'_>| -> Result<(), Malformed> {
                let owned = match e {
                    Event::Root(a) => Owned::Root(a),
                    Event::Dir { attrs, name } => Owned::Dir(attrs, name.to_vec()),
                    Event::EndDir => Owned::EndDir,
                    Event::File { attrs, name, size } => Owned::File(attrs, name.to_vec(), size),
                    Event::Data { offset, bytes } => {
                        if let Some(Owned::Data(at, held)) = out.last_mut()
                            && *at + held.len() as u64 == offset
                        {
                            held.extend_from_slice(bytes);
                            return Ok(());
                        }
                        Owned::Data(offset, bytes.to_vec())
                    }
                    Event::EndFile => Owned::EndFile,
                    Event::Symlink {
                        attrs,
                        name,
                        target,
                    } => Owned::Symlink(attrs, name.to_vec(), target.to_vec()),
                };
                out.push(owned);
                Ok(())
            })?;
        }
        assert_eq!(d.taken(), stream.len() as u64);
        Ok((out, d.finished()))
    }

    fn attrs(mode: u32) -> Attrs {
        Attrs {
            mode,
            uid: 1000,
            gid: 2000,
            mtime_seconds: 1_700_000_000,
            mtime_nanoseconds: 5,
        }
    }

    fn sample() -> (Vec<u8>, Vec<Owned>) {
        let mut s = vec![];
        start(&mut s, &attrs(0o755));
        dir(&mut s, &attrs(0o700), b"sub");
        file(&mut s, &attrs(0o644), b"f", 10_000);
        data_header(&mut s, 4096, 3);
        s.extend_from_slice(b"abc");
        end_file(&mut s);
        symlink(&mut s, &attrs(0o777), b"l", b"../../etc/passwd");
        end_dir(&mut s);
        file(&mut s, &attrs(0o600), b"empty", 0);
        end_file(&mut s);
        end_dir(&mut s);
        let events = vec![
            Owned::Root(attrs(0o755)),
            Owned::Dir(attrs(0o700), b"sub".to_vec()),
            Owned::File(attrs(0o644), b"f".to_vec(), 10_000),
            Owned::Data(4096, b"abc".to_vec()),
            Owned::EndFile,
            Owned::Symlink(attrs(0o777), b"l".to_vec(), b"../../etc/passwd".to_vec()),
            Owned::EndDir,
            Owned::File(attrs(0o600), b"empty".to_vec(), 0),
            Owned::EndFile,
            Owned::EndDir,
        ];
        (s, events)
    }

    #[test]
    fn a_stream_decodes_to_what_was_encoded_in_pieces_of_any_size() {
        let (stream, events) = sample();
        for piece in 1..=stream.len() {
            let (got, finished) = decode(&stream, piece).unwrap();
            assert_eq!(got, events, "pieces of {piece}");
            assert!(finished);
        }
    }

    #[test]
    fn an_incomplete_stream_is_not_finished() {
        let (stream, _) = sample();
        for cut in 0..stream.len() {
            let (_, finished) = decode(&stream[..cut], 7).unwrap();
            assert!(!finished, "cut at {cut}");
        }
    }

    fn refused(stream: &[u8]) -> String {
        let first = decode(stream, stream.len()).unwrap_err();
        let bytewise = decode(stream, 1).unwrap_err();
        assert_eq!(first, bytewise);
        first.0
    }

    fn rooted(build: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut s = vec![];
        start(&mut s, &attrs(0o755));
        build(&mut s);
        s
    }

    fn raw_entry(tag: u8, name: &[u8]) -> Vec<u8> {
        let mut s = vec![tag];
        put_attrs(&mut s, &attrs(0o644));
        s.push(name.len() as u8);
        s.extend_from_slice(name);
        s
    }

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        for name in [&b".."[..], b".", b"a/b", b"/", b"a\0b", b""] {
            let s = rooted(|s| s.extend(raw_entry(DIR, name)));
            assert!(refused(&s).contains("one path component"), "{name:?}");
        }
    }

    #[test]
    fn structure_and_bounds_are_checked() {
        // Data outside a file, past its size, too large, empty.
        let s = rooted(|s| data_header(s, 0, 1));
        assert!(refused(&s).contains("outside a file"));
        let s = rooted(|s| {
            file(s, &attrs(0o644), b"f", 10);
            data_header(s, 8, 3);
        });
        assert!(refused(&s).contains("past the file"));
        let s = rooted(|s| {
            file(s, &attrs(0o644), b"f", u32::MAX as u64 * 2);
            s.push(DATA);
            s.extend_from_slice(&0u64.to_le_bytes());
            s.extend_from_slice(&(MAX_DATA + 1).to_le_bytes());
        });
        assert!(refused(&s).contains("data record of"));
        let s = rooted(|s| {
            file(s, &attrs(0o644), b"f", u64::MAX);
        });
        assert!(refused(&s).contains("a file of"));
        // Entries inside a file, ends out of place.
        let s = rooted(|s| {
            file(s, &attrs(0o644), b"f", 1);
            dir(s, &attrs(0o755), b"d");
        });
        assert!(refused(&s).contains("inside a file"));
        let s = rooted(end_file);
        assert!(refused(&s).contains("outside a file"));
        let s = rooted(|s| {
            file(s, &attrs(0o644), b"f", 1);
            end_dir(s);
        });
        assert!(refused(&s).contains("inside a file"));
        // Unknown records, mode bits that are not permissions, bad times.
        assert!(refused(&rooted(|s| s.push(99))).contains("unknown record"));
        let s = rooted(|s| dir(s, &attrs(0o40755), b"d"));
        assert!(refused(&s).contains("permission bits"));
        let mut late = attrs(0o644);
        late.mtime_nanoseconds = 1_000_000_000;
        assert!(refused(&rooted(|s| dir(s, &late, b"d"))).contains("time"));
        // Symlink targets: empty, too long, with NUL.
        let s = rooted(|s| {
            s.extend(raw_entry(SYMLINK, b"l"));
            s.extend_from_slice(&0u16.to_le_bytes());
        });
        assert!(refused(&s).contains("target of 0"));
        let s = rooted(|s| {
            s.extend(raw_entry(SYMLINK, b"l"));
            s.extend_from_slice(&(MAX_TARGET as u16 + 1).to_le_bytes());
        });
        assert!(refused(&s).contains("target of"));
        let s = rooted(|s| symlink(s, &attrs(0o777), b"l", b"a\0b"));
        assert!(refused(&s).contains("NUL"));
        // Bytes after the end; another magic or version; no root.
        let (mut s, _) = sample();
        s.push(END_DIR);
        assert!(refused(&s).contains("follow the end"));
        assert!(refused(b"XXXX\x01\x00").contains("does not start"));
        assert!(refused(b"STRT\x09\x00").contains("version 9"));
        assert!(refused(b"STRT\x01\x01").contains("root"));
    }

    #[test]
    fn depth_is_bounded() {
        let s = rooted(|s| {
            for _ in 0..MAX_DEPTH {
                dir(s, &attrs(0o755), b"d");
            }
        });
        assert!(refused(&s).contains("deeper than"));
        let ok = rooted(|s| {
            for _ in 1..MAX_DEPTH {
                dir(s, &attrs(0o755), b"d");
            }
            for _ in 0..MAX_DEPTH {
                end_dir(s);
            }
        });
        assert!(decode(&ok, 4096).unwrap().1);
    }

    #[test]
    fn an_error_of_the_applier_stops_the_decoding() {
        let (stream, _) = sample();
        let mut d = Decoder::new();
        let mut seen = 0;
        let err = d
            .feed(&stream, &mut |_| -> Result<(), Malformed> {
                seen += 1;
                if seen == 3 {
                    return Err(Malformed("stop".into()));
                }
                Ok(())
            })
            .unwrap_err();
        assert_eq!((err.0.as_str(), seen), ("stop", 3));
    }
}
