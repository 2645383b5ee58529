//! Size classes of the free lists: two levels, as in TLSF ("two-level
//! segregated fit"). The first level is the power of two of the size, the
//! second splits each power of two into [`SL_COUNT`] equal ranges. A bitmap
//! per level finds the first non-empty class at or above a size in two
//! bit scans, so neither fragmentation nor aligned allocations make the
//! search slower (DPDK's 13 buckets are scanned element by element).

/// Granule of every element size and address: one cache line.
pub(crate) const UNIT: u64 = 64;
/// log2 of the second-level split.
pub(crate) const SL_BITS: u32 = 4;
/// Second-level classes per first-level class.
pub(crate) const SL_COUNT: usize = 1 << SL_BITS;
/// First-level classes: sizes up to 2^(FL_COUNT + 9) bytes (512 TiB).
pub(crate) const FL_COUNT: usize = 40;
/// Sizes below this are split linearly (class 0, one class per 64 bytes).
const LINEAR_LIMIT: u64 = UNIT << SL_BITS; // 1024

/// The class (first level, second level) an element of `size` bytes
/// (a multiple of [`UNIT`], at least one unit) is filed under.
pub(crate) fn class_of(size: u64) -> (usize, usize) {
    if size < LINEAR_LIMIT {
        return (0, (size / UNIT) as usize);
    }
    let bit = size.ilog2(); // >= 10
    let fl = (bit - 9) as usize;
    let sl = ((size >> (bit - SL_BITS)) as usize) & (SL_COUNT - 1);
    if fl >= FL_COUNT {
        (FL_COUNT - 1, SL_COUNT - 1)
    } else {
        (fl, sl)
    }
}

/// The first class whose every element is at least `size` bytes: where a
/// search for `size` starts so that any element found fits without looking
/// at it. `None` when no class guarantees it (beyond the last one).
pub(crate) fn class_at_least(size: u64) -> Option<(usize, usize)> {
    let size = size.max(UNIT);
    if size < LINEAR_LIMIT {
        return Some((0, size.div_ceil(UNIT) as usize));
    }
    let bit = size.ilog2();
    let step = 1u64 << (bit - SL_BITS);
    let rounded = size.checked_add(step - 1)? & !(step - 1);
    let rbit = rounded.ilog2();
    if (rbit - 9) as usize >= FL_COUNT {
        return None;
    }
    Some(class_of(rounded))
}

#[cfg(test)]
/// The smallest size filed under class `(fl, sl)`.
pub(crate) fn class_start(fl: usize, sl: usize) -> u64 {
    if fl == 0 {
        sl as u64 * UNIT
    } else {
        let bit = fl as u32 + 9;
        (1u64 << bit) + ((sl as u64) << (bit - SL_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_lands_in_the_class_that_starts_at_or_below_it() {
        let mut sizes: Vec<u64> = (1..200).map(|i| i * UNIT).collect();
        for b in 10..45 {
            for d in [0u64, 1, 63, 64, 1000] {
                let s = ((1u64 << b) + d * UNIT) / UNIT * UNIT;
                sizes.push(s);
                sizes.push(s - UNIT);
            }
        }
        for s in sizes {
            let (fl, sl) = class_of(s);
            assert!(class_start(fl, sl) <= s, "size {s} class ({fl},{sl})");
            let (nfl, nsl) = if sl + 1 < SL_COUNT {
                (fl, sl + 1)
            } else {
                (fl + 1, 0)
            };
            if nfl < FL_COUNT {
                assert!(
                    class_start(nfl, nsl) > s,
                    "size {s} class ({fl},{sl}) too low"
                );
            }
            let (gfl, gsl) = class_at_least(s).unwrap();
            assert!(
                class_start(gfl, gsl) >= s,
                "size {s}: guaranteed class too small"
            );
            assert!((gfl, gsl) >= (fl, sl));
        }
    }

    #[test]
    fn linear_classes_are_exact() {
        assert_eq!(class_of(64), (0, 1));
        assert_eq!(class_of(960), (0, 15));
        assert_eq!(class_of(1024), (1, 0));
        assert_eq!(class_of(1088), (1, 1));
        assert_eq!(class_at_least(64), Some((0, 1)));
        assert_eq!(class_at_least(1025), Some((1, 1)));
        assert_eq!(class_at_least(1 << 62), None);
    }
}
