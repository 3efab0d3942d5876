//! The `--database` URL: its scheme picks the [`Store`](super::Store) backend, in the manner of
//! atuin's server database settings. `Debug` and `Display` never show a password.

use std::path::PathBuf;

/// Where the DS keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: the embedded single-node backend.
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
    /// Not echoed: a libpq `key=value` string given by mistake may hold a password.
    #[error(
        "the database URL has no scheme: use sqlite://PATH or postgres://USER@HOST/DB (libpq's \
         key=value connection strings are not accepted)"
    )]
    NoScheme,
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
        // A bare path used to be taken as a SQLite file, which turned a libpq key=value string
        // into a file of that name in the working directory: a lone node, silently, with the
        // password in a file name.
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(DatabaseUrlError::NoScheme);
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
    // A password may hold '/', '?', '#' and even '@' unencoded (tokio-postgres takes what comes
    // before the first '@', a person may mean up to the last): everything up to the last '@'
    // anywhere is credentials here. An '@' in a later parameter hides more than it must,
    // never less.
    let (credentials, host_and_rest) = match rest.rsplit_once('@') {
        Some((credentials, host_and_rest)) => {
            let credentials = match credentials.split_once(':') {
                Some((user, _password)) => format!("{user}:***@"),
                None => format!("{}@", redact_password_parameters(credentials)),
            };
            (credentials, host_and_rest)
        }
        None => (String::new(), rest),
    };
    format!(
        "{scheme}://{credentials}{}",
        redact_password_parameters(host_and_rest)
    )
}

/// Replaces the value of every `password=` parameter (case-insensitive, anywhere) up to the next
/// '&' with `***`.
fn redact_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.to_ascii_lowercase().find(KEY) {
        let value_start = start + KEY.len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        rest = &rest[value_start..];
        rest = &rest[rest.find('&').unwrap_or(rest.len())..];
    }
    out.push_str(rest);
    out
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
            DatabaseUrl::parse("sqlite://relative/ds.sqlite3"),
            Ok(DatabaseUrl::Sqlite("relative/ds.sqlite3".into()))
        );
        // Not a file named after a libpq connection string (with its password).
        for bare in [
            "relative/ds.sqlite3",
            "host=127.0.0.1 port=5432 password=kvsecret dbname=ds",
            "",
        ] {
            let refused = DatabaseUrl::parse(bare);
            assert_eq!(refused, Err(DatabaseUrlError::NoScheme), "{bare}");
            if let Err(error) = refused {
                assert!(!error.to_string().contains("kvsecret"));
            }
        }
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
        // Unencoded '/', '?' and '#' in a password (tokio-postgres connects with these).
        for password in ["pa/ss99", "pa?ss99", "pa#ss99", "p@ss/99"] {
            let url = format!("postgres://postgres:{password}@127.0.0.1:5432/ds");
            let shown = DatabaseUrl::parse(&url).expect("valid").to_string();
            assert_eq!(
                shown, "postgres://postgres:***@127.0.0.1:5432/ds",
                "{password}"
            );
        }
        assert_eq!(
            redact_postgres_url("postgres://db/x?PassWord=s3cret&user=ds"),
            "postgres://db/x?PassWord=***&user=ds"
        );
    }
}
