//! fetcd/etcd ratios, their spread over rounds, and the targets.

use std::fmt;

/// Median and range of a set of values (one per round).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// `None` when no value is finite (e.g. every etcd run of a case measured zero).
    pub(crate) fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} [{:.2}–{:.2}]", self.median, self.min, self.max)
    }
}

/// Per-round ratios `fetcd[i] / etcd[i]`: rounds are paired because each round runs etcd and
/// fetcd back to back, so slow phases of the shared machine hit both sides of one ratio.
pub(crate) fn paired_ratios(etcd: &[f64], fetcd: &[f64]) -> Vec<f64> {
    etcd.iter()
        .zip(fetcd)
        .filter(|(e, _)| **e > 0.0)
        .map(|(e, f)| f / e)
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Better {
    /// Throughput: the ratio should be at least the goal.
    Higher,
    /// Latency, memory, restart time: the ratio should be at most the goal.
    Lower,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    NotMet,
    /// fetcd failed requests during the measurement, so its number means nothing.
    Errors(u64),
    /// No ratio (fetcd did not run, or etcd measured zero).
    Unmeasured(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Met => f.write_str("yes"),
            Verdict::NotMet => f.write_str("no"),
            Verdict::Errors(n) => write!(f, "no ({n} fetcd errors)"),
            Verdict::Unmeasured(why) => write!(f, "n/a ({why})"),
        }
    }
}

/// Judges a target on the median ratio; a run with fetcd errors never meets one.
pub(crate) fn verdict(
    ratio: Option<Spread>,
    better: Better,
    goal: f64,
    fetcd_errors: u64,
) -> Verdict {
    if fetcd_errors > 0 {
        return Verdict::Errors(fetcd_errors);
    }
    let Some(r) = ratio else {
        return Verdict::Unmeasured("no ratio".into());
    };
    let met = match better {
        Better::Higher => r.median >= goal,
        Better::Lower => r.median <= goal,
    };
    if met {
        Verdict::Met
    } else {
        Verdict::NotMet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_and_range() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN, f64::INFINITY]), None);
        assert_eq!(s.to_string(), "2.50 [1.00–4.00]");
    }

    #[test]
    fn ratios_pair_rounds_and_skip_zero_baselines() {
        assert_eq!(
            paired_ratios(&[100.0, 0.0, 50.0], &[200.0, 10.0, 25.0]),
            [2.0, 0.5]
        );
        assert!(paired_ratios(&[1.0], &[]).is_empty());
    }

    #[test]
    fn verdicts() {
        let r = Spread::of(&[0.9, 1.1, 1.2]);
        assert_eq!(verdict(r, Better::Higher, 1.0, 0), Verdict::Met);
        assert_eq!(verdict(r, Better::Lower, 1.0, 0), Verdict::NotMet);
        assert_eq!(verdict(r, Better::Higher, 1.0, 3), Verdict::Errors(3));
        assert!(matches!(
            verdict(None, Better::Lower, 1.0, 0),
            Verdict::Unmeasured(_)
        ));
    }
}
