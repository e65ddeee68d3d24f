//! Comparing two observation transcripts and rendering a readable diff.

use serde_json::Value;

use crate::observe::Observation;

/// How many mismatching steps are rendered in full.
const MAX_REPORTED_STEPS: usize = 8;
/// How many differing fields are listed per step.
const MAX_REPORTED_FIELDS: usize = 20;

/// One differing leaf: JSON path plus both sides (`None` = field absent on that side).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDiff {
    pub path: String,
    pub left: Option<Value>,
    pub right: Option<Value>,
}

/// Field-by-field differences between two JSON values (empty if equal).
pub fn diff_values(left: &Value, right: &Value) -> Vec<FieldDiff> {
    let mut out = Vec::new();
    walk("$", Some(left), Some(right), &mut out);
    out
}

fn walk(path: &str, left: Option<&Value>, right: Option<&Value>, out: &mut Vec<FieldDiff>) {
    match (left, right) {
        (Some(Value::Object(l)), Some(Value::Object(r))) => {
            let mut keys: Vec<&String> = l.keys().chain(r.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(&format!("{path}.{k}"), l.get(k), r.get(k), out);
            }
        }
        (Some(Value::Array(l)), Some(Value::Array(r))) => {
            for i in 0..l.len().max(r.len()) {
                walk(&format!("{path}[{i}]"), l.get(i), r.get(i), out);
            }
        }
        (l, r) if l == r => {}
        (l, r) => out.push(FieldDiff {
            path: path.to_owned(),
            left: l.cloned(),
            right: r.cloned(),
        }),
    }
}

fn show(v: &Option<Value>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "<absent>".to_owned(),
    }
}

fn pretty(v: &Value) -> String {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    const MAX: usize = 4000;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}\n... ({} more bytes)", &s[..cut], s.len() - cut)
    } else {
        s
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Compares two transcripts step by step. `Ok(())` if identical, otherwise a readable report
/// naming each mismatching step, the differing fields, and both full observations.
pub fn compare_observations(
    left_label: &str,
    left: &[Observation],
    right_label: &str,
    right: &[Observation],
) -> Result<(), String> {
    let mut report = Vec::new();
    let mut mismatches = 0usize;
    for i in 0..left.len().max(right.len()) {
        let (l, r) = (left.get(i), right.get(i));
        if l == r {
            continue;
        }
        mismatches += 1;
        if mismatches > MAX_REPORTED_STEPS {
            continue;
        }
        let mut s = String::new();
        match (l, r) {
            (Some(l), Some(r)) => {
                if l.step == r.step {
                    s.push_str(&format!("step #{i} `{}`:\n", l.step));
                } else {
                    s.push_str(&format!(
                        "step #{i}: step names differ: {left_label} `{}` vs {right_label} `{}`\n",
                        l.step, r.step
                    ));
                }
                let fields = diff_values(&l.value, &r.value);
                for f in fields.iter().take(MAX_REPORTED_FIELDS) {
                    s.push_str(&format!(
                        "    {}: {left_label}={} {right_label}={}\n",
                        f.path,
                        show(&f.left),
                        show(&f.right)
                    ));
                }
                if fields.len() > MAX_REPORTED_FIELDS {
                    s.push_str(&format!(
                        "    ... {} more differing fields\n",
                        fields.len() - MAX_REPORTED_FIELDS
                    ));
                }
                s.push_str(&format!("  {left_label}:\n{}\n", indent(&pretty(&l.value))));
                s.push_str(&format!("  {right_label}:\n{}\n", indent(&pretty(&r.value))));
            }
            (Some(l), None) => s.push_str(&format!(
                "step #{i} `{}`: only {left_label} got here ({right_label} stopped after {} steps):\n{}\n",
                l.step,
                right.len(),
                indent(&pretty(&l.value))
            )),
            (None, Some(r)) => s.push_str(&format!(
                "step #{i} `{}`: only {right_label} got here ({left_label} stopped after {} steps):\n{}\n",
                r.step,
                left.len(),
                indent(&pretty(&r.value))
            )),
            (None, None) => {}
        }
        report.push(s);
    }
    if mismatches == 0 {
        return Ok(());
    }
    let mut out = format!(
        "{mismatches} of {} steps differ between {left_label} ({} steps) and {right_label} ({} steps):\n\n",
        left.len().max(right.len()),
        left.len(),
        right.len()
    );
    out.push_str(&report.join("\n"));
    if mismatches > MAX_REPORTED_STEPS {
        out.push_str(&format!(
            "\n... and {} more mismatching steps\n",
            mismatches - MAX_REPORTED_STEPS
        ));
    }
    Err(out)
}

/// Panics with the readable diff if the transcripts differ.
#[track_caller]
pub fn assert_same_observations(
    left_label: &str,
    left: &[Observation],
    right_label: &str,
    right: &[Observation],
) {
    if let Err(report) = compare_observations(left_label, left, right_label, right) {
        panic!("{report}");
    }
}

/// Renders a whole transcript (for `FETCD_TESTS_VERBOSE=1`).
pub fn render_transcript(label: &str, obs: &[Observation]) -> String {
    let mut out = format!("--- transcript of {label} ({} steps)\n", obs.len());
    for (i, o) in obs.iter().enumerate() {
        out.push_str(&format!("#{i} {}: {}\n", o.step, o.value));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn obs(step: &str, value: Value) -> Observation {
        Observation {
            step: step.to_owned(),
            value,
        }
    }

    #[test]
    fn equal_transcripts_pass() {
        let a = vec![obs("put", json!({"ok": {"header": {"revision": 2}}}))];
        assert!(compare_observations("a", &a, "b", &a.clone()).is_ok());
    }

    #[test]
    fn field_differences_are_named() {
        let a = vec![obs(
            "get",
            json!({"ok": {"kvs": [{"version": 1}], "count": 1}}),
        )];
        let b = vec![obs(
            "get",
            json!({"ok": {"kvs": [{"version": 2}], "count": 1, "x": 0}}),
        )];
        let err = compare_observations("etcd", &a, "fetcd", &b).unwrap_err();
        assert!(err.contains("$.ok.kvs[0].version: etcd=1 fetcd=2"), "{err}");
        assert!(err.contains("$.ok.x: etcd=<absent> fetcd=0"), "{err}");
    }

    #[test]
    fn length_differences_are_reported() {
        let a = vec![obs("put", json!(1)), obs("get", json!(2))];
        let b = vec![obs("put", json!(1))];
        let err = compare_observations("etcd", &a, "fetcd", &b).unwrap_err();
        assert!(err.contains("only etcd got here"), "{err}");
    }
}
