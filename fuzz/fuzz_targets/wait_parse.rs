//! confgen's `wait = "min:max"` parser on arbitrary text (issue 16: "150000000000y" overflowed).
//! Property: no panic; an accepted wait has min <= max, each within bounds, and can be added to
//! an `Instant` (the daemon does `now + max`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../confgen/src/resource.rs"]
mod resource;

fuzz_target!(|s: &str| {
    if let Ok(w) = resource::Wait::parse(s) {
        assert!(w.min <= w.max, "{s:?}: {w:?}");
        assert!(w.max <= resource::Wait::LONGEST * 4, "{s:?}: {w:?}");
        let _ = std::time::Instant::now() + w.max;
    }
});
