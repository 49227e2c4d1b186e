use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::*;
use crate::controller::CreateVolume;
use crate::model::{AccessMode, CapacityRange, MIB, VolumeRecord};
use crate::testing::{Fixture, fixture, mount};

const K: u64 = 1024;

fn volume(f: &Fixture, name: &str) -> VolumeRecord {
    f.driver
        .controller
        .create_volume(CreateVolume {
            name: name.into(),
            capacity: CapacityRange {
                required: 64 * MIB,
                limit: 0,
            },
            capabilities: vec![mount(AccessMode::SingleNodeWriter)],
            ..Default::default()
        })
        .unwrap()
}

fn image(f: &Fixture, id: &str) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(f.driver.volumes.dir(id).join("image"))
        .unwrap()
}

fn write(file: &File, at: u64, len: u64, byte: u8) {
    file.write_all_at(&vec![byte; len as usize], at).unwrap();
}

fn discard(file: &File, at: u64, len: u64) {
    // SAFETY: fallocate on an fd borrowed for the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as i64,
            len as i64,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

fn code(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument(_) => "INVALID_ARGUMENT",
        Error::NotFound(_) => "NOT_FOUND",
        Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
        Error::OutOfRange(_) => "OUT_OF_RANGE",
        Error::Unavailable(_) => "UNAVAILABLE",
        other => panic!("unexpected {other:?}"),
    }
}

fn r(offset: u64, length: u64) -> BlockRange {
    BlockRange { offset, length }
}

/// Every page of an answer.
fn pages(
    f: &Fixture,
    base: Option<&str>,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Vec<RangePage>> {
    let query = RangeQuery::new(base, target, start, max)?;
    let mut pages = vec![];
    f.driver.snapshot_metadata.answer(&query, &mut |p| {
        pages.push(p);
        true
    })?;
    Ok(pages)
}

fn ranges(pages: &[RangePage]) -> Vec<BlockRange> {
    pages.iter().flat_map(|p| p.ranges.clone()).collect()
}

/// Joins touching ranges, as one page would have.
fn joined(ranges: Vec<BlockRange>) -> Vec<BlockRange> {
    let mut out: Vec<BlockRange> = vec![];
    for x in ranges {
        match out.last_mut() {
            Some(last) if last.end() == x.offset => last.length += x.length,
            _ => out.push(x),
        }
    }
    out
}

/// A volume written at known offsets, S1; an overwrite, a new range and a discard, S2.
struct Written {
    f: Fixture,
    s1: String,
    s2: String,
}

fn written() -> Written {
    let f = fixture();
    let vol = volume(&f, "v");
    let img = image(&f, &vol.id);
    write(&img, 0, 64 * K, 1);
    write(&img, MIB, 256 * K, 2);
    write(&img, 8 * MIB, MIB, 3);
    img.sync_all().unwrap();
    let s1 = f
        .driver
        .snapshots
        .create_snapshot("s1", &vol.id)
        .unwrap()
        .id;
    write(&img, MIB + 64 * K, 64 * K, 9); // overwrite inside the second range
    write(&img, 20 * MIB, 128 * K, 4); // a new range
    discard(&img, 8 * MIB + 256 * K, 256 * K); // a discard inside the third
    img.sync_all().unwrap();
    let s2 = f
        .driver
        .snapshots
        .create_snapshot("s2", &vol.id)
        .unwrap()
        .id;
    Written { f, s1, s2 }
}

#[test]
fn allocated_ranges_are_exactly_what_holds_data() {
    let w = written();
    let all = pages(&w.f, None, &w.s2, 0, 0).unwrap();
    assert!(all.iter().all(|p| p.capacity_bytes == 64 * MIB));
    assert_eq!(
        ranges(&all),
        vec![
            r(0, 64 * K),
            r(MIB, 256 * K),
            r(8 * MIB, 256 * K),
            r(8 * MIB + 512 * K, 512 * K),
            r(20 * MIB, 128 * K),
        ]
    );
    let s1 = ranges(&pages(&w.f, None, &w.s1, 0, 0).unwrap());
    assert_eq!(s1, vec![r(0, 64 * K), r(MIB, 256 * K), r(8 * MIB, MIB)]);
}

#[test]
fn the_delta_by_content_is_the_written_and_discarded_ranges() {
    let w = written();
    let delta = ranges(&pages(&w.f, Some(&w.s1), &w.s2, 0, 0).unwrap());
    assert_eq!(
        delta,
        vec![
            r(MIB + 64 * K, 64 * K),
            r(8 * MIB + 256 * K, 256 * K),
            r(20 * MIB, 128 * K),
        ]
    );
    // A snapshot against itself changed nothing; one empty page still tells the size.
    let same = pages(&w.f, Some(&w.s2), &w.s2, 0, 0).unwrap();
    assert_eq!(same.len(), 1);
    assert!(same[0].ranges.is_empty());
    assert_eq!(same[0].capacity_bytes, 64 * MIB);
}

#[test]
fn pages_and_resumed_answers_give_the_same_union_without_overlap() {
    let w = written();
    for base in [None, Some(w.s1.as_str())] {
        let whole = ranges(&pages(&w.f, base, &w.s2, 0, 0).unwrap());
        let paged = pages(&w.f, base, &w.s2, 0, 1).unwrap();
        assert!(paged.iter().all(|p| p.ranges.len() <= 1));
        assert_eq!(joined(ranges(&paged)), whole);
        // Resumed from inside each range and between ranges: the first tuple ends after the
        // offset, and what follows is exactly the rest of the whole answer.
        for cut in [1, MIB + 100 * K, 8 * MIB + 300 * K, 19 * MIB, 64 * MIB] {
            let rest = ranges(&pages(&w.f, base, &w.s2, cut as i64, 2).unwrap());
            if let Some(first) = rest.first() {
                assert!(first.end() > cut && first.offset >= cut, "{first:?} {cut}");
            }
            let expected: Vec<BlockRange> = whole
                .iter()
                .filter(|x| x.end() > cut)
                .map(|x| r(x.offset.max(cut), x.end() - x.offset.max(cut)))
                .collect();
            assert_eq!(joined(rest), expected, "cut at {cut}");
        }
    }
}

#[test]
fn every_error_row_of_the_spec() {
    let w = written();
    // INVALID_ARGUMENT: missing ids, a negative max_results, a base newer than the target.
    for (base, target) in [
        (None, ""),
        (Some(""), w.s2.as_str()),
        (Some(w.s1.as_str()), ""),
    ] {
        let e = pages(&w.f, base, target, 0, 0).unwrap_err();
        assert_eq!(code(e), "INVALID_ARGUMENT");
    }
    let e = pages(&w.f, None, &w.s2, 0, -1).unwrap_err();
    assert_eq!(code(e), "INVALID_ARGUMENT");
    let e = pages(&w.f, Some(&w.s2), &w.s1, 0, 0).unwrap_err();
    assert_eq!(code(e), "INVALID_ARGUMENT");
    // NOT_FOUND: either snapshot unknown.
    let unknown = "snap-0123456789abcdef";
    for (base, target) in [
        (None, unknown),
        (Some(unknown), w.s2.as_str()),
        (Some(w.s1.as_str()), unknown),
    ] {
        let e = pages(&w.f, base, target, 0, 0).unwrap_err();
        assert_eq!(code(e), "NOT_FOUND");
    }
    // OUT_OF_RANGE: a negative offset, or one past the end (the end itself is empty).
    for start in [-1, 64 * MIB as i64 + 1] {
        for base in [None, Some(w.s1.as_str())] {
            let e = pages(&w.f, base, &w.s2, start, 0).unwrap_err();
            assert_eq!(code(e), "OUT_OF_RANGE");
        }
    }
    let end = pages(&w.f, None, &w.s2, 64 * MIB as i64, 0).unwrap();
    assert!(ranges(&end).is_empty());
    // FAILED_PRECONDITION: snapshots of different volumes.
    let other = volume(&w.f, "other");
    let s3 =
        w.f.driver
            .snapshots
            .create_snapshot("s3", &other.id)
            .unwrap()
            .id;
    let e = pages(&w.f, Some(&w.s1), &s3, 0, 0).unwrap_err();
    assert_eq!(code(e), "FAILED_PRECONDITION");
}

#[test]
fn a_deleted_snapshot_is_not_found_and_a_receiver_that_leaves_stops_the_walk() {
    let w = written();
    let query = RangeQuery::new(None, &w.s2, 0, 1).unwrap();
    let mut seen = 0;
    w.f.driver
        .snapshot_metadata
        .answer(&query, &mut |_| {
            seen += 1;
            false
        })
        .unwrap();
    assert_eq!(seen, 1);
    w.f.driver.snapshots.delete_snapshot(&w.s2).unwrap();
    let e = pages(&w.f, None, &w.s2, 0, 0).unwrap_err();
    assert_eq!(code(e), "NOT_FOUND");
}

#[test]
fn the_extent_walk_finds_nothing_between_one_file_and_everything_between_copies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let a = File::create_new(&path).unwrap();
    a.set_len(16 * MIB).unwrap();
    write(&a, 0, 64 * K, 1);
    write(&a, 5 * MIB, 128 * K, 2);
    a.sync_all().unwrap();
    let again = File::open(&path).unwrap();
    let walk = |base: &File, target: &File, start: u64| {
        let mut out = vec![];
        let mut sink = |p: RangePage| {
            out.extend(p.ranges);
            true
        };
        let mut pager = Pager::new(16 * MIB, start, 16, &mut sink);
        pager
            .run(Box::new(SharedExtentDelta::new(
                base,
                target,
                start,
                16 * MIB,
            )))
            .unwrap();
        out
    };
    assert_eq!(walk(&a, &again, 0), vec![]);
    // A copy shares no blocks: all its data is reported, and nothing else.
    let b = File::create_new(dir.path().join("b")).unwrap();
    b.set_len(16 * MIB).unwrap();
    write(&b, 0, 64 * K, 1);
    write(&b, 5 * MIB, 128 * K, 2);
    b.sync_all().unwrap();
    assert_eq!(walk(&a, &b, 0), vec![r(0, 64 * K), r(5 * MIB, 128 * K)]);
    assert_eq!(
        walk(&a, &b, 5 * MIB + 4 * K),
        vec![r(5 * MIB + 4 * K, 124 * K)]
    );
}
