//! How both programs word an error that stops them: one line per error chain, each cause said
//! once.

use std::error::Error;

/// The errors of a chain (outermost first) joined with ": ", leaving out a cause whose text the
/// words before it already hold: most of our errors end with their cause's text, and a second
/// copy of a TOML parse error or an I/O error buries the first.
pub fn describe<'a>(mut chain: impl Iterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut text = chain.next().map(ToString::to_string).unwrap_or_default();
    for cause in chain {
        let cause = cause.to_string();
        if !text.contains(cause.trim()) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the config file: {source}")]
    struct WithCause {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Context(#[source] WithCause);

    #[test]
    fn each_cause_is_said_once() {
        let error = Context(WithCause {
            source: std::io::Error::other("permission denied"),
        });
        let outermost: &(dyn Error + 'static) = &error;
        let chain = std::iter::successors(Some(outermost), |error| (*error).source());
        assert_eq!(
            describe(chain),
            "cannot start: cannot read the config file: permission denied"
        );
    }
}
