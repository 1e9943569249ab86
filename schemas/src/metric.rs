//! Metric series: named f64 values against a step the experiment chooses (loss, accuracy,
//! learning rate, tokens/s …), carried in the run's batches (schema 1.1) and drawn as
//! charts.
//!
//! A [`MetricRecord`] is one or several values at one step, emitted together; records
//! have their own per-run `seq` (gapless from 0) so that for a repeated `(name, step)`
//! the newest record wins wherever the points are held, in any delivery order — the
//! same rule as results. Values are any f64: NaN and ±infinity travel as the JSON
//! strings `"NaN"`, `"Infinity"` and `"-Infinity"` (JSON numbers cannot hold them).
//!
//! A [`MetricSeries`] is a series cut to at most N [`MetricBucket`]s that each keep the
//! minimum, the maximum and the last point of their steps, so a chart of a million
//! points still shows every spike; [`SeriesSketch`] keeps one up to date point by point.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest step stored (steps are `BIGINT` in the database). A producer drops a
/// point with a larger step with a warning line; the decoder refuses a batch holding one.
pub const MAX_STEP: u64 = i64::MAX as u64;

/// Longest metric name in bytes; producers cut longer names.
pub const MAX_NAME_BYTES: usize = 200;

/// An f64 that keeps NaN and ±infinity through JSON (as `"NaN"`, `"Infinity"`,
/// `"-Infinity"`); finite values are plain JSON numbers.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct MetricValue(pub f64);

impl From<f64> for MetricValue {
    fn from(v: f64) -> Self {
        MetricValue(v)
    }
}

impl Serialize for MetricValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() {
            s.serialize_f64(v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }
}

impl<'de> Deserialize<'de> for MetricValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MetricValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MetricValue, E> {
                Ok(MetricValue(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MetricValue, E> {
                Ok(MetricValue(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MetricValue, E> {
                Ok(MetricValue(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MetricValue, E> {
                parse_non_finite(v)
                    .map(MetricValue)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// The non-finite values' texts (also what Python's `json` module writes, bare).
fn parse_non_finite(text: &str) -> Option<f64> {
    match text {
        "NaN" | "nan" => Some(f64::NAN),
        "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
        "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

#[cfg(feature = "openapi")]
mod openapi {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
    use utoipa::openapi::{RefOr, Schema};

    impl utoipa::PartialSchema for super::MetricValue {
        fn schema() -> RefOr<Schema> {
            OneOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(SchemaType::new(Type::Number)))
                .item(
                    ObjectBuilder::new()
                        .schema_type(SchemaType::new(Type::String))
                        .enum_values(Some(["NaN", "Infinity", "-Infinity"])),
                )
                .description(Some(
                    "A float; NaN and ±infinity as the strings \"NaN\", \"Infinity\", \"-Infinity\".",
                ))
                .into()
        }
    }

    impl utoipa::ToSchema for super::MetricValue {}
}

/// One or several metric values at one step (`metric()` writes one, `metrics()` several).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricRecord {
    /// Per run, gapless from 0; for one `(name, step)`, the highest `seq` wins.
    pub seq: u64,
    /// Chosen by the experiment; at most [`MAX_STEP`].
    pub step: u64,
    /// µs since the epoch, when emitted.
    pub ts: i64,
    /// Metric name → value.
    pub values: BTreeMap<String, MetricValue>,
}

/// One point of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    pub step: u64,
    pub ts: i64,
    pub value: MetricValue,
    /// The `seq` of the record it came from (which point of a repeated step wins).
    pub seq: u64,
}

/// The points of a series that fall in one range of steps: their count, their minimum
/// and maximum (NaN left out; NaN only when every value is NaN), and the last one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricBucket {
    /// The last point's step (the highest step in the bucket).
    pub step: u64,
    /// The last point's time (µs since the epoch).
    pub ts: i64,
    /// The last point's value.
    pub value: MetricValue,
    pub min: MetricValue,
    pub min_step: u64,
    pub max: MetricValue,
    pub max_step: u64,
    pub count: u64,
}

impl MetricBucket {
    pub fn point(step: u64, ts: i64, value: MetricValue) -> Self {
        MetricBucket {
            step,
            ts,
            value,
            min: value,
            min_step: step,
            max: value,
            max_step: step,
            count: 1,
        }
    }

    /// Folds `other` (points of steps this bucket shares or neighbours) into this one.
    pub fn merge(&mut self, other: &MetricBucket) {
        if other.step >= self.step {
            self.step = other.step;
            self.ts = other.ts;
            self.value = other.value;
        }
        if other.min.0 < self.min.0 || (self.min.0.is_nan() && !other.min.0.is_nan()) {
            self.min = other.min;
            self.min_step = other.min_step;
        }
        if other.max.0 > self.max.0 || (self.max.0.is_nan() && !other.max.0.is_nan()) {
            self.max = other.max;
            self.max_step = other.max_step;
        }
        self.count += other.count;
    }
}

/// A series as a chart draws it: at most `max_points` buckets in step order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricSeries {
    pub name: String,
    /// Points in the steps asked for.
    pub count: u64,
    /// Each bucket is exactly one point (the series had no more than `max_points`).
    pub exact: bool,
    /// Steps per bucket (1 when exact).
    pub width: u64,
    pub buckets: Vec<MetricBucket>,
}

/// A series kept within about `2 × target` buckets as points arrive: each bucket spans
/// `width` steps (`step / width` is its index); when there are more than `2 × target`,
/// the width doubles and neighbours merge. Exact (one point per bucket, a repeated step
/// replaced by the newer record) while the width is 1.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSketch {
    target: usize,
    width: u64,
    buckets: BTreeMap<u64, MetricBucket>,
    /// The `seq` of each exact point, to let the newer of a repeated step win.
    seqs: BTreeMap<u64, u64>,
}

impl SeriesSketch {
    pub fn new(target: usize) -> Self {
        SeriesSketch {
            target: target.max(1),
            width: 1,
            buckets: BTreeMap::new(),
            seqs: BTreeMap::new(),
        }
    }

    /// Starts from a series read elsewhere (a snapshot, the database).
    pub fn from_series(target: usize, series: &MetricSeries) -> Self {
        let mut sketch = SeriesSketch::new(target);
        sketch.width = series.width.max(1);
        for bucket in &series.buckets {
            let index = bucket.step / sketch.width;
            sketch
                .buckets
                .entry(index)
                .and_modify(|b| b.merge(bucket))
                .or_insert(*bucket);
        }
        sketch.shrink();
        sketch
    }

    pub fn add(&mut self, point: MetricPoint) {
        let index = point.step / self.width;
        let bucket = MetricBucket::point(point.step, point.ts, point.value);
        if self.width == 1 {
            match self.seqs.get(&point.step) {
                Some(&held) if held >= point.seq => return,
                _ => {
                    self.seqs.insert(point.step, point.seq);
                    self.buckets.insert(index, bucket);
                }
            }
        } else {
            self.buckets
                .entry(index)
                .and_modify(|b| b.merge(&bucket))
                .or_insert(bucket);
        }
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.buckets.len() > 2 * self.target {
            self.width = self.width.saturating_mul(2);
            self.seqs.clear();
            let mut merged: BTreeMap<u64, MetricBucket> = BTreeMap::new();
            for bucket in std::mem::take(&mut self.buckets).into_values() {
                merged
                    .entry(bucket.step / self.width)
                    .and_modify(|b| b.merge(&bucket))
                    .or_insert(bucket);
            }
            self.buckets = merged;
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().map(|b| b.count).sum()
    }

    pub fn series(&self, name: &str) -> MetricSeries {
        MetricSeries {
            name: name.to_string(),
            count: self.count(),
            exact: self.width == 1,
            width: self.width,
            buckets: self.buckets.values().copied().collect(),
        }
    }
}

/// The summary of one metric of a run: how many points, the extremes, the last point
/// (the highest step) and when a point last arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricSummary {
    pub name: String,
    pub count: u64,
    /// NaN when every value is NaN.
    pub min: MetricValue,
    pub max: MetricValue,
    /// The value at the highest step.
    pub last: MetricValue,
    pub last_step: u64,
    /// µs since the epoch of the newest point emitted.
    pub updated_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_travel_as_strings_and_back() {
        let values = [
            0.25,
            -3.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
        ];
        let json = serde_json::to_string(&values.map(MetricValue)).unwrap();
        assert_eq!(json, r#"[0.25,-3.0,"NaN","Infinity","-Infinity",1e+300]"#);
        let back: Vec<MetricValue> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[0].0, 0.25);
        assert!(back[2].0.is_nan());
        assert_eq!(back[3].0, f64::INFINITY);
        assert_eq!(back[4].0, f64::NEG_INFINITY);
        let ints: Vec<MetricValue> = serde_json::from_str("[3, -4]").unwrap();
        assert_eq!(ints, [MetricValue(3.0), MetricValue(-4.0)]);
        assert!(serde_json::from_str::<MetricValue>(r#""fast""#).is_err());
        assert!(serde_json::from_str::<MetricValue>("null").is_err());
    }

    #[test]
    fn every_value_parses_back_to_the_same_bits() {
        // serde_json's default float parser can be one ulp off; the workspace enables
        // `float_roundtrip`. These values were off by one without it.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = vec![-0.009932349717128268, 0.9950906807333315, 0.1 + 0.2];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                values.push(v);
            }
            values.push((x % 1_000_000) as f64 / 7919.0);
        }
        let json =
            serde_json::to_string(&values.iter().map(|v| MetricValue(*v)).collect::<Vec<_>>())
                .unwrap();
        let back: Vec<MetricValue> = serde_json::from_str(&json).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.0.to_bits(), "{a}");
        }
    }

    fn point(step: u64, value: f64, seq: u64) -> MetricPoint {
        MetricPoint {
            step,
            ts: step as i64,
            value: MetricValue(value),
            seq,
        }
    }

    #[test]
    fn a_sketch_is_exact_while_small_and_the_newer_record_of_a_step_wins() {
        let mut sketch = SeriesSketch::new(10);
        sketch.add(point(3, 1.0, 5));
        sketch.add(point(3, 2.0, 4)); // older record: ignored
        sketch.add(point(1, 7.0, 6));
        sketch.add(point(3, 3.0, 9));
        let series = sketch.series("loss");
        assert!(series.exact);
        assert_eq!(series.count, 2);
        let values: Vec<(u64, f64)> = series.buckets.iter().map(|b| (b.step, b.value.0)).collect();
        assert_eq!(values, [(1, 7.0), (3, 3.0)]);
    }

    #[test]
    fn a_cover_holds_every_step_of_its_range_once_in_few_pieces() {
        use rollup::{cover, width};
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut cases: Vec<(u64, u64, u32)> = vec![
            (0, 0, 7),
            (0, 15, 7),
            (0, 999_999, 1),
            (3, 1_000_003, 2),
            (17, 17, 0),
            (u64::MAX - 100, u64::MAX, 7),
            (i64::MAX as u64 - 5000, i64::MAX as u64, 3),
            (0, i64::MAX as u64, 7),
            (0, i64::MAX as u64 - 1, 0),
            (12_345, u64::MAX - 1, 7),
        ];
        for _ in 0..300 {
            let from = next() % 5_000_000;
            let to = from + next() % 3_000_000;
            cases.push((from, to, (next() % 8) as u32));
        }
        for (from, to, top) in cases {
            let plan = cover(from, to, top);
            let mut pieces: Vec<(u64, u64)> = plan.raw.clone();
            for &(level, first, last) in &plan.blocks {
                assert!(level <= top);
                pieces.push((
                    first * width(level),
                    last * width(level) + (width(level) - 1),
                ));
            }
            pieces.sort();
            assert_eq!(pieces.first().unwrap().0, from, "{from}..={to} top {top}");
            assert_eq!(pieces.last().unwrap().1, to, "{from}..={to} top {top}");
            for pair in pieces.windows(2) {
                assert_eq!(
                    pair[0].1 + 1,
                    pair[1].0,
                    "{from}..={to}: contiguous, no overlap"
                );
            }
            assert!(plan.raw.len() <= 2, "{plan:?}");
            assert!(plan.blocks.len() <= 2 * (top as usize + 1), "{plan:?}");
        }
    }

    #[test]
    fn rolled_up_blocks_hold_the_merge_of_their_points() {
        let points = (0..1000u64).map(|s| {
            (
                s,
                s as i64,
                MetricValue(if s == 500 { -9.0 } else { s as f64 }),
            )
        });
        let blocks = rollup::blocks(points);
        let b = &blocks[&(1, 1)]; // steps 256..=511
        assert_eq!(
            (b.count, b.min.0, b.min_step, b.max.0, b.step),
            (256, -9.0, 500, 511.0, 511)
        );
        assert_eq!(blocks[&(7, 0)].count, 1000);
        assert_eq!(blocks.keys().filter(|(l, _)| *l == 0).count(), 63);
    }

    #[test]
    fn a_long_series_keeps_its_single_spike_and_its_last_point() {
        let mut sketch = SeriesSketch::new(100);
        for step in 0..100_000u64 {
            let value = if step == 77_777 {
                1e9
            } else if step == 123 {
                -5.0
            } else {
                (step % 10) as f64
            };
            sketch.add(point(step, value, step));
        }
        sketch.add(point(100_000, f64::NAN, 100_000));
        let series = sketch.series("loss");
        assert!(!series.exact);
        assert!(series.buckets.len() <= 200, "{}", series.buckets.len());
        assert_eq!(series.count, 100_001);
        let max = series
            .buckets
            .iter()
            .max_by(|a, b| a.max.0.total_cmp(&b.max.0))
            .unwrap();
        assert_eq!((max.max.0, max.max_step), (1e9, 77_777));
        let min = series
            .buckets
            .iter()
            .min_by(|a, b| a.min.0.total_cmp(&b.min.0))
            .unwrap();
        assert_eq!((min.min.0, min.min_step), (-5.0, 123));
        let last = series.buckets.last().unwrap();
        assert_eq!(last.step, 100_000);
        assert!(last.value.0.is_nan());
        assert_eq!(last.max.0, 9.0, "NaN is left out of the extremes");
        // Rebuilt from its own series, a sketch holds the same points.
        let again = SeriesSketch::from_series(100, &series).series("loss");
        assert_eq!(again.count, series.count);
    }
}

/// Pre-aggregated blocks of a series, so a chart of a million points reads a few
/// thousand rows: at level `l` (0 to [`LEVELS`] - 1) block `b` holds the points of
/// steps `b × width(l) ..= (b + 1) × width(l) - 1`, width(l) = 16^(l+1) (16, 256, …,
/// 2^32), as one [`MetricBucket`]. The aggregator keeps them in `run_metric_rollups`
/// in the transaction that stores the points; the gateway reads them through a
/// [`Cover`].
pub mod rollup {
    use std::collections::BTreeMap;

    use super::{MetricBucket, MetricValue};

    pub const LEVELS: u32 = 8;

    /// Steps per block at `level`.
    pub fn width(level: u32) -> u64 {
        1u64 << (4 * (level + 1))
    }

    /// The block of `step` at `level`.
    pub fn block(step: u64, level: u32) -> u64 {
        step >> (4 * (level + 1))
    }

    /// Every block the points fall in, at every level, each the merge of its points:
    /// what a transaction adds to `run_metric_rollups` (keyed by level and block).
    pub fn blocks<'a>(
        points: impl IntoIterator<Item = (u64, i64, MetricValue)> + 'a,
    ) -> BTreeMap<(u32, u64), MetricBucket> {
        let mut out: BTreeMap<(u32, u64), MetricBucket> = BTreeMap::new();
        for (step, ts, value) in points {
            let point = MetricBucket::point(step, ts, value);
            for level in 0..LEVELS {
                out.entry((level, block(step, level)))
                    .and_modify(|b| b.merge(&point))
                    .or_insert(point);
            }
        }
        out
    }

    /// How to read the steps `from..=to` of a series: whole blocks of one `level`
    /// (`blocks`) in the middle, smaller blocks toward the ends where the range does
    /// not meet a block boundary (`edges`: level and block ranges), and raw points
    /// (`raw`: step ranges, fewer than 16 steps each) where not even a 16-step block
    /// fits. Together they hold every point of the range exactly once.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct Cover {
        /// (level, first block, last block), inclusive.
        pub blocks: Vec<(u32, u64, u64)>,
        /// Step ranges read point by point, inclusive.
        pub raw: Vec<(u64, u64)>,
    }

    /// The cover of `from..=to` using blocks no wider than `width(top)`: from `from`
    /// on, the widest blocks that start there and end within `to` (up to the next
    /// boundary of a wider level), else points up to the next multiple of 16. At most a
    /// few iterations per level, however long the range (all of `0..=i64::MAX` too).
    pub fn cover(from: u64, to: u64, top: u32) -> Cover {
        let top = top.min(LEVELS - 1);
        let mut cover = Cover::default();
        let mut at = from;
        while at <= to {
            let fit = (0..=top).rev().find(|&l| {
                at.is_multiple_of(width(l))
                    && at.checked_add(width(l) - 1).is_some_and(|end| end <= to)
            });
            let end = match fit {
                Some(level) => {
                    // Every block of this level that fits, up to where a wider level
                    // can take over (none above `top`): one range, not a loop per block.
                    let w = width(level);
                    let mut n = (to - at - (w - 1)) / w + 1;
                    if level < top {
                        let up = width(level + 1);
                        n = n.min((up - at % up) / w);
                    }
                    let b = block(at, level);
                    push_range(&mut cover.blocks, level, b, b + (n - 1));
                    at + (n * w - 1)
                }
                None => {
                    let end = (at | 15).min(to);
                    match cover.raw.last_mut() {
                        Some((_, last)) if *last + 1 == at => *last = end,
                        _ => cover.raw.push((at, end)),
                    }
                    end
                }
            };
            match end.checked_add(1) {
                Some(next) => at = next,
                None => break,
            }
        }
        cover
    }

    fn push_range(ranges: &mut Vec<(u32, u64, u64)>, level: u32, first: u64, last: u64) {
        match ranges.last_mut() {
            Some((l, _, end)) if *l == level && *end + 1 == first => *end = last,
            _ => ranges.push((level, first, last)),
        }
    }

    /// The level whose blocks best fill buckets of `bucket_width` steps: the widest
    /// not wider than it (`None`: narrower than the narrowest block, read points).
    pub fn level_for(bucket_width: u64) -> Option<u32> {
        (0..LEVELS).rev().find(|&l| width(l) <= bucket_width)
    }
}
