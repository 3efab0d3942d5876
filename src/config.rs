//! The TUI's settings file (TOML): key bindings and colours.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ratatui::style::Color;
use serde::Deserialize;

use crate::app::keymap::Keymap;

/// The file as written by a person. Every section and key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// `action = "key"` or `action = ["key", "key"]`; see `/help` for action names.
    pub keys: HashMap<String, KeyList>,
    pub colors: ColorsFile,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum KeyList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColorsFile {
    pub accent: Option<String>,
    pub own: Option<String>,
    pub system: Option<String>,
    pub mention: Option<String>,
    pub warning: Option<String>,
    pub error: Option<String>,
    pub status_bar: Option<String>,
}

/// Colours used by the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    pub accent: Color,
    pub own: Color,
    pub system: Color,
    pub mention: Color,
    pub warning: Color,
    pub error: Color,
    pub status_bar: Color,
}

impl Default for Theme {
    fn default() -> Theme {
        Theme {
            accent: Color::Cyan,
            own: Color::Green,
            system: Color::DarkGray,
            mention: Color::Yellow,
            warning: Color::LightRed,
            error: Color::Red,
            status_bar: Color::Blue,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Settings ready for use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub keymap: Keymap,
    pub theme: Theme,
}

/// The default location: `<XDG config dir>/mlschat/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "mlschat")
        .map(|dirs| dirs.config_dir().join("config.toml"))
}

fn color(
    path: &Path,
    name: &str,
    value: &Option<String>,
    fallback: Color,
) -> Result<Color, ConfigError> {
    match value {
        None => Ok(fallback),
        Some(text) => text.parse::<Color>().map_err(|_| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("colors.{name}: {text:?} is not a colour (a name like \"cyan\", \"#rrggbb\" or 0-255)"),
        }),
    }
}

/// Loads settings from `path`. A missing file gives the defaults where it is the default path
/// (`required` false); a file named with `--config` must exist (a typo there would otherwise
/// leave the defaults in place without a word).
pub fn load(path: &Path, required: bool) -> Result<Settings, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(Settings::default());
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|error| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    let keys: HashMap<String, Vec<String>> = file
        .keys
        .into_iter()
        .map(|(action, keys)| match keys {
            KeyList::One(key) => (action, vec![key]),
            KeyList::Many(keys) => (action, keys),
        })
        .collect();
    let keymap = Keymap::with_overrides(&keys).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    let defaults = Theme::default();
    let colors = &file.colors;
    let theme = Theme {
        accent: color(path, "accent", &colors.accent, defaults.accent)?,
        own: color(path, "own", &colors.own, defaults.own)?,
        system: color(path, "system", &colors.system, defaults.system)?,
        mention: color(path, "mention", &colors.mention, defaults.mention)?,
        warning: color(path, "warning", &colors.warning, defaults.warning)?,
        error: color(path, "error", &colors.error, defaults.error)?,
        status_bar: color(path, "status_bar", &colors.status_bar, defaults.status_bar)?,
    };
    Ok(Settings { keymap, theme })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_colors() {
        let settings = parse(
            Path::new("test.toml"),
            "[keys]\nnewline = \"ctrl+o\"\nnext_group = [\"ctrl+down\", \"f8\"]\n[colors]\nown = \"#ff8800\"\n",
        )
        .expect("valid");
        assert_eq!(settings.theme.own, Color::Rgb(0xff, 0x88, 0x00));
        assert!(parse(Path::new("t"), "[colors]\nown = \"sparkly\"\n").is_err());
        assert!(parse(Path::new("t"), "[keys]\nfly = \"f9\"\n").is_err());
        assert!(parse(Path::new("t"), "[sound]\n").is_err());
    }

    #[test]
    fn a_missing_file_is_the_defaults_only_where_none_was_named() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let missing = dir.path().join("typo.toml");
        assert!(matches!(load(&missing, false), Ok(settings) if settings == Settings::default()));
        match load(&missing, true) {
            Err(error) => assert!(error.to_string().contains("typo.toml"), "{error}"),
            Ok(_) => panic!("a named file that does not exist"),
        }
    }
}
