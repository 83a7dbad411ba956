//! confgen's template tag scanner (`tagscan::instrument`) on arbitrary text (issue 16: it sliced
//! inside multi-byte characters). Property: no panic, and removing the inserted position calls
//! gives back the template exactly.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../confgen/src/tagscan.rs"]
mod tagscan;

fn inserted() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r#"\{\{ __confgen_at\(f="fz\.tmpl", l=\d+, c=\d+\) \}\}"#).expect("re")
    })
}

fuzz_target!(|src: &str| {
    let out = tagscan::instrument("fz.tmpl", src);
    // A template that itself contains the exact inserted text cannot be told apart.
    if !inserted().is_match(src) {
        assert_eq!(inserted().replace_all(&out, ""), src);
    }
});
