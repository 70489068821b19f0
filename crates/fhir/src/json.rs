//! Strict JSON parsing of untrusted bytes (test matrix row B3; OWASP API10 "unsafe consumption").
//!
//! [`parse_strict`] accepts exactly the JSON texts of RFC 8259 that FHIR JSON
//! (<http://hl7.org/fhir/R4/json.html>) can mean one way, and rejects the rest with an [`Issue`]:
//!
//! - **Encoding** — UTF-8 only (RFC 8259 §8.1); invalid UTF-8 is reported with its byte offset.
//! - **BOM policy** — one leading UTF-8 byte order mark (`EF BB BF`) is skipped: RFC 8259 §8.1 lets
//!   parsers ignore it and many UK systems emit one. A UTF-16 or UTF-32 BOM, or a U+FEFF anywhere
//!   else in the body (a second BOM, a BOM inside a string from concatenated files), is rejected:
//!   it means the sender's encoding handling is broken, and the escaped form `\uFEFF` remains
//!   available to anyone who really means the character.
//! - **Duplicate keys** — rejected, naming the key and the path. RFC 8259 §4 leaves the meaning of
//!   repeated names undefined and parsers disagree (first wins, last wins), so two systems could
//!   read one message as two different records.
//! - **Depth** — nesting deeper than [`JsonLimits::max_depth`] is rejected before the parser
//!   recurses further, so depth 100,000 costs no more stack than depth 65. serde_json's own
//!   recursion limit (128) stays on as a second line of defence; the default limit is well below
//!   it. Bounding depth here also bounds the recursive `Drop` of the resulting `Value`.
//! - **Trailing data** after the value, and **numbers** outside the `f64` range, are rejected.
//!
//! The value is built directly by a [`DeserializeSeed`] that tracks depth, so there is one pass
//! and no intermediate tree. Diagnostics give line and column and, for duplicate keys, the FHIR
//! element path; they never echo values, which may be patient data. Element names are shown only
//! when they look like FHIR element names.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::outcome::{Issue, IssueCode};

/// serde_json's built-in recursion limit; [`JsonLimits::max_depth`] should stay below it so that
/// our error (with its clearer message) fires first.
pub const SERDE_JSON_RECURSION_LIMIT: usize = 128;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
const BOM_CHAR: char = '\u{FEFF}';

/// Bounds applied while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonLimits {
    /// Deepest nesting of arrays and objects accepted; `{}` has depth 1. FHIR resources in
    /// practice stay well under 20 (a Bundle entry's contained resource's extension's value).
    pub max_depth: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self { max_depth: 64 }
    }
}

/// Parse untrusted bytes as one JSON value under the rules in the module docs.
pub fn parse_strict(bytes: &[u8], limits: &JsonLimits) -> Result<Value, Issue> {
    let (bom_len, body) = strip_bom(bytes)?;
    let text = std::str::from_utf8(body).map_err(|err| {
        Issue::request(
            IssueCode::Structure,
            format!(
                "body is not valid UTF-8: invalid byte sequence at byte offset {}",
                bom_len + err.valid_up_to()
            ),
        )
    })?;
    // `is_ascii` is a fast vectorised check; only non-ASCII bodies can hold a U+FEFF.
    if !text.is_ascii()
        && let Some(at) = text.find(BOM_CHAR)
    {
        let (line, column) = line_column(text, at);
        return Err(Issue::request(
            IssueCode::Structure,
            format!(
                "byte order mark (U+FEFF) at byte offset {} (line {line}, column {column}): only one, \
                 at the very start of the body, is accepted",
                bom_len + at
            ),
        ));
    }

    let mut state = State {
        max_depth: limits.max_depth,
        fault: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = ValueSeed {
        state: &mut state,
        depth: 1,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    parsed.map_err(|err| issue_from_error(&err, state.fault, limits.max_depth))
}

/// Skip one leading UTF-8 BOM; reject UTF-16/UTF-32 BOMs. Returns the number of bytes skipped.
fn strip_bom(bytes: &[u8]) -> Result<(usize, &[u8]), Issue> {
    if let Some(rest) = bytes.strip_prefix(UTF8_BOM) {
        return Ok((UTF8_BOM.len(), rest));
    }
    // FE FF (UTF-16BE), FF FE (UTF-16LE and UTF-32LE), 00 00 FE FF (UTF-32BE).
    if bytes.starts_with(&[0xFE, 0xFF])
        || bytes.starts_with(&[0xFF, 0xFE])
        || bytes.starts_with(&[0x00, 0x00, 0xFE, 0xFF])
    {
        return Err(Issue::request(
            IssueCode::Structure,
            "body starts with a UTF-16 or UTF-32 byte order mark; FHIR JSON must be UTF-8 \
             (RFC 8259 section 8.1)",
        ));
    }
    Ok((0, bytes))
}

/// 1-based line and column (in bytes, as serde_json counts) of byte `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (line, at - line_start + 1)
}

/// What our own visitor rejected. serde_json's error type carries only a message, so the
/// structured cause is kept here and the error itself is a placeholder.
#[derive(Debug)]
enum Failure {
    TooDeep,
    DuplicateKey(String),
}

/// A rejected value and the path to it, innermost segment first (segments are added while the
/// error unwinds, so a successful parse pays nothing for paths).
#[derive(Debug)]
struct Fault {
    failure: Failure,
    reversed_path: Vec<Segment>,
    root: Option<String>,
}

#[derive(Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug)]
struct State {
    max_depth: usize,
    fault: Option<Fault>,
}

impl State {
    fn fail<E: de::Error>(&mut self, failure: Failure) -> E {
        self.fault = Some(Fault {
            failure,
            reversed_path: Vec::new(),
            root: None,
        });
        E::custom("rejected by caregate strict JSON rules")
    }

    /// Record one path segment while one of our faults unwinds; other errors carry no path.
    fn note(&mut self, segment: Segment) {
        if let Some(fault) = &mut self.fault {
            fault.reversed_path.push(segment);
        }
    }

    /// At the root object, name the path after its `resourceType` if it has been read.
    fn note_root(&mut self, object: &Map<String, Value>) {
        if let Some(fault) = &mut self.fault
            && let Some(Value::String(name)) = object.get("resourceType")
            && is_type_name(name)
        {
            fault.root = Some(name.clone());
        }
    }
}

/// Deserialises one value at `depth` (the depth its own brackets would have).
struct ValueSeed<'a> {
    state: &'a mut State,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json reports overflow itself; this guards the invariant that a Value holds no
        // NaN or infinity whatever the parser does.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth > self.state.max_depth {
            return Err(self.state.fail(Failure::TooDeep));
        }
        let mut items = Vec::new();
        loop {
            let child = ValueSeed {
                state: &mut *self.state,
                depth: self.depth + 1,
            };
            match seq.next_element_seed(child) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(err) => {
                    self.state.note(Segment::Index(items.len()));
                    return Err(err);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth > self.state.max_depth {
            return Err(self.state.fail(Failure::TooDeep));
        }
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // FHIR objects are small: the map's own lookup is cheaper than any side index.
            if object.contains_key(&key) {
                let err = self.state.fail(Failure::DuplicateKey(key));
                if self.depth == 1 {
                    self.state.note_root(&object);
                }
                return Err(err);
            }
            let child = ValueSeed {
                state: &mut *self.state,
                depth: self.depth + 1,
            };
            match map.next_value_seed(child) {
                Ok(value) => {
                    object.insert(key, value);
                }
                Err(err) => {
                    self.state.note(Segment::Key(key));
                    if self.depth == 1 {
                        self.state.note_root(&object);
                    }
                    return Err(err);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// Turn a parse failure into the issue the partner sees.
fn issue_from_error(err: &serde_json::Error, fault: Option<Fault>, max_depth: usize) -> Issue {
    let at = format!("line {}, column {}", err.line(), err.column());
    if let Some(fault) = fault {
        return match fault.failure {
            Failure::TooDeep => too_deep(max_depth, &at),
            Failure::DuplicateKey(key) => {
                let parent = render_path(fault.root.as_deref(), &fault.reversed_path);
                match (is_element_name(&key), parent) {
                    (true, Some(parent)) => {
                        let expression = join_path(&parent, &key);
                        let within = if parent.is_empty() {
                            "the root object"
                        } else {
                            &parent
                        };
                        Issue::error(
                            IssueCode::Structure,
                            expression,
                            format!(
                                "duplicate JSON key \"{key}\" in {within} ({at}): FHIR JSON \
                                 objects must not repeat a property"
                            ),
                        )
                    }
                    _ => Issue::request(
                        IssueCode::Structure,
                        format!(
                            "duplicate JSON key ({at}; key not shown as it is not a FHIR element \
                             name): FHIR JSON objects must not repeat a property"
                        ),
                    ),
                }
            }
        };
    }
    // serde_json's syntax and EOF messages are fixed strings (its `ErrorCode` Display); only
    // `Message` errors, which come from visitors, are free text, and ours are handled above.
    let message = err.to_string();
    let reason = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(reason, _)| reason);
    match err.classify() {
        serde_json::error::Category::Syntax if reason == "recursion limit exceeded" => {
            too_deep(max_depth.min(SERDE_JSON_RECURSION_LIMIT), &at)
        }
        serde_json::error::Category::Syntax | serde_json::error::Category::Data
            if reason == "number out of range" =>
        {
            Issue::request(
                IssueCode::Value,
                format!("number out of range ({at}): JSON numbers must fit a 64-bit float"),
            )
        }
        serde_json::error::Category::Syntax if reason == "trailing characters" => Issue::request(
            IssueCode::Structure,
            format!("unexpected data after the JSON value ({at})"),
        ),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => Issue::request(
            IssueCode::Structure,
            format!("invalid JSON: {reason} ({at})"),
        ),
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            Issue::request(IssueCode::Structure, format!("invalid JSON ({at})"))
        }
    }
}

fn too_deep(max_depth: usize, at: &str) -> Issue {
    Issue::request(
        IssueCode::Structure,
        format!("JSON nesting is deeper than the limit of {max_depth} ({at})"),
    )
}

/// The FHIRPath of the object a fault sits in, or `None` if a segment cannot be shown.
fn render_path(root: Option<&str>, reversed: &[Segment]) -> Option<String> {
    let mut path = root.unwrap_or_default().to_owned();
    for segment in reversed.iter().rev() {
        match segment {
            Segment::Key(key) if is_element_name(key) => path = join_path(&path, key),
            Segment::Key(_) => return None,
            Segment::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    Some(path)
}

fn join_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// A FHIR JSON property name: element names, `_`-prefixed primitive extensions, `resourceType`
/// (<http://hl7.org/fhir/R4/json.html>). Anything else is not echoed: it could be data.
pub(crate) fn is_element_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    key.len() <= 64
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A resource type name as FHIR spells them: `[A-Z][A-Za-z]+`.
pub(crate) fn is_type_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && name.len() >= 2
        && bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(text: &[u8]) -> Result<Value, Issue> {
        parse_strict(text, &JsonLimits::default())
    }

    fn rejected(text: &[u8]) -> Issue {
        parse(text).expect_err("must be rejected")
    }

    /// Run `f` on a thread with the default 2 MiB stack of a spawned Rust thread.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut text = "[".repeat(depth).into_bytes();
        text.extend(std::iter::repeat_n(b']', depth));
        text
    }

    fn nested_objects(depth: usize) -> Vec<u8> {
        let mut text = r#"{"a":"#.repeat(depth);
        text.push('1');
        text.push_str(&"}".repeat(depth));
        text.into_bytes()
    }

    #[test]
    fn json_accepts_a_resource_and_matches_serde_json() {
        let text = br#"{"resourceType":"Patient","id":"p1","active":true,"name":[{"given":["Ann",null]}],
            "multipleBirthInteger":2,"extension":[{"url":"x","valueDecimal":-1.25e2}],"_gender":null}"#;
        let expected: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(parse(text), Ok(expected));
    }

    #[test]
    fn json_b3_depth_at_limit_is_accepted() {
        assert!(parse(&nested_arrays(64)).is_ok());
        assert!(parse(&nested_objects(64)).is_ok());
    }

    #[test]
    fn json_b3_depth_one_over_limit_is_rejected() {
        for text in [nested_arrays(65), nested_objects(65), nested_arrays(129)] {
            let issue = rejected(&text);
            assert_eq!(issue.code, IssueCode::Structure);
            assert!(
                issue.diagnostics.contains("deeper than the limit of 64"),
                "{issue:?}"
            );
            assert!(issue.expression.is_empty());
        }
    }

    #[test]
    fn json_b3_depth_10_000_and_100_000_do_not_overflow_the_stack() {
        for depth in [10_000, 100_000] {
            let (arrays, objects) = on_small_stack(move || {
                (parse(&nested_arrays(depth)), parse(&nested_objects(depth)))
            });
            for result in [arrays, objects] {
                let issue = result.expect_err("too deep");
                assert!(
                    issue.diagnostics.contains("deeper than the limit"),
                    "{issue:?}"
                );
            }
        }
    }

    #[test]
    fn json_b3_limit_above_serde_json_still_bounded() {
        let limits = JsonLimits { max_depth: 10_000 };
        let issue = on_small_stack(move || parse_strict(&nested_arrays(100_000), &limits))
            .expect_err("too deep");
        assert!(
            issue.diagnostics.contains("deeper than the limit of 128"),
            "{issue:?}"
        );
    }

    #[test]
    fn json_b3_duplicate_key_is_rejected_with_path() {
        let text =
            br#"{"resourceType":"Patient","name":[{"family":"A"},{"given":["x"],"given":["y"]}]}"#;
        let issue = rejected(text);
        assert_eq!(issue.code, IssueCode::Structure);
        assert_eq!(issue.expression, vec!["Patient.name[1].given"]);
        assert!(
            issue
                .diagnostics
                .contains("duplicate JSON key \"given\" in Patient.name[1]")
        );
        assert!(
            issue.diagnostics.contains("line 1, column"),
            "{}",
            issue.diagnostics
        );
        assert!(!issue.diagnostics.contains("\"x\"") && !issue.diagnostics.contains("\"y\""));
    }

    #[test]
    fn json_b3_duplicate_key_spelt_with_escapes_is_rejected() {
        let issue =
            rejected(br#"{"resourceType":"Patient","gender":"male","gend\u0065r":"female"}"#);
        assert_eq!(issue.expression, vec!["Patient.gender"]);
    }

    #[test]
    fn json_b3_duplicate_key_at_root_and_without_resource_type() {
        let issue = rejected(br#"{"resourceType":"Patient","id":"a","id":"b"}"#);
        assert_eq!(issue.expression, vec!["Patient.id"]);
        assert!(
            issue.diagnostics.contains("in Patient ("),
            "{}",
            issue.diagnostics
        );

        let issue = rejected(br#"{"a":{"b":1,"b":1}}"#);
        assert_eq!(issue.expression, vec!["a.b"]);

        let issue = rejected(br#"{"id":"a","id":"a"}"#);
        assert!(
            issue.diagnostics.contains("in the root object"),
            "{}",
            issue.diagnostics
        );
    }

    #[test]
    fn json_b3_duplicate_key_that_is_not_an_element_name_is_not_echoed() {
        let issue = rejected(br#"{"9434765919":1,"9434765919":2}"#);
        assert!(issue.expression.is_empty());
        assert!(
            !issue.diagnostics.contains("9434765919"),
            "{}",
            issue.diagnostics
        );
        let issue = rejected(br#"{"a b":{"x":1,"x":1}}"#);
        assert!(issue.expression.is_empty());
    }

    #[test]
    fn json_b3_invalid_utf8_names_the_byte_offset() {
        let issue = rejected(b"{\"a\":\"\xC3\x28\"}");
        assert_eq!(issue.code, IssueCode::Structure);
        assert!(
            issue.diagnostics.contains("byte offset 6"),
            "{}",
            issue.diagnostics
        );
        // Offsets count from the start of the body, BOM included.
        let issue = rejected(b"\xEF\xBB\xBF{\"a\":\"\xFF\"}");
        assert!(
            issue.diagnostics.contains("byte offset 9"),
            "{}",
            issue.diagnostics
        );
    }

    #[test]
    fn json_b3_one_leading_utf8_bom_is_skipped() {
        assert_eq!(parse(b"\xEF\xBB\xBF{\"a\":1}"), Ok(json!({"a": 1})));
    }

    #[test]
    fn json_b3_second_or_embedded_bom_is_rejected() {
        for text in [
            &b"\xEF\xBB\xBF\xEF\xBB\xBF{}"[..],
            b" \xEF\xBB\xBF{}",
            b"{\"a\":\"x\xEF\xBB\xBFy\"}",
            b"{}\n\xEF\xBB\xBF",
        ] {
            let issue = rejected(text);
            assert_eq!(issue.code, IssueCode::Structure);
            assert!(
                issue.diagnostics.contains("byte order mark"),
                "{}",
                issue.diagnostics
            );
        }
        let issue = rejected(b"{}\n\xEF\xBB\xBF");
        assert!(
            issue
                .diagnostics
                .contains("byte offset 3 (line 2, column 1)"),
            "{issue:?}"
        );
        // The escaped character is content, not an encoding marker.
        assert_eq!(parse(br#"{"a":"\ufeff"}"#), Ok(json!({"a": "\u{feff}"})));
    }

    #[test]
    fn json_b3_utf16_and_utf32_boms_are_rejected() {
        for text in [
            &b"\xFE\xFF\x00{\x00}"[..],
            b"\xFF\xFE{\x00}\x00",
            b"\xFF\xFE\x00\x00{\x00\x00\x00",
            b"\x00\x00\xFE\xFF\x00\x00\x00{",
        ] {
            let issue = rejected(text);
            assert!(
                issue.diagnostics.contains("UTF-16 or UTF-32"),
                "{}",
                issue.diagnostics
            );
        }
    }

    #[test]
    fn json_b3_trailing_data_is_rejected() {
        for text in [&b"{} {}"[..], b"{}x", b"{}\n]", b"[1]\x00"] {
            let issue = rejected(text);
            assert_eq!(issue.code, IssueCode::Structure);
            assert!(
                issue.diagnostics.contains("after the JSON value"),
                "{}",
                issue.diagnostics
            );
        }
        assert!(parse(b" {} \r\n\t").is_ok());
    }

    #[test]
    fn json_b3_huge_numbers_are_rejected() {
        for text in [
            &b"[1e400]"[..],
            b"[-1e309]",
            format!("[1{}]", "0".repeat(400)).as_bytes(),
        ] {
            let issue = rejected(text);
            assert_eq!(issue.code, IssueCode::Value, "{issue:?}");
            assert!(
                issue.diagnostics.contains("number out of range (line 1"),
                "{issue:?}"
            );
        }
        // Beyond u64 but within f64: accepted as a float, like serde_json.
        assert!(parse(b"[18446744073709551616]").is_ok());
    }

    #[test]
    fn json_b3_syntax_errors_give_position_and_never_echo_content() {
        let text = b"{\"identifier\":[{\"value\":\"9434765919\"}],\n \"name\": 9434765919x}";
        let issue = rejected(text);
        assert_eq!(issue.code, IssueCode::Structure);
        assert!(
            issue.diagnostics.contains("line 2, column"),
            "{}",
            issue.diagnostics
        );
        assert!(
            !issue.diagnostics.contains("9434765919"),
            "{}",
            issue.diagnostics
        );
        for text in [
            &b""[..],
            b"   ",
            b"{\"a\":",
            b"{\"a\":1,}",
            b"{'a':1}",
            b"[\"\x01\"]",
        ] {
            let issue = rejected(text);
            assert_eq!(issue.code, IssueCode::Structure, "{text:?}");
            assert!(
                issue.diagnostics.starts_with("invalid JSON: "),
                "{}",
                issue.diagnostics
            );
        }
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300_f64..1e300).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z_\\PC]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_parse_strict_agrees_with_serde_json_on_valid_json(value in arbitrary_json()) {
            let pretty = serde_json::to_vec_pretty(&value).unwrap();
            prop_assert_eq!(parse(&pretty), Ok(value));
        }

        #[test]
        fn json_parse_strict_rejects_whatever_serde_json_rejects(text in "[\\[\\]{}:,\"a1 ]{0,16}") {
            if serde_json::from_str::<Value>(&text).is_err() {
                prop_assert!(parse(text.as_bytes()).is_err());
            }
        }
    }
}
