//! The outage run over time, for the plot: per class, how many publishes
//! the relay had accepted, how many NATS had stored (the capture stream's
//! timestamps) and the relay's backlog, sampled once a second; and when
//! NATS and etcd were down. Plain data with bounded size, filled by the run.

/// The load's classes, in the order of the load's round robin (sequence
/// number modulo 4).
pub const CLASSES: [&str; 4] = ["prefill", "decode", "kv_events", "default"];

/// At most this many samples (once a second: more than a day).
const MAX_SAMPLES: usize = 100_000;
/// Deliveries are counted per tenth of a second since the start.
const BUCKETS_PER_SECOND: f64 = 10.0;
/// At most this many delivery buckets (more than a day).
const MAX_BUCKETS: usize = 1_000_000;

/// One reading of the relay: counts per class, in [`CLASSES`] order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the run started.
    pub at: f64,
    /// Publishes accepted so far.
    pub accepted: [u64; 4],
    /// Messages the relay held for NATS.
    pub backlog: [u64; 4],
}

/// A time window, in seconds since the run started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub from: f64,
    pub to: f64,
}

/// Everything the plot draws.
#[derive(Debug, Default)]
pub struct Timeline {
    samples: Vec<Sample>,
    /// Messages stored by NATS per class and tenth of a second.
    delivered: Vec<[u64; 4]>,
    /// Deliveries outside the bounds or without a timestamp.
    pub untimed_deliveries: u64,
    pub nats_outage: Option<Window>,
    pub etcd_outage: Option<Window>,
}

impl Timeline {
    /// Records a sample; later than the last one, or it is ignored.
    pub fn push(&mut self, sample: Sample) {
        let in_order = self.samples.last().is_none_or(|last| sample.at > last.at);
        if in_order && self.samples.len() < MAX_SAMPLES {
            self.samples.push(sample);
        }
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Counts one message of class `class` (index into [`CLASSES`]) that
    /// NATS stored `at` seconds after the start.
    pub fn count_delivery(&mut self, class: usize, at: f64) {
        let bucket = (at * BUCKETS_PER_SECOND).floor();
        if class >= CLASSES.len() || !(0.0..MAX_BUCKETS as f64).contains(&bucket) {
            self.untimed_deliveries += 1;
            return;
        }
        let bucket = bucket as usize;
        if self.delivered.len() <= bucket {
            self.delivered.resize(bucket + 1, [0; 4]);
        }
        self.delivered[bucket][class] += 1;
    }

    /// Per sample: messages of each class NATS had stored by then.
    pub fn delivered_by_sample(&self) -> Vec<[u64; 4]> {
        let mut totals = [0u64; 4];
        let mut next_bucket = 0usize;
        self.samples
            .iter()
            .map(|sample| {
                // Buckets that ended by the sample's time.
                let end = ((sample.at * BUCKETS_PER_SECOND).floor().max(0.0) as usize)
                    .min(self.delivered.len());
                while next_bucket < end {
                    for (total, count) in totals.iter_mut().zip(self.delivered[next_bucket]) {
                        *total += count;
                    }
                    next_bucket += 1;
                }
                totals
            })
            .collect()
    }

    /// The last sample's time (at least 1 s, so an axis has a width).
    pub fn span(&self) -> f64 {
        self.samples.last().map_or(1.0, |last| last.at.max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, accepted: u64) -> Sample {
        Sample {
            at,
            accepted: [accepted; 4],
            backlog: [0; 4],
        }
    }

    #[test]
    fn deliveries_add_up_by_each_sample() {
        let mut timeline = Timeline::default();
        for at in [1.0, 2.0, 3.0] {
            timeline.push(sample(at, 10));
        }
        timeline.count_delivery(0, 0.5);
        timeline.count_delivery(0, 1.95);
        timeline.count_delivery(2, 2.5);
        timeline.count_delivery(9, 1.0);
        timeline.count_delivery(1, -1.0);
        let by_sample = timeline.delivered_by_sample();
        assert_eq!(by_sample, vec![[1, 0, 0, 0], [2, 0, 0, 0], [2, 0, 1, 0]]);
        assert_eq!(timeline.untimed_deliveries, 2);
        assert_eq!(timeline.span(), 3.0);
    }

    #[test]
    fn samples_stay_in_time_order() {
        let mut timeline = Timeline::default();
        timeline.push(sample(2.0, 1));
        timeline.push(sample(1.0, 2));
        assert_eq!(timeline.samples().len(), 1);
        assert_eq!(Timeline::default().span(), 1.0);
    }
}
