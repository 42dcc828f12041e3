//! The AWS shared files (`~/.aws/credentials`, `~/.aws/config`), read as the AWS CLI and SDKs
//! read them, for what object_store's `from_env` leaves out: a pod or laptop configured with
//! `aws configure` (or a mounted credentials file and `AWS_PROFILE`) reaches S3 with no
//! `AWS_*` key variables set. Environment variables still win, as in the SDKs.
//!
//! Read: the profile `AWS_PROFILE` (else `AWS_DEFAULT_PROFILE`, else `default`) of
//! `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`, sections `[name]`) and of
//! `AWS_CONFIG_FILE` (default `~/.aws/config`, sections `[profile name]`, and `[default]`);
//! keys `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`, `region` and
//! `endpoint_url`, the credentials file first. Not read: `role_arn`, `sso_*`,
//! `credential_process` (object_store's own environment chain covers web identity and the
//! instance metadata service).

use std::collections::HashMap;
use std::path::PathBuf;

/// The settings of one profile that the S3 client takes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AwsProfile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The sections of an AWS-style INI file, each a map of its keys (lower-cased) to values.
/// `#` and `;` start comment lines; an indented line belongs to a nested service block
/// (`s3 =` followed by indented keys) and is skipped; a line that is none of these is an error
/// naming its number, as the CLI refuses such a file.
pub fn parse_ini(text: &str) -> Result<HashMap<String, HashMap<String, String>>, String> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if line.len() != trimmed.len() && current.is_some() {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| format!("line {}: a section header without `]`", number + 1))?;
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let (key, value) = trimmed.split_once('=').ok_or_else(|| format!("line {}: expected `key = value`", number + 1))?;
        let section = current.as_ref().ok_or_else(|| format!("line {}: a setting before any [section]", number + 1))?;
        sections.entry(section.clone()).or_default().insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Ok(sections)
}

impl AwsProfile {
    /// The profile `name` out of the two files' texts (credentials first, then config).
    pub fn from_texts(name: &str, credentials: Option<&str>, config: Option<&str>) -> Result<Option<Self>, String> {
        let mut found: Vec<HashMap<String, String>> = Vec::new();
        if let Some(text) = credentials {
            if let Some(section) = parse_ini(text).map_err(|e| format!("credentials file: {e}"))?.remove(name) {
                found.push(section);
            }
        }
        if let Some(text) = config {
            let mut sections = parse_ini(text).map_err(|e| format!("config file: {e}"))?;
            let section = sections.remove(&format!("profile {name}")).or_else(|| if name == "default" { sections.remove("default") } else { None });
            if let Some(section) = section {
                found.push(section);
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        let get = |key: &str| found.iter().find_map(|s| s.get(key).filter(|v| !v.is_empty()).cloned());
        Ok(Some(Self {
            access_key_id: get("aws_access_key_id"),
            secret_access_key: get("aws_secret_access_key"),
            session_token: get("aws_session_token"),
            region: get("region"),
            endpoint_url: get("endpoint_url"),
        }))
    }

    /// The profile the environment names, read from its files. `Ok(None)` when neither file
    /// exists or has the default profile; an error when a named profile (`AWS_PROFILE`) is in
    /// neither, or a file cannot be read or parsed.
    pub fn load() -> Result<Option<Self>, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let path = |override_var: &str, file: &str| var(override_var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws").join(file)));
        let read = |p: Option<PathBuf>| -> Result<Option<String>, String> {
            match p {
                None => Ok(None),
                Some(p) => match std::fs::read_to_string(&p) {
                    Ok(text) => Ok(Some(text)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("{}: {e}", p.display())),
                },
            }
        };
        let credentials = read(path("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
        let config = read(path("AWS_CONFIG_FILE", "config"))?;
        let named = var("AWS_PROFILE").or_else(|| var("AWS_DEFAULT_PROFILE"));
        let name = named.clone().unwrap_or_else(|| "default".to_string());
        match Self::from_texts(&name, credentials.as_deref(), config.as_deref())? {
            None if named.is_some() => Err(format!("AWS profile `{name}` is in neither the credentials nor the config file")),
            found => Ok(found),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: &str = "# written by aws configure\n[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n\n[team]\naws_access_key_id=AKTEAM\naws_secret_access_key=steam\naws_session_token = tok\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile team]\nregion = us-east-2\nendpoint_url = http://127.0.0.1:9000\ns3 =\n  addressing_style = path\n; a comment\n[profile only-config]\naws_access_key_id = AKCFG\naws_secret_access_key = scfg\n";

    #[test]
    fn a_profile_joins_its_credentials_and_config_sections() {
        let team = AwsProfile::from_texts("team", Some(CREDENTIALS), Some(CONFIG)).unwrap().unwrap();
        assert_eq!(team.access_key_id.as_deref(), Some("AKTEAM"));
        assert_eq!(team.secret_access_key.as_deref(), Some("steam"));
        assert_eq!(team.session_token.as_deref(), Some("tok"));
        assert_eq!(team.region.as_deref(), Some("us-east-2"));
        assert_eq!(team.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        let default = AwsProfile::from_texts("default", Some(CREDENTIALS), Some(CONFIG)).unwrap().unwrap();
        assert_eq!((default.access_key_id.as_deref(), default.region.as_deref()), (Some("AKDEFAULT"), Some("eu-west-1")));
        assert_eq!(default.endpoint_url, None);
        // Keys in the config file alone count too; `[team]` there is not the profile (it needs `profile`).
        let only = AwsProfile::from_texts("only-config", None, Some(CONFIG)).unwrap().unwrap();
        assert_eq!(only.access_key_id.as_deref(), Some("AKCFG"));
        assert_eq!(AwsProfile::from_texts("team", None, Some("[team]\nregion = x\n")).unwrap(), None);
        assert_eq!(AwsProfile::from_texts("nobody", Some(CREDENTIALS), Some(CONFIG)).unwrap(), None);
    }

    #[test]
    fn a_broken_file_is_an_error_naming_the_line() {
        let err = AwsProfile::from_texts("default", Some("[default]\naws_access_key_id\n"), None).unwrap_err();
        assert!(err.contains("credentials file: line 2"), "{err}");
        let err = AwsProfile::from_texts("default", None, Some("region = x\n")).unwrap_err();
        assert!(err.contains("config file: line 1: a setting before any [section]"), "{err}");
        assert!(parse_ini("[default\n").unwrap_err().contains("without `]`"));
    }
}
