//! Image references: the `name[:tag][@digest]` grammar of Docker's distribution/reference,
//! applied to the raw string before any normalisation, and the pinning policy on top.
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [domain "/"] path-component ["/" path-component]*
//! domain     := host [":" port]              first component with "." or ":", or "localhost"
//! path-comp  := [a-z0-9]+ ( ("." | "_" | "__" | "-"+) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest     := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
//! ```
//!
//! Nothing is normalised: `web` stays `web` (Docker would read `docker.io/library/web`), so the
//! unit runs exactly the string the operator wrote. A colon only starts a tag when no `/`
//! follows it, so `reg:5000/app` is the image `app` on registry `reg:5000` with *no* tag.

use regex::Regex;
use std::fmt;
use std::sync::OnceLock;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (with port), when the reference names one.
    pub domain: Option<String>,
    /// Repository path below the registry, e.g. `acme/web`.
    pub path: String,
    /// Tag, when present.
    pub tag: Option<String>,
    /// Digest (`sha256:...`), when present.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Repository name as written (domain and path), without tag or digest.
    pub fn name(&self) -> String {
        match &self.domain {
            Some(d) => format!("{d}/{}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Why a reference does not parse. The text is meant for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RefError(pub String);

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in regex is valid"))
}

fn path_component_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
}

fn tag_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
}

fn domain_component_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"^(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])$")
}

/// Parses a raw reference. Rejects anything the grammar does not allow; does not judge the tag
/// (that is [`ImagePolicy::check`]'s job).
pub fn parse(raw: &str) -> Result<ImageRef, RefError> {
    if raw.is_empty() {
        return Err(RefError("image reference is empty".into()));
    }
    if let Some(c) = raw.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(RefError(format!(
            "image reference `{}` contains {:?}; references have no spaces or control characters",
            raw.escape_debug(),
            c
        )));
    }
    let (rest, digest) = match raw.split_once('@') {
        Some((rest, digest)) => (rest, Some(parse_digest(digest)?)),
        None => (raw, None),
    };
    // A colon starts the tag only if no slash follows it (`reg:5000/app` has no tag).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        if !tag_re().is_match(tag) {
            return Err(RefError(format!(
                "tag `{tag}` is malformed: a tag is 1 to 128 of [A-Za-z0-9_.-] and does not start with `.` or `-`"
            )));
        }
    }
    if name.is_empty() {
        return Err(RefError(format!("image reference `{raw}` has no name")));
    }
    if name.len() > 255 {
        return Err(RefError(format!(
            "image name is {} characters long; at most 255 are allowed",
            name.len()
        )));
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let domain = if components.len() > 1 && looks_like_domain(components[0]) {
        let d = components.remove(0);
        check_domain(d)?;
        Some(d.to_string())
    } else {
        None
    };
    for comp in &components {
        if comp.is_empty() {
            return Err(RefError(format!(
                "image name `{name}` has an empty path component (`//` or a leading or trailing `/`)"
            )));
        }
        if !path_component_re().is_match(comp) {
            let hint = if comp.chars().any(|c| c.is_ascii_uppercase()) {
                " (repository names are lowercase)"
            } else {
                ""
            };
            return Err(RefError(format!(
                "image name `{name}` has an invalid path component `{comp}`{hint}: use [a-z0-9] separated by `.`, `_`, `__` or `-`"
            )));
        }
    }
    Ok(ImageRef {
        domain,
        path: components.join("/"),
        tag: tag.map(str::to_string),
        digest,
    })
}

fn looks_like_domain(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

fn check_domain(domain: &str) -> Result<(), RefError> {
    let bad = || {
        RefError(format!(
            "registry `{domain}` is malformed: expected host[:port], e.g. `registry.example.com:5000`"
        ))
    };
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6]:port
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (None, port)
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() || !host.split('.').all(|c| domain_component_re().is_match(c)) {
            return Err(bad());
        }
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(bad());
        }
    }
    Ok(())
}

/// Checks a digest (`sha256:` + 64 lowercase hex, or `sha512:` + 128) and returns it.
pub fn parse_digest(digest: &str) -> Result<String, RefError> {
    let (algo, hex) = digest.split_once(':').ok_or_else(|| {
        RefError(format!(
            "digest `{digest}` is malformed: expected `sha256:` followed by 64 hex digits"
        ))
    })?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Err(RefError(format!(
                "digest algorithm `{algo}` is not supported: use sha256 (or sha512)"
            )))
        }
    };
    let hex_ok = hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !hex_ok {
        return Err(RefError(format!(
            "digest `{digest}` is malformed: {algo} takes exactly {want} lowercase hex digits, got {:?}",
            hex.len()
        )));
    }
    Ok(digest.to_string())
}

/// Which tags count as pinned.
#[derive(Clone, Debug)]
pub struct ImagePolicy {
    /// Tags that move (compared case-insensitively). Default: latest, stable, main, master.
    pub moving_tags: Vec<String>,
    /// When set, every tag must match this pattern.
    pub tag_pattern: Option<Regex>,
}

/// The moving tags rejected when the input does not list its own.
pub const DEFAULT_MOVING_TAGS: [&str; 4] = ["latest", "stable", "main", "master"];

impl Default for ImagePolicy {
    fn default() -> Self {
        ImagePolicy {
            moving_tags: DEFAULT_MOVING_TAGS.iter().map(|s| s.to_string()).collect(),
            tag_pattern: None,
        }
    }
}

/// What the policy says about a reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Neither tag nor digest.
    #[error("image `{0}` has no tag: pin an exact tag (e.g. `{0}:git-3f2a9c1`) or a digest (`@sha256:...`)")]
    Unpinned(String),
    /// A moving tag.
    #[error("tag `{tag}` of image `{image}` moves (moving tags: {list}); pin an exact tag such as `git-3f2a9c1` or a digest")]
    MovingTag {
        /// The reference.
        image: String,
        /// The tag.
        tag: String,
        /// The configured moving tags.
        list: String,
    },
    /// The tag does not match `tag_pattern`.
    #[error("tag `{tag}` of image `{image}` does not match image_policy.tag_pattern `{pattern}`")]
    Pattern {
        /// The reference.
        image: String,
        /// The tag.
        tag: String,
        /// The pattern.
        pattern: String,
    },
}

impl ImagePolicy {
    /// Checks that a reference is pinned: it has a tag or a digest, and any tag it has is not a
    /// moving tag and matches `tag_pattern`. The tag rules apply even next to a digest, so a
    /// file never says `latest` anywhere.
    pub fn check(&self, image: &ImageRef) -> Result<(), PolicyError> {
        let shown = image.to_string();
        match &image.tag {
            None if image.digest.is_none() => Err(PolicyError::Unpinned(shown)),
            None => Ok(()),
            Some(tag) => {
                if self.moving_tags.iter().any(|m| m.eq_ignore_ascii_case(tag)) {
                    return Err(PolicyError::MovingTag {
                        image: shown,
                        tag: tag.clone(),
                        list: self.moving_tags.join(", "),
                    });
                }
                if let Some(re) = &self.tag_pattern {
                    if !re.is_match(tag) {
                        return Err(PolicyError::Pattern {
                            image: shown,
                            tag: tag.clone(),
                            pattern: re.as_str().to_string(),
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(raw: &str) -> ImageRef {
        parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn plain_name_with_tag() {
        let r = ok("web:git-3f2a9c1");
        assert_eq!(r.domain, None);
        assert_eq!(r.path, "web");
        assert_eq!(r.tag.as_deref(), Some("git-3f2a9c1"));
        assert_eq!(r.to_string(), "web:git-3f2a9c1");
    }

    #[test]
    fn registry_port_is_not_a_tag() {
        let r = ok("reg:5000/app");
        assert_eq!(r.domain.as_deref(), Some("reg:5000"));
        assert_eq!(r.path, "app");
        assert_eq!(r.tag, None);
        let r = ok("reg:5000/team/app:v1.2");
        assert_eq!(r.domain.as_deref(), Some("reg:5000"));
        assert_eq!(r.path, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
    }

    #[test]
    fn digests_with_and_without_tag() {
        let r = ok(&format!("acme/web@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        let r = ok(&format!("registry.example.com/acme/web:1.4@{D}"));
        assert_eq!(r.domain.as_deref(), Some("registry.example.com"));
        assert_eq!(r.tag.as_deref(), Some("1.4"));
        assert_eq!(
            r.to_string(),
            format!("registry.example.com/acme/web:1.4@{D}")
        );
    }

    #[test]
    fn domains() {
        assert_eq!(ok("localhost/app:1").domain.as_deref(), Some("localhost"));
        assert_eq!(
            ok("localhost:5000/app:1").domain.as_deref(),
            Some("localhost:5000")
        );
        assert_eq!(ok("[::1]:5000/app:1").domain.as_deref(), Some("[::1]:5000"));
        assert_eq!(
            ok("10.0.0.1:5000/a/b:1").domain.as_deref(),
            Some("10.0.0.1:5000")
        );
        // `acme` has no dot or colon: it is a path component, not a registry.
        assert_eq!(ok("acme/web:1").domain, None);
    }

    #[test]
    fn malformed_references() {
        for raw in [
            "",
            "Web:1",
            "web::1",
            "web:",
            "web:-x",
            "web:.x",
            "/web:1",
            "acme//web:1",
            "web/:1",
            "web@sha256:abc",
            "web@md5:0123456789abcdef0123456789abcdef",
            "web@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "reg:x/app:1",
            "reg_x.com/app:1",
            "web 1",
            "we$b:1",
            "web:a/b",
            "a--/b:1",
        ] {
            assert!(parse(raw).is_err(), "accepted `{raw}`: {:?}", parse(raw));
        }
        assert!(parse("Acme/Web:1").unwrap_err().0.contains("lowercase"));
        assert!(parse("web:1 ").unwrap_err().0.contains("no spaces"));
        assert!(parse(&"a".repeat(256)).unwrap_err().0.contains("255"));
        assert!(parse(&format!("web:{}", "t".repeat(129))).is_err());
        assert!(parse(&format!("web:{}", "t".repeat(128))).is_ok());
    }

    #[test]
    fn policy() {
        let p = ImagePolicy::default();
        assert!(matches!(p.check(&ok("web")), Err(PolicyError::Unpinned(_))));
        assert!(matches!(
            p.check(&ok("reg:5000/app")),
            Err(PolicyError::Unpinned(_))
        ));
        assert!(matches!(
            p.check(&ok("web:latest")),
            Err(PolicyError::MovingTag { .. })
        ));
        assert!(matches!(
            p.check(&ok("web:Latest")),
            Err(PolicyError::MovingTag { .. })
        ));
        assert!(matches!(
            p.check(&ok("web:master")),
            Err(PolicyError::MovingTag { .. })
        ));
        assert!(matches!(
            p.check(&ok(&format!("web:stable@{D}"))),
            Err(PolicyError::MovingTag { .. })
        ));
        assert!(p.check(&ok("web:git-3f2a9c1")).is_ok());
        assert!(p.check(&ok(&format!("web@{D}"))).is_ok());
        let strict = ImagePolicy {
            moving_tags: vec!["edge".into()],
            tag_pattern: Some(Regex::new("^git-[0-9a-f]{7,40}$").unwrap()),
        };
        assert!(strict.check(&ok("web:git-3f2a9c1")).is_ok());
        assert!(matches!(
            strict.check(&ok("web:edge")),
            Err(PolicyError::MovingTag { .. })
        ));
        assert!(matches!(
            strict.check(&ok("web:v1")),
            Err(PolicyError::Pattern { .. })
        ));
        // With its own list, `latest` is only rejected by the pattern.
        assert!(matches!(
            strict.check(&ok("web:latest")),
            Err(PolicyError::Pattern { .. })
        ));
    }
}
