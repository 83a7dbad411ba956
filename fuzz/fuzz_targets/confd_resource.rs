//! A `conf.d/*.toml` template resource on arbitrary text, through confgen's real loader
//! (`load_resource`, which reads the file). Property: no panic; an accepted resource's wait and
//! timeouts are sane.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../confgen/src/resource.rs"]
mod resource;

/// A confdir with `templates/t.tmpl` and `out/` (so `src` and `dest` can be valid), made once.
fn confdir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("flotilla-fuzz-confd-{}", std::process::id()));
        for sub in ["conf.d", "templates", "out"] {
            std::fs::create_dir_all(base.join(sub)).expect("mkdir");
        }
        std::fs::write(base.join("templates/t.tmpl"), "x\n").expect("template");
        base
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = confdir();
    let file = dir.join("conf.d/r.toml");
    std::fs::write(&file, data).expect("write resource");
    if let Ok(r) = resource::load_resource(dir, &file) {
        assert!(r.wait.min <= r.wait.max);
        assert!((0.0..=1.0).contains(&r.max_drop));
        assert!(!r.check_timeout.is_zero() && !r.reload_timeout.is_zero());
    }
});
