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
