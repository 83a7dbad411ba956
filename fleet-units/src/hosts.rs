//! `hosts.yaml`: the machines `--format systemd` places units on.
//!
//! ```yaml
//! hosts:
//!   node-1:
//!     address: 10.0.0.11        # presence's --advertise-ip (needed with platform.presence)
//!     metadata: {role: web, zone: a}
//! ```

use crate::error::{sort_diagnostics, Error, SourceFile};
use crate::model::RawHostsFile;
use crate::path::FieldPath;
use crate::placement::Hosts;
use crate::spec::{control_char_errors, is_dns_label, is_metadata_word, parse_yaml};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A checked inventory.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Host name → metadata.
    pub hosts: Hosts,
    /// Host name → advertise address, when given.
    pub addresses: BTreeMap<String, IpAddr>,
}

/// Reads and checks `hosts.yaml`, reporting every problem at once.
pub fn load(src: &SourceFile) -> Result<Inventory, Error> {
    let raw: RawHostsFile = parse_yaml(src)?;
    let mut diags = control_char_errors(src);
    let mut inv = Inventory::default();
    for (name, host) in raw.hosts.unwrap_or_default().0 {
        let base = FieldPath::keys(&["hosts", &name]);
        if !is_dns_label(&name) {
            diags.push(src.error(
                &base,
                format!("host name `{name}` must be a DNS label (lowercase letters, digits, `-`): it names the output directory and presence's node"),
            ));
            continue;
        }
        if let Some(a) = &host.address {
            match a.parse::<IpAddr>() {
                Ok(ip) => {
                    inv.addresses.insert(name.clone(), ip);
                }
                Err(_) => diags
                    .push(src.error(&base.key("address"), format!("`{a}` is not an IP address"))),
            }
        }
        let mut md = BTreeMap::new();
        for (k, v) in host.metadata.unwrap_or_default().0 {
            let p = base.key("metadata").key(&k);
            if !is_metadata_word(&k) {
                diags.push(src.error(&p, format!("`{k}` is not a valid metadata key: use [A-Za-z0-9._-], starting with a letter or digit")));
            } else if !is_metadata_word(&v.0) {
                diags.push(src.error(&p, format!("`{}` is not a valid metadata value: use [A-Za-z0-9._-], starting with a letter or digit", v.0)));
            } else {
                md.insert(k, v.0);
            }
        }
        inv.hosts.insert(name, md);
    }
    if diags.is_empty() {
        Ok(inv)
    } else {
        sort_diagnostics(&mut diags);
        Err(Error::Invalid(diags))
    }
}
