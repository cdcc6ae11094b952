//! URLs as they may be shown: credentials split out of camera and receiver URLs, and a redacted
//! form for logs, metrics and API responses (no user information, no query, which often carries
//! tokens).

/// Splits `scheme://user:password@host/...` into the URL without user information, the user and
/// the password (percent-encoding is left as it is).
pub fn split_credentials(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None, None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None, None);
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user.to_string(), Some(password.to_string())),
        None => (userinfo.to_string(), None),
    };
    (
        format!("{scheme}://{host}{tail}"),
        (!user.is_empty()).then_some(user),
        password,
    )
}

/// The URL as it may be shown: no user information, no query (which often carries tokens).
pub fn redact_url(url: &str) -> String {
    let (without_user, user, password) = split_credentials(url);
    let mut shown = match without_user.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => without_user,
    };
    if user.is_some() || password.is_some() {
        shown = shown.replacen("://", "://<credentials>@", 1);
    }
    shown
}

/// Host and port of a camera URL (`rtsp://user:pw@host:8554/path`), the scheme's port when none
/// is given; `None` for a scheme other than RTSP(S) or HTTP(S), or without a host.
pub fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let default_port = match scheme {
        "rtsp" => 554,
        "rtsps" => 322,
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => Some((
            host.trim_matches(['[', ']']).to_string(),
            port.parse().ok()?,
        )),
        _ => Some((authority.trim_matches(['[', ']']).to_string(), default_port)),
    }
    .filter(|(host, _)| !host.is_empty())
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn camera_urls_give_host_and_port() {
        assert_eq!(
            host_and_port("rtsp://user:secret@10.0.0.5:8554/stream"),
            Some(("10.0.0.5".into(), 8554))
        );
        assert_eq!(
            host_and_port("http://camera.local/mjpeg"),
            Some(("camera.local".into(), 80))
        );
        assert_eq!(host_and_port("rtsp:///x"), None);
        assert_eq!(host_and_port("file:///x"), None);
    }
}
