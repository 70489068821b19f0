//! The IG officers' web console: server-rendered HTML pages for the admin listener
//! ([`crate::admin`] holds the handlers, sessions and authorisation; this module only renders).
//!
//! Plain HTML with one small inline style sheet and no script or external asset, so it works
//! with scripts off and under a strict `Content-Security-Policy`. Accessibility: every control has
//! a `<label>`, tables have captions and `scope`d headers, there is a skip link and a visible focus
//! ring, and everything is reachable with the keyboard in document order (WCAG 2.2 AA intent).
//!
//! Every value from the audit log or the request is written through [`escape`]: events carry
//! partner-controlled text (client ids, request ids), so the console must not become an XSS
//! channel into an IG officer's session.

pub mod pages;

use std::fmt::Write as _;

/// Escape text for HTML element content and double- or single-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// Percent-encode a query-string value (`application/x-www-form-urlencoded`).
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Who is signed in, as the page header shows it.
#[derive(Debug, Clone)]
pub struct Viewer<'a> {
    pub username: &'a str,
    pub name: &'a str,
    pub ods_code: &'a str,
    /// The session's CSRF token, for the sign-out form.
    pub csrf: &'a str,
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Arial,sans-serif;margin:0;color:#1d1d1d;background:#fff;line-height:1.45}
header{background:#005eb8;color:#fff;padding:.6rem 1.2rem;display:flex;flex-wrap:wrap;gap:1rem;align-items:center;justify-content:space-between}
header a,header button{color:#fff}
nav ul{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:1rem}
main{padding:1rem 1.2rem;max-width:78rem}
a{color:#004b93}
:focus{outline:3px solid #ffb81c;outline-offset:2px}
.skip{position:absolute;left:-999px}.skip:focus{left:.5rem;top:.5rem;background:#fff;color:#000;padding:.3rem}
form.search{display:grid;grid-template-columns:repeat(auto-fill,minmax(13rem,1fr));gap:.6rem 1rem;align-items:end;margin-bottom:1rem}
label{display:block;font-weight:600;font-size:.9rem}
input,select,textarea{font:inherit;padding:.3rem;border:1px solid #4c6272;border-radius:3px;width:100%;box-sizing:border-box}
input[type=checkbox]{width:auto}
button,.button{font:inherit;background:#007f3b;color:#fff;border:0;border-radius:3px;padding:.4rem .9rem;cursor:pointer;text-decoration:none;display:inline-block}
button.secondary,.button.secondary{background:#4c6272}
header button{background:transparent;border:1px solid #fff}
table{border-collapse:collapse;width:100%;font-size:.92rem}
caption{text-align:left;font-weight:600;padding:.4rem 0}
th,td{border-bottom:1px solid #d8dde0;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f4f5}
.bg{background:#fff4e5}
.tag{display:inline-block;padding:0 .4rem;border-radius:3px;font-size:.8rem;font-weight:600}
.tag.warn{background:#ffb81c;color:#000}.tag.ok{background:#007f3b;color:#fff}.tag.bad{background:#d5281b;color:#fff}
.notice{border-left:6px solid #005eb8;padding:.5rem 1rem;background:#eef7ff}
.error{border-left:6px solid #d5281b;padding:.5rem 1rem;background:#fde8e8}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem}dt{font-weight:600}
pre{white-space:pre-wrap;background:#f0f4f5;padding:.8rem;font-size:.9rem}
";

/// A whole page: head, header with navigation (when signed in), and `body` in `<main>`.
pub fn layout(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en-GB\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} — caregate audit</title><style>{STYLE}</style></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><strong>caregate audit console</strong>",
        escape(title)
    );
    if let Some(viewer) = viewer {
        let _ = write!(
            out,
            "<nav aria-label=\"Main\"><ul>\
             <li><a href=\"/console\">Search events</a></li>\
             <li><a href=\"/console/reviews\">Break-glass reviews</a></li>\
             <li><a href=\"/console/sar\">Subject access report</a></li>\
             <li><a href=\"/console/verify\">Chain verification</a></li></ul></nav>\
             <form method=\"post\" action=\"/console/logout\">\
             <span>{} ({}, ODS {})</span> \
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form>",
            escape(viewer.name),
            escape(viewer.username),
            escape(viewer.ods_code),
            escape(viewer.csrf)
        );
    }
    let _ = writeln!(
        out,
        "</header><main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        escape(title)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_every_html_metacharacter() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value("2026-01-01T00:00:00+01:00"),
            "2026-01-01T00%3A00%3A00%2B01%3A00"
        );
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }
}
