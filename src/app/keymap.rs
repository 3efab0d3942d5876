//! Key bindings: which key does which action, with defaults that a TOML config can override.

use std::collections::HashMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Something the user can do with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Send,
    Newline,
    Quit,
    Complete,
    HistoryPrevious,
    HistoryNext,
    NextGroup,
    PreviousGroup,
    ScrollUp,
    ScrollDown,
    ToggleMembers,
    Left,
    Right,
    WordLeft,
    WordRight,
    LineStart,
    LineEnd,
    Backspace,
    Delete,
    DeleteWordBefore,
    DeleteWordAfter,
    KillToEnd,
    KillToStart,
    Redraw,
    Cancel,
}

impl Action {
    /// The name used in the config file and in `/help`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Newline => "newline",
            Action::Quit => "quit",
            Action::Complete => "complete",
            Action::HistoryPrevious => "history_previous",
            Action::HistoryNext => "history_next",
            Action::NextGroup => "next_group",
            Action::PreviousGroup => "previous_group",
            Action::ScrollUp => "scroll_up",
            Action::ScrollDown => "scroll_down",
            Action::ToggleMembers => "toggle_members",
            Action::Left => "left",
            Action::Right => "right",
            Action::WordLeft => "word_left",
            Action::WordRight => "word_right",
            Action::LineStart => "line_start",
            Action::LineEnd => "line_end",
            Action::Backspace => "backspace",
            Action::Delete => "delete",
            Action::DeleteWordBefore => "delete_word_before",
            Action::DeleteWordAfter => "delete_word_after",
            Action::KillToEnd => "kill_to_end",
            Action::KillToStart => "kill_to_start",
            Action::Redraw => "redraw",
            Action::Cancel => "cancel",
        }
    }

    pub const ALL: [Action; 25] = [
        Action::Send,
        Action::Newline,
        Action::Quit,
        Action::Complete,
        Action::HistoryPrevious,
        Action::HistoryNext,
        Action::NextGroup,
        Action::PreviousGroup,
        Action::ScrollUp,
        Action::ScrollDown,
        Action::ToggleMembers,
        Action::Left,
        Action::Right,
        Action::WordLeft,
        Action::WordRight,
        Action::LineStart,
        Action::LineEnd,
        Action::Backspace,
        Action::Delete,
        Action::DeleteWordBefore,
        Action::DeleteWordAfter,
        Action::KillToEnd,
        Action::KillToStart,
        Action::Redraw,
        Action::Cancel,
    ];

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|action| action.name() == name)
    }
}

/// A key with its modifiers, as written in the config: `ctrl+j`, `alt+enter`, `f2`, `pageup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyBinding {
    pub code: KeyCode,
    pub modifiers: KeyModifiers,
}

impl KeyBinding {
    pub fn from_event(event: &KeyEvent) -> KeyBinding {
        // Shift is implied by the character itself for printable keys.
        let mut modifiers =
            event.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
        if let KeyCode::Char(c) = event.code {
            modifiers.remove(KeyModifiers::SHIFT);
            return KeyBinding {
                code: KeyCode::Char(c.to_ascii_lowercase()),
                modifiers,
            };
        }
        // Shift+Tab arrives as BackTab, with Shift set or not depending on the terminal.
        if event.code == KeyCode::BackTab {
            modifiers.remove(KeyModifiers::SHIFT);
        }
        KeyBinding {
            code: event.code,
            modifiers,
        }
    }

    pub fn parse(text: &str) -> Result<KeyBinding, String> {
        let lower = text.trim().to_ascii_lowercase();
        let mut parts: Vec<&str> = lower.split('+').collect();
        let key = parts
            .pop()
            .filter(|key| !key.is_empty())
            .ok_or_else(|| format!("empty key in {text:?}"))?;
        let mut modifiers = KeyModifiers::NONE;
        for part in parts {
            modifiers |= match part {
                "ctrl" | "control" | "c" => KeyModifiers::CONTROL,
                "alt" | "meta" | "m" => KeyModifiers::ALT,
                "shift" | "s" => KeyModifiers::SHIFT,
                other => return Err(format!("unknown modifier {other:?} in {text:?}")),
            };
        }
        let code = match key {
            "enter" | "return" => KeyCode::Enter,
            "tab" => KeyCode::Tab,
            "backtab" => KeyCode::BackTab,
            "backspace" => KeyCode::Backspace,
            "delete" | "del" => KeyCode::Delete,
            "esc" | "escape" => KeyCode::Esc,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "left" => KeyCode::Left,
            "right" => KeyCode::Right,
            "home" => KeyCode::Home,
            "end" => KeyCode::End,
            "pageup" => KeyCode::PageUp,
            "pagedown" => KeyCode::PageDown,
            "space" => KeyCode::Char(' '),
            function if function.starts_with('f') && function.len() > 1 => {
                let number: u8 = function[1..]
                    .parse()
                    .ok()
                    .filter(|number| (1..=24).contains(number))
                    .ok_or_else(|| format!("unknown key {key:?} in {text:?}"))?;
                KeyCode::F(number)
            }
            single if single.chars().count() == 1 => {
                KeyCode::Char(single.chars().next().unwrap_or(' '))
            }
            other => return Err(format!("unknown key {other:?} in {text:?}")),
        };
        // Keys as they arrive (see `from_event`), so that every binding can fire.
        if code == KeyCode::Tab && modifiers == KeyModifiers::SHIFT {
            return Ok(KeyBinding {
                code: KeyCode::BackTab,
                modifiers: KeyModifiers::NONE,
            });
        }
        if code == KeyCode::BackTab {
            modifiers.remove(KeyModifiers::SHIFT);
        }
        if let KeyCode::Char(c) = code {
            if modifiers.contains(KeyModifiers::SHIFT) {
                return Err(format!(
                    "{text:?}: Shift with a character cannot be told apart from the character \
                     itself; use Ctrl or Alt"
                ));
            }
            if modifiers.is_empty() && !c.is_control() {
                return Err(format!(
                    "{text:?}: a character without Ctrl or Alt could no longer be typed"
                ));
            }
        }
        Ok(KeyBinding { code, modifiers })
    }

    /// The binding as a person writes it.
    pub fn label(&self) -> String {
        let mut label = String::new();
        if self.modifiers.contains(KeyModifiers::CONTROL) {
            label.push_str("Ctrl+");
        }
        if self.modifiers.contains(KeyModifiers::ALT) {
            label.push_str("Alt+");
        }
        if self.modifiers.contains(KeyModifiers::SHIFT) {
            label.push_str("Shift+");
        }
        let key = match self.code {
            KeyCode::Char(' ') => "Space".to_string(),
            KeyCode::Char(c) => c.to_ascii_uppercase().to_string(),
            KeyCode::F(number) => format!("F{number}"),
            KeyCode::PageUp => "PageUp".into(),
            KeyCode::PageDown => "PageDown".into(),
            other => format!("{other:?}"),
        };
        label.push_str(&key);
        label
    }
}

/// The active bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keymap {
    bindings: HashMap<KeyBinding, Action>,
}

const DEFAULTS: &[(&str, Action)] = &[
    ("enter", Action::Send),
    ("alt+enter", Action::Newline),
    ("ctrl+j", Action::Newline),
    ("ctrl+c", Action::Quit),
    ("tab", Action::Complete),
    ("up", Action::HistoryPrevious),
    ("down", Action::HistoryNext),
    ("alt+down", Action::NextGroup),
    ("ctrl+n", Action::NextGroup),
    ("alt+up", Action::PreviousGroup),
    ("ctrl+p", Action::PreviousGroup),
    ("pageup", Action::ScrollUp),
    ("pagedown", Action::ScrollDown),
    ("f2", Action::ToggleMembers),
    ("alt+m", Action::ToggleMembers),
    ("left", Action::Left),
    ("ctrl+b", Action::Left),
    ("right", Action::Right),
    ("ctrl+f", Action::Right),
    ("alt+b", Action::WordLeft),
    ("ctrl+left", Action::WordLeft),
    ("alt+f", Action::WordRight),
    ("ctrl+right", Action::WordRight),
    ("home", Action::LineStart),
    ("ctrl+a", Action::LineStart),
    ("end", Action::LineEnd),
    ("ctrl+e", Action::LineEnd),
    ("backspace", Action::Backspace),
    ("ctrl+h", Action::Backspace),
    ("delete", Action::Delete),
    ("ctrl+d", Action::Delete),
    ("ctrl+w", Action::DeleteWordBefore),
    ("alt+backspace", Action::DeleteWordBefore),
    ("alt+d", Action::DeleteWordAfter),
    ("ctrl+k", Action::KillToEnd),
    ("ctrl+u", Action::KillToStart),
    ("ctrl+l", Action::Redraw),
    ("esc", Action::Cancel),
];

impl Default for Keymap {
    fn default() -> Keymap {
        let bindings = DEFAULTS
            .iter()
            .filter_map(|(key, action)| {
                KeyBinding::parse(key)
                    .ok()
                    .map(|binding| (binding, *action))
            })
            .collect();
        Keymap { bindings }
    }
}

impl Keymap {
    /// Applies `action = ["key", ...]` overrides: the listed keys replace the action's
    /// defaults, and take their keys from other actions' defaults. One key given to two actions
    /// is an error (which one won depended on the order of a hash map), and so is leaving
    /// `send` without a key.
    pub fn with_overrides(overrides: &HashMap<String, Vec<String>>) -> Result<Keymap, String> {
        let mut keymap = Keymap::default();
        let mut given: HashMap<KeyBinding, (Action, &str)> = HashMap::new();
        for (name, keys) in overrides {
            let action = Action::from_name(name)
                .ok_or_else(|| format!("unknown action {name:?} in [keys]"))?;
            keymap.bindings.retain(|_, bound| *bound != action);
            for key in keys {
                let binding = KeyBinding::parse(key)?;
                if let Some((other, other_name)) = given.insert(binding, (action, name))
                    && other != action
                {
                    let (first, second) = if other_name < name.as_str() {
                        (other_name, name.as_str())
                    } else {
                        (name.as_str(), other_name)
                    };
                    return Err(format!(
                        "{} is given to both {first} and {second} in [keys]",
                        binding.label()
                    ));
                }
            }
        }
        for (binding, (action, _)) in given {
            keymap.bindings.insert(binding, action);
        }
        if !keymap.bindings.values().any(|bound| *bound == Action::Send) {
            return Err("send has no key left in [keys]: messages could not be sent".into());
        }
        Ok(keymap)
    }

    pub fn action(&self, event: &KeyEvent) -> Option<Action> {
        self.bindings.get(&KeyBinding::from_event(event)).copied()
    }

    /// Bindings grouped per action, for `/help`.
    pub fn describe(&self) -> Vec<(Action, Vec<String>)> {
        let mut described: Vec<(Action, Vec<String>)> = Action::ALL
            .iter()
            .map(|action| {
                let mut keys: Vec<String> = self
                    .bindings
                    .iter()
                    .filter(|(_, bound)| *bound == action)
                    .map(|(binding, _)| binding.label())
                    .collect();
                keys.sort();
                (*action, keys)
            })
            .filter(|(_, keys)| !keys.is_empty())
            .collect();
        described.sort_by_key(|(action, _)| *action);
        described
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_label() {
        let binding = KeyBinding::parse("Ctrl+J").expect("valid");
        assert_eq!(
            binding,
            KeyBinding {
                code: KeyCode::Char('j'),
                modifiers: KeyModifiers::CONTROL
            }
        );
        assert_eq!(binding.label(), "Ctrl+J");
        assert_eq!(KeyBinding::parse("f2").expect("valid").code, KeyCode::F(2));
        assert!(KeyBinding::parse("hyper+x").is_err());
        assert!(KeyBinding::parse("").is_err());
    }

    #[test]
    fn overrides_replace_defaults() {
        let mut overrides = HashMap::new();
        overrides.insert("toggle_members".to_string(), vec!["ctrl+o".to_string()]);
        let keymap = Keymap::with_overrides(&overrides).expect("valid");
        let ctrl_o = KeyEvent::new(KeyCode::Char('o'), KeyModifiers::CONTROL);
        assert_eq!(keymap.action(&ctrl_o), Some(Action::ToggleMembers));
        let f2 = KeyEvent::new(KeyCode::F(2), KeyModifiers::NONE);
        assert_eq!(keymap.action(&f2), None);
        overrides.insert("no_such_action".to_string(), vec![]);
        assert!(Keymap::with_overrides(&overrides).is_err());
    }

    fn keymap(pairs: &[(&str, &[&str])]) -> Result<Keymap, String> {
        let overrides: HashMap<String, Vec<String>> = pairs
            .iter()
            .map(|(action, keys)| {
                (
                    action.to_string(),
                    keys.iter().map(|key| key.to_string()).collect(),
                )
            })
            .collect();
        Keymap::with_overrides(&overrides)
    }

    /// One key given to two actions used to be taken by whichever came last out of a hash map,
    /// differently from run to run.
    #[test]
    fn a_key_given_to_two_actions_is_refused_every_time() {
        for _ in 0..20 {
            let refused = keymap(&[("send", &["ctrl+o"]), ("newline", &["ctrl+o"])]);
            assert_eq!(
                refused,
                Err("Ctrl+O is given to both newline and send in [keys]".to_string())
            );
        }
        // A key taken from another action's defaults moves: send on Ctrl+J, newline keeps
        // Alt+Enter.
        let keymap = keymap(&[("send", &["ctrl+j"])]).expect("valid");
        let ctrl_j = KeyEvent::new(KeyCode::Char('j'), KeyModifiers::CONTROL);
        assert_eq!(keymap.action(&ctrl_j), Some(Action::Send));
        let alt_enter = KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT);
        assert_eq!(keymap.action(&alt_enter), Some(Action::Newline));
    }

    #[test]
    fn bindings_that_could_never_fire_or_leave_send_without_a_key_are_refused() {
        assert!(keymap(&[("send", &[])]).is_err());
        assert!(
            keymap(&[("newline", &["enter"])]).is_err(),
            "send had only Enter"
        );
        assert!(keymap(&[("newline", &["enter"]), ("send", &["ctrl+o"])]).is_ok());
        for key in ["shift+x", "x", "f0", "f25"] {
            assert!(keymap(&[("next_group", &[key])]).is_err(), "{key}");
        }
        // Shift+Tab arrives as BackTab, with or without Shift set.
        for written in ["backtab", "shift+tab"] {
            let keymap = keymap(&[("next_group", &[written])]).expect("valid");
            for modifiers in [KeyModifiers::SHIFT, KeyModifiers::NONE] {
                let event = KeyEvent::new(KeyCode::BackTab, modifiers);
                assert_eq!(keymap.action(&event), Some(Action::NextGroup), "{written}");
            }
        }
        // Quitting by key may be given up: /quit remains.
        assert!(keymap(&[("quit", &[])]).is_ok());
    }
}
