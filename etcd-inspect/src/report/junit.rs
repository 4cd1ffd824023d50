//! `--output junit`: JUnit XML for CI systems. One test case per summary row
//! (resource × stored provider/key × finding); a row whose finding is in
//! `--fail-on` is a failure listing a few of its keys.

use std::io::{self, Write};

use super::{Reporter, ScanMeta};
use crate::record::Record;
use crate::summary::Summary;

/// Writes JUnit XML at the end of the scan.
#[derive(Debug)]
pub struct JunitReporter<W: Write> {
    out: W,
}

impl<W: Write> JunitReporter<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        JunitReporter { out }
    }
}

/// Escapes text for XML attributes and element content.
fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all (etcd keys are bytes).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => o.push('\u{FFFD}'),
            c => o.push(c),
        }
    }
    o
}

impl<W: Write> Reporter for JunitReporter<W> {
    fn begin(&mut self, _meta: &ScanMeta) -> io::Result<()> {
        Ok(())
    }

    fn record(&mut self, _record: &Record) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()> {
        let out = &mut self.out;
        let rows: Vec<_> = summary.rows().collect();
        let failures = rows
            .iter()
            .filter(|(k, _)| k.finding.is_some_and(|f| meta.fail_on.contains(&f)))
            .count();
        let suite = format!("etcd-inspect {}", meta.prefix);
        let nothing_judged = super::nothing_judged(meta, summary);
        let errors = usize::from(nothing_judged.is_some());
        let tests = rows.len() + errors;
        writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            out,
            r#"<testsuites name="etcd-inspect" tests="{tests}" failures="{failures}" errors="{errors}">"#
        )?;
        writeln!(
            out,
            r#"  <testsuite name="{}" tests="{tests}" failures="{failures}" errors="{errors}" skipped="0">"#,
            xml(&suite)
        )?;
        writeln!(out, "    <properties>")?;
        writeln!(
            out,
            r#"      <property name="revision" value="{}"/>"#,
            meta.revision
        )?;
        writeln!(
            out,
            r#"      <property name="keys" value="{}"/>"#,
            summary.total()
        )?;
        if let Some(c) = &meta.config {
            writeln!(out, r#"      <property name="config" value="{}"/>"#, xml(c))?;
        }
        let fail_on: Vec<&str> = meta.fail_on.iter().map(|f| f.as_str()).collect();
        writeln!(
            out,
            r#"      <property name="fail-on" value="{}"/>"#,
            fail_on.join(",")
        )?;
        // What the values need to be read back (as `--needs`), one property each.
        for need in super::needs::needs(summary, &meta.fingerprints) {
            writeln!(
                out,
                r#"      <property name="need" value="{} ({} values)"/>"#,
                xml(&need.label()),
                need.values
            )?;
        }
        writeln!(out, "    </properties>")?;
        for (k, s) in rows {
            let resource = k.resource.as_deref().unwrap_or("(no resource)");
            let finding = k.finding.map(|f| f.as_str()).unwrap_or("unaudited");
            let mut name = format!("{resource}: {}", k.actual.label());
            if let Some(id) = &k.key_id {
                name.push_str(&format!(" key_id={id}"));
            }
            name.push_str(&format!(" is {finding}"));
            let mut keys = s.sample_keys.join("\n");
            if s.count > s.sample_keys.len() as u64 {
                keys.push_str(&format!(
                    "\n... and {} more",
                    s.count - s.sample_keys.len() as u64
                ));
            }
            let expected = k
                .expected
                .as_ref()
                .map(|e| e.label())
                .unwrap_or_else(|| "-".into());
            let text = format!("{} keys; expected {expected}\n{keys}", s.count);
            writeln!(
                out,
                r#"    <testcase classname="etcd-inspect.{}" name="{}">"#,
                xml(resource),
                xml(&name)
            )?;
            if k.finding.is_some_and(|f| meta.fail_on.contains(&f)) {
                writeln!(
                    out,
                    r#"      <failure type="{finding}" message="{} keys are {finding}">{}</failure>"#,
                    s.count,
                    xml(&text)
                )?;
            } else {
                writeln!(out, "      <system-out>{}</system-out>", xml(&text))?;
            }
            writeln!(out, "    </testcase>")?;
        }
        if let Some(why) = nothing_judged {
            writeln!(
                out,
                r#"    <testcase classname="etcd-inspect" name="something was judged">"#
            )?;
            writeln!(
                out,
                r#"      <error type="nothing-judged" message="{}"/>"#,
                xml(&why)
            )?;
            writeln!(out, "    </testcase>")?;
        }
        writeln!(out, "  </testsuite>")?;
        writeln!(out, "</testsuites>")?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::xml;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(xml(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(xml("x\u{1}y\n"), "x\u{FFFD}y\n");
    }
}
