//! unitgen on an arbitrary `services.yaml` (fleet format, and systemd format with a fixed
//! hosts.yaml). Property: no panic; errors format (with their file:line:column); every unit
//! written has no control character but newline and tab (nothing can break systemd's syntax).
#![no_main]

use fleet_units::render::RenderOptions;
use fleet_units::{generate, Format, Job, SourceFile};
use libfuzzer_sys::fuzz_target;

const HOSTS: &str = "hosts:\n  h1: {address: 10.0.0.1, metadata: {role: web, zone: a}}\n  h2: {address: 10.0.0.2, metadata: {role: db, zone: b}}\n";

fuzz_target!(|text: &str| {
    for format in [Format::Fleet, Format::Systemd] {
        let job = Job {
            services: SourceFile::new("services.yaml", text),
            hosts: matches!(format, Format::Systemd).then(|| SourceFile::new("hosts.yaml", HOSTS)),
            lock: None,
            format,
            render: RenderOptions {
                docker: "/usr/bin/docker".into(),
                pull: true,
                source_name: "services.yaml".into(),
            },
        };
        match generate(&job) {
            Ok(out) => {
                for f in &out.files {
                    assert!(
                        !f.content
                            .chars()
                            .any(|c| c.is_control() && c != '\n' && c != '\t'),
                        "{}: control character in a unit",
                        f.path
                    );
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
