//! Text helpers every page uses: HTML escaping (every string that comes from
//! a record goes through [`esc`]), query-string encoding, UTC times and number
//! formats. Nothing here depends on the clock or the locale.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values
/// (`&`, `<`, `>`, `"`, `'`), so a record's `<script>` is shown as text.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query-string value (everything but RFC 3986's
/// unreserved characters).
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A query string of `pairs`, encoded and then HTML-escaped for an `href`.
pub(crate) fn query(path: &str, pairs: &[(&str, &str)]) -> String {
    let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    esc(&format!("{path}?{}", q.join("&")))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of epoch milliseconds.
pub(crate) fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, mo, d) = flywheel_core::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `HH:MM` (UTC), or `HH:MM:SS` when `seconds`.
pub(crate) fn clock(ms: i64, seconds: bool) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    if seconds {
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 3600, s / 60 % 60)
    }
}

/// `MM-DD HH:MM` (UTC).
pub(crate) fn day_clock(ms: i64) -> String {
    let (_, mo, d) = flywheel_core::civil_from_days(ms.div_euclid(86_400_000));
    format!("{mo:02}-{d:02} {}", clock(ms, false))
}

/// A number with `decimals` places, `—` when absent or not finite.
pub(crate) fn num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "—".into(),
    }
}

/// A p-value: four decimals, or scientific notation below 0.0001.
pub(crate) fn p_value(p: f64) -> String {
    if !p.is_finite() {
        "—".into()
    } else if p != 0.0 && p < 1e-4 {
        format!("{p:.2e}")
    } else {
        format!("{p:.4}")
    }
}

/// A duration in ms, human-sized (`45 s`, `12 min`, `3.5 h`).
pub(crate) fn duration(ms: i64) -> String {
    let s = ms as f64 / 1000.0;
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_no_way_out_of_an_attribute() {
        let hostile = r#"<script>alert("x")</script> & 'y' <img src=x onerror=alert(1)>"#;
        let e = esc(hostile);
        assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''), "{e}");
        assert_eq!(
            e,
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39; &lt;img src=x onerror=alert(1)&gt;"
        );
        assert_eq!(esc("plain ünïcode ✓"), "plain ünïcode ✓");
    }

    #[test]
    fn query_values_are_percent_encoded_then_escaped() {
        assert_eq!(enc("flywheel/tiny-llama"), "flywheel%2Ftiny-llama");
        assert_eq!(enc("a&b=c d\"<"), "a%26b%3Dc%20d%22%3C");
        assert_eq!(enc("é"), "%C3%A9");
        assert_eq!(query("/models", &[("tenant", "a&b"), ("model", "m")]), "/models?tenant=a%26b&amp;model=m");
    }

    #[test]
    fn utc_times_match_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_424_400_000), "2026-11-23 09:00:00");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
        assert_eq!(utc(4_102_444_799_000), "2099-12-31 23:59:59");
        assert_eq!(clock(1_795_424_405_000, true), "09:00:05");
        assert_eq!(day_clock(1_795_424_400_000), "11-23 09:00");
    }

    #[test]
    fn numbers_have_fixed_formats() {
        assert_eq!(num(Some(0.45), 4), "0.4500");
        assert_eq!(num(Some(f64::NAN), 4), "—");
        assert_eq!(num(None, 2), "—");
        assert_eq!(p_value(0.01234), "0.0123");
        assert_eq!(p_value(0.000012), "1.20e-5");
        assert_eq!(p_value(1.0), "1.0000");
        assert_eq!(duration(45_000), "45 s");
        assert_eq!(duration(720_000), "12 min");
        assert_eq!(duration(12_600_000), "3.5 h");
    }
}
