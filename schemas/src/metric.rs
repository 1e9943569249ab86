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
    fn values_come_back_bit_for_bit() {
        // Parsed to the neighbouring f64 without serde_json's float_roundtrip.
        let values = [0.9950906807333315, 0.1 + 0.2, 1e-300 / 3.0, -2.0f64.sqrt()];
        let json = serde_json::to_string(&values.map(MetricValue)).unwrap();
        let back: Vec<MetricValue> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, values.map(MetricValue));
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
