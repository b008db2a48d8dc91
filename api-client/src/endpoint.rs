//! Where the API server is: parsing its URL, building request paths.

use crate::ApiError;

/// A parsed `http://host[:port][/base]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// The URL as given, without a trailing slash (for messages).
    pub url: String,
    /// `host:port`, what to connect to and the `Host` header.
    pub authority: String,
    /// Path prefix of every route, empty or starting with '/' without a trailing one.
    pub base: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, ApiError> {
        let invalid = |reason| ApiError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let trimmed = url.trim().trim_end_matches('/');
        let rest = trimmed
            .strip_prefix("http://")
            .ok_or_else(|| invalid("only http:// URLs are supported"))?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(invalid("it names no host"));
        }
        if authority.contains(['@', '?', '#', ' ']) || base.contains(['?', '#']) {
            return Err(invalid("it has parts a server URL cannot have"));
        }
        let has_port = match authority.rsplit_once(':') {
            // An IPv6 literal without a port ends with ']'.
            Some((_, port)) if !port.ends_with(']') => {
                port.parse::<u16>()
                    .map_err(|_| invalid("its port is not a number up to 65535"))?;
                true
            }
            _ => false,
        };
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            url: trimmed.to_owned(),
            authority,
            base: base.to_owned(),
        })
    }

    /// The request target of `path` (which starts with '/').
    pub fn target(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Percent-encodes one path segment or query value: every byte except the
/// unreserved characters `A-Z a-z 0-9 - . _ ~`.
pub(crate) fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let e = Endpoint::parse("http://127.0.0.1:8080/").expect("valid");
        assert_eq!(
            (e.url.as_str(), e.authority.as_str(), e.base.as_str()),
            ("http://127.0.0.1:8080", "127.0.0.1:8080", "")
        );
        let e = Endpoint::parse("http://api.example/tessera").expect("valid");
        assert_eq!(
            (e.authority.as_str(), e.target("/v1/zone").as_str()),
            ("api.example:80", "/tessera/v1/zone")
        );
        let e = Endpoint::parse("http://[::1]:9000").expect("valid");
        assert_eq!(e.authority, "[::1]:9000");
        let e = Endpoint::parse("http://[::1]").expect("valid");
        assert_eq!(e.authority, "[::1]:80");
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "https://x:1",
            "127.0.0.1:8080",
            "http://",
            "http://x:99999",
            "http://x:port",
            "http://u@x:1",
            "http://x:1/?a",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(ApiError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode("vm-1.disk_0~"), "vm-1.disk_0~");
        assert_eq!(encode("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    }
}
