//! Passwords taken from environment variables (`password_env` of IP cameras and of the MQTT and
//! NATS sinks): which variables a graph may name, and reading them.
//!
//! A graph can come from a client of the REST API, and a password is sent to whatever server the
//! graph names. So a graph may not read inspectflow's own settings (`INSPECTFLOW_*`, the API
//! token among them): otherwise a client could have the server's token sent to a broker of its
//! choosing. Names are plain identifiers (letters, digits, `_`, not starting with a digit).

/// Prefix of inspectflow's own environment settings, which graphs may not read.
pub const RESERVED_PREFIX: &str = "INSPECTFLOW_";
/// Longest variable name a graph may give.
pub const MAX_NAME_BYTES: usize = 128;

/// Checks that `name` is a variable a graph may read a password from; the error says why not.
pub fn check_variable(name: &str) -> Result<(), String> {
    let identifier = name.len() <= MAX_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        return Err(format!(
            "must be an environment variable name (letters, digits and _, not starting with a \
             digit, at most {MAX_NAME_BYTES} bytes)"
        ));
    }
    if name.to_ascii_uppercase().starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "{name} is one of inspectflow's own settings ({RESERVED_PREFIX}*), which a graph may \
             not read"
        ));
    }
    Ok(())
}

/// The password held by environment variable `name`, once [`check_variable`] allows it.
pub fn read_password(name: &str) -> Result<String, String> {
    check_variable(name)?;
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_allowed_and_inspectflow_settings_are_not() {
        for allowed in ["LINE3_CAMERA_PASSWORD", "_x", "mqtt_password"] {
            assert_eq!(check_variable(allowed), Ok(()), "{allowed}");
        }
        for refused in [
            "INSPECTFLOW_API_TOKEN",
            "inspectflow_api_token",
            "",
            "1PASSWORD",
            "A=B",
            "PATH/x",
            &"A".repeat(MAX_NAME_BYTES + 1),
        ] {
            assert!(check_variable(refused).is_err(), "{refused}");
        }
        assert!(
            read_password("INSPECTFLOW_API_TOKEN")
                .unwrap_err()
                .contains("inspectflow's own settings")
        );
    }
}
