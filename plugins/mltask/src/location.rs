//! Where training data comes from and where the model goes: an object-store
//! or web URI the workload reads itself, or a PersistentVolumeClaim the
//! plugin mounts.

use kuwa_sdk::Error;

/// The URI schemes passed through to the workload as they are.
pub const URI_SCHEMES: [&str; 3] = ["s3", "gs", "https"];

/// The scheme naming a PersistentVolumeClaim in the task's namespace.
pub const CLAIM_SCHEME: &str = "pvc";

/// The CRD `pattern` for a location, matching what [`parse`] accepts.
pub const PATTERN: &str = r"^((s3|gs|https)://\S+|pvc://[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)$";

/// A data location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A URI (`s3://…`, `gs://…`, `https://…`), given to the workload in an
    /// environment variable.
    Uri(String),
    /// A PersistentVolumeClaim name (`pvc://<claim>`), mounted into the workers.
    Claim(String),
}

/// True for a DNS-1123 subdomain, which PersistentVolumeClaim names are.
fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// Parses the location in spec field `field`.
pub fn parse(field: &str, value: &str) -> Result<Location, Error> {
    let invalid = |why: String| {
        Error::invalid_spec(format!(
            "spec.{field} {value:?} {why}: use s3://…, gs://…, https://… or pvc://<claim>"
        ))
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(invalid("is not a URI".to_owned()));
    };
    if scheme == CLAIM_SCHEME {
        return if is_dns_subdomain(rest) {
            Ok(Location::Claim(rest.to_owned()))
        } else {
            Err(invalid(format!(
                "does not name a PersistentVolumeClaim ({rest:?} is not a valid claim name)"
            )))
        };
    }
    if !URI_SCHEMES.contains(&scheme) {
        return Err(invalid(format!("has an unsupported scheme {scheme:?}")));
    }
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(invalid("has an empty or malformed location".to_owned()));
    }
    Ok(Location::Uri(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_claims() {
        assert_eq!(
            parse("trainingData", "s3://datasets/mnist"),
            Ok(Location::Uri("s3://datasets/mnist".into()))
        );
        assert_eq!(
            parse("trainingData", "gs://b/x"),
            Ok(Location::Uri("gs://b/x".into()))
        );
        assert_eq!(
            parse("trainingData", "https://h/x.tgz"),
            Ok(Location::Uri("https://h/x.tgz".into()))
        );
        assert_eq!(
            parse("modelOutput", "pvc://mnist-model"),
            Ok(Location::Claim("mnist-model".into()))
        );
    }

    #[test]
    fn everything_else_is_invalid() {
        for bad in [
            "",
            "/data",
            "ftp://x",
            "http://x",
            "s3://",
            "s3://a b",
            "pvc://",
            "pvc://Model",
            "pvc://a/b",
            "pvc://-a",
        ] {
            let err = parse("modelOutput", bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidSpec(m) if m.contains("spec.modelOutput")),
                "{bad:?}: {err}"
            );
        }
    }
}
