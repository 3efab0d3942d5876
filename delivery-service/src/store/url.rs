//! The `--database` URL: its scheme picks the [`Store`](super::Store) backend, in the manner of
//! atuin's server database settings. `Debug` and `Display` never show a password.

use std::path::PathBuf;

/// Where the DS keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH` (or a bare path): the embedded single-node backend.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: the shared backend several DS nodes can use. Kept
    /// as given (it may hold a password); see [`DatabaseUrl::redacted`].
    Postgres(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("unsupported database URL scheme `{0}`: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedScheme(String),
    #[error("the sqlite:// URL names no file")]
    EmptyPath,
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            if url.is_empty() {
                return Err(DatabaseUrlError::EmptyPath);
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(url)));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" if rest.is_empty() => Err(DatabaseUrlError::EmptyPath),
            "sqlite" => Ok(DatabaseUrl::Sqlite(PathBuf::from(rest))),
            "postgres" | "postgresql" => Ok(DatabaseUrl::Postgres(url.to_string())),
            other => Err(DatabaseUrlError::UnsupportedScheme(other.to_string())),
        }
    }

    /// The URL with any password replaced by `***`, fit for logs and error messages.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => redact_postgres_url(url),
        }
    }
}

/// Hides the password of a `postgres://user:password@host/...` URL and of a `password=` query
/// parameter.
pub(crate) fn redact_postgres_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "postgres://***".into();
    };
    // The authority ends at the first '/', '?' or '#'; credentials end at its last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl<'de> serde::Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<DatabaseUrl, D::Error> {
        let url = String::deserialize(deserializer)?;
        DatabaseUrl::parse(&url).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: a Debug print of the settings must not leak the database password.
        formatter
            .debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_picks_the_backend() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/ds.sqlite3"),
            Ok(DatabaseUrl::Sqlite("/var/lib/ds.sqlite3".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("relative/ds.sqlite3"),
            Ok(DatabaseUrl::Sqlite("relative/ds.sqlite3".into()))
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://ds@db.example/mlschat"),
            Ok(DatabaseUrl::Postgres(_))
        ));
        assert!(matches!(
            DatabaseUrl::parse("PostgreSQL://ds@db.example/mlschat"),
            Ok(DatabaseUrl::Postgres(_))
        ));
        assert_eq!(
            DatabaseUrl::parse("mysql://x"),
            Err(DatabaseUrlError::UnsupportedScheme("mysql".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite://"),
            Err(DatabaseUrlError::EmptyPath)
        );
    }

    #[test]
    fn config_files_hold_urls() {
        #[derive(Debug, serde::Deserialize)]
        struct File {
            database: DatabaseUrl,
        }
        let file: File =
            toml::from_str("database = \"postgres://ds:pw@db/x\"").expect("a valid URL");
        assert!(matches!(file.database, DatabaseUrl::Postgres(_)));
        assert!(!format!("{file:?}").contains("pw"));
        assert!(toml::from_str::<File>("database = \"redis://x\"").is_err());
    }

    #[test]
    fn passwords_never_show() {
        let url = DatabaseUrl::parse(
            "postgres://ds:s3cret@db.example:5432/mlschat?sslmode=disable&password=s3cret",
        )
        .expect("valid");
        for shown in [format!("{url:?}"), url.to_string(), url.redacted()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("ds:***@db.example:5432/mlschat"), "{shown}");
        }
        assert_eq!(
            redact_postgres_url("postgres://ds@db/x"),
            "postgres://ds@db/x",
            "nothing to hide"
        );
        assert_eq!(
            redact_postgres_url("postgres://a:b@c@host/x"),
            "postgres://a:***@host/x",
            "the last @ ends the credentials"
        );
    }
}
