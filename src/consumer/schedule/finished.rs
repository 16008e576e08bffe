//! Finished offsets above the commit point, carried in each commit's metadata, so that the
//! next owner of a partition (after a rebalance or a restart) skips the records this one
//! finished out of order instead of handling them again.
//!
//! A commit of offset `c` says "every record below `c` is done". Records of a partition
//! may settle out of order (key and unordered modes, a slow or stuck record), so records
//! above `c` may be done too; without more, the next owner reads from `c` and handles them
//! all again. The commit's metadata (a string Kafka keeps with the offset, up to the
//! broker's `offset.metadata.max.bytes`, 4096 bytes by default) lists them:
//!
//! ```text
//! k1:<c>:<gap>[.<len>],<gap>[.<len>],...
//! ```
//!
//! Each item is a range of finished offsets: `gap` is its first offset minus the end of the
//! previous range (`c` for the first: `0` means it starts at `c`), `len` its length when
//! above 1. So `k1:10:2.3,5` says 12, 13, 14 and 20 are finished above commit point 10.
//! Offsets between two finished ones that were never received (transaction markers,
//! compacted records) may be inside a range: skipping an offset that is never delivered
//! changes nothing.
//!
//! Written ranges stop where [`MAX_BYTES`] would be passed (the lowest ranges are kept: they
//! are read first after a rebalance); the records of the ranges left out are handled again,
//! as without metadata. Read back, metadata is untrusted (delivery rule 17): anything that is
//! not this format, names another commit point, or spans more than [`MAX_SPAN`] offsets is
//! ignored whole (a foreign writer's metadata, an old commit without any).

/// The most bytes of metadata written: under Kafka's default `offset.metadata.max.bytes`
/// (4096).
pub(crate) const MAX_BYTES: usize = 4000;

/// The most offsets above the commit point a read-back list may span.
pub(crate) const MAX_SPAN: i64 = 100_000_000;

/// The most ranges a read-back list may hold (what fits in [`MAX_BYTES`] at 2 bytes each).
const MAX_RANGES: usize = MAX_BYTES / 2;

const PREFIX: &str = "k1:";

/// Finished offsets above a commit point, as inclusive ranges in increasing order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Finished {
    ranges: Vec<(i64, i64)>,
}

impl Finished {
    /// The ranges (inclusive, increasing, not touching).
    #[cfg(test)]
    pub(crate) fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }

    /// Whether `offset` is finished.
    pub(crate) fn contains(&self, offset: i64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < offset);
        self.ranges
            .get(i)
            .is_some_and(|&(start, _)| start <= offset)
    }

    /// The last finished offset.
    pub(crate) fn last(&self) -> Option<i64> {
        self.ranges.last().map(|&(_, end)| end)
    }

    /// How many offsets the ranges cover.
    #[cfg(test)]
    pub(crate) fn span(&self) -> i64 {
        self.ranges.iter().map(|(s, e)| e - s + 1).sum()
    }
}

/// The metadata of a commit of `commit_point` with these finished ranges (inclusive,
/// increasing, each at or above `commit_point`): `None` when there are none. Ranges that
/// would pass [`MAX_BYTES`] are left out.
pub(crate) fn encode(
    commit_point: i64,
    ranges: impl IntoIterator<Item = (i64, i64)>,
) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = format!("{PREFIX}{commit_point}:");
    let head = out.len();
    let mut previous_end = commit_point;
    let mut item = String::new();
    for (start, end) in ranges {
        if start < previous_end || end < start {
            debug_assert!(
                false,
                "ranges out of order: {start}..={end} after {previous_end}"
            );
            break;
        }
        item.clear();
        if out.len() > head {
            item.push(',');
        }
        let _ = write!(item, "{}", start - previous_end);
        if end > start {
            let _ = write!(item, ".{}", end - start + 1);
        }
        if out.len() + item.len() > MAX_BYTES {
            break;
        }
        out.push_str(&item);
        previous_end = end + 1;
    }
    (out.len() > head).then_some(out)
}

/// Reads back the metadata of a commit of `commit_point`: `None` unless it is well-formed
/// kourier metadata for that very commit point (see the module docs).
pub(crate) fn decode(metadata: &str, commit_point: i64) -> Option<Finished> {
    let rest = metadata.strip_prefix(PREFIX)?;
    let (point, list) = rest.split_once(':')?;
    if point.parse::<i64>().ok()? != commit_point || commit_point < 0 || list.is_empty() {
        return None;
    }
    let mut ranges = Vec::new();
    let mut previous_end = commit_point;
    for item in list.split(',') {
        if ranges.len() == MAX_RANGES {
            return None;
        }
        let (gap, len) = match item.split_once('.') {
            Some((gap, len)) => (gap, len.parse::<i64>().ok().filter(|&n| n >= 2)?),
            None => (item, 1),
        };
        let gap = gap.parse::<i64>().ok().filter(|&g| g >= 0)?;
        if gap == 0 && !ranges.is_empty() {
            return None; // touching ranges are written as one
        }
        let start = previous_end.checked_add(gap)?;
        let end = start.checked_add(len - 1)?;
        if end.checked_sub(commit_point)? >= MAX_SPAN {
            return None;
        }
        ranges.push((start, end));
        previous_end = end.checked_add(1)?;
    }
    Some(Finished { ranges })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_documented_example() {
        let m = encode(10, [(12, 14), (20, 20)]).unwrap();
        assert_eq!(m, "k1:10:2.3,5");
        let f = decode(&m, 10).unwrap();
        assert_eq!(f.ranges(), [(12, 14), (20, 20)]);
        for (offset, finished) in [
            (10, false),
            (11, false),
            (12, true),
            (14, true),
            (15, false),
            (20, true),
            (21, false),
        ] {
            assert_eq!(f.contains(offset), finished, "{offset}");
        }
        assert_eq!(f.last(), Some(20));
        assert_eq!(encode(10, []), None, "nothing finished: no metadata");
        assert_eq!(
            decode(&encode(0, [(0, 4)]).unwrap(), 0).unwrap().ranges(),
            [(0, 4)]
        );
    }

    #[test]
    fn ranges_past_the_size_limit_are_left_out_lowest_kept() {
        let ranges: Vec<(i64, i64)> = (0..5_000).map(|i| (1_000 + 3 * i, 1_000 + 3 * i)).collect();
        let m = encode(1_000, ranges.iter().copied()).unwrap();
        assert!(m.len() <= MAX_BYTES, "{}", m.len());
        let f = decode(&m, 1_000).unwrap();
        assert!(f.span() > 1_000, "most of what fits: {}", f.span());
        assert_eq!(
            f.ranges(),
            &ranges[..f.ranges().len()],
            "a prefix of the ranges"
        );
    }

    /// Metadata is untrusted: anything else is ignored whole.
    #[test]
    fn foreign_stale_and_hostile_metadata_is_ignored() {
        for (m, point) in [
            ("", 10),
            ("some app's note", 10),
            ("k1:10:", 10),
            ("k1:9:2", 10),    // another commit point
            ("k1:10:2,0", 10), // touching ranges
            ("k1:10:-1", 10),
            ("k1:10:2.1", 10), // a length of 1 is written without one
            ("k1:10:2.0", 10),
            ("k1:10:x", 10),
            ("k1:10:2,,3", 10),
            ("k1:10:9223372036854775807", 10),
            ("k1:10:1.9223372036854775807", 10),
            ("k1:10:100000000", 10), // spans too far
            ("k2:10:2", 10),
            ("k1:-5:2", -5),
        ] {
            assert_eq!(decode(m, point), None, "{m:?}");
        }
        let many = format!("k1:0:{}", vec!["1"; MAX_RANGES + 1].join(","));
        assert_eq!(decode(&many, 0), None, "too many ranges");
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_as_a_prefix_of_the_ranges(
            point in 0i64..1_000_000,
            items in proptest::collection::vec((0i64..50, 1i64..50), 0..3_000),
        ) {
            let mut ranges = Vec::new();
            let mut next = point;
            for (i, (gap, len)) in items.into_iter().enumerate() {
                let start = next + if i == 0 { gap } else { gap + 1 };
                ranges.push((start, start + len - 1));
                next = start + len;
            }
            match encode(point, ranges.iter().copied()) {
                None => prop_assert!(ranges.is_empty()),
                Some(m) => {
                    prop_assert!(m.len() <= MAX_BYTES);
                    let f = decode(&m, point).expect("reads back");
                    prop_assert!(!f.ranges().is_empty());
                    prop_assert_eq!(f.ranges(), &ranges[..f.ranges().len()]);
                }
            }
        }

        #[test]
        fn decoding_never_panics(m in ".{0,64}", point in any::<i64>()) {
            let _ = decode(&m, point);
            let _ = decode(&format!("k1:{point}:{m}"), point);
        }
    }
}
